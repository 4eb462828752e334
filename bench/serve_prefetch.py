"""Adapter swaps in serving (issue 18): what a generator replica's adapter work costs per
request with 1, 100 and 1,000 adapters stored, with and without prefetching the adapters of
waiting requests, in one run; writes JSON to bench/results/. No Ray: it drives
``GeneratorReplica`` directly, through a stand-in for Ray Serve's multiplexer.

    python bench/serve_prefetch.py                   # tiny profile, CPU (the mechanism)
    python bench/serve_prefetch.py --profile default --device cuda --rank 64 --distinct 40 \
        --set generator.source=DIR --set generator.variant=null --set generator.vae=null \
        --set offline=true --out bench/results/serve_prefetch_sdxl_h200.json

Measured:
- miss cost by store size: read + write into a slot (``actors.adapter_slots``) of an adapter
  drawn from 1, 100 and 1,000 stored, and the copy of a slot into the live adapter that a
  turn does (milliseconds, median);
- the ways to swap an adapter in: a slot write + that copy (what the replica does), peft's
  hot-swap into a resident named adapter + ``set_adapters`` to it (what it did before), and
  diffusers' ``load_lora_weights`` + ``fuse_lora`` (and ``unfuse_lora`` +
  ``delete_adapters`` to swap it out), and a generation with each;
- closed loop per store size: ``--clients`` clients send ``--requests`` requests for
  products drawn from a Zipf mix; the same requests with ``serve.prefetch_adapters`` = N and
  = 0: p50/p99 latency, the adapter work in a request's turn (under the pipeline lock: a
  reload after an eviction, the copy into the live adapter), prefetch and cache hit rates.

The multiplexer stand-in does what ``ray.serve.multiplex`` (2.60) does: one load at a time
(its ``_model_cache_lock``), the least recently used adapter evicted before a load once
``max_adapters_per_replica`` are held. ``--distinct D`` writes D distinct weight files and
hard-links the rest (SDXL rank-64 adapters are ~90 MB: 1,000 of them do not fit a 64 GB
disk); reads of hard links share the page cache, so the miss cost is then a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.adapter_slots import LIVE  # noqa: E402
from actors.generator import Generator, read_adapter_weights  # noqa: E402
from bench.adapter_swap import median, timed  # noqa: E402
from bench.common import machine  # noqa: E402
from ray_app.config import load_config  # noqa: E402
from ray_app.report import format_table  # noqa: E402
from ray_app.storage import AdapterLayout  # noqa: E402
from serve.generator import AdapterHandle, GeneratorReplica  # noqa: E402


# Copied from bench.serve_load.zipf_weights (that module needs httpx, a GPU machine may not).
def zipf_weights(n: int, s: float) -> np.ndarray:
    ranks = np.arange(1, n + 1, dtype=np.float64)
    w = ranks ** (-s) if s > 0 else np.ones(n)
    return w / w.sum()


def write_adapters(
    generator: Generator,
    root: Path,
    count: int,
    rank: int,
    target_modules: list[str],
    distinct: int | None = None,
    scale: float = 0.1,
) -> list[str]:
    """``count`` random LoRA adapters (products ``p-00000``...) under ``root`` in the layout
    `restage train` writes (weights in its format, an ``adapter.json``); products past
    ``distinct`` hard-link the weights of an earlier one. -> the product ids."""
    from safetensors.torch import save_file

    layout = AdapterLayout(str(root))
    shapes = generator.neutral_adapter_weights(rank, target_modules)
    products = [f"p-{i:05d}" for i in range(count)]
    distinct = count if distinct is None else min(distinct, count)
    for i, product in enumerate(products):
        folder = Path(layout.adapter_dir(product))
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / AdapterLayout.WEIGHTS
        if i < distinct:
            gen = torch.Generator().manual_seed(i)
            state = {
                k: (torch.randn(v.shape, generator=gen) * scale).to(torch.float16)
                for k, v in shapes.items()
            }
            save_file(state, str(weights), metadata={"format": "pt"})
        else:
            source = Path(layout.weights(products[i % distinct]))
            if not weights.exists():
                os.link(source, weights)
        (folder / AdapterLayout.METADATA).write_text(json.dumps({"product_id": product}))
    return products


class Multiplexer:
    """A stand-in for Ray Serve's multiplexed loader (``get_adapter``): an LRU cache of
    adapter handles, loads one at a time, evicting (``__del__``) before loading when full."""

    def __init__(self, replica: GeneratorReplica, capacity: int):
        self.replica = replica
        self.capacity = capacity
        self.models: OrderedDict[str, AdapterHandle] = OrderedDict()
        self.lock = asyncio.Lock()
        self.hits = self.misses = 0

    async def __call__(self, product_id: str) -> AdapterHandle:
        if product_id in self.models:
            self.hits += 1
            self.models.move_to_end(product_id)
            return self.models[product_id]
        async with self.lock:
            if product_id in self.models:
                self.hits += 1
                return self.models[product_id]
            self.misses += 1
            if len(self.models) >= self.capacity:
                # As Ray Serve's multiplexer does (serve/multiplex.py, unload_model_lru): call
                # the evicted handle's __del__ at once, while a request may still hold it.
                _, evicted = self.models.popitem(last=False)
                await asyncio.get_running_loop().run_in_executor(None, evicted.__del__)
            self.models[product_id] = await self.replica.load(product_id)
            return self.models[product_id]

    def clear(self) -> None:
        self.models.clear()


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


async def closed_loop(
    replica: GeneratorReplica,
    products: list[str],
    picks: list[int],
    clients: int,
    steps: int | None,
) -> dict[str, Any]:
    """``clients`` clients send the requests of ``picks`` (indices into ``products``), each
    waiting for its answer before sending the next. -> latency and adapter figures."""
    mux = Multiplexer(replica, replica.config.serve.max_adapters_per_replica)
    before, timings = dict(replica.counters), dict(replica.timings)
    queue = list(enumerate(picks))
    latencies: list[float] = []
    generation: list[float] = []
    turn_adapter: list[float] = []

    async def client() -> None:
        while queue:
            i, pick = queue.pop(0)
            request = {
                "prompt": "a photo of a {product}",
                "seeds": [i],
                "steps": steps,
                "received_at": time.time(),
            }
            start = time.perf_counter()
            out = await replica.serve_request(products[pick], request, mux)
            latencies.append((time.perf_counter() - start) * 1000)
            generation.append(out["generation_ms"] - out["swap_ms"])
            turn_adapter.append(out["swap_ms"])

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    mux.clear()
    counters = {k: v - before.get(k, 0) for k, v in replica.counters.items()}
    spent = {k: v - timings.get(k, 0.0) for k, v in replica.timings.items()}
    n = len(latencies)
    adapter_ms = statistics.mean(turn_adapter)
    denoise_ms = statistics.mean(generation)
    return {
        "requests": n,
        "requests_per_s": round(n / wall, 3),
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
        "mean_generation_ms": round(denoise_ms, 1),
        "pipeline_adapter_ms_per_request": round(adapter_ms, 2),
        "adapter_share_of_request": round(adapter_ms / (adapter_ms + denoise_ms), 4),
        "placements": counters.get("placements", 0),
        "reloads_in_turn": counters.get("reloads_after_eviction", 0),
        "activations": counters.get("activations", 0),
        "prefetches": counters.get("prefetches", 0),
        "prefetch_hits": counters.get("prefetch_hits", 0),
        "prefetch_hit_rate": round(counters.get("prefetch_hits", 0) / max(1, mux.misses), 3),
        "cache_hit_rate": round(mux.hits / n, 3),
        "adapter_reads": counters.get("adapter_reads", 0),
        "prefetch_ms_off_lock_per_request": round(spent.get("prefetch_ms", 0.0) / n, 2),
    }


def miss_cost(replica: GeneratorReplica, root: Path, products: list[str], n: int) -> dict:
    """Read + write into a free slot of adapters drawn at random from a store, and the copy
    of that slot into the live adapter."""
    layout = AdapterLayout(str(root))
    slot = next(s for s, owner in replica.slots.items() if owner is None)
    slots = replica.adapter_slots
    rng = random.Random(len(products))
    read, write, activate = [], [], []
    for _ in range(n):
        folder = layout.adapter_dir(rng.choice(products))
        start = time.perf_counter()
        weights = read_adapter_weights(folder)
        read.append((time.perf_counter() - start) * 1000)
        write.append(timed(lambda w=weights: slots.write(slot, w)))
        activate.append(timed(lambda: slots.activate(slot)))
    return {
        "read": median(read),
        "slot_write": median(write),
        "activate": median(activate),
        "miss": round(median(read) + median(write) + median(activate), 3),
    }


def swap_paths(replica: GeneratorReplica, root: Path, products: list[str]) -> dict:
    """A slot write + the copy into the live adapter, against peft's hot-swap into a
    resident named adapter + a switch to it, and against load_lora_weights + fuse_lora (and
    unfuse_lora + delete_adapters to take it out again); a generation with each."""
    gen, pipe = replica.generator, replica.generator.loaded.model
    layout = AdapterLayout(str(root))
    weights = [read_adapter_weights(layout.adapter_dir(p)) for p in products[:4]]
    free = [s for s, owner in replica.slots.items() if owner is None]
    scale = replica.config.generate.lora_scale
    prompt = (["a photo of a product"], [0], [""])
    slot_swap, hotswap, fuse, unfuse = [], [], [], []
    for i, w in enumerate(weights):
        slot = free[i % 2]  # alternate: each activate copies
        slot_swap.append(
            timed(
                lambda w=w, slot=slot: (
                    replica.adapter_slots.write(slot, w),
                    replica.adapter_slots.activate(slot),
                )
            )
        )
    with_slot = timed(lambda: gen.generate(*prompt))
    t = replica.config.train
    gen.load_adapter("peft-slot", gen.neutral_adapter_weights(t.rank, t.target_modules), scale)
    for w in weights:
        hotswap.append(
            timed(lambda w=w: (gen.hotswap_adapter("peft-slot", w), gen.set_adapter("peft-slot")))
        )
    with_peft_slot = timed(lambda: gen.generate(*prompt))
    gen.set_adapter(None)
    gen.unload_adapter("peft-slot")
    for w in weights:

        def load_fused(w=w) -> None:
            pipe.load_lora_weights(w, adapter_name="fused")
            pipe.fuse_lora(adapter_names=["fused"], lora_scale=scale)
            gen.set_adapter(None)  # fused into the base weights: LoRA layers off

        fuse.append(timed(load_fused))
        fused_generation = timed(lambda: gen.generate(*prompt))

        def take_out() -> None:
            with warnings.catch_warnings():  # "Already unmerged" from the slots' layers
                warnings.simplefilter("ignore", UserWarning)
                pipe.unfuse_lora()
                pipe.delete_adapters("fused")

        unfuse.append(timed(take_out))
    gen.set_adapter(LIVE)
    return {
        "slot_write_and_activate_ms": median(slot_swap),
        "hotswap_and_switch_ms": median(hotswap),
        "load_and_fuse_ms": median(fuse),
        "unfuse_and_delete_ms": median(unfuse),
        "fuse_swap_ms": round(median(fuse) + median(unfuse), 3),
        "generation_with_slot_adapter_ms": round(with_slot, 1),
        "generation_with_peft_slot_ms": round(with_peft_slot, 1),
        "generation_fused_ms": round(fused_generation, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--device", default=None, help="the generator's device (cpu, cuda)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. serve.max_adapters_per_replica=8 (repeatable)",
    )
    parser.add_argument("--stores", default="1,100,1000", help="adapters stored, per run")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (train.rank)")
    parser.add_argument("--distinct", type=int, default=None, help="distinct weight files")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity skew s")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per request")
    parser.add_argument("--prefetch", type=int, default=1, help="serve.prefetch_adapters")
    parser.add_argument("--work", default=None, help="folder for the stores (default: temp)")
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "serve_prefetch_tiny_cpu.json")
    )
    args = parser.parse_args()

    overrides = list(args.set)
    if args.device:
        overrides.append(f"generator.device={args.device}")
    if args.rank:
        overrides.append(f"train.rank={args.rank}")
    on = load_config(
        args.profile, overrides=[*overrides, f"serve.prefetch_adapters={args.prefetch}"]
    )
    off = load_config(args.profile, overrides=[*overrides, "serve.prefetch_adapters=0"])
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="restage-prefetch-"))
    stores = [int(s) for s in args.stores.split(",")]
    replicas = {"prefetch": GeneratorReplica(on, str(work / "empty")), "none": None}
    replicas["none"] = GeneratorReplica(off, str(work / "empty"))
    gen = replicas["none"].generator
    products: dict[int, list[str]] = {}
    for n in stores:
        products[n] = write_adapters(
            gen, work / f"store-{n}", n, on.train.rank, on.train.target_modules, args.distinct
        )
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "benchmark": "serve_prefetch",
        "profile": args.profile,
        "device": str(gen.loaded.device),
        "machine": machine(str(gen.loaded.device)),
        "note": (
            "tiny CPU figures measure the mechanism (prefetch hides adapter work behind a "
            "generation), not the GPU goal (adapter work <= 5 % of a 30-step 1024^2 SDXL "
            "request): a tiny 64 px generation is a few ms per step"
            if args.profile == "tiny"
            else "goal: adapter work <= 5 % of a 30-step 1024^2 request"
        ),
        "rank": on.train.rank,
        "max_adapters_per_replica": on.serve.max_adapters_per_replica,
        "prefetch_adapters": args.prefetch,
        "clients": args.clients,
        "requests": args.requests,
        "zipf": args.zipf,
        "steps": args.steps or on.generate.steps,
        "distinct_weight_files": args.distinct,
        "miss_cost_ms": {},
        "serve": {},
    }
    # Warm-up: the first generations of a pipeline are slow (allocations, kernels).
    for replica in replicas.values():
        root = work / f"store-{stores[0]}"
        replica.layout = AdapterLayout(str(root))
        asyncio.run(closed_loop(replica, products[stores[0]], [0] * 4, 2, args.steps))
    for n in stores:
        root = work / f"store-{n}"
        result["miss_cost_ms"][n] = miss_cost(replicas["none"], root, products[n], 20)
        picks = list(rng.choice(n, size=args.requests, p=zipf_weights(n, args.zipf)))
        runs = {}
        for name, replica in replicas.items():
            replica.layout = AdapterLayout(str(root))
            runs[name] = asyncio.run(
                closed_loop(replica, products[n], picks, args.clients, args.steps)
            )
        result["serve"][n] = runs
    result["swap_paths"] = swap_paths(
        replicas["none"], work / f"store-{stores[-1]}", products[stores[-1]]
    )
    for replica in replicas.values():
        replica.close()

    rows = []
    for n in stores:
        for name, r in result["serve"][n].items():
            rows.append(
                [
                    n,
                    name,
                    r["p50_ms"],
                    r["p99_ms"],
                    r["pipeline_adapter_ms_per_request"],
                    f"{100 * r['adapter_share_of_request']:.1f} %",
                    r["prefetch_hit_rate"],
                    r["cache_hit_rate"],
                    result["miss_cost_ms"][n]["miss"],
                ]
            )
    print(
        format_table(
            [
                "stored",
                "prefetch",
                "p50 ms",
                "p99 ms",
                "adapter ms/req",
                "share",
                "prefetch hits",
                "cache hits",
                "miss ms",
            ],
            rows,
        )
    )
    f = result["swap_paths"]
    print(
        format_table(
            ["swap", "ms"],
            [
                ["slot write + copy into the live adapter", f["slot_write_and_activate_ms"]],
                ["peft hot-swap into a named adapter + switch", f["hotswap_and_switch_ms"]],
                ["load_lora_weights + fuse_lora", f["load_and_fuse_ms"]],
                ["unfuse_lora + delete_adapters", f["unfuse_and_delete_ms"]],
                ["generation, slot adapter", f["generation_with_slot_adapter_ms"]],
                ["generation, peft named adapter", f["generation_with_peft_slot_ms"]],
                ["generation, fused", f["generation_fused_ms"]],
            ],
        )
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
