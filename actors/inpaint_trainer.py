"""Boundary-weighted LoRA fine-tuning of the inpainter (role ``inpainter``; retrieval-assisted
staging, arXiv 2307.15326, eq. 1: the weighted boundary loss).

`restage stage` fills the gaps a staged product leaves in a retrieved scene; seams show
where the fill meets the kept scene. ``InpaintTrainer`` loads the inpainting pipeline once
(a 9-channel denoiser: noisy latents + mask + masked-image latents, as diffusers' SD and
SDXL inpainting pipelines), adds one peft LoRA to it, and trains it on (scene, hole) pairs:
the holes are product-shaped (another scene's product mask, fitted where this scene's
product stands or placed in its lower half, grown a little), the target is the scene
itself. With ``weighting`` on, the per-latent-pixel denoising MSE is multiplied by
``ray_app.boundary_weights.boundary_weights`` (peak on the band around the hole's edge,
mean 1); off, it is the plain mean MSE.

The LoRA machinery is the generator's trainer's (``actors.lora_trainer.LoraTrainer``: the
peft adapter and its seeded reset, VAE and text encoding, the prediction target, AdamW and
its schedule, the diffusers-format weights), driven here with the inpainting UNet's input.
``train_inpainter`` is the job: holes, split, training, the LoRA folder and its JSON.
The folder loads into ``actors.inpainter.Inpainter(..., lora=URI)``. No ``ray`` here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from actors.lora_trainer import LoraTrainer, _last_tenth, mix_schedule
from ray_app import storage
from ray_app.boundary_weights import boundary_weights
from ray_app.config import InpaintTrainConfig, ModelSpec, TrainConfig
from ray_app.images import dilate, mask_bbox
from ray_app.staging import Box, fit, target
from ray_app.storage import AdapterLayout

INFO = "inpaint_lora.json"  # beside AdapterLayout.WEIGHTS in the output folder
# Settings fixed when the LoRA is added: a loaded trainer cannot change them per run.
_STRUCTURAL = ("rank", "target_modules", "dtype", "gradient_checkpointing")


# --------------------------------------------------------------------------- data


def square_scene(
    rgb: np.ndarray, mask: np.ndarray, resolution: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shorter side resized to ``resolution`` and a centred square cropped, the same for the
    scene and its product mask -> (uint8 R x R x 3, bool R x R)."""
    h, w = mask.shape
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    img = Image.fromarray(rgb).resize((nw, nh), Image.BICUBIC).crop(box)
    msk = Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST).crop(box)
    return np.asarray(img), np.asarray(msk) > 0


def _paste(shape: np.ndarray, box: Box, size: tuple[int, int]) -> np.ndarray:
    """``shape`` (a cropped mask) resized into ``box`` of an empty ``size`` (h, w) mask,
    clipped at the borders."""
    h, w = size
    out = np.zeros(size, bool)
    bw, bh = max(1, box.width), max(1, box.height)
    scaled = (
        np.asarray(Image.fromarray(shape.astype(np.uint8) * 255).resize((bw, bh), Image.NEAREST))
        > 0
    )
    x0, y0 = max(0, box.x0), max(0, box.y0)
    x1, y1 = min(w, box.x0 + bw), min(h, box.y0 + bh)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = scaled[y0 - box.y0 : y1 - box.y0, x0 - box.x0 : x1 - box.x0]
    return out


def product_hole(
    scene_mask: np.ndarray,
    donor_mask: np.ndarray,
    rng: np.random.Generator,
    random_placement: float,
    dilation: int,
) -> np.ndarray:
    """A product-shaped hole for a scene: ``donor_mask`` (another product's mask, any size)
    fitted where the scene's product stands (``ray_app.staging.fit``: aspect kept, bottom on
    its ground line), or, with probability ``random_placement`` or when the scene's product
    is not in view, scaled to 25-60% of the scene's shorter side and standing at a random
    spot of its lower half; then grown by ``dilation`` pixels. -> bool mask of the scene's
    size, never empty, never the whole image."""
    h, w = scene_mask.shape
    found = mask_bbox(donor_mask)
    if found is None:
        raise ValueError("product_hole: the donor's product mask is empty")
    x0, y0, x1, y1 = found
    shape = donor_mask[y0:y1, x0:x1] > 0
    donor = Box(x0, y0, x1, y1)
    random = rng.uniform() < random_placement  # drawn always: the stream does not fork
    if not random and scene_mask.any():
        box = fit(donor, target(scene_mask)).box
    else:
        longer = rng.uniform(0.25, 0.6) * min(h, w)
        scale = longer / max(donor.width, donor.height)
        bw, bh = max(1, round(donor.width * scale)), max(1, round(donor.height * scale))
        left = int(rng.integers(0, max(1, w - bw + 1)))
        bottom = int(rng.integers(h // 2 + bh // 2, h + 1)) if bh < h else h
        box = Box(left, max(0, bottom - bh), left + bw, bottom)
    hole = _paste(shape, box, (h, w))
    hole = dilate(hole.astype(np.uint8) * 255, dilation) > 0
    if not hole.any() or hole.all():  # degenerate fit: a centred square stands in
        hole = np.zeros((h, w), bool)
        hole[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    return hole


def product_holes(
    masks: list[np.ndarray], options: InpaintTrainConfig, seed: int
) -> list[np.ndarray]:
    """One hole per scene, shaped like ANOTHER scene's product (a random derangement: scene i
    never gets its own product's shape), all scenes at the same resolution."""
    n = len(masks)
    if n < 2:
        raise ValueError(f"scenes: {n} given; holes are other scenes' products, give at least 2")
    rng = np.random.default_rng([seed, 1])
    shift = 1 + int(rng.integers(0, n - 1))  # i -> perm[(pos(i) + shift) % n]: never itself
    perm = rng.permutation(n)
    donor = np.empty(n, int)
    donor[perm] = perm[(np.arange(n) + shift) % n]
    return [
        product_hole(masks[i], masks[donor[i]], rng, options.random_placement, options.dilation)
        for i in range(n)
    ]


def split_scenes(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): ``round(n * held_out)`` scenes held out (at
    least one when ``held_out`` > 0), chosen by ``seed``; at least one scene trains."""
    held = 0 if held_out == 0 else min(n - 1, max(1, round(n * held_out)))
    order = np.random.default_rng([seed, 2]).permutation(n)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The denoising loss: MSE per latent pixel (mean over channels), times ``weights``
    (N x h x w, the boundary map) when given, averaged. ``weights`` of all ones (peak 1)
    give exactly the plain MSE."""
    per_pixel = (pred.float() - target.float()).pow(2).mean(dim=1)
    if weights is None:
        return per_pixel.mean()
    return (per_pixel * weights).mean()


# --------------------------------------------------------------------------- trainer


@dataclass
class InpaintCache:
    """A set of (scene, hole) pairs encoded once: every step reads these tensors."""

    n: int
    holes: list[np.ndarray]  # bool R x R, image resolution
    latent_mean: torch.Tensor  # (n, C, h, w) of the whole scenes, unscaled
    latent_std: torch.Tensor
    masked_latents: torch.Tensor  # (n, C, h, w) of the scenes with the hole blanked, scaled
    masks: torch.Tensor  # (n, 1, h, w) the hole on the latent grid (1 = paint here)
    weights: torch.Tensor  # (n, h, w) boundary weights, mean 1 per scene


@dataclass
class InpaintTrainResult:
    """What one training produced: the LoRA weights and how it went."""

    state_dict: dict[str, torch.Tensor]  # diffusers format, CPU
    losses: list[float]  # the training loss of every step (weighted when weighting is on)
    steps: int
    seed: int
    weighting: bool
    train_seconds: float
    eval_start: dict[str, float] = field(default_factory=dict)  # mse, weighted_mse
    eval_end: dict[str, float] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last 10% of steps (at least one)."""
        return float(np.mean(_last_tenth(self.losses)))


def lora_options(options: InpaintTrainConfig) -> TrainConfig:
    """The generator trainer's settings that drive the shared LoRA machinery."""
    return TrainConfig(
        rank=options.rank,
        target_modules=list(options.target_modules),
        learning_rate=options.learning_rate,
        steps=options.steps,
        batch_size=options.batch_size,
        resolution=options.resolution,
        dtype=options.dtype,
        save_dtype=options.save_dtype,
        gradient_checkpointing=options.gradient_checkpointing,
        token_sweep=1,
    )


class InpaintTrainer:
    """Load the inpainter once; ``train`` a boundary-weighted LoRA on (scene, hole) pairs.
    ``pipeline`` stands in for the configured checkpoint (a benchmark's in-memory model)."""

    role = "inpainter"

    def __init__(
        self,
        model: ModelSpec,
        options: InpaintTrainConfig,
        device: str | None = None,
        pipeline: Any | None = None,
    ):
        from ray_app.models import load_model

        if pipeline is None:  # the frozen base in the training dtype, not the role's
            pipeline = load_model(model.with_spec(dtype=options.dtype), device=device).model
        channels = pipeline.unet.config.in_channels
        latent = pipeline.vae.config.latent_channels
        if channels != 2 * latent + 1:
            raise ValueError(
                f"inpainter.source: its denoiser takes {channels} input channels; training "
                f"needs an inpainting one ({2 * latent + 1}: noisy latents, mask, masked-image "
                "latents), e.g. diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
            )
        self.options = options
        self.lora = LoraTrainer(model, lora_options(options), pipeline=pipeline)
        self.pipe, self.unet, self.vae = pipeline, self.lora.unet, self.lora.vae
        self.device, self.dtype = self.lora.device, self.lora.dtype
        self._text: tuple[str, tuple] | None = None

    def configure(self, options: InpaintTrainConfig) -> None:
        """Use ``options`` for the next runs (a benchmark's weighted and unweighted runs on one
        loaded base); the LoRA's shape is fixed once added, so those keys must not change."""
        changed = [k for k in _STRUCTURAL if getattr(options, k) != getattr(self.options, k)]
        if changed:
            raise ValueError(
                f"InpaintTrainer.configure: {', '.join(changed)} differ from the loaded "
                "trainer's; they are fixed when the LoRA is added: make a new InpaintTrainer"
            )
        self.options = options
        self.lora.options = lora_options(options)

    # ------------------------------------------------------------------ encoding

    @torch.no_grad()
    def prepare(self, images: list[np.ndarray], holes: list[np.ndarray]) -> InpaintCache:
        """Encode the scenes (uint8 R x R x 3) and the scenes with their holes (bool R x R)
        blanked, as the inpainting pipeline blanks them (0 in [-1, 1])."""
        opts, res = self.options, self.options.resolution
        if len(images) != len(holes) or not images:
            raise ValueError(f"prepare: {len(images)} images and {len(holes)} holes; give pairs")
        for i, (img, hole) in enumerate(zip(images, holes, strict=True)):
            if img.shape != (res, res, 3) or hole.shape != (res, res):
                raise ValueError(
                    f"prepare: pair {i} is {img.shape} / {hole.shape}; resolution={res} wants "
                    f"({res}, {res}, 3) / ({res}, {res}): crop with square_scene"
                )
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        hole = torch.from_numpy(np.stack(holes)).float()[:, None]
        mean, std = self.lora._encode_images(pixels)
        masked_mean, _ = self.lora._encode_images(pixels * (hole < 0.5))
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        h, w = mean.shape[-2:]
        weights = np.stack(
            [boundary_weights(m, (h, w), opts.band, opts.peak) for m in holes]
        )  # computed whatever `weighting` says: the eval reports both losses
        return InpaintCache(
            n=len(images),
            holes=list(holes),
            latent_mean=mean,
            latent_std=std,
            masked_latents=(masked_mean - shift) * cfg.scaling_factor,
            masks=torch.nn.functional.interpolate(hole, size=(h, w)).to(self.device, self.dtype),
            weights=torch.from_numpy(weights).to(self.device),
        )

    def _conditioning(self, n: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The prompt's text embeddings for ``n`` samples and the SDXL added conditions
        (pooled embedding, size/crop time ids at the training resolution), encoded once."""
        prompt = self.options.prompt
        if self._text is None or self._text[0] != prompt:
            with torch.no_grad():
                embeds, pooled = self.lora._encode_text([prompt])
            time_ids = None
            if self.lora.sdxl:
                res = (self.options.resolution,) * 2
                pipe = self.pipe
                time_ids, _ = pipe._get_add_time_ids(
                    res, (0, 0), res, 6.0, 2.5, res, (0, 0), res,
                    dtype=self.dtype,
                    text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
                )  # fmt: skip
                time_ids = time_ids.to(self.device)
            self._text = (prompt, (embeds, pooled, time_ids))
        embeds, pooled, time_ids = self._text[1]
        kwargs: dict[str, Any] = {}
        if self.lora.sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled.expand(n, -1),
                "time_ids": time_ids.expand(n, -1),
            }
        return embeds.expand(n, -1, -1), kwargs

    def _draw(
        self, cache: InpaintCache, idx: list[int], gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (sampled from the VAE posterior), noise and timesteps of a batch."""
        mean, std = cache.latent_mean[idx], cache.latent_std[idx]
        sample = mean + std * torch.randn(
            mean.shape, generator=gen, device=self.device, dtype=mean.dtype
        )
        cfg = self.vae.config
        latents = (sample - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor
        noise = torch.randn(latents.shape, generator=gen, device=self.device, dtype=latents.dtype)
        total = self.lora.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, total, (len(idx),), generator=gen, device=self.device)
        return latents, noise, timesteps

    def _predict(
        self,
        cache: InpaintCache,
        idx: list[int],
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the denoiser's prediction, its target) for samples ``idx``: the inpainting UNet's
        input is the noisy latents, the hole on the latent grid and the masked-image latents."""
        noisy = self.lora.noise_scheduler.add_noise(latents, noise, timesteps)
        inputs = torch.cat([noisy, cache.masks[idx], cache.masked_latents[idx]], dim=1)
        embeds, kwargs = self._conditioning(len(idx))
        pred = self.unet(inputs, timesteps, embeds, **kwargs).sample
        return pred, self.lora._target(latents, noise, timesteps)

    def loss(
        self,
        cache: InpaintCache,
        idx: list[int],
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        weighted: bool | None = None,
    ) -> torch.Tensor:
        """The denoising loss of samples ``idx`` (``weighted``: the config's by default)."""
        weighted = self.options.weighting if weighted is None else weighted
        pred, target = self._predict(cache, idx, latents, noise, timesteps)
        return weighted_mse(pred, target, cache.weights[idx] if weighted else None)

    @torch.no_grad()
    def eval_loss(self, cache: InpaintCache, seed: int, samples: int = 8) -> dict[str, float]:
        """Plain and boundary-weighted MSE on a fixed batch (the first ``samples`` pairs, fixed
        noise, evenly spread timesteps): comparable before and after training, and between a
        weighted and an unweighted run."""
        idx = list(range(min(samples, cache.n)))
        gen = torch.Generator(self.device).manual_seed(seed)
        latents, noise, _ = self._draw(cache, idx, gen)
        total = self.lora.noise_scheduler.config.num_train_timesteps
        timesteps = torch.tensor(
            [int(total * (i + 0.5) / len(idx)) for i in range(len(idx))], device=self.device
        )
        pred, target = self._predict(cache, idx, latents, noise, timesteps)
        return {
            "mse": float(weighted_mse(pred, target)),
            "weighted_mse": float(weighted_mse(pred, target, cache.weights[idx])),
        }

    # ------------------------------------------------------------------ training

    def train(
        self, cache: InpaintCache, eval_cache: InpaintCache | None = None
    ) -> InpaintTrainResult:
        """Train the LoRA from scratch (re-initialised from the config's seed) on ``cache``;
        the result depends only on the pairs and the config. ``eval_cache`` (held-out pairs,
        else the training pairs) gives the loss before and after."""
        opts = self.options
        evaluate = eval_cache or cache
        self.lora.reset(opts.seed)
        eval_start = self.eval_loss(evaluate, opts.seed + 1)
        schedule = mix_schedule(cache.n, 0, opts.steps, opts.batch_size, 1.0, opts.seed)
        params = list(self.lora.lora_params.values())
        optimizer, scheduler = self.lora._optimizer(params, opts.steps)
        gen = torch.Generator(self.device).manual_seed(opts.seed)
        losses: list[torch.Tensor] = []
        start = time.perf_counter()
        self.unet.train()
        try:
            for idx in schedule:
                loss = self.loss(cache, idx, *self._draw(cache, idx, gen))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.lora.options.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
        finally:
            self.unet.eval()
        values = torch.stack(losses).float().cpu().tolist()
        seconds = time.perf_counter() - start
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"inpainter training loss is not finite: {values[-5:]}")
        return InpaintTrainResult(
            state_dict=self.lora.lora_state_dict(),
            losses=values,
            steps=len(values),
            seed=opts.seed,
            weighting=opts.weighting,
            train_seconds=seconds,
            eval_start=eval_start,
            eval_end=self.eval_loss(evaluate, opts.seed + 1),
        )

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Put a trained LoRA back into the live one (to paint with it)."""
        self.lora.load_state_dict(state_dict)

    def adapter_bytes(self, state_dict: dict[str, torch.Tensor]) -> bytes:
        """The weights file as the pipeline class writes it (``pipe.load_lora_weights``)."""
        return self.lora.adapter_bytes(state_dict)

    @torch.inference_mode()
    def paint(
        self,
        images: list[np.ndarray],
        holes: list[np.ndarray],
        seeds: list[int],
        steps: int,
        guidance_scale: float,
        lora: bool = True,
    ) -> list[np.ndarray]:
        """Inpaint ``holes`` with the live LoRA (``lora=False``: the base model alone), with
        the pipeline's own sampler and the training prompt -> uint8 images."""
        if not lora:
            self.unet.disable_adapters()
        try:
            out = self.pipe(
                prompt=[self.options.prompt] * len(images),
                image=[Image.fromarray(x) for x in images],
                mask_image=[Image.fromarray(h.astype(np.uint8) * 255) for h in holes],
                height=images[0].shape[0],
                width=images[0].shape[1],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                strength=0.99,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="np",
            ).images
        finally:
            if not lora:
                self.unet.enable_adapters()
        return list((np.clip(out, 0, 1) * 255).round().astype(np.uint8))


# --------------------------------------------------------------------------- the job


def check_scenes(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Every scene is (uint8 H x W x 3, bool H x W with some product in it)."""
    if len(scenes) < 2:
        raise ValueError(
            f"scenes: {len(scenes)} given; the holes are other scenes' products, give at least 2"
        )
    for i, (rgb, mask) in enumerate(scenes):
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"scenes[{i}]: image is {rgb.dtype} {rgb.shape}; give uint8 H x W x 3")
        if mask.shape != rgb.shape[:2]:
            raise ValueError(
                f"scenes[{i}]: mask is {mask.shape}, image {rgb.shape[:2]}; give the image's H x W"
            )
        if not np.asarray(mask).any():
            raise ValueError(
                f"scenes[{i}]: the product mask is empty; drop the scene or fix its mask"
            )


def prepare_scenes(
    scenes: list[tuple[np.ndarray, np.ndarray]], options: InpaintTrainConfig
) -> tuple[list[np.ndarray], list[np.ndarray], list[int], list[int]]:
    """The job's data: every scene cropped to the training resolution, its product-shaped
    hole, and the (training, held-out) split -> (images, holes, train idx, held-out idx)."""
    check_scenes(scenes)
    cropped = [square_scene(rgb, mask.astype(bool), options.resolution) for rgb, mask in scenes]
    images = [c[0] for c in cropped]
    holes = product_holes([c[1] for c in cropped], options, options.seed)
    train_idx, held_idx = split_scenes(len(scenes), options.held_out, options.seed)
    return images, holes, train_idx, held_idx


def train_inpainter(
    model: ModelSpec,
    train_cfg: InpaintTrainConfig,
    scenes: list[tuple[np.ndarray, np.ndarray]],
    out_uri: str,
    *,
    device: str | None = None,
    trainer: InpaintTrainer | None = None,
) -> dict[str, Any]:
    """Train the inpainter's boundary-weighted LoRA on catalog ``scenes`` (RGB uint8 H x W x 3,
    product mask bool H x W) and write it to the folder ``out_uri``: the weights
    (``AdapterLayout.WEIGHTS``, what ``pipe.load_lora_weights`` and ``Inpainter(lora=...)``
    read) and ``inpaint_lora.json`` (config, steps, losses, seed, base model). ``trainer``
    reuses a loaded base (its LoRA shape must match ``train_cfg``). -> the JSON's summary."""
    images, holes, train_idx, held_idx = prepare_scenes(scenes, train_cfg)
    if trainer is None:
        trainer = InpaintTrainer(model, train_cfg, device=device)
    else:
        trainer.configure(train_cfg)
    cache = trainer.prepare([images[i] for i in train_idx], [holes[i] for i in train_idx])
    held = (
        trainer.prepare([images[i] for i in held_idx], [holes[i] for i in held_idx])
        if held_idx
        else None
    )
    result = trainer.train(cache, held)
    out = storage.normalize_uri(out_uri)
    storage.write_bytes(AdapterLayout.weights_in(out), trainer.adapter_bytes(result.state_dict))
    spec = model.spec
    summary = {
        "base_model": spec.source + (f"@{spec.revision}" if spec.revision else ""),
        "config": train_cfg.model_dump(mode="json"),
        "seed": result.seed,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "first_loss": result.losses[0],
        "eval_on": "held_out" if held is not None else "train",
        "eval_start": result.eval_start,
        "eval_end": result.eval_end,
        "train_scenes": len(train_idx),
        "held_out_scenes": held_idx,
        "train_seconds": round(result.train_seconds, 3),
        "weights": AdapterLayout.WEIGHTS,
    }
    storage.write_json(storage.join(out, INFO), summary)
    return {**summary, "uri": out}
