"""The local GPUs a job plans for, read through NVML (a fake NVML library here: this machine
has none), and a plan that never imports torch in the driver."""

from __future__ import annotations

import subprocess
import sys
import types
from types import SimpleNamespace

import pytest

from ray_app.config import load_config
from ray_app.gpus import LocalGpus, local_gpus, visible_ids
from ray_app.plan import Cluster, gpu_memory

GIB = 2**30


class NVMLError(Exception):
    pass


def fake_nvml(gpus: list[tuple[str, str, float]] | None) -> types.ModuleType:
    """A ``pynvml`` with ``gpus`` (uuid, name, GiB each); None: the library is missing."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    nvml.calls = []

    def init():
        if gpus is None:
            raise NVMLError("NVML Shared Library Not Found")
        nvml.calls.append("init")

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    nvml.nvmlDeviceGetHandleByUUID = lambda u: next(g for g in gpus if g[0] == u)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(total=int(h[2] * GIB))
    nvml.nvmlDeviceGetName = lambda h: h[1].encode()  # older bindings return bytes
    return nvml


H100 = ("GPU-aaa", "NVIDIA H100 80GB HBM3", 79.6)
MIG = ("MIG-bbb", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", 39.5)


@pytest.fixture
def nvml(monkeypatch):
    def install(gpus, visible=None):
        module = fake_nvml(gpus)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        return module

    return install


def test_no_nvidia_driver_means_no_gpus(nvml):
    nvml(None)
    assert local_gpus() == LocalGpus(0)


def test_every_gpu_counts_and_the_first_gives_memory_and_name(nvml):
    module = nvml([H100, H100, H100])
    assert local_gpus() == LocalGpus(3, 79.6, "NVIDIA H100 80GB HBM3")
    assert module.calls == ["init", "shutdown"]  # NVML is released


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("1", LocalGpus(1, 39.5, MIG[1])),  # the second device
        ("0,1,", LocalGpus(2, 79.6, "NVIDIA H100 80GB HBM3")),  # as Ray reads it
        ("", LocalGpus(0)),
        ("NoDevFiles", LocalGpus(0)),
        ("MIG-bbb", LocalGpus(1, 39.5, MIG[1])),  # a MIG instance: its own memory
        ("0,1,2,3,4,5", LocalGpus(2, 79.6, "NVIDIA H100 80GB HBM3")),  # more ids than GPUs
    ],
)
def test_cuda_visible_devices_caps_the_gpus_as_ray_does(nvml, visible, expected):
    nvml([H100, MIG], visible)
    assert local_gpus() == expected


def test_visible_ids_unset_means_every_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_ids() is None


def test_the_plan_counts_and_sizes_the_local_gpus_unless_configured(nvml):
    nvml([H100, H100])
    tiny = load_config("tiny")
    cluster = Cluster.local(tiny)
    assert (cluster.gpus, cluster.gpu_gib) == (2.0, 79.6)
    assert "GPU memory of NVIDIA H100 80GB HBM3" in cluster.source
    fixed = load_config("tiny", overrides=["ray.num_gpus=1", "ray.gpu_memory_gb=40"])
    assert Cluster.local(fixed).gpus == 1.0
    assert gpu_memory(fixed, {}) == (40, "GPU memory from ray.gpu_memory_gb")
    nvml(None)  # no local GPU: a cluster's accelerator type, else the assumption
    assert gpu_memory(tiny, {"accelerator_type:A10G": 1.0})[0] == 24.0


def test_a_jobs_plan_imports_no_torch():
    """The driver plans before Ray starts; importing torch for it cost ~2 s of CPU a job."""
    code = (
        "import sys\n"
        "from ray_app.config import load_config\n"
        "from ray_app.plan import preflight\n"
        "for job in ('augment', 'train', 'generate', 'index', 'stage', 'personalize'):\n"
        "    preflight(load_config('tiny'), job)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False", out.stdout
