"""The weighted boundary loss's map: peaked on the hole's edge band, 1 far from it, mean 1
on the latent grid, and the band error the benchmark reports."""

from __future__ import annotations

import numpy as np
import pytest

from ray_app.boundary_weights import band_l1, boundary_weights


def hole(size=128, box=(40, 40, 88, 88)):
    mask = np.zeros((size, size), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def test_the_weights_peak_on_the_edge_band_and_keep_the_loss_scale():
    w = boundary_weights(hole(), (16, 16), band=8, peak=5.0, normalise=False)
    assert w.shape == (16, 16) and w.dtype == np.float32
    edge = w[5, 5:11]  # latent row over the hole's top edge (pixel 40 = latent 5)
    assert edge.min() > 2.5
    assert w[0, 0] == pytest.approx(1.0) and w[8, 8] == pytest.approx(1.0)  # far out, far in
    n = boundary_weights(hole(), (16, 16), band=8, peak=5.0)
    assert n.mean() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(n / n[0, 0], w / w[0, 0], atol=1e-5)  # the same shape, rescaled
    wider = boundary_weights(hole(), (16, 16), band=16, peak=5.0, normalise=False)
    assert (wider > 1.01).sum() > (w > 1.01).sum()


def test_no_boundary_means_no_weighting_and_bad_arguments_are_named():
    assert np.all(boundary_weights(np.zeros((64, 64), bool), (8, 8), band=4, peak=3) == 1)
    with pytest.raises(ValueError, match="band=0"):
        boundary_weights(hole(), (16, 16), band=0, peak=3)
    with pytest.raises(ValueError, match=r"peak=0\.5"):
        boundary_weights(hole(), (16, 16), band=4, peak=0.5)
    with pytest.raises(ValueError, match="whole multiple"):
        boundary_weights(hole(), (15, 15), band=4, peak=3)


def test_band_l1_sees_only_the_seam():
    mask = hole()
    truth = np.full((128, 128, 3), 100, np.uint8)
    seam = truth.copy()
    ring = np.zeros_like(mask)
    ring[38:42, 38:90] = True  # an error along the top edge
    seam[ring] = 160
    far = truth.copy()
    far[60:70, 60:70] = 255  # an error deep inside the hole, away from its edge
    assert band_l1(seam, truth, mask, band=4) > 5  # 60 on a quarter of the band
    assert band_l1(far, truth, mask, band=4) == 0
