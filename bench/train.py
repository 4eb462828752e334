"""Benchmark per-product LoRA training: seconds per step with the latents and text
embeddings cached once per product vs encoded every step, and seconds of set-up per
product, in one run; prints a table and writes JSON to bench/results/.

    python bench/train.py                          # tiny SDXL, CPU (the tiny profile)
    python bench/train.py --size sdxl --device cuda  # real-size SDXL, random weights, GPU

No Ray: ``LoraTrainer`` is the class a Ray Train worker runs. ``--size sdxl`` builds the
SDXL base architecture (UNet 2.6B, both text encoders, VAE) with random weights in memory,
so the FLOPs are those of the real model; it needs a GPU with ~40 GB free at 1024 px.
The tiny size measures the plumbing on CPU, not GPU throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.lora_trainer import LoraTrainer, TrainingSample  # noqa: E402
from bench.common import machine  # noqa: E402
from ray_app import tiny  # noqa: E402
from ray_app.config import load_config  # noqa: E402
from ray_app.images import encode_png  # noqa: E402
from ray_app.report import format_table  # noqa: E402


def sdxl_pipeline(device: str, dtype: torch.dtype):
    """SDXL base 1.0's architecture with random weights (configs as published)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        )
        common = {
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        }
        te1 = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                projection_dim=768,
                hidden_act="quick_gelu",
                **common,
            )
        )
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_attention_heads=20,
                num_hidden_layers=32,
                projection_dim=1280,
                hidden_act="gelu",
                **common,
            )
        )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tiny.clip_tokenizer(),
        tokenizer_2=tiny.clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    return pipe.to(device=device, dtype=dtype)


def samples(n: int, size: int, seed: int = 0) -> list[TrainingSample]:
    """A product's worth of samples: 2 positives per negative, random images."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        negative = i % 3 == 2
        prompt = "a photo of a mug on a table" if negative else "a ohwx mug on a wooden table"
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        out.append(TrainingSample(f"s{i:02d}", encode_png(img), prompt, negative))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("tiny", "sdxl"), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    ap.add_argument("--samples", type=int, default=39, help="samples per product (augment: ~40)")
    ap.add_argument("--products", type=int, default=3, help="products trained to time set-up")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path [bench/results/train-SIZE-DEVICE.json]")
    args = ap.parse_args()

    if args.size == "tiny":
        cfg = load_config("tiny")
        steps = args.steps or 30
        overrides = {}
    else:
        cfg = load_config("default")
        steps = args.steps or 20
        overrides = {"gradient_checkpointing": True}
    if args.resolution:
        overrides["resolution"] = args.resolution
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg.train = cfg.train.model_copy(update={**overrides, "steps": steps})
    opts = cfg.train

    start = time.perf_counter()
    if args.size == "tiny":
        trainer = LoraTrainer(cfg.model_spec("generator"), cfg.train, device=args.device)
    else:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        trainer = LoraTrainer(
            cfg.model_spec("generator"), cfg.train, pipeline=sdxl_pipeline(args.device, dtype)
        )
    base_load = time.perf_counter() - start
    data = samples(args.samples, opts.resolution)

    def run(cached: bool, product: int, n_steps: int):
        trainer.options = opts.model_copy(
            update={"cache_latents": cached, "cache_text_embeddings": cached, "steps": n_steps}
        )
        return trainer.train(data, seed=product, steps=n_steps)

    run(True, 0, 2)  # warm-up: first-call kernels and allocator
    setups = [run(True, p, 1).setup_seconds for p in range(1, args.products + 1)]
    cached = run(True, 100, steps)
    uncached = run(False, 100, steps)
    result = {
        "size": args.size,
        "machine": machine(args.device),
        "resolution": opts.resolution,
        "batch_size": opts.batch_size,
        "rank": opts.rank,
        "samples_per_product": args.samples,
        "steps_timed": steps,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "base_load_seconds_per_worker": round(base_load, 3),
        "setup_seconds_per_product": round(float(np.median(setups)), 4),
        "setup_seconds_per_product_all": [round(s, 4) for s in setups],
        "seconds_per_step_cached": round(cached.seconds_per_step, 5),
        "seconds_per_step_uncached": round(uncached.seconds_per_step, 5),
        "uncached_over_cached": round(uncached.seconds_per_step / cached.seconds_per_step, 3),
        "setup_seconds_uncached": round(uncached.setup_seconds, 4),
    }
    if args.device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(
        format_table(
            ["measure", "value"],
            [
                ["base model load per worker (s)", f"{base_load:.2f}"],
                ["set-up per product, cached (s)", f"{result['setup_seconds_per_product']:.3f}"],
                ["s/step cached", f"{cached.seconds_per_step:.4f}"],
                ["s/step uncached", f"{uncached.seconds_per_step:.4f}"],
                ["uncached / cached", f"{result['uncached_over_cached']:.2f}x"],
            ],
        )
    )
    print(
        f"{args.size} at {opts.resolution}px, batch {opts.batch_size}, rank {opts.rank}, "
        f"{args.samples} samples/product, {steps} steps, on {args.device}"
    )
    out = Path(
        args.out
        or ROOT / "bench" / "results" / f"train-{args.size}-{args.device.split(':')[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
