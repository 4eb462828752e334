from __future__ import annotations

import pytest

from ray_app.config import ROLES, ConfigError, load_config, parse_override


@pytest.mark.parametrize("profile", ["default", "tiny"])
def test_profiles_resolve_every_role(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    for role in ROLES:
        spec = cfg.role(role)
        assert spec.source
        assert spec.max_actors is None or spec.min_actors <= spec.max_actors
    if profile == "tiny":
        assert cfg.offline is True
        assert {cfg.role(r).source for r in ROLES} == {"tiny"}
    else:
        assert "tiny" not in {cfg.role(r).source for r in ROLES}


def test_overrides_apply_with_yaml_types():
    cfg = load_config(
        "tiny",
        overrides=[
            "generator.batch_size=3",
            "generator.num_gpus=0.5",
            "ray.address=auto",
            "images.max_side=512",
        ],
    )
    assert cfg.generator.batch_size == 3
    assert cfg.generator.num_gpus == 0.5
    assert cfg.ray.address == "auto"
    assert cfg.images.max_side == 512


def test_config_file_merges_over_profile(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("generator:\n  batch_size: 7\nseed: 11\n")
    cfg = load_config("tiny", files=[path], overrides=["seed=12"])
    assert cfg.generator.batch_size == 7
    assert cfg.generator.source == "tiny"  # untouched keys keep the profile's value
    assert cfg.seed == 12  # --set wins over files


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("generator.batch_size=-1", "generator.batch_size=-1"),
        ("generator.bogus=1", "generator.bogus: unknown key"),
        ("generator.dtype=float8", "generator.dtype='float8'"),
        ("images.max_side=abc", "images.max_side='abc'"),
        ("segmenter.max_actors=0", "segmenter.max_actors=0"),
        ("nonsense=1", "nonsense: unknown key"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("default", overrides=[override])
    assert needle in str(err.value)


def test_impossible_combination_names_the_fix():
    with pytest.raises(ConfigError, match="max_actors=2 is below min_actors=4"):
        load_config("default", overrides=["captioner.min_actors=4", "captioner.max_actors=2"])


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match="allowed keys here: address, num_cpus"):
        load_config("default", overrides=["ray.adress=auto"])


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", "generator.=2"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override(bad)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="profiles are: default, tiny"):
        load_config("huge")


def test_shown_config_loads_back_unchanged(tmp_path):
    cfg = load_config("tiny", overrides=["seed=5", "generator.batch_size=2"])
    path = tmp_path / "shown.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config("default", files=[path]) == cfg
