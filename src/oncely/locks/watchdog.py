"""Keeping held locks alive (``auto_renew=True``) and telling the holder when one is lost.

Redisson's watchdog extends a lock every ttl/3; when a renewal fails it stops quietly and the
holder carries on without a lock. python-redis-lock's renewal thread dies silently on an error.
Here a renewal that fails is retried while the lease (measured conservatively from the moment
the last successful renewal was *sent*) still has time, and a lost lock is always reported: the
lock's ``lost`` event is set, its ``on_lost`` callback runs, and ``check()`` / ``release()`` raise
:class:`~oncely.errors.LockLost`.

Sync locks share one daemon thread per process (a heap of due renewals: registering a lock is a
heap push, so short critical sections never pay for a thread). Async locks renew in one small
task each on their own event loop.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from typing import Protocol

__all__ = ["Due", "Watchdog", "watchdog"]


class Due(Protocol):
    """A scheduled renewal: ``run()`` does it and returns when to run again (None: stop)."""

    due: float
    active: bool

    def run(self) -> float | None: ...


class Watchdog:
    """One thread renewing every sync lock of this process that asked for ``auto_renew``."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Due]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, entry: Due) -> None:
        """Run ``entry`` at ``entry.due`` (monotonic), then whenever it asks to run again."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="oncely-lock-watchdog", daemon=True
                )
                self._thread.start()
            first = not self._heap or entry.due < self._heap[0][0]
            heapq.heappush(self._heap, (entry.due, next(self._seq), entry))
            if first:
                self._cond.notify()

    def cancel(self, entry: Due) -> None:
        """Stop ``entry``; it is dropped from the heap when it comes up."""
        entry.active = False

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
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        entry = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(wait)
            try:
                again = entry.run()
            except BaseException:  # pragma: no cover - run() reports its own errors
                again = None
            if again is not None and entry.active:
                entry.due = again
                with self._cond:
                    heapq.heappush(self._heap, (again, next(self._seq), entry))

    def _after_fork(self) -> None:
        # A forked child holds none of its parent's locks: it must not renew them.
        self._heap = []
        self._cond = threading.Condition()
        self._thread = None


#: The process-wide watchdog thread (started on first use).
watchdog = Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=watchdog._after_fork)
