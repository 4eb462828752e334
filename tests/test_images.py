from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ray_app import storage
from ray_app.images import ImageError, decode_image, encode_png, load_images
from ray_app.records import ErrorRow
from ray_app.storage import JobLayout, write_errors

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    smooth = np.zeros((40, 60, 3), np.uint8)
    smooth[:20, :30] = (255, 0, 0)  # a red top-left quadrant survives JPEG
    img = Image.fromarray(smooth)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode_image(_encode(img, "JPEG", exif=exif, quality=95))
    assert decoded.rgb.shape == (60, 40, 3)
    expected = np.asarray(img.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(decoded.rgb.astype(int) - expected).mean() < 6  # JPEG noise only
    assert decoded.rgb[5, 35, 0] > 200  # red is now top-right


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA", "I;16", "RGBA"])
def test_modes_become_8bit_rgb(mode):
    base = Image.fromarray(RGB)
    if mode == "I;16":
        img = Image.fromarray((np.linspace(0, 65535, 40 * 60).reshape(40, 60)).astype(np.uint16))
    else:
        img = base.convert(mode)
    data = _encode(img, "JPEG" if mode == "CMYK" else "PNG")
    decoded = decode_image(data)
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == (40, 60, 3)
    assert decoded.source_mode == mode or (mode == "I;16" and decoded.source_mode.startswith("I"))
    if mode == "I;16":  # full 16-bit range maps onto the full 8-bit range
        assert decoded.rgb.min() == 0 and decoded.rgb.max() == 255


def test_alpha_is_kept_as_mask_hint_and_composited_on_white():
    rgba = np.dstack([RGB, np.full((40, 60), 255, np.uint8)])
    rgba[:, :20, 3] = 0
    decoded = decode_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert decoded.alpha is not None
    assert (decoded.alpha[:, :20] == 0).all() and (decoded.alpha[:, 20:] == 255).all()
    assert (decoded.rgb[:, :20] == 255).all()  # transparent pixels composited on white
    opaque = decode_image(_encode(Image.fromarray(RGB).convert("RGBA")))
    assert opaque.alpha is None  # a fully opaque alpha carries no hint


def test_max_side_downscales():
    big = np.zeros((300, 600, 3), np.uint8)
    assert decode_image(encode_png(big), max_side=100).rgb.shape == (50, 100, 3)


def _bad_files(tmp_path) -> dict[str, tuple[str, str]]:
    jpeg = _encode(Image.fromarray(RGB), "JPEG")
    files = {
        "zero-byte": (b"", "empty file (0 bytes)"),
        "not-an-image": (b"<html>404 not found</html>", "not an image"),
        "truncated": (jpeg[: len(jpeg) // 2], "truncated or corrupt"),
        "bomb": (_encode(Image.new("L", (9000, 9000))), "decompression-bomb guard"),
        "too-small": (encode_png(np.zeros((4, 4, 3), np.uint8)), "shorter side is below"),
    }
    out = {}
    for name, (data, reason) in files.items():
        path = tmp_path / f"{name}.img"
        path.write_bytes(data)
        out[name] = (str(path), reason)
    out["missing"] = (str(tmp_path / "nope.jpg"), "file not found")
    return out


def test_every_bad_image_lands_in_errors_manifest(tmp_path):
    bad = _bad_files(tmp_path)
    good = tmp_path / "good.png"
    good.write_bytes(encode_png(RGB))
    uris = [str(good)] + [uri for uri, _ in bad.values()]
    loaded, failed = load_images(uris, max_megapixels=50, max_side=None, min_side=16)
    assert [img.uri for img in loaded] == [str(good)]

    layout = JobLayout(str(tmp_path / "run"))
    write_errors(
        layout,
        "prod-1",
        [ErrorRow("augment", "decode", reason, "prod-1", item=uri) for uri, reason in failed],
    )
    table = storage.read_parquet(layout.errors_dir()).to_pylist()
    by_item = {row["item"]: row["reason"] for row in table}
    for name, (uri, reason) in bad.items():
        assert reason in by_item[uri], name
    assert all(row["product_id"] == "prod-1" for row in table)


def test_decode_error_messages_are_specific():
    with pytest.raises(ImageError, match=r"9000x9000 \(81.0 MP\), above images.max_megapixels=50"):
        decode_image(_encode(Image.new("L", (9000, 9000))), max_megapixels=50)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_an_animation_decodes_to_its_first_frame_and_says_how_many_it_had(fmt):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    frames = [Image.new("RGB", (64, 48), c) for c in colours]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)
    decoded = decode_image(buf.getvalue())
    assert decoded.frames == 3
    assert decoded.rgb.shape == (48, 64, 3)
    assert tuple(decoded.rgb[24, 32]) == pytest.approx(colours[0], abs=8)
    still = io.BytesIO()
    frames[1].save(still, format=fmt)
    assert decode_image(still.getvalue()).frames == 1
