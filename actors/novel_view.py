"""Novel views (role ``novel_view``): an image-to-video diffusion model (Stable Video
Diffusion) turns one product photo into a short clip that moves around the product; chosen
frames become new views (paper 2.1.1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ray_app.batching import batch_len, column, decode_column, map_chunks, object_array
from ray_app.config import ModelSpec, ViewsConfig
from ray_app.images import encode_png
from ray_app.models import load_model


def letterbox(
    rgb: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fit ``rgb`` inside ``size`` = (width, height) keeping its aspect; the margins repeat
    the image's edge pixels (a flat colour would read as a wall). -> (canvas, placed box)."""
    width, height = size
    h, w = rgb.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.LANCZOS))
    x0, y0 = (width - nw) // 2, (height - nh) // 2
    canvas = np.pad(resized, ((y0, height - nh - y0), (x0, width - nw - x0), (0, 0)), mode="edge")
    return canvas, (x0, y0, x0 + nw, y0 + nh)


def unletterbox(
    frame: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]
) -> np.ndarray:
    """Crop a generated frame back to the placed box and resize to ``size`` = (width, height)."""
    x0, y0, x1, y1 = box
    return np.asarray(Image.fromarray(frame[y0:y1, x0:x1]).resize(size, Image.LANCZOS))


class NovelView:
    """Batch in: ``image`` (encoded bytes), ``seed`` (int). Batch out: ``frames`` (list of
    PNG bytes, one per configured frame index, the input's aspect at the generated
    resolution, never upsampled), ``frame_index`` (list of int) and ``error``."""

    role = "novel_view"

    def __init__(self, model: ModelSpec, options: ViewsConfig, device: str | None = None):
        self.loaded = load_model(model, device=device)
        self.batch_size = model.batch_size
        self.options = options

    @torch.inference_mode()
    def clips(self, images: list[np.ndarray], seeds: list[int]) -> list[list[np.ndarray]]:
        """Generate one clip per image -> the configured frames, cropped back to each image."""
        o, m = self.options, self.loaded
        size = (o.width, o.height)
        boxed = [letterbox(img, size) for img in images]
        out = m.model(
            [Image.fromarray(canvas) for canvas, _ in boxed],
            height=o.height,
            width=o.width,
            num_frames=o.num_frames,
            num_inference_steps=o.steps,
            motion_bucket_id=o.motion_bucket_id,
            noise_aug_strength=o.noise_aug_strength,
            fps=o.fps,
            decode_chunk_size=o.decode_chunk_size,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        ).frames
        frames = (np.clip(np.asarray(out), 0, 1) * 255).round().astype(np.uint8)  # (B, F, H, W, 3)
        # Never upsampled: a frame keeps the resolution it was generated at (a square photo
        # is generated 576 px high), or the input's when that is smaller. An upsampled view
        # only looks sharp in its pixel count; its softness is scored in augment instead.
        native = [
            (x1 - x0, y1 - y0) if x1 - x0 < img.shape[1] else (img.shape[1], img.shape[0])
            for (_, (x0, y0, x1, y1)), img in zip(boxed, images, strict=True)
        ]
        return [
            [unletterbox(frames[b, f], box, native[b]) for f in o.frame_indices]
            for b, (_, box) in enumerate(boxed)
        ]

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        errors: list[str | None] = [None] * n
        items, index = [], []
        rgbs = decode_column(column(batch, "image"), errors, self.role)
        for i, (rgb, seed) in enumerate(zip(rgbs, column(batch, "seed"), strict=True)):
            if rgb is not None:
                items.append((rgb, int(seed)))
                index.append(i)
        results = map_chunks(
            items,
            self.batch_size,
            lambda chunk: self.clips([c[0] for c in chunk], [c[1] for c in chunk]),
        )
        frames: list[list[bytes]] = [[] for _ in range(n)]
        for i, (clip, err) in zip(index, results, strict=True):
            if err:
                errors[i] = f"novel_view: {err}"
            else:
                frames[i] = [encode_png(f) for f in clip]
        return {
            "frames": object_array(frames),
            "frame_index": object_array(
                [list(self.options.frame_indices) if f else [] for f in frames]
            ),
            "error": object_array(errors),
        }
