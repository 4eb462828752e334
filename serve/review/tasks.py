"""Who rates what: assignment of images to raters, answers, undo and progress.

- Each image goes to exactly ``raters_per_image`` distinct raters: a place is taken by a
  conditional update of the image's ``n_assigned`` inside the transaction that makes the
  assignment, and (image, rater) is unique, so no rater sees an image twice. A rater is told
  nothing is left only once no eligible image is held by another open transaction.
- A rater holds at most one open assignment (shown, not yet answered), however many tabs
  ask at once (their requests take turns), and gets it back on their next visit, so a
  rater who leaves holds back one image at most; the reopened one of an undo comes first.
- Images are offered by their random ``order_key`` (the runs interleaved, blind), those
  with more raters already first, so that images complete (and rates can be read) early.
- The 8 answers of an image are written in one transaction with the assignment's
  completion: an image's answers are all there or none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from sqlalchemy import Engine, Integer, and_, cast, delete, func, select, update
from sqlalchemy.engine import Connection

from ray_app.kinds import Answer, Metric, Question
from ray_app.records import ANSWER_SCHEMA
from serve.review import db
from serve.review.accounts import Rater


class NotYours(PermissionError):
    """An assignment that is not the rater's (or does not exist)."""


class Conflict(ValueError):
    """The assignment was answered already, with other answers."""


@dataclass(frozen=True)
class Task:
    assignment_key: str
    image_key: str
    references: int  # how many real photos the product has


@dataclass(frozen=True)
class Progress:
    done: int  # images this rater has answered
    remaining: int  # images left for this rater (their open one included)

    @property
    def percent(self) -> int:
        total = self.done + self.remaining
        return 100 if total == 0 else round(100 * self.done / total)


@dataclass(frozen=True)
class Answered:
    assignment_key: str
    image_key: str
    answered_at: datetime
    answers: dict[str, str] = field(default_factory=dict)


_HELD_POLL_S = 0.02  # another rater's assignment transaction lasts milliseconds


@contextmanager
def _turn_of(engine: Engine, rater: Rater) -> Iterator[Connection]:
    """A write transaction of ``rater``'s: their requests (several tabs) take turns."""
    with db.write(engine) as conn:
        db.exclusive(conn, f"rater {rater.id}")
        yield conn


def _task(conn, assignment_row) -> Task:
    image = conn.execute(
        select(db.images.c.key, db.images.c.reference_uris).where(
            db.images.c.id == assignment_row["image_id"]
        )
    ).one()
    return Task(assignment_row["key"], image.key, len(json.loads(image.reference_uris)))


def _eligible(rater: Rater, raters_per_image: int):
    """Images this rater may still be given: fewer raters than the quota, none of theirs."""
    mine = select(db.assignments.c.image_id).where(db.assignments.c.rater_id == rater.id)
    return select(db.images.c.id).where(
        db.images.c.n_assigned < raters_per_image, db.images.c.id.not_in(mine)
    )


def next_task(engine: Engine, rater: Rater, raters_per_image: int) -> Task | None:
    """The rater's open assignment, else a new one; None when nothing is left for them."""
    with _turn_of(engine, rater) as conn:
        open_row = (
            conn.execute(
                select(db.assignments)
                .where(
                    db.assignments.c.rater_id == rater.id,
                    db.assignments.c.completed_at.is_(None),
                )
                .order_by(db.assignments.c.assigned_at, db.assignments.c.id)
                .limit(1)
            )
            .mappings()
            .first()
        )
        if open_row is not None:
            return _task(conn, open_row)
        query = (
            _eligible(rater, raters_per_image)
            .order_by(db.images.c.n_assigned.desc(), db.images.c.order_key, db.images.c.id)
            .limit(1)
        )
        locking = conn.dialect.name != "sqlite"  # SQLite: BEGIN IMMEDIATE already serialises
        while True:
            if locking:
                image_id = conn.execute(query.with_for_update(skip_locked=True)).scalar()
                if image_id is None and conn.execute(query).scalar() is not None:
                    # Every eligible image is held by another rater's open transaction, which
                    # may still leave a place free: poll (holding no lock, so no deadlock)
                    # rather than tell this rater "done" too early and leave images short.
                    time.sleep(_HELD_POLL_S)
                    continue
            else:
                image_id = conn.execute(query).scalar()
            if image_id is None:
                return None
            # Take a place only if one is still free in the row's latest version: another
            # rater's transaction may have taken the last one since this one's snapshot.
            taken = conn.execute(
                update(db.images)
                .where(db.images.c.id == image_id, db.images.c.n_assigned < raters_per_image)
                .values(n_assigned=db.images.c.n_assigned + 1)
            ).rowcount
            if taken == 1:
                break
        row = {
            "key": db.new_key(),
            "image_id": image_id,
            "rater_id": rater.id,
            "assigned_at": db.now(),
            "completed_at": None,
        }
        conn.execute(db.assignments.insert().values(**row))
        return _task(conn, row)


def parse_answers(form: dict[str, Any]) -> dict[Question, Answer]:
    """The 8 answers of a form or JSON body ({question: answer}); ValueError naming what is
    missing or wrong."""
    missing = [q.value for q in Question if not form.get(q.value)]
    if missing:
        raise ValueError(f"answers missing for: {', '.join(missing)}")
    out = {}
    for q in Question:
        value = str(form[q.value])
        if value not in Answer._value2member_map_:
            raise ValueError(
                f"{q.value}={value!r}: the answers are {', '.join(a.value for a in Answer)}"
            )
        out[q] = Answer(value)
    return out


def _own_assignment(conn, rater: Rater, assignment_key: str):
    row = (
        conn.execute(select(db.assignments).where(db.assignments.c.key == assignment_key))
        .mappings()
        .first()
    )
    if row is None or row["rater_id"] != rater.id:
        raise NotYours(f"assignment {assignment_key!r} is not yours")
    return row


def submit(
    engine: Engine, rater: Rater, assignment_key: str, answers: dict[Question, Answer]
) -> bool:
    """Store the image's answers (all or nothing); -> False when the same answers were
    stored before (a resubmission whose first reply was lost). ``Conflict`` when other
    answers were."""
    with _turn_of(engine, rater) as conn:  # a resubmission from another tab waits
        row = _own_assignment(conn, rater, assignment_key)
        if row["completed_at"] is not None:
            stored = dict(
                conn.execute(
                    select(db.answers.c.question, db.answers.c.answer).where(
                        db.answers.c.assignment_id == row["id"]
                    )
                ).all()
            )
            if stored == {q.value: a.value for q, a in answers.items()}:
                return False
            raise Conflict("this image was answered already with other answers: undo it first")
        at = db.now()
        conn.execute(
            db.answers.insert(),
            [
                {
                    "assignment_id": row["id"],
                    "question": q.value,
                    "answer": a.value,
                    "answered_at": at,
                }
                for q, a in answers.items()
            ],
        )
        conn.execute(
            update(db.assignments).where(db.assignments.c.id == row["id"]).values(completed_at=at)
        )
    return True


def undo(engine: Engine, rater: Rater) -> str | None:
    """Reopen the rater's last answered image (its answers deleted); -> its assignment key,
    None when they have answered nothing. It is the next one they are shown."""
    with _turn_of(engine, rater) as conn:
        row = (
            conn.execute(
                select(db.assignments)
                .where(
                    db.assignments.c.rater_id == rater.id,
                    db.assignments.c.completed_at.is_not(None),
                )
                .order_by(db.assignments.c.completed_at.desc(), db.assignments.c.id.desc())
                .limit(1)
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        conn.execute(delete(db.answers).where(db.answers.c.assignment_id == row["id"]))
        # Back to its first place in the rater's queue: before any open one.
        first = conn.execute(
            select(func.min(db.assignments.c.assigned_at)).where(
                db.assignments.c.rater_id == rater.id, db.assignments.c.completed_at.is_(None)
            )
        ).scalar()
        values: dict[str, Any] = {"completed_at": None}
        if first is not None and first < row["assigned_at"]:
            values["assigned_at"] = first
        conn.execute(
            update(db.assignments).where(db.assignments.c.id == row["id"]).values(**values)
        )
        return row["key"]


def progress(engine: Engine, rater: Rater, raters_per_image: int) -> Progress:
    with db.read(engine) as conn:
        done = conn.execute(
            select(func.count()).where(
                db.assignments.c.rater_id == rater.id, db.assignments.c.completed_at.is_not(None)
            )
        ).scalar_one()
        opened = conn.execute(
            select(func.count()).where(
                db.assignments.c.rater_id == rater.id, db.assignments.c.completed_at.is_(None)
            )
        ).scalar_one()
        query = _eligible(rater, raters_per_image)
        free = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    return Progress(done, opened + free)


def image_for(engine: Engine, rater: Rater, image_key: str) -> dict[str, Any]:
    """The image row, when the rater holds an assignment for it (an admin: any)."""
    with db.read(engine) as conn:
        image = (
            conn.execute(select(db.images).where(db.images.c.key == image_key)).mappings().first()
        )
        if image is None:
            raise NotYours(f"image {image_key!r} is not yours")
        if not rater.is_admin:
            held = conn.execute(
                select(db.assignments.c.id).where(
                    db.assignments.c.image_id == image["id"], db.assignments.c.rater_id == rater.id
                )
            ).first()
            if held is None:
                raise NotYours(f"image {image_key!r} is not yours")
    return dict(image)


def answered_by(engine: Engine, rater: Rater) -> list[Answered]:
    """The rater's own answers, newest first (no run names: the round is blind)."""
    with db.read(engine) as conn:
        rows = conn.execute(
            select(
                db.assignments.c.id,
                db.assignments.c.key,
                db.assignments.c.completed_at,
                db.images.c.key.label("image_key"),
            )
            .select_from(
                db.assignments.join(db.images, db.images.c.id == db.assignments.c.image_id)
            )
            .where(
                db.assignments.c.rater_id == rater.id, db.assignments.c.completed_at.is_not(None)
            )
            .order_by(db.assignments.c.completed_at.desc(), db.assignments.c.id.desc())
        ).all()
        given = conn.execute(
            select(db.answers.c.assignment_id, db.answers.c.question, db.answers.c.answer).where(
                db.answers.c.assignment_id.in_([r.id for r in rows])
            )
        ).all()
    by_assignment: dict[int, dict[str, str]] = {}
    for a in given:
        by_assignment.setdefault(a.assignment_id, {})[a.question] = a.answer
    return [Answered(r.key, r.image_key, r.completed_at, by_assignment.get(r.id, {})) for r in rows]


# --------------------------------------------------------------------------- admin


def round_progress(engine: Engine, raters_per_image: int) -> dict[str, Any]:
    """Per run: images, images with their full quota answered, answers given; per rater:
    images answered and open."""
    with db.read(engine) as conn:
        done = (
            select(db.assignments.c.image_id, func.count().label("n"))
            .where(db.assignments.c.completed_at.is_not(None))
            .group_by(db.assignments.c.image_id)
            .subquery()
        )
        n = func.coalesce(done.c.n, 0)
        per_run = conn.execute(
            select(
                db.runs.c.name,
                func.count(db.images.c.id).label("images"),
                func.sum(n).label("ratings"),
                func.sum(cast(n >= raters_per_image, Integer)).label("complete"),
            )
            .select_from(
                db.runs.join(db.images, db.images.c.run_id == db.runs.c.id).outerjoin(
                    done, done.c.image_id == db.images.c.id
                )
            )
            .group_by(db.runs.c.name)
            .order_by(db.runs.c.name)
        ).all()
        per_rater = conn.execute(
            select(
                db.raters.c.name,
                db.raters.c.is_admin,
                func.count(db.assignments.c.completed_at).label("answered"),
                func.sum(
                    cast(
                        and_(
                            db.assignments.c.id.is_not(None),
                            db.assignments.c.completed_at.is_(None),
                        ),
                        Integer,
                    )
                ).label("open"),
            )
            .select_from(
                db.raters.outerjoin(db.assignments, db.assignments.c.rater_id == db.raters.c.id)
            )
            .group_by(db.raters.c.name, db.raters.c.is_admin)
            .order_by(db.raters.c.name)
        ).all()
    return {
        "runs": [
            {
                "run": r.name,
                "images": r.images,
                "ratings": int(r.ratings or 0),
                "complete": int(r.complete or 0),
            }
            for r in per_run
        ],
        "raters": [
            {
                "rater": r.name,
                "admin": bool(r.is_admin),
                "answered": r.answered,
                "open": int(r.open or 0),
            }
            for r in per_rater
        ],
    }


def export(engine: Engine) -> tuple[pa.Table, pa.Table]:
    """-> (every answer: ANSWER_SCHEMA, every image of the round with its metrics)."""
    with db.read(engine) as conn:
        answered = (
            conn.execute(
                select(
                    db.runs.c.name.label("run"),
                    db.images.c.product_id,
                    db.images.c.image_id,
                    db.raters.c.name.label("rater"),
                    db.answers.c.question,
                    db.answers.c.answer,
                    db.answers.c.answered_at,
                )
                .select_from(
                    db.answers.join(
                        db.assignments, db.assignments.c.id == db.answers.c.assignment_id
                    )
                    .join(db.images, db.images.c.id == db.assignments.c.image_id)
                    .join(db.runs, db.runs.c.id == db.images.c.run_id)
                    .join(db.raters, db.raters.c.id == db.assignments.c.rater_id)
                )
                .order_by(
                    db.runs.c.name, db.images.c.product_id, db.images.c.image_id, db.raters.c.name
                )
            )
            .mappings()
            .all()
        )
        image_rows = (
            conn.execute(
                select(db.runs.c.name.label("run"), db.images)
                .select_from(db.images.join(db.runs, db.runs.c.id == db.images.c.run_id))
                .order_by(db.runs.c.name, db.images.c.product_id, db.images.c.image_id)
            )
            .mappings()
            .all()
        )
    answers = pa.Table.from_pylist(
        [{**a, "answered_at": _utc(a["answered_at"])} for a in answered], schema=ANSWER_SCHEMA
    )
    images = [
        {
            "run": r["run"],
            "product_id": r["product_id"],
            "image_id": r["image_id"],
            "image_uri": r["image_uri"],
            "prompt": r["prompt"],
            # images imported before a metric existed have no value for it
            **{m.value: None for m in Metric},
            **json.loads(r["metrics"]),
            "score": r["score"],
            "ranking": r["ranking"],
        }
        for r in image_rows
    ]
    return answers, pa.Table.from_pylist(images)


def _utc(at: datetime) -> datetime:
    # SQLite hands back naive datetimes (stored as UTC by db.now()).
    return at if at.tzinfo else at.replace(tzinfo=UTC)
