"""``restage``: the command line. One subcommand per job, plus config, models and prompts.

Jobs are dispatched by dotted name (``pipelines.augment:augment``) and imported only when
run, so ``ray_app`` never imports the job packages at import time.

Exit status, the same for every command: 0 done; 2 a usage error, i.e. something the command
was given is wrong (an argument, a config value, an API key, an input file that is missing or
malformed; argparse's own errors are 2 too), reported in one line that names it, before any
work starts where it can be checked up front; 3 a job that is not built yet; 4 a job that
cannot run on this cluster (its placement plan says what to change); 141 the reader
of the output went away (``restage prompts show | head``), as for a process that SIGPIPE
ends; anything else is a bug or an outage and exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_app import __version__, native_stderr
from ray_app.config import (
    PROFILES,
    RECIPES,
    ConfigError,
    RestageConfig,
    ServeConfig,
    load_config,
)
from ray_app.node_loss import EXIT_NODE_LOST, NodeLost
from ray_app.plan import JOBS as PLAN_JOBS
from ray_app.plan import PlanError
from ray_app.progress import HEARTBEAT_S, PROGRESS_FILE, STALE_BEATS, JobRunning
from ray_app.storage import AdapterLayout, MissingBackendError

EXIT_USAGE = 2
EXIT_PLAN = 4  # the job cannot run on this cluster (restage plan, every job's preflight)
EXIT_RUNNING = 73  # another run of the job is live on the same output (EX_CANTCREAT)
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument(
        "--profile",
        default="default",
        choices=PROFILES,
        help="model profile: 'default' (real checkpoints, GPUs) or 'tiny' (random tiny "
        "models built locally, CPU, no network) [default: %(default)s]",
    )
    g.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML file merged over the profile (repeatable)",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override one config value, e.g. --set generator.batch_size=2 (repeatable)",
    )


def _config(args: argparse.Namespace) -> RestageConfig:
    # a recipe (`restage run --recipe`) is its overrides, before the user's own --set
    recipe = RECIPES[args.recipe] if getattr(args, "recipe", None) else []
    return load_config(args.profile, files=args.config, overrides=[*recipe, *args.overrides])


def _call(target: str, *args: Any, **kwargs: Any) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _entry(target: str, args_type: str, config: RestageConfig, ns: argparse.Namespace) -> Any:
    """Call a job's ``main`` (``target``) with its typed arguments (the dataclass
    ``args_type`` of the same module, filled from the parsed flags): the argparse
    ``Namespace`` stops here."""
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, args_type)
    typed = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    return getattr(module, name)(config, typed)


# --------------------------------------------------------------------------- commands


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.json:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    else:
        print(cfg.to_yaml(), end="")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from ray_app import checkpoints, models
    from ray_app.config import ROLES

    cfg = _config(args)
    models.apply_environment(cfg.offline)
    roles = args.roles.split(",") if args.roles else [r for r in ROLES if getattr(cfg, r)]
    for role in roles:
        cfg.role(role)  # unknown or unconfigured roles fail before any download
    start = time.perf_counter()
    sources = checkpoints.fetch(cfg, args.to, roles)
    for role, uri in sources.items():
        print(f"{role:<11} {uri}")
    overlay = f"{args.to.rstrip('/')}/{checkpoints.SOURCES_FILE}"
    print(
        f"{len(sources)} checkpoints in {time.perf_counter() - start:.1f}s; run jobs against "
        f"them with --config {overlay}"
    )
    return 0


def _gpu_class(text: str):
    from ray_app.plan import GpuClass

    try:
        name, gpus, gib = text.split(":")
        return GpuClass(name, float(gpus), float(gib), f"restage_gpu_{int(float(gib))}gb")
    except ValueError:
        raise ConfigError(f"--node-type {text!r}: expected NAME:GPUS:GB, e.g. a10g:32:24") from None


# `restage plan --gpus N` without --cpus: a GPU node's usual CPUs per GPU (a p4d has 96 for
# 8 A100s; p5 and a3 nodes have more), so that CPU-bound sizes (train workers) scale with N.
PLAN_CPUS_PER_GPU, PLAN_MIN_CPUS = 12.0, 64.0


def _plan_cpus(cpus: float | None, gpus: float) -> float:
    return cpus if cpus is not None else max(PLAN_MIN_CPUS, PLAN_CPUS_PER_GPU * gpus)


def cmd_status(args: argparse.Namespace) -> int:
    from ray_app.progress import find_progress, render_status

    states = [s for out in args.out for s in find_progress(out)]
    if not states:
        print(
            f"restage status: no job has run under {' '.join(args.out)} (no {PROGRESS_FILE} "
            "there or in its folders): give a job's --out",
            file=sys.stderr,
        )
        return 1
    now = time.time()
    if args.json:
        print(json.dumps(states, indent=2))
    else:
        print(render_status(states, now))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ray_app.plan import (
        Cluster,
        estimate,
        job_steps,
        render,
        render_estimate,
        total_estimate,
    )

    cfg = _config(args)
    if args.cluster == "current":
        from ray_app.runtime import init_ray

        init_ray(cfg)
        cluster = Cluster.from_ray(cfg)
    elif args.node_type:
        classes = [_gpu_class(text) for text in args.node_type]
        classes.sort(key=lambda c: c.gpu_gib)
        total = sum(c.gpus for c in classes)
        cpus = _plan_cpus(args.cpus, total)
        cluster = Cluster(total, classes[0].gpu_gib, cpus, "--node-type", classes)
    else:
        if args.gpus is None:
            raise ConfigError(
                "plan: give --gpus N (with --gpu-memory GB), --node-type NAME:GPUS:GB "
                "(repeatable), or --cluster current"
            )
        cpus = _plan_cpus(args.cpus, args.gpus)
        cluster = Cluster(args.gpus, args.gpu_memory, cpus, "--gpus/--gpu-memory/--cpus")
    if args.adapters and args.job != "personalize":
        raise ConfigError(
            f"plan {args.job} --adapters: only personalize takes --adapters (its generated "
            "positives); leave --adapters out"
        )
    steps = job_steps(args.job, cfg, cluster, adapters=bool(args.adapters))
    ests = [estimate(s.plan, s.config, args.products) if args.products else None for s in steps]
    *before, (last, est) = list(zip(steps, ests, strict=True))
    total = total_estimate(steps, ests) if before and args.products else None  # type: ignore[arg-type]
    if args.json:
        out = {**last.plan.to_dict(), "estimate": est}
        if before:
            out["before"] = [
                {"title": s.title, **s.plan.to_dict(), "estimate": e} for s, e in before
            ]
            out["total"] = total
        print(json.dumps(out, indent=2))
    else:
        for i, (s, e) in enumerate(zip(steps, ests, strict=True), 1):
            if before:
                print(f"step {i} of {len(steps)}: {s.title}")
            print(render(s.plan))
            if e:
                print(render_estimate(e))
        if total:
            print(
                f"total of the {len(steps)} steps for {total['products']:,} products: "
                f"{total['gpu_hours']:,} GPU-hours, {total['wall_hours']:,} hours of wall time "
                f"({total['seconds_per_product']:,} s per product); the longest step: "
                f"{total['bottleneck']}"
            )
    return 0 if all(s.plan.runnable for s in steps) else EXIT_PLAN


def cmd_models_make_tiny(args: argparse.Namespace) -> int:
    from ray_app import models, tiny

    roles = args.roles.split(",") if args.roles else None
    unknown = sorted(set(roles or []) - set(tiny.tiny_roles()))
    if unknown:
        raise ConfigError(
            f"--roles: unknown role(s) {', '.join(unknown)}; roles: {', '.join(tiny.tiny_roles())}"
        )
    models.apply_environment(offline=True)
    start = time.perf_counter()
    timings = tiny.make_all(Path(args.dir), roles)
    from ray_app.report import format_table

    print(
        format_table(
            ["role", "folder", "seconds"],
            [[r, str(Path(args.dir) / r), f"{s:.2f}"] for r, s in timings.items()],
        )
    )
    print(f"{len(timings)} tiny checkpoints in {time.perf_counter() - start:.1f}s under {args.dir}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from ray_app.models import describe
    from ray_app.report import format_table

    rows = describe(_config(args))
    print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return _entry("serve.app:main", "ServeArgs", _config(args), args)


def cmd_prompts_show(args: argparse.Namespace) -> int:
    from ray_app.prompts import PromptBank
    from ray_app.report import format_table

    bank = PromptBank.load(args.bank)
    if args.type:
        for prompt in bank.type_of(args.type).prompts:
            print(prompt)
        return 0
    rows = [[name, len(t.prompts), ", ".join(t.aliases[:4])] for name, t in bank.types.items()]
    rows.append(["generic", len(bank.generic.prompts), "(fallback)"])
    print(format_table(["type", "prompts", "aliases"], rows))
    return 0


def cmd_review_serve(args: argparse.Namespace) -> int:
    from serve.review.server import serve_round

    if args.sample is not None:
        args.overrides = [*args.overrides, f"review.sample_per_run={args.sample}"]
    serve_round(
        _config(args),
        db_uri=args.db,
        generations=args.generations or [],
        run_items=args.run or [],
        host=args.host,
        port=args.port,
        root_path=args.root_path,
        secure_cookies=args.secure_cookies,
    )
    return 0


def cmd_review_add_rater(args: argparse.Namespace) -> int:
    from serve.review.server import add_rater

    secret = add_rater(args.db, args.name, args.admin, args.reset)
    role = "admin" if args.admin else "rater"
    print(f"{role} {args.name}: secret {secret}", file=sys.stderr)
    print(secret)  # alone on stdout, for scripts; it is not stored and not shown again
    return 0


def cmd_review_results(args: argparse.Namespace) -> int:
    from serve.review.summary import write

    cfg = _config(args)
    report = write(args.db, args.out, cfg.review, cfg.seed)
    print(report)
    return 0


def cmd_ranker_fit(args: argparse.Namespace) -> int:
    from ray_app.learned_ranker import FitOptions, fit, read_ratings

    cfg = _config(args)
    features = [f for text in args.features or [] for f in text.split(",") if f]
    options = FitOptions(args.folds, tuple(features) if args.features else None, args.seed)
    result = fit(read_ratings(args.ratings), cfg, options)
    result.model.save(args.out)
    print(result.render())
    print(f"wrote {args.out}; rank with it: --set generate.ranker={args.out}")
    return 0


def _say_where_ray_logs_are(out: str | None) -> None:
    """Ray's own logs stay in files (``ray.log_to_driver``): link a local Ray's log folder
    into the job's output folder ``out`` and say where it is."""
    if "ray" not in sys.modules:
        return
    from ray_app import runtime

    where = runtime.link_ray_logs(out) if out else runtime.ray_logs_dir()
    if where:
        print(f"Ray's logs: {where}", file=sys.stderr)


def _job(
    target: str, args_type: str, out_is_folder: bool = True
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        cfg = _config(args)
        try:
            summary = _entry(target, args_type, cfg, args)
        finally:
            _say_where_ray_logs_are(args.out if out_is_folder else None)
        print(summary.render())  # its last line says whether any product failed
        return summary.exit_code()

    return run


def cmd_stage(args: argparse.Namespace) -> int:
    """`restage stage` (staging) or `restage stage train-inpainter`."""
    if args.action == "train-inpainter":
        if not args.catalog or args.manifest or args.index or args.animate:
            raise ValueError(
                "restage stage train-inpainter takes --catalog (a `restage index` output) and "
                "--out, not --manifest, --index or --animate"
            )
        return _entry("pipelines.train_inpainter:main", "TrainInpainterArgs", _config(args), args)
    missing = [f"--{n}" for n in ("manifest", "index") if not getattr(args, n)]
    if missing or args.catalog:
        raise ValueError(
            f"restage stage needs {' and '.join(missing) or '--manifest and --index'}"
            + (" (--catalog is for `restage stage train-inpainter`)" if args.catalog else "")
        )
    return _job("pipelines.stage:main", "StageArgs")(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restage",
        description="Put e-commerce products into new scenes with diffusion models without losing "
        "the product. Each job reads and writes any fsspec URI and runs on Ray (a local "
        "Ray started in-process unless ray.address or RAY_ADDRESS names a cluster).",
    )
    parser.add_argument("--version", action="version", version=f"restage {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="show the resolved configuration")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = csub.add_parser("show", help="print the resolved config (profile + files + --set)")
    _add_config_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("models", help="model checkpoints: list roles, build tiny checkpoints")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    mk = msub.add_parser(
        "make-tiny",
        help="build random-weight tiny checkpoints of every role into DIR/<role>",
        description="Build seeded random-weight tiny checkpoints of every model role (same "
        "architectures as the default profile) into DIR/<role>, in each library's own "
        "format; point a role's source at DIR/<role> to load one. Needs no network.",
    )
    mk.add_argument("dir", help="output folder")
    mk.add_argument("--roles", help="comma-separated subset of roles")
    mk.set_defaults(func=cmd_models_make_tiny)
    fe = msub.add_parser(
        "fetch",
        help="copy every role's checkpoint once to any fsspec URI (e.g. the cluster's store)",
        description="Download (hub ids), copy (URIs, local paths) or build (tiny) every "
        "configured role's checkpoint and write it to TO/<role>/, then TO/sources.yaml, a "
        "config overlay pointing every role there: `--config TO/sources.yaml` makes jobs "
        "read the checkpoints from TO instead of the hub. Roles already complete under TO "
        "are skipped, so a re-run resumes.",
    )
    fe.add_argument("--to", required=True, help="destination URI (s3://, gs://, a folder, ...)")
    fe.add_argument("--roles", help="comma-separated subset of roles")
    _add_config_args(fe)
    fe.set_defaults(func=cmd_models_fetch)
    ls = msub.add_parser("list", help="list model roles with their family, source and resources")
    _add_config_args(ls)
    ls.set_defaults(func=cmd_models_list)

    p = sub.add_parser(
        "augment",
        help="build each product's synthetic training set (views, contexts, negatives, filtering)",
        description="Read a products manifest (JSONL, CSV or Parquet; any fsspec URI) and build each "
        "product's training set on Ray Data: captions and product type, novel views "
        "(image-to-video), masks (Segment Anything), new contexts (outpainting with "
        "prompt-bank scenes), in-class negatives and counterfactuals, and CLIP/DINO/IoU "
        "filtering to the configured positive:negative ratio. Each synthetic component can be "
        "switched off for an ablation (--set augment.views.enabled=false; likewise contexts, "
        "negatives, counterfactuals): it is then neither computed nor given actors. Writes "
        "images, masks, a "
        "Parquet manifest (one row per sample, with scores and drop reasons), an errors "
        "manifest and summary.json under --out. Re-running skips complete products.",
    )
    p.add_argument("--manifest", required=True, help="products manifest URI")
    p.add_argument("--out", required=True, help="output root URI (local folder, s3://, gs://, ...)")
    _add_config_args(p)
    p.set_defaults(func=_job("pipelines.augment:main", "AugmentArgs"))

    p = sub.add_parser(
        "index",
        help="index catalog photos of staged products for `restage stage` (masks, embeddings)",
        description="Read a catalog manifest (augment's products manifest format; its photos "
        "show products in scenes) and build the staged-catalog index on Ray Data: each "
        "photo's product mask (an alpha channel wins, else the segmenter), box, ground line "
        "and area, the category, and the CLIP embedding of the product's crop. Photos whose "
        "product is not cleanly segmented are recorded with the reason and left out. Writes "
        "scenes/, masks/, a Parquet manifest (one row per photo), errors, summary.json and "
        "the search index OUT/index (exact below index.exact_below scenes, faiss HNSW "
        "above), which `restage stage --index OUT/index` opens. Re-running skips complete "
        "products and rebuilds the search index.",
    )
    p.add_argument("--catalog", required=True, help="catalog manifest URI")
    p.add_argument("--out", required=True, help="output root URI")
    _add_config_args(p)
    p.set_defaults(func=_job("pipelines.index:main", "IndexArgs"))

    p = sub.add_parser(
        "personalize",
        help="train a per-product image encoder (contrastive LoRA of the encoder role)",
        description="Train one LoRA of the encoder role (DINOv2 by default) per product of "
        "--data (a `restage augment` output) on Ray Data, with InfoNCE: the product's kept "
        "positive samples, cut-and-paste composites of it and, with --adapters, its own "
        "adapter's generations (filtered by seg_dino) pull together; its in-class negatives "
        "and the real photos of personalize.negative_products other products of the run "
        "(its own category first) push away (personalized representations, arXiv "
        "2412.16156). Writes OUT/<product>/ (a peft folder and "
        "encoder.json), a Parquet manifest (one row per product), errors and _summary.json. "
        "Re-running skips complete products. `restage personalize evaluate --encoders URI "
        "--test MANIFEST --out URI` measures each encoder, personalized and pretrained (LoRA "
        "off), on a test manifest of images labelled by product: classification (ROC AUC, "
        "accuracy), retrieval (AP, recall@k), detection (AP@IoU) and segmentation (mIoU); "
        "writes results.parquet, summary.json and report/index.html.",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["evaluate"],
        help="evaluate: measure the encoders of --encoders on the --test manifest into --out",
    )
    p.add_argument("--data", help="a `restage augment` output root URI (training)")
    p.add_argument("--adapters", help="a `restage train` output: adds generated positives")
    p.add_argument("--encoders", help="a `restage personalize` output root URI (evaluate)")
    p.add_argument(
        "--test",
        help="test manifest (evaluate): JSONL, CSV or Parquet rows of image_uri, product_id "
        "(empty: a distractor), optional mask_uri and split (reference, val, test)",
    )
    p.add_argument("--out", required=True, help="output root URI")
    _add_config_args(p)

    def personalize(args: argparse.Namespace) -> int:
        if args.action == "evaluate":
            missing = [f"--{n}" for n in ("encoders", "test") if not getattr(args, n)]
            training = [f"--{n}" for n in ("data", "adapters") if getattr(args, n, None)]
            if missing or training:
                raise ValueError(
                    "restage personalize evaluate takes --encoders, --test and --out"
                    + (f"; give {' and '.join(missing)}" if missing else "")
                    + (f"; drop {' and '.join(training)} (training only)" if training else "")
                )
            try:
                summary = _entry(
                    "pipelines.personalize_evaluate:main",
                    "PersonalizeEvaluateArgs",
                    _config(args),
                    args,
                )
            finally:
                _say_where_ray_logs_are(args.out)
            return 1 if summary["failed"] and not summary["products"] else 0
        if not args.data or args.encoders or args.test:
            raise ValueError(
                "restage personalize needs --data (a `restage augment` output)"
                + (
                    " (--encoders and --test are for `restage personalize evaluate`)"
                    if args.encoders or args.test
                    else ""
                )
            )
        return _job("pipelines.personalize:main", "PersonalizeArgs")(args)

    p.set_defaults(func=personalize)

    p = sub.add_parser(
        "stage",
        help="stage products into retrieved catalog scenes (copy-paste, no training)",
        description="Retrieval-assisted copy-paste staging (arXiv 2307.15326) on Ray Data: "
        "each product of --manifest is cut out (plain-background fast path, else the "
        "segmenter), the --index of `restage index` gives the stage.top_k most similar "
        "scenes of compatible shape (its category first, never its own photos), each "
        "scene's product is removed (inpainter), the new product placed at its position "
        "and scale on its ground line with its pixels exact, a feathered edge, a contact "
        "shadow and edge-only colour harmonisation, the gaps painted, and every staged "
        "image scored (CLIP-I, re-segmentation IoU, seam). Writes the best stage.keep "
        "images per product (and their parallax clips with --animate), a Parquet manifest "
        "(every retrieved scene, its placement, scores, kept, drop reason), errors and "
        "summary.json under --out. Re-running skips complete products.",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["train-inpainter"],
        help="train-inpainter: fine-tune the inpainter's boundary-weighted LoRA on the "
        "scenes of --catalog (a `restage index` output) into --out, for stage.inpainter_lora",
    )
    p.add_argument("--manifest", help="products manifest URI (staging)")
    p.add_argument("--index", help="the search index: `restage index`'s OUT/index (staging)")
    p.add_argument("--catalog", help="a `restage index` output (train-inpainter)")
    p.add_argument("--out", required=True, help="output root URI")
    p.add_argument(
        "--animate",
        action="store_true",
        help="also write a parallax clip of each kept image (stage.animation: formats, frames)",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser(
        "train",
        help="train one LoRA adapter per product on its training set (Ray Train)",
        description="Read the training sets of a `restage augment` output (--data) and train a "
        "DreamBooth-style LoRA on the generator's denoiser for every product on Ray Train "
        "(train.num_workers workers, at most one per product to do, each loading the base model "
        "once and training its share "
        "of products in turn). Each product gets a rare token that does not collide with its "
        "words; negatives and counterfactuals are mixed into the batches (train.negative_ratio, "
        "2:1). --set train.recipe=dreambooth_lora trains the paper's baseline instead: "
        "DreamBooth-LoRA on each product's real photos alone ('a photo of TOKEN NOUN'; "
        "optional prior preservation, train.prior_preservation). "
        f"Writes OUT/<product_id>/{AdapterLayout.WEIGHTS} (loads with diffusers' "
        f"pipe.load_lora_weights) and {AdapterLayout.METADATA} (token, rank, steps, base model, "
        "training-set digest, losses, seconds), an errors manifest (_errors/) and _summary.json. "
        f"Re-running skips products whose {AdapterLayout.METADATA} exists.",
    )
    p.add_argument("--data", required=True, help="output root URI of `restage augment`")
    p.add_argument("--out", required=True, help="adapters root URI (one folder per product)")
    p.add_argument(
        "--manifest",
        help="products manifest URI, for titles and categories (token collisions, class noun) "
        "when the augment output has no product records",
    )
    _add_config_args(p)
    p.set_defaults(func=_job("pipelines.train:main", "TrainArgs"))

    p = sub.add_parser(
        "generate",
        help="generate each product in new scenes with its adapter and keep the top-N",
        description="For every complete adapter under --adapters, generate images from prompt-bank "
        "prompts of the product's type (plus --user-prompts) with the product's token, on Ray "
        "Data with one adapter load per product; score each image with CLIP-T, CLIP-I and DINO "
        "(and segmented variants) against the product's real images, rank by generate.ranking "
        "(default: the paper's sum of CLIP-T, CLIP-I and DINO), and keep the top-N at or above "
        "generate.threshold. Writes the kept images, a Parquet manifest with every score "
        "and rank, an errors manifest and summary.json under --out. Re-running skips complete "
        "products.",
    )
    p.add_argument("--adapters", required=True, help="adapters root URI (`restage train` output)")
    p.add_argument("--out", required=True, help="output root URI")
    p.add_argument(
        "--prompts", type=int, help="bank prompts per product [generate.prompts_per_product]"
    )
    p.add_argument(
        "--images-per-prompt", type=int, help="images per prompt [generate.images_per_prompt]"
    )
    p.add_argument("--top-n", type=int, help="images kept per product [generate.top_n]")
    p.add_argument(
        "--user-prompts",
        help="text file URI of extra prompts, one a line with {product} [generate.user_prompts]",
    )
    _add_config_args(p)
    p.set_defaults(func=_job("pipelines.generate:main", "GenerateArgs"))

    p = sub.add_parser(
        "run",
        help="augment -> train -> generate under one output root",
        description="Chain the three jobs: OUT/augment (training sets), OUT/adapters/<product_id> "
        "(one LoRA per product) and OUT/generations (ranked images). Each step resumes on its "
        "own, so re-running a killed run continues where it stopped. Quick start on CPU: "
        "restage run --profile tiny --manifest examples/products.jsonl --out runs/quickstart",
    )
    p.add_argument("--manifest", required=True, help="products manifest URI")
    p.add_argument("--out", required=True, help="output root URI")
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        help="what the adapters are trained on: 'restage' (the paper's method: views, "
        "contexts, negatives) or 'dreambooth_lora' (the paper's baseline: DreamBooth-LoRA on "
        "the real photos only; augment makes no synthetic sample). The same as the --set "
        "overrides it stands for, applied before yours: "
        + "; ".join(f"{name}: {' '.join(sets)}" for name, sets in RECIPES.items())
        + " [default: the config's train.recipe]",
    )
    _add_config_args(p)
    p.set_defaults(func=_job("pipelines.run:main", "RunArgs"))

    p = sub.add_parser(
        "evaluate",
        help="metric tables (DINO, CLIP-I, CLIP-T, segmented variants, FID/KID) and an HTML "
        "report of runs against the products' real photos; or the whole DreamBench protocol",
        description="Score every image of each --run (a `restage generate` or `restage run` "
        "output) against the real photos of its product in --references (a products "
        "manifest), with the evaluation backbones (roles eval_clip, eval_dino, inception: "
        "DreamBench's CLIP ViT-B/32 and DINO ViT-S/16 in the default profile). Writes "
        "OUT/per_image.parquet, OUT/per_product.parquet, OUT/summary.json (means with "
        "bootstrap intervals, per category, paired run-vs-run differences, FID/KID) and "
        "OUT/report/index.html. Resumes like the other jobs. --bench dreambench runs the "
        "protocol end to end on --subjects: restage and the DreamBooth-LoRA baseline each "
        "train an adapter per subject, generate 4 images for each of the 25 prompts, and the "
        "report sets both beside the published DreamBooth figures.",
    )
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME=URI",
        dest="runs",
        help="a run to evaluate, named (repeatable; the first is compared with each other)",
    )
    p.add_argument("--references", help="products manifest URI with the real photos")
    p.add_argument("--out", required=True, help="output root URI")
    p.add_argument("--bench", choices=("dreambench",), help="run a whole benchmark protocol")
    p.add_argument(
        "--subjects",
        help="--bench: a folder of subjects (a folder of photos each; products.jsonl, when "
        "present, gives each subject's class as its category)",
    )
    p.add_argument("--max-subjects", type=int, help="--bench: only the first N subjects")
    p.add_argument(
        "--prompts", type=int, help="--bench: only the first N of the 25 prompts (quick checks)"
    )
    p.add_argument(
        "--images-per-prompt", type=int, help="--bench: images per prompt [4, the protocol's]"
    )
    _add_config_args(p)
    p.set_defaults(func=_job("pipelines.evaluate:main", "EvaluateArgs"))

    p = sub.add_parser(
        "serve",
        help="serve on-line generation of any trained product (Ray Serve, adapter swapping)",
        description="Start the restage endpoint on Ray Serve: POST /v1/generate, GET "
        "/v1/products/{product_id}, GET /healthz, GET /v1/stats (OpenAPI at /docs). One base "
        "generator per replica; per-product adapters from --adapters are loaded on demand "
        "(model multiplexing: requests go to a replica that holds the adapter) and evicted LRU "
        "beyond serve.max_adapters_per_replica. Requests need 'Authorization: Bearer KEY' with a "
        "key from RESTAGE_API_KEYS (comma-separated) or RESTAGE_API_KEYS_FILE; with no key the "
        "server refuses to start unless --no-auth, which binds 127.0.0.1 only. Runs until "
        "interrupted. To deploy on a running cluster instead: serve deploy serve/restage.yaml.",
    )
    p.add_argument("--adapters", required=True, help="adapters root URI (`restage train` output)")
    serve_defaults = ServeConfig()
    p.add_argument(
        "--host",
        help=f"interface to bind [default: serve.host, {serve_defaults.host}; 127.0.0.1 with "
        "--no-auth]",
    )
    p.add_argument(
        "--port", type=int, help=f"HTTP port [default: serve.port, {serve_defaults.port}]"
    )
    p.add_argument("--no-auth", action="store_true", help="no API keys; serve on 127.0.0.1 only")
    _add_config_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "status",
        help="where running or finished jobs stand: done, rate, time left, or stopped",
        description="Read the live file each job keeps under its output root "
        f"({PROGRESS_FILE}, rewritten every {HEARTBEAT_S:g}s while its driver lives) for OUT "
        "and its folders (a `restage run` root holds several jobs) and print each job's "
        "status (running, finished, failed, or stopped: no update for "
        f"{STALE_BEATS} beats), products done of those to do, outcomes, rate and time "
        "left. Reads only; works from any machine that sees the outputs. Exits 1 when "
        "no job has run under OUT.",
    )
    p.add_argument("out", nargs="+", help="a job's output root, or a `restage run` root")
    p.add_argument("--json", action="store_true", help="print the live files as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "plan",
        help="print a job's placement plan (pools, GPU fractions, mode) and its cost",
        description="Build the placement plan that JOB itself would use and print it: each actor "
        "pool, its roles, GPU fraction per actor (derived from memory; roles share a GPU only "
        "when their memory fits), batch size, CPUs and the source of every figure, and the "
        "mode (streaming, packed or stage). --products N adds GPU-hours and wall hours. "
        "Exits 4 when the job cannot run on that cluster, with the reason and the fix.",
    )
    p.add_argument("job", choices=PLAN_JOBS)
    p.add_argument("--gpus", type=float, help="GPUs in the cluster")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU [%(default)s]")
    p.add_argument(
        "--cpus",
        type=float,
        help=f"CPUs in the cluster [{PLAN_CPUS_PER_GPU:g} per GPU (a p4d node's 96 for its 8), "
        f"at least {PLAN_MIN_CPUS:g}]",
    )
    p.add_argument(
        "--node-type",
        action="append",
        metavar="NAME:GPUS:GB",
        help="a GPU node type of a fixed mixed cluster, e.g. a10g:32:24 (repeatable); heavy "
        "roles are routed to the smallest GPUs that hold them, via restage_gpu_<GB>gb "
        "resources, and a job whose pools all fit the smallest runs on every GPU "
        "(ray.gpu_routing)",
    )
    p.add_argument(
        "--cluster", choices=("current",), help="plan for the Ray cluster this job would join"
    )
    p.add_argument("--products", type=int, help="add a cost estimate for N products")
    p.add_argument(
        "--adapters",
        nargs="?",
        const=True,
        metavar="TRAIN_OUT",
        help="personalize as run with --adapters: its generate steps first (one per "
        "personalize.generated guidance value), then its own pool; the URI, if given, is not "
        "read",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_config_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("prompts", help="the prompt bank: show it, or extend it with the llm role")
    psub = p.add_subparsers(dest="prompts_command", required=True, metavar="SUBCOMMAND")
    b = psub.add_parser(
        "build",
        help="extend the prompt bank with the llm role and curate the result into a new bank file",
        description="Ask the llm role for new context prompts per product type (one Ray Data row per "
        "type), curate them (placeholder, length, banned words, near-duplicates; see "
        "ray_app/prompts.py) against the existing prompts, and write the merged bank to --out. "
        "Use it with --set augment.prompt_bank=OUT.",
    )
    b.add_argument("--out", required=True, help="URI of the new bank file (YAML)")
    b.add_argument(
        "--per-type", type=int, default=30, help="candidates asked per type [%(default)s]"
    )
    b.add_argument("--types", help="comma-separated subset of types (default: all and generic)")
    b.add_argument(
        "--bank", help="bank to extend (default: augment.prompt_bank or the packaged one)"
    )
    _add_config_args(b)
    b.set_defaults(func=_job("pipelines.prompts:main", "BuildArgs", out_is_folder=False))
    s = psub.add_parser(
        "show", help="list the bank's product types with their aliases and prompt counts"
    )
    s.add_argument("--bank", help="bank URI (default: the packaged one)")
    s.add_argument("--type", help="print every prompt of this type")
    s.set_defaults(func=cmd_prompts_show)

    p = sub.add_parser(
        "review",
        help="human rating of generated images: the web app, raters, results",
        description="A rating round (paper 3.1, A.3): raters judge generated images beside the "
        "product's photos with 8 questions on a 4-point scale; each image goes to "
        "review.raters_per_image distinct raters, runs interleaved and blind.",
    )
    rsub = p.add_subparsers(dest="review_command", required=True, metavar="SUBCOMMAND")
    r = rsub.add_parser(
        "serve",
        help="serve the rating app over a round's generations",
        description="Import the runs' written images into the database (once; a restarted "
        "server resumes the round) and serve the rating app.",
    )
    r.add_argument(
        "--generations",
        action="append",
        metavar="URI",
        help="a `restage generate` or `restage run` output, named after its folder (repeatable)",
    )
    r.add_argument("--run", action="append", metavar="NAME=URI", help="a named run (repeatable)")
    r.add_argument(
        "--db", required=True, help="SQLAlchemy URL, or a path to a SQLite file (made if absent)"
    )
    r.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="images per run, spread over its products (sets review.sample_per_run)",
    )
    r.add_argument("--host", default="127.0.0.1", help="[%(default)s]")
    r.add_argument("--port", type=int, default=8100, help="[%(default)s]")
    r.add_argument(
        "--root-path", default="", help="URL prefix when served behind a proxy, e.g. /review"
    )
    r.add_argument(
        "--secure-cookies", action="store_true", help="cookies only over HTTPS (behind TLS)"
    )
    _add_config_args(r)
    r.set_defaults(func=cmd_review_serve)
    r = rsub.add_parser("add-rater", help="create a rater (prints a one-time secret)")
    r.add_argument("name")
    r.add_argument("--db", required=True, help="SQLAlchemy URL, or a path to a SQLite file")
    r.add_argument("--admin", action="store_true", help="may see progress, results, exports")
    r.add_argument(
        "--reset", action="store_true", help="a new secret for an existing rater (ends sessions)"
    )
    r.set_defaults(func=cmd_review_add_rater)
    r = rsub.add_parser(
        "results",
        help="pass rates, agreement, metric correlations and every answer",
        description="Write answers.parquet, answers.csv, images.parquet (what `restage ranker "
        "fit --ratings` reads) and summary.json under --out, and print the summary.",
    )
    r.add_argument("--db", required=True, help="SQLAlchemy URL, or a path to a SQLite file")
    r.add_argument("--out", required=True, help="output folder URI")
    _add_config_args(r)
    r.set_defaults(func=cmd_review_results)

    p = sub.add_parser("ranker", help="a ranker learned from human ratings (paper 2.5)")
    rsub = p.add_subparsers(dest="ranker_command", required=True, metavar="SUBCOMMAND")
    f = rsub.add_parser(
        "fit",
        help="fit a ranker on human ratings and cross-validate it against generate.ranking",
        description="Fit a logistic regression from the metrics to the human pass on the "
        "ratings of `restage review results`, compare it by product-grouped cross-validation "
        "with the fixed ranking generate.ranking configures, and write the model (JSON) to "
        "--out. Use it with --set generate.ranker=OUT.",
    )
    f.add_argument("--ratings", required=True, help="images.parquet of the ratings, or its folder")
    f.add_argument("--out", required=True, help="URI of the model file to write (JSON)")
    f.add_argument("--folds", type=int, default=5, help="cross-validation folds [%(default)s]")
    f.add_argument(
        "--features", nargs="+", metavar="METRIC", help="metrics to use (default: all with values)"
    )
    f.add_argument("--seed", type=int, default=0, help="folds and bootstrap seed [%(default)s]")
    _add_config_args(f)
    f.set_defaults(func=cmd_ranker_fit)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # the `restage` command itself (a caller passes argv, and owns stderr)
        native_stderr.want()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below, not at exit
        return status
    except BrokenPipeError:
        # Nothing more can be written; point stdout at /dev/null so that the interpreter's
        # final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except PlanError as exc:
        print(f"restage {args.command}: cannot run on this cluster.\n{exc}", file=sys.stderr)
        return EXIT_PLAN
    except NodeLost as exc:
        print(exc, file=sys.stderr)
        return EXIT_NODE_LOST
    except JobRunning as exc:
        print(f"restage {args.command}: {exc}", file=sys.stderr)
        return EXIT_RUNNING
    except (FileNotFoundError, ValueError, MissingBackendError) as exc:  # ConfigError included
        print(f"restage {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
