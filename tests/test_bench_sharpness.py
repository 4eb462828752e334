"""bench/sharpness.py runs as documented and orders its copies: a resolution-limited copy
of a photo is sharper than a blurred one, and the default threshold sits between."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import EXAMPLES, ROOT


def test_sharpness_bench_separates_low_resolution_from_blur(tmp_path):
    out = tmp_path / "sharpness.json"
    subprocess.run(
        [sys.executable, "bench/sharpness.py", "--photos", str(EXAMPLES), "--resolution", "256",
         "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())
    table, default = result["relative_sharpness"], result["min_sharpness_default"]
    assert result["photos"] == 9
    assert table["576px"]["median"] > default > table["blur-2"]["median"]
    assert table["blur-1"]["median"] > table["blur-2"]["median"]
