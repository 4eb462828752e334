"""Typed configuration: profiles, YAML files and ``--set a.b=c`` overrides.

Precedence, lowest first: the ``default`` profile, the chosen profile (an overlay on
``default``), ``--config`` files, then ``--set`` overrides. The merged mapping is validated
once by pydantic; an unknown key, a wrong type or an impossible value fails before any work
starts with a message that names the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import fsspec
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ray_app.kinds import Metric
from ray_app.learned_ranker import LearnedRanking  # registers 'learned' with ray_app.ranking
from ray_app.ranking import ranking_class

ROLES = (
    "captioner",
    "segmenter",
    "novel_view",
    "inpainter",
    "generator",
    "clip",
    "dino",
    "encoder",
    "llm",
    "eval_clip",
    "eval_dino",
    "inception",
)
PROFILES = ("default", "tiny")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """Raised for any invalid configuration; the message names the key and the fix."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# Roles whose SDXL pipeline takes a separate VAE (``vae``): an ``AutoencoderKL`` of the SDXL
# latent space, e.g. the fp16-fix VAE that decodes in float16 without a float32 upcast.
VAE_ROLES = ("generator", "inpainter")


class ComponentSource(StrictModel):
    """A pipeline component loaded from its own checkpoint instead of the role's."""

    source: str = Field(
        description="As a role's source: hub id (a diffusers-layout repo), local folder, any "
        "fsspec URI, or 'tiny' for the project's own tiny one."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")

    @model_validator(mode="after")
    def _check(self) -> ComponentSource:
        if not self.source.strip():
            raise ValueError("source is empty: give a hub id, a local path, a URI or 'tiny'")
        return self


class RoleSpec(StrictModel):
    """Where a model role comes from and how it runs."""

    source: str = Field(
        description="Hub id (org/name), local folder or file, any fsspec URI (s3://, gs://, "
        "https://, hf://), or 'tiny' for the project's own random-weight tiny checkpoint."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(None, description="Weights variant, e.g. 'fp16' (diffusers).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="'auto': bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.")
    batch_size: PositiveInt = Field(1, description="Images per forward pass inside an actor.")
    num_gpus: Annotated[float, Field(ge=0)] = Field(
        0.0, description="GPUs per actor; fractional values pack several actors on one GPU."
    )
    num_cpus: PositiveFloat = Field(1.0, description="CPUs reserved per actor.")
    resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {},
        description="Custom Ray resources per actor, e.g. {restage_gpu_80gb: 0.001} to pin it "
        "to a node type (the placement plan sets it in a cluster with mixed GPUs).",
    )
    min_actors: PositiveInt = Field(1, description="Actor pool minimum size.")
    max_actors: PositiveInt | None = Field(
        1,
        description="Actor pool maximum size (autoscaling). None (null in YAML): no cap, the "
        "pool grows to what the cluster grants it (Ray Data's autoscaler), so one profile "
        "fits 8 GPUs and 512.",
    )
    vae: ComponentSource | None = Field(
        None,
        description="generator and inpainter only: a VAE that replaces the pipeline's own, "
        "e.g. {source: madebyollin/sdxl-vae-fp16-fix}, whose config has force_upcast false, "
        "so float16 pipelines decode (and encode) in float16 instead of upcasting the VAE to "
        "float32 for every image. None: the checkpoint's own VAE.",
    )

    @model_validator(mode="after")
    def _check(self) -> RoleSpec:
        if not self.source.strip():
            raise ValueError("source is empty: give a hub id, a local path, a URI or 'tiny'")
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ValueError(
                f"max_actors={self.max_actors} is below min_actors={self.min_actors}: "
                "raise max_actors or lower min_actors"
            )
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith(
            "cuda:"
        ):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        return self


@dataclass(frozen=True)
class ModelSpec:
    """A role as an actor takes it: the role's spec and where the run keeps model files.
    Actors take this and their own small options object, never the whole config."""

    role: str
    spec: RoleSpec
    cache_dir: Path
    offline: bool

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    def with_spec(self, **changes: Any) -> ModelSpec:
        """The same role with some of its spec changed (e.g. the training dtype)."""
        return dataclasses.replace(self, spec=self.spec.model_copy(update=changes))


class RayConfig(StrictModel):
    """How a job reaches Ray."""

    address: str | None = Field(
        None,
        description="None starts a new local Ray in-process (never one that `ray start` left "
        "on the machine); 'auto' or 'ray://host:10001' joins a cluster (RAY_ADDRESS in the "
        "environment wins when this is None).",
    )
    num_cpus: PositiveInt | None = Field(None, description="CPUs of the local Ray (None: all).")
    num_gpus: NonNegativeInt | None = Field(None, description="GPUs of the local Ray.")
    object_store_mb: PositiveInt | None = Field(
        None, description="Object store size of the local Ray, in MiB (None: Ray's default)."
    )
    data_object_store_limit_mb: PositiveInt | None = Field(
        None,
        description="Upper bound on the object store memory that a Ray Data job may use, in "
        "MiB; bounds streaming back-pressure (None: Ray Data's default fraction).",
    )
    progress_bars: bool | Literal["auto"] = Field(
        "auto",
        description="Ray Data's progress bars: 'auto' shows them on a terminal; elsewhere (CI, "
        "a log file) a job prints one compact line per stage instead, at most every 30 s.",
    )
    log_to_driver: bool = Field(
        False,
        description="Also print the output of Ray's worker processes in the job's output. It "
        "is always in Ray's log files (the `_ray_logs` link in the job's output folder, for a "
        "local Ray); errors that stop a product or the job are reported either way.",
    )
    products_per_dataset: PositiveInt = Field(
        100_000,
        description="A job's products to do go through its model stages as successive Ray "
        "Data datasets of at most this many (pipelines/_job.py): Ray Data's driver keeps "
        "~9 KiB per block of a running dataset, a product per block, and gives most of it "
        "back when the dataset ends. Each dataset starts its actor pools again (one model "
        "load per actor per dataset).",
    )
    placement: Literal["streaming", "packed", "stage"] | None = Field(
        None,
        description="How a job places its actor pools on the GPUs (ray_app/plan.py); None: "
        "chosen by the preflight, streaming when the configured num_gpus fit, else packed.",
    )
    fuse_cpu_stages: bool = Field(
        True,
        description="Where the placement plan gives none of a job's model stages a GPU, run "
        "them in one actor pool whose actors hold every stage's models and take each product "
        "through the stages in turn (ray_app/plan.py). On CPUs, stages in pools of their own "
        "share the same cores, so streaming them overlaps little, while each pool's actor "
        "costs a process that imports torch and the model libraries (~5-10 s of CPU) and a "
        "model load. false: a pool per stage, as on GPUs. Stage-by-stage mode never fuses.",
    )
    gpu_routing: Literal["smallest", "spread"] | None = Field(
        None,
        description="In a cluster with mixed GPUs (ray_app/plan.py): 'smallest' pins each GPU "
        "pool to the smallest GPUs that hold it; 'spread' lets a job whose pools all fit the "
        "smallest GPUs run on every GPU, pinning none (a job with a heavier pool is routed as "
        "'smallest', so that the others cannot take the large GPUs it needs). None: 'spread' "
        "on a fixed cluster (every GPU is paid for), 'smallest' where the autoscaler can add "
        "GPU nodes (an actor free to go anywhere could make it start the costliest node type).",
    )
    gpu_memory_gb: PositiveFloat | None = Field(
        None,
        description="GiB of memory per GPU, for placement plans where neither CUDA nor Ray's "
        "accelerator_type tells it (None: detected, else 24 assumed).",
    )
    metrics_export_port: int | None = Field(
        None,
        ge=1024,
        le=65535,
        description="Port on which a local Ray exports Prometheus metrics (Ray's and "
        "restage's); None: a free port, listed by `GET /v1/stats` of `restage serve`. On a "
        "cluster it is `ray start --metrics-export-port` (cluster.yaml: 8080).",
    )
    dashboard: bool = Field(
        True,
        description="Start the Ray dashboard with a local Ray (127.0.0.1:8265, or a free port "
        "named in the job's log when another Ray has 8265); Ray's state API (`ray list "
        "actors`) and Ray Train's state queries need it (tiny profile: off).",
    )
    # Ray marks a node dead after `failure_threshold` health checks in a row went
    # unanswered for `timeout_ms`; a loaded machine (all cores busy with model actors) can
    # miss Ray's defaults (3 s period, 10 s timeout, 5 failures) and lose its only node.
    health_check_period_ms: PositiveInt = Field(
        5000,
        description="How often Ray's GCS checks that each node is alive (local Ray; on a "
        "cluster: RAY_health_check_period_ms for `ray start`).",
    )
    health_check_timeout_ms: PositiveInt = Field(
        30000, description="How long one health check may take before it counts as missed."
    )
    health_check_failure_threshold: PositiveInt = Field(
        10, description="Missed health checks in a row before Ray marks a node dead."
    )

    def system_config(self) -> dict[str, int]:
        """Ray ``_system_config`` (and, as ``RAY_<key>``, cluster env) for the health checks."""
        return {
            "health_check_period_ms": self.health_check_period_ms,
            "health_check_timeout_ms": self.health_check_timeout_ms,
            "health_check_failure_threshold": self.health_check_failure_threshold,
        }


class HttpSourcesConfig(StrictModel):
    """How http(s) image sources are read, when ``storage.allowed_sources`` allows them."""

    timeout_s: PositiveFloat = Field(
        10.0, description="Seconds allowed to connect, and to wait for each read."
    )
    deadline_s: PositiveFloat = Field(
        60.0, description="Seconds allowed for a whole fetch, redirects included (slow senders)."
    )
    max_bytes: PositiveInt = Field(
        64 * 2**20, description="Largest response body read, in bytes; larger is an error."
    )
    max_redirects: NonNegativeInt = Field(
        3, description="Redirects followed (each one checked like the first URI)."
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs exempt from the refusal of non-public addresses (e.g. an image "
        "server on the private network, 10.2.0.0/16). Empty: only public addresses.",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an address or CIDR, e.g. 10.2.0.0/16") from None
        return value


class StorageConfig(StrictModel):
    """Which sources an (untrusted) manifest may name; see ray_app/sources.py."""

    allowed_sources: list[str] = Field(
        default_factory=list,
        description="URI prefixes that image URIs may name besides the manifest's own folder "
        "tree: object-store buckets or prefixes (s3://bucket, gs://bucket/photos), extra "
        "absolute local folders (/data/photos), http(s) hosts (https://cdn.example.com) or "
        "whole schemes (s3://, https://). http(s) is refused unless listed here.",
    )
    http: HttpSourcesConfig = Field(default_factory=HttpSourcesConfig)

    @field_validator("allowed_sources")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        from ray_app.sources import check_allowed_source

        for entry in value:
            check_allowed_source(entry)
        return value


class ImagesConfig(StrictModel):
    """Decoding rules applied to every input image."""

    max_megapixels: PositiveFloat = Field(
        64.0, description="Reject images above this size (decompression-bomb guard)."
    )
    max_side: PositiveInt = Field(
        1024, description="Downscale decoded inputs so the longer side is at most this."
    )
    min_side: PositiveInt = Field(16, description="Reject images whose shorter side is smaller.")


def _multiple_of_8(name: str, value: int) -> None:
    if value % 8:
        raise ValueError(
            f"{name}={value} must be a multiple of 8 (latent grids): use {value - value % 8 or 8}"
        )


class ScoringConfig(StrictModel):
    """How raw metrics map onto [0, 1] before weighting (filtering, ranking, serving)."""

    ranges: dict[Metric, tuple[float, float]] = Field(
        default_factory=lambda: {
            Metric.CLIP_I: (0.5, 1.0),
            Metric.CLIP_T: (0.1, 0.35),
            Metric.SEG_CLIP_I: (0.5, 1.0),
            Metric.DINO: (0.1, 1.0),
            Metric.SEG_DINO: (0.1, 1.0),
            Metric.SEG_CLIP_T: (0.1, 0.35),
            Metric.PERSONAL_FIDELITY: (0.0, 1.0),
        },
        description="Raw value mapped to 0 and to 1 for each metric (clipped outside).",
    )
    encoders: str | None = Field(
        None,
        description="URI of a `restage personalize` output. Set, every image scored against a "
        "product that has an encoder there gets personal_fidelity: its product crop against "
        "the real photos' under the product's own encoder (the encoder role with the "
        "product's LoRA; personalize.rank/alpha/target_modules/feature/resolution must be the "
        "encoders'). It counts where a job weights it: augment.filter.weights and "
        "min_personal_fidelity, generate.weights (ranking 'weighted' or 'learned'), serve's "
        "rank. A product without an encoder gets null, never a stand-in.",
    )

    def roles(self) -> tuple[str, ...]:
        """The roles a job's scorer loads (its stage's resources): the product encoders'
        base too with ``encoders``."""
        return ("clip", "dino") + (("encoder",) if self.encoders is not None else ())

    @model_validator(mode="after")
    def _check(self) -> ScoringConfig:
        for name, (low, high) in self.ranges.items():
            if high <= low:
                raise ValueError(
                    f"ranges.{name}=({low}, {high}): the upper bound must exceed the lower"
                )
        return self


class CaptionConfig(StrictModel):
    """Fine-grained captions of real images (paper 2.2)."""

    instruction: str = Field(
        "Describe this product photo in one or two sentences, at most 50 words, for an image "
        "caption: the product's type, colours, materials, shape and parts, where it sits in the "
        "frame, the background, the lighting, and any visible text or logo in quotes. No preamble.",
        description="Instruction given to the captioner with each image.",
    )
    max_new_tokens: PositiveInt = Field(96, description="Token budget of one caption.")
    max_words: PositiveInt = Field(
        50, description="Captions are cut to this many words (the instruction asks for 50)."
    )
    reserve_tokens: Annotated[int, Field(ge=0, le=60)] = Field(
        16,
        description="CLIP tokens of the text encoders' 77 (start and end included) left free "
        "for the product phrase that training puts into a caption ('a photo of TOKEN NOUN, ': "
        "5 tokens and the noun's); captions are cut at a word boundary to the rest (61).",
    )


class ClassifyConfig(StrictModel):
    """Typing a product when its record has no category (category > title > captions > CLIP)."""

    zero_shot_min_margin: Annotated[float, Field(ge=0)] = Field(
        0.01,
        description="Zero-shot CLIP must beat the runner-up type by this cosine margin, else "
        "the generic type is used.",
    )


class ViewsConfig(StrictModel):
    """Novel views from image-to-video diffusion (paper 2.1.1)."""

    enabled: bool = Field(
        True, description="Make novel views (off: no novel_view stage, no actor of its role)."
    )
    width: PositiveInt = Field(1024, description="Video width fed to the novel_view model.")
    height: PositiveInt = Field(576, description="Video height fed to the novel_view model.")
    num_frames: PositiveInt = Field(14, description="Frames of each generated clip.")
    frame_indices: list[NonNegativeInt] = Field(
        [4, 8, 13], description="Which frames of the clip become new views (0 is the input)."
    )
    steps: PositiveInt = Field(25, description="Denoising steps per clip.")
    motion_bucket_id: NonNegativeInt = Field(
        127, description="SVD motion amount (higher moves more)."
    )
    noise_aug_strength: Annotated[float, Field(ge=0)] = Field(
        0.02, description="SVD conditioning noise."
    )
    fps: PositiveInt = Field(7, description="SVD frame-rate conditioning.")
    decode_chunk_size: PositiveInt = Field(
        8, description="Frames decoded at once (memory vs speed)."
    )

    @model_validator(mode="after")
    def _check(self) -> ViewsConfig:
        _multiple_of_8("views.width", self.width)
        _multiple_of_8("views.height", self.height)
        bad = [i for i in self.frame_indices if i >= self.num_frames]
        if bad:
            raise ValueError(f"frame_indices {bad} are not below num_frames={self.num_frames}")
        if len(set(self.frame_indices)) != len(self.frame_indices):
            raise ValueError(f"frame_indices {self.frame_indices} repeat a frame")
        return self


class SegmentConfig(StrictModel):
    """Automatic prompting of the segmenter and acceptance of its masks (the options of the
    ``Segmenter`` actor; augment, generate and serve's ranker each have their own)."""

    min_area: Fraction = Field(
        0.005, description="A product mask covers at least this fraction of the image."
    )
    max_area: Fraction = Field(0.95, description="... and at most this fraction.")
    plain_background_spread: Annotated[float, Field(ge=0)] = Field(
        12.0, description="Border pixels varying less than this (0-255) mean a plain background."
    )
    plain_background_tolerance: Annotated[float, Field(ge=0)] = Field(
        24.0,
        description="On a plain background, pixels this far from it are product (mask-free fallback).",
    )

    @model_validator(mode="after")
    def _check(self) -> SegmentConfig:
        if self.max_area <= self.min_area:
            raise ValueError(f"max_area={self.max_area} must exceed min_area={self.min_area}")
        return self


class CutPasteConfig(StrictModel):
    """Cut-and-paste synthesis (``ray_app/cutpaste.py``; personalized representations'
    cheap alternative to DreamBooth data): the product cut out with its mask, scaled and
    pasted at a random place on a background. Scale 1 is the product's box fitted, aspect
    kept, into a square of ``reference`` of the background's shorter side."""

    scale_range: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.3, 1.3),
        description="Range of the uniformly drawn scale (the paper's 0.3-1.3 of the product's "
        "size); scale 1 is given by reference.",
    )
    reference: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5,
        description="Scale 1: the product's longer box side is this fraction of the "
        "background's shorter side. reference * the top of scale_range is at most 1, so a "
        "paste always fits inside the frame.",
    )
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = Field(
        "lanczos",
        description="Resampling of the product's pixels; 'nearest' also resamples the mask "
        "with nearest, so every pasted pixel is one of the product's own.",
    )
    min_background_side: PositiveInt = Field(
        64, description="Backgrounds whose shorter side is below this many pixels are refused."
    )

    @model_validator(mode="after")
    def _check(self) -> CutPasteConfig:
        low, high = self.scale_range
        if low > high:
            raise ValueError(
                f"scale_range={self.scale_range}: the minimum exceeds the maximum; give "
                f"(low, high) with low <= high, e.g. ({high}, {low})"
            )
        if self.reference * high > 1:
            raise ValueError(
                f"reference={self.reference} * scale_range max {high} = "
                f"{self.reference * high:g} > 1: the largest paste would not fit the frame; "
                f"lower reference to at most {1 / high:.3f} or the scale range's maximum"
            )
        return self


class InpaintOptions(StrictModel):
    """How the inpainter paints (the options of the ``Inpainter`` actor)."""

    steps: PositiveInt = Field(30, description="Denoising steps.")
    guidance_scale: Annotated[float, Field(ge=0)] = Field(
        7.0, description="Classifier-free guidance."
    )
    strength: Annotated[float, Field(gt=0, le=1)] = Field(0.99, description="Inpainting strength.")
    feather: NonNegativeInt = Field(
        2, description="Pixels of soft edge when pasting the kept pixels back."
    )
    negative_prompt: str = Field(
        "blurry, low quality, distorted, deformed, extra objects, duplicate, text, watermark, logo",
        description="Negative prompt of the inpainter.",
    )


class ContextsConfig(InpaintOptions):
    """New contexts: keep the product pixels, outpaint a scene from the prompt bank (2.1.2)."""

    enabled: bool = Field(
        True,
        description="Make new contexts (off, with counterfactuals off too: no inpaint stage, "
        "no inpainter actor).",
    )
    per_image: NonNegativeInt = Field(
        4,
        description="Outpainted contexts per real or view image; the best filter.top_k_per_source "
        "of them are kept (best-of: generate more than are kept).",
    )
    size: PositiveInt = Field(1024, description="Square canvas size of an outpainted image.")
    product_scale: tuple[Fraction, Fraction] = Field(
        (0.45, 0.7), description="Range of the product's longer side as a fraction of the canvas."
    )

    @model_validator(mode="after")
    def _check(self) -> ContextsConfig:
        _multiple_of_8("contexts.size", self.size)
        low, high = self.product_scale
        if not 0 < low <= high:
            raise ValueError(f"product_scale={self.product_scale}: need 0 < low <= high <= 1")
        return self


class NegativesConfig(StrictModel):
    """In-class negatives and counterfactuals instead of a prior-preservation loss (2.1.3):
    how many of both and at what size; ``enabled`` switches the in-class ones alone."""

    enabled: bool = Field(
        True,
        description="Make in-class negatives (the generator's images of product-free captions; "
        "off: no negatives stage, no generator actor). Counterfactuals have their own switch: "
        "with one kind off the other makes every negative; with both off the training set has "
        "positives only and no ratio is enforced.",
    )
    ratio: PositiveFloat = Field(
        2.0, description="Positives per negative in the final set (2.0 = 2:1)."
    )
    counterfactual_fraction: Fraction = Field(
        0.5, description="Share of the negatives that are counterfactuals (the rest: in-class)."
    )
    oversample: Annotated[float, Field(ge=1)] = Field(
        1.25, description="Negatives generated per negative needed, so filtering can drop some."
    )
    size: PositiveInt = Field(1024, description="Size of generated negatives and counterfactuals.")
    steps: PositiveInt = Field(30, description="Denoising steps.")
    guidance_scale: Annotated[float, Field(ge=0)] = Field(
        7.0, description="Classifier-free guidance."
    )
    mask_dilation: Fraction = Field(
        0.03, description="Counterfactual masks grow by this fraction of the image side."
    )

    @model_validator(mode="after")
    def _check(self) -> NegativesConfig:
        _multiple_of_8("negatives.size", self.size)
        return self


class CounterfactualsConfig(InpaintOptions):
    """Counterfactuals: another object painted into the product's place in a real photo
    (2.1.3). How many, their size and mask growth are in ``negatives``; these are the
    inpainter's settings for them, the same defaults as ``contexts``'."""

    enabled: bool = Field(
        True, description="Make counterfactuals (off: every negative is an in-class one)."
    )


class FilterConfig(StrictModel):
    """Which synthetic samples are kept (2.3). Real images are always kept and scored."""

    min_clip_i: float = Field(0.70, description="Synthetic positives: CLIP-I vs the real images.")
    min_clip_t: float = Field(
        0.18, description="Synthetic positives: CLIP-T vs their prompt or caption."
    )
    min_seg_clip_i: float = Field(0.75, description="Synthetic positives: CLIP-I of product crops.")
    min_dino: float = Field(0.35, description="Synthetic positives: DINO vs the real images.")
    min_mask_iou: float = Field(
        0.80,
        description="Contexts: IoU of the product re-segmented after outpainting vs the pasted mask.",
    )
    min_sharpness: Annotated[float, Field(ge=0)] = Field(
        0.3,
        description="Views and contexts: detail of the product at train.resolution (variance "
        "of the Laplacian) relative to the median real photo's; softer ones are dropped. "
        "0.3 keeps a photo's 576-px copy (0.40-0.63) and drops a 1-px blur (bench/sharpness.py).",
    )
    top_k_per_source: PositiveInt = Field(
        2,
        description="At most this many views, and this many contexts, per source image (best first).",
    )
    max_negative_seg_clip_i: float = Field(
        0.95,
        description="A negative whose product-crop CLIP-I reaches this looks like the product: dropped.",
    )
    weights: dict[Metric, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {
            Metric.CLIP_I: 1.0,
            Metric.CLIP_T: 0.5,
            Metric.SEG_CLIP_I: 1.0,
            Metric.DINO: 1.0,
            Metric.SEG_DINO: 0.5,
            Metric.SEG_CLIP_T: 0.0,
            Metric.PERSONAL_FIDELITY: 1.0,  # counts only with scoring.encoders
        },
        description="Weights of the normalised metrics in the score that orders samples.",
    )
    min_personal_fidelity: float = Field(
        -1.0,
        description="Views and contexts whose personal_fidelity (scoring.encoders) is below "
        "this are dropped; -1 (the lowest cosine) drops none. Products without an encoder "
        "are not filtered by it.",
    )


# The augment sections that make synthetic samples, each with its ``enabled`` switch.
SYNTHETIC_COMPONENTS = ("views", "contexts", "negatives", "counterfactuals")


class AugmentConfig(StrictModel):
    """`restage augment`: the synthetic training set of every product."""

    prompt_bank: str | None = Field(None, description="Prompt bank URI (None: the packaged bank).")
    image_format: Literal["png", "jpeg"] = Field(
        "png", description="Format of written sample images (masks are always PNG)."
    )
    products_per_batch: PositiveInt = Field(
        1,
        description="Products per actor call; each product's images are micro-batched on their own.",
    )
    cpus_per_task: PositiveFloat = Field(
        0.25, description="CPUs of the decode, select and write tasks."
    )
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    contexts: ContextsConfig = Field(default_factory=ContextsConfig)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    counterfactuals: CounterfactualsConfig = Field(default_factory=CounterfactualsConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)

    def components(self) -> dict[str, bool]:
        """Which synthetic components are on (the paper's ablation switches, each section's
        ``enabled``): a component that is off is not computed and reserves no actor."""
        return {c: getattr(self, c).enabled for c in SYNTHETIC_COMPONENTS}

    @property
    def counterfactual_share(self) -> float:
        """The share of a product's negatives that are counterfactuals, given which of the
        two kinds are on."""
        if not self.counterfactuals.enabled:
            return 0.0
        return self.negatives.counterfactual_fraction if self.negatives.enabled else 1.0


# The prompts and token of the baseline recipe (classic DreamBooth); a config that gives
# other values with it is refused, one that leaves them out gets these.
DREAMBOOTH_DEFAULTS = {"caption_mode": "instance", "token_sweep": 1}

# `restage run --recipe NAME`: the overrides each recipe stands for, applied before the
# user's --set (``pipelines.run.apply_recipe`` applies them to a loaded config). The
# baseline's augment makes no synthetic sample: it writes the real photos (captioned, typed,
# segmented, scored) and the product records that train and generate read. Its defaults are
# spelled out, so that applying it to a config that holds restage's values works.
RECIPES: dict[str, list[str]] = {
    "restage": ["train.recipe=restage"],
    "dreambooth_lora": [
        "train.recipe=dreambooth_lora",
        *(f"train.{key}={value}" for key, value in DREAMBOOTH_DEFAULTS.items()),
        *(f"augment.{c}.enabled=false" for c in SYNTHETIC_COMPONENTS),
    ],
}


def with_overrides(config: RestageConfig, overrides: list[str]) -> RestageConfig:
    """A loaded ``config`` with ``a.b=c`` overrides applied, validated again (as
    ``load_config`` validates them; the config itself is not changed)."""
    tree = config.model_dump(mode="json")
    for text in overrides:
        _apply_override(tree, *parse_override(text))
    try:
        return RestageConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, tree)) from None


class PriorPreservationConfig(StrictModel):
    """DreamBooth's prior preservation (``train.recipe=dreambooth_lora`` only): images of
    the product's class noun made by the base generator before training, each step's batch
    extended by as many of them, loss = instance loss + weight * class loss."""

    num_class_images: NonNegativeInt = Field(
        0,
        description="Class images ('a photo of a NOUN') per class noun (0: off; DreamBooth "
        "uses 100-200). Seeded by the noun, so products of one class share them, and a worker "
        "makes them once per noun.",
    )
    weight: PositiveFloat = Field(1.0, description="Weight of the class loss.")
    steps: PositiveInt = Field(30, description="Denoising steps of a class image.")
    guidance_scale: Annotated[float, Field(ge=0)] = Field(
        7.5, description="Classifier-free guidance of a class image."
    )


class TrainConfig(StrictModel):
    """`restage train`: one DreamBooth-style LoRA per product on the generator's denoiser
    (paper 2.4): no prior-preservation loss, negatives mixed into the batches instead; or,
    with ``recipe=dreambooth_lora``, the paper's baseline (real photos only)."""

    recipe: Literal["restage", "dreambooth_lora"] = Field(
        "restage",
        description="'restage': the paper's method, on every kept sample of the augment "
        "output (views, contexts, negatives). 'dreambooth_lora': the paper's baseline, "
        "DreamBooth-LoRA on the product's real photos only (every other sample of the training "
        "set is ignored), prompts 'a photo of TOKEN NOUN', one rare token: it sets "
        "caption_mode=instance and token_sweep=1 unless given, and refuses other values; "
        "prior_preservation is its option.",
    )
    prior_preservation: PriorPreservationConfig = Field(default_factory=PriorPreservationConfig)
    rank: PositiveInt = Field(64, description="LoRA rank (paper A.5: 64 keeps scenes diverse).")
    alpha: PositiveFloat | None = Field(
        None,
        description="LoRA alpha; the update is scaled by alpha/rank (None: alpha = rank). The "
        "scale is folded into the saved weights, so any diffusers loader applies it.",
    )
    target_modules: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"],
        description="Names of the denoiser's linear layers that get LoRA (attention projections).",
    )
    dropout: Fraction = Field(0.0, description="LoRA dropout.")
    learning_rate: PositiveFloat = Field(2e-4, description="AdamW learning rate of the LoRA.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(1e-4, description="AdamW weight decay.")
    lr_scheduler: Literal["constant", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: NonNegativeInt = Field(0, description="Linear learning-rate warm-up steps.")
    max_grad_norm: PositiveFloat = Field(1.0, description="Gradient clipping norm.")
    steps: PositiveInt = Field(1800, description="Optimiser steps per product.")
    batch_size: PositiveInt = Field(4, description="Samples per step.")
    resolution: PositiveInt = Field(
        1024, description="Square training resolution (shorter side resized, centre crop)."
    )
    negative_ratio: PositiveFloat = Field(
        2.0,
        description="Positives per negative in the batches (2.0 = 2:1); negatives and "
        "counterfactuals are trained with their own captions.",
    )
    caption_mode: Literal["caption", "instance"] = Field(
        "caption",
        description="Positive prompts: 'caption' puts the token before the class noun in the "
        "sample's fine-grained caption (or prefixes 'a photo of TOKEN NOUN,' when the noun is "
        "absent); 'instance' uses 'a photo of TOKEN NOUN' (classic DreamBooth).",
    )
    min_positives: PositiveInt = Field(
        3, description="A product with fewer kept positive samples is not trained (error row)."
    )
    tokens_file: str | None = Field(
        None, description="Rare-token list URI, one token a line (None: the packaged list)."
    )
    token_sweep: PositiveInt = Field(
        4,
        description="Candidate tokens tried per product by successive halving (paper 2.4): "
        "each trains a short run, the better half by validation fidelity go on for twice the "
        "steps, and so on until one is left; only the winner trains the full steps. 1: no sweep.",
    )
    associated_tokens: NonNegativeInt = Field(
        2,
        description="How many of the token_sweep candidates (at most half of them) are single "
        "tokens whose text embedding lies close to the product's caption words without being "
        "them (a plausible association); the rest come from the rare-token list.",
    )
    sweep_steps: PositiveInt | None = Field(
        None,
        description="Steps of a sweep's first round (None: sweep_fraction of steps); each "
        "further round doubles them.",
    )
    sweep_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.03, description="A sweep's first round as a fraction of steps (when sweep_steps is None)."
    )
    sweep_images: PositiveInt = Field(
        4, description="Validation images per candidate token and round in a sweep."
    )
    sweep_inference_steps: PositiveInt = Field(
        20, description="Denoising steps of a sweep's validation images."
    )
    eval_samples: PositiveInt = Field(
        4,
        description="Size of the fixed batch (fixed noise and timesteps) whose loss is measured "
        "before and after training and recorded in adapter.json.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype of the frozen base weights while training ('auto': bfloat16 on CUDA, "
        "float32 on CPU); LoRA weights and optimiser state stay float32. float16 is not offered: "
        "it needs loss scaling and the SDXL VAE overflows in it.",
    )
    save_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Dtype of the saved adapter weights (storage per product)."
    )
    cache_latents: bool = Field(
        True, description="Encode each product's images with the VAE once, not every step."
    )
    cache_text_embeddings: bool = Field(
        True, description="Encode each product's captions once, not every step."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute denoiser activations in backward (less memory, ~20% slower)."
    )
    allow_tf32: bool = Field(True, description="TF32 matmuls on Ampere+ GPUs.")
    lora_compute: Literal["base", "float32"] = Field(
        "base",
        description="Dtype of the LoRA branch's matmuls when the base trains in bfloat16 or "
        "float16: 'base' runs them in that dtype (autocast; the LoRA weights and their "
        "optimiser stay float32, as diffusers' scripts under mixed precision), 'float32' casts "
        "each LoRA layer's activations to float32 and back (peft's default: three passes over "
        "every LoRA layer's activations, 18 % of an SDXL step in its profile). No effect when "
        "the base trains in float32.",
    )
    products_per_step: PositiveInt = Field(
        1,
        description="Products trained together: each step is one forward/backward of the base "
        "over every product's batch, each sample with its own product's LoRA (same adapters as "
        "training them one by one, within float tolerance). Activations grow K-fold.",
    )
    num_workers: PositiveInt | None = Field(
        1,
        description="Ray Train workers; each loads the base model once and trains its share. "
        "None (null in YAML): as many as the cluster holds (its GPUs over gpus_per_worker; its "
        "CPUs over cpus_per_worker when training on CPU). Never more than the products to do.",
    )
    cpus_per_worker: PositiveFloat = Field(4.0, description="CPUs reserved per worker.")
    resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {}, description="Custom Ray resources per worker (set by the placement plan)."
    )
    gpus_per_worker: Annotated[float, Field(ge=0)] = Field(
        1.0, description="GPUs per worker (0: CPU training; fractions share a GPU)."
    )
    max_failures: NonNegativeInt = Field(
        3,
        description="Worker-group restarts after a worker dies (Ray Train FailureConfig); "
        "a restarted worker skips the products whose adapter is complete.",
    )
    io_threads: PositiveInt = Field(8, description="Threads reading a product's images.")
    masked_loss: bool = Field(
        False,
        description="Masked DreamBooth: the diffusion loss of a positive sample that has a "
        "product mask counts only the latent pixels under the product (the mask downsampled "
        "to latent resolution), so the LoRA learns the product, not its backgrounds. "
        "Negatives, class images and samples without a mask keep the plain loss.",
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("recipe") == "dreambooth_lora":
            data = {**DREAMBOOTH_DEFAULTS, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        _multiple_of_8("train.resolution", self.resolution)
        if self.recipe == "dreambooth_lora":
            for key, value in DREAMBOOTH_DEFAULTS.items():
                if getattr(self, key) != value:
                    raise ValueError(
                        f"train.{key}={getattr(self, key)!r} with train.recipe=dreambooth_lora: "
                        f"the baseline recipe trains classic DreamBooth ({key}={value}); "
                        f"set train.{key}={value} or leave it out, or use train.recipe=restage"
                    )
        elif self.prior_preservation.num_class_images:
            raise ValueError(
                "train.prior_preservation.num_class_images="
                f"{self.prior_preservation.num_class_images} with train.recipe=restage: "
                "restage trains in-class negatives instead of a prior-preservation loss; set "
                "train.recipe=dreambooth_lora or train.prior_preservation.num_class_images=0"
            )
        if not self.target_modules or any(not m.strip() for m in self.target_modules):
            raise ValueError(
                f"target_modules={self.target_modules}: give at least one module name, "
                "e.g. [to_q, to_k, to_v, to_out.0]"
            )
        if self.sweep_steps is not None and self.sweep_steps > self.steps:
            raise ValueError(
                f"sweep_steps={self.sweep_steps} exceeds steps={self.steps}: lower sweep_steps"
            )
        if self.products_per_step > 1 and self.token_sweep > 1:
            raise ValueError(
                f"products_per_step={self.products_per_step} with token_sweep="
                f"{self.token_sweep}: a token sweep trains one product at a time; set "
                "products_per_step=1 or token_sweep=1"
            )
        if self.products_per_step > 1 and self.dropout > 0:
            raise ValueError(
                f"products_per_step={self.products_per_step} with dropout={self.dropout}: "
                "multi-product steps have no LoRA dropout; set dropout=0 or products_per_step=1"
            )
        if self.eval_samples > 64:
            raise ValueError(f"eval_samples={self.eval_samples}: at most 64")
        return self


class GenerateConfig(StrictModel):
    """`restage generate`: images of each product in new contexts, ranked (paper 2.5)."""

    prompts_per_product: NonNegativeInt = Field(
        8,
        description="Prompt-bank prompts per product (of its type), besides user prompts "
        "(0: user prompts only, e.g. a benchmark's fixed list).",
    )
    user_prompts: str | None = Field(
        None,
        description="URI of a text file of extra prompts, one a line, each with {product} "
        "where the product goes (it becomes 'TOKEN NOUN'); '#' lines are comments.",
    )
    images_per_prompt: PositiveInt = Field(4, description="Images per prompt (different seeds).")
    top_n: PositiveInt = Field(4, description="Images kept per product after ranking.")
    ranking: str = Field(
        "paper",
        description="How images are scored for ranking (ray_app/ranking.py): 'paper', the "
        "plain sum of raw CLIP-T + CLIP-I + DINO (paper 2.5; scores in [-3, 3]), or "
        "'weighted', the metrics normalised through scoring.ranges and averaged with "
        "generate.weights (scores in [0, 1]), or 'learned', the pass probability of the "
        "model in generate.ranker (scores in [0, 1]; implied by generate.ranker). Serve's "
        "ranker orders images with it too.",
    )
    ranker: str | None = Field(
        None,
        description="URI of a learned ranker (the JSON file `restage ranker fit` writes). "
        "Setting it selects generate.ranking='learned'; giving another generate.ranking with "
        "it is an error.",
    )
    ranker_sha256: str | None = Field(
        None,
        description="Pin of generate.ranker's training data: the ratings_sha256 that `restage "
        "ranker fit` prints. Set, a model file fitted on other ratings fails to load.",
    )
    threshold: float | None = Field(
        None,
        description="Minimum ranking score of a kept image, applied after top_n, on the "
        "ranking's scale. Unset: the ranking's default, paper 1.23 (augment.filter's "
        "min_clip_t + min_clip_i + min_dino: an image that just passes augment's bars), "
        "weighted 0.0 (the top N whatever their score). Calibrate it from a run with "
        "generate.write_all_images=true: take the lowest `score` in the manifest among "
        "the images a person accepts.",
    )
    weights: dict[Metric, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {**dict.fromkeys(Metric, 1.0), Metric.SEG_CLIP_T: 0.0},
        description="Weights of the normalised metrics (scoring.ranges) in the 'weighted' "
        "ranking's score; segmented metrics count only where both masks exist.",
    )
    segment: bool = Field(
        True,
        description="Segment generated images (segmenter role) for segmented CLIP-I and DINO.",
    )
    segmentation: SegmentConfig = Field(
        default_factory=SegmentConfig,
        description="How generated images are segmented (the same defaults as augment.segment).",
    )
    width: PositiveInt = Field(1024, description="Image width.")
    height: PositiveInt = Field(1024, description="Image height.")
    steps: PositiveInt = Field(30, description="Denoising steps.")
    guidance_scale: Annotated[float, Field(ge=0)] = Field(
        7.0, description="Classifier-free guidance."
    )
    lora_scale: Annotated[float, Field(ge=0)] = Field(1.0, description="Weight of the adapter.")
    negative_prompt: str = Field(
        "blurry, low quality, distorted, deformed, duplicate, text, watermark",
        description="Negative prompt.",
    )
    write_all_images: bool = Field(
        False,
        description="Write every generated image, not only the kept top-N (review, debugging).",
    )
    products_per_batch: PositiveInt = Field(1, description="Products per actor call.")
    cpus_per_task: PositiveFloat = Field(0.25, description="CPUs of the plan and write tasks.")

    @model_validator(mode="before")
    @classmethod
    def _ranker_implies_learned(cls, data: Any) -> Any:
        # The model's URI is the one key that deploying a learned ranker needs; a ranking
        # given with it is still checked against it in _check, not overridden.
        if isinstance(data, dict) and data.get("ranker") is not None and "ranking" not in data:
            return {**data, "ranking": LearnedRanking.name}
        return data

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        _multiple_of_8("generate.width", self.width)
        _multiple_of_8("generate.height", self.height)
        if self.prompts_per_product == 0 and not self.user_prompts:
            raise ValueError(
                "prompts_per_product=0 without user_prompts leaves no prompt: set "
                "generate.user_prompts to a prompts file, or prompts_per_product above 0"
            )
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"weights={self.weights}: at least one weight must be above 0")
        learned = self.ranking == LearnedRanking.name
        if self.ranker is not None and not learned:
            raise ValueError(
                f"generate.ranker={self.ranker!r} is a learned ranker but generate.ranking="
                f"{self.ranking!r}: leave generate.ranking unset or set it to 'learned' "
                f"(generate.ranker implies 'learned'), or unset generate.ranker to rank with "
                f"{self.ranking!r}"
            )
        if learned and self.ranker is None:
            raise ValueError(
                "generate.ranking='learned' needs generate.ranker, the URI of a model file "
                "from `restage ranker fit`: set generate.ranker (it implies the ranking)"
            )
        if self.ranker_sha256 is not None:
            if self.ranker is None:
                raise ValueError(
                    "generate.ranker_sha256 pins a learned ranker's training data but "
                    "generate.ranker is unset: set generate.ranker too, or unset the pin"
                )
            if not re.fullmatch(r"[0-9a-f]{64}", self.ranker_sha256):
                raise ValueError(
                    f"generate.ranker_sha256={self.ranker_sha256!r}: give the 64 lowercase hex "
                    "digits of ratings_sha256 (`restage ranker fit` prints it)"
                )
        ranking = ranking_class(self.ranking)
        low, high = ranking.bounds
        if self.threshold is not None and not low <= self.threshold <= high:
            raise ValueError(
                f"generate.threshold={self.threshold:g} is outside the {self.ranking} "
                f"ranking's scores [{low:g}, {high:g}], so it would keep all or none: set it "
                f"within them, or leave it unset for the ranking's default "
                f"{ranking.default_threshold:g}"
            )
        return self

    @field_validator("ranking")
    @classmethod
    def _ranking(cls, value: str) -> str:
        ranking_class(value)  # unknown: the error lists the rankings
        return value

    @property
    def keep_threshold(self) -> float:
        """``threshold``, or the ranking's default when it is unset."""
        if self.threshold is not None:
            return self.threshold
        return ranking_class(self.ranking).default_threshold


class EvaluateConfig(StrictModel):
    """`restage evaluate`: metric tables of generated images against the products' real
    photos (roles eval_clip, eval_dino, inception and, for segmented metrics, segmenter)."""

    confidence: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.95, description="Confidence of the bootstrap intervals."
    )
    bootstrap_samples: PositiveInt = Field(
        1000, description="Bootstrap resamples (of products) per interval."
    )
    clip_t_text: Literal["class", "prompt"] = Field(
        "class",
        description="CLIP-T's text: 'class' drops the product's rare token from the prompt, so "
        "'a sks backpack in the snow' is scored as 'a backpack in the snow' (the text encoder "
        "never learnt the token, and DreamBench scores prompts this way); 'prompt' as written.",
    )
    segment: bool = Field(
        True, description="Segment images (segmenter role) for SegCLIP-I, SegCLIP-T and SegDINO."
    )
    segmentation: SegmentConfig = Field(
        default_factory=SegmentConfig, description="How images are segmented for evaluation."
    )
    min_fid_images: PositiveInt = Field(
        50,
        description="FID and KID are refused (with the reason in summary.json) when either "
        "side has fewer images: both are biased at small sizes, so compare runs of equal size.",
    )
    kid_subset_size: PositiveInt = Field(
        1000, description="KID subset size; lowered to the smaller side when that has fewer."
    )
    kid_subsets: PositiveInt = Field(100, description="KID subsets averaged.")
    kid_max_images: PositiveInt = Field(
        10_000,
        description="KID keeps at most this many feature vectors per side (a seeded sample "
        "by image id; FID uses every image through running sums).",
    )
    report_products: NonNegativeInt | None = Field(
        1000, description="Product pages in the report (None: every product)."
    )
    products_per_batch: PositiveInt = Field(1, description="Products per actor call.")
    cpus_per_task: PositiveFloat = Field(0.25, description="CPUs of the read and write tasks.")


class ReviewConfig(StrictModel):
    """`restage review`: human rating of generated images (paper 3.1 and A.3) and the
    statistics of its results."""

    raters_per_image: PositiveInt = Field(
        3, description="Distinct raters who rate each image (the paper: 3, majority vote)."
    )
    pass_rule: Literal["rater_majority", "question_majority"] = Field(
        "rater_majority",
        description="When an image passes. 'rater_majority' (the paper, A.3): a rater passes "
        "it when all 8 answers are 'yes', and it passes when more than half of its raters do. "
        "'question_majority': each question passes on a majority of 'yes', and the image when "
        "all 8 do (never stricter than the paper's rule).",
    )
    sample_per_run: PositiveInt | None = Field(
        None,
        description="Images put to raters per run, spread evenly over its products (a "
        "stratified, seeded sample); None: every written image.",
    )
    confidence: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.95, description="Confidence of the pass-rate and correlation intervals."
    )
    bootstrap_samples: PositiveInt = Field(
        2000, description="Bootstrap resamples (of products) per interval."
    )


class ServeBudgetConfig(StrictModel):
    """Compute budget and rate limits of `restage serve` (serve/budget.py). A request costs
    width x height x steps x num_images / 10^6 megapixel-steps (1024x1024, 30 steps: 31.5)."""

    max_request_cost: PositiveFloat = Field(
        200.0,
        description="Megapixel-steps one request may cost; above it the request is a 422 "
        "(200: e.g. 4 images of 1024x1024 at 45 steps).",
    )
    key_cost_per_minute: PositiveFloat = Field(
        2000.0,
        description="Megapixel-steps per API key per minute (a token bucket holding one "
        "minute's worth); beyond it a 429 with Retry-After.",
    )
    key_requests_per_minute: PositiveFloat = Field(
        120.0, description="Requests per API key per minute (token bucket); beyond it a 429."
    )
    key_request_burst: PositiveInt = Field(
        20, description="Requests a key may send at once before key_requests_per_minute applies."
    )

    @model_validator(mode="after")
    def _check(self) -> ServeBudgetConfig:
        if self.max_request_cost > self.key_cost_per_minute:
            raise ValueError(
                f"max_request_cost={self.max_request_cost:g} is above key_cost_per_minute="
                f"{self.key_cost_per_minute:g}: such a request could never be admitted; raise "
                "key_cost_per_minute or lower max_request_cost"
            )
        return self


class ServeConfig(StrictModel):
    """`restage serve`: the on-line endpoint (Ray Serve)."""

    host: str = Field(
        "0.0.0.0", description="Interface the HTTP proxy binds (--no-auth forces 127.0.0.1)."
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(8000, description="HTTP port.")
    max_adapters_per_replica: PositiveInt = Field(
        8, description="Adapters a generator replica holds before evicting the least recently used."
    )
    warm_adapter_slots: bool = Field(
        True,
        description="Allocate every adapter slot's tensors (train.rank on "
        "train.target_modules, on the generator's device) when a generator replica starts, "
        "so that adapter memory is taken up front and no load allocates.",
    )
    prefetch_adapters: NonNegativeInt = Field(
        1,
        description="Adapters of requests waiting for a generator replica's pipeline that it "
        "reads and writes into free slots while another request generates, at most this many "
        "ahead (0: off; a request whose adapter was evicted while it waited then reads it in "
        "its turn).",
    )
    min_replicas: NonNegativeInt = Field(
        1, description="Generator replicas kept at least (0: scale to zero)."
    )
    max_replicas: PositiveInt = Field(4, description="Generator replicas at most.")
    target_ongoing_requests: PositiveFloat = Field(
        2.0, description="Autoscaling target of requests in flight per generator replica."
    )
    max_ongoing_requests: PositiveInt = Field(
        8, description="Requests a replica accepts at once (queue)."
    )
    upscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        30.0, description="Autoscaling: delay before adding."
    )
    downscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        600.0, description="... and before removing."
    )
    ranker: bool = Field(
        True, description="Run the ranking deployment (clip, dino) for rank=true requests."
    )
    ranker_replicas: PositiveInt = Field(1, description="Ranker replicas.")
    stage_index: str | None = Field(
        None,
        description="The staged-catalog index `POST /v1/stage` searches (`restage index`'s "
        "OUT/index), loaded once per Stager replica; None: no Stager, /v1/stage answers 503.",
    )
    stager_replicas: PositiveInt = Field(1, description="Stager replicas (with stage_index).")
    max_upload_bytes: PositiveInt = Field(
        8 * 1024 * 1024,
        description="Larger /v1/stage bodies (a base64 photo: 4/3 of its bytes) get 413.",
    )
    ranker_segmentation: SegmentConfig = Field(
        default_factory=SegmentConfig,
        description="How the ranker segments a request's images for the segmented metrics "
        "(with generate.segment; the same defaults as augment.segment). It scores with "
        "generate.ranking, so that it orders images as `restage generate` ranks them.",
    )
    ingress_replicas: PositiveInt = Field(
        1, description="Ingress (HTTP, auth, validation) replicas."
    )
    ingress_cpus: PositiveFloat = Field(0.5, description="CPUs per ingress replica.")
    ingress_max_ongoing_requests: PositiveInt = Field(
        256, description="Requests an ingress replica accepts."
    )
    max_body_bytes: PositiveInt = Field(16384, description="Larger request bodies get 413.")
    max_pixels: PositiveInt = Field(1536 * 1536, description="width x height above this is a 422.")
    metadata_ttl_s: Annotated[float, Field(ge=0)] = Field(
        30.0,
        description="How long the ingress caches a product's adapter.json (new adapters appear after it).",
    )
    output_uri: str | None = Field(
        None,
        description="Where images of response_format=uri requests are stored (any fsspec URI).",
    )
    budget: ServeBudgetConfig = Field(default_factory=ServeBudgetConfig)
    max_json_depth: Annotated[int, Field(ge=2, le=64)] = Field(
        8, description="Request bodies nested deeper than this are a 422, before parsing."
    )
    request_timeout_s: PositiveFloat = Field(
        600.0,
        description="A generation still running this long after the ingress received it is "
        "stopped between two denoising steps (504), freeing the replica.",
    )
    docs: bool = Field(
        False,
        description="Serve the Swagger UI at /docs and ReDoc at /redoc (their scripts load from "
        "a CDN in the browser); /openapi.json is always served.",
    )

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}"
            )
        if self.prefetch_adapters > self.max_adapters_per_replica:
            raise ValueError(
                f"prefetch_adapters={self.prefetch_adapters} exceeds max_adapters_per_replica="
                f"{self.max_adapters_per_replica}: prefetched adapters only take free slots, "
                f"of which a replica has at most max_adapters_per_replica + 1; set "
                f"serve.prefetch_adapters to at most {self.max_adapters_per_replica} (0 turns "
                "prefetch off)"
            )
        return self


# Largest horizontal shift, as a fraction of the width: past it the background's cover zoom
# (1 + 2·depth·shift) crops so much of the scene that the product's context is lost.
MAX_SHIFT_FRACTION = 0.25
# Browsers play GIF frame delays under 20 ms as 100 ms: a faster GIF crawls.
MAX_GIF_FPS = 50.0

AnimationFormat = Literal["mp4", "webp", "gif"]


class EncodeQuality(StrictModel):
    """Each encoder's own quality knob (one shared 0-100 scale would hide what it does)."""

    mp4_crf: int = Field(
        20,
        ge=0,
        le=51,
        description="H.264 constant rate factor: 0 lossless, 18-23 visually clean, 51 worst.",
    )
    mp4_preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower"
    ] = Field("medium", description="x264 preset: slower presets give smaller files.")
    webp_quality: int = Field(
        80, ge=0, le=100, description="Lossy WebP quality (Pillow's quality, 0-100)."
    )
    webp_method: int = Field(
        4, ge=0, le=6, description="WebP effort: 0 fastest, 6 smallest file (Pillow's method)."
    )
    gif_colors: int = Field(
        256,
        ge=2,
        le=256,
        description="Colours of the GIF's one global palette (median cut over sampled frames; "
        "one palette for every frame keeps still areas from flickering).",
    )
    gif_dither: bool = Field(
        True, description="Floyd-Steinberg dithering against the palette (smooth gradients)."
    )


class AnimationConfig(StrictModel):
    """The parallax clip of a staged image (`restage stage --animate`, ray_app/parallax.py)."""

    frames: int = Field(48, ge=2, le=1000, description="Frames in one loop of the clip.")
    fps: float = Field(24.0, gt=0, le=60, description="Frames per second.")
    shift: float = Field(
        0.03,
        ge=0,
        description="Largest horizontal camera shift, moving a layer of depth 1 by this much "
        "each way; a fraction of the width (shift_unit 'width') or pixels ('px').",
    )
    shift_unit: Literal["width", "px"] = Field(
        "width", description="Unit of shift: 'width' (fraction of the image width) or 'px'."
    )
    zoom: float = Field(
        0.02,
        ge=0,
        le=0.25,
        description="Slight push-in at the middle of the loop: a layer of depth d is scaled "
        "by 1 + d·zoom at its peak (0: no push-in).",
    )
    easing: Literal["sine", "smoothstep", "linear"] = Field(
        "sine",
        description="Camera path over one loop, each ending where it starts: 'sine' (smooth "
        "everywhere), 'smoothstep' (a back-and-forth that rests at both ends), 'linear' "
        "(constant speed, sharp turns).",
    )
    background_depth: float = Field(
        0.35,
        ge=0,
        description="Depth factor of the background: how much of the camera's motion it "
        "follows (0: still). Must be below product_depth.",
    )
    product_depth: float = Field(
        1.0, gt=0, le=2, description="Depth factor of the product (and its shadow)."
    )
    formats: list[AnimationFormat] = Field(
        default_factory=lambda: ["mp4"],
        min_length=1,
        description="Files written by animate(), one per format. MP4 by default: WebP and GIF "
        "have no motion compensation, so a clip whose every pixel moves is about 10× (WebP) "
        "and 30× (GIF) the MP4's size.",
    )
    quality: EncodeQuality = Field(default_factory=EncodeQuality, description="Encoder settings.")

    @model_validator(mode="after")
    def _check(self) -> AnimationConfig:
        if self.background_depth >= self.product_depth:
            raise ValueError(
                f"background_depth={self.background_depth} is not below product_depth="
                f"{self.product_depth}: the product must move more than the background; lower "
                "background_depth or raise product_depth"
            )
        if self.shift_unit == "width" and self.shift > MAX_SHIFT_FRACTION:
            raise ValueError(
                f"shift={self.shift} (of the width) is above {MAX_SHIFT_FRACTION}: the "
                "background's cover zoom would crop most of the scene; lower shift"
            )
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats={self.formats} lists a format twice: list each once")
        if "gif" in self.formats and self.fps > MAX_GIF_FPS:
            raise ValueError(
                f"fps={self.fps} with a GIF output: browsers play GIF frames faster than "
                f"{MAX_GIF_FPS:g} fps at 10 fps; lower fps or drop 'gif' from formats"
            )
        return self

    @property
    def parallax_ratio(self) -> float:
        """How many times further the product moves than the background (inf: still one)."""
        if self.background_depth == 0:
            return math.inf
        return self.product_depth / self.background_depth

    def shift_px(self, width: int) -> float:
        """The shift of a layer of depth 1, in pixels of an image ``width`` wide."""
        px = self.shift * width if self.shift_unit == "width" else self.shift
        if px > MAX_SHIFT_FRACTION * width:
            raise ValueError(
                f"shift={self.shift} px is above {MAX_SHIFT_FRACTION} of the width ({width} "
                f"px): the background's cover zoom would crop most of the scene; lower shift"
            )
        return px


class IndexConfig(StrictModel):
    """`restage index`: the staged-catalog index of `restage stage` (scene masks, ground
    lines and product-crop embeddings of catalog photos, ray_app/retrieval.py)."""

    products_per_batch: PositiveInt = Field(1, description="Catalog products per actor call.")
    cpus_per_task: PositiveFloat = Field(0.25, description="CPUs of the decode and write tasks.")
    segment: SegmentConfig = Field(
        default_factory=lambda: SegmentConfig(min_area=0.02, max_area=0.8),
        description="Segmenter prompting for catalog scenes. A scene product under min_area "
        "(too small to stage at) or over max_area (no scene around it) is left out.",
    )
    max_edges_touched: Annotated[int, Field(ge=0, le=4)] = Field(
        1,
        description="A scene product whose mask touches more of the image's four edges than "
        "this is cut off by the frame (its shape and ground line are unknown): left out.",
    )
    ground_share: Annotated[float, Field(gt=0, le=1)] = Field(
        0.2,
        description="The ground line is the lowest mask row covering at least this share of "
        "the product's widest row (stray pixels and thin tips are not the ground).",
    )
    exact_below: PositiveInt = Field(
        50_000,
        description="Below this many scenes the index is searched exactly; from it on an "
        "HNSW graph (faiss) is built and searched, with the same results API.",
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Vectors in memory while searching; float16 halves it."
    )
    hnsw_m: Annotated[int, Field(ge=2)] = Field(32, description="HNSW neighbours per node.")
    hnsw_ef_construction: Annotated[int, Field(ge=2)] = Field(
        80, description="HNSW candidate list while building."
    )
    hnsw_ef_search: Annotated[int, Field(ge=2)] = Field(
        128, description="HNSW candidate list while searching (raise it first for recall)."
    )
    eval_k: PositiveInt = Field(
        10, description="k of the precision/recall@k the summary reports (retrieval quality)."
    )
    eval_queries: PositiveInt = Field(
        1000, description="Kept scenes (a seeded sample) that query the index for that measure."
    )
    fid_reference: bool = Field(
        True,
        description="Inception features of every kept scene (role inception), merged into "
        "the FID/KID reference that `restage stage` measures its staged images against.",
    )


class StageScoring(StrictModel):
    """How staged images are scored and which are kept."""

    clip_i: Annotated[float, Field(ge=0)] = Field(
        1.0, description="Weight of CLIP-I (product crop in the staged image vs the input's)."
    )
    mask_iou: Annotated[float, Field(ge=0)] = Field(
        1.0,
        description="Weight of the IoU of the re-segmented product with where it was placed.",
    )
    boundary: Annotated[float, Field(ge=0)] = Field(
        0.25,
        description="Weight of the seam penalty: the boundary score (1: no visible seam) above "
        "1 is subtracted, times this weight.",
    )
    min_mask_iou: Fraction = Field(
        0.0,
        description="Staged images whose re-segmented product overlaps its placement less "
        "than this are dropped (the scene hides or swallows the product).",
    )


class InpaintTrainConfig(StrictModel):
    """One LoRA on the inpainter's denoiser, trained to fill product-shaped holes in catalog
    scenes with the scene behind them; the denoising loss is weighted up on the band around
    the hole's edge (``weighting``), where a staged product's seams show."""

    steps: PositiveInt = Field(1000, description="Optimiser steps.")
    learning_rate: PositiveFloat = Field(1e-4, description="AdamW learning rate of the LoRA.")
    rank: PositiveInt = Field(16, description="LoRA rank.")
    target_modules: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"],
        description="Names of the denoiser's layers that get LoRA (attention projections).",
    )
    batch_size: PositiveInt = Field(4, description="Scenes per step.")
    resolution: PositiveInt = Field(
        1024,
        description="Square training resolution in pixels (shorter side resized, centre "
        "crop); a multiple of 8.",
    )
    weighting: bool = Field(
        True,
        description="Weight the per-latent-pixel denoising MSE by the boundary map "
        "(ray_app.boundary_weights); off: the plain mean MSE.",
    )
    band: PositiveInt = Field(
        16,
        description="Width in pixels (at the training resolution) of the band on either side "
        "of the hole's edge where the weight peaks.",
    )
    peak: Annotated[float, Field(ge=1)] = Field(
        5.0, description="Weight on the band, relative to 1 elsewhere (before the mean-1 scaling)."
    )
    dilation: NonNegativeInt = Field(
        4,
        description="Pixels the synthetic product-shaped holes are grown by (at the training "
        "resolution), as `restage stage` grows the removed product to take its halo along.",
    )
    random_placement: Fraction = Field(
        0.5,
        description="Share of the holes placed at a random spot of the scene's lower half; the "
        "rest are fitted where the scene's own product stands.",
    )
    prompt: str = Field(
        "",
        description="Prompt the inpainter is trained with; give the one `restage stage` paints "
        "the gaps with.",
    )
    max_scenes: PositiveInt = Field(
        2000,
        description="Catalog scenes trained on at most (a seeded sample of the index's); "
        "they are held in memory at the training resolution.",
    )
    held_out: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1,
        description="Share of the scenes kept out of training (their loss is reported; the "
        "benchmark inpaints them).",
    )
    seed: NonNegativeInt = Field(
        0,
        description="Seed of the held-out split, the holes, the LoRA's initialisation and "
        "every noise and timestep draw.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype of the frozen base while training ('auto': bfloat16 on CUDA, float32 "
        "on CPU); the LoRA and its optimiser state stay float32.",
    )
    save_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Dtype of the saved LoRA weights."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute denoiser activations in backward (less memory, slower)."
    )

    @model_validator(mode="after")
    def _check(self) -> InpaintTrainConfig:
        if self.resolution % 8:
            raise ValueError(
                f"resolution={self.resolution} must be a multiple of 8 (latent grid): use "
                f"{self.resolution - self.resolution % 8 or 8}"
            )
        if 2 * self.band >= self.resolution:
            raise ValueError(
                f"band={self.band} is half of resolution={self.resolution} or more: every "
                f"pixel would be on the edge band; lower band (e.g. {max(1, self.resolution // 32)})"
            )
        if not self.target_modules or any(not m.strip() for m in self.target_modules):
            raise ValueError(
                f"target_modules={self.target_modules}: give at least one module name, "
                "e.g. [to_q, to_k, to_v, to_out.0]"
            )
        return self


class StageConfig(StrictModel):
    """`restage stage`: retrieval-assisted copy-paste staging (arXiv 2307.15326)."""

    products_per_batch: PositiveInt = Field(1, description="Products per actor call.")
    cpus_per_task: PositiveFloat = Field(
        0.25, description="CPUs of the decode, compose and write tasks."
    )
    segment: SegmentConfig = Field(
        default_factory=SegmentConfig, description="Segmenter prompting for input products."
    )
    fid: bool = Field(
        True,
        description="FID/KID of the kept staged images against the index's scenes (its FID "
        "reference; evaluate.min_fid_images, kid_* apply), in summary.json's `quality`.",
    )
    top_k: PositiveInt = Field(4, description="Scenes retrieved and staged per product.")
    keep: PositiveInt = Field(
        2, description="Staged images kept per product (the best by score; the rest recorded)."
    )
    max_aspect_change: Annotated[float, Field(ge=1)] = Field(
        1.6,
        description="Retrieved scenes whose product's box shape (width/height) differs from "
        "the input's by more than this factor are skipped: a tall bottle does not go where a "
        "wide bowl stood.",
    )
    candidates: PositiveInt = Field(
        64,
        description="Nearest scenes fetched before the aspect filter picks top_k (more: "
        "fewer products short of top_k compatible scenes, slower queries).",
    )
    size: PositiveInt = Field(
        512,
        description="Longer side of a staged image, in pixels (scenes are resized to it; both "
        "sides rounded to multiples of 8 for the inpainter).",
    )
    removal_dilation: Fraction = Field(
        0.02,
        description="The scene's product is grown by this fraction of the image's shorter "
        "side before it is removed (its halo and soft shadow go with it).",
    )
    removal_prompt: str = Field(
        "an empty scene, background only, nothing in the middle",
        description="What the inpainter paints where the scene's product was.",
    )
    removal: InpaintOptions = Field(
        default_factory=lambda: InpaintOptions(
            negative_prompt="object, product, person, text, watermark, blurry, distorted"
        ),
        description="How the scene's product is removed (the background behind it painted).",
    )
    refine_gaps: bool = Field(
        True,
        description="Paint the gaps between the new product's silhouette and the removed "
        "one's again with the product in place (light and shadow around it), its pixels "
        "pasted back exactly; off: the background layer's fill stays.",
    )
    inpainter_lora: str | None = Field(
        None,
        description="URI of a boundary-weighted inpainter LoRA (`restage stage "
        "train-inpainter`); None: the base inpainter.",
    )
    feather: NonNegativeInt = Field(
        2, description="Pixels of the product's edge blended with the scene (its inside exact)."
    )
    shadow_opacity: Fraction = Field(0.35, description="Peak opacity of the contact shadow.")
    harmonize: Fraction = Field(
        0.5, description="How far the edge band's colour moves toward the scene's (0: none)."
    )
    scoring: StageScoring = Field(default_factory=StageScoring)
    image_format: Literal["png", "jpeg"] = Field("png", description="Format of staged images.")
    animation: AnimationConfig = Field(
        default_factory=AnimationConfig,
        description="The parallax clip of each kept staged image (`--animate`).",
    )
    train_inpainter: InpaintTrainConfig = Field(
        default_factory=InpaintTrainConfig,
        description="`restage stage train-inpainter`: the boundary-weighted inpainter LoRA.",
    )

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.keep > self.top_k:
            raise ValueError(
                f"keep={self.keep} is above top_k={self.top_k}: at most top_k scenes are "
                "staged; lower keep or raise top_k"
            )
        if self.candidates < self.top_k:
            raise ValueError(
                f"candidates={self.candidates} is below top_k={self.top_k}: fetch at least "
                "top_k scenes"
            )
        if self.size % 8:
            raise ValueError(f"size={self.size} must be a multiple of 8 (the inpainter's grid)")
        return self


class PersonalCutPasteConfig(StrictModel):
    """Cut-and-paste positives made inside `restage personalize` (ray_app/cutpaste.py; the
    personalized-representations paper's cheap synthetic data): each real photo's product,
    cut out with its augment mask, pasted at a random scale and place on scenes. Made in
    memory and trained on; written only with ``keep_images``."""

    count: NonNegativeInt = Field(
        450,
        description="Composites per product (the paper's 450 synthetic positives); 0 turns "
        "cut-and-paste off. The real photos take turns as the pasted product.",
    )
    scale: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.3, 1.3),
        description="Range of the uniformly drawn paste scale (the paper's 0.3-1.3); scale 1 "
        "fits the product's box into half the background's shorter side (CutPasteConfig).",
    )
    backgrounds: str | None = Field(
        None,
        description="A folder URI of real scene images (png, jpg, jpeg, webp; listed once, not "
        "recursively). null means the scenes of other products of the run: their "
        "counterfactuals (real photos with that product inpainted away) and the in-class "
        "negatives of products of other categories (those of its own category would show a "
        "look-alike), from the bank of personalize.negative_products products per category "
        "(none when that is 0: each product then gets an error row and no composites).",
    )
    keep_images: bool = Field(
        False,
        description="Also write each composite and its paste mask under the product's encoder "
        "folder (data/cut_paste/); false keeps them in memory only.",
    )

    @model_validator(mode="after")
    def _check(self) -> PersonalCutPasteConfig:
        low, high = self.scale
        if low > high:
            raise ValueError(
                f"scale={self.scale}: the minimum exceeds the maximum; give (low, high) with "
                f"low <= high, e.g. ({high}, {low})"
            )
        top = 1 / CutPasteConfig().reference
        if high > top:
            raise ValueError(
                f"scale={self.scale}: a paste at {high} would not fit the frame (scale 1 is "
                f"{CutPasteConfig().reference} of the background's side); give a maximum of at "
                f"most {top:g}"
            )
        return self

    def paste_config(self) -> CutPasteConfig:
        """The ``cut_paste`` rules for this job's composites."""
        return CutPasteConfig(scale_range=self.scale)


class PersonalGeneratedConfig(StrictModel):
    """Positives generated by each product's own adapter in `restage personalize --adapters
    TRAIN_OUT` (the paper's DreamBooth positives): `restage generate` runs once per value of
    ``guidance_scales`` (every image written and segmented), then each product keeps the
    images whose segmented DINO similarity (``seg_dino``) to its masked real photos is at
    least ``min_seg_dino``. The paper filters with DreamSim (>= 0.6); restage has no DreamSim
    role, so seg_dino, which generate computes per image, stands in for it."""

    guidance_scales: list[Annotated[float, Field(ge=0)]] = Field(
        [4.0, 5.0, 7.5],
        description="Classifier-free guidance values (the paper's 4, 5 and 7.5): one "
        "generation per value, each under OUT/_generated/cfg-<value>/.",
    )
    images_per_product: NonNegativeInt = Field(
        450,
        description="Generated images per product before filtering (the paper's 450 synthetic "
        "positives), split as evenly as possible over guidance_scales (the first values get "
        "the remainder), one image per prompt-bank prompt; 0 turns generation off.",
    )
    min_seg_dino: Annotated[float, Field(ge=-1, le=1)] = Field(
        0.6,
        description="A generated image is a positive when its seg_dino is at least this; the "
        "others, and images without a product mask, are dropped and listed in OUT/_dropped/. "
        "0.6 is the paper's DreamSim bar, not calibrated for seg_dino: look at OUT/_dropped/ "
        "and the generations' manifests, and set it to the lowest seg_dino a person accepts.",
    )

    @model_validator(mode="after")
    def _check(self) -> PersonalGeneratedConfig:
        if not self.guidance_scales:
            raise ValueError(
                "guidance_scales=[]: give at least one guidance value, e.g. [4.0, 5.0, 7.5], or "
                "set images_per_product=0 to turn generation off"
            )
        names = [f"{g:g}" for g in self.guidance_scales]
        if len(set(names)) != len(names):
            raise ValueError(
                f"guidance_scales={self.guidance_scales}: a value repeats; give each once"
            )
        if 0 < self.images_per_product < len(self.guidance_scales):
            raise ValueError(
                f"images_per_product={self.images_per_product} is fewer than the "
                f"{len(self.guidance_scales)} guidance_scales: give at least one image per "
                "guidance value, or fewer guidance_scales"
            )
        return self

    def shares(self) -> list[tuple[float, int]]:
        """(guidance value, images per product at it): ``images_per_product`` split."""
        n, k = self.images_per_product, len(self.guidance_scales)
        return [(g, n // k + (i < n % k)) for i, g in enumerate(self.guidance_scales)]


class PersonalizeConfig(StrictModel):
    """A per-product image encoder (personalized representations, arXiv 2412.16156): one
    LoRA of the ``encoder`` role per product, trained with InfoNCE to pull the product's
    images together and push other images away (``actors/encoder_trainer.py``). Defaults
    are the paper's: 2 epochs over 4,500 anchor-positive pairs drawn from 450 positives and
    1,000 negatives."""

    rank: PositiveInt = Field(16, description="LoRA rank.")
    alpha: PositiveFloat | None = Field(None, description="LoRA alpha; null means the rank.")
    target_modules: list[str] | None = Field(
        None,
        description="Linear layers that get the LoRA; null means the attention's query and "
        "value projections of the encoder's family (DINOv2: query, value; CLIP: q_proj, "
        "v_proj).",
    )
    lora_compute: Literal["base", "float32"] = Field(
        "base",
        description="Dtype of the LoRA branch's matmuls when the encoder runs in bfloat16 or "
        "float16 (training and personal_fidelity): 'base' runs them in that dtype under "
        "autocast (the LoRA weights and their optimiser stay float32), 'float32' casts each "
        "LoRA layer's activations to float32 and back (peft's default), as "
        "train.lora_compute. No effect on a float32 encoder.",
    )
    feature: Literal["cls_mean", "cls"] = Field(
        "cls_mean",
        description="The image feature: the CLS token concatenated with the mean of the final "
        "patch tokens (the paper's), or the CLS token alone.",
    )
    temperature: PositiveFloat = Field(0.07, description="InfoNCE temperature.")
    epochs: PositiveInt = Field(2, description="Passes over the anchor-positive pairs.")
    pairs: PositiveInt = Field(4500, description="Anchor-positive pairs drawn per product.")
    positives: PositiveInt = Field(
        450, description="At most this many positive images per product (drawn when more)."
    )
    negatives: PositiveInt = Field(
        1000, description="At most this many negative images per product (drawn when more)."
    )
    batch_size: PositiveInt = Field(16, description="Anchor-positive pairs per step.")
    negatives_per_step: PositiveInt = Field(
        64,
        description="Negatives drawn for each step, shared by its anchors: each anchor's "
        "InfoNCE denominator holds its positive and these.",
    )
    learning_rate: PositiveFloat = Field(1e-4, description="AdamW learning rate of the LoRA.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay.")
    resolution: PositiveInt | None = Field(
        None,
        description="Input side in pixels; null means the encoder's processor crop size "
        "(224 for DINOv2-B/14). Training and embedding both use it.",
    )
    crop_scale: tuple[Fraction, Fraction] = Field(
        (0.6, 1.0),
        description="Training augmentation: a random square crop covering this range of the "
        "image's area before resizing, and a random horizontal flip; (1, 1) turns cropping off.",
    )
    flip: bool = Field(True, description="Random horizontal flips in training.")
    min_positives: Annotated[int, Field(ge=2)] = Field(
        2, description="Products with fewer kept positive samples fail (an anchor needs a pair)."
    )
    negative_products: NonNegativeInt = Field(
        32,
        description="Hard negatives beside the product's own in-class negatives: the real "
        "photos of up to this many other products of the run, those of its own category "
        "(augment's product_type) first, then of other categories to fill up. They come from a "
        "bank of at most this many products per category (the listing's first), collected "
        "once in Ray Data tasks.",
    )
    cut_paste: PersonalCutPasteConfig = Field(
        default_factory=PersonalCutPasteConfig,
        description="Cut-and-paste positives made by the job (PersonalCutPasteConfig).",
    )
    generated: PersonalGeneratedConfig = Field(
        default_factory=PersonalGeneratedConfig,
        description="Positives generated by the products' adapters, filtered by seg_dino "
        "(PersonalGeneratedConfig; only with `restage personalize --adapters`).",
    )
    evaluate: PersonalEvalConfig = Field(
        default_factory=lambda: PersonalEvalConfig(),  # defined below: looked up when called
        description="`restage personalize evaluate`: how the encoders are measured.",
    )
    cpus_per_task: PositiveFloat = Field(0.25, description="CPUs of the plan and write tasks.")

    @property
    def steps(self) -> int:
        """Optimizer steps per product: every epoch passes all the pairs in batches."""
        return self.epochs * math.ceil(self.pairs / self.batch_size)

    @property
    def images_per_step(self) -> int:
        """Images a step passes through the encoder with gradients (at most: a product
        with fewer negatives shares fewer): the anchors, their positives, the negatives."""
        return 2 * self.batch_size + min(self.negatives_per_step, self.negatives)

    @model_validator(mode="after")
    def _check(self) -> PersonalizeConfig:
        low, high = self.crop_scale
        if low <= 0 or low > high:
            raise ValueError(
                f"crop_scale={self.crop_scale}: give (low, high) with 0 < low <= high <= 1, "
                "e.g. (0.6, 1.0)"
            )
        return self


class PersonalEvalConfig(StrictModel):
    """``restage personalize evaluate`` (pipelines/personalize_evaluate.py): each product's
    encoder, personalized and pretrained (the LoRA off), on a labelled test manifest:
    classification, retrieval, detection and segmentation."""

    references: PositiveInt = Field(
        3,
        description="A product without images of split 'reference' in the test manifest gets "
        "this many of its images (a seeded draw) as references; the rest are split.",
    )
    similarity: Literal["max", "mean"] = Field(
        "max",
        description="An image's score for a product: its max (or mean) cosine similarity to "
        "the product's reference images.",
    )
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.5,
        description="Images without a split: this fraction of each product's (and of the "
        "distractors') is drawn (seeded) for validation, the rest is test.",
    )
    recall_at: list[PositiveInt] = Field(
        [1, 5, 10], description="Retrieval: the k of each recall@k reported."
    )
    detection_iou: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="Detection: a box is right at this IoU with the mask's box (AP@IoU)."
    )
    threshold: Literal["validation", "otsu"] = Field(
        "validation",
        description="Segmentation and detection threshold of the similarity map: the one with "
        "the best mean IoU on the product's validation masks (Otsu's where it has none), or "
        "Otsu's on each image's map.",
    )
    mask_side: Annotated[int, Field(ge=8)] = Field(
        224,
        description="Masks and similarity maps are compared on the encoder's view of the image "
        "(its centred square) resized to this side in pixels.",
    )
    batch_size: PositiveInt = Field(32, description="Images per encoder forward pass.")
    cached_tokens: NonNegativeInt = Field(
        4096,
        description="Images whose pretrained patch tokens an actor keeps between products "
        "(float16, ~0.4 MB an image at ViT-B/14 224 px: 1.6 GB at 4096); the pretrained "
        "encoder re-encodes the rest for each product. Their features are always kept.",
    )
    bootstrap_samples: PositiveInt = Field(
        1000, description="Bootstrap resamples (over products) of the summary's intervals."
    )
    confidence: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.95, description="Confidence of the bootstrap intervals."
    )

    @model_validator(mode="after")
    def _check(self) -> PersonalEvalConfig:
        if not self.recall_at:
            raise ValueError(
                "recall_at=[]: give at least one k, e.g. personalize.evaluate.recall_at=[1,5,10]"
            )
        if len(set(self.recall_at)) != len(self.recall_at):
            raise ValueError(
                f"recall_at={self.recall_at} repeats a k; give each k once, e.g. [1,5,10]"
            )
        return self


PersonalizeConfig.model_rebuild()  # its ``evaluate`` field names the class above


class RestageConfig(StrictModel):
    """The whole resolved configuration of a run."""

    profile: str = Field("default", description="Name of the profile this config came from.")
    cache_dir: str | None = Field(
        None,
        description="Local cache for tiny checkpoints and for sources copied from URIs; "
        "null means $RESTAGE_CACHE, else ~/.cache/restage.",
    )
    offline: bool = Field(
        False, description="Forbid hub downloads (HF_HUB_OFFLINE etc. set for every worker)."
    )
    seed: NonNegativeInt = Field(0, description="Run seed mixed into every derived seed.")
    ray: RayConfig = Field(default_factory=RayConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    captioner: RoleSpec
    segmenter: RoleSpec
    novel_view: RoleSpec
    inpainter: RoleSpec
    generator: RoleSpec
    clip: RoleSpec
    dino: RoleSpec
    encoder: RoleSpec
    llm: RoleSpec | None = Field(None, description="Optional: used by `restage prompts build`.")
    # `restage evaluate`'s backbones: the literature's choices, so that its tables compare
    # with published ones; clip and dino above stay the filtering and ranking roles.
    eval_clip: RoleSpec
    eval_dino: RoleSpec
    inception: RoleSpec
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    stage: StageConfig = Field(default_factory=StageConfig)
    personalize: PersonalizeConfig = Field(default_factory=PersonalizeConfig)

    @model_validator(mode="after")
    def _check_vae(self) -> RestageConfig:
        for role in ROLES:
            spec = getattr(self, role)
            if spec is not None and spec.vae is not None and role not in VAE_ROLES:
                raise ValueError(
                    f"{role}.vae={spec.vae.source!r}: only {' and '.join(VAE_ROLES)} take a "
                    f"separate VAE; remove {role}.vae"
                )
        return self

    def model_spec(self, name: str) -> ModelSpec:
        """What an actor of role ``name`` needs to load its model, and nothing else."""
        return ModelSpec(name, self.role(name), self.cache_path, self.offline)

    def role(self, name: str) -> RoleSpec:
        if name not in ROLES:
            raise ConfigError(f"unknown model role {name!r}; roles are: {', '.join(ROLES)}")
        spec = getattr(self, name)
        if spec is None:
            raise ConfigError(f"model role {name!r} is not configured: set {name}.source")
        return spec

    @property
    def cache_path(self) -> Path:
        return Path(
            self.cache_dir or os.environ.get("RESTAGE_CACHE") or "~/.cache/restage"
        ).expanduser()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _profile_mapping(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; profiles are: {', '.join(PROFILES)}")
    text = resources.files("ray_app").joinpath("profiles", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _deep_merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (['a', 'b'], c) with the value parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. generator.batch_size=2"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return key.split("."), value


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(path[: i + 1])
            raise ConfigError(f"--set {'.'.join(path)}: {dotted} is a value, not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(err: ValidationError, tree: dict[str, Any]) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-after"))
        kind = item["type"]
        if kind == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else ""
            allowed = _allowed_keys(parent)
            lines.append(f"{loc}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif kind == "missing":
            lines.append(f"{loc}: required but missing")
        else:
            value = item.get("input")
            shown = "" if isinstance(value, dict) else f"={value!r}"
            lines.append(f"{loc}{shown}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _allowed_keys(dotted: str) -> list[str]:
    model: type[BaseModel] = RestageConfig
    for part in filter(None, dotted.split(".")):
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = [
            a
            for a in getattr(ann, "__args__", (ann,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def load_config(
    profile: str = "default",
    files: list[str | os.PathLike[str]] | None = None,
    overrides: list[str] | None = None,
) -> RestageConfig:
    """Resolve a profile, optional YAML files and ``a.b=c`` overrides into a validated config."""
    tree = _profile_mapping("default")
    if profile != "default":
        tree = _deep_merge(tree, _profile_mapping(profile))
    tree["profile"] = profile
    for path in files or []:
        try:
            # Any fsspec URI: `restage models fetch` writes its sources.yaml beside the copies.
            with fsspec.open(str(path), "rt") as f:
                loaded = yaml.safe_load(f.read()) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping at the top level")
        tree = _deep_merge(tree, loaded)
    for text in overrides or []:
        path, value = parse_override(text)
        _apply_override(tree, path, value)
    try:
        return RestageConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, tree)) from None
