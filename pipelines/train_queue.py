"""The work queue of `restage train`: products go to whichever training worker asks next.

The queue is one Ray actor (no CPU) that reads a stream of ``product_id`` rows, each with
its completion status already checked (``pipelines.train.WorkSource``: listed in the actor
for a small job, read in Ray Data tasks for a large one), and leases one product
per ``next`` call. A worker asks for a product only when it is ready to train it, so a fast
worker takes more products and none waits in line behind a slow one. (Ray Data's
``streaming_split`` would not do: its ``OutputSplitter`` hands each block to the split with
the fewest rows so far, whatever the speed of its consumer, and each split iterator
prefetches one block.)

A lease ends when the worker reports the product's result row. When a worker's rank asks
again under a new incarnation key (Ray Train's ``FailureConfig`` restarted the worker group
after a worker died), that rank's unreported leases go back to the front of the queue: the
product in flight is redone; one whose ``adapter.json`` was written before the report got
through is found complete by the worker and counted as done by this run.

The queue holds the current batch of the stream, the leases (at most a group per worker)
and running sums: nothing grows with the catalog, and the driver reads W per-worker
aggregates at the end, never a per-product list. As it reads the stream it writes train's
input index (``pipelines._job.InputIndex``, the valid product ids), whole once the stream
ends: `restage generate` reads it instead of listing the adapter folders.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from ray_app.report import ALREADY

# Stages of a product's training, as its adapter's ``seconds`` names them; "items" counts
# what the job summary counts per product (steps for train and sweep).
STAGE_KEYS = ("load", "setup", "train", "sweep", "write")


class ProductQueue:
    """Leases products to training workers one at a time, from a stream of status rows.

    ``source`` is a Ray Data dataset (iterated here, inside the actor) or any iterable of
    pyarrow tables with columns ``product_id``, ``shard``, ``error`` (why the shard is not a
    product, or null) and ``complete`` (its adapter exists)."""

    def __init__(self, source: Any, index: Any = None):
        if hasattr(source, "iter_batches"):
            batches: Iterable[Any] = source.iter_batches(batch_format="pyarrow")
        else:
            batches = source
        self._batches: Iterator[Any] = iter(batches)
        self._ready: deque[str] = deque()
        self._requeued: deque[str] = deque()
        self._orphans: set[str] = set()  # requeued leases; bounded by the workers' groups
        self._leases: dict[int, set[str]] = {}
        self._incarnation: dict[int, str] = {}
        self.listed = self.invalid = self.complete = 0
        self.invalid_rows: list[tuple[str, str]] = []  # (shard name, reason): data errors
        self.ok = self.failed = 0
        self.stages = {k: {"items": 0, "seconds": 0.0} for k in STAGE_KEYS}
        self.workers: dict[int, dict[str, Any]] = {}
        self._index = index  # an InputIndex, closed (and dropped) when the stream ends
        self.queued = 0  # distinct products queued to train so far
        self.ended = False  # the stream is read to its end: ``queued`` is the whole run's

    # ------------------------------------------------------------------ leasing

    def has_work(self) -> bool:
        """Whether any product is left to train (reads the stream up to the first one)."""
        return self._peek() is not None

    def ready(self, most: int) -> int:
        """How many products are left to train, counting at most ``most`` (reads the stream
        that far, so the queue holds at most ``most`` ids beyond its current batch): the job
        starts no more workers than there is work for."""
        return min(most, self._fill(most))

    def next(self, key: str, rank: int) -> str | None:
        """The next product for worker ``rank`` (incarnation ``key``), or None when the
        stream is exhausted."""
        if self._incarnation.get(rank) != key:
            # A new incarnation of this rank: the old one died with its leases unreported.
            for pid in sorted(self._leases.get(rank, ())):
                self._requeued.append(pid)
                self._orphans.add(pid)
            self._leases[rank] = set()
            self._incarnation[rank] = key
        pid = self._peek()
        if pid is None:
            return None
        (self._requeued if self._requeued else self._ready).popleft()
        self._leases[rank].add(pid)
        return pid

    def _peek(self) -> str | None:
        if not self._fill(1):
            return None
        return self._requeued[0] if self._requeued else self._ready[0]

    def _fill(self, least: int) -> int:
        """Read the stream until ``least`` products wait (or it ends: then the input index is
        whole) -> how many wait."""
        while len(self._requeued) + len(self._ready) < least:
            batch = next(self._batches, None)
            if batch is None:
                self.ended = True
                if self._index is not None:
                    self._index.close()
                    self._index = None
                break
            self._ingest(batch)
        return len(self._requeued) + len(self._ready)

    def _ingest(self, batch: Any) -> None:
        cols = batch.to_pydict()
        # A product listed twice is leased once while it is queued or in flight (once done,
        # its worker finds its adapter and reports it complete).
        seen = set(self._ready).union(*self._leases.values())
        if self._index is not None:
            self._index.add(
                [p for p, e in zip(cols["product_id"], cols["error"], strict=True) if e is None]
            )
        for pid, shard, error, complete in zip(
            cols["product_id"], cols["shard"], cols["error"], cols["complete"], strict=True
        ):
            self.listed += 1
            if error is not None:
                self.invalid += 1
                self.invalid_rows.append((shard, error))
            elif complete:
                self.complete += 1
            elif pid not in seen:
                seen.add(pid)
                self._ready.append(pid)
                self.queued += 1

    # ------------------------------------------------------------------ results

    def progress(self) -> tuple[int, dict[str, int], int | None]:
        """(products trained or failed so far, their counts and those found complete from
        earlier runs, the products to do in this run once the stream has been read to its
        end, else None): the live progress file's."""
        return (
            self.ok + self.failed,
            {"ok": self.ok, "failed": self.failed, ALREADY: self.complete},
            (self.queued if self.ended else None),
        )

    def report(self, rank: int, row: dict[str, Any]) -> None:
        """A worker's result for one product: ``status`` ok, failed or complete (its adapter
        existed when leased), with ``seconds`` per stage and ``steps`` when ok."""
        pid = row["product_id"]
        lease = self._leases.get(rank, set())
        if pid not in lease:
            return  # not this worker's lease (a duplicate row of the stream)
        lease.discard(pid)
        status = row["status"]
        if status == "complete":
            if pid not in self._orphans:  # finished by another run meanwhile
                self.complete += 1
                return
            status = "ok"  # written by this run before its worker died
        self._orphans.discard(pid)
        worker = self.workers.setdefault(
            rank, {"rank": rank, "products": 0, "ok": 0, "failed": 0, "seconds": 0.0}
        )
        worker["products"] += 1
        if status != "ok":
            self.failed += 1
            worker["failed"] += 1
            return
        self.ok += 1
        worker["ok"] += 1
        seconds = row.get("seconds") or {}
        steps = int(row.get("steps") or 0)
        for name in STAGE_KEYS:
            stage = self.stages[name]
            stage["items"] += steps if name == "train" else 0 if name == "sweep" else 1
            stage["seconds"] += float(seconds.get(name, 0.0))
        total = float(seconds.get("total", 0.0))
        worker["seconds"] += total
        slowest = worker.get("slowest")
        if slowest is None or total > slowest["seconds"]:
            worker["slowest"] = {"product_id": pid, "seconds": total}

    def result(self) -> dict[str, Any]:
        """The sums over the stream and every worker's reports."""
        return {
            "listed": self.listed,
            "invalid": self.invalid,
            "invalid_rows": list(self.invalid_rows),
            "complete": self.complete,
            "ok": self.ok,
            "failed": self.failed,
            "stages": self.stages,
            "workers": [self.workers[r] for r in sorted(self.workers)],
            "unreported": sorted(set().union(*self._leases.values())) if self._leases else [],
        }
