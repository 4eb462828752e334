"""Connecting a job to Ray (`ray_app.runtime`), the parts that need no running Ray."""

from __future__ import annotations

import ray

from ray_app import runtime
from ray_app.config import load_config


def test_workers_get_the_offline_flags_and_the_cache():
    cfg = load_config("tiny")
    env = runtime.worker_env(cfg)
    assert env["RESTAGE_CACHE"] == str(cfg.cache_path)
    assert env["HF_HUB_OFFLINE"] == "1"  # the tiny profile never touches the network


def test_role_resources_come_from_the_roles_spec():
    cfg = load_config("tiny", overrides=["clip.min_actors=1", "clip.max_actors=3"])
    res = runtime.role_resources(cfg, "clip")
    assert isinstance(res["compute"], ray.data.ActorPoolStrategy)
    assert (res["compute"].min_size, res["compute"].max_size) == (1, 3)
    assert (
        res["num_gpus"] == cfg.role("clip").num_gpus
        and res["num_cpus"] == cfg.role("clip").num_cpus
    )
