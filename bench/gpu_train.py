"""Per-product LoRA training, restage against diffusers' own DreamBooth-LoRA SDXL script
(``examples/dreambooth/train_dreambooth_lora_sdxl.py``), in one run on one GPU, at equal
settings: SDXL, rank 64 on the UNet's attention projections, 1024 px, batch 4, the same
steps, learning rate, bf16 and gradient checkpointing. Writes JSON to bench/results/.

    python bench/gpu_train.py --script /path/to/train_dreambooth_lora_sdxl.py \
        --photos ../shared/data/dreambooth --products backpack can --steps 30

How each is used: restage loads the base once per worker and trains product after product
(``LoraTrainer.train``, what a Ray Train worker runs; Ray itself is not involved here); the
script is started once per product, as its users run it (``python script.py ...``), and
loads the base each time. Both read the same checkpoint folder: SDXL base 1.0's
architecture with random weights (bench/train.py), saved once in bf16 (the FLOPs are the
real model's; no download is possible on the benchmark machine).

Reported per product: set-up seconds (restage: reset, decode + crop, latents and text
encoded once, the loss before training; the script: its whole wall time minus its training
loop, i.e. interpreter start, imports, loading the base, its data set), seconds per step
(the training loop over the steps; the script's from its own progress bar), total seconds
(restage adds writing the adapter file), and restage's base load once per worker. From the
measured figures, the total per product at the default profile's step count follows by
arithmetic (labelled as such). A short torch.profiler window over restage's steps gives the
top CUDA kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.lora_trainer import LoraTrainer, TrainingSample  # noqa: E402
from bench.common import machine  # noqa: E402
from bench.train import sdxl_pipeline  # noqa: E402
from ray_app.config import load_config  # noqa: E402
from ray_app.report import format_table  # noqa: E402
from ray_app.storage import AdapterLayout  # noqa: E402

PROMPT = "a photo of sks {noun}"
# Starts the script unchanged, with its "Steps" progress bar timed: the bar opens right
# before the training loop and reaches its total at the last step.
LAUNCHER = """
import runpy, sys, time
import tqdm.auto
class Timed(tqdm.auto.tqdm):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._t0 = time.perf_counter()
    def update(self, n=1):
        out = super().update(n)
        if self.desc.startswith("Steps") and self.total and self.n >= self.total:
            if not getattr(self, "_done", False):
                self._done = True
                print(f"BENCH_LOOP {self.n} {time.perf_counter() - self._t0:.4f}", flush=True)
        return out
tqdm.auto.tqdm = Timed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
_LOOP = re.compile(r"^BENCH_LOOP (\d+) ([0-9.]+)$", re.M)


def photos(root: Path, product: str) -> list[Path]:
    folder = root / product
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not found:
        raise SystemExit(f"--photos {root}: no photos in {folder}")
    return found


def loop_seconds(log: str) -> tuple[int, float]:
    """(steps, seconds) of the script's training loop, as the launcher printed them."""
    hits = _LOOP.findall(log)
    if not hits:
        raise RuntimeError(
            "the script's log has no BENCH_LOOP line: its 'Steps' bar never finished"
        )
    return int(hits[-1][0]), float(hits[-1][1])


def run_script(script: Path, base: Path, data: Path, out: Path, args) -> dict:
    noun = data.name.replace("_", " ")
    cmd = [
        sys.executable,
        "-c",
        LAUNCHER,
        str(script),
        f"--pretrained_model_name_or_path={base}",
        f"--instance_data_dir={data}",
        f"--instance_prompt={PROMPT.format(noun=noun)}",
        f"--output_dir={out}",
        f"--resolution={args.resolution}",
        f"--train_batch_size={args.batch_size}",
        f"--rank={args.rank}",
        f"--max_train_steps={args.steps}",
        "--learning_rate=2e-4",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--mixed_precision={'bf16' if args.device.startswith('cuda') else 'no'}",
        "--gradient_checkpointing",
        "--checkpointing_steps=1000000",
        "--dataloader_num_workers=2",
        "--seed=0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "0"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"the script failed ({proc.returncode}):\n{log[-4000:]}")
    steps, loop = loop_seconds(log)
    return {
        "total_seconds": round(wall, 2),
        "loop_seconds": loop,
        "steps": steps,
        "seconds_per_step": round(loop / steps, 4),
        "setup_seconds": round(wall - loop, 2),
        "command": " ".join(["python", *cmd[3:]]),
    }


def restage_samples(files: list[Path], noun: str) -> list[TrainingSample]:
    return [TrainingSample(f.stem, f.read_bytes(), PROMPT.format(noun=noun), False) for f in files]


def top_kernels(trainer: LoraTrainer, samples: list[TrainingSample], steps: int) -> list[dict]:
    """The CUDA kernels that take the most time over ``steps`` of restage's training."""
    from torch.profiler import ProfilerActivity, profile

    paused = trainer.start(samples, seed=7, steps=steps + 1)
    trainer.advance(paused, 1)  # first step outside the window
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainer.advance(paused, steps + 1)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [
        {
            "kernel": e.key[:120],
            "share": round(e.self_device_time_total / total, 4),
            "ms_per_step": round(e.self_device_time_total / 1000 / steps, 3),
        }
        for e in events[:15]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--script", required=True, type=Path, help="train_dreambooth_lora_sdxl.py")
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared/data/dreambooth")
    ap.add_argument("--products", nargs="+", default=["backpack", "can"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--work", type=Path, default=None, help="checkpoint folder [a temp dir]")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--size",
        choices=("sdxl", "tiny"),
        default="sdxl",
        help="tiny: the tiny profile's SDXL at 64 px, to check the harness on CPU",
    )
    ap.add_argument("--skip-script", action="store_true", help="restage only")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument(
        "--compare-lora-compute",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the products again with train.lora_compute=float32 (peft's casts)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_train.json")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_train_"))
    base = work / "sdxl"
    t0 = time.perf_counter()
    args.resolution = 1024 if args.size == "sdxl" else 64
    if args.size == "tiny":
        from ray_app import tiny

        base = tiny.ensure("generator", work / "cache")
    elif not (base / "model_index.json").exists():
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        pipe = sdxl_pipeline(args.device, dtype)
        pipe.save_pretrained(base)
        del pipe
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    build_seconds = time.perf_counter() - t0
    print(f"checkpoint ready in {build_seconds:.1f} s: {base}", flush=True)

    cfg = load_config(
        "default",
        overrides=[
            f"generator.source={base}",
            "generator.variant=null",
            "generator.vae=null",
            f"generator.device={args.device}",
            "offline=true",
        ],
    )
    opts = cfg.train.model_copy(
        update={
            "steps": args.steps,
            "rank": args.rank,
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "learning_rate": 2e-4,
            "gradient_checkpointing": True,
        }
    )
    start = time.perf_counter()
    trainer = LoraTrainer(cfg.model_spec("generator"), opts, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    base_load = time.perf_counter() - start
    print(f"restage: base loaded in {base_load:.1f} s", flush=True)

    def train_products(trainer: LoraTrainer, label: str, save: bool) -> list[dict]:
        rows = []
        for i, product in enumerate(args.products):
            files = photos(args.photos, product)
            start = time.perf_counter()
            result = trainer.train(restage_samples(files, product.replace("_", " ")), seed=i)
            if save:
                adapter = Path(AdapterLayout.weights_in(str(work / "restage" / product)))
                adapter.parent.mkdir(parents=True, exist_ok=True)
                adapter.write_bytes(trainer.adapter_bytes(result.state_dict))
            total = time.perf_counter() - start
            rows.append(
                {
                    "product": product,
                    "photos": len(files),
                    "setup_seconds": round(result.setup_seconds, 3),
                    "seconds_per_step": round(result.seconds_per_step, 4),
                    "total_seconds": round(total, 2),
                    "final_loss": round(result.final_loss, 4),
                }
            )
            print(label, rows[-1], flush=True)
        return rows

    restage = train_products(trainer, f"restage (lora_compute={opts.lora_compute})", True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    # what the process held (the plan's memory figure: ray_app/resources.py)
    reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
    kernels: list[dict] | str = []
    if args.device.startswith("cuda") and args.profile_steps:
        try:  # the profile is an extra: its failure must not cost the timings
            pics = restage_samples(photos(args.photos, args.products[0]), "x")
            kernels = top_kernels(trainer, pics, args.profile_steps)
        except Exception as exc:
            kernels = f"profile failed: {type(exc).__name__}: {exc}"
    del trainer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    # The same products with peft's float32 LoRA branch, in this run: what lora_compute saves.
    lora_float32: list[dict] = []
    if args.compare_lora_compute and opts.lora_compute != "float32":
        other = LoraTrainer(
            cfg.model_spec("generator"),
            opts.model_copy(update={"lora_compute": "float32"}),
            device=args.device,
        )
        lora_float32 = train_products(other, "restage (lora_compute=float32)", False)
        del other
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    def report(script: list[dict]) -> dict:
        """The result JSON, written now: a run cut short still leaves what it measured."""

        def median(rows: list[dict], key: str) -> float | None:
            return round(float(np.median([r[key] for r in rows])), 4) if rows else None

        # Later products are what a long run sees: the first one also pays first-call kernels.
        steady = restage[1:] or restage
        summary = {
            "restage_total_per_product": median(steady, "total_seconds"),
            "script_total_per_product": median(script, "total_seconds"),
            "restage_seconds_per_step": median(steady, "seconds_per_step"),
            "script_seconds_per_step": median(script, "seconds_per_step"),
            "restage_setup_per_product": median(steady, "setup_seconds"),
            "script_setup_per_product": median(script, "setup_seconds"),
        }
        if lora_float32:
            slow = median(lora_float32[1:] or lora_float32, "seconds_per_step")
            summary["restage_seconds_per_step_lora_float32"] = slow
            summary["lora_compute_step_speedup"] = round(
                slow / summary["restage_seconds_per_step"], 3
            )
        if script:
            summary["speedup_per_product"] = round(
                summary["script_total_per_product"] / summary["restage_total_per_product"], 2
            )
            profile_steps = cfg.train.steps

            def at(steps: int, who: str) -> float:
                """The measured total with ``steps`` steps in place of the run's."""
                total = summary[f"{who}_total_per_product"]
                return total + (steps - args.steps) * summary[f"{who}_seconds_per_step"]

            r, s = at(profile_steps, "restage"), at(profile_steps, "script")
            summary[f"derived_at_{profile_steps}_steps"] = {
                "restage_seconds": round(r, 1),
                "script_seconds": round(s, 1),
                "speedup": round(s / r, 2),
                "how": "the measured total per product + (these steps - the run's) x the measured "
                "s/step: arithmetic on this run's figures, not a run of that length",
            }
        result = {
            "bench": "gpu_train",
            "machine": machine(args.device),
            "settings": {
                "model": "SDXL base 1.0 architecture, random weights, bf16"
                if args.size == "sdxl"
                else "the tiny profile's SDXL (harness check)",
                "rank": args.rank,
                "target_modules": list(opts.target_modules),
                "resolution": args.resolution,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "learning_rate": 2e-4,
                "gradient_checkpointing": True,
                "lora_compute": opts.lora_compute,
                "photos": str(args.photos),
            },
            "checkpoint_build_seconds": round(build_seconds, 1),
            "restage_base_load_seconds_per_worker": round(base_load, 2),
            "restage_peak_gpu_memory_gib": round(peak, 2) if peak else None,
            "restage_peak_reserved_gib": round(reserved, 2) if reserved else None,
            "restage": restage,
            "restage_lora_float32": lora_float32,
            "script": script,
            "summary": summary,
            "restage_top_cuda_kernels": kernels,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return summary

    report([])  # restage's figures, before the script's runs
    script: list[dict] = []
    if not args.skip_script:
        for product in args.products:
            res = run_script(
                args.script, base, args.photos / product, work / "script" / product, args
            )
            script.append({"product": product, **res})
            print("script", {k: v for k, v in script[-1].items() if k != "command"}, flush=True)
            summary = report(script)
    else:
        summary = report(script)
    rows = [[k, json.dumps(v)] for k, v in summary.items()]
    print(format_table(["measure", "value"], rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
