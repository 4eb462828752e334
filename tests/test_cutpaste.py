"""Cut-and-paste synthesis (ray_app/cutpaste.py) on synthetic products whose pixels are known."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from ray_app.config import CutPasteConfig
from ray_app.cutpaste import cut_paste, pasted_size
from ray_app.staging import Box

RED, BLUE = (200, 30, 30), (20, 40, 220)


def _product(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A photo whose product (a 20 x 30 box: red top half, blue bottom half) sits on grey."""
    rgb = np.full((h, w, 3), 128, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[10:30, 15:45] = 255
    rgb[10:20, 15:45] = RED
    rgb[20:30, 15:45] = BLUE
    return rgb, mask


def _background(h: int = 96, w: int = 128, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_nearest_pastes_only_product_pixels_exactly():
    rgb, mask = _product()
    background = _background()
    config = CutPasteConfig(interpolation="nearest")
    for seed in range(20):
        out = cut_paste(rgb, mask, background, seed, config)
        colours = {tuple(c) for c in out.image[out.mask]}
        assert colours <= {RED, BLUE}, (seed, colours - {RED, BLUE})
        assert out.mask.sum() == out.box.area  # a box product stays a full box


def test_integer_scale_replicates_pixels():
    """At a scale that doubles the box, nearest paste = each product pixel as a 2 x 2 block."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)  # every pixel its own colour
    _, mask = _product()
    background = _background(h=120, w=120)
    # the 30-wide box at reference 0.5 of 120 -> 60 = 2x: scale 1 exactly
    config = CutPasteConfig(interpolation="nearest", reference=0.5, scale_range=(1.0, 1.0))
    out = cut_paste(rgb, mask, background, 0, config)
    assert (out.box.width, out.box.height) == (60, 40)
    expected = np.repeat(np.repeat(rgb[10:30, 15:45], 2, axis=0), 2, axis=1)
    b = out.box
    np.testing.assert_array_equal(out.image[b.y0 : b.y1, b.x0 : b.x1], expected)
    assert out.mask[b.y0 : b.y1, b.x0 : b.x1].all()


def test_smooth_interpolation_keeps_flat_interior_exact():
    """Lanczos resamples, but a flat region's interior must come out exactly its colour: no
    feathering or blending with the background inside the paste mask."""
    rgb = np.full((40, 60, 3), 128, np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 15:45] = 255
    rgb[mask > 0] = RED
    for seed in range(10):
        out = cut_paste(rgb, mask, _background(), seed)
        b = out.box
        inner = out.image[b.y0 + 3 : b.y1 - 3, b.x0 + 3 : b.x1 - 3]
        assert (inner == RED).all(), seed


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos"])
def test_no_colour_of_the_photos_background_bleeds_into_the_paste(interpolation):
    """A red disc photographed on green: resized smoothly, every pasted pixel is still pure
    red (its edge is a mean of product pixels only: no green halo on the new scene)."""
    yy, xx = np.mgrid[0:90, 0:70]
    disc = (yy - 45) ** 2 + (xx - 35) ** 2 < 30**2
    photo = np.zeros((90, 70, 3), np.uint8)
    photo[..., 1] = 255
    photo[disc] = (255, 0, 0)
    background = np.full((200, 240, 3), 40, np.uint8)
    config = CutPasteConfig(interpolation=interpolation)
    for seed in range(5):
        out = cut_paste(photo, disc, background, seed, config)
        assert out.mask.sum() > 50
        assert (out.image[out.mask] == (255, 0, 0)).all()
        assert (out.image[~out.mask] == 40).all()


@pytest.mark.parametrize("shape", [(96, 128), (128, 96), (64, 64)])
def test_scale_in_range_and_paste_inside_frame(shape):
    rgb, mask = _product()
    config = CutPasteConfig()
    low, high = config.scale_range
    background = _background(*shape)
    scales = []
    for seed in range(200):
        out = cut_paste(rgb, mask, background, seed, config)
        scales.append(out.scale)
        assert low <= out.scale <= high
        b = out.box
        assert 0 <= b.x0 < b.x1 <= shape[1] and 0 <= b.y0 < b.y1 <= shape[0]
        # the longer side follows the scale rule, the aspect is kept (3:2), within rounding
        assert abs(b.width - out.scale * config.reference * min(shape)) <= 0.5
        assert abs(b.height - b.width * 2 / 3) <= 1
        assert out.mask.any() and not out.mask[: b.y0].any() and not out.mask[b.y1 :].any()
        assert not out.mask[:, : b.x0].any() and not out.mask[:, b.x1 :].any()
    # the draws spread over the range, not one value
    assert min(scales) < low + 0.1 * (high - low) and max(scales) > high - 0.1 * (high - low)


def test_background_untouched_outside_mask():
    rgb, mask = _product()
    background = _background()
    before = background.copy()
    out = cut_paste(rgb, mask, background, 5)
    np.testing.assert_array_equal(out.image[~out.mask], background[~out.mask])
    np.testing.assert_array_equal(background, before)  # the input is not written to


def test_seeded_determinism():
    rgb, mask = _product()
    background = _background()
    a, b = cut_paste(rgb, mask, background, 11), cut_paste(rgb, mask, background, 11)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert (a.box, a.scale) == (b.box, b.scale)
    g = cut_paste(rgb, mask, background, np.random.default_rng(11))
    assert (g.box, g.scale) == (a.box, a.scale)  # a seed and its generator agree
    others = {cut_paste(rgb, mask, background, s).box for s in range(12, 20)}
    assert len(others | {a.box}) > 1


def test_pasted_size_rule():
    assert pasted_size(Box(0, 0, 30, 20), (100, 200), 1.0, 0.5) == (50, 33)
    assert pasted_size(Box(0, 0, 10, 40), (100, 200), 0.3, 0.5) == (4, 15)
    assert pasted_size(Box(0, 0, 1, 200), (64, 64), 0.3, 0.5) == (1, 10)  # at least 1 px


def test_empty_mask_refused():
    rgb, mask = _product()
    with pytest.raises(ValueError, match=r"mask is empty.*segment the product"):
        cut_paste(rgb, np.zeros_like(mask), _background(), 0)


def test_mask_shape_mismatch_refused():
    rgb, mask = _product()
    with pytest.raises(ValueError, match=r"mask is \(40, 59\) but product is \(40, 60\)"):
        cut_paste(rgb, mask[:, :59], _background(), 0)


def test_small_background_refused():
    rgb, mask = _product()
    with pytest.raises(ValueError, match=r"min_background_side=64.*larger background"):
        cut_paste(rgb, mask, _background(h=63, w=200), 0)


def test_non_rgb_refused():
    rgb, mask = _product()
    with pytest.raises(ValueError, match="background is float64"):
        cut_paste(rgb, mask, _background().astype(float), 0)


def test_scale_range_min_above_max_refused():
    with pytest.raises(ValidationError, match=r"scale_range.*minimum exceeds the maximum"):
        CutPasteConfig(scale_range=(1.3, 0.3))
    assert issubclass(ValidationError, ValueError)


def test_paste_that_cannot_fit_refused():
    with pytest.raises(ValidationError, match=r"reference=0\.9.*lower reference to at most"):
        CutPasteConfig(reference=0.9, scale_range=(0.3, 1.3))


def test_unknown_key_refused():
    with pytest.raises(ValidationError, match="feather"):
        CutPasteConfig(feather=2)
