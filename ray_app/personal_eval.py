"""Measures of a personalized encoder beyond retrieval (``restage personalize evaluate``;
personalized representations, arXiv 2412.16156, sec. 4): classification ("is it this
product?"), detection and segmentation from a patch-similarity map. Plain numpy/scipy; the
retrieval measures are ray_app/personal_retrieval.py's.

Conventions, the same everywhere here:

- scores rank higher-first; ties count half (ROC AUC) or against the positives (AP);
- a measure with nothing to measure (no positive, no negative, no mask) is NaN, never 0;
- boxes are ``(x0, y0, x1, y1)`` in pixels, half-open (x1, y1 one past the last pixel);
- a similarity map is an (h, w) array of cosines, one per patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BoxT = tuple[int, int, int, int]


# --------------------------------------------------------------------------- classification


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a positive outscores a negative, ties
    counting half (the Mann-Whitney U statistic over n+ * n-). NaN without both classes."""
    scores = np.asarray(scores, float)
    labels = np.asarray(labels, bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)  # average ranks: a tie counts half
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Mean of the true-positive and true-negative rates of ``score >= threshold``; NaN
    without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if not labels.any() or labels.all():
        return float("nan")
    predicted = scores >= threshold
    return float((predicted[labels].mean() + (~predicted[~labels]).mean()) / 2)


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Fraction of the items that ``score >= threshold`` labels right; NaN when empty."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if scores.size == 0:
        return float("nan")
    return float(((scores >= threshold) == labels).mean())


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold with the best balanced accuracy of ``score >= threshold`` (the
    validation split's choice; balanced, because a product's images are few among many
    others'). Candidates are the midpoints between consecutive distinct scores and one
    beyond each end; the lowest of equally good ones wins. NaN without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if not labels.any() or labels.all():
        return float("nan")
    distinct = np.unique(scores)
    candidates = np.concatenate(
        [[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1.0]]
    )
    values = [balanced_accuracy(scores, labels, t) for t in candidates]
    return float(candidates[int(np.argmax(values))])


# --------------------------------------------------------------------------- maps


def prototype(tokens: np.ndarray) -> np.ndarray:
    """A product's prototype: the mean over its reference images (n, h, w, d) of their mean
    patch token -> (d,)."""
    return np.asarray(tokens).mean(axis=(1, 2)).mean(axis=0)


def similarity_map(tokens: np.ndarray, prototype: np.ndarray) -> np.ndarray:
    """Cosine similarity of each patch token (h, w, d) to ``prototype`` (d,) -> (h, w)."""
    tokens = np.asarray(tokens, np.float64)
    proto = np.asarray(prototype, np.float64)
    norms = np.linalg.norm(tokens, axis=-1) * np.linalg.norm(proto)
    return (tokens @ proto) / np.maximum(norms, 1e-12)


def upsample(values: np.ndarray, side: int) -> np.ndarray:
    """An (h, w) map resized bilinearly to (side, side), pixel centres aligned (as Pillow
    resizes): what a mask of that size is compared with."""
    from PIL import Image

    img = Image.fromarray(np.asarray(values, np.float32), mode="F")
    return np.asarray(img.resize((side, side), Image.BILINEAR), np.float64)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut of their histogram with the largest
    between-class variance (``>= threshold`` is foreground). A constant input returns its
    value."""
    values = np.asarray(values, np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)  # below or at each bin
    w1 = w0[-1] - w0
    s0 = np.cumsum(counts * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two boolean masks; NaN when both are empty."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"masks {predicted.shape} and {truth.shape} differ in shape")
    union = np.logical_or(predicted, truth).sum()
    if union == 0:
        return float("nan")
    return float(np.logical_and(predicted, truth).sum() / union)


def best_mask_threshold(maps: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """The threshold (a quantile of the maps' pooled values, every 2 %) with the best mean
    IoU of ``map >= threshold`` against ``masks`` (the validation split's choice). NaN
    without masks."""
    if not maps:
        return float("nan")
    pooled = np.concatenate([np.ravel(m) for m in maps])
    candidates = np.unique(np.quantile(pooled, np.linspace(0, 1, 51)))
    scores = [
        np.nanmean([mask_iou(m >= t, k) for m, k in zip(maps, masks, strict=True)] or [np.nan])
        for t in candidates
    ]
    scores = np.nan_to_num(np.asarray(scores, float), nan=-1.0)
    return float(candidates[int(np.argmax(scores))])


# --------------------------------------------------------------------------- boxes


def mask_box(mask: np.ndarray) -> BoxT | None:
    """The box of a mask's nonzero pixels; None when it is empty."""
    ys, xs = np.nonzero(np.asarray(mask))
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def largest_box(binary: np.ndarray) -> BoxT | None:
    """The box of the largest 8-connected component of ``binary`` (the first in row-major
    order among equally large ones); None when nothing is set."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(binary, bool), structure=np.ones((3, 3), int))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return mask_box(labels == int(np.argmax(sizes)) + 1)


def box_iou(a: BoxT | None, b: BoxT | None) -> float:
    """IoU of two boxes; 0 when either is None or they do not meet."""
    if a is None or b is None:
        return 0.0
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass(frozen=True)
class Detection:
    """One image's detection: the box (None: nothing above the threshold), its score and
    its IoU with the image's ground-truth box (0 for an image without the product)."""

    box: BoxT | None
    score: float
    iou: float


def detection_ap(detections: list[Detection], ground_truths: int, iou: float = 0.5) -> float:
    """Average precision at ``iou`` (PASCAL VOC, all points) of at most one detection per
    image: detections ranked by score (ties: wrong ones first), a detection right when its
    IoU with the image's ground-truth box reaches ``iou``; recall over ``ground_truths``
    (images showing the product). Images without a box make no detection. NaN when
    nothing is to be found."""
    if ground_truths <= 0:
        return float("nan")
    made = [d for d in detections if d.box is not None]
    if not made:
        return 0.0
    right = np.array([d.iou >= iou for d in made], bool)
    scores = np.array([d.score for d in made], float)
    order = np.lexsort((right, -scores))
    hits = right[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / ground_truths
    # the precision envelope (monotone from the right), integrated over recall's steps
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((steps * envelope).sum())
