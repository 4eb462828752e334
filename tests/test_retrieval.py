"""The retrieval index (ray_app/retrieval.py): exact search against brute force, filters that
never cost hits, ANN recall against exact on 10^5 vectors, round trips, validation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from ray_app import storage
from ray_app.retrieval import (
    FORMAT_VERSION,
    INDEX_JSON,
    Hit,
    HnswParams,
    Index,
    IndexFormatError,
    build_index,
    precision_recall_at_k,
    set_threads,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "test-embedder"
# Fast to build on two busy cores, and still recall@10 >= 0.95 here.
FAST = HnswParams(m=16, ef_construction=40, ef_search=128)
CATEGORIES = ("chair", "lamp", "sofa", "table", "rug")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int, noise: float = 0.5) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (real embeddings cluster too)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)]
    return unit(x + noise * rng.standard_normal((n, dim)).astype(np.float32))


def catalog(vectors: np.ndarray, images_per_product: int = 3, seed: int = 0) -> pa.Table:
    """Rows of a catalog: products of a few images each, a category per product (some None),
    and a caller's field (the stage job's box) that must come back with every hit."""
    n, dim = vectors.shape
    rng = np.random.default_rng(seed)
    product = np.arange(n) // images_per_product
    cats = [CATEGORIES[p % len(CATEGORIES)] if p % 11 else None for p in product]
    return pa.table(
        {
            "image_id": [f"img-{i}" for i in range(n)],
            "product_id": [f"p{p}" for p in product],
            "category": pa.array(cats, pa.string()),
            "embedding": pa.ListArray.from_arrays(
                np.arange(0, n * dim + 1, dim, dtype=np.int32), vectors.reshape(-1)
            ),
            "box": pa.ListArray.from_arrays(
                np.arange(0, n * 4 + 1, 4, dtype=np.int32), rng.integers(0, 100, n * 4)
            ),
        }
    )


def brute_force(index_vectors: np.ndarray, queries: np.ndarray, k: int, allowed=None):
    s = queries @ index_vectors.T
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    vectors = clustered(3000, 32, 20, seed=1)
    table = catalog(vectors)
    uri = str(tmp_path_factory.mktemp("idx") / "small")
    build_index(table, uri, exact_below=10_000, model=MODEL, rows_per_shard=1000)
    return vectors, table, Index.open(uri)


def test_exact_search_equals_brute_force(small):
    vectors, table, index = small
    assert index.meta.kind == "exact" and index.meta.shards == (
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    )
    queries = clustered(50, 32, 20, seed=2)
    hits = index.search(queries, 10)
    expected, s = brute_force(vectors, queries, 10)
    assert [[h.row for h in qh] for qh in hits] == expected.tolist()
    for qi, qh in enumerate(hits):
        np.testing.assert_allclose([h.similarity for h in qh], s[qi, expected[qi]], rtol=1e-5)
        h = qh[0]
        row = table.slice(h.row, 1).to_pylist()[0]
        assert (h.image_id, h.product_id, h.category) == (
            row["image_id"],
            row["product_id"],
            row["category"],
        )
        assert h.fields == {"box": row["box"]}


def test_filters_are_respected_and_still_give_k_hits(small):
    vectors, table, index = small
    queries = clustered(20, 32, 20, seed=3)
    cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(20)]
    # Each query excludes the product of its nearest row: the query's "own" product.
    own = [table["product_id"][int(i)].as_py() for i in brute_force(vectors, queries, 1)[0][:, 0]]
    hits = index.search(queries, 10, category=cats, exclude_product_ids=[{p} for p in own])
    row_cats = np.array(table["category"].to_pylist(), dtype=object)
    row_prods = np.array(table["product_id"].to_pylist(), dtype=object)
    allowed = np.stack([(row_cats == c) & (row_prods != p) for c, p in zip(cats, own, strict=True)])
    expected, _ = brute_force(vectors, queries, 10, allowed)
    for qi, qh in enumerate(hits):
        assert len(qh) == 10
        assert all(h.category == cats[qi] and h.product_id != own[qi] for h in qh)
        assert [h.row for h in qh] == expected[qi].tolist()

    # A mask and a callable over rows; a category the index lacks gives no hits.
    mask = np.arange(len(index)) % 2 == 0
    for f in (mask, lambda rows: rows % 2 == 0):
        got = index.search(queries[:3], 5, filter=f)
        assert all(len(qh) == 5 and all(h.row % 2 == 0 for h in qh) for qh in got)
    assert index.search(queries[:2], 5, category="no-such") == [[], []]
    # Fewer rows pass than k: all of them, no padding.
    only = np.zeros(len(index), bool)
    only[[5, 7, 9]] = True
    assert sorted(h.row for h in index.search(queries[:1], 10, filter=only)[0]) == [5, 7, 9]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """10^5 x 64, clustered: the ANN index and the exact one over the same rows."""
    n, dim = 100_000, 64
    vectors = clustered(n, dim, 1000, seed=4)
    table = catalog(vectors, images_per_product=4)
    root = tmp_path_factory.mktemp("big")
    threads = faiss.omp_get_max_threads()
    set_threads(1)  # the CI machine is busy: spinning OpenMP threads slow each other down
    try:
        start = time.perf_counter()
        meta = build_index(table, str(root / "ann"), exact_below=50_000, model=MODEL, hnsw=FAST)
        build = time.perf_counter() - start
        yield vectors, table, Index.open(str(root / "ann")), meta, build
    finally:
        set_threads(threads)


def test_ann_matches_exact_on_1e5_vectors(big):
    vectors, _, index, meta, build = big
    assert meta.kind == "ann" and meta.library["name"] == "faiss-cpu"
    assert meta.hnsw == FAST and meta.count == len(vectors)
    rng = np.random.default_rng(5)
    noise = 0.1 * rng.standard_normal((200, 64)).astype(np.float32)
    queries = unit(vectors[rng.choice(len(vectors), 200, replace=False)] + noise)
    ann = index.search(queries, 10)
    exact = index.search(queries, 10, exact=True)
    expected, _ = brute_force(vectors, queries, 10)
    assert [[h.row for h in qh] for qh in exact] == expected.tolist()
    recall = np.mean(
        [len({h.row for h in a} & {h.row for h in e}) / 10 for a, e in zip(ann, exact, strict=True)]
    )
    print(f"10^5 x 64: build {build:.1f} s, recall@10 {recall:.3f}")
    assert recall >= 0.95

    # Filters through the ANN path: over-fetch, widen, and scan when few rows pass.
    cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(len(queries))]
    own = [{h.product_id for h in qh[:1]} for qh in exact]
    got = index.search(queries, 10, category=cats, exclude_product_ids=own)
    want = index.search(queries, 10, category=cats, exclude_product_ids=own, exact=True)
    overlap = []
    for qi, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == 10
        assert all(h.category == cats[qi] and h.product_id not in own[qi] for h in g)
        overlap.append(len({h.row for h in g} & {h.row for h in w}) / 10)
    assert np.mean(overlap) >= 0.95
    rare = np.zeros(len(vectors), bool)
    rare[::5000] = True  # 20 rows pass: found although HNSW's first fetch holds none
    got = index.search(queries[:4], 10, filter=lambda rows: rare[rows])
    assert all(len(qh) == 10 and all(rare[h.row] for h in qh) for qh in got)


@pytest.mark.parametrize("root", ["memory", "local"])
@pytest.mark.parametrize(("exact_below", "dtype"), [(10_000, "float32"), (100, "float16")])
def test_round_trip(tmp_path, root, exact_below, dtype):
    vectors = clustered(600, 16, 8, seed=6)
    table = catalog(vectors)
    base = f"memory://retrieval-{uuid.uuid4().hex}" if root == "memory" else str(tmp_path)
    half = table.num_rows // 2
    for i, part in enumerate((table.slice(0, half), table.slice(half))):  # Parquet shards in
        storage.write_parquet(storage.join(base, "in", f"{i}.parquet"), part)
    out = storage.join(base, "index")
    meta = build_index(
        storage.join(base, "in"), out, exact_below=exact_below, model=MODEL, dtype=dtype
    )
    assert meta.kind == ("exact" if exact_below > 600 else "ann") and meta.dtype == dtype
    saved = storage.read_json(storage.join(out, INDEX_JSON))
    assert saved["format_version"] == FORMAT_VERSION and saved["dim"] == 16
    assert saved["model"] == MODEL and saved["fields"] == ["box"]
    index = Index.open(out, expect_model=MODEL)
    hits = index.search(vectors[:5], 3, exclude_product_ids=[set()] * 5)
    assert [qh[0].image_id for qh in hits] == [f"img-{i}" for i in range(5)]
    assert all(abs(qh[0].similarity - 1) < 2e-3 for qh in hits)
    with pytest.raises(ValueError, match="expect_model"):
        Index.open(out, expect_model="another-model")


def test_validation_errors(small, tmp_path):
    vectors, table, index = small
    with pytest.raises(ValueError, match=r"queries has shape \(2, 8\).*dim 32"):
        index.search(np.ones((2, 8), np.float32), 3)
    bad = vectors[:2].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"queries rows \[1\] hold NaN"):
        index.search(bad, 3)
    with pytest.raises(ValueError, match=r"not L2-normalised.*np\.linalg\.norm"):
        index.search(vectors[:2] * 2, 3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        index.search(vectors[:2], 0)
    with pytest.raises(ValueError, match="category has 1 entries for 2 queries"):
        index.search(vectors[:2], 3, category=["chair"])
    with pytest.raises(ValueError, match="one collection of product ids per query"):
        index.search(vectors[:2], 3, exclude_product_ids={"p1"})
    with pytest.raises(ValueError, match="bool mask over the index's 3000 rows"):
        index.search(vectors[:2], 3, filter=np.ones(10, bool))

    out = str(tmp_path / "idx")
    nan = vectors[:4].copy()
    nan[2, 3] = np.inf
    with pytest.raises(ValueError, match=r"embedding rows \[2\] hold NaN"):
        build_index(catalog(nan), out, exact_below=10, model=MODEL)
    with pytest.raises(ValueError, match="lacks columns \\['embedding'\\]"):
        build_index(table.drop_columns(["embedding"]), out, exact_below=10, model=MODEL)
    with pytest.raises(ValueError, match="exact_below must be an integer >= 1"):
        build_index(table, out, exact_below=0, model=MODEL)
    with pytest.raises(ValueError, match="image_id values repeat"):
        build_index(pa.concat_tables([table, table]), out, exact_below=10**6, model=MODEL)
    mixed = pa.concat_tables([catalog(vectors[:2]), catalog(clustered(2, 8, 1, 0))])
    mixed = mixed.set_column(0, "image_id", pa.array(["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="same dimension"):
        build_index(mixed, out, exact_below=10, model=MODEL)

    with pytest.raises(IndexFormatError, match=r"no index\.json"):
        Index.open(str(tmp_path / "nothing"))
    build_index(table.slice(0, 10), out, exact_below=100, model=MODEL)
    meta = json.loads((tmp_path / "idx" / INDEX_JSON).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "idx" / INDEX_JSON).write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match=r"format_version 2.*rebuild the index"):
        Index.open(out)
    del meta["dim"]
    meta["format_version"] = FORMAT_VERSION
    (tmp_path / "idx" / INDEX_JSON).write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match=r"lacks keys \['dim'\]"):
        Index.open(out)


def test_bench_runs_and_reports_recall(tmp_path):
    """`bench/stage.py retrieval` as documented, on a tiny catalog."""
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "bench/stage.py", "retrieval", "--sizes", "3000", "--dim", "16",
         "--queries", "20", "--singles", "2", "--threads", "1", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())
    size = result["sizes"][0]
    assert size["count"] == 3000 and size["exact"]["kind"] == "exact"
    assert size["hnsw-float32"]["kind"] == "ann"
    assert size["hnsw-float32"]["recall@10_vs_exact"] >= 0.95
    assert result["memory_estimate_at_1e7"]["dim_768"]["float16_gb"] > 15


def hit(category):
    return Hit(row=0, image_id="i", product_id="p", category=category, similarity=1.0)


def test_precision_recall_at_k_by_hand():
    hits = [
        [hit("chair"), hit("lamp"), hit("chair"), hit("chair")],  # 3 of 4 relevant
        [hit("lamp"), hit(None)],  # 1 relevant, 2 missing hits count as irrelevant
        [hit("sofa")] * 4,  # a query whose category has no catalog rows
    ]
    scores = precision_recall_at_k(hits, ["chair", "lamp", "rug"], {"chair": 6, "lamp": 2})
    assert scores.k == 4
    assert scores.per_query_precision == (0.75, 0.25, 0.0)
    assert scores.per_query_recall[:2] == (0.5, 0.5) and np.isnan(scores.per_query_recall[2])
    assert scores.precision == pytest.approx(1 / 3)
    assert scores.recall == pytest.approx(0.5)
    at2 = precision_recall_at_k(hits, ["chair", "lamp", "rug"], [6, 2, 0], k=2)
    assert at2.per_query_precision == (0.5, 0.5, 0.0) and at2.recall == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one category per query"):
        precision_recall_at_k(hits, ["chair"], [1])
