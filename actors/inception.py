"""Inception features (role ``inception``) for FID and KID: the network torchmetrics and
torch-fidelity use (Inception-v3 pool3, 2048 features; a toy network in the tiny profile)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from ray_app.batching import batch_len, column, decode_column, map_chunks, object_array
from ray_app.config import ModelSpec
from ray_app.models import load_model


class InceptionFeatures:
    """Batch in: ``image`` (encoded bytes). Batch out: ``features`` (float32 vectors; None
    for a row that failed) and ``error``. Images go in at their own size, as uint8 (the
    network resizes them itself, as FID's reference implementation does), so a micro-batch
    holds images of one size."""

    role = "inception"

    def __init__(self, model: ModelSpec, device: str | None = None):
        self.loaded = load_model(model, device=device)
        self.batch_size = model.batch_size
        self.dim = int(self.loaded.model.num_features)

    @torch.inference_mode()
    def features(self, images: list[np.ndarray]) -> list[np.ndarray]:
        m = self.loaded
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(m.device)
        return list(m.model(pixels).float().cpu().numpy())

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        errors: list[str | None] = [None] * n
        rgbs = decode_column(column(batch, "image"), errors, self.role)
        out: list[np.ndarray | None] = [None] * n
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, rgb in enumerate(rgbs):
            if rgb is not None:
                by_size[rgb.shape].append(i)
        for rows in by_size.values():
            got = map_chunks([rgbs[i] for i in rows], self.batch_size, self.features)
            for i, (features, error) in zip(rows, got, strict=True):
                out[i] = features
                if error:
                    errors[i] = f"{self.role}: {error}"
        return {"features": object_array(out), "error": object_array(errors)}
