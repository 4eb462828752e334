"""Adapter slots and the queue-aware adapter prefetch of a generator replica
(``serve.prefetch_adapters``), without Ray: a waiting request's adapter is written into a
free slot while another request generates, that write leaves the running generation's
pixels unchanged, the waiting request then uses it without a read in its turn, and no more
than N are ever ahead.

    .venv/bin/python -m pytest tests/test_serve_prefetch.py
"""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from actors.adapter_slots import LIVE
from bench.serve_prefetch import Multiplexer, write_adapters
from ray_app.config import ConfigError, load_config
from serve.generator import GeneratorReplica

LONG, SHORT = 40, 3  # denoising steps of the running request and of the waiting ones


def replica_with(store: str, prefetch: int, slots: int) -> GeneratorReplica:
    config = load_config(
        "tiny",
        overrides=[
            f"serve.max_adapters_per_replica={slots - 1}",
            f"serve.prefetch_adapters={prefetch}",
        ],
    )
    return GeneratorReplica(config, store)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("prefetch-adapters")
    config = load_config("tiny")
    replica = replica_with(str(root), 0, 2)
    products = write_adapters(
        replica.generator, root, 7, config.train.rank, config.train.target_modules
    )
    return str(root), products


@pytest.fixture(scope="module")
def off(store) -> GeneratorReplica:
    return replica_with(store[0], 0, 3)


def request(seed: int, steps: int) -> dict:
    return {"prompt": "a {product} on a desk", "seeds": [seed], "steps": steps}


def run_queue(replica: GeneratorReplica, products: list[str]) -> list[dict]:
    """Request 0 (``LONG`` steps) starts generating; the others arrive while it runs."""
    mux = Multiplexer(replica, replica.config.serve.max_adapters_per_replica)

    async def scenario() -> list[dict]:
        first = asyncio.ensure_future(replica.serve_request(products[0], request(0, LONG), mux))
        while replica.running is None:
            await asyncio.sleep(0.005)
        rest = [
            replica.serve_request(p, request(i, SHORT), mux)
            for i, p in enumerate(products[1:], start=1)
        ]
        return await asyncio.gather(first, *rest)

    out = asyncio.run(scenario())
    mux.clear()
    return out


def test_warm_slots_exist_before_any_load_and_the_live_adapter_changes_nothing(store, off):
    stats = off.stats()
    assert stats["slots_allocated"] == stats["slots"] == len(off.slots)
    assert stats["adapter_bytes"] == 0 and stats["allocated_adapter_bytes"] > 0
    # One adapter in the denoiser, always active, zero until a turn fills it.
    assert set(off.generator.adapters) == {LIVE} and off.generator.active_adapter == LIVE
    live = off.generator.generate(["a mug"], [2], [""])[0]
    off.generator.set_adapter(None)
    try:
        np.testing.assert_array_equal(off.generator.generate(["a mug"], [2], [""])[0], live)
    finally:
        off.generator.set_adapter(LIVE)
    handle = asyncio.run(off.load(store[1][0]))
    assert off.counters["placements"] == 1
    assert off.stats()["slots_allocated"] == len(off.slots)  # written, nothing allocated
    assert set(off.generator.adapters) == {LIVE}
    del handle


def lora_state(gen, name: str = LIVE) -> list:
    """What a generation with adapter ``name`` reads: each LoRA layer's active adapters,
    its scaling, and the adapter's tensors."""
    from peft.tuners.lora import LoraLayer

    out = []
    for module in gen.loaded.model.unet.modules():
        if isinstance(module, LoraLayer):
            out.append(
                (list(module.active_adapters), module.scaling[name], module.disable_adapters)
            )
            out.append(module.lora_A[name].weight.detach().clone())
            out.append(module.lora_B[name].weight.detach().clone())
    return out


def same_state(x: list, y: list) -> bool:
    return len(x) == len(y) and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        for a, b in zip(x, y, strict=True)
    )


def near(x: np.ndarray, y: np.ndarray, contrast: float) -> bool:
    """Equal up to CPU float noise: any allocation during a generation (even a numpy array)
    shifts the alignment of oneDNN's buffers and so the last bits of some sums, which moves
    a few pixels by a level or two; a leaked adapter moves the image like ``contrast``."""
    return float(np.abs(x.astype(int) - y.astype(int)).mean()) < 0.05 * contrast


def test_writing_an_inactive_slot_mid_generation_leaves_the_generation_unchanged(store, off):
    """A write touches only its slot's tensors: with B written into another slot at every
    step (and from another thread throughout), A's generation reads exactly the same LoRA
    state and gives A's image."""
    from actors.generator import read_adapter_weights

    gen, slots = off.generator, off.adapter_slots
    a, b, c = (read_adapter_weights(off.layout.adapter_dir(p)) for p in store[1][:3])
    slots.write("slot-0", a)
    slots.write("slot-1", c)
    slots.activate("slot-1")
    args = (["a photo of a mug"], [5], [""])
    other = gen.generate(*args)[0]
    slots.activate("slot-0")
    alone = gen.generate(*args)[0]
    contrast = float(np.abs(other.astype(int) - alone.astype(int)).mean())
    before = lora_state(gen)
    seen: list[bool] = []

    def write(step: int) -> None:
        slots.write("slot-1", b if step % 2 else c)
        seen.append(same_state(lora_state(gen), before))

    written = gen.generate(*args, on_step=write)[0]
    assert seen == [True] * off.options.steps
    assert near(written, alone, contrast)
    stop = threading.Event()

    def keep_writing() -> None:
        while not stop.is_set():
            slots.write("slot-1", b)
            slots.write("slot-1", c)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        concurrent = gen.generate(*args)[0]
    finally:
        stop.set()
        writer.join()
    assert same_state(lora_state(gen), before)
    assert near(concurrent, alone, contrast)
    slots.activate("slot-1")  # the writes did land: slot-1 now draws C
    assert near(gen.generate(*args)[0], other, contrast)


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_a_prefetched_adapter_is_used_without_a_read_in_its_turn(store, off):
    root, products = store
    on = replica_with(root, 1, 3)
    seen_running: list[str | None] = []
    on.on_event = lambda event, n: (
        seen_running.append(on.running) if event == "prefetches" else None
    )
    try:
        queue = products[:2]
        with_prefetch = run_queue(on, queue)
        without = run_queue(off, queue)
    finally:
        on.close()
    # A's adapter was prefetched before anything ran, B's while A generated; each load
    # found its adapter (no second read, no placement) and each turn only copied its slot
    # into the live adapter.
    assert on.counters["prefetches"] == 2 and seen_running == [None, products[0]]
    assert on.counters["prefetch_hits"] == 2
    assert on.counters["adapter_reads"] == 2
    assert on.counters.get("placements", 0) == 0
    assert on.counters["activations"] == 2
    assert off.counters["placements"] >= 2  # without prefetch each load placed its own
    assert off.counters["prefetches"] == 0 and off.prefetcher is None
    # The same images as without prefetch: A's (generated during B's write) and B's.
    a, b = (decoded(r["images"][0]) for r in without)
    contrast = float(np.abs(a.astype(int) - b.astype(int)).mean())
    assert contrast > 1
    for got, want in zip(with_prefetch, (a, b), strict=True):
        assert near(decoded(got["images"][0]), want, contrast)
    assert on.stats()["adapters_prefetched"] == []  # claimed by its load


@pytest.mark.parametrize("limit", [1, 2])
def test_prefetch_stays_within_its_bound_and_off_the_slots_in_use(store, limit):
    """Six requests wait behind a long one; at every prefetch write at most ``limit`` are
    ahead and the slot is a free one (not the running request's, not one a held or
    waiting adapter is in: a prefetch never evicts); every request is served."""
    root, products = store
    replica = replica_with(root, limit, 4)  # few: prefetches compete with loads
    observed: list[int] = []
    write = replica.adapter_slots.write

    def checked(slot: str, weights) -> None:
        if threading.current_thread().name.startswith("adapter-prefetch"):
            with replica.state:
                assert slot != replica.running_slot
                assert slot not in replica.slot_of.values()  # held or waiting adapters' slots
                assert replica.slots[slot] in replica.prefetching  # reserved for this prefetch
                observed.append(len(replica.ahead | replica.prefetching.keys()))
        time.sleep(0.05)  # a slow write: the queue has time to ask for more
        write(slot, weights)

    replica.adapter_slots.write = checked
    try:
        out = run_queue(replica, products)
    finally:
        replica.close()
    assert len(out) == len(products)
    assert replica.counters["prefetches"] >= limit
    assert max(observed) == limit, observed  # reached, never passed
    assert replica.counters.get("prefetch_failures", 0) == 0


def test_prefetch_setting_is_validated_naming_the_key():
    with pytest.raises(ConfigError, match="prefetch_adapters=3 exceeds max_adapters"):
        load_config(
            "tiny", overrides=["serve.max_adapters_per_replica=2", "serve.prefetch_adapters=3"]
        )
    with pytest.raises(ConfigError, match="prefetch_adapters"):
        load_config("tiny", overrides=["serve.prefetch_adapters=-1"])


def test_a_load_waits_for_the_slot_of_an_evicted_adapter_that_still_generates(store):
    """One adapter held (2 slots): A generates after its eviction, B holds the other slot;
    C's load must not write into A's slot while A's turn copies from it or runs: it waits
    for the turn's end, then takes that slot. A's image is A's."""
    root, products = store
    replica = replica_with(root, 0, 2)
    a, b, c = products[:3]
    request = (a, "a {product} on a desk", [1], LONG, None, None, None)
    handle_a = asyncio.run(replica.load(a))
    alone = decoded(replica.generate(*request)["images"][0])
    out: dict = {}
    turn = threading.Thread(target=lambda: out.setdefault("a", replica.generate(*request)))
    turn.start()
    while replica.running != a:
        time.sleep(0.002)
    handle_a.__del__()  # the multiplexer evicts A (as Ray Serve does) while A generates
    held = [asyncio.run(replica.load(b))]
    assert replica.slot_of == {b: "slot-1"}
    loader = threading.Thread(target=lambda: held.append(asyncio.run(replica.load(c))))
    loader.start()
    time.sleep(0.2)
    assert replica.running == a and c not in replica.slot_of  # waiting, not writing
    turn.join()
    loader.join()
    assert replica.slot_of == {b: "slot-1", c: "slot-0"}
    image = decoded(out["a"]["images"][0])
    other = decoded(replica.generate(c, *request[1:])["images"][0])
    contrast = float(np.abs(alone.astype(int) - other.astype(int)).mean())
    assert contrast > 0.2 and near(image, alone, contrast)
