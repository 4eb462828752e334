"""Every role loads through the registry from `restage models make-tiny` output and runs one
forward pass; the tiny profile never touches the network."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from ray_app import models, storage, tiny
from ray_app.cli import main as cli
from ray_app.config import ROLES, VAE_ROLES, ConfigError, load_config

IMG = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
MASK = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))


def _generator(m):
    out = m.model(prompt="a red mug", num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def _inpainter(m):
    out = m.model(
        prompt="a table",
        image=IMG,
        mask_image=MASK,
        num_inference_steps=2,
        height=64,
        width=64,
        strength=1.0,
        output_type="np",
    )
    assert out.images.shape == (1, 64, 64, 3)


def _novel_view(m):
    out = m.model(
        IMG,
        height=64,
        width=64,
        num_frames=3,
        num_inference_steps=2,
        decode_chunk_size=3,
        output_type="np",
    )
    assert np.asarray(out.frames).shape == (1, 3, 64, 64, 3)


def _segmenter(m):
    from segment_anything import SamPredictor

    predictor = SamPredictor(m.model)
    predictor.set_image(np.asarray(IMG))
    masks, scores, _ = predictor.predict(box=np.array([8, 8, 56, 56]), multimask_output=True)
    assert masks.shape == (3, 64, 64) and scores.shape == (3,)


def _clip(m):
    image = m.model.encode_image(m.processor(IMG)[None])
    text = m.model.encode_text(m.tokenizer(["a red mug", "a chair"]))
    assert image.shape == (1, 32) and text.shape == (2, 32)


def _vision(m):
    out = m.model(**m.processor(images=[IMG, IMG], return_tensors="pt"))
    assert out.last_hidden_state[:, 0].shape == (2, 32)  # the CLS token the embedders take


def _inception(m):
    pixels = torch.from_numpy(np.array(IMG)).permute(2, 0, 1)[None].repeat(3, 1, 1, 1)
    features = m.model(pixels)  # uint8 images of any size, as torchmetrics passes them
    assert features.shape == (3, m.model.num_features) and features.dtype == torch.float32


def _captioner(m):
    proc = m.processor
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    ]
    text = proc.apply_chat_template(chat, add_generation_prompt=True)
    inputs = proc(text=[text, text], images=[IMG, IMG], return_tensors="pt", padding=True)
    out = m.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]


def _llm(m):
    tok = m.processor
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Scenes for a mug"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tok([text], return_tensors="pt")
    out = m.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


# One row per role: adding a role to the registry means adding its forward check here.
FORWARD = {
    "generator": _generator,
    "inpainter": _inpainter,
    "novel_view": _novel_view,
    "segmenter": _segmenter,
    "clip": _clip,
    "dino": _vision,
    "encoder": _vision,
    "captioner": _captioner,
    "llm": _llm,
    "eval_clip": _clip,
    "eval_dino": _vision,
    "inception": _inception,
}


def test_forward_table_covers_every_role():
    assert set(FORWARD) == set(ROLES)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert cli(["models", "make-tiny", str(out)]) == 0
    return out


@pytest.mark.parametrize("role", ROLES)
def test_role_loads_from_make_tiny_folder_and_runs(role, tiny_dir):
    cfg = load_config("tiny", overrides=[f"{role}.source={tiny_dir / role}"])
    loaded = models.load_role(cfg, role)
    assert loaded.role == role and loaded.family == models.ROLE_FAMILY[role]
    assert loaded.resolved.startswith(str(tiny_dir / role))
    with torch.no_grad():
        FORWARD[role](loaded)


def test_tiny_builds_are_deterministic(tmp_path):
    from ray_app import tiny

    a = tiny.build("dino", tmp_path / "a")
    b = tiny.build("dino", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_source_from_fsspec_uri_is_fetched_once(tiny_dir, tmp_path):
    fs, _ = storage.url_to_fs("memory://")
    for path in (tiny_dir / "dino").iterdir():
        fs.pipe_file(f"/models/dino/{path.name}", path.read_bytes())
    cfg = load_config(
        "tiny", overrides=["dino.source=memory://models/dino", f"cache_dir={tmp_path}"]
    )
    first = models.load_role(cfg, "dino")
    second = models.load_role(cfg, "dino")
    assert first.resolved == second.resolved and first.resolved.startswith(str(tmp_path))
    with torch.no_grad():
        _vision(first)


def test_hub_id_is_refused_offline():
    cfg = load_config("default", overrides=["offline=true"])
    with pytest.raises(
        RuntimeError,
        match=re.escape("dino.source='facebook/dinov2-base' is a hub id but offline=true"),
    ):
        models.load_role(cfg, "dino")


def test_a_vae_hub_id_is_refused_offline():
    cfg = load_config("tiny", overrides=["generator.vae.source=madebyollin/sdxl-vae-fp16-fix"])
    with pytest.raises(RuntimeError, match=re.escape("generator.vae.source='madebyollin/")):
        models.load_role(cfg, "generator")


def test_segmenter_refuses_a_hub_id():
    cfg = load_config("default", overrides=["segmenter.source=facebook/sam"])
    with pytest.raises(ValueError, match="checkpoint files"):
        models.load_role(cfg, "segmenter")


def test_missing_local_path_is_named():
    cfg = load_config("tiny", overrides=["clip.source=/no/such/dir"])
    with pytest.raises(FileNotFoundError, match=re.escape("clip.source='/no/such/dir'")):
        models.load_role(cfg, "clip")


NO_NETWORK = textwrap.dedent(
    """
    import json, socket, sys
    attempts = []
    def deny(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network disabled by the test")
    socket.socket.connect = deny
    socket.socket.connect_ex = deny
    socket.create_connection = deny
    socket.getaddrinfo = deny
    import torch
    from ray_app import models
    from ray_app.config import ROLES, load_config
    cfg = load_config("tiny")
    models.apply_environment(cfg.offline)
    for role in ROLES:
        loaded = models.load_role(cfg, role)
    with torch.no_grad():
        loaded = models.load_role(cfg, "generator")
        loaded.model(prompt="a mug", num_inference_steps=1, height=64, width=64)
    print(json.dumps(attempts))
    """
)


@pytest.mark.slow  # builds and loads every role in a fresh cache, in a subprocess
def test_tiny_profile_never_touches_the_network(tmp_path):
    env = {"RESTAGE_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", NO_NETWORK], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    attempts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert attempts == [], f"network attempts with the tiny profile: {attempts}"
    assert (tmp_path / "tiny").is_dir()  # the checkpoints were built, not downloaded


def _decode_dtypes(m) -> list[torch.dtype]:
    """The pipeline in float16 generates one image; -> the dtypes its VAE was moved to."""
    pipe = m.model.to(torch.float16)
    moves: list[torch.dtype] = []
    to = pipe.vae.to

    def record(*args, **kwargs):
        moves.extend(a for a in (*args, *kwargs.values()) if isinstance(a, torch.dtype))
        return to(*args, **kwargs)

    pipe.vae.to = record
    pipe(prompt="a mug", num_inference_steps=1, height=64, width=64, output_type="np")
    return moves


@pytest.mark.parametrize("role", VAE_ROLES)
def test_sdxl_roles_take_the_separate_fp16_safe_vae(role):
    from diffusers import AutoencoderKL

    cfg = load_config("tiny")
    m = models.load_role(cfg, role)
    folder = tiny.ensure(tiny.TINY_VAE, cfg.cache_path)
    assert cfg.role(role).vae is not None and m.extra["vae"] == str(folder)
    separate = AutoencoderKL.from_pretrained(folder)
    own = AutoencoderKL.from_pretrained(tiny.ensure(role, cfg.cache_path), subfolder="vae")
    assert m.model.vae.config.force_upcast is False and own.config.force_upcast is True
    assert torch.equal(m.model.vae.decoder.conv_out.weight, separate.decoder.conv_out.weight)
    # Like the fp16-fix VAE, the tiny one keeps the tiny generator's images: its weights are
    # the generator's own VAE's (and so not the inpainter's).
    generator_vae = AutoencoderKL.from_pretrained(
        tiny.ensure("generator", cfg.cache_path), subfolder="vae"
    )
    a, b = separate.state_dict(), generator_vae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:.*upcast_vae.*is deprecated")  # the own VAE's upcast
def test_a_float16_generator_decodes_in_float16_with_the_separate_vae():
    assert torch.float32 not in _decode_dtypes(models.load_role(load_config("tiny"), "generator"))
    # The checkpoint's own VAE (force_upcast true) is moved to float32 for the decode.
    own = models.load_role(load_config("tiny", overrides=["generator.vae=null"]), "generator")
    assert "vae" not in own.extra and torch.float32 in _decode_dtypes(own)


def test_only_sdxl_roles_take_a_vae():
    with pytest.raises(ConfigError, match=r"novel_view.vae='tiny': only generator and inpainter"):
        load_config("tiny", overrides=["novel_view.vae.source=tiny"])


def test_source_tag_names_the_separate_vae():
    cfg = load_config("default")
    generator = cfg.generator
    assert generator.vae is not None and not generator.revision and not generator.vae.revision
    assert models.source_tag(cfg, "generator") == f"{generator.source} vae={generator.vae.source}"
    assert models.source_tag(cfg, "clip") == cfg.clip.source
