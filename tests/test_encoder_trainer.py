"""Per-product encoders (actors/encoder_trainer.py) and their retrieval measures
(ray_app/personal_retrieval.py): the loss, the features, the files, and a learning check on
real photos: a product's encoder, trained on 3 of its photos against the other products',
ranks its held-out photos above the other products' better than the pretrained encoder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from actors.encoder_trainer import (
    EncoderLayout,
    EncoderMeta,
    EncoderTrainer,
    center_square,
    info_nce,
    pooled_features,
    random_square,
)
from bench.personalize import photos as dreambooth_photos
from ray_app.config import load_config
from ray_app.personal_retrieval import average_precision, product_retrieval, recall_at_k


@pytest.fixture(scope="module")
def trainer(tiny_config):
    return EncoderTrainer(tiny_config.model_spec("encoder"), tiny_config.personalize)


def _noise(n: int, seed: int, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8) for _ in range(n)]


# --------------------------------------------------------------------------- units


def test_info_nce_is_the_cross_entropy_of_the_positive_against_the_negatives():
    gen = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(s, 6, generator=gen) for s in (4, 4, 5))
    loss = info_nce(a, p, n, temperature=0.5)
    an, pn, nn = (x / x.norm(dim=-1, keepdim=True) for x in (a, p, n))
    expected = []
    for i in range(4):
        pos = math.exp(float(an[i] @ pn[i]) / 0.5)
        negs = sum(math.exp(float(an[i] @ nn[j]) / 0.5) for j in range(5))
        expected.append(-math.log(pos / (pos + negs)))
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5)
    # a positive equal to its anchor and a negative opposite to it: the loss is near zero
    assert float(info_nce(a[:1], a[:1], -a[:1], temperature=0.05)) < 1e-6


def test_pooled_features_concatenate_cls_and_the_mean_of_patch_tokens_after_registers():
    hidden = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    assert torch.equal(pooled_features(hidden, "cls"), hidden[:, 0])
    both = pooled_features(hidden, "cls_mean", prefix_tokens=3)  # CLS + 2 registers
    assert both.shape == (2, 6)
    assert torch.equal(both[:, :3], hidden[:, 0])
    assert torch.allclose(both[:, 3:], hidden[:, 3:].mean(dim=1))


def test_random_square_at_full_scale_without_flip_is_the_centred_square():
    img = _noise(1, 1, size=40)[0]  # 40 x 48
    rng = np.random.default_rng(0)
    crops = {random_square(img, 16, (1.0, 1.0), False, rng).tobytes() for _ in range(20)}
    # full scale: the side is the shorter side, only the horizontal offset varies (0..8)
    assert center_square(img, 16).tobytes() in crops
    small = random_square(img, 16, (0.25, 0.25), True, rng)
    assert small.shape == (16, 16, 3)


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like image (smooth gradients and blobs): resampling kernels agree on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    planes = [
        np.sin(2 * np.pi * (a * xx + b * yy) + c) for a, b, c in rng.uniform(0.3, 2.0, (3, 3))
    ]
    return ((np.stack(planes, -1) + 1) * 127.5).astype(np.uint8)


def test_device_views_are_the_pil_squares_of_the_same_draws(trainer):
    """``views`` (training's crops on the trainer's device) draws the boxes and flips that
    ``random_square`` draws from the same generator, and resamples them alike."""
    images = [_smooth(90, 120, 0), _smooth(100, 80, 1)]
    for scale, flip in (((1.0, 1.0), False), ((0.3, 0.6), True)):
        cfg = trainer.config.model_copy(update={"crop_scale": scale, "flip": flip})
        device = EncoderTrainer.__new__(EncoderTrainer)
        device.__dict__.update(trainer.__dict__, config=cfg)
        got = device.views(device.upload(images * 4), np.random.default_rng(7)).float()
        rng = np.random.default_rng(7)
        res = trainer.resolution
        pil = [random_square(img, res, scale, flip, rng) for img in images * 4]
        want = trainer._pixels(pil).float()
        assert got.shape == want.shape == (8, 3, res, res)
        # per image: the same crop (a wrong box or flip differs by ~0.5 on average)
        diff = (got - want).abs().mean(dim=(1, 2, 3))
        assert diff.max() < 0.05, diff


def test_encode_gives_embeds_features_and_the_patch_grid_in_one_pass(trainer):
    images = _noise(3, 5)
    for personal in (True, False):
        feats, tokens = trainer.encode(images, personal=personal, batch_size=2)
        np.testing.assert_allclose(feats, trainer.embed(images, personal=personal), atol=1e-5)
        grid = trainer.resolution // trainer.model.config.patch_size
        assert tokens.shape == (3, grid, grid, trainer.model.config.hidden_size)
        # the feature's second half is the mean patch token (cls_mean), normalised with CLS
        mean = torch.from_numpy(tokens.reshape(3, -1, tokens.shape[-1]).mean(1))
        assert trainer.config.feature == "cls_mean"
        half = feats[:, tokens.shape[-1] :]
        ratio = half / mean.numpy()
        np.testing.assert_allclose(ratio, ratio[:, :1].repeat(ratio.shape[1], 1), rtol=1e-3)


def test_average_precision_and_recall_rank_ties_against_the_relevant_items():
    relevant = np.array([True, False, True, False])
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), relevant) == pytest.approx(
        (1 / 1 + 2 / 3) / 2
    )
    assert average_precision(np.array([0.1, 0.9, 0.8, 0.2]), relevant) == pytest.approx(
        (1 / 2 + 2 / 4) / 2
    )
    # constant scores earn no credit: the relevant items rank last
    assert average_precision(np.zeros(4), relevant) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert math.isnan(average_precision(np.ones(3), np.zeros(3, bool)))
    assert recall_at_k(np.array([0.9, 0.8, 0.7, 0.1]), relevant, 1) == 0.5
    with pytest.raises(ValueError, match="shape"):
        average_precision(np.ones(3), np.ones(4, bool))


def test_config_refuses_an_empty_crop_range():
    with pytest.raises(Exception, match="crop_scale"):
        load_config("tiny", overrides=["personalize.crop_scale=[0.9,0.5]"])


# --------------------------------------------------------------------------- the trainer


def test_train_refuses_too_few_images(trainer):
    with pytest.raises(ValueError, match="at least 2"):
        trainer.train(_noise(1, 0), _noise(3, 1), seed=0)
    with pytest.raises(ValueError, match="no negative"):
        trainer.train(_noise(3, 0), [], seed=0)


def test_reset_is_the_pretrained_encoder_and_save_load_round_trips(trainer, tiny_config, tmp_path):
    images = _noise(4, 2)
    pretrained = trainer.embed(images, personal=False)
    trainer.reset(3)  # zero B: the LoRA adds nothing
    assert np.allclose(trainer.embed(images), pretrained, atol=1e-6)

    result = trainer.train(_noise(3, 3), _noise(6, 4), seed=3)
    tuned = trainer.embed(images)
    assert not np.allclose(tuned, pretrained, atol=1e-3)  # the LoRA moved the features
    assert result.steps == math.ceil(tiny_config.personalize.pairs / 8) * 2
    folder = str(tmp_path / "enc" / "p1")
    meta = trainer.meta("p1", result)
    trainer.save(folder, meta)
    peft_config = json.loads((tmp_path / "enc" / "p1" / EncoderLayout.PEFT_CONFIG).read_text())
    assert peft_config["r"] == tiny_config.personalize.rank
    assert sorted(peft_config["target_modules"]) == sorted(meta.target_modules)

    other = EncoderTrainer(tiny_config.model_spec("encoder"), tiny_config.personalize)
    assert np.allclose(other.embed(images), pretrained, atol=1e-6)
    loaded = other.load(folder)
    assert loaded == EncoderMeta.read(folder) == meta
    assert np.allclose(other.embed(images), tuned, atol=1e-5)

    wrong = tiny_config.personalize.model_copy(update={"rank": 4})
    with pytest.raises(ValueError, match="rank/alpha/targets"):
        EncoderTrainer(tiny_config.model_spec("encoder"), wrong).load(folder)
    with pytest.raises(FileNotFoundError, match="restage personalize"):
        EncoderMeta.read(str(tmp_path / "none"))


@pytest.mark.parametrize("split", [0, 2])
def test_personal_encoders_retrieve_held_out_photos_better_than_the_pretrained(
    trainer, dreambooth, split
):
    """Encoders of 3 DreamBooth products, each trained on 3 of its photos against the
    other 9 products' 3: the loss falls, and the mean AP of ranking all 10 products'
    held-out photos by similarity to the product's 3 rises over the pretrained encoder's.
    ``split`` rotates which photos are held out."""
    photos = {k: v[split:] + v[:split] for k, v in dreambooth_photos(256, dreambooth).items()}
    train = {k: v[:3] for k, v in photos.items()}
    gallery_ids = [k for k, v in photos.items() for _ in v[3:]]
    gallery = [img for v in photos.values() for img in v[3:]]
    pretrained_gallery = trainer.embed(gallery, personal=False)
    before, after = [], []
    for i, pid in enumerate(["backpack", "can", "candle"]):
        negatives = [img for k, v in train.items() if k != pid for img in v]
        result = trainer.train(train[pid], negatives, seed=i)
        first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
        assert last < 0.5 * first, f"{pid}: InfoNCE {first:.3f} -> {last:.3f}"
        before.append(
            product_retrieval(
                pid, trainer.embed(train[pid], personal=False), pretrained_gallery, gallery_ids
            ).average_precision
        )
        after.append(
            product_retrieval(
                pid, trainer.embed(train[pid]), trainer.embed(gallery), gallery_ids
            ).average_precision
        )
    print(f"split {split}: AP pretrained {before} -> personal {after}")
    assert np.mean(after) > np.mean(before) + 0.05, (before, after)


def test_train_takes_the_steps_the_config_counts(tiny_config):
    """``personalize.steps`` (what `restage plan` costs) is what the trainer runs."""
    cfg = tiny_config.personalize.model_copy(update={"pairs": 10, "batch_size": 4, "epochs": 2})
    trainer = EncoderTrainer(tiny_config.model_spec("encoder"), cfg)
    result = trainer.train(_noise(3, 5), _noise(6, 6), seed=0)
    assert result.steps == cfg.steps == 6
