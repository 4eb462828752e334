"""A headless browser for tests: Debian's Chromium driven by Playwright.

Tests that look at pages as a user would (the evaluation report, the review app) open them
here. Chromium is the distribution's package, never a browser that Playwright downloads;
when it or Playwright is missing, the test is skipped with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# RESTAGE_CHROMIUM names another binary (a Chrome, or Chromium elsewhere than Debian puts it).
CHROMIUM_ENV = "RESTAGE_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "apt-get install chromium (Debian's package; Playwright's own browsers are not used)"


def find_chromium() -> str | None:
    """The Chromium binary to drive, or None."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def chromium_browser() -> Iterator:
    """A Playwright browser (headless Chromium); skips the test when either is missing.
    ``browser.new_context()`` gives each simulated user their own cookies."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    binary = find_chromium()
    if binary is None:
        where = os.environ.get(CHROMIUM_ENV) or " or ".join(CHROMIUM_NAMES)
        pytest.skip(f"no Chromium binary ({where}): {INSTALL_HINT}")
    with sync_playwright() as pw:
        # Playwright passes --no-sandbox itself (chromium_sandbox=False), which root needs.
        browser = pw.chromium.launch(executable_path=binary, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def chromium_page(viewport: tuple[int, int] = (1280, 900)) -> Iterator:
    """A Playwright page in headless Chromium; skips the test when either is missing."""
    with chromium_browser() as browser:
        yield browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})


def file_url(path: Path) -> str:
    return path.resolve().as_uri()


def broken_images(page) -> list[str]:
    """The ``src`` of every ``<img>`` on the page that did not load (naturalWidth 0)."""
    page.wait_for_load_state("load")
    return page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
    )
