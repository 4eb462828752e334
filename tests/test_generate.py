"""`restage generate`: adapter swapping in the Generator actor, ranking helpers, and the
Ray Data job (one adapter load per product, top-N images and scores for every product)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import driver_never_lists_the_catalog
from trainset import PRODUCTS

from actors.generator import AdapterError, GenerationOptions, Generator
from pipelines.generate import read_user_prompts
from ray_app.adapter_meta import AdapterMeta
from ray_app.config import load_config
from ray_app.images import decode_rgb
from ray_app.kinds import Metric
from ray_app.storage import AdapterLayout, GenerationLayout


def test_user_prompts_need_the_placeholder(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# mine\na {product} on a marble counter, soft light\n\n")
    assert read_user_prompts(str(good)) == ["a {product} on a marble counter, soft light"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a mug on a table\n")
    with pytest.raises(ValueError, match=r"line 1: .* must contain \{product\} exactly once"):
        read_user_prompts(str(bad))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """The same image up to rounding: a batch of 3 and a batch of 1 may differ by 1 in a few
    pixels on CPU (different kernels for different batch shapes)."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def test_generator_swaps_adapters_without_reloading_the_base(adapters):
    gen = Generator(load_config("tiny").model_spec("generator"), GenerationOptions(64, 64, 2, 2.0))
    base_pipe = gen.loaded.model
    lamp, mug = sorted(PRODUCTS)
    batch = {"prompt": np.array(["a photo of a lamp"] * 3, dtype=object), "seed": np.array([3] * 3)}
    base = decode_rgb(gen(batch)["image"][0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen.load_adapter(lamp, AdapterLayout(adapters).adapter_dir(lamp))
        gen.load_adapter(mug, AdapterLayout(adapters).adapter_dir(mug))
    assert not [w for w in caught if "peft_config" in str(w.message)]  # a known, harmless one
    assert gen.loaded.model is base_pipe and gen.active_adapter is None
    out = gen({**batch, "adapter": np.array([lamp, None, mug], dtype=object)})
    with_lamp, plain, with_mug = (decode_rgb(x) for x in out["image"])
    assert _same(plain, base)  # a loaded but inactive adapter changes nothing
    assert not _same(with_lamp, base) and not _same(with_mug, with_lamp)
    assert gen.active_adapter is None  # the batch leaves the active adapter as it was
    gen.unload_adapter(lamp)
    assert set(gen.adapters) == {mug} and lamp not in str(base_pipe.get_list_adapters())
    out = gen({**batch, "adapter": np.array([lamp, mug, None], dtype=object)})
    assert "adapter 'lamp-blue-01' is not loaded" in out["error"][0]
    assert out["error"][1] is None and _same(decode_rgb(out["image"][1]), with_mug)
    assert _same(decode_rgb(out["image"][2]), base)
    with pytest.raises(AdapterError, match="already loaded"):
        gen.load_adapter(mug, AdapterLayout(adapters).adapter_dir(mug))
    assert gen.adapter_loads == {lamp: 1, mug: 1}


@pytest.mark.slow
def test_generate_job_ranks_and_keeps_top_n_per_product(ray_local, adapters, tmp_path, monkeypatch):
    from pipelines.generate import generate

    driver_never_lists_the_catalog(monkeypatch)  # products, markers and plans come from tasks

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {product} on a sunny balcony table\n")
    cfg = load_config(
        "tiny", overrides=[f"generate.user_prompts={prompts}", "ray.progress_bars=false"]
    )
    g = cfg.generate
    out = str(tmp_path / "generations")
    summary = generate(cfg, adapters, out)
    assert summary.products["ok"] == len(PRODUCTS) and summary.products["failed"] == 0
    # Once per product: counters on the driver, not an entry per product.
    assert summary.extra["adapter_loads"] == len(PRODUCTS)
    assert summary.extra["adapter_loads_per_product_max"] == 1
    assert summary.extra["ranking"] == g.ranking and summary.extra["threshold"] == g.keep_threshold
    layout = GenerationLayout(out)
    per_product = (g.prompts_per_product + 1) * g.images_per_prompt
    for pid in PRODUCTS:
        rows = pq.read_table(layout.manifest_shard(pid)).to_pylist()
        meta = AdapterMeta.read(AdapterLayout(adapters).metadata(pid))
        assert len(rows) == per_product
        assert sum(r["prompt_source"] == "user" for r in rows) == g.images_per_prompt
        assert all(meta.phrase in r["prompt"] for r in rows)
        for name in (*Metric, "score"):
            if name == Metric.PERSONAL_FIDELITY:  # no scoring.encoders: null, never a stand-in
                assert all(r[name] is None for r in rows)
                continue
            assert all(r[name] is not None and np.isfinite(r[name]) for r in rows), name
        # generate.ranking's score, recorded with its name: by default the paper's sum.
        assert {r["ranking"] for r in rows} == {g.ranking} == {"paper"}
        for r in rows:
            assert r["score"] == pytest.approx(r["clip_t"] + r["clip_i"] + r["dino"], abs=1e-5)
        assert sorted(r["rank"] for r in rows) == list(range(1, per_product + 1))
        kept = sorted((r for r in rows if r["kept"]), key=lambda r: r["rank"])
        assert [r["rank"] for r in kept] == list(range(1, g.top_n + 1))
        assert all(Path(r["image_uri"]).is_file() for r in kept)
        assert all(r["image_uri"] is None for r in rows if not r["kept"])
        assert len(list(Path(layout.images_dir(pid)).iterdir())) == g.top_n
        marker = json.loads(Path(layout.marker(pid)).read_text())
        assert marker["adapter_loads"] == 1 and marker["kept"] == g.top_n
    again = generate(cfg, adapters, out)
    assert again.products["already complete"] == len(PRODUCTS) and again.products["ok"] == 0
    # Stage by stage (each model stage alone, rows under _stages/): the same ranked images.
    staged_out = str(tmp_path / "staged")
    staged_cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"placement": "stage"})})
    staged = generate(staged_cfg, adapters, staged_out)
    assert staged.extra["placement"] == "stage" and staged.extra["staged"]["generate"] == len(
        PRODUCTS
    )
    assert not Path(staged_out, "_stages").exists()

    def ranked(root: str) -> list[tuple]:
        rows = [
            r
            for pid in PRODUCTS
            for r in pq.read_table(GenerationLayout(root).manifest_shard(pid)).to_pylist()
        ]
        return sorted((r["product_id"], r["rank"], r["kept"], round(r["score"], 5)) for r in rows)

    assert ranked(staged_out) == ranked(out)
