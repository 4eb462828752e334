"""bench/gpu_roles.py's code path on the tiny profile (CPU, no Ray), where its output goes,
and how a roles_gpu.json-shaped file replaces the plan's estimates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu_roles
from ray_app import resources
from ray_app.config import load_config
from ray_app.plan import Cluster, build_plan, estimate
from ray_app.resources import role_need


def test_tiny_run_writes_every_field_per_role(tmp_path):
    out = tmp_path / "roles.json"
    roles = ["dino", "inception", "generator", "llm"]
    gpu_roles.main(["--profile", "tiny", "--device", "cpu", "--roles", *roles, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"]["device"] == "cpu" and data["profile"] == "tiny"
    assert [r["role"] for r in data["roles"]] == roles
    for row in data["roles"]:
        assert row["measured"] is True, row
        assert row["items_per_second"] > 0 and row["seconds_per_item"] > 0
        assert row["load_seconds"] >= 0 and row["peak_gib"] is None  # no GPU: no peak
        for key in ("unit", "dtype", "batch_size", "architecture", "workload"):
            assert key in row
    units = {r["role"]: r["unit"] for r in data["roles"]}
    assert units == {"dino": "image", "inception": "image", "generator": "image", "llm": "prompt"}
    gen = next(r for r in data["roles"] if r["role"] == "generator")
    assert gen["workload"]["steps"] == load_config("tiny").generate.steps


def test_only_a_full_cuda_run_of_the_default_profile_writes_roles_gpu_json():
    assert gpu_roles.default_out("default", "cuda", False) == gpu_roles.GPU_FILE
    assert gpu_roles.GPU_FILE == resources.RESULTS / resources.MEASURED_FILE
    for profile, device, quick in [("tiny", "cpu", False), ("default", "cpu", False),
                                   ("default", "cuda", True), ("tiny", "cuda", False)]:  # fmt: skip
        assert gpu_roles.default_out(profile, device, quick) != gpu_roles.GPU_FILE
    with pytest.raises(SystemExit):
        gpu_roles.parse_args(
            ["--profile", "tiny", "--device", "cpu", "--out", str(gpu_roles.GPU_FILE)]
        )


def test_a_measured_file_replaces_memory_and_seconds(tmp_path, monkeypatch):
    cfg = load_config("default")
    spec = cfg.role("generator")
    rows = [
        {"role": "generator", "measured": True, "dtype": spec.dtype,
         "batch_size": spec.batch_size, "peak_gib": 11.0, "peak_reserved_gib": 12.0,
         "seconds_per_item": 1.75, "unit": "image"},
        # another batch size than the profile's: not this configuration's figure
        {"role": "segmenter", "measured": True, "dtype": "float32", "batch_size": 999,
         "peak_gib": 1.0, "seconds_per_item": 9.0, "unit": "image"},
        {"role": "llm", "measured": False, "reason": "not run"},
    ]  # fmt: skip
    (tmp_path / resources.MEASURED_FILE).write_text(
        json.dumps({"machine": {"gpu": "NVIDIA H200"}, "roles": rows})
    )
    monkeypatch.setattr(resources, "RESULTS", tmp_path)
    resources.measured.cache_clear()
    try:
        gen = role_need(cfg, "generator")
        assert gen.source.startswith("measured on NVIDIA H200")
        assert gen.seconds_per_item == 1.75
        assert gen.gpu_gib == pytest.approx(12.0 + resources.CUDA_CONTEXT_GIB)
        seg, llm = role_need(cfg, "segmenter"), role_need(cfg, "llm")
        assert seg.source.startswith("estimated") and llm.source.startswith("estimated")
        plan = build_plan("generate", cfg, Cluster(8, 141.0, 64.0, "test"))
        stage = {s["pool"]: s for s in estimate(plan, cfg, 100)["stages"]}["generate"]
        assert "measured on NVIDIA H200" in stage["source"]
        assert stage["seconds_per_item"] == pytest.approx(1.75)
    finally:
        resources.measured.cache_clear()


def test_the_device_run_command_names_its_defaults():
    doc = Path(gpu_roles.__file__).read_text()
    assert "python bench/gpu_roles.py --device cuda" in doc
