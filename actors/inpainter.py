"""Inpainting (role ``inpainter``): outpainting a new scene around the kept product pixels
(new contexts, paper 2.1.2) and painting another object into the product's place
(counterfactual negatives, 2.1.3).

The model repaints where ``mask`` is white. With ``keep`` given, the kept pixels are pasted
back over the result with a feathered edge, so the product's own pixels survive exactly:
fidelity is never left to the diffusion model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from actors.generator import has_negative, read_adapter_weights, split_negatives
from ray_app.batching import batch_len, column, map_chunks, object_array
from ray_app.config import InpaintOptions, ModelSpec
from ray_app.images import decode_mask, decode_rgb, encode_png, mask_bbox, paste_back
from ray_app.models import load_model


def place_product(
    rgb: np.ndarray,
    mask: np.ndarray,
    size: int,
    scale: tuple[float, float],
    seed: int,
    background: int = 127,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the product out and place it on a square ``size`` canvas: its longer side a
    random fraction in ``scale`` of the canvas, horizontally near the centre, resting in the
    lower half (products stand on surfaces). -> (canvas RGB, keep mask 255 = product)."""
    box = mask_bbox(mask)
    if box is None:
        raise ValueError("place_product: the mask is empty")
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = box
    crop, crop_mask = rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    longer = rng.uniform(*scale) * size
    factor = longer / max(x1 - x0, y1 - y0)
    w, h = (
        max(1, min(size, round((x1 - x0) * factor))),
        max(1, min(size, round((y1 - y0) * factor))),
    )
    crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.LANCZOS))
    crop_mask = np.asarray(Image.fromarray(crop_mask).resize((w, h), Image.NEAREST))
    cx = rng.uniform(0.4, 0.6) * size
    bottom = rng.uniform(0.75, 0.95) * size
    left = int(np.clip(round(cx - w / 2), 0, size - w))
    top = int(np.clip(round(bottom - h), 0, size - h))
    canvas = np.full((size, size, 3), background, np.uint8)
    keep = np.zeros((size, size), np.uint8)
    region = canvas[top : top + h, left : left + w]
    region[crop_mask > 0] = crop[crop_mask > 0]
    keep[top : top + h, left : left + w] = np.where(crop_mask > 0, 255, 0)
    return canvas, keep


def square_canvas(rgb: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A square of the real scene around the product, resized to ``size`` (counterfactuals
    keep the real scene). The square (the shorter side) is centred on the product's box as
    far as the image allows, so an off-centre product is not cut off; a product longer than
    the shorter side is kept whole by padding the image to a square (edge pixels repeated)."""
    h, w = mask.shape
    box = mask_bbox(mask)
    side = min(h, w)
    x0 = y0 = 0
    if box is not None and max(box[2] - box[0], box[3] - box[1]) > side:
        pad = ((0, max(h, w) - h), (0, max(h, w) - w))
        rgb = np.pad(rgb, (*pad, (0, 0)), mode="edge")
        mask = np.pad(mask, pad)
        side = max(h, w)
    else:
        cx, cy = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) if box else (w / 2, h / 2)
        x0 = int(np.clip(round(cx - side / 2), 0, w - side))
        y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    rgb, mask = rgb[y0 : y0 + side, x0 : x0 + side], mask[y0 : y0 + side, x0 : x0 + side]
    return (
        np.asarray(Image.fromarray(rgb).resize((size, size), Image.LANCZOS)),
        np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST)),
    )


class Inpainter:
    """Batch in: ``image`` (encoded bytes, sides multiples of 8), ``mask`` (PNG, 255 = paint
    here), ``prompt`` (str), ``seed`` (int), optional ``keep`` (PNG of pixels to paste back)
    and ``negative_prompt``. Batch out: ``image`` (PNG bytes or None) and ``error``.

    ``lora``: the folder URI of a LoRA trained by ``restage stage train-inpainter``
    (``actors.inpaint_trainer``), applied to every call; None: the base model."""

    role = "inpainter"

    def __init__(
        self,
        model: ModelSpec,
        options: InpaintOptions,
        device: str | None = None,
        lora: str | None = None,
    ):
        self.loaded = load_model(model, device=device)
        if lora is not None:
            self.loaded.model.load_lora_weights(read_adapter_weights(lora), adapter_name="stage")
        self.batch_size = model.batch_size
        self.options = options

    @torch.inference_mode()
    def paint(self, items: list[dict[str, Any]], o: InpaintOptions) -> list[np.ndarray]:
        h, w = items[0]["rgb"].shape[:2]
        if any(it["rgb"].shape[:2] != (h, w) for it in items):
            raise ValueError("inpainter: a micro-batch mixes image sizes")
        if h % 8 or w % 8:
            raise ValueError(f"inpainter: image is {w}x{h}; both sides must be multiples of 8")
        # No negative prompt: SDXL's zeroed unconditional embedding, one call per group.
        images: list[np.ndarray] = [None] * len(items)  # type: ignore[list-item]
        for index, negatives in split_negatives([it["negative_prompt"] for it in items]):
            group = [items[i] for i in index]
            out = self.loaded.model(
                prompt=[it["prompt"] for it in group],
                negative_prompt=negatives,
                image=[Image.fromarray(it["rgb"]) for it in group],
                mask_image=[Image.fromarray(it["mask"]) for it in group],
                height=h,
                width=w,
                num_inference_steps=o.steps,
                guidance_scale=o.guidance_scale,
                strength=o.strength,
                generator=[torch.Generator("cpu").manual_seed(it["seed"]) for it in group],
                output_type="np",
            ).images
            for i, img in zip(index, out, strict=True):
                images[i] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        return [
            paste_back(img, it["rgb"], it["keep"], o.feather) if it["keep"] is not None else img
            for img, it in zip(images, items, strict=True)
        ]

    def __call__(
        self, batch: dict[str, Any], options: InpaintOptions | None = None
    ) -> dict[str, np.ndarray]:
        """``options`` replace the actor's own for this batch (augment paints contexts and
        counterfactuals, each with their settings, with one loaded model)."""
        o = options or self.options
        n = batch_len(batch)
        negatives = column(batch, "negative_prompt", n)
        keeps = column(batch, "keep", n)
        errors: list[str | None] = [None] * n
        items: list[dict[str, Any]] = []
        for i, (data, mask, prompt, seed) in enumerate(
            zip(
                column(batch, "image"),
                column(batch, "mask"),
                column(batch, "prompt"),
                column(batch, "seed"),
                strict=True,
            )
        ):
            try:
                items.append(
                    {
                        "i": i,
                        "rgb": decode_rgb(data),
                        "mask": decode_mask(mask),
                        "prompt": str(prompt),
                        "seed": int(seed),
                        "negative_prompt": negatives[i] or o.negative_prompt,
                        "keep": decode_mask(keeps[i]) if keeps[i] is not None else None,
                    }
                )
            except Exception as exc:
                errors[i] = f"inpainter: bad input: {exc}"
        # Micro-batches never mix image sizes (one latent grid per forward), and rarely rows
        # with and without a negative prompt (two pipeline calls).
        items.sort(
            key=lambda it: (it["rgb"].shape[:2], not has_negative(it["negative_prompt"]), it["i"])
        )
        results: list[tuple[np.ndarray | None, str | None]] = []
        start = 0
        while start < len(items):
            shape = items[start]["rgb"].shape[:2]
            end = start
            while end < len(items) and items[end]["rgb"].shape[:2] == shape:
                end += 1
            results += map_chunks(
                items[start:end], self.batch_size, lambda chunk: self.paint(chunk, o)
            )
            start = end
        images: list[bytes | None] = [None] * n
        for it, (img, err) in zip(items, results, strict=True):
            if err:
                errors[it["i"]] = f"inpainter: {err}"
            else:
                images[it["i"]] = encode_png(img)
        return {"image": object_array(images), "error": object_array(errors)}
