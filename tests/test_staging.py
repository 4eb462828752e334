"""Copy-paste staging geometry on synthetic scenes with known masks: placement on the scene
product's ground line at its scale, the product's pixels exact inside its mask, the gaps,
the contact shadow, the seam score."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ray_app import staging
from ray_app.staging import Box, Target


def scene(h=240, w=320, box=(120, 60, 200, 200), colour=(255, 0, 255)):
    """A gradient room with a magenta product standing in it; -> (rgb, product mask, empty)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([80 + xx * 100 // w, 120 + yy * 80 // h, np.full_like(xx, 150)], -1)
    empty = rgb.astype(np.uint8)
    with_product = empty.copy()
    mask = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    with_product[mask] = colour
    return with_product, mask, empty


def product_photo(h=200, w=160, box=(30, 20, 130, 180)):
    """A textured product on a white background (a plain-background catalog photo)."""
    rgb = np.full((h, w, 3), 255, np.uint8)
    mask = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1]
    mask[y0:y1, x0:x1] = True
    rgb[y0:y1, x0:x1] = np.stack([(xx * 7) % 200, (yy * 5) % 200, (xx + yy) % 120], -1)
    return rgb, mask


def test_ground_line_ignores_stray_pixels_and_thin_tips():
    mask = np.zeros((100, 100), bool)
    mask[20:70, 30:70] = True  # the body
    mask[70:74, 31:33] = True  # a thin leg tip
    mask[90, 50] = True  # a stray pixel
    assert staging.ground_line(mask) == 70
    with pytest.raises(ValueError, match="empty"):
        staging.ground_line(np.zeros((4, 4), bool))


def test_fit_keeps_the_aspect_stands_on_the_ground_and_centres():
    where = Target(Box(100, 50, 200, 250), ground=250)
    placed = staging.fit(Box(0, 0, 50, 50), where)  # square into a 100x200 box
    assert placed.box == Box(100, 150, 200, 250) and placed.scale == 2.0
    tall = staging.fit(Box(0, 0, 10, 40), where)
    assert (tall.box.width, tall.box.height) == (50, 200) and tall.box.y1 == 250
    assert (tall.box.x0 + tall.box.x1) / 2 == 150
    assert staging.aspect_change(Box(0, 0, 10, 20), Box(0, 0, 20, 10)) == pytest.approx(4)


def test_the_product_stands_where_the_scene_product_stood_with_exact_pixels():
    _, scene_mask, empty = scene()
    where = staging.target(scene_mask)
    photo, mask = product_photo()
    staged = staging.composite(empty, photo, mask, where, feather=2, shadow_opacity=0.3)
    placed = Box.of(staged.mask)
    # at the scene product's scale: it fills the target box in one direction, within it
    assert placed.y1 == where.ground
    assert placed.x0 >= where.box.x0 - 1 and placed.x1 <= where.box.x1 + 1
    assert placed.y0 >= where.box.y0 - 1
    assert placed.width == pytest.approx(where.box.width, abs=1) or placed.height == pytest.approx(
        where.box.height, abs=1
    )
    assert placed.iou(where.box) > 0.9
    # pixels exact: inside the mask beyond the feather band, the image is the resized photo
    src = Box.of(mask)
    b = staged.placement.box
    resized = np.asarray(
        Image.fromarray(photo[src.y0 : src.y1, src.x0 : src.x1]).resize(
            (b.width, b.height), Image.LANCZOS
        )
    )
    interior = staged.alpha == 1.0
    assert interior.sum() > 0.8 * staged.mask.sum()
    region = staged.image[b.y0 : b.y1, b.x0 : b.x1]
    inner = interior[b.y0 : b.y1, b.x0 : b.x1]
    assert np.array_equal(region[inner], resized[inner])
    # outside the product and its shadow, the scene is untouched
    untouched = ~staged.mask & (staged.shadow == 0)
    assert np.array_equal(staged.image[untouched], empty[untouched])


def test_the_gaps_are_the_removed_area_outside_the_new_product():
    _, scene_mask, _ = scene(box=(100, 40, 220, 200))  # wide scene product
    removed = staging.removal_mask(scene_mask, 3)
    assert removed.sum() > scene_mask.sum() and (removed | scene_mask).sum() == removed.sum()
    placed = np.zeros_like(scene_mask)
    placed[60:200, 130:190] = True  # a narrower product in its place
    gaps = staging.gap_mask(removed, placed)
    assert not (gaps & placed).any()
    assert ((gaps | placed) >= removed).all()  # every removed pixel is covered or repainted


def test_the_contact_shadow_lies_under_the_base_on_the_ground():
    _, scene_mask, empty = scene()
    photo, mask = product_photo()
    staged = staging.composite(empty, photo, mask, staging.target(scene_mask), shadow_opacity=0.4)
    where = staging.target(scene_mask)
    assert staged.shadow.max() > 0.1 and not staged.shadow[staged.mask].any()
    rows = np.nonzero(staged.shadow.max(axis=1) > 0.05)[0]
    assert rows.min() >= where.box.y0 + where.box.height // 2 and rows.max() > where.ground - 1
    darker = staged.image.astype(int).sum(-1) < empty.astype(int).sum(-1)
    assert darker[where.ground : where.ground + 3].any()
    assert not staging.composite(empty, photo, mask, where, shadow_opacity=0).shadow.any()


def test_a_feathered_harmonised_edge_stands_out_less_than_a_hard_cut():
    _, scene_mask, empty = scene()
    photo, mask = product_photo()
    where = staging.target(scene_mask)
    hard = staging.composite(empty, photo, mask, where, feather=0, harmonize=0, shadow_opacity=0)
    soft = staging.composite(empty, photo, mask, where, feather=3, harmonize=0.5, shadow_opacity=0)
    assert staging.boundary_score(soft.image, soft.mask) < staging.boundary_score(
        hard.image, hard.mask
    )
    # the harmonisation is confined to the edge band: the interior keeps its colours
    assert np.array_equal(soft.product[soft.alpha == 1], hard.product[soft.alpha == 1])


def test_bad_inputs_name_what_is_wrong():
    _, scene_mask, empty = scene()
    photo, mask = product_photo()
    where = staging.target(scene_mask)
    with pytest.raises(ValueError, match="product's mask is empty"):
        staging.composite(empty, photo, np.zeros_like(mask), where)
    with pytest.raises(ValueError, match="product_mask is"):
        staging.composite(empty, photo, mask[:10], where)
    with pytest.raises(ValueError, match="outside"):
        staging.composite(empty, photo, mask, Target(Box(400, 10, 500, 100), ground=100))
