"""Error answers of the HTTP API: a stable code, a short message and the request id.

A client sees only what it can act on: the code (stable, for programs), a short message (for
people) and, for its own invalid input, the fields at fault. What went wrong inside (storage
paths, Ray's error text, tracebacks) goes to the ingress replica's log under the same request
id, which the response carries in its body and in the ``X-Request-ID`` header.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi.responses import JSONResponse

log = logging.getLogger("restage.serve")

REQUEST_ID_HEADER = "X-Request-ID"

# code -> HTTP status. Codes are part of the API: add new ones, never rename.
CODES: dict[str, int] = {
    "unauthorized": 401,
    "forbidden": 403,
    "unknown_product": 404,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_json": 422,
    "invalid_request": 422,
    "invalid_image": 422,
    "over_request_budget": 422,
    "rate_limited": 429,
    "over_key_budget": 429,
    "internal_error": 500,
    "adapter_unavailable": 503,
    "generation_unavailable": 503,
    "ranking_unavailable": 503,
    "not_ready": 503,
    "staging_unavailable": 503,
    "deadline_exceeded": 504,
}


def new_request_id() -> str:
    """Ray Serve's id of the request being handled (its proxy returns it in ``X-Request-ID``
    and its replica logs carry it), else a new one."""
    try:
        from ray import serve

        return serve.context._get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:  # outside a Serve replica
        return uuid.uuid4().hex


class ApiError(Exception):
    """An error answer. ``detail``: the client's own fields at fault (422 only); ``internal``:
    what only the log gets; ``retry_after_s``: for 429 and 503."""

    def __init__(
        self,
        code: str,
        message: str,
        detail: list[dict[str, Any]] | None = None,
        internal: str | None = None,
        retry_after_s: float | None = None,
    ):
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}; known: {sorted(CODES)}")
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.detail = code, message, detail
        self.internal, self.retry_after_s = internal, retry_after_s

    @property
    def status(self) -> int:
        return CODES[self.code]


def error_response(err: ApiError, request_id: str, id_header: bool = True) -> JSONResponse:
    """The JSON answer of ``err``; its internal details go to the log with the request id.
    ``id_header=False`` where Ray Serve's proxy already sets ``X-Request-ID`` to that id."""
    if err.internal:
        log.warning("request %s: %s: %s", request_id, err.code, err.internal)
    headers = {REQUEST_ID_HEADER: request_id} if id_header else {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(-(-err.retry_after_s // 1))))  # whole s, up
    body: dict[str, Any] = {"error": err.code, "message": err.message, "request_id": request_id}
    if err.detail is not None:
        body["detail"] = err.detail
    return JSONResponse(body, status_code=err.status, headers=headers)


def unexpected(exc: BaseException) -> ApiError:
    """A 500 for an exception nobody anticipated: its text and traceback only in the log."""
    log.exception("unexpected error", exc_info=exc)
    return ApiError("internal_error", "internal error; quote the request id when reporting it")


# Raised in a generator replica and recognised by the ingress through Ray's error wrapping
# (defined here so that the ingress need not import the model code).


class AdapterNotFound(LookupError):
    """No trained adapter for the product."""


class AdapterUnavailable(RuntimeError):
    """The product's adapter exists but cannot be used (unreadable or malformed files)."""


class GenerationCancelled(RuntimeError):
    """A generation stopped between two steps: its client went away or its deadline passed."""

    def __init__(self, reason: str, steps: int):
        super().__init__(reason, steps)  # args as given: Ray pickles it to the ingress
        self.reason, self.steps = reason, steps

    def __str__(self) -> str:
        return f"generation cancelled after {self.steps} steps: {self.reason}"
