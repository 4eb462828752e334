"""CPU seconds a job's driver spends setting the model libraries' environment
(``ray_app.models.apply_environment``): quieting diffusers and transformers by importing them
(what every driver did) against quieting only those already imported (what it does: a driver
loads no model, and ``load_model`` quiets them where they load). Each run is a fresh
interpreter, alternated. Writes JSON to bench/results/.

    python bench/driver_imports.py              # 5 runs of each
    python bench/driver_imports.py --repeats 9
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from ray_app.report import format_table  # noqa: E402

SETUP = "from ray_app import models\n"
SETTINGS = {
    "import to quiet (before)": SETUP + "models.quiet_libraries()\n",
    "quiet the imported (restage)": SETUP + "models.apply_environment(offline=True)\n",
}


def cpu_seconds(code: str) -> float:
    """User + system CPU seconds of a fresh interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/driver_imports_cpu.json")
    args = ap.parse_args()
    runs: dict[str, list[float]] = {label: [] for label in SETTINGS}
    cpu_seconds(SETUP)  # warm the page cache for both
    for _ in range(args.repeats):  # alternated: drift on a shared machine hits both
        for label, code in SETTINGS.items():
            runs[label].append(round(cpu_seconds(code), 2))
    median = {label: round(statistics.median(v), 2) for label, v in runs.items()}
    before, after = median.values()
    result = {
        "bench": "driver_imports",
        "machine": machine("cpu"),
        "repeats": args.repeats,
        "median_cpu_seconds": median,
        "all_cpu_seconds": runs,
        "saved_cpu_seconds_per_driver": round(before - after, 2),
    }
    print(format_table(["setting", "CPU seconds"], [[k, v] for k, v in median.items()]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
