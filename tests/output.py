"""Reading what a restage command printed."""

from __future__ import annotations


def last_line(text: str) -> str:
    """The last line restage printed. Ray's driver prints what a raylet reports (such as "N
    PYTHON worker processes have been started") as a "(raylet)" line whenever it arrives,
    also after the job's own last line."""
    own = [line for line in text.rstrip().splitlines() if "(raylet)" not in line]
    return own[-1] if own else ""
