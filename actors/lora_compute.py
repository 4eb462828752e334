"""A peft LoRA branch computed in its base's dtype (``train.lora_compute`` and
``personalize.lora_compute`` = ``base``): shared by the generator's LoRA trainer and the
per-product encoder trainer. No ``ray`` and no diffusers here."""

from __future__ import annotations

import torch


def compute_lora_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run every peft LoRA branch of ``model`` in ``dtype`` with its float32 weights: peft
    casts a layer's input to the weights' dtype (float32), adds the branch in float32 and
    casts the sum back, three passes over the layer's activations; instead the input stays
    as it is and the branch's two linear layers run under autocast, which casts only their
    (small) weights, and gives their gradients to the float32 weights."""
    from peft.tuners.lora import LoraLayer

    device = next(model.parameters()).device.type
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        module.cast_input_dtype_enabled = False
        for sub in (*module.lora_A.values(), *module.lora_B.values()):
            # one autocast per layer: an instance saves the state it restores
            sub.forward = torch.autocast(device, dtype=dtype)(sub.forward)
