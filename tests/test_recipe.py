"""The paper's baseline recipe (``train.recipe=dreambooth_lora``) and the ablation switches
of augment (each synthetic component's ``enabled``): config, placement plan, training on
real photos only with optional prior preservation, and `restage run --recipe`'s overrides.
The baseline's whole run (augment, train, generate) is tested in tests/test_dreambench.py,
whose README command runs it beside restage's recipe on real photos."""

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


def _product(reals: int = 3, masked: bool = True):
    """A product state after segmentation: ``reals`` real photos (with masks or not)."""
    from pipelines.augment import ProductState, Sample
    from ray_app.kinds import SampleKind
    from ray_app.records import ProductRecord

    state = ProductState(ProductRecord("p1", ("a.png",), category="mug"), "memory://out")
    for i in range(reals):
        s = Sample(f"real-{i:02d}", SampleKind.REAL, f"memory://out/real-{i:02d}.png", 8, 8)
        s.mask_uri = f"memory://out/m-{i:02d}.png" if masked else None
        state.samples.append(s)
    return state


@pytest.mark.parametrize(
    ("off", "in_class", "counterfactual"),
    [
        ([], True, True),
        (["negatives"], False, True),  # counterfactuals make every negative
        (["counterfactuals"], True, False),  # in-class ones make every negative
        (["negatives", "counterfactuals"], False, False),
    ],
)
def test_negatives_are_split_between_the_kinds_that_are_on(off, in_class, counterfactual):
    from pipelines.augment import count_negatives

    cfg = load_config("tiny", overrides=[f"augment.{c}.enabled=false" for c in off])
    full, state = _product(), _product()
    count_negatives(full, load_config("tiny"))
    count_negatives(state, cfg)
    total = full.negatives + full.counterfactuals
    assert full.negatives > 0 and full.counterfactuals > 0
    assert (state.negatives > 0) == in_class and (state.counterfactuals > 0) == counterfactual
    assert state.negatives + state.counterfactuals == (total if in_class or counterfactual else 0)
    unmasked = _product(masked=False)  # no mask to paint a counterfactual into
    count_negatives(unmasked, cfg)
    assert unmasked.counterfactuals == 0 and unmasked.negatives == (total if in_class else 0)


def test_without_any_negatives_selection_keeps_every_photo_and_enforces_no_ratio():
    from pipelines.augment import select_samples

    state = _product()
    select_samples(state, load_config("tiny", overrides=ALL_OFF))
    assert all(s.kept for s in state.samples) and not state.errors
    select_samples(state, load_config("tiny"))  # with negatives on, none made: no training set
    assert state.errors


# --------------------------------------------------------------------------- training


def test_prior_loss_adds_the_weighted_class_loss_and_is_plain_mse_without_class_samples():
    import numpy as np
    import torch
    import torch.nn.functional as F

    from actors.lora_trainer import prior_loss, prior_schedule

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    none = np.zeros(4, bool)
    assert torch.equal(prior_loss(pred, target, none, 3.0), F.mse_loss(pred, target))
    two = np.array([False, False, True, True])
    expected = F.mse_loss(pred[:2], target[:2]) + 3.0 * F.mse_loss(pred[2:], target[2:])
    torch.testing.assert_close(prior_loss(pred, target, two, 3.0), expected)
    batches = prior_schedule(first=5, count=3, steps=6, batch_size=2, seed=0)
    assert len(batches) == 6 and all(len(b) == 2 for b in batches)
    assert {i for b in batches for i in b} == {5, 6, 7}
    assert prior_schedule(5, 0, 3, 2, 0) == [[], [], []]


@pytest.fixture(scope="module")
def mixed_trainset(tmp_path_factory) -> str:
    """A training set with real photos, contexts and negatives (restage's kinds)."""
    from trainset import write_training_set

    return write_training_set(str(tmp_path_factory.mktemp("mixed")))


def test_the_baseline_trains_on_the_real_photos_and_class_images_and_loads_in_plain_diffusers(
    mixed_trainset, tmp_path
):
    """Acceptance: the baseline adapter loads in plain diffusers, and what it was trained
    on has no synthetic sample, even from a training set that holds them; with prior
    preservation, beside the real photos, class images of the base model alone."""
    import hashlib

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from trainset import REALS

    from pipelines.train import ShardTrainer, class_prompt
    from ray_app import storage, tiny
    from ray_app.adapter_meta import AdapterMeta
    from ray_app.kinds import SampleKind
    from ray_app.storage import AdapterLayout, AugmentLayout

    pid = "mug-red-02"
    cfg = load_config(
        "tiny",
        overrides=[
            "train.recipe=dreambooth_lora",
            "train.steps=3",
            "train.save_dtype=float32",
            "train.prior_preservation.num_class_images=2",
            "train.prior_preservation.steps=2",
            "train.prior_preservation.weight=0.5",
            "generator.batch_size=1",  # class images are made a batch of the role's at a time
        ],
    )
    out = str(tmp_path / "adapters")
    worker = ShardTrainer(cfg, mixed_trainset, out, None)
    trainer = worker.trainer
    base = trainer.base_images(["a photo of a mug"], [1], 2, 7.5)[0]
    made, seen = [], []
    base_images, train = trainer.base_images, trainer.train
    trainer.base_images = lambda *a, **k: made.append(a) or base_images(*a, **k)
    trainer.train = lambda samples, *a, **k: seen.append(samples) or train(samples, *a, **k)
    worker.run([pid])
    meta = AdapterMeta.read(AdapterLayout(out).metadata(pid))
    shard = pq.read_table(AugmentLayout(mixed_trainset).manifest_shard(pid)).to_pylist()
    reals = sorted((r for r in shard if r["kind"] == SampleKind.REAL), key=lambda r: r["sample_id"])
    assert len(shard) > len(reals) == REALS  # the set holds synthetic samples ...
    [samples] = seen  # ... and the trainer got the real photos alone, as instances
    instances = [s for s in samples if not s.prior]
    assert [s.sample_id for s in instances] == [r["sample_id"] for r in reals]
    assert all(not s.negative for s in samples)
    assert {s.prompt for s in instances} == {f"a photo of {meta.phrase}"}
    assert meta.recipe == "dreambooth_lora" and meta.caption_mode == "instance"
    assert meta.positives == REALS and meta.negatives == 0 and not meta.token_sweep
    assert meta.training_set.samples == REALS and meta.rank == cfg.train.rank
    digest = hashlib.sha256()  # the recorded digest is the real photos' alone
    for r in reals:
        image = hashlib.sha256(storage.read_bytes(r["image_uri"])).hexdigest()
        digest.update(f"{r['sample_id']}\x1f{r['kind']}\x1f{r['caption']}\x1f{image}\n".encode())
    assert meta.training_set.digest == digest.hexdigest()
    # prior preservation: class images of the noun, made once, recorded
    prior = meta.prior_preservation
    assert prior is not None and prior.class_images == 2 and prior.weight == 0.5
    assert prior.class_prompt == class_prompt(meta.noun) and prior.seconds > 0
    classes = [s for s in samples if s.prior]
    assert len(classes) == 2 and {s.prompt for s in classes} == {prior.class_prompt}
    assert [a[0] for a in made] == [[prior.class_prompt]] * 2
    assert worker.class_images(meta.noun)[1] == 0.0 and len(made) == 2  # the worker kept them
    # a LoRA is live after training: base images still come from the base model alone
    assert np.array_equal(base_images(["a photo of a mug"], [1], 2, 7.5)[0], base)

    from diffusers import StableDiffusionXLPipeline  # plain diffusers from here on

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.ensure("generator", cfg.cache_path))
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe(
            f"a photo of {meta.phrase} on a desk",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    before = image()
    pipe.load_lora_weights(str(tmp_path / "adapters" / pid))
    assert np.abs(image() - before).mean() > 1e-4


# --------------------------------------------------------------------------- CLI


def _run_config(*argv: str):
    from ray_app import cli

    args = cli.build_parser().parse_args(["run", "--manifest", "m.jsonl", "--out", "o", *argv])
    return cli._config(args)


@pytest.mark.parametrize("recipe", ["restage", "dreambooth_lora"])
def test_run_recipe_is_the_overrides_it_stands_for(recipe):
    from ray_app.config import RECIPES

    flag = _run_config("--profile", "tiny", "--recipe", recipe)
    assert flag == load_config("tiny", overrides=RECIPES[recipe])
    assert flag.train.recipe == recipe
    assert any(flag.augment.components().values()) == (recipe == "restage")
    assert _run_config("--profile", "tiny") == load_config("tiny")  # no flag: the config's


@pytest.mark.parametrize("profile", ["default", "tiny"])
def test_apply_recipe_gives_a_loaded_config_what_the_flag_gives(profile):
    from pipelines.run import apply_recipe
    from ray_app.config import RECIPES

    base = load_config(profile)  # restage's values spelled out: caption_mode, token_sweep
    baseline = apply_recipe(base, "dreambooth_lora")
    assert baseline == load_config(profile, overrides=RECIPES["dreambooth_lora"])
    assert base.train.recipe == "restage"  # a new config: the given one is unchanged
    back = apply_recipe(baseline, "restage")
    assert back.train.recipe == "restage"
    with pytest.raises(ConfigError, match="recipes are: restage, dreambooth_lora"):
        apply_recipe(base, "lora")


def test_a_set_after_the_recipe_wins_and_a_conflicting_one_names_the_fix():
    cfg = _run_config(
        "--recipe", "dreambooth_lora", "--set", "train.prior_preservation.num_class_images=100"
    )
    assert cfg.train.recipe == "dreambooth_lora"
    assert cfg.train.prior_preservation.num_class_images == 100
    with pytest.raises(ConfigError, match=r"set train\.token_sweep=1"):
        _run_config("--recipe", "dreambooth_lora", "--set", "train.token_sweep=4")


def test_run_help_documents_the_recipes_and_their_overrides(capsys):
    from ray_app import cli
    from ray_app.config import RECIPES

    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--recipe {restage,dreambooth_lora}" in text
    for sets in RECIPES.values():
        assert " ".join(sets) in text
