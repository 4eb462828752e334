"""Fine-grained captions (role ``captioner``): a vision-language model answers an
instruction about each image (paper 2.2). Also answers the product-type question when a
product has no category."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ray_app.batching import batch_len, column, decode_column, map_chunks
from ray_app.clip_text import CONTEXT_LENGTH, fit_words
from ray_app.config import CaptionConfig, ModelSpec
from ray_app.models import load_model

_PREAMBLE = re.compile(
    r"^(?:sure[,!.]?\s*)?(?:here is|here's|this|the)?\s*(?:image|photo|picture|photograph)\s+"
    r"(?:shows|depicts|features|displays|is of|contains)\s+",
    re.IGNORECASE,
)


def _tidy(text: str) -> str:
    """One line of printable text without a "The image shows" preamble."""
    # U+FFFD marks bytes the tokenizer could not decode: noise, never content.
    text = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in text)
    text = " ".join(text.split())
    return _PREAMBLE.sub("", text).strip(" \"'")


def _cut_words(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words]).rstrip(",;:") if len(words) > max_words else text


def _finish(text: str) -> str:
    """Capitalised; empty when nothing usable is left (the caller then falls back)."""
    if not re.search(r"[A-Za-z]{2,}", text):
        return ""
    return text[0].upper() + text[1:]


def clean_caption(text: str, max_words: int) -> str:
    """One line of printable text without a "The image shows" preamble, at most ``max_words``
    words; empty when nothing usable is left (the caller then falls back)."""
    return _finish(_cut_words(_tidy(text), max_words))


@dataclass(frozen=True)
class Caption:
    """A cleaned caption that fits the generator's text encoders, and whether it was cut:
    ``words`` is the word count of the captioner's answer before any cut."""

    text: str
    words: int
    truncated: bool


def fit_caption(text: str, options: CaptionConfig) -> Caption:
    """``clean_caption``, then cut at a word boundary to ``CONTEXT_LENGTH -
    options.reserve_tokens`` CLIP tokens, so that the caption with the product phrase that
    training inserts still fits SDXL's 77 tokens (a longer prompt loses its end in silence)."""
    tidy = _tidy(text)
    words = len(tidy.split())
    fitted = fit_words(_cut_words(tidy, options.max_words), CONTEXT_LENGTH - options.reserve_tokens)
    final = _finish(fitted.text)
    return Caption(final, words, len(final.split()) < words)


def type_question(labels: list[str]) -> str:
    return (
        "What kind of product is the main object in this photo? Answer with exactly one of: "
        + ", ".join(labels)
        + ". Answer with those words only."
    )


class Captioner:
    """Batch in: ``image`` (encoded bytes), optional ``instruction`` per row.
    Batch out: ``caption`` (str, "" when the model gave nothing usable, cut to fit the
    generator's text encoders: ``fit_caption``), ``caption_words`` (words of the answer
    before any cut), ``caption_truncated`` (bool) and ``error``."""

    role = "captioner"

    def __init__(self, model: ModelSpec, options: CaptionConfig, device: str | None = None):
        self.loaded = load_model(model, device=device)
        self.batch_size = model.batch_size
        self.options = options

    @torch.inference_mode()
    def caption(self, images: list[np.ndarray], instructions: list[str]) -> list[str]:
        """The model's raw answers (``__call__`` cleans and cuts them)."""
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
        return m.processor.batch_decode(new, skip_special_tokens=True)

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
        captions = [Caption("", 0, False)] * n
        for i, (text, err) in zip(index, results, strict=True):
            captions[i] = fit_caption(text or "", self.options)
            errors[i] = f"captioner: {err}" if err else None
        return {
            "caption": np.array([c.text for c in captions], dtype=object),
            "caption_words": np.array([c.words for c in captions], dtype=np.int64),
            "caption_truncated": np.array([c.truncated for c in captions], dtype=bool),
            "error": np.array(errors, dtype=object),
        }
