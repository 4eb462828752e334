"""What a Ray Data pipeline costs its driver per block: the driver's RSS growth while it
iterates a trivial ``map_batches`` over N rows, with one row per block (as augment and
generate stream products after their intake: a product per block) against the same rows
in blocks of ``--rows-per-block`` (the baseline), each case in a fresh process and a fresh
local Ray. bench/scale.py saw augment's and generate's drivers grow ~5.7 KiB per product
from 10^3 to 10^4 products and train's (which iterates no blocks on the driver) stay flat;
this isolates Ray Data's share. Writes JSON to bench/results/.

``--successive N`` measures instead the same rows, one row per block, fed as one dataset
against N datasets one after the other (what ``ray.rows_per_dataset`` does to a job's
products), each case in a fresh process: whether a finished dataset gives its per-block
memory back, and what it does to the time.

    python bench/ray_data_driver_rss.py                    # 10^3 and 10^4 rows
    python bench/ray_data_driver_rss.py --sizes 1000 10000 30000
    python bench/ray_data_driver_rss.py --sizes 15000 --successive 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SAMPLE_S = 0.2


def measure(rows: int, rows_per_block: int, cpus: int, datasets: int = 1) -> dict:
    """One case, in this process: the driver's RSS before the pipeline and its peak; the
    rows split over ``datasets`` datasets run one after the other (the RSS after each)."""
    import gc

    import psutil
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(SAMPLE_S):
            peak = max(peak, proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    seen, after = 0, []
    part = rows // datasets
    for _ in range(datasets):
        blocks = max(1, part // rows_per_block)
        ds = ray.data.range(part, override_num_blocks=blocks).map_batches(
            lambda b: b, batch_size=None
        )
        seen += sum(len(b["id"]) for b in ds.iter_batches(batch_size=16, batch_format="numpy"))
        del ds
        gc.collect()
        after.append(round((proc.memory_info().rss - base) / 2**20, 1))
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak = max(peak, proc.memory_info().rss)
    ray.shutdown()
    assert seen == part * datasets, f"{seen} rows came out of {part * datasets}"
    return {
        "rows": part * datasets,
        "rows_per_block": rows_per_block,
        "blocks": max(1, part // rows_per_block) * datasets,
        "datasets": datasets,
        "rss_before_mib": round(base / 2**20, 1),
        "rss_peak_mib": round(peak / 2**20, 1),
        "rss_growth_mib": round((peak - base) / 2**20, 1),
        "rss_growth_after_each_dataset_mib": after,
        "seconds": round(seconds, 1),
    }


def run_case(rows: int, rows_per_block: int, cpus: int, datasets: int = 1) -> dict:
    """One case in a fresh process (a fresh Ray and a fresh driver heap)."""
    out = subprocess.run(
        [sys.executable, __file__, "--case", str(rows), str(rows_per_block), "--cpus", str(cpus),
         "--datasets", str(datasets)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def successive(sizes: list[int], datasets: int, cpus: int, results: Path) -> int:
    cases = []
    for n in sizes:
        for k in (1, datasets):
            case = run_case(n, 1, cpus, k)
            cases.append(case)
            print(
                f"{n:>8} rows, one per block, in {k} dataset(s): driver RSS "
                f"+{case['rss_growth_mib']} MiB (after each: "
                f"{case['rss_growth_after_each_dataset_mib']}), {case['seconds']} s"
            )
    result = {"benchmark": "ray-data-driver-rss-successive", "machine": machine(), "cases": cases}
    results.mkdir(parents=True, exist_ok=True)
    path = results / "ray_data_driver_rss_successive_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def slope_kib(cases: list[dict], per: str) -> float | None:
    """KiB of driver RSS per ``per`` (rows or blocks) from the smallest case to the largest."""
    a, b = cases[0], cases[-1]
    if b[per] == a[per]:
        return None
    return round((b["rss_growth_mib"] - a["rss_growth_mib"]) * 1024 / (b[per] - a[per]), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rows-per-block", type=int, default=100, help="the baseline's blocks")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--case", type=int, nargs=2, metavar=("ROWS", "ROWS_PER_BLOCK"))
    parser.add_argument("--datasets", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--successive", type=int, metavar="N", help="one dataset vs N successive ones"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure(*args.case, args.cpus, args.datasets)))
        return 0
    if args.successive:
        if args.successive < 2:
            parser.error(f"--successive {args.successive}: give 2 or more datasets")
        return successive(sorted(args.sizes), args.successive, args.cpus, args.results)
    if any(n < 1 for n in args.sizes) or args.rows_per_block < 1:
        parser.error("--sizes and --rows-per-block: give positive integers")
    sizes = sorted(args.sizes)
    one = [run_case(n, 1, args.cpus) for n in sizes]
    batched = [run_case(n, args.rows_per_block, args.cpus) for n in sizes]
    result = {
        "benchmark": "ray-data-driver-rss",
        "machine": machine(),
        "one_row_per_block": one,
        "baseline": batched,
        "kib_per_row": {
            "one_row_per_block": slope_kib(one, "rows"),
            "baseline": slope_kib(batched, "rows"),
        },
        "kib_per_block": {
            "one_row_per_block": slope_kib(one, "blocks"),
            "baseline": slope_kib(batched, "blocks"),
        },
    }
    for case in one + batched:
        print(
            f"{case['rows']:>8} rows in {case['blocks']:>6} blocks: driver RSS "
            f"+{case['rss_growth_mib']} MiB (peak {case['rss_peak_mib']}), {case['seconds']} s"
        )
    print(f"KiB of driver RSS per row: {result['kib_per_row']}")
    print(f"KiB of driver RSS per block: {result['kib_per_block']}")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "ray_data_driver_rss_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
