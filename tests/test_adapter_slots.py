"""Adapter slots (``actors.adapter_slots``): an adapter staged in a slot and copied into the
live adapter generates exactly what diffusers' own loading of it generates (full rank, fewer
modules, a LoRA scale; a smaller rank up to a rare rounding flip), writes never touch the
live adapter, and what cannot be staged exactly is refused naming the setting, changing
nothing.

    .venv/bin/python -m pytest tests/test_adapter_slots.py
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from actors.adapter_slots import LIVE, AdapterSlots, SlotLayoutError
from actors.generator import GenerationOptions, Generator
from ray_app.config import load_config

ARGS = (["a red mug on a desk"], [3], [""])


def generator() -> Generator:
    config = load_config("tiny")
    g = config.generate
    return Generator(
        config.model_spec("generator"),
        GenerationOptions(g.width, g.height, g.steps, g.guidance_scale),
    )


@pytest.fixture(scope="module")
def config():
    return load_config("tiny")


@pytest.fixture(scope="module")
def shapes(config) -> dict[str, torch.Tensor]:
    t = config.train
    return generator().neutral_adapter_weights(t.rank, t.target_modules)


def random_adapter(
    shapes: dict[str, torch.Tensor], seed: int, rank: int | None = None, keep=lambda k: True
) -> dict[str, torch.Tensor]:
    """Random LoRA weights in the format `restage train` saves (float16, diffusers keys);
    ``rank`` other than the slots', ``keep`` a subset of the modules."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, zero in shapes.items():
        if not keep(key):
            continue
        shape = list(zero.shape)
        if rank is not None:
            shape[0 if ".lora.down." in key else 1] = rank
        out[key] = (torch.randn(shape, generator=gen) * 0.3).to(torch.float16)
    return out


@pytest.fixture(scope="module")
def slots(config) -> AdapterSlots:
    t = config.train
    return AdapterSlots(
        generator(), t.rank, t.target_modules, config.generate.lora_scale, ["s0", "s1"]
    )


def reference(adapters: dict[str, dict[str, torch.Tensor]], scale: float) -> dict:
    """Each adapter's image as diffusers loads it (a named peft adapter), and the base's."""
    ref = generator()
    out = {}
    for name, weights in adapters.items():
        ref.load_adapter(name, weights, scale=scale)
        ref.set_adapter(name)
        out[name] = ref.generate(*ARGS)[0]
    ref.set_adapter(None)
    out[None] = ref.generate(*ARGS)[0]
    return out


def test_a_slot_generates_exactly_what_diffusers_loading_generates(config, shapes, slots):
    t = config.train
    first_module = next(iter(shapes)).rsplit(".lora.", 1)[0]
    adapters = {
        "full": random_adapter(shapes, 1),
        "other": random_adapter(shapes, 2),
        "smaller rank": random_adapter(shapes, 3, rank=max(1, t.rank // 2)),
        "fewer modules": random_adapter(shapes, 4, keep=lambda k: not k.startswith(first_module)),
    }
    want = reference(adapters, config.generate.lora_scale)
    # The live adapter starts at zero: the base model's image.
    np.testing.assert_array_equal(slots.generator.generate(*ARGS)[0], want[None])
    for name, weights in adapters.items():
        slots.write("s1", weights)
        assert slots.activate("s1")
        got = slots.generator.generate(*ARGS)[0]
        assert np.abs(want[name].astype(int) - want[None].astype(int)).mean() > 1, name
        if name == "smaller rank":
            # Zero-padded to the slots' rank, the same sums; but the BLAS may take another
            # kernel for the wider matrix, summing in another order, and on some CPUs that
            # flips a pixel's rounding (seen: 1 of 12,288 values, by 1).
            off = np.abs(got.astype(int) - want[name].astype(int))
            assert off.max() <= 1 and (off > 0).mean() <= 1e-3, (name, off.max(), off.mean())
        else:
            np.testing.assert_array_equal(got, want[name], err_msg=name)
    assert set(slots.generator.adapters) == {LIVE}


def test_the_lora_scale_applies_to_every_slot(config, shapes):
    t = config.train
    weights = random_adapter(shapes, 5)
    want = reference({"a": weights}, 0.5)
    half = AdapterSlots(generator(), t.rank, t.target_modules, 0.5, ["s0"])
    half.write("s0", weights)
    half.activate("s0")
    np.testing.assert_array_equal(half.generator.generate(*ARGS)[0], want["a"])


def live_tensors(slots: AdapterSlots) -> list[torch.Tensor]:
    return [p.detach().clone() for p in slots.live]


def test_writes_touch_only_their_slot_and_activate_copies_only_when_needed(shapes, slots):
    a, b = random_adapter(shapes, 6), random_adapter(shapes, 7)
    slots.write("s0", a)
    slots.activate("s0")
    live = live_tensors(slots)
    slots.write("s1", b)  # another slot: the live adapter is untouched
    assert all(torch.equal(x, y) for x, y in zip(live, live_tensors(slots), strict=True))
    assert slots.activate("s0") is False  # live already: nothing to copy
    assert slots.activate("s1") is True and slots.live_slot == "s1"
    slots.write("s1", a)  # the live slot rewritten: its next turn copies it again
    assert slots.live_slot is None
    assert slots.activate("s1") is True
    assert all(torch.equal(x, y) for x, y in zip(live, live_tensors(slots), strict=True))


def test_what_cannot_be_staged_exactly_is_refused_naming_the_setting(config, shapes, slots):
    t = config.train
    slots.write("s0", random_adapter(shapes, 8))
    staged = [x.clone() for x in slots._staged["s0"]]
    cases = {
        "rank": (random_adapter(shapes, 9, rank=t.rank * 2), "train.rank"),
        "module": (
            {
                **random_adapter(shapes, 9),
                "unet.mid_block.resnets.0.conv1.lora.down.weight": torch.zeros(t.rank, 8),
            },
            "target_modules",
        ),
        "text encoder": (
            {
                **random_adapter(shapes, 9),
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight": (
                    torch.zeros(t.rank, 8)
                ),
            },
            "text-encoder",
        ),
        "empty": ({}, "no LoRA weights"),
    }
    for name, (weights, says) in cases.items():
        with pytest.raises(SlotLayoutError, match=says):
            slots.write("s0", weights)
        # the slot still holds what it held
        assert all(torch.equal(x, y) for x, y in zip(staged, slots._staged["s0"], strict=True)), (
            name
        )


def test_a_replica_refuses_an_adapter_of_a_larger_rank_naming_the_setting(config, slots, tmp_path):
    """The load fails as ``adapter_unavailable`` (a 503 for that request) naming train.rank;
    the replica holds nothing from it and serves an adapter that fits."""
    from bench.serve_prefetch import write_adapters
    from serve.errors import AdapterUnavailable
    from serve.generator import GeneratorReplica

    t = config.train
    big = write_adapters(slots.generator, tmp_path, 1, t.rank * 2, t.target_modules)[0]
    replica = GeneratorReplica(config, str(tmp_path))
    with pytest.raises(AdapterUnavailable, match=r"rank .* exceeds .*train\.rank"):
        asyncio.run(replica.load(big))
    assert replica.stats()["adapters_loaded"] == [] and not any(replica.slots.values())
    fits = tmp_path / "fits"
    product = write_adapters(slots.generator, fits, 1, t.rank, t.target_modules)[0]
    replica.layout = type(replica.layout)(str(fits))
    handle = asyncio.run(replica.load(product))
    out = replica.generate(product, "a {product}", [1], None, None, None, None)
    assert len(out["images"]) == 1 and replica.counters["activations"] == 1
    del handle
