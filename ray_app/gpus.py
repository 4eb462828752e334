"""This machine's GPUs as the local Ray a job starts will see them, read through NVML.

A job plans before it starts Ray (``ray_app.plan.preflight``), in its driver. Asking torch
cost each job ~2 s of CPU to import it (the driver loads no model otherwise), and on a GPU
machine its CUDA initialisation; NVML (the driver's management library, which Ray itself
counts GPUs with) answers in milliseconds and touches no device memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class LocalGpus:
    """How many GPUs a local Ray gets, and the memory and name of the first (None when
    there is none, or NVML cannot say)."""

    count: int
    gib: float | None = None
    name: str | None = None


def visible_ids() -> list[str] | None:
    """The ids in ``CUDA_VISIBLE_DEVICES`` (None: unset, every GPU is visible), as Ray reads
    them: empty entries dropped, ``NoDevFiles`` meaning none."""
    value = os.environ.get(VISIBLE_ENV)
    if value is None:
        return None
    if value.strip() == "NoDevFiles":
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def local_gpus() -> LocalGpus:
    """The GPUs of this machine that a local Ray would use: NVML's count, capped by
    ``CUDA_VISIBLE_DEVICES`` as Ray caps it; 0 where NVML is missing (no NVIDIA driver)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return LocalGpus(0)
    count = 0
    try:
        count = pynvml.nvmlDeviceGetCount()
        visible = visible_ids()
        if visible is not None:
            count = min(count, len(visible))
        if count == 0:
            return LocalGpus(0)
        handle = _first_handle(pynvml, visible)
        gib = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        return LocalGpus(count, round(gib, 1), name)
    except pynvml.NVMLError:  # the count stands; the first GPU's figures are unknown
        return LocalGpus(count)
    finally:
        pynvml.nvmlShutdown()


def _first_handle(pynvml, visible: list[str] | None):
    """The first visible GPU: by index, or by UUID (``GPU-...``, or a MIG instance's
    ``MIG-...``, whose memory is the instance's)."""
    first = visible[0] if visible else "0"
    if first.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(first))
    return pynvml.nvmlDeviceGetHandleByUUID(first)
