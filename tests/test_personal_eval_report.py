"""The report of `restage personalize evaluate` (pipelines/personalize_evaluate.py) in headless
Chromium: its table of measures with both encoders and their difference, a plot per measure,
the per-product table; built from a constructed results table (no training)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from browser import broken_images, chromium_page, file_url

from pipelines.personalize_evaluate import (
    ENCODERS,
    RESULT_SCHEMA,
    summarize,
    write_report,
)
from ray_app.config import PersonalEvalConfig
from ray_app.storage import PersonalEvalLayout

PRODUCTS = ("backpack", "can", "candle", "teapot")
MEASURES = (
    ("classification", "auc"),
    ("classification", "balanced_accuracy"),
    ("retrieval", "ap"),
    ("retrieval", "recall@5"),
    ("detection", "ap50"),
    ("segmentation", "miou"),
)


def constructed(out: Path) -> tuple[Path, dict]:
    """Made-up results: the personal encoder better on most products, one value NaN."""
    rng = np.random.default_rng(0)
    rows = []
    for pid in PRODUCTS:
        for task, metric in MEASURES:
            base = float(rng.uniform(0.3, 0.7))
            for enc in ENCODERS:
                value = min(1.0, base + (0.2 if enc == "personal" else 0.0))
                if (pid, metric) == ("teapot", "miou"):
                    value = float("nan")  # no test mask
                rows.append(
                    {"product_id": pid, "encoder": enc, "task": task, "metric": metric,
                     "value": value, "n": 6}
                )  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    summary = {
        "encoders": "runs/catalog/encoders",
        "test": "runs/catalog/test.jsonl",
        "products": len(PRODUCTS),
        "failed": 0,
        "images": {"total": 96, "reference": 12, "val": 36, "test": 36, "distractors": 12},
        "errors": 0,
        "confidence": 0.95,
        **summarize(table, PersonalEvalConfig(), seed=0),
    }
    layout = PersonalEvalLayout(str(out))
    return Path(write_report(layout, summary, table)), summary


def test_the_report_in_headless_chromium(tmp_path):
    index, summary = constructed(tmp_path / "eval")
    with chromium_page(viewport=(1280, 1400)) as page:
        page.goto(file_url(index))
        assert broken_images(page) == []
        rows = page.locator("#measured-table tr")
        assert rows.count() == 1 + len(MEASURES)
        header = rows.first.inner_text()
        assert all(enc in header for enc in ENCODERS)
        for k, m in enumerate(summary["metrics"]):
            row = rows.nth(1 + k).inner_text()
            assert m["metric"] in row and f"{m['personal_better']} / {m['compared']}" in row
        # the constructed personal encoder is better on every product where both are measured
        assert summary["metrics"][0]["personal_better"] == len(PRODUCTS)
        assert page.locator("#plots svg").count() == len(MEASURES)  # a plot per measure
        for pid in PRODUCTS:
            assert page.get_by_text(pid, exact=True).count() >= 1
        shot = Path(os.environ.get("RESTAGE_SCREENSHOTS", tmp_path)) / "personalize-eval.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
