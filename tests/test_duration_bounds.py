"""One upper bound for every duration option, checked when built; no Redis key left forever.

Outside retest 6: ``@idempotent(ttl=1e16)``, ``IdempotentConsumer(ttl=1e18)`` and
``IdempotencyConfig(ttl=1e18)`` were accepted, then every call failed (a Redis ``PX`` past
64-bit milliseconds), and the failed claim had already written an in_progress hash with no
expiry (PTTL -1). Every duration is now at most :data:`oncely.settings.MAX_SECONDS`, and the
Redis scripts check their durations before they write.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from oncely import idempotent
from oncely.errors import ConfigurationError
from oncely.settings import MAX_SECONDS, resolve
from oncely.stores.base import RecordKey, Store

from conftest import REDIS_URL

pytestmark = pytest.mark.timeout(60)

HUGE = (1e18, 1e16, MAX_SECONDS * 1.01, "1e17s")


def _f(k: str) -> str:
    return k


@pytest.mark.parametrize("value", HUGE)
def test_every_component_refuses_a_huge_duration_when_built(value: object, tmp_path: Path) -> None:
    from oncely.http import GLOBAL, IdempotencyConfig
    from oncely.messaging import IdempotentConsumer

    url = f"sqlite:///{tmp_path / 'b.db'}"
    with pytest.raises(ConfigurationError, match="ttl"):
        idempotent(store=url, name="b.huge", key=["k"], ttl=value)(_f)
    with pytest.raises(ConfigurationError, match="lease"):
        idempotent(store=url, name="b.huge", key=["k"], lease=value)(_f)
    with pytest.raises(ConfigurationError, match="ttl"):
        IdempotentConsumer(lambda d: None, name="b", store=url, dedup_id="message_id", ttl=value)
    with pytest.raises(ConfigurationError, match="wait_timeout"):
        IdempotentConsumer(
            lambda d: None, name="b", store=url, dedup_id="message_id", wait_timeout=value
        )
    with pytest.raises(ConfigurationError, match="ttl"):
        IdempotencyConfig(store=url, scope=GLOBAL, ttl=value)
    with pytest.raises(ConfigurationError, match="ONCELY_TTL"):
        resolve("ttl", environ={"ONCELY_TTL": str(value)})


def test_the_longest_duration_works_on_every_store(store: Store) -> None:
    """MAX_SECONDS itself is accepted and kept: claim, complete and replay on every store."""
    runs: list[str] = []

    @idempotent(store=store, name="b.most" + uuid.uuid4().hex[:6], key=["k"], ttl=MAX_SECONDS)
    def f(k: str) -> str:
        runs.append(k)
        return k * 2

    assert f("a") == "aa"
    assert f("a") == "aa"
    assert runs == ["a"]


@pytest.mark.parametrize("what", ["ttl", "lease"])
def test_a_redis_claim_with_a_huge_duration_writes_nothing(make_store: object, what: str) -> None:
    """The store's own claim, called past the checks: the script refuses before it writes
    (it used to leave an in_progress hash with PTTL -1 and ea ~1e21)."""
    store, _, _ = make_store("redis")  # type: ignore[operator]
    key = RecordKey("b", uuid.uuid4().hex)
    lease, ttl = (2.0, 1e18) if what == "ttl" else (1e18, 2.0)
    with pytest.raises(Exception, match=what):
        store.claim(key, "fp", lease, ttl)
    client = redis.Redis.from_url(REDIS_URL)
    assert client.exists(store._key(key)) == 0
    assert [k for k in client.scan_iter(match=f"{store.prefix}:*") if b":fence" not in k] == []
    # a claim within the bound takes the key, with an expiry
    store.claim(key, "fp", 2.0, MAX_SECONDS)
    assert 0 < client.pttl(store._key(key)) <= MAX_SECONDS * 1000


def test_a_redis_renew_and_complete_with_a_huge_duration_change_nothing(make_store: object) -> None:
    store, _, _ = make_store("redis")  # type: ignore[operator]
    key = RecordKey("b", uuid.uuid4().hex)
    outcome = store.claim(key, "fp", 2.0, 60.0)
    client = redis.Redis.from_url(REDIS_URL)
    before = client.hgetall(store._key(key))
    with pytest.raises(Exception, match="lease"):
        store.renew(key, outcome.fence, 1e18)
    with pytest.raises(Exception, match="ttl"):
        store.complete(key, outcome.fence, b"1", "json", 1e18)
    assert client.hgetall(store._key(key)) == before
    assert 0 < client.pttl(store._key(key)) <= 60_000
