"""Fault test of `restage serve`: N clients load 2 generator replicas for S seconds and one
replica process is SIGKILLed at K seconds. Reports responses by status (5xx, and 5xx among
the requests in flight at the kill), latency percentiles, the longest stretch without a
completed request after the kill, and the recovery time (until Serve runs 2 replicas
again); writes JSON to bench/results/.

    python bench/serve_faults.py                       # tiny profile, one trained product
    python bench/serve_faults.py --adapters DIR --products a,b --profile default

The baseline in the same run is the stretch before the kill: its p99 against the p99 of
the requests that overlapped the kill.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from bench.serve_load import start_server  # noqa: E402
from ray_app.storage import AdapterLayout  # noqa: E402

REPLICA_MARK = "ServeReplica:restage:Generator"


def prepare(work: Path, profile: str) -> tuple[Path, list[str]]:
    """One product trained (briefly) on a small synthetic set, without Ray."""
    sys.path.insert(0, str(ROOT / "tests"))
    from trainset import PRODUCTS, write_training_set

    from pipelines.train import ShardTrainer
    from ray_app.config import load_config

    product = sorted(PRODUCTS)[0]
    adapters = work / "adapters"
    if not Path(AdapterLayout(str(adapters)).metadata(product)).exists():
        data = write_training_set(str(work / "aug"), {product: PRODUCTS[product]})
        config = load_config(profile, overrides=["train.steps=2"])
        ShardTrainer(config, data, str(adapters), None).run([product])
    return adapters, [product]


def generator_replicas(server_pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(server_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if REPLICA_MARK in " ".join(p.cmdline()):
                out.append(p)
    return out


async def running_replicas(http: httpx.AsyncClient, url: str) -> int:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        resp = await http.get(f"{url}/healthz")
        if resp.status_code == 200:
            return int(resp.json().get("generator_replicas", 0))
    return 0


async def wait_replicas(url: str, count: int, timeout: float, drop_first: bool = False) -> dict:
    """Seconds until /healthz reports ``count`` running generator replicas; with
    ``drop_first``, first until it reports fewer (Serve noticed the death)."""
    start = time.perf_counter()
    out: dict = {}
    async with httpx.AsyncClient(timeout=5) as http:
        if drop_first:
            while time.perf_counter() - start < timeout:
                if await running_replicas(http, url) < count:
                    out["noticed_s"] = round(time.perf_counter() - start, 3)
                    break
                await asyncio.sleep(0.1)
        while time.perf_counter() - start < timeout:
            if await running_replicas(http, url) >= count:
                out["ready_s"] = round(time.perf_counter() - start, 3)
                break
            await asyncio.sleep(0.25)
    return out


async def run_load(args, url: str, key: str, products: list[str], server_pid: int) -> dict:
    rng = np.random.default_rng(0)
    results: list[dict] = []
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    headers = {"Authorization": f"Bearer {key}"}
    kill: dict = {}

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            body = {
                "product_id": products[int(rng.integers(len(products)))],
                "seed": int(rng.integers(2**31)),
                "num_images": 1,
            }
            start = time.perf_counter()
            try:
                resp = await http.post(f"{url}/v1/generate", json=body, headers=headers)
                status = resp.status_code
            except httpx.HTTPError:
                status = 0  # connection error or timeout
            results.append({"start": start - t0, "end": time.perf_counter() - t0, "status": status})

    async def killer() -> None:
        await asyncio.sleep(args.kill_at)
        victims = generator_replicas(server_pid)
        if not victims:
            kill["error"] = "no generator replica process found"
            return
        victim = victims[0]
        kill["at"] = time.perf_counter() - t0
        kill["pid"] = victim.pid
        victim.send_signal(signal.SIGKILL)
        kill["replaced"] = await wait_replicas(url, args.replicas, args.seconds, drop_first=True)
        kill["replica_processes_after"] = len(generator_replicas(server_pid))

    async with httpx.AsyncClient(timeout=args.request_timeout) as http:
        await asyncio.gather(*(client(http) for _ in range(args.clients)), killer())
    return {"results": results, "kill": kill}


def summarise(raw: dict, seconds: float) -> dict:
    results, kill = raw["results"], raw["kill"]
    at = kill.get("at", float("nan"))
    by_status = Counter(r["status"] for r in results)
    latency = np.array([r["end"] - r["start"] for r in results if r["status"] == 200])
    in_flight = [r for r in results if r["start"] <= at <= r["end"]]
    before = np.array(
        [r["end"] - r["start"] for r in results if r["end"] < at and r["status"] == 200]
    )
    ok_after = sorted(r["end"] for r in results if r["status"] == 200 and r["end"] > at)
    gaps = np.diff([at, *ok_after]) if ok_after else np.array([float("nan")])

    def pct(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 3) if len(a) else None

    return {
        "requests": len(results),
        "by_status": {str(k): v for k, v in sorted(by_status.items())},
        "server_5xx": sum(v for k, v in by_status.items() if k >= 500),
        "connection_errors": by_status.get(0, 0),
        "in_flight_at_kill": len(in_flight),
        "in_flight_at_kill_5xx": sum(
            1 for r in in_flight if r["status"] >= 500 or r["status"] == 0
        ),
        "throughput_rps": round(by_status.get(200, 0) / seconds, 3),
        "p50_s": pct(latency, 50),
        "p99_s": pct(latency, 99),
        "p99_before_kill_s": pct(before, 99),
        "p99_in_flight_at_kill_s": pct(
            np.array([r["end"] - r["start"] for r in in_flight if r["status"] == 200]), 99
        ),
        "kill_at_s": round(at, 3),
        "first_success_after_kill_s": round(ok_after[0] - at, 3) if ok_after else None,
        "longest_stall_after_kill_s": round(float(np.max(gaps)), 3),
        # From the kill until Serve runs all replicas again (noticed_s: until it saw one fewer).
        "recovery_s": kill.get("replaced", {}).get("ready_s"),
        "death_noticed_s": kill.get("replaced", {}).get("noticed_s"),
        "kill": {k: v for k, v in kill.items() if k != "replaced"},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--adapters", type=Path, help="trained adapters (default: train one tiny product)"
    )
    p.add_argument("--products", help="comma-separated product ids (with --adapters)")
    p.add_argument("--profile", default="tiny")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--kill-at", type=float, default=10)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "serve_faults_tiny_cpu.json"
    )
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-faults-"))
    if args.adapters:
        adapters, products = args.adapters, (args.products or "").split(",")
    else:
        adapters, products = prepare(work, args.profile)
    key = secrets.token_urlsafe(24)
    overrides = [
        f"serve.min_replicas={args.replicas}",
        f"serve.max_replicas={args.replicas}",
        "serve.ranker=false",
        # One key drives the whole load: its rate limit must not be what is measured.
        "serve.budget.key_requests_per_minute=1000000",
        "serve.budget.key_request_burst=100000",
        *args.overrides,
    ]
    log = work / "serve.log"
    proc, url = start_server(adapters, args.profile, key, overrides, log)
    try:
        ready_s = asyncio.run(wait_replicas(url, args.replicas, 600)).get("ready_s", float("nan"))
        for product in products:  # warm each replica's adapter cache a little
            httpx.post(
                f"{url}/v1/generate",
                json={"product_id": product, "seed": 0},
                headers={"Authorization": f"Bearer {key}"},
                timeout=300,
            )
        raw = asyncio.run(run_load(args, url, key, products, proc.pid))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
    summary = summarise(raw, args.seconds)
    out = {
        "benchmark": "serve_faults",
        "profile": args.profile,
        "machine": machine(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        "settings": {
            "replicas": args.replicas,
            "clients": args.clients,
            "seconds": args.seconds,
            "kill_at_s": args.kill_at,
            "products": products,
            "overrides": overrides,
        },
        "replicas_ready_s": round(ready_s, 3),
        **summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    for k in (
        "requests",
        "by_status",
        "server_5xx",
        "in_flight_at_kill",
        "in_flight_at_kill_5xx",
        "p50_s",
        "p99_s",
        "p99_before_kill_s",
        "p99_in_flight_at_kill_s",
        "first_success_after_kill_s",
        "longest_stall_after_kill_s",
        "death_noticed_s",
        "recovery_s",
    ):
        print(f"{k:28s} {out[k]}")
    print(f"wrote {args.json}")
    return 0 if "error" not in raw["kill"] else 1


if __name__ == "__main__":
    sys.exit(main())
