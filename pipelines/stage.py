"""`restage stage`: retrieval-assisted copy-paste staging (arXiv 2307.15326): each product
pasted into real catalog scenes of similar products, no model trained per product.

Ray Data streams one row per product:

    decode (plain-background fast path) -> segment (segmenter pool, the other photos)
      -> retrieve (clip pool + the index) -> compose (inpainter pool)
      -> score (clip + segmenter pool) -> inception (pool) -> write (+ parallax clips)

1. **decode**: the product's photos; the first on a plain background is cut out by colour
   (no model: catalog packshots), or by its alpha channel; otherwise the segmenter masks
   the photos and the first with a product is staged.
2. **retrieve**: the CLIP embedding of the product's crop searches the index of
   `restage index` for the ``stage.candidates`` nearest scenes, in the product's category
   when it has one (other categories fill up when too few match: the manifest row says
   so), never the product's own photos; scenes whose product box has another shape (more
   than ``stage.max_aspect_change``) are skipped; the first ``stage.top_k`` remain.
3. **compose**, per scene, at ``stage.size``: the scene's product is removed (its mask
   dilated, the inpainter paints the background behind it: the background layer); the new
   product is fitted to the scene product's box with its base on the ground line, its
   pixels exact inside a feathered edge, a soft contact shadow under it and colour
   harmonised only in the edge band (ray_app/staging.py); the gaps between the two
   silhouettes are painted again with the product in place (``stage.refine_gaps``). Only
   the removed area takes the inpainter's pixels: the rest of the scene is the catalog
   photo, exactly.
4. **score**: CLIP-I of the product's crop in the staged image against the input's, the IoU
   of the re-segmented product with where it was placed, and the seam's boundary score;
   ``stage.scoring`` weighs them; the best ``stage.keep`` are kept.
5. **inception** (``stage.fid``): the Inception features of the kept images. Once every
   product is written, summary.json's ``quality`` is their FID and KID against the
   catalog scenes (the index's FID reference, `restage index`), with the implementation
   and the thresholds of `restage evaluate` (ray_app/fid.py, ``evaluate.min_fid_images``).
6. **write**: the kept images (and, with ``--animate``, their parallax clips,
   ray_app/parallax.py), the product's mask, one manifest shard with every retrieved scene
   (kept or not, with the reason), the errors shard and the marker last. A re-run skips
   marked products; a killed product is redone from scratch with the same seeds.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines import _job
from pipelines._job import outcome_batch, write_product
from pipelines._product_rows import (
    ProductRow,
    ProductStage,
    batch_rows,
    load_photos,
    map_stages,
    pack,
    unpack,
)
from ray_app import parallax, retrieval, storage
from ray_app.config import RestageConfig, SegmentConfig
from ray_app.images import (
    LoadedImage,
    decode_mask,
    decode_rgb,
    encode,
    encode_png,
    resize,
)
from ray_app.kinds import MASK_IOU, Metric
from ray_app.metrics import mask_iou
from ray_app.models import source_tag
from ray_app.records import (
    FEATURES_SCHEMA,
    STAGED_SCHEMA,
    ProductRecord,
    manifest_dataset,
    manifest_errors_dir,
    manifest_format,
)
from ray_app.report import JobSummary
from ray_app.seeds import derive_seed
from ray_app.sources import SourcePolicy
from ray_app.staging import (
    Box,
    Target,
    boundary_score,
    composite,
    gap_mask,
    ground_line,
    removal_mask,
)
from ray_app.storage import IndexLayout, StageLayout

if TYPE_CHECKING:  # the models load in the stages' actors, not in the decode tasks
    from actors.clip import ClipEmbedder
    from actors.segmenter import Segmenter

JOB = "stage"
STAGES = ("decode", "segment", "retrieve", "compose", "score", "inception", "write")
FID_SIDE = "staged"  # the side name of the staged images' features (ray_app/fid.py)
BOUNDARY = "boundary"  # the seam score (ray_app/staging.boundary_score)


@dataclass
class Staging:
    """One retrieved scene of a product while it moves through the pipeline."""

    stage_id: str
    scene_image_id: str
    scene_product_id: str
    scene_category: str | None
    scene_uri: str
    scene_mask_uri: str
    similarity: float
    seed: int
    width: int | None = None  # of the staged image
    height: int | None = None
    placement: Box | None = None
    scale: float | None = None
    ground: int | None = None
    image: bytes | None = None  # the staged image (PNG) until written
    # the layers the parallax clip moves apart (PNG; alpha and shadow as 8-bit)
    background: bytes | None = None
    product: bytes | None = None
    alpha: bytes | None = None
    shadow: bytes | None = None
    scores: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    rank: int | None = None
    kept: bool = False
    image_uri: str | None = None
    clip_uris: list[str] = field(default_factory=list)
    features: np.ndarray | None = None  # Inception, kept images only (FID/KID)
    drop_reason: str | None = None
    models: dict[str, str] = field(default_factory=dict)

    def placed_mask(self) -> np.ndarray:
        return decode_mask(self.alpha) >= 128


@dataclass
class StageProduct(ProductRow):
    """A product to stage; pickled into its Ray Data row."""

    job: ClassVar[str] = JOB
    record: ProductRecord
    root: str
    photos: list[tuple[str, bytes, bytes | None]] = field(default_factory=list)  # uri, PNG, alpha
    source_uri: str | None = None
    source: bytes | None = None  # the photo staged (PNG)
    mask: bytes | None = None  # its product mask (PNG)
    mask_method: str | None = None
    embedding: list[float] | None = None
    scenes: list[Staging] = field(default_factory=list)

    @property
    def product_id(self) -> str:
        return self.record.product_id

    def remove_files(self) -> None:
        layout = StageLayout(self.root)
        storage.remove(layout.images_dir(self.product_id), recursive=True)
        storage.remove(layout.clips_dir(self.product_id), recursive=True)
        storage.remove(layout.features(self.product_id))


# --------------------------------------------------------------------------- decode


def decode_products(
    batch: dict[str, np.ndarray], config: RestageConfig, policy: SourcePolicy, root: str
) -> dict[str, np.ndarray]:
    """Records -> products with their photos; a plain-background (or alpha) photo is cut
    out here, without a model."""
    img, seg = config.images, config.stage.segment
    states = []
    for row in batch_rows(batch):
        start = time.perf_counter()
        state = StageProduct(ProductRecord.from_row(row), root)
        state.remove_files()  # a killed run's
        cut_out(state, load_photos(state, "decode", img, policy.read), seg)
        state.stat("decode").seconds = time.perf_counter() - start
        states.append(state)
    return pack(states)


def cut_out(state: StageProduct, loaded: list[LoadedImage], seg: SegmentConfig) -> None:
    """The first photo whose alpha channel or plain background gives a plausible mask is
    the one staged, cut out without a model; otherwise every photo waits for the segmenter
    (``state.photos``)."""
    from actors.segmenter import area_ok, plain_background_mask

    for image in loaded:
        rgb, alpha = image.image.rgb, image.image.alpha
        if alpha is not None and area_ok(alpha, seg.min_area, seg.max_area):
            mask, method = alpha, "alpha"
        else:
            mask = plain_background_mask(
                rgb, seg.plain_background_spread, seg.plain_background_tolerance
            )
            method = "plain-background"
        if mask is not None and area_ok(mask, seg.min_area, seg.max_area):
            state.source_uri, state.source = image.uri, encode_png(rgb)
            state.mask, state.mask_method = encode_png(mask), method
            state.photos = []
            return
        state.photos.append((image.uri, encode_png(rgb), None))


# --------------------------------------------------------------------------- model stages


class SegmentProducts(ProductStage):
    """The segmenter for products none of whose photos is a plain-background packshot."""

    name = "segment"

    def __init__(self, config: RestageConfig):
        from actors.segmenter import Segmenter

        super().__init__(config)
        self.model = Segmenter(config.model_spec("segmenter"), config.stage.segment)

    def process(self, state: StageProduct) -> None:
        if state.mask is not None:
            return
        stat = state.stat(self.name)
        stat.items_in = len(state.photos)
        out = self.model(
            {
                "image": [p[1] for p in state.photos],
                "alpha": [p[2] for p in state.photos],
                "placed": [None] * len(state.photos),
            }
        )
        for i, (uri, data, _) in enumerate(state.photos):
            if out["error"][i] is None:
                state.source_uri, state.source = uri, data
                state.mask, state.mask_method = out["mask"][i], out["mask_method"][i]
                stat.items_out = 1
                break
        state.photos = []
        if state.mask is None:
            raise ValueError(f"no product found in any of its {stat.items_in} photos")


class Retrieve(ProductStage):
    """The product crop's CLIP embedding, then the top-k compatible scenes of the index."""

    name = "retrieve"

    def __init__(self, config: RestageConfig, index_uri: str):
        from actors.clip import ClipEmbedder

        super().__init__(config)
        self.model = ClipEmbedder(config.model_spec("clip"))
        self.index = retrieval.Index.open(index_uri, expect_model=source_tag(config, "clip"))
        rows = self.index.rows
        x0, x1 = (rows.column(c).to_numpy(zero_copy_only=False) for c in ("box_x0", "box_x1"))
        y0, y1 = (rows.column(c).to_numpy(zero_copy_only=False) for c in ("box_y0", "box_y1"))
        self.aspects = (x1 - x0) / np.maximum(y1 - y0, 1)

    def compatible(self, aspect: float) -> Callable[[np.ndarray], np.ndarray]:
        """Rows whose product box is no more than max_aspect_change of ``aspect`` off."""
        limit = math.log(self.config.stage.max_aspect_change) + 1e-9
        return lambda rows: np.abs(np.log(self.aspects[rows] / aspect)) <= limit

    def process(self, state: StageProduct) -> None:
        cfg, stat = self.config.stage, state.stat(self.name)
        out = self.model({"image": [state.source], "mask": [state.mask], "text": [None]})
        vector = out["crop_embedding"][0]
        if out["error"][0] or not np.isfinite(vector).all():
            raise ValueError(f"the product's crop was not embedded: {out['error'][0]}")
        state.embedding = [float(x) for x in vector]
        box = Box.of(decode_mask(state.mask) > 0)
        assert box is not None  # the mask passed area_ok
        compatible = self.compatible(box.aspect)
        exclude = [[state.product_id]]
        hits: list[retrieval.Hit] = []
        if state.record.category:
            hits = self.index.search(
                vector,
                cfg.candidates,
                category=state.record.category,
                exclude_product_ids=exclude,
                filter=compatible,
            )[0]
        if len(hits) < cfg.top_k:  # too few in its category (or none given): any category
            seen = {h.row for h in hits}
            more = self.index.search(
                vector, cfg.candidates, exclude_product_ids=exclude, filter=compatible
            )[0]
            hits += [h for h in more if h.row not in seen]
        hits = hits[: cfg.top_k]
        stat.items_in, stat.items_out = 1, len(hits)
        if not hits:
            raise ValueError(
                f"no scene in the index ({len(self.index)} scenes) holds a product of a "
                f"compatible shape (box aspect {box.aspect:.2f} within stage.max_aspect_change="
                f"{cfg.max_aspect_change}), other than the product's own photos"
            )
        for i, h in enumerate(hits):
            state.scenes.append(
                Staging(
                    f"s{i:02d}",
                    h.image_id,
                    h.product_id,
                    h.category,
                    h.fields["scene_uri"],
                    h.fields["mask_uri"],
                    h.similarity,
                    derive_seed(state.product_id, f"stage/{h.image_id}", 0, self.config.seed),
                )
            )


def staged_size(width: int, height: int, longer: int) -> tuple[int, int]:
    """(w, h) with the longer side ``longer``, both multiples of 8 (the inpainter's grid)."""
    scale = longer / max(width, height)
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


class Compose(ProductStage):
    """Remove each scene's product, place the new one, paint the gaps (module doc, 3)."""

    name = "compose"

    def __init__(self, config: RestageConfig):
        from actors.inpainter import Inpainter

        super().__init__(config)
        self.model = Inpainter(
            config.model_spec("inpainter"), config.stage.removal, lora=config.stage.inpainter_lora
        )
        self.tag = source_tag(config, "inpainter")

    def paint(self, images: list[np.ndarray], masks: list[np.ndarray], seeds: list[int]):
        cfg = self.config.stage
        out = self.model(
            {
                "image": [encode_png(x) for x in images],
                "mask": [encode_png(m.astype(np.uint8) * 255) for m in masks],
                "prompt": [cfg.removal_prompt] * len(images),
                "seed": seeds,
            }
        )
        return [
            (decode_rgb(img) if img is not None else None, err)
            for img, err in zip(out["image"], out["error"], strict=True)
        ]

    def process(self, state: StageProduct) -> None:
        cfg, stat = self.config.stage, state.stat(self.name)
        product_rgb, product_mask = decode_rgb(state.source), decode_mask(state.mask) > 0
        scenes, removed, kept = [], [], []
        for s in state.scenes:
            stat.items_in += 1
            s.models["inpainter"] = self.tag
            rgb = decode_rgb(storage.read_bytes(s.scene_uri))
            mask = decode_mask(storage.read_bytes(s.scene_mask_uri))
            s.width, s.height = staged_size(rgb.shape[1], rgb.shape[0], cfg.size)
            rgb = resize(rgb, (s.width, s.height))
            mask = resize(mask, (s.width, s.height), mask=True) > 0
            if not mask.any():
                s.drop_reason = "the scene's product mask vanished at stage.size"
                continue
            grow = max(1, round(cfg.removal_dilation * min(s.width, s.height)))
            scenes.append(rgb)
            removed.append(removal_mask(mask, grow))
            kept.append((s, mask))
        # 1. remove: the background behind each scene's product
        painted = self.paint(scenes, removed, [s.seed for s, _ in kept])
        layers = []
        for (s, mask), rgb, hole, (fill, err) in zip(kept, scenes, removed, painted, strict=True):
            if fill is None:
                s.drop_reason = f"removal failed: {err}"
                continue
            background = np.where(hole[..., None], fill, rgb)
            where = Target(Box.of(mask), ground_line(mask, self.config.index.ground_share))
            staged = composite(
                background,
                product_rgb,
                product_mask,
                where,
                feather=cfg.feather,
                shadow_opacity=cfg.shadow_opacity,
                harmonize=cfg.harmonize,
            )
            s.placement, s.scale, s.ground = (
                staged.placement.box,
                staged.placement.scale,
                where.ground,
            )
            layers.append((s, hole, staged))
        # 2. the gaps between the removed and the new silhouette, painted with the product in
        # place; its pixels (alpha > 0) are never taken from the inpainter
        gaps = [gap_mask(hole, staged.alpha > 0) for _, hole, staged in layers]
        refill: list[tuple[np.ndarray | None, str | None]] = [(None, None)] * len(layers)
        todo = [i for i, g in enumerate(gaps) if cfg.refine_gaps and g.any()]
        if todo:
            again = self.paint(
                [layers[i][2].image for i in todo],
                [gaps[i] for i in todo],
                [layers[i][0].seed + 1 for i in todo],
            )
            for i, result in zip(todo, again, strict=True):
                refill[i] = result
        for (s, _, staged), gap, (fill, err) in zip(layers, gaps, refill, strict=True):
            image, background = staged.image, staged.background
            if fill is not None:
                image = np.where(gap[..., None], fill, image)
                background = np.where(gap[..., None], fill, background)
            elif err:
                state.error(self.name, f"gap refinement failed, the removal's fill stays: {err}")
            s.image = encode_png(image)
            s.background = encode_png(background)
            s.product = encode_png(staged.product)
            s.alpha = encode_png(np.rint(staged.alpha * 255).astype(np.uint8))
            s.shadow = encode_png(np.rint(staged.shadow * 255).astype(np.uint8))
            stat.items_out += 1
        stat.dropped = stat.items_in - stat.items_out


class Score(ProductStage):
    """CLIP-I of the placed product, the re-segmented product's IoU with its placement, the
    seam's boundary score; the best ``stage.keep`` are kept (module doc, 4)."""

    name = "score"

    def __init__(
        self,
        config: RestageConfig,
        clip: ClipEmbedder | None = None,
        segmenter: Segmenter | None = None,
    ):
        """``clip``, ``segmenter``: models already loaded in this process (the Stager
        replica's, shared with its retrieve and segment stages) instead of loading copies."""
        from actors.clip import ClipEmbedder
        from actors.segmenter import Segmenter

        super().__init__(config)
        self.clip = clip or ClipEmbedder(config.model_spec("clip"))
        self.segmenter = segmenter or Segmenter(
            config.model_spec("segmenter"), config.stage.segment
        )
        self.tags = {
            "clip": source_tag(config, "clip"),
            "segmenter": source_tag(config, "segmenter"),
        }

    def process(self, state: StageProduct) -> None:
        cfg, stat = self.config.stage, state.stat(self.name)
        todo = [s for s in state.scenes if s.image is not None]
        stat.items_in = len(todo)
        placed = [encode_png(s.placed_mask().astype(np.uint8) * 255) for s in todo]
        crops = self.clip(
            {"image": [s.image for s in todo], "mask": placed, "text": [None] * len(todo)}
        )
        found = self.segmenter(
            {"image": [s.image for s in todo], "alpha": [None] * len(todo), "placed": placed}
        )
        query = np.asarray(state.embedding, np.float32)
        w = cfg.scoring
        for i, s in enumerate(todo):
            s.models.update(self.tags)
            where = s.placed_mask()
            vector = crops["crop_embedding"][i]
            clip_i = float(vector @ query) if np.isfinite(vector).all() else float("nan")
            resegmented = (
                decode_mask(found["mask"][i]) > 0
                if found["mask"][i] is not None
                else np.zeros_like(where)
            )
            iou = mask_iou(resegmented, where)
            seam = boundary_score(decode_rgb(s.image), where)
            s.scores = {Metric.CLIP_I: clip_i, MASK_IOU: iou, BOUNDARY: seam}
            parts = [w.clip_i * clip_i, w.mask_iou * iou, -w.boundary * max(0.0, seam - 1)]
            s.score = float(sum(p for p in parts if math.isfinite(p)))
            if iou < w.min_mask_iou:
                s.drop_reason = (
                    f"re-segmented product overlaps its placement {iou:.2f}, under "
                    f"stage.scoring.min_mask_iou={w.min_mask_iou}"
                )
        ranked = sorted(
            (s for s in todo if s.drop_reason is None), key=lambda s: (-(s.score or 0), s.stage_id)
        )
        for rank, s in enumerate(ranked, start=1):
            s.rank = rank
            s.kept = rank <= cfg.keep
            if not s.kept:
                s.drop_reason = f"ranked {rank}, below the top stage.keep={cfg.keep}"
        stat.items_out = sum(s.kept for s in todo)
        stat.dropped = stat.items_in - stat.items_out


class StagedFeatures(ProductStage):
    """Inception features of the kept staged images, for FID/KID against the scenes. A
    failure is recorded and the image stays kept: only the measure goes without it."""

    name = "inception"

    def __init__(self, config: RestageConfig):
        from actors.inception import InceptionFeatures

        super().__init__(config)
        self.model = InceptionFeatures(config.model_spec("inception"))

    def process(self, state: StageProduct) -> None:
        todo, stat = [s for s in state.scenes if s.kept], state.stat(self.name)
        stat.items_in = len(todo)
        if not todo:
            return
        out = self.model({"image": [s.image for s in todo]})
        for s, features, error in zip(todo, out["features"], out["error"], strict=True):
            if error:
                state.error(self.name, error, item=s.stage_id)
                continue
            s.features = features
            stat.items_out += 1


def model_stages(config: RestageConfig) -> list[tuple[type[ProductStage], tuple[str, ...]]]:
    stages: list[tuple[type[ProductStage], tuple[str, ...]]] = [
        (SegmentProducts, ("segmenter",)),
        (Retrieve, ("clip",)),
        (Compose, ("inpainter",)),
        (Score, ("clip", "segmenter")),
    ]
    if config.stage.fid:
        stages.append((StagedFeatures, ("inception",)))
    return stages


# --------------------------------------------------------------------------- write


def write_staged(
    batch: dict[str, np.ndarray], config: RestageConfig, root: str, animate: bool
) -> dict[str, np.ndarray]:
    """The kept images (and clips), the product's mask, the manifest shard, errors and the
    marker last."""
    layout, cfg = StageLayout(root), config.stage

    def files(state: StageProduct) -> Callable[[], list[dict[str, Any]]]:
        def rows() -> list[dict[str, Any]]:
            stat = state.stat("write")
            mask_uri = storage.join(layout.images_dir(state.product_id), "_product_mask.png")
            storage.write_bytes(mask_uri, state.mask)
            out = []
            for s in state.scenes:
                if s.kept and s.image is not None:
                    s.image_uri = layout.image(state.product_id, s.stage_id, cfg.image_format)
                    storage.write_bytes(s.image_uri, encode(decode_rgb(s.image), cfg.image_format))
                    if animate:
                        s.clip_uris = _animate(s, cfg.animation, layout, state.product_id)
                    stat.items_out += 1
                stat.items_in += 1
                out.append(_row(state, s, mask_uri))
            features = [
                {
                    "side": FID_SIDE,
                    "image_id": f"{state.product_id}/{s.stage_id}",
                    "features": s.features.tolist(),
                }
                for s in state.scenes
                if s.kept and s.features is not None
            ]
            if features:
                storage.write_parquet(
                    layout.features(state.product_id),
                    pa.Table.from_pylist(features, schema=FEATURES_SCHEMA),
                )
            return out

        return rows

    def marker(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"scenes": len(rows), "kept": sum(r["kept"] for r in rows), "animated": animate}

    states = unpack(batch)
    for state in states:
        if state.failed:
            state.remove_files()
    return outcome_batch(
        [write_product(layout, s, STAGED_SCHEMA, files(s), marker) for s in states]
    )


def _animate(s: Staging, config: Any, layout: StageLayout, product_id: str) -> list[str]:
    layers = parallax.StageLayers(
        decode_rgb(s.background),
        decode_rgb(s.product),
        decode_mask_soft(s.alpha),
        decode_mask_soft(s.shadow),
    )
    made = parallax.animate(layers, config, layout.clip_stem(product_id, s.stage_id))
    return [made[fmt].uri for fmt in config.formats]


def decode_mask_soft(data: bytes) -> np.ndarray:
    """An 8-bit opacity PNG -> float32 in [0, 1] (decode_mask would threshold it)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float32) / 255


def _row(state: StageProduct, s: Staging, mask_uri: str) -> dict[str, Any]:
    box = s.placement

    def num(name: str) -> float | None:
        value = s.scores.get(name)
        return None if value is None or not math.isfinite(value) else value

    return {
        "product_id": state.product_id,
        "stage_id": s.stage_id,
        "scene_image_id": s.scene_image_id,
        "scene_product_id": s.scene_product_id,
        "scene_category": s.scene_category,
        "scene_uri": s.scene_uri,
        "similarity": s.similarity,
        "source_uri": state.source_uri,
        "source_mask_uri": mask_uri,
        "source_mask_method": state.mask_method,
        "image_uri": s.image_uri,
        "clip_uris": s.clip_uris,
        "width": s.width,
        "height": s.height,
        "place_x0": box.x0 if box else None,
        "place_y0": box.y0 if box else None,
        "place_x1": box.x1 if box else None,
        "place_y1": box.y1 if box else None,
        "scale": s.scale,
        "ground": s.ground,
        Metric.CLIP_I: num(Metric.CLIP_I),
        MASK_IOU: num(MASK_IOU),
        BOUNDARY: num(BOUNDARY),
        "score": s.score,
        "rank": s.rank,
        "kept": s.kept,
        "drop_reason": s.drop_reason,
        "models": sorted(s.models.items()),
    }


# --------------------------------------------------------------------------- the job


def build_dataset(
    records: Any,
    config: RestageConfig,
    root: str,
    policy: SourcePolicy,
    index_uri: str,
    animate: bool,
    staged: dict[str, int] | None,
) -> Any:
    cpu, per_call = config.stage.cpus_per_task, config.stage.products_per_batch

    def decoded(chosen: Any) -> Any:
        return chosen.map_batches(
            decode_products,
            fn_kwargs={"config": config, "policy": policy, "root": root},
            batch_size=per_call,
            num_cpus=cpu,
        )

    ds = map_stages(
        decoded(records),
        model_stages(config),
        config,
        per_call,
        {Retrieve: {"index_uri": index_uri}},
    )
    return ds.map_batches(
        write_staged,
        fn_kwargs={"config": config, "root": root, "animate": animate},
        batch_size=per_call,
        num_cpus=cpu,
    )


def stage(
    config: RestageConfig, manifest: str, index_uri: str, out: str, animate: bool = False
) -> JobSummary:
    """Run the stage job: ``manifest`` (products) staged into the scenes of ``index_uri``
    (`restage index`'s OUT/index) -> ``out``."""
    start = time.perf_counter()
    root = storage.normalize_uri(out)
    layout = StageLayout(root)
    manifest_uri = storage.normalize_uri(manifest)
    manifest_format(manifest_uri)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"manifest {manifest_uri!r} does not exist")
    index_uri = storage.normalize_uri(index_uri)
    try:  # a missing, partial or other-model index fails before Ray starts
        retrieval.Index.open(index_uri, expect_model=source_tag(config, "clip"))
    except retrieval.IndexFormatError as exc:
        raise ValueError(
            f"--index {index_uri}: {exc}. Give the index folder that `restage index "
            "--catalog CATALOG --out DIR` writes: DIR/index"
        ) from None
    policy = SourcePolicy.for_manifest(manifest_uri, config.storage)

    def rows() -> Any:
        storage.remove(manifest_errors_dir(layout.errors_dir()), recursive=True)
        return manifest_dataset(manifest_uri, JOB, layout.errors_dir())

    done = _job.execute(
        JOB,
        config,
        layout,
        rows,
        lambda todo, cfg, staged: build_dataset(
            todo, cfg, root, policy, index_uri, animate, staged
        ),
        whole_job=True,
    )
    quality = staged_quality(config, layout, index_uri)
    return _job.finish_whole_job(
        JOB,
        layout,
        done,
        STAGES,
        start,
        lambda: {"manifest": manifest, "index": index_uri, "animate": animate, "quality": quality},
    )


def staged_quality(config: RestageConfig, layout: StageLayout, index_uri: str) -> dict[str, Any]:
    """FID and KID of every kept staged image (this run's and earlier runs') against the
    index's scenes, or why not (ray_app/fid.distribution's refusal included)."""
    from ray_app import fid

    e = config.evaluate
    if not config.stage.fid:
        return {"refused": "stage.fid is off"}
    reference_uri = IndexLayout.fid_reference(index_uri)
    if not storage.exists(reference_uri):
        return {
            "refused": f"the index has no FID reference ({reference_uri}): build it with "
            "`restage index` and index.fid_reference on"
        }
    reference = fid.load_side(reference_uri)
    merged = fid.merge_sides(
        layout.features_dir(),
        {FID_SIDE: e.kid_max_images / max(fid.count_features(layout.features_dir()), 1)},
        (),
        config.stage.cpus_per_task,
    )
    staged = merged.get(FID_SIDE) or fid.SideFeatures(reference.num_features, real=False)
    return {
        "reference": reference_uri,
        **fid.distribution(
            staged,
            reference,
            min_images=e.min_fid_images,
            kid_subset_size=e.kid_subset_size,
            kid_subsets=e.kid_subsets,
            seed=config.seed,
        ).to_dict(),
    }


@dataclass(frozen=True)
class StageArgs:
    """``restage stage``'s arguments."""

    manifest: str
    index: str
    out: str
    animate: bool = False


def main(config: RestageConfig, args: StageArgs) -> JobSummary:
    """CLI entry: ``restage stage --manifest URI --index URI --out URI [--animate]``."""
    return stage(config, args.manifest, args.index, args.out, args.animate)
