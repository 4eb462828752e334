"""`restage personalize evaluate` (pipelines/personalize_evaluate.py): the test manifest's
rows and splits, the measures of one product on hand-made features, and the job end to end
on encoders of 3 DreamBooth products with cut-and-paste composites (exact paste masks) as
detection and segmentation ground truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.personalize_evaluate import (
    ENCODERS,
    REFERENCE,
    RESULT_SCHEMA,
    TEST,
    VAL,
    LabelledImage,
    measure_product,
    read_test_manifest,
)
from ray_app import storage
from ray_app.config import PersonalEvalConfig, load_config
from ray_app.personal_eval import prototype, similarity_map

PRODUCTS = ["backpack", "can", "candle"]


def _write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    return str(path)


# --------------------------------------------------------------------------- the manifest


def test_manifest_rows_splits_and_errors(tmp_path):
    rows = [{"image_uri": f"a{i}.png", "product_id": "a"} for i in range(7)]
    rows += [{"image_uri": "b0.png", "product_id": "b", "split": "reference"}]
    rows += [{"image_uri": f"b{i}.png", "product_id": "b", "mask_uri": f"m{i}.png"} for i in (1, 2)]
    rows += [{"image_uri": f"d{i}.png", "product_id": ""} for i in range(4)]
    bad = [
        {"product_id": "a"},  # no image
        {"image_uri": "x.png", "product_id": "a", "split": "train"},
        {"image_uri": "y.png", "product_id": "bad id"},
        {"image_uri": "z.png", "mask_uri": "zm.png"},  # a distractor with a mask
        {"image_uri": "a0.png", "product_id": "a"},  # a duplicate
    ]
    uri = _write_rows(tmp_path / "test.jsonl", rows + bad)
    options = PersonalEvalConfig(references=2, val_fraction=0.5)
    images, errors = read_test_manifest(uri, options, run_seed=0)

    assert len(images) == len(rows)
    reasons = " | ".join(e.reason for e in errors)
    assert len(errors) == len(bad) + 1, reasons  # and the line that is not JSON
    for needle in (
        "image_uri is missing",
        "split='train'",
        "product_id",
        "mask_uri on a distractor",
        "duplicate image_uri",
        "not valid JSON",
    ):
        assert needle in reasons
    assert all(e.reason.startswith("line ") for e in errors)  # each names its row

    def split_of(pid):
        return [img.split for img in images if img.product_id == pid]

    # a: no reference rows, so `references` of them are drawn; half the rest is validation
    assert split_of("a").count(REFERENCE) == 2
    assert split_of("a").count(VAL) == round(0.5 * 5) and split_of("a").count(TEST) == 3
    # b: its own reference is kept, nothing more drawn
    assert split_of("b").count(REFERENCE) == 1 and sorted(split_of("b")[1:]) == [TEST, VAL]
    assert sorted(split_of(None)) == [TEST, TEST, VAL, VAL]
    assert images[0].image_uri == str(tmp_path / "a0.png")  # relative to the manifest
    # seeded: the same again, another run seed another draw
    again, _ = read_test_manifest(uri, options, run_seed=0)
    assert again == images
    other = [read_test_manifest(uri, options, run_seed=s)[0] for s in (1, 2, 3)]
    assert any(o != images for o in other)


def test_a_product_is_in_one_group(tmp_path):
    rows = [{"image_uri": f"a{i}.png", "product_id": "a", "group": "bags"} for i in range(3)]
    rows += [{"image_uri": "d.png", "product_id": None, "group": "bags"}]
    rows += [{"image_uri": "e.png", "product_id": None}]
    bad = [{"image_uri": "a9.png", "product_id": "a", "group": "lamps"}]
    uri = _write_rows(tmp_path / "test.jsonl", rows + bad)
    images, errors = read_test_manifest(uri, PersonalEvalConfig(references=1), run_seed=0)
    assert [img.group for img in images] == ["bags"] * 4 + [None]
    (wrong,) = [e for e in errors if "group" in e.reason]
    assert "product a is in group 'bags' (line 1)" in wrong.reason
    assert wrong.reason.startswith("line 6")


def test_an_actor_keeps_the_images_of_one_group_and_the_ungrouped(tmp_path):
    """A product is measured on its group's images and the ungrouped ones; an actor drops a
    group's decoded images when it moves to another, and writes each group's unreadable
    images to that group's errors shard."""
    from pipelines.personalize_evaluate import EvaluateEncoders, _images_shard
    from ray_app.storage import PersonalEvalLayout

    rng = np.random.default_rng(0)
    rows = []
    for group, pids in (("bags", ["a", "b"]), ("lamps", ["c"])):
        for pid in pids:
            rows += [
                {
                    "image_uri": _save(
                        tmp_path / f"{pid}{i}.png",
                        rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),
                    ),
                    "product_id": pid,
                    "group": group,
                }
                for i in range(3)
            ]
    rows.append({"image_uri": str(tmp_path / "gone.png"), "product_id": "c", "group": "lamps"})
    rows += [
        {
            "image_uri": _save(
                tmp_path / f"d{i}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            )
        }
        for i in range(2)
    ]
    uri = _write_rows(tmp_path / "test.jsonl", rows)
    config = load_config("tiny")
    images, _ = read_test_manifest(uri, config.personalize.evaluate, run_seed=0)
    out = PersonalEvalLayout(str(tmp_path / "out"))
    actor = EvaluateEncoders(config, images, str(tmp_path / "enc"), out.root, storage.read_bytes)

    def uris(idx):
        return {Path(images[i].image_uri).stem for i in idx}

    ungrouped = {"d0", "d1"}
    assert uris(actor.scope("bags")) == {"a0", "a1", "a2", "b0", "b1", "b2"} | ungrouped
    assert uris(actor.scope(None)) == uris(range(len(images)))
    actor._enter("bags")
    assert uris(actor.loaded) == uris(actor.scope("bags"))
    actor._cache_pretrained(sorted(actor.loaded))
    actor._enter("lamps")
    assert uris(actor.loaded) == {"c0", "c1", "c2", "gone"} | ungrouped
    assert uris(actor.pretrained) == ungrouped  # kept across groups
    assert isinstance(
        actor.loaded[next(i for i in actor.loaded if "gone" in images[i].image_uri)], str
    )
    lamps = storage.read_parquet(out.errors_shard(_images_shard("lamps"))).to_pylist()
    assert [Path(r["item"]).name for r in lamps] == ["gone.png"]
    assert not storage.exists(out.errors_shard(_images_shard("bags")))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_manifests_read_as_jsonl(tmp_path, fmt):
    import pyarrow as pa

    rows = [
        {"image_uri": f"a{i}.png", "product_id": "a", "mask_uri": f"m{i}.png", "split": None}
        for i in range(5)
    ]
    rows += [{"image_uri": "d.png", "product_id": None, "mask_uri": None, "split": "test"}]
    options = PersonalEvalConfig()
    jsonl, _ = read_test_manifest(_write_rows(tmp_path / "t.jsonl", rows), options, 0)
    table = pa.Table.from_pylist(rows)
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)  # nulls as empty cells
    else:
        pq.write_table(table, path)
    got, errors = read_test_manifest(str(path), options, 0)
    assert errors == []
    assert [(i.image_uri, i.product_id, i.mask_uri, i.split) for i in got] == [
        (i.image_uri, i.product_id, i.mask_uri, i.split) for i in jsonl
    ]


# --------------------------------------------------------------------------- the measures


def _square_mask(side: int, box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((side, side), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def test_measures_of_a_perfect_and_a_blind_encoder():
    """Features that tell the product apart, and patch tokens equal to the prototype exactly
    on the product's mask: every measure is perfect; constant features: chance."""
    options = PersonalEvalConfig(mask_side=16, recall_at=[1, 2])
    grid, side = 4, 16
    pool, masks, feats, tokens = [], [], [], []
    fg, bg = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    for i in range(12):
        pid = "p" if i % 3 == 0 else ("q" if i % 3 == 1 else None)
        split = VAL if i < 6 else TEST
        pool.append(LabelledImage(f"line {i}", f"{i}.png", pid, None, split))
        cells = (i % 2, 0, i % 2 + 2, 2)  # a 2x2 patch block, on the grid
        tok = np.tile(bg, (grid, grid, 1))
        if pid == "p":
            tok[cells[1] : cells[3], cells[0] : cells[2]] = fg
            masks.append(_square_mask(side, tuple(4 * c for c in cells)))
        else:
            masks.append(None)
        tokens.append(tok)
        feats.append(fg if pid == "p" else bg)
    maps = [similarity_map(t, prototype(np.tile(fg, (1, grid, grid, 1)))) for t in tokens]
    rows = measure_product("p", pool, masks, fg[None], np.array(feats), maps, options)
    got = {(r["task"], r["metric"]): r["value"] for r in rows}
    assert got == {
        ("classification", "auc"): 1.0,
        ("classification", "accuracy"): 1.0,
        ("classification", "balanced_accuracy"): 1.0,
        ("retrieval", "ap"): 1.0,
        ("retrieval", "recall@1"): 0.5,  # 2 test images of p: the best 1 finds half
        ("retrieval", "recall@2"): 1.0,
        ("segmentation", "miou"): pytest.approx(1.0, abs=0.15),  # bilinear edges
        ("detection", "ap50"): 1.0,
    }
    n = {(r["task"], r["metric"]): r["n"] for r in rows}
    assert n[("classification", "auc")] == 6 and n[("retrieval", "ap")] == 2
    assert n[("detection", "ap50")] == 2 and n[("segmentation", "miou")] == 2

    blind = measure_product("p", pool, masks, bg[None], np.tile(bg, (12, 1)), maps, options)
    got = {(r["task"], r["metric"]): r["value"] for r in blind}
    assert got[("classification", "auc")] == 0.5
    assert got[("retrieval", "ap")] < 0.5  # ties rank against the product


# --------------------------------------------------------------------------- end to end


def _encoder_photos(dreambooth) -> dict[str, list[np.ndarray]]:
    from bench.personalize import photos

    return photos(256, dreambooth)


def _ellipse(shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 <= 1


def _square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    return np.ascontiguousarray(
        img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    )


def _save(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path.name  # relative to the manifest, beside it


@pytest.fixture(scope="module")
def evaluation_inputs(tmp_path_factory, dreambooth):
    """Encoders of 3 products (each trained on 3 of its photos against the other 9
    products' 3) and a test manifest: their 3 photos as references, their held-out photos,
    composites of their held-out photos (an elliptic cut-out) pasted on other products'
    photos with the paste mask, the other 7 products' held-out photos as distractors, and
    bad rows."""
    from actors.encoder_trainer import EncoderLayout, EncoderTrainer
    from ray_app.config import CutPasteConfig
    from ray_app.cutpaste import cut_paste

    root = tmp_path_factory.mktemp("personal-eval")
    config = load_config("tiny")
    photos = _encoder_photos(dreambooth)
    train = {k: v[:3] for k, v in photos.items()}
    trainer = EncoderTrainer(config.model_spec("encoder"), config.personalize)
    layout = EncoderLayout(str(root / "encoders"))
    for i, pid in enumerate(PRODUCTS):
        negatives = [img for k, v in train.items() if k != pid for img in v]
        result = trainer.train(train[pid], negatives, seed=i)
        trainer.save(layout.encoder_dir(pid), trainer.meta(pid, result))

    test = root / "test"
    rows = []
    backgrounds = [_square(img) for k, v in photos.items() if k not in PRODUCTS for img in v[3:]]
    rng = np.random.default_rng(0)
    cut = CutPasteConfig(scale_range=(0.9, 1.3), reference=0.6)
    for pid in PRODUCTS:
        for j, img in enumerate(train[pid]):
            rows.append(
                {
                    "image_uri": _save(test / f"{pid}-ref{j}.png", img),
                    "product_id": pid,
                    "split": "reference",
                }
            )
        for j, img in enumerate(photos[pid][3:]):
            rows.append({"image_uri": _save(test / f"{pid}-real{j}.png", img), "product_id": pid})
            for c in range(2):
                bg = backgrounds[int(rng.integers(len(backgrounds)))]
                made = cut_paste(img, _ellipse(img.shape[:2]), bg, rng, cut)
                rows.append(
                    {
                        "image_uri": _save(test / f"{pid}-cp{j}{c}.png", made.image),
                        "mask_uri": _save(
                            test / f"{pid}-cp{j}{c}-mask.png", made.mask.astype(np.uint8) * 255
                        ),
                        "product_id": pid,
                    }
                )
    for k, v in photos.items():
        if k not in PRODUCTS:
            for j, img in enumerate(v[3:]):
                rows.append(
                    {"image_uri": _save(test / f"other-{k}{j}.png", img), "product_id": None}
                )
    rows.append({"image_uri": "missing.png", "product_id": "can"})  # unreadable
    rows.append({"image_uri": "x.png", "product_id": "can", "split": "holdout"})
    rows.append({"image_uri": "y.png", "product_id": "vase"})  # a product without an encoder
    manifest = str(test / "test.jsonl")
    Path(manifest).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, layout.root, manifest, len(rows)


@pytest.mark.slow
def test_cli_evaluates_personal_and_pretrained_encoders(evaluation_inputs, ray_local, capsys):
    from ray_app import cli

    root, encoders, manifest, _ = evaluation_inputs
    out = root / "out"
    argv = [
        "personalize",
        "evaluate",
        "--profile",
        "tiny",
        "--encoders",
        encoders,
        "--test",
        manifest,
        "--out",
        str(out),
        "--set",
        "ray.progress_bars=false",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "retrieval/ap" in printed and "report" in printed

    table = pq.read_table(out / "results.parquet")
    assert table.schema.equals(RESULT_SCHEMA)
    rows = table.to_pylist()
    assert {r["product_id"] for r in rows} == set(PRODUCTS)
    assert {r["encoder"] for r in rows} == set(ENCODERS)
    metrics = {(r["task"], r["metric"]) for r in rows}
    assert {
        ("classification", "auc"),
        ("retrieval", "ap"),
        ("detection", "ap50"),
        ("segmentation", "miou"),
        ("retrieval", "recall@5"),
    } <= metrics
    # one row per product x encoder x metric, each measured (masks were given for all)
    assert len(rows) == len(PRODUCTS) * len(ENCODERS) * len(metrics)
    for r in rows:
        if r["metric"] != "accuracy" and r["metric"] != "balanced_accuracy":
            assert math.isfinite(r["value"]), r
            assert 0.0 <= r["value"] <= 1.0, r

    summary = json.loads((out / "summary.json").read_text())
    assert summary["products"] == len(PRODUCTS) and summary["failed"] == 0
    live = json.loads((out / "_progress.json").read_text())  # what `restage status` reads
    assert (live["phase"], live["done"], live["total"]) == ("finished", 3, len(PRODUCTS))
    ap = next(m for m in summary["metrics"] if m["name"] == "retrieval/ap")
    print("retrieval AP", ap)
    print({m["name"]: (m["personal"]["mean"], m["pretrained"]["mean"]) for m in summary["metrics"]})
    assert ap["personal"]["mean"] > ap["pretrained"]["mean"]
    assert ap["difference"]["n"] == len(PRODUCTS)

    errors = storage.read_parquet(str(out / "_errors")).to_pylist()  # "_" shards: not pq's
    assert summary["errors"] == len(errors)
    reasons = " | ".join(e["reason"] for e in errors)
    assert "split='holdout'" in reasons and "no encoder for product vase" in reasons
    assert any("missing.png" in (e["item"] or "") for e in errors), reasons
    report = (out / "report" / "index.html").read_text()
    assert "retrieval" in report and "personal" in report and "<svg" in report

    # a re-run with the same inputs skips every product and writes the same results
    assert cli.main(argv) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["skipped_done"] == len(PRODUCTS)
    assert pq.read_table(out / "results.parquet").equals(table)

    # Grouped: the candle is measured on its group's images and the distractors only.
    groups = {"backpack": "bags", "can": "bags", "candle": "home"}
    lines = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    for row in lines:
        if row.get("product_id") in groups:
            row["group"] = groups[row["product_id"]]
    grouped = Path(manifest).with_name("grouped.jsonl")  # its image paths are relative
    grouped.write_text("".join(json.dumps(r) + "\n" for r in lines))
    argv[argv.index(manifest)] = str(grouped)
    argv[argv.index(str(out))] = str(root / "out-grouped")
    assert cli.main(argv) == 0
    options = load_config("tiny").personalize.evaluate
    images, _ = read_test_manifest(str(grouped), options, run_seed=load_config("tiny").seed)
    in_pool = [img for img in images if img.split == TEST and img.group in ("home", None)]

    def auc_n(path: Path, pid: str) -> int:
        got = pq.read_table(path / "results.parquet").to_pylist()
        (row,) = [
            r for r in got
            if (r["product_id"], r["encoder"], r["metric"]) == (pid, "personal", "auc")
        ]  # fmt: skip
        return row["n"]

    assert auc_n(root / "out-grouped", "candle") == len(in_pool) < auc_n(out, "candle")
    assert json.loads((root / "out-grouped" / "summary.json").read_text())["groups"] == 2


def test_cli_refuses_mixed_arguments(capsys):
    from ray_app import cli

    assert cli.main(["personalize", "evaluate", "--encoders", "e", "--out", "o"]) == 2
    assert "--test" in capsys.readouterr().err
    assert cli.main(["personalize", "--encoders", "e", "--test", "t", "--out", "o"]) == 2
    assert "restage personalize evaluate" in capsys.readouterr().err


def test_a_product_is_measured_the_same_whatever_the_chunk_of_images_encoded_at_once(
    evaluation_inputs, tmp_path, monkeypatch
):
    """An actor encodes a product's pool ``ENCODE_CHUNK`` images at a time and keeps only
    their dense maps: no call encodes more, and the measures equal one chunk's; so do they
    when it keeps the pretrained tokens of 5 images only (``cached_tokens``)."""
    from pipelines import personalize_evaluate as pe

    _, encoders, manifest, _ = evaluation_inputs
    config = load_config("tiny")
    images, _ = read_test_manifest(manifest, config.personalize.evaluate, run_seed=0)

    def measured(chunk: int, cached: int = 4096) -> tuple[list[dict], list[int]]:
        monkeypatch.setattr(pe, "ENCODE_CHUNK", chunk)
        cfg = load_config("tiny", overrides=[f"personalize.evaluate.cached_tokens={cached}"])
        actor = pe.EvaluateEncoders(
            cfg, images, encoders, str(tmp_path / f"out{chunk}-{cached}"), storage.read_bytes
        )
        actors.append(actor)
        sizes, encode = [], actor.trainer.encode

        def counted(views, **kwargs):
            sizes.append(len(views))
            return encode(views, **kwargs)

        monkeypatch.setattr(actor.trainer, "encode", counted)
        return actor.evaluate("candle"), sizes

    actors: list = []
    whole, whole_sizes = measured(10_000)
    chunked, sizes = measured(4)
    few_kept, _ = measured(4, cached=5)  # the rest of the pretrained tokens: encoded again
    assert max(whole_sizes) > 4 and max(sizes) == 4
    assert len(actors[0].tokens) == len(actors[0].pretrained) > 5 == len(actors[2].tokens)
    for rows in (chunked, few_kept):
        assert [(r["encoder"], r["task"], r["metric"], r["n"]) for r in rows] == [
            (r["encoder"], r["task"], r["metric"], r["n"]) for r in whole
        ]
        for a, b in zip(rows, whole, strict=True):
            assert a["value"] == pytest.approx(b["value"], abs=1e-4, nan_ok=True), a
