"""Storage on an object store (S3 as moto serves it, through s3fs), as every process of a
job sees it. Another process's writes (a marker, a claim, an adapter) must be seen at once:
a stale listing would redo finished products or serve a trained product as untrained."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ray_app import storage
from ray_app.storage import AdapterLayout, JobLayout
from tests.s3 import local_s3, new_bucket, put


@pytest.fixture(scope="module")
def s3_env():
    with local_s3() as env:
        yield env


@pytest.fixture
def bucket(s3_env):
    return new_bucket(s3_env)


def test_files_written_elsewhere_are_seen_after_a_listing(bucket):
    root, client = bucket
    layout = JobLayout(storage.join(root, "augment"))
    storage.write_json(layout.marker("p1"), {"ok": True})
    assert layout.completed() == {"p1"}  # a listing, which s3fs would otherwise cache
    assert not storage.exists(layout.marker("p2"))
    put(client, layout.marker("p2"))  # another worker finishes p2
    assert storage.exists(layout.marker("p2"))
    assert layout.completed() == {"p1", "p2"}
    assert storage.list_names(layout.markers_dir(), ".json") == ["p1.json", "p2.json"]


def test_an_adapter_trained_elsewhere_is_found_and_a_shard_folder_reads_whole(bucket):
    root, client = bucket
    adapters = AdapterLayout(storage.join(root, "adapters"))
    assert adapters.completed() == set()
    put(client, adapters.metadata("mug"))
    assert adapters.completed() == {"mug"}
    shards = storage.join(root, "manifest")
    storage.write_parquet(storage.join(shards, "a.parquet"), pa.table({"x": [1]}))
    assert storage.read_parquet(shards).column("x").to_pylist() == [1]
    storage.write_parquet(storage.join(shards, "b.parquet"), pa.table({"x": [2]}))
    assert sorted(storage.read_parquet(shards).column("x").to_pylist()) == [1, 2]


def test_writes_are_single_puts_and_claims_have_one_winner(bucket):
    root, _ = bucket
    uri = storage.join(root, "a", "file.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert storage.list_names(storage.join(root, "a")) == ["file.bin"]  # no temporary file
    claim = storage.join(root, "_claim", "p1")
    assert storage.create_exclusive(claim, b"worker-1")
    assert not storage.create_exclusive(claim, b"worker-2")  # conditional PUT refused
    assert storage.read_bytes(claim) == b"worker-1"
