"""Benchmark the bytes of a product's row through `restage augment`: the pickled product
state (the ``state`` column Ray Data moves through the object store between stages), per
product, after each stage; for this tree and a baseline commit, in one run. Writes JSON to
bench/results/.

    python bench/row_bytes.py                              # tiny profile, the example products
    python bench/row_bytes.py --set augment.contexts.size=512 --set augment.negatives.size=512

The stages run in one process, in pipeline order (no Ray: a row's size does not depend on
the scheduler), on the example products; ``files`` is what the product's images and masks
take in storage once written, the figure a row carried whole before images were written
through. The baseline runs the same measurement on ``git archive BASELINE`` in a
subprocess.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The commit before rows carried references (images in the row between every stage).
BASELINE = "e9f5ead"


def measure(code: Path, overrides: list[str], work: Path, count: int) -> dict:
    """Row bytes per product after each stage, with the pipeline of the tree at ``code``,
    and the manifest rows it wrote (its file URIs relative to the output root)."""
    sys.path.insert(0, str(code))
    import numpy as np

    from pipelines import augment as job
    from ray_app import storage
    from ray_app.config import load_config
    from ray_app.records import read_manifest, records_table
    from ray_app.sources import SourcePolicy

    manifest = str(ROOT / "examples" / "products.jsonl")
    config = load_config("tiny", overrides=overrides)
    policy = SourcePolicy.for_manifest(manifest, config.storage)
    table = records_table(read_manifest(manifest).records[:count])
    stages = [cls(config) for cls, _ in job.model_stages(config)]
    root = str(work / "out")
    products = []
    for i in range(table.num_rows):
        row = table.slice(i, 1).to_pydict()
        batch = {k: np.array(v, dtype=object) for k, v in row.items()}
        # Since rows carry references, decode writes the real images under the job's root.
        if "root" in inspect.signature(job.decode_products).parameters:
            batch = job.decode_products(batch, config, policy, root)
        else:
            batch = job.decode_products(batch, config, policy)
        sizes = {"decode": len(batch["state"][0])}
        for stage in stages:
            batch = stage(batch)
            sizes[stage.name] = len(batch["state"][0])
        batch = job.select_products(batch, config)
        sizes["select"] = len(batch["state"][0])
        job.write_products(batch, config, root)
        pid = str(row["product_id"][0])
        files = 0
        for folder in ("images", "masks"):
            fs, path = storage.url_to_fs(storage.join(root, folder, pid))
            files += sum(fs.du(path, total=False).values()) if fs.exists(path) else 0
        rows = storage.read_parquet(storage.join(root, "manifest", f"{pid}.parquet")).to_pylist()
        for r in rows:
            for key in ("image_uri", "mask_uri"):
                r[key] = r[key] and r[key].removeprefix(root)
        products.append(
            {
                "product_id": pid,
                "samples": len(rows),
                "kept": sum(r["kept"] for r in rows),
                "row_bytes": sizes,
                "files_bytes": files,
                "manifest": rows,
            }
        )
    return {"products": products}


def _mean(products: list[dict], key) -> float:
    return round(sum(key(p) for p in products) / len(products))


def same_outputs(before: dict, after: dict, tolerance: float = 1e-5) -> list[str]:
    """Where the two runs' manifest rows differ (floats within ``tolerance``): empty if none."""
    diffs = []
    for b, a in zip(before["products"], after["products"], strict=True):
        if len(b["manifest"]) != len(a["manifest"]):
            diffs.append(f"{b['product_id']}: {len(b['manifest'])} vs {len(a['manifest'])} rows")
            continue
        for rb, ra in zip(b["manifest"], a["manifest"], strict=True):
            for key in rb.keys() | ra.keys():
                x, y = rb.get(key), ra.get(key)
                if isinstance(x, float) and isinstance(y, float):
                    if abs(x - y) > tolerance:
                        diffs.append(f"{rb['sample_id']}.{key}: {x} vs {y}")
                elif x != y:
                    diffs.append(f"{rb['sample_id']}.{key}: {x!r} vs {y!r}")
    return diffs


def summarise(run: dict) -> dict:
    products = run["products"]
    stages = list(products[0]["row_bytes"])
    return {
        "row_bytes_per_stage": {
            s: _mean(products, lambda p, s=s: p["row_bytes"][s]) for s in stages
        },
        "row_bytes_max": _mean(products, lambda p: max(p["row_bytes"].values())),
        "files_bytes": _mean(products, lambda p: p["files_bytes"]),
        "samples": _mean(products, lambda p: p["samples"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--products", type=int, default=1, help="example products to run")
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare against")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "row_bytes_tiny.json"))
    parser.add_argument("--measure", metavar="CODE", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    allow = f"storage.allowed_sources=[{ROOT / 'examples'}]"
    overrides = ["ray.progress_bars=false", allow, *args.overrides]

    if args.measure:
        with tempfile.TemporaryDirectory(prefix="restage-rowbytes-") as work:
            print(json.dumps(measure(Path(args.measure), overrides, Path(work), args.products)))
        return

    def run(code: Path) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--measure",
                str(code),
                "--products",
                str(args.products),
                *[a for o in args.overrides for a in ("--set", o)],
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=code,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    sys.path.insert(0, str(ROOT))
    from bench.common import machine
    from ray_app.report import format_table

    commit = subprocess.run(
        ["git", "rev-parse", args.baseline], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="restage-baseline-") as old:
        archive = subprocess.run(
            ["git", "archive", commit], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        before = run(Path(old))
    after = run(ROOT)
    b, a = summarise(before), summarise(after)
    diffs = same_outputs(before, after)
    result = {
        "benchmark": "row_bytes",
        "profile": "tiny",
        "overrides": args.overrides,
        "machine": machine("cpu"),
        "before": {"commit": commit, **b, "products": before["products"]},
        "after": {"commit": head, **a, "products": after["products"]},
        "same_manifest_rows": not diffs,
        "manifest_differences": diffs[:50],
    }
    print(
        format_table(
            ["after stage", "before B/product", "after B/product"],
            [
                [s, b["row_bytes_per_stage"][s], a["row_bytes_per_stage"].get(s, "-")]
                for s in b["row_bytes_per_stage"]
            ],
        )
    )
    print(
        f"largest row: {b['row_bytes_max']} B before, {a['row_bytes_max']} B after; "
        f"the product's images and masks in storage: {a['files_bytes']} B "
        f"({a['samples']} samples)"
    )
    print("manifest rows: " + ("the same" if not diffs else f"{len(diffs)} differences"))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
