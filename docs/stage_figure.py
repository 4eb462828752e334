"""Draw docs/stage.png from a `restage stage --animate` output: for the first kept staged
images, the input photo, the retrieved scene, the staged image and a frame of its clip.

    .venv/bin/python docs/stage_figure.py --staged runs/staged --out docs/stage.png
"""

from __future__ import annotations

import argparse
import io

import av
import numpy as np
from PIL import Image, ImageDraw

from ray_app import storage

PANEL = 192
TITLES = ("input", "retrieved scene", "staged", "clip frame")


def clip_frame(uri: str, fraction: float = 0.25) -> Image.Image:
    """The frame ``fraction`` of the way through an MP4 clip."""
    with av.open(io.BytesIO(storage.read_bytes(uri))) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    return frames[int(fraction * (len(frames) - 1))]


def fit(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((PANEL, PANEL))
    canvas = Image.new("RGB", (PANEL, PANEL), (255, 255, 255))
    canvas.paste(image, ((PANEL - image.width) // 2, (PANEL - image.height) // 2))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--staged", required=True, help="a `restage stage --animate` output")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=2, help="kept images shown, one per row")
    args = parser.parse_args()
    table = storage.read_parquet(storage.join(storage.normalize_uri(args.staged), "manifest"))
    kept = [r for r in table.to_pylist() if r["kept"] and r["clip_uris"]][: args.rows]
    if not kept:
        raise SystemExit(f"{args.staged}: no kept image with a clip (run with --animate)")
    top = 22
    sheet = Image.new("RGB", (PANEL * 4, top + PANEL * len(kept)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, title in enumerate(TITLES):
        draw.text((i * PANEL + 6, 5), title, fill=(0, 0, 0))
    for j, row in enumerate(kept):
        panels = [
            Image.open(io.BytesIO(storage.read_bytes(row["source_uri"]))),
            Image.open(io.BytesIO(storage.read_bytes(row["scene_uri"]))),
            Image.open(io.BytesIO(storage.read_bytes(row["image_uri"]))),
            clip_frame(row["clip_uris"][0]),
        ]
        for i, panel in enumerate(panels):
            sheet.paste(fit(panel), (i * PANEL, top + j * PANEL))
    sheet.save(args.out)
    print(f"{args.out}: {len(kept)} rows, {np.asarray(sheet).shape[1::-1]}")


if __name__ == "__main__":
    main()
