"""Carry out the operations of :func:`oncely.functions.flow.call_flow`: once with blocking calls,
once with ``await``. Nothing here decides anything; it only performs I/O."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

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
from oncely.functions.lease import AsyncRenewer, Claimed, LostCallback, _current, keeper
from oncely.records import New, RecordKey
from oncely.stores.base import Store

__all__ = ["drive", "drive_async"]

log = logging.getLogger("oncely")

# Background work that must finish even if the caller is cancelled (see drive_async).
_background: set[asyncio.Future[Any]] = set()


def _keep_alive(work: asyncio.Future[Any]) -> None:
    """Hold a reference to ``work`` until it is done, and log it if it fails."""
    _background.add(work)

    def done(future: asyncio.Future[Any]) -> None:
        _background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("oncely: background store call failed: %s", future.exception())

    work.add_done_callback(done)


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
    while True:
        try:
            op = flow.send(send) if throw is None else flow.throw(throw)
        except StopIteration as stop:
            return stop.value
        send = throw = None
        try:
            kind = type(op)
            if kind is Claim:
                send = store.claim(key, fingerprint, policy.lease, policy.ttl)
            elif kind is Run:
                assert isinstance(op, Run)
                claimed = Claimed(key, op.fence, policy.lease, store, on_lost)
                keeper.keep(claimed)
                token = _current.set(claimed)
                try:
                    send = call()
                finally:
                    _current.reset(token)
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
    while True:
        try:
            op = flow.send(send) if throw is None else flow.throw(throw)
        except StopIteration as stop:
            return stop.value
        send = throw = None
        try:
            kind = type(op)
            if kind is Claim:
                send = await _claim_uncancellable(store, key, fingerprint, policy)
            elif kind is Run:
                assert isinstance(op, Run)
                claimed = Claimed(key, op.fence, policy.lease, store, on_lost)
                renewer = AsyncRenewer(claimed)
                token = _current.set(claimed)
                try:
                    send = await call()
                finally:
                    _current.reset(token)
                    renewer.stop()
            elif kind is Complete:
                assert isinstance(op, Complete)
                # A cancelled caller must not leave a finished call unrecorded: the write goes on.
                await _finish(store.acomplete(key, op.fence, op.data, op.codec, policy.ttl))
            elif kind is Release:
                assert isinstance(op, Release)
                await _finish(store.arelease(key, op.fence))
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


async def _finish(work: Awaitable[Any]) -> Any:
    """Await ``work`` shielded from the caller's cancellation, keeping it alive if cancelled."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _keep_alive(task)
        raise


async def _claim_uncancellable(
    store: Store, key: RecordKey, fingerprint: str, policy: Policy
) -> Any:
    """Claim; if the caller is cancelled mid-claim and the claim succeeded, release it again."""
    task = asyncio.ensure_future(store.aclaim(key, fingerprint, policy.lease, policy.ttl))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def undo(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                outcome = done.result()
                if isinstance(outcome, New):
                    _keep_alive(asyncio.ensure_future(store.arelease(key, outcome.fence)))

        task.add_done_callback(undo)
        _keep_alive(task)
        raise
