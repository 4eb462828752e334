"""The generator deployment: one base pipeline per replica, per-product LoRA adapters swapped
in and out with Ray Serve model multiplexing (model id = product id).

Requests for a product are routed to a replica that already holds its adapter. A replica
holds at most ``serve.max_adapters_per_replica`` adapters and evicts the least recently used
one, freeing its slot (``actors.adapter_slots``: a slot is the adapter's tensors on the
pipeline's device; the denoiser holds one live adapter). An adapter is loaded in two steps,
both while another request may be generating: reading and parsing its weights (storage I/O)
and writing them into a free slot, which touches only that slot. A request's turn holds the
pipeline lock, copies its slot into the live adapter (one fused copy) and generates, so
concurrent requests never see another request's adapter or a half-written one. The
prefetcher (``serve.prefetch_adapters``) writes the adapters of waiting requests into free
slots ahead of their turns.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import psutil

from actors.adapter_slots import AdapterSlots
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
    is written into a free slot (no new modules, no base reload), and eviction only frees the
    slot, so the memory adapters use is fixed by construction. The denoiser's live adapter
    (``train.rank`` on ``train.target_modules``) is made when the replica starts; with
    ``serve.warm_adapter_slots`` every slot's tensors are allocated then too.

    With ``serve.prefetch_adapters`` = N > 0 the replica also reads the adapters of the
    requests waiting for the pipeline (in arrival order, at most N ahead) and writes them into
    free slots that no running request uses: a waiting request whose adapter was evicted, or
    never loaded, then finds it resident in its turn. A prefetch never evicts.
    ``bench/serve_prefetch.py`` measures it, ``bench/adapter_swap.py`` the slots against the
    other ways of swapping adapters.
    """

    def __init__(self, config: RestageConfig, adapters_root: str):
        g = config.generate
        self.config = config
        self.options = GenerationOptions(
            g.width, g.height, g.steps, g.guidance_scale, g.negative_prompt
        )
        self.generator = Generator(config.model_spec("generator"), self.options)
        self.layout = AdapterLayout(storage.normalize_uri(adapters_root))
        self.lock = threading.Lock()  # the pipeline: one turn (activate + generate) at a time
        # Slot and queue bookkeeping. Never held across I/O or a generation; taken after
        # ``lock`` when both are needed, never before it.
        self.state = threading.Condition()
        # Serialises writes of adapter weights (loads, prefetches, a reload in a turn).
        self.write_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.timings: Counter[str] = Counter()  # milliseconds summed per kind of adapter work
        # Also told every event (the deployment exports them as Prometheus metrics).
        self.on_event: Callable[[str, int], None] | None = None
        # The spare slot serves a request whose adapter was evicted between its load and its
        # turn at the pipeline (the multiplexer may evict while requests queue).
        self.slots: dict[str, str | None] = {
            f"slot-{i}": None for i in range(config.serve.max_adapters_per_replica + 1)
        }
        self.slot_of: dict[str, str] = {}  # product id -> slot
        # Requests waiting for the pipeline: ticket -> product id, in arrival order.
        self.waiting: dict[int, str] = {}
        self._tickets = itertools.count()
        self.running: str | None = None  # the product generating now, and its slot
        self.running_slot: str | None = None
        self.prefetch_limit = config.serve.prefetch_adapters
        self.prefetching: dict[str, Future[None]] = {}  # product -> its prefetch in flight
        self.ahead: set[str] = set()  # prefetched for a request that has not started yet
        self.loading: set[str] = set()  # placed by a load or a turn now: no prefetch for them
        # Resident adapters that no handle holds: product -> "prefetch" or "reload". A load
        # claims one; otherwise its slot is freed once no waiting request wants it.
        self.unheld: dict[str, str] = {}
        self.prefetcher = (
            ThreadPoolExecutor(self.prefetch_limit, thread_name_prefix="adapter-prefetch")
            if self.prefetch_limit
            else None
        )
        t = config.train
        self.adapter_slots = AdapterSlots(
            self.generator,
            t.rank,
            t.target_modules,
            config.generate.lora_scale,
            self.slots,
            preallocate=config.serve.warm_adapter_slots,
        )

    def count(self, event: str, n: int = 1) -> None:
        with self._count_lock:  # prefetch threads count too
            self.counters[event] += n
        if self.on_event is not None:
            self.on_event(event, n)

    def _time(self, kind: str, start: float) -> None:
        with self._count_lock:
            self.timings[kind] += (time.perf_counter() - start) * 1000

    def close(self) -> None:
        """Stop the prefetcher (waits for a prefetch in flight)."""
        if self.prefetcher is not None:
            self.prefetcher.shutdown(wait=True)

    # ------------------------------------------------------------------ adapters

    async def load(self, product_id: str) -> AdapterHandle:
        """Load ``product_id``'s adapter (the multiplexed loader; Serve caches the result).
        An adapter the prefetcher placed (or is placing) for a waiting request is taken as it
        is: no second read. Otherwise it is read and written into a free slot without the
        pipeline lock, while another request may be generating."""
        start = time.perf_counter()
        if not await asyncio.to_thread(storage.exists, self.layout.metadata(product_id)):
            self.count("load_not_found")
            raise AdapterNotFound(f"no adapter for product {product_id!r}")
        with self.state:
            pending = self.prefetching.get(product_id)
        if pending is not None:
            await asyncio.wrap_future(pending)  # a failed prefetch leaves it to this load
        with self.state:
            resident = product_id in self.slot_of
            if resident:
                if self.unheld.pop(product_id, None) == "prefetch":
                    self.count("prefetch_hits")
            else:
                self.loading.add(product_id)
        if not resident:
            try:
                weights = await asyncio.to_thread(self._read, product_id)
                await asyncio.to_thread(self._place, product_id, weights)
            except Exception as exc:
                self.count("load_failures")
                raise AdapterUnavailable(
                    f"adapter of {product_id!r}: {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                with self.state:
                    self.loading.discard(product_id)
                    self.unheld.pop(product_id, None)  # a turn may have placed it meanwhile
        self.count("loads")
        return AdapterHandle(self, product_id, (time.perf_counter() - start) * 1000)

    def _read(self, product_id: str) -> dict[str, Any]:
        self.count("adapter_reads")
        return read_adapter_weights(self.layout.adapter_dir(product_id))

    def _place(self, product_id: str, weights: dict[str, Any], turn: bool = False) -> str:
        """Write weights into a free slot -> the slot. The write touches only that slot, so
        no pipeline lock is needed (a turn's reload holds it anyway). ``turn``: a reload in
        the product's own turn, which runs with the slot and no handle holds."""
        while True:
            with self.state:
                if product_id in self.slot_of:
                    slot = self.slot_of[product_id]
                    if turn:
                        self.running_slot = slot
                    return slot
                # Not the running turn's slot: it activates from it (an evicted one too).
                free = [
                    s for s, owner in self.slots.items() if owner is None and s != self.running_slot
                ]
                if not free:
                    free = self._displace_prefetched()
                if free:
                    # Prefer a slot whose tensors exist: no allocation.
                    allocated = self.adapter_slots.allocated
                    slot = next((s for s in free if s in allocated), free[0])
                    self.slots[slot] = product_id  # reserved while written
                    break
                pending = list(self.prefetching.values())
                if not pending:
                    if self.running_slot is None or self.slots[self.running_slot] is not None:
                        raise RuntimeError(f"all {len(self.slots)} adapter slots are taken")
                    # The only free slot is an evicted adapter's that still generates:
                    # the turn's end frees it (``generate`` notifies).
                    self.state.wait(timeout=1.0)
                    continue
            wait(pending)  # prefetches still writing: displaceable once written
        start = time.perf_counter()
        try:
            with self.write_lock:
                self.adapter_slots.write(slot, weights)
        except BaseException:
            with self.state:
                self.slots[slot] = None
            raise
        self.count("placements")
        self._time("place_ms", start)
        with self.state:
            self.slot_of[product_id] = slot
            if turn:
                self.unheld[product_id] = "reload"
                self.running_slot = slot
        return slot

    def _displace_prefetched(self) -> list[str]:
        """A placement found no free slot: free the slot of an adapter prefetched for a
        waiting request that no load has claimed yet (prefetches take free slots, and a
        load or a turn's reload may come after them). That request's own load reads it
        again. State held. -> the freed slot, or nothing."""
        victim = next(
            (p for p, o in self.unheld.items() if o == "prefetch" and p != self.running), None
        )
        if victim is None:
            return []
        del self.unheld[victim]
        self.ahead.discard(victim)
        slot = self.slot_of.pop(victim)
        self.slots[slot] = None
        self.count("prefetch_displaced")
        return [slot]

    def release(self, product_id: str) -> None:
        """Free an evicted adapter's slot (its weights are overwritten by the next write). No
        pipeline lock: a running request's slot is never reused before its turn ends
        (``_place`` and ``_schedule`` skip ``running_slot``)."""
        with self.state:
            slot = self.slot_of.pop(product_id, None)
            if slot is not None:
                self.slots[slot] = None
                self.unheld.pop(product_id, None)
                self.count("evictions")
                self._schedule()

    # ------------------------------------------------------------------ prefetch

    def _enqueue(self, product_id: str) -> int:
        """A request starts waiting for the pipeline -> its ticket."""
        with self.state:
            ticket = next(self._tickets)
            self.waiting[ticket] = product_id
            self._schedule()
            return ticket

    def _leave(self, ticket: int, starting: bool) -> None:
        """A request stops waiting: it takes its turn (``starting``) or gives up. State
        held."""
        product_id = self.waiting.pop(ticket, None)
        if product_id is None:
            return
        if product_id not in self.waiting.values():
            self.ahead.discard(product_id)
            if not starting:
                self._free_if_unwanted(product_id)
        self._schedule()

    def _free_if_unwanted(self, product_id: str) -> None:
        """Free the slot of an adapter no handle holds, no request waits for and none runs
        with. State held."""
        if (
            product_id in self.unheld
            and product_id in self.slot_of
            and product_id not in self.waiting.values()
            and product_id != self.running
        ):
            origin = self.unheld.pop(product_id)
            self.slots[self.slot_of.pop(product_id)] = None
            self.count("prefetch_unused" if origin == "prefetch" else "reload_released")

    def _schedule(self) -> None:
        """Start prefetches for the first waiting requests whose adapters are not resident,
        while fewer than ``prefetch_adapters`` are ahead and a free slot is left. State
        held."""
        if self.prefetcher is None:
            return
        for product_id in dict.fromkeys(self.waiting.values()):
            if len(self.ahead | self.prefetching.keys()) >= self.prefetch_limit:
                return
            if (
                product_id in self.slot_of
                or product_id in self.prefetching
                or product_id in self.loading
            ):
                continue
            # Free and not the running request's (an evicted one may still generate).
            free = [
                s for s, owner in self.slots.items() if owner is None and s != self.running_slot
            ]
            # Leave a free slot to each placement under way in a load or a turn. One that
            # comes later and finds none displaces a prefetched adapter that no load has
            # claimed (``_displace_prefetched``).
            if len(free) < len(self.loading) + 1:
                return
            slot = free[0]
            self.slots[slot] = product_id  # reserved while written
            self.ahead.add(product_id)
            self.prefetching[product_id] = self.prefetcher.submit(self._prefetch, product_id, slot)

    def _prefetch(self, product_id: str, slot: str) -> None:
        """Read an adapter and write it into the reserved, inactive ``slot`` (a prefetch
        thread; no pipeline lock). A failure only frees the slot: the request's own load
        reads again and reports the error."""
        start = time.perf_counter()
        try:
            if not storage.exists(self.layout.metadata(product_id)):
                raise AdapterNotFound(product_id)
            weights = self._read(product_id)
            with self.write_lock:
                self.adapter_slots.write(slot, weights)
        except Exception:
            with self.state:
                self.slots[slot] = None
                self.ahead.discard(product_id)
                del self.prefetching[product_id]
                self.count("prefetch_failures")
                self._schedule()
            return
        self._time("prefetch_ms", start)
        with self.state:
            self.slot_of[product_id] = slot
            self.unheld[product_id] = "prefetch"
            del self.prefetching[product_id]
            self.count("prefetches")
            self._free_if_unwanted(product_id)  # its request gave up meanwhile
            self._schedule()

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
        ticket: int | None = None,
    ) -> dict[str, Any]:
        """Images of ``product_id`` (its adapter was loaded with ``load``). The generation
        stops between two denoising steps (``GenerationCancelled``, the lock released) once
        ``cancel`` is set or the wall clock passes ``deadline``; a request cancelled while it
        waited for the lock never starts. ``ticket``: the request's place in the queue
        (``serve_request``), which it leaves on getting the lock. ``started_at``: wall clock
        when it got the lock; ``swap_ms``: adapter work in its turn (a reload after an
        eviction, and the copy of its slot into the live adapter)."""
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
            with self.state:
                if ticket is not None:
                    self._leave(ticket, starting=True)
                self.running = product_id
                pending = self.prefetching.get(product_id)
            try:
                check()
                if pending is not None:  # its prefetch takes no pipeline lock: wait for it
                    wait([pending])
                with self.state:
                    # running_slot is set with the lookup: no load may take the slot between
                    slot = self.running_slot = self.slot_of.get(product_id)
                    if slot is None:
                        self.loading.add(product_id)
                if slot is None:  # evicted while queued: a free slot until a load claims it
                    self.count("reloads_after_eviction")
                    try:
                        slot = self._place(product_id, self._read(product_id), turn=True)
                    finally:
                        with self.state:
                            self.loading.discard(product_id)
                switch = time.perf_counter()
                if self.adapter_slots.activate(slot):
                    self.count("activations")
                self._time("switch_ms", switch)
                swap_ms = (time.perf_counter() - start) * 1000
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
                with self.state:
                    self.running = self.running_slot = None
                    self._free_if_unwanted(product_id)
                    self._schedule()
                    self.state.notify_all()  # a placement may wait for this turn's slot
            self.count("requests")
            self.count("images", len(images))
            return {
                "images": [encode_png(img) for img in images],
                "generation_ms": (time.perf_counter() - start) * 1000,
                "swap_ms": swap_ms,
                "started_at": started_at,
            }

    async def serve_request(
        self,
        product_id: str,
        request: dict[str, Any],
        get_adapter: Callable[[str], Any],
    ) -> dict[str, Any]:
        """One request of the deployment: the adapter (through the multiplexer's cache), then
        the generation in a thread. The request waits in the replica's queue from its arrival
        (the prefetcher sees it there) until its turn. When the request is cancelled (its
        client went away: Serve cancels this coroutine) the thread is told to stop at its
        next step. ``queue_ms`` is everything between the ingress receiving the request and
        the generation starting (routing, the replica's queue, the pipeline lock) except
        this request's own adapter load."""
        ticket = self._enqueue(product_id)
        cancel = threading.Event()
        try:
            handle = await get_adapter(product_id)
            load_ms = handle.take_load_ms()
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
                ticket,
            )
        except asyncio.CancelledError:  # the thread runs on: tell it to stop
            cancel.set()
            self.count("client_gone")
            raise
        finally:
            with self.state:
                self._leave(ticket, starting=False)  # no-op once its turn took it
        received = request.get("received_at", out["started_at"])
        out["queue_ms"] = max(0.0, (out.pop("started_at") - received) * 1000 - load_ms)
        out["adapter_load_ms"] = load_ms
        return out

    def stats(self) -> dict[str, Any]:
        # Without the pipeline lock, which a long generation holds: stats answer at once,
        # from copies (a swap in progress may show up a moment late).
        with self.state:
            slot_of = dict(self.slot_of)
            prefetched = sorted(p for p, origin in self.unheld.items() if origin == "prefetch")
        allocated = self.adapter_slots.allocated
        loaded = sorted(slot_of)
        return {
            "adapters_loaded": loaded,
            "adapters_prefetched": prefetched,
            "slots": len(self.slots),
            "slots_allocated": len(allocated),
            # a slot's tensors are the live adapter's shapes and dtype, whatever it holds
            "adapter_bytes": len(loaded) * self.adapter_slots.nbytes,
            "allocated_adapter_bytes": len(allocated) * self.adapter_slots.nbytes,
            "live_adapter_bytes": self.adapter_slots.nbytes,
            "counters": dict(self.counters),
            "adapter_ms": {k: round(v, 3) for k, v in dict(self.timings).items()},
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
