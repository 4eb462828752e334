"""`restage train`: one LoRA adapter per product on Ray Train (paper 2.4, A.5).

The product list is one stream (``WorkSource``): the augment output's manifest shards, one
row per product, each row's completion (its ``adapter.json`` exists) checked as it is read,
in the queue actor for a small folder and in Ray Data tasks (``work_dataset``) for a large
one; the driver lists nothing. A work-queue
actor (``pipelines.train_queue``) reads that stream and a Ray Train ``DataParallelTrainer``
(no torch process group: the workers never communicate) with N workers
leases products from it one at a time, as each worker gets to them (in listing order): a
fast worker takes more products, a slow product holds back only its own worker, and more
workers speed a job up without reassigning finished work. Each worker loads the base
generator once (``LoraTrainer``, when its first product arrives) and trains its products
one after another, resetting the LoRA between them; set-up per product is reading its
images and caching their latents and text embeddings, nothing else. With
``train.products_per_step`` = K > 1 a worker leases K products and trains them in shared
steps (``LoraTrainer.train_many``), with the same adapters as one at a time.

``train.recipe`` chooses what a product is trained on: ``restage`` (the paper's method) takes
every kept sample of its training set; ``dreambooth_lora`` (the paper's baseline) takes its
real photos alone, with DreamBooth's instance prompts and one rare token, and optionally
DreamBooth's prior preservation: class images of its noun made by the base generator
(``ShardTrainer.class_images``, once per noun per worker). ``adapter.json`` records the
recipe and what the adapter was trained on.

A product's adapter folder holds its weights (``AdapterLayout.WEIGHTS``, loadable by plain
diffusers with ``pipe.load_lora_weights(folder)``) and ``AdapterMeta``, written last as the
completion marker. A re-run skips complete products; a worker restarted by
``FailureConfig`` after a worker died gets back only the products its rank had in flight.
A product that cannot be trained (too few samples, no usable token, a non-finite loss)
becomes a row of the errors manifest; the other products go on. Each worker reports a row
per product to the queue, which keeps running sums: the summary adds up W per-worker
aggregates, never reads the adapters back.

Cost per product: ``steps`` optimiser steps (the GPU's work) plus set-up (image reads,
one VAE and text-encoder pass over its ~40 samples); the base model load is paid once per
worker, not per product. At 10^6 products and W workers the job is ~10^6 / W products in
sequence per worker, balanced by the queue whatever each product's speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from pipelines import _job
from ray_app import __version__, storage
from ray_app.adapter_meta import (
    AdapterMeta,
    BaseModelRef,
    PriorPreservationRef,
    RejectedToken,
    StageSeconds,
    SweepCost,
    TokenTrial,
    TrainingSetRef,
)
from ray_app.config import RestageConfig
from ray_app.kinds import NEGATIVE_KINDS, POSITIVE_KINDS, Metric, SampleKind
from ray_app.node_loss import node_loss_guard
from ray_app.progress import ProgressFile, StageLines, counts
from ray_app.prompts import PromptBank, category_noun, fill, product_phrase
from ray_app.records import (
    SAMPLE_SCHEMA,
    ErrorRow,
    RecordError,
    read_manifest,
    validate_product_id,
)
from ray_app.report import ALREADY, JobSummary
from ray_app.seeds import derive_seed
from ray_app.storage import AdapterLayout, AugmentLayout, write_errors

if TYPE_CHECKING:
    from ray.data import Dataset

JOB = "train"
STAGES = ("load", "setup", "train", "sweep", "write")


class ProductError(ValueError):
    """A product cannot be trained; the message is the reason in the errors manifest."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage


# --------------------------------------------------------------------------- planning


# The listing tasks only read parquet footers and check that files exist: they take no CPU
# slot, so they run while the training workers hold every CPU; at most this many at once.
LISTING_TASKS = 4


def product_ids(data_root: str) -> Dataset:
    """The products of an augment output as a Ray Data dataset, read in Ray Data tasks: one
    row per manifest shard, ``product_id`` (its name), ``shard`` and ``error`` (why the name
    is not a product id, or null). The one place train learns its product list."""
    import pyarrow as pa
    import ray.data

    manifest_dir = require_manifest(data_root)
    try:
        ds = ray.data.read_parquet(
            manifest_dir, include_paths=True, num_cpus=0, concurrency=LISTING_TASKS
        ).select_columns(["path"])  # pushed down into the read: no sample columns are read
    except ValueError as exc:  # Ray Data refuses a folder with no parquet files
        if "no files found" not in str(exc).lower():
            raise
        ds = ray.data.from_arrow(pa.table({"path": pa.array([], pa.string())}))
    return ds.map_batches(
        _shard_rows,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=LISTING_TASKS),
    )


def require_manifest(data_root: str) -> str:
    """The augment output's manifest folder; a clear error when ``data_root`` has none."""
    manifest_dir = AugmentLayout(data_root).manifest_dir()
    if not storage.exists(manifest_dir):
        raise FileNotFoundError(
            f"--data {data_root}: no manifest/ folder; give the output root of `restage augment`"
        )
    return manifest_dir


def _shard_rows(batch: Any) -> Any:
    """Sample rows with their shard's path -> one row per shard (a shard's few dozen rows
    are never split across blocks; a duplicate row would be dropped by the queue anyway)."""
    import pyarrow as pa

    ids, shards, errors = [], [], []
    for path in dict.fromkeys(batch["path"].to_pylist()):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        pid = name[: -len(".parquet")] if name.endswith(".parquet") else name
        try:
            ids.append(validate_product_id(pid))
            errors.append(None)
        except RecordError as exc:
            ids.append(pid)
            errors.append(str(exc))
        shards.append(name)
    return pa.table(
        {
            "product_id": pa.array(ids, pa.string()),
            "shard": pa.array(shards, pa.string()),
            "error": pa.array(errors, pa.string()),
        }
    )


def _with_completion(batch: Any, out_root: str) -> Any:
    """Adds ``complete``: whether the product's ``adapter.json`` exists (checked here, in
    Ray Data tasks, a few requests at a time; never a driver listing of the output)."""
    import pyarrow as pa

    layout = AdapterLayout(out_root)
    ids, errors = batch["product_id"].to_pylist(), batch["error"].to_pylist()

    def done(i: int) -> bool:
        return errors[i] is None and storage.exists(layout.metadata(ids[i]))

    with ThreadPoolExecutor(8) as pool:
        complete = list(pool.map(done, range(len(ids))))
    return batch.append_column("complete", pa.array(complete, pa.bool_()))


# A manifest folder of at most this many shards is listed by the queue actor itself, its
# completion checked there: a small job (a few products, DreamBench) starts no Ray Data read
# (~5 s of task start-up on 2 cores); a larger one streams through ``work_dataset``.
SMALL_LISTING = 1000


@dataclass(frozen=True)
class WorkSource:
    """The train job's input stream, as ``work_dataset``'s batches (``product_id``,
    ``shard``, ``error``, ``complete``), iterated inside the queue actor, never the driver:
    a small manifest folder listed there directly, a larger one read through Ray Data."""

    data_root: str
    out_root: str

    def __iter__(self) -> Iterator[Any]:
        import pyarrow as pa

        names = storage.list_names(AugmentLayout(self.data_root).manifest_dir(), ".parquet")
        if len(names) > SMALL_LISTING:
            # (Listed twice, here and by Ray Data's read: one more listing for a job this size.)
            yield from work_dataset(self.data_root, self.out_root).iter_batches(
                batch_format="pyarrow"
            )
            return
        for i in range(0, len(names), 256):
            shards = pa.table({"path": pa.array(names[i : i + 256], pa.string())})
            yield _with_completion(_shard_rows(shards), self.out_root)


def work_dataset(data_root: str, out_root: str) -> Dataset:
    """The train job's input stream: ``product_ids`` with each product's completion, in
    listing order (products are leased in the same order on every run)."""
    import ray.data

    ds = product_ids(data_root).map_batches(
        _with_completion,
        fn_kwargs={"out_root": out_root},
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=LISTING_TASKS),
    )
    ds.context.execution_options.preserve_order = True  # costs nothing on a listing
    return ds


def read_records(data_root: str, manifest: str | None) -> dict[str, dict[str, Any]]:
    """Product records (title, category, attributes) from a products manifest, by id."""
    if not manifest:
        return {}
    return {r.product_id: r.to_row() for r in read_manifest(manifest, job=JOB).records}


def product_record(
    data_root: str, product_id: str, records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A product's record: the augment output's ``products/<id>.json`` when it has one,
    else the products manifest given to the job, else nothing."""
    uri = AugmentLayout(data_root).product_record(product_id)
    if storage.exists(uri):
        return storage.read_json(uri)
    return records.get(product_id, {})


@dataclass
class TrainingSet:
    """A product's kept samples, read from its manifest shard, with their image bytes."""

    product_id: str
    shard_uri: str
    rows: list[dict[str, Any]]
    images: dict[str, bytes]
    product_type: str | None
    noun: str
    record: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, bytes] = field(default_factory=dict)  # positives' masks: masked_loss

    @property
    def positives(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] in POSITIVE_KINDS]

    @property
    def negatives(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] in NEGATIVE_KINDS]

    def texts(self) -> list[str]:
        """The product's words for token collisions: title, category, attributes, captions."""
        rec = self.record
        attrs = rec.get("attributes") or []
        values = [v for _, v in (attrs.items() if isinstance(attrs, dict) else attrs)]
        out = [rec.get("title"), rec.get("category"), rec.get("description"), *values]
        out += [r["caption"] for r in self.rows] + [r["prompt"] for r in self.rows]
        return [t for t in out if t]

    def digest(self) -> str:
        """sha256 over (sample id, kind, caption, image sha256) of every kept sample."""
        h = hashlib.sha256()
        for r in sorted(self.rows, key=lambda r: r["sample_id"]):
            image = hashlib.sha256(self.images[r["sample_id"]]).hexdigest()
            h.update(f"{r['sample_id']}\x1f{r['kind']}\x1f{r['caption']}\x1f{image}\n".encode())
        return h.hexdigest()


def load_training_set(
    config: RestageConfig,
    data_root: str,
    product_id: str,
    bank: PromptBank,
    records: dict[str, dict[str, Any]],
) -> TrainingSet:
    shard = AugmentLayout(data_root).manifest_shard(product_id)
    table = storage.read_parquet(shard, schema=SAMPLE_SCHEMA)
    table = table.filter(pc.equal(table["product_id"], product_id))
    if config.train.recipe == "dreambooth_lora":
        # The baseline: every real photo of the product (restage's ratio may have left some
        # out of its set) and nothing synthetic, whatever else the augment output holds.
        table = table.filter(pc.equal(table["kind"], SampleKind.REAL.value))
    else:
        table = table.filter(table["kept"])
    rows = sorted(table.to_pylist(), key=lambda r: r["sample_id"])
    n_pos = sum(r["kind"] in POSITIVE_KINDS for r in rows)
    if n_pos < config.train.min_positives:
        raise ProductError(
            "load",
            f"{n_pos} kept positive samples, below train.min_positives="
            f"{config.train.min_positives}: too few to learn the product",
        )
    # masked DreamBooth trains a positive on its product's pixels: read its mask too (a
    # positive without one is trained on the whole image)
    masked = [
        r
        for r in rows
        if config.train.masked_loss and r["kind"] in POSITIVE_KINDS and r["mask_uri"]
    ]
    with ThreadPoolExecutor(config.train.io_threads) as pool:
        blobs = list(pool.map(storage.read_bytes, [r["image_uri"] for r in rows]))
        mask_blobs = list(pool.map(storage.read_bytes, [r["mask_uri"] for r in masked]))
    record = product_record(data_root, product_id, records)
    product_type = next((r["product_type"] for r in rows if r["product_type"]), None)
    noun = (
        record.get("noun")
        or category_noun(bank, record.get("category"))
        or bank.type_of(product_type).noun
    )
    return TrainingSet(
        product_id,
        shard,
        rows,
        {r["sample_id"]: b for r, b in zip(rows, blobs, strict=True)},
        product_type,
        noun,
        record,
        {r["sample_id"]: b for r, b in zip(masked, mask_blobs, strict=True)},
    )


# --------------------------------------------------------------------------- one worker


# Nouns whose class images a worker keeps (prior preservation): at the default 200 images
# of 1024 px, ~300 MB of PNGs each.
CLASS_IMAGE_NOUNS = 2


def class_prompt(noun: str) -> str:
    """The prompt of a class image and of its training sample (DreamBooth's class prompt)."""
    return f"a photo of a {noun}"


@dataclass
class _Prepared:
    """A product read and ready to train: its training set, token candidates and seed."""

    ts: TrainingSet
    tokens: list[str]
    rejected: list[tuple[str, str]]
    seed: int
    started: float  # perf_counter when its load began
    load_seconds: float
    associated: frozenset[str] = frozenset()  # candidates chosen for their association
    token: str = ""  # the chosen token: the only candidate, or the sweep's winner
    prior: tuple[bytes, ...] = ()  # class images of prior preservation (dreambooth_lora)
    prior_seconds: float = 0.0  # making them for this product (0: the worker had them)

    def __post_init__(self) -> None:
        self.token = self.token or self.tokens[0]


class ShardTrainer:
    """Trains a worker's products one after another on one loaded base model."""

    def __init__(self, config: RestageConfig, data_root: str, out_root: str, manifest: str | None):
        from actors.lora_trainer import LoraTrainer
        from ray_app.tokens import load_tokens

        self.config = config
        self.data_root = data_root
        self.layout = AdapterLayout(out_root)
        self.bank = PromptBank.load(config.augment.prompt_bank)
        self.records = read_records(data_root, manifest)
        self.tokens = load_tokens(config.train.tokens_file)
        start = time.perf_counter()
        self.trainer = LoraTrainer(config.model_spec("generator"), config.train)
        self.load_seconds = time.perf_counter() - start
        if config.train.products_per_step > 1:  # refuse layers the stacked LoRA cannot run
            from actors.lora_trainer import ADAPTER
            from actors.multi_lora import lora_layers

            lora_layers(self.trainer.unet, ADAPTER)
        pipe = self.trainer.pipe
        self.tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t]
        self._scorer = None
        self._token_table: Any = None  # the text encoder's token embeddings, for sweeps
        self._class_images: dict[str, tuple[bytes, ...]] = {}  # noun -> its class images
        self._on_result: Callable[[dict[str, Any]], None] | None = None
        self.test_delays: dict[str, float] = {}  # test-only: see _worker_loop
        self.test_queue: Any = None  # the queue, when test_delays are set

    def samples(self, ts: TrainingSet, token: str, prior: Iterable[bytes] = ()) -> list:
        """What the trainer trains on: the positives with ``token``, the negatives with
        their own captions, and ``prior``'s class images (prior preservation)."""
        from actors.lora_trainer import TrainingSample, positive_prompt

        mode = self.config.train.caption_mode
        out = []
        for r in ts.positives:
            prompt = positive_prompt(r["caption"] or r["prompt"], token, ts.noun, mode)
            sid = r["sample_id"]
            out.append(TrainingSample(sid, ts.images[sid], prompt, mask=ts.masks.get(sid)))
        for r in ts.negatives:
            prompt = r["caption"] or r["prompt"] or f"a photo of a {ts.noun}"
            out.append(TrainingSample(r["sample_id"], ts.images[r["sample_id"]], prompt, True))
        for i, image in enumerate(prior):
            out.append(TrainingSample(f"class-{i:03d}", image, class_prompt(ts.noun), prior=True))
        return out

    def class_images(self, noun: str) -> tuple[tuple[bytes, ...], float]:
        """DreamBooth's class images of ``noun``: ``prior_preservation.num_class_images``
        images of "a photo of a NOUN" by the base generator (the LoRA off), seeded by the
        noun and the run seed, so every product of the class gets the same ones -> (PNG
        images, seconds spent making them: 0 when this worker had them already). A worker
        keeps the last ``CLASS_IMAGE_NOUNS`` nouns' images."""
        from ray_app.images import encode_png

        opts = self.config.train.prior_preservation
        if noun in self._class_images:
            return self._class_images[noun], 0.0
        start = time.perf_counter()
        n, per_call = opts.num_class_images, self.config.generator.batch_size
        seeds = [derive_seed(noun, "class-image", i, self.config.seed) for i in range(n)]
        images: tuple[bytes, ...] = ()
        for i in range(0, n, per_call):  # the generator role's batch: 200 at once would not fit
            chunk = seeds[i : i + per_call]
            made = self.trainer.base_images(
                [class_prompt(noun)] * len(chunk), chunk, opts.steps, opts.guidance_scale
            )
            images += tuple(encode_png(rgb) for rgb in made)
        while len(self._class_images) >= CLASS_IMAGE_NOUNS:
            self._class_images.pop(next(iter(self._class_images)))
        self._class_images[noun] = images
        return images, time.perf_counter() - start

    def run(
        self,
        product_ids: Iterable[str],
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Train ``product_ids`` in order, ``train.products_per_step`` at a time: a group is
        filled with the next products that load, so a bad product never shrinks a group.
        ``product_ids`` is read lazily (the job's workers lease from a queue as they go);
        ``on_result`` gets each product's result row (``status`` ok, failed or complete)."""
        self._on_result = on_result
        group: list[_Prepared] = []
        for pid in product_ids:
            if storage.exists(self.layout.metadata(pid)):  # finished by an earlier attempt
                self._report({"product_id": pid, "status": "complete"})
                continue
            try:
                group.append(self.prepare(pid))
            except Exception as exc:  # a product's failure never stops the others
                self._fail(pid, exc, "load")
                continue
            if len(group) == self.config.train.products_per_step:
                self._train_group(group)
                group = []
        if group:
            self._train_group(group)

    def _report(self, row: dict[str, Any]) -> None:
        if self._on_result is not None:
            self._on_result(row)

    def _fail(self, pid: str, exc: Exception, stage: str) -> None:
        if isinstance(exc, ProductError):
            stage, reason = exc.stage, str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        write_errors(self.layout, pid, [ErrorRow(JOB, stage, reason, pid)])
        self._report({"product_id": pid, "status": "failed", "stage": stage})

    def _done(self, pid: str, meta: AdapterMeta) -> None:
        write_errors(self.layout, pid, [])  # a stale errors shard of an earlier run goes
        meta.write(self.layout.metadata(pid))  # the completion marker, last

    def _finished(self, pid: str, meta: AdapterMeta) -> None:
        """Write a trained product's adapter metadata, then report its result row."""
        self._done(pid, meta)
        seconds = meta.seconds.model_dump(mode="json")
        self._report({"product_id": pid, "status": "ok", "seconds": seconds, "steps": meta.steps})

    def _train_group(self, group: list[_Prepared]) -> None:
        """One product alone (with its token sweep), or several in multi-product steps; when
        the group's loss is not finite (or it runs out of memory), each product alone."""
        import torch

        if len(group) > 1:
            samples = [(self.samples(p.ts, p.token, p.prior), p.seed) for p in group]
            try:
                results = self.trainer.train_many(samples)
            except (FloatingPointError, torch.cuda.OutOfMemoryError):
                pass  # retried one by one below: a product that fails alone gets its error row
            else:
                for p, result in zip(group, results, strict=True):
                    try:
                        self._finished(p.ts.product_id, self.finish(p, result))
                    except Exception as exc:
                        self._fail(p.ts.product_id, exc, "write")
                return
        for p in group:
            try:
                self._finished(p.ts.product_id, self.finish(p, *self.train_one(p)))
            except Exception as exc:
                self._fail(p.ts.product_id, exc, "train")

    def _test_delay(self, pid: str) -> None:
        """Test-only (``test_delays``): hold ``pid``'s load for up to its seconds, ending
        early once nothing but ``pid`` is left (nothing to lease, no other lease out), so a
        test waits no longer than the other workers' share."""
        import ray

        deadline = time.monotonic() + self.test_delays.get(pid, 0.0)
        while time.monotonic() < deadline:
            queue = self.test_queue
            if (
                queue is not None
                and not ray.get(queue.has_work.remote())
                and ray.get(queue.result.remote())["unreported"] == [pid]
            ):
                return
            time.sleep(0.5)

    def prepare(self, pid: str) -> _Prepared:
        """Read a product's training set and choose its token(s)."""
        from ray_app.tokens import TokenError, choose_tokens

        cfg, opts = self.config, self.config.train
        started = time.perf_counter()
        self._test_delay(pid)
        ts = load_training_set(cfg, self.data_root, pid, self.bank, self.records)
        load_seconds = time.perf_counter() - started
        n_near = min(opts.associated_tokens, opts.token_sweep // 2)  # the rare list: the rest
        near = self.associated(ts, n_near) if n_near else []
        try:
            tokens, rejected = choose_tokens(
                pid,
                ts.texts(),
                opts.token_sweep,
                tokens=self.tokens,
                tokenizers=self.tokenizers,
                run_seed=cfg.seed,
                preferred=near,
                n_preferred=n_near,
            )
        except TokenError as exc:
            raise ProductError("token", str(exc)) from None
        seed = derive_seed(pid, "train", 0, cfg.seed)
        associated = frozenset(tokens) & frozenset(near)
        prior, prior_seconds = (), 0.0
        if opts.prior_preservation.num_class_images:
            prior, prior_seconds = self.class_images(ts.noun)
        return _Prepared(
            ts,
            tokens,
            rejected,
            seed,
            started,
            load_seconds,
            associated,
            prior=prior,
            prior_seconds=prior_seconds,
        )

    def associated(self, ts: TrainingSet, n: int) -> list[str]:
        """Sweep candidates with a plausible association to the product: tokens whose
        embedding in the generator's (first) text encoder is near its caption words'."""
        from ray_app.tokens import associated_tokens, caption_words

        if self._token_table is None:
            encoder = self.trainer.pipe.text_encoder
            self._token_table = encoder.get_input_embeddings().weight.detach().float().cpu()
        reals = [r["caption"] for r in ts.rows if r["kind"] == SampleKind.REAL]
        near = associated_tokens(
            self.tokenizers[0],
            self._token_table.numpy(),
            caption_words(reals, ts.noun),
            4 * n,  # choose_tokens may reject some: they collide with the product's texts
            avoid=set(self.tokens),
        )
        return [w for w, _ in near]

    def train_one(self, p: _Prepared) -> tuple[Any, list[TokenTrial], SweepCost | None, float]:
        """Train one product alone, sweeping its candidate tokens when there are several ->
        (result, sweep rows, sweep cost, sweep seconds); ``p.token`` becomes the winner.

        The sweep is successive halving (paper 2.4): every candidate starts a run of the
        full length on the training set without a held-out real photo (and what was made
        from it); after ``first_round`` steps each is scored by the fidelity of its images
        to the held-out photo, the better half go on to twice the steps, and so on until one
        is left. Only the winner is then trained the full steps, on the whole set."""
        opts, ts = self.config.train, p.ts
        if len(p.tokens) == 1:
            return self.trainer.train(self.samples(ts, p.token, p.prior), p.seed), [], None, 0.0
        start = time.perf_counter()
        kept, references, held_out = hold_out(ts)
        runs = {t: self.trainer.start(self.samples(kept, t, p.prior), p.seed) for t in p.tokens}
        alive, trials, images = list(p.tokens), [], 0
        rounds = halving_rounds(len(p.tokens), self.first_round(), opts.steps)
        for number, until in enumerate(rounds):
            scores = {}
            for token in alive:
                self.trainer.advance(runs[token], until)  # leaves its LoRA live: validate
                scores[token] = self.validate(ts, token, references)
                images += opts.sweep_images
                trials.append(
                    TokenTrial(
                        token=token,
                        score=scores[token],
                        final_loss=runs[token].recent_loss,
                        round=number,
                        steps=until,
                        source="associated" if token in p.associated else "rare",
                    )
                )
            order = sorted(alive, key=lambda t: (-_finite(scores[t]), p.tokens.index(t)))
            alive = order[: max(1, len(alive) // 2)]
        p.token = alive[0]
        sweep_seconds = time.perf_counter() - start
        result = self.trainer.train(self.samples(ts, p.token, p.prior), p.seed)
        steps = sum(r.done for r in runs.values())
        cost = SweepCost(
            steps=steps,
            step_fraction=round(steps / opts.steps, 4),
            validation_images=images,
            seconds_fraction=round(sweep_seconds / max(result.train_seconds, 1e-9), 4),
            held_out=held_out,
        )
        return result, trials, cost, sweep_seconds

    def first_round(self) -> int:
        """Steps of a sweep's first round."""
        opts = self.config.train
        return opts.sweep_steps or max(1, round(opts.steps * opts.sweep_fraction))

    def finish(
        self,
        p: _Prepared,
        result: Any,
        sweep: list[TokenTrial] | None = None,
        sweep_cost: SweepCost | None = None,
        sweep_seconds: float = 0.0,
    ) -> AdapterMeta:
        """Write a product's weights -> its adapter metadata (``_done`` writes it, last)."""
        cfg, opts, ts, pid, token = self.config, self.config.train, p.ts, p.ts.product_id, p.token
        start = time.perf_counter()
        weights = self.trainer.adapter_bytes(result.state_dict)
        storage.write_bytes(self.layout.weights(pid), weights)
        write_seconds = time.perf_counter() - start
        spec = cfg.generator
        prior = None
        if p.prior:
            prior = PriorPreservationRef(
                class_prompt=class_prompt(ts.noun),
                class_images=len(p.prior),
                weight=opts.prior_preservation.weight,
                seconds=round(p.prior_seconds, 3),
            )
        return AdapterMeta(
            product_id=pid,
            token=token,
            noun=ts.noun,
            product_type=ts.product_type,
            recipe=opts.recipe,
            weights_sha256=hashlib.sha256(weights).hexdigest(),
            rank=opts.rank,
            alpha=opts.alpha or opts.rank,
            alpha_folded=True,
            target_modules=list(opts.target_modules),
            steps=result.steps,
            batch_size=result.batch_size,
            products_per_step=result.extra.get("products_per_step", 1),
            resolution=opts.resolution,
            learning_rate=opts.learning_rate,
            negative_ratio=opts.negative_ratio,
            caption_mode=opts.caption_mode,
            positives=result.positives,
            negatives=result.negatives,
            seed=p.seed,
            base=BaseModelRef(
                role="generator",
                source=spec.source,
                revision=spec.revision,
                variant=spec.variant,
                resolved=getattr(getattr(self.trainer, "loaded", None), "resolved", None),
            ),
            training_set=TrainingSetRef(
                uri=self.data_root,
                manifest_shard=ts.shard_uri,
                digest=ts.digest(),
                samples=len(ts.rows),
            ),
            final_loss=result.final_loss,
            eval_loss_start=result.eval_loss_start,
            eval_loss_end=result.eval_loss_end,
            token_sweep=sweep or [],
            sweep_cost=sweep_cost,
            prior_preservation=prior,
            tokens_rejected=[RejectedToken(token=t, reason=r) for t, r in p.rejected],
            seconds=StageSeconds(
                load=round(p.load_seconds, 3),
                setup=round(result.setup_seconds, 3),
                train=round(result.train_seconds, 3),  # the group's over its size
                sweep=round(sweep_seconds, 3),
                write=round(write_seconds, 3),
                per_step=round(result.seconds_per_step, 5),
                total=round(time.perf_counter() - p.started, 3),
                base_load_of_worker=round(self.load_seconds, 3),
            ),
            restage_version=__version__,
            finished=time.time(),
        )

    def validate(self, ts: TrainingSet, token: str, references: list[dict[str, Any]]) -> float:
        """Validation fidelity of the LoRA now in the trainer: images of bank prompts with
        ``token``, their CLIP-I + DINO against the ``references`` (real photos held out of
        the sweep's runs), averaged over the images."""
        from actors.scorer import Scorer, ScoringOptions

        cfg, g, opts = self.config, self.config.generate, self.config.train
        if self._scorer is None:
            self._scorer = Scorer(
                cfg.model_spec("clip"),
                cfg.model_spec("dino"),
                ScoringOptions(g.weights, cfg.scoring.ranges),
            )
        n = opts.sweep_images
        prompts = self.bank.prompts(
            ts.product_type, n, derive_seed(ts.product_id, "sweep-prompts", 0, cfg.seed)
        )
        prompts = [fill(p, product_phrase(token, ts.noun)) for p in prompts]
        seeds = [derive_seed(ts.product_id, "sweep", i, cfg.seed) for i in range(n)]
        images = self.trainer.generate(
            prompts,
            seeds,
            g.width,
            g.height,
            opts.sweep_inference_steps,
            g.guidance_scale,
            g.negative_prompt,
        )
        scores = self._scorer.score(
            images,
            prompts,
            [ts.images[r["sample_id"]] for r in references],
            [None] * len(references),
        )
        fidelity = scores[Metric.CLIP_I] + scores[Metric.DINO]
        return float(np.nanmean(fidelity)) if np.isfinite(fidelity).any() else math.nan


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def halving_rounds(candidates: int, first: int, steps: int) -> list[int]:
    """The step each round of a successive-halving sweep trains its candidates to: the first
    round ``first`` steps, each next one twice as far (at most ``steps``), until one
    candidate is left (the better half, rounded down, goes on)."""
    rounds, until = [], first
    while candidates > 1:
        rounds.append(min(until, steps))
        candidates //= 2
        until *= 2
    return rounds


def hold_out(ts: TrainingSet) -> tuple[TrainingSet, list[dict[str, Any]], list[str]]:
    """A sweep's training set and references -> (the set without one real photo and every
    sample made from it, [that photo's row], [its sample id]). The sweep's runs never see
    the photo they are scored against. With fewer than two real photos nothing can be held
    out: the whole set and its real photos, and no id."""
    reals = [r for r in ts.rows if r["kind"] == SampleKind.REAL]
    if len(reals) < 2:
        return ts, reals or ts.positives, []
    held = reals[-1]["sample_id"]
    source = {r["sample_id"]: r["source_sample"] for r in ts.rows}

    def from_held(sid: str | None) -> bool:
        seen = set()
        while sid and sid not in seen:
            if sid == held:
                return True
            seen.add(sid)
            sid = source.get(sid)
        return False

    rows = [r for r in ts.rows if not from_held(r["sample_id"])]
    kept = dataclasses.replace(ts, rows=rows)
    return kept, [reals[-1]], [held]


def _leases(queue: Any, rank: int) -> Iterator[str]:
    """The products this worker leases from the queue, one per request, as it gets to them."""
    import ray

    key = uuid.uuid4().hex  # this incarnation: a restarted worker gets a new one
    while (pid := ray.get(queue.next.remote(key, rank))) is not None:
        yield pid


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point of every worker: lease products from the queue until it is
    empty; the base model is loaded once, when the first product arrives."""
    import ray
    import ray.train

    from ray_app.models import apply_environment

    config = RestageConfig.model_validate(loop_config["config"])
    apply_environment(config.offline)
    queue, rank = loop_config["queue"], ray.train.get_context().get_world_rank()
    leases = _leases(queue, rank)
    first = next(leases, None)
    if first is None:
        return  # nothing left for this worker: no model load
    trainer = ShardTrainer(config, loop_config["data"], loop_config["out"], loop_config["manifest"])
    # Test-only ({product_id: seconds}, passed by tests through ``train(test_delays=...)``,
    # never a config field): the product's load waits that long, so one product is slow.
    trainer.test_delays = loop_config.get("test_delays") or {}
    trainer.test_queue = queue if trainer.test_delays else None

    def report(row: dict[str, Any]) -> None:  # ends the lease: before the next request
        ray.get(queue.report.remote(rank, row))

    trainer.run(itertools.chain([first], leases), report)


# --------------------------------------------------------------------------- job


# Products the queue reads ahead before training starts: a run of at most this many prints
# its total at once (a longer one, `at least N` until the queue has read its whole list).
LOOKAHEAD = 1024


def ray_train_storage(root: str) -> str:
    """Where Ray Train keeps its own run state: under the job's output root when Ray can
    write there (local or s3/gs), else a temporary folder (never the user's home)."""
    if storage.protocol(root) in ("file", "s3", "gs", "gcs"):
        return storage.join(root, "_ray_train")
    return storage.join(tempfile.gettempdir(), "restage-ray-train")


def train(
    config: RestageConfig,
    data: str,
    out: str,
    manifest: str | None = None,
    *,
    test_delays: dict[str, float] | None = None,
) -> JobSummary:
    """Run the train job: augment output ``data`` -> one adapter per product under ``out``.
    ``test_delays`` ({product_id: seconds} that the product's load waits) is for tests only."""
    import ray

    from pipelines.train_queue import ProductQueue
    from ray_app.plan import preflight
    from ray_app.runtime import init_ray, progress_bars

    start, started = time.perf_counter(), time.monotonic()
    data_root, root = storage.normalize_uri(data), storage.normalize_uri(out)
    layout = AdapterLayout(root)
    workers, queue = 0, None
    lines: StageLines | None = None
    progress = ProgressFile(root, JOB)
    try:
        # The live file first: it refuses while another run is live on this output (before
        # Ray starts, and before the queue's input index drops that run's).
        with progress:
            config, _ = preflight(config, JOB)  # a job that cannot run ends now
            init_ray(config)
            require_manifest(data_root)
            queue = ray.remote(num_cpus=0)(ProductQueue).remote(
                WorkSource(data_root, root), _job.InputIndex(layout)
            )
            progress.poll = lambda: ray.get(queue.progress.remote())
            # No more workers than groups of products to do: each one loads the base model
            # (and on an autoscaling cluster, may start a node).
            group = config.train.products_per_step
            most = config.train.num_workers
            assert most is not None, "preflight's plan sets train.num_workers"
            # Read ahead up to LOOKAHEAD products (ids only): a run of that many knows its
            # total before the first lease.
            ready = ray.get(queue.ready.remote(max(most * group, LOOKAHEAD)))
            workers = -(-min(ready, most * group) // group)
            if ready:
                # The "to do" line now, not when the run ends: the total once the queue has
                # read the whole stream, else the products found so far.
                total = ray.get(queue.progress.remote())[2]  # None while still listing
                lines = StageLines(JOB, total, enabled=not progress_bars(config), at_least=ready)
                lines.start = started  # elapsed since the job began
                progress.poll = lambda: lines_poll(queue, lines)
            progress.phase("products")
            if workers:
                with node_loss_guard(JOB, config):
                    _fit(config, data_root, root, queue, workers, manifest, test_delays or {})
        res = ray.get(queue.result.remote())
    finally:
        if queue is not None:
            ray.kill(queue)
    write_errors(
        layout,
        "_records",
        [ErrorRow(JOB, "load", why, item=name) for name, why in res["invalid_rows"]],
    )
    failed = res["failed"] + len(res["unreported"])
    summary = JobSummary(JOB, root)
    summary.products = {
        "in training set": res["listed"],
        "invalid": res["invalid"],
        ALREADY: res["complete"],
        "ok": res["ok"],
        "failed": failed,
    }
    for name in STAGES:
        stage = summary.stage(name, "steps" if name in ("train", "sweep") else "products")
        stage.items_in = stage.items_out = res["stages"][name]["items"]
        stage.seconds = res["stages"][name]["seconds"]
    summary.stage("train").errors = failed
    if lines is not None:
        lines.total = lines.done = res["ok"] + failed  # products finished in this run
        lines.finish(counts({"ok": res["ok"], "failed": failed}))
    summary.wall_seconds = time.perf_counter() - start
    summary.extra = {
        "data": data_root,
        "errors": layout.errors_dir(),
        "workers": workers,
        # what each worker did: how evenly the queue spread the products
        "per_worker": res["workers"],
    }
    storage.write_json(layout.summary(), summary.to_dict())
    return summary


def lines_poll(queue: Any, lines: StageLines) -> tuple[int, dict[str, int], int | None]:
    """The live file's poll (``queue.progress``), printing the job's line on the way: a
    driver blocked in Ray Train prints its progress from the live file's beat."""
    import ray

    done, products, total = ray.get(queue.progress.remote())
    if total is not None:
        lines.total = total
    lines.update(done, counts(products))
    return done, products, total


def _fit(
    config: RestageConfig,
    data_root: str,
    root: str,
    queue: Any,
    workers: int,
    manifest: str | None,
    test_delays: dict[str, float],
) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    # No backend: the workers train independent products and never talk to each other, so
    # the torch process group TorchTrainer sets up is pure start-up cost.
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    opts = config.train
    if config.generator.source.strip() == "tiny":
        # Build the tiny checkpoint here, once, not in N workers racing to write one folder.
        from ray_app import tiny

        tiny.ensure("generator", config.cache_path)
    resources: dict[str, float] = {"CPU": opts.cpus_per_worker, **opts.resources}
    if opts.gpus_per_worker > 0:
        resources["GPU"] = opts.gpus_per_worker
    name = f"restage-train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    loop_config = {
        "config": config.model_dump(mode="json"),
        "data": data_root,
        "out": root,
        "manifest": storage.normalize_uri(manifest) if manifest else None,
        "queue": queue,
    }
    if test_delays:
        loop_config["test_delays"] = test_delays
    trainer = DataParallelTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=opts.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=ray_train_storage(root),
            failure_config=FailureConfig(max_failures=opts.max_failures),
        ),
    )
    trainer.fit()
    # Ray Train's run state is only useful to debug a failed run; the adapters are the output.
    state = ray_train_storage(root)
    storage.remove(storage.join(state, name), recursive=True)
    if not storage.has_protocol(state):  # object stores have no empty folders
        with contextlib.suppress(OSError):  # not empty: another run's state is still there
            os.rmdir(state)


@dataclass(frozen=True)
class TrainArgs:
    """``restage train``'s arguments (the CLI builds them from its flags)."""

    data: str
    out: str
    manifest: str | None = None


def main(config: RestageConfig, args: TrainArgs) -> JobSummary:
    """CLI entry: ``restage train --data URI --out URI [--manifest URI]``."""
    return train(config, args.data, args.out, args.manifest)
