"""One job skeleton: what augment and generate (and later jobs) share.

A job's driver holds counters, never one entry per product:

- **intake**: one pass of tasks over the job's input rows (a Ray Data dataset with
  ``product_id`` and ``status``): each checks its block's markers, writes the block's valid
  ids as a part of the job's input index (``layout.inputs_dir()``, read by ``input_ids``)
  and its counts (``layout.intake_dir()``), and keeps the rows to do, which are
  materialised (the driver holds block references only). Complete products never reach
  the model stages, and the rows to do stream into them a product per block.
- **the writer** (``write_product``): a product's files, manifest shard and errors shard,
  then its marker last; one small outcome row per product is all the driver receives.
- **the driver loop** (``run``): outcome rows -> counters and progress lines; in
  stage-by-stage mode the stage rows go once every product is written.
- **the job** (``execute``): plan, start Ray, intake, driver loop, under the node-loss
  guard; then ``finish`` writes the summary. The rows to do go through the stages as
  successive datasets of at most ``ray.products_per_dataset`` (``Successive``): Ray Data's
  driver memory per block is held while a dataset runs, so one dataset of a whole catalog
  of 10^7 products would hold ~85 GiB on the driver.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines._product_rows import ProductRow, ProductStage, map_stages
from pipelines._staged import STAGES_DIR, run_staged
from ray_app import storage
from ray_app.batching import object_array
from ray_app.config import RestageConfig
from ray_app.progress import ProgressFile
from ray_app.records import VALID
from ray_app.report import ALREADY, CompletedTotals, StageStats
from ray_app.storage import JobLayout, pyarrow_fs, write_errors

# Intake statuses besides VALID and INVALID (ray_app/records.py): a valid product whose
# marker exists is complete, the others are to do.
TODO, COMPLETE = "todo", "complete"
# Products per block into the model stages (see ``todo_rows``).
PRODUCTS_PER_BLOCK = 1
# Concurrent marker checks in one task (one small request each, on any store).
CHECK_THREADS = 16


# --------------------------------------------------------------------------- intake


def check_markers(
    batch: pa.Table, layout: JobLayout, since: float | None, fresh: bool = False
) -> pa.Table:
    """A Ray Data task: valid rows -> complete (their marker exists) or to do. A complete
    product whose marker no summary has counted (it finished after ``since``, the previous
    summary's ``counted_until``; any when None) gets its marker's status and stats in
    ``uncounted``. One small read per product: the marker itself, no existence check;
    none when ``fresh`` (the job has no marker at all: every valid product is to do)."""
    pids, status = batch["product_id"].to_pylist(), batch["status"].to_pylist()
    uncounted: list[str | None] = [None] * len(pids)
    valid = [i for i, s in enumerate(status) if s == VALID]

    def read(i: int) -> dict[str, Any] | None:
        try:
            return storage.read_json(layout.marker(pids[i]))
        except FileNotFoundError:
            return None

    if fresh:
        markers: list[dict[str, Any] | None] = [None] * len(valid)
    else:
        with ThreadPoolExecutor(CHECK_THREADS) as pool:
            markers = list(pool.map(read, valid))
    for i, marker in zip(valid, markers, strict=True):
        status[i] = TODO if marker is None else COMPLETE
        if marker is not None and (since is None or marker.get("finished", math.inf) > since):
            uncounted[i] = json.dumps(
                {"status": marker.get("status", "ok"), "stats": marker.get("stats", {})}
            )
    batch = batch.set_column(
        batch.schema.get_field_index("status"), "status", pa.array(status, pa.string())
    )
    return batch.append_column("uncounted", pa.array(uncounted, pa.string()))


def keep(batch: pa.Table, statuses: tuple[str, ...]) -> pa.Table:
    return batch.filter(pc.is_in(batch["status"], pa.array(statuses)))


def tally(batch: pa.Table) -> dict[str, Any]:
    """What a checked batch adds up to: products per status, the manifest columns
    ignored, and the totals of the complete products no summary has counted."""
    ignored = set()
    if "ignored" in batch.column_names:
        ignored = {c for cols in batch["ignored"].to_pylist() for c in cols or ()}
    totals = CompletedTotals()
    for text in batch["uncounted"].to_pylist():
        if text is not None:
            marker = json.loads(text)
            totals.add(marker["status"], marker["stats"])
    return {
        "counts": dict(Counter(batch["status"].to_pylist())),
        "ignored": sorted(ignored),
        "uncounted": totals.to_dict(),
    }


def _block_name(batch: pa.Table) -> str:
    """A name for an input block's files: the same block (a retried task) gets the same
    name, another block another (invalid rows may have no product id: their manifest
    key and line count too)."""
    cols = [c for c in ("product_id", "key", "where") if c in batch.column_names]
    text = json.dumps([batch[c].to_pylist() for c in cols])
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def take_in(
    batch: pa.Table, layout: JobLayout, since: float | None, fresh: bool = False
) -> pa.Table:
    """A Ray Data task over one input block: its markers checked (``check_markers``), its
    valid ids written as a part of the input index and its ``tally`` under the intake
    folder, both named after the block's ids (a retried task rewrites its own files)
    -> the rows to do. One pass: the index and the counts are side outputs of the check."""
    checked = check_markers(batch, layout, since, fresh)
    if checked.num_rows:  # an empty block counts nothing
        name = _block_name(batch)
        valid = keep(checked, (TODO, COMPLETE))
        if valid.num_rows:
            _write_index_part(layout, name, valid.select(["product_id"]))
        storage.write_json(storage.join(layout.intake_dir(), f"{name}.json"), tally(checked))
    return keep(checked, (TODO,))


@dataclass
class Intake:
    """A job's input rows to do (materialised) and what the driver knows of all of them."""

    rows: Any
    cpus: float  # of each task over them: the model stages' actors may hold the rest
    counts: Counter = field(default_factory=Counter)  # products per status
    ignored: list[str] = field(default_factory=list)
    # The complete products whose markers no summary has counted (check_markers).
    uncounted: CompletedTotals = field(default_factory=CompletedTotals)

    @property
    def todo(self) -> int:
        return self.counts[TODO]

    def add(self, counted: dict[str, Any]) -> None:
        self.counts.update(counted["counts"])
        self.ignored = sorted(set(self.ignored) | set(counted["ignored"]))
        self.uncounted.merge(CompletedTotals.from_dict(counted["uncounted"]))


def intake(rows: Any, layout: JobLayout, cpus: float, since: float | None = None) -> Intake:
    """One pass of ``take_in`` tasks over the input rows (module doc): the rows to do are
    materialised (small: references, not images), the index is marked whole, and the
    driver adds up one tally per input block. ``since``: see ``check_markers``."""
    _drop_inputs(layout)
    storage.remove(layout.intake_dir(), recursive=True)
    todo = rows.map_batches(
        take_in,
        fn_kwargs={"layout": layout, "since": since, "fresh": no_markers(layout)},
        batch_size=None,  # one block per call: a block's files are named after its ids
        batch_format="pyarrow",
        num_cpus=cpus,
    ).materialize()
    _mark_inputs_whole(layout)
    result = Intake(todo, cpus)
    names = storage.list_names(layout.intake_dir(), ".json")
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        for counted in pool.map(
            lambda n: storage.read_json(storage.join(layout.intake_dir(), n)), names
        ):
            result.add(counted)
    return result


def no_markers(layout: JobLayout) -> bool:
    """The job's first run (or one killed before its first product): no marker folder, so
    no product is complete and intake reads no marker (on an object store, one request per
    product saved: most of a first intake's requests). Only for layouts whose markers all
    live in that folder."""
    return type(layout).marker is JobLayout.marker and not storage.exists(layout.markers_dir())


def _write_index_part(layout: JobLayout, name: str, ids: pa.Table) -> None:
    storage.write_parquet(storage.join(layout.inputs_dir(), f"part-{name}.parquet"), ids)


def _mark_inputs_whole(layout: JobLayout) -> None:
    storage.write_json(layout.inputs_complete(), {"written": time.time()})


def _drop_inputs(layout: JobLayout) -> None:
    storage.remove(layout.inputs_complete())  # first: a half-removed index is never read
    storage.remove(layout.inputs_dir(), recursive=True)


class InputIndex:
    """A job's input index written a part at a time by one process that sees the ids go by
    (train's work queue), holding at most ``rows_per_file`` of them; the old index is
    removed first, and the new one is read only once ``close`` has marked it whole."""

    def __init__(self, layout: JobLayout, rows_per_file: int = 100_000):
        self.layout, self.rows_per_file = layout, rows_per_file
        self._ids: list[str] = []
        self._parts = 0
        _drop_inputs(layout)

    def add(self, ids: list[str]) -> None:
        self._ids.extend(ids)
        if len(self._ids) >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if self._ids:
            ids = pa.table({"product_id": pa.array(self._ids, pa.string())})
            _write_index_part(self.layout, f"{self._parts:06d}", ids)
            self._parts, self._ids = self._parts + 1, []

    def close(self) -> None:
        self._flush()
        _mark_inputs_whole(self.layout)


def input_ids(layout: JobLayout) -> Any:
    """A job's input product ids of its latest run, as a lazy dataset (``product_id``);
    None when the job has written no whole index."""
    import ray

    if not storage.exists(layout.inputs_complete()):
        return None
    fs, path = pyarrow_fs(layout.inputs_dir())
    return ray.data.read_parquet(path, filesystem=fs)


def todo_rows(found: Intake) -> Any:
    """The rows to do, split as they stream into the model stages: ``PRODUCTS_PER_BLOCK``
    per block (the stages' actor pools balance product by product, and the first product
    is out after one block, not after a share of the catalog). A streaming repartition:
    no barrier, and the driver holds references only to the blocks in flight."""
    import ray

    ds = found.rows.repartition(target_num_rows_per_block=PRODUCTS_PER_BLOCK)
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if type(op).__name__ != "StreamingRepartition" or not isinstance(
        getattr(op, "ray_remote_args", None), dict
    ):
        raise RuntimeError(
            f"this Ray ({ray.__version__}) plans a streaming repartition differently from the "
            "Ray restage was tested with (2.60): install ray>=2.60 (pyproject.toml)"
        )
    # Its tasks ask for a whole CPU and Ray's API takes no remote arguments for them: once
    # the stages' actors hold the CPUs such a task never runs (the job hangs). Ask for what
    # the job's other tasks ask for.
    op.ray_remote_args["num_cpus"] = found.cpus
    return ds


class Successive:
    """The model stages over the rows to do, as datasets of at most ``per_dataset`` rows
    built and run one after the other; ``iter_batches`` goes through all of them (one
    dataset, as before, when the rows fit). ``build``: a dataset of rows -> the job's
    pipeline over them."""

    def __init__(self, found: Intake, per_dataset: int, build: Callable[[Any], Any]):
        self.found, self.per_dataset, self.build = found, per_dataset, build

    def parts(self) -> list[Any]:
        rows, n = self.found.rows, self.found.todo
        if n <= self.per_dataset:
            return [rows]
        # Cut by block metadata on the driver; a block that straddles a cut is sliced in a task.
        return rows.split_at_indices(list(range(self.per_dataset, n, self.per_dataset)))

    def iter_batches(self, **kwargs: Any) -> Any:
        for part in self.parts():
            # Built only when the previous one has ended: its actors (and GPUs) are gone.
            yield from self.build(todo_rows(Intake(part, self.found.cpus))).iter_batches(**kwargs)


def previous_summary(layout: JobLayout) -> dict[str, Any] | None:
    """The summary.json of an earlier invocation, or None (none, or unreadable)."""
    try:
        return storage.read_json(layout.summary())
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- the writer


def write_product(
    layout: Any,
    state: ProductRow,
    schema: pa.Schema,
    files: Callable[[], list[dict[str, Any]]],
    marker: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> dict[str, Any]:
    """Write a product: ``files()`` (its files -> its manifest rows, unless it failed), its
    manifest shard, its errors shard, then its marker last (``marker(rows)``: the job's own
    fields). -> its outcome row: ``product_id``, ``status``, ``stats`` (JSON), ``finished``."""
    start = time.perf_counter()
    pid, stat = state.product_id, state.stat("write")
    rows: list[dict[str, Any]] = []
    if not state.failed:
        rows = files()
        storage.write_parquet(layout.manifest_shard(pid), pa.Table.from_pylist(rows, schema=schema))
    write_errors(layout, pid, state.errors)
    status = "failed" if state.failed else ("partial" if state.errors else "ok")
    stat.seconds = time.perf_counter() - start
    stats = {k: v.__dict__ for k, v in state.stats.items()}
    finished = time.time()
    if not state.failed:
        storage.write_json(
            layout.marker(pid),
            {
                "product_id": pid,
                "status": status,
                "errors": len(state.errors),
                "finished": finished,
                # A resumed job's summary adds these up for the products it skips.
                "stats": stats,
                **marker(rows),
            },
        )
    return {"product_id": pid, "status": status, "stats": json.dumps(stats), "finished": finished}


def outcome_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Outcome rows -> a batch (all the driver ever receives)."""
    return {k: object_array([r[k] for r in rows]) for k in rows[0]} if rows else {}


# --------------------------------------------------------------------------- the driver


@dataclass
class Outcomes:
    """What this run's products add up to: counters only."""

    products: dict[str, int] = field(default_factory=lambda: {"ok": 0, "partial": 0, "failed": 0})
    done: CompletedTotals = field(default_factory=CompletedTotals)  # ok and partial ones
    failed: dict[str, StageStats] = field(default_factory=dict)  # stages of failed ones
    sums: dict[str, int] = field(default_factory=dict)
    maxima: dict[str, int] = field(default_factory=dict)
    latest: float = 0.0  # the last marker's time (the writers' clocks)

    def add(self, status: str, stats: dict[str, dict[str, Any]]) -> None:
        self.products[status] += 1
        if status != "failed":
            self.done.add(status, stats)
            return
        for name, values in stats.items():
            self.failed.setdefault(name, StageStats(name, values.get("unit", "items"))).add(
                StageStats(**values)
            )


def through_stages(
    rows: Any,
    first: Callable[[Any], Any],
    stages: list[tuple[type[ProductStage], tuple[str, ...]]],
    config: RestageConfig,
    root: str,
    staged: dict[str, int] | None,
    per_call: int,
    cpus: float,
) -> Any:
    """``first(rows)`` (a task making product rows), then every model stage: streamed, or
    one stage at a time when ``staged`` is a dict, which gets the products each stage ran
    (pipelines/_staged.py)."""
    if staged is not None:
        stage_root = storage.join(root, STAGES_DIR)
        ds, ran = run_staged(first, stages, config, stage_root, rows, per_call, cpus)
        for name, products in ran.items():  # summed over successive datasets
            staged[name] = staged.get(name, 0) + products
        return ds
    return map_stages(first(rows), stages, config, per_call)


def start(config: RestageConfig, job: str) -> tuple[RestageConfig, str]:
    """Plan the job before Ray starts (it ends now if it cannot run), then start Ray.
    -> (the config to run with, the placement mode)."""
    from ray_app.plan import preflight
    from ray_app.runtime import init_ray

    config, placed = preflight(config, job)
    init_ray(config)
    return config, placed.mode


def run(
    job: str,
    config: RestageConfig,
    root: str,
    total: int,
    build: Callable[[dict[str, int] | None], Any],
    staged: dict[str, int] | None = None,
    numbers: tuple[str, ...] = (),
    progress: ProgressFile | None = None,
) -> Outcomes:
    """The driver loop over ``build(staged)``'s outcome rows (``staged``: a dict in
    stage-by-stage mode, filled with the products each stage ran): counters, progress
    lines and the live ``progress`` file; ``numbers``: integer columns of the outcome rows
    to sum and take the max of."""
    from ray_app.progress import StageLines, counts, finished
    from ray_app.runtime import progress_bars

    got = Outcomes(sums=dict.fromkeys(numbers, 0), maxima=dict.fromkeys(numbers, 0))
    lines = StageLines(job, total, enabled=not progress_bars(config))
    if progress is not None:
        progress.phase("products", total)
    for batch in build(staged).iter_batches(batch_size=16, batch_format="numpy"):
        for i, status in enumerate(batch["status"]):
            got.add(str(status), json.loads(batch["stats"][i]))
            got.latest = max(got.latest, float(batch["finished"][i]))
            for name in numbers:
                value = int(batch[name][i])
                got.sums[name] += value
                got.maxima[name] = max(got.maxima[name], value)
        lines.update(finished(got.products), counts(got.products))
        if progress is not None:
            progress.update(finished(got.products), got.products)
    lines.finish(counts(got.products))
    if staged is not None:  # every product is written, marker last: stage rows are spent
        storage.remove(storage.join(root, STAGES_DIR), recursive=True)
    return got


# --------------------------------------------------------------------------- a whole job


@dataclass
class Execution:
    """What a job's run left on the driver: counters, the placement, the stage counts."""

    found: Intake
    got: Outcomes
    placement: str | None  # the plan's mode (ray_app/plan.py); None when nothing ran
    staged: dict[str, int] | None  # products each stage ran, in stage-by-stage mode
    completed: CompletedTotals | None = None  # whole-job totals before this run


def execute(
    job: str,
    config: RestageConfig,
    layout: JobLayout,
    rows: Callable[[], Any],
    build: Callable[[Any, RestageConfig, dict[str, int] | None], Any],
    *,
    numbers: tuple[str, ...] = (),
    whole_job: bool = False,
) -> Execution:
    """Run a job: plan it and start Ray, take in ``rows()`` (its input rows), then stream
    the products to do through ``build(todo, config, staged)`` (its pipeline, ending in
    ``write_product``'s outcome rows). ``whole_job``: also total the products complete
    before this run (for a summary of every invocation)."""
    from ray_app.node_loss import node_loss_guard

    # The live file first: it refuses while another run is live on this output, before Ray
    # starts, and a job that cannot run ends in its phase "failed" with the reason.
    with ProgressFile(layout.root, job) as progress:
        config, placement = start(config, job)  # ends now if the job cannot run
        section = getattr(config, job)  # its cpus_per_task
        staged: dict[str, int] | None = {} if placement == "stage" else None
        with node_loss_guard(job, config):
            progress.phase("intake")
            previous = previous_summary(layout) if whole_job else None
            # Without a whole-job summary no marker's stats are wanted: none is "uncounted".
            since = (
                (previous or {}).get("completed", {}).get("counted_until")
                if whole_job
                else math.inf
            )
            found = intake(rows(), layout, section.cpus_per_task, since)
            progress.found_complete(found.counts[COMPLETE])
            nothing = Outcomes(sums=dict.fromkeys(numbers, 0), maxima=dict.fromkeys(numbers, 0))
            done = Execution(found, nothing, placement, staged)
            if whole_job:
                done.completed = CompletedTotals.before_this_run(previous, found.uncounted)
            if not found.todo:
                progress.phase("products", 0)
                done.placement = done.staged = None
                return done
            per_dataset = config.ray.products_per_dataset
            done.got = run(
                job,
                config,
                layout.root,
                found.todo,
                lambda stage_rows: Successive(
                    found, per_dataset, lambda todo: build(todo, config, stage_rows)
                ),
                staged,
                numbers,
                progress,
            )
    return done


def finish_whole_job(
    job: str,
    layout: Any,
    done: Execution,
    stages: tuple[str, ...],
    start_time: float,
    extra: Callable[[], dict[str, Any]],
) -> Any:
    """``finish`` for a job whose summary covers every invocation (``execute(whole_job=
    True)``): every complete product, this run's and earlier ones', and the products that
    failed this time (earlier failures were retried now, so they count once); ``extra()``
    adds the job's own fields to ``this_run``, ``completed`` and ``ignored_columns``."""
    from ray_app.records import INVALID
    from ray_app.report import JobSummary

    found, got, completed = done.found, done.got, done.completed
    assert completed is not None, "execute(..., whole_job=True) totals the earlier products"
    completed.merge(got.done)
    summary = JobSummary(job, layout.root, whole_job=True)
    valid = found.counts[TODO] + found.counts[COMPLETE]
    summary.products = {
        "in manifest": valid + found.counts[INVALID],
        "invalid": found.counts[INVALID],
        ALREADY: found.counts[COMPLETE],
        "ok": completed.ok,
        "partial": completed.partial,
        "failed": got.products["failed"],
    }

    def whole() -> dict[str, Any]:
        completed.invocations += 1
        completed.wall_seconds += summary.wall_seconds
        # Every marker up to now is counted (its own time too: a writer's clock may run ahead).
        completed.counted_until = max(time.time(), got.latest, completed.counted_until or 0.0)
        return {
            "this_run": {**got.products, "wall_seconds": round(summary.wall_seconds, 3)},
            "completed": completed.to_dict(),
            "ignored_columns": found.ignored,
            **extra(),
        }

    units = dict.fromkeys(stages, "images")
    return finish(summary, layout, done, units, [completed.stages, got.failed], start_time, whole)


def finish(
    summary: Any,
    layout: Any,
    done: Execution,
    units: dict[str, str],
    parts: list[dict[str, StageStats]],
    start_time: float,
    extra: Callable[[], dict[str, Any]],
) -> Any:
    """Complete ``summary`` (a ``JobSummary`` with its product counts): its stages in
    order (``units``: name -> unit), each the sum of ``parts``; its wall time; ``extra()``
    (called once the wall time is known) and where the outputs are. Writes it."""
    for name, unit in units.items():
        stage = summary.stage(name, unit)
        for part in parts:
            if name in part:
                stage.add(part[name])
    summary.wall_seconds = time.perf_counter() - start_time
    summary.extra = {
        **extra(),
        "placement": done.placement,
        "staged": done.staged,
        "errors": layout.errors_dir(),
        "manifest_out": layout.manifest_dir(),
        "inputs": layout.inputs_dir(),
    }
    storage.write_json(layout.summary(), summary.to_dict())
    return summary
