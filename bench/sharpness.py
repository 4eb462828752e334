"""Calibrate augment's ``filter.min_sharpness`` on real photos: the relative sharpness
(ray_app.metrics.sharpness at the training resolution, over the photo's own value) of
copies of each photo that a view or context could be, against the photo itself (1.0):

- ``576px``: the photo brought down to 576 px on its shorter side (the resolution Stable
  Video Diffusion generates a square photo's views at), as training then sees it: the
  best a novel view can be;
- ``blur-1``, ``blur-2``: Gaussian blur of sigma 1 and 2 px, soft views or outpaintings.

The default threshold should keep the first and drop the blurred. Writes JSON to
bench/results/.

    python bench/sharpness.py                    # ../shared/data/dreambooth, 1024 px
    python bench/sharpness.py --photos DIR --resolution 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from ray_app.config import load_config  # noqa: E402
from ray_app.metrics import sharpness  # noqa: E402

DREAMBOOTH = ROOT.parent / "shared" / "data" / "dreambooth"


def copies(photo: Image.Image) -> dict[str, np.ndarray]:
    w, h = photo.size
    s = 576 / min(w, h)
    small = photo.resize((round(w * s), round(h * s)), Image.LANCZOS)
    return {
        "576px": np.asarray(small),
        "blur-1": np.asarray(photo.filter(ImageFilter.GaussianBlur(1))),
        "blur-2": np.asarray(photo.filter(ImageFilter.GaussianBlur(2))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=DREAMBOOTH)
    parser.add_argument("--resolution", type=int, default=1024, help="train.resolution")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/sharpness.json")
    args = parser.parse_args()
    files = sorted(
        p
        for p in args.photos.rglob("*")
        if p.suffix.lower() in (".jpg", ".png") and "masks" not in p.parts  # examples' masks
    )
    if not files:
        sys.exit(f"no photos under {args.photos} (see ../shared/data/dreambooth/README.md)")
    ratios: dict[str, list[float]] = {}
    sizes = set()
    for path in files:
        photo = Image.open(path).convert("RGB")
        sizes.add(photo.size)
        own = sharpness(np.asarray(photo), None, args.resolution)
        for name, copy in copies(photo).items():
            ratios.setdefault(name, []).append(sharpness(copy, None, args.resolution) / own)
    default = load_config("default").augment.filter.min_sharpness
    table = {
        name: {
            "median": round(float(np.median(r)), 3),
            "p10": round(float(np.percentile(r, 10)), 3),
            "p90": round(float(np.percentile(r, 90)), 3),
            "min": round(float(np.min(r)), 3),
            "max": round(float(np.max(r)), 3),
            "kept_at_default": round(float(np.mean(np.array(r) >= default)), 3),
        }
        for name, r in ratios.items()
    }
    result = {
        "bench": "sharpness",
        "photos": len(files),
        "photo_sizes": sorted(f"{w}x{h}" for w, h in sizes)[:5],
        "resolution": args.resolution,
        "min_sharpness_default": default,
        "relative_sharpness": table,
        "machine": machine(),
    }
    print(f"{len(files)} photos, train.resolution {args.resolution}, default {default}")
    for name, row in table.items():
        print(
            f"  {name:8s} median {row['median']:.2f}  p10 {row['p10']:.2f}  "
            f"p90 {row['p90']:.2f}  kept at the default {row['kept_at_default']:.0%}"
        )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
