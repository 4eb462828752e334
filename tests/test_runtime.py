"""Connecting a job to Ray (`ray_app.runtime`): mostly the parts that need no running Ray."""

from __future__ import annotations

import pytest
import ray

from ray_app import runtime
from ray_app.config import load_config


def test_workers_get_the_offline_flags_and_the_cache():
    cfg = load_config("tiny")
    env = runtime.worker_env(cfg)
    assert env["RESTAGE_CACHE"] == str(cfg.cache_path)
    assert env["HF_HUB_OFFLINE"] == "1"  # the tiny profile never touches the network


def test_a_local_ray_starts_no_preemption_watcher_unless_the_user_asks(monkeypatch):
    cfg = load_config("tiny")
    monkeypatch.delenv(runtime.PREEMPTION_WATCHER_ENV, raising=False)
    assert runtime.PREEMPTION_WATCHER_ENV not in runtime.worker_env(cfg)  # a cluster's: Ray's
    assert runtime.worker_env(cfg, local=True)[runtime.PREEMPTION_WATCHER_ENV] == "0"
    monkeypatch.setenv(runtime.PREEMPTION_WATCHER_ENV, "1")
    assert runtime.worker_env(cfg, local=True)[runtime.PREEMPTION_WATCHER_ENV] == "1"


@pytest.mark.parametrize(("profile", "dashboard"), [("tiny", False), ("default", True)])
def test_the_tiny_profiles_local_ray_starts_without_the_dashboard(monkeypatch, profile, dashboard):
    """The dashboard head's modules cost a small machine ~2 s of every job's start; the tiny
    profile leaves them out, and `--set ray.dashboard=true` brings them back."""
    started = {}

    class Started(Exception):
        pass

    def init(**kwargs):
        started.update(kwargs)
        raise Started

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for overrides, expected in (([], dashboard), (["ray.dashboard=true"], True)):
        with pytest.raises(Started):
            runtime.init_ray(load_config(profile, overrides=overrides))
        assert started["include_dashboard"] is expected
        assert started["address"] == "local"  # never a `ray start` cluster found in /tmp/ray
        # Its workers' state API asks this Ray (test_a_workers_state_api_asks_its_own_ray...).
        url = started["runtime_env"]["env_vars"][runtime.API_SERVER_ENV]
        assert url == f"http://127.0.0.1:{started['dashboard_port']}"
    monkeypatch.setenv(runtime.API_SERVER_ENV, "http://10.0.0.9:8265")  # the user's, inherited
    started.clear()
    with pytest.raises(Started):
        runtime.init_ray(load_config(profile))
    assert "dashboard_port" not in started
    assert runtime.API_SERVER_ENV not in started["runtime_env"]["env_vars"]


@pytest.mark.slow
def test_a_local_ray_never_joins_a_cluster_that_ray_start_recorded():
    """`ray start` records its address in Ray's temp dir, where a bare ray.init() finds it,
    joins that cluster and then refuses the profile's num_cpus: a job without ray.address
    starts a Ray of its own instead."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # Ray's socket paths are short
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # a cluster that was
    code = (
        "import ray\n"
        "from ray_app import runtime\n"
        "from ray_app.config import load_config\n"
        "info = runtime.init_ray(load_config('tiny'))\n"
        "print(info['mode'], ray.cluster_resources()['CPU'])\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "RAY_TMPDIR": str(temp)}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["local", "4.0"]


# Another Ray on the machine, with a dashboard, recorded as `ray start` records its cluster
# (where a bare ray.init() or the state API looks first); it runs until its stdin closes.
OTHER_RAY = """
import sys, ray
from ray._private.utils import write_ray_address
ctx = ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_port=int(sys.argv[1]))
write_ray_address(ctx.address_info["gcs_address"])
print("ready", flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture(scope="module")
def another_ray():
    """(dashboard address, Ray temp dir) of another Ray on the machine, recorded in that
    temp dir (not in /tmp/ray: a parallel test's bare ray.init() would join it)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from servers import free_port

    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Ray's socket paths are short
    env = {**os.environ, "RAY_TMPDIR": temp}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_RAY, str(port)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = iter(other.stdout.readline, "")
        assert any(line.strip() == "ready" for line in lines), "the other Ray did not start"
        yield f"http://127.0.0.1:{port}", temp
    finally:
        other.stdin.close()
        other.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("dashboard", [False, True])
def test_a_workers_state_api_asks_its_own_ray_not_another_on_the_machine(
    another_ray, dashboard, monkeypatch
):
    """Ray Train's placement-group cleaner asks the state API, from a worker, whether its
    run's controller is alive. Without an address the state API looks for a Ray on the
    machine: another job's dashboard said there was no such actor, and the cleaner removed a
    live run's placement group. A local Ray's workers ask its own API server: its dashboard,
    or without one a port where nothing listens (the cleaner keeps watching)."""
    import time

    @ray.remote
    def alive(actor_id: str) -> bool | str:
        from ray.train.v2._internal.state.util import is_actor_alive
        from ray.util.state.exception import RayStateApiException

        try:
            return is_actor_alive(actor_id, timeout=10)
        except RayStateApiException:
            return "unavailable"

    @ray.remote(num_cpus=0)
    class Controller:
        def id(self) -> str:
            return ray.get_runtime_context().get_actor_id()

    other_dashboard, temp = another_ray
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_TMPDIR", temp)  # where this Ray's workers find the other recorded
    overrides = ["ray.progress_bars=false", f"ray.dashboard={str(dashboard).lower()}"]
    info = runtime.init_ray(load_config("tiny", overrides=overrides))
    try:
        controller = Controller.remote()
        actor_id = ray.get(controller.id.remote())
        answer = ray.get(alive.remote(actor_id))
        deadline = time.monotonic() + 60
        while dashboard and answer == "unavailable" and time.monotonic() < deadline:
            time.sleep(1)  # the dashboard's head starts after ray.init returns
            answer = ray.get(alive.remote(actor_id))
        # Before: None ("no such actor"), from the other Ray's dashboard (where nothing is
        # recorded: a ConnectionError, several Rays on the machine).
        assert answer == (True if dashboard else "unavailable")
        assert info.get("dashboard") != other_dashboard
    finally:
        ray.shutdown()


def test_role_resources_come_from_the_roles_spec():
    cfg = load_config("tiny", overrides=["clip.min_actors=1", "clip.max_actors=3"])
    res = runtime.role_resources(cfg, "clip")
    assert isinstance(res["compute"], ray.data.ActorPoolStrategy)
    assert (res["compute"].min_size, res["compute"].max_size) == (1, 3)
    assert (
        res["num_gpus"] == cfg.role("clip").num_gpus
        and res["num_cpus"] == cfg.role("clip").num_cpus
    )


def test_a_role_without_a_cap_gets_a_pool_that_grows_with_the_cluster():
    """max_actors null (the default profile's pools): Ray Data's autoscaler may grow the pool
    to whatever the cluster grants it."""
    cfg = load_config("tiny", overrides=["clip.min_actors=2", "clip.max_actors=null"])
    compute = runtime.role_resources(cfg, "clip")["compute"]
    assert (compute.min_size, compute.max_size) == (2, float("inf"))
    assert load_config("default").inpainter.max_actors is None


def test_the_environment_is_set_without_importing_the_model_libraries():
    """A job's driver loads no model: quieting diffusers and transformers there imported them
    (~2 s of CPU per job). They stay unimported, and read the quiet settings when imported."""
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        "from ray_app.models import apply_environment\n"
        "apply_environment(offline=True)\n"
        "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))\n"
        "from diffusers.utils import logging as d\n"
        "from transformers.utils import logging as t\n"
        "print(d.get_verbosity() == t.get_verbosity() == logging.ERROR)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["[]", "True"], out


@pytest.mark.parametrize(
    "module",
    [
        f"pipelines.{m}"
        for m in ("augment", "generate", "train", "stage", "index", "evaluate", "personalize")
    ],
)
def test_the_jobs_task_modules_import_no_model_library(module):
    """Ray Data runs a job's decode, select and write functions as tasks, in worker
    processes that import the functions' module: with torch in it, each new worker spent
    ~1.2 s of CPU importing it (3 to 7 s of an augment job on 2 cores, beside the actors'
    own loads). The model libraries load in the stages' actors."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'peft', 'open_clip', 'actors')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]"], out.stdout


def test_a_bad_footer_readers_variable_is_refused_before_ray_starts(monkeypatch):
    from ray_app.config import ConfigError

    monkeypatch.setattr(ray, "init", lambda **_: (_ for _ in ()).throw(AssertionError("started")))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for bad in ("abc", "0", "-2", ""):
        monkeypatch.setenv(runtime.FOOTER_READERS_ENV, bad)
        try:
            runtime.init_ray(load_config("tiny"))
        except ConfigError as exc:
            assert f"{runtime.FOOTER_READERS_ENV}={bad!r}" in str(exc) and "unset it" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")
    monkeypatch.setenv(runtime.FOOTER_READERS_ENV, "3")
    runtime.check_footer_readers()  # a positive integer is the user's to choose
