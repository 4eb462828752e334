"""What sizing the duplicate-id shuffle by the manifest saves: a job's manifest read as a
Ray Data dataset (read, validate, shuffle by product id, keep the first of each id), with
Ray Data's default partitions (200) and with ``records.shuffle_partitions`` (one per 32 MiB
of manifest), alternated, each on a fresh local Ray (tiny profile's settings) as a job
starts one: the 3 example products read first (a job's intake), then again on the same Ray,
then 10^4 products made from them. Also checks that both keep the same rows. Writes JSON
to bench/results/.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import example_manifest, machine  # noqa: E402
from ray_app import records  # noqa: E402
from ray_app.report import format_table  # noqa: E402


def read(uri: str, errors: str, per_partition: int) -> tuple[float, list[tuple]]:
    """One read with ``per_partition`` manifest bytes per shuffle partition (1: Ray Data's
    default, the cap) -> (seconds, its rows' (key, status))."""
    records.MANIFEST_BYTES_PER_PARTITION = per_partition
    start = time.perf_counter()
    rows = records.manifest_dataset(uri, "augment", errors).select_columns(["key", "status"])
    rows = rows.take_all()
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
            for label, per in (("default", 1), ("sized", sized_bytes)):
                runtime.init_ray(config)  # a fresh local Ray, as each `restage` job starts
                for name, uri in manifests.items():
                    seconds, kept = read(uri, str(tmp / f"e-{label}-{i}"), per)
                    times.setdefault(name, {}).setdefault(label, []).append(round(seconds, 2))
                    rows.setdefault(name, {}).setdefault(label, kept)
                ray.shutdown()
        default = DataContext.get_current().default_hash_shuffle_parallelism
        records.MANIFEST_BYTES_PER_PARTITION = sized_bytes
        results = {
            name: {
                "bytes": Path(uri).stat().st_size,
                "partitions": {"default": default, "sized": records.shuffle_partitions(uri)},
                "seconds": times[name],
                "median_seconds": {
                    k: round(statistics.median(v), 2) for k, v in times[name].items()
                },
                "same_rows": rows[name]["default"] == rows[name]["sized"],
            }
            for name, uri in manifests.items()
        }
    result = {
        "bench": "intake_shuffle",
        "machine": machine("cpu"),
        "what": "records.manifest_dataset read to the end on a fresh local Ray (tiny "
        "profile: 4 logical CPUs on the machine's cores), Ray Data's default shuffle "
        "partitions against one per 32 MiB of manifest",
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
        for label in ("default", "sized")
    ]
    print(format_table(["manifest", "bytes", "shuffle", "partitions", "seconds", "same"], table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
