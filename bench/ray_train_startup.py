"""The fixed cost Ray Train adds to every `restage train` job: wall seconds of ``fit()`` for
a worker loop that does nothing, with ``TorchTrainer`` (a torch process group on the
workers: what the job used before) against ``DataParallelTrainer`` without a backend (what
it uses now: its workers train independent products and never communicate), alternated on
one local Ray; each with Ray Train's default controller health check (every 2 s: a finished
loop waits up to that long to be noticed) and with restage's (``RAY_TRAIN_HEALTH_CHECK_
INTERVAL_S`` = ``ray_app.runtime.TRAIN_HEALTH_CHECK_S``), each setting in its own Ray (the
controller reads it at start); a plain Ray actor importing torch is the floor. Writes JSON
to bench/results/.

    python bench/ray_train_startup.py                 # 1 worker, 3 repeats
    python bench/ray_train_startup.py --workers 2 --repeats 5
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

HEALTH = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _noop(config: dict) -> None:
    import torch  # noqa: F401  (a real worker imports it too)


def fit_seconds(kind: str, workers: int, storage: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    cls = TorchTrainer if kind == "TorchTrainer" else DataParallelTrainer
    start = time.perf_counter()
    cls(
        _noop,
        train_loop_config={},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=storage, name=f"{kind}-{time.time_ns()}"),
    ).fit()
    return time.perf_counter() - start


def actor_seconds() -> float:
    import ray

    @ray.remote(num_cpus=1)
    class Worker:
        def ready(self) -> bool:
            import torch  # noqa: F401

            return True

    start = time.perf_counter()
    worker = Worker.remote()
    ray.get(worker.ready.remote())
    seconds = time.perf_counter() - start
    ray.kill(worker)
    return seconds


def measure(workers: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each kind in this process's own Ray (the environment decides the rest)."""
    import ray

    ray.init(num_cpus=max(2, workers), include_dashboard=False, log_to_driver=False)
    kinds = ["TorchTrainer", "DataParallelTrainer"]
    times: dict[str, list[float]] = {k: [] for k in [*kinds, "actor"]}
    with tempfile.TemporaryDirectory() as storage:
        fit_seconds("DataParallelTrainer", workers, storage)  # warm-up: imports, pools
        for _ in range(repeats):  # alternated: drift on a shared machine hits both
            for kind in kinds:
                times[kind].append(fit_seconds(kind, workers, storage))
            times["actor"].append(actor_seconds())
    ray.shutdown()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/ray_train_startup.json")
    args = ap.parse_args()
    if args.child:  # one setting, in its own Ray: print the seconds for the parent
        print("RESULT " + json.dumps(measure(args.workers, args.repeats)), flush=True)
        return

    import ray

    from ray_app.runtime import TRAIN_HEALTH_CHECK_S

    settings = {
        "ray default (2 s)": None,
        f"restage ({TRAIN_HEALTH_CHECK_S} s)": TRAIN_HEALTH_CHECK_S,
    }
    runs = {}
    for label, interval in settings.items():
        env = {k: v for k, v in os.environ.items() if k != HEALTH}
        if interval is not None:
            env[HEALTH] = str(interval)
        cmd = [sys.executable, __file__, "--child", f"--workers={args.workers}",
               f"--repeats={args.repeats}"]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        runs[label] = json.loads(out.split("RESULT ", 1)[1])
    median = {
        label: {k: round(statistics.median(v), 2) for k, v in times.items()}
        for label, times in runs.items()
    }
    before = median["ray default (2 s)"]["TorchTrainer"]
    after = median[f"restage ({TRAIN_HEALTH_CHECK_S} s)"]["DataParallelTrainer"]
    result = {
        "bench": "ray_train_startup",
        "machine": machine("cpu"),
        "ray": ray.__version__,
        "workers": args.workers,
        "repeats": args.repeats,
        "median_seconds": median,
        "all_seconds": {
            label: {k: [round(x, 2) for x in v] for k, v in times.items()}
            for label, times in runs.items()
        },
        "before_seconds": before,
        "after_seconds": after,
        "saved_per_job_seconds": round(before - after, 2),
    }
    rows = [
        [label, m["TorchTrainer"], m["DataParallelTrainer"], m["actor"]]
        for label, m in median.items()
    ]
    print(format_table(["health check", "TorchTrainer", "DataParallelTrainer", "actor"], rows))
    print(f"fixed cost per job: {before} s before, {after} s after")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
