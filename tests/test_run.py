"""`restage run`: augment -> train -> generate under one root, on two sample products with
the tiny profile's defaults (the README's quick start, on two of its three products)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_app.config import load_config
from ray_app.records import read_manifest, write_manifest
from ray_app.storage import RunLayout

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_run_chains_the_three_jobs_and_resumes(ray_local, tmp_path):
    from pipelines.run import run

    records = read_manifest(str(EXAMPLES / "products.jsonl")).records[:2]
    manifest = str(tmp_path / "two.jsonl")
    write_manifest([r.to_row() for r in records], manifest)
    out = str(tmp_path / "run")
    # The manifest names the example images by absolute path, outside its own folder.
    allow = f"storage.allowed_sources=[{EXAMPLES}]"
    cfg = load_config("tiny", overrides=["ray.progress_bars=false", allow])
    summary = run(cfg, manifest, out)
    layout = RunLayout(out)
    ids = {r.product_id for r in records}
    assert summary.products == {
        "augment ok": 2,
        "augment failed": 0,
        "train ok": 2,
        "train failed": 0,
        "generate ok": 2,
        "generate failed": 0,
    }
    assert layout.augment.completed() == ids
    assert layout.adapters.completed() == ids
    assert layout.generations.completed() == ids
    for pid in ids:
        meta = json.loads(Path(layout.adapters.metadata(pid)).read_text())
        assert meta["training_set"]["uri"] == layout.augment.root
        rows = pq.read_table(layout.generations.manifest_shard(pid)).to_pylist()
        assert sum(r["kept"] for r in rows) == cfg.generate.top_n
    assert json.loads(Path(out, "summary.json").read_text())["job"] == "run"
    again = run(cfg, manifest, out)  # every step resumes: nothing is redone
    assert again.products["train ok"] == 0 and again.products["generate ok"] == 0
    assert [j["products"]["already complete"] for j in again.extra["jobs"]] == [2, 2, 2]


def test_run_chains_the_jobs_under_one_root_and_sums_their_products(monkeypatch, tmp_path):
    """The chaining alone, with the three jobs replaced by stand-ins (no Ray)."""
    import pipelines.run as run_module
    from ray_app.report import JobSummary

    calls: list[tuple[str, tuple]] = []

    def fake(name: str, products: dict[str, int]):
        def job(config, *uris):
            calls.append((name, uris))
            summary = JobSummary(name, uris[-1] if name == "augment" else uris[1])
            summary.products = products
            summary.wall_seconds = 1.5
            return summary

        return job

    monkeypatch.setattr(run_module, "augment", fake("augment", {"ok": 2, "failed": 1}))
    monkeypatch.setattr(run_module, "train", fake("train", {"ok": 1, "already complete": 1}))
    monkeypatch.setattr(run_module, "generate", fake("generate", {"partial": 2, "failed": 0}))
    out = str(tmp_path / "run")
    summary = run_module.run(load_config("tiny"), "m.jsonl", out)
    layout = RunLayout(out)
    assert calls == [
        ("augment", ("m.jsonl", layout.augment.root)),
        ("train", (layout.augment.root, layout.adapters.root, "m.jsonl")),
        ("generate", (layout.adapters.root, layout.generations.root)),
    ]
    assert summary.products == {
        "augment ok": 2,
        "augment failed": 1,
        "train ok": 1,
        "generate failed": 0,
    }
    assert summary.stages["augment"].items_in == 3 and summary.stages["augment"].errors == 1
    assert summary.stages["generate"].items_out == 2  # partial products count as done
    saved = json.loads(Path(out, "summary.json").read_text())
    assert saved["job"] == "run" and [j["job"] for j in saved["jobs"]] == [
        "augment",
        "train",
        "generate",
    ]
