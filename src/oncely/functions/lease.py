"""Keeping a claim's lease alive while the function runs, and telling the caller if it is lost.

Sync calls share one daemon thread per process (a heap of due renewals; registering a call is
a heap push, so a fast function never pays for a thread). Async calls schedule their renewals
on their own event loop with ``call_later``. Both renew every ``lease / 3``; a failed renewal
is retried while the lease still has time; a lost lease is recorded on the :class:`Claimed`
handle (``check()`` raises :class:`~oncely.errors.LeaseLost`), logged, and passed to the
``on_lease_lost`` callback. It is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from oncely.errors import LeaseLost, OncelyError
from oncely.records import RecordKey
from oncely.stores.base import Store

__all__ = ["AsyncRenewer", "Claimed", "LeaseKeeper", "current_claim", "keeper"]

log = logging.getLogger("oncely")

LostCallback = Callable[["Claimed", BaseException], None]


@dataclass(eq=False)
class Claimed:
    """The running call's claim: its fence (pass it to fenced writes) and whether it still holds.

    Read it inside a decorated function with :func:`current_claim`.
    """

    key: RecordKey
    fence: int
    lease: float
    store: Store
    on_lost: LostCallback | None = None
    #: Monotonic time until which the lease surely holds (measured before each renewal request).
    held_until: float = 0.0
    lost: BaseException | None = None
    active: bool = True
    due: float = field(default=0.0, repr=False)

    def check(self) -> None:
        """Raise :class:`~oncely.errors.LeaseLost` if the lease is known to be lost."""
        if self.lost is not None:
            raise LeaseLost(f"the lease of this call was lost: {self.lost}") from self.lost

    def _renewed(self, sent_at: float) -> None:
        self.held_until = sent_at + self.lease
        self.due = sent_at + self.lease / 3

    def _failed(self, exc: BaseException, now: float) -> bool:
        """Record a failed renewal; True if it should be retried."""
        if not self.active:  # the call finished while the renewal was on the wire
            return False
        if isinstance(exc, LeaseLost) or now + self.lease / 10 >= self.held_until:
            self._lose(exc)
            return False
        log.warning("oncely: lease renewal failed (%s); retrying while the lease lasts", exc)
        self.due = now + self.lease / 10
        return True

    def _lose(self, exc: BaseException) -> None:
        self.lost, self.active = exc, False
        log.error("oncely: lease lost for fence %s: %s", self.fence, exc)
        if self.on_lost is not None:
            try:
                self.on_lost(self, exc)
            except Exception:
                log.exception("oncely: on_lease_lost callback failed")


_current: contextvars.ContextVar[Claimed | None] = contextvars.ContextVar(
    "oncely_claim", default=None
)


def current_claim() -> Claimed | None:
    """The claim of the idempotent call running in this context, or None outside one."""
    return _current.get()


class LeaseKeeper:
    """One thread renewing the leases of all running sync calls of this process."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Claimed]] = []
        self._stale = 0
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def keep(self, claimed: Claimed) -> None:
        now = time.monotonic()
        claimed.held_until = now + claimed.lease
        claimed.due = now + claimed.lease / 3
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="oncely-lease", daemon=True)
                self._thread.start()
            first = not self._heap or claimed.due < self._heap[0][0]
            heapq.heappush(self._heap, (claimed.due, next(self._seq), claimed))
            if first:
                self._cond.notify()

    def stop(self, claimed: Claimed) -> None:
        with self._cond:
            claimed.active = False
            self._stale += 1
            if self._stale > 1024 and self._stale * 2 > len(self._heap):
                self._heap = [item for item in self._heap if item[2].active]
                heapq.heapify(self._heap)
                self._stale = 0

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and not self._heap[0][2].active:
                        heapq.heappop(self._heap)
                        self._stale = max(self._stale - 1, 0)
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        claimed = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(wait)
            sent_at = time.monotonic()
            try:
                claimed.store.renew(claimed.key, claimed.fence, claimed.lease)
            except OncelyError as exc:
                retry = claimed._failed(exc, time.monotonic())
            else:
                claimed._renewed(sent_at)
                retry = True
            with self._cond:
                if retry and claimed.active:
                    heapq.heappush(self._heap, (claimed.due, next(self._seq), claimed))
                elif not claimed.active:
                    self._stale = max(self._stale - 1, 0)


keeper = LeaseKeeper()


class AsyncRenewer:
    """Renews one async call's lease on the running loop; cheap until the first renewal is due."""

    def __init__(self, claimed: Claimed) -> None:
        self.claimed = claimed
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        now = time.monotonic()
        claimed.held_until = now + claimed.lease
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(
            claimed.lease / 3, self._start
        )

    def _start(self) -> None:
        self._handle = None
        self._task = self._loop.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        claimed = self.claimed
        while claimed.active:
            sent_at = time.monotonic()
            try:
                await claimed.store.arenew(claimed.key, claimed.fence, claimed.lease)
            except OncelyError as exc:
                if not claimed._failed(exc, time.monotonic()):
                    return
            else:
                claimed._renewed(sent_at)
            await asyncio.sleep(max(claimed.due - time.monotonic(), 0.0))

    def stop(self) -> None:
        self.claimed.active = False
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None:
            self._task.cancel()
