"""Load test of `restage serve`: N concurrent clients over M products with Zipf-skewed
popularity, bounded in requests and seconds, loopback only. Reports throughput, p50/p95/p99
latency, responses by status, adapter loads and the adapter cache hit rate; writes JSON.

    # 20 tiny products trained into WORK/adapters (once), a server started on loopback:
    python bench/serve_load.py --prepare 20 --start --clients 8 --requests 200

    # against a server you started (loopback only):
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY --products a,b,c

The baseline in the same run is the uniform-popularity case: `--compare-uniform` repeats the
load with every product equally likely, which shows what skew does to the cache hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import example_manifest, machine  # noqa: E402
from ray_app.report import format_table  # noqa: E402
from ray_app.storage import AdapterLayout  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def zipf_weights(n: int, s: float) -> np.ndarray:
    ranks = np.arange(1, n + 1, dtype=np.float64)
    w = ranks ** (-s) if s > 0 else np.ones(n)
    return w / w.sum()


def prepare(count: int, work: Path, profile: str) -> Path:
    """Train ``count`` tiny products (copies of the example products) unless already there."""
    from pipelines.run import run
    from ray_app.config import load_config

    adapters = work / "run" / "adapters"
    done = {p.parent.name for p in adapters.glob(f"*/{AdapterLayout.METADATA}")}
    if len(done) >= count:
        return adapters
    manifest = example_manifest(count, "load", work / "products.jsonl")
    config = load_config(
        profile,
        overrides=[
            "ray.progress_bars=false",
            "generate.prompts_per_product=1",
            "generate.images_per_prompt=1",
        ],
    )
    run(config, str(manifest), str(work / "run"))
    return adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    adapters: Path, profile: str, key: str, overrides: list[str], log: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("restage")),
        "serve",
        "--adapters",
        str(adapters),
        "--profile",
        profile,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--set",
        "ray.progress_bars=false",
    ]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "RESTAGE_API_KEYS": key}
    # The server's log goes to a file: a pipe that nobody reads fills up and stalls the server.
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"restage serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("restage serve did not become ready in 10 minutes")


async def load(
    url: str,
    key: str,
    products: list[str],
    clients: int,
    requests: int,
    seconds: float,
    skew: float,
    num_images: int,
    seed: int,
) -> dict:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(products), size=requests, p=zipf_weights(len(products), skew))
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[dict] = []
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {key}"}

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"product_id": products[picks[i]], "num_images": num_images, "seed": i}
            start = time.perf_counter()
            try:
                resp = await http.post(f"{url}/v1/generate", json=body, headers=headers)
                status, payload = (
                    resp.status_code,
                    (
                        resp.json()
                        if resp.headers.get("content-type", "").startswith("application/json")
                        else {}
                    ),
                )
            except httpx.HTTPError as exc:
                status, payload = f"client error: {type(exc).__name__}", {}
            results.append(
                {
                    "status": status,
                    "latency_ms": (time.perf_counter() - start) * 1000,
                    "product": body["product_id"],
                    "timings": payload.get("timings", {}),
                    "replica": payload.get("replica"),
                }
            )

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
        stats = (await http.get(f"{url}/v1/stats", headers=headers)).json()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([r["latency_ms"] for r in ok]) if ok else np.zeros(1)
    loads = sum(1 for r in ok if r["timings"].get("adapter_load_ms", 0) > 0)
    return {
        "skew": skew,
        "requests_sent": len(results),
        "ok": len(ok),
        "wall_s": wall,
        "throughput_rps": len(ok) / wall,
        "images_per_s": len(ok) * num_images / wall,
        "latency_ms": {
            "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)),
            "max": float(lat.max()),
        },
        "by_status": {str(k): v for k, v in Counter(r["status"] for r in results).items()},
        "server_5xx": sum(
            1 for r in results if isinstance(r["status"], int) and r["status"] >= 500
        ),
        "adapter_loads": loads,
        "cache_hit_rate": 1 - loads / len(ok) if ok else 0.0,
        "mean_adapter_load_ms": float(
            np.mean(
                [
                    r["timings"]["adapter_load_ms"]
                    for r in ok
                    if r["timings"].get("adapter_load_ms", 0) > 0
                ]
                or [0]
            )
        ),
        "mean_generation_ms": float(
            np.mean([r["timings"].get("generation_ms", 0) for r in ok] or [0])
        ),
        "distinct_products": len({r["product"] for r in results}),
        "server_stats": stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server (loopback only)")
    parser.add_argument("--api-key", default=os.environ.get("RESTAGE_API_KEY"))
    parser.add_argument(
        "--products", help="comma-separated product ids (default: those under --adapters)"
    )
    parser.add_argument(
        "--adapters", help="adapters root (to list products, or to --start a server)"
    )
    parser.add_argument(
        "--prepare", type=int, metavar="N", help="train N tiny products into --work first"
    )
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "restage-serve-load"))
    parser.add_argument(
        "--start", action="store_true", help="start `restage serve` on loopback for the run"
    )
    parser.add_argument("--profile", default="tiny")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="server config overrides with --start",
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="upper bound on requests")
    parser.add_argument(
        "--seconds", type=float, default=300, help="upper bound on the load's duration"
    )
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity skew s (0 = uniform)")
    parser.add_argument(
        "--compare-uniform", action="store_true", help="repeat with uniform popularity"
    )
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", default=str(ROOT / "bench" / "results" / "serve_load_tiny_cpu.json")
    )
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapters = Path(args.adapters) if args.adapters else None
    if args.prepare:
        adapters = prepare(args.prepare, work, args.profile)
    proc = None
    if args.start:
        if adapters is None:
            parser.error("--start needs --adapters or --prepare")
        args.api_key = secrets.token_urlsafe(24)
        # One key drives the whole load: its rate limit (serve.budget) is not what is measured.
        unlimited = [
            "serve.budget.key_requests_per_minute=1000000",
            "serve.budget.key_request_burst=100000",
        ]
        proc, url = start_server(
            adapters, args.profile, args.api_key, unlimited + args.overrides, work / "server.log"
        )
    else:
        if not args.url:
            parser.error("give --url of a running server, or --start")
        url = args.url.rstrip("/")
        if urlparse(url).hostname not in LOOPBACK:
            parser.error(
                f"--url {url}: the load test only targets loopback addresses {sorted(LOOPBACK)}"
            )
    if args.products:
        products = args.products.split(",")
    elif adapters is not None:
        products = sorted(p.parent.name for p in adapters.glob(f"*/{AdapterLayout.METADATA}"))
    else:
        parser.error("give --products or --adapters")
    try:
        # The skewed run, then (to compare the adapter-cache hit rate) a uniform one.
        skews = [args.zipf] + ([0.0] if args.compare_uniform else [])
        runs = [
            asyncio.run(
                load(
                    url,
                    args.api_key,
                    products,
                    args.clients,
                    args.requests,
                    args.seconds,
                    skew,
                    args.num_images,
                    args.seed + i,
                )
            )
            for i, skew in enumerate(skews)
        ]
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)  # graceful: Serve drains its replicas
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    rows = []
    for r in runs:
        rows.append(
            [
                f"zipf s={r['skew']:g}",
                r["requests_sent"],
                r["ok"],
                f"{r['throughput_rps']:.2f}",
                f"{r['latency_ms']['p50']:.0f}",
                f"{r['latency_ms']['p95']:.0f}",
                f"{r['latency_ms']['p99']:.0f}",
                r["adapter_loads"],
                f"{r['cache_hit_rate']:.2f}",
                " ".join(f"{k}:{v}" for k, v in sorted(r["by_status"].items())),
            ]
        )
    print(
        format_table(
            [
                "popularity",
                "sent",
                "ok",
                "req/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "adapter loads",
                "hit rate",
                "statuses",
            ],
            rows,
        )
    )
    result = {
        "benchmark": "serve_load",
        "profile": args.profile,
        "products": len(products),
        "clients": args.clients,
        "num_images": args.num_images,
        "machine": machine(),
        "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.json}")
    if any(r["server_5xx"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
