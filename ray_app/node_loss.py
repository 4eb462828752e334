"""A job whose Ray node is lost stops with a restage message: what happened, that finished
products are kept, how to resume, and which health-check settings make it rare.

Ray marks a node dead when it misses health checks (on a machine whose cores are all busy
with model actors, under Ray's defaults, a few seconds of starvation is enough); then every
task and actor on it fails with ``NodeDiedError``, ``LocalRayletDiedError`` or an actor error
that says its node died. Kept free of heavy imports: the CLI imports it at start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray_app.config import RestageConfig

log = logging.getLogger("restage")


# Exit status of a job stopped by the loss of a Ray node: EX_TEMPFAIL, "try again later" --
# re-running the same command resumes it.
EXIT_NODE_LOST = 75
_NODE_LOST_TEXT = ("node has died", "node died", "marked dead", "marked as dead", "raylet died")


class NodeLost(RuntimeError):
    """Ray lost a node the job ran on; the message says so and how to resume."""


def is_node_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is Ray reporting a dead node or raylet."""
    from ray import exceptions as rex

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, (rex.NodeDiedError, rex.LocalRayletDiedError)):
            return True
        if isinstance(err, rex.RayActorError) and err.preempted:
            return True
        if isinstance(err, rex.RayError) and any(t in str(err).lower() for t in _NODE_LOST_TEXT):
            return True
        todo += [err.__cause__, err.__context__, getattr(err, "cause", None)]
    return False


def node_lost_message(job: str, config: RestageConfig, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    r = config.ray
    return (
        f"restage {job}: Ray lost a node this job was running on ({first}). Products that "
        "finished before the loss are complete and kept. Re-run the same command to resume: "
        "complete products are skipped, the others are redone. Ray marks a node dead when "
        f"{r.health_check_failure_threshold} health checks in a row (one every "
        f"{r.health_check_period_ms} ms, each allowed {r.health_check_timeout_ms} ms) go "
        "unanswered, which a machine busy with model actors can cause: raise "
        "ray.health_check_failure_threshold or ray.health_check_timeout_ms (--set "
        f"ray.health_check_failure_threshold={2 * r.health_check_failure_threshold}); on a "
        "cluster set RAY_health_check_failure_threshold for `ray start`."
    )


@contextmanager
def node_loss_guard(job: str, config: RestageConfig) -> Iterator[None]:
    """Turn Ray's node-died errors raised inside the block into ``NodeLost``."""
    try:
        yield
    except NodeLost:
        raise
    except Exception as exc:
        if is_node_lost(exc):
            log.error("Ray lost a node: %s", exc)
            raise NodeLost(node_lost_message(job, config, exc)) from exc
        raise
