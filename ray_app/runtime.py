"""Connecting a job to Ray: a local Ray started in-process, or an existing cluster.

Imports ``ray`` lazily so that ``ray_app`` stays importable where Ray is not installed
(the actors run on GPU machines without Ray in benchmarks).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray_app import secrets
from ray_app.config import RestageConfig
from ray_app.models import apply_environment

log = logging.getLogger("restage")


def worker_env(config: RestageConfig) -> dict[str, str]:
    """Environment every Ray worker of the job gets (offline flags, cache location), never a
    secret (``ray_app.secrets``)."""
    env = apply_environment(config.offline)
    env["RESTAGE_CACHE"] = str(config.cache_path)
    return secrets.without_secrets(env)


def init_ray(config: RestageConfig) -> dict[str, Any]:
    """Start (or join) Ray for a job and configure Ray Data; returns what was done."""
    import ray
    from ray.data import DataContext

    env = worker_env(config)
    info: dict[str, Any] = {}
    # Ray's processes inherit this environment: a secret still in it would reach all of them
    # (whoever needed one has read it by now).
    info["secrets_removed"] = secrets.scrub()
    if ray.is_initialized():
        info["mode"] = "existing"
    else:
        address = config.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
            info["mode"] = f"cluster {address}"
        else:
            kwargs: dict[str, Any] = {
                "include_dashboard": config.ray.dashboard,
                "runtime_env": {"env_vars": env},
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
            ray.init(**kwargs)
            info["mode"] = "local"
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = config.ray.progress_bars
    ctx.enable_operator_progress_bars = config.ray.progress_bars
    if config.ray.data_object_store_limit_mb is not None:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=config.ray.data_object_store_limit_mb * 2**20
        )
    info["resources"] = ray.cluster_resources()
    return info


def role_resources(config: RestageConfig, role: str) -> dict[str, Any]:
    """``map_batches`` arguments for an actor pool of ``role``: compute strategy and resources."""
    import ray

    spec = config.role(role)
    return {
        "compute": ray.data.ActorPoolStrategy(min_size=spec.min_actors, max_size=spec.max_actors),
        "num_gpus": spec.num_gpus,
        "num_cpus": spec.num_cpus,
        **({"resources": dict(spec.resources)} if spec.resources else {}),
    }
