"""`restage review serve` as a subprocess over a small round, and a rater's HTTP client, for
the review app's tests (real HTTP: uvicorn on a free port)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from ray_app.kinds import Question
from tests.browser import broken_images
from tests.servers import free_port

RESTAGE = str(Path(sys.executable).with_name("restage"))
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
ASSIGNMENT = re.compile(r'action="[^"]*/rate/([0-9a-f]+)"')
IMAGE = re.compile(r'src="[^"]*/image/([0-9a-f]+)"')
URL_KEY = re.compile(r"/image/([0-9a-f]+)")


def restage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RESTAGE, *args], capture_output=True, text=True, timeout=120)


def add_rater(db: Path, name: str, *extra: str) -> str:
    proc = restage("review", "add-rater", name, "--db", str(db), *extra)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@dataclass
class ReviewServer:
    proc: subprocess.Popen
    url: str
    log: Path

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def review_server(
    db: Path, runs: dict[str, Path], log: Path, *extra: str, port: int | None = None
) -> Iterator[ReviewServer]:
    port = port or free_port()
    cmd = [RESTAGE, "review", "serve", "--profile", "tiny", "--db", str(db), "--port", str(port)]
    cmd += [a for name, uri in runs.items() for a in ("--run", f"{name}={uri}")]
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [*cmd, *extra], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = ReviewServer(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the review server did not become ready"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                    break
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


class Rater:
    """One rater's browser-less session: cookies, the CSRF token of the last page."""

    def __init__(self, url: str, name: str, secret: str):
        self.client = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
        self.name, self.secret, self.csrf = name, secret, ""

    def login(self) -> httpx.Response:
        page = self.client.get("/login")
        token = CSRF.search(page.text).group(1)
        return self.client.post(
            "/login", data={"name": self.name, "secret": self.secret, "csrf_token": token}
        )

    def page(self, path: str) -> httpx.Response:
        response = self.client.get(path)
        found = CSRF.search(response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def task(self) -> tuple[str, str] | None:
        """(assignment key, image key) of the page /rate shows, None when done."""
        text = self.page("/rate").text
        found = ASSIGNMENT.search(text)
        return None if found is None else (found.group(1), IMAGE.search(text).group(1))

    def answer(self, assignment: str, answers: dict[str, str], **kwargs) -> httpx.Response:
        return self.client.post(
            f"/rate/{assignment}",
            json=answers,
            headers={"x-csrf-token": self.csrf, "accept": "application/json"},
            **kwargs,
        )


def all_yes() -> dict[str, str]:
    return {q.value: "yes" for q in Question}


# --------------------------------------------------------------------------- in a browser


def passes(rater: str, image_key: str) -> bool:
    """Each rater's verdict on an image: a fixed rule, so the test knows every answer."""
    return hashlib.sha256(f"{rater}/{image_key}".encode()).digest()[0] % 3 != 0


def sign_in(page, url: str, name: str, secret: str) -> None:
    page.goto(f"{url}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=secret]", secret)
    page.click("button[type=submit]")
    page.wait_for_load_state("load")


def shown_image(page) -> str | None:
    if page.locator("#done").count():
        return None
    return URL_KEY.search(page.get_attribute("#generated", "src")).group(1)


def answer_with_keys(page, verdict: bool) -> None:
    """8 answers: all yes, or 'no' on the last question."""
    for _ in range(7):
        page.keyboard.press("1")
    page.keyboard.press("1" if verdict else "3")
    assert page.locator(".question.current").count() == 0  # all answered
    with page.expect_navigation():
        page.keyboard.press("Enter")


def rate_all(page, name: str, shots: Path | None = None, first: str = "ann") -> list[str]:
    """Rate every image the rater is given, with the keyboard (``passes`` decides each
    verdict); the first rater (``first``) is screenshotted into ``shots``; the second
    exercises undo of a submitted image."""
    rated = []
    while (image := shown_image(page)) is not None:
        assert not broken_images(page), "the product photos and the image must load"
        if not rated:
            # Backspace undoes the last answer on the page: a wrong key, then the right ones.
            page.keyboard.press("4")
            assert page.locator("input[value=unclear]:checked").count() == 1
            page.keyboard.press("Backspace")
            assert page.locator("input:checked").count() == 0
            if shots and name == first:
                page.keyboard.press("1")
                page.keyboard.press("1")
                page.keyboard.press("2")
                page.screenshot(path=str(shots / "review-rate.png"), full_page=True)
                for _ in range(3):
                    page.keyboard.press("Backspace")
        answer_with_keys(page, passes(name, image))
        rated.append(image)
        if len(rated) == 2 and name != first:
            # On a fresh image, Backspace reopens the previous one; it is answered again.
            with page.expect_navigation():
                page.keyboard.press("Backspace")
            assert shown_image(page) == image
            answer_with_keys(page, passes(name, image))
    progress = page.get_attribute("#done", "id")
    assert progress == "done"
    return rated
