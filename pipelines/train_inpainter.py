"""`restage stage train-inpainter`: the boundary-weighted inpainter LoRA of `restage stage`
(retrieval-assisted staging, arXiv 2307.15326, eq. 1; actors/inpaint_trainer.py).

The catalog scenes come from a `restage index` output: a seeded sample of at most
``stage.train_inpainter.max_scenes`` kept scenes, each with its product's mask. Training is
one Ray task with the inpainter role's resources (a GPU on a cluster), which reads the
scenes itself and writes the LoRA folder that ``stage.inpainter_lora`` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_app import retrieval, storage
from ray_app.config import RestageConfig
from ray_app.images import decode_mask, decode_rgb


def catalog_scenes(index_uri: str, max_scenes: int, seed: int) -> list[tuple[str, str]]:
    """(scene URI, mask URI) of a seeded sample of the index's scenes."""
    found = retrieval.Index.open(index_uri)
    scenes = found.rows.column("scene_uri").to_pylist()
    masks = found.rows.column("mask_uri").to_pylist()
    order = np.random.default_rng(seed).permutation(len(scenes))[:max_scenes]
    return [(scenes[i], masks[i]) for i in sorted(order)]


def _train(config: RestageConfig, pairs: list[tuple[str, str]], out: str) -> dict[str, Any]:
    from actors.inpaint_trainer import train_inpainter

    scenes = [
        (decode_rgb(storage.read_bytes(s)), decode_mask(storage.read_bytes(m)) > 0)
        for s, m in pairs
    ]
    return train_inpainter(
        config.model_spec("inpainter"), config.stage.train_inpainter, scenes, out
    )


def run(config: RestageConfig, catalog: str, out: str) -> dict[str, Any]:
    """Train on ``catalog`` (`restage index`'s OUT, or its OUT/index) -> ``out``."""
    import ray

    from ray_app.runtime import init_ray

    catalog = storage.normalize_uri(catalog)
    index_uri = catalog
    if not storage.exists(storage.join(catalog, retrieval.INDEX_JSON)):
        index_uri = storage.join(catalog, "index")  # the index job's root
    try:
        pairs = catalog_scenes(
            index_uri, config.stage.train_inpainter.max_scenes, config.stage.train_inpainter.seed
        )
    except retrieval.IndexFormatError as exc:
        raise ValueError(
            f"--catalog {catalog}: {exc}. Give the folder that `restage index --out DIR` "
            "wrote (DIR or DIR/index)"
        ) from None
    if len(pairs) < 2:
        raise ValueError(
            f"--catalog {catalog}: {len(pairs)} scene(s) in the index; training needs at least "
            "2 (each scene's hole is another scene's product)"
        )
    init_ray(config)
    spec = config.role("inpainter")
    task = ray.remote(num_gpus=spec.num_gpus, num_cpus=spec.num_cpus, resources=spec.resources)
    return ray.get(task(_train).remote(config, pairs, storage.normalize_uri(out)))


@dataclass(frozen=True)
class TrainInpainterArgs:
    catalog: str
    out: str


def main(config: RestageConfig, args: TrainInpainterArgs) -> int:
    """CLI entry: ``restage stage train-inpainter --catalog URI --out URI``."""
    s = run(config, args.catalog, args.out)
    print(
        f"restage stage train-inpainter: {s['steps']} steps on {s['train_scenes']} scenes; "
        f"{s['eval_on']} loss {s['eval_start']} -> {s['eval_end']}; LoRA in {s['uri']} "
        f"(stage with it: --set stage.inpainter_lora={s['uri']})"
    )
    return 0
