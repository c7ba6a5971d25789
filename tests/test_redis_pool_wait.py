"""Every Redis pool oncely opens waits for a free connection, however it is sized.

redis-py's plain pools raise ``MaxConnectionsError`` at once when every connection is busy;
oncely only chose redis-py's blocking pools when ``max_connections`` came as a keyword, so a
URL ``max_connections`` (or none: redis-py's default pool of 100) made a burst of concurrent
calls on a healthy server fail at once with a message claiming a pool timeout had elapsed.
Now callers wait up to ``pool_timeout`` (default: the socket timeout) and then get
:class:`~oncely.StoreUnavailable` saying how long they waited.

Each test runs on a private ``redis-server`` (it may be SIGSTOPped) with
``autopipeline=False``, so that each call takes a pooled connection of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import redis
import redis.asyncio

from oncely import idempotent
from oncely.errors import ConfigurationError
from oncely.locks.redis import RedisLockBackend
from oncely.messaging.dedup import _Redis
from oncely.optimistic.redis import RedisVersioned
from oncely.stores import open_store
from oncely.stores.redis import RedisStore

from lock_workers import RedisServer

pytestmark = pytest.mark.timeout(90)


def _burst(store: Any, calls: int) -> tuple[Counter[str], list[tuple[float, str]]]:
    """``calls`` concurrent async idempotent calls on ``store``: outcome counts, and for each
    failure (seconds after the start, message)."""

    @idempotent(store=store, name=f"pool-{uuid.uuid4().hex[:8]}", key=["k"])
    async def f(k: str) -> str:
        await asyncio.sleep(0.01)
        return k

    out: Counter[str] = Counter()
    failures: list[tuple[float, str]] = []

    async def main() -> None:
        t0 = time.monotonic()

        async def one(i: int) -> None:
            try:
                await f(f"k{i}")
                out["ok"] += 1
            except Exception as exc:
                out[type(exc).__name__] += 1
                failures.append((time.monotonic() - t0, str(exc)))

        await asyncio.gather(*(one(i) for i in range(calls)))

    asyncio.run(main())
    return out, failures


@pytest.mark.serial
@pytest.mark.parametrize(
    ("query", "keywords", "calls"),
    [
        ("?max_connections=5", {}, 60),  # a URL max_connections
        ("", {}, 250),  # none: the default pool (100)
        ("", {"max_connections": 5}, 60),  # the keyword
        ("?max_connections=5&autopipeline=0", None, 60),  # every option in the URL
    ],
    ids=["url", "default", "keyword", "url-only"],
)
def test_more_calls_than_connections_all_succeed(
    private_redis: RedisServer, query: str, keywords: dict[str, Any] | None, calls: int
) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/0{query}"
    store = open_store(url) if keywords is None else open_store(url, autopipeline=False, **keywords)
    out, failures = _burst(store, calls)
    assert out == {"ok": calls}, failures[:1]


@pytest.mark.serial
def test_sync_threads_beyond_url_max_connections_all_succeed(private_redis: RedisServer) -> None:
    store = open_store(
        f"redis://127.0.0.1:{private_redis.port}/0?max_connections=3", autopipeline=False
    )

    @idempotent(store=store, name=f"pool-{uuid.uuid4().hex[:8]}", key=["k"])
    def f(k: str) -> str:
        time.sleep(0.01)
        return k

    errors: list[BaseException] = []
    start = threading.Barrier(24)

    def one(i: int) -> None:
        start.wait()
        try:
            for j in range(5):
                f(f"k{i}-{j}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


@pytest.mark.serial
@pytest.mark.parametrize(
    ("query", "pool_timeout"),
    [("?max_connections=4&socket_timeout=1", 1.0), ("?max_connections=4&pool_timeout=0.5", 0.5)],
    ids=["default-socket-timeout", "url-pool-timeout"],
)
def test_stopped_server_fails_after_the_pool_timeout(
    private_redis: RedisServer, query: str, pool_timeout: float
) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/0{query}"
    store = open_store(url, autopipeline=False, socket_timeout=1)
    out, _ = _burst(store, 4)  # connect the pool's four connections
    assert out == {"ok": 4}
    private_redis.pause()
    try:
        out, failures = _burst(store, 16)
    finally:
        private_redis.resume()
    assert out == {"StoreUnavailable": 16}
    # Not at once (redis-py's plain pool raised MaxConnectionsError in microseconds), and not
    # without bound: the holders time out after socket_timeout, the waiters after pool_timeout.
    first = min(t for t, _ in failures)
    last = max(t for t, _ in failures)
    assert first >= 0.8 * pool_timeout, failures[:1]
    assert last <= pool_timeout + 1.0 + 2.0, failures[-1:]
    waited = [m for _, m in failures if "no free connection" in m]
    assert waited, [m for _, m in failures][:2]
    assert f"waited pool_timeout={pool_timeout:g} s" in waited[0]
    assert "all 4 pooled connections were busy" in waited[0]


def test_every_client_gets_a_waiting_pool(private_redis: RedisServer) -> None:
    """The store, the lock backend, the dedup backend and RedisVersioned: all open blocking
    pools, sized from the URL, waiting pool_timeout (default: socket_timeout)."""
    url = f"redis://127.0.0.1:{private_redis.port}/0?max_connections=7&socket_timeout=3"
    clients = [
        RedisStore(url).redis,
        RedisLockBackend(url).redis,
        _Redis(url, None, "p", "n", 60.0, None).clients,  # type: ignore[arg-type]
        RedisVersioned(url).redis,
    ]
    for c in clients:
        pool = c.client.connection_pool  # type: ignore[attr-defined]
        assert isinstance(pool, redis.BlockingConnectionPool), type(pool)
        assert (pool.max_connections, pool.timeout) == (7, 3.0)

        async def check(c: Any = c) -> None:
            apool = c.aclient().connection_pool
            assert isinstance(apool, redis.asyncio.BlockingConnectionPool), type(apool)
            assert (apool.max_connections, apool.timeout) == (7, 3.0)
            await c.aclose()

        asyncio.run(check())
        c.close()


def test_url_takes_oncely_options_and_lists_only_user_options() -> None:
    store = open_store("redis://127.0.0.1:1/0?pool_timeout=2.5&autopipeline=false")
    assert isinstance(store, RedisStore)
    assert store.redis.pool_timeout == 2.5
    assert store.redis.scripts is store.redis.client  # no auto-pipeline
    with pytest.raises(ConfigurationError) as info:
        open_store("redis://127.0.0.1:1/0?pool_timout=2")
    message = str(info.value)
    assert "did you mean 'pool_timeout'?" in message
    listed = set(message.rsplit("known options: ", 1)[1].split(", "))
    assert {"pool_timeout", "autopipeline", "max_connections", "socket_timeout"} <= listed
    for internal in ("himport_registry", "orig_host_address", "event_dispatcher", "retry"):
        assert internal not in listed
    with pytest.raises(ConfigurationError) as info:
        open_store("redis://127.0.0.1:1/0", himport_registry=1)
    assert "orig_host_address" not in str(info.value)


@pytest.mark.parametrize("value", ["fasle", "of", "0ff", "nope", "-1", "nan", "maybe", "2"])
def test_a_flag_option_that_is_no_flag_is_refused(value: str) -> None:
    """``autopipeline=fasle`` (in the URL or as a keyword) left the pipeline on without a word
    (red team 13): only the on/off words are taken."""
    with pytest.raises(ConfigurationError, match="autopipeline="):
        open_store(f"redis://127.0.0.1:1/0?autopipeline={value}")
    with pytest.raises(ConfigurationError, match="autopipeline="):
        open_store("redis://127.0.0.1:1/0", autopipeline=value)


@pytest.mark.parametrize("value", ["0", "false", "No", "off", "n", ""])
def test_the_off_words_turn_the_auto_pipeline_off(value: str) -> None:
    store = open_store(f"redis://127.0.0.1:1/0?autopipeline={value}")
    assert isinstance(store, RedisStore)
    assert store.redis.scripts is store.redis.client
    on = open_store("redis://127.0.0.1:1/0?autopipeline=yes")
    assert isinstance(on, RedisStore)
    assert on.redis.scripts is not on.redis.client
