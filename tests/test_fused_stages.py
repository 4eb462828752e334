"""Fused model stages (``ray.fuse_cpu_stages``): one actor takes each product through every
stage in turn, with the same outputs, errors and per-stage counts as a pool per stage; the
pool reserves what its stages need together."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from pipelines._product_rows import (
    FusedStages,
    ProductRow,
    ProductStage,
    map_stages,
    pack,
    unpack,
)
from ray_app.config import load_config
from ray_app.runtime import pool_resources


@dataclass(kw_only=True)
class Row(ProductRow):
    job: ClassVar[str] = "test"
    product_id: str
    trail: list[str]


class Append(ProductStage):
    name = "append"

    def __init__(self, config, suffix: str = "a"):
        super().__init__(config)
        self.suffix = suffix

    def process(self, row: Row) -> None:
        row.trail.append(self.suffix)
        row.stat(self.name).items_in += 1


class FailOdd(ProductStage):
    name = "fail_odd"

    def process(self, row: Row) -> None:
        if int(row.product_id) % 2:
            raise ValueError(f"product {row.product_id} is odd")
        row.trail.append("even")


class Upper(ProductStage):
    name = "upper"

    def process(self, row: Row) -> None:
        row.trail = [t.upper() for t in row.trail]


def rows() -> dict[str, Any]:
    return pack([Row(product_id=str(i), trail=[]) for i in range(4)])


def summary(batch: dict[str, Any]) -> list[tuple]:
    return [
        (r.product_id, r.trail, r.failed, [e.reason for e in r.errors], sorted(r.stats))
        for r in unpack(batch)
    ]


def test_a_fused_actor_gives_what_a_pool_per_stage_gives():
    config = load_config("tiny")
    chain = ((Append, {"suffix": "x"}), (FailOdd, {}), (Upper, {}))
    separate = rows()
    for cls, kwargs in chain:
        separate = cls(config, **kwargs)(separate)
    fused = FusedStages(config, chain)(rows())
    assert summary(fused) == summary(separate)
    got = {r.product_id: r for r in unpack(fused)}
    assert got["0"].trail == ["X", "EVEN"] and got["0"].failed is None
    # A stage's failure fails that product only, and the stages after it skip it.
    assert got["1"].trail == ["x"] and got["1"].failed == "fail_odd failed: product 1 is odd"
    assert [e.stage for e in got["1"].errors] == ["fail_odd"]
    assert sorted(got["1"].stats) == ["append", "fail_odd"]


class Recorder:
    """A dataset stand-in: records each ``map_batches`` call."""

    def __init__(self):
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def map_batches(self, fn, **kwargs):
        self.calls.append((fn, kwargs))
        return self


def test_map_stages_fuses_cpu_stages_and_keeps_a_pool_each_otherwise():
    stages = [(Append, ("segmenter",)), (Upper, ("clip", "dino"))]
    tiny = load_config("tiny", overrides=["segmenter.max_actors=3", "clip.num_cpus=2"])
    ds = map_stages(Recorder(), stages, tiny, per_call=1, kwargs={Append: {"suffix": "y"}})
    ((fn, kw),) = ds.calls
    assert fn is FusedStages
    assert kw["fn_constructor_kwargs"]["stages"] == ((Append, {"suffix": "y"}), (Upper, {}))
    assert (kw["compute"].min_size, kw["compute"].max_size) == (1, 3)
    assert (kw["num_cpus"], kw["num_gpus"]) == (2, 0)

    for overrides in (["ray.fuse_cpu_stages=false"], ["dino.num_gpus=0.5"]):
        config = load_config("tiny", overrides=overrides)
        ds = map_stages(Recorder(), stages, config, per_call=1, kwargs={Append: {"suffix": "y"}})
        assert [fn for fn, _ in ds.calls] == [Append, Upper]
        assert ds.calls[0][1]["fn_constructor_kwargs"] == {"config": config, "suffix": "y"}


def test_a_pool_reserves_the_gpus_and_resources_of_every_role_it_loads():
    config = load_config(
        "tiny",
        overrides=[
            "clip.num_gpus=0.25",
            "dino.num_gpus=0.5",
            "dino.resources={restage_gpu_80gb: 0.001}",
            "clip.max_actors=null",
        ],
    )
    got = pool_resources(config, [("segmenter",), ("clip", "dino")])
    assert got["num_gpus"] == pytest.approx(0.75)
    assert got["resources"] == {"restage_gpu_80gb": 0.001}
    assert got["compute"].max_size == math.inf  # one uncapped stage: the pool is uncapped
