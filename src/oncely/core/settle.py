"""Storing a call's outcome after it ran, when the store did not take it at once.

Once a call's body ran, its effect happened: the key must end *completed*, never released, or
a retry runs the effect a second time. A completion that meets
:class:`~oncely.errors.StoreUnavailable` a few times in a row (the flows retry briefly inline)
is handed to the background here: the write is retried with a growing pause (0.1 s doubling
up to 5 s) for at most :data:`SETTLE_FOR` seconds while the claim's lease keeps being renewed,
so duplicates meanwhile find the call in flight and then replay it. The caller learns at once
that the outcome is not stored yet (:class:`~oncely.errors.ResultNotStored`).

The retry stops when the write lands (or finds its own earlier write: success, see
:mod:`oncely.stores.base`), when the claim is gone (:class:`~oncely.errors.LeaseLost`:
another caller may have run it; logged), on another store error (logged), or at the bound
(logged; the lease then runs out and a later retry runs the call again: an outage longer than
:data:`SETTLE_FOR` is the one case oncely cannot cover without the store).

The decision is written once, as a plan (:func:`settle_plan`, no I/O); :func:`settle_later`
carries it out on a thread, :func:`asettle_later` as a task on the running loop. Both tell the
observers (:mod:`oncely.core.observe`) when a completion starts and how it ends:
``succeeded``, ``given_up`` (the store stayed unreachable for the whole bound) or ``failed``
(the claim was lost, or another store error).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Final

from oncely.core import observe
from oncely.core.cancelsafe import keep_alive
from oncely.core.deadline import DeadlinePassed, within
from oncely.core.observe import describe
from oncely.errors import LeaseLost, OncelyError, StoreUnavailable

__all__ = ["SETTLE_FOR", "Pause", "Write", "asettle_later", "settle_later", "settle_plan"]

log = logging.getLogger("oncely")

#: Seconds a completion is retried in the background before the key is left to its lease.
SETTLE_FOR: Final = 60.0
_FIRST_PAUSE: Final = 0.1
_LONGEST_PAUSE: Final = 5.0


@dataclass(frozen=True, slots=True)
class Write:
    """Perform the write once, :func:`~oncely.core.deadline.within` ``deadline`` (the end of
    the retries, :func:`time.monotonic` seconds: a store that waits for a lock waits no
    longer); the reply is None, or the write's error is thrown in."""

    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float


def settle_plan(what: str, settle_for: float = SETTLE_FOR) -> Generator[Write | Pause, None, bool]:
    """Retry a write while the store is unreachable, at most ``settle_for`` seconds; True if it
    landed. ``what`` names the write in log lines."""
    deadline = time.monotonic() + settle_for
    pause = _FIRST_PAUSE
    write = Write(deadline)
    while True:
        try:
            yield write
        except (StoreUnavailable, DeadlinePassed) as exc:  # down, or locked until the end
            if isinstance(exc, DeadlinePassed) or time.monotonic() + pause > deadline:
                log.error(
                    "oncely: gave up storing %s after %.0fs (%s); the key frees itself when its "
                    "lease runs out, and a retry after that runs the call again",
                    what,
                    settle_for,
                    describe(exc),
                )
                return False
            yield Pause(pause)
            pause = min(pause * 2, _LONGEST_PAUSE)
            continue
        except LeaseLost as exc:
            log.error(
                "oncely: %s could not be stored: the claim was lost meanwhile (%s); another "
                "caller may have run the call too",
                what,
                describe(exc),
            )
            return False
        except OncelyError as exc:
            log.error("oncely: %s could not be stored: %s", what, describe(exc))
            return False
        log.info("oncely: %s stored by the background retry", what)
        return True


class _Told:
    """Tells the observers (if any) that a background completion started, then how it ended."""

    __slots__ = ("last_error", "watch")

    def __init__(self, store: str) -> None:
        self.watch = observe.background(store) if observe.observers else None
        self.last_error: BaseException | None = None

    def end(self, landed: bool | None) -> None:
        """``landed``: the plan's answer (None: the work itself crashed)."""
        if self.watch is None:
            return
        if landed:
            outcome = "succeeded"
        elif landed is False and isinstance(self.last_error, (StoreUnavailable, DeadlinePassed)):
            outcome = "given_up"
        else:
            outcome = "failed"
        self.watch.done(outcome)


def settle_later(
    write: Callable[[], object],
    done: Callable[[], None],
    what: str,
    settle_for: float = SETTLE_FOR,
    store: str = "unknown",
) -> threading.Thread:
    """Run :func:`settle_plan` for ``write`` on a daemon thread; call ``done()`` at the end
    (stop the lease renewal). ``store`` is the store's kind, for the observers (a bounded
    label, :func:`oncely.core.observe.store_kind`). Returns the started thread."""
    told = _Told(store)

    def work() -> None:
        plan = settle_plan(what, settle_for)
        landed: bool | None = None
        try:
            request = plan.send(None)
            while True:
                if isinstance(request, Pause):
                    time.sleep(request.seconds)
                    request = plan.send(None)
                    continue
                try:
                    with within(request.deadline):
                        write()
                except BaseException as exc:
                    told.last_error = exc
                    request = plan.throw(exc)
                else:
                    request = plan.send(None)
        except StopIteration as stop:
            landed = bool(stop.value)
        except BaseException:
            log.exception("oncely: storing %s in the background failed", what)
        finally:
            told.end(landed)
            done()

    thread = threading.Thread(target=work, name="oncely-settle", daemon=True)
    thread.start()
    return thread


def asettle_later(
    write: Callable[[], Awaitable[object]],
    done: Callable[[], None],
    what: str,
    settle_for: float = SETTLE_FOR,
    store: str = "unknown",
) -> asyncio.Future[None]:
    """:func:`settle_later` as a task on the running loop (kept alive until it ends)."""
    told = _Told(store)

    async def work() -> None:
        plan = settle_plan(what, settle_for)
        landed: bool | None = None
        try:
            request = plan.send(None)
            while True:
                if isinstance(request, Pause):
                    await asyncio.sleep(request.seconds)
                    request = plan.send(None)
                    continue
                try:
                    with within(request.deadline):
                        await write()
                except Exception as exc:
                    told.last_error = exc
                    request = plan.throw(exc)
                else:
                    request = plan.send(None)
        except StopIteration as stop:
            landed = bool(stop.value)
        except asyncio.CancelledError:
            # Typically the event loop ending (asyncio.run cancels what is left): say so, since
            # the key is then left to its lease and a retry after it runs the call again.
            log.error(
                "oncely: storing %s was abandoned before it landed (its task was cancelled: "
                "did the event loop end?); the key frees itself when its lease runs out, and a "
                "retry after that runs the call again. Let background work finish before "
                "closing the loop",
                what,
            )
            raise
        finally:
            told.end(landed)
            done()

    task = asyncio.ensure_future(work())
    keep_alive(task)
    return task
