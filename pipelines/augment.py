"""`restage augment`: the synthetic training set of every product (paper 2.1-2.3, A.2).

Ray Data streams one row per product through one stage per model role:

    decode -> caption (+ typing) -> views -> segment -> inpaint (contexts, counterfactuals)
           -> negatives -> resegment -> score -> select -> write

Model stages are actor pools (``ActorPoolStrategy(min, max)``, ``num_gpus`` from the role's
config); decode, select and write are CPU tasks. A row carries the product's whole state
(record, samples, errors, per-stage stats), so every per-product decision (how many
negatives, the positive:negative ratio, top-k per source) is local to the row and nothing is
ever grouped or materialised across products.

Images are written through: the stage that makes an image or a mask (decode for the real
photos) writes it to its final place in the job's layout, and the row carries its URI; the
stages that need pixels later read them back. A row stays a few kB whatever the image size
(bench/row_bytes.py), instead of carrying every image of the product through every stage.
The writer adds the manifest shard, the errors and the marker (last). Decode first removes
what a killed run left of the product, and the writer removes a failed product's files, so
the images and masks folders hold exactly the manifest's samples.

The driver holds counters only: the manifest is read, validated and de-duplicated in Ray
Data tasks, and each product's marker is checked in a task (pipelines/_job.py).

Resume: a product's completion marker is written after its images, manifest shard and errors
shard; a re-run skips products with a marker and redoes the others from scratch, with the
same seeds, so it ends with the same samples. We use our own markers rather than Ray Data
checkpointing because the unit of completeness is a product (many files), not a row.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pipelines import _job
from pipelines._job import outcome_batch, write_product
from pipelines._product_rows import ProductRow, ProductStage, batch_rows, load_photos, pack, unpack
from ray_app import storage
from ray_app.batching import object_array
from ray_app.clip_text import CONTEXT_LENGTH, fit_words
from ray_app.config import RestageConfig
from ray_app.images import decode_mask, decode_rgb, dilate, encode, encode_png
from ray_app.kinds import (
    MASK_IOU,
    NEGATIVE_KINDS,
    SHARPNESS,
    SYNTHETIC_POSITIVE_KINDS,
    Metric,
    SampleKind,
)
from ray_app.metrics import aggregate, mask_iou, sharpness
from ray_app.models import source_tag
from ray_app.prompts import (
    GENERIC,
    PromptBank,
    category_noun,
    classify,
    fill,
    product_description,
)
from ray_app.records import (
    SAMPLE_SCHEMA,
    SCORE_COLUMNS,
    ProductRecord,
    manifest_dataset,
    manifest_errors_dir,
    manifest_format,
)
from ray_app.report import JobSummary
from ray_app.seeds import derive_seed
from ray_app.sources import SourcePolicy
from ray_app.storage import AugmentLayout, write_errors

if TYPE_CHECKING:  # the model libraries load in the stages' actors, not in every task
    from actors.clip import ClipEmbedder

JOB = "augment"
STAGES = (
    "decode",
    "caption",
    "views",
    "segment",
    "inpaint",
    "negatives",
    "resegment",
    "score",
    "select",
    "write",
)


# --------------------------------------------------------------------------- state


@dataclass
class Sample:
    """One image of a product's training set while it moves through the pipeline."""

    sample_id: str
    kind: SampleKind
    image_uri: str | None  # where its image was written (None: it was not made)
    width: int
    height: int
    caption: str | None = None
    caption_cut_from_words: int | None = None  # real images: words of the captioner's answer,
    # when it was cut to fit the text encoders' 77 tokens (None: not cut)
    prompt: str | None = None
    source_sample: str | None = None
    origin_uri: str | None = None  # real images: the input URI
    origin_frames: int | None = None  # real images from an animation: its frame count
    seed: int | None = None
    alpha: bytes | None = None  # real images: the file's alpha channel (PNG) until segmented
    mask_uri: str | None = None
    mask_method: str | None = None
    mask_score: float | None = None
    expected_mask: bytes | None = None  # contexts: where the product was pasted (PNG), until
    # resegmented
    scores: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    kept: bool = True
    drop_reason: str | None = None
    models: dict[str, str] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        if self.kept:
            self.kept, self.drop_reason = False, reason

    def image(self) -> bytes:
        """Its encoded image, read back from where it was written."""
        assert self.image_uri is not None, f"{self.sample_id} has no image"
        return storage.read_bytes(self.image_uri)

    def mask(self) -> bytes | None:
        return storage.read_bytes(self.mask_uri) if self.mask_uri else None


@dataclass
class ProductState(ProductRow):
    """Everything known about one product; pickled into its Ray Data row between stages.
    Its samples' images and masks are in storage under ``root`` (module doc)."""

    job: ClassVar[str] = JOB
    record: ProductRecord
    root: str  # the job's output root: where its images and masks are written
    samples: list[Sample] = field(default_factory=list)
    product_type: str | None = None
    type_source: str | None = None
    noun: str = "product"
    negatives: int = 0  # in-class negatives to generate (set once the masks are known)
    counterfactuals: int = 0

    @property
    def product_id(self) -> str:
        return self.record.product_id

    def of(self, *kinds: SampleKind) -> list[Sample]:
        return [s for s in self.samples if s.kind in kinds]

    def error_record(self) -> str:
        return json.dumps(self.record.to_row(), default=str)

    def put_image(self, sample: Sample, data: bytes, image_format: str) -> None:
        """Write ``sample``'s encoded image to its final place; the row keeps the URI."""
        ext = "jpg" if image_format == "jpeg" else "png"
        path = AugmentLayout(self.root).image(self.product_id, sample.sample_id, ext)
        sample.image_uri = storage.write_bytes(path, data)

    def put_mask(self, sample: Sample, data: bytes) -> None:
        path = AugmentLayout(self.root).mask(self.product_id, sample.sample_id)
        sample.mask_uri = storage.write_bytes(path, data)

    def remove_files(self) -> None:
        """Remove the product's images and masks (a killed run's, or a failed product's)."""
        layout = AugmentLayout(self.root)
        for folder in (layout.images_dir(self.product_id), layout.masks_dir(self.product_id)):
            storage.remove(folder, recursive=True)


# --------------------------------------------------------------------------- pure helpers


_STOPWORDS = frozenset(
    "a an the and or of with in on at to for by from its it this that is are as be".split()
)


def strip_product_words(caption: str, record: ProductRecord, noun: str) -> str:
    """A caption with the words that identify *this* product removed (title, attributes,
    quoted text such as brand names), keeping the class noun: the prompt of an in-class
    negative (paper 2.1.3)."""
    keep = set(re.findall(r"[a-z0-9]+", noun.lower())) | _STOPWORDS
    specific = (record.words | set(re.findall(r"[a-z0-9]+", record.product_id.lower()))) - keep
    text = re.sub(r"[\"“”'‘’][^\"“”'‘’]{1,80}[\"“”'‘’]", "", caption)  # quoted visible text
    if specific:
        text = re.sub(
            r"\b(" + "|".join(sorted(map(re.escape, specific))) + r")\b",
            "",
            text,
            flags=re.IGNORECASE,
        )
    text = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s{2,}", " ", text)).strip(" ,;:")
    if not set(re.findall(r"[a-z0-9]+", text.lower())) & (keep - _STOPWORDS):
        text = f"a {noun}, {text}" if text else f"a photo of a {noun}"
    return text


def negatives_needed(
    n_real: int,
    n_views_per_real: int,
    n_contexts_per_image: int,
    top_k: int,
    ratio: float,
    oversample: float,
) -> int:
    """Negatives to generate: enough for the most positives that can survive filtering,
    with head-room (``oversample``) for negatives that filtering drops."""
    views = n_real * min(n_views_per_real, top_k)
    contexts = (n_real + views) * min(n_contexts_per_image, top_k)
    return math.ceil((n_real + views + contexts) / ratio * oversample)


def count_negatives(state: ProductState, config: RestageConfig) -> None:
    """How many counterfactuals and in-class negatives the product gets, once its real
    photos' masks are known: enough for its positives (``negatives_needed``), split by
    ``counterfactual_share``, none of a kind that is off. Counterfactuals need a product
    mask to paint into: without one every negative is in-class (if those are on)."""
    cfg = config.augment
    state.negatives = state.counterfactuals = 0
    if not (cfg.negatives.enabled or cfg.counterfactuals.enabled):
        return
    total = negatives_needed(
        len(state.of(SampleKind.REAL)),
        len(cfg.views.frame_indices) if cfg.views.enabled else 0,
        cfg.contexts.per_image if cfg.contexts.enabled else 0,
        cfg.filter.top_k_per_source,
        cfg.negatives.ratio,
        cfg.negatives.oversample,
    )
    masked = any(s.mask_uri for s in state.of(SampleKind.REAL))
    state.counterfactuals = round(total * cfg.counterfactual_share) if masked else 0
    state.negatives = total - state.counterfactuals if cfg.negatives.enabled else 0


def balance_ratio(
    positives: list[tuple[str, float, bool]],
    negatives: list[tuple[str, float, str]],
    ratio: float,
    counterfactual_fraction: float,
) -> tuple[set[str], int, int]:
    """Pick the largest exact ``ratio`` : 1 set -> (ids to drop, positives kept, negatives kept).

    ``positives``: (id, score, is_real); the lowest-scoring synthetic ones go first, real
    images last. ``negatives``: (id, product-likeness score, kind); the ones that look most
    like the product go first, and the counterfactual share is kept near
    ``counterfactual_fraction``.
    """
    n_pos, n_neg = len(positives), len(negatives)
    target_p, target_n = 0, 0
    for n in range(min(n_neg, int(n_pos / ratio + 1e-9)), 0, -1):
        p = ratio * n
        if abs(p - round(p)) < 1e-9 and round(p) <= n_pos:
            target_p, target_n = round(p), n
            break
    key = lambda item: item[1] if not math.isnan(item[1]) else -math.inf  # noqa: E731
    pos_order = sorted(positives, key=lambda p: (p[2], key(p), p[0]), reverse=True)
    keep_pos = {p[0] for p in pos_order[:target_p]}
    cfs = sorted(
        (n for n in negatives if n[2] == SampleKind.COUNTERFACTUAL), key=lambda n: (key(n), n[0])
    )
    ins = sorted(
        (n for n in negatives if n[2] != SampleKind.COUNTERFACTUAL), key=lambda n: (key(n), n[0])
    )
    want_cf = min(len(cfs), round(target_n * counterfactual_fraction))
    want_in = min(len(ins), target_n - want_cf)
    want_cf = min(len(cfs), target_n - want_in)
    keep_neg = {n[0] for n in cfs[:want_cf]} | {n[0] for n in ins[:want_in]}
    drop = {p[0] for p in positives if p[0] not in keep_pos} | {
        n[0] for n in negatives if n[0] not in keep_neg
    }
    return drop, target_p, target_n


def select_samples(state: ProductState, config: RestageConfig) -> None:
    """Filter synthetic samples, keep the top-k per source, then enforce the ratio. Every
    dropped sample keeps its reason; real images are only ever dropped to meet the ratio."""
    f, neg = config.augment.filter, config.augment.negatives
    samples = [s for s in state.samples if s.image_uri is not None]
    names = list(config.scoring.ranges)
    scores = {n: np.array([s.scores.get(n, np.nan) for s in samples], np.float32) for n in names}
    agg = aggregate(scores, f.weights, config.scoring.ranges) if samples else []
    for s, value in zip(samples, agg, strict=True):
        s.score = None if np.isnan(value) else float(value)
    minimums = {
        Metric.CLIP_I: f.min_clip_i,
        Metric.CLIP_T: f.min_clip_t,
        Metric.SEG_CLIP_I: f.min_seg_clip_i,
        Metric.DINO: f.min_dino,
        Metric.PERSONAL_FIDELITY: f.min_personal_fidelity,  # NaN without scoring.encoders
    }
    for s in samples:
        if s.kind in SYNTHETIC_POSITIVE_KINDS:
            for name, low in minimums.items():
                value = s.scores.get(name, math.nan)
                if not math.isnan(value) and value < low:
                    s.drop(f"{name}={value:.3f} < {low:g}")
                    break
            soft = s.scores.get(SHARPNESS, math.nan)
            if s.kept and not math.isnan(soft) and soft < f.min_sharpness:
                s.drop(f"sharpness={soft:.2f} < {f.min_sharpness:g} (softer than the real photos)")
            if s.kind == SampleKind.CONTEXT and s.kept:
                iou = s.scores.get(MASK_IOU, 0.0)
                if iou < f.min_mask_iou:
                    s.drop(
                        f"mask_iou={iou:.3f} < {f.min_mask_iou:g} (outpainting changed the product)"
                    )
        elif s.kind in NEGATIVE_KINDS:
            likeness = s.scores.get(Metric.SEG_CLIP_I, math.nan)
            if not math.isnan(likeness) and likeness >= f.max_negative_seg_clip_i:
                s.drop(
                    f"seg_clip_i={likeness:.3f} >= {f.max_negative_seg_clip_i:g}: looks like the product"
                )
    by_id = {s.sample_id: s for s in samples}
    for kind in SYNTHETIC_POSITIVE_KINDS:
        groups: dict[str, list[Sample]] = {}
        for s in samples:
            if s.kind == kind:
                source = by_id.get(s.source_sample or "")
                if source is not None and not source.kept:
                    s.drop(f"source {source.sample_id} dropped")
                if s.kept:
                    groups.setdefault(s.source_sample or "", []).append(s)
        for group in groups.values():
            group.sort(
                key=lambda s: (-(s.score if s.score is not None else -math.inf), s.sample_id)
            )
            for s in group[f.top_k_per_source :]:
                s.drop(f"not top-k: below the best {f.top_k_per_source} of its source")
    pos = [
        (s.sample_id, s.score if s.score is not None else math.nan, s.kind == SampleKind.REAL)
        for s in samples
        if s.kept and s.kind not in NEGATIVE_KINDS
    ]
    negs = [
        (
            s.sample_id,
            s.scores.get(Metric.SEG_CLIP_I, s.scores.get(Metric.CLIP_I, math.nan)),
            s.kind,
        )
        for s in samples
        if s.kept and s.kind in NEGATIVE_KINDS
    ]
    if not (neg.enabled or config.augment.counterfactuals.enabled):
        return  # the ablation without negatives: every kept positive stays, no ratio
    share = config.augment.counterfactual_share
    drop, kept_p, kept_n = balance_ratio(pos, negs, neg.ratio, share)
    for sid in drop:
        by_id[sid].drop(f"ratio {neg.ratio:g}:1 (kept {kept_p} positives, {kept_n} negatives)")
    if pos and kept_n == 0:
        state.error(
            "select",
            f"ratio {neg.ratio:g}:1 cannot be met: {len(negs)} usable negatives for "
            f"{len(pos)} positives; the product has no training set",
        )


# --------------------------------------------------------------------------- stages


class _Stage(ProductStage):
    """A model stage of augment: ``run`` calls an actor on a product's rows."""

    def add_generated(
        self,
        state: ProductState,
        rows: list[dict[str, Any]],
        made: list[Sample],
        model: Any = None,
    ) -> None:
        """Generate ``made`` samples from ``rows`` with ``model`` (this stage's by default);
        keep the ones that came out (the others are errors of their sample)."""
        fmt = self.config.augment.image_format
        model = model or self.model
        for sample, r in zip(
            made, self.run(model, state, rows, [m.sample_id for m in made]), strict=True
        ):
            if not r["error"]:
                state.put_image(sample, encode(decode_rgb(r["image"]), fmt), fmt)
                state.samples.append(sample)
                state.stat(self.name).items_out += 1

    def run(
        self, actor: Any, state: ProductState, rows: list[dict[str, Any]], items: list[str]
    ) -> list[dict[str, Any]]:
        """Call ``actor`` on ``rows`` -> one output dict per row. Counts the inputs, and
        records each failed row as an error on its item (a sample id)."""
        stat = state.stat(self.name)
        stat.items_in += len(rows)
        if not rows:
            return []
        out = actor({k: _column([r.get(k) for r in rows]) for k in rows[0]})
        results = [{k: v[i] for k, v in out.items()} for i in range(len(rows))]
        for item, result in zip(items, results, strict=True):
            if result.get("error"):
                stat.errors += 1
                state.error(self.name, result["error"], item=item)
        return results


def _column(values: list[Any]) -> np.ndarray:
    """A batch column: integers as int64 (seeds), everything else as objects."""
    if all(isinstance(v, (int, np.integer)) for v in values):
        return np.array(values, dtype=np.int64)
    return object_array(values)


def decode_products(
    batch: dict[str, np.ndarray], config: RestageConfig, policy: SourcePolicy, root: str
) -> dict[str, np.ndarray]:
    """Records -> product states with their real images, decoded, re-encoded and written
    under ``root`` (the job's output). Every URI is checked against ``policy`` first: a
    refused one is an error row, never read."""
    img_cfg, fmt = config.images, config.augment.image_format
    states = []
    for row in batch_rows(batch):
        start = time.perf_counter()
        state = ProductState(ProductRecord.from_row(row), root)
        state.remove_files()  # a killed run's, before the first is written
        loaded = load_photos(state, "decode", img_cfg, policy.read)
        for i, img in enumerate(loaded):
            h, w = img.image.rgb.shape[:2]
            alpha = encode_png(img.image.alpha) if img.image.alpha is not None else None
            sample = Sample(
                f"real-{i:02d}",
                SampleKind.REAL,
                None,
                w,
                h,
                origin_uri=img.uri,
                origin_frames=img.image.frames if img.image.frames > 1 else None,
                alpha=alpha,
            )
            state.put_image(sample, encode(img.image.rgb, fmt), fmt)
            state.samples.append(sample)
        state.stat("decode").seconds = time.perf_counter() - start
        states.append(state)
    return pack(states)


class CaptionStage(_Stage):
    """Caption every real image; type the product (category > title > captions > CLIP)."""

    name = "caption"

    def __init__(self, config: RestageConfig):
        from actors.captioner import Captioner

        super().__init__(config)
        self.captioner = Captioner(config.model_spec("captioner"), config.augment.caption)
        self.bank = PromptBank.load(config.augment.prompt_bank)
        self.clip: ClipEmbedder | None = None  # loaded only if a product needs zero-shot typing
        self.tag = source_tag(config, "captioner")

    def process(self, state: ProductState) -> None:
        reals = state.of(SampleKind.REAL)
        images = [s.image() for s in reals]
        out = self.run(
            self.captioner, state, [{"image": im} for im in images], [s.sample_id for s in reals]
        )
        for s, r in zip(reals, out, strict=True):
            s.caption = r["caption"] or None
            if r.get("caption_truncated"):
                s.caption_cut_from_words = int(r["caption_words"])
            s.models["captioner"] = self.tag
        state.stat(self.name).items_out += sum(1 for s in reals if s.caption)
        rec = state.record
        ptype, source = classify(self.bank, rec.category, rec.title, [s.caption for s in reals])
        if ptype is None:
            ptype, source = self._ask_captioner(state, reals, images)
        if ptype is None:
            ptype, source = self._zero_shot(images)
        state.product_type, state.type_source = ptype, source
        # Never the raw category: it is free text from an untrusted manifest.
        state.noun = category_noun(self.bank, rec.category) or self.bank.type_of(ptype).noun
        for s in reals:
            s.caption = s.caption or f"a photo of a {state.noun}"

    def _ask_captioner(
        self, state: ProductState, reals: list[Sample], images: list[bytes]
    ) -> tuple[str | None, str]:
        from actors.captioner import type_question

        labels = [noun for _, noun in self.bank.labels()]
        question = type_question(labels)
        answers = self.run(
            self.captioner,
            state,
            [{"image": im, "instruction": question} for im in images],
            [s.sample_id for s in reals],
        )
        name = self.bank.vote(a["caption"] for a in answers)
        return (name, "captioner") if name else (None, "unresolved")

    def _zero_shot(self, encoded: list[bytes]) -> tuple[str, str]:
        from actors.clip import ClipEmbedder, zero_shot

        if self.clip is None:
            self.clip = ClipEmbedder(self.config.model_spec("clip"))
        labels = self.bank.labels()
        images = self.clip({"image": _column(encoded)})["image_embedding"]
        images = images[~np.isnan(images).any(axis=1)]
        if not len(images):
            return GENERIC, "fallback"
        texts = self.clip.embed_texts([f"a photo of a {noun}" for _, noun in labels])
        best, margin = zero_shot(images, texts)
        if margin < self.config.augment.classify.zero_shot_min_margin:
            return GENERIC, "fallback"
        return labels[best][0], "clip"


class ViewStage(_Stage):
    """Novel views: a clip per real image, the configured frames kept as new views."""

    name = "views"

    def __init__(self, config: RestageConfig):
        from actors.novel_view import NovelView

        super().__init__(config)
        self.model = NovelView(config.model_spec("novel_view"), config.augment.views)
        self.tag = source_tag(config, "novel_view")
        self.fmt = config.augment.image_format

    def process(self, state: ProductState) -> None:
        reals = state.of(SampleKind.REAL)
        seeds = [
            derive_seed(state.product_id, SampleKind.VIEW, i, self.config.seed)
            for i in range(len(reals))
        ]
        rows = [{"image": s.image(), "seed": seed} for s, seed in zip(reals, seeds, strict=True)]
        for real, seed, r in zip(
            reals,
            seeds,
            self.run(self.model, state, rows, [s.sample_id for s in reals]),
            strict=True,
        ):
            if r["error"]:
                continue
            for frame, index in zip(r["frames"], r["frame_index"], strict=True):
                rgb = decode_rgb(frame)
                view = Sample(
                    f"view-{real.sample_id[5:]}-f{index:02d}",
                    SampleKind.VIEW,
                    None,
                    rgb.shape[1],
                    rgb.shape[0],
                    caption=real.caption,
                    source_sample=real.sample_id,
                    seed=seed,
                    models={"novel_view": self.tag},
                )
                state.put_image(view, encode(rgb, self.fmt), self.fmt)
                state.samples.append(view)
                state.stat(self.name).items_out += 1


class SegmentStage(_Stage):
    """Product masks for the images of the given kinds that have none yet."""

    name = "segment"
    kinds: tuple[SampleKind, ...] = (SampleKind.REAL, SampleKind.VIEW)

    def __init__(self, config: RestageConfig):
        from actors.segmenter import Segmenter

        super().__init__(config)
        self.model = Segmenter(config.model_spec("segmenter"), config.augment.segment)
        self.tag = source_tag(config, "segmenter")

    def process(self, state: ProductState) -> None:
        todo = [s for s in state.of(*self.kinds) if s.mask_uri is None and s.image_uri]
        rows = [{"image": s.image(), "alpha": s.alpha, "placed": self.placed(s)} for s in todo]
        masks: dict[str, bytes] = {}
        for s, r in zip(
            todo, self.run(self.model, state, rows, [s.sample_id for s in todo]), strict=True
        ):
            s.models["segmenter"] = self.tag
            s.alpha = None  # a hint for this stage only
            if not r["error"]:
                state.put_mask(s, r["mask"])
                masks[s.sample_id] = r["mask"]
                s.mask_score, s.mask_method = float(r["mask_score"]), r["mask_method"]
                state.stat(self.name).items_out += 1
        self.after(state, todo, masks)

    def placed(self, sample: Sample) -> bytes | None:
        """Where the product was pasted (PNG mask), when known: the segmenter's prompt."""
        return None

    def after(self, state: ProductState, done: list[Sample], masks: dict[str, bytes]) -> None:
        """``masks``: the masks just made, by sample id."""
        count_negatives(state, self.config)
        if state.of(SampleKind.REAL, SampleKind.VIEW) and not any(
            s.mask_uri for s in state.of(SampleKind.REAL, SampleKind.VIEW)
        ):
            state.error(
                self.name,
                "segmentation found no product in any image: no contexts or "
                "counterfactuals for this product",
            )


class ResegmentStage(SegmentStage):
    """Masks of generated images; for contexts, the IoU with where the product was pasted
    catches outpainting that extended or changed the product (paper 2.3). A context is
    re-segmented with the paste's box as the prompt, not by saliency (actors/segmenter.py)."""

    name = "resegment"
    kinds = (SampleKind.CONTEXT, SampleKind.NEGATIVE, SampleKind.COUNTERFACTUAL)

    def placed(self, sample: Sample) -> bytes | None:
        return sample.expected_mask if sample.kind == SampleKind.CONTEXT else None

    def after(self, state: ProductState, done: list[Sample], masks: dict[str, bytes]) -> None:
        for s in done:
            if s.kind == SampleKind.CONTEXT and s.expected_mask is not None:
                expected = decode_mask(s.expected_mask)
                mask = masks.get(s.sample_id)
                found = decode_mask(mask) if mask else np.zeros_like(expected)
                s.scores[MASK_IOU] = mask_iou(found, expected)
                s.expected_mask = None  # spent


class InpaintStage(_Stage):
    """New contexts (outpainting around the kept product) and counterfactuals (another
    object painted into the product's place), both with the inpainter."""

    name = "inpaint"

    def __init__(self, config: RestageConfig):
        from actors.inpainter import Inpainter

        super().__init__(config)
        self.model = Inpainter(config.model_spec("inpainter"), config.augment.contexts)
        self.bank = PromptBank.load(config.augment.prompt_bank)
        self.tag = source_tag(config, "inpainter")

    def process(self, state: ProductState) -> None:
        from actors.inpainter import place_product, square_canvas

        cfg, pid, run_seed = self.config.augment, state.product_id, self.config.seed
        rows, made = [], []
        # A scene of up to 40 words with a fine-grained product may pass CLIP's 77 tokens:
        # cut at a word boundary, leaving room for the product phrase as captions do.
        budget = CONTEXT_LENGTH - cfg.caption.reserve_tokens
        sources = state.of(SampleKind.REAL, SampleKind.VIEW) if cfg.contexts.enabled else []
        for s in (s for s in sources if s.mask_uri):
            prompts = self.bank.prompts(
                state.product_type,
                cfg.contexts.per_image,
                derive_seed(pid, f"context-prompts/{s.sample_id}", 0, run_seed),
            )
            rgb, mask = decode_rgb(s.image()), decode_mask(s.mask())
            for j, prompt in enumerate(prompts):
                seed = derive_seed(pid, f"context/{s.sample_id}", j, run_seed)
                canvas, keep = place_product(
                    rgb, mask, cfg.contexts.size, cfg.contexts.product_scale, seed
                )
                text = fill(prompt, state.noun)
                # Its training caption: the product as its source's fine-grained caption
                # describes it, in the new scene (paper 2.2: fine-grained captions).
                described = product_description(s.caption, state.noun) or state.noun
                rows.append(
                    {
                        "image": encode_png(canvas),
                        "mask": encode_png(255 - keep),
                        "keep": encode_png(keep),
                        "prompt": text,
                        "seed": seed,
                    }
                )
                made.append(
                    Sample(
                        f"ctx-{s.sample_id}-{j:02d}",
                        SampleKind.CONTEXT,
                        None,
                        cfg.contexts.size,
                        cfg.contexts.size,
                        caption=fit_words(fill(prompt, described), budget).text,
                        prompt=text,
                        source_sample=s.sample_id,
                        seed=seed,
                        expected_mask=encode_png(keep),
                        models={"inpainter": self.tag},
                    )
                )
        self.add_generated(state, rows, made)  # the inpainter's own options: cfg.contexts
        rows, made = [], []
        reals = [s for s in state.of(SampleKind.REAL) if s.mask_uri]
        size = cfg.negatives.size
        for j in range(state.counterfactuals):
            s = reals[j % len(reals)]
            seed = derive_seed(pid, SampleKind.COUNTERFACTUAL, j, run_seed)
            rgb, mask = square_canvas(decode_rgb(s.image()), decode_mask(s.mask()), size)
            region = dilate(mask, round(cfg.negatives.mask_dilation * size))
            text = f"a photo of {self.bank.counterfactual_object(state.product_type, seed)}"
            rows.append(
                {
                    "image": encode_png(rgb),
                    "mask": encode_png(region),
                    "keep": encode_png(255 - region),
                    "prompt": text,
                    "seed": seed,
                }
            )
            made.append(
                Sample(
                    f"cf-{j:02d}",
                    SampleKind.COUNTERFACTUAL,
                    None,
                    size,
                    size,
                    caption=text,
                    prompt=text,
                    source_sample=s.sample_id,
                    seed=seed,
                    models={"inpainter": self.tag},
                )
            )
        # The same loaded inpainter, with the counterfactuals' own settings.
        self.add_generated(
            state, rows, made, functools.partial(self.model, options=cfg.counterfactuals)
        )


class NegativeStage(_Stage):
    """In-class negatives: the base model's images of the product's captions with the
    product's own words removed."""

    name = "negatives"

    def __init__(self, config: RestageConfig):
        from actors.generator import GenerationOptions, Generator

        super().__init__(config)
        n = config.augment.negatives
        self.model = Generator(
            config.model_spec("generator"),
            GenerationOptions(n.size, n.size, n.steps, n.guidance_scale),
        )
        self.tag = source_tag(config, "generator")

    def process(self, state: ProductState) -> None:
        cfg = self.config.augment
        captions = [s.caption for s in state.of(SampleKind.REAL) if s.caption] or [
            f"a photo of a {state.noun}"
        ]
        rows, made = [], []
        for j in range(state.negatives):
            seed = derive_seed(state.product_id, SampleKind.NEGATIVE, j, self.config.seed)
            prompt = strip_product_words(captions[j % len(captions)], state.record, state.noun)
            rows.append({"prompt": prompt, "seed": seed})
            made.append(
                Sample(
                    f"neg-{j:02d}",
                    SampleKind.NEGATIVE,
                    None,
                    cfg.negatives.size,
                    cfg.negatives.size,
                    caption=prompt,
                    prompt=prompt,
                    seed=seed,
                    models={"generator": self.tag},
                )
            )
        self.add_generated(state, rows, made)


class ScoreStage(_Stage):
    """CLIP-I, CLIP-T, segmented CLIP-I, DINO and segmented DINO of every sample against the
    product's real images (a real image against the *other* real images)."""

    name = "score"

    def __init__(self, config: RestageConfig):
        from actors.personal_fidelity import personal_encoders
        from actors.scorer import Scorer, ScoringOptions

        super().__init__(config)
        self.scorer = Scorer(  # masks come from the segment stages
            config.model_spec("clip"),
            config.model_spec("dino"),
            ScoringOptions(config.augment.filter.weights, config.scoring.ranges),
            personal=personal_encoders(config.scoring, config.personalize, config.model_spec),
        )
        self.tags = {"clip": source_tag(config, "clip"), "dino": source_tag(config, "dino")}
        if self.scorer.personal is not None:
            self.tags["encoder"] = source_tag(config, "encoder")

    def process(self, state: ProductState) -> None:
        samples = [s for s in state.samples if s.image_uri is not None]
        reals = [s for s in samples if s.kind == SampleKind.REAL]
        stat = state.stat(self.name)
        stat.items_in += len(samples)
        if not reals:
            return
        real_index = {s.sample_id: j for j, s in enumerate(reals)}
        images = {s.sample_id: s.image() for s in samples}
        masks = {s.sample_id: s.mask() for s in samples}
        out = self.scorer.score(
            [images[s.sample_id] for s in samples],
            [s.prompt or s.caption for s in samples],
            [images[s.sample_id] for s in reals],
            [masks[s.sample_id] for s in reals],
            masks=[masks[s.sample_id] for s in samples],
            exclude_self=[real_index.get(s.sample_id, -1) for s in samples],
            product_id=state.product_id,
        )
        for i, s in enumerate(samples):
            s.scores.update({name: float(out[name][i]) for name in Metric})
            s.models.update(self.tags)
            if out["error"][i]:
                stat.errors += 1
                state.error(self.name, out["error"][i], item=s.sample_id)
            else:
                stat.items_out += 1
        self.score_sharpness(samples, reals, images, masks)

    def score_sharpness(
        self,
        samples: list[Sample],
        reals: list[Sample],
        images: dict[str, bytes],
        masks: dict[str, bytes | None],
    ) -> None:
        """Each view's and context's product detail at the training resolution, relative to
        the median real photo's (ray_app.metrics.sharpness): soft views and contexts are
        dropped in selection before they teach the adapter a blurred product. ``images``
        and ``masks``: the samples' encoded files by sample id, as the scorer read them."""
        side = self.config.train.resolution

        def detail(s: Sample) -> float:
            mask = masks.get(s.sample_id)
            rgb = decode_rgb(images[s.sample_id])
            return sharpness(rgb, decode_mask(mask) if mask else None, side)

        reference = np.nanmedian([detail(s) for s in reals]) if reals else math.nan
        if not reference > 0:  # no real photo with detail to compare with
            return
        for s in samples:
            if s.kind in SYNTHETIC_POSITIVE_KINDS:
                s.scores[SHARPNESS] = detail(s) / float(reference)


def select_products(batch: dict[str, np.ndarray], config: RestageConfig) -> dict[str, np.ndarray]:
    states = unpack(batch)
    for state in states:
        if state.failed:
            continue
        start = time.perf_counter()
        stat = state.stat("select")
        stat.items_in = len(state.samples)
        select_samples(state, config)
        stat.items_out = sum(s.kept for s in state.samples)
        stat.dropped = stat.items_in - stat.items_out
        stat.seconds = time.perf_counter() - start
    return pack(states)


def write_products(
    batch: dict[str, np.ndarray], config: RestageConfig, root: str
) -> dict[str, np.ndarray]:
    """Write each product's manifest shard, record and errors, then its marker last
    (pipelines/_job.py); its images and masks are already in place (module doc), or
    removed here if it failed. Returns one small outcome row per product."""
    layout = AugmentLayout(root)

    def writer(state: ProductState) -> Callable[[], list[dict[str, Any]]]:
        def files() -> list[dict[str, Any]]:
            pid = state.product_id
            rows = [_manifest_row(state, s) for s in state.samples if s.image_uri is not None]
            state.stat("write").items_in = state.stat("write").items_out = len(rows)
            # The record travels with the training set: `restage train` checks its token
            # against the title and attributes, and uses the noun in captions.
            storage.write_json(
                layout.product_record(pid),
                {
                    **state.record.to_row(),
                    "attributes": state.record.attributes,
                    "noun": state.noun,
                    "product_type": state.product_type,
                    "type_source": state.type_source,
                },
            )
            return rows

        return files

    def marker(state: ProductState, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "kept": {k: sum(1 for r in rows if r["kind"] == k and r["kept"]) for k in SampleKind},
            "samples": len(rows),
            "product_type": state.product_type,
            "type_source": state.type_source,
        }

    states = unpack(batch)
    for state in states:
        if state.failed:  # no manifest names its images: they go
            state.remove_files()
    return outcome_batch(
        [
            write_product(
                layout, state, SAMPLE_SCHEMA, writer(state), lambda rows, st=state: marker(st, rows)
            )
            for state in states
        ]
    )


def _manifest_row(state: ProductState, s: Sample) -> dict[str, Any]:
    def score(name: str) -> float | None:
        value = s.scores.get(name)
        return None if value is None or math.isnan(value) else value

    return {
        "product_id": state.product_id,
        "sample_id": s.sample_id,
        "kind": s.kind,
        "image_uri": s.image_uri,
        "mask_uri": s.mask_uri,
        "width": s.width,
        "height": s.height,
        "caption": s.caption,
        "prompt": s.prompt,
        "source_sample": s.source_sample,
        "origin_uri": s.origin_uri,
        "origin_frames": s.origin_frames,
        "caption_cut_from_words": s.caption_cut_from_words,
        "seed": s.seed,
        "product_type": state.product_type,
        "type_source": state.type_source,
        "mask_method": s.mask_method,
        "mask_score": None if s.mask_score is None or math.isnan(s.mask_score) else s.mask_score,
        **{name: score(name) for name in SCORE_COLUMNS},
        "score": s.score,
        "kept": s.kept,
        "drop_reason": s.drop_reason,
        "models": sorted(s.models.items()),
    }


# --------------------------------------------------------------------------- job


def model_stages(config: RestageConfig) -> list[tuple[type[_Stage], tuple[str, ...]]]:
    """The model stages in pipeline order, each with the roles it loads (first: its pool's)."""
    plan: list[tuple[type[_Stage], tuple[str, ...]]] = [(CaptionStage, ("captioner",))]
    if config.augment.views.enabled:
        plan.append((ViewStage, ("novel_view",)))
    plan.append((SegmentStage, ("segmenter",)))
    on = config.augment.components()
    if on["contexts"] or on["counterfactuals"]:
        plan.append((InpaintStage, ("inpainter",)))
    if on["negatives"]:
        plan.append((NegativeStage, ("generator",)))
    if on["contexts"] or on["negatives"] or on["counterfactuals"]:
        plan.append((ResegmentStage, ("segmenter",)))
    plan.append((ScoreStage, config.scoring.roles()))
    return plan


def build_dataset(
    records: Any,
    config: RestageConfig,
    root: str,
    policy: SourcePolicy,
    staged: dict[str, int] | None = None,
):
    """The lazy Ray Data pipeline over ``records`` (a dataset of the products to do, one
    record a row; nothing runs until it is consumed). ``staged`` (a dict): stage-by-stage
    mode; the model stages run here, one at a time, filling ``staged`` with the products
    each ran, and the pipeline returned selects and writes their results
    (pipelines/_staged.py)."""
    cpu = config.augment.cpus_per_task
    per_call = config.augment.products_per_batch

    def decoded(chosen: Any) -> Any:
        return chosen.map_batches(
            decode_products,
            fn_kwargs={"config": config, "policy": policy, "root": root},
            batch_size=per_call,
            num_cpus=cpu,
        )

    ds = _job.through_stages(
        records, decoded, model_stages(config), config, root, staged, per_call, cpu
    )
    ds = ds.map_batches(
        select_products, fn_kwargs={"config": config}, batch_size=per_call, num_cpus=cpu
    )
    ds = ds.map_batches(
        write_products,
        fn_kwargs={"config": config, "root": root},
        batch_size=per_call,
        num_cpus=cpu,
    )
    return ds


def augment(config: RestageConfig, manifest: str, out: str) -> JobSummary:
    """Run the augment job: ``manifest`` (JSONL/CSV/Parquet URI) -> training sets under ``out``.
    The driver holds counters only: the manifest is read, validated and checked against
    the markers in Ray Data tasks (pipelines/_job.py)."""
    start = time.perf_counter()
    root = storage.normalize_uri(out)
    layout = AugmentLayout(root)
    manifest_uri = storage.normalize_uri(manifest)
    manifest_format(manifest_uri)  # an unknown format fails before Ray starts
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"manifest {manifest_uri!r} does not exist")
    policy = SourcePolicy.for_manifest(manifest_uri, config.storage)

    def rows() -> Any:
        write_errors(layout, "_records", [])  # an older version's one manifest errors shard
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
    return _job.finish_whole_job(
        JOB,
        layout,
        done,
        STAGES,
        start,
        lambda: {
            "manifest": manifest,
            # the ablation switches: a component that is off made no samples and no actors
            "components": config.augment.components(),
        },
    )


@dataclass(frozen=True)
class AugmentArgs:
    """``restage augment``'s arguments (the CLI builds them from its flags)."""

    manifest: str
    out: str


def main(config: RestageConfig, args: AugmentArgs) -> JobSummary:
    """CLI entry: ``restage augment --manifest URI --out URI``."""
    return augment(config, args.manifest, args.out)
