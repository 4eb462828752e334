"""Checkpoint availability (the preflight's model check) and `restage models fetch`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from ray_app import checkpoints
from ray_app.config import load_config
from ray_app.models import load_role
from tests.conftest import EXAMPLES, ROOT


def test_tiny_and_local_sources_are_available(tmp_path):
    cfg = load_config("tiny")
    assert checkpoints.unavailable(cfg, "dino") is None
    folder = tmp_path / "dino"
    folder.mkdir()
    assert (
        checkpoints.unavailable(load_config("tiny", overrides=[f"dino.source={folder}"]), "dino")
        is None
    )


def test_missing_sources_name_the_role_where_restage_looked_and_the_fix(tmp_path):
    cfg = load_config("tiny", overrides=[f"dino.source={tmp_path}/nope/model.bin"])
    msg = checkpoints.unavailable(cfg, "dino")
    assert msg and msg.startswith("dino:") and "restage models fetch" in msg
    uri = f"memory://restage-test-{uuid.uuid4().hex}/dino"
    msg = checkpoints.unavailable(load_config("tiny", overrides=[f"dino.source={uri}"]), "dino")
    assert msg and uri in msg and "does not exist" in msg


def test_hub_id_offline_and_not_cached_is_unavailable():
    repo = f"restage-test/not-a-model-{uuid.uuid4().hex[:8]}"
    offline = load_config("tiny", overrides=[f"dino.source={repo}", "offline=true"])
    msg = checkpoints.unavailable(offline, "dino")
    assert msg and repo in msg and "offline=true" in msg and "HF_ENDPOINT" in msg
    online = load_config("tiny", overrides=[f"dino.source={repo}", "offline=false"])
    msg = checkpoints.unavailable(online, "dino")  # no hub here; a 404 where there is one
    assert msg and "hub did not answer" in msg


def test_fetch_to_memory_then_load_from_there(tmp_path):
    cfg = load_config("tiny")
    to = f"memory://restage-fetch-{uuid.uuid4().hex}"
    sources = checkpoints.fetch(cfg, to, ["dino", "clip"])
    assert set(sources) == {"dino", "clip"} and all(s.startswith(to) for s in sources.values())
    # A fresh cache: the roles can only come from the URI.
    staged = load_config(
        "tiny", files=[f"{to}/sources.yaml"], overrides=[f"cache_dir={tmp_path / 'cache'}"]
    )
    assert staged.dino.source == sources["dino"]
    assert checkpoints.unavailable(staged, "dino") is None
    loaded = load_role(staged, "dino")
    assert loaded.source == sources["dino"] and str(tmp_path / "cache") in loaded.resolved
    # A second fetch skips the complete roles (resume).
    assert checkpoints.fetch(cfg, to, ["dino"]) == {"dino": sources["dino"]}


@pytest.mark.slow
def test_models_fetch_then_a_job_reads_the_staged_checkpoints_offline(tmp_path):
    staged = tmp_path / "models"
    fetch = subprocess.run(
        [sys.executable, "-m", "ray_app.cli", "models", "fetch", "--profile", "tiny",
         "--to", str(staged)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert fetch.returncode == 0, fetch.stderr[-2000:]
    assert (staged / "sources.yaml").exists() and "--config" in fetch.stdout
    manifest = tmp_path / "m.jsonl"  # one product of the examples, beside their photos
    (tmp_path / "products").symlink_to(EXAMPLES / "products")
    manifest.write_text((EXAMPLES / "products.jsonl").read_text().splitlines()[0] + "\n")
    job = subprocess.run(
        [sys.executable, "-m", "ray_app.cli", "augment", "--profile", "tiny",
         "--config", str(staged / "sources.yaml"), "--manifest", str(manifest),
         "--out", str(tmp_path / "out"), "--set", f"cache_dir={tmp_path / 'cache'}",
         "--set", "offline=true", "--set", "augment.views.enabled=false",
         "--set", "ray.progress_bars=false", "--set", "ray.dashboard=false",
         # the photos are a symlink out of the manifest's folder: trust their real folder
         "--set", f"storage.allowed_sources=[{EXAMPLES / 'products'}]"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    assert not (tmp_path / "cache" / "tiny").exists()  # nothing built: all read from the URI
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["products"]["ok"] + summary["products"]["partial"] == 1


def test_fetch_stages_a_shared_vae_once_and_points_both_roles_at_it(tmp_path):
    cfg = load_config("tiny")
    to = f"memory://restage-fetch-{uuid.uuid4().hex}"
    sources = checkpoints.fetch(cfg, to, ["generator", "inpainter"])
    assert sources["generator.vae"] == sources["inpainter.vae"]
    assert sources["generator.vae"].startswith(f"{to}/generator.vae/")
    staged = load_config(
        "tiny", files=[f"{to}/sources.yaml"], overrides=[f"cache_dir={tmp_path / 'cache'}"]
    )
    assert staged.inpainter.vae.source == sources["generator.vae"]
    assert checkpoints.unavailable(staged, "inpainter") is None
    loaded = load_role(staged, "inpainter")  # a fresh cache: everything from the URI
    assert str(tmp_path / "cache") in loaded.extra["vae"]
    assert loaded.model.vae.config.force_upcast is False


def test_a_missing_vae_is_named(tmp_path):
    cfg = load_config("tiny", overrides=[f"generator.vae.source={tmp_path}/nope"])
    msg = checkpoints.unavailable(cfg, "generator")
    assert msg and msg.startswith("generator.vae:") and "generator.vae.source" in msg
