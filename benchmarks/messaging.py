"""Benchmark: messages/s through the idempotent consumer against the bare consumer, per broker
and store, in one run.

    .venv/bin/python benchmarks/messaging.py [--n 5000] [--passes 3] [--write-docs]

For each broker (Redis Streams, RabbitMQ, NATS JetStream) it preloads ``n`` messages (unique
dedup ids), then drains them with the broker's adapter twice over: once through a *bare*
consumer (same adapter, same batches and acks, the handler called directly: no store) and once
through the :class:`~oncely.messaging.IdempotentConsumer` on each store (Redis, PostgreSQL).
The handler does nothing, so the numbers are the consumer's own cost. Passes alternate bare and
idempotent runs and each row is the median; compare the ratio within a run (the machine is a
shared 2-core box). Streams, queues, subjects and key prefixes are unique and deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from docs_section import write_section

from oncely.messaging import Ack, Delivery, IdempotentConsumer, Verdict
from oncely.stores import Store, open_store

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"


async def nothing(delivery: Delivery) -> None:
    return None


class RedisEffect:
    """A handler with a real effect: one ``HINCRBY`` on a hash per message (one round trip)."""

    def __init__(self) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(REDIS_URL)
        self.key = f"oncely-bench-effects-{uuid.uuid4().hex[:10]}"

    async def __call__(self, delivery: Delivery) -> None:
        await self.client.hincrby(self.key, delivery.message_id or "", 1)

    async def close(self) -> None:
        await self.client.delete(self.key)
        await self.client.aclose()


HANDLERS: dict[str, Callable[[], Any]] = {"no-op": lambda: nothing, "one Redis write": RedisEffect}


class Bare(IdempotentConsumer):
    """The baseline: the handler is called and the message acked, nothing else (a batch's
    handlers run concurrently, as the idempotent consumer runs them)."""

    async def aprocess(self, delivery: Delivery) -> Verdict:
        await self.handler(delivery)
        return Ack(ran=True)

    async def aprocess_many(self, deliveries: Iterable[Delivery]) -> list[Verdict]:
        return list(await asyncio.gather(*(self.aprocess(d) for d in deliveries)))


def make_store(kind: str, tag: str) -> Store:
    if kind == "redis":
        return open_store(REDIS_URL, prefix=f"oncely-bench-{tag}")
    return open_store(POSTGRES_URL, table=f"oncely_bench_{tag}", create_schema=True)


async def drop_store(kind: str, store: Store, tag: str) -> None:
    await store.aclose()
    if kind == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"oncely-bench-{tag}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
        await client.aclose()
    else:
        import psycopg

        async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as conn:
            await conn.execute(f"DROP TABLE IF EXISTS oncely_bench_{tag}")
    store.close()


# -- one drain per broker: preload n messages, time draining them --------------------------------
async def _stepped(member: Any, n: int) -> float:
    """Seconds until ``member.step()`` (a pull consumer's one batch: how many it settled) has
    settled ``n`` messages."""
    start = time.perf_counter()
    done = 0
    while done < n:
        done += await member.step()
    return time.perf_counter() - start


async def redis_streams(
    consumer: IdempotentConsumer, n: int, prefix: str = "oncely-bench-stream"
) -> float:
    """Seconds to drain ``n`` preloaded messages of a new stream ``<prefix>-<tag>`` (deleted
    after) through ``consumer``, 100 a read."""
    import redis.asyncio

    from oncely.messaging.redis_streams import RedisStreamConsumer

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    tag = uuid.uuid4().hex[:10]
    stream = f"{prefix}-{tag}"
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.xadd(stream, {"id": f"{tag}-{i}", "body": b"{}"})
        await pipe.execute()
        member = RedisStreamConsumer(consumer, client, stream, "g", "m", count=100, block=0.1)
        await member.ensure_group()
        member._next_reclaim = float("inf")  # no idle entries here: measure the read path
        return await _stepped(member, n)
    finally:
        await client.delete(stream)
        await client.aclose()


async def rabbitmq(consumer: IdempotentConsumer, n: int) -> float:
    import aio_pika

    from oncely.messaging.rabbitmq import RabbitMQConsumer, publish

    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    name = f"oncely-bench-q-{uuid.uuid4().hex[:10]}"
    try:
        queue = await channel.declare_queue(name, auto_delete=False)
        await asyncio.gather(*(publish(channel, name, b"{}", f"{name}-{i}") for i in range(n)))
        member = RabbitMQConsumer(consumer, queue, prefetch=100)
        stop = asyncio.Event()
        start = time.perf_counter()
        task = asyncio.ensure_future(member.run(stop))
        while sum(member.stats.values()) < n:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        stop.set()
        await task
        return elapsed
    finally:
        await channel.queue_delete(name)
        await connection.close()


async def nats_jetstream(consumer: IdempotentConsumer, n: int) -> float:
    import nats

    from oncely.messaging.nats import JetStreamConsumer

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    tag = uuid.uuid4().hex[:10]
    name, subject = f"ONCELY_BENCH_{tag}", f"oncely.bench.{tag}"
    try:
        await js.add_stream(name=name, subjects=[subject])
        futures = [
            await js.publish_async(subject, b"{}", headers={"Nats-Msg-Id": f"{tag}-{i}"})
            for i in range(n)
        ]
        await asyncio.gather(*futures)
        sub = await js.pull_subscribe(subject, durable="bench", stream=name)
        member = JetStreamConsumer(consumer, sub, batch=100, fetch_timeout=0.5)
        return await _stepped(member, n)
    finally:
        await js.delete_stream(name)
        await nc.close()


BROKERS: dict[str, Callable[[IdempotentConsumer, int], Awaitable[float]]] = {
    "Redis Streams": redis_streams,
    "RabbitMQ": rabbitmq,
    "NATS JetStream": nats_jetstream,
}


async def measure(broker: str, kind: str | None, n: int, handler_name: str) -> float:
    """Messages/s of one drain: bare (``kind`` None) or idempotent on the ``kind`` store."""
    drain = BROKERS[broker]
    handler = HANDLERS[handler_name]()
    try:
        if kind is None:
            return n / await drain(Bare(handler, name="bench", store="memory://"), n)
        tag = uuid.uuid4().hex[:10]
        store = make_store(kind, tag)
        try:
            consumer = IdempotentConsumer(handler, name="bench", store=store, lease=30)
            return n / await drain(consumer, n)
        finally:
            await drop_store(kind, store, tag)
    finally:
        if isinstance(handler, RedisEffect):
            await handler.close()


async def main(
    n: int, passes: int, brokers: list[str], stores: list[str], handlers: list[str]
) -> list[str]:
    rows = []
    for broker in brokers:
        for handler in handlers:
            bare: list[float] = []
            results: dict[str, list[float]] = {kind: [] for kind in stores}
            for _ in range(passes):  # interleave bare and idempotent passes
                bare.append(await measure(broker, None, n, handler))
                for kind in stores:
                    results[kind].append(await measure(broker, kind, n, handler))
            base = statistics.median(bare)
            rows.append(f"| {broker} | {handler} | bare (no store) | {base:,.0f} | 1.00 |")
            for kind in stores:
                rate = statistics.median(results[kind])
                rows.append(
                    f"| {broker} | {handler} | idempotent, {kind} store | {rate:,.0f} "
                    f"| {rate / base:.2f} |"
                )
            print("\n".join(rows[-1 - len(stores) :]), flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="messages per drain")
    parser.add_argument("--passes", type=int, default=3, help="interleaved passes (median)")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated")
    parser.add_argument("--stores", default="redis,postgres", help="comma-separated")
    parser.add_argument("--handlers", default=",".join(HANDLERS), help="comma-separated")
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    args = parser.parse_args()
    header = "| broker | handler | consumer | messages/s | ratio to bare |\n|---|---|---|---:|---:|"
    print(header)
    rows = asyncio.run(
        main(
            args.n,
            args.passes,
            args.brokers.split(","),
            args.stores.split(","),
            args.handlers.split(","),
        )
    )
    if args.write_docs:
        stamp = time.strftime("%Y-%m-%d", time.gmtime())
        command = (
            f".venv/bin/python benchmarks/messaging.py --n {args.n} --passes {args.passes} "
            "--write-docs"
        )
        write_section(
            "messaging",
            f"""## Idempotent consumers (`benchmarks/messaging.py`)

`{command}`, run {stamp} on the 2-core shared machine,
brokers and stores on loopback. Each broker's adapter drains {args.n:,} preloaded messages once
through a bare consumer (same adapter, batches, acks and handler concurrency; no store) and
once through the idempotent consumer per store, with two handlers: a no-op (the consumer's
own cost) and one Redis write per message (`HINCRBY`, a minimal real effect). Passes
interleave; each row is the median of {args.passes}. On Redis a batch of 100 is claimed with one
`EVAL` and completed with another (`oncely.messaging.batch`: the store's `claim.lua` and
`complete.lua` wrapped in a loop); RabbitMQ delivers one message at a time, so there each
message costs a claim and a completion. Compare the ratios within the table.

{header}
"""
            + "\n".join(rows),
        )
