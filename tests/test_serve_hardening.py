"""The endpoint's defences, without Serve: body parsing (media type, nesting depth, strict
types), coded error answers that leak nothing, budgets and rate limits, malformed adapter
files, the retry after a replica death, and cancelling a generation between steps."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from adapters import example_meta
from trainset import PRODUCTS, write_training_set

from ray_app.adapter_meta import ADAPTER_META_VERSION, AdapterMeta, AdapterMetaError
from ray_app.config import ConfigError, load_config
from ray_app.storage import AdapterLayout
from serve.api import GenerateRequest
from serve.bodies import check_media_type, json_depth, parse_json
from serve.budget import Budgets, TokenBucket, request_cost
from serve.errors import ApiError, GenerationCancelled, error_response
from serve.ingress import IngressService

KEY = "test-key-0123456789abcdef"


# --------------------------------------------------------------------------- bodies


def test_nested_json_is_refused_before_parsing():
    deep = b"[" * 1000 + b"]" * 1000  # 2 KB that makes json.loads recurse 1000 times
    assert json_depth(deep) == 1000
    with pytest.raises(ApiError) as err:
        parse_json(deep, max_depth=8)
    assert err.value.status == 422 and "serve.max_json_depth=8" in err.value.message
    # Brackets inside strings are text, not nesting.
    assert json_depth(b'{"prompt": "[[[[{{{{ \\" [[[["}') == 1
    assert parse_json(b'{"a": {"b": [1, 2]}}', max_depth=3) == {"a": {"b": [1, 2]}}
    with pytest.raises(ApiError, match="invalid_json"):
        parse_json(b'{"a": [1, 2}', max_depth=8)


@pytest.mark.parametrize("media", [None, "", "text/plain", "application/x-www-form-urlencoded"])
def test_bodies_must_be_declared_json(media):
    with pytest.raises(ApiError) as err:
        check_media_type(media)
    assert err.value.status == 415


def test_json_media_type_with_a_charset_is_fine():
    check_media_type("application/json")
    check_media_type("Application/JSON; charset=utf-8")


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_images", True), ("num_images", "3"), ("rank", "yes"), ("steps", 2.0), ("seed", "7")],
)
def test_request_types_are_strict(field, value):
    with pytest.raises(ValueError, match=field):
        GenerateRequest.model_validate({"product_id": "p", field: value})
    with pytest.raises(ValueError, match=field):
        GenerateRequest.model_validate({"product_id": "p", field: value}, strict=True)


# --------------------------------------------------------------------------- errors


def test_error_answers_carry_code_message_and_request_id_only():
    err = ApiError(
        "adapter_unavailable",
        "the product's adapter is unavailable",
        internal="/srv/secret/adapters/p/adapter.json: OOM killer",
        retry_after_s=2.2,
    )
    resp = error_response(err, "abc123")
    body = json.loads(resp.body)
    assert resp.status_code == 503
    assert body == {
        "error": "adapter_unavailable",
        "message": "the product's adapter is unavailable",
        "request_id": "abc123",
    }
    assert resp.headers["x-request-id"] == "abc123" and resp.headers["retry-after"] == "3"
    with pytest.raises(ValueError, match="unknown error code"):
        ApiError("no_such_code", "x")


# --------------------------------------------------------------------------- budgets


def test_request_cost_is_pixels_steps_images():
    assert request_cost(1024, 1024, 30, 1) == pytest.approx(31.457, rel=1e-3)
    assert request_cost(1536, 1536, 150, 8) == 8 * request_cost(1536, 1536, 150, 1)


def budgets(**limits) -> tuple[Budgets, list[float]]:
    now = [0.0]
    config = load_config("tiny", overrides=[f"serve.budget.{k}={v}" for k, v in limits.items()])
    return Budgets(config.serve.budget, clock=lambda: now[0]), now


def test_a_request_over_the_per_request_limit_is_422_naming_it():
    b, _ = budgets(max_request_cost=100, key_cost_per_minute=1000)
    b.charge("k", 100)
    with pytest.raises(ApiError) as err:
        b.charge("k", 100.5)
    assert err.value.status == 422 and "serve.budget.max_request_cost=100" in err.value.message


def test_per_key_cost_budget_is_429_with_retry_after_and_refills():
    b, now = budgets(max_request_cost=100, key_cost_per_minute=150, key_request_burst=100)
    b.charge("k", 100)
    with pytest.raises(ApiError) as err:
        b.charge("k", 100)
    assert err.value.status == 429 and "serve.budget.key_cost_per_minute=150" in err.value.message
    assert err.value.retry_after_s == pytest.approx(50 / 150 * 60)  # 50 missing at 2.5/s
    b.charge("other-key", 100)  # keys have their own budgets
    now[0] += err.value.retry_after_s
    b.charge("k", 100)


def test_per_key_rate_limit_is_a_token_bucket():
    b, now = budgets(key_requests_per_minute=60, key_request_burst=3)
    for _ in range(3):
        b.charge("k", 0.1)
    with pytest.raises(ApiError) as err:
        b.charge("k", 0.1)
    assert err.value.code == "rate_limited" and err.value.retry_after_s == pytest.approx(1.0)
    now[0] += 1.0
    b.charge("k", 0.1)


def test_token_bucket_refused_takes_nothing():
    bucket = TokenBucket(capacity=10, rate=1)
    assert bucket.take(8, 0.0) == 0.0
    assert bucket.take(5, 0.0) == pytest.approx(3.0)
    assert bucket.take(2, 0.0) == 0.0


def test_budget_config_refuses_a_request_limit_no_key_can_meet():
    with pytest.raises(ConfigError, match="key_cost_per_minute"):
        load_config(
            "tiny",
            overrides=["serve.budget.max_request_cost=500", "serve.budget.key_cost_per_minute=100"],
        )


# --------------------------------------------------------------------------- the ingress


class FakeRequest:
    def __init__(self, body: bytes, content_type: str | None = "application/json", key=KEY):
        self.body = body
        self.headers = {"content-type": content_type} if content_type else {}
        if key:
            self.headers["authorization"] = f"Bearer {key}"

    async def stream(self):
        yield self.body


class Remote:
    def __init__(self, fn):
        self.fn = fn

    async def remote(self, *args):
        return self.fn(*args)


class FakeGenerator:
    """A deployment handle whose replica fails as told."""

    def __init__(self, failures: list[BaseException]):
        self.failures = list(failures)
        self.calls = 0
        self.generate = Remote(self._generate)

    def options(self, **_):
        return self

    def _generate(self, payload):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return {
            "images": [b"png"] * len(payload["seeds"]),
            "replica": "r2",
            "queue_ms": 1.0,
            "adapter_load_ms": 0.0,
            "generation_ms": 2.0,
        }


def write_adapter(root, product_id: str, text: str) -> None:
    folder = root / product_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / AdapterLayout.METADATA).write_text(text)


def service(tmp_path, generator=None, overrides=(), ranker=None, stager=None):
    from serve.auth import digest

    config = load_config("tiny", overrides=list(overrides))
    return IngressService(
        config, str(tmp_path), (digest(KEY),), generator or FakeGenerator([]), ranker, True, stager
    )


def generate(svc, body: dict | bytes, **kwargs):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(svc.generate(FakeRequest(raw, **kwargs), "rid-1"))


GOOD_META = json.dumps(example_meta(product_id="mug", token="ohwx", noun="mug").to_dict())


@pytest.mark.parametrize(
    "text", ["", '{"product_id": "mug", "tok', "[1, 2]", '"mug"', "null", '{"token": 3}']
)
def test_malformed_adapter_json_is_503_adapter_unavailable_without_internal_text(tmp_path, text):
    write_adapter(tmp_path, "mug", text)
    with pytest.raises(AdapterMetaError):
        AdapterMeta.from_bytes(text.encode())
    with pytest.raises(ApiError) as err:
        generate(service(tmp_path), {"product_id": "mug"})
    assert err.value.status == 503 and err.value.code == "adapter_unavailable"
    body = json.loads(error_response(err.value, "rid").body)
    assert str(tmp_path) not in json.dumps(body) and AdapterLayout.METADATA not in json.dumps(body)
    assert str(tmp_path) in err.value.internal  # the log gets it


def test_an_adapter_of_a_newer_restage_is_503_and_the_log_says_to_upgrade(tmp_path):
    newer = {**json.loads(GOOD_META), "version": ADAPTER_META_VERSION + 1}
    write_adapter(tmp_path, "mug", json.dumps(newer))
    with pytest.raises(ApiError) as err:
        generate(service(tmp_path), {"product_id": "mug"})
    assert err.value.status == 503 and err.value.code == "adapter_unavailable"
    assert "upgrade restage" in err.value.internal and "upgrade" not in err.value.message


def test_unsupported_media_type_and_strict_types_through_the_ingress(tmp_path):
    write_adapter(tmp_path, "mug", GOOD_META)
    svc = service(tmp_path)
    with pytest.raises(ApiError) as err:
        generate(svc, {"product_id": "mug"}, content_type="text/plain")
    assert err.value.status == 415
    for field, value in (("num_images", True), ("num_images", "3"), ("rank", "yes")):
        with pytest.raises(ApiError) as err:
            generate(svc, {"product_id": "mug", field: value})
        assert err.value.status == 422 and err.value.detail[0]["field"] == field
    with pytest.raises(ApiError) as err:
        generate(svc, b"[" * 1000 + b"]" * 1000)
    assert err.value.status == 422 and err.value.code == "invalid_json"
    out = generate(svc, {"product_id": "mug", "num_images": 2, "seed": 1})
    assert len(out["images"]) == 2 and out["request_id"] == "rid-1"


def test_ingress_charges_budgets_per_key(tmp_path):
    write_adapter(tmp_path, "mug", GOOD_META)
    svc = service(
        tmp_path,
        overrides=["serve.budget.max_request_cost=0.03", "serve.budget.key_cost_per_minute=0.04"],
    )
    cost = request_cost(64, 64, 3, 2)  # the tiny profile's size and steps: 0.0246
    assert cost < 0.03 < 2 * cost and 0.04 - cost < cost
    generate(svc, {"product_id": "mug", "num_images": 2})
    with pytest.raises(ApiError) as err:
        generate(svc, {"product_id": "mug", "num_images": 4})  # over the per-request limit
    assert err.value.status == 422 and "max_request_cost" in err.value.message
    with pytest.raises(ApiError) as err:
        generate(svc, {"product_id": "mug", "num_images": 2})
    assert err.value.status == 429 and err.value.retry_after_s > 0


def test_a_replica_death_is_retried_once_and_leaks_nothing(tmp_path):
    from ray.exceptions import ActorDiedError

    write_adapter(tmp_path, "mug", GOOD_META)
    gen = FakeGenerator([ActorDiedError()])
    out = generate(service(tmp_path, gen), {"product_id": "mug", "seed": 3})
    assert gen.calls == 2 and out["replica"] == "r2"
    gen = FakeGenerator([ActorDiedError(), ActorDiedError()])
    with pytest.raises(ApiError) as err:
        generate(service(tmp_path, gen), {"product_id": "mug", "seed": 3})
    assert gen.calls == 2 and err.value.status == 503
    internal = RuntimeError("/srv/models/x.safetensors: Task was killed by the OOM killer")
    gen = FakeGenerator([internal])  # not a replica death: no retry, nothing leaks
    with pytest.raises(ApiError) as err:
        generate(service(tmp_path, gen), {"product_id": "mug", "seed": 3})
    text = json.dumps(json.loads(error_response(err.value, "rid").body))
    assert gen.calls == 1 and err.value.status == 503
    assert "/srv" not in text and "OOM" not in text and "OOM killer" in err.value.internal


# --------------------------------------------------------------------------- the generator


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    """A generator replica (no Serve) holding one trained tiny adapter."""
    from pipelines.train import ShardTrainer
    from serve.generator import GeneratorReplica

    root = tmp_path_factory.mktemp("hardening")
    data = write_training_set(str(root / "aug"))
    out = str(root / "adapters")
    config = load_config("tiny", overrides=["train.steps=2"])
    product = sorted(PRODUCTS)[0]
    ShardTrainer(config, data, out, None).run([product])
    assert AdapterLayout(out).completed() == {product}
    rep = GeneratorReplica(load_config("tiny"), out)
    handle = asyncio.run(rep.load(product))
    rep.product, rep.handle = product, handle  # held: the multiplexer would hold it
    return rep


def request(product: str, **kw) -> dict:
    return {"prompt": "a {product} on a desk", "seeds": [1], "received_at": time.time(), **kw}


async def _adapter(handle):
    return handle


def test_a_client_disconnect_stops_the_generation_within_2_steps(replica):
    """Serve cancels the replica's coroutine when the client goes away: the thread that runs
    the pipeline is told, and stops at its next step callback."""
    steps_at_cancel: list[int] = []

    def on_event(event: str, n: int) -> None:
        if event == "client_gone":
            steps_at_cancel.append(replica.counters["steps"])

    async def scenario() -> None:
        task = asyncio.ensure_future(
            replica.serve_request(
                replica.product,
                request(replica.product, steps=150),
                lambda _: _adapter(replica.handle),
            )
        )
        while replica.counters["steps"] - before < 3:  # it is generating
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    replica.on_event = on_event
    before = replica.counters["steps"]
    cancelled = replica.counters["cancelled"]
    try:
        asyncio.run(scenario())
        with replica.lock:  # the generation thread has let go of the pipeline
            pass
    finally:
        replica.on_event = None
    assert replica.counters["cancelled"] == cancelled + 1
    (at_cancel,) = steps_at_cancel
    assert replica.counters["steps"] - at_cancel <= 2, (at_cancel, replica.counters["steps"])
    assert replica.counters["steps"] - before < 150
    # The replica is free and serves the next request.
    out = asyncio.run(
        replica.serve_request(
            replica.product, request(replica.product, steps=2), lambda _: _adapter(replica.handle)
        )
    )
    assert len(out["images"]) == 1


def test_a_passed_deadline_stops_the_generation_before_it_starts(replica):
    before = replica.counters["steps"]
    with pytest.raises(GenerationCancelled, match="deadline"):
        asyncio.run(
            replica.serve_request(
                replica.product,
                request(replica.product, steps=50, deadline_at=time.time() - 1),
                lambda _: _adapter(replica.handle),
            )
        )
    assert replica.counters["steps"] == before


def test_queue_ms_includes_the_wait_for_the_pipeline_lock(replica):
    """A request that waits for another's generation reports that wait as queue time."""
    replica.lock.acquire()  # another request is generating
    received = time.time()
    result: dict = {}

    def run() -> None:
        result.update(
            asyncio.run(
                replica.serve_request(
                    replica.product,
                    request(replica.product, steps=1, received_at=received),
                    lambda _: _adapter(replica.handle),
                )
            )
        )

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.5)
    held = time.time() - received  # the request cannot start before the lock is released
    replica.lock.release()
    worker.join()
    assert result["queue_ms"] >= held * 1000, (result["queue_ms"], held)


def _serve_status(running: dict[str, int]):
    """Serve's status of the app "restage" with ``running`` replicas per deployment (a
    deployment left out is not deployed yet), each with one more replica still starting."""
    from types import SimpleNamespace

    deployments = {
        name: SimpleNamespace(replica_states={"RUNNING": n, "STARTING": 1})
        for name, n in running.items()
    }
    app = SimpleNamespace(deployments=deployments)
    return lambda: SimpleNamespace(applications={"restage": app})


def test_readiness_comes_from_serve_status_without_waiting_for_a_replica(tmp_path, monkeypatch):
    """A replica still loading (or dead) must not make /healthz wait: the count of running
    generator replicas comes from Serve's controller."""
    from types import SimpleNamespace

    from ray import serve

    class Hangs:
        def __getattr__(self, name):
            raise AssertionError("readiness must not call a generator replica")

    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="restage"))
    svc = service(tmp_path, generator=Hangs())
    for running, expected in (({}, 0), ({"Generator": 0}, 0), ({"Generator": 2}, 2)):
        monkeypatch.setattr(serve, "status", _serve_status(running))
        assert asyncio.run(svc.ready()) == {"Generator": expected}


@pytest.mark.parametrize(
    ("running", "said"),
    [
        ({"Generator": 1, "Ranker": 2, "Stager": 1}, None),
        ({"Generator": 1}, "no ranker or stager replica is running yet"),
        ({"Generator": 1, "Ranker": 0, "Stager": 1}, "no ranker replica is running yet"),
        ({"Ranker": 1, "Stager": 1}, "no generator replica is running yet"),
    ],
)
def test_healthz_is_ready_only_when_every_deployment_a_request_needs_runs(
    tmp_path, monkeypatch, running, said
):
    """The ingress answers as soon as it is up, while the ranker and stager may still be
    deploying (or all their replicas restarting): a load balancer told "ready" then would
    send requests that wait or fail. Every deployment the app calls must have a replica."""
    from types import SimpleNamespace

    from ray import serve

    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="restage"))
    monkeypatch.setattr(serve, "status", _serve_status(running))
    svc = service(tmp_path, ranker=object(), stager=object())
    if said is None:
        assert asyncio.run(svc.health()) == {
            "status": "ok",
            "generator_replicas": 1,
            "ranker_replicas": 2,
            "stager_replicas": 1,
        }
        return
    with pytest.raises(ApiError) as err:
        asyncio.run(svc.health())
    assert err.value.code == "not_ready" and err.value.message == said
    assert err.value.status == 503 and err.value.retry_after_s == 1
