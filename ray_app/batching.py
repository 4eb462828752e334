"""Helpers for actors' batch in -> batch out: columns as lists, micro-batches by the role's
batch size, and per-row errors so one bad row never fails the rest of its batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


def column(batch: dict[str, Any], key: str, n: int | None = None, default: Any = None) -> list[Any]:
    """A batch column as a Python list (``default`` repeated when it is absent)."""
    if key in batch and batch[key] is not None:
        values = batch[key]
        return (
            values.tolist()
            if isinstance(values, np.ndarray) and values.dtype != object
            else list(values)
        )
    if n is None:
        raise KeyError(f"batch has no column {key!r}; columns: {sorted(batch)}")
    return [default] * n


def batch_len(batch: dict[str, Any]) -> int:
    lengths = {len(v) for v in batch.values() if v is not None}
    if len(lengths) > 1:
        raise ValueError(
            f"batch columns have different lengths: { {k: len(v) for k, v in batch.items()} }"
        )
    return lengths.pop() if lengths else 0


def map_chunks(
    items: Sequence[T],
    size: int,
    fn: Callable[[list[T]], list[R]],
) -> list[tuple[R | None, str | None]]:
    """Apply ``fn`` to chunks of at most ``size`` items -> (result, error) per item.

    When a chunk raises, its items are retried one at a time so that the error lands on the
    row that caused it; the others still get results.
    """
    out: list[tuple[R | None, str | None]] = []
    for start in range(0, len(items), size):
        chunk = list(items[start : start + size])
        try:
            results = fn(chunk)
            if len(results) != len(chunk):
                raise RuntimeError(f"{fn!r} returned {len(results)} results for {len(chunk)} items")
            out.extend((r, None) for r in results)
        except Exception as exc:
            if len(chunk) == 1:
                out.append((None, f"{type(exc).__name__}: {exc}"))
                continue
            for item in chunk:
                try:
                    out.append((fn([item])[0], None))
                except Exception as inner:
                    out.append((None, f"{type(inner).__name__}: {inner}"))
    return out


def object_array(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array (Ray Data keeps bytes, None and lists intact in these)."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def embed_present(
    items: Sequence[Any],
    size: int,
    embed: Callable[[list[Any]], np.ndarray],
    dim: int,
    errors: list[str | None],
    who: str,
) -> np.ndarray:
    """Embed the items that are not None in micro-batches -> (N, dim) float32, NaN rows for
    absent items and for failed ones (whose error is recorded in ``errors``)."""
    index = [i for i, item in enumerate(items) if item is not None]
    results = map_chunks([items[i] for i in index], size, lambda chunk: list(embed(chunk)))
    out = np.full((len(items), dim), np.nan, np.float32)
    for i, (vec, err) in zip(index, results, strict=True):
        if err:
            errors[i] = errors[i] or f"{who}: {err}"
        else:
            out[i] = vec
    return out


def decode_column(
    values: Sequence[Any], errors: list[str | None], who: str
) -> list[np.ndarray | None]:
    """Decode a column of encoded images to RGB arrays; a row that does not decode is None
    and gets its reason in ``errors``."""
    from ray_app.images import decode_rgb

    out: list[np.ndarray | None] = []
    for i, data in enumerate(values):
        try:
            out.append(decode_rgb(data))
        except Exception as exc:
            out.append(None)
            errors[i] = f"{who}: cannot decode image: {exc}"
    return out
