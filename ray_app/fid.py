"""FID and KID of a run's images against the real photos, with torchmetrics' implementations,
from Inception features computed once per image (role ``inception``, actors/inception.py).

The features are computed in the evaluation's actor pool, so the metrics here see features,
not images: torchmetrics is given an identity "feature extractor" (``Precomputed``), and its
own states do the accounting. They are accumulated per block of features and merged
(``merge_state``): FID keeps running sums (count, sum, sum of outer products), so every
image counts at any scale; KID keeps the feature vectors themselves, so each side keeps a
seeded sample of at most ``kid_max_images`` (chosen by a hash of the image id: the same
images whichever block they arrive in).
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


class Precomputed(nn.Module):
    """torchmetrics' feature-extractor slot for features computed elsewhere: identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def in_kid_sample(image_id: str, rate: float) -> bool:
    """Whether an image is in KID's sample at ``rate`` (a deterministic draw by its id)."""
    if rate >= 1:
        return True
    draw = int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "big")
    return draw / 2**64 < rate


class SideFeatures:
    """One side's features (a run's images, or the references), mergeable across blocks:
    a torchmetrics FID state (as its "fake" side for a run, "real" for references) and a
    KID state holding the sampled vectors."""

    def __init__(self, num_features: int, real: bool):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.real = real
        self.fid = FrechetInceptionDistance(feature=Precomputed(num_features))
        with warnings.catch_warnings():  # "saves all features": the sample is bounded here
            warnings.simplefilter("ignore", UserWarning)
            self.kid = KernelInceptionDistance(feature=Precomputed(num_features))
        self.n = 0

    def add(self, features: np.ndarray, image_ids: list[str], kid_rate: float) -> None:
        if len(features) == 0:
            return
        x = torch.from_numpy(np.asarray(features, np.float32))
        self.fid.update(x, real=self.real)
        sampled = [i for i, image_id in enumerate(image_ids) if in_kid_sample(image_id, kid_rate)]
        if sampled:
            self.kid.update(x[sampled], real=self.real)
        self.n += len(x)

    def merge(self, other: SideFeatures) -> None:
        self.fid.merge_state(other.fid)
        self.kid.merge_state(other.kid)
        self.n += other.n

    @property
    def kid_count(self) -> int:
        held = self.kid.real_features if self.real else self.kid.fake_features
        return sum(len(t) for t in held)


@dataclass(frozen=True)
class Distribution:
    """FID and KID of one run against the references, with the images on each side; when
    refused, ``refused`` says why and the metrics are None."""

    fid: float | None
    kid_mean: float | None
    kid_std: float | None
    n_generated: int
    n_reference: int
    kid_subset_size: int | None = None
    refused: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def distribution(
    run: SideFeatures,
    references: SideFeatures,
    *,
    min_images: int,
    kid_subset_size: int,
    kid_subsets: int,
    seed: int = 0,
) -> Distribution:
    """FID and KID of ``run`` against ``references`` (torchmetrics), or the refusal."""
    n_gen, n_ref = run.n, references.n
    if min(n_gen, n_ref) < max(min_images, 2):
        return Distribution(
            None,
            None,
            None,
            n_gen,
            n_ref,
            refused=f"too few images for FID/KID: {n_gen} generated and {n_ref} reference "
            f"(each side needs evaluate.min_fid_images={min_images}); evaluate more products "
            "or images, or lower evaluate.min_fid_images knowing that both metrics are "
            "biased at small sizes",
        )
    # Both sides in one metric: the references' states (which saw an update) plus the run's.
    fid = copy.deepcopy(references.fid)
    fid.merge_state(run.fid)
    subset = min(kid_subset_size, run.kid_count, references.kid_count)
    kid = copy.deepcopy(references.kid)
    kid.merge_state(run.kid)
    kid.subset_size, kid.subsets = subset, kid_subsets
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID draws its subsets with torch's global generator
        fid_value = float(fid.compute())
        kid_mean, kid_std = (float(v) for v in kid.compute()) if subset >= 2 else (None, None)
    if fid_value != fid_value or math.isinf(fid_value):  # a degenerate covariance
        fid_value = None
    return Distribution(fid_value, kid_mean, kid_std, n_gen, n_ref, subset)
