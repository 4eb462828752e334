"""Compute budgets and rate limits of the endpoint.

A request's cost is what the generator spends on it: pixels x denoising steps x images, in
megapixel-steps (one 1024x1024 image at 30 steps costs 31.5). Three limits apply, in order:

- ``serve.budget.max_request_cost``: one request above it is refused (422, limit named);
- ``serve.budget.key_requests_per_minute`` (burst ``key_request_burst``): a token bucket of
  requests per API key (429 with ``Retry-After``);
- ``serve.budget.key_cost_per_minute``: a token bucket of megapixel-steps per API key, whose
  capacity is one minute's worth (429 with ``Retry-After``).

The buckets live in each ingress replica: with ``serve.ingress_replicas`` = N a key may get
up to N times the limits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ray_app.config import ServeBudgetConfig
from serve.errors import ApiError


def request_cost(width: int, height: int, steps: int, images: int) -> float:
    """Megapixel-steps of a generation: width x height x steps x images / 10^6."""
    return width * height * steps * images / 1e6


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second."""

    capacity: float
    rate: float
    tokens: float = field(init=False)
    updated: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.tokens = self.capacity
        self.updated = -1.0

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens -> 0.0 when granted, else the seconds until they will be
        there (nothing is taken then)."""
        if self.updated >= 0:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if amount <= self.tokens:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) / self.rate

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.capacity, self.tokens + amount)


class Budgets:
    """The limits of every key (by key digest; ``anonymous`` without auth)."""

    MAX_KEYS = 100_000  # idle buckets are full: forgetting them changes nothing

    def __init__(self, config: ServeBudgetConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._cost: dict[str, TokenBucket] = {}

    def charge(self, key: str, cost: float) -> None:
        """Admit a request of ``cost`` for ``key`` or raise the 422/429 that names the limit."""
        c = self.config
        if cost > c.max_request_cost:
            raise ApiError(
                "over_request_budget",
                f"this request costs {cost:.1f} megapixel-steps (width x height x steps x "
                f"num_images / 10^6); the limit per request is serve.budget.max_request_cost="
                f"{c.max_request_cost:g}: ask for fewer images, steps or pixels",
                [{"field": "body", "message": f"cost {cost:.1f} > {c.max_request_cost:g}"}],
            )
        with self._lock:
            now = self.clock()
            if len(self._requests) > self.MAX_KEYS:
                self._requests.clear()
                self._cost.clear()
            requests = self._requests.setdefault(
                key, TokenBucket(c.key_request_burst, c.key_requests_per_minute / 60)
            )
            wait = requests.take(1, now)
            if wait:
                raise ApiError(
                    "rate_limited",
                    f"more than serve.budget.key_requests_per_minute="
                    f"{c.key_requests_per_minute:g} (burst {c.key_request_burst}) for this key",
                    retry_after_s=wait,
                )
            budget = self._cost.setdefault(
                key, TokenBucket(c.key_cost_per_minute, c.key_cost_per_minute / 60)
            )
            wait = budget.take(cost, now)
            if wait:
                requests.give_back(1)
                raise ApiError(
                    "over_key_budget",
                    f"this key has used its serve.budget.key_cost_per_minute="
                    f"{c.key_cost_per_minute:g} megapixel-steps; this request costs {cost:.1f}",
                    retry_after_s=wait,
                )
