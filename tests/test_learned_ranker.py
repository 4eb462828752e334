"""The learned ranker (ray_app/learned_ranker.py) on synthetic ratings: cross-validation by
product against the paper's sum, the model file and its checks, the config keys, the CLI,
and serve's ranker built with it. No Ray, no model checkpoints."""

from __future__ import annotations

import importlib
import json
import re

import numpy as np
import pyarrow as pa
import pytest

from ray_app import ranking, storage
from ray_app.cli import EXIT_USAGE, main
from ray_app.config import ConfigError, load_config
from ray_app.kinds import Metric
from ray_app.learned_ranker import (
    FORMAT_VERSION,
    FitOptions,
    LearnedModel,
    LearnedRanking,
    RankerError,
    fit,
    product_splits,
    ratings_digest,
    read_ratings,
)
from ray_app.records import RATED_IMAGE_SCHEMA

N_PRODUCTS = 60
CONFIG = load_config("default")  # generate.ranking: the paper's sum, the baseline


def synthetic_ratings(seed: int, *, informative: bool) -> pa.Table:
    """~480 rated images of 60 products whose metrics share a per-image fidelity (and a
    per-product part, as images of one adapter do). Informative: raters pass an image iff its
    segmented DINO (which has a part of its own, unseen by the paper's sum) clears a bar, up
    to a little noise. Otherwise the pass is a coin flip, independent of every metric."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(N_PRODUCTS):
        quality = rng.normal()
        n = int(rng.integers(5, 12))
        fidelity = 0.5 * quality + rng.normal(size=n)
        crop = rng.normal(size=n)  # the product crop's own fidelity (segmented metrics)
        m = {
            Metric.CLIP_T: 0.28 + 0.03 * rng.normal(size=n),
            Metric.CLIP_I: 0.75 + 0.04 * fidelity + 0.03 * rng.normal(size=n),
            Metric.DINO: 0.55 + 0.08 * fidelity + 0.05 * rng.normal(size=n),
            Metric.SEG_CLIP_I: 0.80 + 0.03 * fidelity + 0.02 * crop + 0.03 * rng.normal(size=n),
            Metric.SEG_DINO: 0.60 + 0.06 * fidelity + 0.08 * crop + 0.02 * rng.normal(size=n),
            Metric.SEG_CLIP_T: 0.25 + 0.03 * rng.normal(size=n),
        }
        if informative:
            passed = m[Metric.SEG_DINO] + 0.02 * rng.normal(size=n) > 0.66
        else:
            passed = rng.random(n) < 0.35
        no_mask = rng.random(n) < 0.05  # no product mask: the segmented metrics are NaN
        for metric in (Metric.SEG_CLIP_I, Metric.SEG_DINO, Metric.SEG_CLIP_T):
            m[metric] = np.where(no_mask, np.nan, m[metric])
        for i in range(n):
            rows.append(
                {
                    "run": "gen-1",
                    "product_id": f"p{p:02d}",
                    "image_id": f"img-{i:02d}",
                    "image_uri": f"mem://gen-1/p{p:02d}/img-{i:02d}.png",
                    "prompt": "a {product} on a table",
                    "n_raters": 3,
                    "rater_passes": 3 if passed[i] else 1,
                    "human_pass": bool(passed[i]),
                    **{k.value: float(v[i]) for k, v in m.items()},
                    "score": float(m[Metric.CLIP_T][i] + m[Metric.CLIP_I][i] + m[Metric.DINO][i]),
                    "ranking": "paper",
                }
            )
    # Images still being rated are in the table too; the ranker leaves them out.
    rows.append({**rows[0], "image_id": "unrated", "human_pass": None, "rater_passes": 0})
    return pa.Table.from_pylist(rows, schema=RATED_IMAGE_SCHEMA)


def write(table: pa.Table, uri: str) -> str:
    storage.write_parquet(uri, table)
    return uri


@pytest.fixture(scope="module")
def informative(tmp_path_factory):
    uri = write(synthetic_ratings(1, informative=True), str(tmp_path_factory.mktemp("r") / "a.pq"))
    ratings = read_ratings(uri)
    return ratings, fit(ratings, CONFIG, FitOptions(folds=5, seed=0))


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    uri = write(synthetic_ratings(7, informative=False), str(tmp_path_factory.mktemp("r") / "b"))
    ratings = read_ratings(uri)
    return ratings, fit(ratings, CONFIG, FitOptions(folds=5, seed=0))


def test_learned_ranker_beats_the_paper_sum_when_raters_follow_a_metric(informative):
    ratings, result = informative
    cv = result.cv
    assert len(ratings) == result.model.n_images and ratings.n_unrated == 1
    assert cv.baseline == "paper" and cv.n_products == N_PRODUCTS
    for name in ("auc", "pearson", "spearman"):
        s = cv.statistics[name]
        assert s.learned > s.fixed, (name, s)
        assert s.lo <= s.gain <= s.hi
    head = cv.statistics[cv.headline]
    assert head.lo > 0 and cv.gain is True
    assert cv.statistics["auc"].learned > 0.9  # the rule is nearly deterministic
    # The model leans on the metric the raters follow.
    coef = dict(zip(result.model.features, result.model.coef, strict=True))
    assert max(coef, key=lambda f: abs(coef[f])) == Metric.SEG_DINO


def test_no_gain_is_claimed_when_ratings_ignore_the_metrics(independent):
    _, result = independent
    cv = result.cv
    head = cv.statistics[cv.headline]
    # This seed's learned model looks a little better by chance: a point gain is no gain.
    assert head.gain > 0 and head.lo <= 0 <= head.hi
    assert cv.gain is False
    assert abs(cv.statistics["auc"].learned - 0.5) < 0.1  # nothing to learn


def test_folds_never_share_a_product(informative):
    ratings, result = informative
    products = ratings.products
    tested = []
    for train, test in result.splits:
        assert not set(products[train]) & set(products[test])
        tested += list(test)
    assert sorted(tested) == list(range(len(ratings)))  # every image held out once
    assert np.isfinite(result.oof).all()
    # The same helper refuses what cannot be cross-validated by product.
    with pytest.raises(RankerError, match="the ratings have 60 products"):
        product_splits(products, ratings.labels, 61, 0)
    with pytest.raises(RankerError, match="every rated image has human_pass=True"):
        product_splits(products, np.ones(len(ratings), bool), 5, 0)


def test_the_digest_ignores_row_order_and_sees_a_label(tmp_path):
    table = synthetic_ratings(3, informative=True)
    digest = ratings_digest(read_ratings(write(table, str(tmp_path / "a.parquet"))))
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    assert ratings_digest(read_ratings(write(shuffled, str(tmp_path / "b.parquet")))) == digest
    labels = table.column("human_pass").to_pylist()
    labels[5] = not labels[5]
    flipped = table.set_column(
        table.schema.get_field_index("human_pass"), "human_pass", pa.array(labels, pa.bool_())
    )
    assert ratings_digest(read_ratings(write(flipped, str(tmp_path / "c.parquet")))) != digest
    twice = pa.concat_tables([table, table.slice(3, 1)])
    with pytest.raises(RankerError, match=re.escape("1 image(s) with more than one row")):
        read_ratings(write(twice, str(tmp_path / "d.parquet")))


def test_save_load_score_round_trip_equals_the_fitted_pipeline(informative, tmp_path):
    ratings, result = informative
    uri = result.model.save(str(tmp_path / "ranker.json"))
    loaded = LearnedModel.load(uri)
    assert loaded == result.model
    json.loads(storage.read_bytes(uri), parse_constant=pytest.fail)  # strict JSON: no NaN
    x = np.stack([ratings.metrics[f] for f in result.model.features], axis=1)  # NaNs included
    expected = result.estimator.predict_proba(x)[:, 1]
    scores = LearnedRanking(loaded).score(ratings.metrics)
    assert scores.dtype == np.float32 and np.isnan(x).any()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    # The config selects it, so that generate and serve rank with it.
    cfg = load_config("default", overrides=[f"generate.ranker={uri}"])
    built = ranking.build(cfg.generate, cfg.scoring)
    assert isinstance(built, LearnedRanking) and built.model == result.model
    assert cfg.generate.keep_threshold == LearnedRanking.default_threshold
    with pytest.raises(RankerError, match=r"metrics \['seg_dino'\] are missing"):
        built.score({m: v for m, v in ratings.metrics.items() if m != Metric.SEG_DINO})


def _tampered(model: LearnedModel, tmp_path, **changes) -> str:
    d = {**model.to_dict(), **changes}
    uri = str(tmp_path / "bad.json")
    storage.write_bytes(uri, json.dumps(d).encode())
    return uri


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"features": ["clip_t", "sharpness"]}, "features: unknown feature 'sharpness'"),
        ({"format_version": FORMAT_VERSION + 1}, f"reads version {FORMAT_VERSION}: refit"),
        ({"coef": [1.0]}, "coef: [1.0]: expected"),
        ({"scaler_scale": None}, "scaler_scale: None: expected"),
        ({"intercept": "nan"}, "intercept: 'nan': expected a finite number"),
        ({"format": "pickle"}, "not a ranker file"),
        ({"extra": 1}, "['extra']: unknown fields"),
    ],
)
def test_a_tampered_model_file_fails_naming_the_file_and_field(
    informative, tmp_path, changes, needle
):
    uri = _tampered(informative[1].model, tmp_path, **changes)
    with pytest.raises(RankerError, match=re.escape(f"ranker file {uri}: ")) as err:
        LearnedModel.load(uri)
    assert needle in str(err.value)


def test_a_pinned_digest_refuses_a_model_from_other_ratings(informative, tmp_path):
    model = informative[1].model
    uri = model.save(str(tmp_path / "ranker.json"))
    other = "f" * 64
    cfg = load_config(
        "default", overrides=[f"generate.ranker={uri}", f"generate.ranker_sha256={other}"]
    )
    with pytest.raises(RankerError, match="training data digest mismatch"):
        ranking.build(cfg.generate, cfg.scoring)
    pinned = load_config(
        "default",
        overrides=[f"generate.ranker={uri}", f"generate.ranker_sha256={model.ratings_sha256}"],
    )
    assert ranking.build(pinned.generate, pinned.scoring).model == model


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["generate.ranking=learned"], "generate.ranking='learned' needs generate.ranker"),
        (
            ["generate.ranking=weighted", "generate.ranker=m.json"],
            "(generate.ranker implies 'learned')",
        ),
        (["generate.ranker_sha256=" + "a" * 64], "generate.ranker is unset"),
        (["generate.ranker=m.json", "generate.ranker_sha256=abc"], "64 lowercase hex digits"),
        (["generate.ranker=m.json", "generate.threshold=1.23"], "outside the learned ranking"),
    ],
)
def test_bad_ranker_settings_name_the_keys_and_the_fix(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config("default", overrides=overrides)


def test_ranker_implies_the_learned_ranking_and_the_registry_lists_it():
    g = load_config("default", overrides=["generate.ranker=m.json"]).generate
    assert g.ranking == "learned" == LearnedRanking.name
    assert "learned" in ranking.names()
    assert load_config("default").generate.ranking == "paper"  # unset: unchanged


def test_fit_refuses_bad_features_and_a_learned_baseline(informative):
    ratings, _ = informative
    with pytest.raises(RankerError, match="unknown \\['mask_iou'\\]; the features are: clip_t"):
        fit(ratings, CONFIG, FitOptions(features=("clip_i", "mask_iou")))
    learned = load_config("default", overrides=["generate.ranker=m.json"])
    with pytest.raises(RankerError, match=re.escape("--set generate.ranking=paper")):
        fit(ratings, learned)
    only = fit(ratings, CONFIG, FitOptions(features=("seg_dino",), bootstrap=50))
    assert only.model.features == (Metric.SEG_DINO,)
    # Seeded: the same fit gives the same folds, model and intervals.
    again = fit(ratings, CONFIG, FitOptions(features=("seg_dino",), bootstrap=50))
    assert again.model.to_dict() == only.model.to_dict()


@pytest.mark.parametrize("where", ["serve.ranker:RankerReplica", "pipelines.generate:ScoreStage"])
def test_serve_and_generate_rank_with_the_learned_model(where, informative, tmp_path, monkeypatch):
    module_name, _, name = where.partition(":")
    module = importlib.import_module(module_name)

    class NoScorer:  # CLIP/DINO scoring is not what is tested here: the ranking it is given
        def __init__(self, clip, dino, options, **kwargs):
            self.options = options

    import actors.scorer

    monkeypatch.setattr(actors.scorer, "Scorer", NoScorer)  # generate's stage imports it when built
    if hasattr(module, "Scorer"):  # serve's replica has it from its module's imports
        monkeypatch.setattr(module, "Scorer", NoScorer)
    uri = informative[1].model.save(str(tmp_path / "ranker.json"))
    built = getattr(module, name)(load_config("default", overrides=[f"generate.ranker={uri}"]))
    used = built.scorer.options.ranking  # the ranking that makes the scores it ranks by
    assert isinstance(used, LearnedRanking) and used.uri == uri
    assert used.model == informative[1].model
    if name == "RankerReplica":
        assert built.ranking is used  # and the name serve reports


def test_cli_fits_reports_and_writes_a_loadable_model(tmp_path, capsys):
    folder = tmp_path / "review"
    write(synthetic_ratings(4, informative=True), str(folder / "images.parquet"))
    out = str(tmp_path / "model" / "ranker.json")
    assert main(["ranker", "fit", "--ratings", str(folder), "--out", out, "--folds", "4"]) == 0
    printed = capsys.readouterr().out
    model = LearnedModel.load(out)
    assert f"ratings_sha256: {model.ratings_sha256}" in printed
    assert "4-fold cross-validation by product" in printed and "gain: true" in printed
    assert re.search(r"auc +learned \+0\.9\d+ +fixed", printed)
    assert model.fit_config["folds"] == 4 and model.report["gain"] is True
    code = main(["ranker", "fit", "--ratings", str(folder), "--out", out, "--features", "dinoo"])
    assert code == EXIT_USAGE
    assert "the features are: clip_t, clip_i" in capsys.readouterr().err
    code = main(["ranker", "fit", "--ratings", str(tmp_path / "none"), "--out", out])
    assert code == EXIT_USAGE and "no such file" in capsys.readouterr().err


def test_the_statistics_are_sklearns_and_scipys(informative):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import roc_auc_score

    from ray_app.learned_ranker import _statistics

    ratings, result = informative
    y = ratings.labels.astype(int)
    for s in (result.oof, result.fixed, np.round(result.fixed, 1)):  # the last with ties
        got = _statistics(y, s)
        assert got["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert got["pearson"] == pytest.approx(pearsonr(y, s).statistic, abs=1e-12)
        assert got["spearman"] == pytest.approx(spearmanr(y, s).statistic, abs=1e-12)
    assert np.isnan(_statistics(y, np.ones(len(y)))["pearson"])  # a constant score
