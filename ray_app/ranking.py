"""How generations are ranked: one score per image from its metrics, then the top N at or
above a threshold (paper 2.5). `restage generate` and serve's ranker both score with
``generate.ranking``'s ``Ranking``, so that they order images alike (augment orders its
samples with ``WeightedMean`` and its own weights).

A ranking is a small strategy chosen by ``generate.ranking``:

- ``paper`` (default): the plain sum of raw CLIP-T + CLIP-I + DINO, the paper's "aggregate
  sum of these metrics" (2.5). It sums the *global* (whole-image) variants: 2.5 names
  CLIP-T, CLIP-I and DINO, while the segmented ones appear only in the evaluation (3.2.2,
  Table 2) as separate columns. Each is a cosine similarity, so the sum lies in [-3, 3].
- ``weighted``: each metric mapped through ``scoring.ranges`` onto [0, 1] and
  averaged with ``generate.weights`` (scores in [0, 1]); the ranking before the paper's.
- ``learned``: a model fitted on human ratings by `restage ranker fit`
  (ray_app/learned_ranker.py), selected by ``generate.ranker=URI``; scores are pass
  probabilities in [0, 1].

Another strategy subclasses ``Ranking`` and calls ``register``; ``generate.ranking`` then
accepts its name.

NaN: a metric is NaN where it could not be computed (the text or image failed to embed, no
mask for a segmented metric). ``paper``: an item with any summed metric NaN scores NaN.
``weighted``: a NaN metric is left out and the weights renormalised; NaN only when all are.
A NaN score is unranked and never kept (``rank_and_keep``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ray_app.kinds import Metric
from ray_app.metrics import aggregate

if TYPE_CHECKING:
    from ray_app.config import GenerateConfig, ScoringConfig


class Ranking(ABC):
    """One score per item from its metrics (higher is better). Subclasses set ``name``,
    ``bounds`` (every finite score lies within: a ``generate.threshold`` outside them would
    keep everything or nothing) and ``default_threshold`` (used when the config leaves
    ``generate.threshold`` unset)."""

    name: ClassVar[str]
    bounds: ClassVar[tuple[float, float]]
    default_threshold: ClassVar[float]

    @classmethod
    @abstractmethod
    def from_config(cls, generate: GenerateConfig, scoring: ScoringConfig) -> Ranking:
        """The ranking that ``generate`` and ``scoring`` configure."""

    @abstractmethod
    def score(self, metrics: Mapping[str, np.ndarray]) -> np.ndarray:
        """``metrics``: one array per metric name, one value per item -> float32 scores
        (NaN: unscorable, see the module's doc)."""


_RANKINGS: dict[str, type[Ranking]] = {}


def register(cls: type[Ranking]) -> type[Ranking]:
    """Make ``cls`` selectable as ``generate.ranking=<cls.name>`` (a class decorator)."""
    if cls.name in _RANKINGS:
        raise ValueError(f"ranking {cls.name!r} is already registered ({_RANKINGS[cls.name]})")
    low, high = cls.bounds
    if not (low <= cls.default_threshold <= high):
        raise ValueError(
            f"ranking {cls.name!r}: default_threshold={cls.default_threshold} is outside "
            f"its bounds {cls.bounds}"
        )
    _RANKINGS[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_RANKINGS)


def ranking_class(name: str) -> type[Ranking]:
    try:
        return _RANKINGS[name]
    except KeyError:
        raise ValueError(
            f"unknown ranking {name!r}; the rankings are: {', '.join(names())}"
        ) from None


def build(generate: GenerateConfig, scoring: ScoringConfig) -> Ranking:
    """The ranking ``generate.ranking`` names, configured."""
    return ranking_class(generate.ranking).from_config(generate, scoring)


@register
class PaperSum(Ranking):
    """The paper's ranking (2.5): raw CLIP-T + CLIP-I + DINO, whole images (not crops)."""

    name = "paper"
    summed: ClassVar[tuple[Metric, ...]] = (Metric.CLIP_T, Metric.CLIP_I, Metric.DINO)
    bounds = (-3.0, 3.0)  # three cosine similarities
    # An image that just passes augment's own bars for a synthetic positive with the real
    # checkpoints (augment.filter min_clip_t 0.18 + min_clip_i 0.70 + min_dino 0.35). For
    # scale: DreamBooth reports CLIP-T 0.31 + CLIP-I 0.80 + DINO 0.67 = 1.78 for its own
    # generations. Calibrate on your data: see generate.threshold's description.
    default_threshold = 1.23

    @classmethod
    def from_config(cls, generate: GenerateConfig, scoring: ScoringConfig) -> PaperSum:
        return cls()

    def score(self, metrics: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [m.value for m in self.summed if m not in metrics]
        if missing:
            raise ValueError(
                f"paper ranking: metrics {missing} are missing (it sums "
                f"{[m.value for m in self.summed]}); got {sorted(map(str, metrics))}"
            )
        stacked = np.stack([np.asarray(metrics[m], np.float64) for m in self.summed])
        return stacked.sum(axis=0).astype(np.float32)  # NaN in, NaN out


@register
class WeightedMean(Ranking):
    """Each metric normalised through fixed ranges onto [0, 1], then a weighted mean
    (ray_app.metrics.aggregate); augment orders its samples with this too."""

    name = "weighted"
    bounds = (0.0, 1.0)
    default_threshold = 0.0  # keeps the top N whatever their score, as before the paper's

    def __init__(self, weights: Mapping[str, float], ranges: Mapping[str, tuple[float, float]]):
        self.weights, self.ranges = dict(weights), dict(ranges)

    @classmethod
    def from_config(cls, generate: GenerateConfig, scoring: ScoringConfig) -> WeightedMean:
        return cls(generate.weights, scoring.ranges)

    def score(self, metrics: Mapping[str, np.ndarray]) -> np.ndarray:
        return aggregate(metrics, self.weights, self.ranges)


def rank_and_keep(
    scores: np.ndarray, ids: list[str], top_n: int, threshold: float
) -> tuple[list[int | None], list[bool]]:
    """Rank 1 = best score (ties by id; NaN scores are unranked); keep the top ``top_n``
    whose score is at least ``threshold``."""
    order = sorted(
        (i for i in range(len(ids)) if not math.isnan(float(scores[i]))),
        key=lambda i: (-float(scores[i]), ids[i]),
    )
    ranks: list[int | None] = [None] * len(ids)
    kept = [False] * len(ids)
    for r, i in enumerate(order, start=1):
        ranks[i] = r
        kept[i] = r <= top_n and float(scores[i]) >= threshold
    return ranks, kept
