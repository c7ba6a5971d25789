"""RedisVersioned on the real Redis: compare-and-set in one script, exact under 32 concurrent
clients (threads and asyncio tasks), while the unchecked read-modify-write loses updates."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from oncely.errors import (
    ConfigurationError,
    NotFound,
    StaleVersion,
    UnversionedRow,
    VersionExhausted,
)
from oncely.optimistic import retry_on_conflict
from oncely.optimistic.redis import RedisVersioned

from conftest import REDIS_URL

CLIENTS = 32
PER_CLIENT = 5


@pytest.fixture
def key() -> Iterator[str]:
    name = f"oncely-test-cas:{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name)
    client.close()


def test_get_set_merge_delete_round_trip(key: str) -> None:
    store = RedisVersioned(REDIS_URL)
    try:
        assert store.get(key) == ({}, 0)
        v1 = store.set(key, {"a": 1, "b": "x", "c": b"\x00\xff", "d": 1.5}, 0)
        assert v1 >= 1
        assert store.get(key) == ({"a": b"1", "b": b"x", "c": b"\x00\xff", "d": b"1.5"}, v1)
        v2 = store.set(key, {"a": 2}, v1)  # replace: b, c, d are gone
        assert v2 > v1
        assert store.get(key) == ({"a": b"2"}, v2)
        v3 = store.set(key, {"z": "new"}, v2, merge=True)
        assert v3 > v2
        assert store.get(key) == ({"a": b"2", "z": b"new"}, v3)
        store.delete(key, v3)
        assert store.get(key) == ({}, 0)
    finally:
        store.close()


def test_stale_writes_change_nothing(key: str) -> None:
    store = RedisVersioned(REDIS_URL)
    try:
        v1 = store.set(key, {"a": 1}, 0)
        v2 = store.set(key, {"a": 2}, v1)
        with pytest.raises(StaleVersion) as info:
            store.set(key, {"a": "lost"}, v1)
        assert (info.value.expected, info.value.current) == (v1, v2)
        assert key in info.value.entity
        with pytest.raises(StaleVersion) as created:
            store.set(key, {"a": "again"}, 0)  # someone created it first
        assert created.value.current == v2
        with pytest.raises(StaleVersion):
            store.delete(key, v1)
        assert store.get(key) == ({"a": b"2"}, v2)
        store.delete(key, v2)
        with pytest.raises(NotFound):
            store.set(key, {"a": 3}, v2)
        with pytest.raises(NotFound):
            store.delete(key, v2)
        assert store.get(key) == ({}, 0)
    finally:
        store.close()


def test_bad_input_is_typed_and_writes_nothing(key: str) -> None:
    store = RedisVersioned(REDIS_URL)
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        with pytest.raises(ConfigurationError):
            store.set(key, {"_version": 5}, 0)
        with pytest.raises(ConfigurationError):
            store.set(key, {"a": None}, 0)
        with pytest.raises(ConfigurationError):
            store.set(key, {"a": 1}, -1)
        with pytest.raises(ConfigurationError):
            store.set(key, {"a": 1}, True)
        with pytest.raises(ConfigurationError):
            store.set("", {"a": 1}, 0)
        with pytest.raises(ConfigurationError):
            store.delete(key, 0)
        assert raw.exists(key) == 0
        raw.hset(key, mapping={"a": "plain"})  # a hash nobody versioned
        with pytest.raises(UnversionedRow):
            store.get(key)
        with pytest.raises(UnversionedRow):
            store.set(key, {"a": 1}, 1)
        raw.hset(key, "_version", "x1")
        with pytest.raises(UnversionedRow):
            store.set(key, {"a": 1}, 1)
        assert raw.hget(key, "a") == b"plain"
        raw.delete(key)
        raw.set(key, "a string")
        with pytest.raises(UnversionedRow, match="not a versioned hash"):
            store.set(key, {"a": 1}, 1)
        assert raw.get(key) == b"a string"
        with pytest.raises(ConfigurationError):
            RedisVersioned(42)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            RedisVersioned("http://x")
    finally:
        raw.close()
        store.close()


def test_32_threads_each_with_its_own_client_count_exactly(key: str) -> None:
    first = RedisVersioned(REDIS_URL).set(key, {"n": 0}, 0)
    conflicts = 0
    lock = threading.Lock()

    def count(*_: object) -> None:
        nonlocal conflicts
        with lock:
            conflicts += 1

    def worker() -> None:
        store = RedisVersioned(REDIS_URL)

        @retry_on_conflict(attempts=1000, base_delay=0.001, max_delay=0.05, on_retry=count)
        def increment() -> int:
            fields, version = store.get(key)
            return store.set(key, {"n": int(fields["n"]) + 1}, version)

        try:
            for _ in range(PER_CLIENT):
                increment()
        finally:
            store.close()

    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fields, version = RedisVersioned(REDIS_URL).get(key)
    assert int(fields["n"]) == CLIENTS * PER_CLIENT
    assert version >= first + CLIENTS * PER_CLIENT  # at least one per write
    assert conflicts > 0, "the clients never raced: the test proves nothing"


def test_the_unchecked_loop_loses_updates(key: str) -> None:
    """The source's shape: read, compute, write back without a version check."""
    raw = redis.Redis.from_url(REDIS_URL)
    raw.hset(key, "n", 0)
    barrier = threading.Barrier(CLIENTS)

    def worker() -> None:
        client = redis.Redis.from_url(REDIS_URL)
        barrier.wait()
        for _ in range(PER_CLIENT):
            n = int(client.hget(key, "n"))  # type: ignore[arg-type]
            client.hset(key, "n", n + 1)
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = int(raw.hget(key, "n"))  # type: ignore[arg-type]
    raw.close()
    assert final < CLIENTS * PER_CLIENT, "the unchecked loop lost no update this time"


async def test_32_asyncio_clients_count_exactly(key: str) -> None:
    seed = RedisVersioned(REDIS_URL)
    first = await seed.aset(key, {"n": 0}, 0)

    async def client() -> None:
        store = RedisVersioned(redis.asyncio.Redis.from_url(REDIS_URL))

        @retry_on_conflict(attempts=1000, base_delay=0.001, max_delay=0.05)
        async def increment() -> int:
            fields, version = await store.aget(key)
            await asyncio.sleep(0)  # let the others read the same version
            return await store.aset(key, {"n": int(fields["n"]) + 1}, version)

        for _ in range(PER_CLIENT):
            await increment()
        await store.redis.aclient().aclose()

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    fields, version = await seed.aget(key)
    assert int(fields["n"]) == CLIENTS * PER_CLIENT and version >= first + CLIENTS * PER_CLIENT
    await seed.adelete(key, version)
    assert await seed.aget(key) == ({}, 0)
    await seed.aclose()


async def test_a_client_of_one_face_refuses_the_other() -> None:
    sync_only = RedisVersioned(redis.Redis.from_url(REDIS_URL))
    with pytest.raises(ConfigurationError):
        await sync_only.aget("k")
    async_client = redis.asyncio.Redis.from_url(REDIS_URL)
    async_only = RedisVersioned(async_client)
    with pytest.raises(ConfigurationError):
        async_only.get("k")
    await async_client.aclose()


def test_versions_never_repeat_across_delete_and_re_create(key: str) -> None:
    """ABA: a writer read a version, the hash was deleted and created again meanwhile; its
    compare-and-set must not land on the new hash (redteam3 F12: versions restarted at 1)."""
    store = RedisVersioned(REDIS_URL)
    try:
        seen = [store.set(key, {"owner": "alice", "balance": 100}, 0)]
        stale = seen[0]  # writer A reads this version ...
        for owner in ("bob", "carol", "dave"):  # ... the hash is deleted and re-created
            store.delete(key, seen[-1])
            seen.append(store.set(key, {"owner": owner, "balance": 500}, 0))
            seen.append(store.set(key, {"balance": 400}, seen[-1], merge=True))
        assert len(set(seen)) == len(seen) and seen == sorted(seen)
        with pytest.raises(StaleVersion) as info:  # A's stale write is refused
            store.set(key, {"owner": "alice", "balance": 90}, stale)
        assert info.value.current == seen[-1]
        with pytest.raises(StaleVersion):
            store.delete(key, stale)
        assert store.get(key) == ({"owner": b"dave", "balance": b"400"}, seen[-1])
    finally:
        store.close()


def test_a_hash_of_the_old_counting_versions_stays_usable(key: str) -> None:
    """Hashes written before versions followed the clock (1, 2, ...) are read and written."""
    raw = redis.Redis.from_url(REDIS_URL)
    store = RedisVersioned(REDIS_URL)
    try:
        raw.hset(key, mapping={"a": "old", "_version": 7})
        assert store.get(key) == ({"a": b"old"}, 7)
        assert store.set(key, {"a": "new"}, 7) > 7
        with pytest.raises(StaleVersion):
            store.set(key, {"a": "lost"}, 7)
    finally:
        raw.close()
        store.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_get_of_a_key_of_another_type_is_unversioned_like_set(key: str, face: str) -> None:
    """red team 17 #8: get() of a string key raised StoreError (WRONGTYPE, "store down")."""
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(key, "a string")
    try:
        if face == "sync":
            store = RedisVersioned(REDIS_URL)
            with pytest.raises(UnversionedRow, match="not a hash"):
                store.get(key)
            store.close()
        else:

            async def go() -> None:
                store = RedisVersioned(REDIS_URL)
                with pytest.raises(UnversionedRow, match="not a hash"):
                    await store.aget(key)
                await store.aclose()

            asyncio.run(go())
        assert raw.get(key) == b"a string"
    finally:
        raw.close()


TOP = 2**53


def test_versions_at_2_53_are_refused_never_rounded(key: str) -> None:
    """red team 17 #1: a version of 2^53 or more (migrated from time.time_ns()) stopped growing
    in Lua's doubles, and a writer holding a stale version succeeded (two set() with the same
    version both passed); 2^53 + 1 went back to 2^53. Now: the version is refused as unusable
    (VersionExhausted, an UnversionedRow), nothing is written, and an expected version of
    2^53 or more is refused before anything is sent."""
    store = RedisVersioned(REDIS_URL)
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        for stored in (TOP - 1, TOP, TOP + 1, 10**18, 10**30):
            raw.delete(key)
            raw.hset(key, mapping={"a": "old", "_version": str(stored)})
            expected = stored if stored < TOP else TOP - 1
            with pytest.raises(VersionExhausted):
                store.set(key, {"a": "new"}, expected)
            with pytest.raises(UnversionedRow):  # the same error, one except for both
                store.set(key, {"a": "new"}, expected, merge=True)
            assert raw.hgetall(key) == {b"a": b"old", b"_version": str(stored).encode()}
            if stored >= TOP:
                with pytest.raises(VersionExhausted):
                    store.get(key)
            else:
                assert store.get(key) == ({"a": b"old"}, stored)
        # the way out of a hash at 2^53 - 1: delete it at that version, create it again
        raw.delete(key)
        raw.hset(key, mapping={"a": "old", "_version": str(TOP - 1)})
        store.delete(key, TOP - 1)
        assert store.set(key, {"a": "new"}, 0) < TOP - 1
        for expected in (TOP, TOP + 1, 10**30):
            with pytest.raises(ConfigurationError, match="2\\^53"):
                store.set(key, {"a": "x"}, expected)
            with pytest.raises(ValueError):
                store.delete(key, expected)
        # just below: the last version that can still be raised
        raw.delete(key)
        raw.hset(key, mapping={"a": "old", "_version": str(TOP - 2)})
        assert store.set(key, {"a": "new"}, TOP - 2) == TOP - 1
        for expected in (TOP - 2, TOP - 1):  # a stale writer and the current one: no write
            with pytest.raises(VersionExhausted):
                store.set(key, {"a": "next"}, expected)
        assert raw.hget(key, "a") == b"new"
    finally:
        raw.close()
        store.close()
