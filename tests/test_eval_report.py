"""The evaluation's HTML report, written from a constructed evaluation output (no Ray):
its files, its tables, its links, and a look at it in headless Chromium."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow.parquet as pq
import pytest
from browser import broken_images, chromium_page, file_url
from conftest import ROOT
from eval_outputs import METRICS, PUBLISHED, RUNS, write_evaluation
from PIL import Image

from ray_app.eval_report import TEMPLATES, write_report
from ray_app.sources import SourceRefused
from ray_app.storage import EvaluationLayout

PRODUCTS = {
    "mug-red-01": ("mug", (200, 40, 40)),
    "lamp-blue-02": ("lamp", (40, 80, 200)),
}
IMAGE_PX = 48
THUMB_PX = 32


class _Links(HTMLParser):
    """Every href and src of a page, and its visible text."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "href" in attrs:
            self.links.append(attrs["href"])
        if "src" in attrs:
            self.links.append(attrs["src"])
            if tag == "img":
                self.images.append(attrs["src"])

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text())
    return parser


def section(html: str, element_id: str, end: str) -> str:
    """The page's HTML from the element with ``element_id`` to the next ``end``."""
    start = html.index(f'id="{element_id}"')
    return html[start : html.index(end, start)]


@pytest.fixture
def evaluation(tmp_path) -> Path:
    return write_evaluation(tmp_path / "eval", products=PRODUCTS, size=IMAGE_PX)


def image_rows(out: Path, product_id: str) -> list[dict]:
    return pq.read_table(EvaluationLayout(str(out)).per_image(product_id)).to_pylist()


def product_rows(out: Path, product_id: str) -> list[dict]:
    return pq.read_table(EvaluationLayout(str(out)).per_product(product_id)).to_pylist()


def test_report_writes_an_index_a_page_per_product_and_thumbnails(evaluation):
    index = Path(write_report(str(evaluation), thumb_px=THUMB_PX))
    assert index == evaluation / "report" / "index.html" and index.is_file()
    report = index.parent
    for pid in PRODUCTS:
        page = report / "products" / f"{pid}.html"
        assert page.is_file()
        shown = parse(page).images
        generated = [r for r in image_rows(evaluation, pid) if r["image_uri"]]
        references = 2  # write_evaluation's default reference photos per product
        assert len(shown) == len(generated) + references
        for src in shown:
            thumb = (page.parent / unquote(src)).resolve()
            with Image.open(thumb) as im:
                assert im.format == "JPEG" and max(im.size) == THUMB_PX  # shrunk from IMAGE_PX


def test_index_compares_both_runs_with_intervals_and_keeps_published_rows_apart(evaluation):
    html = Path(write_report(str(evaluation))).read_text()
    summary = json.loads(Path(EvaluationLayout(str(evaluation)).tables()).read_text())
    measured = section(html, "measured-table", "</table>")
    header = measured[: measured.index("</tr>")]
    assert all(run in header for run in RUNS)
    # In the order of the --run flags (run_order), not the sorted keys of summary.json.
    assert list(RUNS) != sorted(RUNS) and header.index(RUNS[0]) < header.index(RUNS[1])
    assert "restage − baseline" in header  # the paired column
    dino = summary["overall"]["restage"]["dino"]
    assert f"{dino['mean']:.3f}" in measured and f"[{dino['lo']:.3f}, {dino['hi']:.3f}]" in measured
    paired = summary["paired"][0]["metrics"]["clip_t"]
    assert f"{paired['mean']:.3f}" in measured
    assert summary["distribution"]["baseline"]["refused"] in measured  # FID's refusal, said
    assert f"{summary['distribution']['restage']['fid']:.2f}" in measured
    # Published numbers only in their own block, never among the measured ones.
    published = section(html, "published", "</div>")
    assert "not measured here" in published
    for row in PUBLISHED:
        assert row["name"] in published and row["name"] not in measured
        assert f"{row['dino']:.3f}" in published and f"{row['dino']:.3f}" not in measured
    assert "Not comparable with published numbers" in html
    for source in summary["backbones"].values():
        assert source in html
    # One inline SVG plot per metric; per-category rows; a products table linking each page.
    assert html.count("<svg") == len(METRICS)
    categories = section(html, "categories", "</table>")
    assert all(category in categories for category, _ in PRODUCTS.values())
    products = section(html, "products-table", "</table>")
    for pid in PRODUCTS:
        assert f'href="products/{pid}.html"' in products


def test_every_link_resolves_and_nothing_is_fetched_from_elsewhere(evaluation):
    report = Path(write_report(str(evaluation))).parent
    pages = sorted(report.rglob("*.html"))
    assert len(pages) == 1 + len(PRODUCTS)
    for page in pages:
        html = page.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I), page
        # No stylesheet fetches either (the SVG plots' url(#id) point inside the page).
        assert "@import" not in html and not re.search(r"""url\(\s*["']?(?!#)""", html), page
        for link in parse(page).links:
            parts = urlsplit(link)
            assert not parts.scheme and not parts.netloc, (page, link)
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.is_file() and report in target.parents, (page, link)


def test_a_product_page_marks_kept_dropped_and_failed_images_and_escapes_text(evaluation):
    report = Path(write_report(str(evaluation))).parent
    pid = sorted(PRODUCTS)[-1]  # write_evaluation fails the baseline's first image of it
    html = (report / "products" / f"{pid}.html").read_text()
    rows = image_rows(evaluation, pid)
    assert html.count('class="card kept"') == sum(r["kept"] and not r["error"] for r in rows)
    assert html.count('class="card dropped"') == sum(not r["kept"] and not r["error"] for r in rows)
    failed = [r for r in rows if r["error"]]
    assert failed and html.count('class="card failed"') == len(failed)
    assert failed[0]["error"] in html
    assert 'href="../index.html"' in html
    # Each run's images: kept first, in rank order (1 = best).
    for run_index, run in enumerate(RUNS):
        body = html.split('<h3 id="run-')[run_index + 1]
        assert run in body[: body.index("</h3>")]
        ranks = [int(r) for r in re.findall(r"rank (\d+) ·", body)]
        expected = sorted(r["rank"] for r in rows if r["run"] == run and r["rank"] is not None)
        assert ranks == expected
    # Prompts carry markup ("<b>wooden</b>"): shown as text, never as tags.
    assert "<b>" not in html and "&lt;b&gt;wooden&lt;/b&gt;" in html


def test_plots_escape_run_names():
    """Plots go into the page unescaped (they are SVG): matplotlib must escape what it writes."""
    import numpy as np

    from ray_app.eval_report import distribution_svg

    hostile = "a --> </svg><script>alert(1)</script>"
    svg = distribution_svg("dino", {hostile: np.array([0.5, 0.6])}, {hostile: "#1f77b4"})
    assert svg.startswith("<svg") and "<script" not in svg and "</svg><" not in svg


def test_null_metrics_show_a_dash(evaluation):
    report = Path(write_report(str(evaluation))).parent
    pid = sorted(PRODUCTS)[0]  # no masks: its seg metrics are null
    means = section((report / "products" / f"{pid}.html").read_text(), "means", "</table>")
    cells = re.findall(r'<td class="num">([^<]*)</td>', means)
    seg = sum(m.startswith("seg_") for m in METRICS)
    assert cells.count("—") == seg * len(RUNS)


def test_max_products_caps_the_pages_and_lists_the_rest(evaluation):
    write_report(str(evaluation))  # a first, full report: its extra pages must not survive
    index = Path(write_report(str(evaluation), max_products=1))
    pages = sorted(p.stem for p in (index.parent / "products").glob("*.html"))
    first, rest = sorted(PRODUCTS)[0], sorted(PRODUCTS)[1:]
    assert pages == [first]
    html = index.read_text()
    assert f"first 1 of {len(PRODUCTS)} products" in html
    products = section(html, "products-table", "</table>")
    for pid in rest:
        assert pid in products and f"products/{pid}.html" not in products
    assert not (index.parent / "images" / rest[0]).exists()


def test_an_unreadable_image_is_shown_as_its_reason(evaluation):
    pid = sorted(PRODUCTS)[0]
    row = next(r for r in image_rows(evaluation, pid) if r["image_uri"])
    Path(urlsplit(row["image_uri"]).path).unlink()
    refs = product_rows(evaluation, pid)
    Path(refs[0]["reference_uris"][0]).write_bytes(b"not an image")
    report = Path(write_report(str(evaluation))).parent
    html = (report / "products" / f"{pid}.html").read_text()
    assert "image file not found" in html and "not an image" in html


def test_reference_photos_are_read_with_the_reader_given(evaluation):
    """An evaluation of an untrusted manifest passes its SourcePolicy's reader: a refusal is
    shown in the photo's place, and generated images are read as before."""
    asked = []

    def refuse(uri: str) -> bytes:
        asked.append(uri)
        raise SourceRefused(uri, "outside the allowed sources")

    report = Path(write_report(str(evaluation), read_reference=refuse)).parent
    refs = {
        uri
        for pid in PRODUCTS
        for row in product_rows(evaluation, pid)
        for uri in row["reference_uris"]
    }
    assert set(asked) == refs
    for pid in PRODUCTS:
        html = (report / "products" / f"{pid}.html").read_text()
        assert html.count("refused by policy") == 2  # its reference photos
        assert f"../images/{pid}/r0-00000.jpg" in html


def test_the_report_is_read_and_written_through_fsspec(evaluation):
    """An evaluation on another filesystem (here fsspec's in-memory one, as an object store
    would be) gets the same report there."""
    import uuid

    import fsspec

    memory = fsspec.filesystem("memory")
    root = f"/eval-{uuid.uuid4().hex}"
    try:
        for path in evaluation.rglob("*"):
            if path.is_file() and not {"runs", "refs"} & set(path.parts):  # images stay local
                memory.pipe_file(f"{root}/{path.relative_to(evaluation)}", path.read_bytes())
        index = write_report(f"memory://{root}")
        assert index == f"memory://{root}/report/index.html"
        local = Path(write_report(str(evaluation)))
        written = {p[len(root) + len("/report/") :] for p in memory.find(f"{root}/report")}
        assert written == {str(p.relative_to(local.parent)) for p in local.parent.rglob("*.*")}
        assert memory.cat_file(f"{root}/report/index.html").count(b"<svg") == len(METRICS)
    finally:
        memory.rm(root, recursive=True)


def test_the_report_is_the_same_when_written_again(evaluation):
    first = Path(write_report(str(evaluation))).read_bytes()
    assert Path(write_report(str(evaluation))).read_bytes() == first


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_products": -1}, "max_products=-1"),
        ({"max_products": 1.5}, "max_products=1.5"),
        ({"thumb_px": 4}, "thumb_px=4"),
    ],
)
def test_bad_arguments_are_refused_naming_them(evaluation, kwargs, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        write_report(str(evaluation), **kwargs)


def test_an_evaluation_of_no_product_with_a_bare_summary_has_a_report(tmp_path):
    """Only runs and metrics in the summary, no shard yet: every table says it is empty."""
    layout = EvaluationLayout(str(tmp_path / "eval"))
    Path(layout.per_product_dir()).mkdir(parents=True)
    Path(layout.tables()).write_text(
        # A run made in parts has several roots.
        json.dumps(
            {"runs": {RUNS[0]: ["/runs/a", "/runs/b"], RUNS[1]: "/runs/c"}, "metrics": METRICS}
        )
    )
    html = Path(write_report(layout.root)).read_text()
    assert all(run in section(html, "measured-table", "</table>") for run in RUNS)
    assert all(f"<code>/runs/{x}</code>" in html for x in "abc")
    assert html.count("not computed for any product") == len(METRICS)
    assert "None for this evaluation" in section(html, "published", "</div>")
    assert "<svg" not in html and "products/" not in html


def test_a_folder_without_an_evaluation_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="restage evaluate"):
        write_report(str(tmp_path))


def test_the_templates_ship_in_the_package():
    """A non-editable install finds the templates: pyproject's package data lists them."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["ray_app"]
    templates = [
        f"{TEMPLATES}/{t.name}" for t in resources.files("ray_app").joinpath(TEMPLATES).iterdir()
    ]
    assert templates
    for name in templates:
        assert any(fnmatch.fnmatch(name, g) for g in globs), (name, globs)


def test_the_report_in_headless_chromium(evaluation):
    index = Path(write_report(str(evaluation)))
    with chromium_page() as page:
        page.goto(file_url(index))
        assert broken_images(page) == []
        assert page.locator("img").count() == len(PRODUCTS)  # a cover photo per product
        assert page.locator("#plots svg").count() == len(METRICS)
        header = page.locator("#measured-table tr").first.inner_text()
        assert all(run in header for run in RUNS)
        pid = sorted(PRODUCTS)[-1]
        page.click(f"#products-table a:text-is('{pid}')")
        page.wait_for_url(f"**/products/{pid}.html")
        assert broken_images(page) == []
        generated = [r for r in image_rows(evaluation, pid) if r["image_uri"]]
        assert page.locator(".card img").count() == len(generated)
        assert page.locator(".refs img").count() == 2
        page.click("nav a")
        page.wait_for_url("**/report/index.html")


def test_the_screenshot_script_takes_both_screenshots(tmp_path):
    """docs/make_screenshots.py, which made the README's pictures, still runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_screenshots", ROOT / "docs" / "make_screenshots.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shots = script.make_screenshots(tmp_path, script.constructed_evaluation(tmp_path / "work"))
    for shot in shots:
        with Image.open(shot) as im:
            assert im.format == "PNG" and im.size[0] == script.VIEWPORT[0]
