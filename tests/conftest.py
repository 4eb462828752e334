"""Shared fixtures: an isolated restage cache, the tiny config, a small local Ray cluster
per module, and the real product photos when ``../shared/data/dreambooth`` is present."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH = ROOT.parent / "shared" / "data" / "dreambooth"
EXAMPLES = ROOT / "examples"


# Fixtures that start Ray, a `restage` job or the server: a test using one is end to end.
END_TO_END_FIXTURES = {"ray_local", "quickstart", "server"}


def pytest_collection_modifyitems(config, items):
    """Every end-to-end test is marked `slow` (so that `-m "not slow"` stays fast), and `gpu`
    tests run only where CUDA is (not with `-m` in addopts, which `-m "not slow"` replaces)."""
    import torch

    unmarked = [
        item.nodeid
        for item in items
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ()))
        and "slow" not in item.keywords
    ]
    if unmarked:
        raise pytest.UsageError(
            "end-to-end tests must be marked @pytest.mark.slow: " + ", ".join(unmarked)
        )
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def restage_cache(tmp_path_factory) -> Path:
    """Tiny checkpoints are built once per session into a private cache (or a reused one)."""
    cache = Path(os.environ.get("RESTAGE_TEST_CACHE") or tmp_path_factory.mktemp("restage-cache"))
    os.environ["RESTAGE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_config():
    from ray_app.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="module")
def ray_local(request):
    """A small local Ray (the tiny profile's) shared by the tests of one module, with the
    module's ``RAY_LOCAL_OVERRIDES`` if it has them (e.g. the dashboard, for Ray's state API)."""
    import ray

    from ray_app import runtime
    from ray_app.config import load_config

    if ray.is_initialized():
        ray.shutdown()
    overrides = ["ray.progress_bars=false", *getattr(request.module, "RAY_LOCAL_OVERRIDES", ())]
    runtime.init_ray(load_config("tiny", overrides=overrides))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> str:
    """Adapters of the products of ``trainset.PRODUCTS``, trained on one worker without Ray
    (the train job's own code), for the tests of generation and serving."""
    from trainset import PRODUCTS, write_training_set

    from pipelines.train import ShardTrainer
    from ray_app.config import load_config
    from ray_app.storage import AdapterLayout

    root = tmp_path_factory.mktemp("trained")
    data = write_training_set(str(root / "aug"))
    out = str(root / "adapters")
    ShardTrainer(load_config("tiny"), data, out, None).run(sorted(PRODUCTS))
    assert AdapterLayout(out).completed() == set(PRODUCTS)
    return out


@pytest.fixture(scope="session")
def dreambooth() -> Path:
    if not (DREAMBOOTH / "products.jsonl").exists():
        pytest.skip(
            f"real product photos not found at {DREAMBOOTH} (see ../shared/data/dreambooth/README.md)"
        )
    return DREAMBOOTH


def readme_command(name: str) -> str:
    """The command of the README's ``<!-- command: NAME -->`` block."""
    import re

    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- command: {name} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert match, f"README has no `<!-- command: {name} -->` block"
    return match.group(1).strip()


@pytest.fixture(scope="session")
def user_dir(tmp_path_factory) -> Path:
    """A folder that looks like the repository root to the README's commands: the examples,
    and `.venv` pointing at the environment running the tests."""
    import sys

    folder = tmp_path_factory.mktemp("user")
    (folder / "examples").symlink_to(EXAMPLES)
    (folder / ".venv").symlink_to(sys.prefix)
    return folder


@pytest.fixture(scope="session")
def quickstart(user_dir):
    """The README's quick start, run once exactly as written (a subprocess)."""
    import subprocess

    proc = subprocess.run(
        ["bash", "-c", readme_command("quickstart")],
        cwd=user_dir,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return proc, user_dir / "runs" / "quickstart"


def ray_pids() -> set[int]:
    """Process ids of Ray's own processes on this machine (to clean up after a killed job)."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    markers = ("raylet", "gcs_server", "ray::", "default_worker", "ray/dashboard")
    return {int(line.split()[0]) for line in out.splitlines() if any(k in line for k in markers)}


def kill_marked(marker: dict[str, str]) -> int:
    """SIGKILL every process whose environment holds ``marker`` (one NAME: VALUE) -> how many
    were killed. Started with the marker in its environment, a job passes it to every process
    of its own local Ray, however re-parented; no other process has it, so this never kills
    the test session's own Ray nor another session's (unlike ``ray_pids() - before``). Until
    none is left: a raylet killed mid-spawn may leave a worker that was not yet listed."""
    import time

    import psutil

    ((name, value),) = marker.items()
    killed = 0
    for _ in range(50):
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):  # gone, a zombie, or not ours to read
                if proc.environ().get(name) == value and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        if not found:
            return killed
        for proc in found:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
        time.sleep(0.2)
    raise AssertionError(f"processes marked {name}={value} are still alive after SIGKILL")


def kill_after_first_marker(cmd: list[str], out: Path, log: Path, timeout: float = 600) -> int:
    """Run ``cmd`` (a job with its own local Ray) until its first product marker appears
    under ``out/_done``, then SIGKILL it as a whole: its process group and every process of
    its Ray (``kill_marked``) -> how many products were done at the kill. Its output goes to
    ``log`` (a pipe that nobody reads would fill and stall the job)."""
    import signal
    import subprocess
    import time
    import uuid

    marker = {"RESTAGE_TEST_KILLED_RUN": uuid.uuid4().hex}  # on every process of its Ray
    with open(log, "w") as stream:
        proc = subprocess.Popen(
            cmd,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **marker},
        )
    markers = lambda: list((out / "_done").glob("*.json"))  # noqa: E731
    deadline = time.time() + timeout
    while not markers():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"no product finished in {timeout:.0f} s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(markers())
    # Ray's own processes run in their own sessions: kill the ones this run started too,
    # and only those (never the test session's Ray).
    kill_marked(marker)
    return done


def driver_never_lists_the_catalog(patch: pytest.MonkeyPatch) -> None:
    """Make every driver-side way of holding a job's catalog fail: reading the manifest
    here, listing markers or folders. Ray's workers are other processes: tasks still can."""
    from ray_app import records, storage
    from ray_app.storage import AdapterLayout, JobLayout

    def refuse(*args, **kwargs):
        raise AssertionError("the driver listed or read the whole catalog")

    patch.setattr(records, "read_manifest", refuse)
    patch.setattr(records, "_raw_rows", refuse)  # whatever name read_manifest was imported as
    list_names = storage.list_names

    def list_blocks_only(uri: str, suffix: str = "") -> list[str]:
        # Intake's tallies are one file per input block (a few hundred at any catalog
        # size: the blocks of Ray's shuffle or read), not one per product.
        if uri.rstrip("/").endswith("/_intake"):
            return list_names(uri, suffix)
        return refuse()

    patch.setattr(storage, "list_names", list_blocks_only)
    for layout in (JobLayout, AdapterLayout):
        patch.setattr(layout, "completed", refuse)
