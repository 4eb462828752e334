"""Raters, their secrets, sessions and CSRF tokens.

- A rater is created by ``restage review add-rater NAME``, which prints a secret once; only
  its scrypt hash is stored. ``--reset`` prints a new one and ends the rater's sessions.
- A session is a signed cookie (HMAC-SHA256 with the database's secret key) holding the
  rater's id, their session epoch and a random nonce; it expires after ``SESSION_SECONDS``.
- CSRF: every form and every JavaScript POST carries a token that is the HMAC of the
  session's nonce (of a pre-session cookie's nonce on the sign-in form). A request that
  changes anything without the right token is refused with 403, whatever its cookies say.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Engine, select, update

from serve.review import db

SESSION_SECONDS = 12 * 3600
RATER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


@dataclass(frozen=True)
class Rater:
    id: int
    name: str
    is_admin: bool
    session_epoch: int


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_secret(secret: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    got = hashlib.scrypt(secret.encode(), salt=bytes.fromhex(salt), **_SCRYPT)
    return hmac.compare_digest(got.hex(), digest)


def add_rater(engine: Engine, name: str, *, admin: bool = False, reset: bool = False) -> str:
    """Create the rater (or, with ``reset``, give an existing one a new secret and end their
    sessions); -> the secret, which is stored only as a hash."""
    if not RATER_NAME.match(name):
        raise ValueError(
            f"rater name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-', starting "
            "with a letter or digit"
        )
    secret = secrets.token_urlsafe(18)
    with db.write(engine) as conn:
        db.exclusive(conn, f"rater name {name}")  # the same name added twice at once: one wins
        row = conn.execute(select(db.raters).where(db.raters.c.name == name)).mappings().first()
        if row is None:
            if reset:
                raise ValueError(f"no rater {name!r} to reset: add it without --reset")
            conn.execute(
                db.raters.insert().values(
                    name=name,
                    secret_hash=hash_secret(secret),
                    is_admin=admin,
                    session_epoch=0,
                    created_at=db.now(),
                )
            )
        elif not reset:
            raise ValueError(
                f"rater {name!r} exists; `restage review add-rater {name} --reset` gives it a "
                "new secret"
            )
        else:
            conn.execute(
                update(db.raters)
                .where(db.raters.c.id == row["id"])
                .values(
                    secret_hash=hash_secret(secret),
                    is_admin=admin or row["is_admin"],
                    session_epoch=row["session_epoch"] + 1,
                )
            )
    return secret


def _rater(row) -> Rater:
    return Rater(row["id"], row["name"], bool(row["is_admin"]), row["session_epoch"])


def sign_in(engine: Engine, name: str, secret: str) -> Rater | None:
    with db.read(engine) as conn:
        row = conn.execute(select(db.raters).where(db.raters.c.name == name)).mappings().first()
    if row is None:
        hash_secret(secret)  # the same time spent whether or not the name exists
        return None
    return _rater(row) if check_secret(secret, row["secret_hash"]) else None


def rater_by_name(engine: Engine, name: str) -> Rater | None:
    with db.read(engine) as conn:
        row = conn.execute(select(db.raters).where(db.raters.c.name == name)).mappings().first()
    return None if row is None else _rater(row)


def rater_by_id(engine: Engine, rater_id: int) -> Rater | None:
    with db.read(engine) as conn:
        row = conn.execute(select(db.raters).where(db.raters.c.id == rater_id)).mappings().first()
    return None if row is None else _rater(row)


# --------------------------------------------------------------------------- signing


class Signer:
    """Signed, expiring cookie values and the CSRF tokens bound to them."""

    def __init__(self, key: bytes):
        self.key = key

    def _mac(self, purpose: str, data: bytes) -> str:
        return hmac.new(self.key, purpose.encode() + b"\0" + data, hashlib.sha256).hexdigest()

    def session(self, rater: Rater) -> str:
        body = {
            "r": rater.id,
            "e": rater.session_epoch,
            "n": secrets.token_hex(16),
            "t": int(time.time()),
        }
        raw = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()
        return f"{raw}.{self._mac('session', raw.encode())}"

    def read_session(self, value: str | None) -> dict | None:
        """The session's body when the cookie is authentic and fresh, else None."""
        if not value or "." not in value:
            return None
        raw, mac = value.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac("session", raw.encode())):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(raw.encode()))
        except ValueError:
            return None
        if not isinstance(body, dict) or time.time() - body.get("t", 0) > SESSION_SECONDS:
            return None
        return body

    def csrf(self, nonce: str) -> str:
        return self._mac("csrf", nonce.encode())

    def check_csrf(self, nonce: str | None, token: str | None) -> bool:
        return bool(nonce and token) and hmac.compare_digest(self.csrf(nonce), token)
