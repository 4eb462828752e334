"""`restage train`: the LoRA trainer on the tiny SDXL (and a tiny SD 1.x), the adapter in
plain diffusers, the Ray Train job with per-product errors, and resume after a kill."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from trainset import PRODUCTS, SAMPLES_PER_PRODUCT, write_training_set

from actors.lora_trainer import (
    LoraTrainer,
    TrainingSample,
    mix_schedule,
    positive_prompt,
)
from pipelines import _job
from ray_app import storage, tiny
from ray_app.adapter_meta import AdapterMeta
from ray_app.config import load_config
from ray_app.prompts import product_phrase
from ray_app.storage import AdapterLayout, AugmentLayout

RESTAGE = str(Path(sys.executable).with_name("restage"))
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pure helpers


def test_mix_schedule_keeps_the_ratio_and_visits_every_sample():
    batches = mix_schedule(positives=6, negatives=3, steps=12, batch_size=3, ratio=2.0, seed=0)
    flat = [i for b in batches for i in b]
    assert len(batches) == 12 and all(len(b) == 3 for b in batches)
    negatives = sum(i >= 6 for i in flat)
    assert negatives * 3 == len(flat)  # exactly 2 positives per negative
    assert set(flat) == set(range(9))
    assert batches == mix_schedule(6, 3, 12, 3, 2.0, seed=0)
    assert batches != mix_schedule(6, 3, 12, 3, 2.0, seed=1)
    only_pos = mix_schedule(4, 0, 5, 2, 2.0, seed=0)
    assert all(i < 4 for b in only_pos for i in b)


def test_positive_prompt_puts_the_token_before_the_noun():
    assert positive_prompt("a red mug on a table", "ohwx", "mug") == "a red ohwx mug on a table"
    assert (
        positive_prompt("sunlit kitchen scene", "ohwx", "mug")
        == "a photo of ohwx mug, sunlit kitchen scene"
    )
    assert positive_prompt("a red mug", "ohwx", "mug", "instance") == "a photo of ohwx mug"
    assert positive_prompt(None, "ohwx", "desk lamp") == "a photo of ohwx desk lamp"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.resolution=60", "train.resolution=60 must be a multiple of 8"),
        ("train.sweep_steps=5000", "sweep_steps=5000 exceeds steps=12"),
        ("train.dtype=float16", "train.dtype='float16'"),
        ("train.target_modules=[]", "give at least one module name"),
        ("generate.weights={clip_i: 0}", "at least one weight must be above 0"),
        ("generate.top_n=0", "generate.top_n=0"),
    ],
)
def test_bad_train_and_generate_settings_name_the_key(override, needle):
    from ray_app.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config("tiny", overrides=[override])


# --------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def trainset(tmp_path_factory) -> str:
    return write_training_set(str(tmp_path_factory.mktemp("trainset")))


def _samples(root: str, pid: str, token: str = "ohwx") -> list[TrainingSample]:
    table = pq.read_table(AugmentLayout(root).manifest_shard(pid)).to_pylist()
    noun = PRODUCTS[pid][0]
    return [
        TrainingSample(
            r["sample_id"],
            storage.read_bytes(r["image_uri"]),
            r["caption"] if r["kind"] == "negative" else positive_prompt(r["caption"], token, noun),
            r["kind"] == "negative",
        )
        for r in table
    ]


@pytest.fixture(scope="module")
def trainer():
    # float32 weights and alpha != rank: the plain-diffusers check below compares outputs.
    cfg = load_config(
        "tiny", overrides=["train.steps=20", "train.alpha=8", "train.save_dtype=float32"]
    )
    return LoraTrainer(cfg.model_spec("generator"), cfg.train)


def test_loss_on_a_fixed_batch_goes_down(trainer, trainset):
    result = trainer.train(_samples(trainset, "lamp-blue-01"), seed=7)
    assert result.eval_loss_end < result.eval_loss_start
    assert result.positives == 6 and result.negatives == 3 and len(result.losses) == 20
    assert result.steps == 20 and np.isfinite(result.final_loss)


def test_lora_is_reset_between_products(trainer, trainset):
    lamp, mug = _samples(trainset, "lamp-blue-01"), _samples(trainset, "mug-red-02")
    first = trainer.train(lamp, seed=3, steps=4).state_dict
    other = trainer.train(mug, seed=4, steps=4).state_dict
    again = trainer.train(lamp, seed=3, steps=4).state_dict
    assert set(first) == set(again)
    assert all(torch.equal(first[k], again[k]) for k in first)  # nothing leaks from mug
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_a_run_paused_with_others_in_between_ends_as_one_run_straight_through(trainer, trainset):
    """Token sweeps pause candidates' runs and go on with the best: a paused run keeps its
    own weights, optimiser state and random draws."""
    lamp, mug = _samples(trainset, "lamp-blue-01"), _samples(trainset, "mug-red-02")
    straight = trainer.train(lamp, seed=3, steps=6).state_dict
    paused, other = trainer.start(lamp, seed=3, steps=6), trainer.start(mug, seed=4, steps=6)
    trainer.advance(paused, 2)
    trainer.advance(other, 3)
    trainer.advance(paused, 6, pause=False)
    assert paused.done == 6 and other.done == 3
    resumed = trainer.lora_state_dict()
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)


def test_adapter_loads_in_plain_diffusers_and_changes_the_image(trainer, trainset, tmp_path):
    result = trainer.train(_samples(trainset, "mug-red-02"), seed=5)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / AdapterLayout.WEIGHTS).write_bytes(trainer.adapter_bytes(result.state_dict))
    base_path = tiny.ensure("generator", load_config("tiny").cache_path)

    # Plain diffusers from here on: no restage code touches the adapter.
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base_path)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe(
            "a photo of ohwx mug on a desk",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    before = image()
    pipe.load_lora_weights(str(folder))
    after = image()
    assert np.abs(after - before).mean() > 1e-3

    # The loaded adapter is the trained one, alpha/rank included: same denoiser output.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    emb = torch.randn(1, 77, 64, generator=gen)
    cond = {
        "text_embeds": torch.randn(1, 32, generator=gen),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    with torch.no_grad():
        ours = trainer.unet(x, 500, emb, added_cond_kwargs=cond).sample
        theirs = pipe.unet(x, 500, emb, added_cond_kwargs=cond).sample
        pipe.disable_lora()
        plain = pipe.unet(x, 500, emb, added_cond_kwargs=cond).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, ours, atol=1e-5)


def _tiny_sd1_pipeline():
    """A tiny SD 1.x/2.x-style pipeline: one text encoder, no add-embeddings, v-prediction."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **tiny.sd_components(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# The tiny SD config is what diffusers expects: no FutureWarning about it (steps_offset,
# clip_sample) from the pipeline, which would correct it.
@pytest.mark.filterwarnings("error::FutureWarning")
def test_one_text_encoder_pipelines_train_too(trainset):
    cfg = load_config("tiny", overrides=["train.steps=3"])
    trainer = LoraTrainer(cfg.model_spec("generator"), cfg.train, pipeline=_tiny_sd1_pipeline())
    assert not trainer.sdxl
    result = trainer.train(_samples(trainset, "lamp-blue-01"), seed=1)
    assert all(np.isfinite(result.losses)) and len(result.losses) == 3
    assert any(v.abs().sum() > 0 for k, v in result.state_dict.items() if "lora.up" in k)


# --------------------------------------------------------------------------- the job


@pytest.mark.slow
def test_train_job_writes_adapters_and_keeps_going_past_a_bad_product(
    ray_local, tmp_path, monkeypatch, capsys
):
    from pipelines import train as train_module
    from pipelines.train import train

    data = write_training_set(str(tmp_path / "aug"))
    write_training_set(data, {"zz-too-few": ("vase", "a vase", (9, 9, 9))}, reals=1, contexts=0)
    out = str(tmp_path / "adapters")
    cfg = load_config("tiny", overrides=["train.num_workers=2", "ray.progress_bars=false"])
    printed, fit = [], train_module._fit

    def fit_after_the_first_line(*args, **kwargs):
        printed.append(capsys.readouterr().err)  # what the job said before training
        return fit(*args, **kwargs)

    monkeypatch.setattr(train_module, "_fit", fit_after_the_first_line)
    summary = train(cfg, data, out)
    assert summary.products["ok"] == len(PRODUCTS) and summary.products["failed"] == 1
    todo = len(PRODUCTS) + 1
    assert f"restage train: {todo} products to do\n" in printed[0]
    done = f"restage train: done: {todo}/{todo} products (ok {len(PRODUCTS)}, failed 1), "
    assert done in capsys.readouterr().err
    layout = AdapterLayout(out)
    assert layout.completed() == set(PRODUCTS)
    tokens = set()
    for pid in PRODUCTS:
        meta = AdapterMeta.read(layout.metadata(pid))
        assert Path(layout.weights(pid)).stat().st_size > 0
        assert meta.product_id == pid and meta.rank == cfg.train.rank
        assert meta.noun == PRODUCTS[pid][0] and meta.token not in ("sks", "")
        assert meta.phrase == product_phrase(meta.token, meta.noun)
        assert meta.base.source == "tiny" and meta.steps == cfg.train.steps
        assert meta.training_set.samples == SAMPLES_PER_PRODUCT
        assert len(meta.training_set.digest) == 64
        assert meta.training_set.manifest_shard == AugmentLayout(data).manifest_shard(pid)
        assert meta.seconds.setup > 0 and np.isfinite(meta.final_loss)
        tokens.add(meta.token)
    assert len(tokens) == len(PRODUCTS)
    errors = pq.read_table(layout.errors_dir()).to_pylist()
    assert [(e["product_id"], e["stage"]) for e in errors] == [("zz-too-few", "load")]
    assert "below train.min_positives=2" in errors[0]["reason"]


@pytest.mark.slow
def test_a_small_manifest_is_listed_in_the_queue_as_ray_data_reads_a_large_one(
    ray_local, tmp_path, monkeypatch
):
    import pyarrow as pa

    from pipelines import train as train_module

    data, out = str(tmp_path / "aug"), str(tmp_path / "adapters")
    manifest = AugmentLayout(data).manifest_dir()
    for name in ("p2", "p0", "Bad Id", "p1"):
        storage.write_parquet(storage.join(manifest, f"{name}.parquet"), pa.table({"x": [1, 2]}))
    storage.write_json(AdapterLayout(out).metadata("p1"), {})
    source = train_module.WorkSource(data, out)

    def rows() -> list[dict]:
        return [r for batch in source for r in batch.to_pylist()]

    listed = rows()  # 4 shards: listed by the queue itself
    monkeypatch.setattr(train_module, "SMALL_LISTING", 3)
    monkeypatch.setattr(train_module, "work_dataset", spy := _Spy(train_module.work_dataset))
    assert rows() == listed and spy.calls == 1  # read through Ray Data, the same rows
    assert [(r["product_id"], r["complete"]) for r in listed] == [
        ("Bad Id", False),
        ("p0", False),
        ("p1", True),
        ("p2", False),
    ]
    assert "Bad Id" in listed[0]["error"] and listed[1]["error"] is None


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _train_cmd(data: str, out: str) -> list[str]:
    return [
        RESTAGE,
        "train",
        "--profile",
        "tiny",
        "--data",
        data,
        "--out",
        out,
        "--set",
        "train.steps=40",
        "--set",
        "ray.progress_bars=false",
    ]


@pytest.mark.slow
def test_killed_run_resumes_skipping_the_finished_product(ray_local, tmp_path):
    from pipelines.train import train

    data = write_training_set(str(tmp_path / "aug"))
    out = str(tmp_path / "adapters")
    layout = AdapterLayout(out)
    first, second = sorted(PRODUCTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        _train_cmd(data, out),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not Path(layout.metadata(first)).exists():
            assert proc.poll() is None, "train exited before writing the first adapter"
            assert time.monotonic() < deadline, "no adapter after 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not Path(layout.metadata(second)).exists(), "the second product finished before the kill"
    weights = Path(layout.weights(first)).read_bytes()
    meta = Path(layout.metadata(first)).read_bytes()

    # The re-run (in this process, on the module's Ray) skips the first product. With
    # num_workers null the cluster's CPUs would hold several workers: one product is left,
    # so one worker starts.
    cfg = load_config(
        "tiny",
        overrides=["train.steps=40", "ray.progress_bars=false", "train.num_workers=null"],
    )
    again = train(cfg, data, out)
    assert again.products["already complete"] == 1 and again.products["ok"] == 1
    assert again.extra["workers"] == 1
    assert Path(layout.weights(first)).read_bytes() == weights  # skipped, not rewritten
    assert Path(layout.metadata(first)).read_bytes() == meta
    assert AdapterMeta.read(layout.metadata(second)).product_id == second


@pytest.mark.slow  # trains 4 candidates and validates 6 times (~50 s on 2 cores)
def test_token_sweep_halves_k_short_runs_to_one_full_run_and_records_every_score(
    trainset, tmp_path
):
    from pipelines.train import ShardTrainer

    cfg = load_config(
        "tiny",
        overrides=[
            "train.token_sweep=4",
            "train.associated_tokens=2",
            "train.sweep_steps=2",
            "train.steps=8",
            "train.sweep_images=1",
            "train.sweep_inference_steps=2",
        ],
    )
    out = str(tmp_path / "adapters")
    worker = ShardTrainer(cfg, trainset, out, None)
    started, trained, advanced = [], [], []
    trainer = worker.trainer
    start, train, advance = trainer.start, trainer.train, trainer.advance
    trainer.start = lambda samples, *a, **k: started.append(samples) or start(samples, *a, **k)
    trainer.train = lambda samples, *a, **k: trained.append(samples) or train(samples, *a, **k)
    trainer.advance = lambda run, until, **k: advanced.append(until) or advance(run, until, **k)
    worker.run(["lamp-blue-01"])
    meta = AdapterMeta.read(AdapterLayout(out).metadata("lamp-blue-01"))
    # K short runs, paused and resumed: 4 to 2 steps, the better 2 on to 4; then one full run.
    assert len(trained) == 1 and meta.steps == cfg.train.steps
    short = [samples for samples in started if len(samples) < len(trained[0])]  # held one out
    assert len(short) == 4 and advanced == [2, 2, 2, 2, 4, 4, 8]  # then the winner: 8
    sweep = meta.token_sweep
    first = [t for t in sweep if t.round == 0]
    assert len({t.token for t in first}) == 4 and all(t.steps == 2 for t in first)
    assert [t.steps for t in sweep if t.round == 1] == [4, 4]
    assert sum(t.source == "associated" for t in first) == 2
    assert all(np.isfinite(t.score) for t in sweep)
    best_of_last = max((t for t in sweep if t.round == 1), key=lambda t: t.score)
    assert meta.token == best_of_last.token
    cost = meta.sweep_cost
    assert cost.steps == 4 * 2 + 2 * 2 and cost.step_fraction == pytest.approx(12 / 8)
    assert cost.validation_images == 6 and cost.held_out  # one real photo held out
    assert cost.seconds_fraction > 0


def test_halving_rounds_and_the_default_sweeps_cost():
    from pipelines.train import halving_rounds

    assert halving_rounds(4, 54, 1800) == [54, 108]
    assert halving_rounds(1, 54, 1800) == []
    assert halving_rounds(8, 500, 1800) == [500, 1000, 1800]
    opts = load_config("default").train
    first = round(opts.steps * opts.sweep_fraction)
    steps = opts.token_sweep * first + (opts.token_sweep // 2) * first  # 4 x 54 + 2 x 54
    assert steps / opts.steps < 0.30  # the sweep's training, beside the winner's full run


@pytest.mark.slow
def test_a_dead_worker_is_restarted_and_redoes_only_its_unfinished_product(ray_local, tmp_path):
    import threading

    import psutil

    from pipelines.train import train

    data = write_training_set(str(tmp_path / "aug"))
    out = str(tmp_path / "adapters")
    layout = AdapterLayout(out)
    first, second = sorted(PRODUCTS)
    cfg = load_config("tiny", overrides=["train.steps=40", "ray.progress_bars=false"])
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=train(cfg, data, out)))
    job.start()
    deadline = time.monotonic() + 180
    while not Path(layout.metadata(first)).exists():
        assert job.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    weights = Path(layout.weights(first)).read_bytes()
    workers = [  # this test's local Ray runs under this process
        p
        for p in psutil.Process().children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 1, workers
    assert not Path(layout.metadata(second)).exists(), "the second product finished first"
    workers[0].send_signal(signal.SIGKILL)
    job.join(timeout=240)
    assert not job.is_alive() and "summary" in result
    assert result["summary"].products["ok"] == 2
    assert Path(layout.weights(first)).read_bytes() == weights  # not redone after the restart
    assert AdapterMeta.read(layout.metadata(second)).product_id == second


@pytest.mark.slow
def test_a_fast_worker_takes_the_products_queued_behind_a_slow_one(ray_local, tmp_path):
    from pipelines.train import train

    slow, fast = "a-slow-00", [f"b-fast-{i:02d}" for i in range(4)]
    data = write_training_set(
        str(tmp_path / "aug"),
        {
            pid: ("mug", "a red ceramic mug", (200, 40, 10 * i))
            for i, pid in enumerate([slow, *fast])
        },
        reals=2,
        contexts=0,
        negatives=1,
    )
    cfg = load_config(
        "tiny", overrides=["train.num_workers=2", "train.steps=1", "ray.progress_bars=false"]
    )
    # The slow product is leased first (products are leased in listing order); while it
    # loads (up to 120 s, less once nothing else is left), the other worker must take every
    # fast one. Statically, rank 0 would own products 0, 2, 4 and the slow worker would
    # train three.
    summary = train(cfg, data, str(tmp_path / "adapters"), test_delays={slow: 120.0})
    assert summary.products["ok"] == 1 + len(fast) and summary.products["failed"] == 0
    workers = {w["slowest"]["product_id"]: w for w in summary.extra["per_worker"]}
    assert len(workers) == 2 and slow in workers, summary.extra["per_worker"]
    assert workers[slow]["products"] == 1  # the slow worker trained only the slow product
    (other,) = (w for pid, w in workers.items() if pid != slow)
    assert other["products"] == other["ok"] == len(fast)
    layout = AdapterLayout(str(tmp_path / "adapters"))
    assert layout.completed() == {slow, *fast}
    # The queue wrote train's input index as it read the stream: generate reads it.
    index = _job.input_ids(layout)
    assert index is not None and sorted(r["product_id"] for r in index.iter_rows()) == sorted(
        [slow, *fast]
    )


@pytest.mark.slow
def test_groups_of_products_are_leased_and_trained_together(ray_local, tmp_path):
    from pipelines.train import train

    data = write_training_set(str(tmp_path / "aug"))
    write_training_set(data, {"zz-too-few": ("vase", "a vase", (9, 9, 9))}, reals=1, contexts=0)
    out = str(tmp_path / "adapters")
    cfg = load_config(
        "tiny",
        overrides=["train.products_per_step=2", "train.steps=2", "ray.progress_bars=false"],
    )
    summary = train(cfg, data, out)
    assert summary.products["ok"] == len(PRODUCTS) and summary.products["failed"] == 1
    (worker,) = summary.extra["per_worker"]
    assert worker["products"] == len(PRODUCTS) + 1 and worker["failed"] == 1
    for pid in PRODUCTS:
        meta = AdapterMeta.read(AdapterLayout(out).metadata(pid))
        assert meta.products_per_step == 2 and meta.steps == 2
    assert summary.stage("train").items_out == 2 * len(PRODUCTS)  # steps, summed from reports
