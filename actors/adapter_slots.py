"""Adapter slots of a serving generator: per-product LoRA weights staged as tensors on the
pipeline's device, and one live LoRA adapter in the denoiser that a request's turn fills
from its slot with a single fused copy.

Why not peft's adapters as slots: on SDXL (rank 64, an H200) switching between resident
peft adapters (``set_adapters``) costs 111 ms and a hot-swap into one 185 ms, both Python
walks over ~700 LoRA layers; a served request paid one of them, or both, every turn
(``bench/results/adapter_swap_sdxl_h200.json``). Here the denoiser holds one adapter that is
always active, a slot is a list of tensors in that adapter's parameter order, writing a slot
touches only its own tensors (a host-to-device copy, on a side stream on a GPU), and
``activate`` is one ``torch._foreach_copy_`` of the slot into the live parameters.

An adapter is staged exactly: keys in diffusers' or peft's format, an adapter on fewer
modules than the slots leaves the others at zero, a smaller rank is zero-padded (the delta
``B @ A`` is unchanged), and ``restage train`` folds alpha / rank into the up weights, so
every slot runs at the same scale. What cannot be staged exactly (a larger rank, a module
the slots lack, text-encoder weights) is a ``SlotLayoutError`` naming the setting to change.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import torch

from actors.generator import Generator

LIVE = "restage-live"  # the one adapter in the denoiser


class SlotLayoutError(ValueError):
    """Adapter weights that the slots cannot hold exactly; the message says why and what
    setting to change."""


class AdapterSlots:
    """Named slots for LoRA weights of ``rank`` on ``target_modules`` of ``generator``'s
    denoiser, and the live adapter they are copied into (made and activated here, at
    ``scale``). ``preallocate``: every slot's tensors now (memory fixed from the start),
    else at a slot's first write."""

    def __init__(
        self,
        generator: Generator,
        rank: int,
        target_modules: Sequence[str],
        scale: float,
        slots: Iterable[str],
        preallocate: bool = True,
    ):
        self.generator = generator
        self.rank = rank
        self.target_modules = list(target_modules)
        zeros = generator.neutral_adapter_weights(rank, target_modules)
        generator.load_adapter(LIVE, {k: v.clone() for k, v in zeros.items()}, scale=scale)
        generator.set_adapter(LIVE)
        marker = f".{LIVE}."
        live = [(n, p) for n, p in generator.loaded.model.unet.named_parameters() if marker in n]
        # peft's key of each live tensor (what ``convert_unet_state_dict_to_peft`` gives)
        self.keys = [n.replace(marker, ".") for n, _ in live]
        self._index = {k: i for i, k in enumerate(self.keys)}
        self.live = [p for _, p in live]
        self.device = self.live[0].device
        self.nbytes = sum(p.numel() * p.element_size() for p in self.live)
        self._staged: dict[str, list[torch.Tensor] | None] = dict.fromkeys(slots)
        self._live_slot: str | None = None  # whose weights the live adapter holds now
        self._lock = threading.Lock()  # ``_live_slot`` between a write and an activate
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        # per slot, the last activate's copy out of it: a write into the slot waits for it
        self._read_done: dict[str, torch.cuda.Event] = {}
        if preallocate:
            for slot in self._staged:
                self._allocate(slot)

    @property
    def allocated(self) -> list[str]:
        """Slots whose tensors exist."""
        return [s for s, t in self._staged.items() if t is not None]

    @property
    def live_slot(self) -> str | None:
        return self._live_slot

    def _allocate(self, slot: str) -> list[torch.Tensor]:
        tensors = self._staged[slot]
        if tensors is None:
            tensors = [torch.zeros_like(p, requires_grad=False) for p in self.live]
            self._staged[slot] = tensors
        return tensors

    def layout(self, weights: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """``weights`` (a ``restage train`` adapter as read) in the live adapter's order, on
        the host: None where the adapter has no tensor (zero), a smaller rank padded."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        other = sorted(k for k in weights if not k.startswith("unet."))
        if other and len(other) < len(weights):  # a mix: keys outside the denoiser
            raise SlotLayoutError(
                f"the adapter has weights outside the denoiser ({other[0]}, {len(other)} in "
                "all); serving slots hold UNet LoRA only: train without text-encoder LoRA"
            )
        unet = {k.removeprefix("unet."): v for k, v in weights.items()}
        peft = convert_unet_state_dict_to_peft(unet)
        out: list[torch.Tensor | None] = [None] * len(self.keys)
        for key, value in peft.items():
            i = self._index.get(key)
            if i is None:
                raise SlotLayoutError(
                    f"the adapter has LoRA weights on {key.rsplit('.lora_', 1)[0]}, which the "
                    f"serving slots lack (train.target_modules={self.target_modules}); serve "
                    "with the target_modules it was trained with"
                )
            want = self.live[i].shape
            if value.ndim != len(want):
                raise SlotLayoutError(f"{key}: shape {tuple(value.shape)}, slots {tuple(want)}")
            rank_dim = 0 if ".lora_A." in key else 1
            rank = value.shape[rank_dim]
            other_dims = [d for j, d in enumerate(value.shape) if j != rank_dim]
            if other_dims != [d for j, d in enumerate(want) if j != rank_dim]:
                raise SlotLayoutError(f"{key}: shape {tuple(value.shape)}, slots {tuple(want)}")
            if rank > self.rank:
                raise SlotLayoutError(
                    f"the adapter's rank {rank} exceeds the serving slots' rank {self.rank} "
                    f"(train.rank); serve with train.rank={rank} or more"
                )
            if rank < self.rank:  # zero rows of A / columns of B: the same B @ A
                padded = torch.zeros(want, dtype=value.dtype)
                padded.narrow(rank_dim, 0, rank).copy_(value)
                value = padded
            out[i] = value
        if all(v is None for v in out):
            raise SlotLayoutError("the adapter holds no LoRA weights of the denoiser")
        return out

    @torch.no_grad()
    def write(self, slot: str, weights: dict[str, torch.Tensor]) -> None:
        """Stage ``weights`` into ``slot``. It touches only that slot's tensors, never the
        live adapter, so it may run while another slot's adapter generates (the caller keeps
        two writes of one slot apart, and a slot apart from the turn that activates it)."""
        values = self.layout(weights)  # before anything changes: a bad adapter changes nothing
        tensors = self._allocate(slot)
        with self._lock:
            if self._live_slot == slot:  # its next turn copies it again
                self._live_slot = None
        dst = [t for t, v in zip(tensors, values, strict=True) if v is not None]
        src = [v for v in values if v is not None]
        for t, v in zip(tensors, values, strict=True):
            if v is None:
                t.zero_()
        if self._stream is None:
            torch._foreach_copy_(dst, src)
            return
        done = self._read_done.get(slot)
        with torch.cuda.stream(self._stream):
            if done is not None:
                self._stream.wait_event(done)
            for t, v in zip(dst, src, strict=True):
                t.copy_(v, non_blocking=True)
        self._stream.synchronize()  # the slot is complete when write returns

    @torch.no_grad()
    def activate(self, slot: str) -> bool:
        """Make ``slot``'s adapter the live one (under the pipeline lock, between two
        generations) -> whether anything was copied (False: it was live already)."""
        with self._lock:
            if self._live_slot == slot:
                return False
            tensors = self._staged[slot]
            if tensors is None:
                raise KeyError(f"adapter slot {slot!r} was never written")
            torch._foreach_copy_(self.live, tensors)
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                self._read_done[slot] = event
            self._live_slot = slot
            return True
