"""The work queue of `restage train` without Ray: leases on demand, a restarted worker's
in-flight product goes back to the queue, and the summary sums come from the reports."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.train import _shard_rows, _with_completion
from pipelines.train_queue import STAGE_KEYS, ProductQueue
from ray_app import storage
from ray_app.storage import AdapterLayout


def _batch(*rows: tuple[str, str | None, bool]) -> pa.Table:
    ids = [r[0] for r in rows]
    return pa.table(
        {
            "product_id": pa.array(ids, pa.string()),
            "shard": pa.array([f"{i}.parquet" for i in ids], pa.string()),
            "error": pa.array([r[1] for r in rows], pa.string()),
            "complete": pa.array([r[2] for r in rows], pa.bool_()),
        }
    )


def _ok(pid: str, total: float = 1.0) -> dict:
    seconds = {k: 0.5 for k in STAGE_KEYS} | {"total": total}
    return {"product_id": pid, "status": "ok", "seconds": seconds, "steps": 3}


def test_products_go_to_whichever_worker_asks_next():
    queue = ProductQueue([_batch(*[(f"p{i}", None, False) for i in range(5)])])
    assert queue.has_work()
    first = queue.next("a", 0)  # rank 0 is slow with its first product
    taken = []
    while (pid := queue.next("b", 1)) is not None:
        taken.append(pid)
        queue.report(1, _ok(pid))
    assert first == "p0" and taken == ["p1", "p2", "p3", "p4"]
    queue.report(0, _ok(first, total=9.0))
    assert queue.next("a", 0) is None and not queue.has_work()
    res = queue.result()
    assert res["ok"] == 5 and res["failed"] == 0 and res["unreported"] == []
    by_rank = {w["rank"]: w for w in res["workers"]}
    assert by_rank[0]["products"] == 1 and by_rank[0]["slowest"]["product_id"] == "p0"
    assert by_rank[1]["products"] == 4
    assert res["stages"]["train"] == {"items": 15, "seconds": 2.5}
    assert res["stages"]["sweep"]["items"] == 0 and res["stages"]["load"]["items"] == 5


def test_ready_counts_the_products_to_do_up_to_a_bound_reading_no_further():
    """The job starts one worker per product to do at most: ``ready`` counts them (complete
    and invalid rows do not count, nor a product listed twice), reading batches only until
    the bound is met; every product is still leased once after it."""
    batches = [
        _batch(("p0", None, True), ("p1", None, False)),
        _batch(("p1", None, False), ("bad", "not a product id", False)),
        _batch(("p2", None, False), ("p3", None, False)),
        _batch(("p4", None, False)),
    ]
    read = []

    def stream():
        for b in batches:
            read.append(b)
            yield b

    queue = ProductQueue(stream())
    assert queue.ready(2) == 2 and len(read) == 3  # p1, p2: the fourth batch is not read
    assert queue.ready(1) == 1
    assert queue.ready(8) == 4 and len(read) == 4  # p1-p4: the stream ends first
    leased = []
    while (pid := queue.next("a", 0)) is not None:
        leased.append(pid)
        queue.report(0, _ok(pid))
    assert leased == ["p1", "p2", "p3", "p4"]
    assert ProductQueue([_batch(("p0", None, True))]).ready(4) == 0


def test_complete_and_invalid_shards_are_counted_and_never_leased():
    queue = ProductQueue(
        [
            _batch(("p0", None, True), ("Bad Id", "not a product id", False)),
            _batch(("p1", None, False)),
        ]
    )
    assert queue.next("a", 0) == "p1"
    queue.report(0, {"product_id": "p1", "status": "failed", "stage": "load"})
    assert queue.next("a", 0) is None
    res = queue.result()
    assert (res["listed"], res["invalid"], res["complete"], res["ok"], res["failed"]) == (
        3,
        1,
        1,
        0,
        1,
    )
    assert res["invalid_rows"] == [("Bad Id.parquet", "not a product id")]


def test_a_restarted_worker_redoes_only_its_unreported_product():
    queue = ProductQueue([_batch(*[(f"p{i}", None, False) for i in range(4)])])
    assert queue.next("old0", 0) == "p0"
    queue.report(0, _ok("p0"))
    assert queue.next("old0", 0) == "p1"  # in flight when the worker group restarts
    assert queue.next("old1", 1) == "p2"  # finished, but its report did not get through
    # The restarted group: each rank asks under a new key; its unreported lease comes back.
    assert queue.next("new1", 1) == "p2"
    queue.report(1, {"product_id": "p2", "status": "complete"})  # its adapter.json exists
    assert queue.next("new0", 0) == "p1"
    queue.report(0, _ok("p1"))
    assert queue.next("new0", 0) == "p3"
    queue.report(0, _ok("p3"))
    assert queue.next("new0", 0) is None and queue.next("new1", 1) is None
    res = queue.result()
    assert res["ok"] == 4 and res["complete"] == 0 and res["unreported"] == []


def test_a_product_listed_twice_or_finished_elsewhere_is_not_counted_twice():
    queue = ProductQueue([_batch(("p0", None, False), ("p0", None, False), ("p1", None, False))])
    assert queue.next("a", 0) == "p0"
    assert queue.next("b", 1) == "p1"  # not p0 again: it is in flight
    queue.report(0, {"product_id": "p0", "status": "complete"})  # another run finished it
    queue.report(0, _ok("p0"))  # not a lease any more: ignored
    queue.report(1, _ok("p1"))
    assert queue.next("a", 0) is None
    res = queue.result()
    assert (res["listed"], res["complete"], res["ok"]) == (3, 1, 1)


def test_shard_rows_name_one_product_per_shard_and_the_completion_is_checked(tmp_path):
    root = str(tmp_path / "aug")
    paths = [f"{root}/manifest/{name}" for name in ("p0.parquet", "p0.parquet", "Bad Id.parquet")]
    rows = _shard_rows(pa.table({"path": paths})).to_pylist()
    assert [(r["product_id"], r["shard"]) for r in rows] == [
        ("p0", "p0.parquet"),
        ("Bad Id", "Bad Id.parquet"),
    ]
    assert rows[0]["error"] is None and "Bad Id" in rows[1]["error"]
    out = str(tmp_path / "adapters")
    storage.write_json(AdapterLayout(out).metadata("p0"), {})
    done = _with_completion(_shard_rows(pa.table({"path": paths})), out)
    assert done["complete"].to_pylist() == [True, False]


@pytest.mark.parametrize("status", ["ok", "failed"])
def test_a_report_for_a_product_never_leased_is_ignored(status):
    queue = ProductQueue([_batch(("p0", None, False))])
    queue.report(0, {"product_id": "p0", "status": status})
    assert queue.result()["ok"] == queue.result()["failed"] == 0


def test_the_queue_writes_the_input_index_as_it_reads_and_marks_it_whole_at_the_end(tmp_path):
    from pipelines._job import InputIndex

    layout = AdapterLayout(str(tmp_path / "adapters"))
    storage.write_parquet(storage.join(layout.inputs_dir(), "old.parquet"), pa.table({"x": [1]}))
    storage.write_json(layout.inputs_complete(), {})
    batches = [
        _batch(("p0", None, True), ("bad name", "not a product id", False), ("p1", None, False)),
        _batch(("p2", None, False), ("p3", None, False)),
    ]
    queue = ProductQueue(batches, InputIndex(layout, rows_per_file=2))
    # The old index is gone at once, and the new one is not whole while the stream is read.
    assert not storage.exists(layout.inputs_complete())
    assert queue.next("a", 0) == "p1"
    assert not storage.exists(layout.inputs_complete())
    while (pid := queue.next("a", 0)) is not None:
        queue.report(0, _ok(pid))
    assert storage.exists(layout.inputs_complete())
    names = storage.list_names(layout.inputs_dir())
    assert names == ["part-000000.parquet", "part-000001.parquet"]  # at most 2 ids a part
    ids = [
        pid
        for n in names
        for pid in storage.read_parquet(storage.join(layout.inputs_dir(), n))
        .column("product_id")
        .to_pylist()
    ]
    assert ids == ["p0", "p1", "p2", "p3"]  # the valid ids, complete ones included
