"""`restage evaluate` end to end on a local Ray (tiny profile): the tables of two runs, a run
that lacks a product (an error row, not a failed job), resume, and the inputs check."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.evaluate import METRICS, evaluate
from ray_app.config import load_config
from ray_app.records import EVAL_IMAGE_SCHEMA, EVAL_PRODUCT_SCHEMA
from ray_app.storage import EvaluationLayout, GenerationLayout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generated(ray_local, quickstart) -> tuple[str, str]:
    """The README quick start's generations (a session fixture other tests share) and its
    products manifest, whose photos are the references."""
    proc, out = quickstart
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(out / "generations"), str(out.parent.parent / "examples" / "products.jsonl")


def test_two_runs_get_tables_intervals_and_a_paired_difference(generated, tmp_path):
    gen, refs = generated
    empty = tmp_path / "empty"
    (empty / "manifest").mkdir(parents=True)  # a generate output with no product in it
    cfg = load_config("tiny", overrides=["ray.progress_bars=false"])
    out = str(tmp_path / "eval")
    runs = {"restage": [gen], "copy": [gen], "empty": [str(empty)]}
    summary = evaluate(cfg, runs, refs, out)
    layout = EvaluationLayout(out)
    tables = json.loads(Path(layout.tables()).read_text())
    assert tables["run_order"] == ["restage", "copy", "empty"]
    # generate wrote its kept images: top_n = 2 of each of the 3 products
    assert tables["products"] == 3 and tables["images"] == {"restage": 6, "copy": 6, "empty": 0}
    assert tables["comparable"] is False  # tiny backbones are not DreamBench's
    for metric in METRICS:
        a, b = tables["overall"]["restage"][metric], tables["overall"]["copy"][metric]
        assert a == b and a["n"] == 3 and a["lo"] <= a["mean"] <= a["hi"]
        assert tables["overall"]["empty"][metric]["n"] == 0
    pairs = {(p["a"], p["b"]): p["metrics"] for p in tables["paired"]}
    assert all(pairs["restage", "copy"][m]["mean"] == 0.0 for m in METRICS)
    assert pairs["restage", "empty"][METRICS[0]]["n"] == 0
    assert set(tables["per_category"]["restage"]) == {"mug", "cosmetics bottle", "food package"}
    fid = tables["distribution"]["restage"]
    assert fid["refused"] is None and fid["n_generated"] == 6 and fid["n_reference"] == 9
    assert tables["distribution"]["empty"]["refused"].startswith("too few images")

    images = pq.read_table(layout.per_image_dir(), schema=EVAL_IMAGE_SCHEMA)
    assert images.num_rows == 12 and set(images["run"].to_pylist()) == {"restage", "copy"}
    assert all(v is not None for m in METRICS for v in images[m].to_pylist()[:1])
    written = GenerationLayout(gen).images_dir("mug-red-001")
    assert all(u.startswith(str(Path(written).parent)) for u in images["image_uri"].to_pylist())
    products = pq.read_table(layout.per_product_dir(), schema=EVAL_PRODUCT_SCHEMA)
    assert products.num_rows == 9 and all(
        len(u) == 3 for u in products["reference_uris"].to_pylist()
    )

    # The empty run lacks every product: an error row each, and the products are partial.
    assert summary.products["partial"] == 3 and summary.products["failed"] == 0
    errors = pq.read_table(layout.errors_dir()).to_pylist()
    assert {e["reason"] for e in errors} == {"run 'empty' has no image of this product"}

    again = evaluate(cfg, runs, refs, out)  # resumes: every product is complete
    assert again.products["already complete"] == 3
    assert json.loads(Path(layout.tables()).read_text())["overall"] == tables["overall"]
    with pytest.raises(ValueError, match="holds an evaluation of other inputs"):
        evaluate(cfg, {"restage": [gen]}, refs, out)
