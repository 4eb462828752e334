"""K products' LoRAs trained in one forward/backward of a shared base (issue 18, part 3).

``StackedLora`` keeps, for every peft LoRA layer of the denoiser, the K products' down and
up weights stacked into one float32 parameter each (``A``: [K, r, in], ``B``: [K, out, r]).
Inside ``active()`` the peft LoRA branch is switched off and a forward hook on each LoRA layer
adds ``(x_k @ A_k^T) @ B_k^T * scale`` to the base output, where ``x_k`` is product k's slice
of the batch. The batch is product-major: K products times the same per-product batch, so
``x.view(K, -1, in)`` groups it and two ``bmm`` compute every product's delta at once; the
base weights are shared, never copied. Every op of the denoiser is per-sample (GroupNorm,
attention within a sample), so product k's gradient is exactly the gradient of its own loss.

``store(k)`` / ``load(k)`` move product k's weights between the peft layer and slot k, so
the trainer's reset, evaluation and save code (which use the peft LoRA) work unchanged.
Only plain (non-DoRA) LoRA on ``nn.Linear`` layers is handled: the attention projections
that ``train.target_modules`` names by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def lora_layers(model: nn.Module, adapter: str) -> list[tuple[str, nn.Module]]:
    """The peft LoRA layers of ``model`` that carry ``adapter``, in module order. Raises
    ``ValueError`` for a layer that the stacked forward cannot reproduce."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if not isinstance(module.get_base_layer(), nn.Linear):
            raise ValueError(
                f"train.products_per_step > 1 needs LoRA on linear layers only; {name} is a "
                f"{type(module.get_base_layer()).__name__}: drop it from train.target_modules "
                "or set train.products_per_step=1"
            )
        if module.use_dora.get(adapter) or adapter in getattr(module, "lora_variant", {}):
            raise ValueError(
                f"{name}: LoRA variants (DoRA) are not supported in multi-product batches"
            )
        out.append((name, module))
    if not out:
        raise ValueError(f"the model has no LoRA layer with adapter {adapter!r}")
    return out


class StackedLora(nn.Module):
    """K products' weights of every LoRA layer of a model, stacked along a first axis."""

    def __init__(
        self,
        model: nn.Module,
        adapter: str,
        products: int,
        compute_dtype: torch.dtype = torch.float32,
    ):
        """``compute_dtype``: the deltas' matmuls run in it (``train.lora_compute``); the
        stacked weights stay float32."""
        super().__init__()
        if products < 1:
            raise ValueError(f"products={products}: need at least one")
        self.adapter, self.products = adapter, products
        self.compute_dtype = compute_dtype
        self.layers = lora_layers(model, adapter)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.scales: list[float] = []
        for _, layer in self.layers:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            self.A.append(nn.Parameter(a.new_zeros(products, *a.shape, dtype=torch.float32)))
            self.B.append(nn.Parameter(b.new_zeros(products, *b.shape, dtype=torch.float32)))
            self.scales.append(float(layer.scaling[adapter]))

    def _peft(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight

    @torch.no_grad()
    def store(self, k: int) -> None:
        """Copy the peft layers' current weights into product slot ``k``."""
        for (_, layer), a, b in zip(self.layers, self.A, self.B, strict=True):
            pa, pb = self._peft(layer)
            a[k].copy_(pa)
            b[k].copy_(pb)

    @torch.no_grad()
    def load(self, k: int) -> None:
        """Write product slot ``k`` back into the peft layers (to evaluate or save it)."""
        for (_, layer), a, b in zip(self.layers, self.A, self.B, strict=True):
            pa, pb = self._peft(layer)
            pa.copy_(a[k])
            pb.copy_(b[k])

    def grad_norms(self) -> torch.Tensor:
        """Per-product L2 norm of the gradient over all layers: shape [K]."""
        squares = torch.zeros(self.products, device=self.A[0].device)
        for p in [*self.A, *self.B]:
            if p.grad is not None:
                squares += p.grad.detach().float().pow(2).flatten(1).sum(1)
        return squares.sqrt()

    @torch.no_grad()
    def clip_grad_norms(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` applied to each product's gradients on its own
        (coefficient ``max_norm / (norm + 1e-6)``, at most 1); returns the norms before."""
        norms = self.grad_norms()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in [*self.A, *self.B]:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype).view(-1, *([1] * (p.dim() - 1))))
        return norms

    @contextlib.contextmanager
    def active(self) -> Iterator[StackedLora]:
        """Within: the peft LoRA branch is off and each layer adds its product's delta from
        the stacked weights; the batch must be K product-major groups of equal size."""
        handles, disabled = [], []
        try:
            for i, (_, layer) in enumerate(self.layers):
                disabled.append((layer, layer._disable_adapters))
                layer._disable_adapters = True  # no requires_grad toggling (enable_adapters)
                handles.append(layer.register_forward_hook(self._hook(i)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer, before in disabled:
                layer._disable_adapters = before

    def _hook(self, i: int):
        K, scale = self.products, self.scales[i]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if x.shape[0] % K:
                raise ValueError(
                    f"{self.layers[i][0]}: batch of {x.shape[0]} is not {K} equal product groups"
                )
            dtype = self.compute_dtype
            a, b = self.A[i].to(dtype), self.B[i].to(dtype)  # float32: no copy
            grouped = x.to(dtype).reshape(K, -1, x.shape[-1])  # product-major
            delta = torch.bmm(torch.bmm(grouped, a.transpose(1, 2)), b.transpose(1, 2))
            delta = delta.reshape(*x.shape[:-1], b.shape[1]) * scale
            return (output + delta).to(output.dtype)  # float32: as peft, add and cast back

        return hook
