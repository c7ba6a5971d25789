"""Red-team tests for oncely.messaging, against the real brokers on this machine.

Each test reproduces a fault found by trying to break the consumer as a demanding user would.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio

from oncely.messaging import IdempotentConsumer
from oncely.messaging.redis_streams import RedisStreamConsumer
from oncely.stores import Store

from conftest import REDIS_URL, StoreFactory

# Two different dedup ids that are not UTF-8: decoded with errors="replace" both become
# "\ufffd-id", so one of the two messages would be acked as the other's duplicate, unrun.
BINARY_IDS = (b"\xff-id", b"\xfe-id")


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store("redis")[0]


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"oncely-redteam-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name)
    client.close()


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


async def test_redis_streams_binary_dedup_ids_never_collide(
    client: redis.asyncio.Redis, stream: str, store: Store
) -> None:
    """Two entries whose ``id`` fields are different non-UTF-8 bytes are two messages: neither
    may be acked as the other's duplicate without running (a lost message)."""
    for raw_id in BINARY_IDS:
        await client.xadd(stream, {"id": raw_id, "body": b"{}"})
    ran: list[bytes] = []
    letters: list[str] = []
    consumer = IdempotentConsumer(
        lambda d: ran.append(d.raw[1][b"id"]),
        name="c",
        store=store,
        on_dead_letter=lambda d, e: letters.append(str(e)),
    )
    member = RedisStreamConsumer(consumer, client, stream, "g", "a")
    await member.ensure_group()
    assert await member.step() == 2
    assert member.stats["duplicates"] == 0, member.stats
    assert len(ran) + len(letters) == 2
