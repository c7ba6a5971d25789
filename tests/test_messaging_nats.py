"""The idempotent consumer on NATS JetStream (nats-py), against the server on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerConfig

from messaging_storm import Storm, check_storm, run_storm, storm_ids, storm_table
from oncely.messaging import Delivery, IdempotentConsumer
from oncely.messaging.nats import JetStreamConsumer, publish
from oncely.stores import Store

from conftest import REDIS_URL, StoreFactory, drop_redis_prefix

NATS_URL = "nats://127.0.0.1:4222"


@pytest.fixture
async def js() -> AsyncIterator[Any]:
    nc = await nats.connect(NATS_URL)
    yield nc.jetstream()
    await nc.close()


@pytest.fixture
async def stream(js: Any) -> AsyncIterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:10]
    name, subject = f"ONCELY_TEST_{tag}", f"oncely.test.{tag}"
    await js.add_stream(name=name, subjects=[subject])
    yield name, subject
    await js.delete_stream(name)


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store("redis")[0]


async def pending(js: Any, name: str, durable: str) -> tuple[int, int]:
    info = await js.consumer_info(name, durable)
    return info.num_pending, info.num_ack_pending


async def run_until(member: JetStreamConsumer, done: Any, timeout: float = 15.0) -> None:
    stop = asyncio.Event()
    task = asyncio.ensure_future(member.run(stop))
    try:
        await asyncio.wait_for(_until(done), timeout)
    finally:
        stop.set()
        await task


async def _until(done: Any) -> None:
    while not done():
        await asyncio.sleep(0.05)


@pytest.mark.serial  # a storm on 2 s leases: a busy neighbour stalling a handler 2 s lapses one
@pytest.mark.slow
def test_storm_two_processes_one_killed(tmp_path: Path) -> None:
    """2,000 messages, 30% duplicate publishes (half dropped by the server's Nats-Msg-Id
    window, half published under a second header so only the claim catches them), two
    processes, one SIGKILLed mid-batch and restarted, every 13th message nak'ed once: each
    effect once, none lost, nothing pending or unacked."""
    n = 2000
    storm = Storm("nats", tmp_path, n)
    name, subject, durable = f"ONCELY_TEST_{storm.tag}", f"oncely.test.{storm.tag}", "storm"
    prefix = f"oncely-test-{storm.tag}"

    async def setup() -> None:
        nc = await nats.connect(NATS_URL)
        jsc = nc.jetstream()
        await jsc.add_stream(name=name, subjects=[subject])
        await jsc.add_consumer(name, ConsumerConfig(durable_name=durable, ack_wait=5.0))
        seen: set[str] = set()
        for mid in storm_ids(n):
            # a repeated id: every other one under a new Nats-Msg-Id (the server keeps it)
            msg_id = f"{mid}#{len(seen)}" if mid in seen and len(seen) % 2 else mid
            seen.add(mid)
            await jsc.publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id, "Event-Id": mid})
        await nc.close()

    async def drained() -> bool:
        nc = await nats.connect(NATS_URL)
        try:
            return await pending(nc.jetstream(), name, durable) == (0, 0)
        finally:
            await nc.close()

    async def teardown() -> None:
        nc = await nats.connect(NATS_URL)
        await nc.jetstream().delete_stream(name)
        await nc.close()

    asyncio.run(setup())
    config = {
        "nats": NATS_URL,
        "stream": name,
        "subject": subject,
        "durable": durable,
        "store": REDIS_URL,
        "store_options": {"prefix": prefix},
        "name": "storm",
        "dedup_id": "header:Event-Id",
        "fail_every": 13,
        "lease": 2.0,
    }
    fixture = storm_table(storm)
    next(fixture)
    try:
        result = run_storm(storm, config, lambda: asyncio.run(drained()))
    finally:
        next(fixture, None)
        asyncio.run(teardown())
        drop_redis_prefix(prefix)
    check_storm(result, n)


async def test_publish_sets_nats_msg_id_and_the_server_drops_duplicates(
    js: Any, stream: tuple[str, str]
) -> None:
    name, subject = stream
    assert await publish(js, subject, b"{}", "m-1") is True
    assert await publish(js, subject, b"{}", "m-1") is False
    assert (await js.stream_info(name)).state.messages == 1


async def test_redelivery_runs_once_and_long_handler_is_kept_in_progress(
    js: Any, stream: tuple[str, str], store: Store
) -> None:
    """ack_wait 2 s, a handler of 3.5 s: in_progress() keeps the message from being
    redelivered while it runs; a nak'ed redelivery of a completed message is acked without
    running."""
    name, subject = stream
    await js.add_consumer(name, ConsumerConfig(durable_name="d", ack_wait=2.0))
    sub = await js.pull_subscribe(subject, durable="d", stream=name)
    ran: list[str | None] = []

    async def slow(d: Delivery) -> None:
        ran.append(d.message_id)
        if d.message_id == "slow":
            await asyncio.sleep(3.5)

    member = JetStreamConsumer(IdempotentConsumer(slow, name="c", store=store, lease=2.0), sub)
    other = await js.pull_subscribe(subject, durable="d", stream=name)
    await publish(js, subject, b"{}", "slow")
    task = asyncio.ensure_future(member.handle(await sub.fetch(1, timeout=2)))
    redelivered = 0
    for _ in range(6):  # 3 s of fetching on the same durable while the handler runs
        with contextlib.suppress(nats.errors.TimeoutError):
            redelivered += len(await other.fetch(1, timeout=0.5))
    assert len(await task) == 1
    assert redelivered == 0  # in_progress() kept resetting the 2 s ack wait
    assert ran == ["slow"] and member.stats["ran"] == 1
    assert await pending(js, name, "d") == (0, 0)
    # the same message again (another Nats-Msg-Id, same event): acked as a duplicate
    await js.publish(subject, b"{}", headers={"Nats-Msg-Id": "slow"})  # dropped by the window
    await publish(js, subject, b"{}", "fast")
    await run_until(member, lambda: member.stats["ran"] == 2)
    assert ran == ["slow", "fast"]


async def test_poison_is_dead_lettered_after_num_delivered(
    js: Any, stream: tuple[str, str], store: Store
) -> None:
    name, subject = stream
    sub = await js.pull_subscribe(subject, durable="d", stream=name)
    letters: list[str | None] = []

    async def broken(d: Delivery) -> None:
        raise ValueError("bad")

    consumer = IdempotentConsumer(
        broken,
        name="c",
        store=store,
        max_attempts=3,
        retry_delay=0.05,
        on_dead_letter=lambda d, e: letters.append(d.message_id),
    )
    member = JetStreamConsumer(consumer, sub, fetch_timeout=0.2)
    await publish(js, subject, b"{}", "m-1")
    await run_until(member, lambda: letters)
    assert letters == ["m-1"] and member.stats["retried"] == 2
    assert await pending(js, name, "d") == (0, 0)


async def test_no_dedup_id_is_dead_lettered(js: Any, stream: tuple[str, str], store: Store) -> None:
    name, subject = stream
    sub = await js.pull_subscribe(subject, durable="d", stream=name)
    await js.publish(subject, b"no id")
    ran: list[int] = []
    member = JetStreamConsumer(
        IdempotentConsumer(
            lambda d: ran.append(1), name="c", store=store, dedup_id="header:Nats-Msg-Id"
        ),
        sub,
    )
    assert await member.step() == 1
    assert ran == [] and member.stats["dead_lettered"] == 1
    assert await pending(js, name, "d") == (0, 0)


async def test_store_down_naks_and_loses_nothing(js: Any, stream: tuple[str, str]) -> None:
    from oncely.stores import open_store

    name, subject = stream
    sub = await js.pull_subscribe(subject, durable="d", stream=name)
    down = open_store("redis://127.0.0.1:1/0", socket_connect_timeout=0.3)
    ran: list[int] = []
    member = JetStreamConsumer(
        IdempotentConsumer(lambda d: ran.append(1), name="c", store=down, retry_delay=5.0), sub
    )
    await publish(js, subject, b"{}", "m-1")
    assert await member.step() == 1
    assert ran == [] and member.stats["retried"] == 1
    assert await pending(js, name, "d") == (0, 1)  # nak'ed with a delay: still owed
    await down.aclose()
    down.close()


async def test_an_idle_consumer_fetches_nothing_without_errors(
    js: Any, stream: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py ends an empty fetch with its own TimeoutError or, at times, the builtin one
    (asyncio's, when the deadline runs out between its two pull requests; about 1 in 10 with
    a 20 ms wait here): both are "no messages", never an error (red-team F17)."""
    name, subject = stream
    sub = await js.pull_subscribe(subject, durable="idle", stream=name)
    consumer = IdempotentConsumer(lambda d: None, name="idle", store="memory://")
    member = JetStreamConsumer(consumer, sub, fetch_timeout=0.02)
    caplog.set_level("DEBUG", logger="oncely")
    for _ in range(150):
        assert await asyncio.wait_for(member.step(), 5) == 0
    noisy = [r for r in caplog.records if r.levelno >= 30 and r.name.startswith("oncely")]
    assert noisy == []  # an empty fetch is not worth a warning, let alone an error


async def test_a_dedup_id_callable_that_raises_fails_that_message_only(
    js: Any, stream: tuple[str, str], store: Store
) -> None:
    """Red team 18 F5: a ``dedup_id`` callable raising KeyError failed the whole fetched batch
    ("JetStream fetch failed (KeyError)"): the good message too was left unacked, back after
    ack_wait to fail again. Now only that message fails (nak, counted), it is dead-lettered
    after max_attempts; the good one runs and is acked."""
    name, subject = stream
    sub = await js.pull_subscribe(subject, durable="d", stream=name)
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
    await js.publish(subject, b'{"noid": 1}')
    await js.publish(subject, b'{"id": "good"}')
    member = JetStreamConsumer(consumer, sub, fetch_timeout=0.2)
    await run_until(member, lambda: letters and ran)
    assert ran == ["good"]
    assert len(letters) == 1 and isinstance(letters[0], KeyError)
    assert member.stats == {"ran": 1, "duplicates": 0, "retried": 1, "dead_lettered": 1}
    assert await pending(js, name, "d") == (0, 0)
