"""`restage run`: augment -> train -> generate under one output root (``RunLayout``).

Each step is the job itself with its own resume rule (markers, adapter.json), so a killed
run started again skips every product that a step already finished and picks up where it
stopped: ``OUT/augment/`` (training sets), ``OUT/adapters/<product_id>/`` (one adapter
folder per product) and ``OUT/generations/`` (ranked images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipelines.augment import augment
from pipelines.generate import generate
from pipelines.train import train
from ray_app import storage
from ray_app.config import RECIPES, ConfigError, RestageConfig, with_overrides
from ray_app.report import ALREADY, JobSummary
from ray_app.storage import RunLayout

JOB = "run"


def apply_recipe(config: RestageConfig, recipe: str) -> RestageConfig:
    """``config`` with ``recipe``'s overrides (``ray_app.config.RECIPES``): what `restage
    run --recipe RECIPE` runs with, for callers that hold a config (the DreamBench driver
    runs both recipes on the same subjects)."""
    if recipe not in RECIPES:
        raise ConfigError(f"recipe {recipe!r}: unknown; recipes are: {', '.join(RECIPES)}")
    return with_overrides(config, RECIPES[recipe])


def run(config: RestageConfig, manifest: str, out: str) -> JobSummary:
    """Run the three jobs in sequence; returns a summary with one row per job."""
    start = time.perf_counter()
    layout = RunLayout(storage.normalize_uri(out))
    summary = JobSummary(JOB, layout.root)
    jobs: list[JobSummary] = []
    for name, step in (
        ("augment", lambda: augment(config, manifest, layout.augment.root)),
        ("train", lambda: train(config, layout.augment.root, layout.adapters.root, manifest)),
        ("generate", lambda: generate(config, layout.adapters.root, layout.generations.root)),
    ):
        job = step()
        jobs.append(job)
        # What each job did in this run: augment's own summary counts every product of the
        # job, train's and generate's this run's, so a re-run said "augment ok: 3" beside
        # "train ok: 0" when none of them redid anything.
        counts = job.this_invocation()
        stage = summary.stage(name, "products")
        done = counts.get("ok", 0) + counts.get("partial", 0)
        stage.items_in = done + counts.get("failed", 0)
        stage.items_out = done
        stage.errors = counts.get("failed", 0)
        stage.seconds = job.wall_seconds
        for key in ("ok", "failed", ALREADY, "invalid"):  # the last two if any
            if key in counts and (key in ("ok", "failed") or counts[key]):
                summary.products[f"{name} {key}"] = counts[key]
    # The run's outcome: products that came out of generate, against every failure on the way.
    generated = jobs[-1].counts()[0]
    summary.totals = (generated, sum(j.counts()[1] for j in jobs))
    summary.wall_seconds = time.perf_counter() - start
    summary.extra = {
        # what the adapters were trained on: two runs on the same products compare recipes
        "recipe": config.train.recipe,
        "components": config.augment.components(),
        "augment": layout.augment.root,
        "adapters": layout.adapters.root,
        "generations": layout.generations.root,
        "jobs": [j.to_dict() for j in jobs],
    }
    storage.write_json(storage.join(layout.root, "summary.json"), summary.to_dict())
    return summary


@dataclass(frozen=True)
class RunArgs:
    """``restage run``'s arguments (the CLI builds them from its flags)."""

    manifest: str
    out: str


def main(config: RestageConfig, args: RunArgs) -> JobSummary:
    """CLI entry: ``restage run --manifest URI --out URI``."""
    return run(config, args.manifest, args.out)
