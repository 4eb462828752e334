"""The stager of `POST /v1/stage` without Serve: an uploaded photo staged by the stage
job's own stages against an index built in-process from the examples' scenes (tiny
profile), and uploads that are not photos refused with the reason."""

from __future__ import annotations

import io

import pytest
from conftest import EXAMPLES
from PIL import Image
from stage_index import example_index

from serve.stager import StageInputError, StagerReplica


@pytest.fixture(scope="module")
def stager(tmp_path_factory, tiny_config):
    return StagerReplica(
        tiny_config, example_index(str(tmp_path_factory.mktemp("index")), tiny_config)
    )


def _photo(pid: str, name: str = "00-white.jpg") -> bytes:
    return (EXAMPLES / "products" / pid / name).read_bytes()


def test_an_uploaded_packshot_is_staged_into_other_products_scenes(stager):
    out = stager.stage("mug-red-001", _photo("mug-red-001"), "mug", keep=1)
    assert out["mask_method"] == "plain-background"  # the packshot needed no segmenter
    (image,) = out["images"]
    assert image["scene_product_id"] != "mug-red-001" and image["rank"] == 1
    staged = Image.open(io.BytesIO(image["data"]))
    x0, y0, x1, y1 = image["placement"]
    assert 0 <= x0 < x1 <= staged.width and 0 <= y0 < y1 <= staged.height
    assert set(image["scores"]) == {"clip_i", "mask_iou", "boundary"}
    assert {"decode_ms", "retrieve_ms", "compose_ms", "score_ms"} <= set(out["timings"])


def test_a_photo_that_is_not_a_packshot_goes_through_the_segmenter(stager):
    out = stager.stage("new-mug", _photo("mug-red-001", "01-wood.jpg"), None, keep=2)
    assert out["mask_method"] not in ("plain-background", "alpha")
    assert 1 <= len(out["images"]) <= 2
    assert [i["rank"] for i in out["images"]] == sorted(i["rank"] for i in out["images"])


def test_an_upload_that_is_not_an_image_is_refused_with_the_reason(stager):
    with pytest.raises(StageInputError, match="not an image"):
        stager.stage("x", b"%PDF-1.7 not an image", None, keep=1)


def test_a_decompression_bomb_is_refused_before_it_is_decoded(stager, tiny_config):
    buf = io.BytesIO()
    side = int((tiny_config.images.max_megapixels * 4) ** 0.5 * 1000)
    Image.new("1", (side, side)).save(buf, format="PNG")  # a few kB, 4x the pixel limit
    assert len(buf.getvalue()) < 1_000_000
    with pytest.raises(StageInputError, match=r"megapixel|pixels"):
        stager.stage("x", buf.getvalue(), None, keep=1)
