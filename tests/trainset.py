"""A small synthetic training set in the layout and schema `restage augment` writes, so that
train and generate tests need no augment run: per product, real images with masks, new
contexts and negatives, each with a caption."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ray_app import storage
from ray_app.images import encode_png
from ray_app.kinds import SampleKind
from ray_app.records import SAMPLE_SCHEMA
from ray_app.storage import AugmentLayout

PRODUCTS = {
    "lamp-blue-01": ("lamp", "a blue desk lamp", (40, 80, 200)),
    "mug-red-02": ("mug", "a red ceramic mug", (200, 40, 40)),
}


def _image(rng: np.random.Generator, color: tuple[int, int, int], size: int = 64):
    rgb = rng.integers(180, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    a, b = rng.integers(8, 20, 2)
    mask[a : a + 32, b : b + 28] = 255
    rgb[mask > 0] = color
    return rgb, mask


# Samples of each kind per product, unless a call says otherwise.
REALS = CONTEXTS = NEGATIVES = 3
SAMPLES_PER_PRODUCT = REALS + CONTEXTS + NEGATIVES


def write_training_set(
    root: str,
    products: dict[str, tuple[str, str, tuple[int, int, int]]] | None = None,
    reals: int = REALS,
    contexts: int = CONTEXTS,
    negatives: int = NEGATIVES,
) -> str:
    """Write images, masks and one manifest shard per product under ``root``."""
    layout = AugmentLayout(storage.normalize_uri(str(root)))
    for k, (pid, (ptype, caption, color)) in enumerate(sorted((products or PRODUCTS).items())):
        rng = np.random.default_rng(k)
        rows = []
        kinds = [
            (SampleKind.REAL, reals),
            (SampleKind.CONTEXT, contexts),
            (SampleKind.NEGATIVE, negatives),
        ]
        for kind, count in kinds:
            for i in range(count):
                sid = f"{kind}-{i:02d}"
                if kind == SampleKind.NEGATIVE:
                    rgb, mask = _image(rng, tuple(int(c) for c in rng.integers(0, 255, 3)))
                    text = f"a photo of a {ptype} on a table"
                else:
                    rgb, mask = _image(rng, color)
                    text = (
                        caption
                        if kind == SampleKind.REAL
                        else f"a {ptype} on a wooden shelf, soft light"
                    )
                image_uri = storage.write_bytes(layout.image(pid, sid), encode_png(rgb))
                mask_uri = storage.write_bytes(layout.mask(pid, sid), encode_png(mask))
                rows.append(
                    {
                        "product_id": pid,
                        "sample_id": sid,
                        "kind": kind,
                        "image_uri": image_uri,
                        "mask_uri": mask_uri,
                        "width": 64,
                        "height": 64,
                        "caption": text,
                        "prompt": None if kind == SampleKind.REAL else text,
                        "product_type": ptype,
                        "kept": True,
                    }
                )
        storage.write_parquet(
            layout.manifest_shard(pid), pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
        )
    return layout.root
