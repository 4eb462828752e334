"""Render the sample products of ``examples/`` (run: ``python examples/render_products.py``).

Three simple products, each drawn on a white catalog background and on two textured
backgrounds (wood, fabric) at different positions and scales, so that the quick start works
on a fresh machine without any downloaded photo. Deterministic: same files every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256
HERE = Path(__file__).resolve().parent


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    h = w = SIZE
    if kind == "white":
        return np.full((h, w, 3), 246, np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "wood":
        grain = np.sin(
            (x * 0.08) + 3.0 * np.sin(y * 0.02) + rng.normal(0, 0.3, (h, w)).cumsum(1) * 0.02
        )
        base = np.array([150, 104, 64], np.float32)
        return base[None, None, :] * (0.85 + 0.15 * grain[..., None])
    if kind == "fabric":
        weave = 0.5 + 0.25 * (np.sin(x * 0.9) + np.sin(y * 0.9))
        base = np.array([90, 120, 150], np.float32)
        return base[None, None, :] * (0.8 + 0.2 * weave[..., None]) + rng.normal(0, 4, (h, w, 1))
    raise ValueError(kind)


def _shade(mask: np.ndarray, color: tuple[int, int, int], x0: int, x1: int) -> np.ndarray:
    """Cylindrical shading: bright in the middle, darker at the sides."""
    x = np.arange(SIZE, dtype=np.float32)
    t = np.clip((x - x0) / max(1, x1 - x0), 0, 1)
    light = 0.55 + 0.45 * np.sin(np.pi * t) + 0.15 * np.exp(-((t - 0.35) ** 2) / 0.005)
    img = np.array(color, np.float32)[None, None, :] * light[None, :, None]
    return np.clip(img, 0, 255) * mask[..., None]


def _mug(draw: ImageDraw.ImageDraw, cx: int, cy: int, s: float) -> tuple[int, int]:
    w, h = int(70 * s), int(80 * s)
    draw.rectangle([cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2], fill=255)
    draw.ellipse(
        [cx + w // 2 - int(10 * s), cy - int(25 * s), cx + w // 2 + int(28 * s), cy + int(20 * s)],
        outline=255,
        width=max(2, int(9 * s)),
    )
    return cx - w // 2, cx + w // 2


def _bottle(draw: ImageDraw.ImageDraw, cx: int, cy: int, s: float) -> tuple[int, int]:
    w, h = int(50 * s), int(100 * s)
    draw.rounded_rectangle(
        [cx - w // 2, cy - h // 2 + int(20 * s), cx + w // 2, cy + h // 2],
        radius=int(12 * s),
        fill=255,
    )
    draw.rectangle(
        [cx - int(10 * s), cy - h // 2, cx + int(10 * s), cy - h // 2 + int(22 * s)], fill=255
    )
    return cx - w // 2, cx + w // 2


def _box(draw: ImageDraw.ImageDraw, cx: int, cy: int, s: float) -> tuple[int, int]:
    w, h = int(70 * s), int(100 * s)
    draw.rectangle([cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2], fill=255)
    return cx - w // 2, cx + w // 2


PRODUCTS = {
    "mug-red-001": dict(
        category="mug",
        title="Red ceramic coffee mug",
        shape=_mug,
        color=(196, 40, 36),
        attributes={"color": "red", "material": "ceramic"},
    ),
    "bottle-teal-002": dict(
        category="cosmetics bottle",
        title="Teal serum bottle",
        shape=_bottle,
        color=(30, 150, 140),
        attributes={"color": "teal", "volume": "50 ml"},
    ),
    "cereal-box-003": dict(
        category="food package",
        title="Honey oat cereal box",
        shape=_box,
        color=(236, 176, 40),
        attributes={"flavour": "honey oat"},
    ),
}
SHOTS = [("white", 128, 132, 1.0), ("wood", 100, 140, 0.9), ("fabric", 150, 128, 1.15)]


def _mask(spec: dict, shot: int) -> tuple[np.ndarray, int, int]:
    """The product's silhouette in a shot (0..1) and its horizontal extent."""
    _, cx, cy, scale = SHOTS[shot]
    mask_img = Image.new("L", (SIZE, SIZE), 0)
    x0, x1 = spec["shape"](ImageDraw.Draw(mask_img), cx, cy, scale)
    return np.asarray(mask_img, np.float32) / 255.0, x0, x1


def render(product_id: str, spec: dict, shot: int) -> Image.Image:
    kind = SHOTS[shot][0]
    rng = np.random.default_rng(1000 * shot + sum(map(ord, product_id)))
    bg = _background(kind, rng)
    mask, x0, x1 = _mask(spec, shot)
    # Soft contact shadow under the object.
    shadow = Image.new("L", (SIZE, SIZE), 0)
    bottom = int(np.nonzero(mask.any(1))[0].max())
    ImageDraw.Draw(shadow).ellipse([x0 - 6, bottom - 6, x1 + 6, bottom + 8], fill=120)
    shadow_arr = (
        np.asarray(shadow.filter(ImageFilter.GaussianBlur(6)), np.float32)[..., None] / 255.0
    )
    bg = bg * (1.0 - 0.5 * shadow_arr)
    obj = _shade(mask, spec["color"], x0, x1)
    if spec["shape"] is _box:  # a printed label band on the package
        ys = np.nonzero(mask.any(1))[0]
        band = (np.arange(SIZE)[:, None] > ys.min() + (ys.max() - ys.min()) * 0.35) & (
            np.arange(SIZE)[:, None] < ys.min() + (ys.max() - ys.min()) * 0.6
        )
        obj = np.where((band & (mask > 0))[..., None], obj * 0.35 + 160, obj)
    img = bg * (1.0 - mask[..., None]) + obj
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def main() -> None:
    out = HERE / "products"
    records = []
    for pid, spec in PRODUCTS.items():
        (out / pid).mkdir(parents=True, exist_ok=True)
        uris = []
        for shot in range(len(SHOTS)):
            path = out / pid / f"{shot:02d}-{SHOTS[shot][0]}.jpg"
            render(pid, spec, shot).save(path, quality=92)
            uris.append(str(path.relative_to(HERE)))
        records.append(
            {
                "product_id": pid,
                "category": spec["category"],
                "title": spec["title"],
                "attributes": spec["attributes"],
                "image_uris": uris,
            }
        )
    (HERE / "products.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_test_manifest()
    print(
        f"wrote {sum(len(r['image_uris']) for r in records)} images of {len(records)} products under {out}"
    )


# The split of each shot in the test manifest of `restage personalize evaluate`.
TEST_SPLITS = ("reference", "val", "test")


def write_test_manifest() -> None:
    """``personalize_test.jsonl``: every photo labelled with its product, its exact mask
    (``products/<id>/masks/``) and a split (white: reference, wood: val, fabric: test), the
    README's example of `restage personalize evaluate`."""
    rows = []
    for pid, spec in PRODUCTS.items():
        (HERE / "products" / pid / "masks").mkdir(parents=True, exist_ok=True)
        for shot, split in enumerate(TEST_SPLITS):
            name = f"{shot:02d}-{SHOTS[shot][0]}"
            mask = Image.fromarray(((_mask(spec, shot)[0] > 0.5) * 255).astype(np.uint8))
            mask.save(HERE / "products" / pid / "masks" / f"{name}.png")
            rows.append(
                {
                    "image_uri": f"products/{pid}/{name}.jpg",
                    "product_id": pid,
                    "mask_uri": f"products/{pid}/masks/{name}.png",
                    "split": split,
                }
            )
    (HERE / "personalize_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
