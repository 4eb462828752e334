"""What a small job costs end to end, restage as it is against an earlier commit of it, in
the same run: the same CLI commands (tiny profile) run from this tree and from the earlier
commit's files (``git archive`` into a temporary folder), alternated, each job a fresh
process that starts its own local Ray, as a user runs it. The jobs are small, so their
time is mostly what every job pays whatever its size: the plan, Ray's start, the intake
pass, the closing passes, Ray's end.

- ``augment, all invalid``: two records that fail validation: no model runs;
- ``index of the examples``: the 3 example products' photos as a scene catalog (the search
  index and the FID reference at the end);
- ``stage of the examples``: staging them into that index (this tree's index serves both);
- ``train of the examples``: an adapter for each of them, from their augment output (made
  once by this tree, views off, and read by both).

    python bench/job_overhead.py --baseline 426deda            # 3 runs of each
    python bench/job_overhead.py --baseline 426deda --repeats 5
    python bench/job_overhead.py --baseline 0c02008 --jobs train \
        --out bench/results/job_overhead_train_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from ray_app.report import format_table  # noqa: E402

INVALID = [
    {"product_id": "CON", "image_uris": ["a.png"]},
    {"product_id": "../x", "image_uris": ["a.png"]},
]
SETTINGS = ["--profile", "tiny", "--set", "ray.progress_bars=false"]


def checkout(rev: str, folder: Path) -> str:
    """The files of commit ``rev`` under ``folder`` -> its full hash."""
    full = subprocess.run(
        ["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(["git", "archive", full], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return full


def jobs(work: Path) -> dict[str, list[str]]:
    invalid = work / "invalid.jsonl"
    invalid.write_text("".join(json.dumps(r) + "\n" for r in INVALID))
    examples = str(ROOT / "examples" / "products.jsonl")
    index = str(work / "index-for-stage" / "index")
    return {
        "augment, all invalid": ["augment", "--manifest", str(invalid)],
        "index of the examples": ["index", "--catalog", examples],
        "stage of the examples": ["stage", "--manifest", examples, "--index", index],
        "train of the examples": ["train", "--data", str(work / "augment-for-train")],
    }


def job_word(name: str) -> str:
    """A job's name as ``--jobs`` gives it: its first word ("augment, all invalid": augment)."""
    return name.split()[0].rstrip(",")


def inputs(work: Path, every: dict[str, list[str]], chosen: set[str]) -> None:
    """What the ``chosen`` jobs read, made once by this tree: the index that staging reads
    (``every``'s index job), the augment output that training reads."""
    if "stage of the examples" in chosen:
        run(ROOT, every["index of the examples"], work / "index-for-stage")
    if "train of the examples" in chosen:
        examples = str(ROOT / "examples" / "products.jsonl")
        augment = ["augment", "--manifest", examples, "--set", "augment.views.enabled=false"]
        run(ROOT, augment, work / "augment-for-train")


def run(tree: Path, args: list[str], out: Path) -> float:
    """One job from the code under ``tree`` -> wall seconds (failures named)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "ray_app.cli", *args, "--out", str(out), *SETTINGS]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: the all-invalid job fails as it should
        raise RuntimeError(f"{' '.join(args[:1])} from {tree}: {done.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="the earlier commit to compare with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--jobs", nargs="+", help="the jobs to time, by first word (augment index stage train)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/job_overhead_cpu.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {"baseline": work / "baseline", "restage": ROOT}
        baseline = checkout(args.baseline, trees["baseline"])
        every = commands = jobs(work)
        if args.jobs:
            unknown = set(args.jobs) - {job_word(name) for name in every}
            if unknown:
                ap.error(f"--jobs: unknown {sorted(unknown)}; give augment, index, stage, train")
            commands = {n: c for n, c in every.items() if job_word(n) in args.jobs}
        inputs(work, every, set(commands))
        times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in trees} for n in commands}
        for i in range(args.repeats):
            for name, command in commands.items():
                # alternated: drift on a shared machine hits both
                for label in list(trees) if i % 2 == 0 else list(trees)[::-1]:
                    out = work / f"{label}-{i}-{name.split()[0]}"
                    seconds = run(trees[label], command, out)
                    times[name][label].append(round(seconds, 2))
                    print(f"{name:<24} {label:<9} {seconds:6.1f} s", flush=True)
    medians = {
        name: {label: round(statistics.median(v), 2) for label, v in per.items()}
        for name, per in times.items()
    }
    result = {
        "bench": "job_overhead",
        "machine": machine("cpu"),
        "what": "wall seconds of small tiny-profile CLI jobs, each a fresh process with its "
        "own local Ray, from this tree and from the baseline commit, alternated",
        "baseline": baseline,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": medians,
    }
    rows = [
        [name, m["baseline"], m["restage"], round(m["baseline"] - m["restage"], 2)]
        for name, m in medians.items()
    ]
    print(format_table(["job", "baseline s", "restage s", "saved s"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
