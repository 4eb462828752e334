"""The prompt bank: curated context prompts per product type (paper A.2.2).

Prompts are written once per product type, curated, and cached in a data file, rather than
generated per image: that is cheaper and hallucinates less. A product is typed from its
record's category (or its captions, or zero-shot CLIP), and its prompts are drawn from the
bank for that type; unknown types fall back to a generic set. The same bank feeds the
outpainting of new contexts (augment) and the generation prompts (generate, serve).

Curation rules (``curate``), applied to every prompt that enters the bank:
  1. one line, printable ASCII, list numbering and surrounding quotes stripped;
  2. the placeholder ``{product}`` exactly once (it becomes "sks mug" or "mug");
  3. between ``MIN_WORDS`` and ``rules.max_words`` words (CLIP reads at most 77 tokens);
  4. no banned word or phrase as a whole word (people, hands, text, logos, fantasy, ...);
  5. not a duplicate or near-duplicate (token Jaccard >= ``NEAR_DUPLICATE``) of a kept one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from ray_app import storage

PLACEHOLDER = "{product}"
MIN_WORDS = 6
NEAR_DUPLICATE = 0.8
GENERIC = "generic"
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _singular(word: str) -> str:
    if word.endswith("es") and len(word) > 4 and word[-3] in "sxz":  # boxes, glasses
        return word[:-2]
    if word.endswith("s") and len(word) > 3 and not word.endswith("ss"):
        return word[:-1]
    return word


@dataclass(frozen=True)
class ProductType:
    """One product type of the bank: how to recognise it, what it looks like, its scenes."""

    name: str
    aliases: tuple[str, ...]
    objects: tuple[str, ...]
    prompts: tuple[str, ...]

    @property
    def noun(self) -> str:
        """The phrase that stands for the product in a prompt when no category is given."""
        return self.aliases[0] if self.aliases else self.name.replace("_", " ")


@dataclass(frozen=True)
class CurationRules:
    max_words: int = 40
    banned_words: tuple[str, ...] = ()
    required_placeholder: str = PLACEHOLDER


@dataclass
class PromptBank:
    types: dict[str, ProductType]
    generic: ProductType
    rules: CurationRules
    source: str = "builtin"
    _aliases: list[tuple[tuple[str, ...], str]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        # Longest aliases first, so "coffee table" wins over "table".
        pairs = [
            (tuple(_words(alias)), name) for name, t in self.types.items() for alias in t.aliases
        ]
        self._aliases = sorted((p for p in pairs if p[0]), key=lambda p: -len(p[0]))

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, uri: str | None = None) -> PromptBank:
        """The bank at ``uri`` (any fsspec URI), or the one packaged with restage."""
        if uri:
            text, source = storage.read_bytes(storage.normalize_uri(uri)).decode(), uri
        else:
            text = resources.files("ray_app").joinpath("data", "prompt_bank.yaml").read_text()
            source = "builtin"
        return cls.from_mapping(yaml.safe_load(text), source)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "mapping") -> PromptBank:
        if not isinstance(data, dict) or "types" not in data or "generic" not in data:
            raise ValueError(f"prompt bank {source}: expected top-level keys 'types' and 'generic'")
        raw_rules = data.get("rules") or {}
        unknown = set(raw_rules) - {"max_words", "banned_words", "required_placeholder"}
        if unknown:
            raise ValueError(f"prompt bank {source}: unknown rules key(s) {sorted(unknown)}")
        rules = CurationRules(
            max_words=int(raw_rules.get("max_words", 40)),
            banned_words=tuple(w.lower() for w in raw_rules.get("banned_words", ())),
            required_placeholder=raw_rules.get("required_placeholder", PLACEHOLDER),
        )

        def make(name: str, entry: dict[str, Any]) -> ProductType:
            if not entry.get("prompts"):
                raise ValueError(f"prompt bank {source}: type {name!r} has no prompts")
            return ProductType(
                name,
                tuple(a.lower() for a in entry.get("aliases") or ()),
                tuple(entry.get("objects") or ()),
                tuple(entry["prompts"]),
            )

        types = {name: make(name, entry) for name, entry in data["types"].items()}
        return cls(types, make(GENERIC, data["generic"]), rules, source)

    def to_mapping(self) -> dict[str, Any]:
        def dump(t: ProductType) -> dict[str, Any]:
            return {
                "aliases": list(t.aliases),
                "objects": list(t.objects),
                "prompts": list(t.prompts),
            }

        return {
            "version": 1,
            "rules": {
                "max_words": self.rules.max_words,
                "banned_words": list(self.rules.banned_words),
                "required_placeholder": self.rules.required_placeholder,
            },
            "types": {name: dump(t) for name, t in self.types.items()},
            "generic": dump(self.generic),
        }

    def save(self, uri: str) -> str:
        text = yaml.safe_dump(self.to_mapping(), sort_keys=False, width=200, allow_unicode=False)
        return storage.write_bytes(storage.normalize_uri(uri), text.encode())

    # ------------------------------------------------------------------ lookup

    def match(self, text: str | None) -> str | None:
        """The type whose alias occurs in ``text`` as whole words (plurals too). The earliest
        mention wins (a caption names its subject first: "a teapot on a table"), then the
        longest alias ("coffee table" over "table")."""
        if not text:
            return None
        words = _words(text)
        singular = [_singular(w) for w in words]
        best: tuple[int, int, str] | None = None
        for alias, name in self._aliases:
            k = len(alias)
            for i in range(len(words) - k + 1):
                if tuple(words[i : i + k]) == alias or tuple(singular[i : i + k]) == alias:
                    if best is None or (i, -k) < best[:2]:
                        best = (i, -k, name)
                    break
        return best[2] if best else None

    def vote(self, texts: Iterable[str | None]) -> str | None:
        """The type matched by most texts (ties: the first seen); None when none matches."""
        counts: dict[str, int] = {}
        for text in texts:
            name = self.match(text)
            if name:
                counts[name] = counts.get(name, 0) + 1
        return max(counts, key=counts.__getitem__) if counts else None

    def type_of(self, name: str | None) -> ProductType:
        """The named type, or the generic fallback for an unknown or missing name."""
        return self.types.get(name or "", self.generic)

    def labels(self) -> list[tuple[str, str]]:
        """(type name, noun phrase) pairs for zero-shot classification."""
        return [(name, t.noun) for name, t in self.types.items()]

    def prompts(self, type_name: str | None, n: int, seed: int) -> list[str]:
        """``n`` prompts of the type, drawn without replacement (cycling when ``n`` exceeds
        the bank) in an order fixed by ``seed``."""
        pool = list(self.type_of(type_name).prompts)
        rng = random.Random(seed)
        out: list[str] = []
        while len(out) < n:
            rng.shuffle(pool)
            out.extend(pool[: n - len(out)])
        return out

    def counterfactual_object(self, type_name: str | None, seed: int) -> str:
        """An object of a *different* type, for counterfactual negatives."""
        others = [
            o for name, t in sorted(self.types.items()) if name != type_name for o in t.objects
        ]
        if not others:
            others = list(self.generic.objects) or ["a small potted plant"]
        return random.Random(seed).choice(others)


def product_phrase(token: str, noun: str) -> str:
    """The words that name a trained product in a prompt: its rare token before its class
    noun ("sks mug"). Training, validation, generation and serving all build it here, so
    the adapter is prompted the way it was trained."""
    return f"{token} {noun}"


def fill(prompt: str, product: str) -> str:
    """Put the product phrase (``product_phrase``) into a bank prompt."""
    return prompt.replace(PLACEHOLDER, product)


# Where a caption stops describing the product and starts on its place: a location
# preposition, a verb of placement, or the photo's setting.
_SCENE_START = re.compile(
    r"\b(?:on|against|atop|over|under|beneath|beside|behind|near|inside|into|onto|at|in"
    r"|in front of|next to|sits?|sitting|rests?|resting|stands?|standing|placed|positioned"
    r"|lies|lying|is|are|set|shown|photographed|displayed|background|backdrop|lit|lighting)\b",
    re.IGNORECASE,
)
_ARTICLE = re.compile(
    r"^(?:(?:a|an|the)\s+)?(?:(?:close-?up|photo|image|picture|shot|view)\s+of\s+)?"
    r"(?:(?:a|an|the|one)\s+)?",
    re.IGNORECASE,
)
DESCRIPTION_MAX_WORDS = 12  # a scene prompt and its product must still fit CLIP's 77 tokens


def product_description(caption: str | None, noun: str) -> str | None:
    """The product as a fine-grained caption describes it, without its surroundings, to put
    into a scene prompt in the noun's place: "A red ceramic mug with a white handle on a
    wooden table." -> "red ceramic mug with a white handle". None when the caption's first
    sentence does not name the noun (the noun alone is then the product's phrase)."""
    if not caption:
        return None
    first = re.split(r"[.;:!?\n]", caption, maxsplit=1)[0]
    found = re.search(r"\b" + re.escape(noun) + r"s?\b", first, flags=re.IGNORECASE)
    if not found:
        return None
    tail = first[found.end() :].split(",", 1)[0]
    stop = _SCENE_START.search(tail)
    text = first[: found.end()] + (tail[: stop.start()] if stop else tail)
    words = _ARTICLE.sub("", text.strip()).split()
    if len(words) > DESCRIPTION_MAX_WORDS:  # keep the noun: cut the words before it first
        head = len(_ARTICLE.sub("", first[: found.start()]).split())
        words = words[max(0, head - DESCRIPTION_MAX_WORDS + 1) :][:DESCRIPTION_MAX_WORDS]
    text = " ".join(words).rstrip(" -")
    text = re.sub(r"\s+(?:with|and|of|in)$", "", text, flags=re.IGNORECASE)
    return text or None


_NUMBERING = re.compile(r"^\s*(?:[-*•]+|\(?\d+[.)\]:-]?)\s*")


def clean(line: str) -> str:
    """Strip list numbering, bullets and surrounding quotes that LLMs add."""
    text = _NUMBERING.sub("", line.strip())
    return text.strip().strip("\"'`").strip()


def _near_duplicate(a: set[str], b: set[str]) -> bool:
    return bool(a and b) and len(a & b) / len(a | b) >= NEAR_DUPLICATE


def curate(
    candidates: Iterable[str],
    rules: CurationRules,
    existing: Iterable[str] = (),
) -> tuple[list[str], list[tuple[str, str]]]:
    """Apply the curation rules -> (kept prompts, [(rejected prompt, reason), ...])."""
    kept: list[str] = []
    rejected: list[tuple[str, str]] = []
    seen = [set(_words(p.replace(PLACEHOLDER, ""))) for p in existing]
    banned = [
        (b, re.compile(r"\b" + re.escape(b) + r"\b", re.IGNORECASE)) for b in rules.banned_words
    ]
    for raw in candidates:
        text = clean(raw)
        reason = None
        words = text.split()
        if not text:
            reason = "empty"
        elif "\n" in text or not text.isascii() or not text.isprintable():
            reason = "not a single line of printable ASCII"
        elif text.count(rules.required_placeholder) != 1:
            reason = f"must contain {rules.required_placeholder} exactly once"
        elif len(words) > rules.max_words:
            reason = f"{len(words)} words, above max_words={rules.max_words}"
        elif len(words) < MIN_WORDS:
            reason = f"{len(words)} words, below {MIN_WORDS}: too short to describe a scene"
        else:
            hit = next(
                (b for b, rx in banned if rx.search(text.replace(rules.required_placeholder, ""))),
                None,
            )
            if hit:
                reason = f"banned word {hit!r}"
        if reason is None:
            tokens = set(_words(text.replace(rules.required_placeholder, "")))
            if any(_near_duplicate(tokens, other) for other in seen):
                reason = "duplicate or near-duplicate of a kept prompt"
            else:
                seen.append(tokens)
        if reason:
            rejected.append((raw, reason))
        else:
            kept.append(text)
    return kept, rejected


NOUN_MAX_WORDS = 4
NOUN_MAX_CHARS = 40
_MARKUP = re.compile(r"<[^>]*>|\[[^\]]*\]\([^)]*\)|\{[^}]*\}")  # tags, [md](links), {templates}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal escape sequences
_NOT_A_WORD = re.compile(r"\S*(?:://|@|=|\\)\S*")  # URLs, handles, emails, key=value, escapes


def category_noun(bank: PromptBank, category: str | None) -> str | None:
    """The phrase that stands for a product in prompts, from its free-text ``category``.

    A category that matches a bank type gives that type's noun (curated text). Any other is
    reduced to a short noun phrase: markup, URLs, handles, ``key=value`` pairs and control
    characters removed, lower-case ASCII words only, banned words dropped, at most
    ``NOUN_MAX_WORDS`` words and ``NOUN_MAX_CHARS`` characters. None when nothing is left (the
    caller uses the type's noun). Raw manifest text never reaches a prompt.
    """
    if not category:
        return None
    name = bank.match(category)
    if name:
        return bank.type_of(name).noun
    text = _NOT_A_WORD.sub(" ", _MARKUP.sub(" ", _ANSI.sub(" ", category)))
    text = " " + " ".join(w for w in _WORD.findall(text.lower()) if not w.isdigit()) + " "
    for phrase in bank.rules.banned_words:  # words and phrases ("held by")
        while f" {phrase} " in text:  # adjacent repeats share their spaces
            text = text.replace(f" {phrase} ", " ")
    words = text.split()
    noun = ""
    for word in words[:NOUN_MAX_WORDS]:
        if len(noun) + len(word) + 1 > NOUN_MAX_CHARS:
            break
        noun = f"{noun} {word}".strip()
    return noun or None


def classify(
    bank: PromptBank, category: str | None, title: str | None, captions: Iterable[str | None]
) -> tuple[str | None, str]:
    """Type a product from its record's category when given, else its title, else its captions.

    -> (type, source) with source one of category, category-unmatched, title, captioner,
    unresolved. A category that matches no bank type gives the generic type (the user's
    category is authoritative, so no guessing); with no category and no match anywhere the
    result is (None, "unresolved") and the caller may try zero-shot CLIP.
    """
    if category:
        name = bank.match(category)
        return (name, "category") if name else (GENERIC, "category-unmatched")
    name = bank.match(title)
    if name:
        return name, "title"
    name = bank.vote(captions)
    if name:
        return name, "captioner"
    return None, "unresolved"
