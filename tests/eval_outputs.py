"""A small evaluation output in the layout and schema `restage evaluate` writes (per_image
and per_product Parquet shards, one per product, and summary.json), so that the report is
tested without an evaluation run. The numbers are made up; the shapes are the contract."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.evaluate import METRICS as EVAL_METRICS
from ray_app import storage
from ray_app.images import encode_png
from ray_app.records import EVAL_IMAGE_SCHEMA, EVAL_PRODUCT_SCHEMA
from ray_app.storage import EvaluationLayout

# The evaluation's own order (the DreamBench three first).
METRICS = [str(m) for m in EVAL_METRICS]
RUNS = ("restage", "baseline")
PUBLISHED = [
    {
        "name": "DreamBooth (Stable Diffusion), Ruiz et al. 2023",
        "dino": 0.668,
        "clip_i": 0.803,
        "clip_t": 0.305,
    }
]

# With markup in it, which the report must show as text.
PROMPT = "a photo of sks {category} on a <b>wooden</b> table, scene {i}"
TINY_BACKBONES = {
    "eval_clip": "tiny:eval_clip",
    "eval_dino": "tiny:eval_dino",
    "inception": "tiny:inception",
}


def _png(rng: np.random.Generator, colour: tuple[int, int, int], size: int) -> bytes:
    """A scene-like image: a soft background and the product as a coloured block."""
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = rng.integers(150, 235, 3, dtype=np.uint8)
    rgb[: size // 2] = np.minimum(rgb[: size // 2].astype(int) + 20, 255).astype(np.uint8)
    a, b = rng.integers(size // 8, size // 3, 2)
    rgb[a : a + size // 2, b : b + size // 2] = colour
    return encode_png(rgb)


def _stats(values: list[float], rng: np.random.Generator) -> dict:
    mean = float(np.mean(values))
    half = float(rng.uniform(0.01, 0.05))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(values)}


def write_evaluation(
    root: Path,
    *,
    products: dict[str, tuple[str, tuple[int, int, int]]],
    images_per_run: int = 3,
    kept_per_run: int = 2,
    size: int = 24,
    references: dict[str, list[str]] | None = None,
    published: list[dict] | None = None,
    backbones: dict[str, str] | None = None,
    prompt: Callable[[str, int], str] = PROMPT.format,
    seed: int = 0,
) -> Path:
    """Write an evaluation output under ``root`` -> root.

    ``products``: product id -> (category, colour). Run "restage" scores a little higher than
    "baseline". Seg metrics are null for the first product (no masks); the baseline's first
    image of the last product failed (no image, an error); the baseline's FID is refused.
    ``references``: product id -> existing reference photo URIs (default: PNGs written here).
    ``prompt``: (category=, i=) -> the prompt of image ``i``.
    ``backbones``: role -> source as the summary names them (default: the tiny roles).
    """
    rng = np.random.default_rng(seed)
    layout = EvaluationLayout(str(root))
    ids = sorted(products)
    per_product_values: dict[str, dict[str, dict[str, float | None]]] = {r: {} for r in RUNS}
    for p_index, pid in enumerate(ids):
        category, colour = products[pid]
        if references and pid in references:
            refs = list(references[pid])
        else:
            refs = []
            for i in range(2):
                uri = str(root / "refs" / pid / f"{i}.png")
                storage.write_bytes(uri, _png(rng, colour, size))
                refs.append(uri)
        image_rows, product_rows = [], []
        for r_index, run in enumerate(RUNS):
            sums: dict[str, list[float]] = {m: [] for m in METRICS}
            errors = 0
            for i in range(images_per_run):
                image_id = f"{i:04d}"
                failed = run == "baseline" and p_index == len(ids) - 1 and i == 0
                uri = None
                if not failed:
                    path = root / "runs" / run / "generations" / "images" / pid / f"{image_id}.png"
                    storage.write_bytes(str(path), _png(rng, colour, size))
                    uri = path.as_uri()  # absolute URIs, as evaluate writes them
                scores = {}
                for m in METRICS:
                    if failed or (m.startswith("seg_") and p_index == 0):
                        scores[m] = None
                    else:
                        scores[m] = float(rng.uniform(0.45, 0.8) - 0.08 * r_index)
                        sums[m].append(scores[m])
                errors += failed
                image_rows.append(
                    {
                        "run": run,
                        "product_id": pid,
                        "category": category,
                        "image_id": image_id,
                        "image_uri": uri,
                        "prompt": prompt(category=category, i=i),
                        "rank": None if failed else i + 1,  # 1 = best, as generate writes
                        "kept": (not failed) and i < kept_per_run,
                        **scores,
                        "error": "generation failed: out of memory" if failed else None,
                    }
                )
            means = {m: (float(np.mean(v)) if v else None) for m, v in sums.items()}
            per_product_values[run][pid] = means
            product_rows.append(
                {
                    "run": run,
                    "product_id": pid,
                    "category": category,
                    "n_images": images_per_run - errors,
                    "n_errors": errors,
                    **means,
                    "reference_uris": refs,
                }
            )
        storage.write_parquet(
            layout.per_image(pid), pa.Table.from_pylist(image_rows, schema=EVAL_IMAGE_SCHEMA)
        )
        storage.write_parquet(
            layout.per_product(pid),
            pa.Table.from_pylist(product_rows, schema=EVAL_PRODUCT_SCHEMA),
        )

    def aggregate(values: dict[str, dict[str, float | None]], only: set[str] | None = None):
        out = {}
        for m in METRICS:
            v = [
                x[m]
                for pid, x in values.items()
                if x[m] is not None and (only is None or pid in only)
            ]
            out[m] = _stats(v, rng) if v else {"mean": None, "lo": None, "hi": None, "n": 0}
        return out

    categories = sorted({c for c, _ in products.values()})
    summary = {
        "runs": {run: f"file://{root}/runs/{run}" for run in RUNS},
        "run_order": list(RUNS),
        "references": f"{root}/references.jsonl",
        "clip_t_text": "class",
        "metrics": METRICS,
        "backbones": backbones or TINY_BACKBONES,
        "comparable": False,
        "confidence": 0.95,
        "bootstrap_samples": 1000,
        "products": len(ids),
        "images": {run: images_per_run * len(ids) for run in RUNS},
        "errors": {"restage": 0, "baseline": 1},
        "overall": {run: aggregate(per_product_values[run]) for run in RUNS},
        "per_category": {
            run: {
                c: aggregate(per_product_values[run], {p for p in ids if products[p][0] == c})
                for c in categories
            }
            for run in RUNS
        },
        "paired": [
            {
                "a": "restage",
                "b": "baseline",
                "metrics": {
                    m: (
                        _stats(d, rng)
                        if (
                            d := [
                                per_product_values["restage"][p][m]
                                - per_product_values["baseline"][p][m]
                                for p in ids
                                if per_product_values["restage"][p][m] is not None
                                and per_product_values["baseline"][p][m] is not None
                            ]
                        )
                        else {"mean": None, "lo": None, "hi": None, "n": 0}
                    )
                    for m in METRICS
                },
            }
        ],
        "distribution": {
            "restage": {
                "fid": 123.4,
                "kid_mean": 0.0123,
                "kid_std": 0.0021,
                "n_generated": images_per_run * len(ids),
                "n_reference": 2 * len(ids),
                "kid_subset_size": 2 * len(ids),
                "refused": None,
            },
            "baseline": {
                "fid": None,
                "kid_mean": None,
                "kid_std": None,
                "n_generated": images_per_run * len(ids) - 1,
                "n_reference": 2 * len(ids),
                "refused": f"{images_per_run * len(ids) - 1} generated images, below the minimum of "
                f"{images_per_run * len(ids) + 50}",
            },
        },
        "published": PUBLISHED if published is None else published,
    }
    storage.write_json(layout.tables(), summary)  # sorts keys: run_order keeps the runs' order
    return root
