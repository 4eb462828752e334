from __future__ import annotations

import os
import threading

import pyarrow as pa
import pytest

from ray_app import storage
from ray_app.records import ErrorRow
from ray_app.storage import AdapterLayout, AugmentLayout, RunLayout, write_errors


@pytest.mark.parametrize("root", ["local", "memory"])
def test_atomic_write_leaves_no_temp_files(root, tmp_path):
    base = str(tmp_path) if root == "local" else "memory://restage-storage"
    uri = storage.join(base, "a", "b", "file.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")  # replacing is atomic too
    assert storage.read_bytes(uri) == b"two"
    assert storage.list_names(storage.join(base, "a", "b")) == ["file.bin"]
    fs, path = storage.url_to_fs(storage.join(base, "a", "b"))
    assert [p for p in fs.ls(path, detail=False) if ".tmp-" in p] == []


def test_concurrent_writers_never_expose_partial_files(tmp_path):
    uri = str(tmp_path / "x.bin")
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=storage.write_bytes, args=(uri, p)) for p in payloads]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        if os.path.exists(uri):
            seen.add(storage.read_bytes(uri))
    for t in threads:
        t.join()
    assert seen <= set(payloads)
    assert storage.read_bytes(uri) in payloads


def test_layouts_put_every_artifact_under_the_root():
    run = RunLayout("memory://runs/r1")
    aug = run.augment
    assert aug.image("p1", "s1") == "memory://runs/r1/augment/images/p1/s1.png"
    assert aug.mask("p1", "s1") == "memory://runs/r1/augment/masks/p1/s1.png"
    assert aug.manifest_shard("p1") == "memory://runs/r1/augment/manifest/p1.parquet"
    assert aug.marker("p1") == "memory://runs/r1/augment/_done/p1.json"
    assert (
        run.adapters.weights("p1")
        == "memory://runs/r1/adapters/p1/pytorch_lora_weights.safetensors"
    )
    assert run.generations.image("p1", "i0") == "memory://runs/r1/generations/images/p1/i0.png"


def test_markers_list_completed_products(tmp_path):
    layout = AugmentLayout(str(tmp_path / "aug"))
    assert layout.completed() == set()
    for pid in ["a", "b"]:
        storage.write_json(layout.marker(pid), {"status": "ok"})
    assert layout.completed() == {"a", "b"}
    adapters = AdapterLayout(str(tmp_path / "adapters"))
    storage.write_json(adapters.metadata("p1"), {"product_id": "p1"})
    storage.write_bytes(adapters.weights("p2"), b"partial run: no adapter.json")
    assert adapters.completed() == {"p1"}


def test_errors_shard_is_replaced_not_appended(tmp_path):
    layout = AugmentLayout(str(tmp_path))
    write_errors(layout, "p1", [ErrorRow("augment", "decode", "bad", "p1")] * 2)
    write_errors(layout, "p1", [ErrorRow("augment", "decode", "bad", "p1")])
    assert storage.read_parquet(layout.errors_dir()).num_rows == 1
    write_errors(layout, "p1", [])  # a clean re-run removes the stale shard
    assert storage.read_parquet(layout.errors_dir()).num_rows == 0


def test_read_parquet_folder_ignores_hidden_temp_files(tmp_path):
    storage.write_parquet(str(tmp_path / "d" / "a.parquet"), pa.table({"x": [1]}))
    (tmp_path / "d" / ".b.parquet.tmp-123").write_bytes(b"garbage")
    assert storage.read_parquet(str(tmp_path / "d")).column("x").to_pylist() == [1]


@pytest.mark.parametrize(
    ("uri", "base", "expected"),
    [
        ("a/b.png", "/data/m", "/data/m/a/b.png"),
        ("../x.png", "/data/m", "/data/x.png"),
        ("/abs/x.png", "/data/m", "/abs/x.png"),
        ("s3://b/x.png", "/data/m", "s3://b/x.png"),
        ("a.png", "s3://bucket/m", "s3://bucket/m/a.png"),
        ("a.png", "memory://m", "memory://m/a.png"),
    ],
)
def test_resolve_relative(uri, base, expected):
    assert storage.resolve_relative(uri, base) == expected


def test_normalize_uri_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize_uri("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.normalize_uri("file:///tmp/x") == "/tmp/x"
    assert storage.normalize_uri("s3://bucket/x/") == "s3://bucket/x"
