"""SDXL's unconditional embedding: rows without a negative prompt reach the diffusers
pipeline as ``negative_prompt=None`` (zeroed embedding), never as an encoded ""."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import actors.generator as generator_module
import actors.inpainter as inpainter_module
from actors.generator import GenerationOptions, Generator, split_negatives
from actors.inpainter import Inpainter
from ray_app.config import InpaintOptions, load_config
from ray_app.images import decode_rgb, encode_png


class RecordingPipeline:
    """A diffusers pipeline double: records every call's kwargs; each image's pixels are
    its seed, so results can be matched to rows."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        h, w = kwargs["height"], kwargs["width"]
        seeds = [g.initial_seed() for g in kwargs["generator"]]
        images = np.stack([np.full((h, w, 3), s / 255, np.float32) for s in seeds])
        return SimpleNamespace(images=images)


def _fake_loaded(pipe: RecordingPipeline):
    return SimpleNamespace(model=pipe, device=torch.device("cpu"))


@pytest.fixture
def generator(monkeypatch):
    pipe = RecordingPipeline()
    monkeypatch.setattr(
        generator_module, "load_model", lambda model, device=None: _fake_loaded(pipe)
    )
    gen = Generator(load_config("tiny").model_spec("generator"), GenerationOptions(16, 16, 2, 5.0))
    return gen, pipe


def test_negatives_are_called_with_negative_prompt_none(generator):
    """The augment NegativeStage sends prompt and seed only: in-class negatives."""
    gen, pipe = generator
    out = gen({"prompt": np.array(["a mug", "a lamp"], dtype=object), "seed": np.array([1, 2])})
    assert all(e is None for e in out["error"])
    assert [c["negative_prompt"] for c in pipe.calls] == [None]
    pipe.calls.clear()
    gen.generate(["a mug"], [3], [""])  # an empty string is no negative prompt either
    assert [c["negative_prompt"] for c in pipe.calls] == [None]


def test_a_batch_mixing_rows_with_and_without_a_negative_prompt_takes_one_call_per_group(
    generator,
):
    gen, pipe = generator
    batch = {
        "prompt": np.array(["a", "b", "c", "d"], dtype=object),
        "seed": np.array([10, 20, 30, 40]),
        "negative_prompt": np.array([None, "blurry", "", "  "], dtype=object),
    }
    out = gen(batch)
    calls = sorted(
        ((c["negative_prompt"], c["prompt"]) for c in pipe.calls), key=lambda c: c[0] is None
    )
    assert calls == [(["blurry"], ["b"]), (None, ["a", "c", "d"])]
    # Every row gets its own image back, in the batch's order.
    assert [int(decode_rgb(img)[0, 0, 0]) for img in out["image"]] == [10, 20, 30, 40]


def test_the_actor_default_negative_prompt_applies_to_rows_without_one(monkeypatch):
    pipe = RecordingPipeline()
    monkeypatch.setattr(
        generator_module, "load_model", lambda model, device=None: _fake_loaded(pipe)
    )
    options = GenerationOptions(16, 16, 2, 5.0, negative_prompt="low quality")
    gen = Generator(load_config("tiny").model_spec("generator"), options)
    gen({"prompt": np.array(["a"], dtype=object), "seed": np.array([1])})
    assert [c["negative_prompt"] for c in pipe.calls] == [["low quality"]]


def test_split_negatives_keeps_row_indices():
    assert split_negatives(["x", None, "", "y"]) == [([0, 3], ["x", "y"]), ([1, 2], None)]
    assert split_negatives([None, None]) == [([0, 1], None)]
    assert split_negatives([]) == []


def test_inpainter_rows_without_a_negative_prompt_get_none(monkeypatch):
    pipe = RecordingPipeline()
    monkeypatch.setattr(
        inpainter_module, "load_model", lambda model, device=None: _fake_loaded(pipe)
    )
    options = InpaintOptions(negative_prompt="")
    painter = Inpainter(load_config("tiny").model_spec("inpainter"), options)
    rgb = encode_png(np.zeros((16, 16, 3), np.uint8))
    mask = encode_png(np.full((16, 16), 255, np.uint8))
    batch = {
        "image": np.array([rgb, rgb], dtype=object),
        "mask": np.array([mask, mask], dtype=object),
        "prompt": np.array(["a", "b"], dtype=object),
        "seed": np.array([1, 2]),
        "negative_prompt": np.array([None, "text"], dtype=object),
    }
    out = painter(batch)
    assert all(e is None for e in out["error"])
    assert sorted((c["negative_prompt"] for c in pipe.calls), key=lambda n: n is None) == [
        ["text"],
        None,
    ]
