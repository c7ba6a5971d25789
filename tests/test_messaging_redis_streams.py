"""The idempotent consumer on Redis Streams, against the Redis server on this machine."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from messaging_storm import Storm, check_storm, run_storm, storm_ids, storm_table
from oncely.errors import ConfigurationError
from oncely.messaging import Delivery, IdempotentConsumer
from oncely.messaging.redis_streams import RedisStreamConsumer, publish
from oncely.stores import Store

from conftest import REDIS_URL, StoreFactory, drop_redis_prefix


@pytest.fixture
def names() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:10]
    stream, group = f"oncely-test-stream-{tag}", f"g-{tag}"
    yield stream, group
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(stream)
    client.close()


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store("redis")[0]


async def pending(client: redis.asyncio.Redis, stream: str, group: str) -> int:
    return int((await client.xpending(stream, group))["pending"])


@pytest.mark.serial  # a storm on 2 s leases: a busy neighbour stalling a handler 2 s lapses one
@pytest.mark.slow
def test_storm_two_processes_one_killed(tmp_path: Path, names: tuple[str, str]) -> None:
    """2,000 messages, 30% duplicate publishes, two processes, one SIGKILLed mid-batch and
    restarted, every 13th message failing once (left pending, reclaimed): each effect once,
    none lost, nothing pending."""
    n = 2000
    stream, group = names
    storm = Storm("redis", tmp_path, n)
    sync = redis.Redis.from_url(REDIS_URL)
    pipe = sync.pipeline(transaction=False)
    for mid in storm_ids(n):
        pipe.xadd(stream, {"id": mid, "body": b"{}"})
    pipe.execute()
    sync.xgroup_create(stream, group, id="0")
    prefix = f"oncely-test-{storm.tag}"
    config = {
        "redis": REDIS_URL,
        "stream": stream,
        "group": group,
        "store": REDIS_URL,
        "store_options": {"prefix": prefix},
        "name": "storm",
        "fail_every": 13,
        "lease": 2.0,
    }

    def drained() -> bool:
        info = sync.xinfo_groups(stream)[0]
        return int(info["pending"]) == 0 and int(info.get("lag") or 0) == 0

    fixture = storm_table(storm)
    next(fixture)
    try:
        result = run_storm(storm, config, drained)
    finally:
        next(fixture, None)
        drop_redis_prefix(prefix)
        sync.close()
    check_storm(result, n)


async def test_reclaim_pages_past_the_xautoclaim_scan_limit(
    client: redis.asyncio.Redis, names: tuple[str, str], store: Store
) -> None:
    """500 pending entries of a live member come first, 30 of a dead member after them:
    one XAUTOCLAIM with COUNT 10 scans 100 and finds none; reclaim() pages on and takes the
    30, and not one of the live member's entries."""
    stream, group = names
    for i in range(530):
        await publish(client, stream, b"{}", f"m-{i}")
    await client.xgroup_create(stream, group, id="0")
    await client.xreadgroup(group, "dead", {stream: ">"}, count=530)
    await asyncio.sleep(2.1)  # every entry is idle past the lease now
    first_500 = [e[0] for e in (await client.xrange(stream, count=500))]
    await client.xclaim(stream, group, "live", 0, first_500, justid=True)  # live: touched now

    ran: list[str | None] = []

    async def handler(d: Delivery) -> None:
        ran.append(d.message_id)

    consumer = IdempotentConsumer(handler, name="c", store=store, lease=2.0)
    member = RedisStreamConsumer(consumer, client, stream, group, "survivor", count=10)
    one_shot: Any = await client.xautoclaim(stream, group, "probe", 2000, "0-0", count=10)
    assert one_shot[1] == []  # the scan limit: nothing in the first 100 entries
    assert await member.reclaim() == 30
    assert sorted(ran) == sorted(f"m-{i}" for i in range(500, 530))
    rows = await client.xpending_range(stream, group, "-", "+", 1000)
    assert {r["consumer"] for r in rows} == {b"live"} and len(rows) == 500


async def test_a_live_handlers_entry_is_never_taken(
    client: redis.asyncio.Redis, names: tuple[str, str], store: Store
) -> None:
    """A handler that runs 3.5 s with a 2 s lease and min-idle: its entry is touched, so
    another member reclaiming in the meantime takes nothing, and the handler runs once."""
    stream, group = names
    await publish(client, stream, b"{}", "m-1")
    runs: list[str | None] = []

    async def slow(d: Delivery) -> None:
        runs.append(d.message_id)
        await asyncio.sleep(3.5)

    consumer = IdempotentConsumer(slow, name="c", store=store, lease=2.0)
    a = RedisStreamConsumer(consumer, client, stream, group, "a")
    b = RedisStreamConsumer(consumer, client, stream, group, "b")
    await a.ensure_group()
    task = asyncio.ensure_future(a.step())
    await asyncio.sleep(0.2)
    taken = 0
    for _ in range(6):
        await asyncio.sleep(0.5)
        taken += await b.reclaim()
    assert await task == 1
    assert taken == 0 and runs == ["m-1"]
    assert await pending(client, stream, group) == 0


async def test_no_dedup_id_is_dead_lettered_and_acked(
    client: redis.asyncio.Redis, names: tuple[str, str], store: Store
) -> None:
    stream, group = names
    await client.xadd(stream, {"body": b"no id field"})
    await publish(client, stream, b"{}", "m-1")
    letters: list[str] = []
    ran: list[str | None] = []
    consumer = IdempotentConsumer(
        lambda d: ran.append(d.message_id),
        name="c",
        store=store,
        on_dead_letter=lambda d, e: letters.append(str(e)),
    )
    member = RedisStreamConsumer(consumer, client, stream, group, "a")
    await member.ensure_group()
    assert await member.step() == 2
    assert ran == ["m-1"] and len(letters) == 1 and "dedup id" in letters[0]
    assert await pending(client, stream, group) == 0


async def test_store_down_leaves_entries_pending(
    client: redis.asyncio.Redis, names: tuple[str, str]
) -> None:
    from oncely.stores import open_store

    stream, group = names
    await publish(client, stream, b"{}", "m-1")
    down = open_store("redis://127.0.0.1:1/0", socket_connect_timeout=0.3)
    ran: list[int] = []
    consumer = IdempotentConsumer(lambda d: ran.append(1), name="c", store=down)
    member = RedisStreamConsumer(consumer, client, stream, group, "a")
    await member.ensure_group()
    await member.step()
    assert ran == [] and await pending(client, stream, group) == 1
    assert member.stats["retried"] == 1
    await down.aclose()
    down.close()


async def test_connection_dropped_mid_stream_resumes_without_loss(
    client: redis.asyncio.Redis, names: tuple[str, str], store: Store
) -> None:
    """CLIENT KILL of the consumer's own connections while it runs: it reconnects, every
    message is handled once, nothing stays pending."""
    stream, group = names
    cname = f"oncely-test-{uuid.uuid4().hex[:8]}"
    own = redis.asyncio.Redis.from_url(REDIS_URL, client_name=cname)
    ran: list[str | None] = []

    async def handler(d: Delivery) -> None:
        ran.append(d.message_id)

    consumer = IdempotentConsumer(handler, name="c", store=store, lease=2.0)
    member = RedisStreamConsumer(consumer, own, stream, group, "a", count=10, block=0.2)
    await member.ensure_group()
    stop = asyncio.Event()
    task = asyncio.ensure_future(member.run(stop))
    kills = 0
    for i in range(200):
        await publish(client, stream, b"{}", f"m-{i}")
        if i % 50 == 25:
            for c in await client.client_list():
                if c.get("name") == cname:
                    await client.client_kill_filter(_id=c["id"])
                    kills += 1
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 20
    while len(set(ran)) < 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    deadline = time.monotonic() + 10
    while await pending(client, stream, group) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stop.set()
    await task
    await own.aclose()
    assert kills >= 1
    assert sorted(set(ran)) == sorted(f"m-{i}" for i in range(200))
    assert len(ran) == 200
    assert await pending(client, stream, group) == 0


def test_min_idle_shorter_than_the_lease_is_refused(store: Store) -> None:
    consumer = IdempotentConsumer(lambda d: None, name="c", store=store, lease=5)
    with pytest.raises(ConfigurationError, match="min_idle"):
        RedisStreamConsumer(consumer, redis.asyncio.Redis(), "s", "g", "m", min_idle=1)


async def test_a_corrected_message_in_the_same_batch_is_dead_lettered(
    client: redis.asyncio.Redis, names: tuple[str, str], store: Store
) -> None:
    """The original and a corrected body under one dedup id, read in one XREADGROUP batch:
    the corrected one is dead-lettered as a mismatch, never acked as a duplicate (red team 5:
    the batch claimed the id once and acked the second body unseen)."""
    stream, group = names
    await publish(client, stream, b'{"order":"o-1","amount":5}', message_id="o-1")
    await publish(client, stream, b'{"order":"o-1","amount":500}', message_id="o-1")
    ran: list[bytes] = []
    letters: list[tuple[bytes, str | None]] = []
    consumer = IdempotentConsumer(
        lambda d: ran.append(d.body),
        name="c",
        store=store,
        lease=2.0,
        on_dead_letter=lambda d, e: letters.append((d.body, getattr(e, "reason", None))),
    )
    member = RedisStreamConsumer(consumer, client, stream, group, "a", count=10)
    await member.ensure_group()
    assert await member.step() == 2
    assert ran == [b'{"order":"o-1","amount":5}']
    assert letters == [(b'{"order":"o-1","amount":500}', "mismatch")]
    assert await pending(client, stream, group) == 0


async def test_a_dedup_id_callable_that_raises_fails_that_message_only(
    client: redis.asyncio.Redis, names: tuple[str, str], store: Store
) -> None:
    """Red team 18 F5: ``dedup_id=lambda d: d.json()["id"]`` raising KeyError for a body without
    ``id`` escaped the batch: run() died, its batch-mates were never handled and every restart
    died again. Now it is a failed attempt of that message only (logged at ERROR), dead-lettered
    after max_attempts and acked; the run goes on, the others run once."""
    stream, group = names
    ran: list[str] = []
    letters: list[BaseException] = []
    consumer = IdempotentConsumer(
        lambda d: ran.append(d.json()["id"]),
        name=f"c-{uuid.uuid4().hex[:8]}",
        store=store,
        dedup_id=lambda d: d.json()["id"],
        lease=0.5,
        max_attempts=2,
        retry_delay=0.05,
        on_dead_letter=lambda d, e: letters.append(e),
    )
    member = RedisStreamConsumer(consumer, client, stream, group, "m1", block=0.05)
    await member.ensure_group()
    for body in ('{"noid": 1}', '{"id": "good-1"}', '{"id": "good-2"}'):
        await client.xadd(stream, {"body": body})
    stop = asyncio.Event()
    task = asyncio.ensure_future(member.run(stop))
    try:
        deadline = time.monotonic() + 15
        while not (letters and len(ran) == 2) and not task.done():
            assert time.monotonic() < deadline, (ran, letters, member.stats)
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task  # old code: KeyError('id') out of run()
    assert sorted(ran) == ["good-1", "good-2"]
    assert len(letters) == 1 and isinstance(letters[0], KeyError)
    assert member.stats == {"ran": 2, "duplicates": 0, "retried": 1, "dead_lettered": 1}
    assert await pending(client, stream, group) == 0
