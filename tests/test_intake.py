"""Intake's one pass (pipelines/_job.py): a task checks a block's markers and writes the
block's part of the input index and its tally; the driver adds the tallies up."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipelines import _job
from ray_app import storage
from ray_app.records import INVALID, VALID
from ray_app.storage import AdapterLayout, AugmentLayout


def _block(rows: list[tuple[str, str]]) -> pa.Table:
    return pa.table(
        {
            "product_id": [pid for pid, _ in rows],
            "status": [status for _, status in rows],
            "ignored": [["colour"] if pid == "b" else None for pid, _ in rows],
        }
    )


def _marker(layout: AugmentLayout, pid: str, status: str, finished: float) -> None:
    stats = {"decode": {"stage": "decode", "unit": "images", "items_in": 2}}
    storage.write_json(
        layout.marker(pid),
        {"product_id": pid, "status": status, "finished": finished, "stats": stats},
    )


def _index(layout: AugmentLayout) -> list[str]:
    return sorted(storage.read_parquet(layout.inputs_dir()).column("product_id").to_pylist())


def _tallies(layout: AugmentLayout) -> list[dict]:
    names = storage.list_names(layout.intake_dir(), ".json")
    return [json.loads(storage.read_bytes(storage.join(layout.intake_dir(), n))) for n in names]


def test_a_block_keeps_its_products_to_do_and_writes_its_index_part_and_tally(tmp_path):
    layout = AugmentLayout(str(tmp_path))
    _marker(layout, "b", "partial", finished=200.0)  # after the last summary: uncounted
    _marker(layout, "c", "ok", finished=50.0)  # counted by the last summary already
    block = _block([("a", VALID), ("b", VALID), ("c", VALID), ("bad", INVALID)])

    todo = _job.take_in(block, layout, since=100.0)

    assert todo["product_id"].to_pylist() == ["a"]
    assert set(todo["status"].to_pylist()) == {_job.TODO}
    assert _index(layout) == ["a", "b", "c"]  # every valid product, to do or complete
    (tally,) = _tallies(layout)
    assert tally["counts"] == {_job.TODO: 1, _job.COMPLETE: 2, INVALID: 1}
    assert tally["ignored"] == ["colour"]
    assert tally["uncounted"]["partial"] == 1 and tally["uncounted"]["ok"] == 0


def test_a_first_run_reads_no_marker(tmp_path, monkeypatch):
    """No marker folder: every valid product is to do, without a read per product; once a
    marker exists the markers are read again."""
    layout = AugmentLayout(str(tmp_path))
    assert _job.no_markers(layout)
    block = _block([("a", VALID), ("b", VALID), ("bad", INVALID)])
    reads = []
    read_json = storage.read_json

    def counted(uri):
        reads.append(uri)
        return read_json(uri)

    monkeypatch.setattr(storage, "read_json", counted)
    todo = _job.take_in(block, layout, since=None, fresh=_job.no_markers(layout))
    assert todo["product_id"].to_pylist() == ["a", "b"] and reads == []
    (tally,) = _tallies(layout)
    assert tally["counts"] == {_job.TODO: 2, INVALID: 1}
    _marker(layout, "b", "ok", finished=1.0)
    assert not _job.no_markers(layout)
    todo = _job.take_in(block, layout, since=None, fresh=_job.no_markers(layout))
    assert todo["product_id"].to_pylist() == ["a"] and len(reads) == 2
    # the adapters' markers are in their product folders: always read
    assert not _job.no_markers(AdapterLayout(str(tmp_path / "adapters")))


def test_a_retried_block_rewrites_its_own_files_so_nothing_counts_twice(tmp_path):
    layout = AugmentLayout(str(tmp_path))
    first = _block([("a", VALID), ("b", VALID)])
    second = _block([("c", VALID)])
    for block in (first, second, first):  # the first block's task ran twice
        _job.take_in(block, layout, since=None)
    assert len(storage.list_names(layout.inputs_dir())) == 2
    found = _job.Intake(rows=None, cpus=1)
    for tally in _tallies(layout):
        found.add(tally)
    assert found.todo == 3
    assert _index(layout) == ["a", "b", "c"]


def test_an_empty_block_writes_nothing(tmp_path):
    layout = AugmentLayout(str(tmp_path))
    todo = _job.take_in(_block([]).cast(_block([("a", VALID)]).schema), layout, since=None)
    assert todo.num_rows == 0
    assert storage.list_names(layout.intake_dir()) == []
    assert storage.list_names(layout.inputs_dir()) == []


def test_the_driver_adds_up_the_tallies(tmp_path):
    found = _job.Intake(rows=None, cpus=1)
    found.add({"counts": {"todo": 2, "invalid": 1}, "ignored": ["b"], "uncounted": {}})
    found.add({"counts": {"todo": 1, "complete": 4}, "ignored": ["a", "b"], "uncounted": {}})
    assert found.todo == 3
    assert found.counts[_job.COMPLETE] == 4 and found.counts[INVALID] == 1
    assert found.ignored == ["a", "b"]


def test_blocks_of_rows_without_ids_keep_their_own_tallies(tmp_path):
    layout = AugmentLayout(str(tmp_path))
    for key in ("line-3", "line-7"):  # unparseable lines: no product id, their own keys
        block = pa.table(
            {
                "product_id": pa.array([None], pa.string()),
                "key": [key],
                "status": [INVALID],
            }
        ).append_column("ignored", pa.array([None], pa.list_(pa.string())))
        _job.take_in(block, layout, since=None)
    found = _job.Intake(rows=None, cpus=1)
    for tally in _tallies(layout):
        found.add(tally)
    assert found.counts[INVALID] == 2


@pytest.mark.slow
def test_rows_to_do_stream_a_product_per_block_while_actors_hold_the_cpus(ray_local):
    """The stages' actors hold most CPUs while the rows are split: the split's tasks must
    ask for no more than the job's tasks do, or they never run (the job hangs)."""
    ray = ray_local

    @ray.remote
    class Hog:
        def ping(self) -> int:
            return 1

    free = 0.2
    rows = ray.data.from_items([{"product_id": f"p-{i}"} for i in range(6)]).repartition(2)
    found = _job.Intake(rows=rows.materialize(), cpus=free / 2)
    hog = Hog.options(num_cpus=ray.cluster_resources()["CPU"] - free).remote()
    ray.get(hog.ping.remote())
    try:
        split = _job.todo_rows(found).materialize()
    finally:
        ray.kill(hog)
    assert split.num_blocks() == 6
    assert sorted(r["product_id"] for r in split.iter_rows()) == [f"p-{i}" for i in range(6)]


@pytest.mark.slow
def test_the_rows_to_do_go_through_the_stages_as_successive_datasets(ray_local):
    """``ray.products_per_dataset`` cuts the rows to do into datasets built and run one after
    the other (Ray Data's driver memory per block is held while a dataset runs): every row
    goes through exactly once, a product per block, the next dataset built only when the
    previous one is drained."""
    ray = ray_local
    rows = ray.data.from_items([{"product_id": f"p-{i}"} for i in range(7)]).repartition(3)
    found = _job.Intake(rows=rows.materialize(), cpus=0.1)
    found.counts[_job.TODO] = 7
    built, drained = [], []

    def build(todo):
        assert len(built) == len(drained), "a dataset was built before the last one ended"
        built.append(todo.materialize())
        return built[-1]

    seen = []
    for batch in _job.Successive(found, 3, build).iter_batches(batch_size=None):
        seen += list(batch["product_id"])
        if len(seen) == sum(b.count() for b in built):
            drained.append(len(seen))
    assert [b.count() for b in built] == [3, 3, 1]
    assert all(b.num_blocks() == b.count() for b in built)  # a product per block
    assert sorted(seen) == sorted(f"p-{i}" for i in range(7))
    one = _job.Successive(found, 7, lambda todo: todo)
    assert len(one.parts()) == 1


@pytest.mark.slow
def test_a_parquet_read_starts_footer_readers_scaled_to_the_cluster(ray_local, tmp_path):
    """Ray Data lists parquet files through a pool of FooterReader actors, 32 per read unless
    told; a job reads parquet several times, and on a small cluster those processes were most
    of each read. init_ray scales the pool: one per 4 CPUs (4 here: one reader)."""
    import os

    import pyarrow.parquet as pq
    from ray._private.state import actors

    from ray_app import runtime

    assert os.environ[runtime.FOOTER_READERS_ENV] == "1"
    for i in range(6):
        pq.write_table(pa.table({"product_id": [f"p-{i}"]}), tmp_path / f"part-{i}.parquet")
    # Read from this Ray's GCS: the state API (ray.util.state) needs a dashboard, which the
    # tiny profile's Ray leaves out. Only this read's actors: the Ray may have served other
    # modules' reads before (conftest's ray_local), and the GCS lists dead actors too.
    before = set(actors())
    assert len(ray_local.data.read_parquet(str(tmp_path)).take_all()) == 6
    names = [a["ActorClassName"] for i, a in actors().items() if i not in before]
    readers = [n for n in names if "Footer" in n]
    assert 1 <= len(readers) <= 2, names  # a read lists twice: its schema, then its files


def test_footer_readers_are_one_per_4_cpus_up_to_rays_default():
    from ray_app import runtime

    assert [runtime.footer_readers(c) for c in (0, 2, 4, 8, 64, 128, 1024)] == [
        1, 1, 1, 2, 16, 32, 32
    ]  # fmt: skip
