"""Model checkpoints before any work: is every role's checkpoint reachable (the preflight),
and ``restage models fetch``, which stages every role's checkpoint once on any fsspec URI
(e.g. the cluster's object store) so that a thousand workers read it there instead of each
hitting the hub.

A role's checkpoint is *available* when its source is ``tiny``, an existing local path, an
fsspec URI that exists (or is already in the cache), or a hub id that is in the hub cache
or, when ``offline`` is false, answers on the hub within seconds.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ray_app import storage
from ray_app.config import RestageConfig

COMPLETE = ".restage-complete"  # written last under each fetched role
HUB_TIMEOUT_S = 5.0
SOURCES_FILE = "sources.yaml"  # a config overlay pointing every fetched role at the URI


def _hub_cached(repo: str, revision: str | None) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, revision=revision, local_files_only=True)
        return True
    except Exception:  # LocalEntryNotFoundError and friends: not in the cache
        return False


def _hub_reachable(repo: str, revision: str | None) -> str | None:
    """None when the hub answers for ``repo``; else what went wrong, in a few words."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
        return None
    except Exception as exc:  # connection refused, DNS, 401/404: all mean "cannot load it"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def unavailable(config: RestageConfig, role: str) -> str | None:
    """None when ``role``'s checkpoint, and its separate VAE if it has one, can be loaded;
    else a message naming the role (``ROLE.vae`` for the VAE), its source, where restage
    looked and the fixes."""
    spec = config.role(role)
    found = _unavailable(config, role, spec.source, spec.revision)
    if found is None and spec.vae is not None:
        found = _unavailable(config, f"{role}.vae", spec.vae.source, spec.vae.revision)
    return found


def _unavailable(config: RestageConfig, key: str, source: str, revision: str | None) -> str | None:
    from ray_app.models import fetched

    src = source.strip()
    fixes = (
        "fixes: stage it once with `restage models fetch --to URI` where the hub is reachable "
        "and point the role at it (--config URI/sources.yaml), set HF_ENDPOINT to a hub "
        f"mirror, or set {key}.source to a local folder or an object-store URI"
    )
    if src == "tiny":
        return None
    local = Path(src[len("file://") :] if src.startswith("file://") else src).expanduser()
    if local.exists():
        return None
    if storage.has_protocol(src):
        if fetched(src, config.cache_path, revision):
            return None
        try:
            if storage.exists(src):
                return None
            why = "it does not exist"
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return f"{key}: source {src} is not reachable ({why}); looked in the URI and {config.cache_path}/sources; {fixes}"
    if src.startswith(("/", "./", "../", "~")) or src.count("/") != 1:
        return f"{key}: source {src!r} is no local path, hub id (org/name) or URI; {fixes}"
    if _hub_cached(src, revision):
        return None
    if config.offline:
        return f"{key}: hub id {src} is not in the hub cache and offline=true; {fixes}"
    why = _hub_reachable(src, revision)
    if why is None:
        return None
    return (
        f"{key}: hub id {src} is not in the hub cache and the hub did not answer ({why}); {fixes}"
    )


def check(config: RestageConfig, roles: list[str]) -> list[str]:
    """Problems with the checkpoints of ``roles`` (each role once), for the preflight."""
    from concurrent.futures import ThreadPoolExecutor

    unique = list(dict.fromkeys(roles))
    with ThreadPoolExecutor(max_workers=max(1, len(unique))) as pool:  # hub checks in parallel
        found = list(pool.map(lambda role: unavailable(config, role), unique))
    return [msg for msg in found if msg]


# --------------------------------------------------------------------------- fetch


def _local_copy(config: RestageConfig, key: str, scratch: Path) -> Path:
    """A local file or folder holding the checkpoint of ``key``, a role or ``ROLE.vae``
    (downloaded when needed)."""
    from ray_app.models import resolve_source, resolve_vae

    role, _, part = key.partition(".")
    spec = config.role(role)
    if part:  # the role's separate VAE: a diffusers AutoencoderKL folder
        resolved, is_local = resolve_vae(role, spec, config.cache_path)
        revision = spec.vae.revision
        # Its config and diffusers-format weights, not the single-file copies beside them.
        allow = ["config.json", "diffusion_pytorch_model*.safetensors"]
    else:
        resolved, is_local = resolve_source(role, spec, config.cache_path)
        revision = spec.revision
        allow = None
        if spec.variant:  # only the weights variant the role loads, plus configs and tokenizers
            allow = [f"*.{spec.variant}.*", "*.json", "*.txt", "*.model", "*tokenizer*", "*.py"]
    if is_local:  # a tiny checkpoint, a local path, or a URI copied into the cache
        return Path(resolved)
    from huggingface_hub import snapshot_download

    dest = scratch / key / resolved.replace("/", "--")
    snapshot_download(resolved, revision=revision, local_dir=dest, allow_patterns=allow)
    return dest


def _stage(config: RestageConfig, key: str, root: str, scratch: Path) -> str:
    """Copy the checkpoint of ``key`` to ``root/<key>/<name>`` unless it is complete there
    already; -> its URI."""
    fs, _ = storage.url_to_fs(root)
    key_root = storage.join(root, key)
    local = _local_copy(config, key, scratch)
    target = storage.join(key_root, local.name)
    if not storage.exists(storage.join(key_root, COMPLETE)):
        if storage.exists(key_root):
            storage.remove(key_root, recursive=True)  # a partial earlier copy
        _, path = storage.url_to_fs(target)
        fs.makedirs(storage.url_to_fs(key_root)[1], exist_ok=True)
        fs.put(str(local), path, recursive=local.is_dir())
        storage.write_bytes(storage.join(key_root, COMPLETE), local.name.encode())
    if local.is_relative_to(scratch):
        shutil.rmtree(local, ignore_errors=True)  # keep local disk bounded
    return target


def fetch(config: RestageConfig, to: str, roles: list[str]) -> dict[str, str]:
    """Copy every role's checkpoint to ``to/<role>/<name>``, and a role's separate VAE to
    ``to/<role>.vae/<name>`` (once when roles share one); checkpoints already complete there
    are skipped. Write ``to/sources.yaml``. -> {role or ROLE.vae: new source URI}."""
    import yaml

    root = storage.normalize_uri(to)
    sources: dict[str, str] = {}
    overlay: dict[str, dict] = {}
    staged_vaes: dict[tuple[str, str | None], str] = {}  # (source, revision) -> URI
    with tempfile.TemporaryDirectory(prefix="restage-fetch-") as tmp:
        for role in roles:
            sources[role] = _stage(config, role, root, Path(tmp))
            overlay[role] = {"source": sources[role]}
            vae = config.role(role).vae
            if vae is not None:
                same = (vae.source.strip(), vae.revision)
                if same not in staged_vaes:
                    staged_vaes[same] = _stage(config, f"{role}.vae", root, Path(tmp))
                sources[f"{role}.vae"] = staged_vaes[same]
                overlay[role]["vae"] = {"source": staged_vaes[same]}
    storage.write_bytes(
        storage.join(root, SOURCES_FILE), yaml.safe_dump(overlay, sort_keys=False).encode()
    )
    return sources
