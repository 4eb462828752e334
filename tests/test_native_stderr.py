"""Ray's C++ lines on the command's stderr (`ray_app.native_stderr`), without Ray: a child
process writes to descriptor 2 the way Ray's core worker does."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import textwrap

from conftest import ROOT

# Ray 2.60's line, as its driver's core worker writes it to descriptor 2.
RAY_LINE = (
    "[2026-12-03 02:02:42,728 E 26580 26580] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(CaptionStage))' and ID: 'e2eca8e0f10959b40c11050b01000000' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    "object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)


def child(body: str, **kwargs) -> subprocess.CompletedProcess:
    script = "import os, sys\nfrom ray_app import native_stderr\n" + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script], env=env, timeout=60, check=False, **kwargs
    )


def test_known_harmless_lines_are_dropped_and_everything_else_kept():
    proc = child(
        f"""
        native_stderr.want()
        assert native_stderr.install()
        os.write(2, b"[E] core_worker.cc: a real error\\n" + {RAY_LINE.encode()!r} + b"\\n")
        print("from python", file=sys.stderr)
        os.write(2, b"[F] written just before the process dies, no newline")
        os._exit(3)  # as RAY_LOG(FATAL) ends a process: no atexit, no flush
        """,
        capture_output=True,
    )
    assert proc.returncode == 3
    err = proc.stderr.decode()
    assert "a real error" in err and "from python" in err
    assert "written just before the process dies" in err  # the filter outlives the process
    assert "constructor arguments in the object store" not in err


def test_an_ordinary_exit_lets_the_filter_drain():
    proc = child(
        """
        native_stderr.want()
        native_stderr.install(("drop me",))
        os.write(2, b"keep 1\\ndrop me\\nkeep 2\\n")
        """,
        capture_output=True,
    )
    assert proc.returncode == 0
    assert proc.stderr.decode().splitlines() == ["keep 1", "keep 2"]


def test_a_sigterm_to_the_process_group_ends_the_command_not_the_filter():
    """`kill -- -PGID` (or a supervisor stopping the group): what the command wrote is shown."""
    proc = child(
        """
        import signal
        native_stderr.want()
        native_stderr.install()
        os.write(2, b"written before the group is stopped")
        os.killpg(0, signal.SIGTERM)
        """,
        capture_output=True,
        start_new_session=True,
    )
    assert proc.returncode == -15
    assert "written before the group is stopped" in proc.stderr.decode()


def test_nothing_changes_unless_the_command_wants_it():
    """A library caller or a test runner keeps its stderr: only `restage` itself filters."""
    proc = child(
        f"""
        assert not native_stderr.install()
        os.write(2, {RAY_LINE.encode()!r} + b"\\n")
        """,
        capture_output=True,
    )
    assert proc.returncode == 0 and RAY_LINE in proc.stderr.decode()


def test_a_terminal_stays_a_terminal_to_python():
    """Ray Data's bars and ray_app.progress ask sys.stderr whether it is a terminal."""
    controller, terminal = pty.openpty()
    try:
        proc = child(
            """
            from ray_app.progress import interactive
            native_stderr.want()
            native_stderr.install()
            print("fd2", os.isatty(2), "python", interactive(), file=sys.stderr)
            """,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
        )
        os.close(terminal)
        out = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: no writer left
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(controller)
    assert proc.returncode == 0
    # Descriptor 2 is the filter's pipe; Python's stderr is still the terminal.
    assert "fd2 False python True" in out.decode()
