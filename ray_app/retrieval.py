"""Nearest-neighbour search over catalog embeddings: the staged-catalog index of
``restage stage`` (retrieval-assisted copy-paste staging, arXiv 2307.15326).

The index takes embeddings in (no models here): one row per staged catalog image, with its
``image_id``, ``product_id``, ``category``, L2-normalised ``embedding`` and whatever other
fields the caller stores (the stage job keeps box, ground line and aspect there). Similarity
is the inner product of unit vectors, i.e. cosine similarity, as in the paper.

An index is a folder, every file written through ``ray_app.storage`` (any fsspec URI)::

    OUT/rows/part-00000.parquet ...   the rows (ROW_SCHEMA + the caller's fields); row i is
                                      the i-th row of the shards in name order
    OUT/ann.faiss                     the HNSW graph and its vectors (kind "ann" only)
    OUT/index.json                    IndexMeta, written last: an index without it is not
                                      whole and is not opened

Below ``exact_below`` rows the index is exact: a chunked matmul over all rows (memory bounded
by ``_SCAN_FLOATS``). From ``exact_below`` on it is approximate: faiss's HNSW with inner
product (``IndexHNSWFlat``, or ``IndexHNSWSQ`` with fp16 codes). ``Index.search`` returns the
same typed ``Hit`` lists for both.

Memory at 10^7 catalog images (what ``Index.open`` holds):

- vectors, float32: 10^7 x 512 x 4 B = 20.5 GB; 10^7 x 768 x 4 B = 30.7 GB.
- vectors, float16 (``dtype="float16"``, implemented: numpy float16 for exact, faiss's fp16
  scalar quantizer for HNSW): half of that, 10.2 GB (512) / 15.4 GB (768), for a loss in
  similarity of ~1e-3 (recall@10 against exact the same as float32's in the bench).
- the HNSW graph, M=32 (the default): level 0 holds 2M = 64 neighbour ids of 4 B = 256 B per
  vector; the upper levels add ~1/(M-1) of a level of M ids (~4 B), plus the level table and
  offsets (~12 B): ~272 B per vector (272.2 B measured by bench/stage.py retrieval), 2.7 GB
  at 10^7, whatever the dimension.
- the rows without their embeddings: ids, category, the caller's fields, ~100-200 B per row
  as Arrow, 1-2 GB.

So at 10^7 x 768: ~34 GB float32 or ~19 GB float16 with HNSW (one node, or one Ray actor
with that much memory; shard the catalog by category beyond that). int8 codes (faiss QT_8bit,
a quarter of float32: 7.7 GB at 768) are not offered: they need a training pass over the
data and cost recall; add them as a third ``dtype`` when a catalog needs it. Building holds
the float32 vectors once more than searching does (the rows table and the faiss copy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_app import storage
from ray_app.records import INDEX_ROW_SCHEMA

# The columns every index row has (records.py keeps the schemas of what jobs write); any
# other column of the input is kept as the row's fields.
ROW_SCHEMA = INDEX_ROW_SCHEMA
BASE_COLUMNS = tuple(ROW_SCHEMA.names)

FORMAT_VERSION = 1
INDEX_JSON = "index.json"
ROWS_DIR = "rows"
ANN_FILE = "ann.faiss"
METRIC = "inner_product"
NORM_TOLERANCE = 1e-3
VectorDtype = Literal["float32", "float16"]
_DTYPES = ("float32", "float16")

# Exact scans compute at most this many similarities at once (64 MiB of float32).
_SCAN_FLOATS = 1 << 24
# ANN with filters: first fetch = the rows expected to be needed (k and the excluded rows,
# divided by the fraction of rows that pass) times this margin.
_OVERFETCH = 2
# A query whose passing rows are at most this many is always scanned exactly.
_SUBSET_SCAN_MIN = 1024


class IndexFormatError(ValueError):
    """An index folder this version cannot read (missing, partial, or another format)."""


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError(
            "approximate indexes need faiss: pip install faiss-cpu (a restage dependency)"
        ) from None
    return faiss


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class HnswParams:
    """The HNSW graph's parameters (faiss ``IndexHNSW``). Even a cheap graph (m=16,
    ef_construction=40, ef_search=128) reaches recall@10 >= 0.95 against exact search on
    clustered 10^5 x 64 data (tests/test_retrieval.py); the defaults leave a margin for real
    catalogs. Raise ``ef_search`` first if a catalog's recall is lower (a search parameter:
    no rebuild, and ``Index.search(ef_search=...)`` overrides it per call)."""

    m: int = 32  # neighbours per node and level (2m on level 0): memory ~ 8m B per vector
    ef_construction: int = 80  # candidate list while building: build time vs graph quality
    # candidate list while searching (raised to the rows fetched); 128: recall@10 1.0 vs
    # 0.97 at 64 on 10^5 x 128 (bench/results/stage_retrieval_*), for ~0.1 ms a query
    ef_search: int = 128

    def __post_init__(self) -> None:
        for name in ("m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ValueError(f"HnswParams.{name} must be an integer >= 2, got {value!r}")


@dataclass(frozen=True)
class IndexMeta:
    """``index.json``: what an index is, how it was built, and with which embedding model."""

    format_version: int
    dim: int
    count: int
    metric: str
    kind: Literal["exact", "ann"]
    dtype: VectorDtype
    model: str  # the embedding model's name, given by the caller; queries must use it too
    build_seconds: float
    exact_below: int
    shards: tuple[str, ...]  # file names under rows/, in row order
    fields: tuple[str, ...]  # the caller's columns beyond BASE_COLUMNS
    library: dict[str, str] | None = None  # {"name": "faiss-cpu", "version": ...} for ann
    hnsw: HnswParams | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"], d["fields"] = list(self.shards), list(self.fields)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], uri: str = "index.json") -> IndexMeta:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"{uri} has format_version {version!r}; this restage reads version "
                f"{FORMAT_VERSION}: rebuild the index with ray_app.retrieval.build_index"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise IndexFormatError(
                f"{uri} has unknown keys {unknown}; known: {sorted(known)}. Rebuild the index "
                "with this version's build_index"
            )
        fields = cls.__dataclass_fields__
        missing = sorted(k for k, f in fields.items() if k not in d and f.default is MISSING)
        if missing:
            raise IndexFormatError(f"{uri} lacks keys {missing}: rebuild the index")
        d = dict(d)
        d["shards"], d["fields"] = tuple(d["shards"]), tuple(d["fields"])
        d["hnsw"] = HnswParams(**d["hnsw"]) if d.get("hnsw") else None
        return cls(**d)


@dataclass(frozen=True)
class Hit:
    """One retrieved catalog row."""

    row: int  # the row's position in the index (Index.rows)
    image_id: str
    product_id: str
    category: str | None
    similarity: float  # cosine similarity to the query (approximate for fp16 vectors)
    fields: dict[str, Any] = field(default_factory=dict)  # the caller's stored fields


# --------------------------------------------------------------------------- building


def _as_tables(source: str | pa.Table | Sequence[str | pa.Table]) -> list[pa.Table]:
    items = [source] if isinstance(source, (str, pa.Table)) else list(source)
    if not items:
        raise ValueError("build_index: shards_uri_or_tables is empty: pass a URI or tables")
    tables = []
    for item in items:
        if isinstance(item, pa.Table):
            tables.append(item)
        elif isinstance(item, str):
            tables.append(storage.read_parquet(storage.normalize_uri(item)))
        else:
            raise TypeError(
                f"build_index: shards_uri_or_tables holds a {type(item).__name__}: pass "
                "Parquet URIs (a file or a folder of shards) or pyarrow Tables"
            )
    return tables


def _conform(table: pa.Table, where: str) -> pa.Table:
    """The table with BASE_COLUMNS first, cast to ROW_SCHEMA's types; other columns kept."""
    missing = [c for c in BASE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"build_index: {where} lacks columns {missing} (has {table.column_names}); every "
            f"row needs {list(BASE_COLUMNS)}"
        )
    columns, names = [], []
    for f in ROW_SCHEMA:
        col = table.column(f.name)
        try:
            col = col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(
                f"build_index: {where} column {f.name!r} is {col.type}, needs {f.type}: {exc}"
            ) from None
        if not f.nullable and col.null_count:
            raise ValueError(
                f"build_index: {where} column {f.name!r} has {col.null_count} nulls: every "
                f"row needs a {f.name}"
            )
        columns.append(col)
        names.append(f.name)
    for name in table.column_names:
        if name not in BASE_COLUMNS:
            columns.append(table.column(name))
            names.append(name)
    return pa.table(columns, names=names)


def _vectors(table: pa.Table) -> np.ndarray:
    """The embedding column as a (rows, dim) float32 array, checked."""
    col = table.column("embedding").combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    dims = np.unique(lengths)
    if dims.size != 1 or dims[0] < 1:
        raise ValueError(
            f"build_index: embeddings have lengths {dims[:10].tolist()}: all rows need one "
            "embedding of the same dimension (one model for the whole index)"
        )
    vectors = pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(-1, int(dims[0]))
    _check_finite_unit(vectors, "embedding")
    return vectors


def _check_finite_unit(x: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{name} rows {np.flatnonzero(bad)[:10].tolist()} hold NaN or infinite values: "
            "drop those rows or re-embed their images"
        )
    norms = np.linalg.norm(x, axis=1)
    off = np.abs(norms - 1) > NORM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{name} is not L2-normalised ({int(off.sum())} rows, e.g. row {i} has norm "
            f"{norms[i]:.4g}): divide each row by its norm, x / np.linalg.norm(x, axis=1, "
            "keepdims=True)"
        )


def _build_hnsw(vectors: np.ndarray, params: HnswParams, dtype: VectorDtype):
    faiss = _faiss()
    dim = vectors.shape[1]
    if dtype == "float16":
        index = faiss.IndexHNSWSQ(
            dim, faiss.ScalarQuantizer.QT_fp16, params.m, faiss.METRIC_INNER_PRODUCT
        )
        index.train(vectors[: min(len(vectors), 1 << 16)])  # fp16 has nothing to learn
    else:
        index = faiss.IndexHNSWFlat(dim, params.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    index.hnsw.efSearch = params.ef_search
    index.add(vectors)
    return index


def build_index(
    shards_uri_or_tables: str | pa.Table | Sequence[str | pa.Table],
    out_uri: str,
    *,
    exact_below: int,
    model: str,
    hnsw: HnswParams | None = None,
    dtype: VectorDtype = "float32",
    rows_per_shard: int = 500_000,
) -> IndexMeta:
    """Write the index folder ``out_uri`` from embedding rows (ROW_SCHEMA + any fields).

    ``shards_uri_or_tables``: a Parquet file or folder of shards (any fsspec URI), a pyarrow
    Table, or a list of those. ``exact_below``: below this many rows the index is exact,
    from it on an HNSW graph is built too. ``model``: the embedding model's name, recorded
    so that queries from another model are refused (``Index.open(expect_model=...)``).
    ``dtype``: how the vectors are held in memory when searching (the rows keep float32).
    An existing index at ``out_uri`` is replaced; its index.json is removed first, so a
    build that dies half-way leaves no index that opens.
    """
    if not isinstance(exact_below, int) or isinstance(exact_below, bool) or exact_below < 1:
        raise ValueError(
            f"build_index: exact_below must be an integer >= 1, got {exact_below!r} (e.g. "
            "50_000: exact below, HNSW from there on)"
        )
    if not isinstance(model, str) or not model:
        raise ValueError(
            f"build_index: model must name the embedding model, got {model!r} "
            "(e.g. 'open_clip:ViT-B-32/laion2b_s34b_b79k')"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"build_index: dtype must be one of {_DTYPES}, got {dtype!r}")
    if rows_per_shard < 1:
        raise ValueError(f"build_index: rows_per_shard must be >= 1, got {rows_per_shard!r}")
    hnsw = hnsw or HnswParams()
    start = time.perf_counter()

    tables = [_conform(t, f"input {i}") for i, t in enumerate(_as_tables(shards_uri_or_tables))]
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(
            f"build_index: the inputs' extra fields do not agree: {exc}; give each field one "
            "type in every shard"
        ) from None
    if table.num_rows == 0:
        raise ValueError("build_index: the inputs hold no rows: pass at least one embedding")
    if pc.count_distinct(table.column("image_id")).as_py() != table.num_rows:
        counts = pc.value_counts(table.column("image_id"))
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise ValueError(
            f"build_index: image_id values repeat ({dup}): each catalog image must appear once"
        )
    vectors = _vectors(table)
    count, dim = vectors.shape

    out = storage.normalize_uri(out_uri)
    # index.json is the completion marker: gone first, written last.
    storage.remove(storage.join(out, INDEX_JSON))
    storage.remove(storage.join(out, ROWS_DIR), recursive=True)
    storage.remove(storage.join(out, ANN_FILE))
    shards = []
    for i, offset in enumerate(range(0, count, rows_per_shard)):
        name = f"part-{i:05d}.parquet"
        storage.write_parquet(
            storage.join(out, ROWS_DIR, name), table.slice(offset, rows_per_shard)
        )
        shards.append(name)

    kind = "ann" if count >= exact_below else "exact"
    library = None
    if kind == "ann":
        faiss = _faiss()
        index = _build_hnsw(vectors, hnsw, dtype)
        with storage.open_file(storage.join(out, ANN_FILE), "wb") as f:
            # Streamed: serialising to one bytes object would hold the index twice.
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        library = {"name": "faiss-cpu", "version": faiss.__version__}
    meta = IndexMeta(
        format_version=FORMAT_VERSION,
        dim=int(dim),
        count=int(count),
        metric=METRIC,
        kind=kind,
        dtype=dtype,
        model=model,
        build_seconds=round(time.perf_counter() - start, 3),
        exact_below=exact_below,
        shards=tuple(shards),
        fields=tuple(c for c in table.column_names if c not in BASE_COLUMNS),
        library=library,
        hnsw=hnsw if kind == "ann" else None,
    )
    storage.write_json(storage.join(out, INDEX_JSON), meta.to_dict())
    return meta


# --------------------------------------------------------------------------- searching

RowFilter = Callable[[np.ndarray], np.ndarray] | np.ndarray


@dataclass
class _Filters:
    """One search's filters, per query: category code (-1: none, -2: not in the index),
    excluded product codes, and a filter over rows shared by all queries."""

    cat: np.ndarray  # (nq,) int
    excluded: list[np.ndarray]  # per query, product codes
    mask: np.ndarray | None  # (rows,) bool
    func: Callable[[np.ndarray], np.ndarray] | None

    def any(self) -> bool:
        return (
            bool((self.cat != -1).any())
            or any(e.size for e in self.excluded)
            or self.mask is not None
            or self.func is not None
        )


class Index:
    """A retrieval index opened from its folder (``Index.open``); ``search`` is
    thread-safe (faiss releases the GIL and takes its parameters per call)."""

    def __init__(self, meta: IndexMeta, rows: pa.Table, vectors: np.ndarray | None, ann):
        self.meta = meta
        self.rows = rows  # the index's rows without their embeddings
        self._ann = ann
        # (count, dim) in meta.dtype; for ANN a view of faiss's own storage (no copy).
        self._vectors = vectors if ann is None else _storage_view(ann, meta)
        cat = rows.column("category").combine_chunks().dictionary_encode()
        self._cat_values = cat.dictionary
        self._cat_codes = cat.indices.fill_null(-3).to_numpy().astype(np.int32)
        prod = rows.column("product_id").combine_chunks().dictionary_encode()
        self._prod_values = prod.dictionary
        self._prod_codes = prod.indices.to_numpy().astype(np.int32)
        self._cat_counts = np.bincount(self._cat_codes[self._cat_codes >= 0]).astype(np.int64)
        self._prod_counts = np.bincount(self._prod_codes).astype(np.int64)

    def __len__(self) -> int:
        return self.meta.count

    @property
    def dim(self) -> int:
        return self.meta.dim

    @classmethod
    def open(cls, uri: str, *, expect_model: str | None = None) -> Index:
        """Open the index folder at ``uri``. ``expect_model``: the embedding model the
        queries come from; an index built from another one is refused."""
        root = storage.normalize_uri(uri)
        meta_uri = storage.join(root, INDEX_JSON)
        if not storage.exists(meta_uri):
            raise IndexFormatError(
                f"{uri} has no {INDEX_JSON}: not an index, or its build did not finish; "
                "build it with ray_app.retrieval.build_index"
            )
        meta = IndexMeta.from_dict(storage.read_json(meta_uri), meta_uri)
        if expect_model is not None and expect_model != meta.model:
            raise ValueError(
                f"Index.open: the index at {uri} holds embeddings of {meta.model!r}, the "
                f"queries come from expect_model={expect_model!r}: embed the queries with "
                f"{meta.model!r} or rebuild the index with {expect_model!r}"
            )
        columns = [*BASE_COLUMNS, *meta.fields]
        if meta.kind == "ann":  # the vectors live in the faiss index
            columns.remove("embedding")
        parts = []
        for name in meta.shards:
            with storage.open_file(storage.join(root, ROWS_DIR, name)) as f:
                parts.append(pq.read_table(f, columns=columns))
        rows = pa.concat_tables(parts)
        if rows.num_rows != meta.count:
            raise IndexFormatError(
                f"{uri}: the rows hold {rows.num_rows} rows, index.json says {meta.count}: "
                "the folder was changed after the build; rebuild the index"
            )
        vectors = ann = None
        if meta.kind == "exact":
            col = rows.column("embedding").combine_chunks()
            flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
            vectors = flat.reshape(meta.count, meta.dim).astype(meta.dtype, copy=False)
            rows = rows.drop_columns(["embedding"])
        else:
            faiss = _faiss()
            with storage.open_file(storage.join(root, ANN_FILE)) as f:
                ann = faiss.read_index(faiss.PyCallbackIOReader(f.read))
            if ann.ntotal != meta.count or ann.d != meta.dim:
                raise IndexFormatError(
                    f"{uri}: {ANN_FILE} holds {ann.ntotal} x {ann.d}, index.json says "
                    f"{meta.count} x {meta.dim}: rebuild the index"
                )
        return cls(meta, rows, vectors, ann)

    # ----------------------------------------------------------------- validation

    def _check_queries(self, queries: Any) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(
                f"search: queries has shape {np.shape(queries)}, the index holds dim "
                f"{self.dim} ({self.meta.model!r}): pass an array (n, {self.dim}) of that "
                "model's embeddings"
            )
        if not np.issubdtype(q.dtype, np.number):
            raise ValueError(f"search: queries has dtype {q.dtype}: pass float embeddings")
        q = np.ascontiguousarray(q, dtype=np.float32)
        _check_finite_unit(q, "search: queries")
        return q

    def _filters(self, nq: int, category, exclude_product_ids, filter) -> _Filters:
        if category is None or isinstance(category, str):
            categories = [category] * nq
        else:
            categories = list(category)
            if len(categories) != nq:
                raise ValueError(
                    f"search: category has {len(categories)} entries for {nq} queries: pass "
                    "one category (or None) per query, or a single one for all"
                )
        cat = np.full(nq, -1, np.int32)
        named = [i for i, c in enumerate(categories) if c is not None]
        if named:
            names = pa.array([categories[i] for i in named], pa.string())
            codes = pc.index_in(names, value_set=self._cat_values)
            cat[named] = codes.fill_null(-2).to_numpy()
        if exclude_product_ids is None:
            excluded = [np.empty(0, np.int32)] * nq
        else:
            if (
                isinstance(exclude_product_ids, (str, set, frozenset))
                or len(exclude_product_ids) != nq
            ):
                raise ValueError(
                    "search: exclude_product_ids must hold one collection of product ids per "
                    f"query ({nq}), e.g. [{{'p1'}}, {{'p2'}}]: a query's own product, whose "
                    "catalog images must not come back"
                )
            # One lookup for every query's ids (index_in hashes the product dictionary).
            lists = [
                [ids] if isinstance(ids, str) else list(ids or ()) for ids in exclude_product_ids
            ]
            flat = pa.array([i for ids in lists for i in ids], pa.string())
            codes = pc.index_in(flat, value_set=self._prod_values).fill_null(-1).to_numpy()
            ends = np.cumsum([len(ids) for ids in lists])
            excluded = [np.unique(c[c >= 0]).astype(np.int32) for c in np.split(codes, ends[:-1])]
        mask = func = None
        if callable(filter):
            func = filter
        elif filter is not None:
            mask = np.asarray(filter)
            if mask.dtype != bool or mask.shape != (len(self),):
                raise ValueError(
                    f"search: filter is an array of {mask.dtype} {mask.shape}: pass a bool "
                    f"mask over the index's {len(self)} rows, or a callable taking row "
                    "indices and returning a bool array"
                )
        return _Filters(cat, excluded, mask, func)

    def _passes(self, f: _Filters, qi: int, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` (row indices) query ``qi``'s filters let through."""
        ok = np.ones(rows.shape, bool)
        if f.cat[qi] != -1:
            ok &= self._cat_codes[rows] == f.cat[qi]
        if f.excluded[qi].size:
            ok &= ~np.isin(self._prod_codes[rows], f.excluded[qi])
        if f.mask is not None:
            ok &= f.mask[rows]
        if f.func is not None and ok.any():
            sub = np.asarray(f.func(rows[ok]), dtype=bool)
            if sub.shape != (int(ok.sum()),):
                raise ValueError(
                    f"search: filter returned shape {sub.shape} for {int(ok.sum())} row "
                    "indices: it must return one bool per row index it is given"
                )
            ok[ok] = sub
        return ok

    # ----------------------------------------------------------------- search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        category: str | Sequence[str | None] | None = None,
        exclude_product_ids: Sequence[Iterable[str]] | None = None,
        filter: RowFilter | None = None,
        ef_search: int | None = None,
        exact: bool = False,
    ) -> list[list[Hit]]:
        """The ``k`` most similar rows to each query, most similar first.

        ``category``: one for all queries or one per query (None: any). A row without a
        category matches no named category. ``exclude_product_ids``: per query, products
        whose rows must not come back (the query's own). ``filter``: a bool mask over the
        rows, or a callable from row indices (int64 array) to a bool array. Filters never
        cost hits: a query gets ``k`` hits whenever ``k`` rows pass. ``ef_search``: the
        HNSW candidate list (default: the index's); ``exact``: scan every row even in an
        ANN index (the baseline of recall measurements).
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"search: k must be an integer >= 1, got {k!r}")
        if ef_search is not None and (not isinstance(ef_search, int) or ef_search < 1):
            raise ValueError(f"search: ef_search must be an integer >= 1, got {ef_search!r}")
        q = self._check_queries(queries)
        f = self._filters(len(q), category, exclude_product_ids, filter)
        if self._ann is None or exact:
            ids, sims = self._scan(q, int(k), f)
        else:
            ids, sims = self._ann_search(q, int(k), f, ef_search or self.meta.hnsw.ef_search)
        return self._hits(ids, sims)

    def _chunk(self, start: int, stop: int) -> np.ndarray:
        return self._vectors[start:stop].astype(np.float32, copy=False)

    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored embeddings of ``rows`` (float32; as held in memory, so an fp16 index
        gives its fp16 values): queries by a catalog row need no second read of the shards."""
        return self._rows_vectors(np.asarray(rows, np.int64))

    def _rows_vectors(self, rows: np.ndarray) -> np.ndarray:
        return self._vectors[rows].astype(np.float32, copy=False)

    def _scan(self, q: np.ndarray, k: int, f: _Filters):
        """Exact top-k of every query over all rows, chunk by chunk."""
        nq, n = len(q), len(self)
        best_s = np.full((nq, 0), -np.inf, np.float32)
        best_i = np.empty((nq, 0), np.int64)
        filtered = f.any()
        # Bounds both the similarities (nq x step) and the chunk's vectors (step x dim).
        step = max(1024, _SCAN_FLOATS // (nq + self.dim))
        for start in range(0, n, step):
            stop = min(n, start + step)
            s = q @ self._chunk(start, stop).T
            if filtered:
                rows = np.arange(start, stop)
                for qi in range(nq):
                    s[qi, ~self._passes(f, qi, rows)] = -np.inf
            best_s, best_i = _merge_topk(best_s, best_i, s, start, k)
        return _finite(best_i, best_s)

    def _scan_rows(self, qv: np.ndarray, k: int, rows: np.ndarray):
        """Exact top-k of one query over the given rows."""
        best_s = np.full((1, 0), -np.inf, np.float32)
        best_i = np.empty((1, 0), np.int64)
        step = max(1024, _SCAN_FLOATS // self.dim)
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            s = (self._rows_vectors(part) @ qv)[None, :]
            best_s, best_i = _merge_topk(best_s, best_i, s, 0, k, ids=part)
        ids, sims = _finite(best_i, best_s)
        return ids[0], sims[0]

    def _passing_count(self, f: _Filters, qi: int) -> int | None:
        """At most how many rows query ``qi``'s filters let through (a lower bound where
        exclusions apply: an excluded product's rows are counted as if in the category),
        when known without a pass over the rows."""
        if f.func is not None or f.mask is not None:
            return None
        if f.cat[qi] == -2:  # a category the index does not hold
            return 0
        n = len(self) if f.cat[qi] == -1 else int(self._cat_counts[f.cat[qi]])
        return n - int(self._prod_counts[f.excluded[qi]].sum())

    def _ann_search(self, q: np.ndarray, k: int, f: _Filters, ef: int):
        """HNSW top-k with filters applied to the candidates.

        A filter can drop most of HNSW's candidates, so each query over-fetches: it asks
        for (k + its excluded rows) / (fraction of rows passing) x _OVERFETCH candidates, and
        when fewer than k pass, asks again for twice as many (the candidate list ef grows
        with the fetch so that deeper results are real neighbours). Once a fetch reaches
        its cap (every row, or sqrt(m k n): as deep as HNSW is cheaper than a scan), or when a query's passing rows are few (a deep HNSW search would cost
        more than reading them), its passing rows are scanned exactly: a query
        gets k hits whenever k rows pass, never fewer because the graph was searched too
        shallowly.
        """
        faiss = _faiss()
        n, nq, m = len(self), len(q), self.meta.hnsw.m
        out_i: list[np.ndarray | None] = [None] * nq
        out_s: list[np.ndarray | None] = [None] * nq
        fetch = np.full(nq, k, np.int64)
        scan: list[int] = []
        for qi in range(nq):
            passing = self._passing_count(f, qi)
            if passing is None:  # a mask or callable: the fraction passing is unknown
                fetch[qi] = k * 4 * _OVERFETCH
            elif f.cat[qi] == -2:
                out_i[qi], out_s[qi] = np.empty(0, np.int64), np.empty(0, np.float32)
            elif passing < n and passing <= max(_SUBSET_SCAN_MIN, math.sqrt(m * k * n)):
                # A scan reads `passing` vectors; HNSW needs a fetch of ~k n / passing, and
                # visits ~m candidates per fetched row: the scan is cheaper (and exact) when
                # passing^2 <= m k n (10^5 rows, k 10, m 32: ~5,700; 10^7 rows: ~57,000).
                scan.append(qi)
            elif passing < n:
                ex = int(self._prod_counts[f.excluded[qi]].sum())
                fetch[qi] = math.ceil((k + ex) * n / passing) * _OVERFETCH
        # The deepest fetch: beyond it an HNSW search costs about what the scan does.
        cap = min(n, max(4 * _SUBSET_SCAN_MIN, int(math.sqrt(m * k * n))))
        pending = [qi for qi in range(nq) if out_i[qi] is None and qi not in scan]
        while pending:
            retry = []
            # One faiss call per fetch size (a power-of-two multiple keeps the groups few).
            sizes = {int(min(fetch[qi], cap)) for qi in pending}
            for size in sorted(sizes):
                group = [qi for qi in pending if min(fetch[qi], cap) == size]
                params = faiss.SearchParametersHNSW(efSearch=max(ef, size))
                sims, ids = self._ann.search(q[group], size, params=params)
                for j, qi in enumerate(group):
                    valid = ids[j] >= 0
                    cand, cs = ids[j][valid], sims[j][valid]
                    ok = self._passes(f, qi, cand)
                    if ok.sum() >= k:
                        out_i[qi], out_s[qi] = cand[ok][:k], cs[ok][:k]
                    elif size >= cap:
                        scan.append(qi)  # fetched as deep as is worth it, still short
                    else:
                        fetch[qi] = min(fetch[qi] * 2, cap)
                        retry.append(qi)
            pending = retry
        for qi in scan:
            if f.cat[qi] >= 0:  # the category's rows, then the other filters on them
                rows = np.flatnonzero(self._cat_codes == f.cat[qi])
            else:
                rows = np.arange(n, dtype=np.int64)
            rows = rows[self._passes(f, qi, rows)]
            out_i[qi], out_s[qi] = self._scan_rows(q[qi], k, rows)
        return out_i, out_s

    def _hits(self, ids, sims) -> list[list[Hit]]:
        flat = np.concatenate([np.asarray(i, np.int64) for i in ids]) if len(ids) else []
        rows = self.rows.take(pa.array(flat, pa.int64())).to_pylist() if len(flat) else []
        out, pos = [], 0
        for qi_ids, qi_sims in zip(ids, sims, strict=True):
            hits = []
            for row_id, sim in zip(qi_ids, qi_sims, strict=True):
                row = rows[pos]
                pos += 1
                hits.append(
                    Hit(
                        row=int(row_id),
                        image_id=row["image_id"],
                        product_id=row["product_id"],
                        category=row["category"],
                        similarity=float(sim),
                        fields={name: row[name] for name in self.meta.fields},
                    )
                )
            out.append(hits)
        return out


def _storage_view(ann, meta: IndexMeta) -> np.ndarray:
    """The vectors inside an HNSW index's storage as a numpy view (flat float32 or fp16
    codes are the vectors themselves), for exact scans without a second copy. The view
    lives as long as ``ann``: the Index holds both."""
    faiss = _faiss()
    store = faiss.downcast_index(ann.storage)
    width = np.dtype(meta.dtype).itemsize
    if store.code_size != meta.dim * width:
        raise IndexFormatError(
            f"{ANN_FILE} stores {store.code_size} B per vector, not {meta.dtype} x {meta.dim}: "
            "rebuild the index"
        )
    raw = faiss.rev_swig_ptr(store.codes.data(), meta.count * store.code_size)
    return raw.view(meta.dtype).reshape(meta.count, meta.dim)


def set_threads(threads: int) -> None:
    """faiss's OpenMP threads for this process (building and ANN search). Its default is
    every core of the machine: set a Ray actor's num_cpus, or 1 on a busy machine, where
    spinning OpenMP threads slow each other down."""
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"set_threads: threads must be an integer >= 1, got {threads!r}")
    _faiss().omp_set_num_threads(threads)


def _merge_topk(best_s, best_i, s, offset, k, ids=None):
    """The top k of the running best and a new block of similarities (rows ``offset +
    column``, or ``ids[column]``), sorted by similarity then row."""
    cols = np.arange(s.shape[1]) + offset if ids is None else np.asarray(ids, np.int64)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s, cols = np.take_along_axis(s, part, axis=1), cols[part]
    else:
        cols = np.broadcast_to(cols, s.shape)
    all_s = np.concatenate([best_s, s], axis=1)
    all_i = np.concatenate([best_i, cols], axis=1)
    order = np.lexsort((all_i, -all_s), axis=1)[:, :k]
    return np.take_along_axis(all_s, order, axis=1), np.take_along_axis(all_i, order, axis=1)


def _finite(best_i: np.ndarray, best_s: np.ndarray):
    """Per query, the hits that passed the filters (filtered-out rows score -inf)."""
    ids, sims = [], []
    for i, s in zip(best_i, best_s, strict=True):
        keep = np.isfinite(s)
        ids.append(i[keep])
        sims.append(s[keep])
    return ids, sims


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class RetrievalScores:
    """precision@k and recall@k against category labels (the paper's retrieval measure):
    a hit is relevant when its category is the query's. Means over queries."""

    k: int
    precision: float
    recall: float  # over the queries with at least one relevant row
    per_query_precision: tuple[float, ...]
    per_query_recall: tuple[float, ...]  # NaN where a query has no relevant row


def precision_recall_at_k(
    hits: Sequence[Sequence[Hit]],
    query_categories: Sequence[str | None],
    relevant_counts: Sequence[int] | Mapping[str, int],
    *,
    k: int | None = None,
) -> RetrievalScores:
    """precision@k = relevant hits in the top k / k; recall@k = relevant hits in the top k /
    the query's relevant rows in the catalog (``relevant_counts``: per query, or per
    category; count what the query could have retrieved, i.e. without its own product's
    rows). ``k`` defaults to the longest hit list; a shorter list counts its missing hits as
    irrelevant."""
    if len(query_categories) != len(hits):
        raise ValueError(
            f"precision_recall_at_k: query_categories has {len(query_categories)} entries for "
            f"{len(hits)} hit lists: pass one category per query"
        )
    if isinstance(relevant_counts, Mapping):
        counts = [relevant_counts.get(c, 0) if c is not None else 0 for c in query_categories]
    else:
        counts = list(relevant_counts)
        if len(counts) != len(hits):
            raise ValueError(
                f"precision_recall_at_k: relevant_counts has {len(counts)} entries for "
                f"{len(hits)} queries: pass one count per query, or a mapping category->count"
            )
    k = max((len(h) for h in hits), default=0) if k is None else k
    if k < 1:
        raise ValueError(f"precision_recall_at_k: k must be >= 1, got {k!r} (or hits are empty)")
    precision, recall = [], []
    for qh, cat, total in zip(hits, query_categories, counts, strict=True):
        rel = sum(1 for h in qh[:k] if cat is not None and h.category == cat)
        precision.append(rel / k)
        recall.append(rel / total if total > 0 else math.nan)
    valid = [r for r in recall if not math.isnan(r)]
    return RetrievalScores(
        k=k,
        precision=float(np.mean(precision)) if precision else math.nan,
        recall=float(np.mean(valid)) if valid else math.nan,
        per_query_precision=tuple(precision),
        per_query_recall=tuple(recall),
    )


__all__ = [
    "BASE_COLUMNS",
    "FORMAT_VERSION",
    "ROW_SCHEMA",
    "Hit",
    "HnswParams",
    "Index",
    "IndexFormatError",
    "IndexMeta",
    "RetrievalScores",
    "build_index",
    "precision_recall_at_k",
    "set_threads",
]
