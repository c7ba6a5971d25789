"""A consumer process for the messaging storms (tests/test_messaging_*.py).

    python tests/messaging_workers.py BROKER CONFIG_JSON

Each handled message inserts one row into the test's PostgreSQL table (no unique constraint:
the test counts duplicates). Before the effect the worker writes ``S <id>`` to its log, and
``D <id>`` once the message is acked, so the test knows which ids were between effect and
completion when it killed the worker (the window only a transactional inbox closes). Messages
whose number is a multiple of ``fail_every`` fail on their first delivery (a forced
nack/requeue). SIGTERM stops the worker cleanly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from typing import Any

import psycopg

from oncely.messaging import Ack, Delivery, IdempotentConsumer, Verdict
from oncely.stores import open_store


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.log = open(config["log"], "a", buffering=1)  # noqa: SIM115 - one line per write
        self.failed: set[str] = set()
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def handler(self, delivery: Delivery) -> None:
        mid = delivery.headers.get("Event-Id") or delivery.message_id or ""
        number = int(mid.rsplit("-", 1)[1])
        every = self.config["fail_every"]
        if every and number % every == 0 and mid not in self.failed:
            first = delivery.attempt == 1 if delivery.attempt is not None else True
            if first:
                self.failed.add(mid)
                raise RuntimeError(f"forced failure of {mid}")
        self.log.write(f"S {mid}\n")
        assert self.conn is not None
        await self.conn.execute(
            f"INSERT INTO {self.config['table']} (msg_id, worker) VALUES (%s, %s)",
            (mid, self.config["member"]),
        )

    def done(self, delivery: Delivery, verdict: Verdict) -> None:
        if isinstance(verdict, Ack) and verdict.ran:
            self.log.write(f"D {delivery.message_id}\n")

    def consumer(self) -> IdempotentConsumer:
        store = open_store(self.config["store"], **self.config.get("store_options", {}))
        return IdempotentConsumer(
            self.handler,
            name=self.config["name"],
            store=store,
            dedup_id=self.config.get("dedup_id", "message_id"),
            lease=self.config.get("lease", 2.0),
            wait_timeout=self.config.get("wait_timeout", 5.0),
            retry_delay=0.2,
            max_retry_delay=1.0,
        )


async def run_redis(worker: Worker, stop: asyncio.Event) -> None:
    import redis.asyncio

    from oncely.messaging.redis_streams import RedisStreamConsumer

    cfg = worker.config
    client = redis.asyncio.Redis.from_url(cfg["redis"])

    class Logged(RedisStreamConsumer):
        async def handle(self, entries: Any, attempts: Any) -> Any:
            pairs = await super().handle(entries, attempts)
            for delivery, verdict in pairs:
                worker.done(delivery, verdict)
            return pairs

    stream = Logged(worker.consumer(), client, cfg["stream"], cfg["group"], cfg["member"], count=50)
    await stream.run(stop)
    await client.aclose()


async def run_rabbitmq(worker: Worker, stop: asyncio.Event) -> None:
    import aio_pika

    from oncely.messaging.rabbitmq import RabbitMQConsumer

    cfg = worker.config
    connection = await aio_pika.connect_robust(cfg["amqp"])
    channel = await connection.channel()
    queue = await channel.get_queue(cfg["queue"])

    class Logged(RabbitMQConsumer):
        async def on_message(self, message: Any) -> Any:
            from oncely.messaging.rabbitmq import delivery_of

            verdict = await super().on_message(message)
            worker.done(delivery_of(message), verdict)
            return verdict

    await Logged(worker.consumer(), queue, prefetch=50).run(stop)
    await connection.close()


async def run_nats(worker: Worker, stop: asyncio.Event) -> None:
    import nats

    from oncely.messaging.nats import JetStreamConsumer

    cfg = worker.config
    nc = await nats.connect(cfg["nats"])
    js = nc.jetstream()
    sub = await js.pull_subscribe(cfg["subject"], durable=cfg["durable"], stream=cfg["stream"])

    class Logged(JetStreamConsumer):
        async def handle(self, msgs: Any) -> Any:
            pairs = await super().handle(msgs)
            for delivery, verdict in pairs:
                worker.done(delivery, verdict)
            return pairs

    await Logged(worker.consumer(), sub, batch=50, fetch_timeout=0.5).run(stop)
    await nc.close()


RUNNERS = {"redis": run_redis, "rabbitmq": run_rabbitmq, "nats": run_nats}


def run_mqtt(config: dict[str, Any]) -> None:
    """An MQTT member of a shared subscription, persistent session under a stable id."""
    from oncely.messaging.mqtt import MQTTConsumer, connect

    worker = Worker(config)
    conn = psycopg.connect(config["postgres"], autocommit=True)
    every = config["fail_every"]
    failed: set[str] = set()

    def handler(delivery: Delivery) -> None:
        mid = delivery.message_id or ""
        number = int(mid.rsplit("-", 1)[1])
        if every and number % every == 0 and mid not in failed:
            failed.add(mid)
            raise RuntimeError(f"forced failure of {mid}")
        worker.log.write(f"S {mid}\n")
        conn.execute(
            f"INSERT INTO {config['table']} (msg_id, worker) VALUES (%s, %s)",
            (mid, config["member"]),
        )

    consumer = IdempotentConsumer(
        handler,
        name=config["name"],
        store=open_store(config["store"], **config.get("store_options", {})),
        dedup_id="header:message_id",
        lease=config.get("lease", 2.0),
        retry_delay=0.2,
        max_retry_delay=1.0,
    )

    class Logged(MQTTConsumer):
        def handle(self, message: Any) -> None:
            super().handle(message)
            from oncely.messaging.mqtt import delivery_of

            worker.log.write(f"D {delivery_of(message).message_id}\n")

    client = connect("127.0.0.1", 1883, f"{config['client_id']}-{config['member']}")
    member = Logged(consumer, client, config["topic"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    member.start()
    assert member.subscribed.wait(10)
    print("ready", flush=True)
    stop.wait()
    member.stop()


def run_celery(config: dict[str, Any]) -> None:
    """A Celery worker (threads pool, acks_late) in this process, on the RabbitMQ broker."""
    from celery import Celery
    from celery.signals import task_postrun

    from oncely.messaging.celery import IdempotentTask

    worker = Worker(config)
    conn = psycopg.connect(config["postgres"], autocommit=True)
    app = Celery("oncely_storm", broker=config["amqp"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue=config["queue"],
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    store = open_store(config["store"], **config.get("store_options", {}))
    every = config["fail_every"]

    @app.task(  # type: ignore[misc]
        base=IdempotentTask,
        name="oncely_storm.apply",
        bind=True,
        idempotency_store=store,
        idempotency_key=lambda mid: mid,
        idempotency_lease=config.get("lease", 2.0),
    )
    def apply(self: Any, mid: str) -> None:
        number = int(mid.rsplit("-", 1)[1])
        if every and number % every == 0 and self.request.retries == 0:
            raise RuntimeError(f"forced failure of {mid}")
        worker.log.write(f"S {mid}\n")
        conn.execute(
            f"INSERT INTO {config['table']} (msg_id, worker) VALUES (%s, %s)",
            (mid, config["member"]),
        )

    @task_postrun.connect  # type: ignore[misc]
    def logged(task: Any = None, args: Any = None, state: Any = None, **_: Any) -> None:
        if getattr(task, "name", None) == "oncely_storm.apply" and state == "SUCCESS":
            worker.log.write(f"D {args[0]}\n")

    print("ready", flush=True)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            "--concurrency=8",
            "-Q",
            config["queue"],
            "-l",
            "warning",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"{config['member']}@%h",
        ]
    )


async def main(broker: str, config: dict[str, Any]) -> None:
    worker = Worker(config)
    worker.conn = await psycopg.AsyncConnection.connect(config["postgres"], autocommit=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await RUNNERS[broker](worker, stop)
    await worker.conn.close()


if __name__ == "__main__":
    if sys.argv[1] == "celery":
        run_celery(json.loads(sys.argv[2]))
    elif sys.argv[1] == "mqtt":
        run_mqtt(json.loads(sys.argv[2]))
    else:
        asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
