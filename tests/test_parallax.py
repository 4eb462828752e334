"""The parallax animation (ray_app/parallax.py): small synthetic layers, a few frames."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from ray_app import parallax, storage
from ray_app.config import MAX_SHIFT_FRACTION
from ray_app.parallax import AnimationConfig, EncodeQuality, StageLayers

H, W = 48, 64
GRAY = 100.0
BLOB = (12.0, 12.0)  # (x, y) of the background's feature, far from the product
PRODUCT = (40.0, 30.0)  # (x, y) of the product disk's centre
YY, XX = np.mgrid[:H, :W].astype(np.float32)


def _layers(background: np.ndarray | None = None, shadow: bool = False) -> StageLayers:
    """A gray scene with one bright blob, a red disk of a product with a feathered edge."""
    if background is None:
        blob = 120 * np.exp(-((XX - BLOB[0]) ** 2 + (YY - BLOB[1]) ** 2) / (2 * 2.0**2))
        background = np.repeat((GRAY + blob)[..., None], 3, axis=2).astype(np.uint8)
    product = np.full((H, W, 3), 255, np.uint8)  # the studio white outside the matte
    product[...] = (200, 40, 40)
    r = np.hypot(XX - PRODUCT[0], YY - PRODUCT[1])
    alpha = np.clip(8.5 - r, 0, 1).astype(np.float32)
    shade = np.clip(10 - np.hypot(XX - PRODUCT[0], (YY - PRODUCT[1] - 9) * 3), 0, 1) * 0.5
    return StageLayers(background, product, alpha, shade.astype(np.float32) if shadow else None)


def _centroid(weights: np.ndarray) -> tuple[float, float]:
    total = weights.sum()
    return float((weights * XX).sum() / total), float((weights * YY).sum() / total)


def _rendered(layers: StageLayers, config: AnimationConfig) -> list[parallax.RenderedFrame]:
    return [parallax.render_frame(layers, p) for p in parallax.camera_path(config, W)]


@pytest.mark.parametrize("fmt", parallax.FORMATS)
def test_clip_decodes_with_the_frames_size_and_loop(tmp_path, fmt):
    config = AnimationConfig(frames=12, fps=12, shift=0.1, formats=[fmt])
    written = parallax.animate(_layers(), config, str(tmp_path / "clip"))
    clip = written[fmt]
    assert clip.uri == str(tmp_path / f"clip.{fmt}") and clip.num_bytes > 0
    info = parallax.probe(clip.uri, fmt)
    assert (info.frames, info.width, info.height) == (config.frames, W, H)
    assert (clip.frames, clip.width, clip.height) == (config.frames, W, H)
    assert info.loop == (None if fmt == "mp4" else 0)  # WebP and GIF loop forever
    assert parallax.decode_frame_count(storage.read_bytes(clip.uri), fmt) == config.frames


@pytest.mark.parametrize("fmt", ["mp4", "webp"])
def test_decoded_frames_look_like_the_rendered_ones(fmt):
    import av

    clip = parallax.frames(_layers(), AnimationConfig(frames=4, shift=0.1))
    data = parallax.encode_bytes(clip, fmt, 12)
    with av.open(io.BytesIO(data)) if fmt == "mp4" else Image.open(io.BytesIO(data)) as src:
        first = (
            next(src.decode(video=0)).to_ndarray(format="rgb24")
            if fmt == "mp4"
            else np.asarray(src.convert("RGB"))
        )
    assert np.abs(first.astype(int) - clip[0]).mean() < 4


def test_encode_writes_through_fsspec():
    clip = parallax.frames(_layers(), AnimationConfig(frames=4, shift=0.1))
    uri = "memory://parallax-test/clip.webp"
    try:
        parallax.encode(clip, "webp", 12, uri)
        assert parallax.decode_frame_count(uri, "webp") == 4
    finally:
        storage.remove(uri)


def test_mp4_of_an_odd_size_drops_the_last_row_and_column():
    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 255, (33, 35, 3), dtype=np.uint8) for _ in range(5)]
    info = parallax.probe(parallax.encode_bytes(clip, "mp4", 10), "mp4")
    assert (info.frames, info.width, info.height) == (5, 34, 32)  # yuv420p needs even sizes


@pytest.mark.parametrize("easing", ["sine", "smoothstep", "linear"])
def test_no_frame_shows_outside_the_background_at_the_largest_shift(easing):
    plain = np.full((H, W, 3), 180, np.uint8)
    layers = StageLayers(plain, plain, np.zeros((H, W), np.float32))
    config = AnimationConfig(
        frames=16, shift=MAX_SHIFT_FRACTION, zoom=0, background_depth=0.9, easing=easing
    )
    poses = parallax.camera_path(config, W)
    extreme = max(abs(p.background.dx) for p in poses)
    assert extreme == pytest.approx(config.background_depth * config.shift_px(W))
    for frame in parallax.frames(layers, config):  # a pixel off the layer would be black
        assert (frame == 180).all()
    # The cover zoom is the minimum: a pixel's worth less leaves the frame's edge uncovered.
    pose = max(poses, key=lambda p: abs(p.background.dx)).background
    _, covered = parallax.warp(plain.astype(np.float32), pose)
    assert covered.all()
    smaller = parallax.LayerPose(pose.dx, pose.scale * (1 - 2 / W))
    assert not parallax.warp(plain.astype(np.float32), smaller)[1].all()


def test_product_moves_more_than_the_background_by_the_parallax_ratio():
    config = AnimationConfig(frames=16, shift=0.1, zoom=0, background_depth=0.4)
    product_x, blob_x, product_y, blob_y = [], [], [], []
    for r in _rendered(_layers(), config):
        px, py = _centroid(r.alpha)
        # The blob from the frame itself: its top-left corner, which the product never
        # reaches, in green (the red product has less green than the gray scene).
        bright = np.clip(r.image[..., 1].astype(np.float32) - GRAY, 0, None)
        bright[20:, :] = 0
        bright[:, W // 2 :] = 0
        bx, by = _centroid(bright)
        product_x.append(px)
        blob_x.append(bx)
        product_y.append(py)
        blob_y.append(by)
    product_travel = np.ptp(product_x)
    blob_travel = np.ptp(blob_x)
    assert product_travel == pytest.approx(2 * config.shift_px(W) * config.product_depth, rel=0.02)
    assert product_travel > blob_travel
    assert product_travel / blob_travel == pytest.approx(config.parallax_ratio, rel=0.05)
    assert np.ptp(product_y) < 0.05 and np.ptp(blob_y) < 0.05  # the camera moves sideways


def test_zero_shift_and_no_zoom_give_the_still_composite():
    layers = _layers(shadow=True)
    still = layers.composite()
    for frame in parallax.frames(layers, AnimationConfig(frames=6, shift=0, zoom=0)):
        assert np.abs(frame.astype(int) - still).max() <= 1


def test_gaps_behind_the_moving_product_show_the_background():
    rng = np.random.default_rng(1)
    textured = rng.integers(50, 250, (H, W, 3), dtype=np.uint8)  # nothing in it is black
    config = AnimationConfig(frames=8, shift=0.15, easing="smoothstep")
    rendered = _rendered(_layers(textured), config)
    first = rendered[0]
    k = len(rendered) // 2  # the other end of the back-and-forth
    gap = (first.alpha > 0.99) & (rendered[k].alpha == 0)
    assert gap.sum() > 20
    shown = rendered[k].image[gap].astype(int)
    assert np.abs(shown - np.rint(rendered[k].background[gap])).max() <= 1
    assert shown.min() >= 50


@pytest.mark.parametrize("easing", ["sine", "smoothstep", "linear"])
def test_clip_loops_without_a_jump(easing):
    config = AnimationConfig(frames=12, shift=0.1, zoom=0.05, easing=easing)
    rendered = _rendered(_layers(), config)
    xs = [_centroid(r.alpha)[0] for r in rendered]
    steps = [abs(b - a) for a, b in zip(xs, xs[1:] + xs[:1], strict=True)]
    assert steps[-1] <= max(steps[:-1]) + 1e-6  # last → first is one more step
    images = [r.image.astype(np.float32) for r in rendered]
    diffs = [np.abs(b - a).mean() for a, b in zip(images, images[1:] + images[:1], strict=True)]
    assert diffs[-1] <= max(diffs[:-1]) * 1.01


def test_gif_has_one_palette_and_an_exact_loop_length():
    clip = parallax.frames(_layers(), AnimationConfig(frames=7, shift=0.1))
    data = parallax.encode_bytes(clip, "gif", 24, EncodeQuality(gif_colors=64))
    with Image.open(io.BytesIO(data)) as im:
        total = 0
        for i in range(im.n_frames):
            im.seek(i)
            total += im.info["duration"]
            palette = im.getpalette() or im.global_palette.palette  # frames >0 share it
            assert len(palette) // 3 <= 64
    assert total == pytest.approx(7 / 24 * 1000, abs=10)  # 10 ms ticks, no drift


def test_layer_validation_names_the_argument():
    good = _layers()
    with pytest.raises(ValueError, match="product has shape"):
        StageLayers(good.background, good.product[:-1], good.alpha)
    with pytest.raises(ValueError, match="alpha has shape"):
        StageLayers(good.background, good.product, good.alpha[:, :-1])
    with pytest.raises(ValueError, match=r"alpha ranges over .*divide an 8-bit matte by 255"):
        StageLayers(good.background, good.product, good.alpha * 2)
    with pytest.raises(ValueError, match="alpha has dtype uint8"):
        StageLayers(good.background, good.product, (good.alpha * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="shadow ranges"):
        StageLayers(good.background, good.product, good.alpha, good.alpha - 0.5)
    with pytest.raises(ValueError, match="background has dtype float32"):
        StageLayers(good.background.astype(np.float32), good.product, good.alpha)


def test_config_and_encoder_validation():
    with pytest.raises(ValidationError, match="frames"):
        AnimationConfig(frames=1)
    with pytest.raises(ValidationError, match=r"background_depth=1\.0 is not below"):
        AnimationConfig(background_depth=1.0, product_depth=1.0)
    with pytest.raises(ValidationError, match="lower shift"):
        AnimationConfig(shift=0.3)
    with pytest.raises(ValueError, match="lower shift"):
        AnimationConfig(shift=20, shift_unit="px").shift_px(64)
    with pytest.raises(ValidationError, match="drop 'gif'"):
        AnimationConfig(fps=60, formats=["gif"])
    with pytest.raises(ValidationError, match="extra"):
        AnimationConfig(shfit=0.1)
    clip = parallax.frames(_layers(), AnimationConfig(frames=3))
    with pytest.raises(ValueError, match="at least 2"):
        parallax.encode_bytes(clip[:1], "webp", 12)
    with pytest.raises(ValueError, match="frame 1 is"):
        parallax.encode_bytes([clip[0], clip[1][:-2]], "webp", 12)
    with pytest.raises(ValueError, match="name the file"):
        parallax.encode(clip, "mp4", 12, "/tmp/clip.webm")
    with pytest.raises(ValueError, match="use one of"):
        parallax.encode_bytes(clip, "avi", 12)


def test_missing_pyav_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    clip = parallax.frames(_layers(), AnimationConfig(frames=2))
    with pytest.raises(parallax.MissingEncoderError, match="pip install av"):
        parallax.encode_bytes(clip, "mp4", 12)


def test_a_pose_that_uncovers_the_frame_is_refused():
    pose = parallax.FramePose(parallax.LayerPose(5.0, 1.0), parallax.LayerPose(10.0, 1.0))
    with pytest.raises(ValueError, match=r"scale it by at least 1 \+ 2·\|dx\|/W = 1\.1562"):
        parallax.render_frame(_layers(), pose)
