"""`restage personalize`: one per-product image encoder per product of an augment output
(personalized representations, arXiv 2412.16156; the trainer is actors/encoder_trainer.py).

Ray Data streams one row per product of ``--data`` (augment's manifest shards, listed in
tasks as `restage train` lists them):

    intake (markers, input index) -> plan (task) -> train (encoder pool) -> write (task)

The encoder pool's actors load the base encoder once each and take products one at a time
(one product per block: a fast actor takes more). A product's training data:

- **positives**: its kept positive samples (real photos, novel views, new contexts), and
  ``personalize.cut_paste.count`` cut-and-paste composites made here (ray_app/cutpaste.py):
  each real photo's product, cut out with its augment mask, pasted at a random scale in
  ``cut_paste.scale`` and a random place on a scene, seeded per product and composite
  (``derive_seed``). The scenes are a folder of real scene images
  (``cut_paste.backgrounds``, listed once on the driver: its size is the caller's to
  bound) or, when none is given, scenes of *other* products of the bank below: their
  counterfactuals (real photos with that product inpainted away) and the in-class
  negatives of products of another category (one of its own category would put a
  look-alike beside the pasted product). The product's own scenes are never used: its
  counterfactuals are its own photos' backgrounds, which the real photos already show.
  Scenes generated from the prompt bank by the base model would be better still, but need
  the ``generator`` role in this job. The composites are made in memory, trained on and
  dropped; ``cut_paste.keep_images`` also writes them and their paste masks under
  ``OUT/<id>/data/cut_paste/`` (``EncoderLayout``).
- **generated positives** (only with ``--adapters TRAIN_OUT``): images of the product made
  by its own adapter, as ``restage generate`` makes them (prompt-bank prompts, one image
  each). Before any encoder is trained, the driver runs the generate job (pipelines/
  generate.py) once per value of ``personalize.generated.guidance_scales`` (the paper's
  CFG 4, 5 and 7.5), each into ``OUT/_generated/cfg-<value>/`` (``EncoderLayout.
  generated_dir``), with ``generated.images_per_product`` split over the values, every
  image written and segmented (``generation_config``). That job has its own markers,
  errors and resume, so a re-run of a killed personalize resumes its generations too; its
  images are reused as written (a changed ``images_per_product`` does not regenerate a
  product generate has completed). The train actor reads the product's generation
  manifest shards and keeps the images whose ``seg_dino`` (DINO similarity of the product
  crop to the product's masked real photos, computed by generate) is at least
  ``generated.min_seg_dino`` (``filter_generated``). The paper filters with DreamSim
  (>= 0.6); restage has no DreamSim role and uses seg_dino instead. Each image left out
  is a row of ``OUT/_dropped/<id>.parquet`` (``DROPPED_SCHEMA``: its URI, seg_dino and
  the reason, e.g. "seg_dino=0.412 < 0.6" or "no product mask"); the manifest row counts
  kept (``generated``) and dropped (``generated_dropped``) ones. A product without an
  adapter under ``--adapters`` gets an error row (stage ``generated``) and trains
  without them; so does one whose generation failed at a guidance value. Generate runs
  over every adapter of ``--adapters``, also those of products ``--data`` lacks.
- **negatives**: its kept in-class negatives ("a photo of a {class}", counterfactuals), and
  hard negatives: the real photos of up to ``personalize.negative_products`` other
  products, those of its own category first, then of other categories (taken in turn) to
  fill up. A product's category is augment's ``product_type`` (its manifest rows and
  ``products/<id>.json`` carry it): a type of the prompt bank resolved from the record's
  free-text ``category``, title and captions, so it groups products that the raw category
  would spell differently, and there are only as many as the bank has types.

**The bank** (``Bank``) holds, per category, the first ``negative_products`` products of
the listing (their real-photo and scene URIs, never pixels). Ray Data tasks read the
manifest shards and pass on at most ``negative_products`` products per category of their
block; the driver keeps the first ones per category as the blocks stream by (listing
order), so it holds at most ``negative_products`` x the number of types, never the catalog.
The plan task reads each product's category and picks its hard negatives and backgrounds
from the bank: rows carry those URIs only.

Rows carry URIs, never image bytes: the actor reads its product's images and drops them
once trained (bank photos shared by products stay in a bounded per-actor cache). A
product's folder (``OUT/<id>/``: the peft LoRA and ``encoder.json``) is written by the
actor, then the write task writes its manifest row, errors and its marker last
(pipelines/_job.py); a re-run skips marked products and redoes a killed one from scratch
(its partial folder is removed first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import _job
from pipelines._job import outcome_batch, write_product
from pipelines._product_rows import ProductRow, ProductStage, pack, unpack
from pipelines.train import product_ids
from ray_app import storage
from ray_app.config import CutPasteConfig, GenerateConfig, RestageConfig
from ray_app.cutpaste import CutPaste, cut_paste
from ray_app.images import decode_mask, decode_rgb, downscale, encode_png
from ray_app.kinds import NEGATIVE_KINDS, POSITIVE_KINDS, Metric, SampleKind
from ray_app.ranking import ranking_class
from ray_app.records import GENERATION_SCHEMA, INVALID, SAMPLE_SCHEMA, VALID
from ray_app.report import JobSummary
from ray_app.seeds import derive_seed
from ray_app.storage import AdapterLayout, AugmentLayout, EncoderLayout, GenerationLayout

JOB = "personalize"
GENERATED = "generated"  # the stage of generated positives (stats, error rows)
STAGES = ("plan", "load", GENERATED, "cut_paste", "train", "write")
IO_THREADS = 8
BANK_CACHE = 512  # decoded bank photos an actor keeps (least recently used dropped)
BACKGROUND_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# derive_seed stages: which backgrounds a product gets, and each composite's scale and place.
BACKGROUND_SEED, CUT_PASTE_SEED = "personalize.backgrounds", "personalize.cut_paste"

# One row per product in OUT/_manifest: where its encoder is and how it was trained.
ENCODER_SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("encoder_uri", pa.string()),
        ("positives", pa.int64()),
        ("negatives", pa.int64()),  # in-class negatives and counterfactuals
        ("hard_negatives", pa.int64()),
        ("cut_paste", pa.int64()),  # cut-and-paste composites among the positives it had
        ("generated", pa.int64()),  # generated positives kept among them (--adapters)
        ("generated_dropped", pa.int64()),  # generated images left out (OUT/_dropped/)
        ("steps", pa.int64()),
        ("loss_first", pa.float64()),
        ("loss_last", pa.float64()),
        ("train_seconds", pa.float64()),
        ("data_digest", pa.string()),
    ]
)

# One row per generated image left out, in OUT/_dropped/<id>.parquet.
DROPPED_SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("guidance_scale", pa.float64()),
        ("image_id", pa.string()),
        ("image_uri", pa.string()),  # null when generate wrote no image
        (str(Metric.SEG_DINO), pa.float64()),
        ("reason", pa.string()),
    ]
)


@dataclass
class PersonalProduct(ProductRow):
    """A product on its way to an encoder; pickled into its Ray Data row (URIs only)."""

    job: ClassVar[str] = JOB
    product_id: str
    data_root: str
    root: str
    category: str | None = None  # augment's product_type
    hard: list[tuple[str, str]] = field(default_factory=list)  # (product id, real photo URI)
    backgrounds: list[str] = field(default_factory=list)  # one scene URI per composite
    adapters: str | None = None  # --adapters: the product has generated positives
    dropped: list[dict[str, Any]] = field(default_factory=list)  # DROPPED_SCHEMA rows
    row: dict[str, Any] = field(default_factory=dict)  # its manifest row, once trained

    def remove_files(self) -> None:
        layout = EncoderLayout(self.root)
        storage.remove(layout.encoder_dir(self.product_id), recursive=True)
        storage.remove(layout.dropped_shard(self.product_id))


# --------------------------------------------------------------------------- inputs


def _status(batch: pa.Table) -> pa.Table:
    """Listing rows -> intake rows: ``status`` VALID, or INVALID for a shard whose name is
    not a product id."""
    status = pc.if_else(pc.is_null(batch["error"]), VALID, INVALID)
    return batch.append_column("status", status)


def input_rows(data_root: str, cpus: float) -> Any:
    return product_ids(data_root).map_batches(_status, batch_format="pyarrow", num_cpus=cpus)


def category_of(table: pa.Table) -> str | None:
    """A product's category: the first ``product_type`` of its manifest rows (augment
    writes the same on each), None when augment resolved none."""
    types = [t for t in table["product_type"].to_pylist() if t]
    return types[0] if types else None


BANK_ROW = pa.schema(
    [
        ("product_id", pa.string()),
        ("category", pa.string()),
        ("kind", pa.string()),
        ("uri", pa.string()),
    ]
)


def _bank_rows(batch: pa.Table, data_root: str, per_category: int) -> pa.Table:
    """A task: the real photos and kept scenes (negative kinds) of the first
    ``per_category`` products of each category in a block of the listing."""
    layout, rows, taken = AugmentLayout(data_root), [], {}
    for pid, error in zip(batch["product_id"].to_pylist(), batch["error"].to_pylist(), strict=True):
        if error is not None:
            continue
        try:
            table = storage.read_parquet(layout.manifest_shard(pid), SAMPLE_SCHEMA)
        except Exception:  # the product's own training reports it; the bank goes without it
            continue
        category = category_of(table)
        if taken.get(category, 0) >= per_category:
            continue
        taken[category] = taken.get(category, 0) + 1
        for r in table.select(["kind", "image_uri", "kept"]).to_pylist():
            if r["kind"] == SampleKind.REAL or (r["kind"] in NEGATIVE_KINDS and r["kept"]):
                rows.append((pid, category, r["kind"], r["image_uri"]))
    return pa.Table.from_pylist(
        [dict(zip(BANK_ROW.names, r, strict=True)) for r in rows], schema=BANK_ROW
    )


def _sort_key(category: str | None) -> tuple[bool, str]:
    return category is None, category or ""


@dataclass
class Bank:
    """Hard negatives and scenes of at most ``per_category`` products per category, the
    listing's first (module doc): URIs only."""

    per_category: int
    members: dict[str | None, list[str]] = field(default_factory=dict)  # category -> ids
    category: dict[str, str | None] = field(default_factory=dict)  # id -> category
    reals: dict[str, list[str]] = field(default_factory=dict)  # id -> real photo URIs
    scenes: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # id -> (kind, URI)

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Take rows (``BANK_ROW``) in listing order; a product past its category's
        ``per_category`` first ones is left out."""
        for r in rows:
            pid, cat = r["product_id"], r["category"]
            if pid not in self.category:
                group = self.members.setdefault(cat, [])
                if len(group) >= self.per_category:
                    continue
                group.append(pid)
                self.category[pid] = cat
            if r["kind"] == SampleKind.REAL:
                self.reals.setdefault(pid, []).append(r["uri"])
            else:
                self.scenes.setdefault(pid, []).append((r["kind"], r["uri"]))

    def negative_products(self, product_id: str, category: str | None, n: int) -> list[str]:
        """Up to ``n`` other products: of ``category`` first (none when it is None), then of
        the other categories in turn (one of each, then a second of each...)."""
        same = [p for p in self.members.get(category, []) if category is not None]
        others = [  # untyped products are nobody's same category: all are others to them
            self.members[c]
            for c in sorted(self.members, key=_sort_key)
            if category is None or c != category
        ]
        turns = [p for group in zip_longest(*others) for p in group if p is not None]
        return [p for p in same + turns if p != product_id][:n]

    def hard_negatives(
        self, product_id: str, category: str | None, n: int
    ) -> list[tuple[str, str]]:
        """The real photos (product id, URI) of ``negative_products``."""
        chosen = self.negative_products(product_id, category, n)
        return [(p, uri) for p in chosen for uri in self.reals.get(p, [])]

    def scenes_for(self, product_id: str, category: str | None) -> list[str]:
        """Scenes without the product: other products' counterfactuals, and the in-class
        negatives of products of a known category other than ``category``."""
        return [
            uri
            for pid, cat in self.category.items()
            if pid != product_id
            for kind, uri in self.scenes.get(pid, [])
            if kind == SampleKind.COUNTERFACTUAL or (cat is not None and cat != category)
        ]


def collect_bank(data_root: str, per_category: int, cpus: float) -> Bank:
    """The bank (module doc), read in Ray Data tasks and kept bounded as the blocks stream
    to the driver in listing order."""
    bank = Bank(per_category)
    if per_category == 0:
        return bank
    rows = product_ids(data_root).map_batches(
        _bank_rows,
        fn_kwargs={"data_root": data_root, "per_category": per_category},
        batch_format="pyarrow",
        num_cpus=cpus,
    )
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        bank.add(batch.to_pylist())
    return bank


def list_backgrounds(folder: str) -> list[str]:
    """The scene images directly under ``folder`` (personalize.cut_paste.backgrounds)."""
    names = [n for n in storage.list_names(folder) if n.lower().endswith(BACKGROUND_SUFFIXES)]
    if not names:
        raise FileNotFoundError(
            f"personalize.cut_paste.backgrounds={folder!r}: no {'/'.join(BACKGROUND_SUFFIXES)} "
            "images directly under it; give a folder of scene images, or null to use the "
            "scenes of other products of the run"
        )
    return [storage.join(folder, n) for n in names]


def choose_backgrounds(pool: list[str], count: int, seed: int) -> list[str]:
    """``count`` scenes of ``pool`` drawn with ``seed`` (each once while the pool lasts)."""
    if not pool or not count:
        return []
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), count, replace=len(pool) < count)]


def plan_products(
    batch: dict[str, np.ndarray],
    data_root: str,
    root: str,
    bank: Bank,
    negative_products: int,
    backgrounds: list[str] | None,
    count: int,
    run_seed: int,
    adapters: str | None = None,
) -> dict[str, np.ndarray]:
    """Rows to do -> product states with their hard negatives and backgrounds (a killed
    run's partial folder removed first)."""
    states = []
    for pid in batch["product_id"]:
        start, pid = time.perf_counter(), str(pid)
        state = PersonalProduct(pid, data_root, root, adapters=adapters)
        state.remove_files()
        try:
            shard = AugmentLayout(data_root).manifest_shard(pid)
            state.category = category_of(storage.read_parquet(shard, SAMPLE_SCHEMA))
        except Exception:  # unreadable: training reads it again and fails with the reason
            pass
        state.hard = bank.hard_negatives(pid, state.category, negative_products)
        pool = backgrounds if backgrounds is not None else bank.scenes_for(pid, state.category)
        seed = derive_seed(pid, BACKGROUND_SEED, run_seed=run_seed)
        state.backgrounds = choose_backgrounds(pool, count, seed)
        state.stat("plan").seconds = time.perf_counter() - start
        states.append(state)
    return pack(states)


# --------------------------------------------------------------------------- synthesis


def synthesize(
    products: list[tuple[np.ndarray, np.ndarray]],
    backgrounds: list[np.ndarray],
    seeds: list[int],
    config: CutPasteConfig,
) -> list[CutPaste]:
    """One composite per background: ``products`` ((rgb, mask) of the real photos) take
    turns, each pasted with its seed (``cut_paste``). Needs a product for each turn."""
    if len(seeds) != len(backgrounds):
        raise ValueError(f"{len(seeds)} seeds for {len(backgrounds)} backgrounds: give one each")
    if backgrounds and not products:
        raise ValueError("no product to paste: give at least one (rgb, mask) real photo")
    return [
        cut_paste(*products[k % len(products)], bg, seed, config)
        for k, (bg, seed) in enumerate(zip(backgrounds, seeds, strict=True))
    ]


# --------------------------------------------------------------------------- generated positives


def generation_config(config: RestageConfig, guidance_scale: float, images: int) -> RestageConfig:
    """The config of the generate job that makes ``images`` positives per product at
    ``guidance_scale``: prompt-bank prompts only, one image each, every image written and
    segmented (seg_dino), none dropped by the ranking (top_n all, the ranking's lowest
    threshold): the filter is personalize's own."""
    g = config.generate.model_dump()
    g.update(
        guidance_scale=guidance_scale,
        prompts_per_product=images,
        images_per_prompt=1,
        user_prompts=None,
        top_n=images,
        threshold=ranking_class(config.generate.ranking).bounds[0],
        write_all_images=True,
        segment=True,
    )
    return config.model_copy(update={"generate": GenerateConfig.model_validate(g)})


def drop_reason(row: dict[str, Any], min_seg_dino: float) -> str | None:
    """Why a generated image (a ``GENERATION_SCHEMA`` row) is not a positive; None: it is."""
    if row["image_uri"] is None:
        return f"not generated: {row['error']}" if row["error"] else "no image written"
    value = row[Metric.SEG_DINO]
    if value is None or np.isnan(value):
        if row["mask_method"] is None:
            return "no product mask"
        return f"no {Metric.SEG_DINO}: the product's real photos have no mask"
    if value < min_seg_dino:
        return f"{Metric.SEG_DINO}={value:.3f} < {min_seg_dino:g}"
    return None


@dataclass(frozen=True)
class GeneratedPositives:
    """A product's generated images at one guidance value, filtered by seg_dino."""

    kept: list[dict[str, Any]]  # GENERATION_SCHEMA rows
    dropped: list[dict[str, Any]]  # DROPPED_SCHEMA rows


def filter_generated(
    rows: list[dict[str, Any]], guidance_scale: float, min_seg_dino: float
) -> GeneratedPositives:
    """Keep the images whose seg_dino is at least ``min_seg_dino``; each other one becomes
    a ``DROPPED_SCHEMA`` row with its reason (``drop_reason``)."""
    kept, dropped = [], []
    for row in rows:
        reason = drop_reason(row, min_seg_dino)
        if reason is None:
            kept.append(row)
            continue
        value = row[Metric.SEG_DINO]
        dropped.append(
            {
                "product_id": row["product_id"],
                "guidance_scale": float(guidance_scale),
                "image_id": row["image_id"],
                "image_uri": row["image_uri"],
                Metric.SEG_DINO: None if value is None or np.isnan(value) else float(value),
                "reason": reason,
            }
        )
    return GeneratedPositives(kept, dropped)


# --------------------------------------------------------------------------- training


class TrainEncoders(ProductStage):
    """The encoder pool: one ``EncoderTrainer`` per actor, a product per call."""

    name = "train"

    def __init__(self, config: RestageConfig):
        from actors.encoder_trainer import EncoderTrainer

        super().__init__(config)
        self.trainer = EncoderTrainer(config.model_spec("encoder"), config.personalize)
        self.side = max(128, 2 * self.trainer.resolution)  # enough for its random crops
        self.paste = config.personalize.cut_paste.paste_config()
        self._bank: OrderedDict[str, np.ndarray | str] = OrderedDict()  # bounded cache

    def _decode(self, blob: bytes) -> np.ndarray:
        return downscale(decode_rgb(blob), self.side)

    def _read(self, uris: list[str], decode: Any = None) -> list[np.ndarray | str]:
        """Each image decoded, or why it could not be (the caller records it)."""
        decode = decode or self._decode

        def one(uri: str) -> np.ndarray | str:
            try:
                return decode(storage.read_bytes(uri))
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(IO_THREADS) as pool:
            return list(pool.map(one, uris))

    def _hard_negatives(self, state: PersonalProduct) -> list[np.ndarray]:
        missing = list(dict.fromkeys(uri for _, uri in state.hard if uri not in self._bank))
        for uri, img in zip(missing, self._read(missing), strict=True):
            self._bank[uri] = img  # an unreadable bank photo is left out for every product
        out = []
        for pid, uri in state.hard:
            img = self._bank[uri]
            self._bank.move_to_end(uri)
            if pid != state.product_id and not isinstance(img, str):
                out.append(img)
        while len(self._bank) > max(BANK_CACHE, len(state.hard)):
            self._bank.popitem(last=False)
        return out

    def _cut_paste(self, state: PersonalProduct, reals: list[dict[str, Any]]) -> list[CutPaste]:
        """The product's composites (module doc); a real photo without a usable mask and an
        unreadable or too small scene are error rows, the product goes on without them."""
        start = time.perf_counter()
        stat = state.stat("cut_paste")
        stat.items_in = len(state.backgrounds)
        if not state.backgrounds:
            if self.config.personalize.cut_paste.count:
                state.error(
                    "cut_paste",
                    "no backgrounds: the run has no scenes of other products; set "
                    "personalize.cut_paste.backgrounds to a folder of scene images",
                )
            return []
        with_mask = [r for r in reals if r["mask_uri"]]
        rgbs = self._read([r["image_uri"] for r in with_mask])
        masks = self._read([r["mask_uri"] for r in with_mask], self._decode_mask)
        products = []
        for r, rgb, mask in zip(with_mask, rgbs, masks, strict=True):
            reason = rgb if isinstance(rgb, str) else mask if isinstance(mask, str) else None
            if reason is None and rgb.shape[:2] != mask.shape:
                reason = f"mask is {mask.shape}, photo {rgb.shape[:2]}"
            if reason is None and not mask.any():
                reason = "empty mask"
            if reason is None:
                products.append((rgb, mask))
            else:
                state.error("cut_paste", f"real photo not pasted: {reason}", item=r["image_uri"])
        if not products:
            state.error("cut_paste", "no real photo with a usable mask to paste")
            return []
        unique = list(dict.fromkeys(state.backgrounds))
        scenes = dict(zip(unique, self._read(unique), strict=True))
        out = []
        for k, uri in enumerate(state.backgrounds):
            scene = scenes[uri]
            seed = derive_seed(state.product_id, CUT_PASTE_SEED, k, self.config.seed)
            try:
                if isinstance(scene, str):
                    raise ValueError(f"unreadable background: {scene}")
                out.extend(synthesize([products[k % len(products)]], [scene], [seed], self.paste))
            except ValueError as exc:
                state.error("cut_paste", str(exc), item=uri)
        stat.items_out, stat.errors = len(out), len(state.backgrounds) - len(out)
        stat.seconds += time.perf_counter() - start
        return out

    def _generated(self, state: PersonalProduct) -> list[np.ndarray]:
        """The product's generated positives that pass the seg_dino filter (module doc);
        the others go to ``state.dropped``. No adapter, or no generation at a guidance
        value, is an error row: the product trains without them."""
        cfg = self.config.personalize.generated
        if state.adapters is None or not cfg.images_per_product:
            return []
        start, pid, stat = time.perf_counter(), state.product_id, state.stat(GENERATED)
        if not storage.exists(AdapterLayout(state.adapters).metadata(pid)):
            state.error(
                GENERATED,
                f"no adapter under --adapters {state.adapters}: trained without generated "
                "positives (train one with `restage train`, then re-run from scratch)",
            )
            return []
        layout, kept = EncoderLayout(state.root), []
        for guidance, _ in cfg.shares():
            folder = layout.generated_dir(guidance)
            shard = GenerationLayout(folder).manifest_shard(pid)
            try:
                table = storage.read_parquet(shard, GENERATION_SCHEMA)
            except Exception as exc:  # generate failed the product: its errors say why
                state.error(
                    GENERATED,
                    f"no generated images at guidance {guidance:g} ({type(exc).__name__}); "
                    f"see the errors under {folder}",
                    item=shard,
                )
                continue
            rows = [r for r in table.to_pylist() if r["product_id"] == pid]
            picked = filter_generated(
                sorted(rows, key=lambda r: r["image_id"]), guidance, cfg.min_seg_dino
            )
            kept.extend(picked.kept)
            state.dropped.extend(picked.dropped)
        out = []
        for r, img in zip(kept, self._read([r["image_uri"] for r in kept]), strict=True):
            if isinstance(img, str):
                state.error(GENERATED, f"unreadable image: {img}", item=r["image_uri"])
            else:
                out.append(img)
        stat.items_in = len(kept) + len(state.dropped)
        stat.items_out, stat.dropped = len(out), len(state.dropped)
        stat.errors = len(kept) - len(out)
        stat.seconds += time.perf_counter() - start
        return out

    def _decode_mask(self, blob: bytes) -> np.ndarray:
        return downscale(decode_mask(blob), self.side) > 0

    def _keep(self, state: PersonalProduct, composites: list[CutPaste]) -> None:
        layout = EncoderLayout(state.root)
        for k, c in enumerate(composites):
            storage.write_bytes(layout.cut_paste_image(state.product_id, k), encode_png(c.image))
            mask = c.mask.astype(np.uint8) * 255
            storage.write_bytes(layout.cut_paste_mask(state.product_id, k), encode_png(mask))

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
        generated = self._generated(state)
        composites = self._cut_paste(state, [r for r in pos_rows if r["kind"] == SampleKind.REAL])
        if cfg.cut_paste.keep_images:
            self._keep(state, composites)
        seed = derive_seed(state.product_id, JOB, run_seed=self.config.seed)
        result = self.trainer.train(
            positives + generated + [c.image for c in composites], negatives + hard, seed
        )
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
            "cut_paste": len(composites),
            "generated": len(generated),
            "generated_dropped": len(state.dropped),
            "steps": result.steps,
            "loss_first": meta.loss_first,
            "loss_last": meta.loss_last,
            "train_seconds": meta.seconds,
            "data_digest": meta.data_digest,
        }
        # ProductStage times the whole call as "train": take loading, generated positives
        # and pasting out of it
        train.seconds -= load.seconds + state.stat("cut_paste").seconds
        if GENERATED in state.stats:
            train.seconds -= state.stats[GENERATED].seconds


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
        def write() -> list[dict[str, Any]]:
            shard = layout.dropped_shard(state.product_id)
            if state.dropped:
                storage.write_parquet(
                    shard, pa.Table.from_pylist(state.dropped, schema=DROPPED_SCHEMA)
                )
            else:
                storage.remove(shard)
            return [state.row]

        return write

    def marker(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"encoder": rows[0]["encoder_uri"], "steps": rows[0]["steps"]} if rows else {}

    return outcome_batch(
        [write_product(layout, s, ENCODER_SCHEMA, files(s), marker) for s in states]
    )


def build_dataset(
    todo: Any,
    config: RestageConfig,
    data_root: str,
    root: str,
    inputs: dict[str, Any],
    staged,
):
    cpu = config.personalize.cpus_per_task
    cfg = config.personalize

    def planned(chosen: Any) -> Any:
        return chosen.map_batches(
            plan_products,
            fn_kwargs={
                "data_root": data_root,
                "root": root,
                "bank": inputs["bank"],
                "negative_products": cfg.negative_products,
                "backgrounds": inputs["backgrounds"],
                "count": cfg.cut_paste.count,
                "run_seed": config.seed,
                "adapters": inputs["adapters"],
            },
            batch_size=1,
            num_cpus=cpu,
        )

    ds = _job.through_stages(todo, planned, model_stages(config), config, root, staged, 1, cpu)
    return ds.map_batches(write_encoders, fn_kwargs={"root": root}, batch_size=1, num_cpus=cpu)


# --------------------------------------------------------------------------- the job


def generate_positives(
    config: RestageConfig, adapters: str, layout: EncoderLayout
) -> list[dict[str, Any]]:
    """The generate job once per guidance value (module doc), each into its folder under
    ``layout``; -> what each did (for the summary)."""
    from pipelines.generate import generate

    done = []
    for guidance, images in config.personalize.generated.shares():
        folder = layout.generated_dir(guidance)
        summary = generate(generation_config(config, guidance, images), adapters, folder)
        done.append(
            {
                "guidance_scale": guidance,
                "images_per_product": images,
                "out": folder,
                "products": summary.products,
            }
        )
    return done


def personalize(
    config: RestageConfig, data: str, out: str, adapters: str | None = None
) -> JobSummary:
    """Run the personalize job: ``data`` (an augment output) -> encoders under ``out``;
    ``adapters`` (a train output): generated positives too (module doc)."""
    start = time.perf_counter()
    data_root, root = storage.normalize_uri(data), storage.normalize_uri(out)
    if not storage.exists(AugmentLayout(data_root).manifest_dir()):
        raise FileNotFoundError(
            f"--data {data}: no manifest/ folder; give the output root of `restage augment`"
        )
    layout = EncoderLayout(root)
    cfg = config.personalize
    folder = cfg.cut_paste.backgrounds
    inputs: dict[str, Any] = {"bank": Bank(cfg.negative_products), "backgrounds": None}
    inputs["adapters"] = generated = None
    if folder and cfg.cut_paste.count:  # listed before any Ray work: a bad folder fails fast
        inputs["backgrounds"] = list_backgrounds(storage.normalize_uri(folder))
    if adapters is not None and cfg.generated.images_per_product:
        from ray_app.plan import preflight

        inputs["adapters"] = storage.normalize_uri(adapters)
        if not storage.exists(inputs["adapters"]):
            raise FileNotFoundError(
                f"--adapters {adapters}: no such folder; give the output root of `restage "
                "train`, or leave --adapters out to train without generated positives"
            )
        preflight(config, JOB)  # a personalize that cannot run ends before the generations
        generated = generate_positives(config, inputs["adapters"], layout)

    def rows() -> Any:
        inputs["bank"] = collect_bank(data_root, cfg.negative_products, cfg.cpus_per_task)
        return input_rows(data_root, cfg.cpus_per_task)

    done = _job.execute(
        JOB,
        config,
        layout,
        rows,
        lambda todo, c, staged: build_dataset(todo, c, data_root, root, inputs, staged),
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
            "hard_negative_products": len(inputs["bank"].category),
            "hard_negative_categories": len(inputs["bank"].members),
            "cut_paste_backgrounds": (
                len(inputs["backgrounds"])
                if inputs["backgrounds"] is not None
                else "scenes of other products"
            ),
            "adapters": inputs["adapters"],
            "generated": generated,
            "min_seg_dino": cfg.generated.min_seg_dino if generated is not None else None,
            "dropped": layout.dropped_dir() if generated is not None else None,
        },
    )


@dataclass(frozen=True)
class PersonalizeArgs:
    """``restage personalize``'s arguments."""

    data: str
    out: str
    adapters: str | None = None


def main(config: RestageConfig, args: PersonalizeArgs) -> JobSummary:
    """CLI entry: ``restage personalize --data URI [--adapters TRAIN_OUT] --out URI``."""
    return personalize(config, args.data, args.out, args.adapters)
