"""``personal_fidelity`` (actors/personal_fidelity.py): an image's product crop against the
real photos' under the product's own encoder (`restage personalize`), in the scorer that
augment, generate and serve share; null for a product without an encoder; it changes
generate's ranking when weighted."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trainset import PRODUCTS, write_training_set

from actors.encoder_trainer import EncoderTrainer
from actors.personal_fidelity import PersonalEncoders, personal_encoders
from actors.scorer import Scorer, ScoringOptions
from ray_app import storage
from ray_app.config import load_config
from ray_app.images import crop_by_mask, decode_mask, decode_rgb
from ray_app.kinds import Metric, SampleKind
from ray_app.learned_ranker import ratings_digest, read_ratings
from ray_app.metrics import cosine_matrix
from ray_app.ranking import WeightedMean, rank_and_keep
from ray_app.records import SAMPLE_SCHEMA
from ray_app.storage import AugmentLayout, EncoderLayout, GenerationLayout

LAMP, MUG = sorted(PRODUCTS)


def _samples(data: str, pid: str) -> list[dict]:
    rows = storage.read_parquet(AugmentLayout(data).manifest_shard(pid), SAMPLE_SCHEMA)
    return sorted(rows.to_pylist(), key=lambda r: r["sample_id"])


def _train_encoders(config, data: str, root: str, products: list[str]) -> EncoderTrainer:
    """Encoders of ``products`` as `restage personalize` writes them (the job's trainer,
    without Ray): each product's samples against the other products' and its negatives."""
    trainer = EncoderTrainer(config.model_spec("encoder"), config.personalize)
    for k, pid in enumerate(products):
        rows = _samples(data, pid)
        pos = [
            decode_rgb(storage.read_bytes(r["image_uri"])) for r in rows if r["kind"] != "negative"
        ]
        neg = [
            decode_rgb(storage.read_bytes(r["image_uri"])) for r in rows if r["kind"] == "negative"
        ]
        for other in PRODUCTS.keys() - {pid}:
            neg += [decode_rgb(storage.read_bytes(r["image_uri"])) for r in _samples(data, other)]
        trainer.reset(k)
        result = trainer.train(pos, neg, seed=k)
        trainer.save(EncoderLayout(root).encoder_dir(pid), trainer.meta(pid, result))
    return trainer


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A training set of the two products and an encoder for the lamp only."""
    root = tmp_path_factory.mktemp("personal")
    data = write_training_set(str(root / "aug"))
    config = load_config("tiny", overrides=["personalize.pairs=64"])
    out = str(root / "encoders")
    _train_encoders(config, data, out, [LAMP])
    return config, data, out


def _scorer(config, out: str) -> Scorer:
    scoring = config.scoring.model_copy(update={"encoders": out})
    personal = personal_encoders(scoring, config.personalize, config.model_spec)
    options = ScoringOptions(config.generate.weights, config.scoring.ranges)
    return Scorer(config.model_spec("clip"), config.model_spec("dino"), options, personal=personal)


def _images(data: str, pid: str, kind: str) -> tuple[list[bytes], list[bytes]]:
    rows = [r for r in _samples(data, pid) if r["kind"] == kind]
    return (
        [storage.read_bytes(r["image_uri"]) for r in rows],
        [storage.read_bytes(r["mask_uri"]) for r in rows],
    )


def test_the_metric_is_the_crops_similarity_under_the_products_encoder(encoders):
    config, data, out = encoders
    scorer = _scorer(config, out)
    refs, ref_masks = _images(data, LAMP, SampleKind.REAL)
    images, _ = _images(data, LAMP, SampleKind.CONTEXT)
    # No masks for the images: they are taken whole (the synthetic products are flat colour,
    # so their crops would all look alike).
    got = scorer.score(images, ["x"] * len(images), refs, ref_masks, product_id=LAMP)
    values = got[Metric.PERSONAL_FIDELITY]
    assert np.isfinite(values).all()

    # By hand: the lamp's LoRA, each whole image's mean cosine to the crops of the real
    # photos by their masks.
    trainer = EncoderTrainer(config.model_spec("encoder"), config.personalize)
    trainer.load(EncoderLayout(out).encoder_dir(LAMP))

    def crops(blobs, mask_blobs):
        return [
            crop_by_mask(decode_rgb(b), decode_mask(m))
            for b, m in zip(blobs, mask_blobs, strict=True)
        ]

    whole = [decode_rgb(b) for b in images]
    expected = cosine_matrix(trainer.embed(whole), trainer.embed(crops(refs, ref_masks))).mean(
        axis=1
    )
    np.testing.assert_allclose(values, expected, atol=1e-5)
    # ... and not the pretrained encoder's: the LoRA is in use.
    pretrained = cosine_matrix(
        trainer.embed(whole, personal=False),
        trainer.embed(crops(refs, ref_masks), personal=False),
    ).mean(axis=1)
    assert np.abs(values - pretrained).max() > 1e-3


def test_a_product_without_an_encoder_gets_nan_and_the_others_are_unchanged(encoders):
    config, data, out = encoders
    scorer = _scorer(config, out)
    refs, ref_masks = _images(data, MUG, SampleKind.REAL)
    images, masks = _images(data, MUG, SampleKind.CONTEXT)
    with_personal = scorer.score(images, ["x"] * 3, refs, ref_masks, masks, product_id=MUG)
    assert np.isnan(with_personal[Metric.PERSONAL_FIDELITY]).all()
    scorer.personal = None
    without = scorer.score(images, ["x"] * 3, refs, ref_masks, masks, product_id=MUG)
    for m in Metric:
        np.testing.assert_array_equal(with_personal[m], without[m])
    np.testing.assert_array_equal(with_personal["score"], without["score"])


def test_switching_products_puts_each_products_own_lora_back(encoders, tmp_path):
    config, data, _ = encoders
    out = str(tmp_path / "two")
    _train_encoders(config, data, out, [LAMP, MUG])
    personal = PersonalEncoders(config.model_spec("encoder"), config.personalize, out, cache=1)
    images = [decode_rgb(b) for b in _images(data, LAMP, SampleKind.CONTEXT)[0]]
    none = [None] * len(images)
    lamp = personal.embed(LAMP, images, none)
    mug = personal.embed(MUG, images, none)
    assert np.abs(lamp - mug).max() > 1e-3  # two encoders, two features
    np.testing.assert_allclose(personal.embed(LAMP, images, none), lamp, atol=1e-6)
    assert personal.reads == 3  # cache=1: the lamp was read again
    cached = PersonalEncoders(config.model_spec("encoder"), config.personalize, out)
    for pid in (LAMP, MUG, LAMP, MUG):
        cached.embed(pid, images, none)
    assert cached.reads == 2
    np.testing.assert_allclose(cached.embed(LAMP, images, none), lamp, atol=1e-6)
    assert cached.embed("no-such-product", images, none) is None


def test_a_long_lived_scorer_sees_encoders_trained_replaced_or_removed_after_it_asked(
    encoders, tmp_path
):
    """A serve replica asks before `restage personalize` has reached a product: once the
    recheck time has passed it finds the encoder, and an encoder trained again in place or
    removed is not served from the cache."""
    import shutil

    config, data, _ = encoders
    out = str(tmp_path / "later")
    _train_encoders(config, data, out, [LAMP])
    personal = PersonalEncoders(
        config.model_spec("encoder"), config.personalize, out, recheck_s=3600
    )
    images = [decode_rgb(b) for b in _images(data, MUG, SampleKind.CONTEXT)[0]]
    none = [None] * len(images)
    lamp = personal.embed(LAMP, images, none)
    assert personal.embed(MUG, images, none) is None
    _train_encoders(config, data, out, [MUG])
    assert personal.embed(MUG, images, none) is None  # remembered until the recheck
    personal.recheck_s = 0.0
    mug = personal.embed(MUG, images, none)
    assert mug is not None and np.abs(mug - lamp).max() > 1e-3
    reads = personal.reads
    np.testing.assert_allclose(personal.embed(MUG, images, none), mug, atol=1e-6)
    assert personal.reads == reads  # rechecked, unchanged: not read again
    # the lamp's encoder replaced by another (the mug's files) in place, then removed
    layout = EncoderLayout(out)
    shutil.rmtree(layout.encoder_dir(LAMP))
    shutil.copytree(layout.encoder_dir(MUG), layout.encoder_dir(LAMP))
    np.testing.assert_allclose(personal.embed(LAMP, images, none), mug, atol=1e-6)
    assert personal.reads == reads + 1
    shutil.rmtree(layout.encoder_dir(LAMP))
    assert personal.embed(LAMP, images, none) is None
    np.testing.assert_allclose(personal.embed(MUG, images, none), mug, atol=1e-6)


def test_an_encoder_of_another_resolution_is_refused_naming_the_setting(encoders):
    config, _, out = encoders
    other = config.personalize.model_copy(update={"resolution": 2 * config.personalize.resolution})
    personal = PersonalEncoders(config.model_spec("encoder"), other, out)
    with pytest.raises(ValueError, match=r"personalize\.resolution"):
        personal.has_encoder(LAMP)


def test_ratings_without_the_column_keep_their_digest(tmp_path):
    """Ratings tables written before personal_fidelity existed still load, and give the
    digest `generate.ranker_sha256` pinned; an all-null column changes nothing either."""
    rng = np.random.default_rng(0)
    n = 12
    base = {
        "run": ["a"] * n,
        "product_id": [f"p{i % 3}" for i in range(n)],
        "image_id": [f"i{i}" for i in range(n)],
        "human_pass": [bool(i % 2) for i in range(n)],
        **{m.value: rng.random(n) for m in Metric if m != Metric.PERSONAL_FIDELITY},
    }
    old, null, filled = tmp_path / "old.parquet", tmp_path / "null.parquet", tmp_path / "f.parquet"
    pq.write_table(pa.table(base), old)
    pq.write_table(pa.table({**base, "personal_fidelity": pa.nulls(n, pa.float64())}), null)
    pq.write_table(pa.table({**base, "personal_fidelity": rng.random(n)}), filled)
    digest = ratings_digest(read_ratings(str(old)))
    assert np.isnan(read_ratings(str(old)).metrics[Metric.PERSONAL_FIDELITY]).all()
    assert ratings_digest(read_ratings(str(null))) == digest
    assert ratings_digest(read_ratings(str(filled))) != digest


@pytest.mark.slow
def test_generate_records_it_and_it_changes_the_ranking_when_weighted(
    ray_local, adapters, tmp_path
):
    """generate with encoders for the lamp only: the lamp's rows carry personal_fidelity,
    the mug's are null; weighted heavily it orders the lamp's images (differently from the
    ranking without it), and the mug's order is the one without it."""
    from pipelines.generate import generate

    config = load_config("tiny", overrides=["personalize.pairs=64"])
    data = str(Path(adapters).parent / "aug")  # the adapters' training set (conftest)
    encoders = str(tmp_path / "encoders")
    _train_encoders(config, data, encoders, [LAMP])
    weights = {**config.generate.weights, Metric.PERSONAL_FIDELITY: 1000.0}
    cfg = load_config(
        "tiny",
        overrides=[
            f"scoring.encoders={encoders}",
            "generate.ranking=weighted",
            "generate.threshold=0",
            "generate.top_n=2",
            "ray.progress_bars=false",
            "generate.weights={" + ", ".join(f"{m}: {w}" for m, w in weights.items()) + "}",
        ],
    )
    out = str(tmp_path / "generations")
    summary = generate(cfg, adapters, out)
    assert summary.products["ok"] == len(PRODUCTS)
    without = WeightedMean({**weights, Metric.PERSONAL_FIDELITY: 0.0}, cfg.scoring.ranges)
    changed = {}
    for pid in PRODUCTS:
        rows = pq.read_table(GenerationLayout(out).manifest_shard(pid)).to_pylist()
        assert all(r["models"] for r in rows)
        fidelity = [r[Metric.PERSONAL_FIDELITY] for r in rows]
        if pid == LAMP:
            assert all(v is not None and math.isfinite(v) for v in fidelity)
            assert dict(rows[0]["models"])["encoder"]
        else:
            assert fidelity == [None] * len(rows)
        metrics = {
            m: np.array([np.nan if r[m] is None else r[m] for r in rows], np.float32)
            for m in Metric
        }
        ids = [r["image_id"] for r in rows]
        ranks_without, _ = rank_and_keep(
            without.score(metrics), ids, 2, cfg.generate.keep_threshold
        )
        ranks = [r["rank"] for r in rows]
        changed[pid] = ranks != ranks_without
        if pid == LAMP:  # the best personal fidelity ranks first
            best = int(np.nanargmax(metrics[Metric.PERSONAL_FIDELITY]))
            assert ranks[best] == 1
    assert changed == {LAMP: True, MUG: False}


def test_serves_ranker_returns_it_for_a_product_with_an_encoder_only(encoders, adapters):
    from ray_app.adapter_meta import AdapterMeta
    from ray_app.storage import AdapterLayout
    from serve.ranker import RankerReplica

    _, data, out = encoders
    replica = RankerReplica(
        load_config("tiny", overrides=[f"scoring.encoders={out}", "generate.segment=false"])
    )
    images = _images(data, LAMP, SampleKind.CONTEXT)[0]
    for pid in PRODUCTS:
        meta = AdapterMeta.read(AdapterLayout(adapters).metadata(pid))
        got = replica.rank(meta, images, "a lamp on a shelf")
        values = [m[Metric.PERSONAL_FIDELITY] for m in got["metrics"]]
        if pid == LAMP:
            assert all(v is not None and math.isfinite(v) for v in values)
        else:
            assert values == [None] * len(images)
