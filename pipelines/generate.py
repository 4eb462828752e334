"""`restage generate`: each product in new contexts with its adapter, ranked (paper 2.5).

Ray Data streams one row per product, carrying all of that product's prompts and seeds:

    plan -> generate (adapter loaded once per product) -> segment -> score -> write

The products come from train's input index, or its folders listed in a task; which have an
adapter, which are complete, and each plan (its adapter.json read) are found in tasks, so
the driver holds counters only (pipelines/_job.py). A bad adapter.json fails its product.

Prompts come from the prompt bank of the product's type (plus user prompts from a file),
with ``TOKEN NOUN`` in place of ``{product}``; seeds from (product id, prompt index, image
index). Because a row is a whole product, the generator actor loads the product's adapter
once, makes every image of the product, and unloads it before the next product; the number
of loads is counted and reported (the total, and the most for one product).

Ranking: every image is scored with CLIP-T (its prompt), CLIP-I and DINO against the
product's real images from the training set named in ``adapter.json``, plus segmented CLIP-I
and DINO (product crops) where both the generated image and the reference have a mask. The
``generate.ranking`` strategy (ray_app/ranking.py; by default the paper's plain sum of
CLIP-T, CLIP-I and DINO) turns them into one score; the top-N per product at or above
``generate.threshold`` (on that ranking's scale) are kept. Written per product: the kept
images, one Parquet shard with every image's scores, the ranking's name, rank and ``kept``,
its errors shard, and the completion marker last; a re-run skips complete products.

Cost per product: one adapter load, prompts x images denoising runs, one CLIP/DINO pass
over the images and the product's real images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from pipelines import _job
from pipelines._job import outcome_batch, write_product
from pipelines._product_rows import ProductRow, ProductStage, pack, unpack
from ray_app import storage
from ray_app.adapter_meta import AdapterMeta
from ray_app.batching import object_array
from ray_app.config import RestageConfig
from ray_app.kinds import Metric
from ray_app.models import source_tag
from ray_app.prompts import PLACEHOLDER, PromptBank, fill
from ray_app.ranking import build as build_ranking
from ray_app.ranking import rank_and_keep
from ray_app.records import GENERATION_SCHEMA, VALID
from ray_app.report import ALREADY, JobSummary, StageStats
from ray_app.seeds import derive_seed
from ray_app.storage import AdapterLayout, GenerationLayout, write_errors

JOB = "generate"
NO_ADAPTER = "no adapter"  # a product of train's output without its adapter.json (not ready)
STAGES = ("plan", "generate", "segment", "score", "write")


# --------------------------------------------------------------------------- state


@dataclass
class Image:
    """One generated image of a product while it moves through the pipeline."""

    image_id: str
    prompt_index: int
    image_index: int
    prompt: str
    prompt_source: str
    seed: int
    data: bytes | None = None
    mask: bytes | None = None
    mask_method: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    rank: int | None = None
    kept: bool = False
    error: str | None = None


@dataclass
class ProductState(ProductRow):
    """A product's adapter, prompts and images; pickled into its Ray Data row."""

    job: ClassVar[str] = JOB
    product_id: str
    adapter_uri: str
    meta: AdapterMeta | None  # None: its adapter.json could not be read (a failed plan)
    images: list[Image]
    adapter_loads: int = 0


# --------------------------------------------------------------------------- planning


def read_user_prompts(uri: str | None) -> list[str]:
    """Prompts from a text file, one a line, each with ``{product}`` once; '#' comments."""
    if not uri:
        return []
    text = storage.read_bytes(storage.normalize_uri(uri)).decode()
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"user prompts {uri} line {n}: {line[:80]!r} must contain {PLACEHOLDER} exactly "
                f"once, where the product goes (e.g. 'a {PLACEHOLDER} on an oak desk')"
            )
        out.append(line)
    return out


def plan_product(
    config: RestageConfig,
    bank: PromptBank,
    user_prompts: list[str],
    product_id: str,
    adapter_uri: str,
    meta: AdapterMeta,
) -> ProductState:
    """A product's prompts (bank, then user) and seeds; ``TOKEN NOUN`` fills ``{product}``."""
    g = config.generate
    bank_prompts = bank.prompts(
        meta.product_type,
        g.prompts_per_product,
        derive_seed(product_id, "generate-prompts", 0, config.seed),
    )
    phrase = meta.phrase
    prompts = [("bank", p) for p in bank_prompts] + [("user", p) for p in user_prompts]
    images = []
    for i, (source, prompt) in enumerate(prompts):
        for j in range(g.images_per_prompt):
            images.append(
                Image(
                    f"p{i:02d}-i{j:02d}",
                    i,
                    j,
                    fill(prompt, phrase),
                    source,
                    derive_seed(product_id, f"generate/{i}", j, config.seed),
                )
            )
    return ProductState(product_id, adapter_uri, meta, images)


# --------------------------------------------------------------------------- stages


class GenerateStage(ProductStage):
    """All images of a product with its adapter: one load, every prompt, one unload."""

    name = "generate"

    def __init__(self, config: RestageConfig):
        from actors.generator import GenerationOptions, Generator

        super().__init__(config)
        g = config.generate
        self.gen = Generator(
            config.model_spec("generator"),
            GenerationOptions(g.width, g.height, g.steps, g.guidance_scale, g.negative_prompt),
        )
        self.tag = source_tag(config, "generator")

    def process(self, state: ProductState) -> None:
        pid, stat = state.product_id, state.stat(self.name)
        before = self.gen.adapter_loads[pid]
        self.gen.load_adapter(pid, state.adapter_uri, scale=self.config.generate.lora_scale)
        try:
            out = self.gen(
                {
                    "prompt": object_array([im.prompt for im in state.images]),
                    "seed": np.array([im.seed for im in state.images], np.int64),
                    "adapter": object_array([pid] * len(state.images)),
                }
            )
        finally:
            self.gen.unload_adapter(pid)
        state.adapter_loads += self.gen.adapter_loads[pid] - before
        stat.items_in += len(state.images)
        for im, data, err in zip(state.images, out["image"], out["error"], strict=True):
            if err:
                im.error = err
                stat.errors += 1
                state.error(self.name, err, item=im.image_id)
            else:
                im.data = data
                stat.items_out += 1


class SegmentStage(ProductStage):
    """Product masks of the generated images (segmented scores)."""

    name = "segment"

    def __init__(self, config: RestageConfig):
        from actors.segmenter import Segmenter

        super().__init__(config)
        self.model = Segmenter(config.model_spec("segmenter"), config.generate.segmentation)

    def process(self, state: ProductState) -> None:
        todo = [im for im in state.images if im.data is not None]
        stat = state.stat(self.name)
        stat.items_in += len(todo)
        if not todo:
            return
        out = self.model({"image": object_array([im.data for im in todo])})
        for im, mask, method in zip(todo, out["mask"], out["mask_method"], strict=True):
            if mask is not None:
                im.mask, im.mask_method = mask, method
                stat.items_out += 1


class ScoreStage(ProductStage):
    """Scores against the product's real images (and masks) from its training set, then
    the rank (``generate.ranking``) and the top-N."""

    name = "score"

    def __init__(self, config: RestageConfig):
        from actors.personal_fidelity import personal_encoders
        from actors.scorer import Scorer, ScoringOptions

        super().__init__(config)
        g = config.generate
        self.scorer = Scorer(  # masks come from SegmentStage
            config.model_spec("clip"),
            config.model_spec("dino"),
            ScoringOptions(g.weights, config.scoring.ranges, build_ranking(g, config.scoring)),
            personal=personal_encoders(config.scoring, config.personalize, config.model_spec),
        )

    def process(self, state: ProductState) -> None:
        from actors.scorer import references

        g, stat = self.config.generate, state.stat(self.name)
        refs, ref_masks = references(state.meta)
        if not refs:
            raise ValueError(
                f"no real image in the training set {state.meta.training_set.manifest_shard}"
            )
        todo = [im for im in state.images if im.data is not None]
        stat.items_in += len(todo)
        if not todo:
            return
        out = self.scorer.score(
            [im.data for im in todo],
            [im.prompt for im in todo],
            refs,
            ref_masks,
            masks=[im.mask for im in todo],
            product_id=state.product_id,
        )
        for k, im in enumerate(todo):
            im.scores = {m: float(out[m][k]) for m in Metric}
            value = float(out["score"][k])
            im.score = None if math.isnan(value) else value
            if out["error"][k]:
                state.error(self.name, out["error"][k], item=im.image_id)
        ranks, kept = rank_and_keep(
            np.array([math.nan if im.score is None else im.score for im in todo], np.float32),
            [im.image_id for im in todo],
            g.top_n,
            g.keep_threshold,
        )
        for im, r, k in zip(todo, ranks, kept, strict=True):
            im.rank, im.kept = r, k
        stat.items_out += sum(kept)
        stat.dropped += len(todo) - sum(kept)


def write_products(
    batch: dict[str, np.ndarray], config: RestageConfig, root: str
) -> dict[str, np.ndarray]:
    """Write each product's images, manifest shard and errors, then its marker last
    (pipelines/_job.py). Returns one small outcome row per product."""
    layout = GenerationLayout(root)
    g = config.generate

    def writer(state: ProductState) -> Callable[[], list[dict[str, Any]]]:
        def files() -> list[dict[str, Any]]:
            pid, stat, rows = state.product_id, state.stat("write"), []
            storage.remove(layout.images_dir(pid), recursive=True)
            for im in state.images:
                uri = None
                if im.data is not None and (im.kept or g.write_all_images):
                    uri = storage.write_bytes(layout.image(pid, im.image_id), im.data)
                    stat.items_out += 1
                rows.append(_row(state, im, uri, config))
            stat.items_in = len(rows)
            return rows

        return files

    def marker(state: ProductState, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "images": len(rows),
            "kept": sum(1 for r in rows if r["kept"]),
            "adapter": state.adapter_uri,
            "adapter_loads": state.adapter_loads,
        }

    out = []
    for state in unpack(batch):
        row = write_product(
            layout, state, GENERATION_SCHEMA, writer(state), lambda rows, st=state: marker(st, rows)
        )
        out.append({**row, "adapter_loads": state.adapter_loads})
    return outcome_batch(out)


def _row(state: ProductState, im: Image, uri: str | None, config: RestageConfig) -> dict[str, Any]:
    def value(name: str) -> float | None:
        v = im.scores.get(name)
        return None if v is None or math.isnan(v) else v

    models = {"generator": source_tag(config, "generator"), "clip": source_tag(config, "clip")}
    models["dino"] = source_tag(config, "dino")
    if config.scoring.encoders is not None:
        models["encoder"] = source_tag(config, "encoder")
    if config.generate.segment:
        models["segmenter"] = source_tag(config, "segmenter")
    return {
        "product_id": state.product_id,
        "image_id": im.image_id,
        "prompt_index": im.prompt_index,
        "image_index": im.image_index,
        "prompt": im.prompt,
        "prompt_source": im.prompt_source,
        "seed": im.seed,
        "token": state.meta.token,
        "adapter_uri": state.adapter_uri,
        "image_uri": uri,
        "width": config.generate.width,
        "height": config.generate.height,
        "mask_method": im.mask_method,
        **{m: value(m) for m in Metric},
        "score": im.score,
        "ranking": config.generate.ranking,
        "rank": im.rank,
        "kept": im.kept,
        "error": im.error,
        "models": sorted(models.items()),
    }


def model_stages(config: RestageConfig) -> list[tuple[type[ProductStage], tuple[str, ...]]]:
    """The model stages in pipeline order, each with the roles it loads (first: its pool's)."""
    stages: list[tuple[type[ProductStage], tuple[str, ...]]] = [(GenerateStage, ("generator",))]
    if config.generate.segment:
        stages.append((SegmentStage, ("segmenter",)))
    return [*stages, (ScoreStage, config.scoring.roles())]


def adapter_ids(adapters: AdapterLayout) -> Any:
    """The products of ``restage train``'s output as a lazy dataset (``product_id``): its
    input index when it wrote one, else its folders, listed in a task (not here)."""
    import ray

    index = _job.input_ids(adapters)
    if index is not None:
        return index
    return ray.data.from_items([{"root": adapters.root}]).map_batches(
        _list_adapters, batch_size=1, batch_format="pyarrow"
    )


def _list_adapters(batch: pa.Table, chunk: int = 10_000) -> Any:
    for root in batch["root"].to_pylist():
        names = [n for n in storage.list_names(root) if not n.startswith("_")]  # ids never do
        for i in range(0, len(names), chunk):
            yield pa.table({"product_id": names[i : i + chunk]})


def _ready(batch: pa.Table, adapters: AdapterLayout) -> pa.Table:
    """A task: which products have an adapter (its adapter.json, written last, exists)."""
    pids = batch["product_id"].to_pylist()
    status = [VALID if storage.exists(adapters.metadata(pid)) else NO_ADAPTER for pid in pids]
    return pa.table({"product_id": pids, "status": status})


def plan_products(
    batch: dict[str, np.ndarray],
    config: RestageConfig,
    adapters: AdapterLayout,
    user_prompts: list[str],
) -> dict[str, np.ndarray]:
    """A task: each product's adapter.json -> its planned state; a bad adapter.json fails
    the product (an error row of the plan stage), never the job."""
    bank = PromptBank.load(config.augment.prompt_bank)
    states = []
    for pid in map(str, batch["product_id"]):
        start = time.perf_counter()
        stat = StageStats("plan", "products", items_in=1)
        try:
            meta = AdapterMeta.read(adapters.metadata(pid))
            state = plan_product(config, bank, user_prompts, pid, adapters.adapter_dir(pid), meta)
            stat.items_out = 1
        except Exception as exc:
            state = ProductState(pid, adapters.adapter_dir(pid), None, [])
            state.error("plan", f"{type(exc).__name__}: {exc}")
            state.failed = f"plan failed: {exc}"
            stat.errors = 1
        stat.seconds = time.perf_counter() - start
        state.stats["plan"] = stat
        states.append(state)
    return pack(states)


def build_dataset(
    todo: Any,
    config: RestageConfig,
    root: str,
    adapters: AdapterLayout,
    staged: dict[str, int] | None = None,
):
    """The lazy Ray Data pipeline over the products to do (a dataset of ``product_id``
    rows), planned in tasks. ``staged`` (a dict): stage-by-stage mode; the model stages run
    here, one at a time, filling ``staged`` with the products each ran
    (pipelines/_staged.py)."""
    g = config.generate
    per_call = g.products_per_batch
    user_prompts = read_user_prompts(g.user_prompts)  # a bad file fails here, before any work

    def planned(chosen: Any) -> Any:
        return chosen.map_batches(
            plan_products,
            fn_kwargs={"config": config, "adapters": adapters, "user_prompts": user_prompts},
            batch_size=per_call,
            num_cpus=g.cpus_per_task,
        )

    ds = _job.through_stages(
        todo, planned, model_stages(config), config, root, staged, per_call, g.cpus_per_task
    )
    return ds.map_batches(
        write_products,
        fn_kwargs={"config": config, "root": root},
        batch_size=per_call,
        num_cpus=g.cpus_per_task,
    )


def generate(config: RestageConfig, adapters: str, out: str) -> JobSummary:
    """Run the generate job: adapters under ``adapters`` -> ranked images under ``out``.
    The driver holds counters only: the products, their markers and their plans are read
    in Ray Data tasks (pipelines/_job.py)."""
    start = time.perf_counter()
    adapters_root, root = storage.normalize_uri(adapters), storage.normalize_uri(out)
    alayout, layout = AdapterLayout(adapters_root), GenerationLayout(root)
    if not storage.exists(adapters_root):
        raise FileNotFoundError(
            f"--adapters {adapters}: no such folder (the output of `restage train`)"
        )
    read_user_prompts(config.generate.user_prompts)  # a bad file fails before Ray starts
    build_ranking(config.generate, config.scoring)  # so does a bad generate.ranker file

    def rows() -> Any:
        write_errors(layout, "_plan", [])  # an older version's one plan errors shard
        return adapter_ids(alayout).map_batches(
            _ready, fn_kwargs={"adapters": alayout}, batch_format="pyarrow"
        )

    done = _job.execute(
        JOB,
        config,
        layout,
        rows,
        lambda todo, cfg, staged: build_dataset(todo, cfg, root, alayout, staged),
        numbers=("adapter_loads",),
    )
    found, got = done.found, done.got
    summary = JobSummary(JOB, root)
    summary.products = {
        "adapters": found.todo + found.counts[_job.COMPLETE],
        ALREADY: found.counts[_job.COMPLETE],
        **got.products,
    }
    units = {name: "products" if name == "plan" else "images" for name in STAGES}
    return _job.finish(
        summary,
        layout,
        done,
        units,
        [got.done.stages, got.failed],
        start,
        lambda: {
            "adapters": adapters_root,
            "ranking": config.generate.ranking,
            "threshold": config.generate.keep_threshold,
            "adapter_loads": got.sums["adapter_loads"],
            "adapter_loads_per_product_max": got.maxima["adapter_loads"],
        },
    )


@dataclass(frozen=True)
class GenerateArgs:
    """``restage generate``'s arguments (the CLI builds them from its flags); the optional
    ones override their ``generate`` config values."""

    adapters: str
    out: str
    prompts: int | None = None
    images_per_prompt: int | None = None
    top_n: int | None = None
    user_prompts: str | None = None


def main(config: RestageConfig, args: GenerateArgs) -> JobSummary:
    """CLI entry: ``restage generate --adapters URI --out URI [--prompts N ...]``."""
    config = config.model_copy(deep=True)
    for attr, key in (
        ("prompts", "prompts_per_product"),
        ("images_per_prompt", "images_per_prompt"),
        ("top_n", "top_n"),
        ("user_prompts", "user_prompts"),
    ):
        value = getattr(args, attr)
        if value is not None:
            setattr(config.generate, key, value)
    return generate(config, args.adapters, args.out)
