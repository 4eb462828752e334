"""The prompt bank file and `restage prompts build` (llm role on Ray, then curation)."""

from __future__ import annotations

import pytest

from actors.llm import instruction, split_lines
from pipelines.prompts import build
from ray_app.config import load_config
from ray_app.prompts import NOUN_MAX_CHARS, NOUN_MAX_WORDS, PromptBank, category_noun, curate


def test_bank_round_trips_through_a_file(tmp_path):
    bank = PromptBank.load()
    bank.save(str(tmp_path / "bank.yaml"))
    again = PromptBank.load(str(tmp_path / "bank.yaml"))
    assert again.types == bank.types and again.generic == bank.generic and again.rules == bank.rules


def test_instruction_and_line_splitting():
    text = instruction("mug", ["a {product} on a desk"], 5, 40)
    assert "{product}" in text and "a {product} on a desk" in text and "5" in text
    answer = (
        "1. a {product} on a shelf in a bright kitchen with plants\n\n2) a {product} by a window\n"
    )
    lines = split_lines(answer)
    assert len(lines) == 2
    kept, _ = curate(lines, PromptBank.load().rules)
    assert kept == ["a {product} on a shelf in a bright kitchen with plants"]


@pytest.mark.slow
def test_build_extends_with_curated_llm_output(ray_local, tmp_path):
    out = tmp_path / "bank.yaml"
    config = load_config("tiny", overrides=["ray.progress_bars=false"])
    summary = build(config, str(out), per_type=4, types=["mug", "lamp"])
    new, old = PromptBank.load(str(out)), PromptBank.load()
    assert set(new.types) == set(old.types)
    for name in ("mug", "lamp"):
        added = new.types[name].prompts[len(old.types[name].prompts) :]
        assert new.types[name].prompts[: len(old.types[name].prompts)] == old.types[name].prompts
        assert curate(added, new.rules, existing=old.types[name].prompts)[1] == []  # all curated
    stat = summary.stages["curate"]
    assert stat.items_in > 0 and stat.items_in == stat.items_out + stat.dropped
    assert {row[0] for row in summary.extra["per_type"]} == {"lamp", "mug"}


def test_a_category_that_matches_the_bank_gives_the_types_noun():
    bank = PromptBank.load()
    assert category_noun(bank, "Coffee Tables") == bank.type_of("table").noun
    assert category_noun(bank, None) is None and category_noun(bank, "") is None


@pytest.mark.parametrize(
    ("category", "noun"),
    [
        ("Flacon", "flacon"),
        ("Flacon <script>alert(1)</script>", "flacon alert"),
        ("flacon price=1 @admin admin@example.com", "flacon"),
        ("[flacon](https://evil.example/x) {product}", None),
        ("flacon\x00\x1b[31m\u202e red", "flacon red"),
        ("glass flacon held by a woman", "glass flacon a"),
        ("x" * 300, None),
        ("a b c d e f g h", "a b c d"),
        ("woman woman woman vase", "vase"),
        ("=@<>", None),
    ],
)
def test_a_free_text_category_becomes_a_sanitised_noun(category, noun):
    got = category_noun(PromptBank.load(), category)
    assert got == noun
    if got:
        assert got.isascii() and got.isprintable() and len(got) <= NOUN_MAX_CHARS
        assert not set(got) & set("=@<>[]{}()\\/:")
        assert len(got.split()) <= NOUN_MAX_WORDS


def test_build_refuses_unknown_types_before_starting_ray(tmp_path):
    import ray

    from ray_app.config import ConfigError

    if ray.is_initialized():  # an earlier test's Ray: this one must show none is started
        ray.shutdown()
    with pytest.raises(ConfigError, match=r"--types: unknown type\(s\) unicorn"):
        build(load_config("tiny"), str(tmp_path / "bank.yaml"), types=["mug", "unicorn"])
    assert not ray.is_initialized()


def test_type_writer_passes_each_rows_type_through():
    import numpy as np

    from pipelines.prompts import _TypeWriter

    writer = _TypeWriter(load_config("tiny"), per_type=2)
    writer.writer.max_new_tokens = 16  # random weights: the text is noise, its shape is not
    batch = {
        "type": np.array(["mug"], dtype=object),
        "noun": np.array(["mug"], dtype=object),
        "examples": np.array([["a {product} on a desk"]], dtype=object),
        "seed": np.array([3]),
    }
    out = writer(batch)
    assert list(out["type"]) == ["mug"] and out["error"][0] is None
    assert all(isinstance(line, str) for line in out["candidates"][0])
