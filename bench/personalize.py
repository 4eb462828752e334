"""Per-product encoders (`restage personalize`, issue 16): seconds per product for data
synthesis (cut-and-paste positives, ray_app/cutpaste.py) and for training the encoder LoRA
(actors/encoder_trainer.py), and what the training buys: held-out retrieval AP of each
DreamBooth product's encoder against the pretrained encoder, in one run (the pretrained
encoder is the baseline: same photos, same gallery, the LoRA off).

    python bench/personalize.py                                  # tiny profile, CPU
    python bench/personalize.py --size base --device cuda        # DINOv2-B/14, random weights

Retrieval: each of the 10 products of ../shared/data/dreambooth trains on 3 of its photos
(positives) against the other 9 products' 3 (negatives); the gallery is every product's
remaining photos; a gallery photo's score is its best cosine similarity to the product's 3.
``--splits`` rotates which photos are held out. ``--size base`` builds DINOv2-B/14's
architecture with random weights (no download), at 224 px and the paper's defaults: its
seconds are real ones, its AP is not a pretrained encoder's.
Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from actors.encoder_trainer import EncoderTrainer  # noqa: E402
from bench.common import machine  # noqa: E402
from ray_app.config import CutPasteConfig, load_config  # noqa: E402
from ray_app.cutpaste import cut_paste  # noqa: E402
from ray_app.personal_retrieval import product_retrieval  # noqa: E402

DREAMBOOTH = ROOT.parent / "shared" / "data" / "dreambooth"


def photos(side: int, root: Path = DREAMBOOTH) -> dict[str, list[np.ndarray]]:
    """Each DreamBooth product's photos, the longer side at most ``side``."""
    out = {}
    for line in (root / "products.jsonl").read_text().splitlines():
        rec = json.loads(line)
        imgs = []
        for uri in rec["image_uris"]:
            img = Image.open(root / uri).convert("RGB")
            img.thumbnail((side, side))
            imgs.append(np.asarray(img))
        out[rec["product_id"]] = imgs
    return out


def dinov2_base(dest: Path) -> str:
    """DINOv2-B/14's architecture with random weights, saved where the loader reads it."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    Dinov2Model(
        Dinov2Config(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=14,
            image_size=518,
        )
    ).save_pretrained(dest)
    BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(dest)
    return str(dest)


def synthesis_seconds(pics: dict[str, list[np.ndarray]], per_product: int) -> dict:
    """Seconds to make ``per_product`` cut-and-paste positives of one product (its first
    photo, a centred elliptic mask, on the other products' photos as backgrounds)."""
    config, rng = CutPasteConfig(), np.random.default_rng(0)
    times = []
    for pid, imgs in pics.items():
        product = imgs[0]
        h, w = product.shape[:2]
        yy, xx = np.mgrid[:h, :w]
        mask = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 <= 1
        backgrounds = [img for other, v in pics.items() if other != pid for img in v]
        start = time.perf_counter()
        for i in range(per_product):
            cut_paste(product, mask, backgrounds[i % len(backgrounds)], rng, config)
        times.append(time.perf_counter() - start)
    return {"images_per_product": per_product, "seconds_per_product": float(np.mean(times))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--pastes", type=int, default=450, help="cut-and-paste images per product")
    ap.add_argument(
        "--train-products",
        type=int,
        default=None,
        help="train the first N products' encoders only (the gallery and negatives keep all "
        "10): bounds a GPU run's time",
    )
    ap.add_argument("--set", action="append", default=[], help="config overrides (personalize.*)")
    ap.add_argument("--photos", type=Path, default=DREAMBOOTH, help="the DreamBooth folder")
    ap.add_argument("--out", type=Path, default=None, help="JSON path [bench/results/...]")
    args = ap.parse_args()
    if not (args.photos / "products.jsonl").exists():
        sys.exit(f"--photos {args.photos}: no products.jsonl; the DreamBooth photos are needed")

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"encoder.device={args.device}", *args.set]
        if args.size == "base":
            # the default profile's encoder settings (the paper's), on a random DINOv2-B/14
            base = dinov2_base(Path(tmp) / "dinov2-base")
            config = load_config(
                "tiny",
                overrides=[
                    f"encoder.source={base}",
                    "personalize.rank=16",
                    "personalize.resolution=224",
                    "personalize.pairs=4500",
                    "personalize.positives=450",
                    "personalize.negatives=1000",
                    "personalize.batch_size=16",
                    "personalize.negatives_per_step=64",
                    "personalize.learning_rate=1e-4",
                    *overrides,
                ],
            )
        else:
            config = load_config("tiny", overrides=overrides)
        trainer = EncoderTrainer(
            config.model_spec("encoder"), config.personalize, device=args.device
        )
        pics = photos(256, args.photos)
        synthesis = synthesis_seconds(pics, args.pastes)
        rows, seconds, steps = [], [], 0
        for split in range(args.splits):
            rot = {k: v[split % len(v) :] + v[: split % len(v)] for k, v in pics.items()}
            train = {k: v[:3] for k, v in rot.items()}
            gallery = [img for v in rot.values() for img in v[3:]]
            gallery_ids = [k for k, v in rot.items() for _ in v[3:]]
            pretrained = trainer.embed(gallery, personal=False)
            for i, pid in enumerate(list(rot)[: args.train_products]):
                negatives = [img for k, v in train.items() if k != pid for img in v]
                result = trainer.train(train[pid], negatives, seed=i)
                seconds.append(result.seconds)
                steps = result.steps
                before = product_retrieval(
                    pid, trainer.embed(train[pid], personal=False), pretrained, gallery_ids
                )
                after = product_retrieval(
                    pid, trainer.embed(train[pid]), trainer.embed(gallery), gallery_ids
                )
                rows.append(
                    {
                        "split": split,
                        "product_id": pid,
                        "ap_pretrained": before.average_precision,
                        "ap_personal": after.average_precision,
                        "loss_first": float(np.mean(result.losses[:10])),
                        "loss_last": float(np.mean(result.losses[-10:])),
                    }
                )
                print(
                    f"split {split} {pid:18s} AP {before.average_precision:.3f} -> "
                    f"{after.average_precision:.3f}  {result.seconds:.1f}s",
                    flush=True,
                )

    per_split = []
    for split in range(args.splits):
        part = [r for r in rows if r["split"] == split]
        per_split.append(
            {
                "split": split,
                "map_pretrained": float(np.mean([r["ap_pretrained"] for r in part])),
                "map_personal": float(np.mean([r["ap_personal"] for r in part])),
                "products_better": sum(r["ap_personal"] > r["ap_pretrained"] for r in part),
                "products_worse": sum(r["ap_personal"] < r["ap_pretrained"] for r in part),
                "products_trained": len(part),
            }
        )
    out = {
        "bench": "personalize",
        "size": args.size,
        "machine": machine(args.device),
        "personalize": config.personalize.model_dump(mode="json"),
        "synthesis": synthesis,
        "train": {
            "seconds_per_product": float(np.mean(seconds)),
            "steps_per_product": steps,
            "seconds_per_step": float(np.mean(seconds)) / steps,
        },
        "retrieval": per_split,
        "products": rows,
    }
    dest = args.out or (
        ROOT / "bench" / "results" / f"personalize_{args.size}_{args.device.split(':')[0]}.json"
    )
    dest.write_text(json.dumps(out, indent=2) + "\n")
    for s in per_split:
        print(
            f"split {s['split']}: mAP {s['map_pretrained']:.3f} -> {s['map_personal']:.3f} "
            f"({s['products_better']} better, {s['products_worse']} worse of {s['products_trained']})"
        )
    print(
        f"synthesis {synthesis['seconds_per_product']:.2f} s / product "
        f"({args.pastes} pastes); training {out['train']['seconds_per_product']:.2f} s / product "
        f"({steps} steps) -> {dest}"
    )


if __name__ == "__main__":
    main()
