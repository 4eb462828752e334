"""The HTTP ingress: authentication, validation and limits, then the generator (and the
ranker) through deployment handles.

Nothing from a request reaches storage before ``product_id`` has passed the same rule as
the manifest's records (a path segment of letters, digits, ``.``, ``_``, ``-``), so no
request can name a path outside the adapters root.
"""

import asyncio
import base64
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ray_app import storage
from ray_app.config import RestageConfig
from ray_app.prompts import PLACEHOLDER, PromptBank, fill
from ray_app.records import RecordError, validate_product_id
from ray_app.seeds import derive_seed
from ray_app.storage import AdapterLayout
from serve.api import ErrorBody, GenerateRequest, GenerateResponse
from serve.auth import check_authorization

app = FastAPI(
    title="restage",
    description="Generate images of a trained product in new scenes. Send `Authorization: Bearer "
    "<key>`; keys come from RESTAGE_API_KEYS or RESTAGE_API_KEYS_FILE.",
    version="1",
)

_GENERATE_SCHEMA = GenerateRequest.model_json_schema()


class HTTPError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None):
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail: Any = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        ErrorBody(error=error, detail=detail).model_dump(), status_code=status, headers=headers
    )


def field_errors(err: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as [{field, message}], the field named in dotted form."""
    out = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "body"
        out.append({"field": field, "message": item["msg"].removeprefix("Value error, ")})
    return out


# What a client sees of adapter.json (the rest names internal storage and training details).
PUBLIC_ADAPTER_FIELDS = (
    "product_id",
    "token",
    "noun",
    "product_type",
    "rank",
    "alpha",
    "steps",
    "resolution",
    "base",
    "final_loss",
    "finished",
    "restage_version",
)


def public_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    out = {k: meta[k] for k in PUBLIC_ADAPTER_FIELDS if k in meta}
    if isinstance(out.get("base"), dict):
        out["base"] = {k: out["base"].get(k) for k in ("source", "revision")}
    return out


def product_phrase(meta: dict[str, Any]) -> str:
    return f"{meta['token']} {meta['noun']}"


def build_prompt(prompt: str | None, meta: dict[str, Any], bank: PromptBank, seed: int) -> str:
    """The user's prompt with the product's token phrase at ``{product}`` (or in front), or a
    prompt-bank scene of the product's type."""
    phrase = product_phrase(meta)
    if prompt is None:
        prompt = bank.prompts(meta.get("product_type"), 1, seed)[0]
    if PLACEHOLDER in prompt:
        return fill(prompt, phrase)
    return f"a photo of {phrase}, {prompt}"


class IngressService:
    """The body of the ``Ingress`` deployment (plain Python: testable without Serve)."""

    def __init__(
        self,
        config: RestageConfig,
        adapters_root: str,
        key_digests: tuple[str, ...],
        generator: Any,
        ranker: Any | None,
        require_auth: bool,
    ):
        self.config = config
        self.layout = AdapterLayout(storage.normalize_uri(adapters_root))
        self.key_digests = tuple(key_digests)
        self.require_auth = require_auth
        self.generator = generator
        self.ranker = ranker
        self.bank = PromptBank.load(config.augment.prompt_bank)
        self._meta: dict[str, tuple[float, dict[str, Any] | None]] = {}

    # ------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if not self.require_auth:
            return
        check = check_authorization(request.headers.get("authorization"), self.key_digests)
        if check.status != 200:
            raise HTTPError(
                check.status, "unauthorized" if check.status == 401 else "forbidden", check.reason
            )

    async def read_json(self, request: Request) -> Any:
        limit = self.config.serve.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, "body too large", f"{declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():  # also bounds bodies sent without a length
            body += chunk
            if len(body) > limit:
                raise HTTPError(413, "body too large", f"over {limit} bytes")
        try:
            return json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(422, "invalid JSON", [{"field": "body", "message": str(exc)}]) from None

    def metadata(self, product_id: str) -> dict[str, Any]:
        """adapter.json of a product (cached briefly); 404 when there is none."""
        try:
            validate_product_id(product_id)
        except RecordError as exc:
            raise HTTPError(
                422, "invalid product_id", [{"field": "product_id", "message": str(exc)}]
            ) from None
        now = time.monotonic()
        cached = self._meta.get(product_id)
        if cached is None or now - cached[0] > self.config.serve.metadata_ttl_s:
            uri = self.layout.metadata(product_id)
            meta = storage.read_json(uri) if storage.exists(uri) else None
            if len(self._meta) > 10_000:
                self._meta.clear()
            self._meta[product_id] = cached = (now, meta)
        if cached[1] is None:
            raise HTTPError(404, "unknown product", f"no adapter for product {product_id!r}")
        return cached[1]

    # ------------------------------------------------------------------ routes

    async def generate(self, request: Request) -> dict[str, Any]:
        received = time.time()
        self.authorize(request)
        try:
            body = GenerateRequest.model_validate(await self.read_json(request))
        except ValidationError as err:
            raise HTTPError(422, "invalid request", field_errors(err)) from None
        s = self.config.serve
        width, height = (
            body.width or self.config.generate.width,
            body.height or self.config.generate.height,
        )
        if width * height > s.max_pixels:
            raise HTTPError(
                422,
                "invalid request",
                [
                    {
                        "field": "width",
                        "message": f"{width}x{height} is above serve.max_pixels={s.max_pixels}",
                    }
                ],
            )
        if body.response_format == "uri" and not s.output_uri:
            raise HTTPError(
                422,
                "invalid request",
                [
                    {
                        "field": "response_format",
                        "message": "'uri' needs serve.output_uri to be configured",
                    }
                ],
            )
        meta = self.metadata(body.product_id)
        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "big")
        prompt = build_prompt(
            body.prompt, meta, self.bank, derive_seed(body.product_id, "serve-prompt", 0, seed)
        )
        seeds = [derive_seed(body.product_id, f"serve/{seed}", i) for i in range(body.num_images)]
        try:
            out = await self.generator.options(
                multiplexed_model_id=body.product_id
            ).generate.remote(
                {
                    "prompt": prompt,
                    "seeds": seeds,
                    "steps": body.steps,
                    "guidance_scale": body.guidance_scale,
                    "width": body.width,
                    "height": body.height,
                    "received_at": received,
                }
            )
        except (
            Exception
        ) as exc:  # the adapter failed to load or the replica failed: this request only
            raise HTTPError(503, "generation unavailable", _root_cause(exc)) from None
        images = [{"seed": s_, "data": data} for s_, data in zip(seeds, out["images"], strict=True)]
        ranking_ms = 0.0
        if body.rank:
            if self.ranker is None:
                raise HTTPError(
                    503, "ranking unavailable", "the server was started without a ranker"
                )
            start = time.perf_counter()
            ranked = await self.ranker.rank.remote(
                body.product_id, meta, [i["data"] for i in images], prompt
            )
            ranking_ms = (time.perf_counter() - start) * 1000
            for image, rank, score, scores in zip(
                images, ranked["ranks"], ranked["scores"], ranked["metrics"], strict=True
            ):
                image.update(rank=rank, score=score, scores=scores)
            images.sort(key=lambda i: (i["rank"] is None, i["rank"] or 0))
        request_id = uuid.uuid4().hex[:12]
        for i, image in enumerate(images):
            data = image.pop("data")
            if body.response_format == "uri":
                uri = storage.join(
                    storage.normalize_uri(s.output_uri), body.product_id, f"{request_id}-{i}.png"
                )
                image["uri"] = storage.write_bytes(uri, data)
            else:
                image["png_base64"] = base64.b64encode(data).decode()
        response = GenerateResponse(
            product_id=body.product_id,
            prompt=prompt,
            images=images,
            adapter=public_metadata(meta),
            replica=out["replica"],
            timings={
                "queue_ms": out["queue_ms"],
                "adapter_load_ms": out["adapter_load_ms"],
                "generation_ms": out["generation_ms"],
                "ranking_ms": ranking_ms,
                "total_ms": (time.time() - received) * 1000,
            },
        )
        return response.model_dump(exclude_none=True)


def _root_cause(exc: BaseException) -> str:
    """The innermost message of a Ray error chain (the user error, not Ray's wrapping)."""
    while getattr(exc, "cause", None) is not None:
        exc = exc.cause
    text = str(exc).strip().splitlines()
    return text[-1][:500] if text else type(exc).__name__


def serve_deployment(config: RestageConfig):
    """The Ray Serve ingress deployment class (routes on the module's FastAPI app)."""
    from ray import serve

    @serve.deployment(
        name="Ingress",
        num_replicas=config.serve.ingress_replicas,
        ray_actor_options={"num_cpus": config.serve.ingress_cpus},
        max_ongoing_requests=config.serve.ingress_max_ongoing_requests,
    )
    @serve.ingress(app)
    class Ingress:
        def __init__(
            self,
            generator,
            ranker,
            config: RestageConfig,
            adapters_root: str,
            key_digests: tuple[str, ...],
            require_auth: bool,
        ):
            self.service = IngressService(
                config, adapters_root, key_digests, generator, ranker, require_auth
            )

        async def _guard(self, call):
            try:
                return await call()
            except HTTPError as exc:
                return error_response(exc.status, exc.error, exc.detail)

        @app.post(
            "/v1/generate",
            response_model=GenerateResponse,
            response_model_exclude_none=True,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _GENERATE_SCHEMA}},
                },
            },
            responses={
                401: {"model": ErrorBody},
                403: {"model": ErrorBody},
                404: {"model": ErrorBody},
                413: {"model": ErrorBody},
                422: {"model": ErrorBody},
                503: {"model": ErrorBody},
            },
        )
        async def generate(self, request: Request):
            return await self._guard(lambda: self.service.generate(request))

        @app.get("/v1/products/{product_id}", responses={404: {"model": ErrorBody}})
        async def product(self, product_id: str, request: Request):
            async def call():
                self.service.authorize(request)
                return public_metadata(self.service.metadata(product_id))

            return await self._guard(call)

        @app.get("/v1/stats")
        async def stats(self, request: Request):
            """One generator replica's adapters, counters and memory, and the Prometheus
            endpoints whose metrics cover every replica."""

            async def call():
                from serve.metrics import metrics_endpoints

                self.service.authorize(request)
                stats = await self.service.generator.stats.remote()
                return {**stats, "metrics_endpoints": await asyncio.to_thread(metrics_endpoints)}

            return await self._guard(call)

        @app.get("/healthz")
        async def healthz(self):
            """200 only when a generator replica has its base model loaded."""
            try:
                await asyncio.wait_for(self.service.generator.ready.remote(), timeout=5)
            except Exception as exc:
                return error_response(
                    503, "not ready", _root_cause(exc) or "no generator replica yet"
                )
            return {"status": "ok"}

    return Ingress
