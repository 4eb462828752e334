"""Captions fit SDXL's 77 text tokens with room for the product phrase that training puts
in, are cut at a word boundary, and the cut is recorded."""

from __future__ import annotations

import numpy as np
import pytest

import actors.captioner as captioner_module
from actors.captioner import Captioner, fit_caption
from actors.lora_trainer import positive_prompt
from ray_app import tiny
from ray_app.clip_text import CONTEXT_LENGTH, count_tokens, fit_words
from ray_app.config import CaptionConfig, load_config
from ray_app.images import encode_png

SENTENCE = (
    "A matte black stainless steel water bottle with a bamboo screw cap stands upright "
    "slightly left of centre on a pale oak table beside a folded linen napkin under soft "
    "window light from the right casting a long gentle shadow and the word HYDRA printed "
    "vertically in white capitals along its side"
)
WORDS_120 = (SENTENCE.split() * 4)[:120]


@pytest.fixture(scope="module")
def pipeline_tokenizer():
    """The tokenizer class and files of the generator's pipeline (tiny and SDXL alike)."""
    return tiny.clip_tokenizer()


def _pipeline_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)  # start and end tokens included, no truncation


def test_count_tokens_matches_the_pipeline_tokenizer(pipeline_tokenizer):
    for text in [
        SENTENCE,
        'A "LOGO" mug, 12.5 cm; naïve café-style glaze: blue/white (70%)!',
        "ohwx mug",
        "",
    ]:
        assert count_tokens(text) == _pipeline_tokens(pipeline_tokenizer, text), text


def test_a_120_word_caption_is_cut_to_fit_77_tokens_and_the_cut_is_recorded(
    monkeypatch, pipeline_tokenizer
):
    answer = " ".join(WORDS_120)

    class Scripted(Captioner):
        def caption(self, images, instructions):
            return [answer] * len(images)

    monkeypatch.setattr(captioner_module, "load_model", lambda model, device=None: None)
    options = CaptionConfig(max_words=200)  # the token budget, not the word cap, cuts here
    cap = Scripted(load_config("tiny").model_spec("captioner"), options)
    out = cap({"image": np.array([encode_png(np.zeros((8, 8, 3), np.uint8))], dtype=object)})
    text = out["caption"][0]
    assert out["error"][0] is None
    assert out["caption_truncated"][0] and out["caption_words"][0] == 120
    words = text.split()
    assert 0 < len(words) < 120 and words == WORDS_120[: len(words)]  # a word boundary
    budget = CONTEXT_LENGTH - options.reserve_tokens
    assert _pipeline_tokens(pipeline_tokenizer, text) <= budget
    # The longest prefix that fits: one more word would not.
    assert _pipeline_tokens(pipeline_tokenizer, " ".join(WORDS_120[: len(words) + 1])) > budget
    # With the phrase training inserts (noun absent: "a photo of TOKEN NOUN, " in front),
    # the prompt still fits the text encoders' 77 tokens, start and end included.
    prompt = positive_prompt(text, "ohwx", "insulated travel flask")
    assert prompt.startswith("a photo of ohwx insulated travel flask, ")
    assert _pipeline_tokens(pipeline_tokenizer, prompt) <= CONTEXT_LENGTH


def test_a_short_caption_is_kept_whole_and_not_marked():
    got = fit_caption("The image shows a red mug on a table", CaptionConfig())
    assert (got.text, got.words, got.truncated) == ("A red mug on a table", 6, False)


def test_the_word_cap_is_recorded_as_a_cut_too():
    got = fit_caption("one two three four five six seven eight", CaptionConfig(max_words=5))
    assert (got.text, got.words, got.truncated) == ("One two three four five", 8, True)


def test_fit_words_drops_trailing_punctuation_and_checks_its_budget():
    fitted = fit_words("red, blue, green, yellow, purple", 5)
    assert fitted.truncated and not fitted.text.endswith(",")
    assert count_tokens(fitted.text) <= 5
    with pytest.raises(ValueError, match="max_tokens=2"):
        fit_words("red", 2)


def test_reserve_tokens_is_bounded():
    with pytest.raises(ValueError, match="reserve_tokens"):
        CaptionConfig(reserve_tokens=70)


def test_a_row_whose_image_does_not_decode_has_no_caption_and_no_cut(monkeypatch):
    class Scripted(Captioner):
        def caption(self, images, instructions):
            return [" ".join(WORDS_120)] * len(images)

    monkeypatch.setattr(captioner_module, "load_model", lambda model, device=None: None)
    cap = Scripted(load_config("tiny").model_spec("captioner"), CaptionConfig())
    out = cap({"image": np.array([b"not an image"], dtype=object)})
    assert out["error"][0] and out["caption"][0] == ""
    assert out["caption_words"][0] == 0 and not out["caption_truncated"][0]
