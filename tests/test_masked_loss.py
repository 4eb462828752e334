"""Masked DreamBooth (train.masked_loss): the loss on tensors, the mask at latent resolution,
and the tiny trainer's wiring (masked positives; negatives and unmasked samples plain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actors.lora_trainer import (
    LoraTrainer,
    TrainingSample,
    latent_mask,
    masked_mse,
    preprocess_mask,
    prior_loss,
)
from ray_app.config import load_config
from ray_app.images import encode_png


def _tensors(seed: int = 0, shape=(3, 4, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_all_ones_mask_is_the_plain_mse_exactly():
    pred, target = _tensors()
    keep = torch.ones(3, 1, 8, 8, dtype=torch.bool)
    assert torch.equal(masked_mse(pred, target, keep), F.mse_loss(pred, target))
    prior = np.array([False, False, True])
    assert torch.equal(
        prior_loss(pred, target, prior, 0.5, keep), prior_loss(pred, target, prior, 0.5)
    )


def test_masked_mse_is_the_mean_over_kept_elements():
    pred, target = _tensors()
    keep = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    keep[0, :, 2:5, 1:7] = True
    keep[2, :, 0:1, :] = True
    expected = ((pred - target) ** 2)[keep.expand_as(pred)].mean()
    assert torch.allclose(masked_mse(pred, target, keep), expected)
    with pytest.raises(ValueError, match="keep is empty"):
        masked_mse(pred, target, torch.zeros_like(keep))


def test_gradient_is_zero_on_background_and_not_on_product():
    pred, target = _tensors()
    pred.requires_grad_(True)
    keep = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    keep[:, :, 2:6, 3:7] = True
    masked_mse(pred, target, keep).backward()
    grad = pred.grad
    background = ~keep.expand_as(grad)
    assert (grad[background] == 0).all()  # exactly zero, not small
    assert (grad[~background] != 0).all()


def test_class_samples_keep_the_plain_loss():
    """Instance samples masked, class samples plain: the class term ignores ``keep``."""
    pred, target = _tensors()
    prior = np.array([False, True, True])
    keep = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    keep[0, :, :4] = True
    pred.requires_grad_(True)
    loss = prior_loss(pred, target, prior, 2.0, keep)
    expected = masked_mse(pred[:1], target[:1], keep[:1]) + 2.0 * F.mse_loss(pred[1:], target[1:])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert (pred.grad[1:] != 0).all()  # every element of the class samples trains
    assert (pred.grad[0, :, 4:] == 0).all()


def test_latent_mask_downsamples_by_blocks():
    mask = np.zeros((64, 64), np.uint8)
    mask[8:24, 16:40] = 255  # whole 8 x 8 blocks: rows 1-2, columns 2-4
    mask[63, 0] = 255  # one pixel in the bottom-left block makes it product
    expected = np.zeros((8, 8), bool)
    expected[1:3, 2:5] = True
    expected[7, 0] = True
    np.testing.assert_array_equal(latent_mask(mask, 8), expected)
    with pytest.raises(ValueError, match="multiple of the latent size 7"):
        latent_mask(mask, 7)


def test_mask_follows_the_image_crop():
    """A wide photo is resized to the resolution on its shorter side and centre-cropped:
    the mask goes through the same geometry (a product in the cut margin disappears)."""
    mask = np.zeros((32, 64), np.uint8)  # -> 64 x 128, crop columns 32..96
    mask[:, 40:48] = 255  # -> columns 80..96 -> 48..64 of the crop
    mask[:, 0:8] = 255  # in the left margin: cut
    out = preprocess_mask(mask, 64)
    assert out.shape == (64, 64)
    assert out[:, 48:64].all() and not out[:, :48].any()


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def trainer():
    cfg = load_config("tiny", overrides=["train.masked_loss=true", "train.steps=2"])
    return LoraTrainer(cfg.model_spec("generator"), cfg.train)


def _samples(masks: list[np.ndarray | None], negatives: int = 1) -> list[TrainingSample]:
    rng = np.random.default_rng(0)
    out = []
    for i, mask in enumerate(masks):
        rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        data = None if mask is None else encode_png(mask)
        out.append(TrainingSample(f"pos-{i}", encode_png(rgb), "a photo of ohwx mug", mask=data))
    for i in range(negatives):
        rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        full = encode_png(np.full((64, 64), 255, np.uint8))
        out.append(TrainingSample(f"neg-{i}", encode_png(rgb), "a mug", True, mask=full))
    return out


def test_trainer_keeps_product_latents_of_masked_positives_only(trainer):
    res = trainer.options.resolution
    size = res // trainer.pipe.vae_scale_factor
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    cache = trainer.prepare(_samples([mask, None, np.zeros((64, 64), np.uint8)]))
    assert cache.masked == 1  # no mask, an empty mask and the negative are not masked
    expected = latent_mask(preprocess_mask(mask, res), size)
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(cache.keep[0, 0].cpu().numpy(), expected)
    assert cache.keep[1:].all()


def test_trainer_loss_is_plain_for_full_masks_and_masked_for_partial(trainer):
    """On the same fixed draws (``eval_loss``): all-product masks give the plain loss
    exactly, partial masks another (finite) loss."""
    full = np.full((64, 64), 255, np.uint8)
    part = np.zeros((64, 64), np.uint8)
    part[:32] = 255
    trainer.options.masked_loss = False
    try:
        plain_cache = trainer.prepare(_samples([full, full]))
    finally:
        trainer.options.masked_loss = True
    assert plain_cache.keep is None
    plain = trainer.eval_loss(plain_cache, seed=3)
    assert trainer.eval_loss(trainer.prepare(_samples([full, full])), seed=3) == plain
    half = trainer.eval_loss(trainer.prepare(_samples([part, part])), seed=3)
    assert np.isfinite(half) and half != plain


@pytest.mark.parametrize("on", [False, True])
def test_train_job_passes_positives_masks(tmp_path, on):
    """pipelines/train: with masked_loss the positives' manifest masks reach the trainer's
    samples; negatives never carry one, and without the flag no mask is read."""
    from types import SimpleNamespace

    from trainset import PRODUCTS, write_training_set

    from pipelines.train import ShardTrainer, load_training_set
    from ray_app.kinds import POSITIVE_KINDS
    from ray_app.prompts import PromptBank

    cfg = load_config("tiny", overrides=[f"train.masked_loss={str(on).lower()}"])
    root = write_training_set(str(tmp_path))
    pid = sorted(PRODUCTS)[0]
    ts = load_training_set(cfg, root, pid, PromptBank.load(cfg.augment.prompt_bank), {})
    samples = ShardTrainer.samples(SimpleNamespace(config=cfg), ts, "ohwx")
    kinds = {r["sample_id"]: r["kind"] for r in ts.rows}
    for s in samples:
        masked = on and kinds[s.sample_id] in POSITIVE_KINDS
        assert (s.mask is not None) == masked, s.sample_id
    assert sum(s.mask is not None for s in samples) == (len(ts.positives) if on else 0)
