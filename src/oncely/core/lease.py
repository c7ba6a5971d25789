"""Keeping a claim's lease alive while the function runs, and telling the caller if it is lost.

Sync and async calls alike are renewed by :data:`oncely.core.renewal.watchdog`, through the
store's sync face on the lane (thread) of their store: a stuck store delays only its own
renewals (registering a call is a heap push, so a fast function never pays for a thread), and an
async body that blocks its event loop cannot starve its own renewals. Renewals run every
``lease / 3``; a failed renewal is retried while the lease still has time.

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from oncely.core import observe
from oncely.core.cancelsafe import keep_cancel
from oncely.core.deadline import within
from oncely.core.observe import describe
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


@dataclass(eq=False, slots=True)
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
    #: The error of the last renewal that failed since the last confirmed one (None: none
    #: failed): what the lease is reported lost with when it runs out meanwhile.
    failure: BaseException | None = field(default=None, repr=False)
    #: The event loop of an async holder (None: a sync holder): ``on_lost`` is called on it,
    #: and renewals stop once it is closed.
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

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
        loop = self.loop
        if loop is not None and loop.is_closed():  # the call died with its loop: let go
            self._lose(
                LeaseLost(
                    "the event loop of this call closed while the call held the key; renewals "
                    "stopped, and the key frees itself when the lease runs out"
                )
            )
            return None
        sent_at = time.monotonic()
        try:
            # Useless past the lease's bound: a store that waits for a lock (SQLite) waits no
            # longer, and never commits a renewal after the lease was reported lost.
            with within(self.held_until):
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

    def _ran_out(self) -> BaseException:
        """Why the lease ran out: the last renewal's error if one failed since the last
        confirmed renewal (the same report as when that failure is found too late to retry),
        else LeaseLost (no reply came: the store is slow or stuck, or this process paused)."""
        if self.failure is not None:
            return self.failure
        return LeaseLost(
            f"no renewal of the {self.lease:g}s lease was confirmed in time (the store is slow "
            "or unreachable, or this process was paused); another caller may hold the key now"
        )

    def _renewed(self, sent_at: float) -> None:
        if observe.observers:
            observe.lease_renewed(self.store, True)
        self.held_until = sent_at + self.lease
        self.due = sent_at + self.lease / 3
        self.failure = None

    def _failed(self, exc: BaseException, now: float) -> bool:
        """Record a failed renewal; True if it should be retried."""
        if not self.active:  # the call finished while the renewal was on the wire
            return False
        if observe.observers:
            observe.lease_renewed(self.store, False)
        if isinstance(exc, LeaseLost) or now + self.lease / 10 >= self.held_until:
            self._lose(exc)
            return False
        log.warning(
            "oncely: lease renewal failed (%s); retrying while the lease lasts", describe(exc)
        )
        self.failure = exc
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
            describe(exc),
            extra={"oncely_digest": observe.log_digest(self.key), "oncely_fence": self.fence},
        )
        if observe.observers:
            observe.lease_lost(self.store, self.key)
        if self.on_lost is not None:
            report(self.on_lost, self, exc, what="on_lease_lost callback", loop=self.loop)


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


class AsyncRenewer:
    """Renews one async call's lease on the watchdog thread, like a sync call's.

    ``sent_at`` is when the claim was sent (monotonic). The claim is registered with the
    process-wide :data:`oncely.core.renewal.watchdog` (a heap push, so a call that ends before
    its first renewal is due, ``lease / 3`` after ``sent_at``, never costs more) and renewed
    through the store's sync face on the store's lane thread, never on the event loop: a body
    that blocks its loop (a sync SDK call, :func:`time.sleep` inside ``async def``) keeps its
    lease for as long as the process lives. A store's sync face opens its connections lazily,
    so only a call that outlives ``lease / 3`` makes it connect. A lost lease is reported on
    the caller's loop (``on_lost`` runs there through :meth:`~asyncio.loop.call_soon_threadsafe`;
    on a thread of its own if the loop is closed); :meth:`Claimed.check` needs no loop. A
    loop closed while the call still held the key (the call died with it) ends the renewals:
    the key frees itself one lease later, as a crashed process's does.

    A store whose sync face cannot renew what its async face claimed (``renews_from_thread``
    false: a Redis store given only an ``async_client``, whose connection settings the URL may
    not carry) is renewed on the caller's loop instead, every ``lease / 3``, each request bounded
    by :func:`renew_timeout` and the lease's bound; there a body that blocks its loop for longer
    than the lease loses it.
    """

    __slots__ = ("_handle", "_on_loop", "_task", "claimed")

    def __init__(self, claimed: Claimed, sent_at: float) -> None:
        self.claimed = claimed
        loop = claimed.loop = asyncio.get_running_loop()
        claimed.start(sent_at)
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_loop = not getattr(claimed.store, "renews_from_thread", True)
        if self._on_loop:
            self._handle = loop.call_later(max(claimed.due - time.monotonic(), 0.0), self._start)
        else:
            watchdog.schedule(claimed)

    def _start(self) -> None:
        self._handle = None
        loop = self.claimed.loop
        if loop is not None and self.claimed.active:
            self._task = loop.create_task(self._renew_forever())

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
        if not self._on_loop:
            watchdog.cancel(self.claimed)  # marks it inactive; the heap drops it lazily
            return
        self.claimed.active = False
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None:
            self._task.cancel()
