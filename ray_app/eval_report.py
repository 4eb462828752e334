"""The HTML report of an evaluation: ``OUT/report/index.html`` and a page per product.

It reads what ``restage evaluate`` wrote under ``OUT`` (``summary.json``, the shards of
``per_product.parquet`` and ``per_image.parquet``) and writes a static site under
``OUT/report``: the run-vs-run table with confidence intervals, published reference rows
apart from the measured ones, per-category means, a distribution plot per metric, and a
page per product with its reference photos and every generated image with its scores.

Self-contained, so that it works opened from a file or copied to any static host: pages link
to each other and to their thumbnails by relative paths, plots are inline SVG, the CSS is in
the page, nothing is fetched from elsewhere. Templates are Jinja2 files shipped in the
package (``templates/report``), with autoescaping on: every value from the outputs (run
names, prompts, errors, ids) is escaped.

Scale: the index reads only ``per_product.parquet`` (one row per run and product) and the
summary; each product page reads its own ``per_image`` shard, one product at a time, so the
report never holds every image's row. ``max_products`` caps the pages (and thumbnails)
written; products beyond it are listed on the index without a page.
"""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from ray_app import storage
from ray_app.images import ImageError, decode_image, encode_jpeg
from ray_app.kinds import Metric
from ray_app.storage import EvaluationLayout

TEMPLATES = "templates/report"
MIN_THUMB_PX = 32
JPEG_QUALITY = 85
# Thumbnails of a product are made in threads: reads wait on storage (object stores), and
# Pillow's decode, resize and encode release the GIL.
THUMB_THREADS = 8
# A strip plot draws every product's point up to this many per run, and a random sample of
# that many beyond (an SVG of 10^5 points would weigh megabytes); boxes and means use all.
MAX_STRIP_POINTS = 400
# Run colours in tables and plots (matplotlib's default cycle, so both agree).
RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
# How the papers write the metrics (a name the summary adds later is shown as it is).
METRIC_LABELS = {
    Metric.DINO: "DINO",
    Metric.CLIP_I: "CLIP-I",
    Metric.CLIP_T: "CLIP-T",
    Metric.SEG_DINO: "SegDINO",
    Metric.SEG_CLIP_I: "SegCLIP-I",
    Metric.SEG_CLIP_T: "SegCLIP-T",
}

Reader = Callable[[str], bytes]


@dataclass(frozen=True)
class ReportLayout:
    """The report's own files, in the evaluation's ``report_dir()`` (its inputs' places are
    ``storage.EvaluationLayout``'s). Pages link to each other and to thumbnails by paths
    relative to the report folder (``href``s), joined to it for writing."""

    evaluation: EvaluationLayout

    def report_dir(self) -> str:
        return self.evaluation.report_dir()

    def index(self) -> str:
        return storage.join(self.report_dir(), "index.html")

    @staticmethod
    def page_path(product_id: str) -> str:
        return posixpath.join("products", f"{product_id}.html")

    @staticmethod
    def thumb_path(product_id: str, name: str) -> str:
        return posixpath.join("images", product_id, f"{name}.jpg")

    def site_file(self, relative: str) -> str:
        return storage.join(self.report_dir(), relative)


@dataclass
class Thumb:
    """A thumbnail written for the site (``href`` relative to the report folder), or why
    there is none."""

    href: str | None = None
    error: str | None = None


@dataclass
class ImageCard:
    """One generated image on a product page."""

    image_id: str
    prompt: str
    rank: int | None
    kept: bool
    scores: dict[str, float | None]
    error: str | None
    thumb: Thumb


@dataclass
class ProductRun:
    """One run's results on one product: its means (``per_product``) and its images."""

    run: str
    colour: str
    n_images: int | None = None
    n_errors: int | None = None
    means: dict[str, float | None] = field(default_factory=dict)
    cards: list[ImageCard] = field(default_factory=list)


@dataclass
class ProductRow:
    """A product as the index lists it."""

    product_id: str
    category: str
    reference_uris: list[str]
    runs: dict[str, ProductRun]
    page: str | None = None  # href of its page, when one was written
    cover: str | None = None  # href of its first reference thumbnail


def write_report(
    out_uri: str,
    *,
    max_products: int | None = None,
    thumb_px: int = 256,
    read_reference: Reader | None = None,
) -> str:
    """Write the HTML report of the evaluation under ``out_uri``; -> the URI of its index.

    ``max_products`` caps the product pages (None: one per product); ``thumb_px`` is the
    longest side of the thumbnails. ``read_reference`` reads the products' reference photos
    (their URIs come from the references manifest, so an evaluation of an untrusted
    manifest passes its ``SourcePolicy.read``); generated images are read from the runs'
    own outputs through ``ray_app.storage``. The report folder is replaced as a whole, and
    its index is written last: a report cut short has no index.
    """
    if max_products is not None and (
        isinstance(max_products, bool) or not isinstance(max_products, int) or max_products < 0
    ):
        raise ValueError(
            f"max_products={max_products!r}: give a number of product pages >= 0, or None for "
            "a page per product"
        )
    if isinstance(thumb_px, bool) or not isinstance(thumb_px, int) or thumb_px < MIN_THUMB_PX:
        raise ValueError(
            f"thumb_px={thumb_px!r}: give the thumbnails' longest side in pixels, an integer "
            f">= {MIN_THUMB_PX}"
        )
    layout = ReportLayout(EvaluationLayout(storage.normalize_uri(out_uri)))
    tables = layout.evaluation.tables()
    if not storage.exists(tables):
        raise FileNotFoundError(
            f"{tables} does not exist: out_uri={out_uri!r} must be the --out of a "
            "finished `restage evaluate`"
        )
    summary = storage.read_json(tables)
    missing = [key for key in ("runs", "metrics") if key not in summary]
    if missing:
        raise ValueError(f"{tables} lacks {', '.join(missing)}: not an evaluation summary")
    summary = _with_defaults(summary)
    # JSON objects lose their order (storage.write_json sorts keys): run_order keeps the
    # order of the --run flags, whose first is compared with each other.
    runs = list(summary["run_order"] or summary["runs"])
    metrics = list(summary["metrics"])
    colours = {run: RUN_COLOURS[i % len(RUN_COLOURS)] for i, run in enumerate(runs)}

    storage.remove(layout.report_dir(), recursive=True)  # no stale pages of an earlier report
    products = _read_products(layout, runs, metrics, colours)
    with_page = products if max_products is None else products[:max_products]
    env = template_environment()
    with ThreadPoolExecutor(THUMB_THREADS, thread_name_prefix="report-thumbs") as pool:
        for product in with_page:
            _write_product(
                layout,
                env,
                pool,
                product,
                runs,
                metrics,
                thumb_px,
                read_reference or storage.read_bytes,
            )
    index = env.get_template("index.html.j2").render(
        out_uri=layout.evaluation.root,
        summary=summary,
        runs=runs,
        metrics=metrics,
        colours=colours,
        rows=_measured_rows(summary, runs, metrics),
        distribution=_distribution_rows(summary, runs),
        published=_published(summary, metrics),
        categories=_category_rows(summary, runs, metrics),
        plots=_plots(products, runs, metrics, colours),
        products=products,
        pages=len(with_page),
        max_products=max_products,
    )
    storage.write_bytes(layout.index(), index.encode())
    return layout.index()


# --------------------------------------------------------------------------- reading


def _read_shards(uri: str, columns: list[str]) -> pa.Table | None:
    """The named columns of every Parquet shard under the folder ``uri`` (hidden and
    temporary files are skipped, as ``pyarrow.dataset`` does for '.' and '_' names); None
    when it has no shard (an evaluation of no product)."""
    fs, path = storage.url_to_fs(uri)
    if not fs.isdir(path):
        raise FileNotFoundError(
            f"{uri} is not a folder of Parquet shards: is the evaluation finished?"
        )
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    if not dataset.files:
        return None
    absent = [c for c in columns if c not in dataset.schema.names]
    if absent:
        raise ValueError(f"{uri} lacks the column(s) {', '.join(absent)}")
    return dataset.to_table(columns=columns)


def _number(value: Any) -> float | None:
    """A metric value as a float, None when missing or NaN (the outputs write either)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _read_products(
    layout: ReportLayout, runs: list[str], metrics: list[str], colours: dict[str, str]
) -> list[ProductRow]:
    columns = ["run", "product_id", "category", "n_images", "n_errors", "reference_uris", *metrics]
    table = _read_shards(layout.evaluation.per_product_dir(), columns)
    batches = table.to_batches() if table is not None else []
    products: dict[str, ProductRow] = {}
    for row in (row for batch in batches for row in batch.to_pylist()):
        pid = row["product_id"]
        product = products.setdefault(
            pid, ProductRow(pid, row["category"] or "", list(row["reference_uris"] or []), {})
        )
        if not product.reference_uris and row["reference_uris"]:
            product.reference_uris = list(row["reference_uris"])
        run = row["run"]
        product.runs[run] = ProductRun(
            run=run,
            colour=colours.get(run, "#777777"),
            n_images=row["n_images"],
            n_errors=row["n_errors"],
            means={m: _number(row[m]) for m in metrics},
        )
    return [products[pid] for pid in sorted(products)]


def _read_cards(layout: ReportLayout, product_id: str, metrics: list[str]) -> dict[str, list[dict]]:
    """The product's per-image rows, by run (one shard: this product's only)."""
    uri = layout.evaluation.per_image(product_id)
    if not storage.exists(uri):
        return {}
    table = storage.read_parquet(uri)
    absent = [
        c
        for c in ("run", "image_id", "image_uri", "prompt", "rank", "kept", "error", *metrics)
        if c not in table.column_names
    ]
    if absent:
        raise ValueError(f"{uri} lacks the column(s) {', '.join(absent)}")
    by_run: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        by_run.setdefault(row["run"], []).append(row)
    return by_run


# --------------------------------------------------------------------------- product pages


def _thumbnail(layout: ReportLayout, thumb_px: int, job: tuple[str | None, str, Reader]) -> Thumb:
    """Read an image, shrink it to ``thumb_px`` and write it as JPEG at its ``href``; a
    missing or unreadable image becomes the reason shown in its place."""
    uri, href, read = job
    if not uri:
        return Thumb(error="no image")
    try:
        data = read(uri)
    except FileNotFoundError:
        return Thumb(error="image file not found")
    except Exception as exc:  # a refusal, permissions, network: show why, go on
        return Thumb(error=f"cannot read the image: {type(exc).__name__}: {exc}")
    try:
        image = decode_image(data, max_side=thumb_px)
    except ImageError as exc:
        return Thumb(error=str(exc))
    storage.write_bytes(layout.site_file(href), encode_jpeg(image.rgb, quality=JPEG_QUALITY))
    return Thumb(href=href)


def _card_order(row: dict) -> tuple:
    # Kept first, then by rank (1 = best); unranked images after the ranked ones.
    return (not row["kept"], row["rank"] is None, row["rank"] or 0, str(row["image_id"]))


def _write_product(
    layout: ReportLayout,
    env: Any,
    pool: ThreadPoolExecutor,
    product: ProductRow,
    runs: list[str],
    metrics: list[str],
    thumb_px: int,
    read_reference: Reader,
) -> None:
    pid = product.product_id
    by_run = _read_cards(layout, pid, metrics)
    ordered = [r for r in runs if r in product.runs or r in by_run]
    ordered += sorted(r for r in by_run if r not in ordered)  # a run the summary misses
    rows = {run: sorted(by_run.get(run, []), key=_card_order) for run in ordered}
    jobs = [
        (uri, ReportLayout.thumb_path(pid, f"ref-{i}"), read_reference)
        for i, uri in enumerate(product.reference_uris)
    ]
    for run_index, run in enumerate(ordered):
        jobs += [
            (
                row["image_uri"],
                ReportLayout.thumb_path(pid, f"r{run_index}-{i:05d}"),
                storage.read_bytes,
            )
            for i, row in enumerate(rows[run])
        ]
    thumbs = iter(pool.map(partial(_thumbnail, layout, thumb_px), jobs))
    references = [next(thumbs) for _ in product.reference_uris]
    product.cover = next((t.href for t in references if t.href), None)
    for run in ordered:
        entry = product.runs.setdefault(run, ProductRun(run=run, colour="#777777"))
        entry.cards = [
            ImageCard(
                image_id=str(row["image_id"]),
                prompt=row["prompt"] or "",
                rank=row["rank"],
                kept=bool(row["kept"]),
                scores={m: _number(row[m]) for m in metrics},
                error=row["error"],
                thumb=next(thumbs),
            )
            for row in rows[run]
        ]
    page = ReportLayout.page_path(pid)
    html = env.get_template("product.html.j2").render(
        product=product,
        runs=[product.runs[r] for r in ordered],
        references=list(zip(product.reference_uris, references, strict=True)),
        metrics=metrics,
        root="../",
    )
    storage.write_bytes(layout.site_file(page), html.encode())
    product.page = page
    for entry in product.runs.values():
        entry.cards = []  # the index needs none of them: free the rows before the next product


# --------------------------------------------------------------------------- index tables

# What the templates read from the summary beyond runs and metrics, when a summary lacks it.
_SUMMARY_DEFAULTS: dict[str, Any] = {
    "run_order": None,
    "references": None,
    "clip_t_text": None,
    "products": None,
    "images": {},
    "errors": {},
    "backbones": {},
    "comparable": False,
    "confidence": 0.95,
    "bootstrap_samples": None,
    "overall": {},
    "per_category": {},
    "paired": [],
    "distribution": {},
    "published": [],
}


def _with_defaults(summary: dict) -> dict:
    return dict(_SUMMARY_DEFAULTS) | {
        k: v for k, v in summary.items() if v is not None or k not in _SUMMARY_DEFAULTS
    }


def _interval(stats: dict | None) -> dict[str, float | None] | None:
    if not stats:
        return None
    return {key: _number(stats.get(key)) for key in ("mean", "lo", "hi")} | {"n": stats.get("n")}


def _measured_rows(summary: dict, runs: list[str], metrics: list[str]) -> list[dict]:
    """A row per metric: each run's mean and CI, then each pair's mean difference and CI."""
    overall = summary.get("overall") or {}
    paired = summary.get("paired") or []
    return [
        {
            "metric": metric,
            "runs": [_interval((overall.get(run) or {}).get(metric)) for run in runs],
            "pairs": [_interval((pair.get("metrics") or {}).get(metric)) for pair in paired],
        }
        for metric in metrics
    ]


def _distribution_rows(summary: dict, runs: list[str]) -> list[dict]:
    """FID and KID of each run, with the number of images on each side or the refusal."""
    dist = summary.get("distribution") or {}
    cells = []
    for run in runs:
        d = dist.get(run) or {}
        cells.append(
            {
                "fid": _number(d.get("fid")),
                "kid_mean": _number(d.get("kid_mean")),
                "kid_std": _number(d.get("kid_std")),
                "kid_subset_size": d.get("kid_subset_size"),
                "n_generated": d.get("n_generated"),
                "n_reference": d.get("n_reference"),
                "refused": d.get("refused"),
                "present": bool(d),
            }
        )
    return cells


def _published(summary: dict, metrics: list[str]) -> dict:
    """The published rows and the metrics any of them reports, in the summary's order."""
    rows = list(summary.get("published") or [])
    shown = [m for m in metrics if any(m in row for row in rows)]
    shown += sorted({k for row in rows for k in row if k != "name"} - set(shown))
    return {"rows": rows, "metrics": shown}


def _category_rows(summary: dict, runs: list[str], metrics: list[str]) -> list[dict]:
    per_category = summary.get("per_category") or {}
    names = sorted({c for run in runs for c in (per_category.get(run) or {})})
    return [
        {
            "category": name,
            "cells": {
                metric: [
                    _interval(((per_category.get(run) or {}).get(name) or {}).get(metric))
                    for run in runs
                ]
                for metric in metrics
            },
        }
        for name in names
    ]


# --------------------------------------------------------------------------- plots


def _plots(
    products: list[ProductRow], runs: list[str], metrics: list[str], colours: dict[str, str]
) -> list[dict]:
    """A figure per metric: each run's per-product values as a box and its points."""
    plots = []
    for metric in metrics:
        values = {
            run: np.array(
                [
                    v
                    for p in products
                    if run in p.runs and (v := p.runs[run].means.get(metric)) is not None
                ],
                dtype=np.float64,
            )
            for run in runs
        }
        svg = distribution_svg(metric, values, colours) if any(map(len, values.values())) else None
        plots.append({"metric": metric, "svg": svg})
    return plots


def distribution_svg(metric: str, values: dict[str, np.ndarray], colours: dict[str, str]) -> str:
    """The figure as an ``<svg>`` element, marked safe for the template: matplotlib escapes
    the text it writes (labels, and the comments naming them), run names included."""
    from markupsafe import Markup
    from matplotlib import rc_context
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    runs = list(values)
    # A salt per metric: ids inside the SVGs are hashes, and all plots share one page.
    with rc_context({"svg.hashsalt": f"restage-report-{metric}", "svg.fonttype": "path"}):
        fig = Figure(figsize=(1.6 + 1.1 * max(len(runs), 2), 3.0), layout="constrained")
        ax = fig.add_subplot()
        rng = np.random.default_rng(0)  # jitter only; fixed so that a re-render is identical
        for x, run in enumerate(runs):
            v = values[run]
            if not len(v):
                continue
            ax.boxplot(  # vertical, the default: no orientation keyword, which moved in 3.10
                [v],
                positions=[x],
                widths=0.5,
                showfliers=False,
                patch_artist=True,
                boxprops={"facecolor": colours[run] + "33", "edgecolor": colours[run]},
                medianprops={"color": colours[run]},
                whiskerprops={"color": colours[run]},
                capprops={"color": colours[run]},
            )
            shown = (
                v if len(v) <= MAX_STRIP_POINTS else rng.choice(v, MAX_STRIP_POINTS, replace=False)
            )
            ax.scatter(
                x + rng.uniform(-0.18, 0.18, len(shown)),
                shown,
                s=12,
                color=colours[run],
                alpha=0.75,
                linewidths=0,
                zorder=3,
            )
            ax.plot([x], [v.mean()], marker="D", color="black", markersize=4, zorder=4)
        ax.set_xticks(range(len(runs)), [f"{run}\nn={len(values[run])}" for run in runs])
        ax.set_xlim(-0.6, len(runs) - 0.4)
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} per product")
        ax.set_title("box: quartiles, ◆: mean", fontsize=8, color="#555555")
        ax.grid(axis="y", alpha=0.3)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return Markup(text[text.index("<svg") :])  # inline in HTML: no XML prolog or DOCTYPE


# --------------------------------------------------------------------------- templates


def _fmt(value: Any, digits: int = 3) -> str:
    value = _number(value)
    return "—" if value is None else f"{value:.{digits}f}"


def template_environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("ray_app", TEMPLATES),
        autoescape=True,  # every value from the outputs is text, escaped
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _fmt
    env.globals["metric_label"] = lambda m: METRIC_LABELS.get(m, m)
    return env
