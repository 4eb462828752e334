"""Copy-paste staging benchmarks (`restage stage`, issue 15).

placement: on synthetic scenes whose product masks are known, the placement error of
``ray_app.staging`` — box IoU of the placed product against the scene product it replaces,
and how far its bottom is from the scene's ground line — against a naive baseline in the
same run (the product pasted at its photo's scale, centred on the scene product). Products
differ from the scene's in size and, within ``--max-aspect-change`` (the retrieval filter's
compatible shapes), in aspect ratio.

    python bench/stage.py placement [--scenes 300] [--max-aspect-change 1.1] [--out bench/results/stage_placement.json]

retrieval: the staged-catalog index of ``restage stage`` (ray_app/retrieval.py): build time,
query time (a batch of queries, one query at a time, and with the staging query's category
filter and own-product exclusion) and memory of the exact index (the baseline) and the HNSW
one over the same rows, and HNSW's recall@k against exact, with an ``ef_search`` sweep.
Synthetic clustered unit vectors stand in for product-crop embeddings.

    python bench/stage.py retrieval                          # 10^5 x 128, k=10, 100 queries
    python bench/stage.py retrieval --sizes 100000 1000000 --dim 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from bench.common import machine  # noqa: E402
from ray_app import staging  # noqa: E402
from ray_app.report import format_table  # noqa: E402
from ray_app.retrieval import HnswParams, Index, build_index, set_threads  # noqa: E402
from ray_app.staging import Box  # noqa: E402


def _ellipse(h: int, w: int, box: Box) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    rx, ry = box.width / 2, box.height / 2
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1


def _shape(rng: np.random.Generator, h: int, w: int, box: Box) -> np.ndarray:
    """A product-like mask filling ``box``: a rectangle, an ellipse, or a body on a base."""
    kind = rng.integers(3)
    if kind == 0:
        mask = np.zeros((h, w), bool)
        mask[box.y0 : box.y1, box.x0 : box.x1] = True
        return mask
    if kind == 1:
        return _ellipse(h, w, box)
    mask = _ellipse(h, w, Box(box.x0, box.y0, box.x1, box.y1 - box.height // 5))
    cx = (box.x0 + box.x1) // 2
    mask[box.y1 - box.height // 4 : box.y1, cx - box.width // 4 : cx + box.width // 4] = True
    return mask


def placement(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    ious, ground_err, naive_ious, naive_ground = [], [], [], []
    start = time.perf_counter()
    for _ in range(args.scenes):
        h, w = int(rng.integers(256, 513)), int(rng.integers(256, 513))
        bh = int(rng.integers(h // 4, int(h * 0.8)))
        aspect = float(np.exp(rng.uniform(np.log(0.4), np.log(2.0))))
        bw = min(int(w * 0.9), max(8, round(bh * aspect)))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        scene_box = Box(x0, y0, x0 + bw, y0 + bh)
        scene_mask = _shape(rng, h, w, scene_box)
        where = staging.target(scene_mask)
        truth = Box.of(scene_mask)
        # the product: another size, an aspect within the compatible range, its own shape
        change = float(
            np.exp(rng.uniform(-np.log(args.max_aspect_change), np.log(args.max_aspect_change)))
        )
        ph = int(rng.integers(64, 400))
        pw = max(8, round(ph * truth.aspect * change))
        photo_h, photo_w = ph + 40, pw + 40
        product_box = Box(20, 20, 20 + pw, 20 + ph)
        mask = _shape(rng, photo_h, photo_w, product_box)
        photo = np.full((photo_h, photo_w, 3), 255, np.uint8)
        photo[mask] = rng.integers(0, 200, 3, dtype=np.uint8)
        empty = np.full((h, w, 3), 180, np.uint8)
        staged = staging.composite(empty, photo, mask, where, shadow_opacity=0.0)
        placed = Box.of(staged.mask)
        ious.append(placed.iou(truth))
        ground_err.append(abs(placed.y1 - where.ground))
        # naive: the photo's own scale, centred on the scene product, bottom on its bottom
        src = Box.of(mask)
        cx = (truth.x0 + truth.x1) // 2
        naive = Box(
            cx - src.width // 2, truth.y1 - src.height, cx - src.width // 2 + src.width, truth.y1
        )
        naive_ious.append(naive.iou(truth))
        naive_ground.append(abs(naive.y1 - where.ground))
    seconds = time.perf_counter() - start

    def stats(values: list[float]) -> dict:
        a = np.asarray(values, float)
        return {
            "mean": round(float(a.mean()), 4),
            "p5": round(float(np.percentile(a, 5)), 4),
            "min": round(float(a.min()), 4),
        }

    return {
        "benchmark": "stage.placement",
        "scenes": args.scenes,
        "max_aspect_change": args.max_aspect_change,
        "seed": args.seed,
        "restage": {
            "box_iou": stats(ious),
            "ground_error_px": {
                "mean": round(float(np.mean(ground_err)), 3),
                "max": int(np.max(ground_err)),
            },
            "seconds_per_scene": round(seconds / args.scenes, 4),
        },
        "baseline_naive_paste": {
            "box_iou": stats(naive_ious),
            "ground_error_px": {
                "mean": round(float(np.mean(naive_ground)), 3),
                "max": int(np.max(naive_ground)),
            },
        },
        "machine": machine("cpu"),
    }


# --------------------------------------------------------------------------- retrieval


CATEGORIES = ("chair", "lamp", "sofa", "table", "rug")


def clustered(n: int, dim: int, seed: int, noise: float = 0.5) -> np.ndarray:
    """Unit vectors around n/100 random centres (catalog embeddings cluster by product kind)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def catalog(vectors: np.ndarray, images_per_product: int = 4) -> pa.Table:
    n, dim = vectors.shape
    product = np.arange(n) // images_per_product
    return pa.table(
        {
            "image_id": pa.array(np.char.add("img-", np.arange(n).astype(str))),
            "product_id": pa.array(np.char.add("p", product.astype(str))),
            "category": pa.array(np.array(CATEGORIES)[product % len(CATEGORIES)]),
            "embedding": pa.ListArray.from_arrays(
                np.arange(0, n * dim + 1, dim, dtype=np.int64), vectors.reshape(-1)
            ),
        }
    )


def timed_search(index: Index, queries: np.ndarray, k: int, singles: int, **kw) -> dict:
    index.search(queries[:1], k, **{key: v[:1] for key, v in kw.items()})  # pages the rows in
    start = time.perf_counter()
    hits = index.search(queries, k, **kw)
    batch = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(singles):  # each query with its own filters (kw holds per-query lists)
        index.search(queries[i : i + 1], k, **{key: v[i : i + 1] for key, v in kw.items()})
    single = (time.perf_counter() - start) / singles
    return {
        "hits": hits,
        "batch_s": round(batch, 4),
        "per_query_in_batch_ms": round(1000 * batch / len(queries), 3),
        "single_query_ms": round(1000 * single, 3),
    }


def recall(got: list, want: list, k: int) -> float:
    return float(np.mean([len({h.row for h in g} & {h.row for h in w}) / k
                          for g, w in zip(got, want, strict=True)]))  # fmt: skip


def run_size(n: int, args, work: Path) -> dict:
    vectors = clustered(n, args.dim, seed=n)
    table = catalog(vectors)
    rng = np.random.default_rng(0)
    picks = rng.choice(n, args.queries, replace=False)
    queries = vectors[picks] + 0.1 * rng.standard_normal((args.queries, args.dim))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    # The staging query: its own category, never its own product's images.
    own = [{table["product_id"][int(i)].as_py()} for i in picks]
    cats = [table["category"][int(i)].as_py() for i in picks]
    hnsw = HnswParams(m=args.m, ef_construction=args.ef_construction, ef_search=args.ef_search)
    out: dict = {"count": n, "dim": args.dim}
    results = {}
    for name, exact_below, dtype in [
        ("exact", n + 1, "float32"),
        *[(f"hnsw-{d}", 1, d) for d in args.dtypes],
    ]:
        uri = str(work / f"{name}-{n}")
        meta = build_index(
            table, uri, exact_below=exact_below, model="synthetic", hnsw=hnsw, dtype=dtype
        )
        index = Index.open(uri)
        disk = sum(f.stat().st_size for f in Path(uri).rglob("*") if f.is_file())
        plain = timed_search(index, queries, args.k, args.singles)
        filtered = timed_search(
            index, queries, args.k, args.singles, category=cats, exclude_product_ids=own
        )
        entry = {
            "kind": meta.kind,
            "dtype": dtype,
            "build_s": meta.build_seconds,
            "disk_bytes": disk,
            "search": {key: v for key, v in plain.items() if key != "hits"},
            "search_category_and_exclusion": {
                key: v for key, v in filtered.items() if key != "hits"
            },
        }
        if index._ann is not None:
            graph = index._ann.hnsw
            entry["graph_bytes_per_vector"] = round(
                (graph.neighbors.size() * 4 + graph.offsets.size() * 8 + graph.levels.size() * 4)
                / n,
                1,
            )
            # The recall / time trade-off of the candidate list, on the same graph.
            entry["ef_sweep"] = []
            for ef in args.ef_sweep:
                start = time.perf_counter()
                hits = index.search(queries, args.k, ef_search=ef)
                batch = time.perf_counter() - start
                entry["ef_sweep"].append(
                    {
                        "ef_search": ef,
                        "per_query_in_batch_ms": round(1000 * batch / len(queries), 3),
                        f"recall@{args.k}_vs_exact": round(
                            recall(hits, results["exact"][1], args.k), 4
                        ),
                    }
                )
        results[name] = (entry, plain["hits"], filtered["hits"])
        out[name] = entry
        del index
    _, exact_plain, exact_filtered = results["exact"]
    for name, (entry, plain, filtered) in results.items():
        if name != "exact":
            entry[f"recall@{args.k}_vs_exact"] = round(recall(plain, exact_plain, args.k), 4)
            entry[f"recall@{args.k}_vs_exact_filtered"] = round(
                recall(filtered, exact_filtered, args.k), 4
            )
    return out


def memory_at(count: int, dims: tuple[int, ...], graph_bytes: float) -> dict:
    """Bytes at ``count`` vectors: vectors at float32/float16 plus the measured graph."""
    return {
        f"dim_{d}": {
            "float32_gb": round(count * (d * 4 + graph_bytes) / 1e9, 1),
            "float16_gb": round(count * (d * 2 + graph_bytes) / 1e9, 1),
        }
        for d in dims
    }


def retrieval(args: argparse.Namespace) -> dict:
    """Exact vs HNSW over the same synthetic rows: build and query time, memory, recall."""
    set_threads(args.threads)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="restage-retrieval-") as work:
        sizes = [run_size(n, args, Path(work)) for n in args.sizes]
    graph = max(s["hnsw-float32"]["graph_bytes_per_vector"] for s in sizes if "hnsw-float32" in s)
    result = {
        "benchmark": "stage_retrieval",
        "machine": {**machine("cpu"), "load_average_at_start": [round(x, 1) for x in load]},
        "threads": args.threads,
        "k": args.k,
        "queries": args.queries,
        "ef_sweep": args.ef_sweep,
        "hnsw": {"m": args.m, "ef_construction": args.ef_construction, "ef_search": args.ef_search},
        "sizes": sizes,
        "memory_estimate_at_1e7": memory_at(10**7, (512, 768), graph),
    }
    rows = []
    for s in sizes:
        for name in ("exact", *[f"hnsw-{d}" for d in args.dtypes]):
            e = s[name]
            rows.append(
                [
                    s["count"],
                    name,
                    e["build_s"],
                    e["search"]["per_query_in_batch_ms"],
                    e["search"]["single_query_ms"],
                    e["search_category_and_exclusion"]["per_query_in_batch_ms"],
                    e.get(f"recall@{args.k}_vs_exact", 1.0),
                    e.get(f"recall@{args.k}_vs_exact_filtered", 1.0),
                ]
            )
    print(
        format_table(
            ["rows", "index", "build s", "ms/query (batch)", "ms/query (single)",
             "ms/query filtered", f"recall@{args.k}", "filtered recall"],
            rows,
        )
    )  # fmt: skip
    sweep = [
        [
            s["count"],
            name,
            p["ef_search"],
            p["per_query_in_batch_ms"],
            p[f"recall@{args.k}_vs_exact"],
        ]
        for s in sizes
        for name in [f"hnsw-{d}" for d in args.dtypes]
        for p in s[name]["ef_sweep"]
    ]
    if sweep:
        print(
            format_table(
                ["rows", "index", "ef_search", "ms/query (batch)", f"recall@{args.k}"], sweep
            )
        )
    print(f"memory at 10^7 (vectors + {graph} B/vector graph): {result['memory_estimate_at_1e7']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("placement", help="placement error on synthetic scenes")
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--max-aspect-change", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage_placement.json"))
    r = sub.add_parser("retrieval", help="exact vs ANN search: query time, memory, recall")
    r.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    r.add_argument("--dim", type=int, default=128)
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--queries", type=int, default=100, help="the batch")
    r.add_argument("--singles", type=int, default=20, help="queries timed one at a time")
    r.add_argument("--m", type=int, default=HnswParams.m)
    r.add_argument("--ef-construction", type=int, default=HnswParams.ef_construction)
    r.add_argument("--ef-search", type=int, default=HnswParams.ef_search)
    r.add_argument("--ef-sweep", type=int, nargs="*", default=[16, 32, 128, 256])
    r.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    r.add_argument("--threads", type=int, default=os.cpu_count(), help="faiss's threads")
    r.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.part == "placement":
        result = placement(args)
        shown = {k: v for k, v in result.items() if k != "machine"}
        print(json.dumps(shown, indent=2))
        out = Path(args.out)
    else:
        result = retrieval(args)
        sizes = "_".join(str(n) for n in args.sizes)
        out = Path(
            args.out or ROOT / "bench" / "results" / f"stage_retrieval_{sizes}_d{args.dim}_cpu.json"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
