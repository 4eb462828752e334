"""Shared fixtures: an isolated restage cache, the tiny config, a small local Ray cluster
per module, and the real product photos when ``../shared/data/dreambooth`` is present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH = ROOT.parent / "shared" / "data" / "dreambooth"
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session", autouse=True)
def restage_cache(tmp_path_factory) -> Path:
    """Tiny checkpoints are built once per session into a private cache (or a reused one)."""
    cache = Path(os.environ.get("RESTAGE_TEST_CACHE") or tmp_path_factory.mktemp("restage-cache"))
    os.environ["RESTAGE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_config():
    from ray_app.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="module")
def ray_local():
    """A small local Ray (2 CPUs, small object store) shared by the tests of one module."""
    import ray

    from ray_app import runtime
    from ray_app.config import load_config

    if ray.is_initialized():
        ray.shutdown()
    runtime.init_ray(load_config("tiny", overrides=["ray.progress_bars=false"]))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def dreambooth() -> Path:
    if not (DREAMBOOTH / "products.jsonl").exists():
        pytest.skip(
            f"real product photos not found at {DREAMBOOTH} (see ../shared/data/dreambooth/README.md)"
        )
    return DREAMBOOTH
