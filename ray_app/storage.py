"""Storage through fsspec: URIs, atomic writes, completion markers, errors manifests, and
the one place of every artifact a job writes (the ``*Layout`` classes).

Every job writes under one root URI. Files are written atomically (temporary name, then a
rename; a single PUT on object stores, which is atomic there). A product's completion marker
is written last, so a product without a marker is redone on a re-run and one with a marker
is skipped.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

# Object stores: one PUT is atomic, and a rename would be a copy; write in place.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "oci", "r2"}


# --------------------------------------------------------------------------- URIs


def has_protocol(uri: str) -> bool:
    return "://" in uri


def protocol(uri: str) -> str:
    """``uri``'s scheme (``s3``, ``gs``, ...); ``file`` for a local path."""
    return uri.partition("://")[0] if has_protocol(uri) else "file"


def normalize_uri(uri: str) -> str:
    """Make local paths absolute (Ray workers do not share the driver's working directory)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if has_protocol(uri):
        return uri.rstrip("/") if uri.count("/") > 2 else uri
    return os.path.abspath(os.path.expanduser(uri))


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/") if root != "/" else root, *parts)


def parent_uri(uri: str) -> str:
    if has_protocol(uri):
        proto, _, rest = uri.partition("://")
        return f"{proto}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(uri))


def resolve_relative(uri: str, base: str) -> str:
    """Resolve ``uri`` against the folder ``base`` unless it is already absolute."""
    if has_protocol(uri):
        return uri
    if uri.startswith("/"):
        if has_protocol(base):
            return f"{base.partition('://')[0]}://{uri.lstrip('/')}"
        return os.path.normpath(uri)
    if has_protocol(base):
        proto, _, rest = base.partition("://")
        return f"{proto}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return os.path.normpath(os.path.join(base, uri))


class MissingBackendError(ImportError):
    """A URI's filesystem needs a package that is not installed; the message names it."""


# fsspec's backends of the object stores, installed by `pip install restage[cloud]`.
_CLOUD_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def _missing_backend(uri: str, exc: ImportError) -> MissingBackendError:
    proto = protocol(uri)
    package = _CLOUD_BACKENDS.get(proto)
    fix = (
        f"pip install restage[cloud] (or pip install {package})"
        if package
        else f"install the fsspec backend of {proto}:// ({exc})"
    )
    return MissingBackendError(
        f"reading or writing {proto}:// URIs needs {package or 'a backend'}: {fix}"
    )


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    # Remote filesystems cache directory listings per process and answer `exists` and `ls`
    # from them: another process's marker, claim or adapter written since would stay unseen
    # (a re-done product, a product served as untrained). Listings are always read afresh.
    fresh = {"use_listings_cache": False} if _remote(uri) else {}
    try:
        return fsspec.core.url_to_fs(uri, **fresh)
    except ImportError as exc:
        raise _missing_backend(uri, exc) from None


def _remote(uri: str) -> bool:
    """Whether ``uri`` is on a filesystem that other processes write behind this one's back."""
    proto = protocol(uri)
    return "::" not in proto and proto not in {"file", "local", "memory"}  # not chained


# --------------------------------------------------------------------------- files


def pyarrow_fs(uri: str) -> tuple[Any, str]:
    """``uri`` as (a pyarrow filesystem over its fsspec one, path) for Ray Data's I/O."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = url_to_fs(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


def open_file(uri: str, mode: str = "rb", **kwargs: Any):
    try:
        return fsspec.open(uri, mode, **kwargs).open()
    except ImportError as exc:
        raise _missing_backend(uri, exc) from None


def exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = url_to_fs(uri)
    return fs.cat_file(path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` atomically; readers see the old file or the new one."""
    fs, path = url_to_fs(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _protocols(fs) & _OBJECT_STORES:
        fs.pipe_file(path, data)
        return uri
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    fs.pipe_file(tmp, data)
    try:
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, path)  # atomic rename, also over an existing file
        else:
            fs.mv(tmp, path)
    except BaseException:
        fs.rm(tmp)
        raise
    return uri


def write_json(uri: str, obj: Any) -> str:
    return write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` only if nothing is there: True if this call made it,
    False if it existed. Atomic against every other writer, so one of several racing
    callers wins: a hard link of a complete temporary file on local and NFS folders (readers
    never see it half-written), a conditional PUT (``If-None-Match``, fsspec's ``"xb"``) on
    object stores. A store that cannot do it refuses rather than overwrite."""
    fs, path = url_to_fs(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    except (NotImplementedError, ValueError) as exc:  # no exclusive mode in this backend
        raise OSError(
            f"{uri}: this storage ({type(fs).__name__}) cannot create a file exclusively "
            f"({exc}); use a local folder or an object store with conditional writes"
        ) from exc
    return True


def write_parquet(uri: str, table: pa.Table) -> str:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return write_bytes(uri, buf.getvalue())


def read_parquet(uri: str, schema: pa.Schema | None = None) -> pa.Table:
    """Read one Parquet file or a folder of Parquet shards (hidden temp files ignored)."""
    fs, path = url_to_fs(uri)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/." not in p)
        if not files:
            return (schema or pa.schema([])).empty_table()
        tables = [pq.read_table(f, filesystem=fs, schema=schema) for f in files]
        return pa.concat_tables(tables, promote_options="default")
    return pq.read_table(path, filesystem=fs, schema=schema)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def list_names(uri: str, suffix: str = "") -> list[str]:
    """Base names of the entries directly under ``uri`` (empty when it does not exist)."""
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        return []
    return sorted(
        posixpath.basename(p.rstrip("/"))
        for p in fs.ls(path, detail=False)
        if p.endswith(suffix) and not posixpath.basename(p).startswith(".")
    )


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class JobLayout:
    """What every job writes under its root: markers, errors shards and a summary."""

    root: str
    # Names of the job's own entries at the root (a layout with product folders at its
    # root uses names no product id can take: ids never start with "_").
    ERRORS: ClassVar[str] = "errors"
    SUMMARY: ClassVar[str] = "summary.json"

    def marker(self, product_id: str) -> str:
        return join(self.root, "_done", f"{product_id}.json")

    def markers_dir(self) -> str:
        return join(self.root, "_done")

    def errors_dir(self) -> str:
        return join(self.root, self.ERRORS)

    def errors_shard(self, name: str) -> str:
        """One shard per product (or ``_records`` for manifest validation); re-runs replace it."""
        return join(self.errors_dir(), f"{name}.parquet")

    def summary(self) -> str:
        return join(self.root, self.SUMMARY)

    def inputs_dir(self) -> str:
        """The job's input product ids of its latest run, a few Parquet files (Ray Data
        writes them): what a downstream job reads instead of listing markers."""
        return join(self.root, "_inputs")

    def inputs_complete(self) -> str:
        """Written once the input index is whole: an index without it (a killed run's, cut
        short) is not read."""
        return join(self.root, "_inputs.complete")

    def intake_dir(self) -> str:
        """What intake's tasks counted, one small JSON per input block (the driver adds
        them up): rewritten by every run."""
        return join(self.root, "_intake")

    def features_dir(self) -> str:
        """Inception features for FID/KID (``FEATURES_SCHEMA``), one shard per product, for
        the jobs that measure them (evaluate, index, stage)."""
        return join(self.root, "_features")

    def features(self, product_id: str) -> str:
        return join(self.features_dir(), f"{product_id}.parquet")

    def completed(self) -> set[str]:
        """Product ids whose marker exists; one listing, not one request per product."""
        return {name[: -len(".json")] for name in list_names(self.markers_dir(), ".json")}


@dataclass(frozen=True)
class AugmentLayout(JobLayout):
    """``restage augment``: the training set of every product."""

    def images_dir(self, product_id: str) -> str:
        return join(self.root, "images", product_id)

    def image(self, product_id: str, sample_id: str, ext: str = "png") -> str:
        return join(self.images_dir(product_id), f"{sample_id}.{ext}")

    def masks_dir(self, product_id: str) -> str:
        return join(self.root, "masks", product_id)

    def mask(self, product_id: str, sample_id: str) -> str:
        return join(self.masks_dir(product_id), f"{sample_id}.png")

    def manifest_dir(self) -> str:
        return join(self.root, "manifest")

    def manifest_shard(self, product_id: str) -> str:
        return join(self.root, "manifest", f"{product_id}.parquet")

    def product_record(self, product_id: str) -> str:
        return join(self.root, "products", f"{product_id}.json")


@dataclass(frozen=True)
class AdapterLayout(JobLayout):
    """``restage train``: one folder per product, loadable by plain diffusers."""

    ERRORS: ClassVar[str] = "_errors"
    SUMMARY: ClassVar[str] = "_summary.json"
    # The names diffusers' ``pipe.load_lora_weights(folder)`` looks for, and the metadata
    # (ray_app.adapter_meta.AdapterMeta).
    WEIGHTS: ClassVar[str] = "pytorch_lora_weights.safetensors"
    METADATA: ClassVar[str] = "adapter.json"

    def adapter_dir(self, product_id: str) -> str:
        return join(self.root, product_id)

    @classmethod
    def weights_in(cls, adapter_dir: str) -> str:
        """The weights file of an adapter folder given by its URI (serve, benchmarks)."""
        return join(adapter_dir, cls.WEIGHTS)

    def weights(self, product_id: str) -> str:
        return self.weights_in(self.adapter_dir(product_id))

    def metadata(self, product_id: str) -> str:
        return join(self.adapter_dir(product_id), self.METADATA)

    def marker(self, product_id: str) -> str:  # the adapter.json is the marker
        return self.metadata(product_id)

    def completed(self) -> set[str]:
        fs, path = url_to_fs(self.root)
        if not fs.exists(path):
            return set()
        found = fs.glob(posixpath.join(path, "*", self.METADATA))
        return {posixpath.basename(posixpath.dirname(p)) for p in found}


@dataclass(frozen=True)
class EncoderLayout(JobLayout):
    """``restage personalize``: one peft folder per product (``PeftModel.from_pretrained``
    loads it) with ``encoder.json`` (actors.encoder_trainer.EncoderMeta) beside it."""

    ERRORS: ClassVar[str] = "_errors"
    SUMMARY: ClassVar[str] = "_summary.json"
    WEIGHTS: ClassVar[str] = "adapter_model.safetensors"  # peft's names
    PEFT_CONFIG: ClassVar[str] = "adapter_config.json"
    METADATA: ClassVar[str] = "encoder.json"

    def encoder_dir(self, product_id: str) -> str:
        return join(self.root, product_id)

    def cut_paste_dir(self, product_id: str) -> str:
        """The product's kept cut-and-paste composites (personalize.cut_paste.keep_images)."""
        return join(self.encoder_dir(product_id), "data", "cut_paste")

    def cut_paste_image(self, product_id: str, index: int) -> str:
        return join(self.cut_paste_dir(product_id), f"{index:04d}.png")

    def cut_paste_mask(self, product_id: str, index: int) -> str:
        """The composite's paste mask: 255 exactly where the product's pixels went."""
        return join(self.cut_paste_dir(product_id), f"{index:04d}_mask.png")

    @classmethod
    def metadata_in(cls, folder: str) -> str:
        return join(folder, cls.METADATA)

    def generated_dir(self, guidance_scale: float) -> str:
        """A ``restage generate`` output of the products' adapters at one classifier-free
        guidance value (``personalize --adapters``; a GenerationLayout root)."""
        return join(self.root, "_generated", f"cfg-{guidance_scale:g}")

    def dropped_dir(self) -> str:
        """The generated positives the filter left out, one Parquet shard per product."""
        return join(self.root, "_dropped")

    def dropped_shard(self, product_id: str) -> str:
        return join(self.dropped_dir(), f"{product_id}.parquet")

    def manifest_dir(self) -> str:
        return join(self.root, "_manifest")

    def manifest_shard(self, product_id: str) -> str:
        return join(self.manifest_dir(), f"{product_id}.parquet")


@dataclass(frozen=True)
class PersonalEvalLayout(JobLayout):
    """What ``restage personalize evaluate`` writes under OUT."""

    ERRORS: ClassVar[str] = "_errors"
    SUMMARY: ClassVar[str] = "summary.json"

    def results(self) -> str:
        return join(self.root, "results.parquet")

    def products_dir(self) -> str:
        return join(self.root, "_products")

    def product_shard(self, product_id: str) -> str:
        return join(self.products_dir(), f"{product_id}.parquet")

    def inputs(self) -> str:
        return join(self.root, "_inputs.json")

    def report_dir(self) -> str:
        return join(self.root, "report")


@dataclass(frozen=True)
class GenerationLayout(JobLayout):
    """``restage generate``: ranked images of every product."""

    def images_dir(self, product_id: str) -> str:
        return join(self.root, "images", product_id)

    def image(self, product_id: str, image_id: str) -> str:
        return join(self.images_dir(product_id), f"{image_id}.png")

    def manifest_dir(self) -> str:
        return join(self.root, "manifest")

    def manifest_shard(self, product_id: str) -> str:
        return join(self.root, "manifest", f"{product_id}.parquet")


@dataclass(frozen=True)
class IndexLayout(JobLayout):
    """``restage index``: the staged-catalog index. Each catalog photo as decoded (its
    scene), its product's mask, one manifest shard per product (every photo, kept or left
    out with the reason) and the search index built from the kept rows."""

    def scene(self, product_id: str, image_id: str, ext: str) -> str:
        return join(self.root, "scenes", product_id, f"{image_id}.{ext}")

    def scenes_dir(self, product_id: str) -> str:
        return join(self.root, "scenes", product_id)

    def mask(self, product_id: str, image_id: str) -> str:
        return join(self.root, "masks", product_id, f"{image_id}.png")

    def masks_dir(self, product_id: str) -> str:
        return join(self.root, "masks", product_id)

    def manifest_dir(self) -> str:
        return join(self.root, "manifest")

    def manifest_shard(self, product_id: str) -> str:
        return join(self.root, "manifest", f"{product_id}.parquet")

    def index_dir(self) -> str:
        """The search index (ray_app/retrieval.py): what `restage stage --index` opens."""
        return join(self.root, "index")

    @staticmethod
    def fid_reference(index_dir: str) -> str:
        """The scenes' merged Inception state (ray_app/fid.save_side) beside the search
        index, that `restage stage` measures its staged images against (FID/KID)."""
        return join(index_dir, "fid_reference.npz")


@dataclass(frozen=True)
class StageLayout(JobLayout):
    """``restage stage``: each product's staged images (and their clips), one manifest
    shard per product with every retrieved scene, kept or not."""

    def images_dir(self, product_id: str) -> str:
        return join(self.root, "images", product_id)

    def image(self, product_id: str, stage_id: str, ext: str) -> str:
        return join(self.images_dir(product_id), f"{stage_id}.{ext}")

    def clip_stem(self, product_id: str, stage_id: str) -> str:
        """``{stem}.{mp4,webp,gif}``: the parallax clips of a staged image."""
        return join(self.root, "clips", product_id, stage_id)

    def clips_dir(self, product_id: str) -> str:
        return join(self.root, "clips", product_id)

    def manifest_dir(self) -> str:
        return join(self.root, "manifest")

    def manifest_shard(self, product_id: str) -> str:
        return join(self.root, "manifest", f"{product_id}.parquet")


@dataclass(frozen=True)
class EvaluationLayout(JobLayout):
    """``restage evaluate``: per-image and per-product metric tables (each a folder of
    Parquet shards, one per product, that any Parquet reader opens as one table), the
    tables' summary, the Inception features FID/KID are computed from, and the report."""

    # summary.json holds the metric tables; the job's own counts go beside it.
    SUMMARY: ClassVar[str] = "_job_summary.json"
    TABLES: ClassVar[str] = "summary.json"

    def per_image_dir(self) -> str:
        return join(self.root, "per_image.parquet")

    def per_image(self, product_id: str) -> str:
        return join(self.per_image_dir(), f"{product_id}.parquet")

    def per_product_dir(self) -> str:
        return join(self.root, "per_product.parquet")

    def per_product(self, product_id: str) -> str:
        return join(self.per_product_dir(), f"{product_id}.parquet")

    # The job skeleton's names for the per-image rows (pipelines/_job.write_product).
    def manifest_dir(self) -> str:
        return self.per_image_dir()

    def manifest_shard(self, product_id: str) -> str:
        return self.per_image(product_id)

    def tables(self) -> str:
        return join(self.root, self.TABLES)

    def inputs(self) -> str:
        """What was evaluated (runs, references): a re-run must evaluate the same."""
        return join(self.root, "_evaluated.json")

    def report_dir(self) -> str:
        return join(self.root, "report")


@dataclass(frozen=True)
class RunLayout:
    """``restage run``: the three jobs chained under one root."""

    root: str

    @property
    def augment(self) -> AugmentLayout:
        return AugmentLayout(join(self.root, "augment"))

    @property
    def adapters(self) -> AdapterLayout:
        return AdapterLayout(join(self.root, "adapters"))

    @property
    def generations(self) -> GenerationLayout:
        return GenerationLayout(join(self.root, "generations"))


def write_errors(layout: JobLayout, name: str, rows: Iterable[Any]) -> str | None:
    """Write (or replace) an errors shard; removes a stale shard when there are no errors."""
    from ray_app.records import errors_table  # records imports storage

    rows = list(rows)
    uri = layout.errors_shard(name)
    if not rows:
        remove(uri)
        return None
    return write_parquet(uri, errors_table(rows))
