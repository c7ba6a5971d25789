"""The one Lua loader (oncely.backends.lua): every script user survives a server that forgot its
scripts (a restart, ``SCRIPT FLUSH``), sync and async, by sending ``EVAL`` once on ``NOSCRIPT``.
``SCRIPT FLUSH`` runs on a private redis-server of this test, never on the shared one."""

from __future__ import annotations

import redis
import redis.asyncio

from oncely.backends.lua import Script, aevalsha, evalsha
from oncely.core.records import New, RecordKey
from oncely.locks import Lock, afenced_set, fenced_get, fenced_set
from oncely.stores.redis import RedisStore

from lock_workers import RedisServer


def flush(url: str) -> None:
    with redis.Redis.from_url(url) as client:
        client.script_flush()
        assert client.script_exists(Script("oncely.stores", "claim").sha) == [False]


def test_a_script_is_sent_again_after_the_server_forgot_it(private_redis: RedisServer) -> None:
    script = Script("oncely.stores", "probe")
    with redis.Redis.from_url(private_redis.url) as client:
        assert evalsha(client, script, 1, "no-such-record", "1") == -1
        client.script_flush()
        assert evalsha(client, script, 1, "no-such-record", "1") == -1  # EVAL, then cached
        assert client.script_exists(script.sha) == [True]


async def test_the_async_face_sends_it_again_too(private_redis: RedisServer) -> None:
    script = Script("oncely.stores", "probe")
    client = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        await client.script_flush()
        assert await aevalsha(client, script, 1, "no-such-record", "1") == -1
        assert await client.script_exists(script.sha) == [True]
    finally:
        await client.aclose()


def test_store_lock_and_fencing_all_survive_a_script_flush(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url)
    try:
        flush(private_redis.url)
        outcome = store.claim(RecordKey("s", "d"), "fp", 5.0, 60.0)
        assert isinstance(outcome, New)
        flush(private_redis.url)
        with Lock(private_redis.url, "lua-flush", ttl=5) as lock:
            token = lock.token
            assert token is not None
        flush(private_redis.url)
        with redis.Redis.from_url(private_redis.url) as client:
            assert fenced_set(client, "fenced", b"v", token)
            assert fenced_get(client, "fenced") == (b"v", token)
    finally:
        store.close()


async def test_async_fencing_survives_a_script_flush(private_redis: RedisServer) -> None:
    flush(private_redis.url)
    client = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        assert await afenced_set(client, "fenced", b"v", 7)
        assert not await afenced_set(client, "fenced", b"old", 6)
    finally:
        await client.aclose()
