"""Adapter swapping on one loaded generator: what `restage serve` does per cache miss and
per switch, against the alternatives, in one run; writes JSON to bench/results/.

    python bench/adapter_swap.py                     # tiny profile, CPU
    python bench/adapter_swap.py --profile default --device cuda --rank 64   # SDXL on a GPU
    python bench/adapter_swap.py --profile default --device cuda --rank 64 \
        --set generator.source=DIR --set generator.variant=null --set generator.vae=null \
        --set offline=true     # a local checkpoint (bench/gpu_train.py saves one)

Measured (milliseconds, median over the adapters):
- read: fsspec read + safetensors parse of an adapter (no pipeline lock needed);
- inject: ``load_adapter`` of read weights into the loaded pipeline as a named adapter;
- switch: ``set_adapter`` between resident adapters (a cache hit);
- unload: ``unload_adapter`` (eviction);
- hotswap: diffusers' ``load_lora_weights(..., hotswap=True)`` into one resident slot;
- overlap: one generation while the next adapter is read in another thread, vs the two in
  sequence (how much of a miss the two-step load hides);
- slots (what ``restage serve`` does now, ``actors.adapter_slots``): writing read weights
  into a slot, and activating a slot (one fused copy into the live adapter); one generation
  while the next adapter is read and written into a slot in another thread, vs in sequence;
- base reload: loading the whole pipeline again (what swapping without adapters costs).
Adapters are random LoRA weights of the configured rank on the generator's attention
projections, saved in the diffusers format that `restage train` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from bench.common import machine  # noqa: E402
from ray_app.config import load_config  # noqa: E402
from ray_app.models import load_role  # noqa: E402
from ray_app.report import format_table  # noqa: E402
from ray_app.storage import AdapterLayout  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_adapters(gen: Generator, count: int, rank: int, folder: Path) -> list[Path]:
    """``count`` random LoRA adapters in the diffusers format, written under ``folder``."""
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = gen.loaded.model
    unet = pipe.unet
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=TARGETS,
            init_lora_weights="gaussian",
        ),
        adapter_name="bench",
    )
    out = []
    for i in range(count):
        with torch.no_grad():
            lora = [
                p for name, p in unet.named_parameters() if "lora_" in name and ".bench." in name
            ]
            for j, p in enumerate(lora):
                p.normal_(0, 0.01, generator=torch.Generator(p.device).manual_seed(i * 100_003 + j))
        state = get_peft_model_state_dict(unet, adapter_name="bench")
        path = folder / f"adapter-{i:03d}"
        path.mkdir(parents=True, exist_ok=True)
        type(pipe).save_lora_weights(
            path,
            unet_lora_layers={k: v.detach().to(torch.float16) for k, v in state.items()},
            weight_name=AdapterLayout.WEIGHTS,
        )
        out.append(path)
    unet.delete_adapters("bench")
    return out


def timed(fn) -> float:
    """Milliseconds of ``fn``, its GPU work included (kernels run asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--device", default=None, help="override the generator's device")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. generator.source=DIR for a local checkpoint (repeatable)",
    )
    parser.add_argument(
        "--json", default=str(ROOT / "bench" / "results" / "adapter_swap_tiny_cpu.json")
    )
    args = parser.parse_args()

    config = load_config(args.profile, overrides=args.set)
    g = config.generate
    start = time.perf_counter()
    gen = Generator(
        config.model_spec("generator"),
        GenerationOptions(g.width, g.height, g.steps, g.guidance_scale),
        device=args.device,
    )
    base_load_ms = (time.perf_counter() - start) * 1000
    folder = Path(tempfile.mkdtemp(prefix="restage-adapters-"))
    paths = make_adapters(gen, args.adapters, args.rank, folder)
    size_mib = os.path.getsize(AdapterLayout.weights_in(str(paths[0]))) / 2**20

    read, inject, switch, unload, hotswap = [], [], [], [], []
    weights = {}
    for p in paths:
        read.append(timed(lambda p=p: weights.__setitem__(p.name, read_adapter_weights(str(p)))))
    for p in paths:
        inject.append(timed(lambda p=p: gen.load_adapter(p.name, weights[p.name])))
    for _ in range(3):
        for p in paths:
            switch.append(timed(lambda p=p: gen.set_adapter(p.name)))
    gen.set_adapter(None)
    for p in paths[1:]:
        unload.append(timed(lambda p=p: gen.unload_adapter(p.name)))
    # diffusers hot-swap: replace the weights of the one resident adapter in place.
    pipe = gen.loaded.model
    hotswap_error = None
    try:
        for p in paths[1:]:
            hotswap.append(
                timed(
                    lambda p=p: pipe.load_lora_weights(
                        weights[p.name], adapter_name=paths[0].name, hotswap=True
                    )
                )
            )
    except Exception as exc:  # older diffusers, or a pipeline without hot-swap support
        hotswap_error = f"{type(exc).__name__}: {exc}"
    gen.unload_adapter(paths[0].name)

    # Overlap: generate with one adapter while the next one is read in another thread.
    gen.load_adapter("a", weights[paths[0].name])
    gen.set_adapter("a")
    prompts, seeds, negs = ["a photo of a product"], [0], [""]
    gen.generate(prompts, seeds, negs)  # warm-up
    sequential = timed(
        lambda: (gen.generate(prompts, seeds, negs), read_adapter_weights(str(paths[1])))
    )

    def overlapped() -> None:
        reader = threading.Thread(target=read_adapter_weights, args=(str(paths[1]),))
        reader.start()
        gen.generate(prompts, seeds, negs)
        reader.join()

    overlap = timed(overlapped)
    generation_ms = timed(lambda: gen.generate(prompts, seeds, negs))

    # Slots: one live adapter, filled from a slot by one fused copy.
    gen.set_adapter(None)
    gen.unload_adapter("a")
    slots = AdapterSlots(gen, args.rank, TARGETS, 1.0, ["s0", "s1"])
    slot_write, activate = [], []
    for _ in range(2):
        for i, p in enumerate(paths):
            slot = f"s{i % 2}"  # alternate: each activate copies
            slot_write.append(timed(lambda p=p, slot=slot: slots.write(slot, weights[p.name])))
            activate.append(timed(lambda slot=slot: slots.activate(slot)))
    slots.activate("s0")
    gen.generate(prompts, seeds, negs)  # warm-up
    slot_sequential = timed(
        lambda: (
            gen.generate(prompts, seeds, negs),
            slots.write("s1", read_adapter_weights(str(paths[1]))),
        )
    )

    def slot_overlapped() -> None:
        writer = threading.Thread(
            target=lambda: slots.write("s1", read_adapter_weights(str(paths[2])))
        )
        writer.start()
        gen.generate(prompts, seeds, negs)
        writer.join()

    slot_overlap = timed(slot_overlapped)
    reload_ms = timed(lambda: load_role(config, "generator", device=args.device))

    result = {
        "benchmark": "adapter_swap",
        "profile": args.profile,
        "device": str(gen.loaded.device),
        "machine": machine(str(gen.loaded.device)),
        "adapters": args.adapters,
        "rank": args.rank,
        "adapter_mib": round(size_mib, 3),
        "median_ms": {
            "read": median(read),
            "inject": median(inject),
            "switch": median(switch),
            "unload": median(unload),
            "hotswap": median(hotswap),
            "slot_write": median(slot_write),
            "slot_activate": median(activate),
        },
        "hotswap_error": hotswap_error,
        "generation_ms": round(generation_ms, 1),
        "generate_then_read_ms": round(sequential, 1),
        "generate_while_reading_ms": round(overlap, 1),
        "generate_then_read_and_write_slot_ms": round(slot_sequential, 1),
        "generate_while_reading_and_writing_slot_ms": round(slot_overlap, 1),
        "base_load_ms": round(base_load_ms, 1),
        "base_reload_ms": round(reload_ms, 1),
    }
    m = result["median_ms"]
    print(
        format_table(
            ["step", "median ms"],
            [
                ["read adapter (I/O + parse)", m["read"]],
                ["inject as named adapter", m["inject"]],
                ["switch between resident adapters", m["switch"]],
                ["unload (evict)", m["unload"]],
                ["hot-swap into one slot", m["hotswap"] if not hotswap_error else "n/a"],
                ["generate, then read the next adapter", result["generate_then_read_ms"]],
                ["generate while reading the next adapter", result["generate_while_reading_ms"]],
                ["write read weights into a slot", m["slot_write"]],
                ["activate a slot (copy into the live adapter)", m["slot_activate"]],
                [
                    "generate, then read + write the next slot",
                    result["generate_then_read_and_write_slot_ms"],
                ],
                [
                    "generate while reading + writing the next slot",
                    result["generate_while_reading_and_writing_slot_ms"],
                ],
                ["reload the base pipeline", result["base_reload_ms"]],
            ],
        )
    )
    if hotswap_error:
        print(f"hot-swap unavailable: {hotswap_error}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
