"""Per-role figures (issue 18): for every model role at the profile's batch size, dtype and
resolution, items per second, peak GPU memory and load time, in one JSON file that the
placement plan and preflight read (``ray_app.resources.measured``).

Real-size architectures with random weights (the FLOPs and bytes of the real checkpoints,
which cannot be downloaded on the GPU machine), saved in each library's own format to a temp
folder and loaded by the production loader (``ray_app.models.load_model``) through each
role's actor, without Ray. Tokenizers are the tiny profile's (CLIP's is the real one; Qwen's
is a 512-token BPE, so prompt lengths differ from the real ones; the models' vocabularies are
real-size). Random weights never stop generating early: captions and LLM prompts always run
to ``max_new_tokens``.

    python bench/gpu_roles.py --device cuda           # -> bench/results/roles_gpu.json
    python bench/gpu_roles.py --profile tiny --device cpu --out /tmp/roles.json   # CI path
    python bench/gpu_roles.py --device cpu --quick --roles dino clip eval_dino  # dry check

``--quick`` runs real-size builders at toy workloads (2 steps, small images, 2 layers for
the Qwen models) to check that they build, save and load; its figures are not throughput
claims. Only a CUDA run of the default profile without ``--quick`` writes roles_gpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from ray_app.images import encode_png  # noqa: E402

GIB = 2**30
GPU_FILE = ROOT / "bench" / "results" / "roles_gpu.json"  # = resources.RESULTS / MEASURED_FILE
# Most useful first: a run cut short by --budget-s loses the optional and slowest roles.
ROLES = [
    "generator",
    "inpainter",
    "segmenter",
    "clip",
    "dino",
    "encoder",
    "eval_clip",
    "eval_dino",
    "inception",
    "captioner",
    "novel_view",
    "llm",
]
ARCHITECTURES = {
    "generator": "SDXL base 1.0 (UNet 2.6 B, CLIP-L + OpenCLIP-bigG text encoders, VAE)",
    "inpainter": "SDXL base 1.0 loaded as an inpainting pipeline (AutoPipelineForInpainting): "
    "the UNet takes 4 input channels instead of the 9 of SDXL inpainting 0.1 (conv_in only)",
    "novel_view": "Stable Video Diffusion img2vid-xt (spatio-temporal UNet 1.5 B, CLIP ViT-H "
    "image encoder, temporal VAE decoder)",
    "segmenter": "Segment Anything ViT-H",
    "clip": "OpenCLIP ViT-L/14",
    "dino": "DINOv2 ViT-B/14",
    "encoder": "DINOv2 ViT-B/14 with a rank-16 LoRA (personalize training)",
    "eval_clip": "OpenAI CLIP ViT-B/32 (OpenCLIP)",
    "eval_dino": "DINO ViT-S/16 (transformers ViT)",
    "inception": "FID Inception-v3 (torch-fidelity)",
    "captioner": "Qwen2.5-VL 3B Instruct",
    "llm": "Qwen2.5 7B Instruct",
}
# Checkpoints built once and shared by the roles that load them.
CHECKPOINT = {
    "generator": "sdxl",
    "inpainter": "sdxl",
    "dino": "dinov2",
    "encoder": "dinov2",
    "eval_clip": "evaluate",
    "eval_dino": "evaluate",
    "inception": "evaluate",
}
LLM_TOKENS = 128  # llm: tokens timed per prompt, scaled to the actor's max_new_tokens


# --------------------------------------------------------------------------- checkpoints


def _vit_h_sam() -> dict[str, Any]:
    """SAM ViT-H's published architecture (the loader recognises it from the weights)."""
    return {
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [7, 15, 23, 31],
        "image_size": 1024,
        "vit_patch_size": 16,
        "prompt_embed_dim": 256,
    }


def _save_sdxl(folder: Path, device: str) -> dict[str, Path]:
    """SDXL base (bench/train.py's published configs) in fp16 as variant ``fp16``, and its
    VAE alone with force_upcast false, standing in for the fp16-fix VAE of the profile."""
    from bench.train import sdxl_pipeline

    pipe = sdxl_pipeline(device, torch.float16)
    pipe.save_pretrained(folder / "sdxl", variant="fp16", safe_serialization=True)
    pipe.vae.register_to_config(force_upcast=False)
    pipe.vae.save_pretrained(folder / "sdxl-vae", safe_serialization=True)
    return {"source": folder / "sdxl", "vae": folder / "sdxl-vae"}


def _save_svd(folder: Path, device: str) -> dict[str, Path]:
    """SVD img2vid-xt's published configs (diffusers' spatio-temporal UNet defaults are SVD's)."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ray_app.tiny import svd_scheduler

    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel(num_frames=25)
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
            scaling_factor=0.18215,
        )
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=1280,
                intermediate_size=5120,
                projection_dim=1024,
                num_hidden_layers=32,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
                hidden_act="gelu",
            )
        )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=svd_scheduler(),
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}),
    ).to(dtype=torch.float16)
    pipe.save_pretrained(folder / "svd", variant="fp16", safe_serialization=True)
    return {"source": folder / "svd"}


def _save_sam(folder: Path, device: str) -> dict[str, Path]:
    from ray_app.tiny import build_sam

    with torch.device(device):
        sam = build_sam(_vit_h_sam())
    (folder / "sam").mkdir()
    torch.save({k: v.cpu() for k, v in sam.state_dict().items()}, folder / "sam" / "sam_vit_h.pth")
    return {"source": folder / "sam"}


def _save_clip(folder: Path, device: str) -> dict[str, Path]:
    from bench.evaluate import save_open_clip

    return {"source": save_open_clip(folder / "clip", "ViT-L-14", device)}


def _save_dinov2(folder: Path, device: str) -> dict[str, Path]:
    """DINOv2 ViT-B/14 and facebook/dinov2-base's image processor settings."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    dest = folder / "dinov2"
    with torch.device(device):
        model = Dinov2Model(
            Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
        )
    model.save_pretrained(dest)
    BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(dest)
    return {"source": dest}


def _save_evaluate(folder: Path, device: str) -> dict[str, Path]:
    from bench.evaluate import real_size_checkpoints

    (folder / "evaluate").mkdir()
    return {f"{r}.source": Path(p) for r, p in real_size_checkpoints(folder / "evaluate").items()}


def qwen_vl(device: str, dtype: torch.dtype, layers: int | None = None):
    """Qwen2.5-VL-3B-Instruct's published config (``layers`` caps both towers' depth, for a
    CPU dry check) with the tiny profile's processor. -> (model, processor)."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    from ray_app import tiny

    with tempfile.TemporaryDirectory() as tmp:  # the tiny processor, real pixel limits
        tiny._captioner(Path(tmp))
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(tmp)
    processor.image_processor.min_pixels = processor.image_processor.size["shortest_edge"] = 3136
    processor.image_processor.max_pixels = processor.image_processor.size["longest_edge"] = 12845056
    ids = processor.tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": layers or 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128000,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
            "tie_word_embeddings": True,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": layers or 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31] if not layers else [layers - 1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model.eval(), processor


def qwen_llm(device: str, dtype: torch.dtype, layers: int | None = None):
    """Qwen2.5-7B-Instruct's published config with the tiny profile's tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from ray_app import tiny

    tok = tiny._qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    config = Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=layers or 28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model.eval(), tok


def _saver(build: Callable) -> Callable[[Path, str, bool], dict[str, Path]]:
    def save(folder: Path, device: str, quick: bool) -> dict[str, Path]:
        model, processor = build(device, torch.bfloat16, 2 if quick else None)
        name = build.__name__
        model.save_pretrained(folder / name)
        processor.save_pretrained(folder / name)
        return {"source": folder / name}

    return save


SAVERS: dict[str, Callable[[Path, str, bool], dict[str, Path]]] = {
    "sdxl": lambda f, d, q: _save_sdxl(f, d),
    "novel_view": lambda f, d, q: _save_svd(f, d),
    "segmenter": lambda f, d, q: _save_sam(f, d),
    "clip": lambda f, d, q: _save_clip(f, d),
    "dinov2": lambda f, d, q: _save_dinov2(f, d),
    "evaluate": lambda f, d, q: _save_evaluate(f, d),
    "captioner": _saver(qwen_vl),
    "llm": _saver(qwen_llm),
}
IN_MEMORY = {"captioner": qwen_vl, "llm": qwen_llm}


def overrides_for(role: str, saved: dict[str, Path]) -> list[str]:
    """Config overrides that point ``role`` at its saved checkpoint (a role of the
    ``evaluate`` checkpoint names its own key)."""
    if f"{role}.source" in saved:
        return [f"{role}.source={saved[f'{role}.source']}"]
    out = [f"{role}.source={saved['source']}"]
    if "vae" in saved:
        out.append(f"{role}.vae.source={saved['vae']}")
    return out


# --------------------------------------------------------------------------- workloads


def photo(side: int, seed: int = 0) -> np.ndarray:
    """A product-photo stand-in: a smooth background with a textured object in the middle
    (cheap to decode, unlike noise, and with a salient region for the segmenter)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([200 + 30 * x, 190 + 30 * y, 180 + 20 * x * y], axis=-1)
    a, b = side // 3, 2 * side // 3
    rgb[a:b, a:b] = rng.integers(20, 120, 3) + 40 * np.sin(x[a:b, a:b, None] * 40)
    return rgb.clip(0, 255).astype(np.uint8)


def _rect_mask(side: int, inside: bool) -> bytes:
    mask = np.zeros((side, side), np.uint8)
    a, b = side // 3, 2 * side // 3
    mask[a:b, a:b] = 255
    return encode_png(mask if inside else 255 - mask)


@dataclass
class Workload:
    """One role's actor, how to call it once (-> items done), and what a call runs."""

    actor: Any
    call: Callable[[bool], int]  # warm: a cheaper call that still touches every kernel
    unit: str
    details: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0  # measured seconds x scale = seconds at the profile's settings


def _ok(out: dict[str, np.ndarray]) -> None:
    errors = [e for e in out["error"] if e]
    if errors:
        raise RuntimeError(errors[0])


def workload(role: str, cfg, spec, device: str, quick: bool) -> Workload:
    """The role's actor as its pipeline builds it, and a batch at the profile's settings."""
    n = spec.batch_size
    obj = lambda items: np.array(items, dtype=object)  # noqa: E731
    side = 256 if quick else cfg.images.max_side
    if role == "generator":
        from actors.generator import GenerationOptions, Generator

        g = cfg.generate
        opts = GenerationOptions(g.width, g.height, g.steps, g.guidance_scale, g.negative_prompt)
        if quick:
            opts = replace(opts, width=256, height=256, steps=2)
        actor = Generator(spec, opts, device=device)
        batch = {"prompt": obj(["a ceramic mug on a wooden table"] * n), "seed": obj(range(n))}

        def call(warm: bool) -> int:
            actor.options = replace(opts, steps=2) if warm else opts
            _ok(actor(batch))
            return n

        return Workload(
            actor,
            call,
            "image",
            {
                "size": [opts.width, opts.height],
                "steps": opts.steps,
                "guidance_scale": opts.guidance_scale,
            },
        )
    if role == "inpainter":
        from actors.inpainter import Inpainter

        opts = cfg.augment.contexts
        if quick:
            opts = opts.model_copy(update={"size": 256, "steps": 2})
        actor = Inpainter(spec, opts, device=device)
        s = opts.size
        batch = {
            "image": obj([encode_png(photo(s, i)) for i in range(n)]),
            "mask": obj([_rect_mask(s, inside=False)] * n),
            "keep": obj([_rect_mask(s, inside=True)] * n),
            "prompt": obj(["on a marble kitchen counter, soft light"] * n),
            "seed": obj(range(n)),
        }

        def call(warm: bool) -> int:
            _ok(actor(batch, opts.model_copy(update={"steps": 2}) if warm else opts))
            return n

        return Workload(
            actor,
            call,
            "image",
            {
                "size": [s, s],
                "steps": opts.steps,
                "strength": opts.strength,
                "guidance_scale": opts.guidance_scale,
            },
        )
    if role == "novel_view":
        from actors.novel_view import NovelView

        opts = cfg.augment.views
        if quick:
            opts = opts.model_copy(
                update={
                    "width": 256,
                    "height": 128,
                    "num_frames": 2,
                    "frame_indices": [1],
                    "steps": 2,
                    "decode_chunk_size": 2,
                }
            )
        actor = NovelView(spec, opts, device=device)
        batch = {
            "image": obj([encode_png(photo(side, i)) for i in range(n)]),
            "seed": obj(range(n)),
        }

        def call(warm: bool) -> int:
            actor.options = opts.model_copy(update={"steps": 2}) if warm else opts
            _ok(actor(batch))
            return n

        return Workload(
            actor,
            call,
            "clip",
            {
                "size": [opts.width, opts.height],
                "frames": opts.num_frames,
                "steps": opts.steps,
                "decode_chunk_size": opts.decode_chunk_size,
            },
        )
    if role == "segmenter":
        from actors.segmenter import Segmenter

        actor = Segmenter(spec, cfg.augment.segment, device=device)
        batch = {"image": obj([encode_png(photo(side, i)) for i in range(n)])}

        def call(warm: bool) -> int:
            _ok(actor(batch))
            return n

        return Workload(actor, call, "image", {"size": [side, side], "sam_input": 1024})
    if role == "captioner":
        from actors.captioner import Captioner

        opts = cfg.augment.caption
        if quick:
            opts = opts.model_copy(update={"max_new_tokens": 2})
        actor = Captioner(spec, opts, device=device)
        batch = {"image": obj([encode_png(photo(side, i)) for i in range(n)])}

        def call(warm: bool) -> int:
            actor.options = opts.model_copy(update={"max_new_tokens": 2}) if warm else opts
            _ok(actor(batch))
            return n

        return Workload(
            actor,
            call,
            "image",
            {
                "size": [side, side],
                "max_new_tokens": opts.max_new_tokens,
                "note": "random weights: every caption runs to max_new_tokens",
            },
        )
    if role == "llm":
        from actors.llm import PromptWriter

        actor = PromptWriter(spec, per_type=30, device=device)
        full, timed = actor.max_new_tokens, 2 if quick else min(LLM_TOKENS, actor.max_new_tokens)
        examples = ["a {product} on a wooden kitchen table in soft morning light"] * 6
        batch = {"noun": obj(["mug"]), "examples": obj([examples]), "seed": obj([0])}

        def call(warm: bool) -> int:
            actor.max_new_tokens = 2 if warm else timed
            _ok(actor(batch))
            return 1

        details = {
            "max_new_tokens": full,
            "timed_tokens": timed,
            "note": "rows are generated one at a time; random weights never stop early, so a "
            f"prompt is {full} tokens: the time of {timed} tokens is scaled by {full}/{timed} "
            "(an approximation: the prompt's prefill is scaled too, the growing KV cache is not)",
        }
        return Workload(actor, call, "prompt", details, scale=full / timed)
    if role == "encoder":
        from actors.encoder_trainer import EncoderTrainer

        p = cfg.personalize
        if quick:
            p = p.model_copy(update={"batch_size": 2, "negatives_per_step": 4})
        actor = EncoderTrainer(spec, p, device=device)
        step = p.model_copy(update={"pairs": p.batch_size, "epochs": 1})  # one step a call
        actor.config = step
        positives = [photo(256, i) for i in range(4)]
        negatives = [photo(256, 100 + i) for i in range(p.negatives_per_step)]
        images = 2 * p.batch_size + p.negatives_per_step

        def call(warm: bool) -> int:
            actor.train(positives, negatives, seed=0)
            return images

        details = {
            "resolution": actor.resolution,
            "images_per_step": images,
            "step": f"LoRA rank {p.rank} training: {p.batch_size} anchor-positive pairs + {p.negatives_per_step} negatives",
            "note": "batch_size is the role's embedding batch; the figures are of training steps",
        }
        return Workload(actor, call, "image", details)
    # Embedding roles (clip, dino, eval_clip, eval_dino, inception), as bench/evaluate.py.
    actor = _embedder(role, spec, device)
    batch = {"image": obj([encode_png(photo(side, i)) for i in range(n)])}
    if role in ("clip", "eval_clip"):  # CLIP-T embeds the prompt beside the image
        batch["text"] = obj(["a photo of a backpack in the snow"] * n)

    def call(warm: bool) -> int:
        _ok(actor(batch))
        return n

    return Workload(actor, call, "image", {"size": [side, side]})


def _embedder(role: str, spec, device: str):
    if role == "inception":
        from actors.inception import InceptionFeatures

        return InceptionFeatures(spec, device=device)
    if role in ("clip", "eval_clip"):
        from actors.clip import ClipEmbedder

        return ClipEmbedder(spec, device=device)
    from actors.dino import DinoEmbedder

    return DinoEmbedder(spec, device=device)


# --------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _in_memory(role: str, model_spec, device: str, quick: bool) -> Iterator[None]:
    """The role's actor gets a model built in GPU memory instead of loading one (a multi-GB
    save and load that would spend the run's budget): ``load_model`` is patched for it."""
    from ray_app.models import LoadedModel, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dtype = resolve_dtype(model_spec.spec.dtype, dev)
    model, processor = IN_MEMORY[role](str(dev), dtype, 2 if quick else None)
    loaded = LoadedModel(
        role,
        "transformers",
        model_spec.spec.source,
        "<memory>",
        dev,
        dtype,
        model,
        processor=processor,
    )
    module = {"captioner": "actors.captioner", "llm": "actors.llm"}[role]
    with mock.patch(f"{module}.load_model", lambda *a, **k: loaded):
        yield


def measure(role: str, cfg, device: str, calls: int, quick: bool, in_memory: bool) -> dict:
    """Load ``role`` (timed), one warm-up call, ``calls`` timed calls; peak GPU memory over
    load and calls."""
    spec = cfg.model_spec(role)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with _in_memory(role, spec, device, quick) if in_memory else contextlib.nullcontext():
        work = workload(role, cfg, spec, device, quick)
    _sync(device)
    load = time.perf_counter() - start
    work.call(True)
    _sync(device)
    start = time.perf_counter()
    items = sum(work.call(False) for _ in range(calls))
    _sync(device)
    seconds = (time.perf_counter() - start) * work.scale
    loaded = getattr(work.actor, "loaded", None)
    row = {
        "role": role,
        "measured": True,
        "architecture": ARCHITECTURES[role]
        if cfg.profile == "default"
        else f"{cfg.profile}: {ARCHITECTURES[role]}",
        "stands_for": spec.spec.source if cfg.profile != "default" else _real_source(role),
        "weights": "random" if cfg.profile == "default" else cfg.profile,
        "dtype": spec.spec.dtype,
        "torch_dtype": str(loaded.dtype).removeprefix("torch.") if loaded else None,
        "batch_size": spec.batch_size,
        "unit": work.unit,
        "items_timed": items,
        "items_per_second": round(items / seconds, 4),
        "seconds_per_item": round(seconds / items, 4),
        "load_seconds": None if in_memory else round(load, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if cuda else None,
        "workload": work.details,
    }
    if in_memory:
        row["load_note"] = "not measured: built in GPU memory (seconds to build, not to load)"
        row["build_seconds"] = round(load, 2)
    del work, loaded
    return row


def _real_source(role: str) -> str:
    from ray_app.config import load_config

    return load_config("default").role(role).source


def run(args: argparse.Namespace) -> dict:
    from ray_app.config import load_config

    roles = args.roles or ROLES
    in_memory = set(args.in_memory) if args.profile == "default" else set()
    rows: list[dict] = []
    out = {
        "bench": "gpu_roles",
        "profile": args.profile,
        "quick": args.quick,
        "machine": machine(args.device),
        "weights": "random, real-size architectures" if args.profile == "default" else "tiny",
        "roles": rows,
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder, saved = Path(tmp), {}
        for i, role in enumerate(roles):
            if time.perf_counter() - began > args.budget_s:
                rows.append(
                    {
                        "role": role,
                        "measured": False,
                        "reason": f"not run: the run's budget of {args.budget_s:g} s (--budget-s) was spent",
                    }
                )
                continue
            try:
                overrides = ["offline=true"]
                if args.quick:
                    overrides.append(f"{role}.batch_size=1")
                if args.profile == "default" and role not in in_memory:
                    key = CHECKPOINT.get(role, role)
                    if key not in saved:
                        start = time.perf_counter()
                        saved[key] = SAVERS[key](folder, args.device, args.quick)
                        _free(args.device)
                        print(
                            f"{role}: built and saved {key} in {time.perf_counter() - start:.1f} s",
                            flush=True,
                        )
                    overrides += overrides_for(role, saved[key])
                cfg = load_config(args.profile, overrides=overrides)
                calls = args.calls or (
                    1 if role in ("generator", "inpainter", "novel_view", "captioner", "llm") else 3
                )
                rows.append(measure(role, cfg, args.device, calls, args.quick, role in in_memory))
            except Exception as exc:  # one role's failure must not lose the others' figures
                rows.append(
                    {
                        "role": role,
                        "measured": False,
                        "reason": f"{type(exc).__name__}: {exc}"[:500],
                    }
                )
            _free(args.device)
            print(json.dumps(rows[-1]), flush=True)
            # A checkpoint no later role loads is deleted (SDXL, SVD, Qwen: GBs of disk).
            later = {CHECKPOINT.get(r, r) for r in roles[i + 1 :]}
            for key in [k for k in saved if k not in later]:
                for path in saved.pop(key).values():
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                        missing_ok=True
                    )
            write(out, args.out)  # after every role: a run cut short keeps what it measured
    out["seconds"] = round(time.perf_counter() - began, 1)
    write(out, args.out)
    return out


def write(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def default_out(profile: str, device: str, quick: bool) -> Path:
    """roles_gpu.json only for a full CUDA run of the default profile: resources.py reads it
    as measured GPU figures."""
    if profile == "default" and device.startswith("cuda") and not quick:
        return GPU_FILE
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return GPU_FILE.with_name(f"roles_{profile}{'_quick' if quick else ''}_{kind}.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=("default", "tiny"), default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--roles", nargs="+", choices=ROLES, default=None)
    ap.add_argument(
        "--calls",
        type=int,
        default=None,
        help="timed calls per role (default: 1 for diffusion/LLM roles, 3 else)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="toy workloads and 2-layer Qwen models: a dry check of the real-size builders",
    )
    ap.add_argument(
        "--in-memory",
        nargs="*",
        choices=sorted(IN_MEMORY),
        default=["llm"],
        help="roles measured from a model built in memory, without a save and load (default profile)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="roles not started after this many seconds are recorded as not measured "
        "(default: 190 on CUDA, none on CPU)",
    )
    ap.add_argument(
        "--tmp", default=None, help="folder for the saved checkpoints (default: the system temp)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 190.0 if args.device.startswith("cuda") else float("inf")
    if args.out is None:
        args.out = default_out(args.profile, args.device, args.quick)
    elif (
        args.out.resolve() == GPU_FILE.resolve()
        and default_out(args.profile, args.device, args.quick) != GPU_FILE
    ):
        ap.error(
            f"{GPU_FILE.name} holds measured GPU figures: only a full --device cuda run of the default profile writes it"
        )
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = run(args)
    done = sum(r["measured"] for r in out["roles"])
    print(f"wrote {args.out}: {done} of {len(out['roles'])} roles measured in {out['seconds']} s")
    return out


if __name__ == "__main__":
    main()
