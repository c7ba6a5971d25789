"""Redlock: one lock over N independent Redis servers, held while a majority agrees.

The algorithm (as in the Redis documentation and pottery): send the single-node acquire script
to every node in parallel, each with a short socket timeout; the lock is held if more than
half of the nodes granted it and time is left: ``validity = ttl - elapsed - drift`` with
``drift = ttl * 0.01 + 2 ms``. Otherwise it is released on every node (the release script only
deletes this owner's key). Release and extend also go to every node.

Fencing tokens: each node hands out its own (``INCR`` raised to its ``TIME`` in microseconds);
the Redlock token is the largest of the quorum's, and before the lock counts as held that
token is written back to each granting node's counter (``raise_fence.lua``, only while the
owner still holds that node). Two quorums share a node, and a later holder can take that node
only after this holder's key is gone there, so its token is larger: tokens strictly grow per
name. This costs a second parallel round trip per acquisition; without it a Redlock token is
not a fencing token (Kleppmann's objection to Redlock).

What Redlock does not fix: it assumes bounded clock drift and process pauses shorter than the
validity. Use the fencing token on the protected resource (:mod:`oncely.locks.fencing`).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from oncely.backends.registry import shared_lock_backend
from oncely.backends.urls import redact_url
from oncely.errors import ConfigurationError, OncelyError, StoreUnavailable
from oncely.locks.base import Busy, Face, Hold, LockBackend, State
from oncely.locks.lock import Lock, LostCallback
from oncely.locks.redis import RedisLockBackend

__all__ = ["Redlock", "RedlockBackend", "drift"]

T = TypeVar("T")
Outcome = Any  # a node's answer, or the OncelyError it raised

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(32, thread_name_prefix="oncely-redlock")
    return _executor


def _reset_pool() -> None:  # a forked child cannot use its parent's threads (or their lock)
    global _executor, _executor_lock
    _executor, _executor_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


def drift(ttl: float) -> float:
    """The clock drift Redlock allows for a ttl (seconds): 1 % plus 2 ms."""
    return ttl * 0.01 + 0.002


def _why(error: OncelyError) -> str:
    """The driver's short reason behind a node's error (ours repeats advice for every node)."""
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {cause}"


def check_urls(urls: object) -> list[str]:
    """The node URLs of a Redlock: an odd number (1, 3, 5…) of Redis URLs."""
    if isinstance(urls, str) or not isinstance(urls, Sequence):
        raise ConfigurationError(
            "Redlock takes a list of Redis URLs, one per independent server, e.g. "
            "Redlock(['redis://a:6379', 'redis://b:6379', 'redis://c:6379'], 'name'); for one "
            "server use Lock('redis://…', 'name')"
        )
    nodes = list(urls)
    if not nodes or len(nodes) % 2 == 0:
        raise ConfigurationError(
            f"Redlock needs an odd number of Redis servers (3 or 5 is usual), got {len(nodes)}: "
            "with an even count a network split can leave no majority on either side; add or "
            "drop one server"
        )
    for url in nodes:
        if not isinstance(url, str) or "://" not in url:
            raise ConfigurationError(f"Redlock node {url!r} is not a Redis URL (redis://host:port)")
    if len(set(nodes)) != len(nodes):
        raise ConfigurationError(
            "Redlock nodes must be distinct servers; the same URL appears twice in "
            f"{[redact_url(u) for u in nodes]}"
        )
    return nodes


class RedlockBackend(LockBackend):
    """Locks held by a majority of independent Redis servers.

    ``node_timeout`` (seconds, default 0.2) is each node's connect and socket timeout: a node
    that does not answer within it counts as a "no". ``unavailable_wait`` (seconds, default 5)
    is how long ``acquire()`` without a timeout keeps trying while fewer than a quorum of nodes
    answer; then it raises :class:`~oncely.errors.StoreUnavailable` naming the nodes that did
    not answer (it never waits forever on servers that are down). Other keyword options
    (``prefix``, ``poll_interval``, pool options) go to each node's
    :class:`~oncely.locks.redis.RedisLockBackend`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        node_timeout: float = 0.2,
        unavailable_wait: float = 5.0,
        **options: Any,
    ) -> None:
        nodes = check_urls(urls)
        if not 0 < node_timeout <= 60:
            raise ConfigurationError(
                f"node_timeout={node_timeout!r}: give seconds above 0 (default 0.2), well below "
                "the lock's ttl"
            )
        if not 0 <= unavailable_wait <= 3600:
            raise ConfigurationError(
                f"unavailable_wait={unavailable_wait!r}: give seconds between 0 and 3600 "
                "(default 5)"
            )
        self.unavailable_wait = float(unavailable_wait)
        options.setdefault("socket_timeout", node_timeout)
        options.setdefault("socket_connect_timeout", node_timeout)
        self.urls = nodes
        self.nodes = [RedisLockBackend(url, **options) for url in nodes]
        self.quorum = len(nodes) // 2 + 1
        self.poll_interval = self.nodes[0].poll_interval

    def __repr__(self) -> str:
        return f"RedlockBackend({[redact_url(u) for u in self.urls]!r})"

    # -- fan-out ----------------------------------------------------------------------------------
    def _each(
        self, nodes: Sequence[RedisLockBackend], call: Callable[[RedisLockBackend], T]
    ) -> list[T | OncelyError]:
        def one(node: RedisLockBackend) -> T | OncelyError:
            try:
                return call(node)
            except OncelyError as exc:
                return exc

        if len(nodes) <= 1:
            return [one(node) for node in nodes]
        futures = [_pool().submit(one, node) for node in nodes[1:]]
        return [one(nodes[0])] + [f.result() for f in futures]

    async def _aeach(
        self, nodes: Sequence[RedisLockBackend], call: Callable[[RedisLockBackend], Awaitable[T]]
    ) -> list[T | OncelyError]:
        async def one(node: RedisLockBackend) -> T | OncelyError:
            try:
                return await call(node)
            except OncelyError as exc:
                return exc

        return list(await asyncio.gather(*(one(node) for node in nodes)))

    # -- decisions (pure) -------------------------------------------------------------------------
    def _granted(self, results: list[Any]) -> list[tuple[RedisLockBackend, Hold]]:
        return [(n, r) for n, r in zip(self.nodes, results) if isinstance(r, Hold)]

    def _busy(self, results: list[Any]) -> Busy:
        errors = [r for r in results if isinstance(r, OncelyError)]
        busy = [(n, r) for n, r in zip(self.nodes, results) if isinstance(r, Busy)]
        waits = [r.retry_after for _, r in busy if r.retry_after is not None]
        answered = len(results) - len(errors)
        unavailable = ""
        if answered < self.quorum:
            silent = [
                f"{redact_url(n.url)} ({_why(r)})"
                for n, r in zip(self.nodes, results)
                if isinstance(r, OncelyError)
            ]
            unavailable = (
                f"only {answered} of {len(self.nodes)} Redis nodes answered, and a Redlock "
                f"needs {self.quorum}; no answer from: {'; '.join(silent)}"
            )
        return Busy(
            retry_after=min(waits) if waits else None,
            unavailable=unavailable,
            hint=busy[0][0] if busy else None,
        )

    def _validity(self, ttl: float, started: float) -> float:
        return ttl - (time.monotonic() - started) - drift(ttl)

    def _extended(self, results: list[Any], ttl: float, started: float) -> float | None:
        ok = sum(1 for r in results if isinstance(r, float))
        refused = sum(1 for r in results if r is None)
        validity = self._validity(ttl, started)
        if ok >= self.quorum and validity > 0:
            return validity
        if refused > len(self.nodes) - self.quorum or ok >= self.quorum:
            return None
        errors = [r for r in results if isinstance(r, OncelyError)]
        raise StoreUnavailable(
            f"could not reach a quorum of {self.quorum} Redis nodes to extend the lock "
            f"({ok} extended, {refused} refused, {len(errors)} failed: {errors[0]}); it is "
            "still held until its validity runs out"
        )

    def _state(self, results: list[Any], hold: Hold | None) -> State:
        errors = [r for r in results if isinstance(r, OncelyError)]
        states = [r for r in results if isinstance(r, State)]
        owned = [s for s in states if s.owned]
        locked = sum(1 for s in states if s.locked)
        if len(owned) < self.quorum and len(states) < self.quorum:
            raise StoreUnavailable(
                f"only {len(states)} of {len(self.nodes)} Redis nodes answered; cannot tell "
                f"who holds the lock (first error: {errors[0]})"
            )
        ttl = None
        if len(owned) >= self.quorum and hold is not None:
            ttls = sorted((s.ttl or 0.0 for s in owned), reverse=True)
            ttl = max(0.0, ttls[self.quorum - 1] - drift(hold.ttl))
        return State(locked=locked >= self.quorum, owned=len(owned) >= self.quorum, ttl=ttl)

    @staticmethod
    def _probe(name: str, owner: str) -> Hold:
        return Hold(name, owner, 0, 0.0)

    # -- sync face --------------------------------------------------------------------------------
    def acquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        started = time.monotonic()
        results = self._each(self.nodes, lambda n: n.acquire(name, owner, ttl, 0.0))
        granted = self._granted(results)
        if len(granted) >= self.quorum:
            token = max(h.token for _, h in granted)
            # Nodes whose own fence is the token already need no raise (one node: none do).
            lower = [n for n, h in granted if h.token < token]
            raised = self._each(lower, lambda n: n.raise_fence(name, owner, token))
            ok = len(granted) - len(lower) + sum(1 for r in raised if r is True)
            validity = self._validity(ttl, started)
            if ok >= self.quorum and validity > 0:
                return Hold(name, owner, token, validity, "sync")
        self._each(self.nodes, lambda n: n.release(self._probe(name, owner)))
        return self._busy(results)

    def wait_release(self, name: str, busy: Busy, timeout: float) -> None:
        node = busy.hint
        if isinstance(node, RedisLockBackend):
            try:
                node.wait_release(name, busy, timeout)
                return
            except OncelyError:
                pass
        time.sleep(min(timeout, self.poll_interval) * random.uniform(0.5, 1.0))

    def release(self, hold: Hold) -> bool:
        results = self._each(self.nodes, lambda n: n.release(hold))
        return sum(1 for r in results if r is True) >= self.quorum

    def extend(self, hold: Hold, ttl: float) -> float | None:
        started = time.monotonic()
        results = self._each(self.nodes, lambda n: n.extend(hold, ttl))
        return self._extended(results, ttl, started)

    def inspect(self, name: str, hold: Hold | None) -> State:
        return self._state(self._each(self.nodes, lambda n: n.inspect(name, hold)), hold)

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    # -- async face -------------------------------------------------------------------------------
    async def aacquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        started = time.monotonic()
        results = await self._aeach(self.nodes, lambda n: n.aacquire(name, owner, ttl, 0.0))
        granted = self._granted(results)
        if len(granted) >= self.quorum:
            token = max(h.token for _, h in granted)
            lower = [n for n, h in granted if h.token < token]
            raised = await self._aeach(lower, lambda n: n.araise_fence(name, owner, token))
            ok = len(granted) - len(lower) + sum(1 for r in raised if r is True)
            validity = self._validity(ttl, started)
            if ok >= self.quorum and validity > 0:
                face: Face = "async"
                return Hold(name, owner, token, validity, face)
        await self._aeach(self.nodes, lambda n: n.arelease(self._probe(name, owner)))
        return self._busy(results)

    async def await_release(self, name: str, busy: Busy, timeout: float) -> None:
        node = busy.hint
        if isinstance(node, RedisLockBackend):
            try:
                await node.await_release(name, busy, timeout)
                return
            except OncelyError:
                pass
        await asyncio.sleep(min(timeout, self.poll_interval) * random.uniform(0.5, 1.0))

    async def arelease(self, hold: Hold) -> bool:
        results = await self._aeach(self.nodes, lambda n: n.arelease(hold))
        return sum(1 for r in results if r is True) >= self.quorum

    async def aextend(self, hold: Hold, ttl: float) -> float | None:
        started = time.monotonic()
        results = await self._aeach(self.nodes, lambda n: n.aextend(hold, ttl))
        return self._extended(results, ttl, started)

    async def ainspect(self, name: str, hold: Hold | None) -> State:
        return self._state(await self._aeach(self.nodes, lambda n: n.ainspect(name, hold)), hold)

    async def aclose(self) -> None:
        for node in self.nodes:
            await node.aclose()


class Redlock(Lock):
    """A :class:`~oncely.locks.Lock` held by a majority of independent Redis servers.

    ``urls`` lists an odd number of servers that share nothing (not replicas of each other).
    ``ttl``, ``auto_renew``, ``on_lost`` and ``timeout`` are as for :class:`Lock`;
    ``node_timeout`` and other options go to :class:`RedlockBackend`. ``extend()`` and
    ``ttl()`` return the validity: the time the lock surely holds on a majority, less drift.
    """

    def __init__(
        self,
        urls: Sequence[str],
        name: str,
        *,
        ttl: float = 30.0,
        auto_renew: bool = False,
        on_lost: LostCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> None:
        nodes = check_urls(urls)
        backend = shared_lock_backend(RedlockBackend, tuple(nodes), nodes, **options)
        super().__init__(
            backend, name, ttl=ttl, auto_renew=auto_renew, on_lost=on_lost, timeout=timeout
        )
        if drift(self.lease) >= self.lease:
            raise ConfigurationError(f"ttl={ttl!r} is too short for Redlock; use at least 0.01 s")
