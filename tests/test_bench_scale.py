"""bench/scale.py's argument checks, its growth bars and its procedural catalog (no Ray)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT))  # bench/ is scripts, not an installed package
from bench import scale


@pytest.mark.parametrize(
    ("sizes", "jobs", "sample_s", "side", "names"),
    [
        ([], ["augment"], 0.5, 32, "--sizes"),
        ([0, 10], ["augment"], 0.5, 32, "--sizes"),
        ([10000, 1000], ["augment"], 0.5, 32, "increasing order"),
        ([1000, 1000], ["augment"], 0.5, 32, "distinct"),
        ([1000], ["augment", "serve"], 0.5, 32, "--jobs ['serve']"),
        ([1000], ["train", "augment"], 0.5, 32, "in the order"),
        ([1000], ["train", "generate"], 0.5, 32, "start with augment"),
        ([1000], ["augment"], 0.0, 32, "--sample-s"),
        ([1000], ["augment"], 0.5, 8, "--image-side"),
    ],
)
def test_bad_arguments_are_named(sizes, jobs, sample_s, side, names):
    with pytest.raises(ValueError, match=names.replace("[", r"\[").replace("]", r"\]")):
        scale.check_args(sizes, jobs, sample_s, side)


def test_good_arguments_pass():
    scale.check_args([1000, 10000], ["augment", "train", "generate"], 0.5, 32)
    scale.check_args([10], ["augment", "generate"], 1.0, 16)


def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        scale.main(["--sizes", "100", "10", "--work", str(tmp_path / "w")])
    assert exc.value.code == 2
    assert "increasing order" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_growth_and_the_bars():
    assert scale.growth(100.0, 110.0) == pytest.approx(0.10)
    assert scale.growth(2.0, 1.0) == pytest.approx(-0.5)
    job = {"exit_status": 0, "object_store_peak_mib": 10.0}
    small = {
        "products": 10,
        "jobs": {"augment": {**job, "driver_peak_rss_mib": 100.0, "seconds_per_product": 1.0}},
    }
    ok = {
        "products": 100,
        "jobs": {"augment": {**job, "driver_peak_rss_mib": 109.0, "seconds_per_product": 0.9}},
    }
    bad = {
        "products": 100,
        "jobs": {"augment": {**job, "driver_peak_rss_mib": 111.0, "seconds_per_product": 1.1}},
    }
    got = scale.compare(small, ok)["augment"]
    assert got["driver_rss_ok"] and got["seconds_per_product_ok"]
    got = scale.compare(small, bad)["augment"]
    assert not got["driver_rss_ok"] and not got["seconds_per_product_ok"]
    failed = {
        "products": 100,
        "jobs": {
            "augment": {
                **job,
                "exit_status": 1,
                "driver_peak_rss_mib": 1.0,
                "seconds_per_product": 1.0,
            }
        },
    }
    assert scale.compare(small, failed) == {}


def test_catalog_is_procedural_and_valid(tmp_path):
    manifest = scale.write_catalog(5, tmp_path, 32)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["product_id"] for r in rows] == [scale.product_id(i) for i in range(5)]
    first = np.asarray(Image.open(tmp_path / rows[0]["image_uris"][0]))
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, scale.product_photo(0, 32))
    assert not np.array_equal(first, scale.product_photo(1, 32))
    # The product differs from the plain border, so segmentation finds it.
    assert (first != first[0, 0]).any(axis=-1).sum() >= (32 // 3) ** 2


def test_first_marker(tmp_path):
    assert not scale.first_marker(tmp_path, "augment")
    (tmp_path / "_done").mkdir()
    assert not scale.first_marker(tmp_path, "augment")
    (tmp_path / "_done" / "p0000000.json").write_text("{}")
    assert scale.first_marker(tmp_path, "augment")
    assert scale.completed(tmp_path, "augment") == 1
    adapters = tmp_path / "adapters"
    (adapters / "_errors").mkdir(parents=True)
    (adapters / "p0000000").mkdir()
    assert not scale.first_marker(adapters, "train")
    (adapters / "p0000000" / "adapter.json").write_text("{}")
    assert scale.first_marker(adapters, "train")
    assert scale.completed(adapters, "train") == 1


def test_a_size_run_alone_is_compared_with_the_smallest_before_it(tmp_path):
    for n in (1000, 100, 10000):
        scale.result_path(tmp_path, n).write_text(json.dumps({"benchmark": "scale", "products": n}))
    assert scale.smallest_result(tmp_path, 10000)["products"] == 100
    assert scale.smallest_result(tmp_path, 1000)["products"] == 100
    assert scale.smallest_result(tmp_path, 100) is None


def test_steady_rate_leaves_out_the_start_and_the_tail():
    # 100 s of start-up, then 10 products/s, then a slow tail.
    samples = [(0.0, 0), (100.0, 0), (110.0, 100), (190.0, 900), (300.0, 1000)]
    assert scale.steady_rate(samples, 1000) == pytest.approx(10.0)
    assert scale.steady_rate([(1.0, 5)], 1000) is None


def test_steady_rate_from_the_jobs_progress_lines():
    log = "\n".join(
        [
            "restage augment: 1000 products to do",
            "restage augment: 16/1000 products (ok 16), 126s",
            "restage augment: 272/1000 products (ok 272), 219s",
            "restage augment: 640/1000 products (ok 640), 379s",
            "restage augment: 832/1000 products (ok 832), 410s",
            "restage augment: done: 1000/1000 products (ok 1000), 452s",
        ]
    )
    assert scale.steady_rate_from_log(log) == pytest.approx((1000 - 272) / (452 - 219))
    assert scale.steady_rate_from_log("restage train: 3 products to do") is None


def test_steady_rate_from_the_markers_times(tmp_path):
    done = tmp_path / "_done"
    done.mkdir()
    for i in range(10):
        marker = done / f"{scale.product_id(i)}.json"
        marker.write_text("{}")
        os.utime(marker, (1000.0 + 2 * i, 1000.0 + 2 * i))  # one product every 2 s
    times = scale.marker_times(tmp_path, "augment")
    assert times == [1000.0 + 2 * i for i in range(10)]
    assert scale.steady_rate_from_markers(times) == pytest.approx(0.5)


def test_the_overlay_loads_over_tiny_at_the_smallest_sizes():
    from ray_app.config import load_config

    cfg = load_config("tiny", files=[str(scale.OVERLAY)])
    a = cfg.augment
    assert not a.views.enabled and a.contexts.per_image == 0
    assert (a.negatives.steps, cfg.train.steps, cfg.generate.steps) == (1, 1, 1)
    assert cfg.generate.prompts_per_product * cfg.generate.images_per_prompt == 1
    assert cfg.images.max_side == 32
