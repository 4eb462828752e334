"""What each model role needs from a machine: GPU memory, CPUs, RAM and seconds per item.

The placement plan (``ray_app.plan``) packs roles onto GPUs by these figures, so that GPU
fractions follow from memory instead of being set by hand. Every figure carries its source:
``measured`` (a bench file in ``bench/results/`` on a named GPU) or ``estimated`` (derived
below from parameter counts, dtype, batch size and resolution, and not yet checked on a GPU).

GPU memory of a role = weights + batch_size x activations per item, where the activation
term scales with the pixels the role processes at the configured resolution. The
reference figures are for the default profile's checkpoints; a source this table does not
know gets the figures of its role's default checkpoint, labelled as such.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from ray_app.config import RestageConfig

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}  # auto is bf16 on CUDA
GIB = 2**30
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
# Per-role peak memory and seconds per item measured on a GPU by bench/gpu_roles.py (real-size
# architectures, random weights; only its CUDA run of the default profile writes this file).
# When present, a role's figures measured at its configured dtype and batch size replace the
# estimates; a role the run could not measure (``measured: false``) keeps them.
MEASURED_FILE = "roles_gpu.json"


@dataclass(frozen=True)
class Reference:
    """A role's default checkpoint: parameters, activations per item at a reference size,
    and seconds per item on an 80 GB data-centre GPU (H100 class)."""

    checkpoint: str
    params_b: float  # billions of parameters loaded (all sub-models the role loads)
    act_gib: float  # activations per item at ref_pixels, in the default dtype
    ref_pixels: int  # pixels per item the activation figure is for (0: not image-sized)
    seconds: float  # seconds per item at the default profile's settings
    unit: str  # what an item is
    basis: str  # where the figures come from


# Parameter counts are the checkpoints' published sizes; activations and seconds are
# estimates from attention/conv shapes at the listed size (not measured here: no GPU).
REFERENCES: dict[str, Reference] = {
    "captioner": Reference(
        "Qwen/Qwen2.5-VL-3B-Instruct",
        3.75,
        0.5,
        0,
        0.6,
        "image",
        "3.75 B params; ~0.5 GiB KV cache and vision tokens per image",
    ),
    "segmenter": Reference(
        "sam_vit_h_4b8939",
        0.636,
        2.2,
        1024 * 1024,
        0.15,
        "image",
        "636 M params; ViT-H global attention at 64x64 tokens, ~2.2 GiB per image in fp32",
    ),
    "novel_view": Reference(
        "stabilityai/stable-video-diffusion-img2vid-xt",
        2.25,
        15.5,
        14 * 576 * 1024,
        14.0,
        "clip",
        "UNet 1.5 B + CLIP-H image encoder 0.63 B + VAE; ~20 GiB at 14 frames 576x1024",
    ),
    "inpainter": Reference(
        "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        3.5,
        2.5,
        1024 * 1024,
        3.0,
        "image",
        "UNet 2.6 B + text encoders 0.8 B + VAE; ~2.5 GiB per 1024^2 image with CFG and SDPA",
    ),
    "generator": Reference(
        "stabilityai/stable-diffusion-xl-base-1.0",
        3.5,
        2.5,
        1024 * 1024,
        2.5,
        "image",
        "UNet 2.6 B + text encoders 0.8 B + VAE; ~2.5 GiB per 1024^2 image with CFG and SDPA",
    ),
    "clip": Reference(
        "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
        0.43,
        0.03,
        0,
        0.004,
        "image",
        "428 M params; ViT-L/14 at 224 px",
    ),
    "dino": Reference(
        "facebook/dinov2-base", 0.086, 0.015, 0, 0.002, "image", "86 M params; ViT-B/14 at 224 px"
    ),
    "eval_clip": Reference(
        "timm/vit_base_patch32_clip_224.openai",
        0.15,
        0.01,
        0,
        0.001,
        "image",
        "151 M params; ViT-B/32 at 224 px (49 patches)",
    ),
    "eval_dino": Reference(
        "facebook/dino-vits16", 0.022, 0.01, 0, 0.001, "image", "22 M params; ViT-S/16 at 224 px"
    ),
    "inception": Reference(
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        0.024,
        0.02,
        0,
        0.002,
        "image",
        "24 M params; Inception-v3 at 299 px (FID pool3 features)",
    ),
    "encoder": Reference(
        "facebook/dinov2-base",
        0.086,
        0.06,
        0,
        0.004,
        "image",
        "86 M params; training keeps activations and AdamW state (x4 of inference)",
    ),
    "llm": Reference(
        "Qwen/Qwen2.5-7B-Instruct",
        7.6,
        0.1,
        0,
        0.5,
        "prompt",
        "7.6 B params; ~0.1 GiB KV cache per prompt",
    ),
}
# LoRA training of the generator (train job): bf16 base, float32 rank-64 LoRA, AdamW,
# gradient checkpointing, batch 4 at 1024 px with cached latents: ~24 GiB per worker.
TRAIN_REFERENCE = Reference(
    "stabilityai/stable-diffusion-xl-base-1.0",
    3.5,
    4.0,
    1024 * 1024,
    1.4,
    "step",
    "SDXL LoRA rank 64 with gradient checkpointing: ~7 GiB weights, ~4 GiB per sample, "
    "~1.4 s per batch-4 step",
)
TINY_GIB = 0.25  # a tiny random-weight role: a few MB of weights, torch's own overhead
CUDA_CONTEXT_GIB = 0.6  # per process: the CUDA context and kernels, before any tensor


@dataclass(frozen=True)
class RoleNeed:
    """What one actor of a role needs, with the source of the figures."""

    role: str
    on_gpu: bool
    fixed_gib: float  # CUDA context + weights (+ optimizer state): independent of batch size
    per_item_gib: float  # activations per item of a batch
    batch: int
    cpus: float
    ram_gib: float
    seconds_per_item: float
    unit: str
    source: str  # "measured on <gpu>" | "estimated: <basis>"

    @property
    def gpu_gib(self) -> float:
        """Peak GPU memory of one actor (0 when it runs on CPU)."""
        return self.fixed_gib + self.batch * self.per_item_gib if self.on_gpu else 0.0

    def at_batch(self, batch: int) -> RoleNeed:
        return replace(self, batch=batch)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gpu_gib": round(self.gpu_gib, 2)}


def _pixels(config: RestageConfig, role: str) -> int:
    """Pixels per item the role processes at the configured sizes (0: not image-sized)."""
    a, g = config.augment, config.generate
    if role == "novel_view":
        return a.views.num_frames * a.views.width * a.views.height
    if role == "inpainter":
        return a.contexts.size**2
    if role == "generator":
        return max(g.width * g.height, a.negatives.size**2)
    if role == "segmenter":
        return 1024 * 1024  # SAM always resizes to 1024 px
    return 0


@cache  # read once per process: every role's figures consult it
def measured() -> dict[str, Any]:
    """Figures that ``bench/gpu_roles.py`` measured on a GPU, keyed by role ({} if none)."""
    path = RESULTS / MEASURED_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    gpu = data.get("machine", {}).get("gpu")
    return {r["role"]: dict(r, gpu=gpu) for r in data["roles"] if r.get("measured", True)}


def role_need(config: RestageConfig, role: str) -> RoleNeed:
    """The resources one actor of ``role`` needs under ``config``."""
    spec = config.role(role)
    ref = REFERENCES[role]
    on_gpu = spec.num_gpus > 0 and spec.device != "cpu"
    if spec.source == "tiny":
        return RoleNeed(
            role,
            on_gpu,
            TINY_GIB,
            0.0,
            spec.batch_size,
            spec.num_cpus,
            1.0,
            ref.seconds,
            ref.unit,
            "estimated: tiny",
        )
    weights = ref.params_b * 1e9 * BYTES[spec.dtype] / GIB
    scale = _pixels(config, role) / ref.ref_pixels if ref.ref_pixels else 1.0
    if role == "segmenter" and spec.dtype != "float32":
        scale /= 2  # the reference activation figure is fp32
    fixed, per_item = CUDA_CONTEXT_GIB + weights, ref.act_gib * scale
    source = f"estimated: {ref.basis}"
    if ref.checkpoint.split("/")[-1] not in spec.source:
        source += f" (figures of {ref.checkpoint}; {spec.source} is not in the table)"
    seconds = ref.seconds
    hit = measured().get(role)
    if hit and hit.get("dtype") == spec.dtype and hit.get("batch_size") == spec.batch_size:
        # Measured at this batch size: all of it fixed. torch's peak leaves out the CUDA
        # context, and the process holds what its allocator reserved, not only what it used.
        peak = hit.get("peak_reserved_gib") or hit["peak_gib"]
        fixed, per_item = CUDA_CONTEXT_GIB + peak, 0.0
        seconds = hit.get("seconds_per_item") or seconds
        source = f"measured on {hit['gpu']} (bench/results/{MEASURED_FILE})"
    ram = max(2.0, ref.params_b * BYTES[spec.dtype] * 1.5)  # host copy while loading
    return RoleNeed(
        role,
        on_gpu,
        round(fixed, 2),
        round(per_item, 3),
        spec.batch_size,
        spec.num_cpus,
        round(ram, 1),
        seconds,
        ref.unit,
        source,
    )


def train_need(config: RestageConfig) -> RoleNeed:
    """What one LoRA training worker needs (the generator's base, trained)."""
    t, spec = config.train, config.role("generator")
    ref = TRAIN_REFERENCE
    on_gpu = t.gpus_per_worker > 0
    samples = t.batch_size * t.products_per_step  # a step's batch: K products' batches
    if spec.source == "tiny":
        return RoleNeed(
            "train",
            on_gpu,
            TINY_GIB,
            0.0,
            samples,
            t.cpus_per_worker,
            2.0,
            ref.seconds,
            ref.unit,
            "estimated: tiny",
        )
    weights = ref.params_b * 1e9 * BYTES[spec.dtype] / GIB
    per_sample = ref.act_gib * (t.resolution**2 / ref.ref_pixels)
    if not t.gradient_checkpointing:
        per_sample *= 3  # every block's activations kept for backward
    # fp32 LoRA + two AdamW moments (~2.2 M parameters per rank), one set per product of a step
    lora = 3 * 4 * t.rank * 2.2e6 / GIB * t.products_per_step
    seconds, source = ref.seconds, f"estimated: {ref.basis}"
    hit = measured_train(config)
    if hit:  # the step measured; the memory stays estimated (the run kept no reserved peak)
        memory = f"~{weights:.0f} GiB weights, ~{per_sample:.1f} GiB per sample"
        seconds, source = hit[0], f"{hit[1]}; memory estimated: {memory}"
    return RoleNeed(
        "train",
        on_gpu,
        round(CUDA_CONTEXT_GIB + weights + lora, 2),
        round(per_sample, 3),
        samples,
        t.cpus_per_worker,
        16.0,
        seconds,
        ref.unit,
        source,
    )


@cache
def _train_runs() -> tuple[tuple[str, dict[str, Any]], ...]:
    """``bench/gpu_train.py``'s results (``gpu_train_<gpu>.json``): (file name, result)."""
    return tuple(
        (p.name, json.loads(p.read_text())) for p in sorted(RESULTS.glob("gpu_train_*.json"))
    )


def measured_train(config: RestageConfig) -> tuple[float, str] | None:
    """Seconds per training step that ``bench/gpu_train.py`` measured on a GPU with this
    config's settings (SDXL, rank, target modules, resolution, batch size, gradient
    checkpointing, one product per step), and its source; None where no run matches. A run
    that recorded no ``lora_compute`` ran peft's float32 branch."""
    t, spec = config.train, config.role("generator")
    if "stable-diffusion-xl-base-1.0" not in spec.source or t.products_per_step != 1:
        return None
    mine = (t.rank, list(t.target_modules), t.resolution, t.batch_size, t.gradient_checkpointing)
    for name, run in reversed(_train_runs()):
        s = run.get("settings", {})
        step = (run.get("summary") or {}).get("restage_seconds_per_step")
        keys = ("rank", "target_modules", "resolution", "batch_size", "gradient_checkpointing")
        if step and "SDXL" in s.get("model", "") and tuple(s.get(k) for k in keys) == mine:
            gpu = run.get("machine", {}).get("gpu") or "a GPU"
            compute = s.get("lora_compute", "float32")
            note = "" if compute == t.lora_compute else f" with train.lora_compute={compute}"
            return float(step), f"measured on {gpu}{note} (bench/results/{name})"
    return None


def encoder_train_need(config: RestageConfig) -> RoleNeed:
    """What one personalize actor needs: the encoder with the activations of a whole step's
    images held for backward at once (``personalize.images_per_step``; the role's batch size
    only batches inference, so none of it is per item). The LoRA and its AdamW state are a few
    MB."""
    need = role_need(config, "encoder")
    images = config.personalize.images_per_step
    return replace(
        need,
        fixed_gib=round(need.fixed_gib + images * need.per_item_gib, 2),
        per_item_gib=0.0,
        source=f"{need.source}; a step's {images} images held for backward",
    )
