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
SHA (``EVALSHA``, then ``EVAL`` once on ``NOSCRIPT``, :mod:`oncely.backends.lua`) on the clients
of :class:`oncely.backends.redis.RedisClients` (one pool per process, one per event loop for
asyncio), and each operation is written once as a plan (:mod:`oncely.backends.plans`).

Restarts: without persistence a restart forgets every lock, so a second holder can take a lock
whose first holder still runs. The first holder finds out at its next renewal, ``check()`` or
``release()`` (:class:`~oncely.errors.LockLost`), and its fencing token stays older than the
second holder's because tokens are seeded from the server clock (see ``acquire.lua``); keep the
*protected* data on a store that survives the restart so the fence can refuse the stale write.
"""

from __future__ import annotations

from typing import Any, Final

import redis
import redis.asyncio

from oncely.backends.lua import Script
from oncely.backends.plans import Command, Eval, Plan, arun, run
from oncely.backends.redis import RedisClients, ms
from oncely.errors import ConfigurationError
from oncely.locks.base import Busy, Face, Hold, LockBackend, State
from oncely.settings import seconds

__all__ = ["RedisLockBackend"]


def _script(name: str) -> Script:
    return Script("oncely.locks", name)


ACQUIRE: Final = _script("acquire")
RELEASE: Final = _script("release")
EXTEND: Final = _script("extend")
INSPECT: Final = _script("inspect")
RAISE_FENCE: Final = _script("raise_fence")

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
    :class:`~oncely.backends.redis.RedisClients` (and
    :class:`~oncely.stores.redis.RedisStore`), including its bounded network waits: each
    operation's pool wait, connect, send and reply share one budget, the larger of
    ``socket_timeout`` and ``pool_timeout`` (5 s by default; a waiter's ``BLPOP`` gets the
    seconds it blocks on top), so ``acquire``, ``check`` and renewals fail with
    :class:`~oncely.errors.StoreUnavailable` within it on a server that stopped answering.
    """

    kind = "redis"
    #: Async holds name the lock in the store: the watchdog renews them with :meth:`extend`.
    sync_extends_async = True

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
        where = "RedisLockBackend"
        poll_interval = seconds(
            poll_interval, "poll_interval", where=where, minimum=0.001, above=False, maximum=10
        )
        fence_keep = seconds(fence_keep, "fence_keep", where=where)
        self.url = url
        self.prefix = prefix
        self.redis = RedisClients(url, client=client, async_client=async_client, **options)
        socket_timeout = self.redis.socket_timeout
        cap = poll_interval if not socket_timeout else min(poll_interval, socket_timeout / 2)
        #: The longest single BLPOP a waiter makes (below the socket timeout).
        self.poll_interval = max(0.001, cap)
        self.fence_keep_ms = max(ms(fence_keep), 1000)

    def __repr__(self) -> str:
        return f"RedisLockBackend({self.redis.where!r})"

    # -- keys and replies -------------------------------------------------------------------------
    def key(self, name: str) -> str:
        """The Redis key of lock ``name`` (it holds the owner token)."""
        return f"{self.prefix}:{{{name}}}"

    # -- every operation, once: a plan of script calls (oncely.backends.plans) -----------------
    def _acquire(self, name: str, owner: str, ttl: float, face: Face) -> Plan[Hold | Busy]:
        key = self.key(name)
        args = (key, f"{key}:fence", owner, max(1, ms(ttl)), self.fence_keep_ms)
        reply = yield Eval(ACQUIRE, 2, args)
        if int(reply[0]) != 1:
            return _busy(reply[1])
        return Hold(name, owner, int(reply[1]), int(reply[2]) / 1000, face)

    def _wait_release(self, name: str, busy: Busy, timeout: float) -> Plan[None]:
        wait = min(timeout, self.poll_interval)
        if busy.retry_after is not None:
            wait = min(wait, busy.retry_after + 0.001)
        if wait >= 0.001:
            yield Command(("BLPOP", f"{self.key(name)}:signal", f"{wait:.3f}"))

    def _release(self, hold: Hold) -> Plan[bool]:
        key = self.key(hold.name)
        args = (key, f"{key}:signal", hold.owner, SIGNAL_KEEP_MS)
        return int((yield Eval(RELEASE, 2, args))) == 1

    def _extend(self, hold: Hold, ttl: float) -> Plan[float | None]:
        granted = max(1, ms(ttl))
        ok = int((yield Eval(EXTEND, 1, (self.key(hold.name), hold.owner, granted))))
        return granted / 1000 if ok == 1 else None

    def _inspect(self, name: str, hold: Hold | None) -> Plan[State]:
        owner = "" if hold is None else hold.owner
        owned, pttl = map(int, (yield Eval(INSPECT, 1, (self.key(name), owner))))
        return State(
            locked=pttl != -2,
            owned=owned == 1,
            ttl=pttl / 1000 if owned and pttl >= 0 else None,
        )

    def _raise_fence(self, name: str, owner: str, token: int) -> Plan[bool]:
        key = self.key(name)
        args = (key, f"{key}:fence", owner, token, self.fence_keep_ms)
        return int((yield Eval(RAISE_FENCE, 2, args))) == 1

    # -- sync face --------------------------------------------------------------------------------
    def acquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        return run(self._acquire(name, owner, ttl, "sync"), self.redis.execute)

    def wait_release(self, name: str, busy: Busy, timeout: float) -> None:
        run(self._wait_release(name, busy, timeout), self.redis.execute)

    def release(self, hold: Hold) -> bool:
        return run(self._release(hold), self.redis.execute)

    def extend(self, hold: Hold, ttl: float) -> float | None:
        return run(self._extend(hold, ttl), self.redis.execute)

    def inspect(self, name: str, hold: Hold | None) -> State:
        return run(self._inspect(name, hold), self.redis.execute)

    def raise_fence(self, name: str, owner: str, token: int) -> bool:
        """Redlock: lift this node's fence counter to ``token`` while ``owner`` holds ``name``."""
        return run(self._raise_fence(name, owner, token), self.redis.execute)

    def close(self) -> None:
        self.redis.close()

    # -- async face -------------------------------------------------------------------------------
    async def aacquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        return await arun(self._acquire(name, owner, ttl, "async"), self.redis.aexecute)

    async def await_release(self, name: str, busy: Busy, timeout: float) -> None:
        await arun(self._wait_release(name, busy, timeout), self.redis.aexecute)

    async def arelease(self, hold: Hold) -> bool:
        return await arun(self._release(hold), self.redis.aexecute)

    async def aextend(self, hold: Hold, ttl: float) -> float | None:
        return await arun(self._extend(hold, ttl), self.redis.aexecute)

    async def ainspect(self, name: str, hold: Hold | None) -> State:
        return await arun(self._inspect(name, hold), self.redis.aexecute)

    async def araise_fence(self, name: str, owner: str, token: int) -> bool:
        """The async face of :meth:`raise_fence`."""
        return await arun(self._raise_fence(name, owner, token), self.redis.aexecute)

    async def aclose(self) -> None:
        await self.redis.aclose()
