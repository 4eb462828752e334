"""Prompt writing (role ``llm``, optional): an instruction-tuned language model proposes new
context prompts for a product type; `restage prompts build` curates them into the bank."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ray_app.batching import batch_len, column, object_array
from ray_app.config import ModelSpec
from ray_app.models import load_model
from ray_app.prompts import PLACEHOLDER


def instruction(noun: str, examples: list[str], n: int, max_words: int) -> str:
    """The request for ``n`` new scene prompts for a product type, with curated examples."""
    shown = "\n".join(f"- {e}" for e in examples)
    return (
        f"Write {n} new, varied descriptions of realistic e-commerce product photos of a {noun}. "
        f"Each description is one line, at most {max_words} words, and contains the placeholder "
        f"{PLACEHOLDER} exactly once where the product goes. Describe a real place and surface where "
        "this product is really used, plain lighting and optionally the camera framing. No people, "
        "hands, animals, text, logos or brands; nothing fantastic, surreal or oversized; one product "
        f"only. Examples:\n{shown}\nWrite only the {n} lines, nothing else."
    )


def split_lines(text: str) -> list[str]:
    """The model's answer as candidate lines (empty lines dropped; cleaning is curation's)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


class PromptWriter:
    """Batch in: ``noun`` (str), ``examples`` (list of str), ``seed`` (int).
    Batch out: ``candidates`` (list of str) and ``error``."""

    role = "llm"

    def __init__(
        self,
        model: ModelSpec,
        per_type: int,
        max_new_tokens: int = 1200,
        temperature: float = 0.9,
        device: str | None = None,
    ):
        self.loaded = load_model(model, device=device)
        self.per_type = per_type
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.max_words = 40

    @torch.inference_mode()
    def write(self, noun: str, examples: list[str], seed: int) -> list[str]:
        tok, model = self.loaded.processor, self.loaded.model
        chat = [
            {"role": "user", "content": instruction(noun, examples, self.per_type, self.max_words)}
        ]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        inputs = tok([text], return_tensors="pt").to(self.loaded.device)
        torch.manual_seed(seed)  # sampled for variety, seeded so a rebuild is reproducible
        out = model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_p=0.95,
        )
        return split_lines(
            tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        candidates: list[list[str]] = [[] for _ in range(n)]
        errors: list[str | None] = [None] * n
        for i, (noun, examples, seed) in enumerate(
            zip(
                column(batch, "noun"), column(batch, "examples"), column(batch, "seed"), strict=True
            )
        ):
            try:
                candidates[i] = self.write(str(noun), list(examples), int(seed))
            except Exception as exc:
                errors[i] = f"llm: {type(exc).__name__}: {exc}"
        return {"candidates": object_array(candidates), "error": object_array(errors)}
