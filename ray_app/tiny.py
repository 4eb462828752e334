"""Tiny random-weight checkpoints of every model role, built by the project itself.

Each builder makes a seeded, tiny version of the *same architecture* the ``default``
profile names (SDXL, SDXL inpainting, Stable Video Diffusion, Segment Anything, OpenCLIP,
DINOv2, Qwen2.5-VL, Qwen2) and saves it in that library's own on-disk format. The registry
then loads it through exactly the loader a real checkpoint goes through. Nothing here
touches the network: tokenizers are rebuilt from files that ship inside installed packages
(OpenCLIP's BPE merges) or trained on a fixed corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Bump when a builder changes so that cached tiny checkpoints are rebuilt.
TINY_VERSION = "4"
_BUILDERS: dict[str, Callable[[Path], None]] = {}
_COMPLETE = ".restage-complete"


def register_tiny(role: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register the tiny builder of ``role``; a second builder for a role is an error."""

    def wrap(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        if role in _BUILDERS:
            raise ValueError(f"a tiny builder for role {role!r} is already registered")
        _BUILDERS[role] = fn
        return fn

    return wrap


def tiny_roles() -> list[str]:
    return list(_BUILDERS)


def _seed(role: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"tiny/{role}".encode(), digest_size=4).digest(), "big")


def build(role: str, dest: Path) -> Path:
    """Build the tiny checkpoint of ``role`` into ``dest`` (atomically: temp folder, rename)."""
    if role not in _BUILDERS:
        raise KeyError(f"no tiny builder for role {role!r}; roles with one: {', '.join(_BUILDERS)}")
    import torch  # here, not at the top: a driver checking its cache (``ensure``) needs none

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(role))
            _BUILDERS[role](tmp)
        check_weights(tmp, role)
        (tmp / _COMPLETE).write_text(json.dumps({"role": role, "version": TINY_VERSION}))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pth"}


def check_weights(folder: Path, role: str) -> None:
    """Refuse a build where a model folder (one with ``config.json``) has no weights file:
    a library that saves only on the main process of a torch process group writes the
    config alone elsewhere, and such a folder must never be marked complete."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise RuntimeError(f"tiny {role}: no weights were written under {folder}")
    for config in (p for p in files if p.name == "config.json"):
        if not any(p.suffix in _WEIGHT_SUFFIXES for p in config.parent.iterdir()):
            raise RuntimeError(
                f"tiny {role}: {config.parent.relative_to(folder)} has a config.json but no "
                "weights (saved by a non-main process of a process group?); build it on the driver"
            )


def ensure(role: str, cache_dir: Path) -> Path:
    """The cached tiny checkpoint of ``role``, built on first use (safe across processes)."""
    from filelock import FileLock

    dest = Path(cache_dir) / "tiny" / f"v{TINY_VERSION}" / role
    if (dest / _COMPLETE).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not (dest / _COMPLETE).exists():
            build(role, dest)
    return dest


def make_all(out_dir: Path, roles: list[str] | None = None) -> dict[str, float]:
    """Build every (or the named) role's tiny checkpoint under ``out_dir/<role>``; seconds each."""
    timings = {}
    for role in roles or tiny_roles():
        start = time.perf_counter()
        build(role, Path(out_dir) / role)
        timings[role] = time.perf_counter() - start
    return timings


# --------------------------------------------------------------------------- tokenizers


@lru_cache(maxsize=1)
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, rebuilt from the merges file OpenCLIP ships."""
    import open_clip.tokenizer as oct

    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        merges_text = f.read().split("\n")
    merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(oct.bytes_to_unicode().values())
    vocab = alphabet + [v + "</w>" for v in alphabet]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer (49,408 tokens) without a download."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77
    )


_CORPUS = [
    "describe",
    "this",
    "product",
    "photo",
    "in",
    "detail",
    "colour",
    "material",
    "shape",
    "position",
    "lighting",
    "visible",
    "text",
    "a",
    "red",
    "ceramic",
    "mug",
    "on",
    "a",
    "wooden",
    "kitchen",
    "table",
    "in",
    "soft",
    "morning",
    "light",
    "next",
    "to",
    "a",
    "window",
    "a",
    "leather",
    "backpack",
    "on",
    "a",
    "park",
    "bench",
    "a",
    "white",
    "sneaker",
    "on",
    "a",
    "concrete",
    "floor",
    "studio",
    "lighting",
    "a",
    "glass",
    "vase",
    "with",
    "flowers",
    "on",
    "a",
    "marble",
    "counter",
    "warm",
    "evening",
    "light",
    "a",
    "bottle",
    "a",
    "bowl",
    "a",
    "chair",
    "write",
    "realistic",
    "scene",
    "descriptions",
    "for",
    "product",
    "photos",
    "one",
    "per",
    "line",
    "no",
    "people",
    "no",
    "text",
]
_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer():
    """A byte-level BPE tokenizer with Qwen's special tokens and chat format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=_QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(_CORPUS)] * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    hf.chat_template = _CHAT_TEMPLATE
    return hf


# --------------------------------------------------------------------------- builders


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,
    )


def _text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
    )


def sd_components() -> dict:
    """A tiny SD 1.x/2.x-style UNet, VAE, scheduler, text encoder and tokenizer (one text
    encoder, no added embeddings, v-prediction), for checking code paths of that family; no
    role uses it."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    # Stable Diffusion 2.x's scheduler config: DDIMScheduler's own defaults (steps_offset=0,
    # clip_sample=True) are its pre-SD ones, which StableDiffusionPipeline corrects with a
    # FutureWarning.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return {
        "unet": unet,
        "vae": _vae(),
        "scheduler": scheduler,
        "text_encoder": CLIPTextModel(_text_config()),
        "tokenizer": clip_tokenizer(),
    }


def _sdxl_components(unet_in_channels: int) -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return {
        "unet": unet,
        "vae": _vae(),
        "scheduler": scheduler,
        "text_encoder": CLIPTextModel(_text_config()),
        "text_encoder_2": CLIPTextModelWithProjection(_text_config()),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(pad_token="!"),
    }


@register_tiny("generator")
def _generator(dest: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**_sdxl_components(unet_in_channels=4))
    pipe.save_pretrained(dest, safe_serialization=True)


@register_tiny("inpainter")
def _inpainter(dest: Path) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline(
        **_sdxl_components(unet_in_channels=9), requires_aesthetics_score=False
    )
    pipe.save_pretrained(dest, safe_serialization=True)


# Not a role: the separate VAE of the generator and inpainter (``generator.vae``).
TINY_VAE = "vae"


@register_tiny(TINY_VAE)
def _fp16_safe_vae(dest: Path) -> None:
    """The tiny generator's own VAE with force_upcast false, as the fp16-fix SDXL VAE is
    SDXL's with outputs kept the same: the tiny generator's images do not change with it."""
    import torch

    torch.manual_seed(_seed("generator"))  # the generator builder's draws, up to its VAE
    vae = _sdxl_components(unet_in_channels=4)["vae"]
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(dest, safe_serialization=True)


@register_tiny("novel_view")
def _novel_view(dest: Path) -> None:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNetSpatioTemporalConditionModel(
        sample_size=32,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=3 * 16,
    )
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
    )
    # SVD always resizes its conditioning image to 224 px before the CLIP vision tower.
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        )
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=svd_scheduler(),
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}),
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def svd_scheduler():
    """Stable Video Diffusion XT's scheduler, as its checkpoint configures it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )


# Segment Anything architecture of the tiny checkpoint; the loader reads this file when it
# sits beside a checkpoint and otherwise recognises vit_b / vit_l / vit_h from the weights.
SAM_TINY_ARCH = {
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [1],
    "image_size": 64,
    "vit_patch_size": 16,
    "prompt_embed_dim": 32,
    "window_size": 2,
    "mlp_ratio": 2.0,
    "decoder_depth": 2,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "mask_in_chans": 4,
}


def build_sam(arch: dict):
    """A ``segment_anything`` ``Sam`` module for an architecture dict (tiny or a preset)."""
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    size, patch, dim = arch["image_size"], arch["vit_patch_size"], arch["prompt_embed_dim"]
    grid = size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch["encoder_depth"],
            embed_dim=arch["encoder_embed_dim"],
            img_size=size,
            mlp_ratio=arch.get("mlp_ratio", 4.0),
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch["encoder_num_heads"],
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(arch["encoder_global_attn_indexes"]),
            window_size=arch.get("window_size", 14),
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(size, size),
            mask_in_chans=arch.get("mask_in_chans", 16),
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.get("decoder_depth", 2),
                embedding_dim=dim,
                mlp_dim=arch.get("decoder_mlp_dim", 2048),
                num_heads=arch.get("decoder_num_heads", 8),
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


@register_tiny("segmenter")
def _segmenter(dest: Path) -> None:
    import torch

    sam = build_sam(SAM_TINY_ARCH)
    torch.save(sam.state_dict(), dest / "sam_tiny.pth")
    (dest / "sam_config.json").write_text(json.dumps(SAM_TINY_ARCH, indent=2))


@register_tiny("clip")
def _clip(dest: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    cfg = {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 32,
                "head_width": 16,
                "patch_size": 8,
            },
            "text_cfg": {
                "context_length": 77,
                "vocab_size": 49408,
                "width": 32,
                "heads": 2,
                "layers": 2,
            },
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (dest / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    model = open_clip.CLIP(**cfg["model_cfg"])
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        dest / "open_clip_model.safetensors",
    )


def _dinov2(dest: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    model = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=32,
            patch_size=8,
        )
    )
    model.save_pretrained(dest)
    BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 32},
        do_center_crop=True,
        crop_size={"height": 32, "width": 32},
        do_convert_rgb=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(dest)


register_tiny("dino")(_dinov2)
register_tiny("encoder")(_dinov2)
register_tiny("eval_clip")(_clip)  # its own seed: other weights than the clip role's


@register_tiny("eval_dino")
def _dino_v1(dest: Path) -> None:
    """DINO v1 (a plain ViT, as facebook/dino-vits16), with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    model = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        add_pooling_layer=False,
    )
    model.save_pretrained(dest)
    ViTImageProcessor(
        do_resize=True,
        size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(dest)


@lru_cache(maxsize=1)
def _tiny_inception_class() -> type:
    """The tiny Inception's module class, defined on first use (torch is imported then)."""
    import torch

    class TinyInception(torch.nn.Module):
        """FID's feature-extractor interface at toy size: uint8 images (N, 3, H, W) of any size
        in, (N, num_features) float features out (the real one: Inception-v3's 2048 pool3)."""

        def __init__(self, num_features: int = 64, size: int = 32):
            super().__init__()
            self.num_features, self.size = num_features, size
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),
                torch.nn.ReLU(),
                torch.nn.Conv2d(16, num_features, 3, stride=2, padding=1),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(),
            )

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.float() / 255.0
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear")
            return self.net(x)

    return TinyInception


def build_inception(arch: dict) -> torch.nn.Module:
    if arch.get("arch") != "tiny":
        raise ValueError(f"inception_config.json: unknown arch {arch.get('arch')!r} (known: tiny)")
    return _tiny_inception_class()(int(arch["num_features"]), int(arch["size"]))


@register_tiny("inception")
def _inception(dest: Path) -> None:
    import torch

    arch = {"arch": "tiny", "num_features": 64, "size": 32}
    torch.save(build_inception(arch).state_dict(), dest / "inception.pth")
    (dest / "inception_config.json").write_text(json.dumps(arch, indent=2))


@register_tiny("captioner")
def _captioner(dest: Path) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = _qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    pixels = {
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
    }
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tok,
        chat_template=_CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 28,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.save_pretrained(dest)
    processor.save_pretrained(dest)


@register_tiny("llm")
def _llm(dest: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=True,
        )
    )
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
