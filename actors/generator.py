"""Text-to-image generation (role ``generator``): the base model that per-product LoRA
adapters are trained on. In augment it makes in-class negatives from product-free captions
(paper 2.1.3); in generate (and serve) it swaps per-product adapters on the one loaded base
pipeline: ``load_adapter`` reads a ``restage train`` adapter folder from any fsspec URI,
``set_adapter`` picks the active one, ``unload_adapter`` frees it."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ray_app import storage
from ray_app.batching import batch_len, column, map_chunks, object_array
from ray_app.config import ModelSpec
from ray_app.images import encode_png
from ray_app.models import LoadedModel, load_model
from ray_app.storage import AdapterLayout


@dataclass(frozen=True)
class GenerationOptions:
    width: int
    height: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None = None  # None or "": SDXL's zeroed unconditional embedding


def has_negative(neg: str | None) -> bool:
    return bool(neg and neg.strip())


def split_negatives(
    negatives: Sequence[str | None],
) -> list[tuple[list[int], list[str] | None]]:
    """Rows grouped for the ``negative_prompt`` argument of an SDXL pipeline: (row indices,
    their negative prompts) for the rows that have one, and (row indices, None) for the rows
    without one (None, empty or blank).

    SDXL (``force_zeros_for_empty_prompt`` in its config, true for base 1.0 and inpainting
    0.1) was trained with a zero unconditional embedding, and diffusers uses it only when
    ``negative_prompt is None``: ``encode_prompt`` in
    diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py (0.42:
    ``zero_out_negative_prompt = negative_prompt is None and
    self.config.force_zeros_for_empty_prompt``) encodes "" as text instead. The choice
    is per call, not per row, so a batch that mixes both takes one call per group."""
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, neg in enumerate(negatives):
        groups[has_negative(neg)].append(i)
    out: list[tuple[list[int], list[str] | None]] = []
    if groups[True]:
        out.append((groups[True], [str(negatives[i]) for i in groups[True]]))
    if groups[False]:
        out.append((groups[False], None))
    return out


def read_adapter_weights(folder_uri: str) -> dict[str, torch.Tensor]:
    """The LoRA state dict of a ``restage train`` adapter folder, from any fsspec URI (I/O and
    parsing only: it can run while the pipeline generates for another request)."""
    from safetensors.torch import load as load_safetensors

    uri = AdapterLayout.weights_in(storage.normalize_uri(folder_uri))
    return load_safetensors(storage.read_bytes(uri))


def _quiet_multi_adapter_warning() -> None:
    """peft warns "Already found a `peft_config` attribute in the model" whenever an adapter
    is added to a model that holds one already. That is exactly how diffusers keeps several
    named adapters on one pipeline (the generator's slots), and diffusers tracks them by name,
    so the warning is harmless here; silence that one message of that one module. Installed
    at each load (``filterwarnings`` replaces an identical filter) so that a caller's
    ``catch_warnings`` cannot drop it."""
    warnings.filterwarnings(
        "ignore",
        message=r"Already found a `peft_config` attribute in the model",
        category=UserWarning,
        module=r"peft\.tuners\.tuners_utils",
    )


class AdapterError(KeyError):
    """An adapter name that is not loaded, or one loaded twice; the message says which."""

    def __str__(self) -> str:
        return str(self.args[0])


class Generator:
    """Batch in: ``prompt`` (str), ``seed`` (int), optional ``negative_prompt`` and
    ``adapter`` (the name of a loaded adapter, or None for the base model).
    Batch out: ``image`` (PNG bytes or None) and ``error``."""

    role = "generator"

    def __init__(
        self,
        model: ModelSpec,
        options: GenerationOptions,
        device: str | None = None,
        loaded: LoadedModel | None = None,
    ):
        # ``loaded``: a pipeline built elsewhere (benches: real-size random weights)
        self.loaded = loaded or load_model(model, device=device)
        self.batch_size = model.batch_size
        self.options = options
        self._adapters: dict[str, str] = {}  # name -> folder URI
        self._scales: dict[str, float] = {}  # name -> adapter weight
        self._active: str | None = None
        self.adapter_loads: Counter[str] = Counter()  # loads per adapter name (tests, metrics)

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> the folder URI it was read from."""
        return dict(self._adapters)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def load_adapter(
        self,
        name: str,
        source: str | dict[str, torch.Tensor],
        scale: float = 1.0,
    ) -> None:
        """Load an adapter into the loaded pipeline as ``name``, without reloading the base
        model: ``source`` is an adapter folder URI (``restage train`` output) or weights
        already read with ``read_adapter_weights``. The adapter is loaded inactive;
        ``set_adapter(name)`` activates it. (A server swaps adapters through
        ``actors.adapter_slots`` instead: one live adapter, filled by a fused copy.)
        """
        state = read_adapter_weights(source) if isinstance(source, str) else source
        pipe = self.loaded.model
        _quiet_multi_adapter_warning()
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already loaded from {self._adapters[name]}")
        pipe.load_lora_weights(state, adapter_name=name)
        self._adapters[name] = source if isinstance(source, str) else "<weights>"
        self.adapter_loads[name] += 1
        self._scales[name] = scale
        self.set_adapter(self._active)  # a new adapter must not change what is active

    def hotswap_adapter(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        """Overwrite the weights of loaded adapter ``name`` in place (diffusers' LoRA hot-swap;
        raises when the weights target other modules; peft pads a smaller rank). It writes
        only that adapter's own LoRA tensors and its entry of each layer's ``scaling`` dict
        (peft 0.21 ``hotswap_adapter_from_state_dict``). The benches compare it with
        ``actors.adapter_slots``."""
        if name not in self._adapters:
            raise AdapterError(
                f"adapter {name!r} is not loaded; loaded: {sorted(self._adapters) or 'none'}"
            )
        _quiet_multi_adapter_warning()
        self.loaded.model.load_lora_weights(weights, adapter_name=name, hotswap=True)
        self._adapters[name] = "<weights>"
        self.adapter_loads[name] += 1

    def neutral_adapter_weights(
        self, rank: int, target_modules: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """LoRA weights of zeros on the denoiser's ``target_modules``, in the format `restage
        train` saves: loaded as an adapter they change nothing; a server's live adapter starts
        from them (``actors.adapter_slots``)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        unet = self.loaded.model.unet
        probe = "restage-neutral-probe"
        _quiet_multi_adapter_warning()
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules)),
            adapter_name=probe,
        )
        try:
            raw = get_peft_model_state_dict(unet, adapter_name=probe)
        finally:
            with warnings.catch_warnings():  # "...was active which is now deleted": intended
                warnings.simplefilter("ignore", UserWarning)
                unet.delete_adapters(probe)
            if self._adapters:  # peft activated the probe, then another adapter: undo
                self.set_adapter(self._active)
        zeros = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in raw.items()}
        return {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(zeros).items()}

    def set_adapter(self, name: str | None, scale: float | None = None) -> None:
        """Make ``name`` the only active adapter (``None``: the base model alone)."""
        pipe = self.loaded.model
        if name is not None and name not in self._adapters:
            raise AdapterError(
                f"adapter {name!r} is not loaded; loaded: {sorted(self._adapters) or 'none'}"
            )
        if name is None:
            if self._adapters:
                pipe.disable_lora()
        else:
            if scale is not None:
                self._scales[name] = scale
            pipe.enable_lora()
            pipe.set_adapters([name], adapter_weights=[self._scales[name]])
        self._active = name

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from the pipeline and free its memory."""
        if name not in self._adapters:
            raise AdapterError(
                f"adapter {name!r} is not loaded; loaded: {sorted(self._adapters) or 'none'}"
            )
        self.loaded.model.delete_adapters(name)
        del self._adapters[name]
        self._scales.pop(name, None)
        if self._active == name:
            self._active = None
        self.set_adapter(self._active)
        # The deleted LoRA modules are freed by reference counting; a full gc.collect() here
        # would cost hundreds of milliseconds under a server's pipeline lock.
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        negatives: Sequence[str | None],
        options: GenerationOptions | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> list[np.ndarray]:
        """One image per (prompt, seed) with the active adapter; a row without a negative
        prompt (None or "") gets SDXL's zeroed unconditional embedding (``split_negatives``).
        ``options`` overrides the actor's for this call (a served request's size, steps and
        guidance). ``on_step(i)`` is called after each denoising step (of each call, when
        rows with and without a negative prompt are mixed); an exception it raises stops the
        generation there (a server cancels a request whose client went away this way)."""
        images: list[np.ndarray] = [None] * len(prompts)  # type: ignore[list-item]
        for index, negs in split_negatives(negatives):
            done = self._pipeline(
                [prompts[i] for i in index], [seeds[i] for i in index], negs, options, on_step
            )
            for i, img in zip(index, done, strict=True):
                images[i] = img
        return images

    def _pipeline(
        self,
        prompts: list[str],
        seeds: list[int],
        negatives: list[str] | None,
        options: GenerationOptions | None,
        on_step: Callable[[int], None] | None,
    ) -> list[np.ndarray]:
        o = options or self.options
        extra: dict[str, Any] = {}
        if on_step is not None:

            def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
                on_step(step)
                return tensors

            extra["callback_on_step_end"] = callback
        out = self.loaded.model(
            prompt=prompts,
            negative_prompt=negatives,
            width=o.width,
            height=o.height,
            num_inference_steps=o.steps,
            guidance_scale=o.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
            **extra,
        ).images
        return list((np.clip(out, 0, 1) * 255).round().astype(np.uint8))

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        items = [
            (str(p), int(s), neg or self.options.negative_prompt or None)
            for p, s, neg in zip(
                column(batch, "prompt"),
                column(batch, "seed"),
                column(batch, "negative_prompt", n),
                strict=True,
            )
        ]
        names = [a or None for a in column(batch, "adapter", n)]
        results: list[tuple[np.ndarray | None, str | None]] = [(None, None)] * n
        previous = self._active
        # Rows are grouped by adapter so that each adapter is switched to once per batch;
        # within one, rows with a negative prompt come first, so that micro-batches rarely
        # mix rows with and without one (such a micro-batch takes two pipeline calls).
        for name in dict.fromkeys(names):
            index = sorted(
                (i for i, a in enumerate(names) if a == name),
                key=lambda i: not has_negative(items[i][2]),
            )
            try:
                self.set_adapter(name)
            except AdapterError as exc:
                for i in index:
                    results[i] = (None, str(exc))
                continue
            done = map_chunks(
                [items[i] for i in index],
                self.batch_size,
                lambda chunk: self.generate(*map(list, zip(*chunk, strict=True))),
            )
            for i, result in zip(index, done, strict=True):
                results[i] = result
        if self._active != previous:
            self.set_adapter(previous)
        return {
            "image": object_array(
                [encode_png(img) if img is not None else None for img, _ in results]
            ),
            "error": object_array([f"generator: {err}" if err else None for _, err in results]),
        }
