"""Multi-product LoRA steps (issue 18, part 3): the stacked forward, per-product gradient
clipping, ``LoraTrainer.train_many`` against separate trainings, and the train job's groups."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file
from torch import nn
from trainset import PRODUCTS, write_training_set

from actors.lora_trainer import ADAPTER, LoraTrainer, TrainingSample, positive_prompt
from actors.multi_lora import StackedLora, lora_layers
from ray_app import storage
from ray_app.config import ConfigError, load_config
from ray_app.storage import AdapterLayout, AugmentLayout

THIRD = {"vase-green-03": ("vase", "a green glass vase", (40, 180, 60))}
ALL = {**PRODUCTS, **THIRD}
TOLERANCE = 1e-3  # per-tensor relative norm difference; measured ~3e-5 on CPU float32


def _relative_differences(a: dict, b: dict) -> dict[str, float]:
    assert set(a) == set(b)
    return {
        k: float((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-12))
        for k in a
    }


# --------------------------------------------------------------------------- StackedLora


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.head = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.k(torch.relu(self.q(x))))


def _lora_net(products: int) -> tuple[nn.Module, StackedLora, list[dict]]:
    """A small model with peft LoRA on q and k (alpha/rank = 2), K products' random
    weights stored in a ``StackedLora``; returns the weights too."""
    torch.manual_seed(0)
    model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k"]), _Net(), adapter_name=ADAPTER
    )
    model.requires_grad_(False)
    stack = StackedLora(model, ADAPTER, products)
    weights = []
    for k in range(products):
        state = {}
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn_like(p)
                state[name] = p.detach().clone()
        stack.store(k)
        weights.append(state)
    return model, stack, weights


def _load(model: nn.Module, state: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def test_stacked_forward_and_gradients_match_each_product_alone():
    K, per = 3, 2
    model, stack, weights = _lora_net(K)
    x = torch.randn(K * per, 4, 6)
    target = torch.randn(K * per, 4, 2)
    with stack.active():
        out = model(x)
        losses = [
            nn.functional.mse_loss(o, t) for o, t in zip(out.chunk(K), target.chunk(K), strict=True)
        ]
        torch.stack(losses).sum().backward()
    for k in range(K):
        _load(model, weights[k])
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in lora:
            p.requires_grad_(True)
            p.grad = None
        rows = slice(k * per, (k + 1) * per)
        ref = model(x[rows])
        torch.testing.assert_close(out[rows], ref, rtol=1e-5, atol=1e-6)
        nn.functional.mse_loss(ref, target[rows]).backward()
        for (_, layer), a, b in zip(stack.layers, stack.A, stack.B, strict=True):
            torch.testing.assert_close(a.grad[k], layer.lora_A[ADAPTER].weight.grad)
            torch.testing.assert_close(b.grad[k], layer.lora_B[ADAPTER].weight.grad)


def test_peft_lora_is_restored_after_active_exits_even_on_error():
    model, stack, weights = _lora_net(2)
    x = torch.randn(2, 6)
    _load(model, weights[0])
    before = model(x)
    with pytest.raises(RuntimeError, match="inside"), stack.active():
        assert all(layer.disable_adapters for _, layer in stack.layers)
        raise RuntimeError("inside")
    assert not any(layer.disable_adapters for _, layer in stack.layers)
    assert not any(layer._forward_hooks for _, layer in stack.layers)
    torch.testing.assert_close(model(x), before)
    stack.load(1)  # load writes a slot back into the peft layers
    _load_1 = model(x)
    _load(model, weights[1])
    torch.testing.assert_close(model(x), _load_1)


def test_gradients_are_clipped_per_product_as_clip_grad_norm_does():
    _, stack, _ = _lora_net(3)
    scales = [10.0, 0.01, 3.0]  # product 1 stays below max_norm
    for p in [*stack.A, *stack.B]:
        p.grad = torch.randn_like(p) * torch.tensor(scales).view(-1, *([1] * (p.dim() - 1)))
    expected, norms = [], []
    for k in range(3):
        copies = [nn.Parameter(p[k].detach().clone()) for p in [*stack.A, *stack.B]]
        for c, p in zip(copies, [*stack.A, *stack.B], strict=True):
            c.grad = p.grad[k].clone()
        norms.append(torch.nn.utils.clip_grad_norm_(copies, max_norm=1.0))
        expected.append([c.grad for c in copies])
    unclipped = [p.grad[1].clone() for p in [*stack.A, *stack.B]]
    got = stack.clip_grad_norms(1.0)
    torch.testing.assert_close(got, torch.stack(norms))
    assert got[0] > 1.0 > got[1] and got[2] > 1.0
    for k in range(3):
        for want, p in zip(expected[k], [*stack.A, *stack.B], strict=True):
            torch.testing.assert_close(p.grad[k], want)
    assert all(
        torch.equal(u, p.grad[1]) for u, p in zip(unclipped, [*stack.A, *stack.B], strict=True)
    )
    assert float(stack.grad_norms()[0]) == pytest.approx(1.0, rel=1e-5)


def test_only_plain_linear_lora_layers_are_accepted():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

    model = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["conv"]), Conv(), adapter_name=ADAPTER
    )
    with pytest.raises(ValueError, match=r"conv is a Conv2d.*train\.target_modules"):
        lora_layers(model, ADAPTER)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.token_sweep=2"], "products_per_step=3 with token_sweep=2"),
        (["train.dropout=0.1"], "products_per_step=3 with dropout=0.1"),
    ],
)
def test_products_per_step_refuses_what_train_many_cannot_honour(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config("tiny", overrides=["train.products_per_step=3", *overrides])
    assert load_config("tiny", overrides=overrides).train.products_per_step == 1


def test_products_per_step_must_be_positive():
    with pytest.raises(ConfigError, match=re.escape("train.products_per_step=0")):
        load_config("tiny", overrides=["train.products_per_step=0"])


# --------------------------------------------------------------------------- LoraTrainer


@pytest.fixture(scope="module")
def trainset(tmp_path_factory) -> str:
    root = write_training_set(str(tmp_path_factory.mktemp("trainset")))
    return write_training_set(root, THIRD)


@pytest.fixture(scope="module")
def trainer():
    # alpha != rank, a clipping norm far below the gradients' norms, cosine with warm-up.
    cfg = load_config(
        "tiny",
        overrides=[
            "train.steps=6",
            "train.alpha=8",
            "train.max_grad_norm=0.01",
            "train.lr_scheduler=cosine",
            "train.warmup_steps=2",
            "train.save_dtype=float32",
        ],
    )
    return LoraTrainer(cfg.model_spec("generator"), cfg.train)


def _samples(root: str, pid: str) -> list[TrainingSample]:
    table = pq.read_table(AugmentLayout(root).manifest_shard(pid)).to_pylist()
    return [
        TrainingSample(
            r["sample_id"],
            storage.read_bytes(r["image_uri"]),
            r["caption"]
            if r["kind"] == "negative"
            else positive_prompt(r["caption"], "ohwx", ALL[pid][0]),
            r["kind"] == "negative",
        )
        for r in table
    ]


def _products(root: str) -> list[tuple[list[TrainingSample], int]]:
    return [(_samples(root, pid), seed) for seed, pid in enumerate(sorted(ALL))]


def test_train_many_matches_separate_trainings(trainer, trainset, monkeypatch):
    products = _products(trainset)
    alone = [trainer.train(samples, seed) for samples, seed in products]

    norms: list[torch.Tensor] = []
    clip = StackedLora.clip_grad_norms
    monkeypatch.setattr(
        StackedLora, "clip_grad_norms", lambda self, m: norms.append(clip(self, m)) or norms[-1]
    )
    together = trainer.train_many(products)

    steps = trainer.options.steps
    assert len(norms) == steps and all(n.shape == (3,) for n in norms)
    assert all(bool((n > trainer.options.max_grad_norm).all()) for n in norms[1:])  # clipping on
    worst = 0.0
    for a, b in zip(alone, together, strict=True):
        assert b.extra["products_per_step"] == 3 and b.steps == a.steps == steps
        assert b.losses == pytest.approx(a.losses, rel=1e-4)
        assert b.eval_loss_end == pytest.approx(a.eval_loss_end, rel=1e-4)
        assert b.eval_loss_start == a.eval_loss_start
        diff = _relative_differences(a.state_dict, b.state_dict)
        worst = max(worst, *diff.values())
        assert any(v.abs().sum() > 0 for k, v in b.state_dict.items() if "lora.up" in k)
    assert worst < TOLERANCE, f"largest relative difference {worst:.2e}"


def test_state_dict_is_a_copy_not_the_live_weights(trainer, trainset):
    products = _products(trainset)
    first = trainer.train(*products[0], steps=2).state_dict
    snapshot = {k: v.clone() for k, v in first.items()}
    trainer.train(*products[1], steps=2)  # overwrites the live LoRA
    assert all(torch.equal(first[k], snapshot[k]) for k in first)


# --------------------------------------------------------------------------- the job


def _weights(out: str, pid: str) -> dict[str, torch.Tensor]:
    return load_file(AdapterLayout(out).weights(pid))


@pytest.mark.slow
def test_shard_trainer_groups_products_and_keeps_going_past_a_missing_one(
    trainset, tmp_path, monkeypatch
):
    from pipelines.train import ShardTrainer

    base = ["train.steps=4", "train.max_grad_norm=0.01", "train.save_dtype=float32"]
    ids = sorted(ALL)
    todo = [ids[0], "zz-missing", *ids[1:]]  # the missing product does not shrink the group
    grouped, alone, fallback = (str(tmp_path / name) for name in ("grouped", "alone", "fallback"))

    shard = ShardTrainer(
        load_config("tiny", overrides=[*base, "train.products_per_step=3"]), trainset, grouped, None
    )
    calls = []
    train_many = shard.trainer.train_many
    monkeypatch.setattr(
        shard.trainer, "train_many", lambda p: calls.append(len(p)) or train_many(p)
    )
    shard.run(todo)
    assert calls == [3]
    ShardTrainer(load_config("tiny", overrides=base), trainset, alone, None).run(ids)

    for pid in ids:
        meta = json.loads(Path(AdapterLayout(grouped).metadata(pid)).read_text())
        assert meta["products_per_step"] == 3 and meta["steps"] == 4
        assert (
            json.loads(Path(AdapterLayout(alone).metadata(pid)).read_text())["products_per_step"]
            == 1
        )
        diff = _relative_differences(_weights(alone, pid), _weights(grouped, pid))
        assert max(diff.values()) < TOLERANCE, (pid, max(diff.values()))
    errors = pq.read_table(AdapterLayout(grouped).errors_dir()).to_pylist()
    assert [(e["product_id"], e["stage"]) for e in errors] == [("zz-missing", "load")]
    assert AdapterLayout(grouped).completed() == set(ids)

    # A non-finite loss in a group: each product is trained alone instead.
    def not_finite(products):
        raise FloatingPointError("training loss is not finite: [nan]")

    monkeypatch.setattr(shard.trainer, "train_many", not_finite)
    shard.layout = AdapterLayout(fallback)
    shard.run(ids)
    for pid in ids:
        assert (
            json.loads(Path(AdapterLayout(fallback).metadata(pid)).read_text())["products_per_step"]
            == 1
        )
        assert _weights(fallback, pid).keys() == _weights(alone, pid).keys()
        assert all(
            torch.equal(_weights(fallback, pid)[k], _weights(alone, pid)[k])
            for k in _weights(alone, pid)
        )


def test_the_plan_counts_every_product_of_a_step():
    from ray_app.resources import train_need

    one, four = (
        train_need(
            load_config(
                "default", overrides=[f"train.products_per_step={k}", "train.token_sweep=1"]
            )
        )
        for k in (1, 4)
    )
    assert four.batch == 4 * one.batch
    assert four.gpu_gib > one.gpu_gib + 3 * one.batch * one.per_item_gib  # and 4 LoRA states
