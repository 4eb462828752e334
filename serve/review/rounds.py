"""A rating round's images: the written images of each run, imported once into the review
database with their metrics and their product's real photos.

Importing is idempotent (a restarted server adds nothing), and a run is refused when it was
imported before from other generations or with another sample size, since its answers
would then mix two rounds. The sample (``review.sample_per_run``) is spread evenly over a
run's products: products take turns giving one image each (seeded order), so that a run
with many images for a few products does not crowd out the others."""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from typing import Any

from sqlalchemy import Engine, func, select

from ray_app import storage
from ray_app.adapter_meta import AdapterMeta
from ray_app.kinds import Metric, SampleKind
from ray_app.records import GENERATION_SCHEMA, SAMPLE_SCHEMA
from ray_app.storage import AdapterLayout, GenerationLayout
from serve.review import db


def _order_key(seed: int, *parts: str) -> int:
    digest = hashlib.sha256("\0".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # fits a signed 32-bit column


def _references(adapter_uri: str | None, cache: dict[str, list[str]]) -> list[str]:
    """The product's real photos, from the training set its adapter names."""
    if not adapter_uri:
        return []
    if adapter_uri not in cache:
        meta = AdapterMeta.read(storage.join(adapter_uri, AdapterLayout.METADATA))
        rows = storage.read_parquet(meta.training_set.manifest_shard, schema=SAMPLE_SCHEMA)
        cache[adapter_uri] = [
            r["image_uri"]
            for r in sorted(rows.to_pylist(), key=lambda r: r["sample_id"])
            if r["kind"] == SampleKind.REAL and r["product_id"] == meta.product_id
        ]
    return cache[adapter_uri]


def _written(roots: list[str]) -> list[dict[str, Any]]:
    """Every written image of a run: a product from the first of its roots that has it."""
    seen: set[str] = set()
    rows = []
    for root in roots:
        layout = GenerationLayout(root)
        for name in storage.list_names(layout.manifest_dir(), ".parquet"):
            pid = name.removesuffix(".parquet")
            if pid in seen:
                continue
            seen.add(pid)
            table = storage.read_parquet(layout.manifest_shard(pid), schema=GENERATION_SCHEMA)
            rows += [r for r in table.to_pylist() if r["image_uri"] and not r["error"]]
    return rows


def sample(rows: list[dict[str, Any]], n: int | None, seed: int, run: str) -> list[dict[str, Any]]:
    """``n`` rows spread evenly over products (all when ``n`` is None)."""
    if n is None or n >= len(rows):
        return rows
    by_product: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_product[r["product_id"]].append(r)
    queues = [
        sorted(group, key=lambda r: _order_key(seed, run, pid, r["image_id"]))
        for pid, group in sorted(by_product.items(), key=lambda kv: _order_key(seed, run, kv[0]))
    ]
    chosen: list[dict[str, Any]] = []
    depth = 0
    while len(chosen) < n:
        for queue in queues:
            if depth < len(queue) and len(chosen) < n:
                chosen.append(queue[depth])
        depth += 1
    return chosen


def _value(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _imported(conn, name: str, roots: list[str], sample_per_run: int | None) -> int | None:
    """The images of run ``name`` when it is imported already (from the same ``roots`` and
    sample, else ValueError: a round's runs are fixed); None when it is not."""
    known = conn.execute(select(db.runs).where(db.runs.c.name == name)).mappings().first()
    if known is None:
        return None
    if known["uris"] != json.dumps(roots) or known["sample"] != sample_per_run:
        raise ValueError(
            f"run {name!r} was imported from {json.loads(known['uris'])} with sample "
            f"{known['sample']}; now {roots} with sample {sample_per_run}. A round's "
            "runs cannot change: give the run another name, or use another --db"
        )
    return conn.execute(select(func.count()).where(db.images.c.run_id == known["id"])).scalar_one()


def import_runs(
    engine: Engine, runs: dict[str, list[str]], sample_per_run: int | None, seed: int
) -> dict[str, int]:
    """Put each run's images in the database (once); -> images per run."""
    counts = {}
    for name, roots in runs.items():
        with db.read(engine) as conn:
            known = _imported(conn, name, roots, sample_per_run)
        if known is not None:
            counts[name] = known
            continue
        rows = sample(_written(roots), sample_per_run, seed, name)
        if not rows:
            raise ValueError(f"run {name!r}: no written image under {roots}")
        references: dict[str, list[str]] = {}
        values = []
        for r in rows:
            values.append(
                {
                    "key": db.new_key(),
                    "product_id": r["product_id"],
                    "image_id": r["image_id"],
                    "image_uri": r["image_uri"],
                    "reference_uris": json.dumps(_references(r["adapter_uri"], references)),
                    "prompt": r["prompt"],
                    "metrics": json.dumps({m.value: _value(r[m]) for m in Metric}),
                    "score": _value(r["score"]),
                    "ranking": r["ranking"],
                    "order_key": _order_key(seed, name, r["product_id"], r["image_id"]),
                }
            )
        with db.write(engine) as conn:
            db.exclusive(conn, "import")
            known = _imported(conn, name, roots, sample_per_run)  # by a server started with us
            if known is not None:
                counts[name] = known
                continue
            run_id = conn.execute(
                db.runs.insert().values(
                    name=name, uris=json.dumps(roots), sample=sample_per_run, imported_at=db.now()
                )
            ).inserted_primary_key[0]
            conn.execute(db.images.insert(), [{**v, "run_id": run_id} for v in values])
        counts[name] = len(values)
    return counts
