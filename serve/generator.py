"""The generator deployment: one base pipeline per replica, per-product LoRA adapters swapped
in and out with Ray Serve model multiplexing (model id = product id).

Requests for a product are routed to a replica that already holds its adapter. A replica
holds at most ``serve.max_adapters_per_replica`` adapters and evicts the least recently used
one, deleting it from the pipeline and freeing its memory. An adapter is loaded in two
steps: reading and parsing its weights (storage I/O, done while another request may be
generating) and injecting them into the pipeline (fast, under the pipeline lock). Every
change of the pipeline and every generation holds one lock, so concurrent requests never
see another request's adapter or a half-loaded one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil

from actors.generator import GenerationOptions, Generator, read_adapter_weights
from ray_app import storage
from ray_app.config import RestageConfig
from ray_app.images import encode_png
from ray_app.storage import AdapterLayout
from serve.errors import AdapterNotFound, AdapterUnavailable, GenerationCancelled

__all__ = ["AdapterHandle", "AdapterNotFound", "GeneratorReplica", "serve_deployment"]


class AdapterHandle:
    """A product's adapter while the replica holds it. Ray Serve calls ``__del__`` when it
    evicts the adapter (in a worker thread); the call is idempotent, since the garbage
    collector calls it again later."""

    def __init__(self, replica: GeneratorReplica, product_id: str, load_ms: float):
        self.replica = replica
        self.product_id = product_id
        self.load_ms = load_ms
        self._load_reported = False
        self._released = False

    def take_load_ms(self) -> float:
        """The load time, reported once: to the request that caused the load."""
        if self._load_reported:
            return 0.0
        self._load_reported = True
        return self.load_ms

    def __del__(self) -> None:
        if not self._released:
            self._released = True
            self.replica.release(self.product_id)


class GeneratorReplica:
    """The body of the ``Generator`` Serve deployment (plain Python, testable without Serve).

    Adapters live in ``max_adapters_per_replica`` slots, plus one spare: a product's adapter
    is hot-swapped into a free slot (diffusers' in-place LoRA swap: no new modules, no base
    reload), and eviction only frees the slot, so the memory adapters use is fixed by
    construction. ``bench/adapter_swap.py`` measures a hot-swap against loading and deleting
    named adapters.
    """

    def __init__(self, config: RestageConfig, adapters_root: str):
        g = config.generate
        self.config = config
        self.options = GenerationOptions(
            g.width, g.height, g.steps, g.guidance_scale, g.negative_prompt
        )
        self.generator = Generator(config.model_spec("generator"), self.options)
        self.layout = AdapterLayout(storage.normalize_uri(adapters_root))
        self.lock = threading.Lock()  # the pipeline: one generation or adapter change at a time
        self.counters: Counter[str] = Counter()
        # Also told every event (the deployment exports them as Prometheus metrics).
        self.on_event: Callable[[str, int], None] | None = None
        # The spare slot serves a request whose adapter was evicted between its load and its
        # turn at the pipeline (the multiplexer may evict while requests queue).
        self.slots: dict[str, str | None] = {
            f"slot-{i}": None for i in range(config.serve.max_adapters_per_replica + 1)
        }
        self.slot_of: dict[str, str] = {}  # product id -> slot
        self.slot_bytes: dict[str, int] = {}

    def count(self, event: str, n: int = 1) -> None:
        self.counters[event] += n
        if self.on_event is not None:
            self.on_event(event, n)

    # ------------------------------------------------------------------ adapters

    async def load(self, product_id: str) -> AdapterHandle:
        """Load ``product_id``'s adapter (the multiplexed loader; Serve caches the result).
        Reading the weights happens outside the pipeline lock, while another request may be
        generating; only the swap into a slot takes the lock."""
        start = time.perf_counter()
        if not await asyncio.to_thread(storage.exists, self.layout.metadata(product_id)):
            self.count("load_not_found")
            raise AdapterNotFound(f"no adapter for product {product_id!r}")
        try:
            weights = await asyncio.to_thread(
                read_adapter_weights, self.layout.adapter_dir(product_id)
            )
            await asyncio.to_thread(self._place, product_id, weights)
        except Exception as exc:
            self.count("load_failures")
            raise AdapterUnavailable(
                f"adapter of {product_id!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self.count("loads")
        return AdapterHandle(self, product_id, (time.perf_counter() - start) * 1000)

    def _place(self, product_id: str, weights: dict[str, Any]) -> str:
        """Put weights into a free slot (caller holds no lock) -> the slot."""
        with self.lock:
            return self._place_locked(product_id, weights)

    def _place_locked(self, product_id: str, weights: dict[str, Any]) -> str:
        if product_id in self.slot_of:
            return self.slot_of[product_id]
        free = [s for s, owner in self.slots.items() if owner is None]
        if not free:
            raise RuntimeError(f"all {len(self.slots)} adapter slots are taken")
        # Prefer a slot that already holds modules: a hot-swap instead of new modules.
        slot = next((s for s in free if s in self.generator.adapters), free[0])
        self.generator.load_adapter(
            slot,
            weights,
            scale=self.config.generate.lora_scale,
            replace=slot in self.generator.adapters,
        )
        self.slots[slot] = product_id
        self.slot_of[product_id] = slot
        self.slot_bytes[slot] = sum(t.numel() * t.element_size() for t in weights.values())
        return slot

    def release(self, product_id: str) -> None:
        """Free an evicted adapter's slot (its weights are overwritten by the next swap)."""
        with self.lock:
            slot = self.slot_of.pop(product_id, None)
            if slot is not None:
                self.slots[slot] = None
                self.count("evictions")

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        product_id: str,
        prompt: str,
        seeds: list[int],
        steps: int | None,
        guidance_scale: float | None,
        width: int | None,
        height: int | None,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Images of ``product_id`` (its adapter was loaded with ``load``). The generation
        stops between two denoising steps (``GenerationCancelled``, the lock released) once
        ``cancel`` is set or the wall clock passes ``deadline``; a request cancelled while it
        waited for the lock never starts. ``started_at``: wall clock when it got the lock."""
        options = GenerationOptions(
            width or self.options.width,
            height or self.options.height,
            steps or self.options.steps,
            self.options.guidance_scale if guidance_scale is None else guidance_scale,
            self.options.negative_prompt,
        )
        done = 0

        def check(step: int | None = None) -> None:
            nonlocal done
            if step is not None:
                done += 1
                self.count("steps")
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("the client went away", done)
            if deadline is not None and time.time() > deadline:
                raise GenerationCancelled("the deadline passed", done)

        with self.lock:
            started_at = time.time()
            start = time.perf_counter()
            try:
                check()
            except GenerationCancelled:
                self.count("cancelled")
                raise
            slot = self.slot_of.get(product_id)
            temporary = slot is None
            if temporary:  # evicted while queued: use a free slot for this request only
                self.count("reloads_after_eviction")
                slot = self._place_locked(
                    product_id, read_adapter_weights(self.layout.adapter_dir(product_id))
                )
            try:
                self.generator.set_adapter(slot)
                images = self.generator.generate(
                    [prompt] * len(seeds),
                    seeds,
                    [options.negative_prompt] * len(seeds),
                    options=options,
                    on_step=check,
                )
            except GenerationCancelled:
                self.count("cancelled")
                raise
            finally:
                self.generator.set_adapter(None)
                if temporary:
                    self.slots[slot] = None
                    self.slot_of.pop(product_id, None)
            self.count("requests")
            self.count("images", len(images))
            return {
                "images": [encode_png(img) for img in images],
                "generation_ms": (time.perf_counter() - start) * 1000,
                "started_at": started_at,
            }

    async def serve_request(
        self,
        product_id: str,
        request: dict[str, Any],
        get_adapter: Callable[[str], Any],
    ) -> dict[str, Any]:
        """One request of the deployment: the adapter (through the multiplexer's cache), then
        the generation in a thread. When the request is cancelled (its client went away:
        Serve cancels this coroutine) the thread is told to stop at its next step.
        ``queue_ms`` is everything between the ingress receiving the request and the
        generation starting (routing, the replica's queue, the pipeline lock) except this
        request's own adapter load."""
        handle = await get_adapter(product_id)
        load_ms = handle.take_load_ms()
        cancel = threading.Event()
        try:
            out = await asyncio.to_thread(
                self.generate,
                product_id,
                request["prompt"],
                request["seeds"],
                request.get("steps"),
                request.get("guidance_scale"),
                request.get("width"),
                request.get("height"),
                cancel,
                request.get("deadline_at"),
            )
        except asyncio.CancelledError:  # the thread runs on: tell it to stop
            cancel.set()
            self.count("client_gone")
            raise
        received = request.get("received_at", out["started_at"])
        out["queue_ms"] = max(0.0, (out.pop("started_at") - received) * 1000 - load_ms)
        out["adapter_load_ms"] = load_ms
        return out

    def stats(self) -> dict[str, Any]:
        # Without the pipeline lock, which a long generation holds: stats answer at once,
        # from copies (a swap in progress may show up a moment late).
        slot_of, slot_bytes = dict(self.slot_of), dict(self.slot_bytes)
        allocated = list(self.generator.adapters)
        loaded = sorted(slot_of)
        return {
            "adapters_loaded": loaded,
            "slots": len(self.slots),
            "slots_allocated": len(allocated),
            "adapter_bytes": int(sum(slot_bytes.get(slot_of[p], 0) for p in loaded)),
            "allocated_adapter_bytes": int(sum(slot_bytes.get(s, 0) for s in allocated)),
            "counters": dict(self.counters),
            "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
        }


def serve_deployment(config: RestageConfig):
    """The Ray Serve deployment class around ``GeneratorReplica`` (autoscaling and GPUs from
    config; the multiplexing cache size too)."""
    from ray import serve

    s, spec = config.serve, config.generator

    @serve.deployment(
        name="Generator",
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
        },
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={
            "num_gpus": spec.num_gpus,
            "num_cpus": spec.num_cpus,
            "resources": dict(spec.resources),  # the GPU class the placement plan chose
        },
        health_check_period_s=10,
    )
    class GeneratorDeployment:
        def __init__(self, config: RestageConfig, adapters_root: str):
            from serve.metrics import GeneratorMetrics

            self.replica = GeneratorReplica(config, adapters_root)
            self.metrics = GeneratorMetrics()
            self.replica.on_event = self.metrics.event

            async def load(product_id: str) -> AdapterHandle:
                return await self.replica.load(product_id)

            # A closure, because the cache size comes from config at start-up.
            self.get_adapter = serve.multiplexed(
                max_num_models_per_replica=config.serve.max_adapters_per_replica
            )(load)
            self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
            product_id = serve.get_multiplexed_model_id()
            out = await self.replica.serve_request(product_id, request, self.get_adapter)
            out["replica"] = self.replica_id
            self.metrics.request(out["generation_ms"], out["adapter_load_ms"], out["queue_ms"])
            return out

        def stats(self) -> dict[str, Any]:
            return {"replica": self.replica_id, **self.replica.stats()}

        def ready(self) -> bool:
            return True  # the constructor loaded the base pipeline, or this replica would not exist

    return GeneratorDeployment
