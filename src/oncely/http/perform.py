"""The store and token operations of :func:`oncely.http.flow.request_flow`, performed once for
every driver: blocking (:func:`perform`: the WSGI face, Django's sync middleware) and with
``await`` (:func:`aperform`: the ASGI face, Django's async middleware, Litestar).

A driver performs the operations that touch its own request and response itself
(:class:`~oncely.http.flow.ReadBody`, :class:`~oncely.http.flow.Respond`,
:class:`~oncely.http.flow.Pass`, :class:`~oncely.http.flow.Run`) and hands every other one
here. The async claim and the fenced writes are cancel-safe (:mod:`oncely.core.cancelsafe`): a
request task cancelled mid-write still leaves the key settled.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from oncely.core.cancelsafe import claim_or_undo, write_through
from oncely.core.lease import AsyncRenewer, Claimed, keeper
from oncely.core.settle import asettle_later, settle_later
from oncely.http.engine import Engine
from oncely.http.flow import (
    Claim,
    Complete,
    CompleteLater,
    ConsumeToken,
    IssueToken,
    Op,
    Release,
    ReleaseToken,
    Sleep,
    Watch,
)

__all__ = ["aperform", "perform"]


def perform(engine: Engine, op: Op) -> Any:
    """Carry out a store, token or sleep operation with blocking calls; returns what the flow
    expects back (a claim outcome, a watch result, a token use, an issued token or None).

    :raises: whatever the store or the token service raises (the driver throws it into the
        flow, which decides what it means).
    """
    store = engine.store
    kind = type(op)
    if kind is Claim:
        assert isinstance(op, Claim)
        return store.claim(op.key, op.fingerprint, op.lease, op.ttl)
    if kind is Complete:
        assert isinstance(op, Complete)
        store.complete(op.key, op.fence, op.data, op.codec, op.ttl)
        return None
    if kind is CompleteLater:
        assert isinstance(op, CompleteLater)
        held = Claimed(op.key, op.fence, op.lease, store)
        keeper.keep(held, time.monotonic())
        settle_later(
            functools.partial(store.complete, op.key, op.fence, op.data, op.codec, op.ttl),
            functools.partial(keeper.stop, held),
            "a response",
        )
        return None
    if kind is Release:
        assert isinstance(op, Release)
        store.release(op.key, op.fence)
        return None
    if kind is Watch:
        assert isinstance(op, Watch)
        return store.watch(op.key, op.fence, op.timeout)
    if kind is Sleep:
        assert isinstance(op, Sleep)
        time.sleep(op.seconds)
        return None
    tokens = engine.tokens
    assert tokens is not None, op  # the flow asks for tokens only with a TokenGuard
    if kind is ConsumeToken:
        assert isinstance(op, ConsumeToken)
        return tokens.consume(op.token, op.subject, op.purpose)
    if kind is ReleaseToken:
        assert isinstance(op, ReleaseToken)
        tokens.release(op.use)
        return None
    if kind is IssueToken:
        assert isinstance(op, IssueToken)
        return tokens.issue(op.subject, op.purpose, op.ttl)
    raise AssertionError(op)  # pragma: no cover - a driver performs its own operations


async def aperform(engine: Engine, op: Op) -> Any:
    """:func:`perform` with ``await``; the claim and the fenced writes are cancel-safe."""
    store = engine.store
    kind = type(op)
    if kind is Claim:
        assert isinstance(op, Claim)
        return await claim_or_undo(store, op.key, op.fingerprint, op.lease, op.ttl)
    if kind is Complete:
        assert isinstance(op, Complete)
        await write_through(store.acomplete, op.key, op.fence, op.data, op.codec, op.ttl)
        return None
    if kind is CompleteLater:
        assert isinstance(op, CompleteLater)
        renewer = AsyncRenewer(Claimed(op.key, op.fence, op.lease, store), time.monotonic())
        asettle_later(
            functools.partial(store.acomplete, op.key, op.fence, op.data, op.codec, op.ttl),
            renewer.stop,
            "a response",
        )
        return None
    if kind is Release:
        assert isinstance(op, Release)
        await write_through(store.arelease, op.key, op.fence)
        return None
    if kind is Watch:
        assert isinstance(op, Watch)
        return await store.awatch(op.key, op.fence, op.timeout)
    if kind is Sleep:
        assert isinstance(op, Sleep)
        await asyncio.sleep(op.seconds)
        return None
    tokens = engine.tokens
    assert tokens is not None, op
    if kind is ConsumeToken:
        assert isinstance(op, ConsumeToken)
        return await tokens.aconsume(op.token, op.subject, op.purpose)
    if kind is ReleaseToken:
        assert isinstance(op, ReleaseToken)
        await write_through(tokens.arelease, op.use)
        return None
    if kind is IssueToken:
        assert isinstance(op, IssueToken)
        return await tokens.aissue(op.subject, op.purpose, op.ttl)
    raise AssertionError(op)  # pragma: no cover
