"""FID and KID of a run's images against the real photos, with torchmetrics' implementations,
from Inception features computed once per image (role ``inception``, actors/inception.py).

The features are computed in the evaluation's actor pool, so the metrics here see features,
not images. They are accumulated per block of features as the states torchmetrics keeps,
in plain arrays (``SideFeatures``), and merged: FID keeps running sums (count, sum, sum of
outer products), so every image counts at any scale; KID keeps the feature vectors
themselves, so each side keeps a seeded sample of at most ``kid_max_images`` (chosen by a
hash of the image id: the same images whichever block they arrive in). Only the final
measure (``distribution``) loads torchmetrics: its FID and KID, given an identity "feature
extractor" (``Precomputed``), are handed the merged states and compute.

Jobs keep features as Parquet shards (``FEATURES_SCHEMA``: side, image id, vector);
``merge_sides`` folds a folder of them into one state per side in Ray Data tasks. A side
that other runs are compared with many times (the staged-catalog index's scenes) is saved
once as its merged state (``save_side``, ``load_side``): the sums FID needs and KID's sample.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa


def in_kid_sample(image_id: str, rate: float) -> bool:
    """Whether an image is in KID's sample at ``rate`` (a deterministic draw by its id)."""
    if rate >= 1:
        return True
    draw = int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "big")
    return draw / 2**64 < rate


class SideFeatures:
    """One side's features (a run's images, or the references), mergeable across blocks:
    FID's running sums (count, sum, sum of outer products, in float64 as torchmetrics keeps
    them) and KID's sampled vectors. Plain arrays: the Ray Data tasks that sum a block of
    features, and the drivers that merge and save the sums, import neither torch nor
    torchmetrics (~6 s of CPU in each process); ``distribution`` hands the merged sums to
    torchmetrics' metrics."""

    def __init__(self, num_features: int, real: bool):
        self.real = real
        self.total = np.zeros(num_features, np.float64)
        self.outer = np.zeros((num_features, num_features), np.float64)
        self.kid: list[np.ndarray] = []  # the sampled vectors, float32
        self.n = 0

    def add(self, features: np.ndarray, image_ids: list[str], kid_rate: float) -> None:
        if len(features) == 0:
            return
        x = np.asarray(features, np.float32)
        wide = x.astype(np.float64)  # as torchmetrics' update: the sums in double
        self.total += wide.sum(axis=0)
        self.outer += wide.T @ wide
        sampled = [i for i, image_id in enumerate(image_ids) if in_kid_sample(image_id, kid_rate)]
        if sampled:
            self.kid.append(x[sampled])
        self.n += len(x)

    def merge(self, other: SideFeatures) -> None:
        self.total += other.total
        self.outer += other.outer
        self.kid.extend(other.kid)
        self.n += other.n

    @property
    def kid_count(self) -> int:
        return sum(len(v) for v in self.kid)

    @property
    def num_features(self) -> int:
        return int(self.total.shape[0])

    def kid_vectors(self) -> np.ndarray:
        """KID's sample as one array, in an order of the vectors' own contents: KID draws
        its subsets by position, and blocks merge in any order."""
        if not self.kid:
            return np.zeros((0, self.num_features), np.float32)
        x = np.concatenate(self.kid)
        keys = [hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in x]
        return x[sorted(range(len(keys)), key=keys.__getitem__)]

    def state_arrays(self) -> dict[str, np.ndarray]:
        """This side's FID sums and KID sample as arrays (``save_side``)."""
        return {
            "is_reference": np.asarray(self.real),
            "n": np.asarray(self.n),
            "fid_sum": self.total,
            "fid_cov_sum": self.outer,
            "fid_count": np.asarray(self.n),
            "kid_features": self.kid_vectors(),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SideFeatures:
        out = cls(int(arrays["fid_sum"].shape[0]), real=bool(arrays["is_reference"]))
        out.total = np.asarray(arrays["fid_sum"], np.float64)
        out.outer = np.asarray(arrays["fid_cov_sum"], np.float64)
        kid = np.asarray(arrays["kid_features"], np.float32)
        out.kid = [kid] if len(kid) else []
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


def _metrics(run: SideFeatures, references: SideFeatures, subset: int, subsets: int) -> tuple:
    """torchmetrics' FID and KID holding both sides' merged states (the references as their
    "real" images, the run as "fake"), ready to compute."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    class Precomputed(torch.nn.Module):
        """torchmetrics' feature-extractor slot for features computed elsewhere: identity."""

        num_features = references.num_features

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return features

    fid = FrechetInceptionDistance(feature=Precomputed())
    with warnings.catch_warnings():  # "saves all features": the sample is bounded here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=Precomputed(), subsets=subsets, subset_size=subset)
    for side, states in ((references, "real_features"), (run, "fake_features")):
        setattr(fid, f"{states}_sum", torch.from_numpy(side.total))
        setattr(fid, f"{states}_cov_sum", torch.from_numpy(side.outer))
        setattr(fid, f"{states}_num_samples", torch.tensor(side.n))
        setattr(kid, states, [torch.from_numpy(side.kid_vectors())])
    # They have seen data (compute() must not warn and refuse), in update()'s dtype.
    fid._update_count = kid._update_count = 1
    fid.orig_dtype = torch.float32
    return fid, kid


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
    import torch

    subset = min(kid_subset_size, run.kid_count, references.kid_count)
    fid, kid = _metrics(run, references, max(subset, 1), kid_subsets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID draws its subsets with torch's global generator
        fid_value = float(fid.compute())
        kid_mean, kid_std = (float(v) for v in kid.compute()) if subset >= 2 else (None, None)
    if fid_value != fid_value or math.isinf(fid_value):  # a degenerate covariance
        fid_value = None
    return Distribution(fid_value, kid_mean, kid_std, n_gen, n_ref, subset)
