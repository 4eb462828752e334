"""The HTTP ingress: authentication, validation, budgets and limits, then the generator (and
the ranker) through deployment handles.

Nothing from a request reaches storage before ``product_id`` has passed the same rule as
the manifest's records (a path segment of letters, digits, ``.``, ``_``, ``-``), so no
request can name a path outside the adapters root. Error answers carry a stable code, a
short message and the request id, never internal text (``serve.errors``).
"""

import asyncio
import base64
import binascii
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError

from ray_app import storage
from ray_app.adapter_meta import AdapterMeta, AdapterMetaError
from ray_app.config import RestageConfig
from ray_app.prompts import PLACEHOLDER, PromptBank, fill
from ray_app.records import RecordError, validate_product_id
from ray_app.seeds import derive_seed
from ray_app.storage import AdapterLayout
from serve.api import (
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    StageRequest,
    StageResponse,
)
from serve.auth import check_authorization
from serve.bodies import check_media_type, parse_json
from serve.budget import Budgets, request_cost
from serve.errors import (
    AdapterNotFound,
    AdapterUnavailable,
    ApiError,
    GenerationCancelled,
    error_response,
    log,
    new_request_id,
    unexpected,
)

_GENERATE_SCHEMA = GenerateRequest.model_json_schema()
_STAGE_SCHEMA = StageRequest.model_json_schema()


def make_app(config: RestageConfig) -> FastAPI:
    """The FastAPI app of the ingress. The Swagger UI and ReDoc pages load their scripts from
    a CDN in the browser, so they are off unless ``serve.docs``; /openapi.json is served."""
    docs = config.serve.docs
    return FastAPI(
        title="restage",
        description="Generate images of a trained product in new scenes. Send `Authorization: "
        "Bearer <key>`. Errors are `{error, message, request_id}`; `error` is a stable code.",
        version="1",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )


def field_errors(err: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as [{field, message}], the field named in dotted form."""
    out = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "body"
        out.append({"field": field, "message": item["msg"].removeprefix("Value error, ")})
    return out


def invalid(field: str, message: str) -> ApiError:
    return ApiError(
        "invalid_request", f"{field}: {message}", [{"field": field, "message": message}]
    )


# What a client sees of an adapter's metadata (the rest names internal storage and training
# details).
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


def public_metadata(meta: AdapterMeta) -> dict[str, Any]:
    out = meta.model_dump(mode="json", include=set(PUBLIC_ADAPTER_FIELDS))
    out["base"] = {k: out["base"][k] for k in ("source", "revision")}
    return out


def build_prompt(prompt: str | None, meta: AdapterMeta, bank: PromptBank, seed: int) -> str:
    """The user's prompt with the product's token phrase at ``{product}`` (or in front), or a
    prompt-bank scene of the product's type."""
    phrase = meta.phrase
    if prompt is None:
        prompt = bank.prompts(meta.product_type, 1, seed)[0]
    if PLACEHOLDER in prompt:
        return fill(prompt, phrase)
    return f"a photo of {phrase}, {prompt}"


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (Ray's task errors keep the replica's error in ``cause``)."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = getattr(exc, "cause", None) or exc.__cause__
    return chain


def replica_died(exc: BaseException) -> bool:
    """The generator replica (not the request) failed: the same request may succeed on
    another replica."""
    from ray.exceptions import RayActorError, WorkerCrashedError
    from ray.serve.exceptions import ReplicaUnavailableError

    died = (RayActorError, WorkerCrashedError, ReplicaUnavailableError)
    return any(isinstance(e, died) for e in _causes(exc))


def generation_error(exc: BaseException) -> ApiError:
    """The client's answer for a generator failure; the text only goes to the log."""
    internal = f"{type(exc).__name__}: {exc}"[:4000]
    for cause in _causes(exc):
        if isinstance(cause, AdapterNotFound):
            return ApiError("unknown_product", "no adapter for this product", internal=internal)
        if isinstance(cause, AdapterUnavailable):
            return ApiError(
                "adapter_unavailable", "the product's adapter is unavailable", internal=internal
            )
        if isinstance(cause, GenerationCancelled):
            return ApiError(
                "deadline_exceeded",
                "the generation was stopped at serve.request_timeout_s",
                internal=internal,
            )
    return ApiError(
        "generation_unavailable",
        "generation failed; retry later",
        internal=internal,
        retry_after_s=1,
    )


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
        stager: Any | None = None,
    ):
        self.config = config
        self.stager = stager
        self.layout = AdapterLayout(storage.normalize_uri(adapters_root))
        self.key_digests = tuple(key_digests)
        self.require_auth = require_auth
        self.generator = generator
        self.ranker = ranker
        self.bank = PromptBank.load(config.augment.prompt_bank)
        self.budgets = Budgets(config.serve.budget)
        self._meta: dict[str, tuple[float, AdapterMeta | None]] = {}

    # ------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> str:
        """-> the caller's identity for budgets: its key's digest (``anonymous`` without auth)."""
        if not self.require_auth:
            return "anonymous"
        check = check_authorization(request.headers.get("authorization"), self.key_digests)
        if check.status != 200:
            raise ApiError("unauthorized" if check.status == 401 else "forbidden", check.reason)
        return check.key_digest

    async def read_json(self, request: Request, limit: int | None = None) -> Any:
        """The body's JSON value; 415, 413 (over ``limit``, default serve.max_body_bytes) and
        422 (too deep, not JSON) before anything else reads it."""
        check_media_type(request.headers.get("content-type"))
        limit = limit or self.config.serve.max_body_bytes
        name = (
            "max_upload_bytes" if limit == self.config.serve.max_upload_bytes else "max_body_bytes"
        )
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError("body_too_large", f"{declared} bytes; the limit is serve.{name}={limit}")
        body = bytearray()
        async for chunk in request.stream():  # also bounds bodies sent without a length
            body += chunk
            if len(body) > limit:
                raise ApiError("body_too_large", f"over serve.{name}={limit} bytes")
        return parse_json(bytes(body), self.config.serve.max_json_depth)

    def metadata(self, product_id: str) -> AdapterMeta:
        """A product's adapter metadata (cached briefly); 404 when there is none, 503 when it
        is unreadable, malformed or of a newer restage."""
        try:
            validate_product_id(product_id)
        except RecordError as exc:
            raise invalid("product_id", str(exc)) from None
        now = time.monotonic()
        cached = self._meta.get(product_id)
        if cached is None or now - cached[0] > self.config.serve.metadata_ttl_s:
            uri = self.layout.metadata(product_id)
            try:
                meta = AdapterMeta.read(uri) if storage.exists(uri) else None
            except (OSError, AdapterMetaError) as exc:  # not cached: a rewrite is read again
                raise ApiError(
                    "adapter_unavailable",
                    "the product's adapter is unavailable",
                    internal=f"{uri}: {exc}",
                ) from None
            if len(self._meta) > 10_000:
                self._meta.clear()
            self._meta[product_id] = cached = (now, meta)
        if cached[1] is None:
            raise ApiError("unknown_product", f"no adapter for product {product_id!r}")
        return cached[1]

    # ------------------------------------------------------------------ routes

    async def call_generator(self, product_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The generation, retried once when its replica dies (generations are idempotent:
        the ingress fixed the seeds), which Serve routes to a live replica."""
        for attempt in (1, 2):
            try:
                return await self.generator.options(
                    multiplexed_model_id=product_id
                ).generate.remote(payload)
            except Exception as exc:
                if attempt == 1 and replica_died(exc):
                    log.warning(
                        "request %s: generator replica died (%s); retrying once",
                        payload["request_id"],
                        type(exc).__name__,
                    )
                    continue
                raise generation_error(exc) from None
        raise AssertionError("unreachable")

    async def generate(self, request: Request, request_id: str) -> dict[str, Any]:
        received = time.time()
        caller = self.authorize(request)
        try:
            body = GenerateRequest.model_validate(await self.read_json(request), strict=True)
        except ValidationError as err:
            raise ApiError(
                "invalid_request", "the body does not match the API", field_errors(err)
            ) from None
        s = self.config.serve
        g = self.config.generate
        width, height = body.width or g.width, body.height or g.height
        if width * height > s.max_pixels:
            raise invalid("width", f"{width}x{height} is above serve.max_pixels={s.max_pixels}")
        if body.response_format == "uri" and not s.output_uri:
            raise invalid("response_format", "'uri' needs serve.output_uri to be configured")
        # Before anything touches storage: every request counts against its key's limits.
        self.budgets.charge(
            caller, request_cost(width, height, body.steps or g.steps, body.num_images)
        )
        meta = self.metadata(body.product_id)
        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "big")
        prompt = build_prompt(
            body.prompt, meta, self.bank, derive_seed(body.product_id, "serve-prompt", 0, seed)
        )
        seeds = [derive_seed(body.product_id, f"serve/{seed}", i) for i in range(body.num_images)]
        out = await self.call_generator(
            body.product_id,
            {
                "prompt": prompt,
                "seeds": seeds,
                "steps": body.steps,
                "guidance_scale": body.guidance_scale,
                "width": body.width,
                "height": body.height,
                "received_at": received,
                "deadline_at": received + s.request_timeout_s,
                "request_id": request_id,
            },
        )
        images = [{"seed": s_, "data": data} for s_, data in zip(seeds, out["images"], strict=True)]
        ranking_ms, ranking = 0.0, None
        if body.rank:
            if self.ranker is None:
                raise ApiError("ranking_unavailable", "the server runs without a ranker")
            start = time.perf_counter()
            try:
                ranked = await self.ranker.rank.remote(
                    body.product_id, meta, [i["data"] for i in images], prompt
                )
            except Exception as exc:
                raise ApiError(
                    "ranking_unavailable", "ranking failed; retry later", internal=repr(exc)
                ) from None
            ranking_ms, ranking = (time.perf_counter() - start) * 1000, ranked["ranking"]
            for image, rank, score, scores in zip(
                images, ranked["ranks"], ranked["scores"], ranked["metrics"], strict=True
            ):
                image.update(rank=rank, score=score, scores=scores)
            images.sort(key=lambda i: (i["rank"] is None, i["rank"] or 0))
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
            ranking=ranking,
            adapter=public_metadata(meta),
            replica=out["replica"],
            request_id=request_id,
            timings={
                "queue_ms": out["queue_ms"],
                "adapter_load_ms": out["adapter_load_ms"],
                "generation_ms": out["generation_ms"],
                "ranking_ms": ranking_ms,
                "total_ms": (time.time() - received) * 1000,
            },
        )
        return response.model_dump(exclude_none=True)

    async def stage(self, request: Request, request_id: str) -> dict[str, Any]:
        """POST /v1/stage: a product photo (uploaded, or a trained product's first real
        photo) staged into the index's scenes by the Stager (serve/stager.py)."""
        received = time.time()
        caller = self.authorize(request)
        if self.stager is None:
            raise ApiError(
                "staging_unavailable",
                "this server has no staged-catalog index: start it with --set "
                "serve.stage_index=URI (`restage index`'s OUT/index)",
            )
        s, st = self.config.serve, self.config.stage
        try:
            body = StageRequest.model_validate(
                await self.read_json(request, s.max_upload_bytes), strict=True
            )
        except ValidationError as err:
            raise ApiError(
                "invalid_request", "the body does not match the API", field_errors(err)
            ) from None
        keep = body.num_images or st.keep
        if keep > st.top_k:
            raise invalid("num_images", f"{keep} is above stage.top_k={st.top_k} scenes staged")
        paints = st.top_k * (2 if st.refine_gaps else 1)
        self.budgets.charge(caller, request_cost(st.size, st.size, st.removal.steps, paints))
        if body.image_base64 is not None:
            try:
                data = base64.b64decode(body.image_base64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise invalid("image_base64", f"not base64: {exc}") from None
            category = body.category
        else:  # a trained product: its first real photo
            from actors.scorer import references  # torch: only this path needs it

            meta = self.metadata(body.product_id)
            images, _ = await asyncio.to_thread(references, meta)
            if not images:
                raise ApiError("unknown_product", f"product {body.product_id!r} has no photo")
            data, category = images[0], body.category or meta.product_type
        try:
            out = await self.stager.stage.remote(body.product_id, data, category, keep)
        except Exception as exc:
            raise ApiError(
                "staging_unavailable",
                "staging failed; retry later",
                internal=repr(exc),
                retry_after_s=1,
            ) from None
        if "error" in out:
            raise ApiError(
                "invalid_image",
                f"the photo cannot be staged: {out['error']}",
                [{"field": "image_base64", "message": out["error"]}],
            )
        images = [
            {
                **{k: v for k, v in i.items() if k != "data"},
                "png_base64": base64.b64encode(i["data"]).decode(),
            }
            for i in out["images"]
        ]
        response = StageResponse(
            product_id=body.product_id,
            images=images,
            mask_method=out["mask_method"],
            request_id=request_id,
            timings={**out["timings"], "total_ms": (time.time() - received) * 1000},
        )
        return response.model_dump()

    def backends(self) -> tuple[str, ...]:
        """The deployments this ingress calls (by Serve name): a request needs each of them."""
        names = ["Generator"]
        if self.ranker is not None:
            names.append("Ranker")
        if self.stager is not None:
            names.append("Stager")
        return tuple(names)

    async def ready(self) -> dict[str, int]:
        """Running replicas of each deployment this ingress calls, from Serve's controller:
        answered at once, never by waiting for a replica to answer. The ingress comes up first
        (and answers) while the others may still be deploying, or all be restarting."""
        from ray import serve

        app_name = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(app_name)
        deployments = app.deployments if app else {}
        running = {}
        for name in self.backends():
            deployment = deployments.get(name)
            states = deployment.replica_states if deployment is not None else {}
            running[name] = int(states.get("RUNNING", 0))
        return running

    async def health(self) -> dict[str, Any]:
        """/healthz: ok with the running replicas of each deployment a request needs, or
        ``not_ready`` (503) naming those that have none."""
        try:
            running = await self.ready()
        except Exception as exc:
            raise ApiError(
                "not_ready", "Serve's status is unavailable", internal=repr(exc)
            ) from None
        waiting = [name.lower() for name, n in running.items() if n == 0]
        if waiting:
            raise ApiError(
                "not_ready", f"no {' or '.join(waiting)} replica is running yet", retry_after_s=1
            )
        return {"status": "ok", **{f"{name.lower()}_replicas": n for name, n in running.items()}}


def serve_deployment(config: RestageConfig):
    """The Ray Serve ingress deployment class (routes on a FastAPI app made from config)."""
    from fastapi.responses import JSONResponse
    from ray import serve

    app = make_app(config)
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody} for status in (401, 403, 404, 413, 415, 422, 429, 503, 504)
    }

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
            stager=None,
        ):
            self.service = IngressService(
                config, adapters_root, key_digests, generator, ranker, require_auth, stager
            )

        async def _guard(self, call):
            """Every answer carries the request id; every error is a coded ``ErrorBody``."""
            request_id = new_request_id()
            try:
                result = await call(request_id)
            except ApiError as exc:
                return error_response(exc, request_id, id_header=False)
            except Exception as exc:  # asyncio.CancelledError (client gone) is not caught
                return error_response(unexpected(exc), request_id, id_header=False)
            return JSONResponse(result)  # Serve's proxy adds X-Request-ID: request_id

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
            responses=errors,
        )
        async def generate(self, request: Request):
            return await self._guard(lambda rid: self.service.generate(request, rid))

        @app.post(
            "/v1/stage",
            response_model=StageResponse,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _STAGE_SCHEMA}},
                },
            },
            responses=errors,
        )
        async def stage(self, request: Request):
            """A product photo staged into retrieved catalog scenes (`restage stage`)."""
            return await self._guard(lambda rid: self.service.stage(request, rid))

        @app.get("/v1/products/{product_id}", responses=errors)
        async def product(self, product_id: str, request: Request):
            async def call(request_id: str):
                self.service.authorize(request)
                return public_metadata(self.service.metadata(product_id))

            return await self._guard(call)

        @app.get("/v1/stats", responses=errors)
        async def stats(self, request: Request):
            """One generator replica's adapters, counters and memory, and the Prometheus
            endpoints whose metrics cover every replica."""

            async def call(request_id: str):
                from serve.metrics import metrics_endpoints

                self.service.authorize(request)
                try:
                    stats = await self.service.generator.stats.remote()
                except Exception as exc:
                    raise ApiError(
                        "generation_unavailable",
                        "no generator replica answered",
                        internal=repr(exc),
                    ) from None
                return {**stats, "metrics_endpoints": await asyncio.to_thread(metrics_endpoints)}

            return await self._guard(call)

        @app.get("/healthz", responses=errors)
        async def healthz(self, request: Request):
            """200 when every deployment a request needs (the generator, and the ranker and
            stager where configured) has a running replica, else 503 naming those that have
            none; at once (Serve's controller is asked, no replica is waited for)."""

            return await self._guard(lambda rid: self.service.health())

    return Ingress
