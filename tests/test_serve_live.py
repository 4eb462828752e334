"""The endpoint's defences over real HTTP: `restage serve` (tiny profile) on a free port with
two keys, one of which has a small budget. Each test checks what a client sees."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest
from servers import serve_process
from trainset import PRODUCTS, write_training_set

from ray_app.config import load_config
from ray_app.storage import AdapterLayout
from serve.auth import ENV_KEYS

pytestmark = pytest.mark.slow

KEY = "live-key-0123456789abcdef"
SMALL = "small-budget-key-0123456789"  # its budget runs out in these tests
PRODUCT = sorted(PRODUCTS)[0]
BURST = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pipelines.train import ShardTrainer

    root = tmp_path_factory.mktemp("live")
    data = write_training_set(str(root / "aug"), {PRODUCT: PRODUCTS[PRODUCT]})
    adapters = root / "adapters"
    ShardTrainer(load_config("tiny", overrides=["train.steps=2"]), data, str(adapters), None).run(
        [PRODUCT]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTAGE_API_KEYS")}
    env[ENV_KEYS] = f"{KEY},{SMALL}"
    # A burst that this module's requests of KEY fit in, and almost no refill: SMALL's burst
    # runs out in test_over_budget_requests_are_422_then_429_with_retry_after.
    overrides = (
        "serve.ranker=false",
        f"serve.budget.key_request_burst={BURST}",
        "serve.budget.key_requests_per_minute=1",
    )
    with serve_process(adapters, root / "serve.log", env, overrides) as s:
        s.adapters = adapters
        yield s


def post(server, body, key=KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    if isinstance(body, bytes):
        return httpx.post(
            f"{server.url}/v1/generate", content=body, headers=headers, timeout=300, **kwargs
        )
    return httpx.post(f"{server.url}/v1/generate", json=body, headers=headers, timeout=300)


def stats(server) -> dict:
    return httpx.get(
        f"{server.url}/v1/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ).json()


def assert_clean_error(resp: httpx.Response, status: int, code: str, server) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code and body["message"]
    assert body["request_id"] == resp.headers["x-request-id"]
    for leak in (str(server.adapters), "/tmp", "Traceback", "ray", "Ray"):
        assert leak not in json.dumps(body), (leak, body)
    return body


def test_generation_works_and_carries_a_request_id(server):
    resp = post(server, {"product_id": PRODUCT, "seed": 1})
    assert resp.status_code == 200, resp.text
    assert resp.json()["request_id"] == resp.headers["x-request-id"]


def test_nested_json_is_422(server):
    resp = post(server, b"[" * 1000 + b"]" * 1000, headers={"Content-Type": "application/json"})
    assert_clean_error(resp, 422, "invalid_json", server)


def test_text_plain_is_415(server):
    body = json.dumps({"product_id": PRODUCT}).encode()
    resp = post(server, body, headers={"Content-Type": "text/plain"})
    assert_clean_error(resp, 415, "unsupported_media_type", server)


@pytest.mark.parametrize(
    ("field", "value"), [("num_images", True), ("num_images", "3"), ("rank", "yes")]
)
def test_lax_types_are_422(server, field, value):
    resp = post(server, {"product_id": PRODUCT, field: value})
    body = assert_clean_error(resp, 422, "invalid_request", server)
    assert [d["field"] for d in body["detail"]] == [field]


@pytest.mark.parametrize("text", ["", '{"product_id": "x", "tok', "[1]"])
def test_malformed_adapter_json_is_503_without_internal_text(server, text):
    folder = server.adapters / "broken-meta"
    folder.mkdir(exist_ok=True)
    (folder / AdapterLayout.METADATA).write_text(text)
    resp = post(server, {"product_id": "broken-meta"})
    body = assert_clean_error(resp, 503, "adapter_unavailable", server)
    assert body["message"] == "the product's adapter is unavailable"


def test_broken_adapter_weights_are_503_without_internal_text(server):
    folder = server.adapters / "broken-weights"
    folder.mkdir(exist_ok=True)
    meta = json.loads((server.adapters / PRODUCT / AdapterLayout.METADATA).read_text())
    (folder / AdapterLayout.METADATA).write_text(
        json.dumps({**meta, "product_id": "broken-weights"})
    )
    (folder / AdapterLayout.WEIGHTS).write_bytes(b"not safetensors")
    resp = post(server, {"product_id": "broken-weights"})
    assert_clean_error(resp, 503, "adapter_unavailable", server)
    assert post(server, {"product_id": PRODUCT, "seed": 2}).status_code == 200


def test_over_budget_requests_are_422_then_429_with_retry_after(server):
    budget = load_config("tiny").serve.budget
    # 2048 x 2048 is above serve.max_pixels; 1024 x 1024 x 150 steps x 8 images = 1258
    resp = post(
        server,
        {"product_id": PRODUCT, "width": 1024, "height": 1024, "steps": 150, "num_images": 8},
        key=SMALL,
    )
    body = assert_clean_error(resp, 422, "over_request_budget", server)
    assert f"serve.budget.max_request_cost={budget.max_request_cost:g}" in body["message"]
    codes = []
    for _ in range(BURST + 1):  # each costs almost nothing: the rate limit stops them
        resp = post(server, {"product_id": "no-such-product"}, key=SMALL)
        codes.append(resp.status_code)
        if resp.status_code == 429:
            break
    assert codes[-1] == 429, codes
    assert_clean_error(resp, 429, "rate_limited", server)
    assert int(resp.headers["retry-after"]) >= 1
    assert post(server, {"product_id": PRODUCT, "seed": 3}).status_code == 200  # other key


def test_docs_are_off_by_default(server):
    assert httpx.get(f"{server.url}/docs", timeout=30).status_code == 404
    assert httpx.get(f"{server.url}/openapi.json", timeout=30).status_code == 200


def test_a_client_disconnect_stops_the_generation(server):
    """The client goes away mid-generation: Serve cancels the request, and the replica stops
    between two steps instead of finishing 8 x 150 steps."""
    before = stats(server)["counters"]

    async def scenario() -> dict:
        async with httpx.AsyncClient(timeout=600) as client:
            task = asyncio.ensure_future(
                client.post(
                    f"{server.url}/v1/generate",
                    json={"product_id": PRODUCT, "steps": 150, "num_images": 8},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
            )
            deadline = time.time() + 300
            while stats(server)["counters"].get("steps", 0) < before.get("steps", 0) + 2:
                assert time.time() < deadline and not task.done()
                await asyncio.sleep(0.2)
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task
        deadline = time.time() + 120
        while True:
            after = stats(server)["counters"]
            if after.get("cancelled", 0) > before.get("cancelled", 0) or time.time() > deadline:
                return after

    after = asyncio.run(scenario())
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1, after
    assert after.get("client_gone", 0) == before.get("client_gone", 0) + 1, after
    assert after["steps"] - before.get("steps", 0) < 150, after
    assert post(server, {"product_id": PRODUCT, "seed": 4}).status_code == 200
