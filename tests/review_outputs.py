"""Generation outputs in the layout and schema `restage generate` writes (manifest shards,
written images, adapter.json naming an augment shard with the real photos), so that the
review app is tested without a generation run. Pixels and metrics are made up."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from ray_app import storage
from ray_app.images import encode_png
from ray_app.kinds import Metric, SampleKind
from ray_app.records import GENERATION_SCHEMA, SAMPLE_SCHEMA
from ray_app.storage import AdapterLayout, AugmentLayout, GenerationLayout
from tests.adapters import example_meta

COLOURS = [(200, 40, 40), (40, 160, 60), (40, 70, 200), (220, 180, 30), (150, 60, 180)]


def _png(seed: str, colour: tuple[int, int, int], size: int = 64) -> bytes:
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = rng.integers(150, 235, 3, dtype=np.uint8)
    a, b = rng.integers(size // 8, size // 3, 2)
    rgb[a : a + size // 2, b : b + size // 2] = colour
    return encode_png(rgb)


def write_generations(
    root: Path, run: str, products: int = 3, images_per_product: int = 2, seed: int = 0
) -> Path:
    """``root/run``: a `restage generate` output of ``products`` products, and their
    adapters and augment shards beside it (``root/run-adapters``, ``root/augment``)."""
    out = root / run
    gen = GenerationLayout(str(out))
    augment = AugmentLayout(str(root / "augment"))
    adapters = AdapterLayout(str(root / f"{run}-adapters"))
    rng = np.random.default_rng(seed)
    for p in range(products):
        pid = f"p{p:02d}"
        colour = COLOURS[p % len(COLOURS)]
        shard = augment.manifest_shard(pid)
        if not storage.exists(shard):
            reals = []
            for i in range(2):
                uri = storage.write_bytes(
                    augment.image(pid, f"real-{i}"), _png(f"{pid}-real-{i}", colour)
                )
                reals.append(
                    {
                        "product_id": pid,
                        "sample_id": f"real-{i}",
                        "kind": SampleKind.REAL.value,
                        "image_uri": uri,
                        "kept": True,
                    }
                )
            storage.write_parquet(shard, pa.Table.from_pylist(reals, schema=SAMPLE_SCHEMA))
        meta = example_meta(product_id=pid)
        meta = meta.model_copy(
            update={"training_set": meta.training_set.model_copy(update={"manifest_shard": shard})}
        )
        meta.write(adapters.metadata(pid))
        rows = []
        for i in range(images_per_product):
            image_id = f"{pid}-{i:03d}"
            uri = storage.write_bytes(gen.image(pid, image_id), _png(f"{run}-{image_id}", colour))
            metrics = {m.value: float(rng.uniform(0.2, 0.9)) for m in Metric}
            rows.append(
                {
                    "product_id": pid,
                    "image_id": image_id,
                    "prompt_index": 0,
                    "image_index": i,
                    "prompt": f"a photo of sks thing on a table, {i}",
                    "prompt_source": "bank",
                    "seed": i,
                    "token": "sks",
                    "adapter_uri": adapters.adapter_dir(pid),
                    "image_uri": uri,
                    "width": 64,
                    "height": 64,
                    **metrics,
                    "score": metrics["clip_t"] + metrics["clip_i"] + metrics["dino"],
                    "ranking": "paper",
                    "rank": i + 1,
                    "kept": True,
                }
            )
        storage.write_parquet(
            gen.manifest_shard(pid), pa.Table.from_pylist(rows, schema=GENERATION_SCHEMA)
        )
    return out
