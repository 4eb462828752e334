"""``personal_fidelity`` (``ray_app.kinds.Metric.PERSONAL_FIDELITY``): how much an image's
product looks like *this* product to the product's own encoder. The encoder is the
``encoder`` role with the product's LoRA from `restage personalize` (personalized
representations, arXiv 2412.16156). The metric is the mean cosine similarity of the image's
product crop to the crops of the product's real photos, both embedded by that encoder. It is
a judge that knows the exact product, sharper than generic CLIP or DINO similarity.

``PersonalEncoders`` loads the base encoder once and reads the products' LoRAs on demand
from a personalize output (``scoring.encoders``). The last ``cache`` products' LoRA tensors
stay in memory: about 1 MiB each at rank 16 on a ViT-B, so switching products costs a copy,
not a read. A product without an encoder gets no value (NaN, written as null), never a
stand-in score from another encoder. What the cache knows of a product (its LoRA, or that it
has none) is checked again against storage after ``recheck_s`` seconds, one small read of
the product's ``encoder.json``: a long-lived process (a serve replica) picks up an encoder
trained after it first asked, or trained again in place, within that time, and serves a
removed one no longer.

The crop: the mask's padded square (``ray_app.images.crop_by_mask``, as the segmented CLIP
and DINO metrics take it); the whole image when no mask is given; NaN when the mask is empty
(the product was not found). No ``ray`` here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from actors.encoder_trainer import ADAPTER, EncoderMeta, EncoderTrainer
from ray_app import storage
from ray_app.config import ModelSpec, PersonalizeConfig, ScoringConfig
from ray_app.images import crop_by_mask, decode_mask, decode_rgb
from ray_app.storage import EncoderLayout

# LoRA tensors of this many products stay in memory per process.
CACHE = 256
# Seconds a product's cached LoRA, or its having none, is trusted before storage is asked again.
RECHECK_S = 60.0


class _Cached(NamedTuple):
    lora: dict | None  # None: the product has no encoder
    meta: EncoderMeta | None
    checked: float  # time.monotonic() of the last look at storage


class PersonalEncoders:
    """The products' encoders of one `restage personalize` output, over one loaded base."""

    def __init__(
        self,
        model: ModelSpec,
        config: PersonalizeConfig,
        root: str,
        cache: int = CACHE,
        device: str | None = None,
        recheck_s: float = RECHECK_S,
    ):
        self.trainer = EncoderTrainer(model, config, device=device)
        self.layout = EncoderLayout(storage.normalize_uri(root))
        self.cache, self.recheck_s = cache, recheck_s
        self._loras: OrderedDict[str, _Cached] = OrderedDict()
        self._active: str | None = None  # the product whose LoRA is in the model
        self._lock = threading.Lock()  # one product's LoRA in the model at a time
        self.reads = 0

    def _lora(self, product_id: str) -> dict | None:
        now = time.monotonic()
        known = self._loras.get(product_id)
        if known is not None:
            self._loras.move_to_end(product_id)
            if now - known.checked < self.recheck_s:
                return known.lora
        folder = self.layout.encoder_dir(product_id)
        try:  # written last: the encoder is complete
            meta = EncoderMeta.read(folder)
        except FileNotFoundError:
            meta = None
        if known is not None and meta == known.meta:  # unchanged since it was read
            self._loras[product_id] = known._replace(checked=now)
            return known.lora
        lora = None
        if meta is not None:
            self._active = None  # the model's LoRA changes, whether or not the checks pass
            meta = self.trainer.load(folder)
            self._check(folder, meta)
            self._active, self.reads = product_id, self.reads + 1
            # copies: on CPU in float32 the state dict's tensors are the live parameters
            lora = {k: v.clone() for k, v in self.trainer.lora_state_dict().items()}
        self._loras[product_id] = _Cached(lora, meta, now)
        while len(self._loras) > self.cache:
            self._loras.popitem(last=False)
        return lora

    def _check(self, folder: str, meta: EncoderMeta) -> None:
        """``EncoderTrainer.load`` checks the LoRA's structure; the features must match too."""
        mine = (self.trainer.config.feature, self.trainer.resolution)
        if (meta.feature, meta.resolution) != mine:
            raise ValueError(
                f"{folder}: encoder trained with feature/resolution "
                f"{(meta.feature, meta.resolution)}, this scorer embeds with {mine}; set "
                "personalize.feature and personalize.resolution to the encoder's"
            )

    def has_encoder(self, product_id: str) -> bool:
        with self._lock:
            return self._lora(product_id) is not None

    def embed(
        self,
        product_id: str,
        images: Sequence[np.ndarray | None],
        masks: Sequence[np.ndarray | None],
    ) -> np.ndarray | None:
        """(n, d) L2-normalised features of the images' product crops under the product's
        encoder (NaN rows: no image, or an empty mask); None when it has no encoder."""
        crops = [
            None if rgb is None else rgb if mask is None else crop_by_mask(rgb, mask)
            for rgb, mask in zip(images, masks, strict=True)
        ]
        present = [i for i, c in enumerate(crops) if c is not None]
        with self._lock:
            lora = self._lora(product_id)
            if lora is None:
                return None
            if self._active != product_id:
                from peft.utils import set_peft_model_state_dict

                set_peft_model_state_dict(self.trainer.model, lora, adapter_name=ADAPTER)
                self._active = product_id
            features = self.trainer.embed([crops[i] for i in present])
        out = np.full((len(crops), self.trainer.dim), np.nan, np.float32)
        out[present] = features
        return out


def personal_encoders(
    scoring: ScoringConfig, personalize: PersonalizeConfig, model_spec: Callable[[str], ModelSpec]
) -> PersonalEncoders | None:
    """The encoders ``scoring.encoders`` names (``model_spec``: a role's spec by name,
    the config's ``model_spec``), or None when it is unset."""
    if scoring.encoders is None:
        return None
    return PersonalEncoders(model_spec("encoder"), personalize, scoring.encoders)


def decoded(
    images: Sequence[bytes | np.ndarray], masks: Sequence[bytes | np.ndarray | None]
) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    """Images and masks as arrays; an undecodable image becomes None (its scorer row carries
    the error from the other embedders)."""

    def rgb(x: bytes | np.ndarray) -> np.ndarray | None:
        if isinstance(x, np.ndarray):
            return x
        try:
            return decode_rgb(x)
        except Exception:
            return None

    def mask(x: bytes | np.ndarray | None) -> np.ndarray | None:
        if x is None or isinstance(x, np.ndarray):
            return x
        return decode_mask(x)

    return [rgb(x) for x in images], [mask(m) for m in masks]
