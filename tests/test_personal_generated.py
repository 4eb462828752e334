"""Generated positives in `restage personalize --adapters` (pipelines/personalize.py): the
seg_dino filter and its reasons, the split over guidance values, the generate config, and
one end-to-end run on the tiny profile (generate per guidance value, then the encoders)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from trainset import PRODUCTS, write_training_set

from pipelines.personalize import drop_reason, filter_generated, generation_config
from ray_app.config import PersonalGeneratedConfig, with_overrides
from ray_app.records import GENERATION_SCHEMA
from ray_app.storage import EncoderLayout, GenerationLayout


def _row(image_id: str, seg_dino: float | None, mask: str | None = "sam", **kw) -> dict:
    row = dict.fromkeys(GENERATION_SCHEMA.names)
    row.update(
        product_id="p",
        image_id=image_id,
        image_uri=f"/g/{image_id}.png",
        seg_dino=seg_dino,
        mask_method=mask,
    )
    row.update(kw)
    return row


def test_an_image_at_the_bar_is_kept_and_one_below_is_dropped_with_value_and_bar():
    assert drop_reason(_row("a", 0.5), 0.5) is None
    assert drop_reason(_row("a", 0.9), 0.5) is None
    assert drop_reason(_row("a", 0.41), 0.5) == "seg_dino=0.410 < 0.5"


def test_an_image_without_seg_dino_is_dropped_with_why():
    assert drop_reason(_row("a", None, mask=None), -1.0) == "no product mask"
    assert drop_reason(_row("a", math.nan, mask=None), -1.0) == "no product mask"
    assert "real photos have no mask" in drop_reason(_row("a", None, mask="sam"), -1.0)
    failed = _row("a", None, mask=None, image_uri=None, error="CUDA out of memory")
    assert drop_reason(failed, -1.0) == "not generated: CUDA out of memory"


def test_filter_splits_every_row_into_kept_or_a_dropped_row_with_its_reason():
    rows = [_row("a", 0.7), _row("b", 0.2), _row("c", None, mask=None), _row("d", 0.6)]
    got = filter_generated(rows, 7.5, 0.6)
    assert [r["image_id"] for r in got.kept] == ["a", "d"]
    assert [(d["image_id"], d["reason"]) for d in got.dropped] == [
        ("b", "seg_dino=0.200 < 0.6"),
        ("c", "no product mask"),
    ]
    for d in got.dropped:
        assert d["guidance_scale"] == 7.5 and d["product_id"] == "p"
        assert d["image_uri"] == f"/g/{d['image_id']}.png"
    assert got.dropped[0]["seg_dino"] == 0.2 and got.dropped[1]["seg_dino"] is None


def test_a_higher_bar_never_keeps_more():
    rows = [_row(f"i{k}", v) for k, v in enumerate([0.1, 0.35, 0.5, 0.62, 0.8, None])]
    kept = [len(filter_generated(rows, 4.0, bar).kept) for bar in (-1.0, 0.3, 0.5, 0.7, 1.0)]
    assert kept == sorted(kept, reverse=True) and kept[0] == 5 and kept[-1] == 0
    for bar in (-1.0, 0.3, 0.5, 0.7, 1.0):
        got = filter_generated(rows, 4.0, bar)
        assert len(got.kept) + len(got.dropped) == len(rows)


@pytest.mark.parametrize(
    "images,scales", [(450, [4.0, 5.0, 7.5]), (10, [4.0, 5.0, 7.5]), (2, [1.0])]
)
def test_images_are_split_over_the_guidance_values(images, scales):
    shares = PersonalGeneratedConfig(guidance_scales=scales, images_per_product=images).shares()
    assert [g for g, _ in shares] == scales
    assert sum(n for _, n in shares) == images
    assert max(n for _, n in shares) - min(n for _, n in shares) <= 1


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"guidance_scales": []}, "guidance_scales=[]"),
        ({"guidance_scales": [4.0, 4]}, "repeats"),
        ({"guidance_scales": [4.0, 5.0], "images_per_product": 1}, "images_per_product=1"),
        ({"min_seg_dino": 1.5}, "min_seg_dino"),
    ],
)
def test_bad_generated_configs_are_refused_naming_the_field(kwargs, words):
    with pytest.raises(ValidationError, match=words.replace("[", r"\[").replace("]", r"\]")):
        PersonalGeneratedConfig(**kwargs)


def test_the_generate_config_writes_segments_and_keeps_every_image(tiny_config):
    before = tiny_config.generate.model_dump()
    cfg = generation_config(tiny_config, 7.5, 5).generate
    assert cfg.guidance_scale == 7.5 and cfg.write_all_images and cfg.segment
    assert cfg.prompts_per_product * cfg.images_per_prompt == 5 and cfg.top_n >= 5
    assert cfg.user_prompts is None
    assert cfg.keep_threshold <= -3.0  # the paper ranking's floor: the ranking drops nothing
    assert tiny_config.generate.model_dump() == before  # a copy


def test_each_guidance_value_has_its_own_generation_folder(tmp_path):
    layout = EncoderLayout(str(tmp_path))
    folders = {layout.generated_dir(g) for g in (4.0, 5.0, 7.5, 4)}
    assert len(folders) == 3 and layout.generated_dir(7.5).endswith("_generated/cfg-7.5")
    assert not any(Path(f).name.startswith(("_", ".")) for f in folders)  # cfg-...


# --------------------------------------------------------------------------- end to end

VASE = {"vase-green-03": ("vase", "a green vase", (40, 200, 60))}


def _generated_rows(out: Path, pid: str, guidance: float) -> list[dict]:
    shard = GenerationLayout(EncoderLayout(str(out)).generated_dir(guidance)).manifest_shard(pid)
    return pq.read_table(shard).to_pylist()


@pytest.mark.slow
def test_generated_positives_are_made_per_guidance_value_filtered_and_trained(
    tmp_path, adapters, ray_local, tiny_config
):
    from pipelines.personalize import personalize

    data, out = tmp_path / "aug", tmp_path / "enc"
    shutil.copytree(Path(adapters).parent / "aug", data)  # the adapters' training sets
    write_training_set(str(data), VASE)  # a product without an adapter
    gen = tiny_config.personalize.generated
    summary = personalize(tiny_config, str(data), str(out), adapters)
    assert summary.products["ok"] + summary.products["partial"] == len(PRODUCTS) + 1
    assert [g["guidance_scale"] for g in summary.extra["generated"]] == gen.guidance_scales

    made: dict[str, list[dict]] = {pid: [] for pid in PRODUCTS}
    for guidance, n in gen.shares():
        for pid in PRODUCTS:
            rows = _generated_rows(out, pid, guidance)
            assert len(rows) == n and all(r["image_uri"] for r in rows)
            made[pid] += [{**r, "guidance": guidance} for r in rows]
    for pid in PRODUCTS:  # same prompts and seeds: only the guidance makes them differ
        first, second = (
            Path(_generated_rows(out, pid, g)[0]["image_uri"]).read_bytes()
            for g in gen.guidance_scales[:2]
        )
        assert first != second

    manifest = {r["product_id"]: r for r in pq.read_table(out / "_manifest").to_pylist()}
    count = tiny_config.personalize.cut_paste.count
    for pid in PRODUCTS:
        kept = [r for r in made[pid] if drop_reason(r, gen.min_seg_dino) is None]
        row = manifest[pid]
        assert row["generated"] == len(kept) and row["generated"] > 0
        assert row["generated_dropped"] == len(made[pid]) - len(kept)
        assert row["positives"] == 6 + count + len(kept)  # 3 reals, 3 contexts, composites
    assert manifest["vase-green-03"]["generated"] == 0
    assert manifest["vase-green-03"]["positives"] == 6 + count
    errors = pq.read_table(out / "_errors").to_pylist()
    vase = [e for e in errors if e["product_id"] == "vase-green-03" and e["stage"] == "generated"]
    assert len(vase) == 1 and "no adapter" in vase[0]["reason"]

    # The same generations (copied: generate skips its complete products) under two bars: the
    # median seg_dino (some kept, some dropped) and one above every seg_dino (none kept).
    values = sorted(
        r["seg_dino"] for rows in made.values() for r in rows if r["seg_dino"] is not None
    )
    assert values, "no generated image has a seg_dino: the segmenter found no mask at all"
    median, high = values[len(values) // 2], round(values[-1] + 0.005, 3)
    assert values[0] < median and high <= 1.0
    for name, bar in (("median", median), ("high", high)):
        again = tmp_path / f"enc-{name}"
        shutil.copytree(out / "_generated", again / "_generated")
        # (one step per product: what these runs check is the data, not the encoders)
        bar_set = [f"personalize.generated.min_seg_dino={bar!r}", "personalize.epochs=1"]
        config = with_overrides(tiny_config, [*bar_set, "personalize.pairs=8"])
        summary = personalize(config, str(data), str(again), adapters)
        for g in summary.extra["generated"]:
            assert g["products"]["already complete"] == len(PRODUCTS)
        manifest = {r["product_id"]: r for r in pq.read_table(again / "_manifest").to_pylist()}
        total = 0
        for pid in PRODUCTS:
            kept = [r for r in made[pid] if r["seg_dino"] is not None and r["seg_dino"] >= bar]
            left = sorted(r["image_uri"] for r in made[pid] if r not in kept)
            assert manifest[pid]["generated"] == len(kept)
            assert manifest[pid]["generated_dropped"] == len(left)
            assert manifest[pid]["positives"] == 6 + count + len(kept)
            total += len(kept)
            shard = again / "_dropped" / f"{pid}.parquet"
            dropped = pq.read_table(shard).to_pylist() if left else []
            assert shard.exists() == bool(left)
            assert sorted(d["image_uri"] for d in dropped) == left
            for d in dropped:
                assert d["reason"] == (
                    "no product mask"
                    if d["seg_dino"] is None
                    else f"seg_dino={d['seg_dino']:.3f} < {bar:g}"
                )
        assert 0 < total < len(values) if name == "median" else total == 0
        assert not (again / "_dropped" / "vase-green-03.parquet").exists()
