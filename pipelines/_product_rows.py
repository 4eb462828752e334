"""Product rows: how augment and generate stream products through Ray Data.

A row is a whole product: its state (a dataclass deriving from ``ProductRow``) is pickled
into the row's ``state`` column between stages. Every per-product decision is then local to
the row, nothing is grouped or materialised across products, and a model actor handles all
of a product's images (or its adapter) in one call.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ray_app.batching import object_array
from ray_app.config import RestageConfig
from ray_app.images import LoadedImage
from ray_app.records import ErrorRow
from ray_app.report import StageStats


@dataclass(kw_only=True)
class ProductRow:
    """What every job's product state carries besides its own data. Subclasses provide
    ``product_id`` (a field or a property) and set ``job``."""

    job: ClassVar[str] = "job"
    errors: list[ErrorRow] = field(default_factory=list)
    failed: str | None = None  # why the product cannot go on; later stages skip it
    stats: dict[str, StageStats] = field(default_factory=dict)

    def error_record(self) -> str | None:
        """The input record written beside each error row (None: nothing to add)."""
        return None

    def error(self, stage: str, reason: str, item: str | None = None) -> None:
        self.errors.append(
            ErrorRow(
                self.job, stage, reason, self.product_id, item=item, record=self.error_record()
            )
        )

    def stat(self, stage: str) -> StageStats:
        if stage not in self.stats:
            self.stats[stage] = StageStats(stage, "images")
        return self.stats[stage]


def pack(rows: list[ProductRow]) -> dict[str, np.ndarray]:
    return {
        "product_id": object_array([r.product_id for r in rows]),
        "state": object_array([pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in rows]),
    }


def batch_rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """A numpy batch of input records as one dict per row (array cells as lists)."""
    keys = list(batch)
    for i in range(len(batch[keys[0]])):
        yield {
            k: (batch[k][i].tolist() if isinstance(batch[k][i], np.ndarray) else batch[k][i])
            for k in keys
        }


def unpack(batch: dict[str, np.ndarray]) -> list[Any]:
    return [pickle.loads(blob) for blob in batch["state"]]


class ProductStage:
    """A stage over product rows: ``process`` each product that has not failed, timed; an
    exception fails that product (recorded with its reason), never the others in the batch.
    A product's images are micro-batched on their own, so its outputs never depend on which
    other products share the call."""

    name = "stage"

    def __init__(self, config: RestageConfig):
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = unpack(batch)
        self.run_rows(rows)
        return pack(rows)

    def run_rows(self, rows: list[Any]) -> None:
        """``process`` each row that has not failed (in place)."""
        for row in rows:
            if row.failed:
                continue
            start = time.perf_counter()
            try:
                self.process(row)
            except Exception as exc:  # a bug or an OOM on one product must not kill the others
                row.error(self.name, f"{type(exc).__name__}: {exc}")
                row.failed = f"{self.name} failed: {exc}"
            row.stat(self.name).seconds += time.perf_counter() - start

    def process(self, row: Any) -> None:
        raise NotImplementedError


class FusedStages(ProductStage):
    """Several model stages in one actor (``ray.fuse_cpu_stages``): each loads its models
    here, and every product of a batch goes through them in turn, as it would through their
    pools, so the outputs are the same."""

    name = "fused"

    def __init__(
        self, config: RestageConfig, stages: tuple[tuple[type[ProductStage], dict[str, Any]], ...]
    ):
        super().__init__(config)
        self.stages = [cls(config, **kwargs) for cls, kwargs in stages]

    def run_rows(self, rows: list[Any]) -> None:
        for stage in self.stages:
            stage.run_rows(rows)


Stages = list[tuple[type[ProductStage], tuple[str, ...]]]


def map_stages(
    ds: Any,
    stages: Stages,
    config: RestageConfig,
    per_call: int,
    kwargs: dict[type[ProductStage], dict[str, Any]] | None = None,
) -> Any:
    """``ds`` through every model stage of ``stages`` ((class, roles) in pipeline order;
    ``kwargs``: a class's constructor arguments besides the config): an actor pool per
    stage, or one pool of them all where ``ray_app.plan.fuses`` says so."""
    from ray_app.plan import fuses
    from ray_app.runtime import pool_resources

    kwargs = kwargs or {}
    if fuses(config, [roles for _, roles in stages]):
        chain = tuple((cls, kwargs.get(cls, {})) for cls, _ in stages)
        return ds.map_batches(
            FusedStages,
            fn_constructor_kwargs={"config": config, "stages": chain},
            batch_size=per_call,
            **pool_resources(config, [roles for _, roles in stages]),
        )
    for cls, roles in stages:
        ds = map_stage(ds, cls, config, roles, per_call, kwargs.get(cls))
    return ds


def map_stage(
    ds: Any,
    cls: type[ProductStage],
    config: RestageConfig,
    roles: tuple[str, ...],
    per_call: int,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``ds.map_batches`` of a model stage as an actor pool sized by its first role, reserving
    the GPUs of every role the stage loads."""
    from ray_app.runtime import pool_resources

    return ds.map_batches(
        cls,
        fn_constructor_kwargs={"config": config, **(kwargs or {})},
        batch_size=per_call,
        **pool_resources(config, [roles]),
    )


def load_photos(state: ProductRow, stage: str, images: Any, read: Any) -> list[LoadedImage]:
    """The product's photos decoded with the jobs' rules (``images``: the config's
    ``images.*`` caps; ``read``: the manifest's source policy), counted in ``stage``: each
    unreadable photo an error row naming it, the product failed when none is readable."""
    from ray_app.images import load_images

    uris = state.record.image_uris
    loaded, failed = load_images(
        uris,
        max_megapixels=images.max_megapixels,
        max_side=images.max_side,
        min_side=images.min_side,
        read=read,
    )
    stat = state.stat(stage)
    stat.items_in, stat.items_out, stat.errors = len(uris), len(loaded), len(failed)
    for uri, reason in failed:
        state.error(stage, reason, item=uri)
    if not loaded:
        state.failed = f"no readable image ({len(failed)} of {len(failed)} failed)"
        state.error(stage, f"product has no readable image: all {len(failed)} failed")
    return loaded
