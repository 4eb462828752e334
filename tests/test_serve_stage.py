"""`POST /v1/stage` over real HTTP: `restage serve` (tiny profile) with a staged-catalog
index of the examples' photos. A packshot upload and a trained product's id are staged; a
non-image, an oversized body and a decompression bomb are 4xx with a clear message."""

from __future__ import annotations

import base64
import io
import os

import httpx
import pytest
from conftest import EXAMPLES
from PIL import Image
from servers import serve_process
from stage_index import example_index
from trainset import PRODUCTS, write_training_set

from ray_app.config import load_config
from serve.auth import ENV_KEYS

pytestmark = pytest.mark.slow

KEY = "stage-key-0123456789abcdef"
PRODUCT = sorted(PRODUCTS)[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pipelines.train import ShardTrainer

    root = tmp_path_factory.mktemp("serve-stage")
    config = load_config("tiny")
    index = example_index(str(root / "catalog"), config)
    data = write_training_set(str(root / "aug"), {PRODUCT: PRODUCTS[PRODUCT]})
    adapters = root / "adapters"
    ShardTrainer(load_config("tiny", overrides=["train.steps=2"]), data, str(adapters), None).run(
        [PRODUCT]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTAGE_API_KEYS")}
    env[ENV_KEYS] = KEY
    overrides = ("serve.ranker=false", f"serve.stage_index={index}")
    with serve_process(adapters, root / "serve.log", env, overrides) as s:
        yield s


def post(server, body, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    url = f"{server.url}/v1/stage"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers=headers, timeout=300)
    return httpx.post(url, json=body, headers=headers, timeout=300)


def upload(data: bytes, **fields) -> dict:
    return {"product_id": "new-mug", "image_base64": base64.b64encode(data).decode(), **fields}


def test_an_uploaded_packshot_comes_back_staged(server):
    photo = (EXAMPLES / "products/mug-red-001/00-white.jpg").read_bytes()
    r = post(server, upload(photo, category="mug", num_images=2))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mask_method"] == "plain-background" and len(body["images"]) == 2
    assert [i["rank"] for i in body["images"]] == [1, 2]
    for image in body["images"]:
        staged = Image.open(io.BytesIO(base64.b64decode(image["png_base64"])))
        assert staged.format == "PNG" and max(staged.size) == load_config("tiny").stage.size
    assert body["timings"]["total_ms"] > 0 and r.headers["x-request-id"] == body["request_id"]


def test_a_trained_products_id_stages_its_first_real_photo(server):
    r = post(server, {"product_id": PRODUCT})
    assert r.status_code == 200, r.text
    assert all(i["scene_product_id"] != PRODUCT for i in r.json()["images"])


def test_a_non_image_upload_is_a_422_naming_the_field(server):
    r = post(server, upload(b"%PDF-1.7 this is a document"))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_image" and "not an image" in body["message"]
    assert body["detail"][0]["field"] == "image_base64"
    assert post(server, {"product_id": "x", "image_base64": "***"}).status_code == 422


def test_an_oversized_upload_is_a_413(server):
    limit = load_config("tiny").serve.max_upload_bytes
    r = post(server, upload(b"\0" * limit))
    assert r.status_code == 413 and "serve.max_upload_bytes" in r.json()["message"]


def test_a_decompression_bomb_is_a_422_before_it_is_decoded(server):
    pixels = load_config("tiny").images.max_megapixels * 4e6
    buf = io.BytesIO()
    Image.new("1", (int(pixels**0.5),) * 2).save(buf, format="PNG")  # small file, huge image
    r = post(server, upload(buf.getvalue()))
    assert r.status_code == 422, r.text
    assert "megapixel" in r.json()["message"] or "pixels" in r.json()["message"]


def test_staging_needs_the_key(server):
    r = httpx.post(f"{server.url}/v1/stage", json={"product_id": PRODUCT}, timeout=60)
    assert r.status_code == 401
