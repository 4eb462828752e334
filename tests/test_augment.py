"""`restage augment` end to end on a local Ray cluster, tiny profile: every kind of sample,
the ratio, scores, masks, errors for bad input, skipping complete products, and resume
after SIGKILL."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    DREAMBOOTH,
    EXAMPLES,
    driver_never_lists_the_catalog,
    kill_after_first_marker,
)
from PIL import Image

from pipelines.augment import augment
from ray_app import storage
from ray_app.config import load_config
from ray_app.images import decode_mask
from ray_app.kinds import MASK_IOU, POSITIVE_KINDS, SampleKind
from ray_app.records import SAMPLE_SCHEMA
from ray_app.storage import AugmentLayout

DREAMBOOTH_IDS = ["backpack", "teapot", "duck_toy"]
RESTAGE = str(Path(sys.executable).with_name("restage"))
# The manifests of these tests live in temporary folders and name the example images by
# absolute path: trust those folders explicitly, as a user would.
ALLOW = f"storage.allowed_sources=[{EXAMPLES}, {DREAMBOOTH}]"

pytestmark = pytest.mark.slow  # every test here uses the module's augment run on Ray


def _examples() -> list[dict]:
    """The three sample products plus two renamed copies (more products, same images)."""
    rows = [json.loads(line) for line in (EXAMPLES / "products.jsonl").read_text().splitlines()]
    for row in rows:
        row["image_uris"] = [str(EXAMPLES / u) for u in row["image_uris"]]
    copies = [dict(rows[i], product_id=rows[i]["product_id"] + "-b") for i in (0, 1)]
    return rows + copies


def _bad_inputs(folder: Path) -> list[dict]:
    good = str(EXAMPLES / "products/mug-red-001/00-white.jpg")
    jpeg = (EXAMPLES / "products/mug-red-001/01-wood.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(buf, format="PNG")
    (folder / "blank.png").write_bytes(buf.getvalue())
    return [
        {
            "product_id": "corrupt-004",
            "category": "mug",
            "image_uris": [good, str(folder / "truncated.jpg")],
        },
        {
            "product_id": "unreadable-005",
            "category": "mug",
            "image_uris": [str(folder / "empty.jpg"), str(folder / "notes.jpg")],
        },
        {
            "product_id": "blank-006",
            "category": "vase",
            "image_uris": [str(folder / "blank.png")] * 2,
        },
        {"product_id": "mug-red-001", "category": "mug", "image_uris": [good]},  # a duplicate id
        {"product_id": "../escape", "image_uris": [good]},
    ]


def _dreambooth() -> list[dict]:
    path = DREAMBOOTH / "products.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r["product_id"] in DREAMBOOTH_IDS]
    for row in rows:
        row["image_uris"] = [str(DREAMBOOTH / u) for u in row["image_uris"][:3]]
    return rows


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("augment")
    manifest = folder / "products.jsonl"
    manifest.write_text(
        "".join(json.dumps(r) + "\n" for r in _examples() + _bad_inputs(folder) + _dreambooth())
    )
    out = folder / "out"
    config = load_config("tiny", overrides=["ray.progress_bars=false", ALLOW])
    with pytest.MonkeyPatch.context() as patch:
        driver_never_lists_the_catalog(patch)
        summary = augment(config, str(manifest), str(out))
    table = storage.read_parquet(str(out / "manifest")).to_pandas()
    errors = storage.read_parquet(str(out / "errors")).to_pandas()
    return {
        "summary": summary,
        "out": out,
        "table": table,
        "errors": errors,
        "manifest": manifest,
        "config": config,
    }


def test_the_driver_never_holds_the_catalog(ray_local, tmp_path, monkeypatch):
    """A resumed job whose summary was lost: its products are read, checked against their
    markers and totalled in tasks, with every driver-side listing refused."""
    rows = [{"product_id": f"p-{i}", "image_uris": ["a.png"]} for i in range(5)]
    rows += [rows[0], {"product_id": "../x", "image_uris": ["a.png"]}]
    manifest = tmp_path / "products.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    layout = AugmentLayout(str(tmp_path / "out"))
    stats = {"decode": {"stage": "decode", "unit": "images", "items_in": 2, "items_out": 1}}
    for i in range(5):  # complete, as a killed invocation left them: markers, no summary
        status = "partial" if i == 0 else "ok"
        storage.write_json(layout.marker(f"p-{i}"), {"status": status, "stats": stats})
    driver_never_lists_the_catalog(monkeypatch)
    config = load_config("tiny", overrides=["ray.progress_bars=false"])
    summary = augment(config, str(manifest), layout.root)
    assert summary.products == {
        "in manifest": len(rows),
        "invalid": 2,
        "already complete": 5,
        "ok": 4,
        "partial": 1,
        "failed": 0,
    }
    assert summary.stages["decode"].items_in == 2 * 5  # the markers' stats, added up
    index = storage.read_parquet(layout.inputs_dir()).column("product_id").to_pylist()
    assert sorted(index) == [f"p-{i}" for i in range(5)]


def _check_product(table, pid: str) -> None:
    rows = table[table.product_id == pid]
    kept = rows[rows.kept]
    assert set(kept.kind) == set(SampleKind), (pid, set(kept.kind))
    n_pos, n_neg = kept.kind.isin(POSITIVE_KINDS).sum(), (~kept.kind.isin(POSITIVE_KINDS)).sum()
    assert n_neg > 0 and n_pos == 2 * n_neg, (pid, n_pos, n_neg)
    for name in ("clip_i", "clip_t", "dino", "score"):
        assert rows[name].notna().all(), (pid, name)
    masked = rows[rows.mask_uri.notna()]
    assert masked.seg_clip_i.notna().all() and masked.seg_dino.notna().all()
    assert rows[rows.kind == SampleKind.CONTEXT][MASK_IOU].notna().all()
    for uri in rows.image_uri:
        assert Path(uri).exists()
    for uri in masked.mask_uri:
        assert decode_mask(Path(uri).read_bytes()).any(), uri  # masks are never empty
    assert rows[~rows.kept].drop_reason.notna().all()
    assert rows[rows.kept].drop_reason.isna().all()
    reals = rows[rows.kind == SampleKind.REAL]
    assert reals.origin_uri.notna().all() and reals.mask_uri.notna().all()
    assert {"captioner", "segmenter", "clip", "dino"} <= set(dict(reals.models.iloc[0]))


@pytest.mark.parametrize("pid", ["mug-red-001", "bottle-teal-002", "cereal-box-003"])
def test_examples_get_every_kind_at_two_to_one(run, pid):
    _check_product(run["table"], pid)
    rows = run["table"][run["table"].product_id == pid]
    assert set(rows.type_source) == {"category"}


def test_dreambooth_products(run):
    if not _dreambooth():
        pytest.skip("../shared/data/dreambooth is absent: real photos not available here")
    for pid in DREAMBOOTH_IDS:
        _check_product(run["table"], pid)


def test_manifest_schema_and_files(run):
    table = storage.read_parquet(str(run["out"] / "manifest"))
    assert table.schema.equals(SAMPLE_SCHEMA)
    assert not run["table"].duplicated(["product_id", "sample_id"]).any()
    n_files = sum(1 for _ in (run["out"] / "images").rglob("*.png"))
    assert n_files == len(run["table"])  # one file per row, nothing written twice


def test_bad_input_lands_in_the_errors_manifest(run):
    errors, table = run["errors"], run["table"]
    reason = lambda pid: " | ".join(errors[errors.product_id == pid].reason)  # noqa: E731
    assert "truncated or corrupt" in reason("corrupt-004")
    assert "corrupt-004" in set(table.product_id)  # its good image still made a training set
    assert "no readable image" in reason("unreadable-005")
    assert "empty file" in reason("unreadable-005") and "not an image" in reason("unreadable-005")
    assert "unreadable-005" not in set(table.product_id)
    assert "no product found" in reason("blank-006")
    manifest_errors = errors[errors.stage == "manifest"].reason.tolist()
    assert any("duplicate product_id 'mug-red-001'" in r for r in manifest_errors)
    assert any("not safe as a path segment" in r for r in manifest_errors)
    summary = run["summary"]
    assert summary.products["failed"] == 1 and summary.products["invalid"] == 2
    assert not (run["out"] / "_done" / "unreadable-005.json").exists()  # retried by a re-run
    assert (run["out"] / "_done" / "corrupt-004.json").exists()


def test_summary_table_and_json(run):
    summary = run["summary"]
    text = summary.render()
    for stage in (
        "decode",
        "caption",
        "views",
        "segment",
        "inpaint",
        "negatives",
        "resegment",
        "score",
        "select",
        "write",
    ):
        assert stage in text
    saved = json.loads((run["out"] / "summary.json").read_text())
    stages = {s["stage"]: s for s in saved["stages"]}
    assert stages["select"]["dropped"] > 0 and stages["views"]["items_out"] > 0
    assert stages["decode"]["errors"] >= 3  # truncated, empty, not an image


def test_rerun_skips_complete_products(run, tmp_path):
    manifest = tmp_path / "done.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in _examples()))
    marker = run["out"] / "_done" / "mug-red-001.json"
    before = marker.stat().st_mtime_ns
    first = json.loads((run["out"] / "summary.json").read_text())
    summary = augment(run["config"], str(manifest), str(run["out"]))
    assert summary.products["already complete"] == 5 and summary.extra["this_run"]["ok"] == 0
    assert "; this run: ok: 0, partial: 0, failed: 0;" in summary.render()
    assert marker.stat().st_mtime_ns == before
    # The summary still covers the whole job: the complete products of the first run.
    saved = json.loads((run["out"] / "summary.json").read_text())
    for key in ("ok", "partial"):
        assert saved["products"][key] == first["products"][key]
    assert saved["completed"]["stages"] == first["completed"]["stages"]
    assert saved["completed"]["invocations"] == 2


N_KILLED = 3


def test_resume_after_sigkill_matches_an_uninterrupted_run(run, tmp_path, capsys):
    from ray_app import cli

    products = _examples()[:N_KILLED]  # enough to kill half-way, few enough to be quick
    manifest = tmp_path / "three.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in products))
    out = tmp_path / "out"
    args = [
        "augment",
        "--profile",
        "tiny",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--set",
        "ray.progress_bars=false",
        "--set",
        ALLOW,
    ]
    # The killed run is a `restage` process with its own local Ray, killed as a whole once
    # its first product is written.
    killed = [RESTAGE, *args]
    done_at_kill = kill_after_first_marker(killed, out, tmp_path / "killed.log")
    assert done_at_kill < len(products), "the run finished before it could be killed half-way"

    # The resumed run is the same command in this process, on the module's local Ray (the
    # resume reads nothing but `out`): a second fresh Ray and interpreter would only add
    # their start-up, and the module's warm workers make its actors start sooner.
    capsys.readouterr()
    status = cli.main(args)
    resumed = capsys.readouterr()
    assert status == 0, resumed.err[-3000:]
    assert "already complete:" in resumed.out
    # Its last line of its own (Ray's log monitor may print after it, e.g. a worker that a
    # loaded machine lost and Ray replaced).
    ours = [line for line in resumed.out.splitlines() if line.startswith("restage augment:")]
    assert ours[-1] == f"restage augment: done: {len(products)} products"
    # summary.json covers the whole job, the products finished before the kill included.
    saved = json.loads((out / "summary.json").read_text())
    assert saved["products"]["ok"] + saved["products"]["partial"] == len(products)
    assert saved["this_run"]["ok"] + saved["this_run"]["partial"] == len(products) - done_at_kill
    decode = next(s for s in saved["stages"] if s["stage"] == "decode")
    assert decode["items_in"] == sum(len(r["image_uris"]) for r in products)
    table = storage.read_parquet(str(out / "manifest")).to_pandas()
    reference = run["table"][run["table"].product_id.isin(set(table.product_id))]
    assert set(table.product_id) == {r["product_id"] for r in products}
    assert not table.duplicated(["product_id", "sample_id"]).any()
    kept = lambda t: set(zip(t[t.kept].product_id, t[t.kept].sample_id, strict=True))  # noqa: E731
    assert kept(table) == kept(reference)
    n_files = sum(1 for _ in (out / "images").rglob("*.png"))
    assert n_files == len(table)  # no leftovers of the killed run
    score = np.sort(table.score.to_numpy())
    assert np.allclose(score, np.sort(reference.score.to_numpy()), atol=1e-4)
