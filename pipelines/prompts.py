"""`restage prompts build`: extend the prompt bank with the optional ``llm`` role, then curate
(paper A.2.2: prompts are generated per product type, curated, and cached offline).

One Ray Data row per product type goes through a pool of ``PromptWriter`` actors; the
candidates are curated against the existing prompts of their type (rules in
``ray_app.prompts``) and the merged bank is written to ``--out``. The packaged bank is never
modified in place: point ``augment.prompt_bank`` at the new file to use it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from actors.llm import PromptWriter
from ray_app import storage
from ray_app.config import ConfigError, RestageConfig
from ray_app.prompts import GENERIC, ProductType, PromptBank, curate
from ray_app.report import JobSummary, format_table
from ray_app.seeds import derive_seed

JOB = "prompts"
EXAMPLES_SHOWN = 6


class _TypeWriter:
    """A ``PromptWriter`` that passes each row's type through (actor outputs replace the batch)."""

    def __init__(self, config: RestageConfig, per_type: int):
        self.writer = PromptWriter(config.model_spec("llm"), per_type)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"type": batch["type"], **self.writer(batch)}


def build(
    config: RestageConfig,
    out: str,
    per_type: int = 30,
    types: list[str] | None = None,
    bank_uri: str | None = None,
) -> JobSummary:
    import ray

    from ray_app.plan import preflight
    from ray_app.runtime import init_ray, role_resources

    if config.llm is None:
        raise ConfigError("llm is not configured: set llm.source to build prompts")
    start = time.perf_counter()
    bank = PromptBank.load(bank_uri or config.augment.prompt_bank)
    names = types or [*bank.types, GENERIC]
    unknown = sorted(set(names) - set(bank.types) - {GENERIC})
    if unknown:
        raise ConfigError(
            f"--types: unknown type(s) {', '.join(unknown)}; known: {', '.join(bank.types)}"
        )
    rows = [
        {
            "type": name,
            "noun": bank.type_of(name).noun if name != GENERIC else "product",
            "examples": list(bank.type_of(name).prompts[:EXAMPLES_SHOWN]),
            "seed": derive_seed(name, "prompts", 0, config.seed),
        }
        for name in names
    ]
    config, _ = preflight(config, JOB)  # before Ray starts: a job that cannot run ends now
    init_ray(config)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _TypeWriter,
        fn_constructor_kwargs={"config": config, "per_type": per_type},
        batch_size=1,
        **role_resources(config, "llm"),
    )
    summary = JobSummary(JOB, storage.normalize_uri(out))
    stat = summary.stage("curate", "prompts")
    types_out = dict(bank.types)
    generic = bank.generic
    report: list[list[Any]] = []
    for row in ds.iter_rows():
        name, candidates = row["type"], list(row["candidates"])
        old = bank.type_of(name)
        kept, rejected = curate(candidates, bank.rules, existing=old.prompts)
        merged = ProductType(old.name, old.aliases, old.objects, old.prompts + tuple(kept))
        if name == GENERIC:
            generic = merged
        else:
            types_out[name] = merged
        reasons = Counter(reason.split(":")[0].split("=")[0] for _, reason in rejected)
        stat.items_in += len(candidates)
        stat.items_out += len(kept)
        stat.dropped += len(rejected)
        stat.errors += bool(row["error"])
        report.append(
            [
                name,
                len(candidates),
                len(kept),
                len(old.prompts) + len(kept),
                "; ".join(f"{r} x{n}" for r, n in reasons.most_common(3)) or (row["error"] or ""),
            ]
        )
    new_bank = PromptBank(types_out, generic, bank.rules, source=out)
    new_bank.save(out)
    summary.products = {"types": len(names)}
    summary.wall_seconds = time.perf_counter() - start
    report.sort()
    summary.extra = {"per_type": report}
    print(
        format_table(
            ["type", "candidates", "kept", "total prompts", "top rejection reasons"], report
        )
    )
    return summary


@dataclass(frozen=True)
class BuildArgs:
    """``restage prompts build``'s arguments (the CLI builds them from its flags)."""

    out: str
    per_type: int = 30
    types: str | None = None  # comma-separated product types; None: all and generic
    bank: str | None = None


def main(config: RestageConfig, args: BuildArgs) -> JobSummary:
    """CLI entry: ``restage prompts build --out URI [--per-type N] [--types a,b] [--bank URI]``."""
    types = [t.strip() for t in args.types.split(",")] if args.types else None
    return build(config, args.out, per_type=args.per_type, types=types, bank_uri=args.bank)
