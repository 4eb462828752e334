"""`restage evaluate --bench dreambench`: the DreamBench protocol (DreamBooth, Ruiz et al.
2023) end to end, restage against the DreamBooth-LoRA baseline on the same subjects.

For every subject (a folder of photos and its class), each recipe trains an adapter and
generates 4 images for each of the 25 prompts of the subject's list (live subjects, dogs
and cats, have their own), with ``{token} {cls}`` filled by the adapter's product phrase;
then ``restage evaluate`` scores both runs against the subjects' photos, and the report
sets DINO / CLIP-I / CLIP-T beside the published DreamBooth figures, labelled as published.
Everything lands under one output root and each step resumes, like `restage run`:
``OUT/subjects.jsonl``, ``OUT/prompts/<list>.txt``, ``OUT/runs/<recipe>/<list>/`` and the
evaluation itself at ``OUT``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ray_app import storage
from ray_app.config import RestageConfig
from ray_app.kinds import Metric
from ray_app.records import read_manifest, write_manifest
from ray_app.report import JobSummary

# The benchmark's definition: its prompt lists (google/dreambooth, CC BY 4.0).
PROMPTS_FILE = "dreambench_prompts.json"
LIVE_CLASSES = frozenset({"dog", "cat"})  # DreamBench's live subjects
IMAGES_PER_PROMPT = 4
RECIPES = ("restage", "dreambooth_lora")
# Published figures, shown beside the measured ones and never mixed with them: DreamBooth
# (Stable Diffusion) in Ruiz et al. 2023, Table 1 (DINO ViT-S/16, CLIP ViT-B/32).
PUBLISHED = [
    {
        "name": "DreamBooth (Stable Diffusion), Ruiz et al. 2023, Table 1",
        Metric.DINO.value: 0.668,
        Metric.CLIP_I.value: 0.803,
        Metric.CLIP_T.value: 0.305,
    }
]
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass(frozen=True)
class DreamBenchArgs:
    subjects: str
    out: str
    max_subjects: int | None = None
    prompts: int | None = None  # only the first N prompts of each list (quick checks)
    images_per_prompt: int | None = None


def prompt_lists() -> dict[str, list[str]]:
    """{"object": [...], "live_subject": [...]}, each with ``{token} {cls}`` placeholders."""
    text = resources.files("ray_app").joinpath("data", PROMPTS_FILE).read_text()
    data = json.loads(text)
    return {"object": data["object_prompts"], "live_subject": data["live_subject_prompts"]}


def as_user_prompts(prompts: list[str]) -> str:
    """DreamBench's ``{token} {cls}`` is the product phrase generate fills ``{product}`` with."""
    lines = []
    for p in prompts:
        if p.count("{token} {cls}") != 1:
            raise ValueError(f"DreamBench prompt {p!r}: expected '{{token}} {{cls}}' once")
        lines.append(p.replace("{token} {cls}", "{product}"))
    return "\n".join(lines) + "\n"


def subject_class(name: str) -> str:
    """A subject folder's class when nothing names it: DreamBench's folder names are the class
    with a number or a qualifier ('dog6', 'red_cartoon' -> 'cartoon', 'backpack_dog' ->
    'backpack' is ambiguous, so a products.jsonl or class.txt should name it)."""
    words = [w for w in re.split(r"[_\-\s]+", re.sub(r"\d+$", "", name)) if w]
    return words[-1].lower() if words else name


def find_subjects(folder: str, limit: int | None) -> list[dict[str, Any]]:
    """The subjects of ``folder`` as product records with absolute image URIs: from its
    ``products.jsonl`` when present (category = class), else one per subfolder of images
    (class from ``class.txt`` in it, else from its name)."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--subjects {folder}: no such folder")
    manifest = root / "products.jsonl"
    if manifest.exists():
        read = read_manifest(str(manifest))
        if read.errors:
            raise ValueError(f"--subjects {manifest}: {read.errors[0].reason}")
        records = [
            {"product_id": r.product_id, "category": r.category, "image_uris": list(r.image_uris)}
            for r in read.records
        ]
    else:
        records = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            images = sorted(str(p) for p in sub.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not images:
                continue
            named = sub / "class.txt"
            cls = named.read_text().strip() if named.exists() else subject_class(sub.name)
            records.append({"product_id": sub.name, "category": cls, "image_uris": images})
    if not records:
        raise ValueError(
            f"--subjects {folder}: no subject found (a products.jsonl, or subfolders of photos)"
        )
    for r in records:
        if not r.get("category"):
            raise ValueError(f"--subjects: subject {r['product_id']!r} has no class (category)")
    records.sort(key=lambda r: r["product_id"])
    return records[:limit] if limit else records


def recipe_config(
    config: RestageConfig, recipe: str, prompts_uri: str, images: int
) -> RestageConfig:
    """``config`` for one recipe's run of the protocol: the recipe's training, and generation
    of every prompt of the list (no bank prompts), each image written for evaluation."""
    from pipelines.run import apply_recipe

    cfg = apply_recipe(config, recipe)
    cfg.generate.user_prompts = prompts_uri
    cfg.generate.prompts_per_product = 0
    cfg.generate.images_per_prompt = images
    cfg.generate.write_all_images = True
    return cfg


def dreambench(
    config: RestageConfig, args: DreamBenchArgs, report: Callable[..., Any] | None = None
) -> JobSummary:
    """Run the protocol (module doc); -> the evaluation's summary."""
    from pipelines.evaluate import evaluate
    from pipelines.run import run

    root = storage.normalize_uri(args.out)
    images = args.images_per_prompt or IMAGES_PER_PROMPT
    if args.max_subjects is not None and args.max_subjects < 1:
        raise ValueError(f"--max-subjects {args.max_subjects}: give at least 1")
    if args.prompts is not None and args.prompts < 1:
        raise ValueError(f"--prompts {args.prompts}: give at least 1")
    subjects = find_subjects(args.subjects, args.max_subjects)
    config = config.model_copy(deep=True)
    # The subjects' photos are the user's own folder: allow reading it.
    subjects_root = str(Path(args.subjects).expanduser().resolve())
    config.storage.allowed_sources = [*config.storage.allowed_sources, subjects_root]
    references = storage.join(root, "subjects.jsonl")
    write_manifest(subjects, references)
    lists = prompt_lists()
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in subjects:
        kind = "live_subject" if s["category"].lower() in LIVE_CLASSES else "object"
        groups.setdefault(kind, []).append(s)
    runs: dict[str, list[str]] = {recipe: [] for recipe in RECIPES}
    for kind, members in sorted(groups.items()):
        manifest = storage.join(root, "subjects", f"{kind}.jsonl")
        write_manifest(members, manifest)
        prompts = lists[kind][: args.prompts] if args.prompts else lists[kind]
        prompts_uri = storage.join(root, "prompts", f"{kind}.txt")
        storage.write_bytes(prompts_uri, as_user_prompts(prompts).encode())
        for recipe in RECIPES:
            out = storage.join(root, "runs", recipe, kind)
            run(recipe_config(config, recipe, prompts_uri, images), manifest, out)
            runs[recipe].append(storage.join(out, "generations"))
    return evaluate(config, runs, references, root, published=PUBLISHED, report=report)
