"""``AdapterMeta``: the one reader and writer of ``adapter.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adapters import UNVERSIONED, example_meta, unversioned_dict

from ray_app.adapter_meta import ADAPTER_META_VERSION, AdapterMeta, AdapterMetaError
from ray_app.prompts import product_phrase
from ray_app.storage import AdapterLayout


def test_a_file_written_before_versions_loads_as_the_current_layout():
    raw = unversioned_dict()
    assert "version" not in raw
    meta = AdapterMeta.read(str(UNVERSIONED))
    assert meta.version == ADAPTER_META_VERSION
    assert meta.product_id == raw["product_id"] and meta.token == raw["token"]
    assert meta.phrase == raw["prompt"] == product_phrase(raw["token"], raw["noun"])
    assert meta.training_set.manifest_shard == raw["training_set"]["manifest_shard"]
    assert meta.seconds.train == raw["seconds"]["train"] and meta.weights == AdapterLayout.WEIGHTS
    # every field the old writer wrote is kept: re-writing it loses nothing
    assert meta.to_dict() == {**raw, "version": ADAPTER_META_VERSION, "recipe": "restage"}


def test_a_version_1_file_is_a_restage_adapter_and_a_baseline_keeps_its_class_images(tmp_path):
    """Version 2 added the recipe: a version-1 adapter was trained by restage's own recipe."""
    from ray_app.adapter_meta import PriorPreservationRef

    assert AdapterMeta.from_dict({**unversioned_dict(), "version": 1}).recipe == "restage"
    prior = PriorPreservationRef(class_prompt="a photo of a lamp", class_images=4, weight=1.0)
    meta = example_meta(recipe="dreambooth_lora", prior_preservation=prior.model_dump())
    uri = AdapterLayout(str(tmp_path)).metadata("p")
    meta.write(uri)
    written = json.loads(Path(uri).read_text())
    assert (
        written["recipe"] == "dreambooth_lora"
        and written["prior_preservation"]["class_images"] == 4
    )
    assert AdapterMeta.read(uri) == meta
    assert "prior_preservation" not in example_meta().to_dict()  # none: no key


def test_write_then_read_is_the_same_metadata(tmp_path):
    meta = example_meta(product_id="p1", token="ohwx", noun="lamp")
    uri = AdapterLayout(str(tmp_path)).metadata("p1")
    meta.write(uri)
    written = json.loads(Path(uri).read_text())
    assert written["version"] == ADAPTER_META_VERSION and written["prompt"] == "ohwx lamp"
    assert AdapterMeta.read(uri) == meta


def test_the_phrase_is_recomputed_not_read():
    assert example_meta(prompt="stale words", token="ohwx", noun="lamp").phrase == "ohwx lamp"


def _error(tmp_path, data) -> str:
    path = tmp_path / "p" / AdapterLayout.METADATA
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(AdapterMetaError) as err:
        AdapterMeta.read(str(path))
    message = str(err.value)
    assert str(path) in message  # every error names the file
    return message


def test_a_newer_version_says_to_upgrade(tmp_path):
    message = _error(tmp_path, {**unversioned_dict(), "version": ADAPTER_META_VERSION + 1})
    assert "'version'" in message and "upgrade restage" in message


@pytest.mark.parametrize("version", [0, -1, "1", 1.5, True])
def test_an_invalid_version_says_to_retrain(tmp_path, version):
    message = _error(tmp_path, {**unversioned_dict(), "version": version})
    assert "'version'" in message and "restage train" in message


@pytest.mark.parametrize("field", ["token", "noun", "training_set", "weights_sha256"])
def test_a_missing_field_is_named_with_the_fix(tmp_path, field):
    data = unversioned_dict()
    del data[field]
    message = _error(tmp_path, data)
    assert f"field {field!r} is missing" in message and "restage train" in message


def test_a_nested_field_is_named_in_dotted_form(tmp_path):
    data = unversioned_dict()
    del data["training_set"]["manifest_shard"]
    assert "'training_set.manifest_shard' is missing" in _error(tmp_path, data)


@pytest.mark.parametrize(
    "text", ["", '{"product_id": "mug", "tok', "[1, 2]", '"mug"', "null", '{"token": 3}']
)
def test_malformed_files_are_errors(tmp_path, text):
    assert "restage train" in _error(tmp_path, text)


def test_an_unknown_field_is_an_error(tmp_path):
    assert "'colour' is unknown" in _error(tmp_path, {**unversioned_dict(), "colour": "red"})


def test_a_file_from_before_multi_product_steps_loads():
    data = unversioned_dict()
    del data["products_per_step"]  # restage 0.1 before train.products_per_step
    assert AdapterMeta.from_dict(data).products_per_step == 1
