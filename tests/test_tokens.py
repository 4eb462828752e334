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


def test_associated_tokens_are_near_the_product_words_but_not_them(tokenizers):
    """An embedding table where 'cup', 'mugs' and 'tumbler' lie near 'mug' and 'red':
    'mugs' collides with the product's noun, so 'cup' and 'tumbler' are the associations."""
    import numpy as np

    from ray_app.tokens import associated_tokens, caption_words

    tok = tokenizers[0]
    vocab = tok.get_vocab()
    rng = np.random.default_rng(0)
    table = rng.normal(size=(len(vocab), 32)).astype(np.float32)
    product = table[vocab["mug</w>"]] + table[vocab["red</w>"]]
    for word, noise in (("cup", 0.1), ("mugs", 0.05), ("tumbler", 0.3)):
        table[vocab[f"{word}</w>"]] = product + noise * rng.normal(size=32)
    words = caption_words(["A red mug with a handle on a table."], "mug")
    assert words[0] == "mug" and "red" in words and "table" not in words
    near = associated_tokens(tok, table, ["mug", "red"], 2)
    assert [w for w, _ in near] == ["cup", "tumbler"]
    assert associated_tokens(tok, table, ["mug", "red"], 1, avoid={"cup"})[0][0] == "tumbler"


def test_a_sweeps_preferred_candidates_come_first_and_collisions_are_refused(tokenizers):
    chosen, rejected = choose_tokens(
        "mug-1",
        ["a red mug"],
        4,
        tokenizers=tokenizers,
        preferred=["mugs", "cup", "tumbler"],
        n_preferred=2,
    )
    assert chosen[:2] == ["cup", "tumbler"] and len(chosen) == 4
    assert ("mugs", "collides with the product word 'mug'") in rejected
    assert set(chosen[2:]) <= set(load_tokens())
