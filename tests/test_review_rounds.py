"""The review round without the web app: importing runs (once, a fixed sample spread over
products), assignment under concurrent raters (exactly N distinct raters per image), the
migrations."""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter, defaultdict

import pytest
from sqlalchemy import select

from ray_app.config import ReviewConfig
from ray_app.kinds import Answer, Metric, Question
from ray_app.runs import parse_runs
from serve.review import accounts, db, rounds, tasks
from serve.review.server import round_runs
from tests.postgres import postgres_url
from tests.review_outputs import write_generations


@pytest.fixture(params=["sqlite", "postgresql"])
def round_(request, tmp_path):
    """A round's runs and an empty database: a SQLite file, or a PostgreSQL server."""
    runs = {
        "alpha": write_generations(tmp_path, "alpha", products=3, images_per_product=5),
        "beta": write_generations(tmp_path, "beta", products=3, images_per_product=5, seed=1),
    }
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = str(tmp_path / "round.db")
        else:
            url = stack.enter_context(postgres_url())
        engine = db.connect(url)
        yield engine, parse_runs([f"{k}={v}" for k, v in runs.items()]), tmp_path
        engine.dispose()


def test_import_is_once_and_a_round_cannot_change(round_):
    engine, runs, _ = round_
    assert rounds.import_runs(engine, runs, None, 0) == {"alpha": 15, "beta": 15}
    assert rounds.import_runs(engine, runs, None, 0) == {"alpha": 15, "beta": 15}
    with pytest.raises(ValueError, match="cannot change"):
        rounds.import_runs(engine, runs, 4, 0)
    with db.read(engine) as conn:
        rows = conn.execute(select(db.images)).mappings().all()
    assert len(rows) == 30 and len({r["key"] for r in rows}) == 30
    refs = json.loads(rows[0]["reference_uris"])
    assert len(refs) == 2 and all("real-" in uri for uri in refs)
    assert set(json.loads(rows[0]["metrics"])) == set(Metric)
    # the order interleaves the runs: neither run's images come as one block
    order = [r["run_id"] for r in sorted(rows, key=lambda r: r["order_key"])]
    assert max(len(list(g)) for g in _runs_of(order)) < 15


def _runs_of(seq):
    from itertools import groupby

    return (list(g) for _, g in groupby(seq))


def test_the_sample_is_spread_over_products_and_seeded(round_):
    engine, runs, _ = round_
    counts = rounds.import_runs(engine, runs, 7, seed=3)
    assert counts == {"alpha": 7, "beta": 7}
    with db.read(engine) as conn:
        rows = conn.execute(
            select(db.images.c.run_id, db.images.c.product_id, db.images.c.image_id)
        ).all()
    per_product = Counter((r.run_id, r.product_id) for r in rows)
    assert sorted(per_product.values()) == [2, 2, 2, 2, 3, 3]  # 7 over 3 products: 3, 2, 2
    rows_alpha = rounds._written(runs["alpha"])
    again = rounds.sample(rows_alpha, 7, 3, "alpha")
    assert [r["image_id"] for r in again] == [
        r["image_id"] for r in rounds.sample(rows_alpha, 7, 3, "alpha")
    ]
    assert {r["image_id"] for r in again} != {
        r["image_id"] for r in rounds.sample(rows_alpha, 7, 4, "alpha")
    }


def test_concurrent_raters_give_each_image_exactly_its_quota(round_):
    engine, runs, _ = round_
    rounds.import_runs(engine, runs, None, 0)
    quota = ReviewConfig().raters_per_image
    raters = [accounts.sign_in(engine, n, accounts.add_rater(engine, n)) for n in "abcdefg"]
    answers = {q: Answer.YES for q in Question}
    errors = []

    def work(rater):
        try:
            while (task := tasks.next_task(engine, rater, quota)) is not None:
                tasks.submit(engine, rater, task.assignment_key, answers)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in raters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    with db.read(engine) as conn:
        rows = conn.execute(
            select(
                db.assignments.c.image_id, db.assignments.c.rater_id, db.assignments.c.completed_at
            )
        ).all()
    by_image = defaultdict(list)
    for image_id, rater_id, completed in rows:
        assert completed is not None
        by_image[image_id].append(rater_id)
    assert len(by_image) == 30
    assert all(len(r) == quota == len(set(r)) for r in by_image.values())
    assert all(tasks.progress(engine, r, quota).remaining == 0 for r in raters)


def _at_once(call, n: int) -> tuple[list, list]:
    """``call()`` in ``n`` threads released together -> (what they returned, what they
    raised)."""
    start = threading.Barrier(n)
    results, errors = [], []

    def one():
        start.wait()
        try:
            results.append(call())
        except Exception as exc:  # pragma: no cover - the caller asserts there is none
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, errors


def test_one_rater_in_several_tabs_holds_one_open_image(round_):
    """The same rater asking from several tabs (or replicas) at once gets one open
    assignment, not one per request: a rater who leaves holds back one image at most."""
    engine, runs, _ = round_
    rounds.import_runs(engine, runs, None, 0)
    rater = accounts.sign_in(engine, "tabs", accounts.add_rater(engine, "tabs"))
    got, errors = _at_once(lambda: tasks.next_task(engine, rater, 3).assignment_key, 6)
    assert errors == [] and len(got) == 6 and len(set(got)) == 1
    assert tasks.round_progress(engine, 3)["raters"][-1]["open"] == 1
    # the same answers sent from every tab: stored once, the others told so (not a 500)
    answers = {q: Answer.YES for q in Question}
    stored, errors = _at_once(lambda: tasks.submit(engine, rater, got[0], answers), 6)
    assert errors == [] and sorted(stored) == [False] * 5 + [True]


def test_a_name_added_twice_at_once_is_one_rater_and_the_others_are_told(round_):
    engine, _, _ = round_
    secrets, errors = _at_once(lambda: accounts.add_rater(engine, "dup"), 4)
    assert len(secrets) == 1 and len(errors) == 3
    assert all(isinstance(e, ValueError) and "exists" in str(e) for e in errors), errors


def test_a_rater_waits_for_images_held_by_another_transaction_rather_than_stop(round_):
    """PostgreSQL skips rows another transaction holds; a rater for whom every eligible image
    is held must wait for them, not be told nothing is left (that left images short of their
    quota when the last places were in flight)."""
    engine, runs, _ = round_
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): nothing is ever held")
    rounds.import_runs(engine, runs, None, 0)
    rater = accounts.sign_in(engine, "late", accounts.add_rater(engine, "late"))
    got = []
    with engine.connect() as holder, holder.begin() as held:
        holder.execute(select(db.images.c.id).with_for_update()).all()  # every image, held
        waiting = threading.Thread(
            target=lambda: got.append(tasks.next_task(engine, rater, 3)), daemon=True
        )
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not got  # waiting, not done
        held.rollback()  # the holder took no place
    waiting.join(timeout=30)
    assert len(got) == 1 and got[0] is not None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_servers_started_together_on_a_new_database_migrate_and_import_once(backend, tmp_path):
    """Replicas of one round started at once: each migrates and imports, or waits for the one
    that does and finds it done (on PostgreSQL two created the same tables and one failed)."""
    runs = parse_runs([f"alpha={write_generations(tmp_path, 'alpha', images_per_product=5)}"])
    with contextlib.ExitStack() as stack:
        url = str(tmp_path / "r.db")
        if backend == "postgresql":
            url = stack.enter_context(postgres_url())

        def serve():
            engine = db.connect(url)
            counts = rounds.import_runs(engine, runs, None, 0)
            engine.dispose()
            return counts

        counts, errors = _at_once(serve, 4)
        assert errors == [] and counts == [{"alpha": 15}] * 4
        engine = db.connect(url)
        with db.read(engine) as conn:
            assert conn.execute(select(db.schema_version.c.version)).scalars().all() == [1]
            assert len(conn.execute(select(db.runs)).all()) == 1
        engine.dispose()


def test_migrations_are_recorded_and_a_newer_database_is_refused(tmp_path):
    engine = db.connect(str(tmp_path / "r.db"))
    assert db.migrate(engine) == db.SCHEMA_VERSION
    with db.write(engine) as conn:
        conn.execute(
            db.schema_version.insert().values(version=db.SCHEMA_VERSION + 1, applied_at=db.now())
        )
    with pytest.raises(RuntimeError, match="upgrade restage"):
        db.connect(str(tmp_path / "r.db"))
    for bad in ("nosuch://host/db", "sqlite://::x:"):
        with pytest.raises(ValueError, match="not a database URL"):
            db.database_url(bad)


def test_generations_name_their_run(tmp_path):
    root = tmp_path
    write_generations(root, "alpha", products=1, images_per_product=1)
    write_generations(root, "beta", products=1, images_per_product=1)
    assert list(round_runs([str(root / "alpha")], ["b=" + str(root / "beta")])) == ["b", "alpha"]
    with pytest.raises(ValueError, match="already named"):
        round_runs([str(root / "alpha")], ["alpha=" + str(root / "beta")])
    with pytest.raises(FileNotFoundError, match="neither"):
        round_runs([str(tmp_path / "nothing")], [])
