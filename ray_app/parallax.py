"""Parallax animation of a staged image: the last step of ``restage stage``.

A staged image comes in layers (:class:`StageLayers`): the retrieved scene with its own
product removed and the area behind it inpainted (a full background), the pasted product with
its feathered alpha, and optionally the product's shadow. A virtual camera slides sideways
and pushes in slightly along a looping path (:func:`camera_path`); each layer moves by its
own depth factor, the product more than the background, which is what reads as depth.

- :func:`frames` renders the frames (numpy, separable bilinear, sub-pixel);
- :func:`encode` / :func:`encode_bytes` write MP4 (H.264 through PyAV), animated WebP and GIF
  (Pillow); :func:`animate` does both for every configured format;
- :func:`probe` / :func:`decode_frame_count` read a clip back (tests, checks).

No Ray and no models here: the job calls this once per staged image.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import posixpath
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image, features

from ray_app import storage
from ray_app.config import MAX_GIF_FPS, AnimationConfig, EncodeQuality  # the stage job's
from ray_app.config import AnimationFormat as Format

FORMATS: tuple[str, ...] = ("mp4", "webp", "gif")

# Coverage test slack, in source pixels (float error of the cover zoom at the very edge).
_EPS = 1e-4


class MissingEncoderError(ImportError):
    """An output format needs a package (or a build of one) that is not installed; the message
    names it and the pip command."""


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class StageLayers:
    """The layers of one staged image, all H×W.

    background: H×W×3 uint8, the scene with the removed product's area inpainted, i.e. what
        is behind the pasted product everywhere.
    product: H×W×3 uint8, the product where ``alpha`` > 0 (its white studio background
        elsewhere is never seen: layers are warped premultiplied by alpha).
    alpha: H×W float in [0, 1], the product's feathered matte.
    shadow: optional H×W float in [0, 1], the opacity of a black shadow that moves with the
        product (it darkens the background, under the product).
    """

    background: np.ndarray
    product: np.ndarray
    alpha: np.ndarray
    shadow: np.ndarray | None = None

    def __post_init__(self) -> None:
        bg = self.background
        if not isinstance(bg, np.ndarray) or bg.ndim != 3 or bg.shape[2] != 3:
            raise ValueError(
                f"background has shape {getattr(bg, 'shape', type(bg).__name__)}: give an "
                "H×W×3 uint8 RGB array"
            )
        h, w = bg.shape[:2]
        if h < 2 or w < 2:
            raise ValueError(f"background is {w}×{h} px: give an image at least 2×2")
        for name in ("background", "product"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.shape != (h, w, 3):
                raise ValueError(
                    f"{name} has shape {getattr(arr, 'shape', type(arr).__name__)}, the "
                    f"background {bg.shape}: give every layer the background's size"
                )
            if arr.dtype != np.uint8:
                raise ValueError(f"{name} has dtype {arr.dtype}: give uint8 RGB (0-255)")
        for name in ("alpha", "shadow"):
            arr = getattr(self, name)
            if arr is None and name == "shadow":
                continue
            if not isinstance(arr, np.ndarray) or arr.shape != (h, w):
                raise ValueError(
                    f"{name} has shape {getattr(arr, 'shape', type(arr).__name__)}: give an "
                    f"H×W float array of the background's size {(h, w)}"
                )
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(
                    f"{name} has dtype {arr.dtype}: give float opacities in [0, 1] "
                    "(e.g. mask.astype(np.float32) / 255)"
                )
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise ValueError(
                    f"{name} ranges over [{np.nanmin(arr):g}, {np.nanmax(arr):g}]: opacities "
                    "must be finite and in [0, 1] (divide an 8-bit matte by 255)"
                )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.background.shape[1], self.background.shape[0]

    def composite(self) -> np.ndarray:
        """The still staged image: shadow on the background, the product over both."""
        a = self.alpha.astype(np.float32)[..., None]
        bg = self.background.astype(np.float32)
        if self.shadow is not None:
            bg = bg * (1 - self.shadow.astype(np.float32)[..., None])
        out = self.product.astype(np.float32) * a + bg * (1 - a)
        return _to_uint8(out)


# --------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class LayerPose:
    """Where a layer is in one frame: scaled by ``scale`` about the image centre, then moved
    ``dx`` pixels to the right (output pixels)."""

    dx: float
    scale: float


@dataclass(frozen=True)
class FramePose:
    """The poses of the two layer groups in one frame (the shadow moves with the product)."""

    background: LayerPose
    product: LayerPose


def _path(easing: str, t: float) -> tuple[float, float]:
    """(shift in [-1, 1], push-in in [0, 1]) at loop phase ``t`` in [0, 1); both are
    periodic, so frame N would equal frame 0 and the clip loops without a jump."""
    push = (1 - math.cos(2 * math.pi * t)) / 2  # peaks mid-loop, flat at the seam
    if easing == "sine":
        return math.sin(2 * math.pi * t), push
    # Back and forth from the left end: out in the first half of the loop, back in the second.
    half, u = (0, 2 * t) if t < 0.5 else (1, 2 * t - 1)
    e = u * u * (3 - 2 * u) if easing == "smoothstep" else u
    return (-1 + 2 * e) if half == 0 else (1 - 2 * e), push


def camera_path(config: AnimationConfig, width: int) -> list[FramePose]:
    """One :class:`FramePose` per frame of an image ``width`` wide.

    Frame i is at loop phase i/N: the step from the last frame back to the first is one more
    step of the same path. A layer of depth d moves by d·shift·path(t) pixels and is scaled by
    cover·(1 + d·zoom·push(t)).

    ``cover`` is the minimum zoom that keeps the background over the whole frame: a layer
    scaled by s about the centre and moved by dx covers [-W/2, W/2] when s·W/2 ≥ W/2 + |dx|,
    i.e. s ≥ 1 + 2|dx|/W. The background's |dx| is at most background_depth·shift, so
    cover = 1 + 2·background_depth·shift/W; the push-in only adds to it. Both layers get it
    (it is the camera's crop), so the product keeps its place on the scene; with zero shift
    it is 1 and the frames are the still composite.
    """
    shift = config.shift_px(width)
    cover = 1 + 2 * config.background_depth * shift / width
    poses = []
    for i in range(config.frames):
        p, z = _path(config.easing, i / config.frames)
        poses.append(
            FramePose(
                *(
                    LayerPose(dx=d * shift * p, scale=cover * (1 + d * config.zoom * z))
                    for d in (config.background_depth, config.product_depth)
                )
            )
        )
    return poses


# --------------------------------------------------------------------------- rendering


def _axis(n: int, pose_dx: float, scale: float) -> tuple[np.ndarray, ...]:
    """Bilinear taps along one axis: for each output pixel, the two source indices, the weight
    of the second, and whether the point lies on the source image at all."""
    centre = n / 2
    out = np.arange(n, dtype=np.float64) + 0.5 - centre  # output pixel centres, centred
    src = (out - pose_dx) / scale + centre - 0.5  # in source pixel indices
    inside = (src >= -0.5 - _EPS) & (src <= n - 0.5 + _EPS)
    # The half pixel outside the first and last centres is still on the image: clamp there.
    src = np.clip(src, 0, n - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (src - i0).astype(np.float32), inside


def warp(layer: np.ndarray, pose: LayerPose, dy: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Warp an H×W or H×W×C float layer by ``pose`` (sub-pixel, separable bilinear).

    Returns (warped layer, coverage): coverage is H×W bool, False where the frame shows
    nothing of the layer; the warped layer is 0 there. The transform is a scale about the
    centre plus a shift, so it separates into one pass per axis.
    """
    h, w = layer.shape[:2]
    x0, x1, wx, in_x = _axis(w, pose.dx, pose.scale)
    y0, y1, wy, in_y = _axis(h, dy, pose.scale)
    extra = (None,) * (layer.ndim - 2)
    rows = layer[:, x0] * (1 - wx[(None, slice(None), *extra)])
    rows += layer[:, x1] * wx[(None, slice(None), *extra)]
    out = rows[y0] * (1 - wy[(slice(None), None, *extra)])
    out += rows[y1] * wy[(slice(None), None, *extra)]
    coverage = in_y[:, None] & in_x[None, :]
    out[~coverage] = 0
    return out, coverage


@dataclass(frozen=True)
class RenderedFrame:
    """One frame and the layers it was composited from (for checks and debugging)."""

    image: np.ndarray  # H×W×3 uint8
    background: np.ndarray  # H×W×3 float32, the warped background (shadow not applied)
    alpha: np.ndarray  # H×W float32, the product's moved alpha


def render_frame(layers: StageLayers, pose: FramePose) -> RenderedFrame:
    """Composite one frame: the moved shadow darkens the warped background, the moved product
    goes over it with its moved alpha."""
    bg, covered = warp(layers.background.astype(np.float32), pose.background)
    if not covered.all():  # never with camera_path's poses: they carry the cover zoom
        w = layers.size[0]
        raise ValueError(
            f"background pose {pose.background} leaves part of the frame uncovered: scale it "
            f"by at least 1 + 2·|dx|/W = {1 + 2 * abs(pose.background.dx) / w:.4f}"
        )
    a = layers.alpha.astype(np.float32)
    # Premultiplied: the product's white studio background must not bleed into its edge.
    fg, _ = warp(layers.product.astype(np.float32) * a[..., None], pose.product)
    moved_a, _ = warp(a, pose.product)
    under = bg
    if layers.shadow is not None:
        shadow, _ = warp(layers.shadow.astype(np.float32), pose.product)
        under = bg * (1 - shadow[..., None])
    image = fg + under * (1 - moved_a[..., None])
    return RenderedFrame(image=_to_uint8(image), background=bg, alpha=moved_a)


def frames(layers: StageLayers, config: AnimationConfig) -> list[np.ndarray]:
    """The clip's frames, H×W×3 uint8, one per pose of :func:`camera_path`.

    Each frame warps the background and the product layer (with its alpha and shadow) by their
    own shift and zoom, then composites the product over the background. The background is a
    full layer (the removed product's area already inpainted), so the gaps that open behind
    the moving product show the background's own warped pixels, never a hole. The background's
    cover zoom keeps it over every pixel of every frame: no black border, ever.
    """
    w, _ = layers.size
    return [render_frame(layers, pose).image for pose in camera_path(config, w)]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedAnimation:
    """A clip written by :func:`encode`."""

    uri: str
    fmt: str
    frames: int
    width: int  # as encoded: MP4 drops an odd last column or row
    height: int
    num_bytes: int


def _check_frames(clip: Sequence[np.ndarray], fmt: str, fps: float) -> tuple[int, int]:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not an output format: use one of {list(FORMATS)}")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps={fps!r}: give a positive number of frames per second")
    if fmt == "gif" and fps > MAX_GIF_FPS:
        raise ValueError(
            f"fps={fps} for a GIF: browsers play frames faster than {MAX_GIF_FPS:g} fps at 10 "
            "fps; lower fps or encode MP4/WebP"
        )
    if len(clip) < 2:
        raise ValueError(f"{len(clip)} frame(s): an animation needs at least 2")
    shape = clip[0].shape
    for i, f in enumerate(clip):
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3 or f.shape != shape:
            raise ValueError(
                f"frame {i} is {f.dtype} {f.shape}, frame 0 {shape}: give H×W×3 uint8 frames "
                "of one size"
            )
    return shape[1], shape[0]


def _durations_ms(n: int, fps: float, tick: int) -> list[int]:
    """Per-frame delays in whole ``tick`` ms whose running sum tracks i/fps, so the loop's
    length is right even when 1000/fps is not a multiple of the format's tick."""
    edges = [round(i * 1000 / fps / tick) * tick for i in range(n + 1)]
    return [max(tick, b - a) for a, b in itertools.pairwise(edges)]


def _encode_mp4(clip: Sequence[np.ndarray], fps: float, q: EncodeQuality) -> tuple[bytes, int, int]:
    try:
        import av
    except ImportError:
        raise MissingEncoderError(
            "MP4 output needs PyAV (FFmpeg's libraries with libx264): pip install av"
        ) from None
    try:
        av.codec.Codec("libx264", "w")
    except Exception:
        raise MissingEncoderError(
            f"this PyAV ({av.__version__}) has no libx264 encoder, which H.264 MP4 needs: "
            "pip install --force-reinstall av (PyPI's wheels bundle it)"
        ) from None
    h, w = clip[0].shape[:2]
    # yuv420p halves the chroma planes: H.264 needs even sizes, so drop an odd last row/column.
    h2, w2 = h - h % 2, w - w % 2
    if h2 == 0 or w2 == 0:
        raise ValueError(f"frames are {w}×{h} px: MP4 needs at least 2×2")
    rate = Fraction(fps).limit_denominator(1001)
    # faststart (the index before the frames, so a browser plays while downloading) makes the
    # muxer rewrite its output by name, which an in-memory buffer has not: a scratch file.
    with tempfile.TemporaryDirectory(prefix="restage-mp4-") as tmp:
        scratch = os.path.join(tmp, "clip.mp4")
        _mux_h264(av, clip, scratch, rate, w2, h2, q)
        return storage.read_bytes(scratch), w2, h2


def _mux_h264(av, clip, path: str, rate: Fraction, w: int, h: int, q: EncodeQuality) -> None:
    with av.open(path, "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(q.mp4_crf), "preset": q.mp4_preset}
        for i, f in enumerate(clip):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


def _encode_webp(clip: Sequence[np.ndarray], fps: float, q: EncodeQuality) -> bytes:
    if not features.check("webp"):
        raise MissingEncoderError(
            "this Pillow was built without WebP: pip install --force-reinstall pillow "
            "(PyPI's wheels include libwebp)"
        )
    images = [Image.fromarray(f) for f in clip]
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=_durations_ms(len(clip), fps, 1),
        loop=0,  # forever
        quality=q.webp_quality,
        method=q.webp_method,
    )
    return buf.getvalue()


def _encode_gif(clip: Sequence[np.ndarray], fps: float, q: EncodeQuality) -> bytes:
    # One global palette from up to 8 frames spread over the loop: per-frame palettes make
    # the still parts of the scene flicker.
    sample = [clip[i] for i in np.linspace(0, len(clip) - 1, min(8, len(clip))).astype(int)]
    palette = Image.fromarray(np.concatenate(sample, axis=0)).quantize(
        colors=q.gif_colors, method=Image.Quantize.MEDIANCUT
    )
    dither = Image.Dither.FLOYDSTEINBERG if q.gif_dither else Image.Dither.NONE
    images = [Image.fromarray(f).quantize(palette=palette, dither=dither) for f in clip]
    buf = io.BytesIO()
    # GIF delays are in 1/100 s. Pillow merges identical consecutive frames (a clip without
    # motion decodes to fewer frames, with the same total duration).
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=_durations_ms(len(clip), fps, 10),
        loop=0,  # forever
        optimize=False,  # keep the shared palette as it is
    )
    return buf.getvalue()


def encode_bytes(
    clip: Sequence[np.ndarray], fmt: Format, fps: float, quality: EncodeQuality | None = None
) -> bytes:
    """Encode ``clip`` (H×W×3 uint8 frames) as ``fmt``: MP4 is H.264 yuv420p (an odd width or
    height loses its last column or row), WebP and GIF loop forever."""
    _check_frames(clip, fmt, fps)
    q = quality or EncodeQuality()
    if fmt == "mp4":
        return _encode_mp4(clip, fps, q)[0]
    return _encode_webp(clip, fps, q) if fmt == "webp" else _encode_gif(clip, fps, q)


def encode(
    clip: Sequence[np.ndarray],
    fmt: Format,
    fps: float,
    out_uri: str,
    quality: EncodeQuality | None = None,
) -> EncodedAnimation:
    """Encode ``clip`` as ``fmt`` (see :func:`encode_bytes`) and write it to ``out_uri`` (any
    fsspec URI, atomically, through :mod:`ray_app.storage`); ``out_uri`` ends in ``.{fmt}``."""
    w, h = _check_frames(clip, fmt, fps)
    ext = posixpath.splitext(out_uri)[1].lower()
    if ext != f".{fmt}":
        raise ValueError(
            f"out_uri={out_uri!r} does not end in .{fmt}: players pick the decoder by the "
            f"extension; name the file *.{fmt}"
        )
    q = quality or EncodeQuality()
    if fmt == "mp4":
        data, w, h = _encode_mp4(clip, fps, q)
    else:
        data = _encode_webp(clip, fps, q) if fmt == "webp" else _encode_gif(clip, fps, q)
    storage.write_bytes(out_uri, data)
    return EncodedAnimation(out_uri, fmt, len(clip), w, h, len(data))


def animate(
    layers: StageLayers, config: AnimationConfig, out_stem: str
) -> dict[str, EncodedAnimation]:
    """Render the clip once and write ``{out_stem}.{fmt}`` for every format of the config."""
    clip = frames(layers, config)
    return {
        fmt: encode(clip, fmt, config.fps, f"{out_stem}.{fmt}", config.quality)
        for fmt in config.formats
    }


# --------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class ClipInfo:
    """What a decoder sees in an encoded clip."""

    frames: int
    width: int
    height: int
    loop: int | None  # GIF/WebP loop count (0: forever); None for MP4, which has none


def probe(clip: str | bytes, fmt: Format) -> ClipInfo:
    """Decode a clip given by URI or bytes: frame count, size, loop count."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not an output format: use one of {list(FORMATS)}")
    data = storage.read_bytes(clip) if isinstance(clip, str) else clip
    if fmt == "mp4":
        try:
            import av
        except ImportError:
            raise MissingEncoderError("reading MP4 needs PyAV: pip install av") from None
        with av.open(io.BytesIO(data), "r") as container:
            decoded = list(container.decode(video=0))
        return ClipInfo(len(decoded), decoded[0].width, decoded[0].height, None)
    with Image.open(io.BytesIO(data)) as im:
        return ClipInfo(im.n_frames, im.width, im.height, im.info.get("loop"))


def decode_frame_count(clip: str | bytes, fmt: Format) -> int:
    """Frames a decoder finds in a clip given by URI or bytes."""
    return probe(clip, fmt).frames
