"""API keys for the endpoint: bearer tokens from ``RESTAGE_API_KEYS`` (comma-separated) or
the file named by ``RESTAGE_API_KEYS_FILE`` (one key per line, ``#`` comments).

The keys are read in the process that starts Ray (the ``restage serve`` CLI), which then
removes both variables from its environment before Ray starts (``ray_app.secrets``): only
SHA-256 digests of the keys travel to the Serve replicas (deployment arguments are visible
in Ray's dashboard and state API). A presented key is compared with every stored digest in
constant time, without stopping at the first match.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from ray_app.secrets import API_KEYS, API_KEYS_FILE

ENV_KEYS = API_KEYS
ENV_KEYS_FILE = API_KEYS_FILE
MIN_KEY_LENGTH = 16


class AuthConfigError(ValueError):
    """The configured keys are unusable; the message says which and how to fix it."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_digests(
    environ: dict[str, str] | None = None, keys_file: str | None = None
) -> tuple[str, ...]:
    """Digests of the configured keys (empty when none is configured): ``RESTAGE_API_KEYS``,
    the file named by ``RESTAGE_API_KEYS_FILE`` and ``keys_file``."""
    env = os.environ if environ is None else environ
    keys: list[str] = []
    if env.get(ENV_KEYS):
        keys += [k.strip() for k in env[ENV_KEYS].split(",") if k.strip()]
    files = [(ENV_KEYS_FILE, env[ENV_KEYS_FILE])] if env.get(ENV_KEYS_FILE) else []
    if keys_file:
        files.append(("api_keys_file", keys_file))
    for name, value in files:
        path = Path(value).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise AuthConfigError(f"{name}={path}: cannot read it ({exc.strerror})") from None
        keys += [
            line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
        ]
    short = [k for k in keys if len(k) < MIN_KEY_LENGTH]
    if short:
        raise AuthConfigError(
            f"{len(short)} API key(s) shorter than {MIN_KEY_LENGTH} characters: use long random "
            "keys, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return tuple(dict.fromkeys(digest(k) for k in keys))


@dataclass(frozen=True)
class KeyCheck:
    """The outcome of checking an Authorization header: HTTP status and a reason."""

    status: int  # 200, 401 or 403
    reason: str
    key_digest: str | None = None  # the matched key's digest (budgets are kept per key)


def check_authorization(header: str | None, digests: tuple[str, ...]) -> KeyCheck:
    """401 without a bearer token, 403 with a wrong one, 200 with a configured key."""
    if not header:
        return KeyCheck(401, "missing Authorization header: send 'Authorization: Bearer <key>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return KeyCheck(401, "malformed Authorization header: expected 'Bearer <key>'")
    presented = digest(token.strip())
    matches = [hmac.compare_digest(presented, d) for d in digests]  # all compared, no early exit
    if any(matches):
        return KeyCheck(200, "ok", digests[matches.index(True)])
    return KeyCheck(403, "invalid API key")
