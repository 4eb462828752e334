"""Derived seeds: reproducible, distinct per (product, stage, index), exact in JSON."""

from __future__ import annotations

import json

from ray_app.seeds import SEED_BITS, derive_seed

JSON_SAFE = 2**53  # JavaScript numbers are exact integers only below this


def test_seeds_are_exact_json_numbers():
    seeds = [derive_seed(f"p{i}", "serve/7", j, run_seed=i) for i in range(200) for j in range(4)]
    assert SEED_BITS <= 53 and all(0 <= s < JSON_SAFE for s in seeds)
    assert json.loads(json.dumps(seeds)) == seeds
    assert max(seeds) > JSON_SAFE // 4  # the whole range is used, not a few low bits


def test_seeds_are_stable_and_distinct():
    assert derive_seed("mug", "view", 1) == derive_seed("mug", "view", 1)
    keys = [(p, s, i) for p in ("mug", "lamp") for s in ("view", "negative") for i in range(50)]
    assert len({derive_seed(*k) for k in keys}) == len(keys)
    assert derive_seed("mug", "view", 0, run_seed=1) != derive_seed("mug", "view", 0)
