"""What a job prints while it runs.

On a terminal, Ray Data's progress bars are the live display (one per job, updated in
place). Elsewhere (CI, a log file, a pipe) in-place bars become a block of lines reprinted
every few seconds, so they are off there and a job prints instead one compact line per stage
(augment, train, generate) when it starts, at most every ``interval`` seconds while it runs,
and when it ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from ray_app import storage
from ray_app.report import ALREADY

# Lines while a stage runs: at most one per this many seconds (start and end lines aside).
INTERVAL_S = 30.0


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where Ray Data draws its bars) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream is not a terminal
        return False


class StageLines:
    """The compact lines of one stage of a job, for output that is not a terminal.

    ``update(done, detail)`` prints ``restage JOB: done/total UNIT (detail), Ns`` when
    ``interval`` seconds have passed since the last line; ``finish`` always prints.
    Nothing is printed when ``enabled`` is false (a terminal shows Ray Data's bars).

    A job that reads its input as it goes (train's queue) starts with ``total`` None and
    ``at_least`` the products found so far, and sets ``total`` once it is known: until then
    the lines say ``done/?``."""

    def __init__(
        self,
        job: str,
        total: int | None,
        unit: str = "products",
        *,
        enabled: bool | None = None,
        interval: float = INTERVAL_S,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        at_least: int = 0,
    ):
        self.job, self.total, self.unit = job, total, unit
        self.stream = stream
        self.enabled = (not interactive()) if enabled is None else enabled
        self.interval = interval
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0
        if total is None:
            self._print(f"at least {at_least} {unit} to do (still listing them)")
        else:
            self._print(f"{total} {unit} to do")

    def _print(self, text: str) -> None:
        if self.enabled:
            print(f"restage {self.job}: {text}", file=self.stream or sys.stderr, flush=True)

    def _line(self, detail: str) -> str:
        elapsed = self.clock() - self.start
        extra = f" ({detail})" if detail else ""
        total = "?" if self.total is None else self.total
        return f"{self.done}/{total} {self.unit}{extra}, {elapsed:.0f}s"

    def update(self, done: int, detail: str = "") -> None:
        self.done = done
        now = self.clock()
        left = self.total is None or done < self.total  # the end has its own line
        if left and now - self.last >= self.interval:
            self.last = now
            self._print(self._line(detail))

    def finish(self, detail: str = "") -> None:
        self._print("done: " + self._line(detail))


def finished(products: dict[str, int]) -> int:
    """Products a job has finished so far (whatever their outcome)."""
    return sum(products.get(k, 0) for k in ("ok", "partial", "failed"))


def counts(products: dict[str, int], keys: tuple[str, ...] = ("ok", "partial", "failed")) -> str:
    """``ok 2, failed 1``: the non-zero counts of ``keys``."""
    return ", ".join(f"{k} {products[k]}" for k in keys if products.get(k))


# --------------------------------------------------------------------------- the live file

PROGRESS_FILE = "_progress.json"
# The live file is rewritten at least this often while its job's driver lives: a file not
# rewritten for a few of these is a job that stopped (killed, its node lost).
HEARTBEAT_S = 30.0


class JobRunning(RuntimeError):
    """Another run of a job is live on the same output (its driver's beat is recent)."""


class ProgressFile:
    """A job's live state, ``ROOT/_progress.json``, for `restage status` and for whatever
    watches a long job from outside (a scheduler's sensor, a dashboard): its phase, the
    products it has to do and has done, their rate and the time left at that rate.

    Rewritten on each phase change and every ``heartbeat`` seconds by a daemon thread, so
    ``updated`` also says whether the driver is still alive; ``update`` only sets the counts.
    A driver blocked elsewhere (train's, in Ray Train) gives ``poll`` instead, asked by the
    beat for the counts. As a context manager it ends in phase ``finished``, or ``failed``
    (with the error) when the block raises. A file that cannot be written (or a poll that
    fails) is logged, never the job's failure.

    Entering it claims the root (``OutputClaim``) and refuses (``JobRunning``, writing no
    live file) while another driver holds it: two runs of a job on one output would each
    drop the other's intake and do its products twice (a scheduler's retry while the first
    still runs). The claim is an atomic create, so of runs started in the same instant one
    wins; the beat keeps it fresh and the last write releases it."""

    def __init__(
        self,
        root: str,
        job: str,
        *,
        heartbeat: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
        poll: Callable[[], tuple[int, dict[str, int], int | None]] | None = None,
    ):
        self.path = storage.join(root, PROGRESS_FILE)
        self.heartbeat, self.clock = heartbeat, clock
        self.poll = poll  # -> (done, counts, total or None): asked before each beat's write
        now = clock()
        self.state: dict[str, Any] = {
            "job": job,
            "out": root,
            "phase": "starting",
            "started": now,
            "updated": now,
            "heartbeat_s": heartbeat,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "total": None,  # products to do in this run, once known
            "done": 0,
            "products": {},
            "products_since": None,  # when the first product could start
        }
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="restage-progress", daemon=True)
        self.claim = OutputClaim(root)

    def __enter__(self) -> ProgressFile:
        refuse_if_running(self.state["out"], self.clock)  # a driver from before claims
        try:
            self.claim.take(self.snapshot(), self.clock)
        except JobRunning:
            raise
        except Exception as exc:  # storage that cannot: the live file's check stands alone
            logging.getLogger("restage").warning(
                "could not claim %s (%s): a run started at the same moment could run too",
                self.state["out"],
                exc,
            )
        self.write()
        self._thread.start()
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.heartbeat)
        self.refresh()
        if exc is None:
            self.phase("finished")
        else:
            with self._lock:
                self.state["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            self.phase("failed")

    def phase(self, name: str, total: int | None = None) -> None:
        """Enter phase ``name`` (``intake``, ``products``, ...); ``total``: the products to
        do, when the phase knows them. Written now."""
        with self._lock:
            self.state["phase"] = name
            if total is not None:
                self.state["total"] = total
            if name == "products" and self.state["products_since"] is None:
                self.state["products_since"] = self.clock()
        self.write()

    def update(self, done: int, products: dict[str, int], total: int | None = None) -> None:
        """The products finished so far and their outcomes, and the products to do if now
        known (written by the next beat). ``products`` may give ``ALREADY`` too; one given
        before (``found_complete``) stays until another replaces it."""
        with self._lock:
            self.state["done"] = done
            kept = {k: v for k, v in self.state["products"].items() if k == ALREADY}
            self.state["products"] = {**kept, **products}
            if total is not None:
                self.state["total"] = total

    def found_complete(self, products: int) -> None:
        """The products of the job that earlier runs finished, once the intake found them:
        `restage status` shows them beside this run's outcomes (a re-run of a finished job
        does 0/0 products)."""
        with self._lock:
            self.state["products"] = {**self.state["products"], ALREADY: products}

    def snapshot(self) -> dict[str, Any]:
        """The state as written: with ``updated``, ``per_second`` and ``eta_s``."""
        with self._lock:
            state = dict(self.state, products=dict(self.state["products"]))
        now = self.clock()
        state["updated"] = now
        since, done, total = state["products_since"], state["done"], state["total"]
        rate = done / (now - since) if since is not None and done and now > since else None
        state["per_second"] = round(rate, 6) if rate else None
        left = (total - done) if total is not None else None
        state["eta_s"] = round(left / rate, 1) if rate and left is not None else None
        return state

    def write(self) -> None:
        try:
            with self._writing:  # the beat and the driver: the later state lands last
                state = self.snapshot()
                storage.write_json(self.path, state)
                self.claim.renew(state)
        except Exception as exc:  # watching a job must never be why it fails
            logging.getLogger("restage").warning("could not write %s: %s", self.path, exc)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.refresh()
            self.write()

    def refresh(self) -> None:
        """Take the counts from ``poll``, if given."""
        if self.poll is None:
            return
        try:
            self.update(*self.poll())
        except Exception as exc:
            logging.getLogger("restage").warning("progress of %s: %s", self.path, exc)


# --------------------------------------------------------------------------- `restage status`

LIVE_PHASES = ("starting", "intake", "products")
# A live phase whose file is older than this many beats: the driver is gone.
STALE_BEATS = 3


def find_progress(root: str) -> list[dict[str, Any]]:
    """The live files of the jobs under ``root``: its own and its folders' (`restage run`
    keeps augment/, adapters/, generations/ under one root), oldest start first."""
    fs, path = storage.url_to_fs(root)
    if not fs.isdir(path):
        return []
    folders = [root] + [
        storage.join(root, entry["name"].rstrip("/").rsplit("/", 1)[-1])
        for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"])
        if entry.get("type") == "directory"
    ]
    found = []
    for folder in folders:
        uri = storage.join(folder, PROGRESS_FILE)
        try:
            found.append(storage.read_json(uri))
        except FileNotFoundError:
            continue
        except ValueError as exc:  # not JSON: say so, do not hide the job
            found.append({"job": "?", "out": folder, "phase": f"unreadable ({exc})"})
    return sorted(found, key=lambda s: s.get("started") or 0)


def status_of(state: dict[str, Any], now: float) -> str:
    """``running``, ``stopped`` (a live phase no beat has rewritten for a while: killed, or
    its node lost), or the phase it ended in."""
    phase = state.get("phase", "?")
    if phase not in LIVE_PHASES:
        return phase
    age = now - float(state.get("updated", 0))
    if age > STALE_BEATS * float(state.get("heartbeat_s", HEARTBEAT_S)):
        return f"stopped? no update for {_duration(age)}"
    return f"running ({phase})"


def refuse_if_running(root: str, clock: Callable[[], float] = time.time) -> None:
    """``JobRunning`` while another driver's live file is under ``root``: what entering a
    ``ProgressFile`` checks (a job enters it before it starts Ray)."""
    try:
        other = storage.read_json(storage.join(root, PROGRESS_FILE))
    except (OSError, ValueError):  # none, or unreadable (then writing it fails too: logged)
        return
    why = live_elsewhere(other, clock())
    if why:
        raise JobRunning(_running_message(other, root, why))


class OutputClaim:
    """Which driver runs on an output root: ``ROOT/_claim/N.json``, the highest N holding.

    A driver takes the root by creating claim N+1 exclusively (``storage.create_exclusive``:
    a hard link locally, a conditional PUT on object stores) once claim N is no longer live,
    by the live file's rules (``live_elsewhere``): ended, its process gone, or its beat
    stale. Of drivers racing for N+1, one creates it and the others find it live and
    refuse. The holder rewrites its claim with every beat (its state, as ``_progress.json``)
    and ends it with its last write; claims below its own are deleted."""

    FOLDER = "_claim"

    def __init__(self, root: str):
        self.root = root
        self.folder = storage.join(root, self.FOLDER)
        self.uri: str | None = None  # this driver's claim, once taken

    def _latest(self) -> int:
        names = storage.list_names(self.folder, ".json")
        return max((int(name[:-5]) for name in names if name[:-5].isdigit()), default=0)

    def _uri(self, number: int) -> str:
        return storage.join(self.folder, f"{number:08d}.json")

    def take(self, state: dict[str, Any], clock: Callable[[], float] = time.time) -> None:
        """Claim the root for the driver whose live state is ``state``, or ``JobRunning``."""
        data = json.dumps(state, indent=2, sort_keys=True, default=str).encode()
        for _ in range(5):  # a lost race or a claim deleted under us: look again
            latest = self._latest()
            if latest:
                try:
                    other = storage.read_json(self._uri(latest))
                except FileNotFoundError:
                    continue  # its holder's successor deleted it: there is a newer one
                except ValueError:
                    other = {}  # not JSON (written by hand?): no live holder named in it
                why = live_elsewhere(other, clock())
                if why:
                    raise JobRunning(_running_message(other, self.root, why))
            uri = self._uri(latest + 1)
            if storage.create_exclusive(uri, data):
                self.uri = uri
                for number in range(1, latest + 1):  # the ended claims: one live is enough
                    with contextlib.suppress(OSError):
                        storage.remove(self._uri(number))
                return
        raise JobRunning(
            f"{self.folder}: claims keep changing while this run looks (several runs starting "
            "on one output?); try again once `restage status` shows none running"
        )

    def renew(self, state: dict[str, Any]) -> None:
        """Rewrite this driver's claim with its state (its beat; its last write ends it)."""
        if self.uri is not None:
            storage.write_json(self.uri, state)


def _running_message(other: dict[str, Any], root: str, why: str) -> str:
    return (
        f"another `restage {other.get('job', '?')}` is running on {root} ({why}): wait "
        f"for it to end (`restage status {root}`), or stop it; a driver killed on another "
        f"machine counts as stopped once its file is {STALE_BEATS} beats old"
    )


def live_elsewhere(state: dict[str, Any], now: float) -> str | None:
    """Why the job of a live file is still running elsewhere (another process: on this
    machine, one that still exists; on another, one whose beat is recent), or None."""
    if not status_of(state, now).startswith("running"):
        return None  # ended, or stale: its driver is gone
    host, pid = state.get("host"), state.get("pid")
    where = f"pid {pid} on {host}, updated {_duration(now - float(state.get('updated', now)))} ago"
    if host != socket.gethostname():
        return where
    if pid == os.getpid():
        return None  # this process's earlier run (it ended without a last write)
    try:
        os.kill(int(pid), 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return None  # killed: a re-run resumes at once, without waiting for the file to age
    except (PermissionError, TypeError, ValueError):
        pass  # another user's process (it exists), or no pid recorded
    return where


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_status(states: list[dict[str, Any]], now: float) -> str:
    """The jobs' live files as a table (what `restage status` prints)."""
    from ray_app.report import format_table

    rows = []
    for s in states:
        total = s.get("total")
        done = s.get("done", 0)
        rate, eta = s.get("per_second"), s.get("eta_s")
        rows.append(
            [
                s.get("job", "?"),
                status_of(s, now),
                f"{done}/{'?' if total is None else total}",
                counts(s.get("products", {}), ("ok", "partial", "failed", ALREADY)) or "-",
                f"{rate * 3600:.0f}/h" if rate else "-",
                _duration(eta) if eta is not None and status_of(s, now).startswith("run") else "-",
                f"{_duration(now - float(s.get('updated', now)))} ago",
                s.get("out", ""),
            ]
        )
    headers = ["job", "status", "done", "outcomes", "rate", "left", "updated", "out"]
    return format_table(headers, rows)
