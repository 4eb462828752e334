"""Image decoding and encoding used by every job.

Inputs arrive as bytes from any fsspec URI. ``decode_image`` applies the EXIF orientation,
converts grayscale, palette, CMYK, 16-bit and RGBA images to 8-bit RGB (alpha is kept as a
mask hint), and rejects empty, truncated, non-image and oversized images with an
``ImageError`` whose message is the reason written to the errors manifest.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An input image cannot be used; the message is the reason for the errors manifest."""


@dataclass(frozen=True)
class DecodedImage:
    """An 8-bit RGB image, its alpha channel as a mask hint, and what it was converted from."""

    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None  # (H, W) uint8, or None when the source had no transparency
    source_mode: str
    source_size: tuple[int, int]  # (width, height) before any downscale
    frames: int = 1  # frames in the source; an animation (GIF, APNG, WebP) uses its first


def _to_rgb(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = (
                np.clip(arr, 0.0, 1.0) * 255.0
                if arr.max(initial=0) <= 1.0
                else np.clip(arr, 0, 255)
            )
        elif arr.dtype != np.uint8:
            peak = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
            arr = arr.astype(np.float64) * (255.0 / peak)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif (
        mode == "LA"
        or mode == "PA"
        or (mode == "L" and "transparency" in img.info)
        or (mode == "RGB" and "transparency" in img.info)
    ):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        arr = np.asarray(img)
        alpha = arr[..., 3].copy()
        if alpha.min() == 255:
            return np.ascontiguousarray(arr[..., :3]), None
        # Transparent pixels often hold garbage colour; composite on white like a catalog.
        a = alpha[..., None].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), alpha
    if img.mode != "RGB":  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX ...
        img = img.convert("RGB")
    return np.asarray(img).copy(), None


def decode_image(
    data: bytes,
    *,
    max_megapixels: float = 64.0,
    max_side: int | None = None,
    min_side: int = 1,
) -> DecodedImage:
    """Decode encoded image bytes into 8-bit RGB; raise ``ImageError`` with the reason."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # our own megapixel limit is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb refused by the decoder: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image (unrecognised format, {len(data)} bytes)") from None
    except Exception as exc:  # PIL raises many types on corrupt headers
        raise ImageError(f"unreadable image header: {exc}") from None
    width, height = img.size
    megapixels = width * height / 1e6
    if megapixels > max_megapixels:
        raise ImageError(
            f"image is {width}x{height} ({megapixels:.1f} MP), above images.max_megapixels="
            f"{max_megapixels:g}: refusing to decode (decompression-bomb guard)"
        )
    try:
        # Pillow decodes the first frame of an animation; the caller records that it was one.
        frames = int(getattr(img, "n_frames", 1)) if getattr(img, "is_animated", False) else 1
        img.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img)
    except OSError as exc:
        raise ImageError(f"truncated or corrupt image data ({img.format}): {exc}") from None
    except Exception as exc:
        raise ImageError(f"cannot decode image ({img.format}): {exc}") from None
    if min(img.size) < min_side:
        raise ImageError(
            f"image is {img.size[0]}x{img.size[1]}: the shorter side is below {min_side} px"
        )
    source_mode = img.mode
    rgb, alpha = _to_rgb(img)
    if max_side and max(rgb.shape[:2]) > max_side:
        rgb, alpha = (
            downscale(rgb, max_side),
            (downscale(alpha, max_side) if alpha is not None else None),
        )
    return DecodedImage(
        rgb=rgb,
        alpha=alpha,
        source_mode=source_mode,
        source_size=(width, height),
        frames=frames,
    )


def downscale(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Resize so the longer side is ``max_side`` (Lanczos for images, nearest for masks)."""
    h, w = arr.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return arr
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.NEAREST if arr.ndim == 2 else Image.LANCZOS
    return np.asarray(Image.fromarray(arr).resize(size, resample))


def resize(arr: np.ndarray, size: tuple[int, int], mask: bool = False) -> np.ndarray:
    """Resize to (width, height); masks use nearest-neighbour so they stay binary."""
    if (arr.shape[1], arr.shape[0]) == tuple(size):
        return arr
    return np.asarray(Image.fromarray(arr).resize(size, Image.NEAREST if mask else Image.BICUBIC))


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the nonzero pixels, exclusive ends; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def crop_by_mask(
    rgb: np.ndarray, mask: np.ndarray, pad: float = 0.05, fill: int = 255
) -> np.ndarray | None:
    """The product alone, square: the mask's bounding box (padded by ``pad`` of its size),
    pixels outside the mask set to ``fill``, then padded with ``fill`` to a square around
    it. None for an empty mask. Used for segmented scores: the backbones' shortest-side
    resize and centre crop would otherwise score a tall bottle on its middle third."""
    box = mask_bbox(mask)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    px, py = round((x1 - x0) * pad), round((y1 - y0) * pad)
    h, w = mask.shape
    x0, y0, x1, y1 = max(0, x0 - px), max(0, y0 - py), min(w, x1 + px), min(h, y1 + py)
    crop = rgb[y0:y1, x0:x1].copy()
    crop[mask[y0:y1, x0:x1] == 0] = fill
    return pad_to_square(crop, fill)


def pad_to_square(rgb: np.ndarray, fill: int = 255) -> np.ndarray:
    """``rgb`` centred on a square canvas of its longer side, the margins ``fill``."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    out = np.full((side, side, *rgb.shape[2:]), fill, rgb.dtype)
    y, x = (side - h) // 2, (side - w) // 2
    out[y : y + h, x : x + w] = rgb
    return out


def paste_back(
    generated: np.ndarray, original: np.ndarray, keep: np.ndarray, feather: int
) -> np.ndarray:
    """Composite the kept pixels of ``original`` over ``generated``; pixels farther than
    ``feather`` inside the keep mask are exactly the original's."""
    alpha = keep.astype(np.float32) / 255.0
    if feather > 0:
        # Erode first so that the soft edge lies inside the product, then blur.
        eroded = Image.fromarray(keep).filter(ImageFilter.MinFilter(2 * feather + 1))
        soft = np.asarray(eroded.filter(ImageFilter.GaussianBlur(feather)), np.float32) / 255.0
        alpha = np.where(np.asarray(eroded) > 0, 1.0, soft) * (keep > 0)
    out = (
        generated.astype(np.float32) * (1 - alpha[..., None])
        + original.astype(np.float32) * alpha[..., None]
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    return np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(2 * pixels + 1)))


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) image or (H, W) mask."""
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def encode_jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode(arr: np.ndarray, fmt: str) -> bytes:
    if fmt == "png":
        return encode_png(arr)
    if fmt in ("jpg", "jpeg"):
        return encode_jpeg(arr)
    raise ValueError(f"unknown image format {fmt!r}: use png or jpeg")


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode bytes that this project wrote itself (no limits, no orientation)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    """Decode a mask PNG into a (H, W) uint8 array with values 0 or 255."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    return np.where(arr >= 128, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded input image and the URI it came from."""

    uri: str
    image: DecodedImage


def load_images(
    uris: Sequence[str],
    *,
    max_megapixels: float,
    max_side: int | None,
    min_side: int = 1,
    read: Callable[[str], bytes] | None = None,
) -> tuple[list[LoadedImage], list[tuple[str, str]]]:
    """Read and decode each URI; -> (decoded images, [(uri, reason), ...]).

    ``read`` is how bytes are fetched: a ``SourcePolicy.read`` for untrusted manifests
    (a refused URI is never touched), plain fsspec otherwise. One bad image never fails the
    others: a refusal, a missing file, a read error or a decode error becomes a
    (uri, reason) pair for the errors manifest.
    """
    from ray_app import storage
    from ray_app.sources import SourceRefused

    read = read or storage.read_bytes
    loaded, failed = [], []
    for uri in uris:
        try:
            data = read(uri)
        except SourceRefused as exc:
            failed.append((uri, str(exc)))
            continue
        except FileNotFoundError:
            failed.append((uri, "file not found"))
            continue
        except Exception as exc:  # permissions, network, ...: keep the reason, go on
            failed.append((uri, f"cannot read: {type(exc).__name__}: {exc}"))
            continue
        try:
            img = decode_image(
                data, max_megapixels=max_megapixels, max_side=max_side, min_side=min_side
            )
        except ImageError as exc:
            failed.append((uri, str(exc)))
            continue
        loaded.append(LoadedImage(uri, img))
    return loaded, failed
