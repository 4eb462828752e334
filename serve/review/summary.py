"""A round's results from its database: the admin's results page and `restage review
results` (the statistics are serve/review/results.py's)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from ray_app.config import ReviewConfig
from ray_app.kinds import Metric, Question
from serve.review import db, results, tasks


def compute(engine: Engine, config: ReviewConfig, seed: int):
    """-> (answers, verdicts, summary) of the round as it stands."""
    answers, images = tasks.export(engine)
    return (
        answers,
        results.verdicts(answers, images, config),
        results.summarize(answers, images, config, seed=seed),
    )


def results_view(engine: Engine, config: ReviewConfig, seed: int) -> dict[str, Any]:
    """What the results page shows."""
    _, _, summary = compute(engine, config, seed)
    return {
        "summary": summary,
        "groups": [*summary.runs.items(), ("all runs", summary.overall)],
        "questions": [q.value for q in Question],
        "predictors": list(results.PREDICTORS),
        "metrics": [m.value for m in Metric],
    }


def write(db_uri: str, out: str, config: ReviewConfig, seed: int) -> str:
    """Write the round's results under ``out``; -> a short text report."""
    engine = db.connect(db_uri)
    answers, verdict_table, summary = compute(engine, config, seed)
    files = results.write_results(out, answers, verdict_table, summary)
    lines = [f"pass rule: {summary.pass_rule}, {summary.raters_per_image} raters per image"]
    for name, group in [*summary.runs.items(), ("all runs", summary.overall)]:
        img, prod = group.per_image, group.per_product
        lines.append(
            f"{name}: {group.images_rated} images rated ({group.images_pending} pending); "
            f"per image {_rate(img)}, per product {_rate(prod)}"
        )
    lines.append(f"written: {', '.join(str(p) for p in vars(files).values())}")
    return "\n".join(lines)


def _rate(rate: results.PassRate) -> str:
    if rate.rate is None:
        return "n/a"
    return f"{rate.passed}/{rate.total} = {rate.rate:.1%} [{rate.lo:.1%}, {rate.hi:.1%}]"
