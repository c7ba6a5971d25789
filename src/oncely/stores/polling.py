"""Waiting by polling with exponential backoff, for stores that cannot push a change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

from oncely.backends.plans import Plan, Sleep

__all__ = ["apoll_until", "poll_plan", "poll_until"]

FIRST_DELAY = 0.001
LONGEST_DELAY = 0.05


def _delays(timeout: float) -> Iterator[float]:
    """Sleep lengths (1 ms doubling to 50 ms) adding up to at most ``timeout`` (monotonic)."""
    deadline = time.monotonic() + timeout
    delay = FIRST_DELAY
    while (left := deadline - time.monotonic()) > 0:
        yield min(delay, left)
        delay = min(delay * 2, LONGEST_DELAY)


def poll_until(done: Callable[[], bool], timeout: float) -> bool:
    """Call ``done()`` until it is true (return True) or ``timeout`` passes (return False)."""
    for delay in _delays(timeout):
        if done():
            return True
        time.sleep(delay)
    return done()


async def apoll_until(done: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    """Async :func:`poll_until`: awaits ``done()`` between sleeps, holding no thread meanwhile."""
    for delay in _delays(timeout):
        if await done():
            return True
        await asyncio.sleep(delay)
    return await done()


def poll_plan(look: Callable[[], Plan[bool]], timeout: float) -> Plan[bool]:
    """:func:`poll_until` as a plan (:mod:`oncely.backends.plans`): runs the plan ``look()``
    until it returns True (return True) or ``timeout`` passes (return False), yielding a
    :class:`~oncely.backends.plans.Sleep` between looks."""
    for delay in _delays(timeout):
        if (yield from look()):
            return True
        yield Sleep(delay)
    return (yield from look())
