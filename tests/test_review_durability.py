"""Killing `restage review serve` during a burst of answers loses none that were
acknowledged, and leaves no image half-answered; the round resumes where it stopped."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import pytest

from tests.review_client import Rater, add_rater, all_yes, review_server
from tests.review_outputs import write_generations

RATERS = ("r1", "r2", "r3")


def _burst(rater: Rater, acked: list[str], stop: threading.Event) -> None:
    """Answer image after image until the server goes away; record each acknowledged one."""
    while not stop.is_set():
        try:
            task = rater.task()
            if task is None:
                return
            response = rater.answer(task[0], all_yes())
        except httpx.HTTPError:
            return  # the server was killed
        if response.status_code == 200:
            acked.append(task[0])


def test_killing_the_server_loses_no_acknowledged_answer(tmp_path):
    runs = {"alpha": write_generations(tmp_path, "alpha", products=4, images_per_product=15)}
    db = tmp_path / "round.db"
    secrets = {name: add_rater(db, name) for name in RATERS}
    settings = ("--set", "review.raters_per_image=1")  # each rater bursts through its own images
    acked: dict[str, list[str]] = {name: [] for name in RATERS}
    stop = threading.Event()
    with review_server(db, runs, tmp_path / "server.log", *settings) as server:
        raters = [Rater(server.url, name, secrets[name]) for name in RATERS]
        for rater in raters:
            assert rater.login().status_code == 303
        threads = [
            threading.Thread(target=_burst, args=(r, acked[r.name], stop), daemon=True)
            for r in raters
        ]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while sum(map(len, acked.values())) < 20 and time.time() < deadline:
            time.sleep(0.01)
        server.kill()  # SIGKILL, mid-burst
        stop.set()
        for t in threads:
            t.join(timeout=30)
    total_acked = sum(map(len, acked.values()))
    assert 20 <= total_acked < 60, "the kill should land mid-round"

    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select a.key, a.completed_at is not null, count(an.question) from assignments a "
            "left join answers an on an.assignment_id = a.id group by a.id"
        ).fetchall()
    stored = {key: (done, n) for key, done, n in rows}
    for name, keys in acked.items():
        for key in keys:
            assert stored[key] == (1, 8), f"{name}'s acknowledged {key} is {stored.get(key)}"
    # all or nothing: an image has its 8 answers and is complete, or neither
    assert all((done, n) in {(1, 8), (0, 0)} for done, n in stored.values())

    # The round resumes on the same database: the raters finish it.
    with review_server(db, runs, tmp_path / "server.log", *settings) as server:
        for name in RATERS:
            rater = Rater(server.url, name, secrets[name])
            assert rater.login().status_code == 303
            _burst(rater, acked[name], threading.Event())
    with sqlite3.connect(db) as conn:
        (complete,) = conn.execute(
            "select count(*) from assignments where completed_at is not null"
        ).fetchone()
        (answers,) = conn.execute("select count(*) from answers").fetchone()
        (images,) = conn.execute("select count(*) from images").fetchone()
    assert images == 60 and complete == 60 and answers == 60 * 8


pytestmark = pytest.mark.timeout(300)
