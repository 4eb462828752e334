"""Fine-grained captions (role ``captioner``): a vision-language model answers an
instruction about each image (paper 2.2). Also answers the product-type question when a
product has no category."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from PIL import Image

from ray_app.batching import batch_len, column, decode_column, map_chunks
from ray_app.config import CaptionConfig, ModelSpec
from ray_app.models import load_model

_PREAMBLE = re.compile(
    r"^(?:sure[,!.]?\s*)?(?:here is|here's|this|the)?\s*(?:image|photo|picture|photograph)\s+"
    r"(?:shows|depicts|features|displays|is of|contains)\s+",
    re.IGNORECASE,
)


def clean_caption(text: str, max_words: int) -> str:
    """One line of printable text without a "The image shows" preamble, at most ``max_words``
    words; empty when nothing usable is left (the caller then falls back)."""
    # U+FFFD marks bytes the tokenizer could not decode: noise, never content.
    text = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in text)
    text = " ".join(text.split())
    text = _PREAMBLE.sub("", text).strip(" \"'")
    words = text.split()
    if len(words) > max_words:
        text = " ".join(words[:max_words]).rstrip(",;:")
    if not re.search(r"[A-Za-z]{2,}", text):
        return ""
    return text[0].upper() + text[1:] if text else text


def type_question(labels: list[str]) -> str:
    return (
        "What kind of product is the main object in this photo? Answer with exactly one of: "
        + ", ".join(labels)
        + ". Answer with those words only."
    )


class Captioner:
    """Batch in: ``image`` (encoded bytes), optional ``instruction`` per row.
    Batch out: ``caption`` (str, "" when the model gave nothing usable) and ``error``."""

    role = "captioner"

    def __init__(self, model: ModelSpec, options: CaptionConfig, device: str | None = None):
        self.loaded = load_model(model, device=device)
        self.batch_size = model.batch_size
        self.options = options

    @torch.inference_mode()
    def caption(self, images: list[np.ndarray], instructions: list[str]) -> list[str]:
        m = self.loaded
        texts = [
            m.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ins}]}],
                add_generation_prompt=True,
            )
            for ins in instructions
        ]
        inputs = m.processor(
            text=texts,
            images=[Image.fromarray(i) for i in images],
            return_tensors="pt",
            padding=True,
        ).to(m.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(m.dtype)
        # Greedy decoding: a caption is a description, and a re-run must reproduce it.
        out = m.model.generate(
            **inputs, max_new_tokens=self.options.max_new_tokens, do_sample=False
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        decoded = m.processor.batch_decode(new, skip_special_tokens=True)
        return [clean_caption(t, self.options.max_words) for t in decoded]

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        instructions = [ins or self.options.instruction for ins in column(batch, "instruction", n)]
        errors: list[str | None] = [None] * n
        rgbs = decode_column(column(batch, "image"), errors, self.role)
        index = [i for i, rgb in enumerate(rgbs) if rgb is not None]
        results = map_chunks(
            [(rgbs[i], instructions[i]) for i in index],
            self.batch_size,
            lambda chunk: self.caption([c[0] for c in chunk], [c[1] for c in chunk]),
        )
        captions = [""] * n
        for i, (text, err) in zip(index, results, strict=True):
            captions[i], errors[i] = (text or "", f"captioner: {err}" if err else None)
        return {
            "caption": np.array(captions, dtype=object),
            "error": np.array(errors, dtype=object),
        }
