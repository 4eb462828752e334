"""What a job prints while it runs (`ray_app.progress`)."""

from __future__ import annotations

import io

from ray_app.config import load_config
from ray_app.progress import StageLines, counts, finished, interactive
from ray_app.runtime import progress_bars


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_compact_and_at_a_bounded_rate():
    out, clock = io.StringIO(), Clock()
    lines = StageLines("augment", 100, enabled=True, interval=30, stream=out, clock=clock)
    for done in range(1, 101):  # one product a second: 100 updates over 100 s
        clock.now = float(done)
        lines.update(done, counts({"ok": done}))
    lines.finish(counts({"ok": 100, "failed": 0}))
    printed = out.getvalue().splitlines()
    assert printed[0] == "restage augment: 100 products to do"
    assert printed[1] == "restage augment: 30/100 products (ok 30), 30s"
    assert len(printed) == 1 + 100 // 30 + 1  # start, one per 30 s, end
    assert printed[-1] == "restage augment: done: 100/100 products (ok 100), 100s"


def test_the_last_update_leaves_the_end_to_finish():
    out, clock = io.StringIO(), Clock()
    lines = StageLines("augment", 3, enabled=True, interval=30, stream=out, clock=clock)
    clock.now = 377.0
    lines.update(3, "ok 3")  # all at once, long after the start line
    lines.finish("ok 3")
    assert out.getvalue().splitlines() == [
        "restage augment: 3 products to do",
        "restage augment: done: 3/3 products (ok 3), 377s",
    ]


def test_nothing_is_printed_when_disabled():
    out = io.StringIO()
    lines = StageLines("train", 3, enabled=False, interval=0, stream=out)
    lines.update(3)
    lines.finish()
    assert out.getvalue() == ""


def test_bars_only_on_a_terminal_unless_configured(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert interactive(Tty()) and not interactive(io.StringIO())
    assert progress_bars(load_config("tiny", overrides=["ray.progress_bars=true"]))
    assert not progress_bars(load_config("tiny", overrides=["ray.progress_bars=false"]))
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not progress_bars(load_config("tiny"))  # 'auto': no terminal, no bars
    monkeypatch.setattr("sys.stderr", Tty())
    assert progress_bars(load_config("tiny"))


def test_finished_counts_every_outcome():
    assert finished({"ok": 2, "partial": 1, "failed": 1, "already complete": 5}) == 4
    assert counts({"ok": 2, "partial": 0, "failed": 1}) == "ok 2, failed 1"
