"""`restage personalize evaluate`: each product's personalized encoder (``restage
personalize``'s LoRA) side by side with the pretrained one (the same encoder, LoRA off), on a
test manifest of images labelled by product (personalized representations, arXiv
2412.16156, sec. 4).

The test manifest (JSONL, CSV or Parquet, read by the project's manifest reader): one image
a row, ``image_uri``; ``product_id`` (the product shown; null or empty: a distractor that
shows none of them); optional ``mask_uri`` (the product's mask: detection and
segmentation); optional ``split``: ``reference`` (the images a product is recognised by),
``val`` (thresholds are chosen here) or ``test`` (measured here); optional ``group`` (e.g.
the product's category). Per product (and for the
distractors) the images without a split are split with a seed: when the product has no
``reference`` image, ``personalize.evaluate.references`` of them are drawn as its
references; ``val_fraction`` of the rest is validation, the rest test. A bad row becomes a
row of ``OUT/_errors/`` naming it and the problem; the job goes on without it.

Per product with an encoder under ``--encoders``, for each encoder (``personal``,
``pretrained``), over the val/test images of every product and distractor (other products'
reference images are left out) -- or, where the manifest has groups, over those of the
product's group and the images without a group. Without groups every product is measured
against the whole pool, so the job grows with the square of the catalog; with groups, with
the catalog times a group's size (a product's rows name one group; a row naming another is
an error row):

- **classification**: an image's score is its max (or mean, ``similarity``) cosine
  similarity to the product's reference images (the encoder's pooled feature); ROC AUC on
  test, and accuracy and balanced accuracy on test at the threshold with the best balanced
  accuracy on validation;
- **retrieval**: the product's test images among all test images, ranked by that score: AP
  and recall@k (ray_app/personal_retrieval.py);
- **dense map**: each final patch token's cosine similarity to the prototype, the mean over
  the product's references of their mean patch token; upsampled bilinearly to
  ``mask_side`` over the encoder's view of the image (its centred square), where masks are
  compared too. Its threshold (``threshold``): the one with the best mean IoU on the
  product's validation masks (Otsu's on each image where it has none), or Otsu's per image;
- **segmentation**: mean IoU of the thresholded map with the product's test masks;
- **detection**: on every test image, the box of the largest connected region of the
  thresholded map, scored by the map's maximum: AP at IoU ``detection_iou`` against the
  mask's box; images of other products and distractors are negatives, the product's test
  images without a mask are left out.

On Ray Data: one row per product through an actor pool of the encoder (the base loaded
once per actor, a product per call, the products in group order); an actor keeps the
images of the group it is in and the ungrouped ones, decoded and with their pretrained
features (and the patch tokens of ``cached_tokens`` of them), and drops the group's when its
next product is of another; it encodes a product's pool ``ENCODE_CHUNK`` images at a time
and keeps their dense maps, not their patch tokens (at ViT-B/14 224 px, 2 KB an image where
its tokens take 0.8 MB); it writes the product's results shard (``OUT/_products/<id>.parquet``) and errors shard, the driver
merges them. A re-run with the same inputs and settings skips
the products whose shard exists; other inputs start over. Outputs: ``results.parquet``
(``RESULT_SCHEMA``: one row per product x encoder x metric), ``summary.json`` (means over
products with bootstrap intervals, personal - pretrained paired), ``report/index.html``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from ray_app import storage
from ray_app.config import PersonalEvalConfig, RestageConfig
from ray_app.personal_eval import (
    Detection,
    accuracy,
    balanced_accuracy,
    best_mask_threshold,
    best_threshold,
    box_iou,
    detection_ap,
    largest_box,
    mask_box,
    mask_iou,
    otsu_threshold,
    prototype,
    roc_auc,
    similarity_map,
    upsample,
)
from ray_app.personal_retrieval import average_precision, recall_at_k
from ray_app.progress import ProgressFile
from ray_app.records import ErrorRow, RecordError, validate_product_id
from ray_app.seeds import derive_seed
from ray_app.storage import EncoderLayout, PersonalEvalLayout, join, write_errors

JOB = "personalize_evaluate"
REFERENCE, VAL, TEST = "reference", "val", "test"
SPLITS = (REFERENCE, VAL, TEST)
ENCODERS = ("personal", "pretrained")
IO_THREADS = 8
# Images encoded per call when a product is measured: their patch tokens (float32, ~0.8 MB
# an image at ViT-B/14 224 px) are turned into dense maps before the next chunk, so an
# actor never holds a whole pool's tokens (a 20,000-image pool's: 15.7 GB, and a float16
# copy besides, before).
ENCODE_CHUNK = 256
log = logging.getLogger("restage")

# One row per product x encoder x metric.
RESULT_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("encoder", pa.string(), nullable=False),  # personal | pretrained
        pa.field("task", pa.string(), nullable=False),  # classification | retrieval | ...
        pa.field("metric", pa.string(), nullable=False),  # auc, ap, recall@5, ap50, miou, ...
        pa.field("value", pa.float64()),  # NaN: nothing to measure (e.g. no test mask)
        pa.field("n", pa.int64()),  # the test items the value is over (positives for AP/mIoU)
    ]
)


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class LabelledImage:
    """One row of the test manifest, its split decided."""

    where: str  # "line 3": what error rows name
    image_uri: str
    product_id: str | None  # None: a distractor
    mask_uri: str | None
    split: str
    group: str | None = None  # None: in every product's pool


def _text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        raise RecordError(f"{key} must be a string, got {type(value).__name__} {value!r}")
    return value.strip() or None


def _test_row(where: str, raw: Any, base: str) -> tuple[LabelledImage | None, str | None]:
    """A raw manifest row -> (its image, None) or (None, why it is refused)."""
    if isinstance(raw, str):
        return None, raw
    if not isinstance(raw, dict):
        return None, f"a row must be an object, got {type(raw).__name__}"
    try:
        uri = _text(raw, "image_uri")
        if uri is None:
            raise RecordError("image_uri is missing or empty: give the image's URI")
        pid = _text(raw, "product_id")
        if pid is not None:
            pid = validate_product_id(pid)
        mask = _text(raw, "mask_uri")
        split = _text(raw, "split")
        if split is not None and split not in SPLITS:
            raise RecordError(
                f"split={split!r}: give one of {', '.join(SPLITS)}, or leave it empty for a "
                "seeded split"
            )
        if pid is None and mask is not None:
            raise RecordError("mask_uri on a distractor (no product_id): a mask needs a product")
        if pid is None and split == REFERENCE:
            raise RecordError("split='reference' on a distractor: references need a product_id")
        group = _text(raw, "group")
    except RecordError as exc:
        return None, str(exc)
    return LabelledImage(
        where,
        storage.resolve_relative(uri, base),
        pid,
        storage.resolve_relative(mask, base) if mask else None,
        split or "",
        group,
    ), None


def assign_splits(
    images: list[LabelledImage], config: PersonalEvalConfig, run_seed: int
) -> list[LabelledImage]:
    """Give every image without a split one, per product (and for the distractors), from a
    seed of the product: ``config.references`` drawn as references when the product has
    none, then ``val_fraction`` of the rest for validation, the others test."""
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[img.product_id].append(i)
    out = list(images)
    for pid, members in groups.items():
        rng = np.random.default_rng(derive_seed(pid or "_distractors", JOB, run_seed=run_seed))
        free = [i for i in members if not images[i].split]
        free = [free[j] for j in rng.permutation(len(free))]
        if pid is not None and not any(images[i].split == REFERENCE for i in members):
            refs, free = free[: config.references], free[config.references :]
            for i in refs:
                out[i] = _with_split(images[i], REFERENCE)
        n_val = round(config.val_fraction * len(free))
        for j, i in enumerate(free):
            out[i] = _with_split(images[i], VAL if j < n_val else TEST)
    return out


def product_groups(images: list[LabelledImage]) -> dict[str, str | None]:
    """Each product's group (``read_test_manifest`` keeps one per product)."""
    return {img.product_id: img.group for img in images if img.product_id}


def _with_split(img: LabelledImage, split: str) -> LabelledImage:
    return LabelledImage(img.where, img.image_uri, img.product_id, img.mask_uri, split, img.group)


def read_test_manifest(
    uri: str, config: PersonalEvalConfig, run_seed: int
) -> tuple[list[LabelledImage], list[ErrorRow]]:
    """The test manifest's images (splits decided) and its refused rows."""
    from ray_app.records import _opened, _raw_rows  # the project's manifest reader

    uri, fmt, base = _opened(uri)
    images, errors, seen = [], [], {}
    groups: dict[str, tuple[str | None, str]] = {}  # product -> (its group, the row it came from)
    for where, raw in _raw_rows(uri, fmt):
        img, why = _test_row(where, raw, base)
        if img is not None and img.image_uri in seen:
            why, img = (
                f"duplicate image_uri (first at {seen[img.image_uri]}); the first is kept",
                None,
            )
        if img is not None and img.product_id is not None:
            group, first = groups.setdefault(img.product_id, (img.group, where))
            if group != img.group:
                why, img = (
                    f"group={img.group!r}, but product {img.product_id} is in group {group!r} "
                    f"({first}): give all of a product's rows one group",
                    None,
                )
        if img is None:
            pid = raw.get("product_id") if isinstance(raw, dict) else None
            errors.append(
                ErrorRow(
                    JOB,
                    "manifest",
                    f"{where}: {why}",
                    product_id=pid if isinstance(pid, str) and pid else None,
                    item=where,
                    record=json.dumps(raw, default=str)[:10_000],
                )
            )
            continue
        seen[img.image_uri] = where
        images.append(img)
    return assign_splits(images, config, run_seed), errors


# --------------------------------------------------------------------------- the encoder pool


@dataclass
class Loaded:
    """An image as the encoder sees it, and its mask there (or why it has none)."""

    view: np.ndarray  # the centred square at the encoder's resolution
    mask: np.ndarray | None  # (mask_side, mask_side) bool over the same square


def _centre(arr: np.ndarray) -> np.ndarray:
    """``arr`` cut as the encoder frames an image (``centred_box``)."""
    from actors.encoder_trainer import centred_box  # torch: actors only

    x, y, side = centred_box(*arr.shape[:2])
    return arr[y : y + side, x : x + side]


_NO_GROUP_YET = object()  # an actor before its first product


class EvaluateEncoders:
    """The encoder pool (``map_batches`` callable class): loads the base encoder once and
    the test images once; a product per call -> its results and errors shards, written
    here, and an outcome row."""

    def __init__(
        self,
        config: RestageConfig,
        images: list[LabelledImage],
        encoders: str,
        root: str,
        read: Any,
    ):
        from actors.encoder_trainer import EncoderTrainer

        self.config = config
        self.encoders = EncoderLayout(encoders)
        self.options = config.personalize.evaluate
        self.layout = PersonalEvalLayout(root)
        self.read = read
        self.trainer = EncoderTrainer(config.model_spec("encoder"), config.personalize)
        self.images = images
        self.by_group: dict[str | None, list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            self.by_group[img.group].append(i)
        self.group_of = product_groups(images)
        # The images of the group an actor is in and the ungrouped ones: decoded (or why not)
        # and their pretrained (pooled feature, patch tokens).
        self.loaded: dict[int, Loaded | str] = {}
        self.pretrained: dict[int, np.ndarray] = {}  # pooled features
        self.tokens: dict[int, np.ndarray] = {}  # patch tokens, of options.cached_tokens at most
        self.group: str | object | None = _NO_GROUP_YET

    # ------------------------------------------------------------------ images

    def _load(self, img: LabelledImage) -> tuple[Loaded | str, str | None]:
        """-> (the image, or why it is unusable; why its mask is unusable, if it is)."""
        from actors.encoder_trainer import center_square
        from ray_app.images import decode_mask, load_images

        cfg = self.config.images
        found, failed = load_images(
            [img.image_uri],
            max_megapixels=cfg.max_megapixels,
            max_side=cfg.max_side,
            min_side=cfg.min_side,
            read=self.read,
        )
        if failed:
            return failed[0][1], None
        decoded = found[0].image
        view = center_square(decoded.rgb, self.trainer.resolution)
        if img.mask_uri is None:
            return Loaded(view, None), None
        try:
            mask = decode_mask(self.read(img.mask_uri))
        except Exception as exc:
            return Loaded(
                view, None
            ), f"unreadable mask {img.mask_uri}: {type(exc).__name__}: {exc}"
        width, height = decoded.source_size
        if (mask.shape[1], mask.shape[0]) != (width, height):
            return Loaded(view, None), (
                f"mask {img.mask_uri} is {mask.shape[1]}x{mask.shape[0]}, its image "
                f"{width}x{height}: give a mask of the image's size"
            )
        side = self.options.mask_side
        square = Image.fromarray(_centre(mask)).resize((side, side), Image.NEAREST)
        return Loaded(view, np.asarray(square) >= 128), None

    def scope(self, group: str | None) -> list[int]:
        """The images a product of ``group`` is measured on: the group's and the ungrouped
        ones; every image for a product without a group."""
        if group is None:
            return list(range(len(self.images)))
        return sorted(self.by_group.get(group, []) + self.by_group.get(None, []))

    def _enter(self, group: str | None) -> None:
        """Keep the images of ``group`` (and the ungrouped) decoded, dropping another
        group's; their load errors go to one shard per group (the same rows from every
        actor that loads them)."""
        if group == self.group:
            return
        ungrouped = set(self.by_group.get(None, []))
        self.loaded = {i: v for i, v in self.loaded.items() if i in ungrouped}
        self.pretrained = {i: v for i, v in self.pretrained.items() if i in ungrouped}
        self.tokens = {i: v for i, v in self.tokens.items() if i in ungrouped}
        self.group = group
        todo = [i for i in self.scope(group) if i not in self.loaded]
        with ThreadPoolExecutor(IO_THREADS) as pool:
            results = list(pool.map(self._load, [self.images[i] for i in todo]))
        errors: dict[str | None, list[ErrorRow]] = defaultdict(list)
        for i, (got, mask_why) in zip(todo, results, strict=True):
            self.loaded[i] = got
            img = self.images[i]
            if isinstance(got, str):
                errors[img.group].append(
                    ErrorRow(JOB, "load", f"{img.where}: {got}", img.product_id, img.image_uri)
                )
            if mask_why:
                errors[img.group].append(
                    ErrorRow(JOB, "load", f"{img.where}: {mask_why}", img.product_id, img.mask_uri)
                )
        loaded_groups = {self.images[i].group for i in todo}
        for g in loaded_groups:
            write_errors(self.layout, _images_shard(g), errors.get(g, []))

    def _cache_pretrained(self, idx: list[int]) -> None:
        """Encode the images of ``idx`` not yet cached with the pretrained encoder: each image
        once per stay in a group. Its pooled feature is kept, and its float16 patch tokens
        while fewer than ``cached_tokens`` are."""
        room = self.options.cached_tokens
        for part, feats, tokens in self._encode(
            False, [i for i in idx if i not in self.pretrained]
        ):
            for k, i in enumerate(part):
                self.pretrained[i] = feats[k].copy()
                if len(self.tokens) < room:
                    self.tokens[i] = tokens[k].copy()  # not a view: the chunk goes

    def _pretrained_tokens(self, idx: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(image, its pretrained float16 patch tokens) for ``idx``: the kept ones, then the
        others encoded again ``ENCODE_CHUNK`` at a time."""
        for i in idx:
            if i in self.tokens:
                yield i, self.tokens[i]
        for part, _, tokens in self._encode(False, [i for i in idx if i not in self.tokens]):
            yield from zip(part, tokens, strict=True)

    def _encode(
        self, personal: bool, idx: list[int]
    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """-> per chunk of at most ``ENCODE_CHUNK`` images: (their indices, pooled features
        (n, D), float32; patch tokens (n, h, w, d), float16)."""
        for start in range(0, len(idx), ENCODE_CHUNK):
            part = idx[start : start + ENCODE_CHUNK]
            views = [self.loaded[i].view for i in part]  # type: ignore[union-attr]
            bs = self.options.batch_size
            feats, tokens = self.trainer.encode(views, personal=personal, batch_size=bs)
            yield part, feats, tokens.astype(np.float16)

    def _features(
        self, personal: bool, refs: list[int], pool: list[int]
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """One encoder's view of a product: (the references' features, the pool's features,
        the pool's dense maps against the references' prototype)."""
        if not personal:
            self._cache_pretrained(refs + pool)
            ref_feats = np.stack([self.pretrained[i] for i in refs])
            ref_tokens = dict(self._pretrained_tokens(refs))
            proto = prototype(np.stack([ref_tokens[i] for i in refs]).astype(np.float32))
            maps = {
                i: similarity_map(t.astype(np.float32), proto)
                for i, t in self._pretrained_tokens(pool)
            }
            pool_feats = _rows([self.pretrained[i] for i in pool], ref_feats)
            return ref_feats, pool_feats, [maps[i] for i in pool]
        ref_parts = list(self._encode(True, refs))
        ref_feats = np.concatenate([f for _, f, _ in ref_parts])
        proto = prototype(np.concatenate([t for _, _, t in ref_parts]).astype(np.float32))
        feats, maps = [], []
        for _, part_feats, tokens in self._encode(True, pool):
            feats.append(part_feats)
            maps += [similarity_map(t.astype(np.float32), proto) for t in tokens]
        return ref_feats, _rows(feats, ref_feats, concat=True), maps

    # ------------------------------------------------------------------ a product

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"product_id": [], "status": [], "rows": [], "reason": []}
        for pid in batch["product_id"]:
            pid = str(pid)
            errors: list[ErrorRow] = []
            try:
                rows = self.evaluate(pid)
                storage.write_parquet(
                    self.layout.product_shard(pid), pa.Table.from_pylist(rows, RESULT_SCHEMA)
                )
                status, reason = "ok", ""
            except Exception as exc:  # one product's failure is its error row, not the job's
                rows, status, reason = [], "failed", f"{type(exc).__name__}: {exc}"
                errors.append(ErrorRow(JOB, "evaluate", reason, pid))
            write_errors(self.layout, pid, errors)
            out["product_id"].append(pid)
            out["status"].append(status)
            out["rows"].append(len(rows))
            out["reason"].append(reason)
        return {k: np.asarray(v) for k, v in out.items()}

    def evaluate(self, pid: str) -> list[dict[str, Any]]:
        """The product's rows of ``RESULT_SCHEMA`` for both encoders."""
        group = self.group_of[pid]
        self._enter(group)
        usable = [i for i in self.scope(group) if isinstance(self.loaded[i], Loaded)]
        refs = [
            i
            for i in usable
            if self.images[i].product_id == pid and self.images[i].split == REFERENCE
        ]
        if not refs:
            raise ValueError(
                f"no readable reference image of {pid} in the test manifest: give it rows with "
                "split 'reference', or rows without a split (personalize.evaluate.references "
                "of them are drawn)"
            )
        pool = [i for i in usable if self.images[i].split in (VAL, TEST)]
        self.trainer.load(self.encoders.encoder_dir(pid))
        rows = []
        for encoder in ENCODERS:
            ref_feats, pool_feats, pool_maps = self._features(encoder == "personal", refs, pool)
            measured = measure_product(
                pid,
                [self.images[i] for i in pool],
                [self.loaded[i].mask for i in pool],  # type: ignore[union-attr]
                ref_feats,
                pool_feats,
                pool_maps,
                self.options,
            )
            rows += [{"product_id": pid, "encoder": encoder, **m} for m in measured]
        return rows


def _rows(parts: list[np.ndarray], like: np.ndarray, concat: bool = False) -> np.ndarray:
    """Feature rows stacked (or chunks concatenated); none: (0, D) like ``like``'s."""
    if not parts:
        return np.zeros((0, like.shape[1]), like.dtype)
    return np.concatenate(parts) if concat else np.stack(parts)


def _images_shard(group: str | None) -> str:
    """The errors shard of a group's unreadable images (``_images``: the ungrouped)."""
    if group is None:
        return "_images"
    return "_images-" + hashlib.sha1(group.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the measures


def measure_product(
    pid: str,
    pool: list[LabelledImage],
    masks: list[np.ndarray | None],
    ref_feats: np.ndarray,
    pool_feats: np.ndarray,
    pool_maps: Sequence[np.ndarray],
    options: PersonalEvalConfig,
) -> list[dict[str, Any]]:
    """One product's measures with one encoder: ``pool`` are the val and test images (every
    product's and the distractors'), their masks where they show ``pid`` with a usable one;
    ``pool_maps`` their patch tokens' cosine similarity to the product's prototype, (h, w)
    each (``similarity_map``). -> rows (task, metric, value, n)."""
    sims = pool_feats @ ref_feats.T
    scores = sims.max(axis=1) if options.similarity == "max" else sims.mean(axis=1)
    labels = np.array([img.product_id == pid for img in pool], bool)
    val = np.array([img.split == VAL for img in pool], bool)
    test = ~val
    rows: list[dict[str, Any]] = []

    def add(task: str, metric: str, value: float, n: int) -> None:
        rows.append({"task": task, "metric": metric, "value": float(value), "n": int(n)})

    n_test, n_pos = int(test.sum()), int((test & labels).sum())
    # classification
    threshold = best_threshold(scores[val], labels[val])
    add("classification", "auc", roc_auc(scores[test], labels[test]), n_test)
    acc = bal = float("nan")
    if math.isfinite(threshold):
        acc = accuracy(scores[test], labels[test], threshold)
        bal = balanced_accuracy(scores[test], labels[test], threshold)
    add("classification", "accuracy", acc, n_test)
    add("classification", "balanced_accuracy", bal, n_test)
    # retrieval
    add(
        "retrieval",
        "ap",
        average_precision(scores[test], labels[test]) if n_pos else math.nan,
        n_pos,
    )
    for k in options.recall_at:
        value = recall_at_k(scores[test], labels[test], k) if n_pos else math.nan
        add("retrieval", f"recall@{k}", value, n_pos)
    # the dense map, on the mask frame
    side = options.mask_side

    def dense(i: int) -> np.ndarray:
        return upsample(pool_maps[i], side)

    with_mask = [i for i in range(len(pool)) if labels[i] and masks[i] is not None]
    val_masked = [i for i in with_mask if val[i]]
    fixed = float("nan")
    if options.threshold == "validation" and val_masked:
        fixed = best_mask_threshold([dense(i) for i in val_masked], [masks[i] for i in val_masked])

    def cut(values: np.ndarray) -> float:
        return fixed if math.isfinite(fixed) else otsu_threshold(values)

    # segmentation
    ious = []
    for i in (i for i in with_mask if test[i]):
        values = dense(i)
        ious.append(mask_iou(values >= cut(values), masks[i]))  # type: ignore[arg-type]
    finite = [v for v in ious if math.isfinite(v)]
    add("segmentation", "miou", float(np.mean(finite)) if finite else math.nan, len(finite))
    # detection: every test image but the product's own without a (usable, in-view) mask
    detections, truths = [], 0
    for i in np.flatnonzero(test):
        truth = mask_box(masks[i]) if labels[i] and masks[i] is not None else None
        if labels[i] and truth is None:
            continue
        values = dense(i)
        box = largest_box(values >= cut(values))
        truths += truth is not None
        detections.append(Detection(box, float(values.max()), box_iou(box, truth)))
    metric = f"ap{round(options.detection_iou * 100)}"
    add("detection", metric, detection_ap(detections, truths, options.detection_iou), truths)
    return rows


# --------------------------------------------------------------------------- the summary


def summarize(table: pa.Table, options: PersonalEvalConfig, seed: int) -> dict[str, Any]:
    """Means over products per encoder and metric with bootstrap intervals, and the paired
    personal - pretrained difference."""
    from ray_app.stats import bootstrap_mean, paired_difference

    values: dict[tuple[str, str], dict[str, dict[str, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in table.to_pylist():
        key = (r["task"], r["metric"])
        values[key][r["encoder"]][r["product_id"]] = math.nan if r["value"] is None else r["value"]
    kw = {"samples": options.bootstrap_samples, "confidence": options.confidence, "seed": seed}
    metrics = []
    for (task, metric), by_encoder in values.items():
        personal, pretrained = by_encoder.get("personal", {}), by_encoder.get("pretrained", {})
        shared = [p for p in personal if p in pretrained and _finite(personal[p], pretrained[p])]
        metrics.append(
            {
                "task": task,
                "metric": metric,
                "name": f"{task}/{metric}",
                **{
                    enc: bootstrap_mean(list(by_encoder.get(enc, {}).values()), **kw).to_dict()
                    for enc in ENCODERS
                },
                "difference": paired_difference(personal, pretrained, **kw).to_dict(),
                "personal_better": sum(personal[p] > pretrained[p] for p in shared),
                "compared": len(shared),
            }
        )
    return {"metrics": metrics}


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


# --------------------------------------------------------------------------- the report

REPORT = """{% extends "_base.html.j2" %}
{% from "_macros.html.j2" import interval, run_name %}
{% block title %}restage personalize evaluate{% endblock %}
{% block body %}
<h1>Personalized encoders vs the pretrained one</h1>
<p class="muted">Encoders <code>{{ s.encoders }}</code>, test manifest <code>{{ s.test }}</code>:
{{ s.products }} products evaluated ({{ s.failed }} failed), {{ s.images.total }} images
({{ s.images.reference }} reference, {{ s.images.val }} validation, {{ s.images.test }} test,
{{ s.images.distractors }} distractors), {{ s.errors }} error rows under <code>_errors/</code>.</p>
<p class="muted small">Mean over products with its {{ (s.confidence * 100) | round | int }} %
bootstrap interval over products and n; the last column is the paired per-product
difference personal − pretrained, and how many products the personal encoder does better on.
Every measure: higher is better.</p>
<table id="measured-table">
  <tr><th>task</th><th>metric</th>
  {% for enc in encoders %}<th>{{ run_name(enc, colours[enc]) }}</th>{% endfor %}
  <th>personal − pretrained</th><th>better</th></tr>
  {% for m in s.metrics %}
  <tr><th>{{ m.task }}</th><th>{{ m.metric }}</th>
    {% for enc in encoders %}<td class="num">{{ interval(m[enc]) }}</td>{% endfor %}
    <td class="num">{{ interval(m.difference) }}</td>
    <td class="num">{{ m.personal_better }} / {{ m.compared }}</td></tr>
  {% endfor %}
</table>
<h2 id="distributions">Distributions per product</h2>
<div class="plots" id="plots">
{% for plot in plots %}
  <figure><figcaption>{{ plot.name }}</figcaption>
  {% if plot.svg %}{{ plot.svg }}{% else %}<p class="muted small">not measured for any product</p>{% endif %}
  </figure>
{% endfor %}
</div>
<h2 id="products">Products</h2>
<table id="products-table">
  <tr><th>product</th>{% for m in s.metrics %}<th>{{ m.name }}</th>{% endfor %}</tr>
  {% for p in products %}
  <tr><th>{{ p.product_id }}</th>
  {% for m in s.metrics %}<td class="num">{% for enc in encoders %}<div>{{ run_name("", colours[enc]) }}{{ p.cells.get((m.name, enc)) | num }}</div>{% endfor %}</td>{% endfor %}
  </tr>
  {% endfor %}
</table>
<p class="muted small">How it is measured: <code>pipelines/personalize_evaluate.py</code>.</p>
{% endblock %}
"""


def write_report(layout: PersonalEvalLayout, summary: dict[str, Any], table: pa.Table) -> str:
    """``report/index.html``: eval_report's page style, macros and plots over this job's
    tables."""
    from ray_app.eval_report import RUN_COLOURS, distribution_svg, template_environment

    colours = dict(zip(ENCODERS, RUN_COLOURS, strict=False))
    per_product: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for r in table.to_pylist():
        per_product[r["product_id"]][(f"{r['task']}/{r['metric']}", r["encoder"])] = r["value"]
    plots = []
    for m in summary["metrics"]:
        values = {
            enc: np.array(
                [
                    v
                    for p in per_product.values()
                    if (v := p.get((m["name"], enc))) is not None and math.isfinite(v)
                ]
            )
            for enc in ENCODERS
        }
        svg = (
            distribution_svg(m["name"], values, colours) if any(map(len, values.values())) else None
        )
        plots.append({"name": m["name"], "svg": svg})
    page = (
        template_environment()
        .from_string(REPORT)
        .render(
            s=summary,
            encoders=ENCODERS,
            colours=colours,
            plots=plots,
            products=[{"product_id": p, "cells": v} for p, v in sorted(per_product.items())],
        )
    )
    uri = join(layout.report_dir(), "index.html")
    storage.write_bytes(uri, page.encode())
    return uri


# --------------------------------------------------------------------------- the job


def _inputs_key(config: RestageConfig, test: str, encoders: str) -> dict[str, Any]:
    digest = hashlib.sha256(storage.read_bytes(test)).hexdigest()
    return {
        "test": test,
        "test_sha256": digest,
        "encoders": encoders,
        "encoder": config.encoder.source,
        "seed": config.seed,
        "options": config.personalize.evaluate.model_dump(mode="json"),
    }


def evaluate_encoders(config: RestageConfig, encoders: str, test: str, out: str) -> dict[str, Any]:
    """Run the job; -> its summary (also ``OUT/summary.json``)."""
    import ray

    from pipelines._job import start
    from ray_app.records import manifest_format
    from ray_app.runtime import role_resources
    from ray_app.sources import SourcePolicy

    begin = time.perf_counter()
    options = config.personalize.evaluate
    enc_root, test_uri = storage.normalize_uri(encoders), storage.normalize_uri(test)
    layout = PersonalEvalLayout(storage.normalize_uri(out))
    manifest_format(test_uri)  # an unknown format fails before Ray starts
    if not storage.exists(test_uri):
        raise FileNotFoundError(f"--test {test}: no such manifest")
    have = {
        name
        for name in storage.list_names(enc_root)
        if storage.exists(EncoderLayout.metadata_in(EncoderLayout(enc_root).encoder_dir(name)))
    }
    if not have:
        raise FileNotFoundError(
            f"--encoders {encoders}: no encoder folder (<product>/encoder.json); give the "
            "--out of `restage personalize`"
        )
    # The live file before anything under OUT changes: it refuses while another run is live.
    with ProgressFile(layout.root, JOB) as progress:
        progress.phase("intake")
        images, errors = read_test_manifest(test_uri, options, config.seed)
        in_manifest = {img.product_id for img in images if img.product_id}
        for pid in sorted(in_manifest - have):
            errors.append(
                ErrorRow(JOB, "encoders", f"no encoder for product {pid} under --encoders", pid)
            )
        products = sorted(in_manifest & have)
        if not products:
            raise ValueError(
                f"--test {test}: none of its products has an encoder under --encoders {encoders}; "
                "label the images with the encoders' product ids"
            )
        key = _inputs_key(config, test_uri, enc_root)
        if storage.exists(layout.inputs()) and storage.read_json(layout.inputs()) != key:
            for folder in (layout.products_dir(), layout.errors_dir()):  # other inputs: start over
                storage.remove(folder, recursive=True)
        storage.write_json(layout.inputs(), key)
        write_errors(layout, "_manifest", errors)
        done = {
            n[: -len(".parquet")] for n in storage.list_names(layout.products_dir(), ".parquet")
        }
        group_of = product_groups(images)
        # In group order: an actor keeps one group's images decoded, and changes group seldom.
        todo = sorted((p for p in products if p not in done), key=lambda p: (group_of[p] or "", p))

        config, _ = start(config, "personalize-evaluate")  # its plan: the encoder pool
        policy = SourcePolicy.for_manifest(test_uri, config.storage)
        failed: dict[str, str] = {}
        progress.found_complete(len(products) - len(todo))
        progress.phase("products", len(todo))
        if todo:
            ds = ray.data.from_items(
                [{"product_id": p} for p in todo], override_num_blocks=len(todo)
            ).map_batches(
                EvaluateEncoders,
                fn_constructor_kwargs={
                    "config": config,
                    "images": images,
                    "encoders": enc_root,
                    "root": layout.root,
                    "read": policy.read,
                },
                batch_size=1,
                **role_resources(config, "encoder"),
            )
            for finished, row in enumerate(ds.iter_rows(), 1):
                log.info("%s: %s %s", JOB, row["product_id"], row["status"])
                if row["status"] != "ok":
                    failed[str(row["product_id"])] = str(row["reason"])
                progress.update(finished, {"ok": finished - len(failed), "failed": len(failed)})
        shards = [
            layout.product_shard(p) for p in products if storage.exists(layout.product_shard(p))
        ]
        table = (
            pa.concat_tables([storage.read_parquet(s, RESULT_SCHEMA) for s in shards])
            if shards
            else RESULT_SCHEMA.empty_table()
        )
        storage.write_parquet(layout.results(), table)
        splits = defaultdict(int)
        for img in images:
            splits[img.split] += 1
        error_rows = (
            storage.read_parquet(layout.errors_dir()).num_rows
            if storage.exists(layout.errors_dir())
            else 0
        )
        summary = {
            "job": JOB,
            "encoders": enc_root,
            "test": test_uri,
            "encoder": config.encoder.source,
            "products": len(products) - len(failed),
            "failed": len(failed),
            "failures": failed,
            "skipped_done": len(products) - len(todo),
            "encoders_without_images": len(have - in_manifest),
            "images": {
                "total": len(images),
                "reference": splits[REFERENCE],
                "val": splits[VAL],
                "test": splits[TEST],
                "distractors": sum(img.product_id is None for img in images),
            },
            "groups": len({img.group for img in images if img.group is not None}),
            "errors": error_rows,
            "options": options.model_dump(mode="json"),
            "confidence": options.confidence,
            "bootstrap_samples": options.bootstrap_samples,
            **summarize(table, options, config.seed),
            "seconds": round(time.perf_counter() - begin, 3),
        }
        summary["report"] = write_report(layout, summary, table)
        storage.write_json(layout.summary(), summary)
    return summary


@dataclass(frozen=True)
class PersonalizeEvaluateArgs:
    """``restage personalize evaluate``'s arguments."""

    encoders: str
    test: str
    out: str


def main(config: RestageConfig, args: PersonalizeEvaluateArgs) -> dict[str, Any]:
    """CLI entry: ``restage personalize evaluate --encoders URI --test MANIFEST --out URI``."""
    summary = evaluate_encoders(config, args.encoders, args.test, args.out)
    for m in summary["metrics"]:
        p, q, d = m["personal"], m["pretrained"], m["difference"]
        print(
            f"{m['name']:<34} personal {_f(p['mean'])}  pretrained {_f(q['mean'])}  "
            f"diff {_f(d['mean'])} [{_f(d['lo'])}, {_f(d['hi'])}]  "
            f"better {m['personal_better']}/{m['compared']}"
        )
    print(
        f"{summary['products']} products ({summary['failed']} failed), "
        f"{summary['errors']} error rows; report {summary['report']}"
    )
    return summary


def _f(value: float | None) -> str:
    return "   —  " if value is None else f"{value:6.3f}"
