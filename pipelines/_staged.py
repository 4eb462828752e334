"""Stage-by-stage execution: for clusters too small to hold every model stage at once.

Each model stage runs alone over every pending product, writes each product's row to
``<out>/_stages/<NN>-<stage>/<product_id>.parquet`` (the pickled product state; its
images are already in their final place, the row names them), and ends before the next stage starts, so its actors free their GPUs. A re-run
skips, stage by stage, the products whose row that stage already wrote (checked in tasks,
never listed on the driver), so a kill between (or inside) stages loses nothing and redoes
nothing that finished. The rows are the same
product states streaming mode passes between stages, so the outputs are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines._product_rows import ProductStage, map_stage
from ray_app import storage
from ray_app.batching import object_array
from ray_app.config import RestageConfig

STAGES_DIR = "_stages"
SUFFIX = ".parquet"


def stage_dir(stage_root: str, index: int, name: str) -> str:
    return storage.join(stage_root, f"{index:02d}-{name}")


def save_rows(batch: dict[str, np.ndarray], out_dir: str) -> dict[str, np.ndarray]:
    """Write each product's row (one small Parquet file, atomically); pass on only its id."""
    for pid, blob in zip(batch["product_id"], batch["state"], strict=True):
        table = pa.table({"product_id": [str(pid)], "state": pa.array([blob], pa.binary())})
        storage.write_parquet(storage.join(out_dir, f"{pid}{SUFFIX}"), table)
    return {"product_id": object_array(list(batch["product_id"]))}


def load_rows(batch: dict[str, np.ndarray], out_dir: str) -> dict[str, np.ndarray]:
    """Product ids -> the rows a stage wrote under ``out_dir``, in the packed form stages take."""
    ids, states = [], []
    for pid in batch["product_id"]:
        table = storage.read_parquet(storage.join(out_dir, f"{pid}{SUFFIX}"))
        ids.append(table["product_id"][0].as_py())
        states.append(table["state"][0].as_py())
    return {"product_id": object_array(ids), "state": object_array(states)}


def not_saved(batch: pa.Table, out_dir: str) -> pa.Table:
    """The rows of ``batch`` whose product has no row under ``out_dir`` yet (in a task)."""
    pids = batch["product_id"].to_pylist()
    saved = [storage.exists(storage.join(out_dir, f"{pid}{SUFFIX}")) for pid in pids]
    return batch.filter(pa.array([not s for s in saved]))


def run_staged(
    first: Callable[[Any], Any],
    stages: list[tuple[type[ProductStage], tuple[str, ...]]],
    config: RestageConfig,
    stage_root: str,
    ids: Any,
    per_call: int,
    cpus: float,
) -> tuple[Any, dict[str, int]]:
    """Run ``stages`` one at a time over ``ids`` (a dataset of rows with ``product_id``);
    ``first(pending)`` makes the rows the first stage takes from the pending ones of
    ``ids``. Which products a stage still has to run is checked in tasks. -> (the last
    stage's rows for every id, products each stage ran)."""
    ran: dict[str, int] = {}
    prev: str | None = None
    for index, (cls, roles) in enumerate(stages):
        out_dir = stage_dir(stage_root, index, cls.name)
        pending = ids.map_batches(
            not_saved, fn_kwargs={"out_dir": out_dir}, batch_format="pyarrow", num_cpus=cpus
        )
        src = first(pending) if prev is None else _rows_of(pending, prev, per_call, cpus)
        ds = map_stage(src, cls, config, roles, per_call)
        ds = ds.map_batches(
            save_rows, fn_kwargs={"out_dir": out_dir}, batch_size=per_call, num_cpus=cpus
        )
        ran[cls.name] = 0
        # The stage runs to its end here: its actor pool, and its GPUs, go away.
        for batch in ds.iter_batches(batch_size=None):
            ran[cls.name] += len(batch["product_id"])
        prev = out_dir
    assert prev is not None, "stage-by-stage mode needs at least one model stage"
    return _rows_of(ids, prev, per_call, cpus), ran


def _rows_of(ids: Any, out_dir: str, per_call: int, cpus: float) -> Any:
    return ids.map_batches(
        load_rows, fn_kwargs={"out_dir": out_dir}, batch_size=per_call, num_cpus=cpus
    )
