"""Three raters rate a small round end to end in headless Chromium with the keyboard; every
image ends with 3 ratings from distinct raters, and the pass rates the app shows equal a
hand computation on the same answers. Screenshots of the rating and results pages go to
$RESTAGE_SCREENSHOTS when it is set (docs/ holds the committed ones)."""

from __future__ import annotations

import json
import os
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from tests.browser import chromium_browser
from tests.review_client import add_rater, passes, rate_all, restage, review_server, sign_in
from tests.review_outputs import write_generations

RATERS = ("ann", "bob", "cat")


@pytest.mark.timeout(600)
def test_three_raters_rate_a_round_with_the_keyboard(tmp_path):
    runs = {
        "alpha": write_generations(tmp_path, "alpha", products=3, images_per_product=2),
        "beta": write_generations(tmp_path, "beta", products=3, images_per_product=2, seed=1),
    }
    db = tmp_path / "round.db"
    secrets = {name: add_rater(db, name) for name in RATERS}
    secrets["boss"] = add_rater(db, "boss", "--admin")
    shots = Path(os.environ["RESTAGE_SCREENSHOTS"]) if "RESTAGE_SCREENSHOTS" in os.environ else None
    rated: dict[str, list[str]] = {}
    with review_server(db, runs, tmp_path / "server.log") as server, chromium_browser() as browser:
        # Raters take turns image by image, as they would rate side by side.
        pages = {}
        for name in RATERS:
            pages[name] = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            sign_in(pages[name], server.url, name, secrets[name])
            assert pages[name].url.endswith("/rate")
        for name in RATERS:
            rated[name] = rate_all(pages[name], name, shots)

        # Every image: 3 ratings from 3 distinct raters.
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "select i.key, r.name, run.name, i.product_id from assignments a "
                "join images i on i.id = a.image_id join raters r on r.id = a.rater_id "
                "join runs run on run.id = i.run_id where a.completed_at is not null"
            ).fetchall()
            (n_images,) = conn.execute("select count(*) from images").fetchone()
        raters_of = defaultdict(list)
        where = {}
        for key, rater, run, product in rows:
            raters_of[key].append(rater)
            where[key] = (run, product)
        assert n_images == 12 and len(raters_of) == 12
        assert all(sorted(r) == sorted(RATERS) for r in raters_of.values())
        assert all(sorted(rated[name]) == sorted(raters_of) for name in RATERS)

        # The pass rates by hand: an image passes when 2 of its 3 raters passed it.
        expected = {}
        for run in runs:
            keys = [k for k in raters_of if where[k][0] == run]
            image_pass = {k: sum(passes(r, k) for r in RATERS) >= 2 for k in keys}
            products = {where[k][1] for k in keys}
            passing_products = {where[k][1] for k in keys if image_pass[k]}
            expected[run] = (
                sum(image_pass.values()),
                len(keys),
                len(passing_products),
                len(products),
            )

        admin = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        sign_in(admin, server.url, "boss", secrets["boss"])
        admin.goto(f"{server.url}/admin/results")
        for run, (passed, images, products_passed, products) in expected.items():
            row = admin.locator(f"tr[data-run={run}]")
            assert f"{passed}/{images}," in row.locator(".per-image").inner_text()
            assert f"{products_passed}/{products}," in row.locator(".per-product").inner_text()
        if shots:
            admin.screenshot(path=str(shots / "review-results.png"), full_page=True)
        # A rater's session cannot open the admin's pages.
        assert pages["ann"].goto(f"{server.url}/admin/results").status == 403

    out = tmp_path / "results"
    proc = restage("review", "results", "--profile", "tiny", "--db", str(db), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    for run, (passed, images, products_passed, products) in expected.items():
        per_image, per_product = (
            summary["runs"][run]["per_image"],
            summary["runs"][run]["per_product"],
        )
        assert (per_image["passed"], per_image["total"]) == (passed, images)
        assert (per_product["passed"], per_product["total"]) == (products_passed, products)
    assert {p.name for p in out.iterdir()} >= {
        "answers.parquet",
        "answers.csv",
        "images.parquet",
        "summary.json",
    }
