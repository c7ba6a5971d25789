"""Red-team findings (redteam2) on oncely.messaging.dedup.Deduplicator (real Redis): each test
failed before branch fix2 (xfail reasons: git history)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid

import pytest

from oncely.messaging.dedup import Deduplicator

from lock_workers import RedisServer

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_redis_namespaces_are_never_shared_by_accident() -> None:
    tag = uuid.uuid4().hex[:8]
    first = Deduplicator(REDIS_URL, window=10, namespace=f"{tag}}}:b")
    second = Deduplicator(REDIS_URL, window=10, namespace=tag)
    try:
        assert first.seen("c") is False
        assert second.seen("b}:c") is False  # another namespace, never seen there
    finally:
        first.close()
        second.close()


def test_memory_bloom_with_an_absurd_capacity_is_a_configuration_error() -> None:
    code = (
        "from oncely.errors import ConfigurationError\n"
        "from oncely.messaging.dedup import Deduplicator\n"
        "try:\n"
        "    Deduplicator('memory://', window=10, namespace='x', bloom=True,"
        " capacity=10**12).seen('a')\n"
        "except ConfigurationError:\n"
        "    raise SystemExit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 3, (done.returncode, done.stderr[-300:])


# capacity 10**12 at 1 % sizes a generation at 9.6e12 bits, past Redis's 2**32-bit strings
HUGE = {"bloom": True, "capacity": 10**12}


def test_redis_bloom_with_a_capacity_past_the_bitmap_limit_is_refused(
    private_redis: RedisServer,
) -> None:
    from oncely.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        dedup = Deduplicator(private_redis.url, window=10, namespace="rt2", **HUGE)
        try:
            dedup.seen("a")
        finally:
            dedup.close()


def test_a_failed_bloom_script_leaves_no_key_without_expiry(private_redis: RedisServer) -> None:
    import redis

    from oncely.errors import ConfigurationError, StoreError

    with contextlib.suppress(ConfigurationError, StoreError):
        dedup = Deduplicator(private_redis.url, window=10, namespace="rt2", **HUGE)
        try:
            dedup.seen("a")
        finally:
            dedup.close()
    client = redis.Redis.from_url(private_redis.url)
    try:
        forever = [k for k in client.scan_iter("*") if client.pttl(k) == -1]
        assert forever == []
    finally:
        client.close()
