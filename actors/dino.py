"""DINO embeddings (role ``dino``): image and product-crop embeddings for DINO and
segmented DINO fidelity scores (the CLS token, as in DreamBooth's DINO metric)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ray_app.batching import batch_len, column, decode_column, embed_present
from ray_app.config import ModelSpec
from ray_app.images import crop_by_mask, decode_mask
from ray_app.metrics import l2_normalize
from ray_app.models import load_model


class DinoEmbedder:
    """Batch in: ``image`` (encoded bytes), optional ``mask`` (PNG bytes or None).
    Batch out: L2-normalised ``image_embedding``, ``crop_embedding`` (NaN without a mask),
    ``error``."""

    role = "dino"

    def __init__(self, model: ModelSpec, device: str | None = None):
        self.role = model.role  # the same class embeds with the `encoder` role
        self.loaded = load_model(model, device=device)
        self.batch_size = model.batch_size
        self.dim = int(self.loaded.model.config.hidden_size)

    @torch.inference_mode()
    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        m = self.loaded
        inputs = m.processor(images=[Image.fromarray(img) for img in images], return_tensors="pt")
        out = m.model(pixel_values=inputs["pixel_values"].to(m.device, m.dtype))
        # The CLS token after the final layer norm, as DreamBooth's DINO metric takes it.
        # Not pooler_output: DINOv2's equals it, but a ViT (DINO v1, role eval_dino) adds an
        # untrained dense+tanh pooler on top.
        return l2_normalize(out.last_hidden_state[:, 0].float().cpu().numpy())

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        errors: list[str | None] = [None] * n
        rgbs = decode_column(column(batch, "image"), errors, self.role)
        crops = [
            crop_by_mask(rgb, decode_mask(mask)) if rgb is not None and mask is not None else None
            for rgb, mask in zip(rgbs, column(batch, "mask", n), strict=True)
        ]

        def embed(items):
            return embed_present(
                items, self.batch_size, self.embed_images, self.dim, errors, self.role
            )

        return {
            "image_embedding": embed(rgbs),
            "crop_embedding": embed(crops),
            "error": np.array(errors, dtype=object),
        }
