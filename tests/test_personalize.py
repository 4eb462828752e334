"""`restage personalize` (pipelines/personalize.py) on a local Ray: encoders for the products
of an augment output, killed with SIGKILL after the first product and resumed, a folder
plain peft loads, and a product too small to train recorded as an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, kill_after_first_marker
from trainset import PRODUCTS, write_training_set

from ray_app import storage
from ray_app.config import load_config, with_overrides
from ray_app.images import encode_png
from ray_app.storage import EncoderLayout

THREE = {**PRODUCTS, "vase-green-03": ("vase", "a green vase", (40, 200, 60))}
COMMON = ["--profile", "tiny", "--set", "ray.progress_bars=false"]


def _cmd(data: Path, out: Path) -> list[str]:
    exe = [sys.executable, "-m", "ray_app.cli"]
    return [*exe, "personalize", "--data", str(data), "--out", str(out), *COMMON]


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_the_rest_and_leaves_the_done_untouched(tmp_path):
    data, out = tmp_path / "aug", tmp_path / "enc"
    write_training_set(str(data), THREE)
    done = kill_after_first_marker(_cmd(data, out), out, tmp_path / "killed.log")
    assert 1 <= done < len(THREE), f"{done} products were done at the kill: nothing to resume"
    finished = sorted(p.stem for p in (out / "_done").glob("*.json"))
    before = {pid: _files(out / pid) for pid in finished}
    marks = {pid: (out / "_done" / f"{pid}.json").stat().st_mtime_ns for pid in finished}

    proc = subprocess.run(_cmd(data, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"already complete: {len(finished)}" in proc.stdout
    for pid in finished:  # the products done before the kill: not one file rewritten
        assert _files(out / pid) == before[pid]
        assert (out / "_done" / f"{pid}.json").stat().st_mtime_ns == marks[pid]
    summary = storage.read_json(str(out / EncoderLayout.SUMMARY))
    assert summary["products"]["ok"] == len(THREE) and summary["products"]["failed"] == 0

    manifest = pq.read_table(out / "_manifest").to_pylist()
    assert sorted(r["product_id"] for r in manifest) == sorted(THREE)
    count = load_config("tiny").personalize.cut_paste.count
    for row in manifest:
        # 6 positives (3 real, 3 contexts) and the composites on the other products' scenes,
        # 3 in-class negatives, the other 2 products' reals
        got = (row["positives"], row["negatives"], row["hard_negatives"], row["cut_paste"])
        assert got == (6 + count, 3, 6, count)
        assert row["loss_last"] < row["loss_first"], row
        assert set(_files(Path(row["encoder_uri"]))) == {
            EncoderLayout.PEFT_CONFIG,
            EncoderLayout.WEIGHTS,
            EncoderLayout.METADATA,
        }


def test_a_folder_loads_with_plain_peft_and_gives_the_trainers_features(tmp_path, tiny_config):
    from peft import PeftModel
    from transformers import AutoModel

    from actors.encoder_trainer import EncoderTrainer, pooled_features

    trainer = EncoderTrainer(tiny_config.model_spec("encoder"), tiny_config.personalize)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    result = trainer.train(imgs[:3], imgs[3:], seed=1)
    folder = str(tmp_path / "p")
    trainer.save(folder, trainer.meta("p", result))
    ours = trainer.embed(imgs)

    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(trainer.loaded.resolved), folder)
    pixels = trainer._pixels([np.asarray(i) for i in imgs])
    with __import__("torch").inference_mode():
        hidden = plain(pixel_values=pixels).last_hidden_state
    theirs = pooled_features(hidden, tiny_config.personalize.feature).numpy()
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    assert np.allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_a_product_too_small_to_train_is_an_error_row_and_the_others_train(
    tmp_path, ray_local, tiny_config
):
    from pipelines.personalize import personalize

    data, out = tmp_path / "aug", tmp_path / "enc"
    write_training_set(str(data), PRODUCTS)
    one = {"cup-white-09": ("cup", "a white cup", (240, 240, 240))}
    write_training_set(str(data), one, reals=1, contexts=0)
    scenes = tmp_path / "scenes"  # a folder of scenes: every composite is pasted on one
    scenes.mkdir()
    for k in range(3):
        (scenes / f"s{k}.png").write_bytes(encode_png(np.full((80, 96, 3), 10 * k, np.uint8)))
    (scenes / "notes.txt").write_text("not an image")
    config = with_overrides(tiny_config, [f"personalize.cut_paste.backgrounds={scenes}"])
    summary = personalize(config, str(data), str(out))
    assert summary.products["ok"] == len(PRODUCTS) and summary.products["failed"] == 1
    assert summary.extra["cut_paste_backgrounds"] == 3
    for row in pq.read_table(out / "_manifest").to_pylist():
        assert row["cut_paste"] == config.personalize.cut_paste.count
    errors = pq.read_table(out / "_errors").to_pylist()
    assert [e["product_id"] for e in errors] == ["cup-white-09"]
    assert "personalize.min_positives=2" in errors[0]["reason"]
    assert (
        not (out / "cup-white-09").exists() and not (out / "_done" / "cup-white-09.json").exists()
    )
    assert sorted(p.stem for p in (out / "_done").glob("*.json")) == sorted(PRODUCTS)
