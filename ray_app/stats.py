"""Aggregates of evaluation metrics: means with percentile-bootstrap confidence intervals,
and paired per-product differences of two runs.

The unit of resampling is the product (a product's images share its adapter, so they are
not independent draws): per-product means are computed first, and the bootstrap resamples
products. Seeded, so a re-run of an evaluation reports the same intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its bootstrap interval [lo, hi] (None when n = 0)."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    *,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The mean of the finite ``values`` and its percentile-bootstrap interval. One value
    gives a zero-width interval at it; NaNs (an unscorable product) are left out."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: give a fraction in (0, 1), e.g. 0.95")
    if samples < 1:
        raise ValueError(f"samples={samples}: give at least 1 bootstrap resample, e.g. 1000")
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Interval(None, None, None, 0)
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = np.empty(samples, np.float64)
    # In chunks: samples x n indices at once would be large for 10^5 products.
    chunk = max(1, 2**22 // x.size)
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        means[start : start + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    # The percentile interval of a skewed statistic can miss the sample mean by rounding;
    # report an interval that contains it.
    return Interval(mean, float(min(lo, mean)), float(max(hi, mean)), int(x.size))


def paired_difference(
    a: Mapping[str, float],
    b: Mapping[str, float],
    *,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The mean of per-product differences ``a[p] - b[p]`` over the products both runs
    scored (finite in both), with its bootstrap interval: the comparison that removes the
    spread between products, which is most of the spread."""
    shared = sorted(p for p in a.keys() & b.keys() if np.isfinite(a[p]) and np.isfinite(b[p]))
    diffs = np.array([a[p] - b[p] for p in shared], np.float64)
    return bootstrap_mean(diffs, samples=samples, confidence=confidence, seed=seed)
