"""CLIP embeddings (role ``clip``): image, product-crop and text embeddings for CLIP-I,
segmented CLIP-I, CLIP-T and zero-shot product typing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ray_app.batching import batch_len, column, decode_column, embed_present
from ray_app.config import ModelSpec
from ray_app.images import crop_by_mask, decode_mask
from ray_app.metrics import cosine_matrix, l2_normalize
from ray_app.models import load_model


def zero_shot(image_embeddings: np.ndarray, label_embeddings: np.ndarray) -> tuple[int, float]:
    """Index of the label whose text embedding best matches the mean image embedding, and
    its margin over the runner-up (a confidence the caller can threshold)."""
    mean = l2_normalize(l2_normalize(image_embeddings).mean(axis=0, keepdims=True))
    sims = cosine_matrix(mean, label_embeddings)[0]
    order = np.argsort(-sims)
    margin = float(sims[order[0]] - sims[order[1]]) if len(order) > 1 else 1.0
    return int(order[0]), margin


class ClipEmbedder:
    """Batch in: ``image`` (encoded bytes), optional ``mask`` (PNG bytes or None) and
    ``text`` (str or None). Batch out: L2-normalised ``image_embedding``, ``crop_embedding``
    (NaN without a mask), ``text_embedding`` (NaN without text) and ``error``."""

    role = "clip"

    def __init__(self, model: ModelSpec, device: str | None = None):
        self.loaded = load_model(model, device=device)
        self.batch_size = model.batch_size
        self.dim = self.embed_texts(["a photo"]).shape[1]

    @torch.inference_mode()
    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        m = self.loaded
        pixels = torch.stack([m.processor(Image.fromarray(img)) for img in images])
        feats = m.model.encode_image(pixels.to(m.device, m.dtype))
        return l2_normalize(feats.float().cpu().numpy())

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        m = self.loaded
        feats = m.model.encode_text(m.tokenizer(list(texts)).to(m.device))
        return l2_normalize(feats.float().cpu().numpy())

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        images = column(batch, "image")
        masks = column(batch, "mask", n)
        texts = column(batch, "text", n)
        errors: list[str | None] = [None] * n
        rgbs = decode_column(images, errors, self.role)
        crops = [
            crop_by_mask(rgb, decode_mask(mask)) if rgb is not None and mask is not None else None
            for rgb, mask in zip(rgbs, masks, strict=True)
        ]

        def embed(items, fn):
            return embed_present(items, self.batch_size, fn, self.dim, errors, self.role)

        return {
            "image_embedding": embed(rgbs, self.embed_images),
            "crop_embedding": embed(crops, self.embed_images),
            "text_embedding": embed([t or None for t in texts], self.embed_texts),
            "error": np.array(errors, dtype=object),
        }
