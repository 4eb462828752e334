"""The HTTP API's request and response bodies (they are also the OpenAPI schema at /docs).

Every numeric field is bounded; an unknown field is an error, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ray_app.records import RecordError, validate_product_id

MAX_SEED = 2**63 - 1


class GenerateRequest(BaseModel):
    """POST /v1/generate"""

    # Strict: true is not 1, "3" is not 3, "yes" is not true (the ingress also validates
    # with strict=True).
    model_config = ConfigDict(extra="forbid", strict=True)

    product_id: str = Field(description="A product with an adapter from `restage train`.")
    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=600,
        description="Scene description; `{product}` marks where the product goes (its token "
        "phrase is put there, or in front when absent). Default: a prompt-bank scene for the "
        "product's type.",
    )
    num_images: int = Field(1, ge=1, le=8, description="Images to generate (1-8).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed, same images.")
    steps: int | None = Field(None, ge=1, le=150, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=30.0, description="Classifier-free guidance."
    )
    width: int | None = Field(None, ge=64, le=2048, description="Multiple of 8.")
    height: int | None = Field(None, ge=64, le=2048, description="Multiple of 8.")
    rank: bool = Field(False, description="Sort images by the ranking score and return the scores.")
    response_format: Literal["base64", "uri"] = Field(
        "base64",
        description="PNG bytes in base64, or URIs of stored PNGs (needs serve.output_uri).",
    )

    @field_validator("product_id")
    @classmethod
    def _product_id(cls, value: str) -> str:
        try:
            return validate_product_id(value)
        except RecordError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (use {value - value % 8})")
        return value


class Timings(BaseModel):
    queue_ms: float = Field(
        description="From the ingress receiving the request to its generation starting "
        "(routing, the replica's queue and the wait for the pipeline lock), less its own "
        "adapter load."
    )
    adapter_load_ms: float = Field(description="0 when the replica already held the adapter.")
    generation_ms: float
    ranking_ms: float
    total_ms: float


class ImageOut(BaseModel):
    seed: int
    png_base64: str | None = None
    uri: str | None = None
    rank: int | None = Field(None, description="1 = best, when ranked.")
    score: float | None = Field(
        None, description="The ranking's score (higher is better; see `ranking`), when ranked."
    )
    scores: dict[str, float | None] | None = Field(None, description="Each metric, when ranked.")


class GenerateResponse(BaseModel):
    product_id: str
    prompt: str
    images: list[ImageOut]
    ranking: str | None = Field(
        None,
        description="The ranking that made the scores (generate.ranking: 'paper' sums raw "
        "CLIP-T, CLIP-I and DINO; 'weighted' is a weighted mean in [0, 1]), when ranked.",
    )
    adapter: dict[str, Any] = Field(description="The adapter's metadata (adapter.json).")
    replica: str
    request_id: str = Field(description="Also in the X-Request-ID header; quote it in reports.")
    timings: Timings


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer (serve/errors.py lists the codes)."""

    error: str = Field(description="A stable code, e.g. invalid_request, rate_limited.")
    message: str = Field(description="What went wrong, for people.")
    request_id: str = Field(description="The server's logs hold the details under this id.")
    detail: list[FieldError] | None = Field(
        None, description="The fields at fault, for invalid input."
    )


class StageRequest(BaseModel):
    """POST /v1/stage"""

    model_config = ConfigDict(extra="forbid", strict=True)

    product_id: str = Field(
        description="The product: its own catalog scenes are never used. Without image_base64 "
        "it must have an adapter (its first real photo is staged)."
    )
    image_base64: str | None = Field(
        None,
        description="The product's photo (JPEG, PNG, WebP; a packshot on a plain background "
        "is cut out without a model), base64; at most serve.max_upload_bytes of body.",
    )
    category: str | None = Field(
        None, max_length=200, description="Its category: scenes of it are retrieved first."
    )
    num_images: int | None = Field(
        None,
        ge=1,
        le=16,
        description="Staged images to return (default stage.keep; at most stage.top_k).",
    )

    @field_validator("product_id")
    @classmethod
    def _product_id(cls, value: str) -> str:
        try:
            return validate_product_id(value)
        except RecordError as exc:
            raise ValueError(str(exc)) from None


class StagedImage(BaseModel):
    png_base64: str
    scene_image_id: str
    scene_product_id: str
    similarity: float
    placement: list[int] = Field(description="x0, y0, x1, y1 of the product in the image.")
    score: float
    scores: dict[str, float | None]
    rank: int


class StageResponse(BaseModel):
    product_id: str
    images: list[StagedImage]
    mask_method: str | None
    request_id: str
    timings: dict[str, float]
