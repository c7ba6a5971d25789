"""Fences past 2^53 on Redis: Lua's numbers are doubles, exact only up to 2^53.

A fence counter set by hand to 10^17 gave a key the same fence on every claim (``+ 1`` lost in
the rounding), and ``fenced_set`` / ``raise_fence`` compared fences with ``tonumber``, so an
older fence could pass as equal to a newer one. Scripts that hand fences out now refuse to
go past 2^53 (a typed error, nothing taken), and scripts that compare fences compare their
decimal text, exact at any size.
"""

from __future__ import annotations

import uuid

import pytest
import redis

from oncely.core.records import New, RecordKey
from oncely.errors import LockError, StoreError
from oncely.locks import fenced_set
from oncely.locks.redis import RedisLockBackend
from oncely.stores.redis import RedisStore

REDIS_URL = "redis://127.0.0.1:6379/0"
TOP = 2**53


@pytest.fixture
def raw() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def test_claims_never_hand_out_a_fence_past_2_53(raw: redis.Redis) -> None:
    prefix = f"oncely-f53-{uuid.uuid4().hex[:8]}"
    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        raw.set(f"{prefix}:fence", TOP - 2)
        key = RecordKey.of("acme", "o-1")
        first = store.claim(key, "fp", 5, 60)
        assert isinstance(first, New) and first.fence == TOP - 1
        store.release(key, first.fence)
        with pytest.raises(StoreError, match="2\\^53"):
            store.claim(key, "fp", 5, 60)
        with pytest.raises(StoreError, match="2\\^53"):
            store.claim(RecordKey.of("acme", "o-2"), "fp", 5, 60)
        assert store.get(RecordKey.of("acme", "o-2")) is None  # nothing was claimed
    finally:
        for name in raw.scan_iter(f"{prefix}:*"):
            raw.delete(name)
        store.close()


def test_locks_never_hand_out_a_fence_past_2_53(raw: redis.Redis) -> None:
    backend = RedisLockBackend(REDIS_URL, prefix=f"oncely-f53-{uuid.uuid4().hex[:8]}")
    name = "ledger"
    key = backend.key(name)
    try:
        raw.set(f"{key}:fence", TOP)
        with pytest.raises((StoreError, LockError), match="2\\^53"):
            backend.acquire(name, "owner-1", 5, 0)
        assert raw.get(key) is None  # the lock was not taken
    finally:
        raw.delete(key, f"{key}:fence")
        backend.close()


def test_fences_past_2_53_compare_exactly(raw: redis.Redis) -> None:
    """fenced_set refuses a fence one below the stored one, and raise_fence raises a counter by
    one, however large the numbers (tonumber() made 2^60 and 2^60 + 1 equal)."""
    value_key = f"oncely-f53-{uuid.uuid4().hex[:8]}"
    try:
        assert fenced_set(raw, value_key, b"new", 2**60 + 1)
        assert not fenced_set(raw, value_key, b"stale", 2**60)  # older by one: refused
        assert raw.hget(value_key, "value") == b"new"
        assert fenced_set(raw, value_key, b"again", 2**60 + 1)  # the same token writes again
        assert not fenced_set(raw, value_key, b"short", 99)  # fewer digits: older
    finally:
        raw.delete(value_key)
    backend = RedisLockBackend(REDIS_URL, prefix=f"oncely-f53-{uuid.uuid4().hex[:8]}")
    name = "ledger"
    key = backend.key(name)
    try:
        raw.set(f"{key}:fence", 10)
        hold = backend.acquire(name, "owner-1", 5, 0)
        assert hasattr(hold, "token")
        raw.set(f"{key}:fence", 2**60)
        assert backend.raise_fence(name, "owner-1", 2**60 + 1)
        assert int(raw.get(f"{key}:fence") or 0) == 2**60 + 1
        assert backend.raise_fence(name, "owner-1", 2**60)  # lower: left as it is
        assert int(raw.get(f"{key}:fence") or 0) == 2**60 + 1
    finally:
        raw.delete(key, f"{key}:fence", f"{key}:signal")
        backend.close()


@pytest.mark.parametrize("counter", [b"9007199254740991", b"9223372036854775807", b"not-a-count"])
def test_a_lock_fence_counter_it_cannot_count_is_refused_before_writing(
    raw: redis.Redis, counter: bytes
) -> None:
    """acquire.lua ran INCR before its 2^53 check: the counter was raised even when the lock was
    refused, and a counter at 2^63 - 1 or not a number gave Redis's own INCR error. Now the
    stored text is checked first (the one rule of claim.lua, acquire.lua and cas.lua)."""
    backend = RedisLockBackend(REDIS_URL, prefix=f"oncely-f53-{uuid.uuid4().hex[:8]}")
    name = "ledger"
    key = backend.key(name)
    try:
        raw.set(f"{key}:fence", counter)
        with pytest.raises((StoreError, LockError), match="2\\^53"):
            backend.acquire(name, "owner-1", 5, 0)
        assert raw.get(key) is None  # the lock was not taken
        assert raw.get(f"{key}:fence") == counter  # and the counter not touched
    finally:
        raw.delete(key, f"{key}:fence")
        backend.close()


def test_a_claim_refused_at_2_53_leaves_the_dead_record_alone(raw: redis.Redis) -> None:
    """claim.lua deleted a released record before its 2^53 check refused the claim; and a
    counter that is not a number failed with a Lua arithmetic error. Both refused, typed,
    before anything is written."""
    prefix = f"oncely-f53-{uuid.uuid4().hex[:8]}"
    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        key = RecordKey.of("acme", "o-1")
        first = store.claim(key, "fp", 5, 60)
        assert isinstance(first, New)
        store.release(key, first.fence)
        record = f"{prefix}:{key.scope}:{key.digest}"
        before = raw.hgetall(record)
        assert before
        for counter in (TOP - 1, "not-a-count"):
            raw.set(f"{prefix}:fence", counter)
            with pytest.raises(StoreError, match="2\\^53"):
                store.claim(key, "fp", 5, 60)
            assert raw.hgetall(record) == before
    finally:
        for name in raw.scan_iter(f"{prefix}:*"):
            raw.delete(name)
        store.close()
