"""The idempotent consumer's transactional mode (``inbox=``, ``connect=``) on real SQLite,
PostgreSQL and MariaDB, sync and async, and the storms on Redis Streams and RabbitMQ with a
consumer SIGKILLed mid-batch: every effect exactly once, the kill window included."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from messaging_storm import (
    Storm,
    check_storm_exactly_once,
    inbox_table,
    run_storm,
    storm_ids,
    storm_table,
)
from oncely.errors import ConfigurationError, MessageRejected, TransactionLost
from oncely.messaging import Ack, DeadLetter, Delivery, IdempotentConsumer, Inbox, Retry
from oncely.messaging.inbox import connect

from conftest import MYSQL_URL, POSTGRES_URL, REDIS_URL

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

KINDS = ["sqlite", "postgres", "mysql"]


class Db:
    """One test's database: an inbox table and an effects table without a unique constraint
    (the test counts rows; nothing leans on the table for dedup)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.url = {
            "sqlite": f"sqlite:///{tmp_path}/tx.db",
            "postgres": POSTGRES_URL,
            "mysql": MYSQL_URL,
        }[kind]
        tag = uuid.uuid4().hex[:10]
        self.inbox = Inbox(f"txinbox_{tag}")
        self.effects = f"txeffects_{tag}"
        conn = connect(self.url)
        self.inbox.create_table(conn)
        self.run(conn, f"CREATE TABLE {self.effects} (message_id VARCHAR(255) NOT NULL)")
        conn.commit()
        conn.close()

    @property
    def mark(self) -> str:
        return "?" if self.kind == "sqlite" else "%s"

    @staticmethod
    def run(conn: Any, sql: str, params: Any = ()) -> list[Any]:
        cur = conn.cursor()
        try:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []
        finally:
            cur.close()

    def effect(self, conn: Any, mid: str) -> None:
        self.run(conn, f"INSERT INTO {self.effects} (message_id) VALUES ({self.mark})", (mid,))

    def counts(self) -> Counter[str]:
        conn = connect(self.url)
        try:
            return Counter(r[0] for r in self.run(conn, f"SELECT message_id FROM {self.effects}"))
        finally:
            conn.rollback()
            conn.close()

    def inbox_rows(self) -> int:
        conn = connect(self.url)
        try:
            return int(self.run(conn, f"SELECT count(*) FROM {self.inbox.table}")[0][0])
        finally:
            conn.rollback()
            conn.close()

    def drop(self) -> None:
        if self.kind == "sqlite":
            return
        conn = connect(self.url)
        for t in (self.inbox.table, self.effects):
            self.run(conn, f"DROP TABLE IF EXISTS {t}")
        conn.commit()
        conn.close()


@pytest.fixture(params=KINDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    d = Db(request.param, tmp_path)
    yield d
    d.drop()


@pytest.fixture(params=["postgres", "mysql"])
def server_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    d = Db(request.param, tmp_path)
    yield d
    d.drop()


def msg(mid: str | None, attempt: int | None = None) -> Delivery:
    return Delivery(body=b"{}", message_id=mid, attempt=attempt)


# -- sync ------------------------------------------------------------------------------------------
def test_effect_and_inbox_row_commit_together_then_redelivery_is_acked(db: Db) -> None:
    """First delivery: the handler writes through the consumer's connection and both rows
    commit; a redelivery is acked without running; a handler that raises leaves neither the
    effect nor the inbox row, so the retry runs it."""
    calls: list[str] = []
    fail_once = {"m2"}

    def handler(d: Delivery, conn: Any) -> None:
        calls.append(str(d.message_id))
        db.effect(conn, str(d.message_id))
        if d.message_id in fail_once:
            fail_once.discard(str(d.message_id))
            raise RuntimeError("boom after the write")

    consumer = IdempotentConsumer(handler, name="billing", inbox=db.inbox, connect=db.url)
    try:
        assert consumer.process(msg("m1")) == Ack(ran=True)
        assert consumer.process(msg("m1")) == Ack(ran=False)
        failed = consumer.process(msg("m2"))
        assert isinstance(failed, Retry) and "boom" in failed.reason
        assert db.counts() == Counter({"m1": 1}) and db.inbox_rows() == 1  # rolled back
        assert consumer.process(msg("m2")) == Ack(ran=True)
        assert consumer.process(msg("m2")) == Ack(ran=False)
    finally:
        consumer.close()
    assert calls == ["m1", "m2", "m2"]
    assert db.counts() == Counter({"m1": 1, "m2": 1}) and db.inbox_rows() == 2


def test_concurrent_deliveries_on_threads_apply_each_effect_once(db: Db) -> None:
    """8 threads deliver every one of 30 messages to one consumer (its connection pool), in
    different orders, released together: each effect exactly once, every delivery acked."""
    ids = [f"m{i}" for i in range(30)]
    consumer = IdempotentConsumer(
        lambda d, conn: db.effect(conn, str(d.message_id)),
        name="billing",
        inbox=db.inbox,
        connect=db.url,
        pool_size=8,
    )
    verdicts: list[Any] = []
    barrier = threading.Barrier(8)

    def deliver(n: int) -> None:
        mine = ids[n:] + ids[:n]
        barrier.wait()
        for mid in mine:
            while True:  # a busy database (SQLite's lock) hands the message back: redeliver
                v = consumer.process(msg(mid))
                if not isinstance(v, Retry):
                    break
            verdicts.append(v)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    consumer.close()
    assert len(verdicts) == 8 * 30 and all(isinstance(v, Ack) for v in verdicts)
    assert sum(v.ran for v in verdicts) == 30
    assert db.counts() == Counter({mid: 1 for mid in ids})


def test_poison_message_is_dead_lettered_and_acked_without_an_inbox_row(db: Db) -> None:
    dead: list[tuple[str | None, str]] = []

    def handler(d: Delivery, conn: Any) -> None:
        db.effect(conn, "never")
        raise ValueError("poison")

    consumer = IdempotentConsumer(
        handler,
        name="billing",
        inbox=db.inbox,
        connect=db.url,
        max_attempts=2,
        on_dead_letter=lambda d, e: dead.append((d.message_id, type(e).__name__)),
    )
    try:
        assert isinstance(consumer.process(msg("p", attempt=1)), Retry)
        assert isinstance(consumer.process(msg("p", attempt=2)), DeadLetter)
        no_id = consumer.process(msg(None))
        assert isinstance(no_id, DeadLetter) and isinstance(no_id.error, MessageRejected)
    finally:
        consumer.close()
    assert dead == [("p", "ValueError"), (None, "MessageRejected")]
    assert db.counts() == Counter() and db.inbox_rows() == 0


def test_a_failing_dead_letter_callback_does_not_rerun_the_transaction(db: Db) -> None:
    """The transactional mode: a poison message whose dead-letter callback raises is not run
    again on its redeliveries (red team 5: the count started over each cycle)."""
    runs: list[int] = []
    calls: list[int] = []

    def handler(d: Delivery, conn: Any) -> None:
        runs.append(1)
        raise ValueError("poison")

    def dead_letter(d: Delivery, e: BaseException) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("dead-letter queue down")

    consumer = IdempotentConsumer(
        handler, name="billing", inbox=db.inbox, connect=db.url, max_attempts=2,
        on_dead_letter=dead_letter, retry_delay=0.01,
    )  # fmt: skip
    try:
        verdicts = [consumer.process(msg("p")) for _ in range(4)]
    finally:
        consumer.close()
    assert [type(v).__name__ for v in verdicts] == ["Retry", "Retry", "Retry", "DeadLetter"]
    assert len(runs) == 2 and len(calls) == 3
    assert db.counts() == Counter() and db.inbox_rows() == 0


@pytest.mark.parametrize("how", ["rollback-then-write", "rollback", "commit-then-write"])
def test_a_handler_that_ends_the_transaction_itself_is_caught_before_the_commit(
    db: Db, how: str
) -> None:
    """A handler that calls conn.rollback() (an error path that "cleans up", SQLAlchemy's
    Session.rollback() after a caught IntegrityError) and goes on writing removed the inbox row
    from the consumer's transaction: committing would apply the later writes on every
    redelivery (red-team F04). The consumer checks the row before the commit, rolls back and
    counts a failed attempt (TransactionLost), dead-lettered after max_attempts: no write
    after the handler's own rollback is ever committed."""
    dead: list[BaseException] = []

    def handler(d: Delivery, conn: Any) -> None:
        mid = str(d.message_id)
        db.effect(conn, mid + "-before")
        if how == "commit-then-write":
            conn.commit()
        else:
            conn.rollback()
        if how != "rollback":
            db.effect(conn, mid + "-after")

    consumer = IdempotentConsumer(
        handler,
        name="billing",
        inbox=db.inbox,
        connect=db.url,
        max_attempts=3,
        on_dead_letter=lambda d, e: dead.append(e),
    )
    try:
        verdicts = [consumer.process(msg("m1", attempt=n)) for n in (1, 2, 3)]
    finally:
        consumer.close()
    if how == "commit-then-write":
        # the handler's commit took the inbox row with the first write, so the redelivery
        # finds it: never twice. PostgreSQL also sees that the row is not this transaction's
        # (xmin) and rolls the later write back; SQLite and MariaDB cannot tell.
        counts = db.counts()
        assert counts["m1-before"] == 1 and counts["m1-after"] <= 1 and db.inbox_rows() == 1
        assert Ack(ran=False) in verdicts
        if db.kind == "postgres":
            assert counts == Counter({"m1-before": 1}) and isinstance(verdicts[0], Retry)
        return
    assert [type(v) for v in verdicts] == [Retry, Retry, DeadLetter], verdicts
    assert "TransactionLost" in verdicts[0].reason  # type: ignore[union-attr]
    assert [type(e) for e in dead] == [TransactionLost]
    assert db.counts() == Counter() and db.inbox_rows() == 0


async def test_an_async_handler_that_rolls_back_is_caught_before_the_commit(
    server_db: Db,
) -> None:
    """The async face (psycopg AsyncConnection, aiomysql) checks the inbox row the same way."""
    db = server_db

    async def handler(d: Delivery, conn: Any) -> None:
        await conn.rollback()
        cur = await conn.cursor() if db.kind == "mysql" else conn.cursor()
        await cur.execute(f"INSERT INTO {db.effects} (message_id) VALUES (%s)", (d.message_id,))
        await cur.close() if db.kind == "postgres" else None

    consumer = IdempotentConsumer(
        handler, name="billing", inbox=db.inbox, connect=db.url, max_attempts=2
    )
    try:
        first = await consumer.aprocess(msg("m1", attempt=1))
        second = await consumer.aprocess(msg("m1", attempt=2))
    finally:
        await consumer.aclose()
    assert isinstance(first, Retry) and "TransactionLost" in first.reason
    assert isinstance(second, DeadLetter) and isinstance(second.error, TransactionLost)
    assert db.counts() == Counter() and db.inbox_rows() == 0


def test_database_down_is_retried_and_nothing_is_acked(tmp_path: Path) -> None:
    ran: list[Any] = []
    consumer = IdempotentConsumer(
        lambda d, conn: ran.append(d),
        name="billing",
        inbox=Inbox("nowhere"),
        connect="postgresql://oncely@127.0.0.1:1/test?connect_timeout=1",
    )
    verdict = consumer.process(msg("m1"))
    assert isinstance(verdict, Retry) and "connect" in verdict.reason and not ran
    # a missing inbox table: retried (never acked), and the message says what to do
    consumer = IdempotentConsumer(
        lambda d, conn: ran.append(d),
        name="billing",
        inbox=Inbox("no_such_inbox_table"),
        connect=f"sqlite:///{tmp_path}/empty.db",
    )
    verdict = consumer.process(msg("m1"))
    consumer.close()
    assert isinstance(verdict, Retry) and "create the table" in verdict.reason and not ran


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    def h(d: Delivery, conn: Any) -> None: ...

    url = f"sqlite:///{tmp_path}/x.db"
    with pytest.raises(ConfigurationError, match="exclude each other"):
        IdempotentConsumer(h, name="c", inbox=Inbox(), connect=url, store="memory://")
    with pytest.raises(ConfigurationError, match="both inbox"):
        IdempotentConsumer(h, name="c", inbox=Inbox())
    with pytest.raises(ConfigurationError, match="both inbox"):
        IdempotentConsumer(h, name="c", connect=url)
    with pytest.raises(ConfigurationError, match="URL or a callable"):
        IdempotentConsumer(h, name="c", inbox=Inbox(), connect=42)  # type: ignore[arg-type]
    consumer = IdempotentConsumer(h, name="c", inbox=Inbox(), connect=url)
    with pytest.raises(ConfigurationError, match="no record store"):
        _ = consumer.store


# -- async ----------------------------------------------------------------------------------------
async def test_async_handler_on_async_connections(server_db: Db) -> None:
    """An async handler gets an async connection from the URL (psycopg AsyncConnection,
    aiomysql); a batch with repeated ids runs each id once, concurrently."""
    db = server_db
    ran: list[str] = []

    async def handler(d: Delivery, conn: Any) -> None:
        ran.append(str(d.message_id))
        cur = await conn.cursor() if db.kind == "mysql" else conn.cursor()
        await cur.execute(f"INSERT INTO {db.effects} (message_id) VALUES (%s)", (d.message_id,))
        await cur.close() if db.kind == "postgres" else None
        await asyncio.sleep(0.01)

    consumer = IdempotentConsumer(handler, name="billing", inbox=db.inbox, connect=db.url)
    try:
        batch = [msg(f"a{i % 7}") for i in range(20)]
        verdicts = await consumer.aprocess_many(batch)
        assert all(isinstance(v, Ack) for v in verdicts)
        assert sum(v.ran for v in verdicts if isinstance(v, Ack)) == 7
        again = await consumer.aprocess_many(batch[:7])
        assert again == [Ack(ran=False)] * 7
    finally:
        await consumer.aclose()
    assert sorted(ran) == sorted(f"a{i}" for i in range(7))
    assert db.counts() == Counter({f"a{i}": 1 for i in range(7)})


async def test_sync_handler_on_the_async_face(db: Db) -> None:
    """The asyncio adapters call aprocess(): a sync handler runs its transaction on a worker
    thread, on a sync connection."""
    consumer = IdempotentConsumer(
        lambda d, conn: db.effect(conn, str(d.message_id)),
        name="billing",
        inbox=db.inbox,
        connect=db.url,
    )
    verdicts = await consumer.aprocess_many([msg("s1"), msg("s2"), msg("s1")])
    assert verdicts == [Ack(ran=True), Ack(ran=True), Ack(ran=False)]
    consumer.close()
    assert db.counts() == Counter({"s1": 1, "s2": 1})


async def test_async_sqlite_through_sqlalchemy(tmp_path: Path) -> None:
    """Async on SQLite: connect= a callable giving an SQLAlchemy AsyncConnection
    (sqlite+aiosqlite)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/a.db")
    inbox = Inbox("inbox")
    async with engine.begin() as conn:
        await inbox.acreate_table(conn)
        await conn.execute(text("CREATE TABLE effects (message_id TEXT NOT NULL)"))

    async def handler(d: Delivery, conn: Any) -> None:
        await conn.execute(text("INSERT INTO effects VALUES (:m)"), {"m": d.message_id})

    consumer = IdempotentConsumer(handler, name="b", inbox=inbox, connect=engine.connect)
    assert await consumer.aprocess(msg("q1")) == Ack(ran=True)
    assert await consumer.aprocess(msg("q1")) == Ack(ran=False)
    await consumer.aclose()
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT message_id FROM effects"))).all()
    await engine.dispose()
    assert [r[0] for r in rows] == ["q1"]


async def test_a_sync_connection_for_an_async_handler_is_refused(db: Db) -> None:
    async def handler(d: Delivery, conn: Any) -> None: ...

    consumer = IdempotentConsumer(
        handler, name="b", inbox=db.inbox, connect=lambda: connect(db.url)
    )
    verdict = await consumer.aprocess(msg("m"))
    await consumer.aclose()
    assert isinstance(verdict, Retry) and "async connection" in verdict.reason


# -- storms ---------------------------------------------------------------------------------------
@pytest.mark.serial  # a storm on 2 s leases: a busy neighbour stalling a handler 2 s lapses one
@pytest.mark.slow
def test_redis_streams_storm_exactly_once(tmp_path: Path) -> None:
    """2,000 messages, 30% duplicate publishes, two consumer processes in transactional mode
    (PostgreSQL), one SIGKILLed mid-batch and restarted, every 13th message failing once (left
    pending, reclaimed by XAUTOCLAIM): every effect exactly once in the test's table, the
    kill window included; none lost; nothing pending."""
    n = 2000
    storm = Storm("redis", tmp_path, n)
    stream, group = f"oncely-test-txstream-{storm.tag}", f"g-{storm.tag}"
    sync = redis.Redis.from_url(REDIS_URL)
    pipe = sync.pipeline(transaction=False)
    for mid in storm_ids(n):
        pipe.xadd(stream, {"id": mid, "body": b"{}"})
    pipe.execute()
    sync.xgroup_create(stream, group, id="0")
    config = {
        "redis": REDIS_URL,
        "stream": stream,
        "group": group,
        "inbox": f"txinbox_{storm.tag}",
        "name": "storm",
        "fail_every": 13,
        "lease": 2.0,
    }

    def drained() -> bool:
        info = sync.xinfo_groups(stream)[0]
        return int(info["pending"]) == 0 and int(info.get("lag") or 0) == 0

    tables, inbox = storm_table(storm), inbox_table(config["inbox"])
    next(tables)
    next(inbox)
    try:
        result = run_storm(storm, config, drained, timeout=60, kill_in_flight=True)
        assert drained()
    finally:
        next(tables, None)
        next(inbox, None)
        sync.delete(stream)
        sync.close()
    check_storm_exactly_once(result, n)


@pytest.mark.serial  # a storm on 2 s leases: a busy neighbour stalling a handler 2 s lapses one
@pytest.mark.slow
def test_rabbitmq_storm_exactly_once(tmp_path: Path) -> None:
    """The same storm on RabbitMQ (publisher confirms, every 13th message nacked with requeue
    once): every effect exactly once, none lost, nothing left in the queue or unacked."""
    import aio_pika

    from oncely.messaging.rabbitmq import publish

    n = 2000
    storm = Storm("rabbitmq", tmp_path, n)
    name = f"oncely-test-txq-{storm.tag}"

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
            ch = await connection.channel()
            queue = await ch.declare_queue(name, passive=True)
            return int(queue.declaration_result.message_count or 0)
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
        "inbox": f"txinbox_{storm.tag}",
        "name": "storm",
        "fail_every": 13,
        "lease": 2.0,
    }
    tables, inbox = storm_table(storm), inbox_table(config["inbox"])
    next(tables)
    next(inbox)
    try:
        result = run_storm(
            storm, config, lambda: asyncio.run(count()) == 0, timeout=60, kill_in_flight=True
        )
        assert asyncio.run(count()) == 0  # the stopped workers left nothing unacked
    finally:
        next(tables, None)
        next(inbox, None)
        asyncio.run(teardown())
    check_storm_exactly_once(result, n)


@pytest.mark.parametrize("where", ["before-commit", "before-ack"])
def test_a_consumer_killed_inside_the_window_applies_the_effect_once(db: Db, where: str) -> None:
    """The kill window, deterministically: a consumer process SIGKILLs itself after the
    handler's write and before the commit, or after the commit and before the XACK; a fresh
    process takes the entries over (XAUTOCLAIM): every effect exactly once. (With a record
    store instead of the inbox, ``before-ack``'s twin, after the effect and before the record
    completes, applies the message twice.)"""
    import subprocess
    import sys

    tag = uuid.uuid4().hex[:10]
    stream, group = f"oncely-test-txkill-{tag}", f"g-{tag}"
    client = redis.Redis.from_url(REDIS_URL)
    for i in range(20):
        client.xadd(stream, {"id": f"m-{i}", "body": b"{}"})
    client.xgroup_create(stream, group, id="0")
    worker = str(Path(__file__).with_name("transactional_kill_worker.py"))
    args = [sys.executable, worker, db.url, db.inbox.table, db.effects, stream, group]
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)}
    try:
        killed = subprocess.run([*args, "m-13", where], env=env, capture_output=True, timeout=60)
        assert killed.returncode == -9, killed.stderr.decode()
        assert db.counts()["m-13"] == (1 if where == "before-ack" else 0)
        rest = subprocess.run([*args, "", where], env=env, capture_output=True, timeout=60)
        assert rest.returncode == 0, rest.stderr.decode()
        lines = rest.stdout.decode().split("\n")
        if where == "before-ack":
            assert "m-13 False" in lines  # redelivered, found the row, acked without running
        else:
            assert "m-13 True" in lines  # the killed transaction left nothing: it ran again
        assert db.counts() == Counter({f"m-{i}": 1 for i in range(20)})
        assert int(client.xpending(stream, group)["pending"]) == 0
    finally:
        client.delete(stream)
        client.close()


@pytest.mark.serial  # a storm on 2 s leases: a busy neighbour stalling a handler 2 s lapses one
@pytest.mark.slow
def test_nats_jetstream_storm_exactly_once(tmp_path: Path) -> None:
    """The same storm on NATS JetStream (half the repeated publishes under a second
    Nats-Msg-Id, so the server keeps them and only the inbox catches them; every 13th message
    nak'ed once): every effect exactly once, none lost, nothing pending or unacked."""
    import nats
    from nats.js.api import ConsumerConfig

    from test_messaging_nats import NATS_URL, pending

    n = 2000
    storm = Storm("nats", tmp_path, n)
    name, subject = f"ONCELY_TXTEST_{storm.tag}", f"oncely.txtest.{storm.tag}"

    async def setup() -> None:
        nc = await nats.connect(NATS_URL)
        jsc = nc.jetstream()
        await jsc.add_stream(name=name, subjects=[subject])
        await jsc.add_consumer(name, ConsumerConfig(durable_name="storm", ack_wait=5.0))
        seen: set[str] = set()
        for mid in storm_ids(n):
            msg_id = f"{mid}#{len(seen)}" if mid in seen and len(seen) % 2 else mid
            seen.add(mid)
            await jsc.publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id, "Event-Id": mid})
        await nc.close()

    async def drained() -> bool:
        nc = await nats.connect(NATS_URL)
        try:
            return await pending(nc.jetstream(), name, "storm") == (0, 0)
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
        "durable": "storm",
        "inbox": f"txinbox_{storm.tag}",
        "name": "storm",
        "dedup_id": "header:Event-Id",
        "fail_every": 13,
        "lease": 2.0,
    }
    tables, inbox = storm_table(storm), inbox_table(config["inbox"])
    next(tables)
    next(inbox)
    try:
        result = run_storm(
            storm, config, lambda: asyncio.run(drained()), timeout=60, kill_in_flight=True
        )
    finally:
        next(tables, None)
        next(inbox, None)
        asyncio.run(teardown())
    check_storm_exactly_once(result, n)


def test_a_dedup_id_no_store_keeps_is_a_poison_message_not_an_outage(db: Db) -> None:
    # redteam4 (inbox_pg_nul.py): on PostgreSQL a dedup id with a NUL character was taken for
    # "store unavailable" and retried forever; on SQLite it was cut at the NUL (another
    # message's id). It is a poison message on every database: dead-lettered at once, with the
    # reason, and the handler never runs.
    ran: list[Any] = []
    dead: list[BaseException] = []

    def handler(d: Delivery, conn: Any) -> None:
        ran.append(d.json()["id"])
        db.effect(conn, "never")

    consumer = IdempotentConsumer(
        handler,
        name="billing",
        dedup_id="body:id",
        inbox=db.inbox,
        connect=db.url,
        max_attempts=3,
        on_dead_letter=lambda d, e: dead.append(e),
    )
    try:
        for body in (b'{"id": "evt\\u0000x"}', b'{"id": "evt\\ud800"}'):
            verdict = consumer.process(Delivery(body=body))
            assert isinstance(verdict, DeadLetter), verdict
            assert isinstance(verdict.error, MessageRejected)
            assert verdict.error.reason == "invalid-dedup-id"
        assert isinstance(consumer.process(Delivery(body=b'{"id": "evt"}')), Ack)
    finally:
        consumer.close()
    assert ran == ["evt"] and len(dead) == 2
    assert db.inbox_rows() == 1


# -- connect= URLs are checked when the consumer is built (outside retest 6) --------------------
def _typos(tmp_path: Path) -> list[tuple[str, str]]:
    return [
        (f"{POSTGRES_URL}?connect_timout=1", "connect_timout"),
        (f"sqlite:///{tmp_path / 'typo.db'}?busy_timeot=5", "busy_timeot"),
        (f"{MYSQL_URL}?chrset=utf8", "chrset"),
        (f"{POSTGRES_URL}?connect_timeout=abc", "connect_timeout"),
        ("oracle://scott@db/orcl", "oracle"),
    ]


@pytest.mark.parametrize("is_async", [False, True])
def test_a_typo_in_the_connect_url_is_refused_when_built(tmp_path: Path, is_async: bool) -> None:
    """``connect="postgresql://…?connect_timout=1"`` was accepted; every message was then
    Retry + ERROR forever. The URL is checked as a store URL is, when the consumer is built."""

    def handler(d: Delivery, conn: Any) -> None:
        return None

    async def ahandler(d: Delivery, conn: Any) -> None:
        return None

    for url, named in _typos(tmp_path):
        with pytest.raises(ConfigurationError, match=rf"connect=.*{named}"):
            IdempotentConsumer(
                ahandler if is_async else handler, name="typo", dedup_id="message_id",
                connect=url, inbox=Inbox(),
            )  # fmt: skip
    assert not (tmp_path / "typo.db").exists()


def test_an_async_handler_with_a_sqlite_connect_url_is_refused_when_built(tmp_path: Path) -> None:
    async def ahandler(d: Delivery, conn: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="async handler needs"):
        IdempotentConsumer(
            ahandler, name="a", dedup_id="message_id", connect=f"sqlite:///{tmp_path / 'a.db'}",
            inbox=Inbox(),
        )  # fmt: skip


def test_a_sqlite_connect_url_with_busy_timeout_works(tmp_path: Path) -> None:
    """The one option a sqlite connect= URL reads (it was refused at every message)."""
    url = f"sqlite:///{tmp_path / 'bt.db'}?busy_timeout=5"
    conn = connect(url)
    try:
        Inbox().create_table(conn)
        conn.commit()
    finally:
        conn.close()
    runs: list[bytes] = []
    consumer = IdempotentConsumer(
        lambda d, c: runs.append(d.body), name="bt", dedup_id="message_id", connect=url,
        inbox=Inbox(),
    )  # fmt: skip
    assert consumer.process(Delivery(b"x", message_id="m")) == Ack(ran=True)
    assert consumer.process(Delivery(b"x", message_id="m")) == Ack(ran=False)
    assert runs == [b"x"]


# -- every dedup id claim mode takes, inbox mode takes too (red team 17) ------------------------
def test_a_dedup_id_over_the_inbox_column_runs_once_in_digest_form(db: Db) -> None:
    """A 300-character dedup id and a 400-digit number: before, every delivery answered
    Retry(InvalidKey) forever, never dead-lettered, the handler never ran. Now each runs once,
    its redeliveries are acked as duplicates, and the inbox row holds the documented digest
    form (inbox_message_id); an id that fits is stored as itself."""
    import hashlib

    from oncely.messaging.inbox import DIGEST_PREFIX, inbox_message_id

    ran: list[str] = []
    dead: list[BaseException] = []

    def handler(d: Delivery, conn: Any) -> None:
        ran.append(str(d.json()["id"])[:8])
        db.effect(conn, "x")

    consumer = IdempotentConsumer(
        handler,
        name="billing",
        dedup_id="body:id",
        inbox=db.inbox,
        connect=db.url,
        max_attempts=2,
        on_dead_letter=lambda d, e: dead.append(e),
    )
    long_text, digits = "x" * 300, "9" * 400
    bodies = [b'{"id": "' + long_text.encode() + b'"}', b'{"id": ' + digits.encode() + b"}"]
    try:
        for body in bodies:
            verdicts = [consumer.process(Delivery(body=body, attempt=n)) for n in range(1, 5)]
            assert verdicts == [Ack(ran=True)] + [Ack(ran=False)] * 3, verdicts
    finally:
        consumer.close()
    assert ran == ["xxxxxxxx", "99999999"] and not dead
    conn = connect(db.url)
    try:
        stored = {r[0] for r in db.run(conn, f"SELECT message_id FROM {db.inbox.table}")}
    finally:
        conn.rollback()
        conn.close()
    stored = {s.decode() if isinstance(s, (bytes, bytearray)) else s for s in stored}
    expected = {DIGEST_PREFIX + hashlib.sha256(t.encode()).hexdigest() for t in (long_text, digits)}
    assert stored == expected
    assert inbox_message_id("m-1") == "m-1"
    assert inbox_message_id(DIGEST_PREFIX + "a").startswith(DIGEST_PREFIX)
    assert inbox_message_id(DIGEST_PREFIX + "a") != DIGEST_PREFIX + "a"


@pytest.mark.parametrize("error", ["InvalidKey", "InvalidPayload"])
def test_a_permanent_refusal_respects_max_attempts(error: str) -> None:
    """An error refusing the message itself (InvalidKey, InvalidPayload) before the handler ran
    is the same at every redelivery: a failed attempt, dead-lettered after max_attempts, not a
    Retry forever (the pure verdict, no I/O; any mode)."""
    from oncely import errors

    exc = getattr(errors, error)("this message's id cannot be kept")
    consumer = IdempotentConsumer(lambda d: None, name="billing", store="memory://", max_attempts=3)
    verdicts = [
        consumer.verdict_for(Delivery(body=b"{}", message_id="m", attempt=n), "m", exc, False)
        for n in (1, 2, 3)
    ]
    assert [type(v) for v in verdicts] == [Retry, Retry, DeadLetter], verdicts
    assert isinstance(verdicts[-1], DeadLetter) and verdicts[-1].error is exc


def test_a_dedup_id_callable_that_raises_is_a_failed_attempt_of_that_message(db: Db) -> None:
    """Red team 18 F5, the transactional mode: ``dedup_id=lambda d: d.json()["id"]`` raising
    KeyError escaped process() (and a whole aprocess_many batch). Now it is a failed attempt of
    that message only: retried, dead-lettered after max_attempts; its batch-mates commit."""
    dead: list[BaseException] = []

    def handler(d: Delivery, conn: Any) -> None:
        db.effect(conn, d.json()["id"])

    consumer = IdempotentConsumer(
        handler, name="billing", inbox=db.inbox, connect=db.url,
        dedup_id=lambda d: d.json()["id"], max_attempts=2, retry_delay=0.01,
        on_dead_letter=lambda d, e: dead.append(e),
    )  # fmt: skip
    try:
        bad = Delivery(b'{"noid": 1}', message_id="m-bad")
        assert isinstance(consumer.process(bad), Retry)
        assert consumer.process(Delivery(b'{"id": "good-1"}')) == Ack(ran=True)
        last = consumer.process(bad)
        assert isinstance(last, DeadLetter) and isinstance(last.error, KeyError)
        batch = [Delivery(b'{"noid": 2}', attempt=2), Delivery(b'{"id": "good-2"}', attempt=1)]
        verdicts = asyncio.run(consumer.aprocess_many(batch))
        assert isinstance(verdicts[0], DeadLetter) and isinstance(verdicts[0].error, KeyError)
        assert verdicts[1] == Ack(ran=True)
    finally:
        consumer.close()
    assert len(dead) == 2
    assert db.counts() == Counter({"good-1": 1, "good-2": 1})
