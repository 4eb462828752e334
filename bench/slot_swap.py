"""Swapping a served adapter at real size, without generating: SDXL's denoiser architecture
(random weights) with rank-R LoRA adapters on its attention projections, on any device.
The way ``restage serve`` swaps now (``actors.adapter_slots``: write the read weights into
a slot, then one fused copy into the live adapter) against the way it swapped before (peft's
hot-swap into a resident named adapter, then ``set_adapters`` to it), in one run; writes
JSON to bench/results/.

It also measures the read (fsspec + safetensors) and how much reading an adapter and
writing it into a slot in another thread slows a loop of small tensor operations in the
main thread: the shape of a denoising loop's kernel launches, whose interpreter a loading
thread competes for.

    python bench/slot_swap.py                            # CPU, float16, rank 64
    python bench/slot_swap.py --device cuda              # on a GPU

The 30-step 1024² generation these are compared with is measured by
``bench/adapter_swap.py --profile default`` on a GPU (3,129 ms on an H200).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.adapter_slots import AdapterSlots  # noqa: E402
from actors.generator import GenerationOptions, Generator, read_adapter_weights  # noqa: E402
from bench.adapter_swap import TARGETS, make_adapters, median, timed  # noqa: E402
from bench.common import machine  # noqa: E402
from bench.train import sdxl_pipeline  # noqa: E402
from ray_app.config import load_config  # noqa: E402
from ray_app.models import LoadedModel  # noqa: E402
from ray_app.report import format_table  # noqa: E402


def interference(folder: str, slots: AdapterSlots, ops: int, repeats: int) -> dict:
    """Milliseconds of a loop of ``ops`` small tensor operations (on the slots' device: on a
    GPU, kernel launches) alone and while ``folder`` is read and written into slot s1 in
    another thread; that thread's own time."""
    x = torch.ones(64, device=slots.device)

    def loop() -> None:
        y = x
        for _ in range(ops):
            y = y * 1.0 + 0.0

    alone = median([timed(loop) for _ in range(repeats)])
    loops, reads = [], []

    def work() -> None:
        start = time.perf_counter()
        slots.write("s1", read_adapter_weights(folder))
        reads.append((time.perf_counter() - start) * 1000)

    for _ in range(repeats):
        thread = threading.Thread(target=work)
        thread.start()
        loops.append(timed(loop))
        thread.join()
    return {
        "loop_alone_ms": alone,
        "loop_while_loading_ms": median(loops),
        "read_and_write_ms": median(reads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="passes over the adapters")
    parser.add_argument("--loop-ops", type=int, default=60000, help="the main thread's loop")
    parser.add_argument(
        "--out", default=None, help="default: bench/results/slot_swap_sdxl_<device>.json"
    )
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    pipe = sdxl_pipeline(args.device, dtype)
    build_s = time.perf_counter() - start
    config = load_config("tiny")  # only for the spec's batch size; the pipeline is SDXL's
    loaded = LoadedModel(
        role="generator",
        family="sdxl",
        source="random weights",
        resolved="random weights",
        device=torch.device(args.device),
        dtype=dtype,
        model=pipe,
    )
    gen = Generator(
        config.model_spec("generator"), GenerationOptions(1024, 1024, 30, 5.0), loaded=loaded
    )
    folder = Path(tempfile.mkdtemp(prefix="restage-slot-swap-"))
    paths = make_adapters(gen, args.adapters, args.rank, folder)
    size_mib = sum(f.stat().st_size for f in paths[0].iterdir()) / 2**20

    read, weights = [], []
    for p in paths:
        start = time.perf_counter()
        weights.append(read_adapter_weights(str(p)))
        read.append((time.perf_counter() - start) * 1000)

    # Before: peft adapters as slots; a miss hot-swaps into one, a turn switches to it.
    zeros = gen.neutral_adapter_weights(args.rank, TARGETS)
    gen.load_adapter("peft-0", {k: v.clone() for k, v in zeros.items()})
    gen.load_adapter("peft-1", {k: v.clone() for k, v in zeros.items()})
    hotswap, switch = [], []
    for _ in range(args.repeats):
        for i, w in enumerate(weights):
            name = f"peft-{i % 2}"
            hotswap.append(timed(lambda w=w, name=name: gen.hotswap_adapter(name, w)))
            switch.append(timed(lambda name=name: gen.set_adapter(name)))
    gen.set_adapter(None)
    gen.unload_adapter("peft-0")
    gen.unload_adapter("peft-1")

    # Now: one live adapter, slots of tensors, one fused copy per turn.
    start = time.perf_counter()
    slots = AdapterSlots(gen, args.rank, TARGETS, 1.0, ["s0", "s1"])
    slots_s = time.perf_counter() - start
    write, activate = [], []
    for _ in range(args.repeats):
        for i, w in enumerate(weights):
            slot = f"s{i % 2}"  # alternate: each activate copies
            write.append(timed(lambda w=w, slot=slot: slots.write(slot, w)))
            activate.append(timed(lambda slot=slot: slots.activate(slot)))
    contention = interference(str(paths[1]), slots, args.loop_ops, args.repeats)
    layers = sum(1 for n, _ in gen.loaded.model.unet.named_modules() if n.endswith(".lora_A"))

    before = {"hotswap": median(hotswap), "switch": median(switch)}
    now = {"slot_write": median(write), "activate": median(activate)}
    result = {
        "benchmark": "slot_swap",
        "architecture": "SDXL base 1.0 denoiser, random weights",
        "device": args.device,
        "dtype": args.dtype,
        "machine": machine(args.device),
        "rank": args.rank,
        "target_modules": TARGETS,
        "lora_layers": layers,
        "adapter_mib": round(size_mib, 1),
        "live_adapter_mib": round(slots.nbytes / 2**20, 1),
        "adapters": args.adapters,
        "repeats": args.repeats,
        "loop_ops": args.loop_ops,
        "build_pipeline_s": round(build_s, 1),
        "make_live_adapter_and_slots_s": round(slots_s, 2),
        "median_ms": {"read": median(read), **before, **now},
        "interpreter_contention": contention,
        "before": {
            "miss_in_turn_ms": round(before["hotswap"] + before["switch"], 3),
            "hit_in_turn_ms": before["switch"],
        },
        "now": {
            "miss_in_turn_ms": now["activate"],  # the write happened off the lock, in the load
            "miss_off_lock_ms": round(median(read) + now["slot_write"], 3),
            "hit_in_turn_ms": now["activate"],  # at most: an activate of the live slot is free
        },
    }
    m = result["median_ms"]
    print(
        format_table(
            ["step", "median ms"],
            [
                ["read + parse the adapter file (off the pipeline lock)", m["read"]],
                ["before: peft hot-swap into a named adapter", m["hotswap"]],
                ["before: set_adapters to it (every turn)", m["switch"]],
                ["now: write into a slot (off the pipeline lock)", m["slot_write"]],
                ["now: copy the slot into the live adapter (a turn)", m["activate"]],
            ],
        )
    )
    c = contention
    print(
        format_table(
            ["main thread's loop of small ops", "ms"],
            [
                ["alone", c["loop_alone_ms"]],
                ["while another thread reads + writes a slot", c["loop_while_loading_ms"]],
                ["(that thread's read + write)", c["read_and_write_ms"]],
            ],
        )
    )
    out = Path(args.out or ROOT / "bench" / "results" / f"slot_swap_sdxl_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
