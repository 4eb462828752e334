"""A whole `restage run` on an object store: the manifest and photos read from S3, every
output (augment set, adapters, generations, errors, summaries) written there, by the job's
Ray workers as much as by its driver. S3 is moto's server, reached through s3fs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_app import storage
from ray_app.storage import RunLayout
from tests.conftest import EXAMPLES
from tests.s3 import local_s3, new_bucket

pytestmark = pytest.mark.slow
RESTAGE = str(Path(sys.executable).with_name("restage"))


def test_a_run_reads_its_catalog_from_s3_and_writes_every_output_there(tmp_path):
    with local_s3() as env:
        root, client = new_bucket(env)
        good = json.loads((EXAMPLES / "products.jsonl").read_text().splitlines()[0])
        for uri in good["image_uris"]:
            storage.write_bytes(storage.join(root, "catalog", uri), (EXAMPLES / uri).read_bytes())
        missing = {**good, "product_id": "lost-photo-009", "image_uris": ["products/lost.jpg"]}
        manifest = storage.join(root, "catalog", "products.jsonl")
        storage.write_bytes(manifest, f"{json.dumps(good)}\n{json.dumps(missing)}\n".encode())
        out = storage.join(root, "run")
        proc = subprocess.run(
            [RESTAGE, "run", "--profile", "tiny", "--manifest", manifest, "--out", out,
             "--set", "augment.views.enabled=false"],
            cwd=tmp_path, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        last = proc.stdout.rstrip().splitlines()[-1]
        assert last == (
            f"restage run: done with failures: 1 of 2 products failed (reasons in {out}); "
            "re-running retries them"
        )

        pid = good["product_id"]
        run = RunLayout(out)
        augment = run.augment
        products = storage.read_json(storage.join(augment.root, "summary.json"))["products"]
        assert (products["ok"], products["failed"] + products["invalid"]) == (1, 1), products
        assert augment.completed() == {pid}
        errors = storage.read_parquet(augment.errors_dir()).to_pylist()
        assert {e["product_id"] for e in errors} == {"lost-photo-009"}  # the image and product
        assert (storage.join(root, "catalog/products/lost.jpg"), "file not found") in {
            (e["item"], e["reason"]) for e in errors
        }
        samples = [r for r in storage.read_parquet(augment.manifest_dir()).to_pylist() if r["kept"]]
        assert samples and all(storage.exists(r["image_uri"]) for r in samples)
        adapters = run.adapters
        assert adapters.completed() == {pid}
        assert len(storage.read_bytes(adapters.weights(pid))) > 0
        generated = storage.read_parquet(run.generations.manifest_dir()).to_pylist()
        kept = [r for r in generated if r["kept"]]
        assert kept and {r["product_id"] for r in kept} == {pid}
        assert all(r["image_uri"].startswith(out) and storage.exists(r["image_uri"]) for r in kept)
        assert list(tmp_path.iterdir()) == []  # nothing went to the working folder
        client.close()
