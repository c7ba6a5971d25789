"""Redlock over three independent redis-server processes: quorum, node failures, fencing."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from oncely.errors import LockTimeout, StoreUnavailable
from oncely.locks import Redlock
from oncely.locks.redlock import drift

from conftest import drop_redis_prefix
from lock_workers import RedisServer, unique_name

#: The lock tests' fixtures (redlock_nodes, spec_for, pg_fence_table) live there.
pytest_plugins = ["lock_workers"]


def _keys(servers: list[RedisServer], pattern: str) -> list[int]:
    counts = []
    for server in servers:
        client = redis.Redis.from_url(server.url)
        counts.append(len(list(client.scan_iter(match=pattern))))
        client.close()
    return counts


@pytest.fixture
def prefix(redlock_nodes: list[RedisServer]) -> Any:
    prefix = f"oncely-test-redlock-{unique_name()}"
    yield prefix
    for server in redlock_nodes:
        drop_redis_prefix(prefix, server.url)


def test_lock_is_on_every_node_and_released_from_every_node(
    redlock_nodes: list[RedisServer], prefix: str
) -> None:
    urls = [s.url for s in redlock_nodes]
    lock = Redlock(urls, "job", ttl=10, prefix=prefix)
    token = lock.acquire()
    assert token > 0
    assert _keys(redlock_nodes, f"{prefix}:{{job}}") == [1, 1, 1]
    validity = lock.ttl()
    assert validity is not None and 9 < validity < 10 - drift(10) + 0.001
    lock.release()
    assert _keys(redlock_nodes, f"{prefix}:{{job}}") == [0, 0, 0]


def test_one_node_down_still_locks(redlock_nodes: list[RedisServer], prefix: str) -> None:
    urls = [s.url for s in redlock_nodes]
    redlock_nodes[2].pause()  # unresponsive: requests to it time out after node_timeout
    try:
        a = Redlock(urls, unique_name(), ttl=5, prefix=prefix)
        b = Redlock(urls, a.name, ttl=5, prefix=prefix)
        t1 = a.acquire(timeout=2)
        assert a.owned()
        assert b.acquire(blocking=False) is None
        a.extend()
        a.release()
        t2 = b.acquire(timeout=2)
        assert t2 > t1
        b.release()
    finally:
        redlock_nodes[2].resume()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_two_nodes_down_fails_cleanly_within_the_timeout(
    redlock_nodes: list[RedisServer], prefix: str
) -> None:
    urls = [s.url for s in redlock_nodes]
    name = unique_name()
    redlock_nodes[1].pause()
    redlock_nodes[2].pause()
    try:
        lock = Redlock(urls, name, ttl=5, prefix=prefix, node_timeout=0.1)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="only 1 of 3 Redis nodes answered"):
            lock.acquire(timeout=1.0)
        elapsed = time.monotonic() - started
        assert elapsed < 1.0 + 0.5  # the timeout, plus at most one attempt in flight
        assert not lock.held
        # The node that did answer was given its key back.
        assert _keys(redlock_nodes[:1], f"{prefix}:{{{name}}}") == [0]
        with pytest.raises(StoreUnavailable):
            lock.acquire(blocking=False)
    finally:
        redlock_nodes[1].resume()
        redlock_nodes[2].resume()


def test_busy_quorum_times_out(redlock_nodes: list[RedisServer], prefix: str) -> None:
    urls = [s.url for s in redlock_nodes]
    a = Redlock(urls, unique_name(), ttl=10, prefix=prefix)
    b = Redlock(urls, a.name, ttl=10, prefix=prefix)
    a.acquire()
    with pytest.raises(LockTimeout):
        b.acquire(timeout=0.2)
    a.release()


def test_minority_holder_cannot_block_a_majority(
    redlock_nodes: list[RedisServer], prefix: str
) -> None:
    """A stray key on one node (someone else's) does not stop a quorum of the other two."""
    urls = [s.url for s in redlock_nodes]
    name = unique_name()
    client = redis.Redis.from_url(redlock_nodes[0].url)
    client.set(f"{prefix}:{{{name}}}", "someone-else", px=10_000)
    client.close()
    lock = Redlock(urls, name, ttl=5, prefix=prefix)
    assert lock.acquire(blocking=False) is not None
    lock.release()


def test_tokens_grow_across_quorums(redlock_nodes: list[RedisServer], prefix: str) -> None:
    """Tokens grow even when successive quorums differ: each holder raises its quorum's fence
    counters to its own token before it counts as holding the lock."""
    urls = [s.url for s in redlock_nodes]
    name = unique_name()
    key = f"{prefix}:{{{name}}}:fence"
    lock = Redlock(urls, name, ttl=5, prefix=prefix)
    tokens = [lock.acquire()]
    lock.release()
    # Push node 0's counter far ahead; then take node 0 out so the next quorum is {1, 2}.
    client = redis.Redis.from_url(redlock_nodes[0].url)
    client.set(key, str(tokens[0] + 10_000_000))
    client.close()
    tokens.append(lock.acquire())
    lock.release()
    redlock_nodes[0].pause()
    try:
        tokens.append(lock.acquire(timeout=2))
        lock.release()
    finally:
        redlock_nodes[0].resume()
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    assert tokens[1] >= tokens[0] + 10_000_000  # the quorum's largest counter won


async def test_async_redlock(redlock_nodes: list[RedisServer], prefix: str) -> None:
    urls = [s.url for s in redlock_nodes]
    redlock_nodes[0].pause()
    try:
        async with Redlock(urls, unique_name(), ttl=5, prefix=prefix) as lock:
            assert await lock.aowned()
            assert await lock.aextend() > 4
    finally:
        redlock_nodes[0].resume()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_a_late_minority_does_not_lose_the_lock(
    redlock_nodes: list[RedisServer], prefix: str
) -> None:
    """Red-team fault: one node of three stops answering after the acquire. Its extend times out
    (node_timeout) long after the other two confirmed; the lock still holds on that majority
    for ``ttl - drift`` from the send, so neither extend() nor check() may report LockLost.
    (The old code subtracted the straggler's delay from the validity and then counted that
    from the send again, so check() right after extend() raised LockLost.)"""
    urls = [s.url for s in redlock_nodes]
    lock = Redlock(urls, unique_name(), ttl=2, prefix=prefix, node_timeout=1.2)
    lock.acquire(timeout=2)
    redlock_nodes[2].pause()
    try:
        sent = time.monotonic()
        validity = lock.extend()
        assert time.monotonic() - sent >= 1.1  # the straggler was waited for
        assert validity == pytest.approx(2 - drift(2))
    finally:
        redlock_nodes[2].resume()
    lock.check()  # no LockLost: a majority holds until sent + 2 - drift
    assert lock.held
    lock.release()


async def test_a_late_minority_does_not_lose_the_lock_async(
    redlock_nodes: list[RedisServer], prefix: str
) -> None:
    urls = [s.url for s in redlock_nodes]
    lock = Redlock(urls, unique_name(), ttl=2, prefix=prefix, node_timeout=1.2)
    await lock.aacquire(timeout=2)
    redlock_nodes[0].pause()
    try:
        validity = await lock.aextend()
        assert validity == pytest.approx(2 - drift(2))
    finally:
        redlock_nodes[0].resume()
    await lock.acheck()
    await lock.arelease()


def test_a_quorum_confirmed_too_late_is_no_quorum() -> None:
    """The other side of the rule: a majority that answered after ``ttl - drift`` proves
    nothing (the first yes may have expired by then)."""
    from oncely.locks.redlock import RedlockBackend

    backend = RedlockBackend(
        ["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0", "redis://127.0.0.1:3/0"]
    )
    started = 100.0
    assert backend._validity(2.0, started, started + 0.5) == pytest.approx(2 - drift(2))
    assert backend._validity(2.0, started, started + 2.0) is None
    assert backend._validity(2.0, started, None) is None
    answers: list[tuple[Any, float]] = [(2.0, 100.1), (2.0, 101.5), (None, 100.05)]
    assert backend._extended(answers, 2.0, started) == pytest.approx(2 - drift(2))
    late: list[tuple[Any, float]] = [(2.0, 100.1), (2.0, 102.5), (None, 100.05)]
    assert backend._extended(late, 2.0, started) is None
    backend.close()
