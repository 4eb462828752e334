"""Request bodies before they are parsed: media type, size and nesting depth.

``json.loads`` recurses once per nesting level, so a small body nested a thousand levels deep
raises ``RecursionError``; the depth is therefore measured with a flat scan of the raw bytes
(brackets outside strings) and refused before the body is parsed.
"""

from __future__ import annotations

import json
from typing import Any

from serve.errors import ApiError

JSON_MEDIA_TYPES = ("application/json",)


def check_media_type(content_type: str | None) -> None:
    """415 unless the body is declared ``application/json`` (a charset parameter is fine)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in JSON_MEDIA_TYPES:
        raise ApiError(
            "unsupported_media_type",
            f"send the body as JSON with 'Content-Type: application/json' (got {media or 'none'!r})",
        )


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in ``body`` (valid JSON or not)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def parse_json(body: bytes, max_depth: int) -> Any:
    """The JSON value of ``body``: 422 when it nests deeper than ``max_depth`` or is not JSON."""
    depth = json_depth(body)
    if depth > max_depth:
        raise ApiError(
            "invalid_json",
            f"JSON nested {depth} levels deep; at most serve.max_json_depth={max_depth}",
            [{"field": "body", "message": f"nesting depth {depth} is above {max_depth}"}],
        )
    try:
        return json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            "invalid_json", "the body is not valid JSON", [{"field": "body", "message": str(exc)}]
        ) from None
