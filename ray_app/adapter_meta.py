"""``adapter.json``: the metadata of a product's adapter, written by `restage train` (last, as
its completion marker) and read by generate, serve and the benchmarks.

``AdapterMeta`` alone writes and reads the file. Its ``version`` is bumped whenever a field
changes meaning or a required field is added; the reader migrates every older layout it
knows and refuses a newer one, naming the file, the field and the fix. Files without a
``version`` (restage 0.1 before this module) have the layout of version 1.

Version 2 adds ``recipe`` (how the adapter was trained: a version-1 file is a restage
adapter) and ``prior_preservation`` (the baseline recipe's class images, when it had them).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ray_app import storage
from ray_app.prompts import product_phrase
from ray_app.storage import AdapterLayout

ADAPTER_META_VERSION = 2
RETRAIN = "retrain the product with `restage train` (delete its adapter folder first)"
UPGRADE = "upgrade restage (pip install -U restage) to read it"


class AdapterMetaError(ValueError):
    """An ``adapter.json`` that cannot be read; the message names the file, the field and
    the fix."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelRef(_Part):
    """The base generator the adapter was trained on: load it to apply the adapter."""

    role: str = Field("generator", description="The config role of the base model.")
    source: str = Field(description="The role's source (hub id, path, URI or 'tiny').")
    revision: str | None = Field(None, description="Hub revision of the source.")
    variant: str | None = Field(None, description="Weights variant (diffusers).")
    resolved: str | None = Field(None, description="What the loader loaded (id or local path).")


class TrainingSetRef(_Part):
    """The augment output the adapter was trained on (generate and serve read the product's
    real images from its manifest shard)."""

    uri: str = Field(description="Output root of `restage augment`.")
    manifest_shard: str = Field(description="The product's manifest shard (Parquet).")
    digest: str = Field(description="sha256 over the kept samples (ids, kinds, captions, images).")
    samples: int = Field(ge=0, description="Kept samples trained on.")


class TokenTrial(_Part):
    """One candidate token in one round of a token sweep (``train.token_sweep`` > 1)."""

    token: str
    score: float = Field(
        description="Validation fidelity: CLIP-I + DINO of images with the token against the "
        "held-out real photos, averaged (higher is better)."
    )
    final_loss: float
    round: int = Field(0, ge=0, description="Successive-halving round (0: every candidate).")
    steps: int = Field(0, ge=0, description="Steps trained when it was scored.")
    source: str = Field("rare", description="'rare' (the token list) or 'associated'.")


class SweepCost(_Part):
    """What a token sweep cost beside the winner's full training."""

    steps: int = Field(ge=0, description="Optimiser steps of every candidate together.")
    step_fraction: float = Field(ge=0, description="steps / train.steps.")
    validation_images: int = Field(ge=0)
    seconds_fraction: float = Field(
        ge=0, description="The sweep's seconds / the winner's training seconds."
    )
    held_out: list[str] = Field(
        default_factory=list, description="Real photos held out of the sweep's runs to score them."
    )


class RejectedToken(_Part):
    """A candidate token refused before training (it collides with the product's words)."""

    token: str
    reason: str


class PriorPreservationRef(_Part):
    """The class images a ``dreambooth_lora`` adapter was trained with (prior preservation)."""

    class_prompt: str = Field(description="The prompt of the class images ('a photo of a mug').")
    class_images: int = Field(gt=0, description="Class images made by the base generator.")
    weight: float = Field(gt=0, description="loss = instance loss + weight * class loss.")
    seconds: float = Field(0.0, ge=0, description="Making them (0: a worker's earlier copy).")


class StageSeconds(_Part):
    """Where the product's training time went, in seconds."""

    load: float = Field(description="Reading the training set.")
    setup: float = Field(description="Latents and text embeddings of its samples.")
    train: float = Field(description="Optimiser steps (a multi-product group's over its size).")
    sweep: float = Field(0.0, description="The token sweep, if any.")
    write: float = Field(description="Writing the weights.")
    per_step: float = Field(description="Seconds per optimiser step.")
    total: float = Field(description="From the start of its load to the end of its write.")
    base_load_of_worker: float = Field(description="The worker's one load of the base model.")


class AdapterMeta(_Part):
    """What ``adapter.json`` holds. ``phrase`` names the product in prompts."""

    version: int = Field(ADAPTER_META_VERSION, description="Layout version of this file.")
    product_id: str = Field(min_length=1)
    token: str = Field(min_length=1, description="The rare token trained to mean the product.")
    noun: str = Field(min_length=1, description="The product's class noun ('mug').")
    product_type: str | None = Field(None, description="Prompt-bank type of the product.")
    format: Literal["diffusers-lora"] = "diffusers-lora"
    recipe: Literal["restage", "dreambooth_lora"] = Field(
        "restage",
        description="'restage' (every kept sample of the training set) or 'dreambooth_lora' "
        "(the paper's baseline: the real photos only, instance prompts).",
    )
    weights: str = Field(
        AdapterLayout.WEIGHTS, description="File name of the weights in the adapter folder."
    )
    weights_sha256: str = Field(min_length=1)
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0, description="LoRA alpha, folded into the saved weights.")
    alpha_folded: bool = True
    target_modules: list[str]
    steps: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    products_per_step: int = Field(1, gt=0)
    resolution: int = Field(gt=0)
    learning_rate: float
    negative_ratio: float
    caption_mode: str
    positives: int = Field(ge=0)
    negatives: int = Field(ge=0)
    seed: int
    base: BaseModelRef
    training_set: TrainingSetRef
    final_loss: float
    eval_loss_start: float | None = None
    eval_loss_end: float | None = None
    token_sweep: list[TokenTrial] = Field(default_factory=list)
    sweep_cost: SweepCost | None = None
    prior_preservation: PriorPreservationRef | None = None
    tokens_rejected: list[RejectedToken] = Field(default_factory=list)
    seconds: StageSeconds
    restage_version: str
    finished: float = Field(description="Unix time the adapter was written.")

    @property
    def phrase(self) -> str:
        """The product in a prompt: "TOKEN NOUN"."""
        return product_phrase(self.token, self.noun)

    # ------------------------------------------------------------------ file

    def to_dict(self) -> dict[str, Any]:
        """The file's content. ``prompt`` (the phrase) is written for people and tools that
        read the file without restage; the reader recomputes it."""
        # no sweep, no class images: no key
        unset = {k for k in ("sweep_cost", "prior_preservation") if getattr(self, k) is None}
        return {**self.model_dump(mode="json", exclude=unset), "prompt": self.phrase}

    def write(self, uri: str) -> str:
        """Write to ``uri`` (atomically: readers see the old file or this one)."""
        return storage.write_json(uri, self.to_dict())

    @classmethod
    def read(cls, uri: str) -> AdapterMeta:
        """Read and validate the ``adapter.json`` at ``uri``; ``AdapterMetaError`` when it
        is malformed, too new or misses a field (``FileNotFoundError`` when it is absent)."""
        return cls.from_bytes(storage.read_bytes(uri), uri)

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = AdapterLayout.METADATA) -> AdapterMeta:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterMetaError(f"{where}: not JSON ({exc}); {RETRAIN}") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Any, where: str = AdapterLayout.METADATA) -> AdapterMeta:
        """Validate a decoded file, migrating older layouts first."""
        if not isinstance(data, dict):
            raise AdapterMetaError(
                f"{where}: a JSON {type(data).__name__}, not an object; {RETRAIN}"
            )
        data = _migrate(data, where)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise AdapterMetaError(f"{where}: {_describe(err)}; {RETRAIN}") from None


def _migrate(data: dict[str, Any], where: str) -> dict[str, Any]:
    """-> the current layout of any version this restage knows."""
    data = dict(data)
    version = data.get("version")
    if version is None:  # written before the field existed: the layout of version 1
        version = data["version"] = 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AdapterMetaError(f"{where}: field 'version': {version!r} is not a version; {RETRAIN}")
    if version > ADAPTER_META_VERSION:
        raise AdapterMetaError(
            f"{where}: field 'version': {version} is newer than this restage reads "
            f"({ADAPTER_META_VERSION}); {UPGRADE}"
        )
    if version == 1:  # before recipes: every adapter was restage's
        data.setdefault("recipe", "restage")
        version = 2
    data["version"] = version
    # ``prompt`` is the phrase, derived from token and noun; a stale copy is not trusted.
    data.pop("prompt", None)
    return data


def _describe(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(file)"
        if item["type"] == "missing":
            parts.append(f"field {field!r} is missing")
        elif item["type"] == "extra_forbidden":
            parts.append(f"field {field!r} is unknown")
        else:
            parts.append(f"field {field!r}={item.get('input')!r}: {item['msg']}")
    return "; ".join(parts)
