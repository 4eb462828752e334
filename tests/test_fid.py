"""ray_app/fid.py without Ray: block-wise states equal one pass, a saved side (the index's
FID reference) measures exactly as the side it was saved from, and small sides are refused."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from ray_app import fid
from ray_app.records import FEATURES_SCHEMA

DIM = 16


def _features(n: int, shift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, DIM)) + shift).astype(np.float32)


def _side(x: np.ndarray, real: bool, name: str, rate: float = 1.0, blocks: int = 1):
    """``x`` added in ``blocks`` separately built states, merged (as Ray Data tasks do)."""
    ids = [f"{name}-{i}" for i in range(len(x))]
    parts = np.array_split(np.arange(len(x)), blocks)
    out = None
    for rows in parts:
        side = fid.SideFeatures(DIM, real=real)
        side.add(x[rows], [ids[i] for i in rows], rate)
        out = side if out is None else (out.merge(side) or out)
    return out


def _measure(run, reference) -> fid.Distribution:
    return fid.distribution(run, reference, min_images=4, kid_subset_size=50, kid_subsets=20)


def test_blocks_merge_to_the_one_pass_values():
    real, fake = _features(200, 0.0, 1), _features(120, 0.5, 2)
    once = _measure(_side(fake, False, "f"), _side(real, True, "r"))
    blocks = _measure(_side(fake, False, "f", blocks=3), _side(real, True, "r", blocks=4))
    assert once.fid == pytest.approx(blocks.fid, rel=1e-6)
    assert once.kid_mean == pytest.approx(blocks.kid_mean, rel=1e-6)
    assert (blocks.n_generated, blocks.n_reference) == (120, 200)


def test_a_saved_reference_measures_as_the_side_it_was_saved_from(tmp_path):
    real = _side(_features(300, 0.0, 3), True, "scene", rate=0.5, blocks=3)
    uri = str(tmp_path / "index" / "fid_reference.npz")
    fid.save_side(real, uri)
    loaded = fid.load_side(uri)
    assert (loaded.n, loaded.kid_count, loaded.num_features) == (300, real.kid_count, DIM)
    assert 100 < real.kid_count < 200  # the seeded half-sample, not every vector
    for shift in (0.0, 1.0):
        run = _side(_features(80, shift, 4), False, "staged")
        want, got = _measure(run, real), _measure(run, loaded)
        assert got.fid == pytest.approx(want.fid, rel=1e-9)
        assert got.kid_mean == pytest.approx(want.kid_mean, rel=1e-9)
    near = _measure(_side(_features(80, 0.0, 5), False, "a"), loaded)
    far = _measure(_side(_features(80, 1.0, 5), False, "b"), loaded)
    assert far.fid > near.fid + 5 and far.kid_mean > near.kid_mean


def test_side_partials_split_a_block_by_side():
    x = _features(10, 0.0, 6)
    table = pa.Table.from_pylist(
        [{"side": "real" if i < 6 else "run", "image_id": str(i), "features": v} for i, v in
         enumerate(x.tolist())],
        schema=FEATURES_SCHEMA,
    )  # fmt: skip
    out = fid.side_partials(table, {}, ("real",))
    sides = {str(k): pickle.loads(v) for k, v in zip(out["side"], out["state"], strict=True)}
    assert {k: (s.n, s.real) for k, s in sides.items()} == {"real": (6, True), "run": (4, False)}


def test_too_few_images_are_refused_with_the_setting_to_change():
    got = _measure(_side(_features(3, 0.0, 7), False, "f"), _side(_features(50, 0, 8), True, "r"))
    assert got.fid is None and "evaluate.min_fid_images=4" in got.refused


def test_the_sums_are_the_states_torchmetrics_keeps():
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = DIM

        def forward(self, x):
            return x

    x = _features(50, 0.2, 9)
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(x), real=True)
    side = _side(x, True, "r", blocks=3)
    assert side.n == int(metric.real_features_num_samples) == 50
    np.testing.assert_allclose(side.total, metric.real_features_sum.numpy(), rtol=1e-12)
    np.testing.assert_allclose(side.outer, metric.real_features_cov_sum.numpy(), rtol=1e-12)


def test_a_block_is_summed_and_merged_without_torch(tmp_path):
    """The Ray Data tasks that sum blocks and the drivers that merge and save them (the
    index job's) never import torch or torchmetrics: ~6 s of CPU in each process."""
    import subprocess
    import sys

    code = (
        "import pickle, sys, numpy as np, pyarrow as pa\n"
        "from ray_app import fid\n"
        "from ray_app.records import FEATURES_SCHEMA\n"
        "rows = [{'side': 's', 'image_id': str(i), 'features': [float(i), 1.0]} for i in range(4)]\n"
        "out = fid.side_partials(pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA), {}, ())\n"
        "side = pickle.loads(out['state'][0])\n"
        "side.merge(pickle.loads(out['state'][0]))\n"
        "fid.save_side(side, sys.argv[1])\n"
        "print(side.n, [m for m in ('torch', 'torchmetrics') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "side.npz")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["8", "[]"], out.stdout
