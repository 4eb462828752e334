"""What a job prints while it runs (`ray_app.progress`)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from ray_app import storage
from ray_app.config import load_config
from ray_app.progress import (
    PROGRESS_FILE,
    JobRunning,
    OutputClaim,
    ProgressFile,
    StageLines,
    counts,
    find_progress,
    finished,
    interactive,
    refuse_if_running,
    render_status,
    status_of,
)
from ray_app.runtime import progress_bars
from tests.conftest import EXAMPLES


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_compact_and_at_a_bounded_rate():
    out, clock = io.StringIO(), Clock()
    lines = StageLines("augment", 100, enabled=True, interval=30, stream=out, clock=clock)
    for done in range(1, 101):  # one product a second: 100 updates over 100 s
        clock.now = float(done)
        lines.update(done, counts({"ok": done}))
    lines.finish(counts({"ok": 100, "failed": 0}))
    printed = out.getvalue().splitlines()
    assert printed[0] == "restage augment: 100 products to do"
    assert printed[1] == "restage augment: 30/100 products (ok 30), 30s"
    assert len(printed) == 1 + 100 // 30 + 1  # start, one per 30 s, end
    assert printed[-1] == "restage augment: done: 100/100 products (ok 100), 100s"


def test_the_last_update_leaves_the_end_to_finish():
    out, clock = io.StringIO(), Clock()
    lines = StageLines("augment", 3, enabled=True, interval=30, stream=out, clock=clock)
    clock.now = 377.0
    lines.update(3, "ok 3")  # all at once, long after the start line
    lines.finish("ok 3")
    assert out.getvalue().splitlines() == [
        "restage augment: 3 products to do",
        "restage augment: done: 3/3 products (ok 3), 377s",
    ]


def test_a_total_not_yet_known_reads_as_at_least_and_a_question_mark():
    """Train's queue reads its product list as the workers ask: its lines start from the
    products found so far, and carry the total from when the queue has read the list."""
    out, clock = io.StringIO(), Clock()
    lines = StageLines(
        "train", None, enabled=True, interval=30, stream=out, clock=clock, at_least=4
    )
    clock.now = 30.0
    lines.update(2, "ok 2")
    lines.total, clock.now = 1500, 60.0
    lines.update(5, "ok 5")
    lines.total = lines.done = 1500
    lines.finish("ok 1500")
    assert out.getvalue().splitlines() == [
        "restage train: at least 4 products to do (still listing them)",
        "restage train: 2/? products (ok 2), 30s",
        "restage train: 5/1500 products (ok 5), 60s",
        "restage train: done: 1500/1500 products (ok 1500), 60s",
    ]


def test_nothing_is_printed_when_disabled():
    out = io.StringIO()
    lines = StageLines("train", 3, enabled=False, interval=0, stream=out)
    lines.update(3)
    lines.finish()
    assert out.getvalue() == ""


def test_bars_only_on_a_terminal_unless_configured(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert interactive(Tty()) and not interactive(io.StringIO())
    assert progress_bars(load_config("tiny", overrides=["ray.progress_bars=true"]))
    assert not progress_bars(load_config("tiny", overrides=["ray.progress_bars=false"]))
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not progress_bars(load_config("tiny"))  # 'auto': no terminal, no bars
    monkeypatch.setattr("sys.stderr", Tty())
    assert progress_bars(load_config("tiny"))


def test_finished_counts_every_outcome():
    assert finished({"ok": 2, "partial": 1, "failed": 1, "already complete": 5}) == 4
    assert counts({"ok": 2, "partial": 0, "failed": 1}) == "ok 2, failed 1"


# --------------------------------------------------------------------------- the live file


def _read(root) -> dict:
    return json.loads((root / PROGRESS_FILE).read_text())


def test_the_live_file_follows_the_phases_and_gives_rate_and_time_left(tmp_path):
    clock = Clock()
    clock.now = 1000.0
    with ProgressFile(str(tmp_path), "augment", heartbeat=3600, clock=clock) as progress:
        assert _read(tmp_path)["phase"] == "starting"
        progress.phase("intake")
        clock.now = 1010.0
        progress.phase("products", 40)
        clock.now = 1030.0
        progress.update(10, {"ok": 9, "failed": 1})
        assert _read(tmp_path)["done"] == 0  # counts wait for the next beat
        progress.write()
        state = _read(tmp_path)
        assert (state["phase"], state["total"], state["done"]) == ("products", 40, 10)
        assert state["per_second"] == 0.5  # 10 products in the 20 s since products began
        assert state["eta_s"] == 60.0  # 30 left at that rate
        assert state["products"] == {"ok": 9, "failed": 1}
        assert status_of(state, now=1040.0) == "running (products)"
    assert _read(tmp_path)["phase"] == "finished"


def test_products_complete_before_stay_beside_this_runs_outcomes(tmp_path):
    """A re-run's intake finds products that earlier runs finished: the live file and
    `restage status` say so (a finished job's re-run does 0/0), through later updates."""
    with ProgressFile(str(tmp_path), "generate", heartbeat=3600) as progress:
        progress.phase("intake")
        progress.found_complete(7)
        progress.phase("products", 2)
        progress.update(1, {"ok": 1})
    state = _read(tmp_path)
    assert state["products"] == {"already complete": 7, "ok": 1} and state["done"] == 1
    row = render_status([state], now=state["updated"]).splitlines()[2]
    assert "1/2" in row and "ok 1, already complete 7" in row
    with ProgressFile(str(tmp_path), "train", heartbeat=3600) as progress:
        progress.update(0, {"ok": 0, "failed": 0, "already complete": 3})  # train's queue
        progress.update(1, {"ok": 1, "failed": 0, "already complete": 4})
    assert _read(tmp_path)["products"] == {"already complete": 4, "ok": 1, "failed": 0}


def test_the_beat_rewrites_the_file_and_a_stale_one_reads_as_stopped(tmp_path):
    with ProgressFile(str(tmp_path), "generate", heartbeat=0.05) as progress:
        progress.phase("products", 3)
        progress.update(1, {"ok": 1})
        first = _read(tmp_path)["updated"]
        deadline = time.monotonic() + 10
        while _read(tmp_path)["updated"] == first or _read(tmp_path)["done"] != 1:
            assert time.monotonic() < deadline, "no beat in 10 s"
            time.sleep(0.02)
        state = _read(tmp_path)
    assert status_of(state, now=state["updated"] + 0.1) == "running (products)"
    # a driver killed mid-run leaves its last beat: three beats later, it is stopped
    assert status_of(state, now=state["updated"] + 1.0).startswith("stopped? no update for")


def test_a_failed_block_leaves_phase_failed_with_the_error(tmp_path):
    with pytest.raises(RuntimeError), ProgressFile(str(tmp_path), "index", heartbeat=3600):
        raise RuntimeError("the catalog is gone")
    state = _read(tmp_path)
    assert state["phase"] == "failed" and state["error"] == "RuntimeError: the catalog is gone"
    assert status_of(state, now=time.time() + 1e6) == "failed"  # ended: never "stopped"


def test_a_blocked_driver_polls_its_counts_and_failures_never_fail_the_job(tmp_path, caplog):
    calls = []

    def poll():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the queue is restarting")
        return 4, {"ok": 4, "failed": 0}, 7

    with ProgressFile(str(tmp_path), "train", heartbeat=3600, poll=poll) as progress:
        progress.phase("products")
        with caplog.at_level(logging.WARNING, logger="restage"):
            progress.refresh()  # the failing poll: logged, counts kept
        assert "the queue is restarting" in caplog.text
    state = _read(tmp_path)  # the last poll, at the end
    assert (state["done"], state["total"], state["products"]["ok"]) == (4, 7, 4)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with (
        caplog.at_level(logging.WARNING, logger="restage"),
        ProgressFile(str(blocked / "out"), "train", heartbeat=3600),
    ):
        pass  # the file cannot be written there: the job goes on
    assert "could not write" in caplog.text


def test_status_lists_the_jobs_of_a_run_root_oldest_first(tmp_path):
    now = time.time()
    for name, started, phase, updated in (
        ("generations", now - 50, "products", now - 400),
        ("augment", now - 300, "finished", now - 200),
        ("adapters", now - 150, "products", now - 5),
    ):
        folder = tmp_path / name
        folder.mkdir()
        state = {"job": name, "out": str(folder), "phase": phase, "started": started,
                 "updated": updated, "heartbeat_s": 30.0, "total": 10, "done": 4,
                 "products": {"ok": 4}, "per_second": 0.01, "eta_s": 600.0}  # fmt: skip
        (folder / PROGRESS_FILE).write_text(json.dumps(state))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / PROGRESS_FILE).write_text("{half")
    found = find_progress(str(tmp_path))
    assert [s["job"] for s in found] == ["?", "augment", "adapters", "generations"]
    table = render_status(found, now)
    lines = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert "finished" in lines["augment"] and "4/10" in lines["augment"]
    assert "running (products)" in lines["adapters"] and "10m" in lines["adapters"]
    assert "stopped? no update for 7m" in lines["generations"]
    assert "unreadable" in lines["?"]
    assert find_progress(str(tmp_path / "nothing-here")) == []


def test_status_command_exits_1_where_no_job_ran(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ray_app.cli", "status", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "no job has run under" in proc.stderr


def _live(folder, **fields):
    """A live file under ``folder`` as another run's driver writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"job": "augment", "out": str(folder), "phase": "products", "started": time.time(),
             "updated": time.time(), "heartbeat_s": 30.0, "host": socket.gethostname(),
             "pid": None, "total": 10, "done": 2, "products": {"ok": 2}} | fields  # fmt: skip
    (folder / PROGRESS_FILE).write_text(json.dumps(state))
    return (folder / PROGRESS_FILE).read_text()


def test_a_second_run_on_a_live_output_is_refused_and_writes_nothing(tmp_path):
    """A scheduler's retry while the first run still works on the same output would drop that
    run's intake and do its products twice: the second run is refused (exit 73), before Ray
    starts, naming the live run; a killed run's output is taken over at once."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _live(tmp_path / "out", pid=other.pid)
        with pytest.raises(JobRunning, match=f"pid {other.pid} on"):
            ProgressFile(str(tmp_path / "out"), "augment").__enter__()
        assert (tmp_path / "out" / PROGRESS_FILE).read_text() == live  # untouched
        cmd = [sys.executable, "-m", "ray_app.cli", "augment", "--profile", "tiny"]
        cmd += ["--manifest", str(EXAMPLES / "products.jsonl"), "--out", str(tmp_path / "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 73, proc.stderr[-2000:]
        assert "another `restage augment` is running on" in proc.stderr
        assert "Ray" not in proc.stderr  # refused before Ray started
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [PROGRESS_FILE]
    finally:
        other.kill()
        other.wait()
    # its driver killed: the output is free at once, without waiting for the file to age
    with ProgressFile(str(tmp_path / "out"), "augment") as progress:
        progress.phase("intake")


def _claim_in_a_child(root, ready, go, results, release):
    """One driver starting on ``root`` (a forked process), released with the others."""
    ready.wait()
    go.wait()
    try:
        ProgressFile(root, "augment", heartbeat=3600).__enter__()
        results.put("claimed")
    except JobRunning as exc:
        results.put(f"refused: {exc}")
    release.wait(60)  # the process lives, so a claim it holds stays live for the others


def test_runs_started_in_the_same_instant_on_one_output_one_claims_it(tmp_path):
    """Six drivers released together on one output: exactly one runs, the others are
    refused naming it (the interleaving that beat the live file alone is the next test)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    n = 6
    ready, go, release = ctx.Barrier(n + 1), ctx.Event(), ctx.Event()
    results = ctx.Queue()
    root = str(tmp_path / "out")
    children = [
        ctx.Process(target=_claim_in_a_child, args=(root, ready, go, results, release))
        for _ in range(n)
    ]
    for child in children:
        child.start()
    try:
        ready.wait(30)
        go.set()
        outcomes = sorted(results.get(timeout=60) for _ in range(n))
    finally:
        release.set()
        for child in children:
            child.join(30)
    assert outcomes.count("claimed") == 1, outcomes
    assert all("another `restage augment` is running on" in o for o in outcomes[1:]), outcomes
    # the winner's children are gone now: its claim is stale and the next run takes the root
    with ProgressFile(root, "augment") as progress:
        progress.phase("intake")
    assert storage.list_names(root + "/_claim") == ["00000002.json"]  # the older one deleted
    assert json.loads((tmp_path / "out/_claim/00000002.json").read_text())["phase"] == "finished"


def test_a_driver_that_loses_the_race_for_a_claim_is_refused(tmp_path, monkeypatch):
    """The window the live file left open: A looks (nothing live), B claims, A writes. With
    the claim, A's create fails, A looks again, finds B live and is refused."""
    import ray_app.progress as progress

    root = str(tmp_path / "out")
    b = {"job": "augment", "phase": "starting", "host": "b", "pid": 2, "updated": time.time()}
    create = storage.create_exclusive

    def b_claims_first(uri, data):
        monkeypatch.setattr(progress.storage, "create_exclusive", create)
        OutputClaim(root).take(b)  # B, between A's look and A's create
        return create(uri, data)

    monkeypatch.setattr(progress.storage, "create_exclusive", b_claims_first)
    with pytest.raises(JobRunning, match="pid 2 on b"):
        OutputClaim(root).take({"job": "augment", "host": "a", "pid": 1})
    assert storage.list_names(root + "/_claim") == ["00000001.json"]
    assert storage.read_json(root + "/_claim/00000001.json")["host"] == "b"


def test_a_claim_holds_while_its_driver_lives_and_its_beat_renews_it(tmp_path):
    root = str(tmp_path / "out")
    other = {"job": "train", "phase": "products", "host": "elsewhere", "pid": 1,
             "updated": time.time(), "heartbeat_s": 30.0}  # fmt: skip
    assert storage.create_exclusive(root + "/_claim/00000007.json", json.dumps(other).encode())
    with pytest.raises(JobRunning, match=r"another `restage train` is running on .* on elsewhere"):
        OutputClaim(root).take({"job": "augment"})
    assert not (tmp_path / "out" / PROGRESS_FILE).exists()
    # its beat stops: three beats later the root is free, and the new claim is the next number
    storage.write_json(root + "/_claim/00000007.json", other | {"updated": time.time() - 91})
    clock = Clock()
    clock.now = time.time()
    with ProgressFile(root, "augment", clock=clock) as progress:
        claim = json.loads((tmp_path / "out/_claim/00000008.json").read_text())
        assert claim["phase"] == "starting" and claim["pid"] == os.getpid()
        clock.now += 5.0
        progress.phase("intake")  # every write of the live file renews the claim
        claim = json.loads((tmp_path / "out/_claim/00000008.json").read_text())
        assert (claim["phase"], claim["updated"]) == ("intake", clock.now)
    assert storage.list_names(root + "/_claim") == ["00000008.json"]
    # a claim that is not JSON (written by hand) names no live driver: it holds nothing
    (tmp_path / "out/_claim/00000009.json").write_text("{")
    OutputClaim(root).take({"job": "augment"})
    assert storage.list_names(root + "/_claim") == ["00000010.json"]


@pytest.mark.parametrize("where", ["file", "memory"])
def test_an_exclusive_create_makes_a_file_once_and_never_overwrites(tmp_path, where):
    uri = str(tmp_path / "a" / "claim.json") if where == "file" else "memory://claims/a.json"
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    if where == "file":
        assert os.listdir(tmp_path / "a") == ["claim.json"]  # no temporary file left
    else:
        storage.remove(uri)


def test_a_live_file_of_another_machine_holds_until_its_beat_is_stale(tmp_path):
    _live(tmp_path / "a", host="elsewhere", pid=1)
    with pytest.raises(JobRunning, match="on elsewhere"):
        refuse_if_running(str(tmp_path / "a"))
    _live(tmp_path / "b", host="elsewhere", pid=1, updated=time.time() - 91)  # 3 beats
    refuse_if_running(str(tmp_path / "b"))
    _live(tmp_path / "c", host="elsewhere", pid=1, phase="finished")
    refuse_if_running(str(tmp_path / "c"))
    # this process's own earlier run (one that ended without its last write) holds nothing
    _live(tmp_path / "d", pid=os.getpid())
    refuse_if_running(str(tmp_path / "d"))


def test_a_job_that_cannot_run_leaves_its_reason_in_the_live_file(tmp_path):
    """The live file is written before the preflight: a scheduler watching it sees why."""
    out = tmp_path / "adapters"
    cmd = [sys.executable, "-m", "ray_app.cli", "train", "--profile", "tiny", "--data"]
    cmd += [str(tmp_path / "augment"), "--out", str(out), "--set", "ray.placement=stage"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    state = _read(out)
    assert state["phase"] == "failed" and "ray.placement=stage" in state["error"]
