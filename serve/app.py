"""The restage Serve application: Ingress -> Generator (multiplexed adapters) [-> Ranker]
[-> Stager, with serve.stage_index].

Start it with ``restage serve --adapters URI`` (a local Ray, or the cluster named by
``ray.address`` / ``RAY_ADDRESS``), or deploy it to a running cluster with
``serve deploy serve/restage.yaml`` (the YAML names ``serve.app:app_builder``).
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ray_app import secrets, storage
from ray_app.config import ConfigError, RestageConfig, load_config
from serve import generator, ingress, ranker, stager
from serve.auth import ENV_KEYS, ENV_KEYS_FILE, load_key_digests

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
    init_ray(config)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    print(ready_message(host, port, no_auth, docs=config.serve.docs), flush=True)
    logs = ray_logs_dir()
    if logs:  # replicas' output goes to Ray's log files (ray.log_to_driver)
        print(f"Ray's logs: {logs}", file=sys.stderr, flush=True)
    url = f"http://{local_host(host)}:{port}"
    if block:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
    return url


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
