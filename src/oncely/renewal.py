"""One thread per process that renews every lease held by sync code: locks and claims.

Redisson's watchdog extends a lock every ttl/3; when a renewal fails it stops quietly and the
holder carries on without a lock. python-redis-lock's renewal thread dies silently on an error.
Here each scheduled entry does its own renewal and reporting (:mod:`oncely.locks.lock` for
locks, :mod:`oncely.functions.lease` for idempotency claims): a failed renewal is retried while
the lease still has time, and a lost lease is always reported to its holder.

Registering is a heap push, so short critical sections and fast idempotent calls never pay for
a thread; cancelled entries are dropped lazily, and the heap is compacted when they pile up.
Async holders renew on their own event loop instead.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from typing import Protocol

__all__ = ["Due", "Watchdog", "watchdog"]

log = logging.getLogger("oncely")


class Due(Protocol):
    """A scheduled renewal: ``run()`` does it and returns when to run again (None: stop)."""

    due: float
    active: bool

    def run(self) -> float | None: ...


class Watchdog:
    """One thread running every scheduled renewal of this process at its due time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Due]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._cancelled = 0

    def schedule(self, entry: Due) -> None:
        """Run ``entry`` at ``entry.due`` (monotonic), then whenever it asks to run again."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="oncely-watchdog", daemon=True
                )
                self._thread.start()
            first = not self._heap or entry.due < self._heap[0][0]
            heapq.heappush(self._heap, (entry.due, next(self._seq), entry))
            if first:
                self._cond.notify()

    def cancel(self, entry: Due) -> None:
        """Stop ``entry``; it is dropped from the heap when it comes up (or at a compaction)."""
        entry.active = False
        with self._cond:
            self._cancelled += 1
            if self._cancelled > 1024 and self._cancelled * 2 > len(self._heap):
                self._heap = [item for item in self._heap if item[2].active]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def pending(self) -> int:
        """How many renewals are scheduled (including cancelled ones not yet dropped)."""
        with self._cond:
            return len(self._heap)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and not self._heap[0][2].active:
                        heapq.heappop(self._heap)
                        self._cancelled = max(self._cancelled - 1, 0)
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        entry = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(wait)
            try:
                again = entry.run()
            except BaseException:  # run() reports its own failures; this is a bug, never silent
                log.exception("oncely: a renewal crashed and is dropped: %r", entry)
                again = None
            if again is not None and entry.active:
                entry.due = again
                with self._cond:
                    heapq.heappush(self._heap, (again, next(self._seq), entry))

    def _after_fork(self) -> None:
        # A forked child holds none of its parent's leases: it must not renew them.
        self._heap = []
        self._cancelled = 0
        self._cond = threading.Condition()
        self._thread = None


#: The process-wide watchdog thread (started on first use).
watchdog = Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=watchdog._after_fork)
