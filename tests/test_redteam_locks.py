"""Red-team item A8: ``Lock.check()`` after an acquire whose reply came late.

The local bound must count from when the acquire was *sent*: a reply that arrives 1.3 s late
leaves a 2 s lock 0.7 s, not 2 s. Every backend whose locks expire by themselves (PostgreSQL's
session locks do not, so they have no local bound without ``auto_renew``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from oncely.errors import LockLost

from lock_workers import make_lock, unique_name

pytest_plugins = ["lock_workers"]
pytestmark = pytest.mark.timeout(60)

DELAY = 1.3  # how late the acquire's reply arrives
TTL = 2.0


class LateReply:
    """A real lock backend whose acquire replies arrive ``DELAY`` seconds after the store
    granted the lock (a slow network or a paused client)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        result = self.inner.acquire(*args, **kwargs)
        time.sleep(DELAY)
        return result

    async def aacquire(self, *args: Any, **kwargs: Any) -> Any:
        result = await self.inner.aacquire(*args, **kwargs)
        await asyncio.sleep(DELAY)
        return result


@pytest.mark.parametrize("kind", ["redis", "sqlite", "redlock"])
def test_the_bound_counts_from_the_acquire_send_time(kind: str, spec_for: Any) -> None:
    lock = make_lock(spec_for(kind), unique_name(), ttl=TTL)
    lock.backend = LateReply(lock.backend)
    lock.acquire()
    time.sleep(TTL - DELAY + 0.2)  # 0.9 s after the reply, 2.2 s after the send
    with pytest.raises(LockLost):
        lock.check()


@pytest.mark.parametrize("kind", ["redis", "sqlite", "redlock"])
def test_the_async_bound_counts_from_the_acquire_send_time(kind: str, spec_for: Any) -> None:
    lock = make_lock(spec_for(kind), unique_name(), ttl=TTL)
    lock.backend = LateReply(lock.backend)

    async def scenario() -> None:
        await lock.aacquire()
        await asyncio.sleep(TTL - DELAY + 0.2)
        with pytest.raises(LockLost):
            await lock.acheck()

    asyncio.run(scenario())
