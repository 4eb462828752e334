"""Pure pre/post-processing of augment, tested without any model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import EXAMPLES
from PIL import Image

from actors.captioner import clean_caption
from actors.inpainter import place_product, square_canvas
from actors.novel_view import letterbox, unletterbox
from actors.segmenter import (
    Segmenter,
    border_stats,
    fill_holes,
    plain_background_mask,
    prompt_from_saliency,
    saliency,
    select_mask,
)
from pipelines._product_rows import pack, unpack
from pipelines.augment import (
    InpaintStage,
    ProductState,
    ResegmentStage,
    Sample,
    ScoreStage,
    _Stage,
    balance_ratio,
    decode_products,
    negatives_needed,
    select_samples,
    strip_product_words,
    write_products,
)
from ray_app import storage
from ray_app.batching import object_array
from ray_app.clip_text import count_tokens
from ray_app.config import load_config
from ray_app.images import crop_by_mask, decode_rgb, dilate, encode_png, mask_bbox, paste_back
from ray_app.kinds import POSITIVE_KINDS, SampleKind
from ray_app.metrics import aggregate, mask_iou, mean_similarity
from ray_app.prompts import (
    GENERIC,
    PLACEHOLDER,
    CurationRules,
    PromptBank,
    classify,
    curate,
    fill,
    product_description,
)
from ray_app.records import ProductRecord, read_manifest, records_table
from ray_app.sources import SourcePolicy
from ray_app.storage import AugmentLayout

# --------------------------------------------------------------------------- masks


def _square(size=32, box=(8, 8, 24, 24)) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return m


def test_mask_iou():
    a = _square(box=(0, 0, 16, 16))
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, _square(box=(16, 16, 32, 32))) == 0.0
    assert mask_iou(a, _square(box=(8, 0, 24, 16))) == pytest.approx(1 / 3)
    assert mask_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 0.0  # no product found is not a match
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(a, np.zeros((3, 3)))


def test_crop_by_mask_cuts_the_box_blanks_the_rest_and_pads_to_square():
    rgb = np.full((32, 32, 3), 7, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[10:20, 12:16] = 255
    mask[10, 12] = 0  # a pixel inside the box but outside the mask
    crop = crop_by_mask(rgb, mask, pad=0.0, fill=255)
    assert crop.shape == (10, 10, 3)  # the 10x4 box, centred on a square
    assert (crop[:, :3] == 255).all() and (crop[:, 7:] == 255).all()  # the square's margins
    assert (crop[0, 3] == 255).all() and (crop[5, 5] == 7).all()
    padded = crop_by_mask(rgb, mask, pad=0.5)
    assert padded.shape == (20, 20, 3)  # 5 rows and 2 columns of context each side
    assert crop_by_mask(rgb, np.zeros((32, 32), np.uint8)) is None
    assert mask_bbox(mask) == (12, 10, 16, 20)


def test_a_tall_products_crop_keeps_all_of_it_through_a_backbones_centre_crop():
    """A 1:4 bottle: the backbones resize the shorter side and centre-crop a square, which
    would score a tall crop on its middle. The square crop survives that whole."""
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)  # a cluttered scene
    mask = np.zeros((96, 96), np.uint8)
    mask[8:88, 40:60] = 255  # 80 x 20
    rgb[mask > 0] = (200, 30, 30)
    crop = crop_by_mask(rgb, mask, pad=0.0)
    assert crop.shape[0] == crop.shape[1]
    assert (crop == (200, 30, 30)).all(axis=2).sum() == (mask > 0).sum()  # all of the mask
    backbone = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])
    seen = np.asarray(backbone(Image.fromarray(crop)))
    red = (seen[..., 0] > 150) & (seen[..., 1] < 100)
    rows = np.nonzero(red.any(axis=1))[0]
    assert rows.min() == 0 and rows.max() == 31  # top to bottom: nothing cut off


def test_mean_similarity_excludes_self_and_skips_missing():
    refs = np.array([[1, 0], [0, 1]], np.float32)
    queries = np.array([[1, 0], [0, 1], [np.nan, np.nan]], np.float32)
    sims = mean_similarity(queries, refs, exclude_self=np.array([0, 1, -1]))
    assert sims[0] == pytest.approx(0.0) and sims[1] == pytest.approx(
        0.0
    )  # only the *other* reference
    assert math.isnan(sims[2])


def test_aggregate_normalises_and_renormalises_missing_metrics():
    scores = {"clip_t": np.array([0.35, 0.1, 0.2]), "dino": np.array([1.0, 0.1, np.nan])}
    ranges = {"clip_t": (0.1, 0.35), "dino": (0.1, 1.0)}
    out = aggregate(scores, {"clip_t": 1.0, "dino": 1.0}, ranges)
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(0.0)
    assert out[2] == pytest.approx(0.4)  # dino missing: clip_t alone, (0.2-0.1)/0.25


# --------------------------------------------------------------------------- prompt bank


@pytest.fixture(scope="module")
def bank() -> PromptBank:
    return PromptBank.load()


def test_packaged_bank_is_big_and_curated(bank):
    assert len(bank.types) >= 20
    for t in [*bank.types.values(), bank.generic]:
        assert len(t.prompts) >= 25, t.name
        kept, rejected = curate(t.prompts, bank.rules)
        assert rejected == [], (t.name, rejected[:3])
        assert len(kept) == len(t.prompts)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mug", "mug"),
        ("Red ceramic coffee MUGS", "mug"),
        ("a pair of white sneakers on grass", "sneaker"),
        ("cosmetics bottle", "cosmetics_bottle"),
        ("soda can", "canned_drink"),
        ("rc car", "toy_car"),
        ("candle", "candle"),
        ("a teapot on a kitchen table", "teapot"),
        ("two glass boxes", None),
        ("quantum flux capacitor", None),
        ("", None),
    ],
)
def test_bank_lookup(bank, text, expected):
    assert bank.match(text) == expected


def test_unknown_type_falls_back_to_generic(bank):
    assert bank.type_of("flux_capacitor") is bank.generic
    assert bank.type_of(None).name == GENERIC
    prompts = bank.prompts("flux_capacitor", 3, seed=1)
    assert all(p in bank.generic.prompts for p in prompts)


def test_prompt_draws_are_seeded_and_cycle(bank):
    n = len(bank.types["mug"].prompts) + 5
    a, b = bank.prompts("mug", n, seed=7), bank.prompts("mug", n, seed=7)
    assert a == b and len(a) == n
    assert len(set(a[: n - 5])) == n - 5  # without replacement until the bank is exhausted
    assert bank.prompts("mug", 5, seed=8) != a[:5]


def test_counterfactual_object_is_of_another_type(bank):
    mug_objects = set(bank.types["mug"].objects)
    for seed in range(30):
        assert bank.counterfactual_object("mug", seed) not in mug_objects


def test_classify_order(bank):
    assert classify(bank, "Coffee Mug", "a lamp", ["a chair"]) == ("mug", "category")
    assert classify(bank, "garden hose", None, ["a mug"]) == (GENERIC, "category-unmatched")
    assert classify(bank, None, "Oak desk lamp", []) == ("lamp", "title")
    assert classify(bank, None, None, ["a teapot on a table", "a white teapot"]) == (
        "teapot",
        "captioner",
    )
    assert classify(bank, None, None, ["zzz"]) == (None, "unresolved")


def test_fill_puts_the_product_in():
    assert fill("a {product} on a table", "zwx mug") == "a zwx mug on a table"


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("a {product} on a table", "below"),
        ("a {product} held in a hand on a sunny wooden kitchen table", "banned word 'hand'"),
        ("a {product} beside a {product} on a wooden kitchen table at noon", "exactly once"),
        ("a mug on a wooden kitchen table in soft morning light", "exactly once"),
        (" ".join(["word"] * 41) + " {product}", "above max_words"),
        ("a {product} on a wooden kitchen table in soft light ☕", "printable ASCII"),
    ],
)
def test_curation_rejects(prompt, reason):
    rules = CurationRules(max_words=40, banned_words=("hand", "logo"))
    kept, rejected = curate([prompt], rules)
    assert kept == [] and reason in rejected[0][1]


def test_curation_cleans_and_dedupes():
    rules = CurationRules(max_words=40, banned_words=("hand",))
    kept, rejected = curate(
        [
            '1. "a {product} on a wooden kitchen table by the handle drawer"',
            "- a {product} on a wooden kitchen table by the handle drawer",
            "a {product} resting on a marble bathroom shelf with folded towels",
        ],
        rules,
        existing=[],
    )
    assert kept == [
        "a {product} on a wooden kitchen table by the handle drawer",
        "a {product} resting on a marble bathroom shelf with folded towels",
    ]
    assert rejected[0][1].startswith("duplicate")
    assert PLACEHOLDER in kept[0]


# --------------------------------------------------------------------------- selection


def test_negatives_needed():
    # 4 reals, 3 frames kept at most 2 per real, 2 contexts per image at most 2 per source
    assert negatives_needed(4, 3, 2, 2, ratio=2.0, oversample=1.0) == (4 + 8 + 24) // 2
    assert negatives_needed(4, 3, 2, 2, ratio=2.0, oversample=1.25) == math.ceil(18 * 1.25)


def _pos(n, real=0):
    return [(f"p{i}", i / 10, i < real) for i in range(n)]


def test_balance_ratio_exact_two_to_one_drops_weakest_synthetic_first():
    negs = [(f"n{i}", 0.1 * i, "negative" if i % 2 else "counterfactual") for i in range(10)]
    drop, p, n = balance_ratio(_pos(7, real=2), negs, ratio=2.0, counterfactual_fraction=0.5)
    assert (p, n) == (6, 3)
    assert "p0" not in drop and "p1" not in drop  # real images are kept
    assert "p2" in drop  # the lowest-scoring synthetic positive goes
    kept_negs = [x for x in negs if x[0] not in drop]
    assert len(kept_negs) == 3
    assert {k for _, _, k in kept_negs} == {"negative", "counterfactual"}


def test_balance_ratio_too_few_negatives_drops_positives():
    drop, p, n = balance_ratio(
        _pos(10, real=1), [("n0", 0.0, "negative"), ("n1", 0.0, "negative")], 2.0, 0.5
    )
    assert (p, n) == (4, 2)
    assert len([d for d in drop if d.startswith("p")]) == 6 and "p0" not in drop


def test_balance_ratio_non_integer_ratio_stays_exact():
    negs = [(f"n{i}", 0.0, "negative") for i in range(10)]
    _, p, n = balance_ratio(_pos(10), negs, ratio=1.5, counterfactual_fraction=0.0)
    assert p == 1.5 * n and (p, n) == (9, 6)


def test_balance_ratio_without_negatives_keeps_nothing():
    drop, p, n = balance_ratio(_pos(3), [], 2.0, 0.5)
    assert (p, n) == (0, 0) and len(drop) == 3


def _state(samples: list[Sample]) -> ProductState:
    record = ProductRecord("p1", ("a.png",), category="mug")
    return ProductState(record, "memory://out", samples=samples)


def _sample(sid, kind, source=None, **scores) -> Sample:
    s = Sample(sid, kind, f"memory://out/images/p1/{sid}.png", 8, 8, source_sample=source)
    s.scores = {
        "clip_i": 0.9,
        "clip_t": 0.3,
        "seg_clip_i": 0.9,
        "dino": 0.8,
        "seg_dino": 0.8,
        **scores,
    }
    return s


def test_select_records_every_drop_reason():
    cfg = load_config(
        "default", overrides=["augment.filter.top_k_per_source=1", "augment.negatives.ratio=1"]
    )
    samples = [
        _sample("real-00", "real", clip_i=0.1),  # reals are never filtered by thresholds
        _sample("view-00-f01", "view", "real-00", clip_i=0.5),  # below min_clip_i
        _sample("view-00-f02", "view", "real-00"),
        _sample("view-00-f03", "view", "real-00", dino=0.7),  # loses top-1 to f02
        _sample("ctx-real-00-00", "context", "real-00", mask_iou=0.4),  # product changed
        _sample("ctx-real-00-01", "context", "real-00", mask_iou=0.95),
        _sample(
            "ctx-view-00-f01-00", "context", "view-00-f01", mask_iou=0.95
        ),  # its source is gone
        _sample("neg-00", "negative", seg_clip_i=0.99),  # looks like the product
        *[_sample(f"neg-{i:02d}", "negative", seg_clip_i=0.3) for i in range(1, 6)],
    ]
    state = _state(samples)
    select_samples(state, cfg)
    reasons = {s.sample_id: s.drop_reason for s in samples}
    assert reasons["real-00"] is None
    assert reasons["view-00-f01"].startswith("clip_i=0.500 < 0.7")
    assert reasons["view-00-f03"] == "not top-k: below the best 1 of its source"
    assert reasons["ctx-real-00-00"].startswith("mask_iou=0.400 < 0.8")
    assert reasons["ctx-view-00-f01-00"] == "source view-00-f01 dropped"
    assert "looks like the product" in reasons["neg-00"]
    kept = [s for s in samples if s.kept]
    positives = [s for s in kept if s.kind in POSITIVE_KINDS]
    negatives = [s for s in kept if s.kind == "negative"]
    assert len(positives) == len(negatives) == 3  # ratio 1:1 enforced
    assert all(s.score is not None for s in samples)
    assert state.errors == []


def test_best_of_four_contexts_keeps_the_two_best_of_each_source():
    cfg = load_config("default")
    assert (cfg.augment.contexts.per_image, cfg.augment.filter.top_k_per_source) == (4, 2)
    reals = [_sample(f"real-{i:02d}", "real") for i in range(2)]
    fidelity = {0: 0.80, 1: 0.95, 2: 0.85, 3: 0.99}  # CLIP-I of each of a source's contexts
    contexts = [
        _sample(f"ctx-{r.sample_id}-{j:02d}", "context", r.sample_id, clip_i=c, mask_iou=0.9)
        for r in reals
        for j, c in fidelity.items()
    ]
    negatives = [_sample(f"neg-{i:02d}", "negative", seg_clip_i=0.3) for i in range(8)]
    select_samples(_state(reals + contexts + negatives), cfg)
    for r in reals:
        mine = {s.sample_id[-2:]: s for s in contexts if s.source_sample == r.sample_id}
        assert {j for j, s in mine.items() if s.kept} == {"01", "03"}  # the two best
        for j in ("00", "02"):
            assert mine[j].drop_reason == "not top-k: below the best 2 of its source"


def test_a_blurred_view_is_dropped_for_softness_and_the_sharp_one_kept(tmp_path):
    from PIL import ImageFilter

    rng = np.random.default_rng(3)
    photo = np.full((128, 128, 3), 240, np.uint8)
    mask = _square(128, (24, 16, 104, 120))
    photo[mask > 0] = rng.integers(0, 256, (int((mask > 0).sum()), 3), dtype=np.uint8)
    blurred = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(1.5)))
    cfg = load_config(
        "tiny", overrides=["augment.filter.min_sharpness=0.5", "augment.negatives.ratio=1"]
    )
    state = _state([])
    state.root = str(tmp_path)
    made = {}
    for sid, kind, rgb in [
        ("real-00", "real", photo),
        ("real-01", "real", photo[:, ::-1].copy()),
        ("view-00-f02", "view", photo[:, ::-1].copy()),  # as detailed as the photos
        ("view-00-f03", "view", blurred),  # a soft copy
    ]:
        sample = _sample(sid, kind, None if kind == "real" else "real-00")
        state.put_image(sample, encode_png(rgb), "png")
        state.put_mask(sample, encode_png(mask))
        state.samples.append(sample)
        made[sid] = sample
    stage = ScoreStage.__new__(ScoreStage)
    stage.config = cfg
    files = {s.sample_id: s.image() for s in state.samples}
    masks = {s.sample_id: s.mask() for s in state.samples}
    stage.score_sharpness(state.samples, state.of(SampleKind.REAL), files, masks)
    assert made["view-00-f02"].scores["sharpness"] == pytest.approx(1.0, rel=0.05)
    assert made["view-00-f03"].scores["sharpness"] < 0.5
    state.samples += [_sample(f"neg-{i:02d}", "negative", seg_clip_i=0.3) for i in range(4)]
    select_samples(state, cfg)
    assert made["view-00-f02"].kept
    assert made["view-00-f03"].drop_reason.startswith("sharpness=")
    assert "softer than the real photos" in made["view-00-f03"].drop_reason


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        (
            "A red ceramic mug with a white handle on a wooden table.",
            "red ceramic mug with a white handle",
        ),
        ("Close-up of a teal bottle, matte finish, against a grey backdrop", "teal bottle"),
        ("A wooden tray holds things.", None),  # the noun is not named: the noun alone is used
    ],
)
def test_product_description_keeps_the_product_and_drops_its_surroundings(caption, expected):
    noun = "bottle" if "bottle" in caption else "mug"
    assert product_description(caption, noun) == expected


def test_a_contexts_caption_is_the_fine_grained_product_in_the_scene(tmp_path):
    """The inpainter paints the bank's scene; the training caption puts the source's
    fine-grained description of the product into that scene."""
    root = str(tmp_path / "out")
    batch, _ = _decoded(root)
    [state] = unpack(batch)
    state.noun = "mug"
    for s in state.of(SampleKind.REAL):
        s.caption = "A red ceramic mug with a white handle on a white background."
        s.mask_uri = s.image_uri  # any mask: the stage reads it only to place the product
        state.put_mask(s, encode_png(_square(decode_rgb(s.image()).shape[0])))

    class Painter(InpaintStage):
        def __init__(self, config):
            _Stage.__init__(self, config)
            self.bank, self.tag, self.prompts = PromptBank.load(None), "test", []

        def model(self, batch, options=None):
            self.prompts += list(batch["prompt"])
            n = len(batch["prompt"])
            return {"image": batch["image"], "error": object_array([None] * n)}

    cfg = load_config("tiny", overrides=["augment.negatives.counterfactual_fraction=0"])
    painter = Painter(cfg)
    painter.process(state)
    contexts = state.of(SampleKind.CONTEXT)
    assert contexts and all(
        "red ceramic mug with a white handle" in s.caption and "white background" not in s.caption
        for s in contexts
    )
    assert all(count_tokens(s.caption) <= 77 - cfg.augment.caption.reserve_tokens for s in contexts)
    painted = [p for p in painter.prompts if "mug" in p]
    assert painted == [s.prompt for s in contexts]  # the scene as the bank has it, noun only
    assert all("white handle" not in p for p in painted)


def test_a_cut_caption_is_recorded_in_the_manifest_row(tmp_path):
    """The captioner cut a 120-word answer to fit the text encoders: the real image's
    manifest row says how long the answer was."""
    from pipelines.augment import CaptionStage, _manifest_row

    batch, _ = _decoded(str(tmp_path / "out"))
    [state] = unpack(batch)
    reals = state.of(SampleKind.REAL)

    def captioner(rows):
        n = len(rows["image"])
        return {
            "caption": object_array(["A red mug on a table"] * n),
            "caption_words": np.array([120] + [5] * (n - 1)),
            "caption_truncated": np.array([True] + [False] * (n - 1)),
            "error": object_array([None] * n),
        }

    stage = CaptionStage.__new__(CaptionStage)
    stage.config, stage.captioner, stage.tag = load_config("tiny"), captioner, "test"
    stage.bank, stage.clip = PromptBank.load(None), None
    stage.process(state)
    rows = [_manifest_row(state, s) for s in reals]
    assert [r["caption_cut_from_words"] for r in rows] == [120] + [None] * (len(reals) - 1)


def test_strip_product_words_keeps_the_class_noun():
    rec = ProductRecord(
        "acme-mug-9",
        ("a.png",),
        category="mug",
        title="Acme Red Ceramic Mug",
        attributes={"glaze": "glossy"},
    )
    caption = 'A glossy red ceramic mug with "ACME" printed on it, on a wooden table by a window'
    out = strip_product_words(caption, rec, "mug")
    assert out == "A mug with printed on it, on a wooden table by a window"
    assert strip_product_words("Acme red ceramic", rec, "mug") == "a photo of a mug"


# --------------------------------------------------------------------------- actors' pure functions


def test_letterbox_round_trip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)
    canvas, box = letterbox(img, (64, 64))
    assert canvas.shape == (64, 64, 3) and box == (0, 16, 64, 48)
    back = unletterbox(canvas, box, (80, 40))
    assert back.shape == (40, 80, 3)
    assert np.abs(back.astype(int) - img.astype(int)).mean() < 40  # resampled, same content


def test_place_product_keeps_pixels_and_scale():
    rgb = np.zeros((100, 100, 3), np.uint8)
    rgb[20:60, 30:50] = (200, 10, 10)
    mask = np.zeros((100, 100), np.uint8)
    mask[20:60, 30:50] = 255
    canvas, keep = place_product(rgb, mask, 64, (0.5, 0.5), seed=3)
    x0, y0, x1, y1 = mask_bbox(keep)
    assert max(x1 - x0, y1 - y0) == 32  # longer side = 0.5 of the canvas
    assert (canvas[keep > 0] == (200, 10, 10)).all()
    assert (canvas[keep == 0] == 127).all()
    again = place_product(rgb, mask, 64, (0.4, 0.7), seed=3)
    assert (again[1] == place_product(rgb, mask, 64, (0.4, 0.7), seed=3)[1]).all()  # seeded
    with pytest.raises(ValueError, match="empty"):
        place_product(rgb, np.zeros_like(mask), 64, (0.5, 0.5), seed=0)


def test_paste_back_keeps_the_product_interior_exact():
    rng = np.random.default_rng(1)
    gen, orig = (rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    keep = _square(64, (10, 10, 50, 50))
    out = paste_back(gen, orig, keep, feather=2)
    inner = _square(64, (12, 12, 48, 48)) > 0
    assert (out[inner] == orig[inner]).all()
    assert (out[keep == 0] == gen[keep == 0]).all()


def test_dilate_and_square_canvas():
    grown = dilate(_square(32, (10, 10, 20, 20)), 2)
    assert mask_bbox(grown) == (8, 8, 22, 22)
    rgb, mask = square_canvas(np.zeros((40, 80, 3), np.uint8), np.zeros((40, 80), np.uint8), 64)
    assert rgb.shape == (64, 64, 3) and mask.shape == (64, 64)


def test_a_counterfactuals_square_keeps_an_off_centre_product_whole():
    """A wide photo with the product at its right edge: a centre crop would cut it off."""
    mask = np.zeros((40, 120), np.uint8)
    mask[10:30, 95:115] = 255
    rgb = np.zeros((40, 120, 3), np.uint8)
    _, square = square_canvas(rgb, mask, 40)  # the same scale: counts compare directly
    assert (square > 0).sum() == (mask > 0).sum()  # all of it
    long = np.zeros((40, 120), np.uint8)
    long[15:25, 10:110] = 255  # longer than the photo is tall: kept whole by padding
    _, square = square_canvas(rgb, long, 120)
    assert (square > 0).sum() == (long > 0).sum()


def _object_on(background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = background.copy()
    mask = _square(96, (30, 25, 66, 75))
    img[mask > 0] = (180, 30, 40)
    return img, mask


def test_plain_background_mask_finds_the_product():
    img, truth = _object_on(np.full((96, 96, 3), 245, np.uint8))
    color, spread = border_stats(img)
    assert spread < 1 and (color == 245).all()
    found = plain_background_mask(img, max_spread=12, tolerance=24)
    assert mask_iou(found, truth) > 0.95


def test_plain_background_mask_fills_holes_and_refuses_textures():
    img, truth = _object_on(np.full((96, 96, 3), 245, np.uint8))
    img[40:50, 40:55] = 245  # a white label inside the product
    assert mask_iou(plain_background_mask(img, 12, 24), truth) > 0.95
    noisy = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    assert plain_background_mask(noisy, 12, 24) is None
    ring = np.zeros((20, 20), np.uint8)
    ring[5:15, 5:15] = 255
    ring[8:12, 8:12] = 0
    assert fill_holes(ring)[10, 10] == 255


def test_saliency_prompt_lands_on_the_product():
    _yy, xx = np.mgrid[0:96, 0:96]
    wood = np.stack([120 + 20 * np.sin(xx / 3.0)] * 3, axis=2).astype(np.uint8)
    img, truth = _object_on(wood)
    box, point = prompt_from_saliency(saliency(img))
    x, y = point.astype(int)
    assert truth[y, x] > 0  # the positive point is on the product
    assert mask_iou(_square(96, tuple(int(v) for v in box)), truth) > 0.5


class _RecordingSam(Segmenter):
    """The segmenter's own prompting and mask choice, with SAM replaced by a double that
    records its prompts and answers with given candidates (largest first, best score last)."""

    def __init__(self, candidates: list[np.ndarray]):
        self.options, self.batch_size = load_config("tiny").augment.segment, 4
        self.candidates, self.prompts = candidates, []

    def sam(self, items):
        self.prompts += [(box.tolist(), point.tolist()) for _, box, point in items]
        stack = np.stack(self.candidates) > 0
        scores = np.linspace(0.5, 0.9, len(stack), dtype=np.float32)
        return [(stack, scores) for _ in items]


def _cluttered_scene(paste: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Noise, a bright distractor in the middle-left, the product pasted at ``paste``."""
    rgb = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    rgb[30:70, 4:30] = 255  # a salient white vase, nearer the centre than the product
    placed = _square(96, paste)
    rgb[placed > 0] = (180, 30, 40)
    return rgb, placed


def test_a_context_is_resegmented_at_its_paste_box_not_by_saliency():
    paste = (60, 40, 90, 88)
    rgb, placed = _cluttered_scene(paste)
    grown = _square(96, (54, 30, 92, 90))  # the product as outpainting extended it
    sam = _RecordingSam([grown])
    out = sam(
        {"image": object_array([encode_png(rgb)]), "placed": object_array([encode_png(placed)])}
    )
    [(box, point)] = sam.prompts
    assert box == list(paste)  # the paste's box, exactly
    x, y = (int(v) for v in point)
    assert placed[y, x] > 0  # and a point on the pasted product
    assert out["mask_method"][0] == "sam-placement" and out["error"][0] is None
    # Without the placement, saliency picks its own box on this scene: not the paste.
    sam.prompts.clear()
    sam({"image": object_array([encode_png(rgb)])})
    assert sam.prompts[0][0] != list(paste)


def test_resegment_prompts_contexts_with_their_paste_and_scores_iou_against_it(tmp_path):
    paste = (60, 40, 90, 88)
    rgb, placed = _cluttered_scene(paste)
    grown = _square(96, (54, 30, 92, 90))
    stage = ResegmentStage.__new__(ResegmentStage)  # its model: the recording segmenter
    stage.config, stage.tag = load_config("tiny"), "test"
    stage.model = _RecordingSam([grown])
    state = ProductState(ProductRecord("p1", ("a.png",)), str(tmp_path))
    ctx = Sample(
        "ctx-real-00-00", SampleKind.CONTEXT, None, 96, 96, expected_mask=encode_png(placed)
    )
    neg = Sample("neg-00", SampleKind.NEGATIVE, None, 96, 96)
    for s in (ctx, neg):
        state.put_image(s, encode_png(rgb), "png")
        state.samples.append(s)
    stage.process(state)
    boxes = [box for box, _ in stage.model.prompts]
    assert boxes[0] == list(paste)  # the context: at its paste
    assert boxes[1] != list(paste)  # the negative: by saliency, as a photo
    assert ctx.scores["mask_iou"] == pytest.approx(mask_iou(grown, placed))
    assert ctx.scores["mask_iou"] < 0.8  # the grown product fails the default threshold
    assert ctx.expected_mask is None and ctx.mask_method == "sam-placement"


def test_select_mask_prefers_score_within_area_bounds():
    masks = np.zeros((3, 10, 10), bool)
    masks[0] = True  # whole image: implausible
    masks[1, 2:5, 2:5] = True
    masks[2, 2:8, 2:8] = True
    assert select_mask(masks, np.array([0.99, 0.5, 0.7]), 0.05, 0.95) == 2
    assert select_mask(masks, np.array([0.99, 0.5, 0.7]), 0.5, 0.95) is None


def test_select_mask_refuses_a_candidate_that_spills_out_of_its_prompt_box():
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:18, 2:18] = True  # the table around the product: mostly outside the box
    masks[1, 8:12, 8:12] = True
    box = np.array([7, 7, 13, 13], np.float32)
    assert select_mask(masks, np.array([0.9, 0.5]), 0.01, 0.95) == 0  # no box: area only
    assert select_mask(masks, np.array([0.9, 0.5]), 0.01, 0.95, box) == 1
    assert select_mask(masks[:1], np.array([0.9]), 0.01, 0.95, box) is None


def test_saliency_prompt_without_an_acceptable_sam_mask_falls_back_to_the_salient_region():
    from actors.segmenter import prompt_from_saliency, saliency, saliency_mask

    rgb = np.full((64, 64, 3), 90, np.uint8)
    rgb[::2] = 110  # a textured, not plain, background
    rgb[20:50, 24:40] = (220, 40, 40)
    sal = saliency(rgb)
    box, _ = prompt_from_saliency(sal)
    mask = saliency_mask(sal, box) > 0
    assert mask[30:45, 27:37].all() and not mask[:10].any() and not mask[:, :10].any()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The image shows a red mug on a table.", "A red mug on a table."),
        ("  a   white\nteapot  ", "A white teapot"),
        ("\ufffd\ufffd 12 ??", ""),
        ("one two three four five six", "One two three"),
    ],
)
def test_clean_caption(raw, expected):
    assert clean_caption(raw, max_words=3 if "six" in raw else 50) == expected


# --------------------------------------------------------------------------- inpainter options


@pytest.mark.slow  # loads the tiny inpainter and paints four times (~40 s on 2 busy cores)
def test_inpainter_paints_with_the_options_of_the_call():
    """augment paints contexts and counterfactuals with one loaded inpainter, each with its
    own settings: a call's ``options`` replace the actor's, and only for that call."""
    from actors.inpainter import Inpainter
    from ray_app.batching import object_array
    from ray_app.images import encode_png

    cfg = load_config("tiny")
    contexts = cfg.augment.contexts
    other = cfg.augment.counterfactuals.model_copy(update={"steps": contexts.steps + 1})
    model = Inpainter(cfg.model_spec("inpainter"), contexts)
    rgb = np.full((64, 64, 3), 200, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    batch = {
        "image": object_array([encode_png(rgb)]),
        "mask": object_array([encode_png(mask)]),
        "prompt": object_array(["a photo of a vase"]),
        "seed": np.array([7], np.int64),
    }
    own = model(batch)["image"][0]
    assert own is not None
    assert model(batch, options=contexts)["image"][0] == own
    assert model(batch, options=other)["image"][0] != own
    assert model(batch)["image"][0] == own  # the call's options did not stick


# --------------------------------------------------------------------------- rows carry references

MANIFEST = str(EXAMPLES / "products.jsonl")


def _decoded(root: str) -> tuple[dict[str, np.ndarray], ProductRecord]:
    """The first example product through the decode stage, written under ``root``."""
    config = load_config("tiny")
    record = read_manifest(MANIFEST).records[0]
    row = records_table([record]).to_pydict()
    batch = {k: object_array(v) for k, v in row.items()}
    policy = SourcePolicy.for_manifest(MANIFEST, config.storage)
    return decode_products(batch, config, policy, root), record


class _Painter(_Stage):
    """A model stage without a model: it "generates" noise images."""

    name = "negatives"
    N = 4

    def __init__(self, config):
        super().__init__(config)
        rng = np.random.default_rng(0)
        self.images = [encode_png(rng.integers(0, 256, (96, 96, 3), np.uint8)) for _ in range(4)]

    def model(self, batch):
        n = len(batch["seed"])
        return {"image": object_array(self.images[:n]), "error": object_array([None] * n)}

    def process(self, state):
        made = [Sample(f"neg-{j:02d}", SampleKind.NEGATIVE, None, 96, 96) for j in range(self.N)]
        self.add_generated(state, [{"seed": j} for j in range(self.N)], made)


def _bytes(state: ProductState) -> int:
    return sum(len(s.image()) for s in state.samples)


def test_rows_carry_image_references_not_image_bytes(tmp_path):
    root = str(tmp_path / "out")
    batch, record = _decoded(root)
    [state] = unpack(batch)
    reals = state.of(SampleKind.REAL)
    assert len(reals) == len(record.image_uris)
    assert all(s.image_uri.startswith(root) for s in reals)  # written through, in the layout
    assert len(batch["state"][0]) * 10 < _bytes(state)
    painted = _Painter(load_config("tiny"))(batch)
    [state] = unpack(painted)
    made = state.of(SampleKind.NEGATIVE)
    assert len(made) == _Painter.N and state.stat("negatives").items_out == _Painter.N
    assert decode_rgb(made[0].image()).shape == (96, 96, 3)
    # The row grew by its samples' metadata only, not by the images they name.
    assert len(painted["state"][0]) - len(batch["state"][0]) < _bytes(state) / 10
    assert len(painted["state"][0]) * 10 < _bytes(state)


def test_decode_removes_a_killed_runs_leftovers(tmp_path):
    root = str(tmp_path / "out")
    layout = AugmentLayout(root)
    pid = read_manifest(MANIFEST).records[0].product_id
    stale = [layout.image(pid, "ctx-real-07-00"), layout.mask(pid, "real-09")]
    for uri in stale:
        storage.write_bytes(uri, b"left by a killed run")
    _decoded(root)
    assert not any(storage.exists(uri) for uri in stale)
    assert storage.list_names(layout.images_dir(pid))  # its own images are there


def test_writer_names_the_written_images_and_a_failed_product_leaves_none(tmp_path):
    root = str(tmp_path / "out")
    layout = AugmentLayout(root)
    config = load_config("tiny")
    batch, _ = _decoded(root)
    [state] = unpack(batch)
    pid = state.product_id
    write_products(batch, config, root)
    rows = storage.read_parquet(layout.manifest_shard(pid)).to_pylist()
    assert [r["image_uri"] for r in rows] == [s.image_uri for s in state.samples]
    written = storage.list_names(layout.images_dir(pid))
    assert sorted(written) == sorted(r["image_uri"].rsplit("/", 1)[1] for r in rows)
    assert storage.exists(layout.marker(pid))

    storage.remove(layout.marker(pid))
    state.failed = "inpaint failed: out of memory"
    write_products(pack([state]), config, root)
    assert not storage.exists(layout.images_dir(pid)) and not storage.exists(layout.masks_dir(pid))
    assert not storage.exists(layout.marker(pid))
