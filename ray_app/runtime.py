"""Connecting a job to Ray: a local Ray started in-process, or an existing cluster.

Imports ``ray`` lazily so that ``ray_app`` stays importable where Ray is not installed
(the actors run on GPU machines without Ray in benchmarks).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from typing import Any

from ray_app import native_stderr, secrets
from ray_app.config import ConfigError, RestageConfig
from ray_app.models import apply_environment
from ray_app.progress import interactive

log = logging.getLogger("restage")


# Seconds between Ray Train's checks of its workers (Ray's default: 2). A train job's
# workers end when the queue is empty and the controller notices only at its next check,
# so each job waited about a second more per check interval (bench/ray_train_startup.py).
TRAIN_HEALTH_CHECK_S = 0.25

# Ray Data's parquet reader lists files through a pool of FooterReader actors, 32 of them,
# started for every read_parquet and killed when it is listed. A job reads parquet several
# times (its input index, manifests, features); on a small cluster most of such a read was
# those processes starting (a tiny index job started 28 worker processes; 17 with this),
# and a big cluster gains nothing from more readers than it has CPUs. One per 4 CPUs, at most
# Ray's 32, read by Ray Data on the driver; the variable set by the user wins
# (bench/footer_readers.py).
FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_READERS_MAX = 32


# Ray Train's preemption watcher, an actor of every train job that watches for nodes being
# drained (a spot instance reclaimed, a KubeRay scale-down). A local Ray is this one
# machine, drained by nobody: the watcher would be one more process to start (~2 s of CPU).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


# A local Ray's API server (the dashboard's; the state API, `ray list`): Ray's port when free.
DASHBOARD_PORT = 8265
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def worker_env(config: RestageConfig, local: bool = False) -> dict[str, str]:
    """Environment every Ray worker of the job gets (offline flags, cache location, Ray
    Train's check interval unless set, and with a ``local`` Ray no preemption watcher unless
    set), never a secret (``ray_app.secrets``)."""
    env = apply_environment(config.offline)
    env["RESTAGE_CACHE"] = str(config.cache_path)
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get(
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_HEALTH_CHECK_S)
    )
    if local:
        env[PREEMPTION_WATCHER_ENV] = os.environ.get(PREEMPTION_WATCHER_ENV, "0")
    return secrets.without_secrets(env)


def init_ray(config: RestageConfig) -> dict[str, Any]:
    """Start (or join) Ray for a job and configure Ray Data; returns what was done."""
    import ray
    from ray.data import DataContext

    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    env = worker_env(config, local=not address)
    check_footer_readers()
    info: dict[str, Any] = {}
    # Ray's processes inherit this environment: a secret still in it would reach all of them
    # (whoever needed one has read it by now).
    info["secrets_removed"] = secrets.scrub()
    if ray.is_initialized():
        info["mode"] = "existing"
    else:
        quiet_ray_driver()
        if address:
            ray.init(
                address=address,
                runtime_env={"env_vars": env},
                log_to_driver=config.ray.log_to_driver,
            )
            info["mode"] = f"cluster {address}"
        else:
            kwargs: dict[str, Any] = {
                # A new Ray of the job's own, even where `ray start` left its address in
                # /tmp/ray (a bare ray.init() joins that cluster, then refuses num_cpus); a
                # cluster is used only when named (ray.address, RAY_ADDRESS).
                "address": "local",
                "include_dashboard": config.ray.dashboard,
                "runtime_env": {"env_vars": env},
                "log_to_driver": config.ray.log_to_driver,
            }
            if config.ray.num_cpus is not None:
                kwargs["num_cpus"] = config.ray.num_cpus
            if config.ray.num_gpus is not None:
                kwargs["num_gpus"] = config.ray.num_gpus
            if config.ray.object_store_mb is not None:
                kwargs["object_store_memory"] = config.ray.object_store_mb * 2**20
            if config.ray.metrics_export_port is not None:
                kwargs["_metrics_export_port"] = config.ray.metrics_export_port
            kwargs["_system_config"] = config.ray.system_config()
            if API_SERVER_ENV not in os.environ:
                port = api_server_port(config.ray.dashboard)
                kwargs["dashboard_port"] = port
                env[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
                if config.ray.dashboard:
                    info["dashboard"] = env[API_SERVER_ENV]
            ray.init(**kwargs)
            info["mode"] = "local"
    native_stderr.install()  # after Ray's own processes started, with their own log files
    # Ray Data's hint when an operator got fewer inputs than its task cap: restage's caps
    # (the listing's LISTING_TASKS) are upper bounds, and a small job is not a mistake.
    warnings.filterwarnings(
        "ignore", message="The maximum number of concurrent tasks for", category=UserWarning
    )
    ctx = DataContext.get_current()
    bars = progress_bars(config)
    ctx.enable_progress_bars = bars
    ctx.enable_operator_progress_bars = bars
    # Without bars Ray Data prints each dataset's plan and a summary per run at INFO: the
    # job's own lines say the same, so its console shows warnings only (its log file,
    # ray-data.log among Ray's logs, keeps everything).
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.INFO if bars else logging.WARNING)
    if config.ray.data_object_store_limit_mb is not None:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=config.ray.data_object_store_limit_mb * 2**20
        )
    info["resources"] = ray.cluster_resources()
    readers = footer_readers(info["resources"].get("CPU", 0))
    info["footer_readers"] = int(os.environ.setdefault(FOOTER_READERS_ENV, str(readers)))
    return info


def api_server_port(dashboard: bool) -> int:
    """The port of a local Ray's API server, which every worker gets as ``API_SERVER_ENV``:
    Ray's 8265 when the dashboard runs and nothing else listens there, else a free port.

    Without it a worker's state API looks for *a* Ray on the machine: the cluster that
    `ray start` (or ray.cluster_utils) recorded in the temp dir, whichever it is. Ray Train's
    placement-group cleaner asked another Ray's dashboard whether its run's controller was
    alive, was told it did not exist, and removed the live run's placement group (its
    workers died); Serve's controller lists actors the same way on recovery. Without a
    dashboard the port is one where nothing listens: the query fails, which the cleaner takes
    as "keep watching", instead of another Ray answering (the GCS names 127.0.0.1:8265 even
    when no dashboard runs)."""
    if dashboard:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", DASHBOARD_PORT))
                return DASHBOARD_PORT
            except OSError:
                pass  # another Ray's dashboard, most likely
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_footer_readers() -> None:
    """A ``FOOTER_READERS_ENV`` set by the user must be a positive integer (before Ray starts)."""
    value = os.environ.get(FOOTER_READERS_ENV)
    if value is not None and not (value.strip().isdigit() and int(value) > 0):
        raise ConfigError(
            f"{FOOTER_READERS_ENV}={value!r}: Ray Data's parquet footer readers per read must "
            "be a positive integer; unset it for one per 4 CPUs of the cluster"
        )


def footer_readers(cpus: float) -> int:
    """Ray Data's parquet footer readers for a cluster of ``cpus`` (``FOOTER_READERS_ENV``)."""
    return int(min(FOOTER_READERS_MAX, max(1, cpus // 4)))


def progress_bars(config: RestageConfig) -> bool:
    """Whether Ray Data draws its progress bars: ``ray.progress_bars``, where 'auto' means
    on a terminal only (elsewhere a job prints ``ray_app.progress`` lines instead)."""
    bars = config.ray.progress_bars
    return interactive() if bars == "auto" else bool(bars)


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_ray_driver() -> None:
    """Silence messages of Ray in this process that are known to be harmless here (each
    with why); Ray's warnings and errors otherwise stay visible."""
    # `serve.run` connects to the Serve instance `restage serve` has just started with our
    # host and port, and says that "new" (default) http_options will not be applied: they
    # are not meant to be; ours were applied.
    logging.getLogger("ray.serve").addFilter(_SERVE_RECONNECT)  # once: the same objects
    # A new local Ray turns token authentication on by default and warns that it did, at
    # every start: that is the safe setting (and RAY_AUTH_MODE still chooses).
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _TOKEN_AUTH_DEFAULT
    )
    # Off a terminal restage turns Ray Data's bars off on purpose and prints its own lines.
    logging.getLogger("ray.data._internal.progress").addFilter(_BARS_OFF)


_BARS_OFF = _DropMessages("Progress bars disabled")
_SERVE_RECONNECT = _DropMessages('Connecting to existing Serve app in namespace "serve"')
_TOKEN_AUTH_DEFAULT = _DropMessages("Token authentication is enabled for this Ray cluster")


def ray_logs_dir() -> str | None:
    """The log folder of the local Ray session of this process (None when joined to a
    cluster: its logs are on the cluster's nodes)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API for this
    if not ray.is_initialized() or node is None or not node.head:
        return None
    return node.get_logs_dir_path()


def link_ray_logs(out: str) -> str | None:
    """Link Ray's log folder as ``OUT/_ray_logs`` (a local ``out`` only) -> where they are."""
    from ray_app import storage

    logs = ray_logs_dir()
    if logs is None:
        return None
    root = storage.normalize_uri(out)
    if storage.has_protocol(root):
        return logs
    link = os.path.join(root, "_ray_logs")
    if os.path.islink(link):
        os.remove(link)
    if os.path.exists(link):
        return logs
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(logs, link)
    return link


def role_resources(config: RestageConfig, role: str) -> dict[str, Any]:
    """``map_batches`` arguments for an actor pool of ``role``: compute strategy and resources."""
    return pool_resources(config, [(role,)])


def pool_resources(config: RestageConfig, stages: list[tuple[str, ...]]) -> dict[str, Any]:
    """``map_batches`` arguments of one actor pool running ``stages`` (each one's roles): a
    stage's pool is sized by its first role and takes that role's CPUs (the stages of a
    fused pool run one after the other: the largest of them), and reserves the GPUs and
    custom resources of every role it loads."""
    import ray

    from ray_app.plan import fused_actors

    firsts = [config.role(roles[0]) for roles in stages]
    everyone = [config.role(r) for roles in stages for r in roles]
    least, most = fused_actors([(s.min_actors, s.max_actors) for s in firsts])
    resources: dict[str, float] = {}
    for spec in everyone:
        for key, amount in spec.resources.items():
            resources.setdefault(key, amount)
    return {
        "compute": ray.data.ActorPoolStrategy(min_size=least, max_size=most),
        "num_gpus": sum(s.num_gpus for s in everyone),
        "num_cpus": max(s.num_cpus for s in firsts),
        **({"resources": resources} if resources else {}),
    }
