"""`restage serve` over real HTTP, started with the README's command on the quick start's
adapters (tiny profile), and the pieces of the endpoint that need no server."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from adapters import example_meta
from conftest import ROOT, kill_marked, readme_command
from PIL import Image
from trainset import PRODUCTS

from ray_app.adapter_meta import AdapterMeta
from ray_app.config import load_config
from ray_app.kinds import Metric
from ray_app.prompts import PromptBank
from ray_app.storage import AdapterLayout
from serve.api import GenerateRequest
from serve.auth import AuthConfigError, check_authorization, digest, load_key_digests
from serve.errors import ApiError
from serve.ingress import PUBLIC_ADAPTER_FIELDS, IngressService, build_prompt, public_metadata

URL = "http://127.0.0.1:8000"
LAMP, MUG = sorted(PRODUCTS)  # the products of the adapters fixture


def _key() -> str:
    return readme_command("serve").split("=", 1)[1].split()[0]


@pytest.fixture(scope="module")
def server(quickstart, user_dir):
    proc, run = quickstart
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapters = run / "adapters"
    # Marks every process of the server's Ray, to kill what a stop left behind, and only that.
    marker = {"RESTAGE_TEST_SERVER": uuid.uuid4().hex}
    log = user_dir / "serve.log"  # a pipe that nobody reads would fill and stall the server
    with open(log, "w") as out:
        server = subprocess.Popen(
            ["bash", "-c", readme_command("serve")],
            cwd=user_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **marker},
        )
    deadline = time.time() + 600
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the server did not become ready in 10 minutes"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{URL}/healthz", timeout=5).status_code == 200:
                break
        time.sleep(1)
    yield {"adapters": adapters, "user_dir": user_dir}
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    kill_marked(marker)


def post(body, key: str | None = "default", **kwargs) -> httpx.Response:
    headers = (
        {} if key is None else {"Authorization": f"Bearer {_key() if key == 'default' else key}"}
    )
    return httpx.post(f"{URL}/v1/generate", json=body, headers=headers, timeout=300, **kwargs)


def get(path: str, key: str | None = "default") -> httpx.Response:
    headers = (
        {} if key is None else {"Authorization": f"Bearer {_key() if key == 'default' else key}"}
    )
    return httpx.get(f"{URL}{path}", headers=headers, timeout=60)


def images(resp: httpx.Response) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))))
        for i in resp.json()["images"]
    ]


@pytest.mark.slow
def test_readme_curl_example(server):
    proc = subprocess.run(
        ["bash", "-c", readme_command("curl")], capture_output=True, text=True, timeout=300
    )
    body = json.loads(proc.stdout)
    assert len(body["images"]) == 2
    decoded = [Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))) for i in body["images"]]
    assert all(img.size == (64, 64) for img in decoded)
    assert [i["rank"] for i in body["images"]] == [1, 2]
    assert all(0 <= i["seed"] < 2**53 for i in body["images"])  # exact in JavaScript
    assert body["images"][0]["score"] >= body["images"][1]["score"]
    assert body["ranking"] == "paper"  # which ranking made the scores
    assert set(body["images"][0]["scores"]) == set(Metric)
    # no scoring.encoders: the metric of the product's own encoder is null, never a stand-in
    assert body["images"][0]["scores"][Metric.PERSONAL_FIDELITY] is None
    assert body["adapter"]["token"] in body["prompt"]
    assert "training_set" not in body["adapter"]  # internal storage URIs stay private
    assert set(body["timings"]) == {
        "queue_ms",
        "adapter_load_ms",
        "generation_ms",
        "ranking_ms",
        "total_ms",
    }


@pytest.mark.slow
def test_generate_returns_decodable_images_deterministically(server):
    first = post({"product_id": "bottle-teal-002", "num_images": 3, "seed": 11})
    assert first.status_code == 200, first.text
    a = images(first)
    assert len(a) == 3 and all(img.shape == (64, 64, 3) for img in a)
    again = images(post({"product_id": "bottle-teal-002", "num_images": 3, "seed": 11}))
    assert all((x == y).all() for x, y in zip(a, again, strict=True))  # same seed, same images
    other = images(post({"product_id": "bottle-teal-002", "num_images": 3, "seed": 12}))
    assert not (other[0] == a[0]).all()


@pytest.mark.slow
def test_different_products_give_different_images(server):
    body = {"prompt": "a {product} on a plain grey table", "num_images": 1, "seed": 5}
    mug = images(post({**body, "product_id": "mug-red-001"}))[0]
    box = images(post({**body, "product_id": "cereal-box-003"}))[0]
    assert np.abs(mug.astype(int) - box.astype(int)).mean() > 1


@pytest.mark.parametrize(
    ("key", "status"),
    [(None, 401), ("", 401), ("not-the-key-but-long-enough", 403)],
)
@pytest.mark.slow
def test_auth(server, key, status):
    resp = (
        post({"product_id": "mug-red-001"}, key=key)
        if key != ""
        else httpx.post(
            f"{URL}/v1/generate",
            json={"product_id": "mug-red-001"},
            headers={"Authorization": "Basic abc"},
        )
    )
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] in ("unauthorized", "forbidden")
    if status == 401:
        assert resp.headers["www-authenticate"] == "Bearer"
    assert get("/v1/products/mug-red-001", key=None).status_code == 401
    assert get("/v1/stats", key="not-the-key-but-long-enough").status_code == 403


@pytest.mark.slow
def test_unknown_product_is_404(server):
    resp = post({"product_id": "no-such-product"})
    assert resp.status_code == 404 and "no-such-product" in resp.json()["message"]
    assert resp.json()["error"] == "unknown_product" and resp.json()["request_id"]
    assert get("/v1/products/no-such-product").status_code == 404
    meta = get("/v1/products/mug-red-001")
    assert meta.status_code == 200 and meta.json()["product_id"] == "mug-red-001"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"product_id": "mug-red-001", "num_images": 9}, "num_images"),
        ({"product_id": "mug-red-001", "num_images": 0}, "num_images"),
        ({"product_id": "mug-red-001", "width": 100}, "width"),
        ({"product_id": "mug-red-001", "height": 4096}, "height"),
        ({"product_id": "mug-red-001", "steps": 0}, "steps"),
        ({"product_id": "mug-red-001", "guidance_scale": -1}, "guidance_scale"),
        ({"product_id": "mug-red-001", "seed": -3}, "seed"),
        ({"product_id": "mug-red-001", "colour": "red"}, "colour"),
        ({"product_id": "mug-red-001", "response_format": "uri"}, "response_format"),
        ({"num_images": 1}, "product_id"),
        ({"product_id": "café"}, "product_id"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_422_naming_the_field(server, body, field):
    resp = post(body)
    assert resp.status_code == 422, resp.text
    assert field in {d["field"] for d in resp.json()["detail"]}


@pytest.mark.slow
def test_body_limits(server):
    assert post({"product_id": "mug-red-001", "prompt": "x" * 20000}).status_code == 413
    resp = httpx.post(
        f"{URL}/v1/generate",
        content=b"{not json",
        timeout=60,
        headers={"Authorization": f"Bearer {_key()}", "Content-Type": "application/json"},
    )
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_json"


@pytest.mark.slow
def test_path_traversal_never_reaches_storage(server):
    # A file that a traversal from the adapters root would reach.
    secret = server["adapters"].parent.parent / "etc"
    secret.mkdir(exist_ok=True)
    (secret / AdapterLayout.METADATA).write_text(
        json.dumps({"product_id": "leaked", "token": "SECRET"})
    )
    for path in (
        "/v1/products/..%2F..%2Fetc",
        "/v1/products/%2e%2e%2f%2e%2e%2fetc",
        "/v1/products/..%252F..%252Fetc",
        "/v1/products/..",
    ):
        resp = get(path)
        assert resp.status_code in (404, 422), (path, resp.status_code)
        assert "SECRET" not in resp.text
    for pid in ("../../etc", "..%2F..%2Fetc", "..", "./etc"):
        resp = post({"product_id": pid})
        assert resp.status_code == 422 and "SECRET" not in resp.text


@pytest.mark.slow
def test_failed_adapter_load_is_503_and_the_replica_keeps_serving(server):
    broken = server["adapters"] / "broken-adapter"  # an adapter whose weights cannot be loaded
    shutil.copytree(server["adapters"] / "mug-red-001", broken)
    try:
        meta = json.loads((broken / AdapterLayout.METADATA).read_text())
        (broken / AdapterLayout.METADATA).write_text(
            json.dumps({**meta, "product_id": "broken-adapter"})
        )
        (broken / AdapterLayout.WEIGHTS).write_bytes(b"not safetensors")
        resp = post({"product_id": "broken-adapter", "seed": 1})
        assert resp.status_code == 503, resp.text
        assert post({"product_id": "mug-red-001", "seed": 1}).status_code == 200
    finally:
        shutil.rmtree(broken)


@pytest.mark.slow
def test_eviction_beyond_k_keeps_adapter_memory_bounded(server):
    k = load_config("tiny").serve.max_adapters_per_replica
    products = ["mug-red-001", "bottle-teal-002", "cereal-box-003"]
    assert len(products) > k
    post({"product_id": products[0], "seed": 3})
    first = get("/v1/stats").json()
    per_adapter = first["adapter_bytes"] / max(1, len(first["adapters_loaded"]))
    for _ in range(3):  # cycle through more products than a replica holds
        for pid in products:
            assert post({"product_id": pid, "seed": 3}).status_code == 200
    stats = get("/v1/stats").json()
    assert len(stats["adapters_loaded"]) == k
    assert stats["counters"]["evictions"] >= 3
    assert stats["adapter_bytes"] == pytest.approx(k * per_adapter, rel=0.01)
    # Evicted adapters' memory is reused, never added to: at most K slots and the spare.
    assert stats["slots_allocated"] <= k + 1
    assert stats["allocated_adapter_bytes"] <= (k + 1) * per_adapter * 1.01
    # Nothing else accumulates: the process is within a few MB of where it was after the
    # first load, although it has loaded and evicted adapters many times since.
    assert stats["rss_bytes"] - first["rss_bytes"] < 64 * 2**20, (
        first["rss_bytes"],
        stats["rss_bytes"],
    )


def prometheus_sum(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples (over replicas and nodes) whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


@pytest.mark.slow
def test_prometheus_metrics_count_what_the_replicas_did(server):
    assert post({"product_id": "mug-red-001", "seed": 11}).status_code == 200
    stats = get("/v1/stats").json()
    assert stats["metrics_endpoints"], stats
    counters = stats["counters"]  # one replica in the tiny profile: it did everything
    deadline = time.time() + 90  # Ray exports metrics every few seconds
    while True:
        text = "".join(httpx.get(url, timeout=10).text for url in stats["metrics_endpoints"])
        events = "ray_restage_generator_events_total"
        requests = prometheus_sum(text, events, event="requests")
        if requests >= counters["requests"] or time.time() > deadline:
            break
        time.sleep(2)
    assert requests == counters["requests"], text[-2000:]
    assert prometheus_sum(text, events, event="loads") == counters["loads"]
    assert prometheus_sum(text, events, event="evictions") == counters.get("evictions", 0)
    assert prometheus_sum(text, "ray_restage_generation_ms_count") == counters["requests"]
    assert prometheus_sum(text, "ray_restage_adapter_load_ms_count") >= 1


def test_hot_swapped_adapter_generates_like_a_fresh_load(adapters):
    """Swapping B into the slot A held gives B's images exactly (no trace of A)."""
    import asyncio

    from serve.generator import GeneratorReplica

    config = load_config("tiny", overrides=["serve.max_adapters_per_replica=1"])
    swapped = GeneratorReplica(config, str(adapters))
    mug = asyncio.run(swapped.load(MUG))
    swapped.generate(MUG, "a {product}", [4], None, None, None, None)  # the live adapter: A
    del mug  # what the multiplexer does on eviction: the handle goes, its slot is freed
    held = [asyncio.run(swapped.load(LAMP))]  # handles are held while cached
    assert swapped.slot_of == {LAMP: "slot-0"}  # the same slot, written again
    assert swapped.counters["evictions"] == 1
    fresh = GeneratorReplica(config, str(adapters))
    held.append(asyncio.run(fresh.load(LAMP)))
    args = (LAMP, "a {product} on a table", [4, 5], None, None, None, None)
    assert swapped.generate(*args)["images"] == fresh.generate(*args)["images"]
    base = fresh.generator.generate(["a {product} on a table"], [4], [""])[0]
    assert not (
        np.asarray(Image.open(io.BytesIO(fresh.generate(*args)["images"][0]))) == base
    ).all()


def test_ranker_embeds_references_once_and_ranks_like_scoring_the_raw_images(adapters):
    import asyncio

    from actors.scorer import references
    from serve.generator import GeneratorReplica
    from serve.ranker import RankerReplica

    meta = AdapterMeta.read(AdapterLayout(str(adapters)).metadata(MUG))
    config = load_config("tiny")
    ranker = RankerReplica(config)
    args = (MUG, "a {product} on a table", [4, 5, 6], None, None, None, None)
    replica = GeneratorReplica(config, str(adapters))
    handle = asyncio.run(replica.load(MUG))
    generated = replica.generate(*args)["images"]
    del handle
    first = ranker.rank(meta, generated, "a photo of a mug")
    again = ranker.rank(meta, generated, "a photo of a mug")
    assert first == again and ranker.reference_loads == 1  # embedded once
    raw = ranker.scorer.score(generated, ["a photo of a mug"] * 3, *references(meta))
    assert first["scores"] == [round(float(s), 6) for s in raw["score"]]
    assert sorted(first["ranks"]) == [1, 2, 3]
    # generate.ranking's score (the paper's sum by default), as `restage generate` ranks.
    assert first["ranking"] == config.generate.ranking == "paper"
    summed = [sum(m[k] for k in ("clip_t", "clip_i", "dino")) for m in first["metrics"]]
    np.testing.assert_allclose(first["scores"], summed, atol=1e-5)
    ranker.rank(
        meta.model_copy(update={"weights_sha256": "retrained"}), generated, "a photo of a mug"
    )
    assert ranker.reference_loads == 2  # a retrained product is embedded afresh


@pytest.mark.slow
def test_openapi_documents_the_api(server):
    spec = httpx.get(f"{URL}/openapi.json", timeout=60).json()
    assert {"/v1/generate", "/v1/products/{product_id}", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert "num_images" in body["properties"]
    # The Swagger UI loads its scripts from a CDN: off unless serve.docs is set.
    assert httpx.get(f"{URL}/docs", timeout=60).status_code == 404


@pytest.mark.slow
def test_load_test_smoke(server, tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "serve_load.py"),
            "--url",
            URL,
            "--api-key",
            _key(),
            "--products",
            "mug-red-001,bottle-teal-002,cereal-box-003",
            "--clients",
            "3",
            "--requests",
            "9",
            "--seconds",
            "240",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "p95 ms" in proc.stdout and "hit rate" in proc.stdout
    result = json.loads(out.read_text())["runs"][0]
    assert result["ok"] == 9 and result["server_5xx"] == 0


def test_load_test_refuses_other_hosts():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "serve_load.py"),
            "--url",
            "http://example.com",
            "--api-key",
            "x",
            "--products",
            "a",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "loopback" in proc.stderr


# --------------------------------------------------------------------------- without a server


def test_serve_refuses_to_start_without_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTAGE_API_KEYS")}
    restage = str(Path(sys.executable).with_name("restage"))
    proc = subprocess.run(
        [restage, "serve", "--profile", "tiny", "--adapters", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no API key configured" in proc.stderr
    proc = subprocess.run(
        [
            restage,
            "serve",
            "--profile",
            "tiny",
            "--adapters",
            str(tmp_path),
            "--no-auth",
            "--host",
            "0.0.0.0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "127.0.0.1 only" in proc.stderr


def test_key_loading(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nkey-from-file-0123456789\n\n")
    digests = load_key_digests(
        {
            "RESTAGE_API_KEYS": "key-one-0123456789abc, key-two-0123456789abc",
            "RESTAGE_API_KEYS_FILE": str(keys),
        }
    )
    assert digests == tuple(
        digest(k)
        for k in ("key-one-0123456789abc", "key-two-0123456789abc", "key-from-file-0123456789")
    )
    assert load_key_digests({}) == ()
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        load_key_digests({"RESTAGE_API_KEYS": "short"})
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_key_digests({"RESTAGE_API_KEYS_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("", 401),
        ("Bearer", 401),
        ("Basic abc", 401),
        ("Bearer wrong", 403),
        ("Bearer right-key-0123456789", 200),
        ("bearer right-key-0123456789", 200),
    ],
)
def test_check_authorization(header, status):
    assert check_authorization(header, (digest("right-key-0123456789"),)).status == status


def test_prompts_put_the_token_phrase_in():
    bank = PromptBank.load()
    meta = example_meta(token="ohwx", noun="mug", product_type="mug")
    assert build_prompt("a {product} on a desk", meta, bank, 0) == "a ohwx mug on a desk"
    assert build_prompt("on a desk", meta, bank, 0) == "a photo of ohwx mug, on a desk"
    default = build_prompt(None, meta, bank, 3)
    assert "ohwx mug" in default and default == build_prompt(None, meta, bank, 3)


def test_public_metadata_hides_internal_fields():
    meta = example_meta(
        product_id="p",
        token="t",
        noun="mug",
        base={"source": "s", "revision": "r", "resolved": "/cache/x"},
    )
    public = public_metadata(meta)
    assert set(public) == set(PUBLIC_ADAPTER_FIELDS)
    assert public["product_id"] == "p" and public["token"] == "t" and public["noun"] == "mug"
    assert public["base"] == {"source": "s", "revision": "r"}
    assert "training_set" not in public and "weights_sha256" not in public


def test_invalid_product_id_never_reaches_storage(monkeypatch, tmp_path):
    from ray_app import storage

    def boom(*args, **kwargs):
        raise AssertionError(f"storage was touched: {args}")

    monkeypatch.setattr(storage, "exists", boom)
    monkeypatch.setattr(storage, "read_json", boom)
    service = IngressService(load_config("tiny"), str(tmp_path), (), None, None, require_auth=False)
    for pid in ("../etc", "..", "a/b", "", "x" * 200):
        with pytest.raises(ApiError) as err:
            service.metadata(pid)
        assert err.value.status == 422


def test_request_model_bounds():
    with pytest.raises(ValueError, match="multiple of 8"):
        GenerateRequest(product_id="p", width=100)
    assert GenerateRequest(product_id="p").num_images == 1


def test_serve_deploy_config_is_valid_and_builds(tmp_path, monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ray_app.config import ConfigError
    from serve.app import app_builder

    config = yaml.safe_load((ROOT / "serve" / "restage.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # Ray's own schema of `serve deploy` files
    (application,) = config["applications"]
    assert application["import_path"] == "serve.app:app_builder"
    assert "runtime_env" not in application  # no secret travels to the replicas' environment
    keys = tmp_path / "keys"
    keys.write_text("deploy-key-0123456789abcdef\n")
    args = {
        **application["args"],
        "adapters": str(tmp_path),
        "profile": "tiny",
        "api_keys_file": str(keys),
    }
    monkeypatch.delenv("RESTAGE_API_KEYS", raising=False)
    monkeypatch.delenv("RESTAGE_API_KEYS_FILE", raising=False)
    assert type(app_builder(args)).__name__ == "Application"
    without = {k: v for k, v in args.items() if k != "api_keys_file"}
    with pytest.raises(ConfigError, match="no API key configured"):
        app_builder(without)
    monkeypatch.setenv("RESTAGE_API_KEYS", "deploy-key-0123456789abcdef")
    assert type(app_builder(without)).__name__ == "Application"
    with pytest.raises(ConfigError, match="unknown"):
        app_builder({**args, "adapter": "typo"})


def test_ready_message_names_the_real_bind_address():
    from serve.app import ready_message

    everywhere = ready_message("0.0.0.0", 8000, no_auth=False)
    assert "listening on http://0.0.0.0:8000 (all interfaces" in everywhere
    assert "http://127.0.0.1:8000/docs" in everywhere and "SIGTERM" in everywhere
    local = ready_message("127.0.0.1", 8001, no_auth=True)
    assert "listening on http://127.0.0.1:8001;" in local and "auth: off" in local
