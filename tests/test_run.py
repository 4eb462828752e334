"""`restage run`: augment -> train -> generate under one root. The real chain, on Ray, is
the README's quick start (tests/test_readme.py: its outputs, summary and resume); here the
chaining alone."""

from __future__ import annotations

import json
from pathlib import Path

from ray_app.config import load_config
from ray_app.storage import RunLayout


def test_run_chains_the_jobs_under_one_root_and_sums_their_products(monkeypatch, tmp_path):
    """The chaining alone, with the three jobs replaced by stand-ins (no Ray)."""
    import pipelines.run as run_module
    from ray_app.report import JobSummary

    calls: list[tuple[str, tuple]] = []

    def fake(name: str, products: dict[str, int], this_run: dict[str, int] | None = None):
        def job(config, *uris):
            calls.append((name, uris))
            summary = JobSummary(name, uris[-1] if name == "augment" else uris[1])
            summary.products = products
            summary.wall_seconds = 1.5
            if this_run is not None:  # augment's summary counts the whole job
                summary.whole_job, summary.extra = True, {"this_run": this_run}
            return summary

        return job

    # A re-run: augment finished 2 products before, 1 now; one failed, one record is invalid.
    whole = {"in manifest": 5, "invalid": 1, "already complete": 2, "ok": 3, "partial": 0}
    this_run = {"ok": 1, "partial": 0, "failed": 1}
    monkeypatch.setattr(run_module, "augment", fake("augment", {**whole, "failed": 1}, this_run))
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
    # What each job did in this run, augment's too (its own summary counts the whole job).
    assert summary.products == {
        "augment ok": 1,
        "augment failed": 1,
        "augment already complete": 2,
        "augment invalid": 1,
        "train ok": 1,
        "train already complete": 1,
        "generate failed": 0,
    }
    assert summary.stages["augment"].items_in == 2 and summary.stages["augment"].errors == 1
    assert summary.counts() == (2, 2)  # generate's products; augment's failed and invalid
    # augment's own line says which of its counts are this run's
    augment_line = run_module.augment(None, "m.jsonl", "out").render().splitlines()[0]
    assert (
        "already complete: 2, ok: 3, partial: 0, failed: 1; this run: ok: 1, partial: 0, "
        "failed: 1; 1.5s wall" in augment_line
    )
    assert summary.stages["generate"].items_out == 2  # partial products count as done
    saved = json.loads(Path(out, "summary.json").read_text())
    assert saved["job"] == "run" and [j["job"] for j in saved["jobs"]] == [
        "augment",
        "train",
        "generate",
    ]
