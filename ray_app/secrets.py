"""Secrets stay in the process that read them.

Ray's processes (gcs_server, raylet, the dashboard, every worker and Serve replica) inherit
the environment of the process that starts Ray, and ``runtime_env`` copies variables to
every worker of a job. A secret read from the environment is therefore removed from it
before Ray starts, and never put into a ``runtime_env``; workers get what they need in a
non-secret form (API keys: their SHA-256 digests).

Every environment variable that holds a secret (or names a file of secrets) is registered
here once, so that a later feature's secret (rater secrets, storage credentials) gets the
same treatment by adding one ``register`` call.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

_SECRET_ENV: dict[str, str] = {}  # variable -> what it holds


def register(name: str, holds: str) -> str:
    """Declare ``name`` as a secret environment variable -> ``name``."""
    if name in _SECRET_ENV:
        raise ValueError(f"secret variable {name} is already registered ({_SECRET_ENV[name]})")
    _SECRET_ENV[name] = holds
    return name


def secret_variables() -> dict[str, str]:
    """The registered secret variables and what each holds."""
    return dict(_SECRET_ENV)


def scrub(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove every registered secret variable from ``environ`` (default: this process's
    environment, which child processes inherit) -> the names removed. Read the secrets first."""
    env = os.environ if environ is None else environ
    return [name for name in list(_SECRET_ENV) if env.pop(name, None) is not None]


def without_secrets(env_vars: dict[str, str]) -> dict[str, str]:
    """``env_vars`` for a ``runtime_env`` with the secret variables left out."""
    return {k: v for k, v in env_vars.items() if k not in _SECRET_ENV}


# API keys of `restage serve` (serve/auth.py reads them in the CLI process).
API_KEYS = register("RESTAGE_API_KEYS", "API keys of restage serve, comma-separated")
API_KEYS_FILE = register("RESTAGE_API_KEYS_FILE", "a file of API keys of restage serve")
