"""What sizing the duplicate-id shuffle by the manifest saves: a job's manifest read as a
Ray Data dataset (read, validate, keep the first of each product id), alternated, each on a
fresh local Ray (tiny profile's settings) as a job starts one:

- ``default``: a shuffle by product id into Ray Data's default partitions (200);
- ``one shuffled``: a shuffle into one partition per 32 MiB of manifest, which a manifest
  below that shuffles into one (what restage did before);
- ``sized``: ``records.manifest_dataset`` as it is: the same partitions, and a manifest of one
  partition deduplicated by its reading task, without a shuffle.

The 3 example products are read first (a job's intake), then again on the same Ray, then
10^4 products made from them. Also checks that all keep the same rows. Writes JSON to
bench/results/.

    python bench/intake_shuffle.py              # 3 Rays of each
    python bench/intake_shuffle.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import example_manifest, machine  # noqa: E402
from ray_app import records  # noqa: E402
from ray_app.report import format_table  # noqa: E402

LABELS = ("default", "one shuffled", "sized")


def shuffled(uri: str, errors: str) -> Any:
    """The manifest read with a shuffle whatever its partitions (``manifest_dataset`` before
    a one-partition manifest was deduplicated in its reading task)."""
    import ray

    kwargs = {"job": "augment", "errors_dir": records.manifest_errors_dir(errors)}
    ds = ray.data.from_items([{"uri": uri}]).map_batches(
        records.read_chunks, fn_kwargs=kwargs, batch_size=1, batch_format="pyarrow"
    )
    return ds.groupby("key", num_partitions=records.shuffle_partitions(uri)).map_groups(
        records.first_of_each_id, fn_kwargs=kwargs, batch_format="pyarrow"
    )


def sized(partitions: int) -> int:
    """The shuffle partitions of ``manifest_dataset``: 0 (none) where one would do."""
    return partitions if partitions > 1 else 0


def read(uri: str, errors: str, label: str, sized_bytes: int) -> tuple[float, list[tuple]]:
    """One read of setting ``label`` (module doc) -> (seconds, its rows' (key, status))."""
    # 1 byte a partition: Ray Data's default, the cap
    records.MANIFEST_BYTES_PER_PARTITION = 1 if label == "default" else sized_bytes
    start = time.perf_counter()
    if label == "one shuffled":
        ds = shuffled(uri, errors)
    else:
        ds = records.manifest_dataset(uri, "augment", errors)
    rows = ds.select_columns(["key", "status"]).take_all()
    return time.perf_counter() - start, sorted((r["key"], r["status"]) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/intake_shuffle_cpu.json")
    args = ap.parse_args()
    import ray
    from ray.data import DataContext

    from ray_app import runtime
    from ray_app.config import load_config

    config = load_config("tiny", overrides=["ray.progress_bars=false", "ray.dashboard=false"])
    sized_bytes = records.MANIFEST_BYTES_PER_PARTITION
    times: dict[str, dict[str, list[float]]] = {}
    rows: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as work:
        tmp = Path(work)
        examples = str(ROOT / "examples" / "products.jsonl")
        manifests = {
            "examples, first read (a job's intake)": examples,
            "examples, again on the same Ray": examples,
            "10^4 products": str(example_manifest(10_000, "p", tmp / "m4.jsonl")),
        }
        for i in range(args.repeats):  # alternated: drift on a shared machine hits both
            for label in LABELS if i % 2 == 0 else LABELS[::-1]:
                runtime.init_ray(config)  # a fresh local Ray, as each `restage` job starts
                for name, uri in manifests.items():
                    seconds, kept = read(uri, str(tmp / f"e-{label}-{i}"), label, sized_bytes)
                    times.setdefault(name, {}).setdefault(label, []).append(round(seconds, 2))
                    rows.setdefault(name, {}).setdefault(label, kept)
                ray.shutdown()
        default = DataContext.get_current().default_hash_shuffle_parallelism
        records.MANIFEST_BYTES_PER_PARTITION = sized_bytes
        results = {
            name: {
                "bytes": Path(uri).stat().st_size,
                "partitions": {
                    "default": default,
                    "one shuffled": records.shuffle_partitions(uri),
                    # 0: no shuffle, deduplicated by the reading task
                    "sized": sized(records.shuffle_partitions(uri)),
                },
                "seconds": times[name],
                "median_seconds": {
                    k: round(statistics.median(v), 2) for k, v in times[name].items()
                },
                "same_rows": all(rows[name][k] == rows[name]["default"] for k in LABELS),
            }
            for name, uri in manifests.items()
        }
    result = {
        "bench": "intake_shuffle",
        "machine": machine("cpu"),
        "what": "a manifest read to the end on a fresh local Ray (tiny profile: 4 logical "
        "CPUs on the machine's cores): a shuffle into Ray Data's default partitions, a "
        "shuffle into one per 32 MiB of manifest, and records.manifest_dataset (the same "
        "partitions; one partition deduplicated in the reading task, no shuffle)",
        "repeats": args.repeats,
        "manifests": results,
    }
    table = [
        [
            name,
            r["bytes"],
            label,
            r["partitions"][label],
            r["median_seconds"][label],
            r["same_rows"],
        ]
        for name, r in results.items()
        for label in LABELS
    ]
    print(format_table(["manifest", "bytes", "shuffle", "partitions", "seconds", "same"], table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
