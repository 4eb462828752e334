"""`restage stage train-inpainter`: the settings of the boundary-weighted LoRA fine-tuning of
the inpainter (retrieval-assisted staging, arXiv 2307.15326, eq. 1; ``actors.inpaint_trainer``).

A section of its own for now; it is meant to become ``stage.train_inpainter`` of the stage
config. Errors name the key, the value and the fix, as everywhere in ``ray_app.config``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ray_app.config import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, StrictModel


class InpaintTrainConfig(StrictModel):
    """One LoRA on the inpainter's denoiser, trained to fill product-shaped holes in catalog
    scenes with the scene behind them; the denoising loss is weighted up on the band around
    the hole's edge (``weighting``), where a staged product's seams show."""

    steps: PositiveInt = Field(1000, description="Optimiser steps.")
    learning_rate: PositiveFloat = Field(1e-4, description="AdamW learning rate of the LoRA.")
    rank: PositiveInt = Field(16, description="LoRA rank.")
    target_modules: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"],
        description="Names of the denoiser's layers that get LoRA (attention projections).",
    )
    batch_size: PositiveInt = Field(4, description="Scenes per step.")
    resolution: PositiveInt = Field(
        1024,
        description="Square training resolution in pixels (shorter side resized, centre "
        "crop); a multiple of 8.",
    )
    weighting: bool = Field(
        True,
        description="Weight the per-latent-pixel denoising MSE by the boundary map "
        "(ray_app.boundary_weights); off: the plain mean MSE.",
    )
    band: PositiveInt = Field(
        16,
        description="Width in pixels (at the training resolution) of the band on either side "
        "of the hole's edge where the weight peaks.",
    )
    peak: Annotated[float, Field(ge=1)] = Field(
        5.0, description="Weight on the band, relative to 1 elsewhere (before the mean-1 scaling)."
    )
    dilation: NonNegativeInt = Field(
        4,
        description="Pixels the synthetic product-shaped holes are grown by (at the training "
        "resolution), as `restage stage` grows the removed product to take its halo along.",
    )
    random_placement: Fraction = Field(
        0.5,
        description="Share of the holes placed at a random spot of the scene's lower half; the "
        "rest are fitted where the scene's own product stands.",
    )
    prompt: str = Field(
        "",
        description="Prompt the inpainter is trained with; give the one `restage stage` paints "
        "the gaps with.",
    )
    held_out: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1,
        description="Share of the scenes kept out of training (their loss is reported; the "
        "benchmark inpaints them).",
    )
    seed: NonNegativeInt = Field(
        0,
        description="Seed of the held-out split, the holes, the LoRA's initialisation and "
        "every noise and timestep draw.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype of the frozen base while training ('auto': bfloat16 on CUDA, float32 "
        "on CPU); the LoRA and its optimiser state stay float32.",
    )
    save_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Dtype of the saved LoRA weights."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute denoiser activations in backward (less memory, slower)."
    )

    @model_validator(mode="after")
    def _check(self) -> InpaintTrainConfig:
        if self.resolution % 8:
            raise ValueError(
                f"resolution={self.resolution} must be a multiple of 8 (latent grid): use "
                f"{self.resolution - self.resolution % 8 or 8}"
            )
        if 2 * self.band >= self.resolution:
            raise ValueError(
                f"band={self.band} is half of resolution={self.resolution} or more: every "
                f"pixel would be on the edge band; lower band (e.g. {max(1, self.resolution // 32)})"
            )
        if not self.target_modules or any(not m.strip() for m in self.target_modules):
            raise ValueError(
                f"target_modules={self.target_modules}: give at least one module name, "
                "e.g. [to_q, to_k, to_v, to_out.0]"
            )
        return self
