"""The paper's baseline recipe (``train.recipe=dreambooth_lora``) and the ablation switches
of augment (each synthetic component's ``enabled``): config, placement plan, training on
real photos only with optional prior preservation, and `restage run --recipe`."""

from __future__ import annotations

import pytest

from ray_app.config import DREAMBOOTH_DEFAULTS, ConfigError, load_config
from ray_app.plan import Cluster, build_plan, items_per_product, job_pools

# Each ablation switch, the augment stage it removes and the role that stage loads.
COMPONENTS = {
    "views": ("views", "novel_view"),
    "negatives": ("negatives", "generator"),
}
ALL_OFF = [
    f"augment.{c}.enabled=false" for c in ("views", "contexts", "negatives", "counterfactuals")
]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("profile", ["default", "tiny"])
def test_the_recipe_alone_gives_classic_dreambooth_at_the_configured_rank(profile):
    cfg = load_config(profile, overrides=["train.recipe=dreambooth_lora"])
    for key, value in DREAMBOOTH_DEFAULTS.items():
        assert getattr(cfg.train, key) == value
    assert cfg.train.rank == load_config(profile).train.rank
    assert load_config("default").train.rank == 64  # the paper's baseline rank
    assert load_config(profile).train.recipe == "restage"


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (
            ["train.recipe=dreambooth_lora", "train.caption_mode=caption"],
            ["train.caption_mode='caption'", "set train.caption_mode=instance"],
        ),
        (
            ["train.recipe=dreambooth_lora", "train.token_sweep=4"],
            ["train.token_sweep=4", "set train.token_sweep=1"],
        ),
        (
            ["train.prior_preservation.num_class_images=4"],
            ["train.prior_preservation.num_class_images=4", "set train.recipe=dreambooth_lora"],
        ),
        (["train.recipe=dreambooth"], ["train.recipe='dreambooth'", "dreambooth_lora"]),
        (["augment.contexts.enabled=maybe"], ["augment.contexts.enabled='maybe'"]),
    ],
)
def test_recipe_settings_that_cannot_go_together_name_the_key_and_the_fix(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=overrides)
    for needle in needles:
        assert needle in str(err.value)


def test_prior_preservation_is_the_baselines_option():
    cfg = load_config(
        "tiny",
        overrides=["train.recipe=dreambooth_lora", "train.prior_preservation.num_class_images=2"],
    )
    assert cfg.train.prior_preservation.num_class_images == 2
    assert cfg.train.prior_preservation.weight == 1.0


# --------------------------------------------------------------------------- ablation plan


def _pools(overrides: list[str]) -> dict[str, tuple[str, ...]]:
    return {
        p.name: p.roles for p in job_pools("augment", load_config("default", overrides=overrides))
    }


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_a_component_that_is_off_has_no_stage_and_reserves_no_role(component):
    stage, role = COMPONENTS[component]
    on, off = _pools([]), _pools([f"augment.{component}.enabled=false"])
    assert stage in on and stage not in off
    assert role in {r for roles in on.values() for r in roles}
    assert role not in off.get(stage, ())
    plan = build_plan(
        "augment",
        load_config("default", overrides=[f"augment.{component}.enabled=false"]),
        Cluster(8, 80.0, 64.0, "test"),
    )
    assert plan.runnable and stage not in {p.name for p in plan.pools}


def test_the_inpainter_goes_only_when_contexts_and_counterfactuals_are_both_off():
    assert "inpaint" in _pools(["augment.contexts.enabled=false"])
    assert "inpaint" in _pools(["augment.counterfactuals.enabled=false"])
    both = ["augment.contexts.enabled=false", "augment.counterfactuals.enabled=false"]
    assert "inpaint" not in _pools(both)


def test_with_every_component_off_augment_only_captions_segments_and_scores_the_photos():
    assert list(_pools(ALL_OFF)) == ["caption", "segment", "score"]
    items = items_per_product("augment", load_config("default", overrides=ALL_OFF), photos=4)
    assert items["segment"][0] == 4 and items["score"][0] == 0
    assert all(items[s][0] == 0 for s in ("views", "inpaint", "negatives", "resegment"))


def test_the_cost_model_counts_only_the_negatives_of_kinds_that_are_on():
    def items(*overrides: str) -> dict[str, float]:
        cfg = load_config("default", overrides=list(overrides))
        return {k: v[0] for k, v in items_per_product("augment", cfg, photos=4).items()}

    every = items()
    no_cf = items("augment.counterfactuals.enabled=false")  # inpaint: contexts alone
    contexts, total = no_cf["inpaint"], no_cf["negatives"]
    assert contexts > 0 and total > 0
    assert every["negatives"] + every["inpaint"] - contexts == total  # in-class + counterfactuals
    assert every["negatives"] < total
    no_in_class = items("augment.negatives.enabled=false")
    assert no_in_class["negatives"] == 0 and no_in_class["inpaint"] == contexts + total
