"""What Ray Data's parquet footer readers cost a small job: `restage index` on the README's
example catalog (tiny profile, its own local Ray of 4 CPUs), run with Ray Data's default of
32 FooterReader actors per read_parquet and with restage's (``ray_app.runtime.footer_readers``:
one per 4 CPUs), alternated; wall seconds of the whole command and the worker processes its
Ray started (one log file each). Writes JSON to bench/results/.

    python bench/footer_readers.py              # 2 runs of each
    python bench/footer_readers.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from ray_app.report import format_table  # noqa: E402
from ray_app.runtime import FOOTER_READERS_ENV, FOOTER_READERS_MAX  # noqa: E402

RESTAGE = str(Path(sys.executable).with_name("restage"))


def run_index(out: Path, readers: int | None) -> dict[str, float]:
    """One `restage index` run -> its wall seconds and the worker processes Ray started."""
    env = {k: v for k, v in os.environ.items() if k != FOOTER_READERS_ENV}
    if readers is not None:
        env[FOOTER_READERS_ENV] = str(readers)
    cmd = [RESTAGE, "index", "--profile", "tiny", "--catalog", "examples/products.jsonl"]
    cmd += ["--out", str(out), "--set", "ray.progress_bars=false"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    workers = len(list((out / "_ray_logs").glob("worker-*.out")))
    return {"seconds": round(seconds, 1), "workers": workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/footer_readers_cpu.json")
    args = ap.parse_args()
    settings = {f"ray default ({FOOTER_READERS_MAX})": FOOTER_READERS_MAX, "restage": None}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in settings}
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.repeats):  # alternated: drift on a shared machine hits both
            for label, readers in settings.items():
                out = Path(work) / f"{i}-{readers}"
                runs[label].append(run_index(out, readers))
    median = {
        label: {k: round(statistics.median(r[k] for r in rs), 1) for k in ("seconds", "workers")}
        for label, rs in runs.items()
    }
    before, after = median[f"ray default ({FOOTER_READERS_MAX})"], median["restage"]
    result = {
        "bench": "footer_readers",
        "machine": machine("cpu"),
        "job": "restage index --profile tiny --catalog examples/products.jsonl (3 products)",
        "repeats": args.repeats,
        "median": median,
        "all": runs,
        "saved_seconds_per_job": round(before["seconds"] - after["seconds"], 1),
        "fewer_worker_processes": before["workers"] - after["workers"],
    }
    rows = [[label, m["seconds"], m["workers"]] for label, m in median.items()]
    print(format_table(["footer readers", "seconds", "worker processes"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
