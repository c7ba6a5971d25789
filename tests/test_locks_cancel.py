"""Cancelling an async acquire or release at random points never leaves a lock held by nobody.

After each cancellation the store must agree with the instance: either the instance holds the
lock (and the store says so), or nobody holds it. (PostgreSQL frees the lock of a cancelled
acquire by ending its session, which the server does a moment after the client closed it, so
there the test waits for the server to say so.)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import pytest

from lock_workers import KINDS, make_lock, unique_name

#: The lock tests' fixtures (redlock_nodes, spec_for, pg_fence_table) live there.
pytest_plugins = ["lock_workers"]

ROUNDS = 40


async def _settled_free(probe: Any, kind: str) -> bool:
    """True once the store says nobody holds the lock (at once, except for PostgreSQL)."""
    deadline = time.monotonic() + (2.0 if kind == "postgres" else 0.0)
    while True:
        if not await probe.alocked():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("kind", KINDS)
async def test_cancelled_acquire_and_release_leave_no_orphan(kind: str, spec_for: Any) -> None:
    spec = spec_for(kind)
    rng = random.Random(1234)
    name = unique_name()
    probe = make_lock(spec, name)
    for _ in range(ROUNDS):
        lock = make_lock(spec, name, ttl=30)
        task = asyncio.create_task(lock.aacquire(timeout=5))
        await asyncio.sleep(rng.uniform(0, 0.004))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if lock.held:
            assert await probe.alocked()
            assert await lock.aowned()
            release = asyncio.create_task(lock.arelease())
            await asyncio.sleep(rng.uniform(0, 0.003))
            release.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await release
            assert not lock.held
            # The cancelled release finished before the cancellation went on.
            assert not await probe.alocked()
        else:
            assert await _settled_free(probe, kind), "a cancelled acquire left the lock held"


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_cancelled_waiter_leaves_no_orphan(kind: str, spec_for: Any) -> None:
    """Waiters cancelled while the holder hands the lock over: whoever got it holds it, and
    nobody else does."""
    spec = spec_for(kind)
    rng = random.Random(99)
    name = unique_name()
    probe = make_lock(spec, name)
    for _ in range(15):
        holder = make_lock(spec, name, ttl=30)
        await holder.aacquire()
        waiters = [make_lock(spec, name, ttl=30) for _ in range(3)]
        tasks = [asyncio.create_task(w.aacquire(timeout=5)) for w in waiters]
        await asyncio.sleep(0.005)
        await holder.arelease()
        await asyncio.sleep(rng.uniform(0, 0.003))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        holders = [w for w in waiters if w.held]
        assert len(holders) <= 1
        for w in holders:
            assert await w.aowned()
            await w.arelease()
        assert await _settled_free(probe, kind)
