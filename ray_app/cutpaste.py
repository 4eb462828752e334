"""Cut-and-paste synthesis (issue 16, `restage personalize`; the personalized-representations
paper's cheap alternative to DreamBooth data): the product cut out with its mask, resized by
a random scale and pasted at a random place on a background, with the paste mask kept for
dense training and evaluation.

Pure numpy/Pillow and seeded. The rules (``CutPasteConfig``):

- **scale 1** is the product's mask box fitted, aspect kept, into a square of
  ``reference`` of the background's shorter side (so a paste's size does not depend on how
  large the product was in its photo); the scale is drawn uniformly from ``scale_range``;
- **position**: the pasted box lies fully inside the frame, its corner drawn uniformly over
  every such place (``reference * max scale <= 1`` makes one exist);
- **pixels**: inside the returned mask the image holds the resized product's pixels exactly
  (no feathering, no blending), resized premultiplied by the mask so that no colour of
  the photo's own background bleeds in; outside it the background is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ray_app.config import CutPasteConfig
from ray_app.staging import Box

_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


@dataclass(frozen=True)
class CutPaste:
    """One synthesised image and where the product went."""

    image: np.ndarray  # H x W x 3 uint8: the background with the product pasted on it
    mask: np.ndarray  # H x W bool: the paste mask (exactly the product's pixels)
    box: Box  # the pasted product's box (its resized mask box), inside the frame
    scale: float  # the drawn scale (1: the box fitted to ``reference`` of the shorter side)


def pasted_size(product: Box, background: tuple[int, int], scale: float, reference: float):
    """(width, height) of the product's box at ``scale`` on a background of (h, w): its
    longer side ``scale * reference`` of the background's shorter side, aspect kept, at
    least 1 pixel each way."""
    fitted = scale * reference * min(background) / max(product.width, product.height)
    return max(1, round(product.width * fitted)), max(1, round(product.height * fitted))


def _check_inputs(
    product: np.ndarray, mask: np.ndarray, background: np.ndarray, config: CutPasteConfig
) -> Box:
    for name, arr in (("product", product), ("background", background)):
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(
                f"cut_paste: {name} is {arr.dtype} {arr.shape}; give an H x W x 3 uint8 RGB "
                "image (ray_app.images.decode_rgb)"
            )
    if mask.shape != product.shape[:2]:
        raise ValueError(
            f"cut_paste: mask is {mask.shape} but product is {product.shape[:2]}; give the "
            "product's own mask (same height and width as its photo)"
        )
    box = Box.of(mask)
    if box is None:
        raise ValueError(
            "cut_paste: mask is empty (no product pixel); segment the product first or "
            "leave this photo out"
        )
    side = min(background.shape[:2])
    if side < config.min_background_side:
        raise ValueError(
            f"cut_paste: background is {background.shape[1]}x{background.shape[0]}, its "
            f"shorter side below cutpaste min_background_side={config.min_background_side}; "
            "use a larger background or lower min_background_side"
        )
    return box


def cut_paste(
    product: np.ndarray,
    mask: np.ndarray,
    background: np.ndarray,
    rng: np.random.Generator | int,
    config: CutPasteConfig | None = None,
) -> CutPaste:
    """Paste ``product`` (H x W x 3 uint8; ``mask``: its product pixels, nonzero = product)
    on ``background`` at a random scale and place drawn from ``rng`` (a generator or a
    seed); the module says how. The same inputs and seed give the same result."""
    config = config or CutPasteConfig()
    source = _check_inputs(product, mask, background, config)
    rng = np.random.default_rng(rng)
    low, high = config.scale_range
    scale = float(rng.uniform(low, high))
    w, h = pasted_size(source, background.shape[:2], scale, config.reference)
    height, width = background.shape[:2]
    x0 = int(rng.integers(0, width - w + 1))
    y0 = int(rng.integers(0, height - h + 1))
    layer, hard = resized_cutout(product, mask, source, (w, h), config.interpolation)
    box = Box(x0, y0, x0 + w, y0 + h)
    image = background.copy()
    region = image[box.y0 : box.y1, box.x0 : box.x1]
    region[hard] = layer[hard]  # product pixels copied, never blended
    paste = np.zeros((height, width), bool)
    paste[box.y0 : box.y1, box.x0 : box.x1] = hard
    return CutPaste(image, paste, box, scale)


def resized_cutout(
    product: np.ndarray, mask: np.ndarray, source: Box, size: tuple[int, int], interpolation: str
) -> tuple[np.ndarray, np.ndarray]:
    """The product's box resized to ``size`` (w, h) -> (rgb, bool mask). The mask follows
    ``interpolation`` for 'nearest' (each kept pixel is then a product pixel itself) and is
    resampled bilinearly and cut at half otherwise, a smooth edge as in ``staging``."""
    crop = product[source.y0 : source.y1, source.x0 : source.x1]
    inside = mask[source.y0 : source.y1, source.x0 : source.x1] != 0
    if interpolation == "nearest":
        rgb = np.asarray(Image.fromarray(crop).resize(size, Image.NEAREST))
        kept = Image.fromarray(inside.astype(np.uint8) * 255).resize(size, Image.NEAREST)
        return rgb, np.asarray(kept) >= 128
    # Premultiplied by the mask: an edge pixel is a mean of product pixels only, never of the
    # photo's background around the product (which would show as a halo on the new scene).
    method = _RESAMPLE[interpolation]
    weight = _resize_float(inside.astype(np.float32), size, method)
    channels = [
        _resize_float(crop[..., c].astype(np.float32) * inside, size, method) for c in range(3)
    ]
    with np.errstate(divide="ignore", invalid="ignore"):
        rgb = np.stack(channels, axis=-1) / weight[..., None]
    rgb = np.where(weight[..., None] > 1e-3, rgb, 0)
    kept = _resize_float(inside.astype(np.float32), size, Image.BILINEAR) >= 0.5
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), kept


def _resize_float(plane: np.ndarray, size: tuple[int, int], method: int) -> np.ndarray:
    return np.asarray(Image.fromarray(plane, mode="F").resize(size, method))
