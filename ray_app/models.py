"""The model registry: every model is loaded by role, through one loader per library family.

``load_role(config, "generator")`` (or ``load_model(config.model_spec("generator"))``, as
actors do) resolves the role's ``source`` to something its library
can load (a hub id, a local folder, a file copied from an fsspec URI, or the project's own
tiny checkpoint) and calls the family loader. Real and tiny checkpoints go through the same
loader: the tiny profile only changes where the files come from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_app import storage
from ray_app.config import ROLES, ModelSpec, RestageConfig, RoleSpec
from ray_app.plan import actors_range

if TYPE_CHECKING:  # torch loads where a model does, not in every task that reads a config
    import torch

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
# Read by the libraries when imported: warnings and errors only, no download bars.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}


@dataclass
class LoadedModel:
    """A loaded role: the model (or pipeline) and whatever its library needs beside it."""

    role: str
    family: str
    source: str
    resolved: str  # the hub id or local path the library loaded
    device: torch.device
    dtype: torch.dtype
    model: Any
    processor: Any = None  # transformers processor / tokenizer, open_clip preprocess
    tokenizer: Any = None  # open_clip tokenizer
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str
    # (role, path, spec, device, dtype, offline, **components: resolved paths, e.g. vae)
    load: Callable[..., LoadedModel]
    accepts_hub_id: bool = True


_FAMILIES: dict[str, Family] = {}

# Which library family loads each role.
ROLE_FAMILY = {
    "captioner": "transformers",
    "segmenter": "segment_anything",
    "novel_view": "diffusers",
    "inpainter": "diffusers",
    "generator": "diffusers",
    "clip": "open_clip",
    "dino": "transformers",
    "encoder": "transformers",
    "llm": "transformers",
    "eval_clip": "open_clip",
    "eval_dino": "transformers",
    "inception": "fid_inception",
}
assert set(ROLE_FAMILY) == set(ROLES)


def register_family(name: str, *, accepts_hub_id: bool = True):
    """Register a family loader; a second loader under the same name is an error."""

    def wrap(fn):
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is already registered")
        _FAMILIES[name] = Family(name, fn, accepts_hub_id)
        return fn

    return wrap


def family(name: str) -> Family:
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; registered: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


# --------------------------------------------------------------------------- environment


def apply_environment(offline: bool) -> dict[str, str]:
    """Set the hub libraries' environment in this process; returns it for Ray workers."""
    env = dict(QUIET_ENV)
    if offline:
        env.update(OFFLINE_ENV)
    os.environ.update(env)
    try:  # huggingface_hub reads HF_HUB_OFFLINE at import; refresh it if already imported
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = offline or hc.HF_HUB_OFFLINE
    except ImportError:
        pass
    quiet_libraries(imported_only=True)
    return env


def quiet_libraries(imported_only: bool = False) -> None:
    """Progress bars and info logs of the model libraries off (actors log their own way).
    ``imported_only``: of those this process has imported. A job's driver loads no model,
    and importing them there only to quiet them cost ~2 s of CPU per job; ``load_model``
    quiets them where they load."""
    if not imported_only or "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    if not imported_only or "diffusers" in sys.modules:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={name!r} but CUDA is not available here: use device=auto or cpu"
        )
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# --------------------------------------------------------------------------- sources


def resolve_source(role: str, spec: RoleSpec, cache_dir: Path) -> tuple[str, bool]:
    """-> (hub id or local path, is_local). URIs are copied into the cache once."""
    return _resolve(role, spec.source, spec.revision, role, cache_dir)


def resolve_vae(role: str, spec: RoleSpec, cache_dir: Path) -> tuple[str, bool] | None:
    """``resolve_source`` for the role's separate VAE (``spec.vae``); None without one."""
    from ray_app import tiny

    if spec.vae is None:
        return None
    return _resolve(f"{role}.vae", spec.vae.source, spec.vae.revision, tiny.TINY_VAE, cache_dir)


def _resolve(
    key: str, source: str, revision: str | None, tiny_name: str, cache_dir: Path
) -> tuple[str, bool]:
    from ray_app import tiny

    src = source.strip()
    if src == "tiny":
        return str(tiny.ensure(tiny_name, cache_dir)), True
    if src.startswith("file://"):
        src = src[len("file://") :]
    local = Path(src).expanduser()
    if local.exists():
        return str(local.resolve()), True
    if storage.has_protocol(src):
        return str(fetch_uri(src, cache_dir, revision)), True
    if src.startswith(("/", "./", "../", "~")) or src.count("/") != 1:
        raise FileNotFoundError(
            f"{key}.source={source!r}: no such local path, and it is not a hub id "
            "(org/name) or a URI with a protocol (s3://, https://, hf://, ...)"
        )
    return src, False


def _fetch_dest(uri: str, cache_dir: Path, revision: str | None) -> tuple[Path, str]:
    key = hashlib.sha256(f"{uri}@{revision or ''}".encode()).hexdigest()[:20]
    return Path(cache_dir) / "sources" / key, uri.rstrip("/").rsplit("/", 1)[-1] or "source"


def fetched(uri: str, cache_dir: Path, revision: str | None = None) -> bool:
    """Whether ``fetch_uri`` already copied ``uri`` into the cache."""
    return (_fetch_dest(uri, cache_dir, revision)[0] / ".restage-complete").exists()


def fetch_uri(uri: str, cache_dir: Path, revision: str | None = None) -> Path:
    """Copy a file or folder from any fsspec URI into the cache (once, safe across processes)."""
    from filelock import FileLock

    dest, name = _fetch_dest(uri, cache_dir, revision)
    done = dest / ".restage-complete"
    if done.exists():
        return dest / name
    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not done.exists():
            fs, path = storage.url_to_fs(uri)
            if not fs.exists(path):
                raise FileNotFoundError(f"source {uri!r} does not exist")
            tmp = dest / f".tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                fs.get(path, str(tmp / name), recursive=fs.isdir(path))
                shutil.move(str(tmp / name), str(dest / name))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            done.write_text(json.dumps({"uri": uri, "revision": revision}))
    return dest / name


# --------------------------------------------------------------------------- loading


def load_role(config: RestageConfig, role: str, *, device: str | None = None) -> LoadedModel:
    """Load ``role`` as configured (``device`` overrides the spec, e.g. in a GPU benchmark)."""
    return load_model(config.model_spec(role), device=device)


def load_model(model: ModelSpec, *, device: str | None = None) -> LoadedModel:
    """Load an actor's role from its ``ModelSpec`` (``device`` overrides the spec)."""
    import torch

    role, spec = model.role, model.spec
    quiet_libraries()
    dev = resolve_device(device or spec.device)
    dtype = resolve_dtype(spec.dtype, dev)
    if dtype == torch.float16 and dev.type == "cpu":
        dtype = torch.float32  # many CPU kernels have no float16 implementation
    resolved, is_local = resolve_source(role, spec, model.cache_dir)
    fam = family(ROLE_FAMILY[role])
    if not is_local and not fam.accepts_hub_id:
        raise ValueError(
            f"{role}.source={spec.source!r}: the {fam.name} family loads checkpoint files; give a "
            "local path or a URI (https://, hf://org/repo/file.pth, s3://, ...)"
        )
    if not is_local and model.offline:
        raise RuntimeError(
            f"{role}.source={spec.source!r} is a hub id but offline=true: use a local path, a "
            "mirror URI, or set offline=false"
        )
    components: dict[str, str] = {}
    vae = resolve_vae(role, spec, model.cache_dir)
    if vae is not None:
        if not vae[1] and model.offline:
            raise RuntimeError(
                f"{role}.vae.source={spec.vae.source!r} is a hub id but offline=true: use a "
                "local path, a mirror URI, or set offline=false"
            )
        components["vae"] = vae[0]
    loaded = fam.load(role, resolved, spec, dev, dtype, model.offline, **components)
    loaded.source = spec.source
    return loaded


def _diffusers_dtype_key() -> str:
    import diffusers
    from packaging.version import Version

    # diffusers 0.42 renamed torch_dtype to dtype; older releases only know torch_dtype.
    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


@register_family("diffusers")
def _load_diffusers(role, path, spec, device, dtype, offline, vae=None) -> LoadedModel:
    """``vae``: the resolved path of ``spec.vae``, loaded in the pipeline's place. With its
    ``force_upcast`` false, diffusers' SDXL pipelines decode float16 latents in float16
    (``needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast``
    in pipeline_stable_diffusion_xl.py; the inpainting pipeline also checks it before
    encoding its input image)."""
    from diffusers import (
        AutoencoderKL,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
        DiffusionPipeline,
    )

    # AutoPipelineForInpainting also turns a text-to-image checkpoint into an inpainting
    # pipeline, so any SD/SDXL base can stand in as the inpainter.
    cls = {"generator": AutoPipelineForText2Image, "inpainter": AutoPipelineForInpainting}.get(
        role, DiffusionPipeline
    )
    kwargs: dict[str, Any] = {_diffusers_dtype_key(): dtype, "local_files_only": offline}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.variant:
        kwargs["variant"] = spec.variant
    extra: dict[str, Any] = {}
    if vae is not None:
        vae_kwargs: dict[str, Any] = {_diffusers_dtype_key(): dtype, "local_files_only": offline}
        if spec.vae.revision:
            vae_kwargs["revision"] = spec.vae.revision
        kwargs["vae"] = AutoencoderKL.from_pretrained(vae, **vae_kwargs)
        extra["vae"] = vae
    pipe = cls.from_pretrained(path, **kwargs)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(role, "diffusers", spec.source, path, device, dtype, pipe, extra=extra)


_TRANSFORMERS_CLASSES = {
    "captioner": ("AutoModelForImageTextToText", "AutoProcessor"),
    "dino": ("AutoModel", "AutoImageProcessor"),
    "encoder": ("AutoModel", "AutoImageProcessor"),
    "eval_dino": ("AutoModel", "AutoImageProcessor"),
    "llm": ("AutoModelForCausalLM", "AutoTokenizer"),
}


@register_family("transformers")
def _load_transformers(role, path, spec, device, dtype, offline) -> LoadedModel:
    import transformers

    model_cls, proc_cls = (getattr(transformers, n) for n in _TRANSFORMERS_CLASSES[role])
    kwargs: dict[str, Any] = {"local_files_only": offline}
    if spec.revision:
        kwargs["revision"] = spec.revision
    processor = proc_cls.from_pretrained(path, **kwargs)
    model = model_cls.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    if hasattr(processor, "padding_side"):  # decoder-only generation pads on the left
        processor.padding_side = "left"
    elif hasattr(getattr(processor, "tokenizer", None), "padding_side"):
        processor.tokenizer.padding_side = "left"
    return LoadedModel(
        role, "transformers", spec.source, path, device, dtype, model, processor=processor
    )


@register_family("open_clip")
def _load_open_clip(role, path, spec, device, dtype, offline) -> LoadedModel:
    import open_clip
    import torch

    if not Path(path).exists():  # a hub id: fetch the repo at its revision, then load locally
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            path,
            revision=spec.revision,
            allow_patterns=[
                "open_clip_config.json",
                "*.safetensors",
                "open_clip_pytorch_model.bin",
            ],
        )
    name = f"local-dir:{path}"
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, precision=precision, device=device
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(
        role,
        "open_clip",
        spec.source,
        path,
        device,
        dtype,
        model,
        processor=preprocess,
        tokenizer=tokenizer,
    )


# Segment Anything presets, recognised from the image encoder's width in the checkpoint.
_SAM_PRESETS = {
    1280: {
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [7, 15, 23, 31],
    },
    1024: {
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [5, 11, 17, 23],
    },
    768: {
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": [2, 5, 8, 11],
    },
}


@register_family("segment_anything", accepts_hub_id=False)
def _load_segment_anything(role, path, spec, device, dtype, offline) -> LoadedModel:
    import torch

    from ray_app import tiny

    folder = Path(path)
    if folder.is_dir():
        ckpts = sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt"))
        if len(ckpts) != 1:
            raise FileNotFoundError(
                f"{role}: expected one .pth checkpoint in {folder}, found {len(ckpts)}"
            )
        ckpt, arch_file = ckpts[0], folder / "sam_config.json"
    else:
        ckpt, arch_file = folder, folder.with_name("sam_config.json")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if arch_file.exists():
        arch = json.loads(arch_file.read_text())
    else:
        width = state["image_encoder.patch_embed.proj.weight"].shape[0]
        if width not in _SAM_PRESETS:
            raise ValueError(
                f"{role}: {ckpt.name} has encoder width {width}, not one of SAM vit_b/l/h; "
                "put a sam_config.json beside it"
            )
        arch = {
            "encoder_embed_dim": width,
            **_SAM_PRESETS[width],
            "image_size": 1024,
            "vit_patch_size": 16,
            "prompt_embed_dim": 256,
            "window_size": 14,
            "mlp_ratio": 4.0,
            "decoder_depth": 2,
            "decoder_mlp_dim": 2048,
            "decoder_num_heads": 8,
            "mask_in_chans": 16,
        }
    sam = tiny.build_sam(arch)
    sam.load_state_dict(state)
    sam.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        role, "segment_anything", spec.source, str(ckpt), device, dtype, sam, extra={"arch": arch}
    )


@register_family("fid_inception", accepts_hub_id=False)
def _load_fid_inception(role, path, spec, device, dtype, offline) -> LoadedModel:
    """FID's feature extractor: a module from uint8 images (N, 3, H, W), any size, to
    (N, num_features) float features. A torch-fidelity weights file (the standard FID
    Inception-v3, 2048 pool3 features) loads into torchmetrics' ``NoTrainInceptionV3``; a
    folder with ``inception_config.json`` (the tiny checkpoint) into the network it names."""
    import torch

    from ray_app import tiny

    folder = Path(path)
    if folder.is_dir():
        arch = json.loads((folder / "inception_config.json").read_text())
        net = tiny.build_inception(arch)
        net.load_state_dict(
            torch.load(folder / "inception.pth", map_location="cpu", weights_only=True)
        )
    else:
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path
        )
        net.num_features = 2048
    net.to(device=device, dtype=torch.float32).eval()  # FID statistics want float32 features
    return LoadedModel(role, "fid_inception", spec.source, str(path), device, torch.float32, net)


def describe(config: RestageConfig) -> list[dict[str, Any]]:
    """One row per role: family, source, revision, resources (for `restage models list`)."""
    rows = []
    for role in ROLES:
        spec = getattr(config, role)
        if spec is None:
            continue
        rows.append(
            {
                "role": role,
                "family": ROLE_FAMILY[role],
                "source": spec.source,
                "revision": spec.revision or "",
                "dtype": spec.dtype,
                "num_gpus": spec.num_gpus,
                "actors": actors_range(spec.min_actors, spec.max_actors),
                "batch_size": spec.batch_size,
                "vae": spec.vae.source if spec.vae else "",
            }
        )
    return rows


def source_tag(config: RestageConfig, role: str) -> str:
    """``source@revision`` of a role, and `` vae=source@revision`` of its separate VAE: what
    manifests record as the model that was used."""
    spec = config.role(role)
    tag = spec.source + (f"@{spec.revision}" if spec.revision else "")
    if spec.vae is not None:
        tag += f" vae={spec.vae.source}" + (f"@{spec.vae.revision}" if spec.vae.revision else "")
    return tag
