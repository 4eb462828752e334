"""API keys never reach a Ray process: `restage serve` reads them, removes them from its
environment before Ray starts, and hands the replicas only their digests."""

from __future__ import annotations

import contextlib
import os
import secrets as random_secrets
from pathlib import Path

import psutil
import pytest
from servers import serve_process

from ray_app import runtime, secrets
from ray_app.config import load_config
from serve.auth import ENV_KEYS, ENV_KEYS_FILE


def test_scrub_removes_registered_secrets_only():
    env = {ENV_KEYS: "k" * 20, ENV_KEYS_FILE: "/etc/keys", "PATH": "/bin"}
    assert sorted(secrets.scrub(env)) == sorted([ENV_KEYS, ENV_KEYS_FILE])
    assert env == {"PATH": "/bin"}
    assert secrets.without_secrets({ENV_KEYS: "x", "HF_HUB_OFFLINE": "1"}) == {
        "HF_HUB_OFFLINE": "1"
    }
    with pytest.raises(ValueError, match="already registered"):
        secrets.register(ENV_KEYS, "again")


def test_worker_env_never_carries_a_secret(monkeypatch):
    monkeypatch.setenv(ENV_KEYS, "worker-env-key-0123456789")
    env = runtime.worker_env(load_config("tiny"))
    assert ENV_KEYS not in env and "worker-env-key-0123456789" not in env.values()


def _ray_processes(server) -> list[psutil.Process]:
    """The server's descendants, plus any process whose command line names Ray and that
    started after the server (Ray daemons may be re-parented)."""
    started = psutil.Process(server.proc.pid).create_time()
    found = {p.pid: p for p in server.processes()}
    for p in psutil.process_iter(["cmdline", "create_time"]):
        with contextlib.suppress(psutil.Error):
            if p.info["create_time"] >= started and "ray" in " ".join(p.info["cmdline"] or []):
                found.setdefault(p.pid, p)
    found.pop(server.proc.pid, None)  # the CLI itself read the keys: that is the one allowed
    return list(found.values())


@pytest.mark.slow
def test_no_ray_process_sees_an_api_key(tmp_path):
    key = "env-" + random_secrets.token_hex(16)
    file_key = "file-" + random_secrets.token_hex(16)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# test keys\n{file_key}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTAGE_API_KEYS")}
    env.update({ENV_KEYS: key, ENV_KEYS_FILE: str(keys_file)})
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    with serve_process(adapters, tmp_path / "serve.log", env, ("serve.ranker=false",)) as server:
        procs = _ray_processes(server)
        names = {p.name() for p in procs}
        # Ray's daemons and the Serve replicas are all among them.
        assert {"gcs_server", "raylet"} <= names, names
        replicas = [
            p for p in procs if "Generator" in " ".join(p.cmdline()) or "Generator" in p.name()
        ]
        assert replicas, names
        checked = 0
        for p in procs:
            try:
                environ = Path(f"/proc/{p.pid}/environ").read_bytes()
                cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue  # a short-lived helper that has exited
            for text in (environ, cmdline):
                for secret in (key, file_key, str(keys_file), ENV_KEYS):
                    assert secret.encode() not in text, (p.pid, p.name(), secret)
            checked += 1
        assert checked >= 4, checked
    assert key not in (tmp_path / "serve.log").read_text()
