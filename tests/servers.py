"""`restage serve` as a subprocess on a free port, for tests that need a live server with
settings of their own (the README's server in test_serve.py uses port 8000)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

# Tests that start `restage serve` on a free port take this lock while they pick the port and
# the server binds it, so that test sessions on one machine do not pick the same port.
PORT_LOCK = "/tmp/restage-port8000.lock"
_held = 0  # this process's holds: flock is per open file, so a second one here would wait forever


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def processes(self) -> list[psutil.Process]:
        """Every process the server started (Ray's daemons, workers and replicas)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []


@contextlib.contextmanager
def port_lock() -> Iterator[None]:
    """``PORT_LOCK``, held by this process (re-entrant: a module's server holds it while one
    of its tests starts another server)."""
    global _held
    if _held:
        _held += 1
        try:
            yield
        finally:
            _held -= 1
        return
    with open(PORT_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _held = 1
        try:
            yield
        finally:
            _held = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(
    adapters: Path,
    log: Path,
    env: dict[str, str],
    overrides: tuple[str, ...] = (),
    timeout_s: float = 600,
) -> Iterator[Server]:
    """Start `restage serve --profile tiny` with ``env`` and wait until /healthz is 200."""
    port = free_port()
    restage = str(Path(sys.executable).with_name("restage"))
    cmd = [restage, "serve", "--profile", "tiny", "--adapters", str(adapters), "--port", str(port)]
    cmd += [a for o in ("ray.progress_bars=false", *overrides) for a in ("--set", o)]
    with port_lock():
        with open(log, "w") as out:  # a pipe nobody reads would fill and stall the server
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = Server(proc, f"http://127.0.0.1:{port}", log)
        try:
            deadline = time.time() + timeout_s
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "the server did not become ready"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                        break
                time.sleep(1)
            yield server
        finally:
            started = server.processes()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            for p in started:  # Ray's daemons outlive a killed driver
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
