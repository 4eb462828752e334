"""The restage Serve application: Ingress -> Generator (multiplexed adapters) [-> Ranker]
[-> Stager, with serve.stage_index].

Start it with ``restage serve --adapters URI`` (a local Ray, or the cluster named by
``ray.address`` / ``RAY_ADDRESS``), or deploy it to a running cluster with
``serve deploy serve/restage.yaml`` (the YAML names ``serve.app:app_builder``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil

from ray_app import secrets, storage
from ray_app.config import ConfigError, RestageConfig, load_config
from serve import generator, ingress, ranker, stager
from serve.auth import ENV_KEYS, ENV_KEYS_FILE, load_key_digests

log = logging.getLogger("restage")

APP_NAME = "restage"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_app(
    config: RestageConfig, adapters: str, key_digests: tuple[str, ...], require_auth: bool = True
):
    """The bound application (nothing starts until ``serve.run``)."""
    if require_auth and not key_digests:
        raise ConfigError(
            f"no API key configured: set {ENV_KEYS} (comma-separated) or {ENV_KEYS_FILE} (one key per "
            "line), or pass --no-auth to serve on 127.0.0.1 only"
        )
    adapters = storage.normalize_uri(adapters)
    gen = generator.serve_deployment(config).bind(config, adapters)
    rank = ranker.serve_deployment(config).bind(config) if config.serve.ranker else None
    index = config.serve.stage_index
    stage = (
        stager.serve_deployment(config).bind(config, storage.normalize_uri(index))
        if index
        else None
    )
    return ingress.serve_deployment(config).bind(
        gen, rank, config, adapters, key_digests, require_auth, stage
    )


APP_ARGS = ("adapters", "profile", "config", "set", "api_keys_file")


def app_builder(args: dict[str, Any]):
    """Entry for ``serve deploy``: ``args`` = {adapters, profile?, config?: [files], set?: [k=v],
    api_keys_file?}. Keys come from ``api_keys_file`` (a path on the node that builds the
    application; only the digests go on to the replicas), else from the builder's environment."""
    unknown = set(args) - set(APP_ARGS)
    if unknown or "adapters" not in args:
        raise ConfigError(
            f"serve application args: need 'adapters'; unknown: {sorted(unknown) or 'none'}; "
            f"allowed: {', '.join(APP_ARGS)}"
        )
    config = load_config(
        args.get("profile", "default"),
        files=args.get("config") or [],
        overrides=args.get("set") or [],
    )
    return build_app(
        config, args["adapters"], load_key_digests(keys_file=args.get("api_keys_file"))
    )


def local_host(host: str) -> str:
    """The address this machine reaches a server bound to ``host`` at."""
    return "127.0.0.1" if host == "0.0.0.0" else host


def ready_message(host: str, port: int, no_auth: bool, docs: bool = True) -> str:
    """The line printed when the server is up: the address it is bound to, and where to reach
    it from this machine when that is all interfaces."""
    bound = f"http://{host}:{port}"
    local = f"http://{local_host(host)}:{port}"
    where = bound if local == bound else f"{bound} (all interfaces; from this machine: {local})"
    api = f"docs: {local}/docs" if docs else f"API: {local}/openapi.json"
    auth = "off" if no_auth else "API keys"
    return f"restage serve: listening on {where}; {api}; auth: {auth}; Ctrl-C or SIGTERM stops it"


def run_server(
    config: RestageConfig,
    adapters: str,
    host: str | None,
    port: int | None,
    no_auth: bool,
    block: bool = True,
) -> str:
    """``restage serve``: start Ray Serve on ``host:port`` and run the application until
    interrupted. -> the base URL."""
    from ray import serve

    from ray_app.plan import preflight
    from ray_app.runtime import init_ray, ray_logs_dir

    digests = load_key_digests()
    # The keys have been read: Ray's processes (started below, inheriting this environment)
    # and its workers never see them, only their digests as deployment arguments.
    secrets.scrub()
    if no_auth:
        if host is not None and host not in LOOPBACK:
            raise ConfigError(
                f"--host {host}: --no-auth serves on 127.0.0.1 only; drop --host or configure keys"
            )
        host = "127.0.0.1"
    host = host or config.serve.host
    config, _ = preflight(config, "serve")  # before Ray starts: fails now if it cannot run
    app = build_app(config, adapters, digests, require_auth=not no_auth)
    port = port or config.serve.port
    info = init_ray(config)
    # Ray's own processes when this one started them (a local Ray), to see them go.
    daemons = psutil.Process().children() if info.get("mode") == "local" else []
    url = f"http://{local_host(host)}:{port}"
    stop = StopSignals()
    if block:  # now: Ray's start installed a handler that aborts the process on SIGTERM
        stop.install()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except StopRequested as why:  # the ingress may answer before the rest is deployed
        log.warning("restage serve: %s while starting: stopping", why)
        _stop(daemons)
        return url
    stop.started = True
    print(ready_message(host, port, no_auth, docs=config.serve.docs), flush=True)
    logs = ray_logs_dir()
    if logs:  # replicas' output goes to Ray's log files (ray.log_to_driver)
        print(f"Ray's logs: {logs}", file=sys.stderr, flush=True)
    if block:
        stop.wait()
        _stop(daemons)
    return url


def _stop(daemons: list[psutil.Process]) -> None:
    if shut_down(daemons):
        return
    # Ray's processes are going: its exit handler would wait about 10 s on them, and its core
    # worker, seeing its raylet gone, may end this process with status 1 meanwhile. What is
    # left of them is killed, and the stop that was asked for ends the process now.
    for process in daemons:
        with contextlib.suppress(psutil.Error):
            process.kill()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class StopRequested(Exception):
    """SIGINT or SIGTERM while Serve was still starting."""


class StopSignals(threading.Event):
    """Set by SIGINT or SIGTERM. Until ``started``, the signal also interrupts the start
    (``StopRequested``): a start waits on Serve's controller, which a stop sent to the whole
    process group has just ended."""

    def __init__(self) -> None:
        super().__init__()
        self.started = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._received)

    def _received(self, signum: int, frame: Any) -> None:
        self.set()
        if not self.started:
            raise StopRequested(signal.Signals(signum).name)


# How long a stop waits for Serve to shut down: its replicas finish the requests they hold
# (Serve gives each 20 s) before they go.
STOP_TIMEOUT_S = 60.0


def shut_down(daemons: list[psutil.Process], timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """``serve.shutdown()``, waited for until it ends, ``timeout_s`` passes, or one of
    ``daemons`` (the local Ray's processes) is gone -> False in that last case. A stop sent to
    the whole process group (systemd's stop, ``kill -- -PGID``, a scheduler's) also stops
    Ray's own processes, Serve's controller among them, and Ray would wait 30 s for that
    controller and more to go on: with them gone there is nothing left to drain."""
    from ray import serve

    done = threading.Event()

    def shutdown() -> None:
        try:
            serve.shutdown()
        except Exception as exc:  # Ray going away under it: the stop goes on
            log.warning("serve shutdown: %s", exc)
        finally:
            done.set()

    threading.Thread(target=shutdown, name="restage-serve-stop", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(0.25):
        gone = [p for p in daemons if not _alive(p)]
        if gone:
            log.warning(
                "restage serve: Ray's own processes are stopping too (%s): not waiting for "
                "Serve to drain",
                ", ".join(sorted({_name(p) for p in gone})),
            )
            return False
        if time.monotonic() > deadline:
            log.warning("restage serve: Serve did not shut down within %gs; stopping", timeout_s)
            break
    return True


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return f"pid {process.pid}"


@dataclass(frozen=True)
class ServeArgs:
    """``restage serve``'s arguments (the CLI builds them from its flags); host and port
    None: ``serve.host`` / ``serve.port``."""

    adapters: str
    host: str | None = None
    port: int | None = None
    no_auth: bool = False


def main(config: RestageConfig, args: ServeArgs) -> int:
    run_server(config, args.adapters, args.host, args.port, args.no_auth)
    return 0
