"""Benchmark restage at catalog scale: `restage augment`, `train` and `generate` over N
products (10^3, then 10^4) on the tiny profile at its smallest sizes (bench/scale.yaml), on
one Ray head this script starts. Writes one JSON per size to bench/results/.

    python bench/scale.py                                   # 1000 then 10000, all three jobs
    python bench/scale.py --sizes 1000 --jobs augment       # what fits
    python bench/scale.py --row-bytes                       # bytes a product's row carries

Per job it records, for the job's driver (the `restage` CLI process, run as a subprocess
with RAY_ADDRESS set, RSS sampled every --sample-s): peak RSS; the Ray object store's peak
(the raylet's `object_store_bytes_used`, sampled at the same rate); seconds per product
(wall of the command, Ray's start not included: the head is up before); and the time from
the command's start to the first product's completion marker. Growth from the smallest size
to each larger one is in the larger size's JSON: the driver's RSS may grow at most 10 % and
seconds per product not at all (the issue's bars; `--check` exits 1 when one fails).

`--row-bytes` measures what a product's row carries between augment's stages: the stages
run in this process on a few products (as bench/augment.py's sequential loop) and the
pickled size of the row after each stage is recorded (what Ray Data stores per product
between two operators: the images ride in the rows).

Product photos are procedural (a coloured box on a light background, --image-side px), one
per product, written once per size under --work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from ray_app.storage import AdapterLayout  # noqa: E402

OVERLAY = ROOT / "bench" / "scale.yaml"
RESULTS = ROOT / "bench" / "results"
JOBS = ("augment", "train", "generate")
# The bars, from the smallest size to each larger one.
MAX_RSS_GROWTH = 0.10
MAX_SECONDS_PER_PRODUCT_GROWTH = 0.0


# --------------------------------------------------------------------------- arguments


def check_args(sizes: list[int], jobs: list[str], sample_s: float, image_side: int) -> None:
    """Fail with the argument and the fix before anything starts."""
    if not sizes:
        raise ValueError("--sizes: give at least one catalog size, e.g. --sizes 1000 10000")
    if any(n < 1 for n in sizes):
        raise ValueError(f"--sizes {sizes}: every size must be a positive number of products")
    if sorted(sizes) != sizes or len(set(sizes)) != len(sizes):
        raise ValueError(f"--sizes {sizes}: give distinct sizes in increasing order")
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        raise ValueError(f"--jobs {unknown}: unknown; choose from {', '.join(JOBS)}")
    if list(jobs) != [j for j in JOBS if j in jobs]:
        raise ValueError(
            f"--jobs {jobs}: each job reads the one before: give them in the order {JOBS}"
        )
    if jobs and jobs[0] != "augment":
        raise ValueError(f"--jobs {jobs}: start with augment (train reads its output)")
    if sample_s <= 0:
        raise ValueError(f"--sample-s {sample_s}: must be > 0 seconds, e.g. 0.5")
    if image_side < 16:
        raise ValueError(
            f"--image-side {image_side}: restage rejects images under 16 px; use >= 16"
        )


# --------------------------------------------------------------------------- catalog


def product_id(i: int) -> str:
    return f"p{i:07d}"


def product_photo(i: int, side: int) -> np.ndarray:
    """A product photo: a box of the product's colour on a light plain background, placed
    and sized by the product's index (deterministic)."""
    rng = np.random.default_rng(i)
    img = np.full((side, side, 3), 235, np.uint8)
    w, h = rng.integers(side // 3, side // 2 + 1, 2)
    x, y = rng.integers(1, side - w), rng.integers(1, side - h)
    img[y : y + h, x : x + w] = rng.integers(0, 180, 3)
    return img


def write_catalog(n: int, folder: Path, side: int) -> Path:
    """``n`` products, one procedural PNG each, and their manifest (reused when present)."""
    from PIL import Image

    manifest = folder / "products.jsonl"
    if manifest.exists() and sum(1 for _ in manifest.open()) == n:
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rel = f"images/{product_id(i)}.png"
        Image.fromarray(product_photo(i, side)).save(folder / rel)
        lines.append(
            json.dumps(
                {
                    "product_id": product_id(i),
                    "category": "mug",
                    "title": "Mug",
                    "image_uris": [rel],
                }
            )
        )
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# --------------------------------------------------------------------------- measuring


def growth(small: float, large: float) -> float:
    """Relative growth from ``small`` to ``large`` (0.1 = 10 % more)."""
    return (large - small) / small if small else float("inf") if large else 0.0


def first_marker(out: Path, job: str) -> bool:
    """Whether the job has finished a product: its first completion marker exists."""
    if job == "train":
        return any(
            (d / AdapterLayout.METADATA).exists() for d in _dirs(out) if not d.name.startswith("_")
        )
    done = out / "_done"
    return done.is_dir() and any(done.iterdir())


def _dirs(folder: Path):
    return (Path(e.path) for e in os.scandir(folder) if e.is_dir()) if folder.is_dir() else ()


@dataclass
class Sampler:
    """Samples the driver's RSS (the process and its children that are not Ray's) and the
    object store's use every ``period`` s, and watches ``out`` for the first marker."""

    pid: int
    address: str
    out: Path
    job: str
    period: float
    start: float = field(default_factory=time.perf_counter)
    rss_peak: int = 0
    store_peak: int = 0
    store_samples: list[tuple[float, int, int]] = field(default_factory=list)
    first_s: float | None = None
    done_samples: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self):
        from ray._private.internal_api import get_state_from_address

        self._state = get_state_from_address(self.address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _store(self) -> tuple[int, int]:
        from ray._private.internal_api import get_memory_info_reply

        stats = get_memory_info_reply(self._state, timeout_seconds=10).store_stats
        return stats.object_store_bytes_used, stats.num_local_objects

    def _run(self) -> None:
        proc = psutil.Process(self.pid)
        tick = 0
        while not self._stop.wait(self.period):
            try:
                self.rss_peak = max(self.rss_peak, proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            try:
                used, objects = self._store()
                self.store_peak = max(self.store_peak, used)
                self.store_samples.append((time.perf_counter() - self.start, used, objects))
            except Exception:  # a missed sample (the raylet busy) is skipped
                pass
            tick += 1
            # The marker folder is looked at every 4th tick (2 s at 0.5 s): for the first
            # marker, then for the count of finished products (the steady rate).
            if tick % 4:
                continue
            now = time.perf_counter() - self.start
            if self.first_s is None:
                if first_marker(self.out, self.job):
                    self.first_s = now
            else:
                self.done_samples.append((now, completed(self.out, self.job)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def steady_rate(samples: list[tuple[float, int]], total: int) -> float | None:
    """Products per second between 10 % and 90 % of ``total`` finished, from (seconds,
    finished) samples: the rate once every actor is up and before the tail drains."""
    low = next(((t, c) for t, c in samples if c >= 0.1 * total), None)
    high = next(((t, c) for t, c in samples if c >= 0.9 * total), None)
    if low is None or high is None or high[0] <= low[0]:
        return None
    return (high[1] - low[1]) / (high[0] - low[0])


def marker_times(out: Path, job: str) -> list[float]:
    """The completion markers' modification times, sorted: when each product finished."""
    if job == "train":
        paths = [d / AdapterLayout.METADATA for d in _dirs(out) if not d.name.startswith("_")]
    else:
        paths = list((out / "_done").iterdir()) if (out / "_done").is_dir() else []
    return sorted(p.stat().st_mtime for p in paths if p.exists())


def steady_rate_from_markers(times: list[float]) -> float | None:
    """``steady_rate`` from the markers' times (exact; read once the job has ended)."""
    return steady_rate([(t, i + 1) for i, t in enumerate(times)], len(times))


PROGRESS = re.compile(r"^restage (\w+): (?:done: )?(\d+)/(\d+) products.*, (\d+)s$")


def steady_rate_from_log(text: str) -> float | None:
    """``steady_rate`` from a job's own progress lines (``restage JOB: N/M products ..., Ts``,
    one at most every 30 s), for a run whose markers were not sampled."""
    found = [PROGRESS.match(line) for line in text.splitlines()]
    found = [m for m in found if m]
    if not found:
        return None
    return steady_rate([(float(m[4]), int(m[2])) for m in found], int(found[-1][3]))


def run_job(
    job: str,
    args: list[str],
    out: Path,
    address: str,
    period: float,
    log: Path,
    limit_s: float | None = None,
) -> dict:
    """One `restage JOB` as a subprocess on the bench's Ray head, sampled while it runs;
    after ``limit_s`` it is stopped (SIGTERM) and what it did so far is recorded."""
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "ray_app.cli", job, *args]
    print("$", " ".join(cmd), flush=True)
    start, started_at = time.perf_counter(), time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        sampler = Sampler(proc.pid, address, out, job, period, start=start)
        stopped = False
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stopped = True
            proc.terminate()
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        sampler.stop()
    wall = time.perf_counter() - start
    if sampler.first_s is None and first_marker(out, job):
        sampler.first_s = wall  # finished between two looks
    text = log.read_text()
    tail = text.splitlines()[-1:] or [""]
    total = max([c for _, c in sampler.done_samples] + [completed(out, job)])
    steady = steady_rate(sampler.done_samples, total)
    logged = steady_rate_from_log(text)
    times = marker_times(out, job)
    exact = steady_rate_from_markers(times)
    return {
        "command": " ".join(["restage", job, *args]),
        "exit_status": rc,
        "stopped_at_limit_s": limit_s if stopped else None,
        "last_line": tail[0],
        "wall_s": round(wall, 2),
        "driver_peak_rss_mib": round(sampler.rss_peak / 2**20, 1),
        "object_store_peak_mib": round(sampler.store_peak / 2**20, 2),
        "object_store_mean_mib": round(
            float(np.mean([s[1] for s in sampler.store_samples] or [0])) / 2**20, 2
        ),
        "object_store_samples": len(sampler.store_samples),
        "first_product_s": None if sampler.first_s is None else round(sampler.first_s, 1),
        # Once the actors are up (10 % to 90 % of the products): the per-product cost
        # without the start-up, which a larger catalog amortises.
        "steady_products_per_s": None if steady is None else round(steady, 3),
        "steady_products_per_s_from_log": None if logged is None else round(logged, 3),
        "steady_products_per_s_from_markers": None if exact is None else round(exact, 3),
        "first_marker_s": round(times[0] - started_at, 1) if times else None,
        "last_marker_s": round(times[-1] - started_at, 1) if times else None,
    }


def completed(out: Path, job: str) -> int:
    if job == "train":
        return sum(1 for d in _dirs(out) if (d / AdapterLayout.METADATA).exists())
    done = out / "_done"
    return sum(1 for _ in done.iterdir()) if done.is_dir() else 0


# --------------------------------------------------------------------------- the Ray head


class RayHead:
    """A Ray head started for the bench (``ray start --head --block``) with the tiny
    profile's resources; stopped by ending the processes it started, and only those."""

    def __init__(self, work: Path, num_cpus: int, object_store_mb: int, port: int):
        self.address = f"127.0.0.1:{port}"
        # Its own temp dir: `ray start` records its address there, so a plain `ray.init()`
        # elsewhere on the machine (which looks in /tmp/ray) never joins the bench's head.
        temp = work / "ray"
        temp.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--num-cpus={num_cpus}",
            f"--object-store-memory={object_store_mb * 2**20}",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ]
        # restage's health-check patience (README: "a lost node"), for a loaded machine.
        env = {
            **os.environ,
            "RAY_health_check_period_ms": "5000",
            "RAY_health_check_timeout_ms": "30000",
            "RAY_health_check_failure_threshold": "10",
        }
        # A bench head on loopback: no token, so that the sampler's GCS client can connect.
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_ADDRESS", None)
        self.log = (work / "ray-head.log").open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._wait_up()

    def _wait_up(self, timeout: float = 300) -> None:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited with {self.proc.returncode}: see {self.log.name}"
                )
            try:
                get_memory_info_reply(get_state_from_address(self.address), timeout_seconds=5)
                return
            except Exception:  # not up yet
                time.sleep(2)
        raise TimeoutError(f"the Ray head at {self.address} did not come up in {timeout:.0f}s")

    def stop(self) -> None:
        procs = [self.proc.pid]
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        # `ray start --block` ends its processes on SIGTERM; any left after 20 s are killed.
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        _, alive = psutil.wait_procs([p for p in map(_proc, procs) if p is not None], timeout=20)
        for p in alive:
            p.kill()
        self.log.close()


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


# --------------------------------------------------------------------------- row bytes


def row_bytes(products: int, work: Path, profile: str, files: list[str], side: int) -> dict:
    """Pickled bytes of a product's row after each augment stage, stages run in this process
    (bench/augment.py's sequential loop): what one product puts in the object store between
    two operators, images inline."""
    from pipelines import augment as job
    from ray_app.config import load_config
    from ray_app.records import read_manifest, records_table
    from ray_app.sources import SourcePolicy

    config = load_config(profile, files=files, overrides=["ray.progress_bars=false"])
    manifest = write_catalog(products, work / f"rowbytes-{side}px", side)
    records = read_manifest(str(manifest)).records
    policy = SourcePolicy.for_manifest(str(manifest), config.storage)
    stages = [(cls.__name__, cls(config)) for cls, _ in job.model_stages(config)]
    table = records_table(records)
    per_stage: dict[str, list[int]] = {}
    for i in range(table.num_rows):
        row = table.slice(i, 1).to_pydict()
        batch = {k: np.array(v, dtype=object) for k, v in row.items()}
        steps = [("decode", lambda b: job.decode_products(b, config, policy))]
        steps += [(name, stage) for name, stage in stages]
        steps += [("select", lambda b: job.select_products(b, config))]
        for name, fn in steps:
            batch = fn(batch)
            per_stage.setdefault(name, []).append(len(pickle.dumps(batch, protocol=5)))
    means = {name: int(np.mean(v)) for name, v in per_stage.items()}
    return {
        "profile": profile,
        "config_files": files,
        "image_side": side,
        "products": products,
        "bytes_per_product_after_stage": means,
        "max_bytes_per_product": max(means.values()),
    }


# --------------------------------------------------------------------------- main


def outputs(folder: Path) -> dict[str, Path]:
    return {
        "augment": folder / "augment",
        "train": folder / "adapters",
        "generate": folder / "generations",
    }


def run_size(n: int, jobs: list[str], head: RayHead, work: Path, args) -> dict:
    folder = work / f"n{n}"
    t0 = time.perf_counter()
    manifest = write_catalog(n, folder, args.image_side)
    catalog_s = time.perf_counter() - t0
    config = ["--profile", "tiny", "--config", str(args.config)]
    config += [a for s in ["ray.progress_bars=false", *args.overrides] for a in ("--set", s)]
    outs = outputs(folder)
    job_args = {
        "augment": ["--manifest", str(manifest), "--out", str(outs["augment"])],
        "train": ["--data", str(outs["augment"]), "--out", str(outs["train"])],
        "generate": ["--adapters", str(outs["train"]), "--out", str(outs["generate"])],
    }
    result = {"products": n, "catalog_write_s": round(catalog_s, 1), "jobs": {}}
    for job in jobs:
        r = run_job(
            job,
            job_args[job] + config,
            outs[job],
            head.address,
            args.sample_s,
            folder / f"{job}.log",
            args.limit_s,
        )
        r["products_done"] = completed(outs[job], job)
        r["seconds_per_product"] = round(r["wall_s"] / max(1, r["products_done"]), 4)
        r["products_per_s"] = round(r["products_done"] / r["wall_s"], 3)
        result["jobs"][job] = r
        print(json.dumps({job: r}, indent=1), flush=True)
        if r["stopped_at_limit_s"] is not None:
            print(f"{job} stopped at --limit-s {args.limit_s}: {r['products_done']} of {n} done")
            break
        if r["exit_status"] != 0:
            print(
                f"{job} exited {r['exit_status']}: stopping this size (see {folder / f'{job}.log'})"
            )
            break
    return result


def _steady_growth(a: dict, b: dict) -> float | None:
    keys = ("steady_products_per_s_from_markers", "steady_products_per_s")
    rates = [
        next((r[k] for k in (*keys, "steady_products_per_s_from_log") if r.get(k)), None)
        for r in (a, b)
    ]
    return None if None in rates else round(growth(1 / rates[0], 1 / rates[1]), 4)


def compare(small: dict, large: dict) -> dict:
    """Growth of each job's driver RSS and seconds per product from ``small`` to ``large``,
    against the issue's bars."""
    out = {}
    for job, b in large["jobs"].items():
        a = small["jobs"].get(job)
        if a is None or a["exit_status"] or (b["exit_status"] and not b.get("stopped_at_limit_s")):
            continue
        rss = growth(a["driver_peak_rss_mib"], b["driver_peak_rss_mib"])
        spp = growth(a["seconds_per_product"], b["seconds_per_product"])
        out[job] = {
            "from_products": small["products"],
            # A job stopped at --limit-s did part of the catalog: its start-up weighs more
            # in its seconds per product; the steady figures compare like with like.
            "stopped_at_limit": b.get("stopped_at_limit_s") is not None,
            "driver_rss_growth": round(rss, 4),
            "driver_rss_ok": rss <= MAX_RSS_GROWTH,
            "seconds_per_product_growth": round(spp, 4),
            "seconds_per_product_ok": spp <= MAX_SECONDS_PER_PRODUCT_GROWTH,
            "steady_seconds_per_product_growth": _steady_growth(a, b),
            "object_store_peak_growth": round(
                growth(a["object_store_peak_mib"], b["object_store_peak_mib"]), 4
            ),
        }
    return out


def result_path(results: Path, n: int) -> Path:
    return results / f"scale_{n}_tiny_cpu.json"


def smallest_result(results: Path, n: int) -> dict | None:
    """The smallest size's result already in ``results`` below ``n`` (a size run on its own
    is compared with the one before it)."""
    found = sorted(
        (json.loads(p.read_text()) for p in results.glob("scale_*_tiny_cpu.json")),
        key=lambda r: r.get("products", 0),
    )
    found = [r for r in found if r.get("benchmark") == "scale" and r["products"] < n]
    return found[0] if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), help=f"of {', '.join(JOBS)}")
    parser.add_argument("--config", type=Path, default=OVERLAY, help="overlay over tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, default=Path("/tmp/restage-scale"))
    parser.add_argument("--sample-s", type=float, default=0.5, help="sampling period")
    parser.add_argument("--image-side", type=int, default=32, help="procedural photo side, px")
    parser.add_argument("--port", type=int, default=6390, help="the bench's Ray head port")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--limit-s",
        type=float,
        default=None,
        help="stop a job after this many seconds and record what it did (default: no limit)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a growth bar fails")
    parser.add_argument(
        "--row-bytes",
        action="store_true",
        help="measure bytes per product row between augment's stages instead (no Ray)",
    )
    parser.add_argument("--row-products", type=int, default=4)
    parser.add_argument(
        "--reanalyse",
        action="store_true",
        help="recompute the steady rates of --sizes from their outputs under --work",
    )
    args = parser.parse_args(argv)
    try:
        check_args(args.sizes, args.jobs, args.sample_s, args.image_side)
        if args.limit_s is not None and args.limit_s <= 0:
            raise ValueError(f"--limit-s {args.limit_s}: must be > 0 seconds (or left out)")
    except ValueError as exc:
        parser.error(str(exc))
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)

    if args.reanalyse:
        for n in args.sizes:
            path = result_path(args.results, n)
            r = json.loads(path.read_text())
            outs = outputs(args.work / f"n{n}")
            for job, jr in r["jobs"].items():
                rate = steady_rate_from_markers(marker_times(outs[job], job))
                jr["steady_products_per_s_from_markers"] = None if rate is None else round(rate, 3)
            base = smallest_result(args.results, n)
            if base is not None:
                r["growth"] = compare(base, r)
            path.write_text(json.dumps(r, indent=2) + "\n")
            print(f"updated {path}")
        return 0

    if args.row_bytes:
        runs = [
            row_bytes(args.row_products, args.work, "tiny", [str(args.config)], args.image_side),
            row_bytes(args.row_products, args.work, "tiny", [], 128),
        ]
        result = {"benchmark": "scale-row-bytes", "machine": machine(), "runs": runs}
        path = args.results / "scale_row_bytes_tiny_cpu.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(runs, indent=1))
        print(f"wrote {path}")
        return 0

    from ray_app.config import load_config

    cfg = load_config("tiny", files=[str(args.config)], overrides=args.overrides)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the head on the way out
    head = RayHead(args.work, cfg.ray.num_cpus or 4, cfg.ray.object_store_mb or 512, args.port)
    failed = False
    try:
        results: list[dict] = []
        for n in args.sizes:
            r = run_size(n, args.jobs, head, args.work, args)
            r = {
                "benchmark": "scale",
                "profile": "tiny",
                "overlay": str(
                    args.config.relative_to(ROOT)
                    if args.config.is_relative_to(ROOT)
                    else args.config
                ),
                "overrides": args.overrides,
                "machine": machine(),
                "load_average_after": os.getloadavg(),
                **r,
            }
            base = results[0] if results else smallest_result(args.results, n)
            if base is not None:
                r["growth"] = compare(base, r)
                failed |= any(
                    not (g["driver_rss_ok"] and g["seconds_per_product_ok"])
                    for g in r["growth"].values()
                )
            results.append(r)
            path = result_path(args.results, n)
            path.write_text(json.dumps(r, indent=2) + "\n")
            print(f"wrote {path}", flush=True)
    finally:
        head.stop()
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
