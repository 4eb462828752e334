"""Screenshots of the evaluation report for the README: docs/report.png (the index) and
docs/report-product.png (a product page), taken in headless Chromium.

By default the report is written from a constructed evaluation output
(tests/eval_outputs.py): made-up numbers and synthetic "generated" images, with the real
DreamBooth photos of ../shared/data/dreambooth as reference photos when that folder is
present. It shows what the report looks like, not how well restage does. With
--evaluation, it pictures a real evaluation's report instead.

    python docs/make_screenshots.py [--out docs] [--evaluation runs/eval]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from browser import broken_images, chromium_page, file_url  # noqa: E402
from eval_outputs import write_evaluation  # noqa: E402

from ray_app.eval_report import write_report  # noqa: E402

DREAMBOOTH = ROOT.parent / "shared" / "data" / "dreambooth"
# Subject -> the colour of its synthetic "generated" images.
SUBJECTS = {
    "backpack": (200, 60, 50),
    "can": (60, 120, 200),
    "candle": (230, 200, 120),
    "clock": (90, 90, 90),
    "duck_toy": (240, 200, 40),
    "teapot": (120, 160, 110),
}
SCENES = (
    "on a wooden table in a sunlit kitchen",
    "on a rock by a mountain lake",
    "in a shop window at night",
    "on a beach towel",
    "on a marble counter",
    "in a snowy forest",
    "on a desk next to a laptop",
    "on a picnic blanket in a park",
)
VIEWPORT = (1280, 900)
PRODUCT_PAGE_HEIGHT = 1500  # the top of a product page: its references and first images


def _references() -> tuple[dict[str, tuple[str, tuple[int, int, int]]], dict[str, list[str]]]:
    """Products (id -> category, colour) and their real photos, when the folder is present."""
    if not (DREAMBOOTH / "products.jsonl").is_file():
        return {pid: (pid.replace("_", " "), c) for pid, c in SUBJECTS.items()}, {}
    records = [
        json.loads(line) for line in (DREAMBOOTH / "products.jsonl").read_text().splitlines()
    ]
    records = [r for r in records if r["product_id"] in SUBJECTS]
    products = {r["product_id"]: (r["category"], SUBJECTS[r["product_id"]]) for r in records}
    refs = {r["product_id"]: [str(DREAMBOOTH / u) for u in r["image_uris"][:4]] for r in records}
    return products, refs


def constructed_evaluation(work: Path) -> str:
    """An evaluation output with made-up numbers (tests/eval_outputs.py) -> its root."""
    products, references = _references()
    evaluation = write_evaluation(
        work / "evaluation",
        products=products,
        references=references,
        images_per_run=8,
        kept_per_run=4,
        size=192,
        prompt=lambda category, i: f"a photo of sks {category} {SCENES[i % len(SCENES)]}",
        backbones={
            "eval_clip": "tiny profile (numbers made up for this picture)",
            "eval_dino": "tiny profile (numbers made up for this picture)",
            "inception": "tiny profile (numbers made up for this picture)",
        },
    )
    return str(evaluation)


def make_screenshots(out: Path, evaluation: str) -> list[Path]:
    """Write the report of ``evaluation`` (an evaluation output's root) and screenshot its
    index and first product page into ``out``."""
    index = Path(write_report(evaluation, thumb_px=192))
    shots = [out / "report.png", out / "report-product.png"]
    with chromium_page(VIEWPORT) as page:
        page.goto(file_url(index))
        if broken_images(page):
            raise RuntimeError(f"images did not load: {broken_images(page)}")
        page.screenshot(path=str(shots[0]), full_page=True)
        page.click("#products-table a >> nth=0")
        page.wait_for_load_state("load")
        if broken_images(page):
            raise RuntimeError(f"images did not load: {broken_images(page)}")
        height = min(page.evaluate("document.body.scrollHeight"), PRODUCT_PAGE_HEIGHT)
        page.screenshot(
            path=str(shots[1]),
            full_page=True,
            clip={"x": 0, "y": 0, "width": VIEWPORT[0], "height": height},
        )
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder of the PNGs")
    parser.add_argument(
        "--evaluation",
        help="a local `restage evaluate --out` folder to picture (its report is rewritten); "
        "default: a constructed one with made-up numbers",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # A fixed folder, not a random one: its name is in the picture, which then only changes
    # when the report does.
    work = Path(tempfile.gettempdir()) / "restage-report-screenshots"
    shutil.rmtree(work, ignore_errors=True)
    try:
        evaluation = args.evaluation or constructed_evaluation(work)
        for shot in make_screenshots(args.out, evaluation):
            print(shot)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
