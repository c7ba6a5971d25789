"""``redis://…``: a lock is a key holding its owner's token, every decision one Lua script.

Keys (``prefix`` defaults to ``"oncely:lock"``; the name sits in a ``{hash tag}`` so all three
keys of a lock live in one Redis Cluster slot):

* ``<prefix>:{<name>}`` the lock: the owner token, with ``PX ttl`` (Redis expires it on its own
  clock, so a crashed holder's lock goes away by itself);
* ``<prefix>:{<name>}:fence`` the fencing counter: ``INCR``, raised to the server's ``TIME`` in
  microseconds, inside ``acquire.lua``; kept for ``fence_keep`` seconds after the last use;
* ``<prefix>:{<name>}:signal`` a wake-up list: ``release.lua`` pushes one element, and waiters
  ``BLPOP`` it, so a release hands the lock over in about one round trip instead of a poll.

``acquire.lua``, ``release.lua``, ``extend.lua``, ``inspect.lua`` (in ``oncely/locks/lua/``) check
the owner token on the server; nothing is read first and decided in Python. They are called by
SHA (``EVALSHA``, then ``EVAL`` once on ``NOSCRIPT``) through the same plumbing as
:class:`oncely.stores.redis.RedisStore`, whose connection pools (one per process, one per event
loop for asyncio) the backend uses.

Restarts: without persistence a restart forgets every lock, so a second holder can take a lock
whose first holder still runs. The first holder finds out at its next renewal, ``check()`` or
``release()`` (:class:`~oncely.errors.LockLost`), and its fencing token stays older than the
second holder's because tokens are seeded from the server clock (see ``acquire.lua``); keep the
*protected* data on a store that survives the restart so the fence can refuse the stale write.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any, Final

import redis
import redis.asyncio

from oncely.errors import ConfigurationError
from oncely.locks.base import Busy, Face, Hold, LockBackend, State
from oncely.stores.base import redact_url
from oncely.stores.redis import RedisStore, _ms, _Script

__all__ = ["LockScript", "RedisLockBackend"]


class LockScript(_Script):
    """A Lua script shipped in ``oncely/locks/lua``, called by SHA like the store's scripts."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = (resources.files("oncely.locks") / "lua" / f"{name}.lua").read_bytes()
        self.sha = hashlib.sha1(self.source).hexdigest()


ACQUIRE: Final = LockScript("acquire")
RELEASE: Final = LockScript("release")
EXTEND: Final = LockScript("extend")
INSPECT: Final = LockScript("inspect")
RAISE_FENCE: Final = LockScript("raise_fence")

#: How long a wake-up nobody picked up stays (a waiter that misses it polls anyway).
SIGNAL_KEEP_MS: Final = 1000


def _busy(pttl: Any) -> Busy:
    ms = int(pttl)
    return Busy(retry_after=ms / 1000 if ms >= 0 else None)


class RedisLockBackend(LockBackend):
    """Locks on one Redis server (``redis://`` or ``rediss://``), via ``oncely[redis]``.

    ``poll_interval`` (seconds, default 0.1) bounds how long a waiter sleeps without a wake-up:
    waiters are woken by the holder's release, and look again at the latest after this long
    (a holder that crashed sends no wake-up; its lock expires on its ttl). ``fence_keep``
    (seconds, default 30 days) is how long an unused fence counter is kept. ``client`` /
    ``async_client`` / other keyword ``options`` are as for
    :class:`~oncely.stores.redis.RedisStore`, including its bounded network waits: connecting
    and each reply wait at most 5 s (``socket_connect_timeout``, ``socket_timeout``), so
    ``acquire``, ``check`` and renewals fail with :class:`~oncely.errors.StoreUnavailable`
    instead of hanging on a server that stopped answering.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "oncely:lock",
        poll_interval: float = 0.1,
        fence_keep: float = 30 * 86400.0,
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(f"prefix must be a non-empty string, not {prefix!r}")
        if not 0.001 <= poll_interval <= 10:
            raise ConfigurationError(
                f"poll_interval={poll_interval!r}: give seconds between 0.001 and 10 (default 0.1)"
            )
        self.url = url
        self.prefix = prefix
        self.store = RedisStore(
            url, prefix=prefix, client=client, async_client=async_client, **options
        )
        socket_timeout = self.store.socket_timeout
        cap = poll_interval if not socket_timeout else min(poll_interval, socket_timeout / 2)
        #: The longest single BLPOP a waiter makes (below the socket timeout).
        self.poll_interval = max(0.001, cap)
        self.fence_keep_ms = max(_ms(fence_keep), 1000)

    def __repr__(self) -> str:
        return f"RedisLockBackend({redact_url(self.url)!r})"

    # -- keys and replies -------------------------------------------------------------------------
    def key(self, name: str) -> str:
        """The Redis key of lock ``name`` (it holds the owner token)."""
        return f"{self.prefix}:{{{name}}}"

    def _hold(self, name: str, owner: str, reply: Any, face: Face) -> Hold | Busy:
        if int(reply[0]) != 1:
            return _busy(reply[1])
        return Hold(name, owner, int(reply[1]), int(reply[2]) / 1000, face)

    def _blpop_args(self, name: str, busy: Busy, timeout: float) -> tuple[Any, ...] | None:
        wait = min(timeout, self.poll_interval)
        if busy.retry_after is not None:
            wait = min(wait, busy.retry_after + 0.001)
        if wait < 0.001:
            return None
        return ("BLPOP", f"{self.key(name)}:signal", f"{wait:.3f}")

    def _state(self, reply: Any) -> State:
        owned, pttl = int(reply[0]), int(reply[1])
        return State(
            locked=pttl != -2,
            owned=owned == 1,
            ttl=pttl / 1000 if owned and pttl >= 0 else None,
        )

    def _acquire_args(self, name: str, owner: str, ttl: float) -> tuple[Any, ...]:
        key = self.key(name)
        return (ACQUIRE, 2, key, f"{key}:fence", owner, max(1, _ms(ttl)), self.fence_keep_ms)

    def _release_args(self, hold: Hold) -> tuple[Any, ...]:
        key = self.key(hold.name)
        return (RELEASE, 2, key, f"{key}:signal", hold.owner, SIGNAL_KEEP_MS)

    def _raise_args(self, name: str, owner: str, token: int) -> tuple[Any, ...]:
        key = self.key(name)
        return (RAISE_FENCE, 2, key, f"{key}:fence", owner, token, self.fence_keep_ms)

    # -- sync face --------------------------------------------------------------------------------
    def acquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        reply = self.store._eval(*self._acquire_args(name, owner, ttl))
        return self._hold(name, owner, reply, "sync")

    def wait_release(self, name: str, busy: Busy, timeout: float) -> None:
        args = self._blpop_args(name, busy, timeout)
        if args is not None:
            self.store._call(*args)

    def release(self, hold: Hold) -> bool:
        return int(self.store._eval(*self._release_args(hold))) == 1

    def extend(self, hold: Hold, ttl: float) -> float | None:
        ms = max(1, _ms(ttl))
        ok = int(self.store._eval(EXTEND, 1, self.key(hold.name), hold.owner, ms))
        return ms / 1000 if ok == 1 else None

    def inspect(self, name: str, hold: Hold | None) -> State:
        owner = "" if hold is None else hold.owner
        return self._state(self.store._eval(INSPECT, 1, self.key(name), owner))

    def raise_fence(self, name: str, owner: str, token: int) -> bool:
        """Redlock: lift this node's fence counter to ``token`` while ``owner`` holds ``name``."""
        return int(self.store._eval(*self._raise_args(name, owner, token))) == 1

    def close(self) -> None:
        self.store.close()

    # -- async face -------------------------------------------------------------------------------
    async def aacquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        reply = await self.store._aeval(*self._acquire_args(name, owner, ttl))
        return self._hold(name, owner, reply, "async")

    async def await_release(self, name: str, busy: Busy, timeout: float) -> None:
        args = self._blpop_args(name, busy, timeout)
        if args is not None:
            await self.store._acall(*args)

    async def arelease(self, hold: Hold) -> bool:
        return int(await self.store._aeval(*self._release_args(hold))) == 1

    async def aextend(self, hold: Hold, ttl: float) -> float | None:
        ms = max(1, _ms(ttl))
        ok = int(await self.store._aeval(EXTEND, 1, self.key(hold.name), hold.owner, ms))
        return ms / 1000 if ok == 1 else None

    async def ainspect(self, name: str, hold: Hold | None) -> State:
        owner = "" if hold is None else hold.owner
        return self._state(await self.store._aeval(INSPECT, 1, self.key(name), owner))

    async def araise_fence(self, name: str, owner: str, token: int) -> bool:
        """The async face of :meth:`raise_fence`."""
        return int(await self.store._aeval(*self._raise_args(name, owner, token))) == 1

    async def aclose(self) -> None:
        await self.store.aclose()
