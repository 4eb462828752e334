"""Shared fixtures: an isolated restage cache, the tiny config, a small local Ray cluster
for the modules that need one, and the real product photos when
``../shared/data/dreambooth`` is present."""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from pathlib import Path

import pytest

# Under `-n N` each worker gets its share of the cores for its own math (torch's and
# OpenBLAS's thread pools), set before anything imports them: with a thread per core in
# every worker, N workers oversubscribe N cores and OpenMP's spinning threads burn the time
# the others need (the fast subset on 2 workers, 2 cores: 436 and 484 s, against 256 and
# 249 s with a thread each). The jobs a test starts inherit it; Ray gives its workers a
# thread per CPU they hold anyway. A value the user set is kept.
if _workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH = ROOT.parent / "shared" / "data" / "dreambooth"
EXAMPLES = ROOT / "examples"


# Fixtures that start Ray, a `restage` job or the server: a test using one is end to end.
END_TO_END_FIXTURES = {"ray_local", "quickstart", "server"}


# The modules that use the quick start's run (a session fixture of minutes): on parallel
# workers they are one group, so that it runs once (test_workers checks the list).
QUICKSTART_MODULES = {"tests/test_evaluate.py", "tests/test_readme.py", "tests/test_serve.py"}


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
    _RAY_LOCAL_MODULES.update(module_of(item) for item in items if uses_ray_local(item))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _longest_groups_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def worker_group(nodeid: str) -> str:
    """The tests that one parallel worker runs together: a module's, so that its module-scoped
    fixtures (a Ray, a job's run) start once, or those of ``QUICKSTART_MODULES``."""
    module = nodeid.split("::")[0]
    return "quickstart" if module in QUICKSTART_MODULES else module


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `-n N` (README: `-n 2`), pytest-xdist hands out whole ``worker_group``s, in the
    order of the workers' collection (``_longest_groups_first``; pyproject turns off xdist's
    own reorder by number of tests). Its `--dist loadgroup` would do this with marks, but it
    renames the test ids to carry them, which pytest 9 no longer lets it do."""
    if config.getvalue("dist") != "load":  # another mode, asked for by name
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return GroupScheduling(config, log)


def _longest_groups_first(items) -> None:
    """Orders a worker's collection by group: first the groups that use ``ray_local``, so
    that on a worker they follow one another and share its Ray, then the others; in each
    part the groups with the most end-to-end tests first (one of minutes handed out last
    would leave the other worker idle at the end). A stable sort: a module's tests keep
    their order."""
    groups = [worker_group(item.nodeid) for item in items]
    slow = collections.Counter(
        g for g, item in zip(groups, items, strict=True) if "slow" in item.keywords
    )
    ray = {g for g, item in zip(groups, items, strict=True) if uses_ray_local(item)}
    first = {g: i for i, g in reversed(list(enumerate(groups)))}
    order = sorted(
        range(len(items)),
        key=lambda i: (groups[i] not in ray, -slow[groups[i]], first[groups[i]]),
    )
    items[:] = [items[i] for i in order]


def uses_ray_local(item) -> bool:
    return "ray_local" in getattr(item, "fixturenames", ())


def module_of(item) -> str:
    return item.nodeid.split("::")[0]


def shared_path(tmp_path_factory, name: str) -> Path:
    """``name`` under this run's base temp folder, which pytest-xdist's workers share (each
    has a folder of its own under it); a lock around its making is the caller's."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session", autouse=True)
def restage_cache(tmp_path_factory) -> Path:
    """Tiny checkpoints are built once per run into a private cache (or a reused one), which
    parallel workers share (the builds take a lock each, as a cluster's processes do)."""
    cache = Path(os.environ.get("RESTAGE_TEST_CACHE") or shared_path(tmp_path_factory, "cache"))
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["RESTAGE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_config():
    from ray_app.config import load_config

    return load_config("tiny")


# The GCS address of the Ray that ``ray_local`` started in this test process, and the
# modules of the collection that use it.
_RAY_LOCAL: dict[str, str] = {}
_RAY_LOCAL_MODULES: set[str] = set()


def _ray_local_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(
        ray is not None
        and ray.is_initialized()
        and ray.get_runtime_context().gcs_address == _RAY_LOCAL.get("gcs")
    )


@pytest.fixture(scope="module")
def ray_local():
    """A small local Ray (the tiny profile's, without a dashboard) for the tests of a module;
    its workers' state API asks it alone, whatever other Rays run on the machine (a parallel
    worker's, test_runtime's). Modules that run one after another share it (each start is
    seconds of CPU: its daemons, Ray Data's and Train's actors), and it stops when its
    module ends unless the next module uses it too (an idle Ray still costs CPU:
    ``pytest_runtest_teardown``). A module whose actors still hold CPUs at its end gets
    the next one a fresh Ray (a leak must not starve the next module's jobs forever)."""
    import ray

    from ray_app import runtime
    from ray_app.config import load_config

    if not _ray_local_running():
        if ray.is_initialized():  # another test's own Ray
            ray.shutdown()
        runtime.init_ray(load_config("tiny", overrides=["ray.progress_bars=false"]))
        _RAY_LOCAL["gcs"] = ray.get_runtime_context().gcs_address
    yield ray
    if ray.is_initialized() and not _all_cpus_free(ray):
        ray.shutdown()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stops ``ray_local``'s Ray after the last test of a module, unless the next module
    uses it. (Never within a module: its fixture value would outlive its Ray.)"""
    if nextitem is not None and (
        module_of(nextitem) == module_of(item) or module_of(nextitem) in _RAY_LOCAL_MODULES
    ):
        return
    if _ray_local_running():
        sys.modules["ray"].shutdown()


def _all_cpus_free(ray, wait_s: float = 10.0) -> bool:
    """Whether every CPU of the Ray is free within ``wait_s`` (a job's actors take a moment
    to exit after it returns)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        total = ray.cluster_resources().get("CPU", 0)
        if ray.available_resources().get("CPU", 0) >= total:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> str:
    """Adapters of the products of ``trainset.PRODUCTS``, trained on one worker without Ray
    (the train job's own code), for the tests of generation and serving: once per run, which
    parallel workers share."""
    import shutil

    from filelock import FileLock
    from trainset import PRODUCTS, write_training_set

    from pipelines.train import ShardTrainer
    from ray_app.config import load_config
    from ray_app.storage import AdapterLayout

    root = shared_path(tmp_path_factory, "trained")
    out = str(root / "adapters")
    with FileLock(f"{root}.lock"):
        if AdapterLayout(out).completed() != set(PRODUCTS):
            shutil.rmtree(root, ignore_errors=True)  # what a killed worker left, if any
            data = write_training_set(str(root / "aug"))
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


def kill_marked(marker: dict[str, str]) -> int:
    """SIGKILL every process whose environment holds ``marker`` (one NAME: VALUE) -> how many
    were killed. Started with the marker in its environment, a job passes it to every process
    of its own local Ray, however re-parented; no other process has it, so this never kills
    the test session's own Ray nor another session's (the Ray processes that appeared since
    the job started may include another session's). Until none is left: a raylet killed
    mid-spawn may leave a worker that was not yet listed."""
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
