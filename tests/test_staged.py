"""Stage-by-stage augment: the same kept samples as streaming mode, and a kill between two
stages loses nothing and redoes nothing that finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ray_app import storage
from ray_app.storage import AugmentLayout
from tests.conftest import EXAMPLES, ROOT, kill_marked

pytestmark = pytest.mark.slow
SETTINGS = [
    "ray.progress_bars=false",
    "augment.views.enabled=false",
    # The manifest reaches the example photos through a symlink out of its own folder, which
    # the source policy refuses unless the photos' real folder is allowed.
    f"storage.allowed_sources=[{EXAMPLES / 'products'}]",
]


def two_products(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "products").symlink_to(EXAMPLES / "products")
    manifest = folder / "m.jsonl"
    manifest.write_text(
        "\n".join((EXAMPLES / "products.jsonl").read_text().splitlines()[:2]) + "\n"
    )
    return manifest


def kept(out: Path) -> list[tuple]:
    table = storage.read_parquet(AugmentLayout(str(out)).manifest_dir()).to_pylist()
    cols = ("product_id", "sample_id", "kind", "kept", "drop_reason")
    return sorted(tuple(row.get(c) for c in cols) for row in table)


def augment(*args: str, out: Path, manifest: Path, **popen) -> subprocess.Popen:
    sets = [x for s in [*SETTINGS, *args] for x in ("--set", s)]
    return subprocess.Popen(
        [sys.executable, "-m", "ray_app.cli", "augment", "--profile", "tiny",
         "--manifest", str(manifest), "--out", str(out), *sets],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **popen,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> tuple[Path, Path, int]:
    """A stage-by-stage run of two products, SIGKILLed once its first stage has finished,
    then run again to the end: (manifest, out, caption rows on disk at the kill). One
    staged run serves both tests: a clean staged run would only repeat its second half."""
    folder = tmp_path_factory.mktemp("staged")
    manifest = two_products(folder)
    out = folder / "out"
    marker = {"RESTAGE_TEST_KILLED_RUN": uuid.uuid4().hex}  # on every process of its Ray
    proc = augment("ray.placement=stage", out=out, manifest=manifest, env={**os.environ, **marker})
    first = out / "_stages" / "00-caption"
    deadline = time.monotonic() + 900
    while len(list(first.glob("*.parquet"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_marked(marker)  # the killed job's own Ray, and never another session's
    at_kill = len(list(first.glob("*.parquet")))
    # The re-run feeds a product per dataset (ray.products_per_dataset): the stages' counts
    # add up over the datasets.
    finish(augment("ray.placement=stage", "ray.products_per_dataset=1", out=out, manifest=manifest))
    return manifest, out, at_kill


def test_kill_between_stages_then_rerun_loses_and_redoes_nothing(resumed_run):
    _, out, at_kill = resumed_run
    assert at_kill == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["placement"] == "stage"
    assert summary["staged"]["caption"] == 0  # the finished stage was not run again
    assert summary["staged"]["segment"] == 2  # the stages after it ran for both products
    assert summary["products"]["ok"] + summary["products"]["partial"] == 2
    assert not (out / "_stages").exists()  # spent rows removed at the end


def test_stage_by_stage_keeps_the_same_samples_as_streaming(resumed_run, tmp_path):
    """... and streaming, through a pool per model stage as on GPUs (not fused, as CPU
    stages are by default), keeps them too. (Successive datasets: the staged re-run, and
    tests/test_intake.py.)"""
    manifest, staged, _ = resumed_run
    out = tmp_path / "streaming"
    finish(augment("ray.fuse_cpu_stages=false", out=out, manifest=manifest))
    streaming = kept(out)
    assert streaming and kept(staged) == streaming
    summary = json.loads((out / "summary.json").read_text())
    assert summary["products"]["ok"] + summary["products"]["partial"] == 2
