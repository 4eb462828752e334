"""Scores shared by filtering (augment), ranking (generate, serve) and evaluation.

Pure numpy: cosine similarities between embeddings, mask IoU, and the normalised weighted
aggregate that ranks images. Raw metrics live on different scales (CLIP-T around 0.2-0.35,
CLIP-I around 0.6-0.95), so each is mapped through a fixed range onto [0, 1] before weighting;
fixed ranges keep the aggregate absolute, so one threshold means the same for every product.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D) x (M, D) -> (N, M) cosine similarities."""
    return l2_normalize(a) @ l2_normalize(b).T


def mean_similarity(
    queries: np.ndarray, references: np.ndarray, exclude_self: np.ndarray | None = None
) -> np.ndarray:
    """Mean cosine similarity of each query to the references; NaN rows stay NaN.

    ``exclude_self[i] = j`` leaves reference ``j`` out for query ``i`` (a real image is not
    compared with itself); -1 excludes nothing.
    """
    queries, references = np.asarray(queries, np.float32), np.asarray(references, np.float32)
    out = np.full(len(queries), np.nan, np.float32)
    valid_ref = ~np.isnan(references).any(axis=1)
    if not valid_ref.any() or len(queries) == 0:
        return out
    sims = cosine_matrix(np.nan_to_num(queries), references[valid_ref])
    ref_index = np.flatnonzero(valid_ref)
    for i in range(len(queries)):
        if np.isnan(queries[i]).any():
            continue
        keep = np.ones(len(ref_index), bool)
        if exclude_self is not None and exclude_self[i] >= 0:
            keep &= ref_index != exclude_self[i]
        if keep.any():
            out[i] = float(sims[i, keep].mean())
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks (nonzero = inside); 0.0 when both are empty,
    since for us an empty mask means the product was not found."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if a.shape != b.shape:
        raise ValueError(f"mask_iou: shapes differ {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 0.0
    return float(np.logical_and(a, b).sum() / union)


def sharpness(rgb: np.ndarray, mask: np.ndarray | None, short_side: int) -> float:
    """Detail of the product as training will see it: the variance of the Laplacian of the
    grey image resized so its shorter side is ``short_side`` (the training resolution: a
    soft 576-px view upsampled to 1024 px shows its softness there), over the mask's
    interior (pixels whose four neighbours are inside too: the product's outline is an edge
    on any background). The whole image without a mask; NaN when nothing is left."""
    from PIL import Image  # numpy-only module otherwise

    h, w = rgb.shape[:2]
    size = (max(1, round(w * short_side / min(h, w))), max(1, round(h * short_side / min(h, w))))
    grey = np.asarray(Image.fromarray(rgb).convert("L").resize(size, Image.BICUBIC), np.float32)
    inside = np.ones(grey.shape, bool)
    if mask is not None:
        inside = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)) > 0
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    core = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1]
    core &= inside[1:-1, :-2] & inside[1:-1, 2:]
    return float(lap[core].var()) if core.sum() > 1 else float("nan")


def normalize_score(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map raw metric values through [low, high] onto [0, 1] (clipped); NaN stays NaN."""
    if high <= low:
        raise ValueError(f"normalize_score: high={high} must exceed low={low}")
    return np.clip((np.asarray(values, np.float32) - low) / (high - low), 0.0, 1.0)


def aggregate(
    scores: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    ranges: Mapping[str, tuple[float, float]],
) -> np.ndarray:
    """Weighted mean of normalised metrics per item; a metric that is NaN for an item
    (e.g. no mask, so no segmented score) is left out and the weights renormalised."""
    names = [n for n, w in weights.items() if w > 0 and n in scores]
    if not names:
        raise ValueError(
            f"aggregate: no weighted metric among {sorted(scores)}; weights={dict(weights)}"
        )
    n = len(next(iter(scores.values())))
    total = np.zeros(n, np.float64)
    weight_sum = np.zeros(n, np.float64)
    for name in names:
        lo, hi = ranges[name]
        norm = normalize_score(scores[name], lo, hi).astype(np.float64)
        present = ~np.isnan(norm)
        total[present] += weights[name] * norm[present]
        weight_sum[present] += weights[name]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(weight_sum > 0, total / weight_sum, np.nan)
    return out.astype(np.float32)
