"""Boundary-weighted inpainter fine-tuning (`restage stage train-inpainter`, issue 15): on
held-out synthetic scenes, the seam error (``band_l1``: mean |error| within ``band`` pixels of
the hole's edge, 0-255) and the whole-hole error (mean |error| inside the hole) of the base
inpainter, a LoRA trained without weighting, and a LoRA trained with the weighted boundary
loss (arXiv 2307.15326, eq. 1), all in one run: same scenes, holes, seed and steps; only
``weighting`` differs. Also the held-out denoising loss (plain and weighted MSE) before and
after each training. Prints a table and writes JSON to bench/results/.

    python bench/stage_inpaint.py                                   # tiny profile, CPU
    python bench/stage_inpaint.py --device cuda --profile default   # real-size SDXL inpainting

Scenes: a wall of vertical stripes (random period, phase, colours) over a floor with a vertical
gradient, and a product-like blob (ellipse, box, or body on a base) standing on the floor;
holes are other scenes' products (``actors.inpaint_trainer.product_holes``). The fill is
learnable from the hole's surroundings: stripes continue, the gradient goes on. Painted images
are composited (pixels outside the hole are the scene's own, as staging keeps them), so the
band error measures the fill next to the edge; the raw pipeline output's band error is also
recorded.

``--profile tiny`` is the project's tiny random-weight SDXL inpainting checkpoint (loaded by
the production loader); ``--profile default`` builds SDXL inpainting's architecture (9-channel
UNet 2.6B, both text encoders, VAE) with random weights in memory, as bench/train.py does, so
the FLOPs are real ones but the base paints noise: both measure whether the LoRA learns the
task from scratch, not how a pretrained inpainter improves.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from actors.inpaint_trainer import InpaintTrainer, prepare_scenes, train_inpainter  # noqa: E402
from bench.common import machine  # noqa: E402
from ray_app.boundary_weights import band_l1  # noqa: E402
from ray_app.config import InpaintTrainConfig, load_config  # noqa: E402
from ray_app.report import format_table  # noqa: E402

VARIANTS = ("base", "lora_unweighted", "lora_weighted")


def synthetic_scenes(
    n: int, height: int, width: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` scenes (uint8 RGB, bool product mask): striped wall, gradient floor, a blob on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scenes = []
    for _ in range(n):
        horizon = rng.uniform(0.45, 0.65) * height
        period = rng.uniform(0.06, 0.2) * width
        phase = rng.uniform(0, 2 * np.pi)
        a, b = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * xx / period + phase)
        wall = a + (b - a) * stripes[..., None]
        top, bottom = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
        t = np.clip((yy - horizon) / max(1.0, height - horizon), 0, 1)[..., None]
        floor = top + (bottom - top) * t
        rgb = np.where((yy < horizon)[..., None], wall, floor)
        # the product: stands on the floor, 25-55% of the height, centred somewhere
        ph = rng.uniform(0.25, 0.55) * height
        pw = ph * rng.uniform(0.5, 1.3)
        cx = rng.uniform(0.25, 0.75) * width
        y1 = rng.uniform(max(horizon + 0.1 * height, ph), height * 0.97)
        x0, x1, y0 = cx - pw / 2, cx + pw / 2, y1 - ph
        kind = rng.integers(3)
        ex = ((xx - cx) / (pw / 2)) ** 2 + ((yy - (y0 + y1) / 2) / (ph / 2)) ** 2 <= 1
        box = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        if kind == 0:
            mask = ex
        elif kind == 1:
            mask = box
        else:
            body = ((xx - cx) / (pw / 2)) ** 2 + ((yy - (y0 + ph * 0.4)) / (ph * 0.4)) ** 2 <= 1
            base = (abs(xx - cx) < pw / 4) & (yy >= y1 - ph * 0.25) & (yy < y1)
            mask = body | base
        colour = rng.uniform(0, 255, 3)
        shade = 0.8 + 0.2 * (xx - x0) / max(1.0, pw)  # a little shading: not a flat sticker
        rgb = np.where(mask[..., None], colour * shade[..., None], rgb)
        scenes.append((np.clip(rgb, 0, 255).round().astype(np.uint8), mask))
    return scenes


def sdxl_inpaint_pipeline(device: str, dtype: torch.dtype):
    """SDXL inpainting 0.1's architecture with random weights: bench/train.py's SDXL with a
    9-channel UNet (noisy latents, mask, masked-image latents)."""
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from bench.train import sdxl_pipeline

    base = sdxl_pipeline(device, dtype)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    components = {k: v for k, v in base.components.items() if k != "unet"}
    del base
    pipe = StableDiffusionXLInpaintPipeline(
        **components, unet=unet.to(dtype), requires_aesthetics_score=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(
    painted: list[np.ndarray], images: list[np.ndarray], holes: list[np.ndarray], band: int
) -> dict[str, float]:
    """Band and hole L1 of composited paints (and the raw paint's band L1), means over images."""
    band_c, hole_c, band_raw = [], [], []
    for out, truth, hole in zip(painted, images, holes, strict=True):
        composite = np.where(hole[..., None], out, truth)
        band_c.append(band_l1(composite, truth, hole, band))
        band_raw.append(band_l1(out, truth, hole, band))
        diff = np.abs(out.astype(np.float32) - truth.astype(np.float32))
        hole_c.append(float(diff[hole].mean()))
    return {
        "band_l1": round(float(np.mean(band_c)), 3),
        "hole_l1": round(float(np.mean(hole_c)), 3),
        "band_l1_raw": round(float(np.mean(band_raw)), 3),
        "band_l1_per_image": [round(v, 3) for v in band_c],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=("tiny", "default"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--scenes", type=int, default=None, help="synthetic scenes [tiny 48, default 64]"
    )
    ap.add_argument("--held-out", type=float, default=0.25)
    ap.add_argument(
        "--steps", type=int, default=None, help="steps per training [tiny 150, default 300]"
    )
    ap.add_argument("--resolution", type=int, default=None, help="[tiny 64, default 512]")
    ap.add_argument("--batch-size", type=int, default=None, help="[tiny 4, default 4]")
    ap.add_argument("--rank", type=int, default=None, help="[tiny 8, default 16]")
    ap.add_argument("--learning-rate", type=float, default=None, help="[tiny 3e-3, default 1e-4]")
    ap.add_argument("--band", type=int, default=None, help="pixels [resolution / 16]")
    ap.add_argument("--peak", type=float, default=5.0)
    ap.add_argument("--paint-steps", type=int, default=None, help="[tiny 10, default 25]")
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON [bench/results/stage_inpaint_DEVICE.json]")
    args = ap.parse_args()

    tiny = args.profile == "tiny"
    res = args.resolution or (64 if tiny else 512)
    train_cfg = InpaintTrainConfig(
        steps=args.steps or (150 if tiny else 300),
        learning_rate=args.learning_rate or (3e-3 if tiny else 1e-4),
        rank=args.rank or (8 if tiny else 16),
        batch_size=args.batch_size or 4,
        resolution=res,
        band=args.band or max(1, res // 16),
        peak=args.peak,
        held_out=args.held_out,
        seed=args.seed,
        gradient_checkpointing=not tiny,
    )
    n = args.scenes or (48 if tiny else 64)
    paint_steps = args.paint_steps or (10 if tiny else 25)
    config = load_config(args.profile)

    start = time.perf_counter()
    pipeline = None
    if not tiny:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        pipeline = sdxl_inpaint_pipeline(args.device, dtype)
    trainer = InpaintTrainer(
        config.model_spec("inpainter"), train_cfg, device=args.device, pipeline=pipeline
    )
    load_seconds = time.perf_counter() - start

    # the scenes a little larger than the training size and not square: the job's crop runs
    scenes = synthetic_scenes(n, round(res * 1.25), round(res * 1.5), args.seed)
    images, holes, _, held_idx = prepare_scenes(scenes, train_cfg)
    held_images, held_holes = [images[i] for i in held_idx], [holes[i] for i in held_idx]
    seeds = [args.seed * 1000 + i for i in range(len(held_idx))]

    def paint(lora: bool) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        chunk = 4 if tiny else 2
        for i in range(0, len(held_images), chunk):
            out += trainer.paint(
                held_images[i : i + chunk],
                held_holes[i : i + chunk],
                seeds[i : i + chunk],
                paint_steps,
                args.guidance_scale,
                lora=lora,
            )
        return out

    results: dict[str, dict] = {}
    results["base"] = measure(paint(lora=False), held_images, held_holes, train_cfg.band)
    with tempfile.TemporaryDirectory() as tmp:
        for name, weighting in (("lora_unweighted", False), ("lora_weighted", True)):
            cfg = train_cfg.model_copy(update={"weighting": weighting})
            summary = train_inpainter(
                config.model_spec("inpainter"), cfg, scenes, f"{tmp}/{name}", trainer=trainer
            )
            results[name] = {
                **measure(paint(lora=True), held_images, held_holes, train_cfg.band),
                "first_loss": round(summary["first_loss"], 5),
                "final_loss": round(summary["final_loss"], 5),
                "held_out_loss_start": {k: round(v, 5) for k, v in summary["eval_start"].items()},
                "held_out_loss_end": {k: round(v, 5) for k, v in summary["eval_end"].items()},
                "train_seconds": summary["train_seconds"],
            }
    per_image = {v: np.array(results[v]["band_l1_per_image"]) for v in VARIANTS}
    wins = float(np.mean(per_image["lora_weighted"] < per_image["lora_unweighted"]))
    device = args.device.split(":")[0]
    result = {
        "profile": args.profile,
        "weights": "tiny random-weight checkpoint"
        if tiny
        else "SDXL inpainting architecture, random weights",
        "machine": machine(args.device),
        "train_config": train_cfg.model_dump(mode="json", exclude={"weighting"}),
        "scenes": n,
        "held_out_scenes": len(held_idx),
        "paint": {"steps": paint_steps, "guidance_scale": args.guidance_scale},
        "composite": "painted pixels inside the hole, the scene's own outside (band_l1, hole_l1); "
        "band_l1_raw: the pipeline's output as is",
        "load_seconds": round(load_seconds, 2),
        "results": results,
        "weighted_beats_unweighted_band_l1_share": round(wins, 3),
    }
    if args.device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(
        format_table(
            ["variant", "band L1", "hole L1", "band L1 raw", "held-out mse end", "w-mse end"],
            [
                [
                    v,
                    f"{results[v]['band_l1']:.2f}",
                    f"{results[v]['hole_l1']:.2f}",
                    f"{results[v]['band_l1_raw']:.2f}",
                    f"{results[v]['held_out_loss_end']['mse']:.4f}" if v != "base" else "",
                    f"{results[v]['held_out_loss_end']['weighted_mse']:.4f}" if v != "base" else "",
                ]
                for v in VARIANTS
            ],
        )
    )
    print(
        f"{args.profile} at {res}px, {n} scenes ({len(held_idx)} held out), "
        f"{train_cfg.steps} steps x batch {train_cfg.batch_size}, band {train_cfg.band}px, "
        f"peak {train_cfg.peak}, on {args.device}; weighted < unweighted band L1 on "
        f"{wins:.0%} of held-out scenes"
    )
    out = Path(args.out or ROOT / "bench" / "results" / f"stage_inpaint_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
