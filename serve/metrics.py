"""The generator's Prometheus metrics, exported through Ray (``ray_``-prefixed, tagged with
the application, deployment and replica), so that a dashboard sums them over every replica
of every node. ``GET /v1/stats`` answers for one replica; these answer for the service.

Ray serves them on each node's metrics export port (``ray.metrics_export_port`` for a local
Ray, ``ray start --metrics-export-port`` on a cluster); ``GET /v1/stats`` lists the
endpoints to scrape.
"""

from __future__ import annotations

from typing import Any

# Milliseconds: adapter loads take ~10-100 ms, generations 0.1-30 s.
LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]

EVENTS = "restage_generator_events"  # exported as ray_restage_generator_events_total
GENERATION_MS = "restage_generation_ms"
ADAPTER_LOAD_MS = "restage_adapter_load_ms"
QUEUE_MS = "restage_queue_ms"


class GeneratorMetrics:
    """Counters of the replica's events (``loads``, ``evictions``, ``requests``, ``images``,
    ``load_failures``...) and histograms of generation, adapter-load and queueing time."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.events = metrics.Counter(
            EVENTS,
            description="Generator replica events: adapter loads, evictions, requests, images.",
            tag_keys=("event",),
        )

        def histogram(name: str, what: str) -> Any:
            return metrics.Histogram(
                name, description=f"{what}, in milliseconds.", boundaries=LATENCY_BOUNDARIES_MS
            )

        self.generation_ms = histogram(GENERATION_MS, "Time generating a request's images")
        self.adapter_load_ms = histogram(ADAPTER_LOAD_MS, "Time loading a product's adapter")
        self.queue_ms = histogram(QUEUE_MS, "Time from the ingress to the generator")

    def event(self, name: str, n: int = 1) -> None:
        self.events.inc(n, tags={"event": name})

    def request(self, generation_ms: float, adapter_load_ms: float, queue_ms: float) -> None:
        self.generation_ms.observe(generation_ms)
        self.queue_ms.observe(queue_ms)
        if adapter_load_ms > 0:  # only the request that caused the load reports it
            self.adapter_load_ms.observe(adapter_load_ms)


def metrics_endpoints() -> list[str]:
    """The Prometheus endpoints of the cluster's live nodes."""
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]
