"""`restage index` and `restage stage` end to end, tiny profile, through the CLI as a user
runs them: the DreamBooth photos are the catalog scenes, the examples' plain-background
products are staged into them; the staging run is SIGKILLed after its first product and
resumed. The checks are geometric (model quality plays no part): the product's pixels,
its ground line and scale, the removed product's area, the clip's frame count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DREAMBOOTH, EXAMPLES, kill_after_first_marker
from PIL import Image
from scipy import ndimage

from pipelines.stage import staged_size
from ray_app import parallax, retrieval, storage
from ray_app.config import load_config
from ray_app.images import decode_mask, dilate, load_images, resize
from ray_app.staging import Box, Placement, _place_layer, ground_line, removal_mask

RESTAGE = str(Path(sys.executable).with_name("restage"))
ALLOW = f"storage.allowed_sources=[{EXAMPLES}, {DREAMBOOTH}]"
CATALOG = ["can", "candle", "clock", "duck_toy", "rc_car"]  # scenes of several shapes
# three products keep three staged images: FID/KID measured from 2 (biased, but computed)
COMMON = ["--profile", "tiny", "--set", "ray.progress_bars=false", "--set", ALLOW]
COMMON += ["--set", "evaluate.min_fid_images=2"]

pytestmark = pytest.mark.slow  # every test reads the module's index and staging runs


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [RESTAGE, *args, *COMMON], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dreambooth):
    tmp = tmp_path_factory.mktemp("stage")
    catalog = tmp / "catalog.jsonl"
    rows = [json.loads(line) for line in (dreambooth / "products.jsonl").read_text().splitlines()]
    with catalog.open("w") as f:
        for row in rows:
            if row["product_id"] in CATALOG:
                row["image_uris"] = [str(dreambooth / u) for u in row["image_uris"]]
                f.write(json.dumps(row) + "\n")
    products = tmp / "products.jsonl"
    with products.open("w") as f:
        for line in (EXAMPLES / "products.jsonl").read_text().splitlines():
            row = json.loads(line)
            row["image_uris"] = [str(EXAMPLES / u) for u in row["image_uris"]]
            f.write(json.dumps(row) + "\n")
    index_out, out = tmp / "index", tmp / "staged"
    _run(["index", "--catalog", str(catalog), "--out", str(index_out)])

    # Stage, SIGKILL once the first product is written, resume.
    cmd = [RESTAGE, "stage", "--manifest", str(products), "--index", str(index_out / "index")]
    cmd += ["--out", str(out), "--animate", *COMMON]
    done_at_kill = kill_after_first_marker(cmd, out, tmp / "killed.log")
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    return {
        "index": index_out,
        "out": out,
        "products": [json.loads(line) for line in products.read_text().splitlines()],
        "cmd": cmd,
        "done_at_kill": done_at_kill,
        "resumed": resumed.stdout,
        "config": load_config("tiny"),
        "scenes": storage.read_parquet(str(index_out / "manifest")).to_pylist(),
        "staged": storage.read_parquet(str(out / "manifest")).to_pylist(),
    }


def _kept(runs) -> list[dict]:
    kept = [r for r in runs["staged"] if r["kept"]]
    assert len(kept) == len(runs["products"]) * runs["config"].stage.keep
    return kept


def _scene(runs, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """The staged row's scene photo and its product mask, at the staged image's size."""
    scene = next(s for s in runs["scenes"] if s["image_id"] == row["scene_image_id"])
    rgb = np.asarray(Image.open(scene["scene_uri"]).convert("RGB"))
    mask = decode_mask(storage.read_bytes(scene["mask_uri"]))
    size = (row["width"], row["height"])
    return resize(rgb, size), resize(mask, size, mask=True) > 0


def test_summaries_measure_fid_and_kid_of_the_staged_images_against_the_scenes(runs):
    index = json.loads((runs["index"] / "summary.json").read_text())
    kept_scenes = sum(s["kept"] for s in runs["scenes"])
    reference = index["fid_reference"]
    assert reference["images"] == kept_scenes and Path(reference["uri"]).is_file()
    assert reference["uri"] == str(runs["index"] / "index" / "fid_reference.npz")
    quality = json.loads((runs["out"] / "summary.json").read_text())["quality"]
    # every kept image, the killed run's products' too, against every kept scene
    assert quality["refused"] is None, quality
    assert (quality["n_generated"], quality["n_reference"]) == (len(_kept(runs)), kept_scenes)
    assert quality["fid"] is not None and quality["fid"] >= 0
    assert quality["kid_mean"] is not None
    shards = storage.read_parquet(str(runs["out"] / "_features")).to_pylist()
    kept = {f"{r['product_id']}/{r['stage_id']}" for r in _kept(runs)}
    assert sorted(r["image_id"] for r in shards) == sorted(kept)


def test_index_keeps_clean_scenes_with_their_mask_box_and_ground_line(runs):
    scenes = runs["scenes"]
    photos = sum(
        len(r["image_uris"])
        for r in map(json.loads, (DREAMBOOTH / "products.jsonl").read_text().splitlines())
        if r["product_id"] in CATALOG
    )
    assert len(scenes) == photos  # every photo has its row, kept or not
    kept = [s for s in scenes if s["kept"]]
    assert kept, "no scene was indexed"
    assert all(s["drop_reason"] for s in scenes if not s["kept"])
    share = runs["config"].index.ground_share
    for s in kept:
        mask = decode_mask(storage.read_bytes(s["mask_uri"])) > 0
        box = Box.of(mask)
        assert (s["box_x0"], s["box_y0"], s["box_x1"], s["box_y1"]) == (
            box.x0,
            box.y0,
            box.x1,
            box.y1,
        )
        assert s["ground"] == ground_line(mask, share)
        assert s["area_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
    index = retrieval.Index.open(str(runs["index"] / "index"))
    assert len(index) == len(kept) and index.meta.kind == "exact"
    quality = json.loads((runs["index"] / "summary.json").read_text())["retrieval"]
    assert quality["k"] == runs["config"].index.eval_k and quality["queries"] == len(kept)
    assert 0 <= quality["precision"] <= 1 and 0 <= quality["recall"] <= 1
    first = np.asarray(kept[0]["embedding"], np.float32)
    assert index.search(first, 1)[0][0].image_id == kept[0]["image_id"]


def test_each_product_is_staged_in_other_products_scenes_and_the_best_kept(runs):
    for product in runs["products"]:
        rows = [r for r in runs["staged"] if r["product_id"] == product["product_id"]]
        assert len(rows) == runs["config"].stage.top_k
        assert all(r["scene_product_id"] != product["product_id"] for r in rows)
        ranked = sorted((r for r in rows if r["rank"]), key=lambda r: r["rank"])
        assert [r["kept"] for r in ranked] == [True] * runs["config"].stage.keep + [False] * (
            len(ranked) - runs["config"].stage.keep
        )
        assert ranked[0]["score"] >= ranked[-1]["score"]
        for r in rows:
            assert (r["image_uri"] is not None) == r["kept"]
            assert (r["width"], r["height"]) == staged_size(
                *Image.open(r["scene_uri"]).size, runs["config"].stage.size
            )


def test_the_products_pixels_are_unchanged_inside_its_mask(runs):
    cfg = runs["config"]
    for row in _kept(runs):
        loaded, failed = load_images(
            [row["source_uri"]],
            max_megapixels=cfg.images.max_megapixels,
            max_side=cfg.images.max_side,
            min_side=cfg.images.min_side,
        )
        assert not failed
        photo = loaded[0].image.rgb
        mask = decode_mask(storage.read_bytes(row["source_mask_uri"])) > 0
        box = Box(row["place_x0"], row["place_y0"], row["place_x1"], row["place_y1"])
        layer, placed = _place_layer(
            photo, mask, Box.of(mask), Placement(row["scale"], box), (row["height"], row["width"])
        )
        staged = np.asarray(Image.open(row["image_uri"]).convert("RGB"))
        # the feathered edge blends over feather + 1 pixels; past it the alpha is 1
        inside = ndimage.distance_transform_edt(placed) >= cfg.stage.feather + 1
        assert inside.sum() > 100
        assert np.array_equal(staged[inside], layer[inside])


def test_the_product_stands_on_the_scene_products_ground_line_at_its_scale(runs):
    share = runs["config"].index.ground_share
    for row in _kept(runs):
        _, mask = _scene(runs, row)
        target, ground = Box.of(mask), ground_line(mask, share)
        placed = Box(row["place_x0"], row["place_y0"], row["place_x1"], row["place_y1"])
        assert row["ground"] == ground and placed.y1 == ground
        # fitted inside the scene product's box, aspect kept: one side matches it
        assert placed.width <= target.width + 1 and placed.height <= target.height + 1
        assert abs(placed.width - target.width) <= 1 or abs(placed.height - target.height) <= 1
        assert abs((placed.x0 + placed.x1) - (target.x0 + target.x1)) <= 2  # centred


def test_no_pixel_of_the_removed_product_survives_outside_the_new_one(runs):
    cfg = runs["config"].stage
    for row in _kept(runs):
        scene, mask = _scene(runs, row)
        grow = max(1, round(cfg.removal_dilation * min(row["width"], row["height"])))
        removed = removal_mask(mask, grow)
        staged = np.asarray(Image.open(row["image_uri"]).convert("RGB"))
        # the new product with its feathered edge and its contact shadow's reach
        product = dilate(
            (np.asarray(_alpha_of(row, runs)) > 0).astype(np.uint8) * 255, cfg.feather + 1
        )
        hole = removed & ~(product > 0)
        assert hole.sum() > 50
        same = (staged[hole] == scene[hole]).all(axis=1).mean()
        assert same < 0.02, f"{same:.1%} of the removed product's pixels survive"
        # outside the removed area the scene is the catalog photo, but for the shadow
        outside = ~dilate(removed.astype(np.uint8) * 255, 1).astype(bool) & ~(product > 0)
        close = (np.abs(staged[outside].astype(int) - scene[outside]) <= 90).all(axis=1).mean()
        assert close > 0.95


def _alpha_of(row: dict, runs) -> np.ndarray:
    """Where the product was placed (from the manifest's placement and its mask)."""
    mask = decode_mask(storage.read_bytes(row["source_mask_uri"])) > 0
    box = Box(row["place_x0"], row["place_y0"], row["place_x1"], row["place_y1"])
    _, placed = _place_layer(
        np.zeros((*mask.shape, 3), np.uint8),
        mask,
        Box.of(mask),
        Placement(row["scale"], box),
        (row["height"], row["width"]),
    )
    return placed


def test_each_kept_image_has_a_clip_with_the_requested_frame_count(runs):
    animation = runs["config"].stage.animation
    for row in _kept(runs):
        assert [u.rsplit(".", 1)[1] for u in row["clip_uris"]] == animation.formats
        for uri in row["clip_uris"]:
            info = parallax.probe(uri, uri.rsplit(".", 1)[1])
            assert info.frames == animation.frames
            assert (info.width, info.height) == (row["width"], row["height"])


def test_a_sigkill_loses_nothing_and_a_rerun_skips_finished_products(runs):
    out, n = runs["out"], len(runs["products"])
    assert runs["done_at_kill"] < n, "the run finished before it could be killed"
    assert f"already complete: {runs['done_at_kill']}" in runs["resumed"], runs["resumed"][-2000:]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["products"]["ok"] + saved["products"]["partial"] == n
    staged = runs["staged"]
    assert len({(r["product_id"], r["stage_id"]) for r in staged}) == len(staged)
    assert {r["product_id"] for r in staged} == {p["product_id"] for p in runs["products"]}
    files = {str(p) for p in (out / "images").rglob("s*.png")}
    assert files == {r["image_uri"] for r in staged if r["kept"]}  # nothing lost, no orphan
    stamps = {p: os.stat(p).st_mtime_ns for p in files}
    again = subprocess.run(runs["cmd"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already complete: {n}" in again.stdout, again.stdout[-2000:]
    assert {p: os.stat(p).st_mtime_ns for p in files} == stamps, "a finished image was rewritten"


def test_stage_refuses_a_folder_that_is_not_an_index(tmp_path):
    done = subprocess.run(
        [
            *(RESTAGE, "stage", "--manifest", str(EXAMPLES / "products.jsonl")),
            *("--index", str(tmp_path), "--out", str(tmp_path / "out"), "--profile", "tiny"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "index.json" in done.stderr and "restage index" in done.stderr


def test_train_inpainter_writes_a_lora_that_staging_paints_with(runs, tmp_path):
    lora = tmp_path / "lora"
    done = _run(["stage", "train-inpainter", "--catalog", str(runs["index"]), "--out", str(lora)])
    assert "stage.inpainter_lora=" in done.stdout
    info = json.loads((lora / "inpaint_lora.json").read_text())
    assert info["steps"] == runs["config"].stage.train_inpainter.steps
    assert info["config"]["weighting"] is True and info["train_scenes"] >= 2
    # The stage job's compose stage with and without it: the same scene, other paint.
    from pipelines.stage import Compose

    scene = next(s for s in runs["scenes"] if s["kept"])
    rgb = resize(np.asarray(Image.open(scene["scene_uri"]).convert("RGB")), (64, 64))
    hole = resize(decode_mask(storage.read_bytes(scene["mask_uri"])), (64, 64), mask=True) > 0
    hole[24:40, 24:40] = True
    base = Compose(runs["config"]).paint([rgb], [hole], [7])[0][0]
    tuned = runs["config"].model_copy(
        update={"stage": runs["config"].stage.model_copy(update={"inpainter_lora": str(lora)})}
    )
    painted = Compose(tuned).paint([rgb], [hole], [7])[0][0]
    assert np.abs(painted.astype(int) - base.astype(int)).mean() > 0.5
