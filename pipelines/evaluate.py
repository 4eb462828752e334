"""`restage evaluate`: how faithfully runs keep their products, in tables comparable with the
literature (paper 3 and A.3; the DreamBench protocol).

Each product of the references manifest is a row (pipelines/_job.py's skeleton: intake,
markers, resume): its real photos, and the images every run generated of it (read from
each run's generation manifest shard), go through the segmenter (product masks), the
evaluation backbones (eval_clip, eval_dino: CLIP-I, CLIP-T, DINO and their segmented
variants, actors/scorer.py) and the inception role (features for FID/KID). Its writer
puts the product's per-image rows, its per-run means and its features in one shard each,
then its marker. Once every product is written, the tables are aggregated: per-product
means are read column by column (never the images), FID/KID statistics are accumulated
per block of features in Ray Data tasks and merged (ray_app/fid.py), and means get
bootstrap intervals over products (ray_app/stats.py). Then the report.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from pipelines import _job
from pipelines._product_rows import ProductRow, ProductStage, batch_rows, pack, unpack
from ray_app import storage
from ray_app.batching import object_array
from ray_app.config import RestageConfig
from ray_app.images import encode_png, load_images
from ray_app.kinds import Metric
from ray_app.records import (
    EVAL_IMAGE_SCHEMA,
    EVAL_PRODUCT_SCHEMA,
    FEATURES_SCHEMA,
    GENERATION_SCHEMA,
    REFERENCE_SIDE,
    ProductRecord,
    manifest_dataset,
    manifest_format,
)
from ray_app.report import ALREADY, JobSummary
from ray_app.runs import parse_runs
from ray_app.sources import SourcePolicy
from ray_app.stats import bootstrap_mean, paired_difference
from ray_app.storage import EvaluationLayout, GenerationLayout, write_errors

JOB = "evaluate"
STAGES = ("read", "segment", "score", "inception", "write")
# The order of the report's tables: DreamBench's three first.
METRICS = (
    Metric.DINO,
    Metric.CLIP_I,
    Metric.CLIP_T,
    Metric.SEG_DINO,
    Metric.SEG_CLIP_I,
    Metric.SEG_CLIP_T,
)
# The backbones of the DreamBench protocol: with these, the tables compare with published ones.
LITERATURE_BACKBONES = {
    "eval_clip": "timm/vit_base_patch32_clip_224.openai",
    "eval_dino": "facebook/dino-vits16",
}


def clip_t_text(prompt: str, token: str | None, mode: str) -> str:
    """CLIP-T's text for a prompt (evaluate.clip_t_text): 'class' drops the product's rare
    token, so 'TOKEN NOUN' becomes the class noun the text encoder knows."""
    if mode == "prompt" or not token:
        return prompt
    return re.sub(rf"(?<!\S){re.escape(token)}\s+", "", prompt).strip()


# --------------------------------------------------------------------------- state


@dataclass
class Picture:
    """A reference photo or a generated image while it moves through the stages."""

    side: str  # a run's name, or REFERENCE_SIDE
    image_id: str
    uri: str | None
    data: bytes | None = None
    prompt: str | None = None
    text: str | None = None  # what CLIP-T compares with
    rank: int | None = None
    kept: bool | None = None
    mask: bytes | None = None
    scores: dict[str, float] = field(default_factory=dict)
    features: np.ndarray | None = None
    error: str | None = None


@dataclass
class ProductState(ProductRow):
    job: ClassVar[str] = JOB
    record: ProductRecord
    references: list[Picture] = field(default_factory=list)
    images: list[Picture] = field(default_factory=list)

    @property
    def product_id(self) -> str:
        return self.record.product_id

    def pictures(self) -> list[Picture]:
        return [p for p in self.references + self.images if p.data is not None]


# --------------------------------------------------------------------------- stages


def read_products(
    batch: dict[str, np.ndarray],
    config: RestageConfig,
    runs: dict[str, list[str]],
    policy: SourcePolicy,
) -> dict[str, np.ndarray]:
    """A task: each record -> its real photos (checked against ``policy``: the manifest is
    untrusted) and every run's images of it (from the runs' own manifest shards)."""
    img, mode = config.images, config.evaluate.clip_t_text
    states = []
    for row in batch_rows(batch):
        start = time.perf_counter()
        state = ProductState(record=ProductRecord.from_row(row))
        stat = state.stat("read")
        loaded, failed = load_images(
            state.record.image_uris,
            max_megapixels=img.max_megapixels,
            max_side=img.max_side,
            min_side=img.min_side,
            read=policy.read,
        )
        for uri, reason in failed:
            state.error("read", reason, item=uri)
        state.references = [
            Picture(REFERENCE_SIDE, f"ref-{i:02d}", im.uri, encode_png(im.image.rgb))
            for i, im in enumerate(loaded)
        ]
        if not loaded:
            state.failed = f"no readable reference photo ({len(failed)} failed)"
            state.error("read", f"product has no readable reference photo: {len(failed)} failed")
        for name, roots in runs.items():
            found = _generated(state, name, roots, mode)
            if not found:
                state.error("read", f"run {name!r} has no image of this product", item=name)
            state.images.extend(found)
        stat.items_in = len(state.record.image_uris) + len(state.images)
        stat.items_out = len(state.pictures())
        stat.errors = len(state.errors)
        stat.seconds = time.perf_counter() - start
        states.append(state)
    return pack(states)


def _generated(state: ProductState, run: str, roots: list[str], mode: str) -> list[Picture]:
    """A run's written images of the product, from the first of its roots that has them."""
    pid = state.product_id
    for root in roots:
        shard = GenerationLayout(root).manifest_shard(pid)
        if not storage.exists(shard):
            continue
        pictures = []
        for r in storage.read_parquet(shard, schema=GENERATION_SCHEMA).to_pylist():
            if r["image_uri"] is None:  # not written (not kept, or failed in generate)
                continue
            pic = Picture(
                run,
                r["image_id"],
                r["image_uri"],
                prompt=r["prompt"],
                text=clip_t_text(r["prompt"], r["token"], mode),
                rank=r["rank"],
                kept=r["kept"],
            )
            try:
                pic.data = storage.read_bytes(r["image_uri"])
            except Exception as exc:
                pic.error = f"cannot read {r['image_uri']}: {type(exc).__name__}: {exc}"
                state.error("read", pic.error, item=f"{run}/{pic.image_id}")
            pictures.append(pic)
        return pictures
    return []


class SegmentStage(ProductStage):
    """Product masks of the reference photos and of the generated images."""

    name = "segment"

    def __init__(self, config: RestageConfig):
        from actors.segmenter import Segmenter

        super().__init__(config)
        self.model = Segmenter(config.model_spec("segmenter"), config.evaluate.segmentation)

    def process(self, state: ProductState) -> None:
        todo, stat = state.pictures(), state.stat(self.name)
        stat.items_in += len(todo)
        if not todo:
            return
        out = self.model({"image": object_array([p.data for p in todo])})
        for pic, mask in zip(todo, out["mask"], strict=True):
            pic.mask = mask
            stat.items_out += mask is not None


class ScoreStage(ProductStage):
    """CLIP-I, CLIP-T, DINO and the segmented variants with the evaluation backbones."""

    name = "score"

    def __init__(self, config: RestageConfig):
        from actors.scorer import Scorer, ScoringOptions

        super().__init__(config)
        self.scorer = Scorer(
            config.model_spec("eval_clip"),
            config.model_spec("eval_dino"),
            ScoringOptions(config.generate.weights, config.scoring.ranges),
        )

    def process(self, state: ProductState) -> None:
        refs = [p for p in state.references if p.data is not None]
        todo, stat = [p for p in state.images if p.data is not None], state.stat(self.name)
        stat.items_in += len(todo)
        if not todo:
            return
        embedded = self.scorer.embed_references([p.data for p in refs], [p.mask for p in refs])
        out = self.scorer.score(
            [p.data for p in todo], [p.text for p in todo], embedded, masks=[p.mask for p in todo]
        )
        for k, pic in enumerate(todo):
            pic.scores = {m: float(out[m][k]) for m in Metric}
            if out["error"][k]:
                pic.error = out["error"][k]
                state.error(self.name, pic.error, item=f"{pic.side}/{pic.image_id}")
            else:
                stat.items_out += 1


class InceptionStage(ProductStage):
    """Inception features of every picture, for FID and KID."""

    name = "inception"

    def __init__(self, config: RestageConfig):
        from actors.inception import InceptionFeatures

        super().__init__(config)
        self.model = InceptionFeatures(config.model_spec("inception"))

    def process(self, state: ProductState) -> None:
        todo, stat = state.pictures(), state.stat(self.name)
        stat.items_in += len(todo)
        if not todo:
            return
        out = self.model({"image": object_array([p.data for p in todo])})
        for pic, features, error in zip(todo, out["features"], out["error"], strict=True):
            pic.features = features
            if error:
                state.error(self.name, error, item=f"{pic.side}/{pic.image_id}")
            else:
                stat.items_out += 1


def model_stages(config: RestageConfig) -> list[tuple[type[ProductStage], tuple[str, ...]]]:
    """The model stages in pipeline order, each with the roles it loads (first: its pool's)."""
    stages: list[tuple[type[ProductStage], tuple[str, ...]]] = []
    if config.evaluate.segment:
        stages.append((SegmentStage, ("segmenter",)))
    return [*stages, (ScoreStage, ("eval_clip", "eval_dino")), (InceptionStage, ("inception",))]


# --------------------------------------------------------------------------- the writer


def _value(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else v


def write_products(batch: dict[str, np.ndarray], runs: list[str], root: str) -> dict[str, Any]:
    """Write each product's per-image rows (its marker's manifest shard), its per-run means
    and its features, then its marker last (pipelines/_job.py)."""
    layout = EvaluationLayout(root)

    def files(state: ProductState) -> list[dict[str, Any]]:
        pid, category = state.product_id, state.record.category
        rows = [
            {
                "run": p.side,
                "product_id": pid,
                "category": category,
                "image_id": p.image_id,
                "image_uri": p.uri,
                "prompt": p.prompt,
                "rank": p.rank,
                "kept": p.kept,
                **{m: _value(p.scores.get(m)) for m in Metric},
                "error": p.error,
            }
            for p in state.images
        ]
        reference_uris = [p.uri for p in state.references]
        per_run = []
        for run in runs:
            mine = [r for r in rows if r["run"] == run]
            ok = [r for r in mine if r["error"] is None]
            means = {
                m: (
                    float(np.mean(vals))
                    if (vals := [r[m] for r in ok if r[m] is not None])
                    else None
                )
                for m in Metric
            }
            per_run.append(
                {
                    "run": run,
                    "product_id": pid,
                    "category": category,
                    "n_images": len(mine),
                    "n_errors": len(mine) - len(ok),
                    **means,
                    "reference_uris": reference_uris,
                }
            )
        storage.write_parquet(
            layout.per_product(pid), pa.Table.from_pylist(per_run, schema=EVAL_PRODUCT_SCHEMA)
        )
        # Ids qualified by the product: KID samples by id, and "ref-00" is in every product.
        features = [
            {"side": p.side, "image_id": f"{pid}/{p.image_id}", "features": p.features.tolist()}
            for p in state.references + state.images
            if p.features is not None
        ]
        storage.write_parquet(
            layout.features(pid), pa.Table.from_pylist(features, schema=FEATURES_SCHEMA)
        )
        state.stat("write").items_out = len(rows)
        return rows

    def marker(state: ProductState, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"images": len(rows), "references": len(state.references)}

    out = []
    for state in unpack(batch):
        out.append(
            _job.write_product(
                layout,
                state,
                EVAL_IMAGE_SCHEMA,
                lambda st=state: files(st),
                lambda rows, st=state: marker(st, rows),
            )
        )
    return _job.outcome_batch(out)


def build_dataset(
    todo: Any,
    config: RestageConfig,
    root: str,
    runs: dict[str, list[str]],
    policy: SourcePolicy,
    staged: dict[str, int] | None = None,
) -> Any:
    """The lazy Ray Data pipeline over the products to do (intake rows of the references
    manifest): read in tasks, the model stages, written in tasks."""
    e = config.evaluate
    per_call = e.products_per_batch

    def read(chosen: Any) -> Any:
        return chosen.map_batches(
            read_products,
            fn_kwargs={"config": config, "runs": runs, "policy": policy},
            batch_size=per_call,
            num_cpus=e.cpus_per_task,
        )

    ds = _job.through_stages(
        todo, read, model_stages(config), config, root, staged, per_call, e.cpus_per_task
    )
    return ds.map_batches(
        write_products,
        fn_kwargs={"runs": list(runs), "root": root},
        batch_size=per_call,
        num_cpus=e.cpus_per_task,
    )


# --------------------------------------------------------------------------- aggregation


def _per_product(layout: EvaluationLayout) -> pa.Table:
    """Every product's per-run means (a few numbers per product and run; no images)."""
    columns = ["run", "product_id", "category", "n_images", "n_errors", *METRICS]
    if not storage.exists(layout.per_product_dir()):
        return EVAL_PRODUCT_SCHEMA.empty_table().select(columns)
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_fs(layout.per_product_dir())
    data = pads.dataset(path, filesystem=fs, format="parquet", schema=EVAL_PRODUCT_SCHEMA)
    return data.to_table(columns=columns)


def metric_tables(table: pa.Table, runs: list[str], config: RestageConfig) -> dict[str, Any]:
    """Overall and per-category means with bootstrap intervals (the product is the unit),
    and the paired per-product differences of the first run with each other run."""
    e = config.evaluate
    boot = {"samples": e.bootstrap_samples, "confidence": e.confidence, "seed": config.seed}
    cols = table.to_pydict()
    by_run: dict[str, dict[str, dict[str, float]]] = {r: {m: {} for m in METRICS} for r in runs}
    categories: dict[str, str] = {}
    for i, run in enumerate(cols["run"]):
        if run not in by_run:
            continue
        pid = cols["product_id"][i]
        categories[pid] = cols["category"][i] or "(none)"
        for m in METRICS:
            v = cols[m][i]
            by_run[run][m][pid] = math.nan if v is None else float(v)
    overall = {
        r: {m: bootstrap_mean(list(by_run[r][m].values()), **boot).to_dict() for m in METRICS}
        for r in runs
    }
    per_category: dict[str, dict[str, Any]] = {}
    for r in runs:
        groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for m in METRICS:
            for pid, v in by_run[r][m].items():
                groups[categories[pid]][m].append(v)
        per_category[r] = {
            c: {m: bootstrap_mean(vals[m], **boot).to_dict() for m in METRICS}
            for c, vals in sorted(groups.items())
        }
    paired = [
        {
            "a": runs[0],
            "b": other,
            "metrics": {
                m: paired_difference(by_run[runs[0]][m], by_run[other][m], **boot).to_dict()
                for m in METRICS
            },
        }
        for other in runs[1:]
    ]
    return {"overall": overall, "per_category": per_category, "paired": paired}


def distributions(
    layout: EvaluationLayout, config: RestageConfig, counts: dict[str, int]
) -> dict[str, Any]:
    """FID/KID of each run against the references (ray_app/fid.py). ``counts``: images per
    side (for KID's sample)."""
    from ray_app.fid import SideFeatures, distribution, merge_sides

    e = config.evaluate
    rates = {side: e.kid_max_images / n for side, n in counts.items() if n}
    merged = merge_sides(layout.features_dir(), rates, (REFERENCE_SIDE,), e.cpus_per_task)
    # A side without features counts 0 images: distribution() refuses it before any use.
    references = merged.get(REFERENCE_SIDE) or SideFeatures(1, real=True)
    out = {}
    for side in counts:
        if side == REFERENCE_SIDE:
            continue
        run = merged.get(side) or SideFeatures(1, real=False)
        out[side] = distribution(
            run,
            references,
            min_images=e.min_fid_images,
            kid_subset_size=e.kid_subset_size,
            kid_subsets=e.kid_subsets,
            seed=config.seed,
        ).to_dict()
    return out


def tables(
    config: RestageConfig,
    layout: EvaluationLayout,
    runs: dict[str, list[str]],
    references: str,
    published: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """summary.json: every table, with its intervals, and what made the numbers."""
    table = _per_product(layout)
    names = list(runs)
    cols = table.select(["run", "n_images", "n_errors"]).to_pydict()
    images = {r: 0 for r in names}
    errors = {r: 0 for r in names}
    for run, n, bad in zip(cols["run"], cols["n_images"], cols["n_errors"], strict=True):
        if run in images:
            images[run] += n
            errors[run] += bad
    references_count = _reference_count(layout, names[0])
    backbones = {r: config.role(r).source for r in ("eval_clip", "eval_dino", "inception")}
    comparable = all(backbones[r] == src for r, src in LITERATURE_BACKBONES.items())
    return {
        "runs": {r: roots[0] if len(roots) == 1 else roots for r, roots in runs.items()},
        "run_order": names,  # the first is compared with each other (summary keys are sorted)
        "references": references,
        "metrics": [str(m) for m in METRICS],
        "backbones": backbones,
        "comparable": comparable,
        "clip_t_text": config.evaluate.clip_t_text,
        "confidence": config.evaluate.confidence,
        "bootstrap_samples": config.evaluate.bootstrap_samples,
        "products": len(set(table["product_id"].to_pylist())),
        "images": images,
        "errors": errors,
        **metric_tables(table, names, config),
        "distribution": distributions(layout, config, {**images, REFERENCE_SIDE: references_count}),
        "published": published or [],
    }


def _reference_count(layout: EvaluationLayout, run: str) -> int:
    """Reference photos read, over every product (each product's row of ``run``, the one
    every product has, lists them)."""
    if not storage.exists(layout.per_product_dir()):
        return 0
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_fs(layout.per_product_dir())
    data = pads.dataset(path, filesystem=fs, format="parquet", schema=EVAL_PRODUCT_SCHEMA)
    total = 0
    for batch in data.to_batches(columns=["reference_uris"], filter=pc.field("run") == run):
        total += sum(len(uris or []) for uris in batch["reference_uris"].to_pylist())
    return total


# --------------------------------------------------------------------------- the job


def _check_inputs(layout: EvaluationLayout, runs: dict[str, list[str]], references: str) -> None:
    """A re-run resumes only the same evaluation: other runs or references in the same
    output would mix two evaluations' rows."""
    wanted = {"runs": runs, "references": references}
    try:
        before = storage.read_json(layout.inputs())
    except FileNotFoundError:
        storage.write_json(layout.inputs(), wanted)
        return
    if before != wanted:
        raise ValueError(
            f"--out {layout.root} holds an evaluation of other inputs ({before}); give a new "
            "--out, or remove that folder to evaluate these runs there"
        )


def evaluate(
    config: RestageConfig,
    runs: dict[str, list[str]],
    references: str,
    out: str,
    *,
    published: list[dict[str, Any]] | None = None,
    report: Callable[..., Any] | None = None,
) -> JobSummary:
    """Evaluate ``runs`` ({name: [generation roots]}) against the products of the
    ``references`` manifest, into ``out``; ``published``: reference rows for the report
    (never mixed with measured ones)."""
    start = time.perf_counter()
    root = storage.normalize_uri(out)
    layout = EvaluationLayout(root)
    references_uri = storage.normalize_uri(references)
    manifest_format(references_uri)  # an unknown format fails before Ray starts
    if not storage.exists(references_uri):
        raise FileNotFoundError(f"--references {references}: no such manifest")
    _check_inputs(layout, runs, references_uri)
    policy = SourcePolicy.for_manifest(references_uri, config.storage)

    def rows() -> Any:
        write_errors(layout, "_records", [])
        return manifest_dataset(references_uri, JOB, layout.errors_dir())

    done = _job.execute(
        JOB,
        config,
        layout,
        rows,
        lambda todo, cfg, staged: build_dataset(todo, cfg, root, runs, policy, staged),
    )
    found, got = done.found, done.got
    summary = JobSummary(JOB, root)
    summary.products = {
        "products": found.todo + found.counts[_job.COMPLETE],
        ALREADY: found.counts[_job.COMPLETE],
        **got.products,
    }
    result = tables(config, layout, runs, references_uri, published)
    storage.write_json(layout.tables(), result)
    report_uri = None
    if report is not None:  # reference photos are read as the job read them: by the policy
        report_uri = report(root, policy.read)
    units = {name: "products" if name == "read" else "images" for name in STAGES}
    return _job.finish(
        summary,
        layout,
        done,
        units,
        [got.done.stages, got.failed],
        start,
        lambda: {
            "tables": layout.tables(),
            "report": report_uri,
            "overall": {
                r: {m: v["mean"] for m, v in t.items()} for r, t in result["overall"].items()
            },
            "distribution": {
                r: {k: d[k] for k in ("fid", "kid_mean", "refused")}
                for r, d in result["distribution"].items()
            },
        },
    )


@dataclass(frozen=True)
class EvaluateArgs:
    """``restage evaluate``'s arguments (the CLI builds them from its flags)."""

    out: str
    runs: list[str] = field(default_factory=list)
    references: str | None = None
    bench: str | None = None
    subjects: str | None = None
    max_subjects: int | None = None
    prompts: int | None = None
    images_per_prompt: int | None = None


def main(config: RestageConfig, args: EvaluateArgs) -> JobSummary:
    """CLI entry: ``restage evaluate --run NAME=URI ... --references URI --out URI``, or
    ``restage evaluate --bench dreambench --subjects DIR --out URI``."""
    from ray_app.eval_report import write_report

    def report(root: str, read_reference: Callable[[str], bytes] | None = None) -> str:
        return write_report(
            root, max_products=config.evaluate.report_products, read_reference=read_reference
        )

    if args.bench:
        from pipelines.dreambench import DreamBenchArgs, dreambench

        if args.runs or args.references:
            raise ValueError("--bench makes its own runs and references: drop --run/--references")
        if not args.subjects:
            raise ValueError("--bench dreambench needs --subjects DIR (a folder per subject)")
        return dreambench(
            config,
            DreamBenchArgs(
                args.subjects, args.out, args.max_subjects, args.prompts, args.images_per_prompt
            ),
            report,
        )
    for flag in ("subjects", "max_subjects", "prompts", "images_per_prompt"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} belongs to --bench; drop it")
    if not args.references:
        raise ValueError("give --references MANIFEST: the products manifest with the real photos")
    return evaluate(config, parse_runs(args.runs), args.references, args.out, report=report)
