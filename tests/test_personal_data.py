"""`restage personalize`'s own training data (pipelines/personalize.py), without Ray: the
per-category bank of hard negatives and scenes, the cut-and-paste composites, and one
product trained by the encoder stage with its composites kept."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError
from trainset import PRODUCTS, write_training_set

from pipelines._product_rows import unpack
from pipelines.personalize import (
    Bank,
    PersonalProduct,
    TrainEncoders,
    _bank_rows,
    choose_backgrounds,
    list_backgrounds,
    plan_products,
    synthesize,
)
from ray_app import storage
from ray_app.config import PersonalCutPasteConfig, load_config
from ray_app.images import decode_mask, decode_rgb, encode_png
from ray_app.kinds import SampleKind
from ray_app.storage import EncoderLayout

REAL, NEG, CF = SampleKind.REAL.value, SampleKind.NEGATIVE.value, SampleKind.COUNTERFACTUAL.value


def _rows(products: list[tuple[str, str | None]], photos: int = 2) -> list[dict]:
    """Bank rows: per product ``photos`` reals, an in-class negative and a counterfactual."""
    out = []
    for pid, cat in products:
        kinds = [REAL] * photos + [NEG, CF]
        out += [
            {"product_id": pid, "category": cat, "kind": k, "uri": f"{pid}/{k}{i}"}
            for i, k in enumerate(kinds)
        ]
    return out


LISTING = [("m1", "mug"), ("l1", "lamp"), ("m2", "mug"), ("v1", "vase"), ("m3", "mug")]
LISTING += [("l2", "lamp"), ("m4", "mug"), ("x1", None)]


# --------------------------------------------------------------------------- the bank


def test_the_bank_keeps_the_listings_first_products_of_each_category():
    bank = Bank(per_category=2)
    bank.add(_rows(LISTING))
    assert bank.members == {"mug": ["m1", "m2"], "lamp": ["l1", "l2"], "vase": ["v1"], None: ["x1"]}
    assert set(bank.reals) == set(bank.category) == {"m1", "m2", "l1", "l2", "v1", "x1"}
    assert bank.reals["m1"] == ["m1/real0", "m1/real1"]


def test_hard_negatives_are_the_products_own_category_first_then_the_others_in_turn():
    bank = Bank(per_category=3)
    bank.add(_rows(LISTING))
    # m4 is past the bank's 3 mugs; it still gets the bank's mugs first
    assert bank.negative_products("m4", "mug", 5) == ["m1", "m2", "m3", "l1", "v1"]
    assert bank.negative_products("m1", "mug", 3) == ["m2", "m3", "l1"]  # never itself
    assert bank.negative_products("l1", "lamp", 4) == ["l2", "m1", "v1", "x1"]
    # untyped: nobody is of its category; all categories in turn (the untyped last)
    assert bank.negative_products("x1", None, 4) == ["l1", "m1", "v1", "l2"]
    hard = bank.hard_negatives("l1", "lamp", 2)
    assert hard == [("l2", "l2/real0"), ("l2", "l2/real1"), ("m1", "m1/real0"), ("m1", "m1/real1")]
    assert bank.hard_negatives("l1", "lamp", 0) == []


def test_scenes_are_other_products_counterfactuals_and_other_categories_negatives():
    bank = Bank(per_category=2)
    bank.add(_rows(LISTING))
    scenes = bank.scenes_for("m1", "mug")
    assert not [s for s in scenes if s.startswith("m1/")]  # never its own
    assert "m2/counterfactual3" in scenes and "m2/negative2" not in scenes  # a mug look-alike
    assert {"l1/negative2", "v1/negative2", "x1/counterfactual3"} <= set(scenes)
    assert "x1/negative2" not in scenes  # an untyped product's look-alike could be a mug


def test_a_bank_task_reads_the_shards_and_bounds_each_category(tmp_path):
    products = {**PRODUCTS, "lamp-red-03": ("lamp", "a red desk lamp", (200, 60, 40))}
    root = write_training_set(str(tmp_path / "aug"), products)
    ids = sorted(products)
    batch = pa.table({"product_id": ids, "error": pa.array([None] * 3, pa.string())})
    rows = _bank_rows(batch, root, per_category=1).to_pylist()
    assert {r["product_id"] for r in rows} == {"lamp-blue-01", "mug-red-02"}  # one lamp
    assert {r["category"] for r in rows} == {"lamp", "mug"}
    kinds = [r["kind"] for r in rows if r["product_id"] == "mug-red-02"]
    assert kinds.count(REAL) == 3 and kinds.count(NEG) == 3 and SampleKind.CONTEXT not in kinds


def test_backgrounds_are_drawn_per_seed_each_once_while_the_pool_lasts():
    pool = [f"s{i}" for i in range(10)]
    a = choose_backgrounds(pool, 6, seed=3)
    assert len(a) == 6 and len(set(a)) == 6 and a == choose_backgrounds(pool, 6, seed=3)
    assert a != choose_backgrounds(pool, 6, seed=4)
    assert len(choose_backgrounds(pool[:2], 5, seed=3)) == 5
    assert choose_backgrounds([], 5, seed=3) == [] and choose_backgrounds(pool, 0, seed=3) == []


def test_a_backgrounds_folder_lists_its_images_and_an_empty_one_names_the_setting(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.webp", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    listed = list_backgrounds(str(tmp_path))
    assert [u.rsplit("/", 1)[-1] for u in listed] == ["a.PNG", "b.jpg", "c.webp"]
    with pytest.raises(FileNotFoundError, match=r"personalize\.cut_paste\.backgrounds="):
        list_backgrounds(str(tmp_path / "sub"))


# --------------------------------------------------------------------------- composites


def _product(color, size=48):
    rgb = np.full((size, size, 3), 255, np.uint8)
    mask = np.zeros((size, size), bool)
    mask[10:30, 12:40] = True
    rgb[mask] = color
    return rgb, mask


def test_composites_hold_the_products_pixels_inside_the_paste_mask_and_the_scene_outside():
    config = PersonalCutPasteConfig(count=12, scale=(0.4, 1.2)).paste_config()
    colors = [(200, 30, 30), (30, 200, 30)]
    products = [_product(c) for c in colors]
    rng = np.random.default_rng(0)
    scenes = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(12)]
    seeds = list(range(100, 112))
    out = synthesize(products, scenes, seeds, config)
    assert len(out) == len(scenes)
    for k, (c, scene) in enumerate(zip(out, scenes, strict=True)):
        assert c.mask.any() and c.image.shape == scene.shape
        assert (c.image[c.mask] == colors[k % 2]).all()  # the products take turns
        assert (c.image[~c.mask] == scene[~c.mask]).all()
        assert 0.4 <= c.scale <= 1.2
    again = synthesize(products, scenes, seeds, config)
    assert all((a.image == b.image).all() for a, b in zip(out, again, strict=True))
    assert len({c.scale for c in out}) == len(out)  # each its own seed


def test_synthesize_refuses_mismatched_inputs():
    config = PersonalCutPasteConfig().paste_config()
    scene = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="1 seeds for 2 backgrounds"):
        synthesize([_product((1, 2, 3))], [scene, scene], [1], config)
    with pytest.raises(ValueError, match="no product to paste"):
        synthesize([], [scene], [1], config)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scale": (1.3, 0.3)}, "scale=(1.3, 0.3): the minimum exceeds the maximum"),
        ({"scale": (0.3, 2.5)}, "give a maximum of at most 2"),
        ({"count": -1}, "greater than or equal to 0"),
    ],
)
def test_cut_paste_config_errors_name_the_field_and_the_fix(fields, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        PersonalCutPasteConfig(**fields)


def test_the_tiny_profile_makes_few_composites_and_the_default_the_papers():
    assert 0 < load_config("tiny").personalize.cut_paste.count <= 8
    default = load_config().personalize.cut_paste
    assert (default.count, default.scale, default.keep_images) == (450, (0.3, 1.3), False)


# --------------------------------------------------------------------------- one product


def test_a_product_trains_on_its_composites_and_keeps_them_when_asked(tmp_path):
    products = {**PRODUCTS, "lamp-red-03": ("lamp", "a red desk lamp", (200, 60, 40))}
    data = write_training_set(str(tmp_path / "aug"), products)
    count = 5
    config = load_config(
        "tiny",
        overrides=[
            f"personalize.cut_paste.count={count}",
            "personalize.cut_paste.keep_images=true",
            "personalize.negative_products=1",
            "personalize.pairs=32",
        ],
    )
    bank = Bank(per_category=1)
    ids = sorted(products)
    batch = pa.table({"product_id": ids, "error": pa.array([None] * 3, pa.string())})
    bank.add(_bank_rows(batch, data, per_category=1).to_pylist())
    out = str(tmp_path / "enc")
    planned = plan_products(
        {"product_id": np.array(["lamp-red-03"], object)},
        data,
        out,
        bank,
        negative_products=1,
        backgrounds=None,
        count=count,
        run_seed=config.seed,
    )
    (state,) = unpack(planned)
    assert isinstance(state, PersonalProduct) and state.category == "lamp"
    assert {pid for pid, _ in state.hard} == {"lamp-blue-01"}  # its category, not the mug
    mug_scenes = {uri for uri in bank.scenes_for("lamp-red-03", "lamp")}
    assert len(state.backgrounds) == count and set(state.backgrounds) <= mug_scenes

    TrainEncoders(config).process(state)
    assert not state.failed and not state.errors, state.errors
    assert (state.row["cut_paste"], state.row["hard_negatives"]) == (count, 3)
    assert state.row["positives"] == 6 + count  # 3 reals, 3 contexts and the composites
    layout = EncoderLayout(out)
    for k, uri in enumerate(state.backgrounds):
        image = decode_rgb(storage.read_bytes(layout.cut_paste_image("lamp-red-03", k)))
        mask = decode_mask(storage.read_bytes(layout.cut_paste_mask("lamp-red-03", k))) > 0
        scene = decode_rgb(storage.read_bytes(uri))
        assert mask.any() and (image[mask] == (200, 60, 40)).all()
        assert (image[~mask] == scene[~mask]).all()


def test_a_product_without_scenes_or_masks_gets_error_rows_and_no_composites(tmp_path):
    data = write_training_set(str(tmp_path / "aug"), PRODUCTS)
    stage = TrainEncoders(load_config("tiny"))
    reals = [
        r
        for r in storage.read_parquet(f"{data}/manifest/mug-red-02.parquet").to_pylist()
        if r["kind"] == REAL
    ]
    state = PersonalProduct("mug-red-02", data, str(tmp_path / "enc"))
    assert stage._cut_paste(state, reals) == []
    assert [e.stage for e in state.errors] == ["cut_paste"]
    assert "personalize.cut_paste.backgrounds" in state.errors[0].reason

    # one real photo's mask emptied: it is an error row naming it, the others are pasted
    storage.write_bytes(reals[0]["mask_uri"], encode_png(np.zeros((64, 64), np.uint8)))
    scene = [r["image_uri"] for r in reals]  # any 64-pixel image will do as a scene here
    state = PersonalProduct("mug-red-02", data, str(tmp_path / "enc"), backgrounds=scene * 2)
    made = stage._cut_paste(state, reals)
    assert len(made) == 6 and [e.item for e in state.errors] == [reals[0]["image_uri"]]
    assert "empty mask" in state.errors[0].reason
