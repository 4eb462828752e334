"""The weighted boundary loss of retrieval-assisted staging (arXiv 2307.15326, eq. 1), for a
latent-diffusion inpainter: a per-latent-pixel weight on the denoising loss that peaks on
the band around the hole's boundary, where a pasted product meets the inpainted scene and
seams show. `restage stage train-inpainter` multiplies the per-pixel MSE by this map.

The map is made at image resolution, where the band's width in pixels means something, and
averaged down to the latent grid (a latent pixel that covers part of the band gets part of
the peak), then normalised to mean 1 so that the loss keeps its scale and the learning rate
means the same with or without weighting.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def boundary_weights(
    mask: np.ndarray,
    latent_size: tuple[int, int],
    band: int,
    peak: float,
    *,
    normalise: bool = True,
) -> np.ndarray:
    """``mask``: H x W bool, True in the hole. -> float32 (h, w) weights on the latent grid:
    ``peak`` within ``band`` pixels of the hole's edge (either side), 1 elsewhere, falling
    off linearly across the band's outer half so the weight has no hard step."""
    if mask.ndim != 2:
        raise ValueError(f"boundary_weights: mask must be H x W, got shape {mask.shape}")
    if band < 1:
        raise ValueError(f"boundary_weights: band={band}: give at least 1 pixel")
    if peak < 1:
        raise ValueError(f"boundary_weights: peak={peak}: a weight below 1 would ignore the edge")
    h, w = latent_size
    H, W = mask.shape
    if H % h or W % w:
        raise ValueError(
            f"boundary_weights: the {W}x{H} mask is not a whole multiple of the {w}x{h} latent"
        )
    hole = mask.astype(bool)
    if hole.any() and not hole.all():
        # distance of every pixel to the boundary: outside pixels to the hole, inside ones out
        dist = np.where(
            hole, ndimage.distance_transform_edt(hole), ndimage.distance_transform_edt(~hole)
        )
        ramp = np.clip((2 * band - 2 * dist) / band, 0, 1)  # 1 within band/2, 0 beyond band
        full = 1 + (peak - 1) * ramp
    else:
        full = np.ones_like(hole, np.float64)
    latent = full.reshape(h, H // h, w, W // w).mean(axis=(1, 3))
    if normalise:
        latent = latent / latent.mean()
    return latent.astype(np.float32)


def band_l1(predicted: np.ndarray, truth: np.ndarray, mask: np.ndarray, band: int) -> float:
    """Mean absolute error (0-255 scale) in the band of ``band`` pixels around the hole's
    edge: the benchmark's measure of seams, with and without the weighting."""
    hole = mask.astype(bool)
    ring = ndimage.binary_dilation(hole, iterations=band) & ~ndimage.binary_erosion(
        hole, iterations=band
    )
    if not ring.any():
        raise ValueError("band_l1: the mask has no boundary")
    diff = np.abs(predicted.astype(np.float32) - truth.astype(np.float32))
    return float(diff[ring].mean())
