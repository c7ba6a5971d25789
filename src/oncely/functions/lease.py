"""Keeping a claim's lease alive while the function runs, and telling the caller if it is lost.

Sync calls share the process-wide renewal thread of :mod:`oncely.renewal` with sync locks
(registering a call is a heap push, so a fast function never pays for a thread). Async calls
schedule their renewals on their own event loop with ``call_later``. Both renew every
``lease / 3``; a failed renewal is retried while the lease still has time; a lost lease is
recorded on the :class:`Claimed`
handle (``check()`` raises :class:`~oncely.errors.LeaseLost`), logged, and passed to the
``on_lease_lost`` callback. It is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from oncely.errors import LeaseLost
from oncely.records import RecordKey
from oncely.renewal import watchdog
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

    def run(self) -> float | None:
        """Renew once (on the watchdog thread); return when to renew next, or None to stop."""
        if not self.active:
            return None
        sent_at = time.monotonic()
        try:
            self.store.renew(self.key, self.fence, self.lease)
        except Exception as exc:  # any failure, typed or not, is retried and then reported
            return self.due if self._failed(exc, time.monotonic()) else None
        self._renewed(sent_at)
        return self.due

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
    """Registers running sync calls with the process-wide :data:`oncely.renewal.watchdog`."""

    def keep(self, claimed: Claimed) -> None:
        now = time.monotonic()
        claimed.held_until = now + claimed.lease
        claimed.due = now + claimed.lease / 3
        watchdog.schedule(claimed)

    def stop(self, claimed: Claimed) -> None:
        watchdog.cancel(claimed)


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
            except Exception as exc:  # any failure, typed or not, is retried and then reported
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
