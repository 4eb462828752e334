"""The review database: tables, migrations and the connection rules.

Any SQLAlchemy URL works; a plain path means SQLite. SQLite is put in WAL mode (raters read
while one writes) with ``synchronous=FULL`` (a commit is on disk before the app answers), and
every transaction that writes starts with ``BEGIN IMMEDIATE``: it takes the write lock
before reading, so that "count the image's raters, then assign one more" cannot interleave
with another rater's. On PostgreSQL, where transactions interleave, an image's last place is
taken by a conditional ``UPDATE ... WHERE n_assigned < quota``, which the database applies
to the row's latest version (``tasks.py``).

Migrations are numbered functions below, applied in order inside one transaction each and
recorded in ``schema_version``; a database from a newer restage is refused. Servers started
together migrate one at a time (``exclusive``).
"""

from __future__ import annotations

import secrets
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)
settings = Table(
    "settings",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
raters = Table(
    "raters",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("secret_hash", String(256), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    # Bumped when the secret is reset: cookies of older sessions stop working.
    Column("session_epoch", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("uris", Text, nullable=False),  # JSON list of generation roots
    Column("sample", Integer),  # review.sample_per_run at import; None: every image
    Column("imported_at", DateTime(timezone=True), nullable=False),
)
images = Table(
    "images",
    metadata,
    Column("id", Integer, primary_key=True),
    # What raters and URLs see: random, so that neither the run nor the order leaks.
    Column("key", String(32), nullable=False, unique=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("product_id", String(256), nullable=False),
    Column("image_id", String(256), nullable=False),
    Column("image_uri", Text, nullable=False),
    Column("reference_uris", Text, nullable=False),  # JSON list: the product's real photos
    Column("prompt", Text),
    Column("metrics", Text, nullable=False),  # JSON {Metric: value or null}
    Column("score", Float),
    Column("ranking", String(64)),
    Column("order_key", Integer, nullable=False, index=True),  # interleaves the runs
    # Raters given this image: raised by a conditional UPDATE, so that two raters asking at
    # once cannot both take its last place (see tasks.next_task).
    Column("n_assigned", Integer, nullable=False, default=0, server_default="0", index=True),
    UniqueConstraint("run_id", "product_id", "image_id"),
)
assignments = Table(
    "assignments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(32), nullable=False, unique=True),
    Column("image_id", Integer, ForeignKey("images.id"), nullable=False, index=True),
    Column("rater_id", Integer, ForeignKey("raters.id"), nullable=False, index=True),
    Column("assigned_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),  # None: open (shown, not answered)
    UniqueConstraint("image_id", "rater_id"),  # no rater sees an image twice
)
answers = Table(
    "answers",
    metadata,
    Column("assignment_id", Integer, ForeignKey("assignments.id"), primary_key=True),
    Column("question", String(32), primary_key=True),
    Column("answer", String(16), nullable=False),
    Column("answered_at", DateTime(timezone=True), nullable=False),
)


def now() -> datetime:
    return datetime.now(UTC)


def new_key() -> str:
    return secrets.token_hex(12)


# --------------------------------------------------------------------------- migrations


def _m1_initial(conn: Connection) -> None:
    metadata.create_all(conn)
    conn.execute(settings.insert().values(key="secret_key", value=secrets.token_hex(32)))


# Append only: a released migration never changes.
MIGRATIONS: list[Callable[[Connection], None]] = [_m1_initial]
SCHEMA_VERSION = len(MIGRATIONS)


def current_version(conn: Connection) -> int:
    if not conn.dialect.has_table(conn, "schema_version"):
        return 0
    return (
        conn.execute(
            select(schema_version.c.version).order_by(schema_version.c.version.desc())
        ).scalar()
        or 0
    )


def exclusive(conn: Connection, what: str) -> None:
    """Hold ``what`` until the transaction ends, against other processes doing the same: so
    that servers started together (replicas of one round) migrate and import once, the others
    waiting and then finding it done. SQLite: ``BEGIN IMMEDIATE`` already holds the database."""
    if conn.dialect.name == "postgresql":
        key = zlib.crc32(f"restage-review:{what}".encode()) - 2**31  # a signed 32-bit key
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def migrate(engine: Engine) -> int:
    """Bring the database to ``SCHEMA_VERSION``; -> the version it had."""
    with write(engine) as conn:
        exclusive(conn, "migrate")
        start = current_version(conn)
        if start > SCHEMA_VERSION:
            raise RuntimeError(
                f"review database {engine.url.render_as_string(hide_password=True)} has schema "
                f"version {start}, newer than this restage's {SCHEMA_VERSION}: upgrade restage"
            )
        for version in range(start + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version - 1](conn)
            conn.execute(schema_version.insert().values(version=version, applied_at=now()))
    return start


# --------------------------------------------------------------------------- connections


def database_url(db: str) -> str:
    """``--db``: a SQLAlchemy URL, or a path to a SQLite file (made with its folder)."""
    if "://" in db:
        try:
            make_url(db).get_dialect()  # a dialect SQLAlchemy (or a plugin) knows
        except (ArgumentError, NoSuchModuleError, ValueError) as exc:
            raise ValueError(
                f"--db {db!r} is not a database URL SQLAlchemy can open ({exc}); e.g. "
                "sqlite:///review.db, postgresql://user@host/review, or a file path"
            ) from None
        return db
    path = Path(db).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def connect(db: str) -> Engine:
    """The engine for ``--db``, migrated to the current schema."""
    url = database_url(db)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # transactions are begun below, not by pysqlite
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            _wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:
            mode = conn.info.pop("begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")
    else:
        engine = create_engine(url, pool_pre_ping=True)
    migrate(engine)
    return engine


def _wal(cur: Any, wait_s: float = 30.0) -> None:
    """Put the SQLite file in WAL mode (a no-op once it is: the mode is kept in the file).
    Switching a new file takes an exclusive lock that SQLite does not wait for: servers
    started together on it retry, as its busy timeout would."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """A transaction that writes: committed whole or not at all (SQLite: BEGIN IMMEDIATE)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.info["begin"] = "IMMEDIATE"
        with conn.begin():
            yield conn


@contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


def secret_key(engine: Engine) -> bytes:
    with read(engine) as conn:
        value = conn.execute(
            select(settings.c.value).where(settings.c.key == "secret_key")
        ).scalar_one()
    return bytes.fromhex(value)
