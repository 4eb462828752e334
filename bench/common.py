"""What every benchmark script shares: the machine it ran on, and product manifests built
from the examples."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def machine(device: str | None = None) -> dict:
    """The machine, for the result JSON: figures compare only within one machine."""
    import torch

    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "device": device or ("cuda" if cuda else "cpu"),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def example_manifest(count: int, prefix: str, path: Path) -> Path:
    """A manifest of ``count`` products cycling through the example products' images, each
    with its own id (``{prefix}-00000``...)."""
    from ray_app.records import read_manifest

    examples = read_manifest(str(ROOT / "examples" / "products.jsonl")).records
    rows = []
    for i in range(count):
        src = examples[i % len(examples)]
        rows.append(
            {
                "product_id": f"{prefix}-{i:05d}",
                "category": src.category,
                "title": src.title,
                "image_uris": list(src.image_uris),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
