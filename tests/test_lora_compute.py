"""The LoRA branch's matmuls in the base's dtype (``train.lora_compute=base``): activations
stay in bfloat16 (peft would cast them to float32 and back), the LoRA weights and their
gradients stay float32, and outputs and gradients match peft's float32 branch within
bfloat16's precision; the multi-product stacked forward does the same.

    .venv/bin/python -m pytest tests/test_lora_compute.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from actors.lora_compute import compute_lora_in
from actors.lora_trainer import ADAPTER
from actors.multi_lora import StackedLora
from ray_app.config import ConfigError, load_config

BF16 = torch.bfloat16


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.k(torch.relu(self.q(x))))


def lora_net(seed: int = 0) -> nn.Module:
    """A bfloat16 base with peft LoRA on q and k whose weights are float32 and non-zero, as
    the trainer holds them mid-training."""
    torch.manual_seed(seed)
    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k"]), _Net(), adapter_name=ADAPTER
    ).to(BF16)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape) * 0.2
            p.requires_grad_(True)
    return model


def lora_inputs(model: nn.Module, adapter: str = ADAPTER) -> list[torch.dtype]:
    """The dtype each LoRA down-projection receives, recorded by a forward pre-hook."""
    seen: list[torch.dtype] = []
    for name, module in model.named_modules():
        if name.endswith(f"lora_A.{adapter}"):
            module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    return seen


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def run(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    out = model(x)
    nn.functional.mse_loss(out.float(), target).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    return out, grads


def test_the_branch_runs_in_bfloat16_with_float32_weights_and_matches_peft():
    peft_net = lora_net()
    fast = copy.deepcopy(peft_net)
    compute_lora_in(fast, BF16)
    x = torch.randn(8, 10, 16).to(BF16)
    target = torch.randn(8, 10, 4)
    seen_peft, seen_fast = lora_inputs(peft_net), lora_inputs(fast)
    ref, ref_grads = run(peft_net, x, target)
    out, grads = run(fast, x, target)
    assert seen_peft == [torch.float32] * 2  # peft casts every LoRA input to float32
    assert seen_fast == [BF16] * 2  # no longer
    assert out.dtype == ref.dtype == BF16
    assert relative(out, ref) < 2e-2
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert relative(grad, ref_grads[name]) < 5e-2, name
    # and it is a real change: float32 and bfloat16 branches do differ in the last bits
    assert not torch.equal(out, ref)


def test_stacked_products_compute_in_bfloat16_like_one_product_alone():
    K, per = 2, 3
    model = lora_net(1)
    compute_lora_in(model, BF16)
    stack = StackedLora(model, ADAPTER, K, compute_dtype=BF16)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    weights = []
    for k in range(K):
        for p in lora.values():
            p.data = torch.randn(p.shape) * 0.2
        weights.append({n: p.detach().clone() for n, p in lora.items()})
        stack.store(k)
    x = torch.randn(K * per, 5, 16).to(BF16)
    with stack.active():
        together = model(x)
    assert together.dtype == BF16
    for k in range(K):
        with torch.no_grad():
            for n, p in lora.items():
                p.copy_(weights[k][n])
        alone = model(x[k * per : (k + 1) * per])
        assert relative(together[k * per : (k + 1) * per], alone) < 2e-2, k


def test_the_setting_is_validated_naming_the_key():
    assert load_config("tiny").train.lora_compute == "base"
    with pytest.raises(ConfigError, match="lora_compute"):
        load_config("tiny", overrides=["train.lora_compute=float16"])


def test_the_trainer_learns_in_bfloat16_with_either_setting(tmp_path):
    """The tiny generator trained in bfloat16 on CPU: with ``base`` the LoRA layers see
    bfloat16 inputs, the weights stay float32, the loss on a fixed batch falls, and the
    losses follow ``float32``'s closely."""
    import numpy as np
    import pyarrow.parquet as pq
    from trainset import PRODUCTS, write_training_set

    from actors.lora_trainer import LoraTrainer, TrainingSample, positive_prompt
    from ray_app import storage
    from ray_app.storage import AugmentLayout

    root = write_training_set(str(tmp_path))
    pid = "lamp-blue-01"
    samples = [
        TrainingSample(
            r["sample_id"],
            storage.read_bytes(r["image_uri"]),
            r["caption"]
            if r["kind"] == "negative"
            else positive_prompt(r["caption"], "ohwx", PRODUCTS[pid][0]),
            r["kind"] == "negative",
        )
        for r in pq.read_table(AugmentLayout(root).manifest_shard(pid)).to_pylist()
    ]
    results = {}
    # At 32 px: bfloat16 convolutions take a slow path on CPU (42 s at the profile's 64 px,
    # 13 s here), and the dtypes under test do not depend on the size.
    for setting in ("base", "float32"):
        cfg = load_config(
            "tiny",
            overrides=[
                "train.steps=12",
                "train.resolution=32",
                "train.dtype=bfloat16",
                f"train.lora_compute={setting}",
            ],
        )
        trainer = LoraTrainer(cfg.model_spec("generator"), cfg.train)
        assert trainer.dtype == BF16
        assert trainer.lora_dtype == (BF16 if setting == "base" else torch.float32)
        seen = lora_inputs(trainer.unet)
        results[setting] = trainer.train(samples, seed=7)
        assert set(seen) == {trainer.lora_dtype}, setting
        assert all(p.dtype == torch.float32 for p in trainer.lora_params.values())
    fast, ref = results["base"], results["float32"]
    assert fast.eval_loss_end < fast.eval_loss_start
    assert np.isfinite(fast.losses).all()
    np.testing.assert_allclose(fast.losses, ref.losses, rtol=0.1)


def test_the_encoder_trainer_runs_its_lora_in_the_encoders_dtype():
    """``personalize.lora_compute=base`` on a bfloat16 encoder: the LoRA inputs stay
    bfloat16, its weights float32, and training's losses follow peft's float32 branch."""
    import numpy as np

    from actors.encoder_trainer import ADAPTER as ENCODER_ADAPTER
    from actors.encoder_trainer import EncoderTrainer

    cfg = load_config("tiny", overrides=["encoder.dtype=bfloat16", "personalize.pairs=16"])
    rng = np.random.default_rng(0)
    pos = [rng.integers(0, 255, (72, 72, 3), dtype=np.uint8) for _ in range(6)]
    neg = [rng.integers(0, 255, (72, 72, 3), dtype=np.uint8) for _ in range(12)]
    losses, inputs = {}, {}
    for mode in ("base", "float32"):
        options = cfg.personalize.model_copy(update={"lora_compute": mode})
        trainer = EncoderTrainer(cfg.model_spec("encoder"), options)
        assert trainer.dtype == BF16
        assert {p.dtype for p in trainer.lora_params.values()} == {torch.float32}
        inputs[mode] = lora_inputs(trainer.model, ENCODER_ADAPTER)
        trainer.reset(0)
        losses[mode] = trainer.train(pos, neg, seed=0).losses
    assert set(inputs["base"]) == {BF16} and set(inputs["float32"]) == {torch.float32}
    assert len(losses["base"]) == len(losses["float32"]) >= 2
    np.testing.assert_allclose(losses["base"], losses["float32"], rtol=0.05)
