"""Rare tokens that name a product to the generator (paper 2.4).

A product is taught to the generator as ``TOKEN NOUN`` ("ohwx mug"). The token must be a
single token of the generator's CLIP BPE vocabulary, carry as little visual meaning as
possible, and must not collide with the product's own words (its title, category or
captions), or the adapter would bind the product to a word the prompts already use.

The shipped list (``ray_app/data/rare_tokens.txt``) was made once by ``build_candidates``
and then reviewed by hand; the file's header says how. Per product, ``choose_tokens`` draws
candidates from it in an order fixed by (run seed, product id) and rejects colliding ones.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from ray_app import storage
from ray_app.seeds import derive_seed

TOKENS_FILE = "rare_tokens.txt"
# Rarity rule of the shipped list: BPE merges are learned in order of frequency, so a
# later merge (a higher id) is a rarer string in CLIP's training text.
MIN_TOKEN_ID = 20000
# Famous identifiers with a strong prior: "sks" is a rifle (SKS) in the base model.
BLOCKLIST = frozenset({"sks", "xyz", "abc", "zzz", "xxx", "www", "ppp"})
_TOKEN_RE = re.compile(r"[a-z]{3,5}")
_WORD = re.compile(r"[a-z0-9]+")


class TokenError(ValueError):
    """No usable token for a product, or a bad token list; the message says why."""


def load_tokens(uri: str | None = None) -> list[str]:
    """The rare-token list at ``uri`` (any fsspec URI), or the packaged one. One token a
    line; ``#`` starts a comment."""
    if uri:
        text = storage.read_bytes(storage.normalize_uri(uri)).decode()
        where = uri
    else:
        text = resources.files("ray_app").joinpath("data", TOKENS_FILE).read_text()
        where = f"ray_app/data/{TOKENS_FILE}"
    tokens: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        token = line.split("#", 1)[0].strip()
        if not token:
            continue
        if not _TOKEN_RE.fullmatch(token):
            raise TokenError(f"{where} line {n}: {token!r} is not 3-5 lowercase ASCII letters")
        if token in BLOCKLIST:
            raise TokenError(f"{where} line {n}: {token!r} is blocklisted (a known strong prior)")
        if token in tokens:
            raise TokenError(f"{where} line {n}: {token!r} is listed twice")
        tokens.append(token)
    if not tokens:
        raise TokenError(f"{where}: no tokens")
    return tokens


def words(texts: Iterable[str | None]) -> set[str]:
    """Lower-cased words of the given texts."""
    return {w for t in texts if t for w in _WORD.findall(t.lower())}


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without the start/end tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def is_single_token(tokenizer: Any, token: str) -> bool:
    """True when ``token`` is one token of the tokenizer, alone and inside a sentence."""
    alone = token_ids(tokenizer, token)
    inside = token_ids(tokenizer, f"a photo of {token} mug")
    return len(alone) == 1 and alone[0] in inside and len(inside) == 5


def collision(
    token: str, product_words: set[str], product_ids: set[int], token_id: int | None
) -> str | None:
    """Why ``token`` collides with the product's words, or None. A collision is the token
    inside a word or a word (3+ letters) inside the token, or the token's id occurring in the
    product's tokenized texts."""
    for w in sorted(product_words):
        if token in w or (len(w) >= 3 and w in token):
            return f"collides with the product word {w!r}"
    if token_id is not None and token_id in product_ids:
        return "its token id occurs in the product's tokenized texts"
    return None


def choose_tokens(
    product_id: str,
    texts: Iterable[str | None],
    n: int = 1,
    *,
    tokens: Sequence[str] | None = None,
    tokenizers: Sequence[Any] = (),
    run_seed: int = 0,
    preferred: Sequence[str] = (),
    n_preferred: int = 0,
) -> tuple[list[str], list[tuple[str, str]]]:
    """``n`` tokens for a product -> (chosen tokens, [(rejected token, reason), ...]).

    Up to ``n_preferred`` come first from ``preferred``, in its order (the associated
    tokens of a sweep); the rest from ``tokens`` (default: the packaged list) in an order
    fixed by (``run_seed``, ``product_id``). A candidate is rejected when it is not a single
    token of every given tokenizer, or when it collides with the words of ``texts`` (title,
    category, captions, product id). Raises ``TokenError`` when fewer than ``n`` remain.
    """
    pool = list(tokens if tokens is not None else load_tokens())
    random.Random(derive_seed(product_id, "token", 0, run_seed)).shuffle(pool)
    texts = [t for t in texts if t]
    product_words = words([*texts, product_id])
    product_ids = {i for tok in tokenizers for t in texts for i in token_ids(tok, t)}
    chosen: list[str] = []
    rejected: list[tuple[str, str]] = []

    def take(candidates: Iterable[str], until: int) -> None:
        for token in candidates:
            if len(chosen) >= until:
                return
            if token in chosen:
                continue
            if any(not is_single_token(tok, token) for tok in tokenizers):
                rejected.append((token, "not a single token of the generator's tokenizer"))
                continue
            ids = token_ids(tokenizers[0], token) if tokenizers else [None]
            why = collision(token, product_words, product_ids, ids[0])
            if why:
                rejected.append((token, why))
                continue
            chosen.append(token)

    take(preferred, min(n, n_preferred))
    take(pool, n)
    if len(chosen) < n:
        raise TokenError(
            f"product {product_id!r}: only {len(chosen)} of the {len(pool)} listed tokens are "
            f"usable, {n} needed ({rejected[:5]} ...): lower train.token_sweep or extend "
            "train.tokens_file"
        )
    return chosen, rejected


_ASSOCIATED_RE = re.compile(r"[a-z]{3,8}")
_STOP = frozenset(
    "a an the and or of with in on at to for by from its it this that is are as be photo image "
    "picture product white black background".split()
)


def caption_words(captions: Iterable[str | None], noun: str) -> list[str]:
    """The words that describe the product: its noun and the content words of its captions'
    product descriptions (ray_app.prompts.product_description), most frequent first."""
    from collections import Counter

    from ray_app.prompts import product_description

    counts: Counter[str] = Counter()
    for caption in captions:
        described = product_description(caption, noun)
        counts.update(w for w in _WORD.findall((described or "").lower()) if w not in _STOP)
    counts[noun.lower()] += len(counts) + 1  # the noun first
    return [w for w, _ in counts.most_common()]


def associated_tokens(
    tokenizer: Any,
    embeddings: Any,
    product_words: Sequence[str],
    n: int,
    *,
    avoid: set[str] = frozenset(),
) -> list[tuple[str, float]]:
    """``n`` whole-word tokens whose input embedding is nearest (cosine) to the mean of the
    product words' embeddings, but which are not those words and do not collide with them
    (``collision``): tokens with a plausible association to the product (paper 2.4), unlike
    the rare list's tokens that mean nothing. -> [(token, cosine)], best first.

    ``embeddings``: the text encoder's input embedding matrix (vocabulary x width), e.g.
    ``text_encoder.get_input_embeddings().weight``. Candidates are 3-8 lowercase letters,
    not blocklisted and not in ``avoid``."""
    import numpy as np

    vocab = tokenizer.get_vocab()
    table = np.asarray(embeddings, dtype=np.float32)
    table = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    ids = [i for w in product_words for i in token_ids(tokenizer, w)]
    if not ids:
        return []
    centre = table[ids].mean(axis=0)
    pieces = [
        (piece[: -len("</w>")], index)
        for piece, index in vocab.items()
        if piece.endswith("</w>") and index < len(table)
    ]
    pieces = [
        (w, i)
        for w, i in pieces
        if _ASSOCIATED_RE.fullmatch(w) and w not in BLOCKLIST and w not in avoid
    ]
    sims = table[[i for _, i in pieces]] @ centre
    own, out = set(ids), []
    for k in np.argsort(-sims):
        word, index = pieces[k]
        if index in own or collision(word, set(product_words), own, index):
            continue
        out.append((word, float(sims[k])))
        if len(out) == n:
            break
    return out


def build_candidates(
    tokenizer: Any, languages: Sequence[str] = ("en", "de", "fr", "es", "it", "pt", "nl")
) -> list[str]:
    """The automatic part of making the shipped list (a curation tool, not used by jobs;
    needs the ``wordfreq`` package). A candidate is a whole-word token of the CLIP BPE
    vocabulary of 3-5 lowercase letters, learned late (id >= ``MIN_TOKEN_ID``), with zero
    word frequency in ``languages`` and not a part of any of their 100,000 most frequent
    words (which removes word fragments such as 'icago'). The result was then reviewed by
    hand (see the list's header)."""
    import wordfreq

    common = "\n".join(
        w for lang in languages for w in wordfreq.top_n_list(lang, 100_000) if w.isascii()
    )
    out = []
    for piece, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = piece[: -len("</w>")] if piece.endswith("</w>") else None
        if word is None or index < MIN_TOKEN_ID or not _TOKEN_RE.fullmatch(word):
            continue
        if word in BLOCKLIST or word in common:
            continue
        if max(wordfreq.zipf_frequency(word, lang) for lang in languages) > 0:
            continue
        out.append(word)
    return out
