from __future__ import annotations

import json

import pyarrow as pa
import pytest

from ray_app import records, storage
from ray_app.records import RecordError, read_manifest, validate_product_id, write_manifest


@pytest.mark.parametrize("pid", ["a", "mug-red-001", "SKU_12.v2", "0" * 128, "a..b"])
def test_valid_product_ids(pid):
    assert validate_product_id(pid) == pid


@pytest.mark.parametrize(
    "pid", ["CON", "con", "Nul", "NUL.json", "aux.tar.gz", "COM1", "lpt9", "PRN.png", "com0"]
)
def test_reserved_device_names_are_rejected(pid):
    with pytest.raises(RecordError, match="reserved device name"):
        validate_product_id(pid)


@pytest.mark.parametrize("pid", ["CONSOLE", "nul1", "COM10", "LPT", "aux-box", "con_1", "mycon"])
def test_names_that_only_start_like_a_device_are_fine(pid):
    assert validate_product_id(pid) == pid


def test_a_trailing_dot_is_rejected():
    with pytest.raises(RecordError, match="trailing dots"):
        validate_product_id("mug.")


@pytest.mark.parametrize(
    ("pid", "why"),
    [
        ("../x", "'/' are not allowed"),
        ("..", "must start with a letter or digit"),
        (".", "must start with a letter or digit"),
        ("", "empty"),
        ("a" * 129, "129 characters long"),
        ("café", "'é' are not allowed"),
        ("产品", "not allowed"),
        ("a/b", "'/' are not allowed"),
        ("a\\b", "not allowed"),
        (" a", "not allowed"),
        ("-x", "must start with a letter or digit"),
        ("a%2Fb", "'%' are not allowed"),
        ("a\x00", "not allowed"),
        (12, "must be a string"),
    ],
)
def test_unsafe_product_ids_are_rejected(pid, why):
    with pytest.raises(RecordError, match="product_id") as err:
        validate_product_id(pid)
    assert why in str(err.value)


RAW = [
    {
        "product_id": "mug-1",
        "category": "mug",
        "title": "Red mug",
        "image_uris": ["img/a.png", "img/b.png"],
        "attributes": {"color": "red", "height_cm": 9},
        "price": 12.5,
    },
    {"product_id": "../evil", "image_uris": ["x.png"]},
    {"product_id": "mug-1", "image_uris": ["img/c.png"]},
    {"product_id": "lamp-2", "image_uris": ["s3://bucket/lamp.jpg", "/abs/lamp.png"]},
    {"product_id": "empty-3", "image_uris": []},
]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("root", ["local", "memory"])
def test_manifest_formats_and_filesystems(fmt, root, tmp_path):
    base = str(tmp_path / "m") if root == "local" else f"memory://restage-test-{fmt}/m"
    uri = storage.join(base, f"products.{fmt}")
    write_manifest(RAW, uri)
    manifest = read_manifest(uri)
    assert [r.product_id for r in manifest.records] == ["mug-1", "lamp-2"]
    mug, lamp = manifest.records
    assert mug.category == "mug" and mug.title == "Red mug"
    assert mug.attributes == {"color": "red", "height_cm": "9"}
    # Relative URIs resolve against the manifest's folder, absolute ones stay.
    assert mug.image_uris == (storage.join(base, "img/a.png"), storage.join(base, "img/b.png"))
    assert lamp.image_uris[0] == "s3://bucket/lamp.jpg"
    reasons = [e.reason for e in manifest.errors]
    assert len(reasons) == 3
    assert "not safe as a path segment" in reasons[0]
    assert "duplicate product_id 'mug-1'" in reasons[1]
    assert "image_uris is empty" in reasons[2]
    assert all(e.stage == "manifest" and e.record for e in manifest.errors)
    if fmt != "csv":
        assert manifest.ignored_columns == ["price"]


def test_bad_json_line_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"product_id": "a", "image_uris": ["a.png"]}\n{not json\n\n["a list"]\n')
    manifest = read_manifest(str(path))
    assert [r.product_id for r in manifest.records] == ["a"]
    assert manifest.errors[0].item == "line 2" and "not valid JSON" in manifest.errors[0].reason
    assert "must be an object" in manifest.errors[1].reason


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ({"image_uris": ["a.png"]}, "product_id is missing"),
        ({"product_id": "a"}, "image_uris is empty"),
        (
            {"product_id": "a", "image_uris": "a.png|b.png", "attributes": "{bad"},
            "attributes must be a JSON",
        ),
        ({"product_id": "a", "image_uris": [""]}, "empty or non-string"),
        ({"product_id": "a", "image_uris": ["a.png"], "title": 5}, "title must be a string"),
        (
            {"product_id": "a", "image_uris": ["a.png"], "attributes": {"k": {"n": 1}}},
            "attributes.k must be a scalar",
        ),
    ],
)
def test_invalid_records(record, why):
    with pytest.raises(RecordError, match=why):
        records.validate_record(record, "/base")


def test_csv_cells_accept_json_lists_and_separators():
    a = records.validate_record({"product_id": "a", "image_uris": '["x.png", "y.png"]'}, "/b")
    b = records.validate_record({"product_id": "a", "image_uris": "x.png|y.png"}, "/b")
    assert a.image_uris == b.image_uris == ("/b/x.png", "/b/y.png")


def test_unknown_manifest_format():
    with pytest.raises(RecordError, match="unknown format"):
        read_manifest("/tmp/products.xlsx")


def test_records_table_round_trip():
    rec = records.validate_record(RAW[0], "/base")
    table = records.records_table([rec])
    assert table.schema.equals(records.PRODUCT_SCHEMA)
    assert records.ProductRecord.from_row(table.to_pylist()[0]) == rec


def test_errors_table_schema():
    err = records.ErrorRow(
        "augment",
        "decode",
        "file not found",
        product_id="a",
        item="/x.png",
        record=json.dumps({"a": 1}),
    )
    table = records.errors_table([err])
    assert table.schema.equals(records.ERROR_SCHEMA)
    assert table.column("reason").to_pylist() == ["file not found"]
    assert isinstance(table, pa.Table)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_read_in_tasks_says_what_read_manifest_says(ray_local, fmt, tmp_path, monkeypatch):
    """``manifest_dataset`` (Ray Data tasks) keeps the same records and writes the same
    errors as ``read_manifest``; a re-run replaces its errors shards, it does not add to
    them. The first read finds the duplicates in its reading task (a small manifest: one
    partition), the second by a shuffle into several partitions."""
    uri = str(tmp_path / f"products.{fmt}")
    write_manifest([*RAW, {"product_id": "mug-1", "image_uris": ["img/d.png"]}], uri)
    if fmt == "jsonl":  # a line Ray's own JSON reader would fail the whole read on
        with open(uri, "a") as f:
            f.write("{not json\n")
    expected = read_manifest(uri, job="augment")
    errors_dir = str(tmp_path / "errors")
    for per_partition in (records.MANIFEST_BYTES_PER_PARTITION, 64):
        monkeypatch.setattr(records, "MANIFEST_BYTES_PER_PARTITION", per_partition)
        rows = records.manifest_dataset(uri, "augment", errors_dir).take_all()
        valid = sorted((r for r in rows if r["status"] == records.VALID), key=lambda r: r["seq"])
        assert [r["product_id"] for r in valid] == [r.product_id for r in expected.records]
        assert valid[0]["image_uris"] == list(expected.records[0].image_uris)
        assert sum(r["status"] == records.INVALID for r in rows) == len(expected.errors)
        written = storage.read_parquet(records.manifest_errors_dir(errors_dir)).to_pylist()
        assert sorted((e["item"], e["reason"]) for e in written) == sorted(
            (e.item, e.reason) for e in expected.errors
        )


def test_the_duplicate_shuffle_has_a_partition_per_share_of_the_manifest(tmp_path, monkeypatch):
    from ray.data import DataContext

    uri = str(tmp_path / "products.jsonl")
    write_manifest(RAW, uri)
    assert records.shuffle_partitions(uri) == 1  # not Ray Data's default 200 for a few rows
    size = (tmp_path / "products.jsonl").stat().st_size
    monkeypatch.setattr(records, "MANIFEST_BYTES_PER_PARTITION", -(-size // 3))
    assert records.shuffle_partitions(uri) == 3
    monkeypatch.setattr(records, "MANIFEST_BYTES_PER_PARTITION", 1)
    assert (
        records.shuffle_partitions(uri)
        == DataContext.get_current().default_hash_shuffle_parallelism
    )
