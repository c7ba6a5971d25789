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

from oncely.core.cancelsafe import claim_or_undo, write_through
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


@dataclass(frozen=True, slots=True)
class Claim:
    """Claim ``key`` (``lease`` and ``ttl`` in seconds); the result is a claim outcome."""

    key: RecordKey
    fingerprint: str
    lease: float
    ttl: float


@dataclass(frozen=True, slots=True)
class Complete:
    """Store the outcome under ``fence``, kept ``ttl`` seconds."""

    key: RecordKey
    fence: int
    data: bytes
    codec: str
    ttl: float


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


@dataclass(frozen=True, slots=True)
class Release:
    """Free the key held under ``fence``."""

    key: RecordKey
    fence: int


@dataclass(frozen=True, slots=True)
class Watch:
    """Wait until the claim under ``fence`` changes, at most ``timeout`` seconds; the result
    says whether it changed."""

    key: RecordKey
    fence: int
    timeout: float


@dataclass(frozen=True, slots=True)
class Sleep:
    """Pause ``seconds`` (between retries)."""

    seconds: float


StoreOp = Claim | Complete | CompleteLater | Release | Watch | Sleep


def perform(store: Store, op: StoreOp) -> Any:
    """Carry out ``op`` with blocking calls; returns what the flow expects back.

    :raises: whatever the store raises (the driver throws it into the flow, which decides).
    """
    kind = type(op)
    if kind is Claim:
        assert isinstance(op, Claim)
        return store.claim(op.key, op.fingerprint, op.lease, op.ttl)
    if kind is Complete:
        assert isinstance(op, Complete)
        store.complete(op.key, op.fence, op.data, op.codec, op.ttl)
    elif kind is Release:
        assert isinstance(op, Release)
        store.release(op.key, op.fence)
    elif kind is Watch:
        assert isinstance(op, Watch)
        return store.watch(op.key, op.fence, op.timeout)
    elif kind is Sleep:
        assert isinstance(op, Sleep)
        time.sleep(op.seconds)
    elif kind is CompleteLater:
        assert isinstance(op, CompleteLater)
        held = Claimed(op.key, op.fence, op.lease, store)
        keeper.keep(held, time.monotonic())
        settle_later(
            functools.partial(store.complete, op.key, op.fence, op.data, op.codec, op.ttl),
            functools.partial(keeper.stop, held),
            op.what,
        )
    else:  # pragma: no cover - a flow yields only the operations above here
        raise AssertionError(op)
    return None


async def aperform(store: Store, op: StoreOp) -> Any:
    """:func:`perform` with ``await``; the claim and the fenced writes are cancel-safe."""
    kind = type(op)
    if kind is Claim:
        assert isinstance(op, Claim)
        return await claim_or_undo(store, op.key, op.fingerprint, op.lease, op.ttl)
    if kind is Complete:
        assert isinstance(op, Complete)
        await write_through(store.acomplete, op.key, op.fence, op.data, op.codec, op.ttl)
    elif kind is Release:
        assert isinstance(op, Release)
        await write_through(store.arelease, op.key, op.fence)
    elif kind is Watch:
        assert isinstance(op, Watch)
        return await store.awatch(op.key, op.fence, op.timeout)
    elif kind is Sleep:
        assert isinstance(op, Sleep)
        await asyncio.sleep(op.seconds)
    elif kind is CompleteLater:
        assert isinstance(op, CompleteLater)
        renewer = AsyncRenewer(Claimed(op.key, op.fence, op.lease, store), time.monotonic())
        asettle_later(
            functools.partial(store.acomplete, op.key, op.fence, op.data, op.codec, op.ttl),
            renewer.stop,
            op.what,
        )
    else:  # pragma: no cover
        raise AssertionError(op)
    return None
