"""Carry out the operations of :func:`oncely.functions.flow.call_flow`: once with blocking calls,
once with ``await``. Nothing here decides anything; it only performs I/O."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from oncely.core.cancelsafe import claim_or_undo, write_through
from oncely.core.lease import AsyncRenewer, Claimed, LostCallback, active_claim, keeper
from oncely.core.records import RecordKey
from oncely.functions.flow import (
    Claim,
    Complete,
    Op,
    Policy,
    Release,
    Run,
    RunUnprotected,
    Sleep,
    Watch,
)
from oncely.stores.base import Store

__all__ = ["drive", "drive_async"]


def drive(
    flow: Generator[Op, Any, Any],
    store: Store,
    key: RecordKey,
    fingerprint: str,
    policy: Policy,
    call: Callable[[], Any],
    on_lost: LostCallback | None,
) -> Any:
    send: Any = None
    throw: BaseException | None = None
    sent_at = 0.0  # when the last claim was sent (monotonic): the lease is counted from it
    while True:
        try:
            op = flow.send(send) if throw is None else flow.throw(throw)
        except StopIteration as stop:
            return stop.value
        send = throw = None
        try:
            kind = type(op)
            if kind is Claim:
                sent_at = time.monotonic()
                send = store.claim(key, fingerprint, policy.lease, policy.ttl)
            elif kind is Run:
                assert isinstance(op, Run)
                claimed = Claimed(key, op.fence, policy.lease, store, on_lost)
                keeper.keep(claimed, sent_at)
                token = active_claim.set(claimed)
                try:
                    send = call()
                finally:
                    active_claim.reset(token)
                    keeper.stop(claimed)
            elif kind is Complete:
                assert isinstance(op, Complete)
                store.complete(key, op.fence, op.data, op.codec, policy.ttl)
            elif kind is Release:
                assert isinstance(op, Release)
                store.release(key, op.fence)
            elif kind is Watch:
                assert isinstance(op, Watch)
                send = store.watch(key, op.fence, op.timeout)
            elif kind is Sleep:
                assert isinstance(op, Sleep)
                time.sleep(op.seconds)
            elif kind is RunUnprotected:
                send = call()
            else:  # pragma: no cover - the flow yields only the ops above
                raise AssertionError(op)
        except BaseException as exc:
            throw = exc


async def drive_async(
    flow: Generator[Op, Any, Any],
    store: Store,
    key: RecordKey,
    fingerprint: str,
    policy: Policy,
    call: Callable[[], Awaitable[Any]],
    on_lost: LostCallback | None,
) -> Any:
    send: Any = None
    throw: BaseException | None = None
    sent_at = 0.0  # when the last claim was sent (monotonic): the lease is counted from it
    while True:
        try:
            op = flow.send(send) if throw is None else flow.throw(throw)
        except StopIteration as stop:
            return stop.value
        send = throw = None
        try:
            kind = type(op)
            if kind is Claim:
                sent_at = time.monotonic()
                send = await claim_or_undo(store, key, fingerprint, policy.lease, policy.ttl)
            elif kind is Run:
                assert isinstance(op, Run)
                claimed = Claimed(key, op.fence, policy.lease, store, on_lost)
                renewer = AsyncRenewer(claimed, sent_at)
                token = active_claim.set(claimed)
                try:
                    send = await call()
                finally:
                    active_claim.reset(token)
                    renewer.stop()
            elif kind is Complete:
                assert isinstance(op, Complete)
                # A cancelled caller must not leave a finished call unrecorded: the write goes on.
                await write_through(store.acomplete, key, op.fence, op.data, op.codec, policy.ttl)
            elif kind is Release:
                assert isinstance(op, Release)
                await write_through(store.arelease, key, op.fence)
            elif kind is Watch:
                assert isinstance(op, Watch)
                send = await store.awatch(key, op.fence, op.timeout)
            elif kind is Sleep:
                assert isinstance(op, Sleep)
                await asyncio.sleep(op.seconds)
            elif kind is RunUnprotected:
                send = await call()
            else:  # pragma: no cover
                raise AssertionError(op)
        except BaseException as exc:
            throw = exc
