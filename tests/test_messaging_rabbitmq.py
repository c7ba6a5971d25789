"""The idempotent consumer on RabbitMQ (aio-pika), against the broker on this machine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from messaging_storm import Storm, check_storm, run_storm, storm_ids, storm_table
from oncely.messaging import Delivery, IdempotentConsumer
from oncely.messaging.rabbitmq import RabbitMQConsumer, publish
from oncely.stores import Store

from conftest import REDIS_URL, StoreFactory, drop_redis_prefix

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def channel() -> AsyncIterator[AbstractChannel]:
    # not a robust channel: its passive declare reports a stale message count
    connection = await aio_pika.connect(AMQP_URL)
    ch = await connection.channel()
    yield ch
    await connection.close()


@pytest.fixture
async def queue_name(channel: AbstractChannel) -> AsyncIterator[str]:
    name = f"oncely-test-q-{uuid.uuid4().hex[:10]}"
    await channel.declare_queue(name, durable=False, auto_delete=False)
    yield name
    await channel.queue_delete(name)


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store("redis")[0]


async def ready_count(channel: AbstractChannel, name: str) -> int:
    q = await channel.declare_queue(name, passive=True)
    return int(q.declaration_result.message_count or 0)


async def consume_until(member: RabbitMQConsumer, done: Any, timeout: float = 15.0) -> None:
    stop = asyncio.Event()
    task = asyncio.ensure_future(member.run(stop))
    try:
        async with asyncio.timeout(timeout) if hasattr(asyncio, "timeout") else _Null():
            while not done():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task


class _Null:
    async def __aenter__(self) -> None: ...
    async def __aexit__(self, *a: Any) -> None: ...


@pytest.mark.serial  # a storm on 2 s leases: a busy neighbour stalling a handler 2 s lapses one
@pytest.mark.slow
def test_storm_two_processes_one_killed(tmp_path: Path) -> None:
    """2,000 messages, 30% duplicate publishes (with publisher confirms), two processes, one
    SIGKILLed mid-batch and restarted, every 13th message nacked with requeue once: each effect
    once, none lost, nothing left in the queue or unacked."""
    n = 2000
    storm = Storm("rabbitmq", tmp_path, n)
    name = f"oncely-test-q-{storm.tag}"
    prefix = f"oncely-test-{storm.tag}"

    async def setup() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        ch = await connection.channel()
        await ch.declare_queue(name, durable=False, auto_delete=False)
        for mid in storm_ids(n):
            await publish(ch, name, b"{}", mid)
        await connection.close()

    async def count() -> int:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            return await ready_count(await connection.channel(), name)
        finally:
            await connection.close()

    async def teardown() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        await (await connection.channel()).queue_delete(name)
        await connection.close()

    asyncio.run(setup())
    config = {
        "amqp": AMQP_URL,
        "queue": name,
        "store": REDIS_URL,
        "store_options": {"prefix": prefix},
        "name": "storm",
        "fail_every": 13,
        "lease": 2.0,
    }
    fixture = storm_table(storm)
    next(fixture)
    try:
        result = run_storm(storm, config, lambda: asyncio.run(count()) == 0)
        assert asyncio.run(count()) == 0  # the stopped workers left nothing unacked
    finally:
        next(fixture, None)
        asyncio.run(teardown())
        drop_redis_prefix(prefix)
    check_storm(result, n)


async def test_redelivery_and_duplicate_publish_run_once(
    channel: AbstractChannel, queue_name: str, store: Store
) -> None:
    ran: list[str | None] = []

    async def handler(d: Delivery) -> None:
        ran.append(d.message_id)

    for mid in ["m-1", "m-2", "m-1", "m-3", "m-2"]:
        await publish(channel, queue_name, b"{}", mid)
    member = RabbitMQConsumer(
        IdempotentConsumer(handler, name="c", store=store), await channel.get_queue(queue_name)
    )
    await consume_until(member, lambda: sum(member.stats.values()) == 5)
    assert sorted(ran) == ["m-1", "m-2", "m-3"]
    assert member.stats["duplicates"] == 2
    assert await ready_count(channel, queue_name) == 0


async def test_failure_is_requeued_then_poison_dead_lettered(
    channel: AbstractChannel, queue_name: str, store: Store
) -> None:
    letters: list[str | None] = []
    attempts: list[int] = []

    async def broken(d: Delivery) -> None:
        attempts.append(1)
        raise ValueError("bad order")

    consumer = IdempotentConsumer(
        broken,
        name="c",
        store=store,
        max_attempts=3,
        retry_delay=0.05,
        on_dead_letter=lambda d, e: letters.append(d.message_id),
    )
    await publish(channel, queue_name, b"{}", "m-1")
    member = RabbitMQConsumer(consumer, await channel.get_queue(queue_name))
    await consume_until(member, lambda: member.stats["dead_lettered"] == 1)
    assert len(attempts) == 3 and letters == ["m-1"] and member.stats["retried"] == 2
    assert await ready_count(channel, queue_name) == 0


async def test_message_without_dedup_header_is_dead_lettered(
    channel: AbstractChannel, queue_name: str, store: Store
) -> None:
    await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue_name)
    ran: list[int] = []
    letters: list[BaseException] = []
    # aio-pika gives every message a random message_id unless told one, so the dedup id of
    # this consumer is a header the publisher did not set
    consumer = IdempotentConsumer(
        lambda d: ran.append(1),
        name="c",
        store=store,
        dedup_id="header:event-id",
        on_dead_letter=lambda d, e: letters.append(e),
    )
    member = RabbitMQConsumer(consumer, await channel.get_queue(queue_name))
    await consume_until(member, lambda: member.stats["dead_lettered"] == 1)
    assert ran == [] and "dedup id" in str(letters[0])
    assert await ready_count(channel, queue_name) == 0


async def test_store_down_requeues_and_loses_nothing(
    channel: AbstractChannel, queue_name: str
) -> None:
    from oncely.stores import open_store

    down = open_store("redis://127.0.0.1:1/0", socket_connect_timeout=0.3)
    ran: list[int] = []
    consumer = IdempotentConsumer(lambda d: ran.append(1), name="c", store=down, retry_delay=0.05)
    await publish(channel, queue_name, b"{}", "m-1")
    # its own connection: messages a cancelled consumer still had in its prefetch go back to
    # the queue when the channel closes
    connection = await aio_pika.connect(AMQP_URL)
    own = await connection.channel()
    member = RabbitMQConsumer(consumer, await own.get_queue(queue_name))
    await consume_until(member, lambda: member.stats["retried"] >= 2)
    await connection.close()
    for _ in range(40):  # the broker requeues once it has processed the close
        if await ready_count(channel, queue_name) == 1:
            break
        await asyncio.sleep(0.05)
    assert ran == [] and await ready_count(channel, queue_name) == 1
    await down.aclose()
    down.close()


def close_connection_named(name: str) -> int:
    """Close (broker side) the connections whose client named itself ``name``; only ours."""
    import subprocess

    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    closed = 0
    for line in out.splitlines():
        if f'"connection_name","{name}"' in line:
            pid = line.split("\t", 1)[0]
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "oncely test: dropped"],
                capture_output=True,
                timeout=60,
            )
            closed += 1
    return closed


@pytest.mark.slow
async def test_connection_dropped_mid_stream_resumes_without_loss(
    channel: AbstractChannel, queue_name: str, store: Store
) -> None:
    """The broker closes the consumer's connection while it works through 300 messages:
    connect_robust reconnects and consumes again, the unacked messages come back, and each is
    handled once; nothing is left in the queue."""
    ran: list[str | None] = []

    async def handler(d: Delivery) -> None:
        ran.append(d.message_id)
        await asyncio.sleep(0.01)

    for i in range(300):
        await publish(channel, queue_name, b"{}", f"m-{i}")
    cname = f"oncely-test-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(
        AMQP_URL, client_properties={"connection_name": cname}
    )
    own = await connection.channel()
    member = RabbitMQConsumer(
        IdempotentConsumer(handler, name="c", store=store),
        await own.get_queue(queue_name),
        prefetch=20,
    )
    stop = asyncio.Event()
    task = asyncio.ensure_future(member.run(stop))
    while len(ran) < 50:
        await asyncio.sleep(0.01)
    assert await asyncio.to_thread(close_connection_named, cname) == 1
    for _ in range(600):
        if len(set(ran)) == 300 and await ready_count(channel, queue_name) == 0:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    await connection.close()
    assert sorted(set(ran)) == sorted(f"m-{i}" for i in range(300))
    assert len(ran) == 300  # redeliveries after the drop were acked without running
    assert await ready_count(channel, queue_name) == 0


async def test_a_dedup_id_callable_that_raises_fails_that_message_only(
    channel: AbstractChannel, queue_name: str, store: Store
) -> None:
    """Red team 18 F5: a ``dedup_id`` callable raising KeyError escaped ``on_message`` ("Task
    exception was never retrieved"): the message stayed unacked forever, never dead-lettered.
    Now it is a failed attempt of that message (nacked, counted), dead-lettered after
    max_attempts and acked; the good message runs."""
    ran: list[str] = []
    letters: list[BaseException] = []
    consumer = IdempotentConsumer(
        lambda d: ran.append(d.json()["id"]),
        name=f"c-{uuid.uuid4().hex[:8]}",
        store=store,
        dedup_id=lambda d: d.json()["id"],
        max_attempts=2,
        retry_delay=0.05,
        on_dead_letter=lambda d, e: letters.append(e),
    )
    await publish(channel, queue_name, b'{"noid": 1}', "m-bad")
    await publish(channel, queue_name, b'{"id": "good"}', "m-good")
    member = RabbitMQConsumer(consumer, await channel.get_queue(queue_name))
    await consume_until(member, lambda: letters and ran)
    assert ran == ["good"]
    assert len(letters) == 1 and isinstance(letters[0], KeyError)
    assert member.stats == {"ran": 1, "duplicates": 0, "retried": 1, "dead_lettered": 1}
    assert await ready_count(channel, queue_name) == 0
