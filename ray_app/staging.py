"""The geometry of copy-paste staging (`restage stage`; retrieval-assisted staging, arXiv
2307.15326): where a product goes in a retrieved catalog scene, and how it is composited.

Pure numpy/Pillow, no models, so it is tested for real on synthetic scenes whose masks are
known (``bench/stage.py`` reports the placement error). The steps:

1. ``target`` — the scene product's box and its **ground line** (the row its bottom rests on:
   the lowest row holding a real share of the mask, so a stray pixel does not move it).
2. ``fit`` — the new product scaled to fit inside the scene product's box (aspect kept), its
   bottom on the ground line, centred horizontally on the scene product.
3. ``composite`` — the product pasted at that place over the scene whose own product was
   removed: its pixels are exact except in a feathered band at its edge; a soft contact
   shadow darkens the ground under it; colour is harmonised only within the edge band.
4. ``gap_mask`` — what is left of the removed product's area outside the new product's
   silhouette, for the inpainter to fill.
5. ``boundary_score`` — how strongly the seam stands out (0: no visible seam).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from ray_app.images import dilate, mask_bbox


@dataclass(frozen=True)
class Box:
    """Pixel box, exclusive ends."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(0, self.width) * max(0, self.height)

    @property
    def aspect(self) -> float:
        """Width over height."""
        return self.width / self.height

    def iou(self, other: Box) -> float:
        ix = max(0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union else 0.0

    @classmethod
    def of(cls, mask: np.ndarray) -> Box | None:
        found = mask_bbox(mask)
        return None if found is None else cls(*found)


@dataclass(frozen=True)
class Target:
    """Where the scene's product stood: its box and the row its bottom rests on."""

    box: Box
    ground: int  # row index (exclusive end of the product's support)


@dataclass(frozen=True)
class Placement:
    """Where the new product goes: its scale and its box in the scene."""

    scale: float
    box: Box


def ground_line(mask: np.ndarray, min_share: float = 0.2) -> int:
    """The row below the product's bottom: the lowest row whose mask covers at least
    ``min_share`` of the product's widest row (stray pixels and thin legs' tips below a
    solid base are not the ground), as an exclusive end."""
    rows = mask.sum(axis=1)
    if rows.max() == 0:
        raise ValueError("ground_line: the mask is empty")
    solid = np.nonzero(rows >= min_share * rows.max())[0]
    return int(solid.max()) + 1


def target(scene_mask: np.ndarray, min_share: float = 0.2) -> Target:
    box = Box.of(scene_mask)
    if box is None:
        raise ValueError("target: the scene's product mask is empty")
    return Target(box, ground_line(scene_mask, min_share))


def fit(product: Box, where: Target) -> Placement:
    """The product's box scaled to fit inside the scene product's box (aspect kept: a
    product is never stretched), bottom on the ground line, centred on the scene product."""
    if product.area == 0 or where.box.area == 0:
        raise ValueError(f"fit: empty box (product {product}, target {where.box})")
    scale = min(where.box.width / product.width, where.box.height / product.height)
    w = max(1, round(product.width * scale))
    h = max(1, round(product.height * scale))
    cx = (where.box.x0 + where.box.x1) / 2
    x0 = round(cx - w / 2)
    y1 = where.ground
    return Placement(scale, Box(x0, y1 - h, x0 + w, y1))


def aspect_change(a: Box, b: Box) -> float:
    """How much the aspect ratios differ, as a factor >= 1 (1: the same shape); retrieval
    keeps scenes within ``stage.max_aspect_change`` of the product's."""
    return math.exp(abs(math.log(a.aspect / b.aspect)))


# --------------------------------------------------------------------------- compositing


@dataclass(frozen=True)
class Staged:
    """A staged image and its layers (the parallax animation moves them apart)."""

    image: np.ndarray  # H x W x 3 uint8: the composite
    background: np.ndarray  # H x W x 3 uint8: the scene under the product, shadow included
    product: np.ndarray  # H x W x 3 uint8: the placed product (harmonised edge band)
    alpha: np.ndarray  # H x W float32: the product's feathered alpha
    mask: np.ndarray  # H x W bool: where the product is (alpha >= 0.5)
    shadow: np.ndarray  # H x W float32: the contact shadow's opacity
    placement: Placement


def _place_layer(
    product_rgb: np.ndarray,
    product_mask: np.ndarray,
    source: Box,
    placement: Placement,
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """The product resized to its placement on a canvas of ``size`` (h, w); -> (rgb, mask)."""
    h, w = size
    b = placement.box
    crop = product_rgb[source.y0 : source.y1, source.x0 : source.x1]
    crop_mask = product_mask[source.y0 : source.y1, source.x0 : source.x1]
    rgb = np.asarray(Image.fromarray(crop).resize((b.width, b.height), Image.LANCZOS))
    soft = np.asarray(
        Image.fromarray(crop_mask.astype(np.uint8) * 255).resize(
            (b.width, b.height), Image.BILINEAR
        )
    )
    canvas = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), bool)
    # clip to the scene (a product fitted at the frame's edge is cut there)
    x0, y0, x1, y1 = max(0, b.x0), max(0, b.y0), min(w, b.x1), min(h, b.y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"placement {b} lies outside the {w}x{h} scene")
    canvas[y0:y1, x0:x1] = rgb[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    mask[y0:y1, x0:x1] = soft[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0] >= 128
    return canvas, mask


def contact_shadow(
    mask: np.ndarray, ground: int, opacity: float, height: float = 0.06, blur: float = 0.03
) -> np.ndarray:
    """A soft elliptical shadow under the product's base: as wide as its bottom rows, its
    height ``height`` of the product's, blurred by ``blur`` of its width. -> opacity map."""
    h, w = mask.shape
    out = np.zeros((h, w), np.float32)
    box = Box.of(mask)
    if box is None or opacity <= 0:
        return out
    base = mask[max(box.y0, ground - max(2, box.height // 10)) : ground].any(axis=0)
    xs = np.nonzero(base)[0] if base.any() else np.arange(box.x0, box.x1)
    cx, rx = (xs.min() + xs.max() + 1) / 2, max(2.0, (xs.max() + 1 - xs.min()) / 2 * 1.05)
    ry = max(1.5, box.height * height)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - ground) / ry) ** 2 <= 1
    out[inside] = opacity
    sigma = max(0.5, blur * (2 * rx))
    return ndimage.gaussian_filter(out, sigma).astype(np.float32)


def composite(
    scene_rgb: np.ndarray,
    product_rgb: np.ndarray,
    product_mask: np.ndarray,
    where: Target,
    *,
    feather: int = 2,
    shadow_opacity: float = 0.35,
    harmonize: float = 0.5,
) -> Staged:
    """Paste the product (its photo and mask) into ``scene_rgb`` (the scene with its own
    product already removed) at the place ``fit`` gives; see the module's steps."""
    if scene_rgb.ndim != 3 or product_rgb.ndim != 3:
        raise ValueError("composite: scene_rgb and product_rgb must be H x W x 3 images")
    if product_mask.shape != product_rgb.shape[:2]:
        raise ValueError(
            f"composite: product_mask is {product_mask.shape}, the photo {product_rgb.shape[:2]}"
        )
    source = Box.of(product_mask)
    if source is None:
        raise ValueError("composite: the product's mask is empty")
    placement = fit(source, where)
    layer, mask = _place_layer(product_rgb, product_mask, source, placement, scene_rgb.shape[:2])
    shadow = contact_shadow(mask, where.ground, shadow_opacity)
    shadow[mask] = 0  # the shadow lies on the ground, not on the product
    background = np.clip(scene_rgb.astype(np.float32) * (1 - shadow[..., None]), 0, 255)
    background = np.rint(background).astype(np.uint8)
    if harmonize > 0 and feather > 0:
        layer = harmonize_band(layer, mask, background, feather, harmonize)
    alpha = feathered_alpha(mask, feather)
    out = background.astype(np.float32) * (1 - alpha[..., None]) + layer * alpha[..., None]
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Staged(image, background, layer, alpha, mask, shadow, placement)


def feathered_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """1 farther than ``feather`` pixels inside the mask, rising from the edge within it, 0
    outside: the product's interior stays exact and only its outer band is blended."""
    if feather <= 0:
        return mask.astype(np.float32)
    inside = ndimage.distance_transform_edt(mask)  # 1 on the edge pixels, 0 outside
    return np.clip(inside / (feather + 1), 0, 1).astype(np.float32) * mask


def harmonize_band(
    layer: np.ndarray, mask: np.ndarray, background: np.ndarray, feather: int, strength: float
) -> np.ndarray:
    """Shift the product's colour toward the scene's only in its edge band (within
    ``feather`` of its edge), by ``strength`` of the difference of the band's and the
    surrounding ring's mean colour, fading to nothing inside: the product itself keeps its
    colours, its rim takes a little of the scene's light."""
    inside = ndimage.distance_transform_edt(mask)
    band = mask & (inside <= feather)
    ring = dilate(mask.astype(np.uint8) * 255, 2 * feather + 1).astype(bool) & ~mask
    if not band.any() or not ring.any():
        return layer
    shift = background[ring].mean(axis=0) - layer[band].mean(axis=0)
    weight = np.where(band, 1 - (inside - 1) / max(1, feather), 0).clip(0, 1) * strength
    out = layer.astype(np.float32) + weight[..., None] * shift
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def removal_mask(scene_mask: np.ndarray, dilation: int) -> np.ndarray:
    """The scene's product grown by ``dilation`` pixels: what the inpainter replaces with the
    background behind it (the grown edge takes its halo and soft shadow along)."""
    return dilate(scene_mask.astype(np.uint8) * 255, dilation) > 0


def gap_mask(removed: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """The removed product's area that the new product does not cover: the gaps between the
    two silhouettes, which the inpainter fills (it never touches the product's pixels)."""
    return removed & ~placed


def boundary_score(image: np.ndarray, mask: np.ndarray, band: int = 3) -> float:
    """How much the seam stands out: the mean colour gradient in a band around the product's
    edge over the mean gradient in the rest of the image (1: like the image elsewhere;
    higher: a visible cut-out edge). NaN for an empty mask."""
    if not mask.any() or mask.all():
        return float("nan")
    grey = image.astype(np.float32).mean(axis=2)
    grad = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
    edge = ndimage.binary_dilation(mask, iterations=band) & ~ndimage.binary_erosion(
        mask, iterations=band
    )
    rest = ~edge
    base = float(grad[rest].mean()) if rest.any() else 0.0
    return float(grad[edge].mean() / max(base, 1e-6))
