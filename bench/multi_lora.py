"""Benchmark multi-product LoRA steps (``train.products_per_step``): K products trained one
after another (``LoraTrainer.train``) against together (``train_many``), same steps, same
samples, in one run; prints a table and writes JSON to bench/results/.

    python bench/multi_lora.py                                   # tiny SDXL, CPU, K = 1 2 4
    python bench/multi_lora.py --size sdxl --device cuda --k 1 2 4 8   # the issue-18 goal

No Ray: ``LoraTrainer`` is the class a Ray Train worker runs. The tiny size on CPU measures
the plumbing only: its matmuls are too small for batching to pay, so its figures say
nothing about the GPU goal (>= 1.5x at K = 4 on real-size SDXL). K = 1 runs the same code
both ways (``train_many`` of one product is ``train``): its ratio shows the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.lora_trainer import LoraTrainer  # noqa: E402
from bench.common import machine  # noqa: E402
from bench.train import samples, sdxl_pipeline  # noqa: E402
from ray_app.config import load_config  # noqa: E402
from ray_app.report import format_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("tiny", "sdxl"), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="products per step")
    ap.add_argument("--steps", type=int, default=None, help="steps per product")
    ap.add_argument("--samples", type=int, default=12, help="samples per product")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the fastest counts")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument(
        "--out", default=None, help="JSON path [bench/results/multi_lora-SIZE-DEVICE.json]"
    )
    args = ap.parse_args()

    cfg = load_config("tiny" if args.size == "tiny" else "default")
    overrides: dict = {"steps": args.steps or (8 if args.size == "tiny" else 10)}
    if args.size == "sdxl":
        overrides["gradient_checkpointing"] = True
    if args.resolution:
        overrides["resolution"] = args.resolution
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg.train = opts = cfg.train.model_copy(update=overrides)
    if args.size == "tiny":
        trainer = LoraTrainer(cfg.model_spec("generator"), cfg.train, device=args.device)
    else:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        trainer = LoraTrainer(
            cfg.model_spec("generator"), cfg.train, pipeline=sdxl_pipeline(args.device, dtype)
        )
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    products = [(samples(args.samples, opts.resolution, seed=p), p) for p in range(max(args.k))]
    trainer.train_many(products[:2], steps=2)  # warm-up: first-call kernels and allocator
    rows, figures = [], []
    for k in args.k:
        group = products[:k]
        step_alone = step_together = wall_alone = wall_together = float("inf")
        for _ in range(args.repeats):  # alternated; the fastest of each (contention only adds)
            sync()
            start = time.perf_counter()
            alone = [trainer.train(s, seed) for s, seed in group]
            sync()
            wall_alone = min(wall_alone, time.perf_counter() - start)
            step_alone = min(step_alone, sum(r.train_seconds for r in alone) / (k * opts.steps))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            together = trainer.train_many(group)
            sync()
            wall_together = min(wall_together, time.perf_counter() - start)
            step_together = min(
                step_together, sum(r.train_seconds for r in together) / (k * opts.steps)
            )
        fig = {
            "k": k,
            "product_step_seconds_sequential": round(step_alone, 5),
            "product_step_seconds_together": round(step_together, 5),
            "speedup_steps": round(step_alone / step_together, 3),
            "wall_seconds_sequential": round(wall_alone, 3),
            "wall_seconds_together": round(wall_together, 3),
            "speedup_wall": round(wall_alone / wall_together, 3),
        }
        if cuda:
            fig["peak_gpu_memory_gib_together"] = round(
                torch.cuda.max_memory_allocated() / 2**30, 2
            )
        figures.append(fig)
        rows.append(
            [
                k,
                f"{step_alone:.4f}",
                f"{step_together:.4f}",
                f"{fig['speedup_steps']:.2f}x",
                f"{fig['speedup_wall']:.2f}x",
            ]
        )
    result = {
        "size": args.size,
        "machine": machine(args.device),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # shared machines: contention
        "torch_threads": torch.get_num_threads(),
        "note": "tiny model on CPU: plumbing only, not the GPU goal (>= 1.5x at K=4, SDXL)"
        if args.size == "tiny"
        else "real-size SDXL architecture, random weights",
        "resolution": opts.resolution,
        "batch_size_per_product": opts.batch_size,
        "rank": opts.rank,
        "steps_per_product": opts.steps,
        "samples_per_product": args.samples,
        "repeats_fastest_of": args.repeats,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "results": figures,
    }
    print(
        format_table(
            ["K", "s/product-step alone", "s/product-step together", "steps", "wall"], rows
        )
    )
    print(
        f"{args.size} at {opts.resolution}px, batch {opts.batch_size} per product, rank "
        f"{opts.rank}, {opts.steps} steps, on {args.device}; speed-up = alone / together"
    )
    out = Path(
        args.out
        or ROOT / "bench" / "results" / f"multi_lora-{args.size}-{args.device.split(':')[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
