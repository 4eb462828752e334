"""Ranking strategies (ray_app/ranking.py) on hand-built score tables, the threshold, and
their config: no model, no Ray."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ray_app import ranking
from ray_app.config import ConfigError, load_config
from ray_app.kinds import Metric
from ray_app.ranking import PaperSum, Ranking, WeightedMean, rank_and_keep

IDS = ["a", "b", "c", "d"]
# Built so that the two rankings disagree: "b" has the best raw CLIP-T + CLIP-I + DINO,
# "c" and "d" the best segmented metrics and CLIP-T (which `weighted` stretches through its
# narrow range); "d" has no DINO (NaN), so the paper's sum cannot score it.
TABLE = {
    Metric.CLIP_T: [0.30, 0.20, 0.34, 0.33],
    Metric.CLIP_I: [0.80, 0.85, 0.70, 0.90],
    Metric.DINO: [0.60, 0.70, 0.50, np.nan],
    Metric.SEG_CLIP_I: [0.55, 0.95, 0.90, 0.90],
    Metric.SEG_DINO: [0.20, 0.90, 0.90, 0.90],
}
METRICS = {m: np.array(v, np.float32) for m, v in TABLE.items()}


def order(scores: np.ndarray) -> list[str]:
    ranks, _ = rank_and_keep(scores, IDS, top_n=len(IDS), threshold=-np.inf)
    return [i for _, i in sorted((r, i) for r, i in zip(ranks, IDS, strict=True) if r)]


def test_paper_ranking_is_the_plain_sum_of_clip_t_clip_i_and_dino():
    scores = PaperSum().score(METRICS)
    expected = [0.30 + 0.80 + 0.60, 0.20 + 0.85 + 0.70, 0.34 + 0.70 + 0.50]
    np.testing.assert_allclose(scores[:3], expected, rtol=1e-6)
    assert np.isnan(scores[3])  # a summed metric is missing: unscorable, never kept
    assert order(scores) == ["b", "a", "c"]
    # The segmented metrics are not part of the paper's sum.
    changed = {**METRICS, Metric.SEG_CLIP_I: METRICS[Metric.SEG_CLIP_I][::-1].copy()}
    np.testing.assert_array_equal(PaperSum().score(changed), scores)


def test_weighted_ranking_orders_the_same_table_differently():
    cfg = load_config("default")
    weighted = WeightedMean(cfg.generate.weights, cfg.scoring.ranges).score(METRICS)
    assert order(weighted) == ["d", "b", "c", "a"]  # "d" scored without its NaN metric
    assert order(weighted) != order(PaperSum().score(METRICS))
    assert ((weighted >= 0) & (weighted <= 1)).all()


def test_the_threshold_drops_the_ones_below_it_after_top_n():
    scores = PaperSum().score(METRICS)  # a 1.70, b 1.75, c 1.54, d NaN
    ranks, kept = rank_and_keep(scores, IDS, top_n=3, threshold=1.6)
    assert ranks == [2, 1, 3, None]
    assert kept == [True, True, False, False]
    _, kept = rank_and_keep(scores, IDS, top_n=1, threshold=1.6)
    assert kept == [False, True, False, False]


def test_rank_and_keep_orders_by_score_and_applies_top_n_and_threshold():
    scores = np.array([0.2, 0.9, np.nan, 0.5, 0.9], np.float32)
    ranks, kept = rank_and_keep(scores, ["a", "b", "c", "d", "e"], top_n=3, threshold=0.3)
    assert ranks == [4, 1, None, 3, 2]  # ties by id
    assert kept == [False, True, False, True, True]
    _, kept = rank_and_keep(scores, ["a", "b", "c", "d", "e"], top_n=3, threshold=0.6)
    assert kept == [False, True, False, False, True]


def test_paper_sum_names_a_missing_metric():
    with pytest.raises(ValueError, match=r"metrics \['dino'\] are missing"):
        PaperSum().score({m: v for m, v in METRICS.items() if m != Metric.DINO})


def test_config_chooses_the_ranking_and_its_default_threshold():
    default = load_config("default").generate
    assert default.ranking == "paper" and default.threshold is None
    assert default.keep_threshold == PaperSum.default_threshold
    cfg = load_config("default", overrides=["generate.ranking=weighted"])
    assert isinstance(ranking.build(cfg.generate, cfg.scoring), WeightedMean)
    assert cfg.generate.keep_threshold == WeightedMean.default_threshold
    set_ = load_config("default", overrides=["generate.threshold=1.5"]).generate
    assert set_.keep_threshold == 1.5
    # The tiny profile's noise scores: its threshold is the paper sum's lowest value.
    assert load_config("tiny").generate.keep_threshold == PaperSum.bounds[0]


@pytest.mark.parametrize(
    ("profile", "overrides", "needle"),
    [
        ("default", ["generate.ranking=nope"], "generate.ranking='nope'"),
        ("default", ["generate.ranking=nope"], "the rankings are: learned, paper, weighted"),
        (
            "default",
            ["generate.ranking=weighted", "generate.threshold=1.23"],
            "generate.threshold=1.23 is outside the weighted ranking's scores [0, 1]",
        ),
        ("default", ["generate.threshold=3.5"], "leave it unset for the ranking's default 1.23"),
        # the tiny profile's -3 is the paper sum's floor, not the weighted mean's
        ("tiny", ["generate.ranking=weighted"], "generate.threshold=-3 is outside"),
    ],
)
def test_bad_ranking_settings_name_the_key_and_the_fix(profile, overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(profile, overrides=overrides)


class Constant(Ranking):
    """A stand-in for a later strategy (e.g. learned from human ratings)."""

    name = "test-constant"
    bounds = (0.0, 1.0)
    default_threshold = 0.5

    @classmethod
    def from_config(cls, generate, scoring) -> Constant:
        return cls()

    def score(self, metrics):
        return np.full(len(next(iter(metrics.values()))), 0.5, np.float32)


@pytest.fixture
def registered():
    ranking.register(Constant)
    yield Constant
    del ranking._RANKINGS[Constant.name]  # the registry is global: restore it


def test_another_ranking_slots_in_through_the_registry(registered):
    cfg = load_config("default", overrides=[f"generate.ranking={registered.name}"])
    built = ranking.build(cfg.generate, cfg.scoring)
    assert isinstance(built, Constant) and cfg.generate.keep_threshold == 0.5
    with pytest.raises(ValueError, match="'test-constant' is already registered"):
        ranking.register(Constant)
