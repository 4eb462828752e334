"""Product masks (role ``segmenter``): Segment Anything, prompted automatically.

No box is given with a product photo, so the prompt is derived from the image itself:

1. an **alpha channel** from the source file is the product mask itself;
2. on a **plain background** (border pixels nearly uniform: catalog shots), pixels far from
   the background colour are the product; its box and centre prompt SAM, and this mask is
   also the mask-free fallback when SAM finds nothing acceptable or disagrees with it;
3. otherwise a **saliency prior**: distance from the border colour (the product is the
   subject, the border is background) weighted by a centre prior; the thresholded salient
   region gives a box and its peak a positive point. When SAM returns no acceptable mask
   for it, the salient region inside the box is the mask (``saliency``: coarse, but the
   subject rather than nothing).

A generated image whose product placement is known (a context: the product was pasted at a
known place, then the scene was outpainted around it) comes with that **placement mask**:
its box and inner point prompt SAM directly. Saliency would be a guess on a cluttered scene
(it may pick a vase beside the product), and the re-segmentation is there to measure whether
outpainting grew or changed the product at that place, so it must look at that place.

SAM returns three candidate masks with its own predicted IoU; the best-scoring one whose
area is plausible (``min_area``..``max_area`` of the image) wins; for a saliency prompt it
must also stay within the prompt's box (a mask spilling far out of it segmented the table
or the room).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ray_app.batching import batch_len, column, decode_column, map_chunks
from ray_app.config import ModelSpec, SegmentConfig
from ray_app.images import decode_mask, encode_png, mask_bbox
from ray_app.metrics import mask_iou
from ray_app.models import load_model

# Below this IoU, SAM and the plain-background mask disagree; on a plain background the
# colour mask is the one to trust.
AGREEMENT_IOU = 0.3
# A SAM candidate keeps at least this share of its area within its prompt box grown by
# BOX_MARGIN of the box's sides each way (select_mask).
BOX_AGREEMENT, BOX_MARGIN = 0.9, 0.1


def border_stats(rgb: np.ndarray, width: float = 0.04) -> tuple[np.ndarray, float]:
    """Median colour of the image border and how much the border varies (90th-percentile
    channel distance from that colour, 0-255)."""
    h, w = rgb.shape[:2]
    b = max(1, round(min(h, w) * width))
    border = np.concatenate(
        [
            rgb[:b].reshape(-1, 3),
            rgb[-b:].reshape(-1, 3),
            rgb[:, :b].reshape(-1, 3),
            rgb[:, -b:].reshape(-1, 3),
        ]
    ).astype(np.float32)
    color = np.median(border, axis=0)
    spread = float(np.percentile(np.abs(border - color).max(axis=1), 90))
    return color, spread


def fill_holes(mask: np.ndarray, work_side: int = 256) -> np.ndarray:
    """Fill background regions not connected to the image border (a white label on a white
    backdrop is still product). Flood fill at reduced resolution, then resized back."""
    h, w = mask.shape
    scale = min(1.0, work_side / max(h, w))
    small = Image.fromarray(mask).resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST
    )
    padded = Image.new("L", (small.width + 2, small.height + 2), 0)
    padded.paste(small, (1, 1))
    ImageDraw.floodfill(padded, (0, 0), 128)
    holes = np.asarray(padded)[1:-1, 1:-1] == 0
    holes = (
        np.asarray(Image.fromarray((holes * 255).astype(np.uint8)).resize((w, h), Image.NEAREST))
        > 0
    )
    return np.where(holes | (mask > 0), 255, 0).astype(np.uint8)


def plain_background_mask(
    rgb: np.ndarray, max_spread: float, tolerance: float
) -> np.ndarray | None:
    """The product on a plain background: pixels far from the border colour, cleaned of
    specks and with holes filled. None when the background is not plain."""
    color, spread = border_stats(rgb)
    if spread > max_spread:
        return None
    distance = np.abs(rgb.astype(np.float32) - color).max(axis=2)
    fg = Image.fromarray(((distance > tolerance) * 255).astype(np.uint8)).filter(
        ImageFilter.MedianFilter(5)
    )
    return fill_holes(np.asarray(fg))


def saliency(rgb: np.ndarray) -> np.ndarray:
    """Contrast to the border colour times a centre prior, smoothed, in [0, 1]."""
    h, w = rgb.shape[:2]
    color, _ = border_stats(rgb)
    distance = np.linalg.norm(rgb.astype(np.float32) - color, axis=2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    centre = np.exp(-(((xx / w - 0.5) ** 2) + ((yy / h - 0.5) ** 2)) / (2 * 0.3**2))
    sal = distance * centre
    sal = (
        np.asarray(
            Image.fromarray(
                np.clip(sal / max(sal.max(), 1e-6) * 255, 0, 255).astype(np.uint8)
            ).filter(ImageFilter.GaussianBlur(max(1, min(h, w) // 64))),
            np.float32,
        )
        / 255.0
    )
    return sal


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    weight = hist.cumsum()
    total = weight[-1]
    mean = (hist * centers).cumsum()
    between = (
        (mean[-1] * weight / total - mean) ** 2
        / np.maximum(weight * (total - weight), 1e-9)
        * total
    )
    return float(centers[np.argmax(between[:-1])])


def prompt_from_saliency(sal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (box [x0, y0, x1, y1], point [x, y]) from a saliency map."""
    threshold = max(otsu_threshold(sal), 0.25 * float(sal.max()))
    region = sal >= threshold
    box = mask_bbox(region) or (0, 0, sal.shape[1], sal.shape[0])
    y, x = np.unravel_index(int(np.argmax(sal)), sal.shape)
    return np.array(box, np.float32), np.array([x, y], np.float32)


def prompt_from_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (box, point) of a mask: its bounding box and the inside pixel nearest its centroid."""
    box = np.array(mask_bbox(mask), np.float32)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return box, np.array([xs[i], ys[i]], np.float32)


def select_mask(
    masks: np.ndarray,
    scores: np.ndarray,
    min_area: float,
    max_area: float,
    box: np.ndarray | None = None,
) -> int | None:
    """Index of SAM's best-scoring candidate whose area fraction is plausible and, given
    its prompt ``box``, which lies within that box (grown by ``BOX_MARGIN``) for at least
    ``BOX_AGREEMENT`` of its area, else None: a mask that spills far out of the box it was
    prompted with segmented something else (the table, the room)."""
    areas = masks.reshape(len(masks), -1).mean(axis=1)
    inside = np.ones(len(masks))
    if box is not None:
        h, w = masks.shape[1:]
        x0, y0, x1, y1 = box
        mx, my = BOX_MARGIN * (x1 - x0), BOX_MARGIN * (y1 - y0)
        region = np.zeros((h, w), bool)
        region[
            max(0, int(y0 - my)) : min(h, int(np.ceil(y1 + my))),
            max(0, int(x0 - mx)) : min(w, int(np.ceil(x1 + mx))),
        ] = True
        totals = masks.reshape(len(masks), -1).sum(axis=1)
        inside = (masks & region).reshape(len(masks), -1).sum(axis=1) / np.maximum(totals, 1)
    ok = [
        i
        for i in np.argsort(-scores)
        if min_area <= areas[i] <= max_area and inside[i] >= BOX_AGREEMENT
    ]
    return int(ok[0]) if ok else None


def saliency_mask(sal: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The salient region inside its prompt box, holes filled: the mask when SAM returns
    no acceptable candidate for a saliency prompt (coarser than SAM's, never the room)."""
    threshold = max(otsu_threshold(sal), 0.25 * float(sal.max()))
    x0, y0, x1, y1 = (int(np.rint(v)) for v in box)
    region = np.zeros(sal.shape, np.uint8)
    region[y0:y1, x0:x1] = (sal[y0:y1, x0:x1] >= threshold) * 255
    return fill_holes(region)


def area_ok(mask: np.ndarray | None, min_area: float, max_area: float) -> bool:
    return mask is not None and min_area <= float((mask > 0).mean()) <= max_area


class Segmenter:
    """Batch in: ``image`` (encoded bytes), optional ``alpha`` (PNG mask hint or None),
    optional ``placed`` (PNG mask of where the product was pasted, or None: prompts SAM
    with its box and point; see the module doc). Batch out: ``mask`` (PNG, 255 = product, None on failure), ``mask_score`` (SAM's
    predicted IoU, 1.0 for alpha, NaN for the colour fallback), ``mask_method`` and ``error``."""

    role = "segmenter"

    def __init__(self, model: ModelSpec, options: SegmentConfig, device: str | None = None):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.loaded = load_model(model, device=device)
        self.batch_size = model.batch_size
        self.options = options
        self.transform = ResizeLongestSide(self.loaded.model.image_encoder.img_size)

    def sam(
        self, items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(rgb, box, point)] -> [(masks (3, H, W) bool, predicted IoU (3,))] in one forward."""
        import torch  # here, not at module level: stage's decode tasks use this module's masks

        m = self.loaded
        inputs = []
        for rgb, box, point in items:
            size = rgb.shape[:2]
            image = torch.as_tensor(self.transform.apply_image(rgb), device=m.device)
            inputs.append(
                {
                    "image": image.permute(2, 0, 1).contiguous().to(m.dtype),
                    "original_size": size,
                    "boxes": torch.as_tensor(
                        self.transform.apply_boxes(box[None], size), device=m.device, dtype=m.dtype
                    ),
                    "point_coords": torch.as_tensor(
                        self.transform.apply_coords(point[None, None], size),
                        device=m.device,
                        dtype=m.dtype,
                    ),
                    "point_labels": torch.ones((1, 1), device=m.device, dtype=torch.int),
                }
            )
        with torch.inference_mode():
            outputs = m.model(inputs, multimask_output=True)
        return [
            (o["masks"][0].cpu().numpy(), o["iou_predictions"][0].float().cpu().numpy())
            for o in outputs
        ]

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        opts = self.options
        masks: list[bytes | None] = [None] * n
        scores = np.full(n, np.nan, np.float32)
        methods: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        # (index, rgb, box, point, plain-background mask or None, method or None)
        todo: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, Any, str | None]] = []
        fallbacks: dict[int, np.ndarray] = {}  # saliency prompts: the mask if SAM finds none
        rgbs = decode_column(column(batch, "image"), errors, self.role)
        hints = zip(column(batch, "alpha", n), column(batch, "placed", n), strict=True)
        for i, (rgb, (alpha, placed)) in enumerate(zip(rgbs, hints, strict=True)):
            if rgb is None:
                continue
            if placed is not None:
                where = decode_mask(placed)
                if where.shape != rgb.shape[:2] or not where.any():
                    errors[i] = (
                        f"segmenter: placement mask {where.shape[::-1]} is empty or not the "
                        f"image's size {rgb.shape[1::-1]}"
                    )
                    continue
                box, point = prompt_from_mask(where)
                todo.append((i, rgb, box, point, None, "sam-placement"))
                continue
            if alpha is not None:
                hint = decode_mask(alpha)
                if area_ok(hint, opts.min_area, opts.max_area):
                    masks[i], scores[i], methods[i] = encode_png(hint), 1.0, "alpha"
                    continue
            color, _ = border_stats(rgb)
            if np.abs(rgb.astype(np.float32) - color).max() <= opts.plain_background_tolerance:
                errors[i] = (
                    "segmenter: no product found: nothing in the image differs from its border"
                )
                continue
            plain = plain_background_mask(
                rgb, opts.plain_background_spread, opts.plain_background_tolerance
            )
            if area_ok(plain, opts.min_area, opts.max_area):
                box, point = prompt_from_mask(plain)
            else:
                sal = saliency(rgb)
                box, point = prompt_from_saliency(sal)
                plain = None
                fallbacks[i] = saliency_mask(sal, box)
            todo.append((i, rgb, box, point, plain, "sam-box" if plain is not None else None))
        results = map_chunks(
            [(rgb, box, pt) for _, rgb, box, pt, _, _ in todo], self.batch_size, self.sam
        )
        for (i, _, box, _, plain, method), (result, err) in zip(todo, results, strict=True):
            chosen = None
            if result is not None:
                candidates, iou = result
                # A saliency box is a guess: SAM must stay inside it. A placement's box is
                # not (a product grown by outpainting spills out of it: IoU measures that).
                inside = box if i in fallbacks else None
                k = select_mask(candidates, iou, opts.min_area, opts.max_area, inside)
                if k is not None:
                    chosen = (candidates[k].astype(np.uint8) * 255, float(iou[k]))
            if plain is not None and (chosen is None or mask_iou(chosen[0], plain) < AGREEMENT_IOU):
                chosen, methods[i] = (plain, np.nan), "plain-background"
            elif chosen is not None:
                methods[i] = method or "sam-saliency"
            elif i in fallbacks and area_ok(fallbacks[i], opts.min_area, opts.max_area):
                chosen, methods[i] = (fallbacks[i], np.nan), "saliency"
            if chosen is None:
                errors[i] = (
                    f"segmenter: no product found ({err})"
                    if err
                    else (
                        f"segmenter: no product found: no mask covers {opts.min_area:g}-{opts.max_area:g} of the image"
                    )
                )
                continue
            masks[i], scores[i] = encode_png(chosen[0]), chosen[1]
        obj = lambda values: np.array(values, dtype=object)  # noqa: E731
        return {
            "mask": obj(masks),
            "mask_score": scores,
            "mask_method": obj(methods),
            "error": obj(errors),
        }
