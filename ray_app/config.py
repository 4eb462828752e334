"""Typed configuration: profiles, YAML files and ``--set a.b=c`` overrides.

Precedence, lowest first: the ``default`` profile, the chosen profile (an overlay on
``default``), ``--config`` files, then ``--set`` overrides. The merged mapping is validated
once by pydantic; an unknown key, a wrong type or an impossible value fails before any work
starts with a message that names the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ROLES = (
    "captioner",
    "segmenter",
    "novel_view",
    "inpainter",
    "generator",
    "clip",
    "dino",
    "encoder",
    "llm",
)
PROFILES = ("default", "tiny")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """Raised for any invalid configuration; the message names the key and the fix."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RoleSpec(StrictModel):
    """Where a model role comes from and how it runs."""

    source: str = Field(
        description="Hub id (org/name), local folder or file, any fsspec URI (s3://, gs://, "
        "https://, hf://), or 'tiny' for the project's own random-weight tiny checkpoint."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(None, description="Weights variant, e.g. 'fp16' (diffusers).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="'auto': bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.")
    batch_size: PositiveInt = Field(1, description="Images per forward pass inside an actor.")
    num_gpus: Annotated[float, Field(ge=0)] = Field(
        0.0, description="GPUs per actor; fractional values pack several actors on one GPU."
    )
    num_cpus: PositiveFloat = Field(1.0, description="CPUs reserved per actor.")
    min_actors: PositiveInt = Field(1, description="Actor pool minimum size.")
    max_actors: PositiveInt = Field(1, description="Actor pool maximum size (autoscaling).")

    @model_validator(mode="after")
    def _check(self) -> RoleSpec:
        if not self.source.strip():
            raise ValueError("source is empty: give a hub id, a local path, a URI or 'tiny'")
        if self.max_actors < self.min_actors:
            raise ValueError(
                f"max_actors={self.max_actors} is below min_actors={self.min_actors}: "
                "raise max_actors or lower min_actors"
            )
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        return self


class RayConfig(StrictModel):
    """How a job reaches Ray."""

    address: str | None = Field(
        None,
        description="None starts a local Ray in-process; 'auto' or 'ray://host:10001' joins a "
        "cluster (RAY_ADDRESS in the environment wins when this is None).",
    )
    num_cpus: PositiveInt | None = Field(None, description="CPUs of the local Ray (None: all).")
    num_gpus: NonNegativeInt | None = Field(None, description="GPUs of the local Ray.")
    object_store_mb: PositiveInt | None = Field(
        None, description="Object store size of the local Ray, in MiB (None: Ray's default)."
    )
    data_object_store_limit_mb: PositiveInt | None = Field(
        None,
        description="Upper bound on the object store memory that a Ray Data job may use, in "
        "MiB; bounds streaming back-pressure (None: Ray Data's default fraction).",
    )
    progress_bars: bool = Field(True, description="Show Ray Data's progress display.")


class ImagesConfig(StrictModel):
    """Decoding rules applied to every input image."""

    max_megapixels: PositiveFloat = Field(
        64.0, description="Reject images above this size (decompression-bomb guard)."
    )
    max_side: PositiveInt = Field(
        1024, description="Downscale decoded inputs so the longer side is at most this."
    )
    min_side: PositiveInt = Field(16, description="Reject images whose shorter side is smaller.")


class RestageConfig(StrictModel):
    """The whole resolved configuration of a run."""

    profile: str = Field("default", description="Name of the profile this config came from.")
    cache_dir: str | None = Field(
        None,
        description="Local cache for tiny checkpoints and for sources copied from URIs; "
        "null means $RESTAGE_CACHE, else ~/.cache/restage.",
    )
    offline: bool = Field(
        False, description="Forbid hub downloads (HF_HUB_OFFLINE etc. set for every worker)."
    )
    seed: NonNegativeInt = Field(0, description="Run seed mixed into every derived seed.")
    ray: RayConfig = Field(default_factory=RayConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    captioner: RoleSpec
    segmenter: RoleSpec
    novel_view: RoleSpec
    inpainter: RoleSpec
    generator: RoleSpec
    clip: RoleSpec
    dino: RoleSpec
    encoder: RoleSpec
    llm: RoleSpec | None = Field(None, description="Optional: used by `restage prompts build`.")

    def role(self, name: str) -> RoleSpec:
        if name not in ROLES:
            raise ConfigError(f"unknown model role {name!r}; roles are: {', '.join(ROLES)}")
        spec = getattr(self, name)
        if spec is None:
            raise ConfigError(f"model role {name!r} is not configured: set {name}.source")
        return spec

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir or os.environ.get("RESTAGE_CACHE") or "~/.cache/restage").expanduser()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _profile_mapping(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; profiles are: {', '.join(PROFILES)}")
    text = resources.files("ray_app").joinpath("profiles", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _deep_merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (['a', 'b'], c) with the value parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. generator.batch_size=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return key.split("."), value


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(path[: i + 1])
            raise ConfigError(f"--set {'.'.join(path)}: {dotted} is a value, not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(err: ValidationError, tree: dict[str, Any]) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-after"))
        kind = item["type"]
        if kind == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else ""
            allowed = _allowed_keys(parent)
            lines.append(f"{loc}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif kind == "missing":
            lines.append(f"{loc}: required but missing")
        else:
            value = item.get("input")
            shown = "" if isinstance(value, dict) else f"={value!r}"
            lines.append(f"{loc}{shown}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _allowed_keys(dotted: str) -> list[str]:
    model: type[BaseModel] = RestageConfig
    for part in filter(None, dotted.split(".")):
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def load_config(
    profile: str = "default",
    files: list[str | os.PathLike[str]] | None = None,
    overrides: list[str] | None = None,
) -> RestageConfig:
    """Resolve a profile, optional YAML files and ``a.b=c`` overrides into a validated config."""
    tree = _profile_mapping("default")
    if profile != "default":
        tree = _deep_merge(tree, _profile_mapping(profile))
    tree["profile"] = profile
    for path in files or []:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping at the top level")
        tree = _deep_merge(tree, loaded)
    for text in overrides or []:
        path, value = parse_override(text)
        _apply_override(tree, path, value)
    try:
        return RestageConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, tree)) from None
