"""Product records: validation, manifest reading (JSONL, CSV, Parquet on any fsspec
filesystem) and the Arrow schemas of everything a job writes.

A record that fails validation never stops a job: it becomes an ``ErrorRow`` with the
reason and the raw record, and reading carries on. Jobs read their manifest in Ray Data
tasks (``manifest_dataset``); ``read_manifest`` reads a small one in this process.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_app import storage
from ray_app.kinds import MASK_IOU, SHARPNESS, Metric

PRODUCT_ID_MAX_LEN = 128
_PRODUCT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PRODUCT_ID_RULE = f"1-{PRODUCT_ID_MAX_LEN} ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"
# Names Windows (NTFS, SMB shares, and tools that copy outputs there) reserves for devices,
# with or without an extension: "NUL.json" opens the null device, not a file.
RESERVED_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{d}{i}" for d in ("COM", "LPT") for i in range(10)]
)
MANIFEST_FORMATS = ("jsonl", "csv", "parquet")
_KNOWN_FIELDS = ("product_id", "category", "title", "description", "attributes", "image_uris")


class RecordError(ValueError):
    """A product record (or one of its fields) is invalid; the message says why."""


def validate_product_id(value: Any) -> str:
    """Return ``value`` if it is safe as a single path segment, else raise ``RecordError``."""
    if not isinstance(value, str):
        raise RecordError(f"product_id must be a string, got {type(value).__name__} {value!r}")
    if not value:
        raise RecordError(f"product_id is empty: use {PRODUCT_ID_RULE}")
    if len(value) > PRODUCT_ID_MAX_LEN:
        raise RecordError(
            f"product_id {value[:32]!r}... is {len(value)} characters long: at most "
            f"{PRODUCT_ID_MAX_LEN} are allowed"
        )
    if not _PRODUCT_ID_RE.fullmatch(value):
        bad = sorted({c for c in value if not (c.isascii() and (c.isalnum() or c in "._-"))})
        why = (
            f"characters {''.join(bad)!r} are not allowed"
            if bad
            else "it must start with a letter or digit"
        )
        raise RecordError(
            f"product_id {value!r} is not safe as a path segment: {why}; use {PRODUCT_ID_RULE}"
        )
    if value.split(".", 1)[0].upper() in RESERVED_NAMES:
        raise RecordError(
            f"product_id {value!r} is a reserved device name on Windows filesystems "
            f"({', '.join(sorted(RESERVED_NAMES))}, with or without an extension): "
            "rename the product, e.g. with a prefix"
        )
    if value.endswith("."):
        raise RecordError(
            f"product_id {value!r} ends with '.': Windows filesystems drop trailing dots, "
            "so it would share files with another id; remove the dot"
        )
    return value


@dataclass(frozen=True)
class ProductRecord:
    """One product of a manifest, validated; ``image_uris`` are absolute URIs."""

    product_id: str
    image_uris: tuple[str, ...]
    category: str | None = None
    title: str | None = None
    description: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {
            "product_id": self.product_id,
            "category": self.category,
            "title": self.title,
            "description": self.description,
            "attributes": sorted(self.attributes.items()),
            "image_uris": list(self.image_uris),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ProductRecord:
        attrs = row.get("attributes") or []
        attrs = dict(attrs.items() if isinstance(attrs, dict) else attrs)
        return cls(
            product_id=row["product_id"],
            image_uris=tuple(row["image_uris"]),
            category=row.get("category"),
            title=row.get("title"),
            description=row.get("description"),
            attributes=attrs,
        )

    @property
    def words(self) -> set[str]:
        """Lower-cased words of the title, category and attribute values (token collisions)."""
        text = " ".join(
            filter(None, [self.title, self.category, self.description, *self.attributes.values()])
        )
        return set(re.findall(r"[a-z0-9]+", text.lower()))


@dataclass(frozen=True)
class ErrorRow:
    """A failure kept for the errors manifest: what failed, where, why, and the input."""

    job: str
    stage: str
    reason: str
    product_id: str | None = None
    item: str | None = None
    record: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "stage": self.stage,
            "product_id": self.product_id,
            "item": self.item,
            "reason": self.reason,
            "record": self.record,
        }


# --------------------------------------------------------------------------- schemas

PRODUCT_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
        pa.field("image_uris", pa.list_(pa.string()), nullable=False),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("job", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("product_id", pa.string()),
        pa.field("item", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("record", pa.string()),
    ]
)


# One row per sample of a product's training set (`restage augment` manifest); ``kind`` is
# a ray_app.kinds.SampleKind, the score columns its Metrics and augment's MASK_IOU and
# SHARPNESS.
SCORE_COLUMNS = (*Metric, MASK_IOU, SHARPNESS)

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("caption", pa.string()),
        # The captioner's answer was this many words and was cut to fit the generator's text
        # encoders (77 tokens with the product phrase); None: not cut.
        pa.field("caption_cut_from_words", pa.int32()),
        pa.field("prompt", pa.string()),
        pa.field("source_sample", pa.string()),
        pa.field("origin_uri", pa.string()),
        # Frames of an animated source (GIF, APNG, WebP): its first frame was used. None: a still.
        pa.field("origin_frames", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("product_type", pa.string()),
        pa.field("type_source", pa.string()),
        pa.field("mask_method", pa.string()),
        pa.field("mask_score", pa.float32()),
        *[pa.field(name, pa.float32()) for name in SCORE_COLUMNS],
        pa.field("score", pa.float32()),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("drop_reason", pa.string()),
        pa.field("models", pa.map_(pa.string(), pa.string())),
    ]
)


# One row per generated image of a product (`restage generate` manifest): every score, the
# ranking's score and its name (generate.ranking), the rank within the product and whether
# it is among the kept top-N.
GENERATION_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("prompt_index", pa.int32(), nullable=False),
        pa.field("image_index", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_source", pa.string(), nullable=False),  # bank or user
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("token", pa.string()),
        pa.field("adapter_uri", pa.string()),
        pa.field("image_uri", pa.string()),  # None when the image was not written
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mask_method", pa.string()),
        *[pa.field(name, pa.float32()) for name in Metric],
        pa.field("score", pa.float32()),
        pa.field("ranking", pa.string()),  # the ranking that made `score` (ray_app/ranking.py)
        pa.field("rank", pa.int32()),  # 1 = best of the product; None when unscored
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("models", pa.map_(pa.string(), pa.string())),
    ]
)


# A search index's rows (ray_app/retrieval.py): what every row has; the caller's own
# columns (the index job's scene fields) follow.
INDEX_ROW_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        # L2-normalised (|x| = 1 within retrieval.NORM_TOLERANCE), one length per index.
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)

# `restage index`: one row per catalog photo. Kept rows carry the product's mask, box
# (exclusive ends), ground line (the row below its base, ray_app/staging.ground_line) and the
# L2-normalised CLIP embedding of its crop; a photo left out has its drop_reason instead.
SCENE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # "<product_id>/<nn>"
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("embedding", pa.list_(pa.float32())),  # None when left out
        pa.field("origin_uri", pa.string(), nullable=False),
        pa.field("scene_uri", pa.string()),
        pa.field("mask_uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("box_x0", pa.int32()),
        pa.field("box_y0", pa.int32()),
        pa.field("box_x1", pa.int32()),
        pa.field("box_y1", pa.int32()),
        pa.field("ground", pa.int32()),
        pa.field("area_fraction", pa.float32()),
        pa.field("mask_method", pa.string()),
        pa.field("mask_score", pa.float32()),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("drop_reason", pa.string()),
        pa.field("models", pa.map_(pa.string(), pa.string())),
    ]
)

# `restage stage`: one row per retrieved scene a product was staged into (or skipped),
# its placement (box in the staged image, scale from the input photo), its scores and
# whether it is among the kept top-N.
STAGED_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("stage_id", pa.string(), nullable=False),  # "s00", "s01", ... by retrieval rank
        pa.field("scene_image_id", pa.string(), nullable=False),
        pa.field("scene_product_id", pa.string(), nullable=False),
        pa.field("scene_category", pa.string()),  # another than the product's: too few matched
        pa.field("scene_uri", pa.string(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),  # the input photo staged
        pa.field("source_mask_uri", pa.string(), nullable=False),  # its product mask
        pa.field("source_mask_method", pa.string()),
        pa.field("image_uri", pa.string()),  # None unless kept
        pa.field("clip_uris", pa.list_(pa.string())),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("place_x0", pa.int32()),
        pa.field("place_y0", pa.int32()),
        pa.field("place_x1", pa.int32()),
        pa.field("place_y1", pa.int32()),
        pa.field("scale", pa.float32()),
        pa.field("ground", pa.int32()),
        pa.field(Metric.CLIP_I, pa.float32()),  # the product's crop vs the input's
        pa.field(MASK_IOU, pa.float32()),  # re-segmented vs placed
        pa.field("boundary", pa.float32()),
        pa.field("score", pa.float32()),
        pa.field("rank", pa.int32()),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("drop_reason", pa.string()),
        pa.field("models", pa.map_(pa.string(), pa.string())),
    ]
)


# `restage evaluate`: one row per generated image of a run (per_image.parquet), its metrics
# against the product's real photos (ray_app/kinds.Metric; NaN where a mask is missing).
EVAL_IMAGE_SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("kept", pa.bool_()),
        *[pa.field(name, pa.float32()) for name in Metric],
        pa.field("error", pa.string()),
    ]
)

# One row per product and run (per_product.parquet): the means of its images' metrics.
EVAL_PRODUCT_SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("n_errors", pa.int32(), nullable=False),
        *[pa.field(name, pa.float32()) for name in Metric],
        pa.field("reference_uris", pa.list_(pa.string())),
    ]
)

# `restage review results` (images.parquet): one row per generated image put to raters, with
# the human verdict and the metrics it was generated with; `restage ranker fit` learns from it.
# human_pass is None until the image has its full quota of raters (review.raters_per_image).
RATED_IMAGE_SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("n_raters", pa.int32(), nullable=False),
        pa.field("rater_passes", pa.int32(), nullable=False),  # raters who said yes to all 8
        pa.field("human_pass", pa.bool_()),
        *[pa.field(name, pa.float32()) for name in Metric],
        pa.field("score", pa.float32()),  # the generation's ranking score
        pa.field("ranking", pa.string()),  # ... and the ranking that made it
    ]
)

# `restage review results` (answers.parquet / answers.csv): every answer of every rater.
ANSWER_SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("rater", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),  # ray_app.kinds.Question
        pa.field("answer", pa.string(), nullable=False),  # ray_app.kinds.Answer
        pa.field("answered_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

# Inception features of every image (FID/KID): `side` is a run's name or REFERENCE_SIDE,
# `image_id` is PRODUCT_ID/IMAGE_ID (unique within a side).
REFERENCE_SIDE = "__reference__"
FEATURES_SCHEMA = pa.schema(
    [
        pa.field("side", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
    ]
)


def records_table(records: list[ProductRecord]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=PRODUCT_SCHEMA)


def errors_table(errors: list[ErrorRow]) -> pa.Table:
    return pa.Table.from_pylist([e.to_row() for e in errors], schema=ERROR_SCHEMA)


# --------------------------------------------------------------------------- validation


def _optional_text(raw: dict[str, Any], key: str, max_len: int) -> str | None:
    value = raw.get(key)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (CSV/pandas)
        return None
    if not isinstance(value, str):
        raise RecordError(f"{key} must be a string, got {type(value).__name__}")
    value = value.strip()
    if len(value) > max_len:
        raise RecordError(f"{key} is {len(value)} characters long: at most {max_len} are allowed")
    return value or None


def _attributes(value: Any) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(
                "attributes must be a JSON object (mapping of name to value)"
            ) from None
    if isinstance(value, list):  # Arrow map columns arrive as [(key, value), ...]
        value = dict(value)
    if not isinstance(value, dict):
        raise RecordError(f"attributes must be a mapping, got {type(value).__name__}")
    out = {}
    for key, item in value.items():
        if isinstance(item, (dict, list)):
            raise RecordError(f"attributes.{key} must be a scalar, got {type(item).__name__}")
        out[str(key)] = "" if item is None else str(item)
    return out


def _image_uris(value: Any, base_uri: str) -> tuple[str, ...]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise RecordError("image_uris looks like JSON but does not parse") from None
        else:  # CSV cells: "a.jpg|b.jpg"
            value = [part for part in re.split(r"[|;]", text) if part.strip()]
    if value is None:
        value = []
    if not isinstance(value, (list, tuple)) and not hasattr(value, "tolist"):
        raise RecordError(f"image_uris must be a list of URIs, got {type(value).__name__}")
    uris = [u.strip() if isinstance(u, str) else u for u in list(value)]
    if not uris:
        raise RecordError("image_uris is empty: a product needs at least one image")
    for uri in uris:
        if not isinstance(uri, str) or not uri:
            raise RecordError(f"image_uris has an empty or non-string entry: {uri!r}")
    return tuple(storage.resolve_relative(uri, base_uri) for uri in uris)


def validate_record(raw: dict[str, Any], base_uri: str) -> ProductRecord:
    """Validate one raw manifest record; relative image URIs resolve against ``base_uri``."""
    if not isinstance(raw, dict):
        raise RecordError(f"a record must be an object, got {type(raw).__name__}")
    if "product_id" not in raw:
        raise RecordError("product_id is missing")
    return ProductRecord(
        product_id=validate_product_id(raw["product_id"]),
        category=_optional_text(raw, "category", 200),
        title=_optional_text(raw, "title", 500),
        description=_optional_text(raw, "description", 5000),
        attributes=_attributes(raw.get("attributes")),
        image_uris=_image_uris(raw.get("image_uris"), base_uri),
    )


# --------------------------------------------------------------------------- manifests


@dataclass
class Manifest:
    """The result of reading a manifest: valid records, errors, and ignored columns."""

    uri: str
    records: list[ProductRecord]
    errors: list[ErrorRow]
    ignored_columns: list[str]


def manifest_format(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for suffix, fmt in (
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "jsonl"),
        (".csv", "csv"),
        (".parquet", "parquet"),
        (".pq", "parquet"),
    ):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return fmt
    raise RecordError(f"manifest {uri!r}: unknown format; name it *.jsonl, *.csv or *.parquet")


def _raw_rows(uri: str, fmt: str) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """Yield (location, raw record) pairs; a raw string is an unparseable line."""
    compression = "gzip" if uri.endswith(".gz") else None
    if fmt == "parquet":
        with storage.open_file(uri, "rb") as f:  # a batch at a time, never the whole file
            rows = (row for b in pq.ParquetFile(f).iter_batches() for row in b.to_pylist())
            for i, row in enumerate(rows, start=1):
                yield f"row {i}", row
        return
    with storage.open_file(uri, "rt", compression=compression, encoding="utf-8", newline="") as f:
        if fmt == "csv":
            for i, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                yield f"line {i}", {k: (v if v != "" else None) for k, v in row.items() if k}
            return
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {i}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {i}", f"not valid JSON ({exc.msg}): {line.strip()[:200]}"


def _check(
    where: str, raw: dict[str, Any] | str, base: str, job: str
) -> tuple[ProductRecord | None, ErrorRow | None]:
    """One raw row -> (its record, None) or (None, why it is invalid)."""
    if isinstance(raw, str):
        return None, ErrorRow(job, "manifest", f"{where}: {raw}", item=where)
    try:
        return validate_record(raw, base), None
    except RecordError as exc:
        pid = raw.get("product_id") if isinstance(raw, dict) else None
        return None, ErrorRow(
            job,
            "manifest",
            f"{where}: {exc}",
            product_id=pid if isinstance(pid, str) else None,
            item=where,
            record=_dump(raw),
        )


def _ignored(raw: dict[str, Any] | str) -> list[str]:
    return [k for k in raw if k not in _KNOWN_FIELDS] if isinstance(raw, dict) else []


def _duplicate(job: str, where: str, pid: str, first: str, record: str) -> ErrorRow:
    return ErrorRow(
        job,
        "manifest",
        f"{where}: duplicate product_id {pid!r} (first seen at {first}); the first record is kept",
        product_id=pid,
        item=where,
        record=record,
    )


def _opened(uri: str) -> tuple[str, str, str]:
    """-> (normalised URI, format, the folder relative image URIs resolve against)."""
    uri = storage.normalize_uri(uri)
    fmt = manifest_format(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"manifest {uri!r} does not exist")
    return uri, fmt, storage.parent_uri(uri)


def read_manifest(uri: str, job: str = "manifest") -> Manifest:
    """Read and validate a small manifest here, in this process (tests, ``restage train
    --manifest``); jobs read theirs in Ray Data tasks (``manifest_dataset``). Bad and
    duplicate records become ``ErrorRow`` s."""
    uri, fmt, base = _opened(uri)
    records: list[ProductRecord] = []
    errors: list[ErrorRow] = []
    seen: dict[str, str] = {}
    ignored: set[str] = set()
    for where, raw in _raw_rows(uri, fmt):
        ignored.update(_ignored(raw))
        rec, error = _check(where, raw, base, job)
        if rec is None:
            errors.append(error)  # type: ignore[arg-type]
        elif rec.product_id in seen:
            first = seen[rec.product_id]
            errors.append(_duplicate(job, where, rec.product_id, first, _dump(raw)))
        else:
            seen[rec.product_id] = where
            records.append(rec)
    return Manifest(uri=uri, records=records, errors=errors, ignored_columns=sorted(ignored))


# --------------------------------------------------------------------------- manifests in Ray Data

# Rows per chunk of a manifest read in a task: each chunk's invalid rows are one errors
# shard, named by the chunk's number, so a re-run over the same manifest replaces it.
MANIFEST_CHUNK_ROWS = 1000
# Bytes of manifest per partition of the duplicate-id shuffle: each partition is a task
# and its share of Ray Data's shuffle actors, so a small manifest gets a few (not Ray's
# default 200, about 5 s of fixed cost per job on 2 cores) and a catalog of millions of
# rows (~500 bytes each) still spreads over the cluster.
MANIFEST_BYTES_PER_PARTITION = 32 * 2**20
# The intake columns besides the record's: ``key`` groups duplicates (an invalid row gets a
# key no product id can take), ``seq`` is the row's position in the manifest (the first of
# duplicates is kept), ``where`` the location errors name, ``status`` valid or invalid.
VALID, INVALID = "valid", "invalid"
INTAKE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("where", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("ignored", pa.list_(pa.string())),
        *[f.with_nullable(True) for f in PRODUCT_SCHEMA],
    ]
)


def manifest_errors_dir(errors_dir: str) -> str:
    """Where the manifest's errors shards go, below a job's errors folder: the driver
    clears it once per run, before the tasks write it again."""
    return storage.join(errors_dir, "_manifest")


def _intake_row(seq: int, where: str, raw: Any, rec: ProductRecord | None) -> dict[str, Any]:
    row = rec.to_row() if rec is not None else {"image_uris": []}
    return {
        **row,
        "key": rec.product_id if rec is not None else f" {seq}",  # ids never hold a space
        "seq": seq,
        "where": where,
        "status": VALID if rec is not None else INVALID,
        "ignored": _ignored(raw),
    }


def read_chunks(
    batch: dict[str, Any],
    job: str,
    errors_dir: str,
    rows: int = MANIFEST_CHUNK_ROWS,
    dedupe: bool = False,
) -> Iterator[pa.Table]:
    """A Ray Data task: the manifests named in ``batch["uri"]`` -> intake rows, validated,
    ``rows`` at a time; each chunk's invalid rows go to its errors shard from here. With
    ``dedupe`` (a manifest of one shuffle partition: this task sees every row the shuffle's
    one reducer would) a later record of an id is made invalid here, as ``first_of_each_id``
    does."""
    for uri in batch["uri"]:
        uri, fmt, base = _opened(str(uri))
        chunk: list[dict[str, Any]] = []
        errors: list[ErrorRow] = []
        first: dict[str, str] = {}  # id -> where its first record is (``dedupe`` only)
        for seq, (where, raw) in enumerate(_raw_rows(uri, fmt)):
            rec, error = _check(where, raw, base, job)
            if error is not None:
                errors.append(error)
            row = _intake_row(seq, where, raw, rec)
            if dedupe and rec is not None:
                if rec.product_id in first:
                    errors.append(_duplicate_of(job, row, first[rec.product_id]))
                else:
                    first[rec.product_id] = where
            chunk.append(row)
            if len(chunk) == rows:
                yield _chunk_table(chunk, errors, seq // rows, errors_dir)
                chunk, errors = [], []
        if chunk:
            yield _chunk_table(chunk, errors, chunk[0]["seq"] // rows, errors_dir)


def _chunk_table(
    chunk: list[dict[str, Any]], errors: list[ErrorRow], number: int, errors_dir: str
) -> pa.Table:
    uri = storage.join(errors_dir, f"rows-{number:06d}.parquet")
    if errors:
        storage.write_parquet(uri, errors_table(errors))
    else:
        storage.remove(uri)
    return pa.Table.from_pylist(chunk, schema=INTAKE_SCHEMA)


def first_of_each_id(group: pa.Table, job: str, errors_dir: str) -> pa.Table:
    """A Ray Data task over one ``key`` group: the first record of a product id (lowest
    ``seq``) stays valid; the others become invalid rows with their errors shard."""
    if group.num_rows < 2:
        return group
    group = group.sort_by("seq")
    rows = group.to_pylist()
    first = rows[0]
    errors = [_duplicate_of(job, row, first["where"]) for row in rows[1:]]
    storage.write_parquet(
        storage.join(errors_dir, f"duplicates-{first['key']}.parquet"), errors_table(errors)
    )
    return pa.Table.from_pylist(rows, schema=group.schema)


def _duplicate_of(job: str, row: dict[str, Any], first: str) -> ErrorRow:
    """Intake ``row`` repeats the id of the record at ``first``: it becomes invalid -> its
    error row."""
    row["status"] = INVALID
    record = {k: row[k] for k in _KNOWN_FIELDS}
    return _duplicate(job, row["where"], row["key"], first, _dump(record))


def manifest_dataset(uri: str, job: str, errors_dir: str) -> Any:
    """A manifest as a lazy Ray Data dataset of intake rows (``INTAKE_SCHEMA``), read and
    validated in tasks, with the same messages as ``read_manifest``; errors shards go under
    ``manifest_errors_dir(errors_dir)``, which the caller clears first.

    Rows are read by our own reader in one task per manifest (Ray's ``read_json`` fails on
    a bad line, and no Ray reader keeps the line number every message names), ``rows`` at
    a time. Duplicate ids: a ``groupby(key).map_groups`` shuffle in tasks, a barrier over the
    records only (small), keeps the first of each id; the driver never holds a set of ids.
    A manifest of one partition (``shuffle_partitions``) is deduplicated by its reading task
    instead: the shuffle would gather every row in one task too, and its two stages cost a
    small job ~3 s (their tasks start new worker processes)."""
    import ray

    uri, _, _ = _opened(uri)  # a missing manifest or an unknown format fails here, at once
    errors_dir = manifest_errors_dir(errors_dir)
    partitions = shuffle_partitions(uri)
    ds = ray.data.from_items([{"uri": uri}]).map_batches(
        read_chunks,
        fn_kwargs={"job": job, "errors_dir": errors_dir, "dedupe": partitions == 1},
        batch_size=1,
        batch_format="pyarrow",
    )
    if partitions == 1:
        return ds
    return ds.groupby("key", num_partitions=partitions).map_groups(
        first_of_each_id, fn_kwargs={"job": job, "errors_dir": errors_dir}, batch_format="pyarrow"
    )


def shuffle_partitions(uri: str) -> int:
    """Partitions of the duplicate-id shuffle of the manifest at ``uri``: one per
    ``MANIFEST_BYTES_PER_PARTITION`` of it, at least 1 and at most Ray Data's default
    (``DataContext.default_hash_shuffle_parallelism``, also used when the size is unknown)."""
    from ray.data import DataContext

    most = DataContext.get_current().default_hash_shuffle_parallelism
    fs, path = storage.url_to_fs(uri)
    size = fs.size(path)
    if size is None:  # a server that does not say
        return most
    return max(1, min(most, math.ceil(size / MANIFEST_BYTES_PER_PARTITION)))


def _dump(raw: Any) -> str:
    try:
        return json.dumps(raw, default=str, ensure_ascii=False)[:10_000]
    except (TypeError, ValueError):
        return repr(raw)[:10_000]


def write_manifest(records: list[dict[str, Any]], uri: str) -> None:
    """Write raw records as a manifest in the format named by ``uri`` (examples, tests)."""
    fmt = manifest_format(uri)
    if fmt == "parquet":
        table = pa.Table.from_pylist(records)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(uri, buf.getvalue())
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(_KNOWN_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            row = dict(rec)
            row["image_uris"] = "|".join(rec.get("image_uris", []))
            if isinstance(rec.get("attributes"), dict):
                row["attributes"] = json.dumps(rec["attributes"])
            writer.writerow(row)
        storage.write_bytes(uri, buf.getvalue().encode())
    else:
        storage.write_bytes(uri, "".join(json.dumps(r) + "\n" for r in records).encode())
