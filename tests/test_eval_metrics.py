"""The evaluation's metrics on constructed inputs (no Ray): the backbones' scores, FID/KID
through torchmetrics, bootstrap intervals and paired differences, CLIP-T's text."""

from __future__ import annotations

import numpy as np
import pytest

from actors.inception import InceptionFeatures
from actors.scorer import Scorer, ScoringOptions
from pipelines.evaluate import clip_t_text
from ray_app.fid import SideFeatures, distribution, in_kid_sample
from ray_app.images import encode_png
from ray_app.kinds import Metric
from ray_app.runs import parse_runs
from ray_app.stats import bootstrap_mean, paired_difference


def _images(n: int, seed: int, shift: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rgb = rng.integers(0, 200, (48, 48, 3)).astype(np.int16) + shift
        out.append(encode_png(np.clip(rgb, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def scorer(tiny_config):
    cfg = tiny_config
    return Scorer(
        cfg.model_spec("eval_clip"),
        cfg.model_spec("eval_dino"),
        ScoringOptions(cfg.generate.weights, cfg.scoring.ranges),
    )


def test_identical_images_score_one_on_every_image_metric(scorer):
    image = _images(1, 0)[0]
    mask = np.zeros((48, 48), np.uint8)
    mask[8:40, 16:28] = 255
    png_mask = encode_png(mask)
    out = scorer.score([image], ["a mug"], [image], [png_mask], masks=[png_mask])
    for metric in (Metric.CLIP_I, Metric.DINO, Metric.SEG_CLIP_I, Metric.SEG_DINO):
        assert out[metric][0] == pytest.approx(1.0, abs=1e-5), metric
    # CLIP-T and its segmented variant are cosines of an image and a text: in [-1, 1].
    assert -1 <= out[Metric.CLIP_T][0] <= 1 and -1 <= out[Metric.SEG_CLIP_T][0] <= 1
    other = scorer.score(_images(1, 1), ["a mug"], [image], [png_mask], masks=[png_mask])
    assert other[Metric.CLIP_I][0] < 1 - 1e-4 and other[Metric.DINO][0] < 1 - 1e-4
    # Without a mask the segmented metrics are missing, never a guess.
    bare = scorer.score([image], ["a mug"], [image], [png_mask], masks=[None])
    assert np.isnan(bare[Metric.SEG_CLIP_T][0]) and np.isnan(bare[Metric.SEG_DINO][0])


def _features(model: InceptionFeatures, images: list[bytes]) -> np.ndarray:
    out = model({"image": np.array(images, dtype=object)})
    assert all(e is None for e in out["error"])
    return np.stack(out["features"])


def _side(features: np.ndarray, real: bool, name: str) -> SideFeatures:
    side = SideFeatures(features.shape[1], real)
    half = len(features) // 2  # in two blocks, merged: as the job accumulates them
    side.add(features[:half], [f"{name}{i}" for i in range(half)], 1.0)
    rest = SideFeatures(features.shape[1], real)
    rest.add(features[half:], [f"{name}{i}" for i in range(half, len(features))], 1.0)
    side.merge(rest)
    return side


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(tiny_config):
    model = InceptionFeatures(tiny_config.model_spec("inception"))
    base = _features(model, _images(24, 0))
    options = {"min_images": 8, "kid_subset_size": 16, "kid_subsets": 20}
    same = distribution(_side(base, False, "g"), _side(base, True, "r"), **options)
    assert same.refused is None and same.n_generated == same.n_reference == 24
    assert abs(same.fid) < 1e-3
    fids = [same.fid]
    for shift in (20, 60):
        moved = _features(model, _images(24, 0, shift))
        fids.append(distribution(_side(moved, False, "g"), _side(base, True, "r"), **options).fid)
    assert fids[0] < fids[1] < fids[2], fids
    small = distribution(_side(base[:5], False, "g"), _side(base, True, "r"), **options)
    assert small.fid is None and "too few images" in small.refused
    assert "5 generated" in small.refused and "evaluate.min_fid_images=8" in small.refused


def test_kid_keeps_a_bounded_sample_chosen_by_image_id():
    ids = [f"run/p{i}" for i in range(2000)]
    picked = [i for i in ids if in_kid_sample(i, 0.25)]
    assert 400 < len(picked) < 600  # about a quarter
    assert picked == [i for i in ids if in_kid_sample(i, 0.25)]  # the same every time
    side = SideFeatures(4, real=False)
    side.add(np.ones((2000, 4), np.float32), ids, 0.25)
    assert side.n == 2000 and side.kid_count == len(picked)


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_products():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.normal(0.7, 0.1, 10), samples=500)
    large = bootstrap_mean(rng.normal(0.7, 0.1, 1000), samples=500)
    for it in (small, large):
        assert it.lo <= it.mean <= it.hi
    assert large.hi - large.lo < small.hi - small.lo
    assert bootstrap_mean([np.nan, 0.5], samples=10).to_dict() == {
        "mean": 0.5,
        "lo": 0.5,
        "hi": 0.5,
        "n": 1,
    }
    assert bootstrap_mean([], samples=10).mean is None
    with pytest.raises(ValueError, match=r"confidence=1\.5"):
        bootstrap_mean([1.0], confidence=1.5)


def test_paired_difference_of_a_run_with_itself_is_zero_and_sees_a_shift():
    rng = np.random.default_rng(1)
    a = {f"p{i}": float(v) for i, v in enumerate(rng.normal(0.6, 0.2, 50))}
    same = paired_difference(a, a, samples=300)
    assert (same.mean, same.lo, same.hi, same.n) == (0.0, 0.0, 0.0, 50)
    # A small shift hidden by the spread between products shows in the pairs.
    b = {p: v - 0.02 + float(rng.normal(0, 0.005)) for p, v in a.items()}
    diff = paired_difference(a, b, samples=300)
    assert 0 < diff.lo <= diff.mean <= diff.hi and diff.mean == pytest.approx(0.02, abs=0.005)
    # Only products scored in both runs are paired.
    assert paired_difference(a, {"p0": 0.1, "zz": 0.3}).n == 1


def test_clip_t_scores_the_prompt_with_the_class_noun_not_the_rare_token():
    prompt = "a sks backpack in the jungle, sks-free"
    assert clip_t_text(prompt, "sks", "class") == "a backpack in the jungle, sks-free"
    assert clip_t_text(prompt, "sks", "prompt") == prompt
    assert clip_t_text("sks mug on a desk", "sks", "class") == "mug on a desk"
    assert clip_t_text("a mug", None, "class") == "a mug"


def test_runs_are_named_and_a_bad_name_is_refused(tmp_path):
    gen = tmp_path / "gen"
    (gen / "manifest").mkdir(parents=True)
    whole = tmp_path / "whole"
    (whole / "generations" / "manifest").mkdir(parents=True)
    runs = parse_runs([f"a={gen}", f"b={whole}", f"a={whole}"])
    assert list(runs) == ["a", "b"]
    assert runs["a"] == [str(gen), str(whole / "generations")]
    with pytest.raises(ValueError, match="expected NAME=URI"):
        parse_runs([str(gen)])
    with pytest.raises(ValueError, match="the name 'a b'"):
        parse_runs([f"a b={gen}"])
    with pytest.raises(FileNotFoundError, match="neither a `restage generate` output"):
        parse_runs([f"a={tmp_path}"])


def test_the_writer_puts_means_per_run_and_product_qualified_feature_ids(tmp_path):
    """A product's shards, as the job's write task makes them (no Ray): per-run means over
    the images that scored, and features whose ids name the product (KID samples by id, and
    every product has a "ref-00")."""
    import pyarrow.parquet as pq

    from pipelines._product_rows import pack
    from pipelines.evaluate import Picture, ProductState, write_products
    from ray_app.records import REFERENCE_SIDE, ProductRecord
    from ray_app.storage import EvaluationLayout

    state = ProductState(record=ProductRecord("mug-1", ("/photos/a.jpg",), category="mug"))
    state.references = [Picture(REFERENCE_SIDE, "ref-00", "/photos/a.jpg", b"x")]
    state.images = [
        Picture("a", "p00-i00", "/g/1.png", b"x", scores={m: 0.5 for m in Metric}),
        Picture("a", "p00-i01", "/g/2.png", b"x", scores={m: 0.7 for m in Metric}),
        Picture("a", "p00-i02", "/g/3.png", b"x", error="eval_clip: cannot decode image"),
    ]
    for pic in state.references + state.images:
        pic.features = np.ones(4, np.float32)
    out = write_products(pack([state]), ["a", "b"], str(tmp_path))
    assert list(out["status"]) == ["ok"]
    layout = EvaluationLayout(str(tmp_path))
    rows = {r["run"]: r for r in pq.read_table(layout.per_product("mug-1")).to_pylist()}
    assert rows["a"]["n_images"] == 3 and rows["a"]["n_errors"] == 1
    assert rows["a"]["dino"] == pytest.approx(0.6)  # the errored image is left out
    assert rows["b"]["n_images"] == 0 and rows["b"]["dino"] is None
    ids = pq.read_table(layout.features("mug-1"))["image_id"].to_pylist()
    assert ids == ["mug-1/ref-00", "mug-1/p00-i00", "mug-1/p00-i01", "mug-1/p00-i02"]
