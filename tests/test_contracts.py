"""Contracts between jobs have one owner each: sample kinds and metric names
(ray_app/kinds.py), the adapter's file names (AdapterLayout), the product phrase
(ray_app.prompts.product_phrase), and actors take a ModelSpec and their own options."""

from __future__ import annotations

import ast
import inspect

import pytest
from conftest import ROOT

from ray_app.config import ROLES, RestageConfig, SegmentConfig, load_config
from ray_app.kinds import MASK_IOU, NEGATIVE_KINDS, POSITIVE_KINDS, Metric, SampleKind
from ray_app.storage import AdapterLayout

SOURCES = ("ray_app", "actors", "pipelines", "serve", "bench")


def _string_constants(exclude: set[str]) -> list[tuple[str, int, str]]:
    out = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in exclude:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.append((rel, node.lineno, node.value))
    return out


def test_sample_kinds_and_metric_names_are_spelled_only_in_kinds():
    # "dino" is a metric and a model role: the role's spellings are the config's own.
    names = {str(v) for v in (*SampleKind, *Metric, MASK_IOU)} - set(ROLES)
    found = [c for c in _string_constants({"ray_app/kinds.py"}) if c[2] in names]
    assert not found, f"use ray_app.kinds instead of the literal: {found}"


def test_adapter_file_names_are_spelled_only_in_the_layout():
    names = {AdapterLayout.WEIGHTS, AdapterLayout.METADATA}
    found = [c for c in _string_constants({"ray_app/storage.py"}) if c[2] in names]
    assert not found, f"ask AdapterLayout instead of the literal: {found}"


def test_kinds_split_into_positives_and_negatives():
    assert set(POSITIVE_KINDS) | set(NEGATIVE_KINDS) == set(SampleKind)
    assert not set(POSITIVE_KINDS) & set(NEGATIVE_KINDS)


def test_config_metric_keys_are_the_metrics():
    cfg = load_config("tiny")
    assert set(cfg.scoring.ranges) == set(Metric) == set(cfg.generate.weights)
    assert set(cfg.augment.filter.weights) == set(Metric)


def test_an_unknown_metric_key_is_an_error_naming_it():
    from ray_app.config import ConfigError

    with pytest.raises(ConfigError, match=r"scoring\.ranges\.clip_x"):
        load_config("tiny", overrides=["scoring.ranges={clip_x: [0, 1]}"])


@pytest.mark.parametrize("profile", ["default", "tiny"])
def test_new_option_sections_default_to_the_settings_used_before_they_existed(profile):
    """Counterfactuals painted with the contexts' settings, and generate and serve's ranker
    segmented with augment's: their own sections start from those values."""
    cfg = load_config(profile)
    inpaint = set(type(cfg.augment.counterfactuals).model_fields)
    contexts = cfg.augment.contexts.model_dump(include=inpaint)
    assert cfg.augment.counterfactuals.model_dump() == contexts
    assert cfg.generate.segmentation == cfg.augment.segment
    assert cfg.serve.ranker_segmentation == cfg.augment.segment
    assert isinstance(cfg.serve.ranker_segmentation, SegmentConfig)


def test_actors_never_take_the_whole_config():
    """Every actor's constructor takes a ModelSpec (and its options), never RestageConfig."""
    for path in sorted((ROOT / "actors").glob("*.py")):
        text = path.read_text()
        assert "RestageConfig" not in text, f"{path.name} takes the whole config"
    from actors.scorer import Scorer
    from actors.segmenter import Segmenter

    assert "model" in inspect.signature(Segmenter).parameters
    assert "options" in inspect.signature(Scorer).parameters


def test_scorer_needs_a_segmenter_and_its_options_together():
    from actors.scorer import Scorer, ScoringOptions

    cfg = load_config("tiny")
    options = ScoringOptions(cfg.generate.weights, cfg.scoring.ranges)
    with pytest.raises(ValueError, match="segmenter and segmentation"):
        Scorer(cfg.model_spec("clip"), cfg.model_spec("dino"), options, cfg.model_spec("segmenter"))


def test_model_spec_carries_only_what_loading_needs():
    cfg = load_config("tiny")
    spec = cfg.model_spec("clip")
    assert spec.role == "clip" and spec.spec == cfg.clip and spec.cache_dir == cfg.cache_path
    assert spec.offline == cfg.offline and spec.batch_size == cfg.clip.batch_size
    assert (
        spec.with_spec(dtype="bfloat16").spec.dtype == "bfloat16" and spec.spec.dtype != "bfloat16"
    )
    assert not any(isinstance(v, RestageConfig) for v in vars(spec).values())


def test_the_product_phrase_is_built_in_one_function():
    """No module but ray_app/prompts.py joins a token and a noun itself."""
    offenders = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "ray_app" / "prompts.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.JoinedStr):
                    names = [
                        v.value.id
                        if isinstance(v.value, ast.Name)
                        else getattr(v.value, "attr", "")
                        for v in node.values
                        if isinstance(v, ast.FormattedValue)
                    ]
                    if names[:2] == ["token", "noun"] and len(names) == 2:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"use ray_app.prompts.product_phrase: {offenders}"
