"""The summary a job prints at its end and writes as JSON: one row per stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
class JobSummary:
    """A job's summary: stages in order, product counts, wall time and where outputs are."""

    job: str
    out: str
    stages: dict[str, StageStats] = field(default_factory=dict)
    products: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

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

    def render(self) -> str:
        products = ", ".join(f"{k}: {v}" for k, v in self.products.items())
        return (
            f"restage {self.job}: {products}; {self.wall_seconds:.1f}s wall\n"
            f"{self.table()}\noutputs: {self.out}"
        )


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
