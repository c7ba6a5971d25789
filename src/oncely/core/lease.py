"""Keeping a claim's lease alive while the function runs, and telling the caller if it is lost.

Sync calls are renewed by :data:`oncely.core.renewal.watchdog`, on the lane (thread) of their store:
a stuck store delays only its own renewals (registering a call is a heap push, so a fast
function never pays for a thread). Async calls renew on their own event loop, each renewal
bounded by :func:`renew_timeout`. Both renew every ``lease / 3``; a failed renewal is retried
while the lease still has time.

The local bound: :attr:`Claimed.held_until` is the monotonic time until which the lease surely
holds, counted from when the claim (or the last confirmed renewal) was *sent*, never from when
its reply arrived: a claim that waited in the store (on a row lock, in a queue) has that much
less lease left. Once the clock passes the bound without a confirmed renewal,
:meth:`Claimed.check` raises :class:`~oncely.errors.LeaseLost`, even if the renewal is still on
the wire. A lost lease is recorded on the handle, logged, and passed to the ``on_lease_lost``
callback; it is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from oncely.core import observe
from oncely.core.cancelsafe import keep_cancel
from oncely.core.records import RecordKey
from oncely.core.renewal import renew_timeout, report, watchdog
from oncely.errors import LeaseLost

if TYPE_CHECKING:  # core imports no store: Store is only a type here
    from oncely.stores.base import Store

__all__ = ["AsyncRenewer", "Claimed", "LeaseKeeper", "current_claim", "keeper"]

log = logging.getLogger("oncely")

LostCallback = Callable[["Claimed", BaseException], None]

#: Makes a lost lease reported once (held for an instant, only when a lease is lost).
_losing = threading.Lock()


@dataclass(eq=False)
class Claimed:
    """The running call's claim: its fence (pass it to fenced writes) and whether it still holds.

    Read it inside a decorated function with :func:`current_claim`. ``lease`` is in seconds;
    :attr:`held_until` is a :func:`time.monotonic` time.
    """

    key: RecordKey
    fence: int
    lease: float
    store: Store
    on_lost: LostCallback | None = None
    #: Monotonic time until which the lease surely holds: the send time of the claim or of the
    #: last confirmed renewal, plus the lease.
    held_until: float = 0.0
    lost: BaseException | None = None
    active: bool = True
    due: float = field(default=0.0, repr=False)

    @property
    def lane(self) -> Store:
        """The store this claim renews on (its renewals share that store's lane)."""
        return self.store

    def start(self, sent_at: float) -> None:
        """Set the bound from the claim's send time (monotonic) and the first renewal's time."""
        self.held_until = sent_at + self.lease
        self.due = sent_at + self.lease / 3

    def run(self) -> float | None:
        """Renew once (on the store's lane); return when to renew next, or None to stop."""
        if not self.active:
            return None
        sent_at = time.monotonic()
        try:
            self.store.renew(self.key, self.fence, self.lease)
        except Exception as exc:  # any failure, typed or not, is retried and then reported
            return self.due if self._failed(exc, time.monotonic()) else None
        self._renewed(sent_at)
        return self.due

    def expire(self) -> None:
        """The bound passed while a renewal was still pending: report the lease lost."""
        self._lose(self._ran_out())

    def check(self) -> None:
        """Raise :class:`~oncely.errors.LeaseLost` if the lease is lost or may be.

        It may be once :func:`time.monotonic` passed :attr:`held_until` without a confirmed
        renewal (the store may be stuck, or this process was paused): another caller may hold
        the key now. No I/O; call it before each step that must not run twice.
        """
        if self.lost is None and self.active and time.monotonic() >= self.held_until:
            self._lose(self._ran_out())
        lost = self.lost
        if lost is not None:
            raise LeaseLost(f"the lease of this call was lost: {lost}") from lost

    def _ran_out(self) -> LeaseLost:
        return LeaseLost(
            f"no renewal of the {self.lease:g}s lease was confirmed in time (the store is slow "
            "or unreachable, or this process was paused); another caller may hold the key now"
        )

    def _renewed(self, sent_at: float) -> None:
        if observe.observers:
            observe.lease_renewed(self.store, True)
        self.held_until = sent_at + self.lease
        self.due = sent_at + self.lease / 3

    def _failed(self, exc: BaseException, now: float) -> bool:
        """Record a failed renewal; True if it should be retried."""
        if not self.active:  # the call finished while the renewal was on the wire
            return False
        if observe.observers:
            observe.lease_renewed(self.store, False)
        if isinstance(exc, LeaseLost) or now + self.lease / 10 >= self.held_until:
            self._lose(exc)
            return False
        log.warning("oncely: lease renewal failed (%s); retrying while the lease lasts", exc)
        self.due = now + self.lease / 10
        return True

    def _lose(self, exc: BaseException) -> None:
        with _losing:  # the lane, the scheduler and check() may all find out; report once
            if self.lost is not None or not self.active:
                return
            self.lost, self.active = exc, False
        log.error(
            "oncely: lease lost for fence %s: %s",
            self.fence,
            exc,
            extra={"oncely_digest": observe.log_digest(self.key), "oncely_fence": self.fence},
        )
        if observe.observers:
            observe.lease_lost(self.store, self.key)
        if self.on_lost is not None:
            report(self.on_lost, self, exc, what="on_lease_lost callback")


active_claim: contextvars.ContextVar[Claimed | None] = contextvars.ContextVar(
    "oncely_claim", default=None
)


def current_claim() -> Claimed | None:
    """The claim of the idempotent call running in this context, or None outside one."""
    return active_claim.get()


class LeaseKeeper:
    """Registers running sync calls with the process-wide :data:`oncely.core.renewal.watchdog`."""

    def keep(self, claimed: Claimed, sent_at: float) -> None:
        """Renew ``claimed`` until :meth:`stop`; ``sent_at``: when its claim was sent."""
        claimed.start(sent_at)
        watchdog.schedule(claimed)

    def stop(self, claimed: Claimed) -> None:
        watchdog.cancel(claimed)


keeper = LeaseKeeper()


class _LoopLeases:
    """The async renewers of one event loop that wait for their first renewal: one timer for
    all of them instead of one per claim.

    Most calls end long before their first renewal is due (``lease / 3``), so registering is
    a set insertion and stopping a set removal; the timer is armed for the earliest due time
    among the waiting renewers (re-armed only when a new one is due sooner) and, when it
    fires, starts the renewal task of every renewer that is due, then arms itself for the
    next one. A renewer thus starts at its due time, as with a timer of its own.
    """

    __slots__ = ("__weakref__", "handle", "loop", "waiting", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: set[AsyncRenewer] = set()
        self.handle: asyncio.TimerHandle | None = None
        #: The monotonic time the timer is armed for (infinity: not armed).
        self.when = math.inf

    def add(self, renewer: AsyncRenewer, due: float) -> None:
        self.waiting.add(renewer)
        if due < self.when:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.when = due
        self.handle = self.loop.call_later(max(due - time.monotonic(), 0.0), self._fire)

    def _fire(self) -> None:
        self.handle = None
        self.when = math.inf
        now = time.monotonic()
        due: list[AsyncRenewer] = []
        later = math.inf
        for renewer in self.waiting:
            when = renewer.claimed.due
            if when <= now:
                due.append(renewer)
            elif when < later:
                later = when
        for renewer in due:
            self.waiting.discard(renewer)
            renewer._start()
        if later < math.inf:
            self._arm(later)


#: Each running loop's :class:`_LoopLeases` (the last one used is also kept in ``_last``, a
#: (weak reference to the loop, leases) pair read in one step, so one loop pays no lookup).
_loop_leases: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopLeases] = (
    weakref.WeakKeyDictionary()
)
_loop_leases_lock = threading.Lock()
_last: tuple[Callable[[], asyncio.AbstractEventLoop | None], _LoopLeases | None] = (
    lambda: None,
    None,
)


def _leases_of(loop: asyncio.AbstractEventLoop) -> _LoopLeases:
    global _last
    ref, leases = _last
    if leases is not None and ref() is loop:
        return leases
    with _loop_leases_lock:
        leases = _loop_leases.get(loop)
        if leases is None:
            leases = _loop_leases[loop] = _LoopLeases(loop)
    _last = (weakref.ref(loop), leases)
    return leases


class AsyncRenewer:
    """Renews one async call's lease on the running loop; cheap until the first renewal is due.

    ``sent_at`` is when the claim was sent (monotonic). Until the first renewal is due
    (``lease / 3`` after ``sent_at``) the renewer only waits in its loop's shared timer
    (:class:`_LoopLeases`); then a task of its own renews every ``lease / 3``. Each renewal
    request is bounded by :func:`renew_timeout` and by the lease's bound, whichever comes
    first.
    """

    __slots__ = ("_leases", "_task", "claimed")

    def __init__(self, claimed: Claimed, sent_at: float) -> None:
        self.claimed = claimed
        self._task: asyncio.Task[None] | None = None
        claimed.start(sent_at)
        self._leases: _LoopLeases | None = _leases_of(asyncio.get_running_loop())
        self._leases.add(self, claimed.due)

    def _start(self) -> None:
        leases, self._leases = self._leases, None
        if leases is not None and self.claimed.active:
            self._task = leases.loop.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        claimed = self.claimed
        while claimed.active:
            sent_at = time.monotonic()
            limit = min(renew_timeout(claimed.lease), claimed.held_until - sent_at)
            try:
                if limit <= 0:
                    raise TimeoutError("the lease ran out before its renewal could be sent")
                with keep_cancel():  # wait_for can drop a cancel that meets the reply (3.11)
                    await asyncio.wait_for(
                        claimed.store.arenew(claimed.key, claimed.fence, claimed.lease), limit
                    )
            except Exception as exc:  # any failure, typed or not, is retried and then reported
                if isinstance(exc, asyncio.TimeoutError) and not str(exc):
                    exc = TimeoutError(f"the store did not answer a renewal within {limit:.3g}s")
                if not claimed._failed(exc, time.monotonic()):
                    return
            else:
                claimed._renewed(sent_at)
            await asyncio.sleep(max(claimed.due - time.monotonic(), 0.0))

    def stop(self) -> None:
        self.claimed.active = False
        leases, self._leases = self._leases, None
        if leases is not None:
            leases.waiting.discard(self)
        if self._task is not None:
            self._task.cancel()
