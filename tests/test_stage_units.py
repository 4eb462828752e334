"""`restage stage`'s pieces without Ray: the staged size, the plain-background fast path,
the shape filter of retrieval, and StageConfig's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import EXAMPLES
from pydantic import ValidationError

from pipelines._product_rows import unpack
from pipelines.index import clean_cut, edges_touched
from pipelines.stage import Retrieve, decode_products, staged_size
from ray_app.batching import object_array
from ray_app.config import StageConfig
from ray_app.images import decode_mask
from ray_app.sources import SourcePolicy


@pytest.mark.parametrize(
    ("w", "h", "longer", "want"),
    [(768, 512, 512, (512, 344)), (512, 768, 128, (88, 128)), (100, 100, 64, (64, 64))],
)
def test_the_staged_size_keeps_the_aspect_on_the_inpainters_grid(w, h, longer, want):
    got = staged_size(w, h, longer)
    assert got == want and got[0] % 8 == 0 and got[1] % 8 == 0
    assert got[0] / got[1] == pytest.approx(w / h, rel=0.06)


def test_a_plain_background_photo_is_cut_out_without_a_model(tiny_config, tmp_path):
    photos = [
        str(EXAMPLES / "products/mug-red-001/01-wood.jpg"),  # a scene: not the fast path
        str(EXAMPLES / "products/mug-red-001/00-white.jpg"),
    ]
    batch = {
        "product_id": object_array(["mug"]),
        "image_uris": object_array([photos]),
        "category": object_array(["mug"]),
    }
    policy = SourcePolicy.for_manifest(str(EXAMPLES / "products.jsonl"))
    (state,) = unpack(decode_products(batch, tiny_config, policy, str(tmp_path)))
    assert not state.failed
    assert state.source_uri == photos[1] and state.mask_method == "plain-background"
    mask = decode_mask(state.mask) > 0
    assert 0.02 < mask.mean() < 0.5 and not mask[0].any() and not mask[:, 0].any()
    assert state.photos == []  # the segmenter stage has nothing to do for it


def test_retrieval_skips_scenes_whose_product_has_another_shape(tiny_config):
    retrieve = Retrieve.__new__(Retrieve)  # the filter alone: no model, no index
    retrieve.config = tiny_config
    retrieve.aspects = np.array([0.5, 1.0, 1.5, 2.5, 0.4])
    limit = tiny_config.stage.max_aspect_change
    ok = retrieve.compatible(1.0)(np.arange(5))
    want = [math.exp(abs(math.log(a))) <= limit for a in retrieve.aspects]
    assert ok.tolist() == want == [False, True, True, False, False]


def test_a_scene_product_cut_by_the_frame_or_too_small_is_left_out(tiny_config):
    mask = np.zeros((100, 100), bool)
    mask[30:90, 40:60] = True
    assert clean_cut(mask, tiny_config) is None and edges_touched(mask) == 0
    tiny = np.zeros_like(mask)
    tiny[50:52, 50:52] = True
    assert "min_area" in clean_cut(tiny, tiny_config)
    cut = np.zeros_like(mask)
    cut[0:100, 0:40] = True  # top, bottom and left edges
    assert "cut off by the frame" in clean_cut(cut, tiny_config)


def test_stage_config_names_what_to_change():
    with pytest.raises(ValidationError, match="keep=5 is above top_k=4"):
        StageConfig(keep=5, top_k=4)
    with pytest.raises(ValidationError, match="candidates=2 is below top_k=4"):
        StageConfig(candidates=2)
    with pytest.raises(ValidationError, match="multiple of 8"):
        StageConfig(size=100)
