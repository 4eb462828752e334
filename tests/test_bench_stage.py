"""bench/stage.py runs as documented: placement on synthetic scenes puts products on the
scene product's box (IoU above 0.9) and ground line, far better than a naive paste."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_placement_bench_reports_the_box_iou_against_a_naive_paste(tmp_path):
    out = tmp_path / "placement.json"
    subprocess.run(
        [sys.executable, "bench/stage.py", "placement", "--scenes", "40", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())
    ours, naive = result["restage"], result["baseline_naive_paste"]
    assert result["scenes"] == 40
    assert ours["box_iou"]["mean"] > 0.9 and ours["box_iou"]["min"] > 0.85
    assert ours["ground_error_px"]["max"] <= 1
    assert naive["box_iou"]["mean"] < ours["box_iou"]["mean"] - 0.2
