"""Boundary-weighted LoRA fine-tuning of the inpainter (actors/inpaint_trainer.py) on the tiny
random-weight SDXL inpainting checkpoint, on CPU, without Ray: the weighting changes the loss
and is the plain MSE at peak 1, runs are reproducible from the seed, the LoRA changes the
paint, and the saved folder loads into the Inpainter actor."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from actors.inpaint_trainer import (
    INFO,
    InpaintTrainer,
    prepare_scenes,
    product_holes,
    split_scenes,
    train_inpainter,
    weighted_mse,
)
from ray_app import storage
from ray_app.config import InpaintOptions, InpaintTrainConfig
from ray_app.images import decode_rgb, encode_png
from ray_app.storage import AdapterLayout

RES = 64


def options(**changes) -> InpaintTrainConfig:
    base = dict(
        steps=3,
        batch_size=2,
        resolution=RES,
        rank=4,
        band=4,
        peak=5.0,
        learning_rate=1e-2,
        gradient_checkpointing=False,
        held_out=0.25,
        seed=3,
    )
    return InpaintTrainConfig(**{**base, **changes})


def scenes(n: int = 6, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Striped scenes (80 x 96) with an elliptic product standing in the lower half."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:80, 0:96]
    out = []
    for _ in range(n):
        period, phase = rng.uniform(8, 20), rng.uniform(0, 6.3)
        base = rng.integers(40, 200, 3)
        rgb = base + 50 * np.sin(xx / period + phase)[..., None]
        cx, cy, rx, ry = (
            rng.uniform(30, 66),
            rng.uniform(45, 60),
            rng.uniform(8, 20),
            rng.uniform(8, 18),
        )
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        rgb[mask] = rng.integers(0, 255, 3)
        out.append((np.clip(rgb, 0, 255).astype(np.uint8), mask))
    return out


@pytest.fixture(scope="module")
def trainer(tiny_config) -> InpaintTrainer:
    return InpaintTrainer(tiny_config.model_spec("inpainter"), options(), device="cpu")


@pytest.fixture(scope="module")
def data():
    images, holes, train_idx, held_idx = prepare_scenes(scenes(), options())
    return images, holes, train_idx, held_idx


def test_holes_are_other_products_grown_and_seeded():
    opts = options()
    masks = [m for _, m in scenes()]
    a = product_holes(masks, opts, seed=1)
    assert all(h.any() and not h.all() and h.shape == masks[0].shape for h in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, product_holes(masks, opts, 1), strict=True))
    assert any(
        not np.array_equal(x, y) for x, y in zip(a, product_holes(masks, opts, 2), strict=True)
    )
    # no dilation, fitted where the product stands: never the scene's own mask
    exact = product_holes(masks, options(dilation=0, random_placement=0.0), seed=1)
    assert not any(np.array_equal(h, m) for h, m in zip(exact, masks, strict=True))
    grown = product_holes(masks, options(dilation=3, random_placement=0.0), seed=1)
    assert all((g >= e).all() and g.sum() > e.sum() for g, e in zip(grown, exact, strict=True))
    train_idx, held = split_scenes(10, 0.2, seed=0)
    assert len(held) == 2 and sorted(train_idx + held) == list(range(10))
    assert split_scenes(10, 0.0, 0) == (list(range(10)), [])


def test_weighting_changes_the_loss_and_is_the_plain_mse_at_peak_one(trainer, data):
    images, holes, *_ = data
    trainer.configure(options())
    cache = trainer.prepare(images[:2], holes[:2])
    gen = torch.Generator("cpu").manual_seed(0)
    draw = trainer._draw(cache, [0, 1], gen)
    with torch.no_grad():
        plain = trainer.loss(cache, [0, 1], *draw, weighted=False)
        weighted = trainer.loss(cache, [0, 1], *draw, weighted=True)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-3)
    trainer.configure(options(peak=1.0))
    flat = trainer.prepare(images[:2], holes[:2])
    assert torch.allclose(flat.weights, torch.ones_like(flat.weights))
    with torch.no_grad():
        at_one = trainer.loss(flat, [0, 1], *draw, weighted=True)
    assert float(at_one) == pytest.approx(float(plain), rel=1e-6)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(
        weighted_mse(pred, target, torch.ones(2, 8, 8)),
        torch.nn.functional.mse_loss(pred, target),
    )
    trainer.configure(options())


def test_training_is_deterministic_given_the_seed(trainer, data):
    images, holes, train_idx, _ = data
    trainer.configure(options())
    cache = trainer.prepare([images[i] for i in train_idx], [holes[i] for i in train_idx])
    a, b = trainer.train(cache), trainer.train(cache)
    assert a.losses == b.losses and a.steps == 3
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    trainer.configure(options(seed=4))
    c = trainer.train(cache)
    assert c.losses != a.losses
    trainer.configure(options())


def test_the_lora_changes_the_paint(trainer, data):
    images, holes, *_ = data
    trainer.configure(options())
    trainer.train(trainer.prepare(images[:4], holes[:4]))
    args = (images[:1], holes[:1], [0], 2, 2.0)
    base, tuned = trainer.paint(*args, lora=False), trainer.paint(*args, lora=True)
    assert base[0].shape == (RES, RES, 3)
    assert np.abs(base[0].astype(int) - tuned[0].astype(int)).mean() > 0.5
    assert np.array_equal(trainer.paint(*args, lora=False)[0], base[0])  # adapter back on


def test_the_saved_lora_loads_into_the_inpainter_and_paints_as_the_trainer(
    tiny_config, trainer, tmp_path
):
    from actors.inpainter import Inpainter

    opts = options(save_dtype="float32")
    summary = train_inpainter(
        tiny_config.model_spec("inpainter"), opts, scenes(), str(tmp_path / "lora"), trainer=trainer
    )
    assert storage.exists(AdapterLayout.weights_in(summary["uri"]))
    info = storage.read_json(storage.join(summary["uri"], INFO))
    assert info["steps"] == opts.steps and info["seed"] == opts.seed
    assert info["config"]["weighting"] is True and info["eval_on"] == "held_out"
    assert len(info["held_out_scenes"]) == round(len(scenes()) * opts.held_out)
    rgb, mask = scenes(1, seed=9)[0]
    rgb, hole = rgb[:RES, :RES], mask[:RES, :RES]
    batch = {
        "image": [encode_png(rgb)],
        "mask": [encode_png(hole.astype(np.uint8) * 255)],
        "prompt": [opts.prompt],
        "seed": [0],
        "negative_prompt": [""],  # none: as the trainer paints
    }
    # one load of the actor; the base and the trained LoRA's paints come from the trainer
    out = Inpainter(
        tiny_config.model_spec("inpainter"),
        InpaintOptions(steps=2, guidance_scale=2.0, negative_prompt=""),
        device="cpu",
        lora=summary["uri"],
    )(batch)
    assert out["error"][0] is None
    loaded = decode_rgb(out["image"][0]).astype(int)
    args = ([rgb], [hole], [0], 2, 2.0)
    base, tuned = (trainer.paint(*args, lora=flag)[0].astype(int) for flag in (False, True))
    assert np.abs(base - tuned).mean() > 0.5  # the LoRA changes the paint
    assert np.abs(loaded - tuned).mean() < 0.05 * np.abs(base - tuned).mean()


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"resolution": 60}, "resolution=60 must be a multiple of 8"),
        ({"band": 40}, "band=40 is half of resolution=64"),
        ({"peak": 0.5}, "peak"),
        ({"held_out": 1.0}, "held_out"),
        ({"steps": 0}, "steps"),
        ({"target_modules": []}, re.escape("target_modules=[]: give at least one")),
        ({"stepz": 3}, "stepz"),
    ],
)
def test_bad_settings_name_the_key(changes, needle):
    with pytest.raises(ValidationError, match=needle):
        options(**changes)


def test_bad_scenes_and_a_changed_lora_shape_are_refused(tiny_config, trainer, tmp_path):
    good = scenes(3)
    with pytest.raises(ValueError, match="give at least 2"):
        train_inpainter(
            tiny_config.model_spec("inpainter"), options(), good[:1], str(tmp_path), trainer=trainer
        )
    empty = [good[0], (good[1][0], np.zeros_like(good[1][1])), good[2]]
    with pytest.raises(ValueError, match=r"scenes\[1\]: the product mask is empty"):
        train_inpainter(
            tiny_config.model_spec("inpainter"), options(), empty, str(tmp_path), trainer=trainer
        )
    with pytest.raises(ValueError, match="rank differ"):
        trainer.configure(options(rank=8))
