"""Benchmark `restage augment`: products/s of the Ray pipeline vs the same stages called in
a plain sequential loop in one process, in one run; writes JSON to bench/results/.

    python bench/augment.py                       # 200 products, tiny profile, CPU
    python bench/augment.py --products 20 --sequential-products 5

The tiny profile measures the plumbing (Ray Data scheduling, serialisation, I/O) with
random-weight tiny models; it says nothing about GPU throughput of real models.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import example_manifest, machine  # noqa: E402
from pipelines import augment as job  # noqa: E402
from ray_app import storage  # noqa: E402
from ray_app.config import load_config  # noqa: E402
from ray_app.records import ProductRecord, read_manifest, records_table  # noqa: E402
from ray_app.report import format_table  # noqa: E402
from ray_app.sources import SourcePolicy  # noqa: E402


class MemoryPeak:
    """Peak system memory in use while the block runs (all processes: driver and Ray)."""

    def __enter__(self):
        self.base = psutil.virtual_memory().used
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


def run_sequential(records: list[ProductRecord], config, root: str, policy: SourcePolicy) -> dict:
    """The same stage classes, one product at a time, in this process, models loaded once."""
    start = time.perf_counter()
    stages = [cls(config) for cls, _ in job.model_stages(config)]
    setup = time.perf_counter() - start
    table = records_table(records)
    start = time.perf_counter()
    for i in range(table.num_rows):
        row = table.slice(i, 1).to_pydict()
        batch = {k: np.array(v, dtype=object) for k, v in row.items()}
        batch = job.decode_products(batch, config, policy, root)
        for stage in stages:
            batch = stage(batch)
        batch = job.select_products(batch, config)
        job.write_products(batch, config, root)
    work = time.perf_counter() - start
    return {
        "products": len(records),
        "setup_s": setup,
        "work_s": work,
        "wall_s": setup + work,
        "products_per_s": len(records) / (setup + work),
        "products_per_s_excl_setup": len(records) / work,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--products", type=int, default=200, help="products through the Ray pipeline"
    )
    parser.add_argument(
        "--sequential-products",
        type=int,
        default=20,
        help="products through the sequential loop (a rate: fewer is enough)",
    )
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument(
        "--out", default=None, help="work folder (default: a temporary one, removed)"
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "augment_tiny_cpu.json"))
    args = parser.parse_args()

    # The bench manifest names the example images by absolute path, outside its own folder.
    allow = f"storage.allowed_sources=[{ROOT / 'examples'}]"
    config = load_config(
        args.profile, overrides=["ray.progress_bars=false", allow, *args.overrides]
    )
    work = Path(args.out or tempfile.mkdtemp(prefix="restage-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = example_manifest(args.products, "bench", work / "products.jsonl")
    records = read_manifest(str(manifest)).records

    with MemoryPeak() as seq_mem:
        sequential = run_sequential(
            records[: args.sequential_products],
            config,
            str(work / "sequential"),
            SourcePolicy.for_manifest(str(manifest), config.storage),
        )
    sequential["peak_memory_gib"] = round(seq_mem.peak_gib, 2)

    with MemoryPeak() as ray_mem:
        start = time.perf_counter()
        summary = job.augment(config, str(manifest), str(work / "ray"))
        wall = time.perf_counter() - start
    done = summary.products["ok"] + summary.products["partial"]
    ray_result = {
        "products": done,
        "failed": summary.products["failed"],
        "wall_s": wall,
        "products_per_s": done / wall,
        "peak_memory_gib": round(ray_mem.peak_gib, 2),
        "stages": summary.to_dict()["stages"],
    }
    kept = storage.read_parquet(str(work / "ray" / "manifest")).to_pandas()
    result = {
        "benchmark": "augment",
        "profile": args.profile,
        "machine": machine(),
        "config": {
            "ray.num_cpus": config.ray.num_cpus,
            "object_store_mb": config.ray.object_store_mb,
            "data_object_store_limit_mb": config.ray.data_object_store_limit_mb,
        },
        "sequential": sequential,
        "ray": ray_result,
        "speedup_ray_vs_sequential": ray_result["products_per_s"] / sequential["products_per_s"],
        "samples_per_product": round(len(kept) / max(1, done), 1),
        "kept_per_product": round(int(kept.kept.sum()) / max(1, done), 1),
    }
    print(
        format_table(
            ["mode", "products", "wall s", "products/s", "peak memory GiB"],
            [
                [
                    "sequential loop",
                    sequential["products"],
                    f"{sequential['wall_s']:.1f}",
                    f"{sequential['products_per_s']:.3f}",
                    sequential["peak_memory_gib"],
                ],
                [
                    "ray data",
                    done,
                    f"{wall:.1f}",
                    f"{ray_result['products_per_s']:.3f}",
                    ray_result["peak_memory_gib"],
                ],
            ],
        )
    )
    print(
        f"speed-up {result['speedup_ray_vs_sequential']:.2f}x; "
        f"sequential without model set-up: {sequential['products_per_s_excl_setup']:.3f} products/s"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
