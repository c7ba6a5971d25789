"""The store operations of the sans-IO flows, and how a driver carries them out.

Both flows — the decorator's :func:`oncely.functions.flow.call_flow` and HTTP's
:func:`oncely.http.flow.request_flow` — yield these operations and receive their results; each
carries everything the store needs, so one :func:`perform` (blocking) and one :func:`aperform`
(``await``) serve every driver. A flow's own operations (run the function, send a response,
read a body, consume a token) stay with the flow.

The async face is cancel-safe (:mod:`oncely.core.cancelsafe`): a claim that succeeded after its
caller was cancelled is released again, and a fenced write (complete, release) goes on in the
background. :class:`CompleteLater` hands a completion the store did not take to
:mod:`oncely.core.settle`, with the claim's lease renewed meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oncely.core import deadline, observe
from oncely.core.cancelsafe import claim_or_undo, write_again, write_through
from oncely.core.frozen import quick_init
from oncely.core.lease import AsyncRenewer, Claimed, keeper
from oncely.core.records import RecordKey
from oncely.core.settle import asettle_later, settle_later

if TYPE_CHECKING:  # core imports no store: Store is only a type here
    from oncely.stores.base import Store

__all__ = [
    "Claim",
    "Complete",
    "CompleteLater",
    "Release",
    "Sleep",
    "StoreOp",
    "Watch",
    "aperform",
    "perform",
]


@quick_init
@dataclass(frozen=True, slots=True)
class Claim:
    """Claim ``key`` (``lease`` and ``ttl`` in seconds); the result is a claim outcome.

    ``deadline`` (a :func:`time.monotonic` time in seconds, None: none) is the caller's own
    bound: the store call runs :func:`~oncely.core.deadline.within` it, so a store that waits
    for a lock (SQLite) waits no longer and raises
    :class:`~oncely.core.deadline.DeadlinePassed` (nothing written) if it passes first.
    """

    key: RecordKey
    fingerprint: str
    lease: float
    ttl: float
    deadline: float | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class Complete:
    """Store the outcome under ``fence``, kept ``ttl`` seconds."""

    key: RecordKey
    fence: int
    data: bytes
    codec: str
    ttl: float


@quick_init
@dataclass(frozen=True, slots=True)
class CompleteLater:
    """Keep retrying :class:`Complete` in the background, renewing the ``lease`` (seconds)
    meanwhile (:mod:`oncely.core.settle`); the flow goes on at once. ``what`` names the
    outcome in log lines."""

    key: RecordKey
    fence: int
    data: bytes
    codec: str
    ttl: float
    lease: float
    what: str


@quick_init
@dataclass(frozen=True, slots=True)
class Release:
    """Free the key held under ``fence``."""

    key: RecordKey
    fence: int


@quick_init
@dataclass(frozen=True, slots=True)
class Watch:
    """Wait until the claim under ``fence`` changes, at most ``timeout`` seconds; the result
    says whether it changed."""

    key: RecordKey
    fence: int
    timeout: float


@quick_init
@dataclass(frozen=True, slots=True)
class Sleep:
    """Pause ``seconds`` (between retries)."""

    seconds: float


StoreOp = Claim | Complete | CompleteLater | Release | Watch | Sleep


def _store_call(op: StoreOp) -> tuple[str, tuple[Any, ...]]:
    """The store method (sync name) and arguments that carry out a plain store operation."""
    if isinstance(op, Claim):
        return "claim", (op.key, op.fingerprint, op.lease, op.ttl)
    if isinstance(op, Complete):
        return "complete", (op.key, op.fence, op.data, op.codec, op.ttl)
    if isinstance(op, Release):
        return "release", (op.key, op.fence)
    if isinstance(op, Watch):
        return "watch", (op.key, op.fence, op.timeout)
    raise AssertionError(op)  # pragma: no cover - Sleep and CompleteLater are not store calls


def perform(store: Store, op: StoreOp) -> Any:
    """Carry out ``op`` with blocking calls; returns what the flow expects back.

    :raises: whatever the store raises (the driver throws it into the flow, which decides).
    """
    if isinstance(op, Sleep):
        time.sleep(op.seconds)
        return None
    if isinstance(op, CompleteLater):
        held = Claimed(op.key, op.fence, op.lease, store)
        keeper.keep(held, time.monotonic())
        write = functools.partial(store.complete, op.key, op.fence, op.data, op.codec, op.ttl)
        stop = functools.partial(keeper.stop, held)
        settle_later(write, stop, op.what, store=observe.store_kind(store))
        return None
    if type(op) is Claim and op.deadline is not None:
        with deadline.within(op.deadline):
            return _perform(store, op)
    return _perform(store, op)


def _perform(store: Store, op: StoreOp) -> Any:
    name, args = _store_call(op)
    if not observe.observers:
        return getattr(store, name)(*args)
    with observe.operation(store, name, args[0]) as watch:
        result = getattr(store, name)(*args)
        watch.outcome = observe.claim_outcome(result)
        return result


async def aperform(store: Store, op: StoreOp, *, cancel_safe: bool = True) -> Any:
    """:func:`perform` with ``await``; the claim and the fenced writes are cancel-safe.

    ``cancel_safe=False`` sends a claim without the shielded task that undoes it when the
    caller is cancelled meanwhile (:func:`~oncely.core.cancelsafe.claim_or_undo`): for a
    caller whose task is never cancelled during the claim and which undoes it itself.
    """
    if type(op) is Claim and op.deadline is not None:
        # the claim's store call (and the task that carries it) sees the deadline
        with deadline.within(op.deadline):
            return await _aperform(store, op, cancel_safe)
    return await _aperform(store, op, cancel_safe)


async def _aperform(store: Store, op: StoreOp, cancel_safe: bool) -> Any:
    kind = type(op)
    if not observe.observers:  # the common case: straight to the store
        if kind is Claim:
            assert isinstance(op, Claim)
            if cancel_safe:
                return await claim_or_undo(store, op.key, op.fingerprint, op.lease, op.ttl)
            return await store.aclaim(op.key, op.fingerprint, op.lease, op.ttl)
        if kind is Complete:
            assert isinstance(op, Complete)
            # a cancelled caller's fenced write goes on (write_through, one frame less)
            try:
                await store.acomplete(op.key, op.fence, op.data, op.codec, op.ttl)
            except asyncio.CancelledError:
                write_again(store.acomplete, (op.key, op.fence, op.data, op.codec, op.ttl))
                raise
            return None
    if isinstance(op, Sleep):
        await asyncio.sleep(op.seconds)
        return None
    if isinstance(op, CompleteLater):
        renewer = AsyncRenewer(Claimed(op.key, op.fence, op.lease, store), time.monotonic())
        write = functools.partial(store.acomplete, op.key, op.fence, op.data, op.codec, op.ttl)
        asettle_later(write, renewer.stop, op.what, store=observe.store_kind(store))
        return None
    name, args = _store_call(op)
    if not observe.observers:
        return await _acall(store, name, args, cancel_safe)
    with observe.operation(store, name, args[0]) as watch:
        result = await _acall(store, name, args, cancel_safe)
        watch.outcome = observe.claim_outcome(result)
        return result


async def _acall(store: Store, name: str, args: tuple[Any, ...], cancel_safe: bool) -> Any:
    if name == "claim":
        if not cancel_safe:
            return await store.aclaim(*args)
        return await claim_or_undo(store, *args)
    method = getattr(store, "a" + name)
    if name == "watch":
        return await method(*args)
    await write_through(method, *args)  # a cancelled caller's fenced write goes on
    return None
