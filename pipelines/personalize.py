"""`restage personalize`: one per-product image encoder per product of an augment output
(personalized representations, arXiv 2412.16156; the trainer is actors/encoder_trainer.py).

Ray Data streams one row per product of ``--data`` (augment's manifest shards, listed in
tasks as `restage train` lists them):

    intake (markers, input index) -> plan (task) -> train (encoder pool) -> write (task)

The encoder pool's actors load the base encoder once each and take products one at a time
(one product per block: a fast actor takes more). A product's training data:

- **positives**: its kept positive samples (real photos, novel views, new contexts);
- **negatives**: its kept in-class negatives ("a photo of a {class}", counterfactuals), and
  the real photos of ``personalize.negative_products`` other products of the run (hard
  negatives: other instances, which the in-class images alone do not show). The driver
  reads those few products' photo URIs once (a limit over the listing, in tasks); every
  product of the run except themselves sees the same ones.

Rows carry URIs, never image bytes: the actor reads its product's images and drops them
once trained. A product's folder (``OUT/<id>/``: the peft LoRA and ``encoder.json``) is
written by the actor, then the write task writes its manifest row, errors and its marker
last (pipelines/_job.py); a re-run skips marked products and redoes a killed one from
scratch (its partial folder is removed first).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.encoder_trainer import EncoderLayout, EncoderTrainer
from pipelines import _job
from pipelines._job import outcome_batch, write_product
from pipelines._product_rows import ProductRow, ProductStage, pack, unpack
from pipelines.train import product_ids
from ray_app import storage
from ray_app.config import RestageConfig
from ray_app.images import decode_rgb, downscale
from ray_app.kinds import NEGATIVE_KINDS, POSITIVE_KINDS, SampleKind
from ray_app.records import INVALID, SAMPLE_SCHEMA, VALID
from ray_app.report import JobSummary
from ray_app.seeds import derive_seed
from ray_app.storage import AugmentLayout

JOB = "personalize"
STAGES = ("plan", "load", "train", "write")
IO_THREADS = 8

# One row per product in OUT/_manifest: where its encoder is and how it was trained.
ENCODER_SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("encoder_uri", pa.string()),
        ("positives", pa.int64()),
        ("negatives", pa.int64()),  # in-class negatives and counterfactuals
        ("hard_negatives", pa.int64()),
        ("steps", pa.int64()),
        ("loss_first", pa.float64()),
        ("loss_last", pa.float64()),
        ("train_seconds", pa.float64()),
        ("data_digest", pa.string()),
    ]
)


@dataclass
class PersonalProduct(ProductRow):
    """A product on its way to an encoder; pickled into its Ray Data row (URIs only)."""

    job: ClassVar[str] = JOB
    product_id: str
    data_root: str
    root: str
    bank: list[tuple[str, str]]  # (product id, image URI): the run's hard negatives
    row: dict[str, Any] = field(default_factory=dict)  # its manifest row, once trained

    def remove_files(self) -> None:
        storage.remove(EncoderLayout(self.root).encoder_dir(self.product_id), recursive=True)


# --------------------------------------------------------------------------- inputs


def _status(batch: pa.Table) -> pa.Table:
    """Listing rows -> intake rows: ``status`` VALID, or INVALID for a shard whose name is
    not a product id."""
    status = pc.if_else(pc.is_null(batch["error"]), VALID, INVALID)
    return batch.append_column("status", status)


def input_rows(data_root: str, cpus: float) -> Any:
    return product_ids(data_root).map_batches(_status, batch_format="pyarrow", num_cpus=cpus)


def _real_photos(batch: pa.Table, data_root: str) -> pa.Table:
    """A task: the real photos (product id, image URI) of a block of products."""
    layout, ids, uris = AugmentLayout(data_root), [], []
    for pid, error in zip(batch["product_id"].to_pylist(), batch["error"].to_pylist(), strict=True):
        if error is not None:
            continue
        try:
            table = storage.read_parquet(layout.manifest_shard(pid), SAMPLE_SCHEMA)
        except Exception:  # the product's own training reports it; the bank goes without it
            continue
        table = table.filter(pc.equal(table["kind"], SampleKind.REAL.value))
        for uri in table["image_uri"].to_pylist():
            ids.append(pid)
            uris.append(uri)
    return pa.table({"product_id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string())})


def negatives_bank(data_root: str, products: int, cpus: float) -> list[tuple[str, str]]:
    """The real photos of the first ``products`` valid products of the listing (a limit:
    the listing streams no further than it needs)."""
    ds = product_ids(data_root).limit(products)  # an invalid shard name is skipped below
    rows = ds.map_batches(
        _real_photos, fn_kwargs={"data_root": data_root}, batch_format="pyarrow", num_cpus=cpus
    ).take_all()
    return sorted((r["product_id"], r["uri"]) for r in rows)


def plan_products(
    batch: dict[str, np.ndarray], data_root: str, root: str, bank: list[tuple[str, str]]
) -> dict[str, np.ndarray]:
    """Rows to do -> product states (a killed run's partial folder removed first)."""
    states = []
    for pid in batch["product_id"]:
        start = time.perf_counter()
        state = PersonalProduct(str(pid), data_root, root, bank)
        state.remove_files()
        state.stat("plan").seconds = time.perf_counter() - start
        states.append(state)
    return pack(states)


# --------------------------------------------------------------------------- training


class TrainEncoders(ProductStage):
    """The encoder pool: one ``EncoderTrainer`` per actor, a product per call."""

    name = "train"

    def __init__(self, config: RestageConfig):
        super().__init__(config)
        self.trainer = EncoderTrainer(config.model_spec("encoder"), config.personalize)
        self.side = max(128, 2 * self.trainer.resolution)  # enough for its random crops
        self._bank: dict[str, np.ndarray | str] = {}  # decoded once per actor

    def _decode(self, blob: bytes) -> np.ndarray:
        return downscale(decode_rgb(blob), self.side)

    def _read(self, uris: list[str]) -> list[np.ndarray | str]:
        """Each image decoded, or why it could not be (the caller records it)."""

        def one(uri: str) -> np.ndarray | str:
            try:
                return self._decode(storage.read_bytes(uri))
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(IO_THREADS) as pool:
            return list(pool.map(one, uris))

    def _hard_negatives(self, state: PersonalProduct) -> list[np.ndarray]:
        missing = [uri for _, uri in state.bank if uri not in self._bank]
        for uri, img in zip(missing, self._read(missing), strict=True):
            self._bank[uri] = img  # an unreadable bank photo is left out for every product
        return [
            img
            for pid, uri in state.bank
            if pid != state.product_id and not isinstance(img := self._bank[uri], str)
        ]

    def process(self, state: PersonalProduct) -> None:
        start = time.perf_counter()
        cfg = self.config.personalize
        table = storage.read_parquet(
            AugmentLayout(state.data_root).manifest_shard(state.product_id), SAMPLE_SCHEMA
        )
        table = table.filter(
            pc.and_(pc.equal(table["product_id"], state.product_id), table["kept"])
        )
        rows = sorted(table.to_pylist(), key=lambda r: r["sample_id"])
        pos_rows = [r for r in rows if r["kind"] in POSITIVE_KINDS]
        neg_rows = [r for r in rows if r["kind"] in NEGATIVE_KINDS]
        images = self._read([r["image_uri"] for r in pos_rows + neg_rows])
        for r, img in zip(pos_rows + neg_rows, images, strict=True):
            if isinstance(img, str):
                state.error("load", f"unreadable image: {img}", item=r["image_uri"])
        positives = [img for img in images[: len(pos_rows)] if not isinstance(img, str)]
        negatives = [img for img in images[len(pos_rows) :] if not isinstance(img, str)]
        hard = self._hard_negatives(state)
        load = state.stat("load")
        load.items_in, load.items_out = len(rows), len(positives) + len(negatives)
        load.errors = len(rows) - load.items_out
        load.seconds += time.perf_counter() - start
        if len(positives) < cfg.min_positives:
            raise ValueError(
                f"{len(positives)} readable kept positive samples, below "
                f"personalize.min_positives={cfg.min_positives}"
            )
        if not negatives + hard:
            raise ValueError(
                "no negatives: the product has no kept in-class negatives and the run no other "
                "product (augment with negatives, or personalize several products together)"
            )
        seed = derive_seed(state.product_id, JOB, run_seed=self.config.seed)
        result = self.trainer.train(positives, negatives + hard, seed)
        folder = EncoderLayout(state.root).encoder_dir(state.product_id)
        meta = self.trainer.meta(state.product_id, result)
        self.trainer.save(folder, meta)
        train = state.stat("train")
        train.items_in = train.items_out = result.positives + result.negatives
        state.row = {
            "product_id": state.product_id,
            "encoder_uri": folder,
            "positives": result.positives,
            # what the product had: personalize.negatives caps the two together
            "negatives": len(negatives),
            "hard_negatives": len(hard),
            "steps": result.steps,
            "loss_first": meta.loss_first,
            "loss_last": meta.loss_last,
            "train_seconds": meta.seconds,
            "data_digest": meta.data_digest,
        }
        # ProductStage times the whole call as "train": take the loading out of it
        train.seconds -= load.seconds


def model_stages(config: RestageConfig) -> list[tuple[type[ProductStage], tuple[str, ...]]]:
    return [(TrainEncoders, ("encoder",))]


# --------------------------------------------------------------------------- writing


def write_encoders(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """Each product's manifest row and errors, then its marker (pipelines/_job.py)."""
    layout = EncoderLayout(root)
    states = unpack(batch)
    for state in states:
        if state.failed:
            state.remove_files()

    def files(state: PersonalProduct):
        return lambda: [state.row]

    def marker(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"encoder": rows[0]["encoder_uri"], "steps": rows[0]["steps"]} if rows else {}

    return outcome_batch(
        [write_product(layout, s, ENCODER_SCHEMA, files(s), marker) for s in states]
    )


def build_dataset(todo: Any, config: RestageConfig, data_root: str, root: str, bank, staged):
    cpu = config.personalize.cpus_per_task

    def planned(chosen: Any) -> Any:
        return chosen.map_batches(
            plan_products,
            fn_kwargs={"data_root": data_root, "root": root, "bank": bank},
            batch_size=1,
            num_cpus=cpu,
        )

    ds = _job.through_stages(todo, planned, model_stages(config), config, root, staged, 1, cpu)
    return ds.map_batches(write_encoders, fn_kwargs={"root": root}, batch_size=1, num_cpus=cpu)


# --------------------------------------------------------------------------- the job


def personalize(config: RestageConfig, data: str, out: str) -> JobSummary:
    """Run the personalize job: ``data`` (an augment output) -> encoders under ``out``."""
    start = time.perf_counter()
    data_root, root = storage.normalize_uri(data), storage.normalize_uri(out)
    if not storage.exists(AugmentLayout(data_root).manifest_dir()):
        raise FileNotFoundError(
            f"--data {data}: no manifest/ folder; give the output root of `restage augment`"
        )
    layout = EncoderLayout(root)
    cpus = config.personalize.cpus_per_task
    bank: list[tuple[str, str]] = []

    def rows() -> Any:
        bank.extend(negatives_bank(data_root, config.personalize.negative_products, cpus))
        return input_rows(data_root, cpus)

    done = _job.execute(
        JOB,
        config,
        layout,
        rows,
        lambda todo, cfg, staged: build_dataset(todo, cfg, data_root, root, bank, staged),
        whole_job=True,
    )
    return _job.finish_whole_job(
        JOB,
        layout,
        done,
        STAGES,
        start,
        lambda: {
            "data": data_root,
            "encoders": root,
            "encoder": config.encoder.source,
            "hard_negative_products": len({pid for pid, _ in bank}),
        },
    )


@dataclass(frozen=True)
class PersonalizeArgs:
    """``restage personalize``'s arguments."""

    data: str
    out: str


def main(config: RestageConfig, args: PersonalizeArgs) -> JobSummary:
    """CLI entry: ``restage personalize --data URI --out URI``."""
    return personalize(config, args.data, args.out)
