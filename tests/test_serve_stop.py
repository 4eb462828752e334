"""Stopping `restage serve`: a SIGTERM to its whole process group (as systemd stops a
service) as it starts. In a module of its own: it starts its own server, not one shared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from servers import free_port, port_lock

from serve.auth import ENV_KEYS

pytestmark = pytest.mark.slow

KEY = "stop-key-0123456789abcdef"


def test_a_stop_sent_to_the_whole_process_group_as_it_starts_ends_it_cleanly(tmp_path):
    """SIGTERM to the server's process group (systemd's stop, `kill -- -PGID`) the moment
    /healthz first answers: the ingress is up while the rest may still deploy, and Ray's own
    processes (Serve's controller among them) get the signal too. The server exits 0, neither
    aborted by Ray's signal handler nor waiting on the dead controller."""
    (tmp_path / "adapters").mkdir()
    port = free_port()
    restage = str(Path(sys.executable).with_name("restage"))
    cmd = [restage, "serve", "--profile", "tiny", "--adapters", str(tmp_path / "adapters")]
    cmd += ["--port", str(port), "--set", "serve.ranker=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTAGE_API_KEYS")}
    env[ENV_KEYS] = KEY
    log = tmp_path / "serve.log"
    with port_lock(), open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.time() + 600
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "the server did not become ready"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "SIGTERM received" not in text  # Ray's handler: it aborts the process
    assert "Controller failed to shut down" not in text  # Ray waited 30 s on a dead controller
    assert "not waiting for Serve to drain" in text or "SIGTERM while starting" in text, text
