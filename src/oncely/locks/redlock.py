"""Redlock: one lock over N independent Redis servers, held while a majority agrees.

The algorithm (as in the Redis documentation and pottery): send the single-node acquire script
to every node in parallel, each with a short socket timeout; the lock is held if more than
half of the nodes granted it and time is left: ``validity = ttl - elapsed - drift`` with
``drift = ttl * 0.01 + 2 ms``, where ``elapsed`` runs from the send to the answer that made the
quorum (a minority that answers late or fails changes nothing: its answer is not needed).
Every node set its ttl after the send, so the majority surely holds until
``send + ttl - drift``; that is the bound the lock keeps (counted from the send, like a
single-node lock's). Otherwise it is released on every node (the release script only deletes
this owner's key). Release and extend also go to every node.

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
from oncely.settings import seconds

__all__ = ["Redlock", "RedlockBackend", "drift"]

T = TypeVar("T")
Outcome = Any  # a node's answer, or the OncelyError it raised
#: One node's outcome and the monotonic time it arrived.
Answer = tuple[Any, float]

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
            raise ConfigurationError(
                f"Redlock urls=: node {url!r} is not a Redis URL (redis://host:port)"
            )
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

    kind = "redlock"
    #: Async holds name the lock in the store: the watchdog renews them with :meth:`extend`.
    sync_extends_async = True

    def __init__(
        self,
        urls: Sequence[str],
        *,
        node_timeout: float = 0.2,
        unavailable_wait: float = 5.0,
        **options: Any,
    ) -> None:
        nodes = check_urls(urls)
        where = "RedlockBackend"
        node_timeout = seconds(node_timeout, "node_timeout", where=where, maximum=60)
        unavailable_wait = seconds(
            unavailable_wait, "unavailable_wait", where=where, above=False, maximum=3600
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
    ) -> list[tuple[T | OncelyError, float]]:
        """Each node's outcome (an answer or the error it raised) and when it arrived."""

        def one(node: RedisLockBackend) -> tuple[T | OncelyError, float]:
            try:
                outcome: T | OncelyError = call(node)
            except OncelyError as exc:
                outcome = exc
            return outcome, time.monotonic()

        if len(nodes) <= 1:
            return [one(node) for node in nodes]
        futures = [_pool().submit(one, node) for node in nodes[1:]]
        return [one(nodes[0])] + [f.result() for f in futures]

    async def _aeach(
        self, nodes: Sequence[RedisLockBackend], call: Callable[[RedisLockBackend], Awaitable[T]]
    ) -> list[tuple[T | OncelyError, float]]:
        async def one(node: RedisLockBackend) -> tuple[T | OncelyError, float]:
            try:
                outcome: T | OncelyError = await call(node)
            except OncelyError as exc:
                outcome = exc
            return outcome, time.monotonic()

        return list(await asyncio.gather(*(one(node) for node in nodes)))

    # -- decisions (pure) -------------------------------------------------------------------------
    def _granted(self, answers: list[Answer]) -> list[tuple[RedisLockBackend, Hold, float]]:
        return [(n, r, t) for n, (r, t) in zip(self.nodes, answers) if isinstance(r, Hold)]

    def _busy(self, answers: list[Answer]) -> Busy:
        results = [r for r, _ in answers]
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

    def _confirmed(self, arrivals: list[float]) -> float | None:
        """When the quorum was reached: the arrival of the quorum-th yes (None: too few)."""
        if len(arrivals) < self.quorum:
            return None
        return sorted(arrivals)[self.quorum - 1]

    def _validity(self, ttl: float, started: float, confirmed: float | None) -> float | None:
        """Seconds the lock surely holds on a quorum, counted from ``started`` (the send).

        Every node of the quorum set its ttl after the send, so the majority holds until
        ``started + ttl - drift``. The quorum must have been confirmed before that moment
        (``elapsed = confirmed - started``, the Redlock rule); the answers of the other nodes,
        late or failed, are not needed. None if there was no quorum in time.
        """
        validity = ttl - drift(ttl)
        if confirmed is None or confirmed - started >= validity:
            return None
        return validity

    def _extended(self, answers: list[Answer], ttl: float, started: float) -> float | None:
        results = [r for r, _ in answers]
        ok = [t for r, t in answers if isinstance(r, float)]
        refused = sum(1 for r in results if r is None)
        if len(ok) >= self.quorum:
            return self._validity(ttl, started, self._confirmed(ok))
        if refused > len(self.nodes) - self.quorum:
            return None
        errors = [r for r in results if isinstance(r, OncelyError)]
        raise StoreUnavailable(
            f"could not reach a quorum of {self.quorum} Redis nodes to extend the lock "
            f"({len(ok)} extended, {refused} refused, {len(errors)} failed: {errors[0]}); it is "
            "still held until its validity runs out"
        )

    def _state(self, answers: list[Answer], hold: Hold | None) -> State:
        results = [r for r, _ in answers]
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

    def _fenced(
        self, granted: list[tuple[RedisLockBackend, Hold, float]]
    ) -> tuple[int, list[RedisLockBackend], list[float]]:
        """The Redlock token (the largest of the quorum's), the nodes whose own fence is lower
        (they must be raised to it), and the arrivals of the nodes already at the token."""
        token = max(h.token for _, h, _ in granted)
        lower = [n for n, h, _ in granted if h.token < token]
        at_token = [t for _, h, t in granted if h.token == token]
        return token, lower, at_token

    def _held(
        self,
        name: str,
        owner: str,
        token: int,
        ttl: float,
        started: float,
        arrivals: list[float],
        face: Face,
    ) -> Hold | None:
        validity = self._validity(ttl, started, self._confirmed(arrivals))
        return None if validity is None else Hold(name, owner, token, validity, face)

    # -- sync face --------------------------------------------------------------------------------
    def acquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        started = time.monotonic()
        answers = self._each(self.nodes, lambda n: n.acquire(name, owner, ttl, 0.0))
        granted = self._granted(answers)
        if len(granted) >= self.quorum:
            token, lower, arrivals = self._fenced(granted)
            # Nodes whose own fence is the token already need no raise (one node: none do).
            raised = self._each(lower, lambda n: n.raise_fence(name, owner, token))
            arrivals += [t for r, t in raised if r is True]
            hold = self._held(name, owner, token, ttl, started, arrivals, "sync")
            if hold is not None:
                return hold
        self._each(self.nodes, lambda n: n.release(self._probe(name, owner)))
        return self._busy(answers)

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
        answers = self._each(self.nodes, lambda n: n.release(hold))
        return sum(1 for r, _ in answers if r is True) >= self.quorum

    def extend(self, hold: Hold, ttl: float) -> float | None:
        started = time.monotonic()
        answers = self._each(self.nodes, lambda n: n.extend(hold, ttl))
        return self._extended(answers, ttl, started)

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
        answers = await self._aeach(self.nodes, lambda n: n.aacquire(name, owner, ttl, 0.0))
        granted = self._granted(answers)
        if len(granted) >= self.quorum:
            token, lower, arrivals = self._fenced(granted)
            raised = await self._aeach(lower, lambda n: n.araise_fence(name, owner, token))
            arrivals += [t for r, t in raised if r is True]
            hold = self._held(name, owner, token, ttl, started, arrivals, "async")
            if hold is not None:
                return hold
        await self._aeach(self.nodes, lambda n: n.arelease(self._probe(name, owner)))
        return self._busy(answers)

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
        answers = await self._aeach(self.nodes, lambda n: n.arelease(hold))
        return sum(1 for r, _ in answers if r is True) >= self.quorum

    async def aextend(self, hold: Hold, ttl: float) -> float | None:
        started = time.monotonic()
        answers = await self._aeach(self.nodes, lambda n: n.aextend(hold, ttl))
        return self._extended(answers, ttl, started)

    async def ainspect(self, name: str, hold: Hold | None) -> State:
        return self._state(await self._aeach(self.nodes, lambda n: n.ainspect(name, hold)), hold)

    async def aclose(self) -> None:
        for node in self.nodes:
            await node.aclose()


class Redlock(Lock):
    """A :class:`~oncely.locks.Lock` held by a majority of independent Redis servers.

    ``urls`` lists an odd number of servers that share nothing (not replicas of each other).
    ``ttl``, ``auto_renew``, ``on_lost`` and ``timeout`` are as for :class:`Lock`;
    ``node_timeout`` and other options go to :class:`RedlockBackend`. ``extend()`` returns the
    validity counted from when the request was sent (``ttl - drift``, provided a majority
    confirmed in time; a minority answering late or failing does not shorten it), and ``ttl()``
    what a majority still has on their clocks, less drift.
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
