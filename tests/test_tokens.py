"""The shipped rare-token list and the per-product token choice."""

from __future__ import annotations

import pytest

from ray_app import tiny
from ray_app.tokens import (
    MIN_TOKEN_ID,
    TokenError,
    choose_tokens,
    is_single_token,
    load_tokens,
)


@pytest.fixture(scope="module")
def tokenizers():
    # The tiny generator's two tokenizers: CLIP's real BPE vocabulary, as SDXL's.
    return [tiny.clip_tokenizer(), tiny.clip_tokenizer(pad_token="!")]


def test_every_listed_token_is_one_rare_token_of_the_generator_vocab(tokenizers):
    tokens = load_tokens()
    assert len(tokens) >= 16 and "sks" not in tokens
    for tok in tokenizers:
        for token in tokens:
            assert is_single_token(tok, token), token
            (token_id,) = tok(token, add_special_tokens=False).input_ids
            assert token_id >= MIN_TOKEN_ID, (token, token_id)


def test_choice_is_deterministic_and_differs_between_products(tokenizers):
    texts = ["Red ceramic coffee mug", "mug", "a mug on a wooden table"]
    first, _ = choose_tokens("mug-001", texts, 3, tokenizers=tokenizers)
    again, _ = choose_tokens("mug-001", texts, 3, tokenizers=tokenizers)
    assert first == again and len(set(first)) == 3
    others = {tuple(choose_tokens(f"p{i}", texts, 1, tokenizers=tokenizers)[0]) for i in range(8)}
    assert len(others) > 1
    seeded, _ = choose_tokens("mug-001", texts, 3, tokenizers=tokenizers, run_seed=1)
    assert seeded != first


def test_tokens_colliding_with_the_product_words_are_rejected(tokenizers):
    pool = ["ohwx", "yxe", "azwx", "yql"]
    texts = ["OHWX thermos bottle", "limited yxe-edition", "blue azwxtra cap"]
    chosen, rejected = choose_tokens("bottle-9", texts, 1, tokens=pool, tokenizers=tokenizers)
    assert chosen == ["yql"]  # the only one that collides with nothing
    assert {t for t, _ in rejected} <= {"ohwx", "yxe", "azwx"}
    assert all("collides with the product word" in why for _, why in rejected)
    with pytest.raises(TokenError, match="only 1 of the 4 listed tokens are usable, 2 needed"):
        choose_tokens("bottle-9", texts, 2, tokens=pool, tokenizers=tokenizers)


def test_a_token_that_is_not_a_single_token_is_rejected(tokenizers):
    # One candidate at a time: which of several is looked at first depends on the seed.
    with pytest.raises(TokenError, match=r"\('qzvkq', \"not a single token of the generator"):
        choose_tokens("p", ["a mug"], 1, tokens=["qzvkq"], tokenizers=tokenizers)
    assert choose_tokens("p", ["a mug"], 1, tokens=["ohwx"], tokenizers=tokenizers) == (
        ["ohwx"],
        [],
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [("ohwx\nohwx\n", "listed twice"), ("sks\n", "blocklisted"), ("Oh-no\n", "lowercase")],
)
def test_bad_token_files_are_refused_naming_the_line(tmp_path, text, needle):
    path = tmp_path / "tokens.txt"
    path.write_text("# comment\n" + text)
    with pytest.raises(TokenError, match=needle):
        load_tokens(str(path))
