"""`restage evaluate --bench dreambench` on two DreamBooth subjects, as the README runs it
(tiny profile): both recipes trained, generated and evaluated, the tables beside the
published figures, and the report looked at in headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.dreambench import PUBLISHED, as_user_prompts, find_subjects, prompt_lists
from tests.browser import broken_images, chromium_page
from tests.conftest import readme_command

pytestmark = pytest.mark.slow


def test_prompt_lists_are_the_benchmarks_and_fill_the_product_phrase():
    lists = prompt_lists()
    assert len(lists["object"]) == len(lists["live_subject"]) == 25
    text = as_user_prompts(lists["object"][:2])
    assert text.splitlines() == ["a {product} in the jungle", "a {product} in the snow"]
    with pytest.raises(ValueError, match="expected"):
        as_user_prompts(["a photo of {cls}"])


def test_subjects_come_from_products_jsonl_or_folders(tmp_path, dreambooth):
    found = find_subjects(str(dreambooth), 2)
    assert [s["product_id"] for s in found] == ["backpack", "berry_bowl"]
    assert all(Path(u).is_absolute() and Path(u).exists() for u in found[0]["image_uris"])
    for name, cls in (("dog6", None), ("red_cartoon", None), ("mug", "cup")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "00.jpg").write_bytes((dreambooth / "can" / "00.jpg").read_bytes())
        if cls:
            (tmp_path / name / "class.txt").write_text(cls)
    classes = {s["product_id"]: s["category"] for s in find_subjects(str(tmp_path), None)}
    assert classes == {"dog6": "dog", "red_cartoon": "cartoon", "mug": "cup"}


@pytest.fixture(scope="module")
def bench(dreambooth, tmp_path_factory) -> Path:
    """The README's DreamBench command, exactly as written, from a folder where
    `../shared/data/dreambooth` is the photos (as in this repository's checkout)."""
    base = tmp_path_factory.mktemp("bench")
    user = base / "user"
    user.mkdir()
    (user / ".venv").symlink_to(sys.prefix)
    (base / "shared" / "data").mkdir(parents=True)
    (base / "shared" / "data" / "dreambooth").symlink_to(dreambooth)
    command = readme_command("dreambench")
    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=user,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return user / command.split()[-1]


def test_dreambench_tables_both_recipes_beside_the_published_rows(bench):
    tables = json.loads((bench / "summary.json").read_text())
    assert tables["run_order"] == ["restage", "dreambooth_lora"]
    assert tables["products"] == 2
    # 2 subjects x 2 prompts x 2 images, every image written (not only the kept ones)
    assert tables["images"] == {"restage": 8, "dreambooth_lora": 8}
    for run in tables["run_order"]:
        for metric in ("dino", "clip_i", "clip_t"):
            cell = tables["overall"][run][metric]
            assert cell["n"] == 2 and cell["lo"] <= cell["mean"] <= cell["hi"]
    assert tables["published"] == PUBLISHED and tables["comparable"] is False
    assert [p["a"] for p in tables["paired"]] == ["restage"]
    images = pq.read_table(bench / "per_image.parquet").to_pylist()
    # The first 2 of the object list, with the product phrase in place of {token} {cls}
    assert {r["prompt"].endswith(("in the jungle", "in the snow")) for r in images} == {True}
    assert all("{" not in r["prompt"] for r in images)
    # The baseline trained on the photos alone; restage on its synthetic set too.
    for recipe, synthetic in (("dreambooth_lora", False), ("restage", True)):
        kinds = {
            r["kind"]
            for r in pq.read_table(
                bench / "runs" / recipe / "object" / "augment" / "manifest"
            ).to_pylist()
            if r["kept"]
        }
        assert (kinds != {"real"}) == synthetic, (recipe, kinds)


def test_the_baseline_run_is_plain_dreambooth_lora_and_loads_in_diffusers(bench):
    """The baseline recipe's run, end to end: augment made no synthetic sample (its stages
    of synthetic components took nothing in), each adapter records the recipe and trained on
    the subject's photos alone, and an adapter loads in plain diffusers."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ray_app import tiny
    from ray_app.adapter_meta import AdapterMeta
    from ray_app.config import load_config

    run = bench / "runs" / "dreambooth_lora" / "object"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == "dreambooth_lora" and not any(summary["components"].values())
    stages = json.loads((run / "augment" / "summary.json").read_text())["stages"]
    took = {s["stage"]: s["items_in"] for s in stages}
    assert took["views"] == took["inpaint"] == took["negatives"] == 0, took
    subjects = [json.loads(line) for line in (bench / "subjects.jsonl").read_text().splitlines()]
    assert len(subjects) == 2
    for subject in subjects:
        meta = AdapterMeta.read(str(run / "adapters" / subject["product_id"] / "adapter.json"))
        assert meta.recipe == "dreambooth_lora" and meta.caption_mode == "instance"
        photos = len(subject["image_uris"])
        assert meta.training_set.samples == meta.positives == photos and meta.negatives == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(
        tiny.ensure("generator", load_config("tiny").cache_path)
    )
    pipe.load_lora_weights(str(run / "adapters" / subjects[0]["product_id"]))
    lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b)


def test_dreambench_report_loads_in_a_browser_with_both_runs(bench):
    index = bench / "report" / "index.html"
    with chromium_page() as page:
        page.goto(index.as_uri())
        assert broken_images(page) == []
        text = page.inner_text("body")
        assert "restage" in text and "dreambooth_lora" in text
        assert "Published (not measured here)" in text and "0.668" in text
        page.click('a[href="products/backpack.html"]')
        assert broken_images(page) == []
        assert page.locator("img").count() >= 6 + 8  # its photos and both runs' images
