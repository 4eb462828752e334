"""The names that jobs share through their outputs: the kinds of training samples (augment
writes them, train and generate read them) and the fidelity metrics (the scorer computes
them, config weights and ranges name them, manifests store them as columns, serve returns
them). Each name is defined here and nowhere else; compare and look up with the members
(they are ``str``, so they equal their values in Parquet columns, JSON and YAML keys)."""

from __future__ import annotations

from enum import StrEnum


class SampleKind(StrEnum):
    """Where a sample of a product's training set came from (paper 2.1)."""

    REAL = "real"  # one of the product's own photos
    VIEW = "view"  # a novel view from image-to-video diffusion
    CONTEXT = "context"  # the product pasted back into an outpainted scene
    NEGATIVE = "negative"  # an in-class look-alike generated from a product-free caption
    COUNTERFACTUAL = "counterfactual"  # a real photo with the product inpainted away


# Positives show the product; negatives are trained with their own captions (no token).
POSITIVE_KINDS = (SampleKind.REAL, SampleKind.VIEW, SampleKind.CONTEXT)
NEGATIVE_KINDS = (SampleKind.NEGATIVE, SampleKind.COUNTERFACTUAL)
SYNTHETIC_POSITIVE_KINDS = (SampleKind.VIEW, SampleKind.CONTEXT)  # filtered; reals always kept
assert set(POSITIVE_KINDS) | set(NEGATIVE_KINDS) == set(SampleKind)


class Metric(StrEnum):
    """A fidelity metric of an image against a product's real images (actors/scorer.py)."""

    CLIP_T = "clip_t"  # CLIP image vs the prompt or caption
    CLIP_I = "clip_i"  # CLIP image vs the real images
    SEG_CLIP_I = "seg_clip_i"  # ... on product crops (both masks needed)
    DINO = "dino"  # DINOv2 image vs the real images
    SEG_DINO = "seg_dino"  # ... on product crops
    SEG_CLIP_T = "seg_clip_t"  # CLIP product crop vs the prompt (evaluation; weight 0 elsewhere)
    # the product crop vs the real photos' under the product's own encoder (`restage
    # personalize`; actors/personal_fidelity.py); null where the product has no encoder
    PERSONAL_FIDELITY = "personal_fidelity"


# augment's own score of a context sample: IoU of the product re-segmented after
# outpainting with the mask it was pasted with (not a fidelity metric: no weight, no range).
MASK_IOU = "mask_iou"
# augment's own score of a view or context: its product's detail at the training resolution
# relative to the real photos' (1.0 = as sharp as the median real photo; ray_app.metrics).
SHARPNESS = "sharpness"


class Question(StrEnum):
    """A question raters answer about one generated image (paper A.3, in its order)."""

    PRODUCT_FIDELITY = "product_fidelity"  # is it the same product as in the photos?
    LOGO_TEXT = "logo_text"  # are its logos and text reproduced faithfully?
    REALISTIC_USE = "realistic_use"  # is the product used as it would be in life?
    PRODUCT_SIZE = "product_size"  # is its size plausible against the scene?
    NO_HALLUCINATIONS = "no_hallucinations"  # free of background/foreground hallucinations?
    PLACEMENT = "placement"  # is it placed plausibly (resting, not floating)?
    SAFETY = "safety"  # is the image safe to show?
    BUSINESS_USE = "business_use"  # would a business owner use this image?


class Answer(StrEnum):
    """The paper's 4-point scale (A.3); only YES counts as a pass."""

    YES = "yes"
    MAYBE = "maybe"
    NO = "no"
    UNCLEAR = "unclear"
