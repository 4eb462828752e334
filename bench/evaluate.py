"""Images per second of each evaluation backbone (roles eval_clip, eval_dino, inception) on
real-size architectures with random weights (the same FLOPs as the real checkpoints, which
cannot be downloaded here), through the actors `restage evaluate` runs, without Ray.

Each role is timed at its configured batch size and, as the baseline of the same run, one
image at a time; the metric each role serves is named. Run on the accelerator machine:

    python bench/evaluate.py --device cuda --images 512 --out bench/results/evaluate_h100.json

On CPU (a smoke run, not a throughput claim): --device cpu --images 16.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from bench.common import machine

# What each role scores in the evaluation.
ARCHITECTURES = {
    "eval_clip": "OpenAI CLIP ViT-B/32 (OpenCLIP)",
    "eval_dino": "DINO ViT-S/16 (transformers ViT)",
    "inception": "FID Inception-v3 (torch-fidelity)",
}
METRICS = {
    "eval_clip": "CLIP-I, CLIP-T, SegCLIP-I, SegCLIP-T",
    "eval_dino": "DINO, SegDINO",
    "inception": "FID, KID (features)",
}


def save_open_clip(dest: Path, arch: str, device: str = "cpu") -> Path:
    """A random-weight OpenCLIP ``arch`` (e.g. ViT-L-14) saved as the loader reads a local
    checkpoint: open_clip_config.json (model + OpenAI preprocessing) and the weights."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    dest.mkdir(parents=True)
    cfg = open_clip.get_model_config(arch)
    preprocess = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
    }
    (dest / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess})
    )
    with torch.device(device):
        model = open_clip.CLIP(**cfg)
    save_file(
        {k: v.contiguous().cpu() for k, v in model.state_dict().items()},
        dest / "open_clip_model.safetensors",
    )
    return dest


def real_size_checkpoints(folder: Path) -> dict[str, str]:
    """Random-weight checkpoints of the default profile's evaluation architectures, saved in
    each library's own format: OpenAI CLIP ViT-B/32 (OpenCLIP), DINO ViT-S/16 (transformers
    ViT), the FID Inception-v3 (torch-fidelity's module). -> {role: source folder or file}."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    clip_dir = save_open_clip(folder / "eval_clip", "ViT-B-32")

    dino_dir = folder / "eval_dino"
    ViTModel(
        ViTConfig(
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            intermediate_size=1536,
            image_size=224,
            patch_size=16,
        ),
        add_pooling_layer=False,
    ).save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(dino_dir)

    # torch-fidelity builds the network, then loads its weights file: build it with the
    # load skipped, and save its random weights as such a file.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with (
        mock.patch("torch.load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
    ):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "random.pth")
    inception = folder / "inception.pth"
    torch.save(net.state_dict(), inception)
    return {"eval_clip": str(clip_dir), "eval_dino": str(dino_dir), "inception": str(inception)}


def _images(n: int, side: int) -> list[bytes]:
    from ray_app.images import encode_png

    rng = np.random.default_rng(0)
    return [encode_png(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _actor(role: str, spec):
    if role == "inception":
        from actors.inception import InceptionFeatures

        return InceptionFeatures(spec)
    if role == "eval_clip":
        from actors.clip import ClipEmbedder

        return ClipEmbedder(spec)
    from actors.dino import DinoEmbedder

    return DinoEmbedder(spec)


def time_role(actor, images: list[bytes], batch: int) -> float:
    """Images per second through the actor's own call, ``batch`` images a call (one warm-up
    call first; on CUDA, synchronised)."""
    import torch

    def call(chunk):
        data = {"image": np.array(chunk, dtype=object)}
        if hasattr(actor, "embed_texts"):  # CLIP-T embeds the prompt beside the image
            data["text"] = np.array(["a photo of a backpack in the snow"] * len(chunk), object)
        out = actor(data)
        assert all(e is None for e in out["error"]), out["error"]

    call(images[:batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        call(images[i : i + batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=1024, help="generated image side (px)")
    parser.add_argument("--dtype", default="float16", help="eval_clip/eval_dino dtype")
    parser.add_argument("--out", default="bench/results/evaluate.json")
    args = parser.parse_args()

    from ray_app.config import load_config

    images = _images(args.images, args.side)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sources = real_size_checkpoints(Path(tmp))
        overrides = [f"{r}.source={s}" for r, s in sources.items()]
        overrides += [f"{r}.device={args.device}" for r in sources]
        overrides += [f"{r}.dtype={args.dtype}" for r in ("eval_clip", "eval_dino")]
        cfg = load_config("default", overrides=[*overrides, "offline=true"])
        for role in sources:
            spec = cfg.model_spec(role)
            actor = _actor(role, spec)
            batched = time_role(actor, images, spec.batch_size)
            single = time_role(actor, images[: max(4, len(images) // 8)], 1)
            results[role] = {
                "metrics": METRICS[role],
                "architecture": ARCHITECTURES[role],
                "batch_size": spec.batch_size,
                "images_per_second": round(batched, 2),
                "baseline_one_at_a_time": round(single, 2),
                "speedup": round(batched / single, 2),
            }
            print(role, results[role], flush=True)
    out = {
        "bench": "evaluate",
        "images": args.images,
        "side": args.side,
        "dtype": args.dtype,
        "machine": machine(args.device),
        "weights": "random (real-size architectures: OpenAI CLIP ViT-B/32, DINO ViT-S/16, "
        "FID Inception-v3)",
        "roles": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
