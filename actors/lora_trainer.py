"""Per-product LoRA fine-tuning of the generator's denoiser (role ``generator``, paper 2.4).

``LoraTrainer`` loads the base pipeline once, adds one peft LoRA to its denoiser, and then
trains product after product: ``train`` re-initialises the LoRA from the product's seed,
encodes the product's images (VAE latents) and captions (text embeddings) once, runs the
optimiser steps on the cached tensors, and returns the LoRA weights in the diffusers format
that ``pipe.load_lora_weights`` reads. No prior-preservation loss: the product's negatives
and counterfactuals are mixed into the batches at ``train.negative_ratio`` (2:1), each with
its own caption, while positives carry the product's token. The baseline recipe
(``train.recipe=dreambooth_lora``) may add DreamBooth's prior preservation instead: class
samples (``TrainingSample.prior``) extend every step's batch by as many samples, and the
loss is the instance loss + ``prior_preservation.weight`` * the class loss (``prior_loss``).
With ``train.masked_loss`` (masked DreamBooth, issue 16), a positive sample that carries its
product mask (``TrainingSample.mask``) is trained only on the latent pixels under the product
(``latent_mask``, ``masked_mse``): the LoRA learns the product, not its backgrounds.

Conditioning follows the pipeline: SDXL (two text encoders) gets the concatenated
penultimate hidden states of both encoders, the pooled embedding of the second, and
``add_time_ids`` (original size, crop corner, target size); SD 1.x/2.x pipelines (one text
encoder) get the encoder's hidden states. No ``ray`` here: the same class runs inside a Ray
Train worker, in a unit test, and in ``bench/train.py`` on a GPU machine without Ray.
"""

from __future__ import annotations

import math
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from actors.generator import has_negative
from actors.lora_compute import compute_lora_in
from ray_app.config import ModelSpec, TrainConfig
from ray_app.images import decode_rgb
from ray_app.models import load_model
from ray_app.prompts import product_phrase
from ray_app.storage import AdapterLayout

ADAPTER = "restage"
_SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class TrainingSample:
    """One image of a product's training set with the prompt it is trained with."""

    sample_id: str
    image: bytes  # encoded image
    prompt: str
    negative: bool = False
    prior: bool = False  # a class image of prior preservation (its own loss term)
    mask: bytes | None = None  # encoded product mask (nonzero: product); train.masked_loss


@dataclass
class ProductCache:
    """A product's tensors computed once and reused by every step."""

    n: int
    negative: np.ndarray  # (n,) bool
    prior: np.ndarray  # (n,) bool: class images of prior preservation
    prompts: list[str]
    time_ids: torch.Tensor | None  # (n, 6) SDXL only
    pixels: torch.Tensor | None = None  # (n, 3, R, R) in [-1, 1], CPU; uncached latents only
    latent_mean: torch.Tensor | None = None  # (n, 4, R/8, R/8) on device
    latent_std: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None  # (n, 77, D) on device
    pooled_embeds: torch.Tensor | None = None  # (n, P) on device, SDXL only
    # (n, 1, R/8, R/8) bool on device: the latent pixels that count in the loss (all of them
    # but for masked positives); None without train.masked_loss
    keep: torch.Tensor | None = None
    masked: int = 0  # samples trained on their product's pixels only
    seconds: float = 0.0


@dataclass
class _Run:
    """One product's training in progress: its cache, batch schedule and random draws."""

    seed: int
    cache: ProductCache
    schedule: list[list[int]]
    positives: int
    negatives: int
    eval_start: float
    gen: torch.Generator  # latents, noise and timesteps of every step, in this order
    setup_seconds: float


@dataclass
class PausedRun:
    """One product's training stopped part-way (a token sweep's candidate): its run, and
    its LoRA weights and optimiser state kept off the live model until it goes on."""

    run: _Run
    steps: int  # its full length: the batch and learning-rate schedules are over these
    lora: dict[str, torch.Tensor]  # live parameter name -> CPU copy
    done: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    train_seconds: float = 0.0

    @property
    def recent_loss(self) -> float:
        """Mean loss of the last 10% of the steps so far (NaN before the first)."""
        if not self.losses:
            return math.nan
        return float(torch.stack(_last_tenth(self.losses)).float().mean())


@dataclass
class TrainResult:
    """What training one product produced: the adapter weights and how it went."""

    state_dict: dict[str, torch.Tensor]  # diffusers format, CPU, alpha/rank folded in
    losses: list[float]
    eval_loss_start: float
    eval_loss_end: float
    steps: int
    batch_size: int
    positives: int
    negatives: int
    setup_seconds: float  # LoRA reset + caching latents and text embeddings
    train_seconds: float  # the optimiser steps
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last 10% of steps (at least one)."""
        return float(np.mean(_last_tenth(self.losses)))

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(1, self.steps)


# --------------------------------------------------------------------------- pure helpers


def positive_prompt(caption: str | None, token: str, noun: str, mode: str = "caption") -> str:
    """The prompt of a positive sample: the token goes right before the class noun.

    ``caption`` mode keeps the fine-grained caption ("a mug on a table" -> "a ohwx mug on a
    table"), or prefixes "a photo of TOKEN NOUN," when the noun is absent; ``instance`` mode
    is DreamBooth's "a photo of TOKEN NOUN".
    """
    instance = f"a photo of {product_phrase(token, noun)}"
    if mode == "instance" or not caption or not caption.strip():
        return instance
    caption = caption.strip()
    found = re.search(r"\b" + re.escape(noun) + r"\b", caption, flags=re.IGNORECASE)
    if found:
        return f"{caption[: found.start()]}{token} {caption[found.start() :]}"
    return f"{instance}, {caption}"


def _last_tenth(values: list) -> list:
    """The last 10% of ``values`` (at least one): what a run's recent loss averages."""
    return values[-max(1, len(values) // 10) :]


def _to_cpu(state: Any) -> Any:
    """A copy of an optimiser state with every tensor on the CPU (it waits off the GPU)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state


def mix_schedule(
    positives: int, negatives: int, steps: int, batch_size: int, ratio: float, seed: int
) -> list[list[int]]:
    """Sample indices of every step's batch. Indices ``0..positives-1`` are positives, the
    rest negatives. Every ``ratio + 1``-th slot is a negative, so batches hold ``ratio``
    positives per negative overall; each pool is cycled in reshuffled epochs."""
    if positives <= 0:
        raise ValueError("mix_schedule: a product needs at least one positive sample")
    rng = random.Random(seed)

    def cycle(indices: list[int]):
        while True:
            order = list(indices)
            rng.shuffle(order)
            yield from order

    pos = cycle(list(range(positives)))
    neg = cycle(list(range(positives, positives + negatives))) if negatives else None
    period = ratio + 1.0
    slots = []
    for k in range(steps * batch_size):
        is_negative = neg is not None and math.floor((k + 1) / period) > math.floor(k / period)
        slots.append(next(neg) if is_negative else next(pos))
    return [slots[i : i + batch_size] for i in range(0, len(slots), batch_size)]


def prior_schedule(
    first: int, count: int, steps: int, batch_size: int, seed: int
) -> list[list[int]]:
    """Class-sample indices ``first..first+count-1`` for every step's batch (``batch_size``
    of them a step, as DreamBooth pairs each instance batch with a class batch), cycled in
    reshuffled epochs; no class samples: empty batches."""
    if not count:
        return [[] for _ in range(steps)]
    batches = mix_schedule(count, 0, steps, batch_size, 1.0, seed)
    return [[first + i for i in b] for b in batches]


def prior_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    prior: np.ndarray,
    weight: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of a batch: the MSE over it, or with class samples (``prior``,
    a bool per sample) in it, DreamBooth's MSE of the instance samples + ``weight`` * MSE
    of the class samples. ``keep`` ((n, 1, h, w) bool, masked DreamBooth) limits the
    instance samples' MSE to the kept latent pixels (``masked_mse``); class samples always
    have the plain MSE."""
    pred, target = pred.float(), target.float()

    def instance_mse(p: torch.Tensor, t: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        return F.mse_loss(p, t) if k is None else masked_mse(p, t, k)

    if not prior.any():
        return instance_mse(pred, target, keep)
    mask = torch.as_tensor(prior, device=pred.device)
    instance = instance_mse(pred[~mask], target[~mask], None if keep is None else keep[~mask])
    return instance + weight * F.mse_loss(pred[mask], target[mask])


def masked_mse(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE over the elements where ``keep`` (bool, broadcast over ``pred``: (n, 1, h, w)
    for latents) is true; the others get exactly zero gradient (masked DreamBooth).

    The mean is over the kept elements of the whole batch, not over all of them: with every
    element kept it is the plain MSE exactly, so the learning rate and the prior weight keep
    their meaning whatever the products' sizes, and each kept element weighs the same (a
    sample counts by how much product it shows, so a small mask's few pixels cannot weigh
    as much as a whole image's). No element kept: an error, not a NaN loss."""
    keep = keep.to(device=pred.device, dtype=torch.bool).expand_as(pred)
    if not keep.any():
        raise ValueError("masked_mse: keep is empty; give at least one kept element")
    return F.mse_loss(pred[keep].float(), target[keep].float())


def latent_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A square pixel mask (R x R, nonzero: product) at latent resolution (``size`` x
    ``size``, R a multiple of it): a latent pixel is product when any pixel of its block is
    (the VAE's latent pixel encodes its whole block, the product's edge included)."""
    side = mask.shape[0]
    if mask.ndim != 2 or mask.shape[1] != side or side % size:
        raise ValueError(
            f"latent_mask: mask is {mask.shape}; give a square mask whose side is a multiple "
            f"of the latent size {size}"
        )
    block = side // size
    return (mask != 0).reshape(size, block, size, block).any(axis=(1, 3))


def _square_crop(
    h: int, w: int, resolution: int
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The shorter side resized to ``resolution``, a centred square of it ->
    ((new w, new h), crop box (left, top, right, bottom) in resized pixels)."""
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return (nw, nh), (left, top, left + resolution, top + resolution)


def preprocess(
    rgb: np.ndarray, resolution: int
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution`` and centre-crop a square ->
    (CHW float32 in [-1, 1], original (h, w), crop corner (top, left) in resized pixels)."""
    h, w = rgb.shape[:2]
    size, crop = _square_crop(h, w, resolution)
    img = Image.fromarray(rgb).resize(size, Image.BICUBIC).crop(crop)
    arr = np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return arr, (h, w), (crop[1], crop[0])


def preprocess_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A product mask through ``preprocess``'s resize and crop (nearest: it stays binary)
    -> (resolution, resolution) bool, aligned with the image's pixels."""
    size, crop = _square_crop(*mask.shape[:2], resolution)
    binary = Image.fromarray((mask != 0).astype(np.uint8) * 255)
    return np.asarray(binary.resize(size, Image.NEAREST).crop(crop)) >= 128


# --------------------------------------------------------------------------- trainer


class LoraTrainer:
    """Load the generator once; train one LoRA per product with ``train``."""

    role = "generator"

    def __init__(
        self,
        model: ModelSpec,
        options: TrainConfig,
        device: str | None = None,
        pipeline: Any | None = None,
    ):
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        self.options = opts = options
        if pipeline is None:  # the frozen base in the training dtype, not the role's
            self.loaded = load_model(model.with_spec(dtype=opts.dtype), device=device)
            pipeline = self.loaded.model
        self.pipe = pipe = pipeline
        pipe.set_progress_bar_config(disable=True)
        self.unet, self.vae = pipe.unet, pipe.vae
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        for module in (
            self.unet,
            self.vae,
            pipe.text_encoder,
            getattr(pipe, "text_encoder_2", None),
        ):
            if module is not None:
                module.requires_grad_(False)
        if self.device.type == "cuda" and opts.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.rank = opts.rank
        self.scale = (opts.alpha or opts.rank) / opts.rank
        self.unet.add_adapter(
            LoraConfig(
                r=opts.rank,
                lora_alpha=opts.alpha or opts.rank,
                lora_dropout=opts.dropout,
                init_lora_weights="gaussian",
                target_modules=list(opts.target_modules),
            ),
            adapter_name=ADAPTER,
        )
        self.lora_params = {name: p for name, p in self.unet.named_parameters() if "lora_" in name}
        if not self.lora_params:
            raise ValueError(
                f"train.target_modules={opts.target_modules} matched no layer of the denoiser"
            )
        for p in self.lora_params.values():  # the LoRA and its optimiser state stay float32
            p.data = p.data.float()
            p.requires_grad_(True)
        # the LoRA branch's matmuls in the base's dtype (train.lora_compute), else float32
        self.lora_dtype = (
            self.dtype
            if opts.lora_compute == "base" and self.dtype in (torch.bfloat16, torch.float16)
            else torch.float32
        )
        if self.lora_dtype != torch.float32:
            compute_lora_in(self.unet, self.lora_dtype)
        if opts.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if self.device.type == "cuda":  # NHWC convolutions: the layout cuDNN's fast kernels use
            self.unet.to(memory_format=torch.channels_last)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.unet.eval()

    # ------------------------------------------------------------------ per product

    def reset(self, seed: int) -> None:
        """Re-initialise the LoRA for a new product (gaussian A, zero B), from ``seed`` only."""
        gen = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            for name, p in self.lora_params.items():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) / self.rank)
                else:
                    p.zero_()

    @torch.no_grad()
    def prepare(self, samples: list[TrainingSample]) -> ProductCache:
        """Decode and crop a product's images; encode latents and text once when cached."""
        start = time.perf_counter()
        opts, res = self.options, self.options.resolution
        arrays, time_ids = [], []
        for s in samples:
            arr, (h, w), (top, left) = preprocess(decode_rgb(s.image), res)
            arrays.append(arr)
            time_ids.append([h, w, top, left, res, res])
        pixels = torch.from_numpy(np.stack(arrays))
        cache = ProductCache(
            n=len(samples),
            negative=np.array([s.negative for s in samples], bool),
            prior=np.array([s.prior for s in samples], bool),
            prompts=[s.prompt for s in samples],
            time_ids=torch.tensor(time_ids, dtype=self.dtype, device=self.device)
            if self.sdxl
            else None,
        )
        if opts.masked_loss:
            cache.keep, cache.masked = self._keep(samples)
        if opts.cache_latents:
            cache.latent_mean, cache.latent_std = self._encode_images(pixels)
        else:
            cache.pixels = pixels
        if opts.cache_text_embeddings:
            cache.prompt_embeds, cache.pooled_embeds = self._encode_text(cache.prompts)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        cache.seconds = time.perf_counter() - start
        return cache

    def _keep(self, samples: list[TrainingSample]) -> tuple[torch.Tensor, int]:
        """The latent pixels each sample is trained on (masked DreamBooth) and how many
        samples are masked: a positive's product pixels; everything for negatives, class
        images, samples without a mask and a mask that the centre crop leaves empty."""
        from ray_app.images import decode_mask

        size = self.options.resolution // self.pipe.vae_scale_factor
        keep = np.ones((len(samples), 1, size, size), bool)
        masked = 0
        for i, s in enumerate(samples):
            if s.mask is None or s.negative or s.prior:
                continue
            product = latent_mask(
                preprocess_mask(decode_mask(s.mask), self.options.resolution), size
            )
            if product.any():
                keep[i, 0], masked = product, masked + 1
        return torch.from_numpy(keep).to(self.device), masked

    def _encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:  # the SDXL VAE overflows in float16
            vae.to(torch.float32)
        means, stds = [], []
        for chunk in pixels.split(max(1, self.options.batch_size)):
            dist = vae.encode(chunk.to(self.device, vae.dtype)).latent_dist
            means.append(dist.mean.to(self.dtype))
            stds.append(dist.std.to(self.dtype))
        if upcast:
            vae.to(torch.float16)
        return torch.cat(means), torch.cat(stds)

    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            return embeds.to(self.dtype), pooled.to(self.dtype)
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return embeds.to(self.dtype), None

    def _latents(self, cache: ProductCache, idx: list[int], gen: torch.Generator) -> torch.Tensor:
        cfg = self.vae.config
        if cache.latent_mean is not None:
            mean, std = cache.latent_mean[idx], cache.latent_std[idx]
            sample = mean + std * torch.randn(
                mean.shape, generator=gen, device=self.device, dtype=mean.dtype
            )
        else:
            with torch.no_grad():
                mean, std = self._encode_images(cache.pixels[idx])
                sample = mean + std * torch.randn(
                    mean.shape, generator=gen, device=self.device, dtype=mean.dtype
                )
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (sample - shift) * cfg.scaling_factor

    def _text(
        self, cache: ProductCache, idx: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cache.prompt_embeds is not None:
            pooled = cache.pooled_embeds[idx] if cache.pooled_embeds is not None else None
            return cache.prompt_embeds[idx], pooled
        with torch.no_grad():
            return self._encode_text([cache.prompts[i] for i in idx])

    def _conditioning(
        self, cache: ProductCache, idx: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(text embeddings, pooled embeddings, time ids) of samples ``idx``; the last two
        are None for one-text-encoder pipelines."""
        embeds, pooled = self._text(cache, idx)
        return embeds, pooled, cache.time_ids[idx] if self.sdxl else None

    def _predict(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        kwargs: dict[str, Any] = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet(noisy, timesteps, embeds, **kwargs).sample

    def _target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {kind!r} of the generator's scheduler")

    def _loss(
        self,
        cache: ProductCache,
        idx: list[int],
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        pred = self._predict(latents, noise, timesteps, *self._conditioning(cache, idx))
        target = self._target(latents, noise, timesteps)
        keep = None if cache.keep is None else cache.keep[idx]
        weight = self.options.prior_preservation.weight
        return prior_loss(pred, target, cache.prior[idx], weight, keep)

    @torch.no_grad()
    def eval_loss(self, cache: ProductCache, seed: int) -> float:
        """Loss on a fixed batch (the first ``eval_samples`` samples, fixed noise, evenly
        spread timesteps): comparable before and after training. Class images are not
        the product's: never in it. With ``train.masked_loss`` it is the masked loss."""
        idx = [i for i in range(cache.n) if not cache.prior[i]][: self.options.eval_samples]
        gen = torch.Generator(self.device).manual_seed(seed)
        latents = self._latents(cache, idx, gen)
        noise = torch.randn(latents.shape, generator=gen, device=self.device, dtype=latents.dtype)
        total = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.tensor(
            [int(total * (i + 0.5) / len(idx)) for i in range(len(idx))], device=self.device
        )
        return float(self._loss(cache, idx, latents, noise, timesteps))

    # ------------------------------------------------------------------ training

    def _begin(self, samples: list[TrainingSample], seed: int, steps: int) -> _Run:
        """Everything before the first step of one product: reset the LoRA from ``seed``,
        cache the samples, draw the batch schedule, measure the loss before training."""
        opts = self.options
        start = time.perf_counter()
        # positives, then negatives, then class images: the schedules index in this order
        order = sorted(range(len(samples)), key=lambda i: (samples[i].prior, samples[i].negative))
        samples = [samples[i] for i in order]
        n_prior = sum(s.prior for s in samples)
        n_pos = sum(not s.negative and not s.prior for s in samples)
        n_neg = len(samples) - n_prior - n_pos
        self.reset(seed)
        cache = self.prepare(samples)
        schedule = mix_schedule(n_pos, n_neg, steps, opts.batch_size, opts.negative_ratio, seed)
        classes = prior_schedule(n_pos + n_neg, n_prior, steps, opts.batch_size, seed + 2)
        schedule = [b + c for b, c in zip(schedule, classes, strict=True)]
        eval_start = self.eval_loss(cache, seed + 1)
        return _Run(
            seed=seed,
            cache=cache,
            schedule=schedule,
            positives=n_pos,
            negatives=n_neg,
            eval_start=eval_start,
            gen=torch.Generator(self.device).manual_seed(seed),
            setup_seconds=time.perf_counter() - start,
        )

    def _optimizer(
        self, params: list[torch.Tensor], steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW and the warm-up + constant/cosine schedule over ``steps`` steps."""
        opts = self.options
        # One fused kernel for all LoRA tensors on CUDA instead of a few launches per tensor
        # (a rank-64 SDXL LoRA has ~1,400 of them).
        fused = all(p.is_cuda for p in params)
        optimizer = torch.optim.AdamW(
            params, lr=opts.learning_rate, weight_decay=opts.weight_decay, fused=fused or None
        )
        warmup = opts.warmup_steps

        def lr_lambda(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if opts.lr_scheduler == "cosine":
                progress = (step - warmup) / max(1, steps - warmup)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            return 1.0

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    def _draw(self, run: _Run, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents, noise and timesteps of one step's batch, from the product's generator."""
        gen = run.gen
        latents = self._latents(run.cache, idx, gen)
        noise = torch.randn(latents.shape, generator=gen, device=self.device, dtype=latents.dtype)
        total = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, total, (len(idx),), generator=gen, device=self.device)
        return latents, noise, timesteps

    def _finish(
        self, run: _Run, losses: list[torch.Tensor], train_seconds: float, **extra: Any
    ) -> TrainResult:
        """The result of the product whose weights are in the live LoRA now."""
        values = torch.stack(losses).float().cpu().tolist()  # one device sync, not one a step
        eval_end = self.eval_loss(run.cache, run.seed + 1)
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"training loss is not finite: {values[-5:]}")
        return TrainResult(
            state_dict=self.lora_state_dict(),
            losses=values,
            eval_loss_start=run.eval_start,
            eval_loss_end=eval_end,
            steps=len(values),
            batch_size=self.options.batch_size,
            positives=run.positives,
            negatives=run.negatives,
            setup_seconds=run.setup_seconds,
            train_seconds=train_seconds,
            extra={"cache_seconds": run.cache.seconds, **extra},
        )

    def train(
        self, samples: list[TrainingSample], seed: int, steps: int | None = None
    ) -> TrainResult:
        """Train the LoRA on one product from scratch (reset from ``seed``, cache, steps).
        Positives and negatives are told apart by ``TrainingSample.negative``; the result
        depends only on the samples, ``seed`` and the config."""
        paused = self.start(samples, seed, steps)
        self.advance(paused, paused.steps, pause=False)
        return self._finish(paused.run, paused.losses, paused.train_seconds)

    def start(
        self, samples: list[TrainingSample], seed: int, steps: int | None = None
    ) -> PausedRun:
        """A training of ``steps`` steps set up and paused before its first step."""
        run = self._begin(samples, seed, steps or self.options.steps)
        return PausedRun(run, len(run.schedule), self._lora_copy())

    def advance(self, paused: PausedRun, until: int, pause: bool = True) -> None:
        """Run ``paused`` on to step ``until`` (at most its length), with its own weights,
        optimiser state and random draws, so that a run advanced in pieces, with other runs
        in between, ends exactly as one run straight through. The live LoRA holds its
        weights afterwards; ``pause`` also keeps them and the optimiser with the run."""
        with torch.no_grad():
            for name, p in self.lora_params.items():
                p.copy_(paused.lora[name].to(p.device))
        params = list(self.lora_params.values())
        optimizer, scheduler = self._optimizer(params, paused.steps)
        if paused.optimizer is not None:
            optimizer.load_state_dict(paused.optimizer)
            scheduler.load_state_dict(paused.scheduler)
        run, start = paused.run, time.perf_counter()
        self.unet.train()
        try:
            for idx in run.schedule[paused.done : until]:
                loss = self._loss(run.cache, idx, *self._draw(run, idx))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.options.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                paused.losses.append(loss.detach())
        finally:
            self.unet.eval()
        paused.done = len(paused.losses)
        paused.train_seconds += time.perf_counter() - start
        if pause:
            paused.lora = self._lora_copy()
            paused.optimizer = _to_cpu(optimizer.state_dict())
            paused.scheduler = scheduler.state_dict()

    def _lora_copy(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", copy=True) for name, p in self.lora_params.items()}

    def train_many(
        self, products: list[tuple[list[TrainingSample], int]], steps: int | None = None
    ) -> list[TrainResult]:
        """Train K products at once; ``products`` is K (samples, seed) pairs. Every step is
        one forward/backward of the shared base over the K batches (product-major), each
        sample's LoRA delta from its own product's weights (``StackedLora``). The results
        are those of K ``train`` calls within float tolerance: the same per-product draws,
        loss = sum of the per-product mean losses (each product gets its own gradient),
        gradient clipping per product, AdamW (elementwise) over the stacked weights, the
        same learning-rate schedule. Each result's ``train_seconds`` is the group's over K.
        Raises ``FloatingPointError`` when any product's loss is not finite."""
        from actors.multi_lora import StackedLora

        opts = self.options
        steps = steps or opts.steps
        if len(products) == 1:
            return [self.train(*products[0], steps=steps)]
        if opts.dropout:
            raise ValueError(
                f"train.dropout={opts.dropout} with several products per step: the stacked "
                "LoRA has no dropout; set train.dropout=0 or train.products_per_step=1"
            )
        K = len(products)
        stack = StackedLora(self.unet, ADAPTER, K, compute_dtype=self.lora_dtype)
        runs = []
        for k, (samples, seed) in enumerate(products):
            runs.append(self._begin(samples, seed, steps))  # resets the peft LoRA from seed
            stack.store(k)
        optimizer, scheduler = self._optimizer(list(stack.parameters()), steps)
        losses: list[list[torch.Tensor]] = [[] for _ in range(K)]
        start = time.perf_counter()
        self.unet.train()
        try:
            with stack.active():
                for step in range(steps):
                    idx = [run.schedule[step] for run in runs]
                    draws = [self._draw(r, i) for r, i in zip(runs, idx, strict=True)]
                    latents, noise, timesteps = (torch.cat(t) for t in zip(*draws, strict=True))
                    cond = [self._conditioning(r.cache, i) for r, i in zip(runs, idx, strict=True)]
                    embeds, pooled, time_ids = (
                        None if t[0] is None else torch.cat(t) for t in zip(*cond, strict=True)
                    )
                    pred = self._predict(latents, noise, timesteps, embeds, pooled, time_ids)
                    target = self._target(latents, noise, timesteps)
                    weight = opts.prior_preservation.weight
                    per_product = [
                        prior_loss(
                            p,
                            t,
                            r.cache.prior[i],
                            weight,
                            None if r.cache.keep is None else r.cache.keep[i],
                        )
                        for p, t, r, i in zip(
                            pred.chunk(K), target.chunk(K), runs, idx, strict=True
                        )
                    ]
                    torch.stack(per_product).sum().backward()
                    stack.clip_grad_norms(opts.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    for k, loss in enumerate(per_product):
                        losses[k].append(loss.detach())
        finally:
            self.unet.eval()
        seconds = time.perf_counter() - start
        results = []
        for k, run in enumerate(runs):
            stack.load(k)
            results.append(self._finish(run, losses[k], seconds / K, products_per_step=K))
        return results

    # ------------------------------------------------------------------ weights

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA in diffusers' format, with alpha/rank folded into the up weights so that
        every loader (with or without adapter metadata) applies the trained scale."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        dtype = _SAVE_DTYPES[self.options.save_dtype]
        raw = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER)
        out = {}
        for key, value in raw.items():
            value = value.detach().float()
            if "lora_B" in key and self.scale != 1.0:
                value = value * self.scale
            # copy: for float32 on CPU, .float()/.to() return the live parameter itself
            out[key] = value.to("cpu", dtype, copy=True).contiguous()
        return convert_state_dict_to_diffusers(out)

    def adapter_bytes(self, state_dict: dict[str, torch.Tensor]) -> bytes:
        """The weights file (``AdapterLayout.WEIGHTS``) as the pipeline class itself writes it."""
        with tempfile.TemporaryDirectory() as tmp:
            type(self.pipe).save_lora_weights(
                tmp, unet_lora_layers=state_dict, weight_name=AdapterLayout.WEIGHTS
            )
            return (Path(tmp) / AdapterLayout.WEIGHTS).read_bytes()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Put weights from ``lora_state_dict`` back into the live LoRA (token sweeps)."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        peft_sd = convert_unet_state_dict_to_peft(dict(state_dict))
        with torch.no_grad():
            for name, p in self.lora_params.items():
                key = name.replace(f".{ADAPTER}", "")
                value = peft_sd[key].float()
                if "lora_B" in key and self.scale != 1.0:
                    value = value / self.scale
                p.copy_(value.to(p.device))

    # ------------------------------------------------------------------ validation images

    def base_images(
        self, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float
    ) -> list[np.ndarray]:
        """Images of the base model alone, whatever LoRA is live (the adapter is switched
        off around the call), at the training resolution: DreamBooth's class images."""
        res = self.options.resolution
        self.unet.disable_adapters()
        try:
            return self.generate(prompts, seeds, res, res, steps, guidance_scale)
        finally:
            self.unet.enable_adapters()

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        negative_prompt: str | None = None,
    ) -> list[np.ndarray]:
        """Images from the pipeline with the current LoRA active (uint8 HWC). No negative
        prompt (None or ""): SDXL's zeroed unconditional embedding (see
        ``actors.generator.split_negatives``)."""
        out = self.pipe(
            prompt=prompts,
            negative_prompt=[negative_prompt] * len(prompts)
            if has_negative(negative_prompt)
            else None,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        ).images
        return list((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
