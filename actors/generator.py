"""Text-to-image generation (role ``generator``): the base model that per-product LoRA
adapters are trained on. In augment it makes in-class negatives from product-free captions
(paper 2.1.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ray_app.batching import batch_len, column, map_chunks, object_array
from ray_app.config import RestageConfig
from ray_app.images import encode_png
from ray_app.models import load_role


@dataclass(frozen=True)
class GenerationOptions:
    width: int
    height: int
    steps: int
    guidance_scale: float
    negative_prompt: str = ""


class Generator:
    """Batch in: ``prompt`` (str), ``seed`` (int), optional ``negative_prompt``.
    Batch out: ``image`` (PNG bytes or None) and ``error``."""

    role = "generator"

    def __init__(
        self, config: RestageConfig, options: GenerationOptions, device: str | None = None
    ):
        self.loaded = load_role(config, self.role, device=device)
        self.batch_size = config.role(self.role).batch_size
        self.options = options

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], seeds: list[int], negatives: list[str]
    ) -> list[np.ndarray]:
        o = self.options
        out = self.loaded.model(
            prompt=prompts,
            negative_prompt=negatives,
            width=o.width,
            height=o.height,
            num_inference_steps=o.steps,
            guidance_scale=o.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        ).images
        return list((np.clip(out, 0, 1) * 255).round().astype(np.uint8))

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        items = [
            (str(p), int(s), neg or self.options.negative_prompt)
            for p, s, neg in zip(
                column(batch, "prompt"),
                column(batch, "seed"),
                column(batch, "negative_prompt", n),
                strict=True,
            )
        ]
        results = map_chunks(
            items,
            self.batch_size,
            lambda chunk: self.generate(*map(list, zip(*chunk, strict=True))),
        )
        return {
            "image": object_array(
                [encode_png(img) if img is not None else None for img, _ in results]
            ),
            "error": object_array([f"generator: {err}" if err else None for _, err in results]),
        }
