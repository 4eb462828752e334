"""Per-product image encoders (role ``encoder``; personalized representations, arXiv
2412.16156): a general encoder (DINOv2, CLIP) LoRA-tuned with InfoNCE on images of one
product, so that its features tell *this* product from everything else.

``EncoderTrainer`` loads the base encoder once, adds one peft LoRA to its attention
projections, and trains it per product: each step draws ``batch_size`` anchor-positive
pairs from the product's images (a fixed set of ``pairs`` pairs, reshuffled each epoch) and
``negatives_per_step`` negatives (other products, in-class images); every drawn image gets
a random square crop and flip. The feature is the CLS token ⊕ the mean of the final patch
tokens (``pooled_features``); the loss is InfoNCE with the positive against the negatives
(``info_nce``). ``reset(seed)`` starts the next product from the pretrained encoder, so one
loaded trainer serves a stream of products.

``embed`` gives the personalized features (or the pretrained ones, ``personal=False``, the
same encoder with the LoRA off); ``save`` writes a peft folder (``adapter_config.json``,
``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, folder)`` loads it) and
``encoder.json`` last, as its completion marker; ``load`` puts a saved LoRA back. No
``ray`` here.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict

from actors.lora_compute import compute_lora_in
from ray_app import storage
from ray_app.config import ModelSpec, PersonalizeConfig
from ray_app.models import load_model
from ray_app.storage import EncoderLayout, join

ENCODER_META_VERSION = 1
ADAPTER = "personal"
# The attention's query and value projections, by the names transformers gives them (the
# LoRA's default targets): DINOv2 before transformers 5 names them query/value, CLIP and
# DINOv2 since then q_proj/v_proj.
_TARGETS = (["q_proj", "v_proj"], ["query", "value"])
# Settings fixed when the LoRA is added: a loaded trainer cannot change them per product.
STRUCTURAL = ("rank", "alpha", "target_modules")


# --------------------------------------------------------------------------- the loss


def pooled_features(hidden: torch.Tensor, feature: str, prefix_tokens: int = 1) -> torch.Tensor:
    """The image feature from the final hidden states (n, tokens, d): the CLS token, with
    ``feature='cls_mean'`` concatenated with the mean of the patch tokens (the tokens after
    ``prefix_tokens``: CLS and any register tokens) -> (n, d) or (n, 2d)."""
    cls = hidden[:, 0]
    if feature == "cls":
        return cls
    return torch.cat([cls, hidden[:, prefix_tokens:].mean(dim=1)], dim=-1)


def info_nce(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE of (B, d) anchors with their (B, d) positives against (K, d) negatives shared
    by the batch: mean over anchors of -log(exp(s+ / t) / (exp(s+ / t) + sum exp(s- / t))),
    s the cosine similarity. Other anchors' positives are not negatives: they show the same
    product."""
    a = F.normalize(anchors, dim=-1)
    pos = (a * F.normalize(positives, dim=-1)).sum(-1, keepdim=True)
    neg = a @ F.normalize(negatives, dim=-1).T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long, device=a.device))


# --------------------------------------------------------------------------- images


def _square(rgb: np.ndarray, box: tuple[int, int, int], size: int, flip: bool) -> np.ndarray:
    x, y, side = box
    img = Image.fromarray(rgb).crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    out = np.asarray(img)
    return out[:, ::-1] if flip else out


def centred_box(h: int, w: int) -> tuple[int, int, int]:
    """(x, y, side): the centred square of the shorter side of an h x w image, the framing
    ``embed`` sees (masks compared with its features are cut alike)."""
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


def center_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """The centred square of the shorter side, resized to ``size``: what ``embed`` sees."""
    return _square(rgb, centred_box(*rgb.shape[:2]), size, False)


def square_box(
    h: int, w: int, scale: tuple[float, float], flip: bool, rng: np.random.Generator
) -> tuple[int, int, int, bool]:
    """A random square (x, y, side) covering a ``scale`` fraction of the largest centred
    square's area of an h x w image, and whether to flip it (half the time with ``flip``)."""
    side = max(1, round(min(h, w) * math.sqrt(rng.uniform(*scale))))
    x = int(rng.integers(0, w - side + 1))
    y = int(rng.integers(0, h - side + 1))
    return x, y, side, flip and bool(rng.integers(2))


def random_square(
    rgb: np.ndarray, size: int, scale: tuple[float, float], flip: bool, rng: np.random.Generator
) -> np.ndarray:
    """A ``square_box`` of ``rgb`` resized to ``size`` (PIL): training's augmentation (the
    same framing as ``center_square`` at scale 1, so train and test inputs match).
    ``EncoderTrainer.train`` draws the same boxes and resizes on its device."""
    x, y, side, flipped = square_box(*rgb.shape[:2], scale, flip, rng)
    return _square(rgb, (x, y, side), size, flipped)


def attention_targets(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s attention query and value projections (the paper's LoRA
    targets)."""
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    for targets in _TARGETS:
        if set(targets) <= names:
            return list(targets)
    raise ValueError(
        f"found no attention projections named {' or '.join('/'.join(t) for t in _TARGETS)} "
        "in the encoder; set personalize.target_modules to its query and value layers"
    )


def data_digest(positives: list[np.ndarray], negatives: list[np.ndarray]) -> str:
    """sha256 of the training images (pixels and shapes, positives then negatives): two
    encoders with one digest saw the same data."""
    h = hashlib.sha256()
    for name, images in (("positives", positives), ("negatives", negatives)):
        h.update(f"{name}:{len(images)}".encode())
        for img in images:
            h.update(str(img.shape).encode())
            h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- metadata


class EncoderMeta(BaseModel):
    """``encoder.json``: what a personalized encoder is and how it was trained. Written last
    (the product's completion marker) and read before the weights are applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = ENCODER_META_VERSION
    product_id: str
    base_source: str
    base_revision: str | None = None
    rank: int
    alpha: float
    target_modules: list[str]
    feature: str
    resolution: int
    data_digest: str
    positives: int
    negatives: int
    steps: int
    seed: int
    loss_first: float
    loss_last: float
    seconds: float

    @classmethod
    def read(cls, folder: str) -> EncoderMeta:
        path = EncoderLayout.metadata_in(folder)
        try:
            data = storage.read_json(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no encoder.json; train the encoder with `restage personalize`"
            ) from None
        if data.get("version", 0) > ENCODER_META_VERSION:
            raise ValueError(
                f"{path}: version {data['version']} is newer than this restage reads "
                f"({ENCODER_META_VERSION}); upgrade restage"
            )
        return cls.model_validate(data)


# --------------------------------------------------------------------------- the trainer


@dataclass
class EncoderResult:
    losses: list[float]
    seconds: float
    positives: int
    negatives: int
    digest: str
    seed: int

    @property
    def steps(self) -> int:
        return len(self.losses)


class EncoderTrainer:
    """Load the encoder once; train one LoRA per product with ``train``."""

    role = "encoder"

    def __init__(self, model: ModelSpec, config: PersonalizeConfig, device: str | None = None):
        from peft import LoraConfig, get_peft_model

        self.config = cfg = config
        self.source = model.spec.source
        self.revision = model.spec.revision
        self.loaded = load_model(model, device=device)
        base = self.loaded.model
        # A CLIP checkpoint loads as CLIPModel: its image tower is the encoder.
        vision = getattr(base, "vision_model", base)
        kind = getattr(base.config, "model_type", "")
        self.prefix_tokens = 1 + int(getattr(vision.config, "num_register_tokens", 0) or 0)
        self.device, self.dtype = self.loaded.device, self.loaded.dtype
        processor = self.loaded.processor
        crop = getattr(processor, "crop_size", None) or {}
        self.resolution = cfg.resolution or int(crop.get("height") or 224)
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        # DINOv2 interpolates its position embeddings to any input; CLIP must be asked to.
        self.forward_kwargs = {"interpolate_pos_encoding": True} if "clip" in kind else {}
        targets = cfg.target_modules or attention_targets(vision)
        vision.requires_grad_(False)
        self.lora_config = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha or cfg.rank,
            target_modules=list(targets),
            init_lora_weights="gaussian",
        )
        self.model = get_peft_model(vision, self.lora_config, adapter_name=ADAPTER)
        self.lora_params = {n: p for n, p in self.model.named_parameters() if "lora_" in n}
        if not self.lora_params:
            raise ValueError(
                f"personalize.target_modules={list(targets)} matched no layer of the encoder "
                f"({self.source}); name its attention projections"
            )
        for p in self.lora_params.values():  # the LoRA and its optimiser state stay float32
            p.data = p.data.float()
            p.requires_grad_(True)
        if cfg.lora_compute == "base" and self.dtype != torch.float32:
            compute_lora_in(self.model, self.dtype)
        self.model.eval()  # no dropout: the loss moves only with the LoRA
        self.target_modules = list(targets)

    # ------------------------------------------------------------------ features

    def _pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        return ((x - self.mean) / self.std).to(self.device, self.dtype)

    def upload(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """uint8 RGB images as (3, h, w) uint8 tensors on the trainer's device, once per
        product: views of the (h, w, 3) pixels, channels last, the layout torch's fast
        uint8 resize takes. A read-only array (a decoded photo's) is copied: a tensor must own
        writable memory."""
        return [
            torch.from_numpy(np.require(img, requirements=["C", "W"]))
            .permute(2, 0, 1)
            .to(self.device)
            for img in images
        ]

    def views(self, images: list[torch.Tensor], rng: np.random.Generator) -> torch.Tensor:
        """Training's augmentation of ``upload``-ed images, on their device: a ``square_box``
        of each, resized to ``resolution`` (bicubic, antialiased), flipped, normalised ->
        model input. On a GPU the host only draws the boxes (cropping and resizing 96
        images a step with PIL, then normalising them on the host, costs about as much as
        a ViT-B step: bench/personalize_data.py). On a CPU the resize runs on uint8, as
        PIL's does, which torch does fastest."""
        cfg, size, out = self.config, self.resolution, []
        for img in images:
            x, y, side, flipped = square_box(*img.shape[1:], cfg.crop_scale, cfg.flip, rng)
            crop = img[None, :, y : y + side, x : x + side]
            if crop.is_cuda:  # antialiased bicubic takes floating point there
                crop = crop.float()
            crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
            out.append(crop.flip(-1) if flipped else crop)
        pixels = torch.cat(out).contiguous().float().clamp_(0, 255)
        # (x / 255 - mean) / std in two in-place passes
        scale = (1 / (255 * self.std)).to(pixels.device)
        shift = (self.mean / self.std).to(pixels.device)
        return pixels.mul_(scale).sub_(shift).to(self.dtype)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels, **self.forward_kwargs)
        return pooled_features(
            out.last_hidden_state.float(), self.config.feature, self.prefix_tokens
        )

    @torch.inference_mode()
    def embed(
        self, images: list[np.ndarray], personal: bool = True, batch_size: int = 32
    ) -> np.ndarray:
        """L2-normalised features (n, d) of uint8 RGB images (centred square), with the
        current LoRA (``personal``) or without it (the pretrained encoder)."""
        from contextlib import nullcontext

        chunks = []
        with nullcontext() if personal else self.model.disable_adapter():
            for i in range(0, len(images), batch_size):
                part = [center_square(img, self.resolution) for img in images[i : i + batch_size]]
                chunks.append(F.normalize(self._features(self._pixels(part)), dim=-1).cpu())
        if not chunks:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat(chunks).numpy()

    @property
    def dim(self) -> int:
        width = int(self.model.config.hidden_size)
        return width if self.config.feature == "cls" else 2 * width

    # ------------------------------------------------------------------ per product

    def reset(self, seed: int) -> None:
        """Re-initialise the LoRA for a new product (gaussian A, zero B: the pretrained
        encoder), from ``seed`` only."""
        gen = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            for name, p in self.lora_params.items():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) / self.config.rank)
                else:
                    p.zero_()

    def train(
        self, positives: list[np.ndarray], negatives: list[np.ndarray], seed: int
    ) -> EncoderResult:
        """Train the LoRA from scratch on one product's ``positives`` (uint8 RGB, >= 2)
        against ``negatives`` (>= 1)."""
        cfg = self.config
        if len(positives) < 2:
            raise ValueError(
                f"{len(positives)} positive image(s): InfoNCE needs at least 2 (an anchor and "
                "its positive)"
            )
        if not negatives:
            raise ValueError("no negative images: give other products' or in-class images")
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        digest = data_digest(positives, negatives)
        if len(positives) > cfg.positives:
            positives = [positives[i] for i in rng.choice(len(positives), cfg.positives, False)]
        if len(negatives) > cfg.negatives:
            negatives = [negatives[i] for i in rng.choice(len(negatives), cfg.negatives, False)]
        self.reset(seed)
        # A fixed set of anchor-positive pairs (two different images), reshuffled each epoch.
        anchor = rng.integers(0, len(positives), cfg.pairs)
        other = (anchor + rng.integers(1, len(positives), cfg.pairs)) % len(positives)
        pairs = np.stack([anchor, other], axis=1)
        optimizer = torch.optim.AdamW(
            list(self.lora_params.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        k = min(cfg.negatives_per_step, len(negatives))
        pos, neg = self.upload(positives), self.upload(negatives)
        losses: list[torch.Tensor] = []  # on the device: no sync per step
        for _ in range(cfg.epochs):
            order = pairs[rng.permutation(len(pairs))]
            for b in range(0, len(order), cfg.batch_size):
                batch = order[b : b + cfg.batch_size]
                negs = rng.choice(len(negatives), k, replace=False)
                images = (
                    [pos[i] for i in batch[:, 0]]
                    + [pos[i] for i in batch[:, 1]]
                    + [neg[i] for i in negs]
                )
                feats = self._features(self.views(images, rng))
                n = len(batch)
                loss = info_nce(feats[:n], feats[n : 2 * n], feats[2 * n :], cfg.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
        return EncoderResult(
            losses=torch.stack(losses).float().cpu().tolist() if losses else [],
            seconds=time.perf_counter() - start,
            positives=len(positives),
            negatives=len(negatives),
            digest=digest,
            seed=seed,
        )

    # ------------------------------------------------------------------ files

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, adapter_name=ADAPTER)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def meta(self, product_id: str, result: EncoderResult) -> EncoderMeta:
        return EncoderMeta(
            product_id=product_id,
            base_source=self.source,
            base_revision=self.revision,
            rank=self.config.rank,
            alpha=float(self.config.alpha or self.config.rank),
            target_modules=self.target_modules,
            feature=self.config.feature,
            resolution=self.resolution,
            data_digest=result.digest,
            positives=result.positives,
            negatives=result.negatives,
            steps=result.steps,
            seed=result.seed,
            loss_first=_mean(result.losses[: max(1, len(result.losses) // 10)]),
            loss_last=_mean(result.losses[-max(1, len(result.losses) // 10) :]),
            seconds=round(result.seconds, 3),
        )

    def save(self, folder: str, meta: EncoderMeta) -> None:
        """The peft folder, then ``encoder.json`` (the marker) last."""
        from safetensors.torch import save

        peft_config = self.lora_config.to_dict()
        peft_config["base_model_name_or_path"] = self.source
        peft_config["revision"] = self.revision
        storage.write_bytes(
            join(folder, EncoderLayout.PEFT_CONFIG),
            json.dumps(peft_config, indent=2, default=sorted).encode(),  # sets -> lists
        )
        storage.write_bytes(
            join(folder, EncoderLayout.WEIGHTS), save(self.lora_state_dict(), {"format": "pt"})
        )
        storage.write_json(EncoderLayout.metadata_in(folder), meta.model_dump(mode="json"))

    def load(self, folder: str) -> EncoderMeta:
        """Put a saved LoRA into this encoder (after checking it was trained on this base
        with this trainer's structure); returns its metadata."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load

        meta = EncoderMeta.read(folder)
        mine = (self.config.rank, float(self.config.alpha or self.config.rank), self.target_modules)
        theirs = (meta.rank, meta.alpha, meta.target_modules)
        if meta.base_source != self.source or theirs != mine:
            raise ValueError(
                f"{folder}: encoder trained on {meta.base_source} with rank/alpha/targets "
                f"{theirs}, this encoder is {self.source} with {mine}; set encoder.source and "
                "personalize.rank/alpha/target_modules to the encoder's"
            )
        state = load(storage.read_bytes(join(folder, EncoderLayout.WEIGHTS)))
        result = set_peft_model_state_dict(self.model, state, adapter_name=ADAPTER)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"{folder}: the weights lack {len(missing)} LoRA tensors")
        return meta

    # ------------------------------------------------------------------ dense features

    @torch.inference_mode()
    def encode(
        self, images: list[np.ndarray], personal: bool = True, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass per batch -> ``embed``'s features (n, D) and the final patch
        tokens (n, h, w, d), float32, of uint8 RGB images (the centred square at
        ``resolution``), with the current LoRA (``personal``) or without it. The tokens are
        the hidden states after CLS and any register tokens, laid out on the patch grid
        (row-major, top-left first), not normalised."""
        from contextlib import nullcontext

        feats, chunks = [], []
        with nullcontext() if personal else self.model.disable_adapter():
            for i in range(0, len(images), batch_size):
                part = [center_square(img, self.resolution) for img in images[i : i + batch_size]]
                out = self.model(pixel_values=self._pixels(part), **self.forward_kwargs)
                hidden = out.last_hidden_state.float()
                pooled = pooled_features(hidden, self.config.feature, self.prefix_tokens)
                feats.append(F.normalize(pooled, dim=-1).cpu())
                chunks.append(hidden[:, self.prefix_tokens :].cpu())
        width = int(self.model.config.hidden_size)
        if not chunks:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, 0, 0, width), np.float32)
        tokens = torch.cat(chunks)
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(
                f"{tokens.shape[1]} patch tokens do not make a square grid; the encoder "
                f"({self.source}) is not a ViT over a square input"
            )
        return torch.cat(feats).numpy(), tokens.view(len(tokens), side, side, width).numpy()


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
