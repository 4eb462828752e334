"""Stage-by-stage execution: for clusters too small to hold every model stage at once.

Each model stage runs alone over every pending product, writes each product's row to
``<out>/_stages/<NN>-<stage>/<product_id>.parquet`` (the pickled product state, images
included), and ends before the next stage starts, so its actors free their GPUs. A re-run
skips, stage by stage, the products whose row that stage already wrote, so a kill between
(or inside) stages loses nothing and redoes nothing that finished. The rows are the same
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


def load_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Product ids and row URIs -> the rows a stage wrote, in the packed form stages take."""
    ids, states = [], []
    for uri in batch["uri"]:
        table = storage.read_parquet(str(uri))
        ids.append(table["product_id"][0].as_py())
        states.append(table["state"][0].as_py())
    return {"product_id": object_array(ids), "state": object_array(states)}


def _rows_of(out_dir: str, ids: list[str], per_call: int, cpus: float) -> Any:
    import ray

    items = [{"product_id": pid, "uri": storage.join(out_dir, f"{pid}{SUFFIX}")} for pid in ids]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1024)))
    return ds.map_batches(load_rows, batch_size=per_call, num_cpus=cpus)


def run_staged(
    first: Callable[[list[str]], Any],
    stages: list[tuple[type[ProductStage], tuple[str, ...]]],
    config: RestageConfig,
    stage_root: str,
    ids: list[str],
    per_call: int,
    cpus: float,
) -> tuple[Any, dict[str, int]]:
    """Run ``stages`` one at a time over ``ids``; ``first(pending)`` is the dataset of rows
    the first stage takes. -> (the last stage's rows for every id, products each stage ran)."""
    ran: dict[str, int] = {}
    prev: str | None = None
    for index, (cls, roles) in enumerate(stages):
        out_dir = stage_dir(stage_root, index, cls.name)
        done = {n[: -len(SUFFIX)] for n in storage.list_names(out_dir, SUFFIX)}
        pending = [pid for pid in ids if pid not in done]
        ran[cls.name] = len(pending)
        if pending:
            src = first(pending) if prev is None else _rows_of(prev, pending, per_call, cpus)
            ds = map_stage(src, cls, config, roles, per_call)
            ds = ds.map_batches(
                save_rows, fn_kwargs={"out_dir": out_dir}, batch_size=per_call, num_cpus=cpus
            )
            for _ in ds.iter_batches(batch_size=None):
                pass  # the stage runs to its end here: its actor pool, and its GPUs, go away
        prev = out_dir
    assert prev is not None, "stage-by-stage mode needs at least one model stage"
    return _rows_of(prev, ids, per_call, cpus), ran
