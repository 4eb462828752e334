"""The data side of an encoder training step (`restage personalize`, actors/encoder_trainer.py):
cropping, resizing, flipping and normalising the step's images on the trainer's device
(``EncoderTrainer.upload`` once per product, ``views`` per step; the loss stays on the
device) against the baseline of the same run: PIL crops on the host (``random_square``),
normalised on the host and copied, with the loss read back every step (how training did it
before).

    python bench/personalize_data.py                             # CPU: data side at base sizes
    python bench/personalize_data.py --device cuda --size base   # + whole steps, DINOv2-B/14

The data side is what a step draws at the paper's settings: 16 anchor-positive pairs and 64
negatives (96 images) from photos whose longer side is 448 px (the job's decode size at 224
px), to 224 px. With ``--size base`` (random DINOv2-B/14 weights) or ``tiny`` the whole
training step is timed too, both ways; on a CPU at base size that takes minutes, so it is
skipped unless ``--steps`` is given. On a bfloat16 encoder (a GPU) the whole steps are also
timed with ``personalize.lora_compute=float32`` (peft casting every LoRA layer's activations
to float32 and back) against the default ``base``: ``lora_compute_step_speedup``. Writes
JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from actors.encoder_trainer import EncoderTrainer, info_nce, random_square  # noqa: E402
from bench.common import machine  # noqa: E402
from bench.personalize import dinov2_base  # noqa: E402
from ray_app.config import load_config  # noqa: E402

PAIRS, NEGATIVES, SIDE = 16, 64, 448


def images(n: int, seed: int) -> list[np.ndarray]:
    """Photo-sized uint8 images (the content does not change the cost)."""
    rng = np.random.default_rng(seed)
    shapes = [(SIDE, SIDE * 3 // 4), (SIDE * 3 // 4, SIDE), (SIDE, SIDE)]
    return [rng.integers(0, 256, (*shapes[i % 3], 3), dtype=np.uint8) for i in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Step:
    """One training step's batch, drawn the trainer's way, with either data path."""

    def __init__(self, trainer: EncoderTrainer, pool: list[np.ndarray]):
        self.trainer, self.pool = trainer, pool
        self.uploaded = trainer.upload(pool)
        self.rng = np.random.default_rng(0)

    def _draw(self) -> np.ndarray:
        return self.rng.integers(0, len(self.pool), 2 * PAIRS + NEGATIVES)

    def host(self):
        t, cfg = self.trainer, self.trainer.config
        crops = [
            random_square(self.pool[i], t.resolution, cfg.crop_scale, cfg.flip, self.rng)
            for i in self._draw()
        ]
        return t._pixels(crops)

    def device(self):
        return self.trainer.views([self.uploaded[i] for i in self._draw()], self.rng)


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_data(step: Step, repeats: int, device: str) -> dict[str, float]:
    """Median seconds to make one step's batch, each way; the ways take turns, so that a
    busy machine slows both alike."""
    step.host(), step.device()  # warm-up
    times = {"host": [], "device": []}
    for _ in range(repeats):
        for way in times:
            times[way].append(_timed(getattr(step, way), device))
    return {way: round(float(np.median(t)), 4) for way, t in times.items()}


def time_steps(step: Step, n: int, device: str) -> dict[str, float]:
    """Seconds per whole training step (features, InfoNCE, backward, AdamW) fed each way,
    in turns of ``n`` steps: ``host`` reads the loss back every step as training did,
    ``device`` once per turn."""
    import torch

    t = step.trainer
    optimizer = torch.optim.AdamW(list(t.lora_params.values()), lr=1e-4)

    def steps(way: str, count: int) -> None:
        losses = []
        for _ in range(count):
            feats = t._features(getattr(step, way)())
            loss = info_nce(
                feats[:PAIRS], feats[PAIRS : 2 * PAIRS], feats[2 * PAIRS :], t.config.temperature
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()) if way == "host" else loss.detach())
        if way == "device":
            torch.stack(losses).cpu()

    steps("host", 1), steps("device", 1)  # warm-up
    times = {"host": 0.0, "device": 0.0}
    for _ in range(2):
        for way in times:
            times[way] += _timed(lambda w=way: steps(w, n // 2 or 1), device)
    return {way: round(total / (2 * (n // 2 or 1)), 4) for way, total in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "base"], default="base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=10, help="data-side batches timed per way")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="whole steps timed per way (default: 20 on CUDA, none on CPU)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="JSON path [bench/results/...]")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (20 if args.device.startswith("cuda") else 0)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"encoder.device={args.device}", "personalize.resolution=224"]
        if args.size == "base":
            overrides += [f"encoder.source={dinov2_base(Path(tmp) / 'dinov2-base')}"]
            overrides += (
                ["personalize.rank=16", "encoder.dtype=bfloat16"] if args.device != "cpu" else []
            )
        config = load_config("tiny", overrides=overrides)
        trainer = EncoderTrainer(
            config.model_spec("encoder"), config.personalize, device=args.device
        )
        step = Step(trainer, images(450, 0))
        result = {
            "bench": "personalize_data",
            "size": args.size,
            "images_per_step": 2 * PAIRS + NEGATIVES,
            "source_side": SIDE,
            "resolution": trainer.resolution,
            "torch_threads": torch.get_num_threads(),
            "machine": machine(args.device),
            "data_seconds_per_step": time_data(step, args.repeats, args.device),
        }
        d = result["data_seconds_per_step"]
        result["data_speedup"] = round(d["host"] / d["device"], 2)
        if steps:
            s = time_steps(step, steps, args.device)
            result["step_seconds"] = s
            result["steps_timed"] = steps
            result["step_speedup"] = round(s["host"] / s["device"], 2)
            if trainer.dtype != torch.float32:  # what personalize.lora_compute=base saves
                peft_way = config.personalize.model_copy(update={"lora_compute": "float32"})
                other = EncoderTrainer(config.model_spec("encoder"), peft_way, device=args.device)
                f32 = time_steps(Step(other, images(450, 0)), steps, args.device)["device"]
                result["step_seconds_lora_float32"] = f32
                result["lora_compute_step_speedup"] = round(f32 / s["device"], 3)
    tag = (
        "cpu"
        if args.device == "cpu"
        else (result["machine"]["gpu"] or args.device).split()[-1].lower()
    )
    out = args.out or ROOT / "bench" / "results" / f"personalize_data_{args.size}_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
