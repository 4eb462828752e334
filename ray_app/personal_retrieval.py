"""Instance retrieval measures of a personalized encoder (personalized representations,
arXiv 2412.16156, sec. 4): given features of a product's reference photos and of a gallery
labelled by product, how well does similarity to the references rank the product's own
gallery images above everything else. Plain numpy; ``restage personalize evaluate`` and the
encoder tests use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_app.metrics import l2_normalize


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AP of ranking by ``scores`` (higher first) for the boolean ``relevant`` labels: the
    mean over relevant items of the precision at their rank. Ties are broken against the
    relevant items (a constant score earns no credit). NaN when nothing is relevant."""
    scores = np.asarray(scores, float)
    relevant = np.asarray(relevant, bool)
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    if not relevant.any():
        return float("nan")
    # lexsort: last key first; among equal scores the irrelevant ones come first
    order = np.lexsort((relevant, -scores))
    hits = relevant[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Fraction of the relevant items among the ``k`` best-scored (ties against them)."""
    relevant = np.asarray(relevant, bool)
    if not relevant.any():
        return float("nan")
    order = np.lexsort((relevant, -np.asarray(scores, float)))
    return float(relevant[order[:k]].sum() / relevant.sum())


@dataclass(frozen=True)
class Retrieval:
    product_id: str
    average_precision: float
    recall_at_k: float
    k: int
    relevant: int
    gallery: int


def product_retrieval(
    product_id: str,
    references: np.ndarray,
    gallery: np.ndarray,
    gallery_ids: list[str] | np.ndarray,
    k: int = 5,
) -> Retrieval:
    """Score each gallery feature by its best cosine similarity to the product's reference
    features (its real photos) and measure how the product's own gallery images rank."""
    if len(references) == 0:
        raise ValueError(f"{product_id}: no reference features to retrieve with")
    sims = l2_normalize(np.asarray(gallery, float)) @ l2_normalize(np.asarray(references, float)).T
    scores = sims.max(axis=1)
    relevant = np.asarray(gallery_ids) == product_id
    return Retrieval(
        product_id=product_id,
        average_precision=average_precision(scores, relevant),
        recall_at_k=recall_at_k(scores, relevant, k),
        k=k,
        relevant=int(relevant.sum()),
        gallery=len(relevant),
    )
