"""What fusing CPU model stages saves (``ray.fuse_cpu_stages``): the README's `restage
augment` and `restage stage` examples on the three example products (tiny profile, each
job its own local Ray), run with a pool per model stage and with the stages fused in one
pool, alternated; wall seconds of the whole command, the worker processes its Ray started
(one log file each), and whether both runs kept the same samples. Writes JSON to
bench/results/.

    python bench/fused_stages.py              # 2 runs of each
    python bench/fused_stages.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from ray_app import storage  # noqa: E402
from ray_app.report import format_table  # noqa: E402

RESTAGE = str(Path(sys.executable).with_name("restage"))
COMMON = ["--profile", "tiny", "--set", "ray.progress_bars=false"]
SETTINGS = {"a pool per stage": "false", "fused": "true"}


def run(args: list[str], out: Path, fused: str) -> dict[str, float]:
    """One job -> its wall seconds and the worker processes Ray started."""
    cmd = [RESTAGE, *args, "--out", str(out), *COMMON, "--set", f"ray.fuse_cpu_stages={fused}"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    workers = len(list((out / "_ray_logs").glob("worker-*.out")))
    return {"seconds": round(seconds, 1), "workers": workers}


def kept(manifest: Path, columns: tuple[str, ...]) -> list[tuple]:
    rows = storage.read_parquet(str(manifest)).to_pylist()
    return sorted(tuple(r.get(c) for c in columns) for r in rows if r["kept"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/fused_stages_cpu.json")
    args = ap.parse_args()
    runs: dict[str, dict[str, list]] = {"augment": {}, "stage": {}}
    same: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as work:
        tmp = Path(work)
        catalog = ["index", "--catalog", "examples/products.jsonl"]
        subprocess.run(
            [RESTAGE, *catalog, "--out", str(tmp / "catalog"), *COMMON],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        jobs = {
            "augment": ["augment", "--manifest", "examples/products.jsonl"],
            "stage": [
                *("stage", "--manifest", "examples/products.jsonl"),
                *("--index", str(tmp / "catalog" / "index")),
            ],
        }
        keys = {
            "augment": ("product_id", "sample_id", "kind", "score"),
            "stage": ("product_id", "stage_id", "scene_image_id", "score"),
        }
        outputs: dict[str, dict[str, list]] = {job: {} for job in jobs}
        for i in range(args.repeats):  # alternated: drift on a shared machine hits both
            for job, cmd in jobs.items():
                for label, fused in SETTINGS.items():
                    out = tmp / f"{job}-{i}-{fused}"
                    runs[job].setdefault(label, []).append(run(cmd, out, fused))
                    outputs[job].setdefault(label, []).append(kept(out / "manifest", keys[job]))
        for job, by_label in outputs.items():
            first = next(iter(by_label.values()))[0]
            same[job] = all(o == first for outs in by_label.values() for o in outs)
    median = {
        job: {
            label: {
                k: round(statistics.median(r[k] for r in rs), 1) for k in ("seconds", "workers")
            }
            for label, rs in by_label.items()
        }
        for job, by_label in runs.items()
    }
    result = {
        "bench": "fused_stages",
        "machine": machine("cpu"),
        "jobs": "restage augment / stage --profile tiny on examples/products.jsonl (3 products)",
        "repeats": args.repeats,
        "median": median,
        "all": runs,
        "same_kept_samples": same,
        "saved_seconds_per_job": {
            job: round(m["a pool per stage"]["seconds"] - m["fused"]["seconds"], 1)
            for job, m in median.items()
        },
    }
    rows = [
        [job, label, m["seconds"], m["workers"], same[job]]
        for job, by_label in median.items()
        for label, m in by_label.items()
    ]
    print(format_table(["job", "model stages", "seconds", "worker processes", "same kept"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
