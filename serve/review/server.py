"""`restage review serve | add-rater | results`: the entry points behind the CLI."""

from __future__ import annotations

import posixpath
import re
import sys

from ray_app.config import RestageConfig
from ray_app.runs import check_name, generations_root, parse_runs
from serve.review import accounts, db, rounds


def round_runs(generations: list[str], run_items: list[str]) -> dict[str, list[str]]:
    """``--generations URI`` (named after its folder) and ``--run NAME=URI`` -> runs."""
    runs = parse_runs(run_items) if run_items else {}
    for uri in generations:
        root = generations_root(uri)
        parts = [p for p in root.rstrip("/").split("/") if p]
        name = parts[-1] if parts else "generations"
        if name == "generations" and len(parts) > 1:  # a `restage run` output's folder
            name = parts[-2]
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", posixpath.basename(name))[:64].lstrip("-_.") or "run"
        check_name(name, f"--generations {uri}")
        if name in runs:
            raise ValueError(
                f"--generations {uri}: a run is already named {name!r}; name it with "
                f"--run OTHER={uri}"
            )
        runs[name] = [root]
    if not runs:
        raise ValueError("give --generations URI or --run NAME=URI (a `restage generate` output)")
    return runs


def add_rater(db_uri: str, name: str, admin: bool, reset: bool) -> str:
    return accounts.add_rater(db.connect(db_uri), name, admin=admin, reset=reset)


def serve_round(
    config: RestageConfig,
    *,
    db_uri: str,
    generations: list[str],
    run_items: list[str],
    host: str,
    port: int,
    root_path: str,
    secure_cookies: bool,
) -> None:
    import uvicorn

    from serve.review.app import create_app
    from serve.review.summary import results_view

    engine = db.connect(db_uri)
    counts = rounds.import_runs(
        engine,
        round_runs(generations, run_items),
        config.review.sample_per_run,
        config.seed,
    )
    total = sum(counts.values())
    print(
        f"review round: {total} images ({', '.join(f'{k}: {v}' for k, v in counts.items())}), "
        f"{config.review.raters_per_image} raters each; http://{host}:{port}{root_path}/login",
        file=sys.stderr,
    )
    app = create_app(
        engine,
        config.review,
        secure_cookies=secure_cookies,
        results=lambda e: results_view(e, config.review, config.seed),
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        root_path=root_path,
        proxy_headers=True,
        log_level="warning",
    )
