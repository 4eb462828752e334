"""The summary a job prints at its end and writes as JSON: one row per stage.

A resumed job's summary covers the whole job, not only its last invocation: the totals of
complete products (which a re-run skips) are carried in ``summary.json`` under
``completed`` and added to what the new invocation did; products that failed before are
redone, so only the latest attempt of each counts. A killed invocation writes no summary:
the markers it wrote are newer than the last summary's ``counted_until``, and their stats
(each marker carries its product's) are added; the job's intake tasks read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The product count of a job's summary (and live file) for the products that earlier runs
# finished: this run skipped them.
ALREADY = "already complete"

EXIT_ALL_FAILED = 1


@dataclass
class StageStats:
    """What one stage of a job did: items in and out, dropped, errors, seconds of work."""

    stage: str
    unit: str = "items"
    items_in: int = 0
    items_out: int = 0
    dropped: int = 0
    errors: int = 0
    seconds: float = 0.0

    def add(self, other: StageStats) -> None:
        self.items_in += other.items_in
        self.items_out += other.items_out
        self.dropped += other.dropped
        self.errors += other.errors
        self.seconds += other.seconds


@dataclass
class CompletedTotals:
    """What the complete products of a job add up to, over every invocation."""

    products: int = 0
    ok: int = 0
    partial: int = 0
    stages: dict[str, StageStats] = field(default_factory=dict)
    invocations: int = 0
    wall_seconds: float = 0.0
    # Markers finished up to this time (the writer's clock) are counted here.
    counted_until: float | None = None

    def add(self, status: str, stats: dict[str, dict[str, Any]]) -> None:
        self.products += 1
        if status == "partial":
            self.partial += 1
        else:
            self.ok += 1
        for name, values in stats.items():
            self.stages.setdefault(name, StageStats(name, values.get("unit", "items"))).add(
                StageStats(**values)
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "products": self.products,
            "ok": self.ok,
            "partial": self.partial,
            "invocations": self.invocations,
            "wall_seconds": round(self.wall_seconds, 3),
            "stages": [asdict(s) for s in self.stages.values()],
            **({} if self.counted_until is None else {"counted_until": self.counted_until}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompletedTotals:
        stages = {s["stage"]: StageStats(**s) for s in data.get("stages", [])}
        return cls(
            int(data.get("products", 0)),
            int(data.get("ok", 0)),
            int(data.get("partial", 0)),
            stages,
            int(data.get("invocations", 0)),
            float(data.get("wall_seconds", 0.0)),
            data.get("counted_until"),
        )

    def merge(self, other: CompletedTotals) -> None:
        """Add ``other``'s products and stages (the totals of another block of products)."""
        self.products += other.products
        self.ok += other.ok
        self.partial += other.partial
        for name, stat in other.stages.items():
            self.stages.setdefault(name, StageStats(name, stat.unit)).add(stat)

    @classmethod
    def before_this_run(
        cls, previous: dict[str, Any] | None, uncounted: CompletedTotals
    ) -> CompletedTotals:
        """The totals of the products complete before this invocation: the previous
        summary's, plus ``uncounted`` (products whose markers are newer than it: a killed
        invocation completed them). Without a previous summary that says until when it
        counted, ``uncounted`` holds every complete product's marker."""
        kept = cls.from_dict(previous.get("completed") or {}) if previous else cls()
        if previous is None or "counted_until" not in (previous.get("completed") or {}):
            uncounted.invocations, uncounted.wall_seconds = kept.invocations, kept.wall_seconds
            return uncounted
        kept.merge(uncounted)
        return kept


@dataclass
class JobSummary:
    """A job's summary: stages in order, product counts, wall time and where outputs are."""

    job: str
    out: str
    stages: dict[str, StageStats] = field(default_factory=dict)
    products: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # True when ok/partial/failed count every product of the job (complete ones from earlier
    # invocations too); False when they count this invocation and "already complete" the rest.
    whole_job: bool = False
    # (done, failed) when the product counts are not plain ok/partial/failed (``restage run``).
    totals: tuple[int, int] | None = None

    def stage(self, name: str, unit: str = "items") -> StageStats:
        if name not in self.stages:
            self.stages[name] = StageStats(name, unit)
        return self.stages[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "out": self.out,
            "wall_seconds": round(self.wall_seconds, 3),
            "products": dict(self.products),
            "stages": [
                {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(s).items()}
                for s in self.stages.values()
            ],
            **self.extra,
        }

    def table(self) -> str:
        return format_table(
            ["stage", "unit", "in", "out", "dropped", "errors", "seconds"],
            [
                [s.stage, s.unit, s.items_in, s.items_out, s.dropped, s.errors, f"{s.seconds:.2f}"]
                for s in self.stages.values()
            ],
        )

    def counts(self) -> tuple[int, int]:
        """(products done, products failed) over the whole job; invalid records are failed."""
        if self.totals is not None:
            return self.totals
        p = self.products
        done = p.get("ok", 0) + p.get("partial", 0)
        if not self.whole_job:
            done += p.get(ALREADY, 0)
        return done, p.get("failed", 0) + p.get("invalid", 0)

    def this_invocation(self) -> dict[str, int]:
        """The product counts of this invocation alone, whichever way the job counts: ok,
        partial and failed as this run left them, and "already complete" (finished by an
        earlier run) and "invalid" as given (a whole-job summary keeps this run's in
        ``extra["this_run"]``)."""
        if not self.whole_job:
            return dict(self.products)
        this = self.extra.get("this_run", {})
        counts = {k: int(this[k]) for k in ("ok", "partial", "failed") if k in this}
        for key in (ALREADY, "invalid"):
            if key in self.products:
                counts[key] = self.products[key]
        return counts

    def outcome(self) -> str:
        """The last line a job prints: whether every product is done, some failed, or all
        ("" for a job that does not count products, e.g. ``prompts build``)."""
        if self.totals is None and not {"ok", "failed"} & set(self.products):
            return ""
        done, failed = self.counts()
        errors = self.extra.get("errors") or self.out
        if failed and not done:
            return f"restage {self.job}: FAILED: all {failed} products failed; reasons in {errors}"
        if failed:
            return (
                f"restage {self.job}: done with failures: {failed} of {done + failed} products "
                f"failed (reasons in {errors}); re-running retries them"
            )
        return f"restage {self.job}: done: {done} products"

    def exit_code(self) -> int:
        """Non-zero only when products were attempted and every one failed."""
        done, failed = self.counts()
        return EXIT_ALL_FAILED if failed and not done else 0

    def render(self) -> str:
        products = ", ".join(f"{k}: {v}" for k, v in self.products.items())
        if self.whole_job and "this_run" in self.extra:  # its ok and partial count every run's
            this = self.this_invocation()
            products += "; this run: " + ", ".join(
                f"{k}: {this.get(k, 0)}" for k in ("ok", "partial", "failed")
            )
        text = (
            f"restage {self.job}: {products}; {self.wall_seconds:.1f}s wall\n"
            f"{self.table()}\noutputs: {self.out}"
        )
        return f"{text}\n{self.outcome()}" if self.outcome() else text


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])
