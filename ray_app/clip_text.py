"""The 77-token limit of CLIP text encoders (both of SDXL's): count a text's tokens the way
the generator's tokenizers do, and cut a text at a word boundary so that it fits.

diffusers truncates a longer prompt at 77 tokens without a word of warning, so a training
caption that is too long loses its end silently; captions are cut here instead, where the
cut can be recorded.

Counting uses CLIP's own BPE: open_clip's ``SimpleTokenizer`` over the merges file that
open_clip ships (``bpe_simple_vocab_16e6``, the vocabulary of SDXL's ``tokenizer`` and
``tokenizer_2``, and of ``ray_app.tiny.clip_tokenizer``). That is the real tokenizer, not an
estimate, and it is there in every actor without a download or the generator's checkpoint:
it builds in ~0.1 s, where transformers' ``CLIPTokenizer`` over the same files takes ~6 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

CONTEXT_LENGTH = 77  # tokens a CLIP text encoder reads, its start and end tokens included


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def count_tokens(text: str) -> int:
    """CLIP tokens of ``text``, its start and end tokens included."""
    return len(_tokenizer().encode(text)) + 2


@dataclass(frozen=True)
class Fitted:
    """A text cut to a token budget: ``words`` is the word count before the cut."""

    text: str
    words: int
    truncated: bool


def fit_words(text: str, max_tokens: int) -> Fitted:
    """The longest run of ``text``'s first words that is at most ``max_tokens`` CLIP tokens
    (start and end tokens included), without a trailing comma, colon or semicolon."""
    if max_tokens < 3:
        raise ValueError(f"max_tokens={max_tokens}: need at least 3 (start, end, one word)")
    words = text.split()
    if count_tokens(text) <= max_tokens:
        return Fitted(text, len(words), False)
    low, high = 0, len(words)  # words[:low] fits, words[:high + 1] does not
    while low < high:
        mid = (low + high + 1) // 2
        if count_tokens(" ".join(words[:mid])) <= max_tokens:
            low = mid
        else:
            high = mid - 1
    return Fitted(" ".join(words[:low]).rstrip(",;:"), len(words), True)
