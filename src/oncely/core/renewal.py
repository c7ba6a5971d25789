"""Renewing every lease held by sync code (locks and idempotency claims), one lane per store.

Redisson's watchdog extends a lock every ttl/3; when a renewal fails it stops quietly and the
holder carries on without a lock. python-redis-lock's renewal thread dies silently on an error.
Here each scheduled entry does its own renewal and reporting (:mod:`oncely.locks.lock` for
locks, :mod:`oncely.core.lease` for idempotency claims): a failed renewal is retried while
the lease still has time, and a lost lease is always reported to its holder.

One scheduler thread (``oncely-watchdog``) keeps the timetable and never talks to a store. When
an entry is due it is handed to the *lane* of the store or lock backend it renews on: one
thread per store (``oncely-renew``), started on first use and ended after a minute without
work, with up to :data:`LANE_THREADS` while renewals queue up behind each other (a batch of
messages in flight: each renewal is a round trip, and one thread sending them one by one fell
behind under load, so leases lapsed). A store that stops answering (a paused server, a cut
network) stalls only its own lane, so it can delay only the renewals of its own leases, never
those of a healthy store.

The scheduler also watches each entry's bound: the monotonic time until which its lease surely
holds, counted from when the last acquire, claim or renewal request that the store confirmed
was *sent*. If that time passes while the entry's renewal is still queued or on the wire, the
entry is told (``expire()``) and reports the lease as lost at once, without waiting for the
stuck request; the holder's ``check()`` also compares the bound with the clock itself, so it
fails even before the report.

Registering is a heap push, so short critical sections and fast idempotent calls never pay for
a thread; cancelled entries are dropped lazily, and the heap is compacted when they pile up.

Async holders are renewed here too, through the sync face of their store: a renewal on the
holder's own event loop would wait for the loop, so a body that blocks it (a sync SDK call, a
``time.sleep`` inside ``async def``) would lose its lease while the process is alive and
working. A store's sync face opens its connections on first use (so only a holder that lives
past ``lease / 3`` makes it connect) and drops them in a forked child. A lost lease is reported
to an async holder on its loop (:func:`report` with ``loop``). The one exception is a
PostgreSQL lock held through the async face: its lock lives in the async session itself, which
only the loop can use, so it renews on the loop (see :mod:`oncely.locks.lock`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

__all__ = ["Due", "Watchdog", "on_renewal_thread", "renew_timeout", "report", "watchdog"]

log = logging.getLogger("oncely")

#: A lane thread ends after this many seconds without work (a later renewal starts a new one).
LANE_IDLE: Final = 60.0
#: A scheduler with nothing scheduled wakes every IDLE_TICK seconds, IDLE_TICKS times in a row,
#: before it sleeps until the next schedule() wakes it: a push that comes due after it wakes by
#: itself anyway need not wake it (a wake costs the caller a GIL hand-over to the scheduler).
IDLE_TICK: Final = 1.0
IDLE_TICKS: Final = 60
#: The most threads one store's lane runs at once (renewals of one store overlap their round
#: trips when they queue up; a stuck store still holds only its own lane's threads).
LANE_THREADS: Final = 8

_RUN: Final = 0
_BOUND: Final = 1

#: Marks the scheduler and lane threads (``renewing`` is True on them).
_thread_role = threading.local()


def on_renewal_thread() -> bool:
    """True on the scheduler thread and on a lane thread."""
    return bool(getattr(_thread_role, "renewing", False))


def report(
    callback: Callable[..., object],
    *args: object,
    what: str,
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """Run a holder's callback (``on_lost``, ``on_lease_lost``) with ``args``.

    With ``loop`` (an async holder's event loop), the callback runs on that loop, handed over
    with :meth:`~asyncio.loop.call_soon_threadsafe` when called from another thread (it runs
    once the loop is free again); a loop that is closed or closing cannot take it, and the
    callback then runs on a thread of its own. Without ``loop``: inline, or, when called on a
    renewal thread, on a daemon thread of its own (``oncely-report``), so a slow or blocking
    callback never stalls the renewals of other leases. A failing callback is logged
    (``what`` names it), never raised into oncely's threads or the loop.
    """

    def call() -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("oncely: %s failed", what)

    if loop is not None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            call()
            return
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(call)
                return
            except RuntimeError:  # closed meanwhile
                pass
        threading.Thread(target=call, name="oncely-report", daemon=True).start()
        return
    if on_renewal_thread():
        threading.Thread(target=call, name="oncely-report", daemon=True).start()
    else:
        call()


def renew_timeout(lease: float) -> float:
    """How long one async renewal request may take (seconds): ``lease / 6``, at least 0.1 s.

    (Only holders renewed on their event loop use it: async PostgreSQL locks.)

    Renewals start at ``lease / 3`` and are retried every ``lease / 10`` while the lease lasts,
    so a store that does not answer in time leaves room for a few more attempts; the caller
    also cuts a request off at the lease's bound. (Sync renewals are bounded by the driver's
    socket timeout instead, and a stuck one stalls only its store's lane.)
    """
    return max(lease / 6, 0.1)


class Due(Protocol):
    """A scheduled renewal.

    ``due`` is when to renew (monotonic seconds); ``held_until`` the monotonic time until which
    the lease surely holds (the send time of the last confirmed request plus its lease);
    ``lane`` the store or backend the renewal talks to (entries with the same lane share one
    thread). ``run()`` renews, on the lane's thread, and returns when to run again (None:
    stop). ``expire()`` is called on the scheduler thread when ``held_until`` passed while a
    renewal was still pending: the entry reports its lease lost (without any I/O).
    """

    due: float
    active: bool

    @property
    def held_until(self) -> float: ...

    @property
    def lane(self) -> object: ...

    def run(self) -> float | None: ...

    def expire(self) -> None: ...


class _Lane:
    """The threads renewing the entries of one store, in the order they came due: one, and up
    to :data:`LANE_THREADS` while renewals queue up behind each other (a batch of messages or
    many requests in flight: each renewal is a round trip, so one thread would fall behind)."""

    def __init__(self, owner: Watchdog, key: object) -> None:
        self.owner = owner
        self.key = key  # kept alive while the lane runs, so its id() is not reused
        self.queue: queue.SimpleQueue[Due] = queue.SimpleQueue()
        #: Threads running :meth:`_loop` (guarded by the owner's ``_cond``).
        self.threads = 0

    def add_thread(self) -> None:
        """Start one more thread on this lane (the caller holds the owner's ``_cond``)."""
        self.threads += 1
        threading.Thread(target=self._loop, name="oncely-renew", daemon=True).start()

    def _loop(self) -> None:
        _thread_role.renewing = True
        owner = self.owner
        while True:
            try:
                entry = self.queue.get(timeout=LANE_IDLE)
            except queue.Empty:
                if owner._retire(self):
                    return
                continue
            try:
                again = entry.run()
            except BaseException:  # run() reports its own failures; this is a bug, never silent
                log.exception("oncely: a renewal crashed and is dropped: %r", entry)
                again = None
            owner._ran(entry, again)


class Watchdog:
    """The process's renewal timetable: one scheduler thread, one lane per store (one thread,
    up to :data:`LANE_THREADS` while renewals queue up)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Due]] = []
        #: Guards everything below; registering and cancelling take it directly (the
        #: Condition's own ``with`` costs a Python-level call each way).
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        #: True from the scheduler thread's start until its loop ends (it ends only on a bug).
        self._running = False
        self._cancelled = 0
        self._lanes: dict[int, _Lane] = {}
        #: ids of entries handed to a lane whose run has not returned yet
        self._pending: set[int] = set()
        #: When the scheduler wakes by itself (monotonic; inf: only when notified). A push due
        #: no earlier needs no notify: a call that ends before its first renewal (the usual
        #: case) then costs a heap push and no thread switch.
        self._wake_at = 0.0

    def schedule(self, entry: Due) -> None:
        """Run ``entry`` at ``entry.due`` (monotonic), then whenever it asks to run again."""
        with self._mutex:
            if not self._running:
                self._running = True
                self._thread = threading.Thread(
                    target=self._loop, name="oncely-watchdog", daemon=True
                )
                self._thread.start()
            self._push(entry.due, _RUN, entry)

    def cancel(self, entry: Due) -> None:
        """Stop ``entry``; it is dropped from the heap when it comes up (or at a compaction)."""
        entry.active = False
        with self._mutex:
            self._cancelled += 1
            if self._cancelled > 1024 and self._cancelled * 2 > len(self._heap):
                self._heap = [item for item in self._heap if item[3].active]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def pending(self) -> int:
        """How many renewals are scheduled (including cancelled ones not yet dropped)."""
        with self._cond:
            return sum(1 for item in self._heap if item[2] == _RUN) + len(self._pending)

    def lanes(self) -> int:
        """How many lanes run now (one per store with renewals in the last minute)."""
        with self._cond:
            return len(self._lanes)

    # -- scheduler thread -------------------------------------------------------------------------
    def _push(self, when: float, kind: int, entry: Due) -> None:
        """Add to the heap (caller holds ``_cond``); wake the scheduler if it is now first."""
        heapq.heappush(self._heap, (when, next(self._seq), kind, entry))
        if when < self._wake_at:
            self._wake_at = when  # it recomputes when it wakes: later pushes need not notify
            self._cond.notify()

    def _loop(self) -> None:
        try:
            self._schedule_forever()
        finally:  # only a bug ends the loop: the next schedule() starts a new thread
            with self._mutex:
                self._running = False

    def _schedule_forever(self) -> None:
        _thread_role.renewing = True
        idle = 0
        while True:
            with self._cond:
                while True:
                    while self._heap and not self._heap[0][3].active:
                        heapq.heappop(self._heap)
                        self._cancelled = max(self._cancelled - 1, 0)
                    now = time.monotonic()
                    wait: float | None
                    if self._heap:
                        idle = 0
                        wait = self._heap[0][0] - now
                        if wait <= 0:
                            _, _, kind, entry = heapq.heappop(self._heap)
                            break
                    elif idle < IDLE_TICKS:
                        idle += 1
                        wait = IDLE_TICK
                    else:
                        wait = None
                    self._wake_at = math.inf if wait is None else now + wait
                    self._cond.wait(wait)
                expired = kind == _BOUND and self._overdue(entry)
                if kind == _RUN:
                    self._dispatch(entry)
            if expired:
                try:
                    entry.expire()
                except BaseException:  # expire() reports by itself; a failure here is a bug
                    log.exception("oncely: reporting an expired lease failed: %r", entry)

    def _dispatch(self, entry: Due) -> None:
        """Hand a due entry to its store's lane; watch its bound meanwhile (holds ``_cond``)."""
        key = entry.lane
        lane = self._lanes.get(id(key))
        if lane is None:
            lane = self._lanes[id(key)] = _Lane(self, key)
        self._pending.add(id(entry))
        lane.queue.put(entry)
        if lane.threads == 0 or (lane.queue.qsize() > 1 and lane.threads < LANE_THREADS):
            lane.add_thread()  # renewals queue up: overlap their round trips
        self._push(entry.held_until, _BOUND, entry)

    def _overdue(self, entry: Due) -> bool:
        """A bound came up (holds ``_cond``): True if the entry must be told its lease ran out."""
        if id(entry) not in self._pending:
            return False  # its renewal returned meanwhile (and scheduled the next one)
        if time.monotonic() < entry.held_until:  # renewed meanwhile (e.g. Lock.extend)
            self._push(entry.held_until, _BOUND, entry)
            return False
        return True

    # -- lane threads -----------------------------------------------------------------------------
    def _ran(self, entry: Due, again: float | None) -> None:
        with self._cond:
            self._pending.discard(id(entry))
            if again is not None and entry.active:
                entry.due = again
                self._push(again, _RUN, entry)

    def _retire(self, lane: _Lane) -> bool:
        """An idle lane asks to end: True (and forgotten) unless work arrived meanwhile."""
        with self._cond:
            if not lane.queue.empty():
                return False
            lane.threads -= 1
            if lane.threads == 0 and self._lanes.get(id(lane.key)) is lane:
                del self._lanes[id(lane.key)]
            return True

    def _after_fork(self) -> None:
        # A forked child holds none of its parent's leases: it must not renew them.
        self._heap = []
        self._cancelled = 0
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._thread = None
        self._running = False
        self._lanes = {}
        self._pending = set()
        self._wake_at = 0.0


#: The process-wide renewal timetable (its threads start on first use).
watchdog = Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=watchdog._after_fork)
