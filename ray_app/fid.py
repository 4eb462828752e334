"""FID and KID of a run's images against the real photos, with torchmetrics' implementations,
from Inception features computed once per image (role ``inception``, actors/inception.py).

The features are computed in the evaluation's actor pool, so the metrics here see features,
not images: torchmetrics is given an identity "feature extractor" (``Precomputed``), and its
own states do the accounting. They are accumulated per block of features and merged
(``merge_state``): FID keeps running sums (count, sum, sum of outer products), so every
image counts at any scale; KID keeps the feature vectors themselves, so each side keeps a
seeded sample of at most ``kid_max_images`` (chosen by a hash of the image id: the same
images whichever block they arrive in).

Jobs keep features as Parquet shards (``FEATURES_SCHEMA``: side, image id, vector);
``merge_sides`` folds a folder of them into one state per side in Ray Data tasks. A side
that other runs are compared with many times (the staged-catalog index's scenes) is saved
once as its merged state (``save_side``, ``load_side``): the sums FID needs and KID's sample.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import pickle
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
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


# torchmetrics' states of each side (True: the references, its "real" images).
STATE_NAMES = {
    True: ("real_features_sum", "real_features_cov_sum", "real_features_num_samples",
           "real_features"),
    False: ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples",
            "fake_features"),
}  # fmt: skip


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

    @property
    def num_features(self) -> int:
        return int(self.fid.real_features_sum.numel())

    def _names(self) -> tuple[str, str, str, str]:
        """This side's torchmetrics state names: FID's sum, covariance sum, count; KID's list."""
        return STATE_NAMES[self.real]

    def state_arrays(self) -> dict[str, np.ndarray]:
        """This side's FID sums and KID sample as arrays (``save_side``)."""
        total, cov, count, vectors = self._names()
        held = getattr(self.kid, vectors)
        kid = torch.cat(held) if held else torch.zeros((0, self.num_features))
        return {
            "is_reference": np.asarray(self.real),
            "n": np.asarray(self.n),
            "fid_sum": getattr(self.fid, total).numpy(),
            "fid_cov_sum": getattr(self.fid, cov).numpy(),
            "fid_count": getattr(self.fid, count).numpy(),
            "kid_features": kid.numpy(),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SideFeatures:
        out = cls(int(arrays["fid_sum"].shape[0]), real=bool(arrays["is_reference"]))
        total, cov, count, vectors = out._names()
        setattr(out.fid, total, torch.from_numpy(arrays["fid_sum"]))
        setattr(out.fid, cov, torch.from_numpy(arrays["fid_cov_sum"]))
        setattr(out.fid, count, torch.from_numpy(arrays["fid_count"]))
        out.fid._update_count = 1  # it has seen data: compute() must not warn and refuse
        out.fid.orig_dtype = torch.float32  # set by update(): the dtype add() gives it
        kid = torch.from_numpy(arrays["kid_features"])
        if len(kid):
            getattr(out.kid, vectors).append(kid)
            out.kid._update_count = 1
        out.n = int(arrays["n"])
        return out


def save_side(side: SideFeatures, uri: str) -> None:
    """``side``'s merged state to ``uri`` (an .npz): FID's sums (2048 + 2048² float64, 34 MB
    for Inception) and KID's sample, whatever the number of images behind them."""
    from ray_app import storage

    buffer = io.BytesIO()
    np.savez(buffer, **side.state_arrays())
    storage.write_bytes(uri, buffer.getvalue())


def load_side(uri: str) -> SideFeatures:
    from ray_app import storage

    with np.load(io.BytesIO(storage.read_bytes(uri))) as arrays:
        return SideFeatures.from_arrays(dict(arrays))


def side_partials(
    batch: pa.Table, rates: dict[str, float], real_sides: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """A Ray Data task over a block of ``FEATURES_SCHEMA`` rows: one mergeable state per
    side in it (pickled). ``rates``: each side's KID sampling rate (default 1)."""
    from ray_app.batching import object_array

    sides: dict[str, SideFeatures] = {}
    names, ids = batch["side"].to_pylist(), batch["image_id"].to_pylist()
    vectors = batch["features"].to_pylist()
    num_features = len(vectors[0]) if vectors else 1
    for name in set(names):
        rows = [i for i, s in enumerate(names) if s == name]
        acc = sides[name] = SideFeatures(num_features, real=name in real_sides)
        acc.add(
            np.asarray([vectors[i] for i in rows], np.float32),
            [f"{name}/{ids[i]}" for i in rows],
            rates.get(name, 1.0),
        )
    return {
        "side": object_array(list(sides)),
        "state": object_array([pickle.dumps(s) for s in sides.values()]),
    }


def count_features(features_dir: str) -> int:
    """Feature rows under ``features_dir`` (from the shards' Parquet footers), 0 if none."""
    import ray

    from ray_app import storage
    from ray_app.records import FEATURES_SCHEMA
    from ray_app.storage import pyarrow_fs

    if not storage.exists(features_dir):
        return 0
    fs, path = pyarrow_fs(features_dir)
    return int(ray.data.read_parquet(path, filesystem=fs, schema=FEATURES_SCHEMA).count())


def merge_sides(
    features_dir: str,
    rates: dict[str, float],
    real_sides: tuple[str, ...],
    num_cpus: float = 1,
) -> dict[str, SideFeatures]:
    """Every side's merged state over the feature shards under ``features_dir``: per-block
    states in Ray Data tasks, merged here one block's state at a time. {} when there are
    no shards."""
    import ray

    from ray_app import storage
    from ray_app.records import FEATURES_SCHEMA
    from ray_app.storage import pyarrow_fs

    merged: dict[str, SideFeatures] = {}
    if not storage.exists(features_dir):
        return merged
    fs, path = pyarrow_fs(features_dir)
    ds = ray.data.read_parquet(path, filesystem=fs, schema=FEATURES_SCHEMA)
    parts = ds.map_batches(
        side_partials,
        fn_kwargs={"rates": rates, "real_sides": real_sides},
        batch_size=4096,
        batch_format="pyarrow",
        num_cpus=num_cpus,
    )
    for batch in parts.iter_batches(batch_size=1, batch_format="numpy"):
        for name, blob in zip(batch["side"], batch["state"], strict=True):
            state: Any = pickle.loads(blob)
            if str(name) in merged:
                merged[str(name)].merge(state)
            else:
                merged[str(name)] = state
    return merged


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


def _canonical(held: list[torch.Tensor]) -> list[torch.Tensor]:
    """KID's sampled vectors as one tensor in an order of their own contents."""
    if not held:
        return held
    x = torch.cat(held)
    keys = [hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in x.numpy()]
    return [x[sorted(range(len(keys)), key=keys.__getitem__)]]


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
    # KID's subsets are drawn by position: put each side in one order whatever the order
    # its blocks were merged in (merge_state puts the incoming block first).
    kid.real_features = _canonical(kid.real_features)
    kid.fake_features = _canonical(kid.fake_features)
    kid.subset_size, kid.subsets = subset, kid_subsets
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID draws its subsets with torch's global generator
        fid_value = float(fid.compute())
        kid_mean, kid_std = (float(v) for v in kid.compute()) if subset >= 2 else (None, None)
    if fid_value != fid_value or math.isinf(fid_value):  # a degenerate covariance
        fid_value = None
    return Distribution(fid_value, kid_mean, kid_std, n_gen, n_ref, subset)
