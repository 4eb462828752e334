"""`restage index`: the staged-catalog index that `restage stage` retrieves scenes from
(retrieval-assisted staging, arXiv 2307.15326, section 3.1).

A catalog is a products manifest (augment's format) whose photos show products in scenes.
Ray Data streams one row per catalog product:

    decode -> segment (segmenter pool) -> embed (clip pool) -> inception (pool) -> write

For every photo: the product's mask (an alpha channel wins; otherwise the segmenter,
auto-prompted as in augment), its box, its ground line (the row its base rests on) and area
fraction, the product's category from the manifest, and the CLIP embedding of the product's
crop. A photo whose product is not cleanly segmented (no mask, too small or too large a
share of the photo, cut off by the frame) is recorded with the reason and left out of the
index. Photos are written as decoded (capped by ``images.*``) so that staging reads exactly
what was segmented, wherever the catalog lives.

Embedding: CLIP's image tower on the masked crop rather than the paper's Inception-V3 — it
is trained on image-text pairs of products among much else, so similarity follows what the
product is rather than texture statistics, it is the model restage already loads for
ranking (no extra role), and its crop embeddings of a staged product and of a catalog
product are comparable. The summary's ``retrieval`` measures it (the paper's precision and
recall at k against categories); CLIP against Inception-V3 has not been measured on real
weights (none can be downloaded where restage is developed).

The inception stage (``index.fid_reference``) computes the Inception features of every kept
scene, as `restage evaluate` does for photos; once the products are written they are merged
into one FID/KID state (``OUT/index/fid_reference.npz``, ray_app/fid.py: FID's sums, 34 MB
whatever the catalog's size, and KID's seeded sample of ``evaluate.kid_max_images``), which
`restage stage` measures its staged images against.

Resume and errors follow augment (pipelines/_job.py): a product's marker is written last,
a re-run skips marked products. The search index (``OUT/index``, ray_app/retrieval.py) is
built from every kept row after the products are written, by every run: exact below
``index.exact_below`` rows, faiss HNSW from there on.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import _job
from pipelines._job import outcome_batch, write_product
from pipelines._product_rows import ProductRow, ProductStage, batch_rows, load_photos, pack, unpack
from ray_app import retrieval, storage
from ray_app.config import RestageConfig
from ray_app.images import decode_mask, encode, encode_png
from ray_app.models import source_tag
from ray_app.records import (
    FEATURES_SCHEMA,
    SCENE_SCHEMA,
    ProductRecord,
    manifest_dataset,
    manifest_errors_dir,
    manifest_format,
)
from ray_app.report import JobSummary
from ray_app.sources import SourcePolicy
from ray_app.staging import Box, ground_line
from ray_app.storage import IndexLayout

JOB = "index"
STAGES = ("decode", "segment", "embed", "inception", "write")
FID_SIDE = "catalog"  # the side name of the scenes' features (ray_app/fid.py)
SCENE_FORMAT = "png"  # lossless: the staged image's background is this photo's pixels


@dataclass
class Scene:
    """One catalog photo while it moves through the pipeline."""

    image_id: str
    origin_uri: str
    width: int
    height: int
    scene_uri: str
    alpha: bytes | None = None  # the source's alpha channel, a hint for the segmenter
    mask_uri: str | None = None
    mask_method: str | None = None
    mask_score: float | None = None
    box: Box | None = None
    ground: int | None = None
    area_fraction: float | None = None
    embedding: list[float] | None = None
    features: np.ndarray | None = None  # Inception, for the FID reference
    drop_reason: str | None = None
    models: dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.drop_reason is None


@dataclass
class CatalogProduct(ProductRow):
    """A catalog product's photos; pickled into its Ray Data row."""

    job: ClassVar[str] = JOB
    record: ProductRecord
    root: str
    scenes: list[Scene] = field(default_factory=list)

    @property
    def product_id(self) -> str:
        return self.record.product_id

    def usable(self) -> list[Scene]:
        return [s for s in self.scenes if s.usable]

    def remove_files(self) -> None:
        layout = IndexLayout(self.root)
        storage.remove(layout.scenes_dir(self.product_id), recursive=True)
        storage.remove(layout.masks_dir(self.product_id), recursive=True)
        storage.remove(layout.features(self.product_id))


# --------------------------------------------------------------------------- stages


def decode_catalog(
    batch: dict[str, np.ndarray], config: RestageConfig, policy: SourcePolicy, root: str
) -> dict[str, np.ndarray]:
    """Records -> catalog products with their photos decoded and written as scenes."""
    layout, img = IndexLayout(root), config.images
    states = []
    for row in batch_rows(batch):
        start = time.perf_counter()
        state = CatalogProduct(ProductRecord.from_row(row), root)
        state.remove_files()  # a killed run's, before the first is written
        loaded = load_photos(state, "decode", img, policy.read)
        for i, image in enumerate(loaded):
            h, w = image.image.rgb.shape[:2]
            scene = Scene(
                f"{state.product_id}/{i:02d}",
                image.uri,
                w,
                h,
                layout.scene(state.product_id, f"{i:02d}", SCENE_FORMAT),
                alpha=encode_png(image.image.alpha) if image.image.alpha is not None else None,
            )
            storage.write_bytes(scene.scene_uri, encode(image.image.rgb, SCENE_FORMAT))
            state.scenes.append(scene)
        state.stat("decode").seconds = time.perf_counter() - start
        states.append(state)
    return pack(states)


def edges_touched(mask: np.ndarray) -> int:
    """How many of the image's four edges the mask reaches."""
    return int(mask[0].any()) + int(mask[-1].any()) + int(mask[:, 0].any()) + int(mask[:, -1].any())


def clean_cut(mask: np.ndarray, config: RestageConfig) -> str | None:
    """Why a scene's product mask is not clean enough to stage into, or None."""
    cfg = config.index
    share = float(mask.mean())
    if share < cfg.segment.min_area:
        return f"product covers {share:.1%} of the photo, under index.segment.min_area"
    if share > cfg.segment.max_area:
        return f"product covers {share:.1%} of the photo, over index.segment.max_area"
    touched = edges_touched(mask)
    if touched > cfg.max_edges_touched:
        return (
            f"product is cut off by the frame: its mask touches {touched} of the photo's "
            f"edges, over index.max_edges_touched={cfg.max_edges_touched}"
        )
    return None


class SegmentScenes(ProductStage):
    """The product mask of every scene, its box, ground line and area; unclean ones out."""

    name = "segment"

    def __init__(self, config: RestageConfig):
        from actors.segmenter import Segmenter

        super().__init__(config)
        self.model = Segmenter(config.model_spec("segmenter"), config.index.segment)
        self.tag = source_tag(config, "segmenter")

    def process(self, state: CatalogProduct) -> None:
        layout = IndexLayout(state.root)
        stat = state.stat(self.name)
        todo = state.usable()
        stat.items_in = len(todo)
        out = self.model(
            {
                "image": [storage.read_bytes(s.scene_uri) for s in todo],
                "alpha": [s.alpha for s in todo],
                "placed": [None] * len(todo),
            }
        )
        for i, s in enumerate(todo):
            s.models["segmenter"] = self.tag
            s.alpha = None  # a hint for this stage only
            if out["error"][i]:
                s.drop_reason = f"not segmented: {out['error'][i]}"
                continue
            mask = decode_mask(out["mask"][i]) > 0
            s.mask_method, s.mask_score = out["mask_method"][i], float(out["mask_score"][i])
            reason = clean_cut(mask, self.config)
            if reason:
                s.drop_reason = reason
                continue
            s.box = Box.of(mask)
            s.ground = ground_line(mask, self.config.index.ground_share)
            s.area_fraction = float(mask.mean())
            s.mask_uri = layout.mask(state.product_id, s.image_id.rsplit("/", 1)[1])
            storage.write_bytes(s.mask_uri, out["mask"][i])
            stat.items_out += 1
        stat.dropped = stat.items_in - stat.items_out
        if todo and not state.usable():
            state.error(self.name, "no photo of the product is a clean scene: none indexed")


class EmbedScenes(ProductStage):
    """The CLIP embedding of each kept scene's product crop (the retrieval key)."""

    name = "embed"

    def __init__(self, config: RestageConfig):
        from actors.clip import ClipEmbedder

        super().__init__(config)
        self.model = ClipEmbedder(config.model_spec("clip"))
        self.tag = source_tag(config, "clip")

    def process(self, state: CatalogProduct) -> None:
        todo = state.usable()
        stat = state.stat(self.name)
        stat.items_in = len(todo)
        if not todo:
            return
        out = self.model(
            {
                "image": [storage.read_bytes(s.scene_uri) for s in todo],
                "mask": [storage.read_bytes(s.mask_uri) for s in todo],
                "text": [None] * len(todo),
            }
        )
        for i, s in enumerate(todo):
            s.models["clip"] = self.tag
            vector = out["crop_embedding"][i]
            if out["error"][i] or not np.isfinite(vector).all():
                s.drop_reason = f"not embedded: {out['error'][i] or 'no crop'}"
                continue
            s.embedding = [float(x) for x in vector]
            stat.items_out += 1
        stat.dropped = stat.items_in - stat.items_out


class SceneFeatures(ProductStage):
    """Inception features of each kept scene (the whole photo), for the FID reference. A
    scene whose features fail stays indexed: the error is recorded, the reference goes
    without it."""

    name = "inception"

    def __init__(self, config: RestageConfig):
        from actors.inception import InceptionFeatures

        super().__init__(config)
        self.model = InceptionFeatures(config.model_spec("inception"))
        self.tag = source_tag(config, "inception")

    def process(self, state: CatalogProduct) -> None:
        todo, stat = state.usable(), state.stat(self.name)
        stat.items_in = len(todo)
        if not todo:
            return
        out = self.model({"image": [storage.read_bytes(s.scene_uri) for s in todo]})
        for s, features, error in zip(todo, out["features"], out["error"], strict=True):
            if error:
                state.error(self.name, error, item=s.image_id)
                continue
            s.models["inception"] = self.tag
            s.features = features
            stat.items_out += 1


def model_stages(config: RestageConfig) -> list[tuple[type[ProductStage], tuple[str, ...]]]:
    stages: list[tuple[type[ProductStage], tuple[str, ...]]] = [
        (SegmentScenes, ("segmenter",)),
        (EmbedScenes, ("clip",)),
    ]
    if config.index.fid_reference:
        stages.append((SceneFeatures, ("inception",)))
    return stages


def _row(state: CatalogProduct, s: Scene) -> dict[str, Any]:
    box = s.box if s.usable else None
    return {
        "image_id": s.image_id,
        "product_id": state.product_id,
        "category": state.record.category,
        "embedding": s.embedding if s.usable else None,
        "origin_uri": s.origin_uri,
        "scene_uri": s.scene_uri,
        "mask_uri": s.mask_uri if s.usable else None,
        "width": s.width,
        "height": s.height,
        "box_x0": box.x0 if box else None,
        "box_y0": box.y0 if box else None,
        "box_x1": box.x1 if box else None,
        "box_y1": box.y1 if box else None,
        "ground": s.ground if s.usable else None,
        "area_fraction": s.area_fraction if s.usable else None,
        "mask_method": s.mask_method,
        "mask_score": s.mask_score,
        "kept": s.usable,
        "drop_reason": s.drop_reason,
        "models": sorted(s.models.items()),
    }


def write_catalog(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """Each product's manifest shard and errors, then its marker (pipelines/_job.py)."""
    layout = IndexLayout(root)

    def files(state: CatalogProduct) -> Callable[[], list[dict[str, Any]]]:
        def rows() -> list[dict[str, Any]]:
            out = [_row(state, s) for s in state.scenes]
            features = [
                {"side": FID_SIDE, "image_id": s.image_id, "features": s.features.tolist()}
                for s in state.usable()
                if s.features is not None
            ]
            if features:
                storage.write_parquet(
                    layout.features(state.product_id),
                    pa.Table.from_pylist(features, schema=FEATURES_SCHEMA),
                )
            stat = state.stat("write")
            stat.items_in, stat.items_out = len(out), sum(r["kept"] for r in out)
            return out

        return rows

    def marker(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"scenes": len(rows), "kept": sum(r["kept"] for r in rows)}

    states = unpack(batch)
    for state in states:
        if state.failed:
            state.remove_files()
    return outcome_batch([write_product(layout, s, SCENE_SCHEMA, files(s), marker) for s in states])


def build_dataset(records: Any, config: RestageConfig, root: str, policy: SourcePolicy, staged):
    cpu, per_call = config.index.cpus_per_task, config.index.products_per_batch

    def decoded(chosen: Any) -> Any:
        return chosen.map_batches(
            decode_catalog,
            fn_kwargs={"config": config, "policy": policy, "root": root},
            batch_size=per_call,
            num_cpus=cpu,
        )

    ds = _job.through_stages(
        records, decoded, model_stages(config), config, root, staged, per_call, cpu
    )
    return ds.map_batches(
        write_catalog, fn_kwargs={"root": root}, batch_size=per_call, num_cpus=cpu
    )


# --------------------------------------------------------------------------- the index


INDEX_FIELDS = (
    "scene_uri",
    "mask_uri",
    "width",
    "height",
    "box_x0",
    "box_y0",
    "box_x1",
    "box_y1",
    "ground",
    "area_fraction",
)


def kept_rows(batch: pa.Table, root: str) -> pa.Table:
    """A Ray Data task: the kept rows of the manifest shards of a block of product ids
    (a product without a shard failed: nothing of it is indexed)."""
    layout, parts = IndexLayout(root), []
    for pid in batch["product_id"].to_pylist():
        try:
            table = storage.read_parquet(layout.manifest_shard(pid), SCENE_SCHEMA)
        except FileNotFoundError:
            continue
        parts.append(table.filter(pc.equal(table["kept"], True)))
    columns = ["image_id", "product_id", "category", "embedding", *INDEX_FIELDS]
    if not parts:
        return SCENE_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(parts).select(columns)


def build_search_index(config: RestageConfig, layout: IndexLayout) -> retrieval.IndexMeta | None:
    """The search index over every kept row. The shards are found from the job's input
    index and read in Ray Data tasks (the driver lists nothing); the vectors meet in this
    process because one ANN graph holds them all (ray_app/retrieval.py gives the memory at
    10^7). None: no kept row (any index of an earlier run is removed)."""
    ids = _job.input_ids(layout)
    rows = (
        ids.map_batches(
            kept_rows,
            fn_kwargs={"root": layout.root},
            batch_format="pyarrow",
            num_cpus=config.index.cpus_per_task,
        )
        if ids is not None
        else None
    )
    tables = [] if rows is None else [t for t in _tables(rows) if t.num_rows]
    if not tables:
        storage.remove(layout.index_dir(), recursive=True)
        return None
    cfg = config.index
    return retrieval.build_index(
        tables,
        layout.index_dir(),
        exact_below=cfg.exact_below,
        model=source_tag(config, "clip"),
        hnsw=retrieval.HnswParams(cfg.hnsw_m, cfg.hnsw_ef_construction, cfg.hnsw_ef_search),
        dtype=cfg.dtype,
    )


def retrieval_quality(config: RestageConfig, layout: IndexLayout) -> dict[str, Any] | None:
    """The paper's retrieval measure on the index itself: precision and recall at
    ``index.eval_k`` against category labels, each query a kept scene (a seeded sample of
    ``index.eval_queries``) searching for other products' scenes. None without categories."""
    cfg = config.index
    found = retrieval.Index.open(layout.index_dir())
    rows = found.rows
    categories = rows.column("category").to_pylist()
    products = rows.column("product_id").to_pylist()
    labelled = [i for i, c in enumerate(categories) if c is not None]
    if not labelled:
        return None
    rng = np.random.default_rng(config.seed)
    queries = sorted(rng.choice(labelled, min(cfg.eval_queries, len(labelled)), replace=False))
    vectors = found.vectors(queries)
    hits = found.search(vectors, cfg.eval_k, exclude_product_ids=[[products[i]] for i in queries])
    per_category = Counter(categories)
    per_product = Counter(zip(products, categories, strict=True))
    relevant = [
        per_category[categories[i]] - per_product[(products[i], categories[i])] for i in queries
    ]
    scores = retrieval.precision_recall_at_k(
        hits, [categories[i] for i in queries], relevant, k=cfg.eval_k
    )
    return {
        "k": scores.k,
        "queries": len(queries),
        "precision": round(scores.precision, 4),
        "recall": None if math.isnan(scores.recall) else round(scores.recall, 4),
    }


def build_fid_reference(config: RestageConfig, layout: IndexLayout) -> dict[str, Any] | None:
    """The kept scenes' Inception features merged into one state beside the search index
    (``IndexLayout.fid_reference``); KID keeps a seeded sample of ``evaluate.kid_max_images``.
    None when no scene has features (any earlier reference is removed)."""
    from ray_app import fid

    target = IndexLayout.fid_reference(layout.index_dir())
    storage.remove(target)
    if not config.index.fid_reference:
        return None
    rate = config.evaluate.kid_max_images / max(fid.count_features(layout.features_dir()), 1)
    merged = fid.merge_sides(
        layout.features_dir(), {FID_SIDE: rate}, (FID_SIDE,), config.index.cpus_per_task
    )
    side = merged.get(FID_SIDE)
    if side is None:
        return None
    fid.save_side(side, target)
    return {"uri": target, "images": side.n, "kid_sample": side.kid_count}


def _tables(ds: Any):
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])


# --------------------------------------------------------------------------- the job


def index(config: RestageConfig, catalog: str, out: str) -> JobSummary:
    """Run the index job: ``catalog`` (a products manifest of staged photos) -> ``out``."""
    start = time.perf_counter()
    root = storage.normalize_uri(out)
    layout = IndexLayout(root)
    manifest_uri = storage.normalize_uri(catalog)
    manifest_format(manifest_uri)  # an unknown format fails before Ray starts
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"catalog manifest {manifest_uri!r} does not exist")
    policy = SourcePolicy.for_manifest(manifest_uri, config.storage)

    def rows() -> Any:
        storage.remove(manifest_errors_dir(layout.errors_dir()), recursive=True)
        return manifest_dataset(manifest_uri, JOB, layout.errors_dir())

    done = _job.execute(
        JOB,
        config,
        layout,
        rows,
        lambda todo, cfg, staged: build_dataset(todo, cfg, root, policy, staged),
        whole_job=True,
    )
    meta = build_search_index(config, layout)
    quality = retrieval_quality(config, layout) if meta else None
    reference = build_fid_reference(config, layout) if meta else None
    return _job.finish_whole_job(
        JOB,
        layout,
        done,
        STAGES,
        start,
        lambda: {
            "catalog": catalog,
            "index": layout.index_dir() if meta else None,
            "scenes_indexed": meta.count if meta else 0,
            "index_kind": meta.kind if meta else None,
            # precision/recall@k against the categories (random weights: chance level)
            "retrieval": quality,
            "fid_reference": reference,
        },
    )


@dataclass(frozen=True)
class IndexArgs:
    """``restage index``'s arguments."""

    catalog: str
    out: str


def main(config: RestageConfig, args: IndexArgs) -> JobSummary:
    """CLI entry: ``restage index --catalog URI --out URI``."""
    return index(config, args.catalog, args.out)
