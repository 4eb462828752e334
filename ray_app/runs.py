"""Runs named on the command line (``--run NAME=URI``): the generations that `restage
evaluate` compares and `restage review` puts to raters. A name may repeat to join a run made
in parts; a URI is a `restage generate` output or a `restage run` output."""

from __future__ import annotations

import re

from ray_app import storage
from ray_app.records import REFERENCE_SIDE
from ray_app.storage import GenerationLayout, RunLayout

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_runs(items: list[str]) -> dict[str, list[str]]:
    """``NAME=URI`` items -> {name: [generation roots]} in the order given; a name may repeat
    (one run made in parts, e.g. DreamBench's object and live-subject prompt lists)."""
    runs: dict[str, list[str]] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        name, uri = name.strip(), uri.strip()
        if not sep or not uri:
            raise ValueError(f"--run {item!r}: expected NAME=URI, e.g. --run restage=runs/shoes")
        check_name(name, f"--run {item!r}")
        runs.setdefault(name, []).append(generations_root(uri))
    if not runs:
        raise ValueError("give at least one --run NAME=URI (a `restage generate` or `run` output)")
    return runs


def check_name(name: str, where: str) -> str:
    if not RUN_NAME.match(name) or name == REFERENCE_SIDE:
        raise ValueError(
            f"{where}: the name {name!r} must be 1-64 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit"
        )
    return name


def generations_root(uri: str) -> str:
    """A `restage generate` output, or the generations of a `restage run` output."""
    root = storage.normalize_uri(uri)
    run_layout = RunLayout(root).generations
    if storage.exists(run_layout.manifest_dir()):
        return run_layout.root
    if storage.exists(GenerationLayout(root).manifest_dir()):
        return root
    raise FileNotFoundError(
        f"--run {uri}: neither a `restage generate` output (no manifest/ folder) nor a "
        "`restage run` output (no generations/manifest/ folder)"
    )
