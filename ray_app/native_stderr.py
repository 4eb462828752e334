"""Lines that Ray's C++ core writes straight to the ``restage`` command's stderr.

Ray's core worker in the driver logs to its file (``python-core-driver-*.log`` among Ray's
logs) and also copies each of its ERROR lines to file descriptor 2, below Python's logging,
where no ``logging.Filter`` reaches. Some of those lines are known to be harmless for
restage (``HARMLESS``, each with why). The command routes descriptor 2 through a small filter
process that drops those lines and passes every other byte through; Python's own
``sys.stderr`` keeps writing to the real stderr, so that a terminal is still seen as one.

The filter is a process, not a thread, so that what the core writes just before a crash
(``RAY_LOG(FATAL)`` exits at once) still reaches the console: it drains the pipe after
the command is gone. It is installed after Ray has started its own processes (which get
their own log files), and only in the ``restage`` command itself: a caller that imports
restage, or a test runner capturing descriptor 2, keeps its stderr as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys

HARMLESS = (
    # Ray Data starts every actor-pool worker with its DataContext and map function as
    # ObjectRefs and max_restarts=-1, and Ray warns (once per process) that a restarted
    # actor fails if those refs are gone (ray-project/ray#53727). The operator holds both
    # refs while its pool lives, so a restarted worker finds them; real restart failures
    # are reported as errors of their own.
    "has constructor arguments in the object store and max_restarts > 0",
)

# The filter process: copies stdin to stdout by whole lines, less those containing one
# of its arguments, until its input ends (the command and its children are gone).
_FILTER = r"""
import os, sys
drop = [a.encode() for a in sys.argv[1:]]
out, rest = sys.stdout.buffer, b""
while chunk := os.read(0, 65536):
    *lines, rest = (rest + chunk).split(b"\n")
    kept = [line + b"\n" for line in lines if not any(d in line for d in drop)]
    if kept:
        out.write(b"".join(kept))
        out.flush()
out.write(rest)
out.flush()
"""

_wanted = False
_filter: subprocess.Popen | None = None


def want() -> None:
    """Mark this process as the ``restage`` command, whose stderr it owns: ``install``
    filters from then on."""
    global _wanted
    _wanted = True


def install(harmless: tuple[str, ...] = HARMLESS) -> bool:
    """Route descriptor 2 through the filter (once; only after ``want``) -> whether it is."""
    global _filter
    if _filter is not None:
        return True
    if not _wanted:
        return False
    sys.stderr.flush()
    real = os.dup(2)
    # In a session of its own: a Ctrl-C or a SIGTERM to the process group, meant for the
    # command, would otherwise end the filter first and lose what the command writes as
    # it stops.
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", _FILTER, *harmless],  # -I: os and sys only, nothing of ours
        stdin=subprocess.PIPE,
        stdout=real,
        start_new_session=True,
    )
    assert proc.stdin is not None
    os.dup2(proc.stdin.fileno(), 2)  # C++ writes go to the filter from here on
    proc.stdin.close()  # descriptor 2 is now the pipe's only writer here
    # Python writes straight to the real stderr: already filtered by logging, and a
    # terminal stays a terminal to whoever asks (Ray Data's bars, ray_app.progress).
    old = sys.stderr
    sys.stderr = open(  # noqa: SIM115 (open for the rest of the process)
        real, "w", buffering=1, encoding=old.encoding, errors="backslashreplace"
    )
    _repoint_handlers(old, sys.stderr)
    _filter = proc
    atexit.register(_uninstall, real)
    return True


def _repoint_handlers(old: object, new: object) -> None:
    """Logging handlers made before (they hold the old ``sys.stderr``) write to ``new``."""
    import logging

    loggers = [logging.getLogger()] + [
        v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)


def _uninstall(real: int) -> None:
    """At exit: descriptor 2 back to the real stderr, which ends the filter's input; wait
    until it has written everything (what Ray prints while shutting down then goes
    straight to stderr)."""
    global _filter
    if _filter is None:
        return
    sys.stderr.flush()
    os.dup2(real, 2)
    # A child of ours may still hold the pipe: the filter then drains it after that one.
    with contextlib.suppress(subprocess.TimeoutExpired):
        _filter.wait(timeout=10)
    _filter = None
