"""What a job prints while it runs.

On a terminal, Ray Data's progress bars are the live display (one per job, updated in
place). Elsewhere (CI, a log file, a pipe) in-place bars become a block of lines reprinted
every few seconds, so they are off there and a job prints instead one compact line per stage
(augment, train, generate) when it starts, at most every ``interval`` seconds while it runs,
and when it ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# Lines while a stage runs: at most one per this many seconds (start and end lines aside).
INTERVAL_S = 30.0


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where Ray Data draws its bars) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream is not a terminal
        return False


class StageLines:
    """The compact lines of one stage of a job, for output that is not a terminal.

    ``update(done, detail)`` prints ``restage JOB: done/total UNIT (detail), Ns`` when
    ``interval`` seconds have passed since the last line; ``finish`` always prints.
    Nothing is printed when ``enabled`` is false (a terminal shows Ray Data's bars)."""

    def __init__(
        self,
        job: str,
        total: int,
        unit: str = "products",
        *,
        enabled: bool | None = None,
        interval: float = INTERVAL_S,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.job, self.total, self.unit = job, total, unit
        self.stream = stream
        self.enabled = (not interactive()) if enabled is None else enabled
        self.interval = interval
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0
        self._print(f"{total} {unit} to do")

    def _print(self, text: str) -> None:
        if self.enabled:
            print(f"restage {self.job}: {text}", file=self.stream or sys.stderr, flush=True)

    def _line(self, detail: str) -> str:
        elapsed = self.clock() - self.start
        extra = f" ({detail})" if detail else ""
        return f"{self.done}/{self.total} {self.unit}{extra}, {elapsed:.0f}s"

    def update(self, done: int, detail: str = "") -> None:
        self.done = done
        now = self.clock()
        if done < self.total and now - self.last >= self.interval:  # the end has its own line
            self.last = now
            self._print(self._line(detail))

    def finish(self, detail: str = "") -> None:
        self._print("done: " + self._line(detail))


def finished(products: dict[str, int]) -> int:
    """Products a job has finished so far (whatever their outcome)."""
    return sum(products.get(k, 0) for k in ("ok", "partial", "failed"))


def counts(products: dict[str, int], keys: tuple[str, ...] = ("ok", "partial", "failed")) -> str:
    """``ok 2, failed 1``: the non-zero counts of ``keys``."""
    return ", ".join(f"{k} {products[k]}" for k in keys if products.get(k))
