"""Carry out the operations of :func:`oncely.functions.flow.call_flow`: once with blocking calls,
once with ``await``. Nothing here decides anything; it only performs I/O.

Cancellation (async): by default (``on_cancel="finish"``) the body runs shielded. If the
caller is cancelled while it runs, the caller gets ``CancelledError`` at once, while the body
goes on in the background with its lease renewed and the rest of the flow settles the key
from its outcome (complete, store the failure, or release after an exception): a body whose
effect started is never cut off and run again by a retry. ``on_cancel="release"`` cancels the
body and releases the key instead (for bodies that are safe to run again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

from oncely.core.cancelsafe import keep_alive
from oncely.core.lease import AsyncRenewer, Claimed, LostCallback, active_claim, keeper
from oncely.core.observe import describe
from oncely.core.ops import Claim, aperform, perform
from oncely.core.records import RecordKey
from oncely.functions.flow import CallPolicy, Op, Run, RunUnprotected
from oncely.stores.base import Store

__all__ = ["drive", "drive_async"]

log = logging.getLogger("oncely")


def drive(
    flow: Generator[Op, Any, Any],
    store: Store,
    key: RecordKey,
    fingerprint: str,
    policy: CallPolicy,
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
            if kind is Run:
                assert isinstance(op, Run)
                claimed = Claimed(key, op.fence, policy.lease, store, on_lost)
                keeper.keep(claimed, sent_at)
                token = active_claim.set(claimed)
                try:
                    send = call()
                finally:
                    active_claim.reset(token)
                    keeper.stop(claimed)
            elif kind is RunUnprotected:
                send = call()
            else:
                if kind is Claim:  # the lease's local bound counts from here
                    sent_at = time.monotonic()
                send = perform(store, op)  # type: ignore[arg-type]
        except BaseException as exc:
            throw = exc


@dataclass(eq=False)
class _AsyncCall:
    """One async call being driven (what every step needs)."""

    store: Store
    key: RecordKey
    fingerprint: str
    policy: CallPolicy
    call: Callable[[], Awaitable[Any]]
    on_lost: LostCallback | None
    sent_at: float = 0.0  # when the last claim was sent (monotonic)


async def drive_async(
    flow: Generator[Op, Any, Any],
    store: Store,
    key: RecordKey,
    fingerprint: str,
    policy: CallPolicy,
    call: Callable[[], Awaitable[Any]],
    on_lost: LostCallback | None,
) -> Any:
    return await _drive(flow, _AsyncCall(store, key, fingerprint, policy, call, on_lost))


class _HandedOff(Exception):
    """The caller was cancelled; the body and the rest of the flow go on in the background."""


async def _drive(
    flow: Generator[Op, Any, Any],
    state: _AsyncCall,
    send: Any = None,
    throw: BaseException | None = None,
) -> Any:
    store = state.store
    while True:
        try:
            op = flow.send(send) if throw is None else flow.throw(throw)
        except StopIteration as stop:
            return stop.value
        send = throw = None
        try:
            kind = type(op)
            if kind is Run:
                assert isinstance(op, Run)
                send = await _run(flow, state, op)
            elif kind is RunUnprotected:
                send = await state.call()
            else:
                if kind is Claim:  # the lease's local bound counts from here
                    state.sent_at = time.monotonic()
                send = await aperform(store, op)  # type: ignore[arg-type]
        except _HandedOff:
            raise asyncio.CancelledError from None
        except BaseException as exc:
            throw = exc


async def _run(flow: Generator[Op, Any, Any], state: _AsyncCall, op: Run) -> Any:
    """Run the body with its lease renewed; shielded from the caller's cancellation unless
    ``on_cancel="release"`` (see the module docstring)."""
    claimed = Claimed(state.key, op.fence, state.policy.lease, state.store, state.on_lost)
    renewer: AsyncRenewer | None = AsyncRenewer(claimed, state.sent_at)
    token = active_claim.set(claimed)
    try:
        if state.policy.on_cancel == "release":
            return await state.call()
        body = asyncio.ensure_future(state.call())  # runs in a copy of this context
        try:
            return await asyncio.shield(body)
        except asyncio.CancelledError:
            # The body itself ended with CancelledError: the flow settles it. A body that
            # finished in the same loop turn as the caller's cancel is not cancelled: its
            # outcome is settled in the background like a running one's (it ran).
            if body.cancelled():
                raise
            assert renewer is not None
            keep_alive(asyncio.ensure_future(_finish(flow, state, body, renewer)))
            renewer = None
            raise _HandedOff from None
    finally:
        active_claim.reset(token)
        if renewer is not None:
            renewer.stop()


async def _finish(
    flow: Generator[Op, Any, Any],
    state: _AsyncCall,
    body: asyncio.Future[Any],
    renewer: AsyncRenewer,
) -> None:
    """The caller left: wait for the body, then settle the key from its outcome."""
    send: Any = None
    throw: BaseException | None = None
    try:
        send = await body
    except BaseException as exc:
        throw = exc
    finally:
        renewer.stop()
    try:
        await _drive(flow, state, send, throw)
    except BaseException as exc:
        log.info(
            "oncely: %s finished after its caller was cancelled and its outcome was settled: %s",
            state.policy.name,
            describe(exc),
        )
