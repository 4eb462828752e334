"""Copy-paste staging benchmarks (`restage stage`, issue 15).

placement: on synthetic scenes whose product masks are known, the placement error of
``ray_app.staging`` — box IoU of the placed product against the scene product it replaces,
and how far its bottom is from the scene's ground line — against a naive baseline in the
same run (the product pasted at its photo's scale, centred on the scene product). Products
differ from the scene's in size and, within ``--max-aspect-change`` (the retrieval filter's
compatible shapes), in aspect ratio.

    python bench/stage.py placement [--scenes 300] [--max-aspect-change 1.1] [--out bench/results/stage_placement.json]

Retrieval (query time of exact vs ANN search, recall@10) is bench/stage_retrieval.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from bench.common import machine  # noqa: E402
from ray_app import staging  # noqa: E402
from ray_app.staging import Box  # noqa: E402


def _ellipse(h: int, w: int, box: Box) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    rx, ry = box.width / 2, box.height / 2
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1


def _shape(rng: np.random.Generator, h: int, w: int, box: Box) -> np.ndarray:
    """A product-like mask filling ``box``: a rectangle, an ellipse, or a body on a base."""
    kind = rng.integers(3)
    if kind == 0:
        mask = np.zeros((h, w), bool)
        mask[box.y0 : box.y1, box.x0 : box.x1] = True
        return mask
    if kind == 1:
        return _ellipse(h, w, box)
    mask = _ellipse(h, w, Box(box.x0, box.y0, box.x1, box.y1 - box.height // 5))
    cx = (box.x0 + box.x1) // 2
    mask[box.y1 - box.height // 4 : box.y1, cx - box.width // 4 : cx + box.width // 4] = True
    return mask


def placement(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    ious, ground_err, naive_ious, naive_ground = [], [], [], []
    start = time.perf_counter()
    for _ in range(args.scenes):
        h, w = int(rng.integers(256, 513)), int(rng.integers(256, 513))
        bh = int(rng.integers(h // 4, int(h * 0.8)))
        aspect = float(np.exp(rng.uniform(np.log(0.4), np.log(2.0))))
        bw = min(int(w * 0.9), max(8, round(bh * aspect)))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        scene_box = Box(x0, y0, x0 + bw, y0 + bh)
        scene_mask = _shape(rng, h, w, scene_box)
        where = staging.target(scene_mask)
        truth = Box.of(scene_mask)
        # the product: another size, an aspect within the compatible range, its own shape
        change = float(
            np.exp(rng.uniform(-np.log(args.max_aspect_change), np.log(args.max_aspect_change)))
        )
        ph = int(rng.integers(64, 400))
        pw = max(8, round(ph * truth.aspect * change))
        photo_h, photo_w = ph + 40, pw + 40
        product_box = Box(20, 20, 20 + pw, 20 + ph)
        mask = _shape(rng, photo_h, photo_w, product_box)
        photo = np.full((photo_h, photo_w, 3), 255, np.uint8)
        photo[mask] = rng.integers(0, 200, 3, dtype=np.uint8)
        empty = np.full((h, w, 3), 180, np.uint8)
        staged = staging.composite(empty, photo, mask, where, shadow_opacity=0.0)
        placed = Box.of(staged.mask)
        ious.append(placed.iou(truth))
        ground_err.append(abs(placed.y1 - where.ground))
        # naive: the photo's own scale, centred on the scene product, bottom on its bottom
        src = Box.of(mask)
        cx = (truth.x0 + truth.x1) // 2
        naive = Box(
            cx - src.width // 2, truth.y1 - src.height, cx - src.width // 2 + src.width, truth.y1
        )
        naive_ious.append(naive.iou(truth))
        naive_ground.append(abs(naive.y1 - where.ground))
    seconds = time.perf_counter() - start

    def stats(values: list[float]) -> dict:
        a = np.asarray(values, float)
        return {
            "mean": round(float(a.mean()), 4),
            "p5": round(float(np.percentile(a, 5)), 4),
            "min": round(float(a.min()), 4),
        }

    return {
        "benchmark": "stage.placement",
        "scenes": args.scenes,
        "max_aspect_change": args.max_aspect_change,
        "seed": args.seed,
        "restage": {
            "box_iou": stats(ious),
            "ground_error_px": {
                "mean": round(float(np.mean(ground_err)), 3),
                "max": int(np.max(ground_err)),
            },
            "seconds_per_scene": round(seconds / args.scenes, 4),
        },
        "baseline_naive_paste": {
            "box_iou": stats(naive_ious),
            "ground_error_px": {
                "mean": round(float(np.mean(naive_ground)), 3),
                "max": int(np.max(naive_ground)),
            },
        },
        "machine": machine("cpu"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("placement", help="placement error on synthetic scenes")
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--max-aspect-change", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage_placement.json"))
    args = parser.parse_args(argv)
    result = placement(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
