"""Fidelity scores of images against a product's real images (roles ``clip``, ``dino`` and,
optionally, ``segmenter``): CLIP-T against the prompt, CLIP-I and DINO against the real
images, their segmented variants on product crops, and one ``score`` per image from a
``Ranking`` (ray_app/ranking.py): the weighted mean of the normalised metrics that orders
training samples (augment), or ``generate.ranking`` for generations (generate) and served
images (serve). One class, so that all of them score alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.clip import ClipEmbedder
from actors.dino import DinoEmbedder
from actors.personal_fidelity import PersonalEncoders, decoded
from ray_app import storage
from ray_app.adapter_meta import AdapterMeta
from ray_app.batching import object_array
from ray_app.config import ModelSpec, SegmentConfig
from ray_app.images import encode_png
from ray_app.kinds import Metric, SampleKind
from ray_app.metrics import mean_similarity
from ray_app.ranking import Ranking, WeightedMean
from ray_app.records import SAMPLE_SCHEMA


@dataclass(frozen=True)
class ReferenceEmbeddings:
    """CLIP and DINO embeddings of a product's real images, whole and cropped by their
    masks: computed once by ``Scorer.embed_references`` and reused for every image scored
    against the product (the server scores each request against the same references)."""

    clip_image: np.ndarray
    clip_crop: np.ndarray
    dino_image: np.ndarray
    dino_crop: np.ndarray
    # under the product's own encoder (personal_fidelity): None without one
    product_id: str | None = None
    personal: np.ndarray | None = None


@dataclass(frozen=True)
class ScoringOptions:
    """How the metrics make the ``score``: ``ranking`` when given (generate and serve pass
    ``generate.ranking``'s), else the weighted mean of each metric's raw ``ranges`` (mapped
    onto [0, 1], ``scoring.ranges``) with its weight (a job's ``weights``)."""

    weights: Mapping[Metric, float]
    ranges: Mapping[Metric, tuple[float, float]]
    ranking: Ranking | None = None


class Scorer:
    """Scores images against reference images with the ``clip`` and ``dino`` roles; with a
    ``segmenter`` (and its ``segmentation`` options) it segments images given without
    masks; with ``personal`` encoders (actors/personal_fidelity.py) it adds
    ``personal_fidelity`` for products that have one."""

    def __init__(
        self,
        clip: ModelSpec,
        dino: ModelSpec,
        options: ScoringOptions,
        segmenter: ModelSpec | None = None,
        segmentation: SegmentConfig | None = None,
        personal: PersonalEncoders | None = None,
    ):
        if (segmenter is None) != (segmentation is None):
            raise ValueError(
                "segmenter and segmentation: give both (to segment images that come without "
                "masks) or neither"
            )
        self.clip = ClipEmbedder(clip)
        self.dino = DinoEmbedder(dino)
        self.segmenter = None
        if segmenter is not None:
            from actors.segmenter import Segmenter

            self.segmenter = Segmenter(segmenter, segmentation)
        self.personal = personal
        self.ranking = options.ranking or WeightedMean(options.weights, options.ranges)

    def embed_references(
        self,
        references: Sequence[bytes],
        masks: Sequence[bytes | None],
        product_id: str | None = None,
    ) -> ReferenceEmbeddings:
        """Embeds a product's real images (and their crops by ``masks``) once; with
        ``product_id`` and personal encoders, under the product's own encoder too."""
        batch = {"image": object_array(list(references)), "mask": object_array(list(masks))}
        clip, dino = self.clip(dict(batch)), self.dino(dict(batch))
        personal = None
        if self.personal is not None and product_id is not None:
            personal = self.personal.embed(product_id, *decoded(references, masks))
        return ReferenceEmbeddings(
            clip_image=clip["image_embedding"],
            clip_crop=clip["crop_embedding"],
            dino_image=dino["image_embedding"],
            dino_crop=dino["crop_embedding"],
            product_id=product_id,
            personal=personal,
        )

    def _personal_fidelity(
        self,
        ref: ReferenceEmbeddings,
        data: list[bytes],
        masks: list[bytes | None],
        exclude: np.ndarray | None,
    ) -> np.ndarray:
        """Each image's product crop against the real photos' under the product's encoder;
        NaN for every image when the product has none."""
        if ref.personal is None or self.personal is None or ref.product_id is None:
            return np.full(len(data), np.nan, np.float32)
        features = self.personal.embed(ref.product_id, *decoded(data, masks))
        if features is None:  # the encoder went away since the references were embedded
            return np.full(len(data), np.nan, np.float32)
        return mean_similarity(features, ref.personal, exclude)

    def score(
        self,
        images: Sequence[np.ndarray | bytes],
        prompts: Sequence[str | None],
        references: Sequence[bytes] | ReferenceEmbeddings,
        reference_masks: Sequence[bytes | None] | None = None,
        masks: Sequence[bytes | None] | None = None,
        exclude_self: Sequence[int] | None = None,
        product_id: str | None = None,
    ) -> dict[str, Any]:
        """-> one float32 array per metric, ``score`` (the ranking's; NaN when unscorable),
        ``mask`` (the masks used) and ``error`` (per image). ``references`` are the real
        images (with ``reference_masks``) or their ``embed_references``. Without ``masks``
        and with a segmenter, the images are segmented first. ``exclude_self[i] = j`` leaves
        reference ``j`` out of image ``i``'s comparisons (a real image is not compared with
        itself). ``product_id`` names whose personal encoder scores ``personal_fidelity``
        (for ``references`` given as images; embedded ones carry it)."""
        if not isinstance(references, ReferenceEmbeddings):
            if reference_masks is None:
                raise ValueError(
                    "reference_masks: pass one mask (or None) per reference image, "
                    "or pass references as Scorer.embed_references(...)"
                )
            references = self.embed_references(references, reference_masks, product_id)
        n = len(images)
        data = [img if isinstance(img, bytes) else encode_png(img) for img in images]
        if masks is None and self.segmenter is not None and n:
            masks = list(self.segmenter({"image": object_array(data)})["mask"])
        masks = list(masks) if masks is not None else [None] * n
        if n == 0:
            return {
                **{m: np.zeros(0, np.float32) for m in Metric},
                "score": np.zeros(0, np.float32),
                "mask": [],
                "error": [],
            }
        gen_clip = self.clip(
            {
                "image": object_array(data),
                "mask": object_array(masks),
                "text": object_array(list(prompts)),
            }
        )
        gen_dino = self.dino({"image": object_array(data), "mask": object_array(masks)})
        ref = references
        exclude = np.asarray(exclude_self, dtype=np.int64) if exclude_self is not None else None
        metrics = {
            Metric.CLIP_I: mean_similarity(gen_clip["image_embedding"], ref.clip_image, exclude),
            Metric.SEG_CLIP_I: mean_similarity(gen_clip["crop_embedding"], ref.clip_crop, exclude),
            Metric.DINO: mean_similarity(gen_dino["image_embedding"], ref.dino_image, exclude),
            Metric.SEG_DINO: mean_similarity(gen_dino["crop_embedding"], ref.dino_crop, exclude),
            # NaN where the text or the image could not be embedded
            Metric.CLIP_T: np.einsum(
                "nd,nd->n", gen_clip["image_embedding"], gen_clip["text_embedding"]
            ).astype(np.float32),
            # the product crop against the prompt: NaN without a mask
            Metric.SEG_CLIP_T: np.einsum(
                "nd,nd->n", gen_clip["crop_embedding"], gen_clip["text_embedding"]
            ).astype(np.float32),
            Metric.PERSONAL_FIDELITY: self._personal_fidelity(ref, data, masks, exclude),
        }
        errors = [a or b for a, b in zip(gen_clip["error"], gen_dino["error"], strict=True)]
        return {
            **metrics,
            "score": self.ranking.score(metrics),
            "mask": masks,
            "error": errors,
        }


def references(meta: AdapterMeta) -> tuple[list[bytes], list[bytes | None]]:
    """A product's real images and their masks, from the training set named in its
    adapter's metadata."""
    shard = meta.training_set.manifest_shard
    rows = storage.read_parquet(shard, schema=SAMPLE_SCHEMA).to_pylist()
    rows = sorted(
        (r for r in rows if r["kind"] == SampleKind.REAL and r["product_id"] == meta.product_id),
        key=lambda r: r["sample_id"],
    )
    images = [storage.read_bytes(r["image_uri"]) for r in rows]
    masks = [storage.read_bytes(r["mask_uri"]) if r["mask_uri"] else None for r in rows]
    return images, masks
