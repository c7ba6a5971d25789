"""oncely.messaging.inbox and .outbox on real SQLite, PostgreSQL and MariaDB, with a real
broker (Redis Streams) for the relay, and a relay killed with SIGKILL mid-batch."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from oncely.cli import app
from oncely.errors import (
    ConfigurationError,
    InvalidKey,
    InvalidPayload,
    StoreError,
    StoreUnavailable,
    TransactionFailed,
    TransactionLost,
    UnknownTable,
)
from oncely.messaging.inbox import Inbox, connect
from oncely.messaging.outbox import Outbox, OutboxMessage, Relay

from conftest import MYSQL_URL, POSTGRES_URL, REDIS_URL

KINDS = ["sqlite", "postgres", "mysql"]
SERVERS = ["postgres", "mysql"]
HERE = Path(__file__).resolve().parent


class Db:
    """One test's database: a URL, connections it opened, and tables it must drop."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.url = {
            "sqlite": f"sqlite:///{tmp_path}/inbox.db",
            "postgres": POSTGRES_URL,
            "mysql": MYSQL_URL,
        }[kind]
        self.tag = uuid.uuid4().hex[:10]
        self.inbox = Inbox(f"inbox_{self.tag}")
        self.outbox = Outbox(f"outbox_{self.tag}")
        self.effects = f"effects_{self.tag}"
        self.conns: list[Any] = []
        conn = self.connect()
        self.inbox.create_table(conn)
        self.outbox.create_table(conn)
        self.run(conn, f"CREATE TABLE {self.effects} (message_id VARCHAR(255) NOT NULL)")
        conn.commit()

    def connect(self) -> Any:
        conn = connect(self.url)
        self.conns.append(conn)
        return conn

    @staticmethod
    def run(conn: Any, sql: str, params: Any = ()) -> list[Any]:
        cur = conn.cursor()
        try:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []
        finally:
            cur.close()

    @property
    def mark(self) -> str:
        return "?" if self.kind == "sqlite" else "%s"

    def effect(self, conn: Any, message_id: str) -> None:
        """The handler's write: one row per application, no unique constraint to lean on."""
        self.run(
            conn, f"INSERT INTO {self.effects} (message_id) VALUES ({self.mark})", (message_id,)
        )

    def effect_counts(self) -> Counter[str]:
        conn = self.connect()
        rows = self.run(conn, f"SELECT message_id FROM {self.effects}")
        conn.rollback()
        return Counter(r[0] for r in rows)

    def drop(self) -> None:
        for c in self.conns:
            try:
                c.rollback()
                c.close()
            except Exception:
                pass
        if self.kind == "sqlite":
            return
        conn = connect(self.url)
        for t in (self.inbox.table, self.outbox.table, self.effects):
            self.run(conn, f"DROP TABLE IF EXISTS {t}")
        conn.commit()
        conn.close()


@pytest.fixture(params=KINDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    d = Db(request.param, tmp_path)
    yield d
    d.drop()


@pytest.fixture(params=SERVERS)
def server_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    d = Db(request.param, tmp_path)
    yield d
    d.drop()


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"oncely-test-outbox-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name)
    client.close()


# -- inbox ---------------------------------------------------------------------------------------
def test_accept_once_per_consumer_and_message(db: Db) -> None:
    conn = db.connect()
    assert db.inbox.accept(conn, "billing", "m1") is True
    assert db.inbox.accept(conn, "billing", "m1") is False
    assert db.inbox.accept(conn, "shipping", "m1") is True  # another consumer applies it too
    conn.commit()
    other = db.connect()
    assert db.inbox.accept(other, "billing", "m1") is False
    assert db.inbox.accept(other, "billing", 42) is True
    other.commit()


def test_receive_commits_the_effect_with_the_row_or_neither(db: Db) -> None:
    conn = db.connect()
    with pytest.raises(RuntimeError), db.inbox.receive(conn, "billing", "m1") as first:
        assert first
        db.effect(conn, "m1")
        raise RuntimeError("handler failed after its write")
    assert db.effect_counts()["m1"] == 0  # rolled back with the inbox row...
    with db.inbox.receive(conn, "billing", "m1") as first:
        assert first  # ...so the redelivery runs it
        db.effect(conn, "m1")
    with db.inbox.receive(conn, "billing", "m1") as first:
        assert not first  # the ack was lost: the effect is not applied again
    assert db.effect_counts()["m1"] == 1


def test_receive_refuses_to_commit_after_the_body_rolled_back_itself(db: Db) -> None:
    """A receive() block that owns its transaction and whose body calls conn.rollback() then
    writes: the inbox row is gone from the transaction, so the block raises TransactionLost
    and commits nothing, instead of committing the later write without the row (applied again
    on every redelivery; red-team F04, the same kind)."""
    conn = db.connect()
    for _ in range(2):
        with pytest.raises(TransactionLost), db.inbox.receive(conn, "billing", "m1") as first:
            assert first
            db.effect(conn, "m1-before")
            conn.rollback()
            db.effect(conn, "m1-after")
    assert db.effect_counts() == Counter()
    with db.inbox.receive(conn, "billing", "m1") as first:  # a proper redelivery runs it
        assert first
        db.effect(conn, "m1")
    assert db.effect_counts() == Counter({"m1": 1})


@pytest.fixture
def pg_db(tmp_path: Path) -> Iterator[Db]:
    d = Db("postgres", tmp_path)
    yield d
    d.drop()


def _caught_failure(db: Db, conn: Any, message_id: str) -> None:
    """A handler that writes, then meets a failing statement and catches its error (PostgreSQL
    has aborted the transaction: nothing after it runs, nothing before it can commit)."""
    db.effect(conn, message_id)
    with contextlib.suppress(Exception):
        db.run(conn, "SELECT 1 / 0")


@pytest.mark.parametrize("inside", [False, True], ids=["own-transaction", "callers-transaction"])
def test_a_body_that_caught_a_failed_statement_gets_transaction_failed(
    pg_db: Db, inside: bool
) -> None:
    """Before, leaving the block raised psycopg's raw ``InFailedSqlTransaction`` (25P02) from
    the RELEASE or the commit check; now TransactionFailed, the block rolled back, the message
    not recorded (its redelivery runs it), and inside the caller's transaction that
    transaction is usable again (rolled back to the block's savepoint)."""
    db = pg_db
    conn = db.connect()
    if inside:
        db.effect(conn, "outer")
    for _ in range(2):  # the message is not recorded: its redelivery meets the same
        with pytest.raises(TransactionFailed), db.inbox.receive(conn, "billing", "f1") as first:
            assert first
            _caught_failure(db, conn, "f1")
    db.effect(conn, "after")  # the connection's transaction is usable
    conn.commit()
    assert db.effect_counts() == Counter({"outer": 1, "after": 1} if inside else {"after": 1})
    with db.inbox.receive(conn, "billing", "f1") as first:
        assert first
        db.effect(conn, "f1")
    conn.commit()
    assert db.effect_counts()["f1"] == 1


async def test_async_receive_whose_body_caught_a_failed_statement(pg_db: Db) -> None:
    import psycopg

    db = pg_db
    conn = await psycopg.AsyncConnection.connect(POSTGRES_URL)
    try:
        for _ in range(2):
            with pytest.raises(TransactionFailed):
                async with db.inbox.areceive(conn, "billing", "f2") as first:
                    assert first
                    await conn.execute(
                        f"INSERT INTO {db.effects} (message_id) VALUES (%s)", ("f2",)
                    )
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute("SELECT 1 / 0")
        assert db.effect_counts()["f2"] == 0
        async with db.inbox.areceive(conn, "billing", "f2") as first:
            assert first
    finally:
        await conn.close()


def test_receive_inside_the_callers_transaction_is_a_savepoint(db: Db) -> None:
    conn = db.connect()
    db.effect(conn, "outer")  # the caller's transaction is open
    with db.inbox.receive(conn, "billing", "m1") as first:
        assert first
        db.effect(conn, "m1")
    assert db.effect_counts()["m1"] == 0  # not committed yet: the caller commits
    conn.commit()
    assert db.effect_counts() == Counter({"outer": 1, "m1": 1})


def test_a_consumer_killed_after_its_commit_before_its_ack(
    db: Db, stream: str, tmp_path: Path
) -> None:
    """A consumer process on a Redis Streams group SIGKILLs itself after committing message 17's
    effect with its inbox row, before XACK. The restarted consumer claims the pending entry,
    the inbox reports it applied, it is acked; every effect exactly once, nothing pending."""
    client = redis.Redis.from_url(REDIS_URL)
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    for i in range(40):
        client.xadd(stream, {"mid": f"m{i}"})
    worker = str(HERE / "inbox_consumer_worker.py")
    args = [db.url, db.inbox.table, db.effects, REDIS_URL, stream, "g"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run
    killed = run([sys.executable, worker, *args, "m17"], env=env, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert killed.stdout.decode().splitlines()[-1] == "m17 True"
    restarted = run([sys.executable, worker, *args, ""], env=env, capture_output=True, timeout=60)
    assert restarted.returncode == 0, restarted.stderr
    lines = restarted.stdout.decode().splitlines()
    assert lines[0] == "m17 False"  # redelivered, already applied: not applied again
    assert db.effect_counts() == Counter({f"m{i}": 1 for i in range(40)})
    assert client.xpending(stream, "g")["pending"] == 0
    client.close()


def test_concurrent_deliveries_apply_each_effect_once(db: Db) -> None:
    """8 consumers (threads, each its own connection) get every one of 40 messages, in
    different orders: each effect is applied exactly once."""
    ids = [f"m{i}" for i in range(40)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def consumer(n: int) -> None:
        try:
            conn = db.connect()
            mine = ids[:]
            random.Random(n).shuffle(mine)
            barrier.wait()
            for mid in mine:
                with db.inbox.receive(conn, "billing", mid) as first:
                    if first:
                        db.effect(conn, mid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consumer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert db.effect_counts() == Counter({mid: 1 for mid in ids})


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_second_delivery_waits_for_the_first_transaction(server_db: Db, outcome: str) -> None:
    """The inbox row is truly locked: a concurrent delivery blocks until the first commits
    (then it is a duplicate) or rolls back (then it runs)."""
    db = server_db
    first, second = db.connect(), db.connect()
    assert db.inbox.accept(first, "billing", "m1") is True
    answer: list[bool] = []
    waiter = threading.Thread(
        target=lambda: answer.append(db.inbox.accept(second, "billing", "m1"))
    )
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not answer  # still waiting on the first transaction
    first.commit() if outcome == "commit" else first.rollback()
    waiter.join(10)
    assert answer == [outcome == "rollback"]
    second.commit()


async def test_async_faces_on_async_connections(server_db: Db) -> None:
    db = server_db
    if db.kind == "postgres":
        import psycopg

        conn: Any = await psycopg.AsyncConnection.connect(POSTGRES_URL)
    else:
        import aiomysql

        conn = await aiomysql.connect(host="127.0.0.1", port=3306, user="root", db="test")
    try:
        async with db.inbox.areceive(conn, "billing", "a1") as first:
            assert first
        async with db.inbox.areceive(conn, "billing", "a1") as first:
            assert not first
        await db.outbox.aadd(conn, "t", b"x", message_id="o1")
        await conn.commit()
        assert await db.inbox.aaccept(conn, "billing", "a2") is True
        await conn.rollback()
        assert await db.inbox.aaccept(conn, "billing", "a2") is True
        await conn.commit()
        published: list[str] = []

        async def publish(message: OutboxMessage) -> None:
            published.append(message.message_id)

        relay = Relay(db.outbox, conn, publish=publish)
        assert await relay.arun() == 1 and published == ["o1"]
        assert await db.outbox.apurge(conn, 0) == 1
        assert await db.inbox.apurge(conn, 0) == 2
    finally:
        if db.kind == "postgres":
            await conn.close()
        else:
            conn.close()


def test_inbox_and_outbox_inside_an_sqlalchemy_session(db: Db) -> None:
    """The business write, the inbox row and the outbox message commit together in the
    caller's SQLAlchemy transaction, or not at all."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    url = db.url.replace("postgresql://", "postgresql+psycopg://").replace(
        "mysql://", "mysql+pymysql://"
    )
    engine = create_engine(url)
    insert = text(f"INSERT INTO {db.effects} (message_id) VALUES (:m)")
    try:
        with pytest.raises(RuntimeError), Session(engine) as session, session.begin():
            assert db.inbox.accept(session, "billing", "m1")
            session.execute(insert, {"m": "m1"})
            db.outbox.add(session, "billing.done", b"m1", message_id="done-m1")
            raise RuntimeError("the handler failed")
        for _ in range(2):  # the redelivery, then a duplicate
            with Session(engine) as session, session.begin():
                if db.inbox.accept(session, "billing", "m1"):
                    session.execute(insert, {"m": "m1"})
                    db.outbox.add(session, "billing.done", b"m1", message_id="done-m1")
    finally:
        engine.dispose()
    published: list[str] = []
    relay = Relay(db.outbox, db.url, publish=lambda m: published.append(m.message_id))
    assert relay.run() == 1
    relay.close()
    assert published == ["done-m1"]
    assert db.effect_counts() == Counter({"m1": 1})


def test_inbox_purge_deletes_old_rows_in_batches(db: Db) -> None:
    conn = db.connect()
    for i in range(10):
        db.inbox.accept(conn, "billing", f"old{i}")
    conn.commit()
    db.run(conn, f"UPDATE {db.inbox.table} SET received_at = received_at - 7200")
    for i in range(3):
        db.inbox.accept(conn, "billing", f"new{i}")
    conn.commit()
    assert db.inbox.purge(conn, older_than=3600, batch=3) == 10
    assert db.inbox.purge(conn, older_than=3600) == 0
    assert db.inbox.accept(conn, "billing", "new1") is False  # live rows kept
    assert db.inbox.accept(conn, "billing", "old1") is True
    conn.rollback()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_purge_never_waits_for_a_live_transaction_on_postgres(tmp_path: Path) -> None:
    db = Db("postgres", tmp_path)
    try:
        conn = db.connect()
        for i in range(5):
            db.inbox.accept(conn, "billing", f"old{i}")
        conn.commit()
        db.run(conn, f"UPDATE {db.inbox.table} SET received_at = received_at - 7200")
        conn.commit()
        holder = db.connect()  # a live transaction holds one old row
        db.run(holder, f"SELECT 1 FROM {db.inbox.table} WHERE message_id = 'old0' FOR UPDATE")
        started = time.monotonic()
        assert db.inbox.purge(db.connect(), older_than=3600) == 4
        assert time.monotonic() - started < 2
        holder.rollback()
        assert db.inbox.purge(conn, older_than=3600) == 1
    finally:
        db.drop()


def test_inbox_bad_input(db: Db) -> None:
    conn = db.connect()
    for consumer in ["", None, "x" * 201, 3]:
        with pytest.raises(InvalidKey, match="consumer"):
            db.inbox.accept(conn, consumer, "m1")  # type: ignore[arg-type]
    for mid in ["", None, "y" * 256, 1.5]:
        with pytest.raises(InvalidKey, match="message id"):
            db.inbox.accept(conn, "billing", mid)
    with pytest.raises(ConfigurationError, match="identifier"):
        Inbox("inbox; DROP TABLE x")
    with pytest.raises(UnknownTable, match="create"):
        Inbox(f"missing_{db.tag}").accept(conn, "billing", "m1")
    conn.rollback()
    db.inbox.accept(conn, "billing", "m1")
    with pytest.raises(ConfigurationError, match="no open transaction"):
        db.inbox.purge(conn, 0)
    conn.rollback()
    with pytest.raises(ConfigurationError, match="batch"):
        db.inbox.purge(conn, 0, batch=0)
    with pytest.raises(ConfigurationError, match="seconds"):
        db.inbox.purge(conn, -1)
    assert db.effect_counts() == Counter()


# -- outbox --------------------------------------------------------------------------------------
def test_outbox_publishes_only_committed_messages_once(db: Db) -> None:
    conn = db.connect()
    db.outbox.add(conn, "orders", b"rolled back", message_id="gone")
    conn.rollback()
    db.outbox.add(conn, "orders", "one", message_id="o1", headers={"k": "v"})
    db.outbox.add(conn, "orders", b"two", message_id="o2")
    db.outbox.add(conn, "orders", b"again", message_id="o1")  # a retried business transaction
    conn.commit()
    published: list[OutboxMessage] = []
    relay = Relay(db.outbox, db.url, publish=published.append, batch=1)
    assert relay.run() == 2
    assert relay.run_once() == 0
    relay.close()
    assert [(m.message_id, m.topic, m.payload, m.headers) for m in published] == [
        ("o1", "orders", b"one", {"k": "v"}),
        ("o2", "orders", b"two", {}),
    ]
    assert published[0].id < published[1].id


def test_a_retried_transaction_adds_its_message_once(server_db: Db) -> None:
    """Two transactions add the same stable message id at once: the second waits for the
    first and adds nothing; the message is published once."""
    db = server_db
    first, second = db.connect(), db.connect()
    db.outbox.add(first, "t", b"first", message_id="o1")
    done = threading.Event()

    def retry() -> None:
        db.outbox.add(second, "t", b"second", message_id="o1")
        second.commit()
        done.set()

    waiter = threading.Thread(target=retry)
    waiter.start()
    assert not done.wait(0.5)  # waits on the first transaction's row
    first.commit()
    waiter.join(10)
    assert done.is_set()
    published: list[bytes] = []
    relay = Relay(db.outbox, db.url, publish=lambda m: published.append(m.payload))
    assert relay.run() == 1
    relay.close()
    assert published == [b"first"]


def test_a_failed_publish_keeps_the_rest_for_the_next_batch(db: Db) -> None:
    conn = db.connect()
    for i in range(5):
        db.outbox.add(conn, "t", b"x", message_id=f"o{i}")
    conn.commit()
    published: list[str] = []

    def flaky(message: OutboxMessage) -> None:
        if message.message_id == "o2" and "o2" not in failed:
            failed.append("o2")
            raise ConnectionError("broker went away")
        published.append(message.message_id)

    failed: list[str] = []
    relay = Relay(db.outbox, db.url, publish=flaky, batch=10)
    with pytest.raises(ConnectionError):
        relay.run_once()
    assert relay.run() == 3
    relay.close()
    assert published == ["o0", "o1", "o2", "o3", "o4"]  # nothing lost, nothing twice


def test_two_relays_never_publish_a_message_twice(db: Db) -> None:
    conn = db.connect()
    for i in range(200):
        db.outbox.add(conn, "t", b"x", message_id=f"o{i}")
    conn.commit()
    published: list[str] = []
    lock = threading.Lock()

    def publish(message: OutboxMessage) -> None:
        with lock:
            published.append(message.message_id)

    relays = [Relay(db.outbox, db.url, publish=publish, batch=7) for _ in range(3)]
    threads = [threading.Thread(target=r.run) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in relays:
        r.close()
    assert Counter(published) == Counter({f"o{i}": 1 for i in range(200)})


@pytest.mark.serial  # relays in lockstep, a barrier with a timeout: run alone
@pytest.mark.parametrize(("relays", "rows"), [(2, 40), (3, 40), (3, 200)])
def test_relays_marking_at_the_same_moment_never_publish_twice(
    db: Db, relays: int, rows: int
) -> None:
    """No crash: ``relays`` relays publish their batches in lockstep (a barrier on every
    publish), so their "mark as sent" UPDATEs run at the same moment. On MariaDB under
    REPEATABLE READ the marks deadlocked (each one's scan read the rows the other claimed)
    and the loser rolled back a batch it had already published, which was then published
    again (rt11: 50 publishes for 40 messages; on a small table MariaDB scans the whole
    primary key for ``WHERE id IN (...)``). Each message must be published once."""
    batch = 10
    conn = db.connect()
    for i in range(rows):
        db.outbox.add(conn, "t", b"x", message_id=f"o{i}")
    conn.commit()
    published: list[str] = []
    lock = threading.Lock()
    # SQLite has one writer: the others wait for BEGIN IMMEDIATE, the barrier times out and
    # breaks, and the relays run one after the other from then on
    lockstep = threading.Barrier(relays, timeout=3)

    def publish(message: OutboxMessage) -> None:
        with lock:
            published.append(message.message_id)
        with contextlib.suppress(threading.BrokenBarrierError):
            lockstep.wait()

    def relay_loop(relay: Relay) -> None:
        relay.run(idle=0.05)

    workers = [Relay(db.outbox, db.url, publish=publish, batch=batch) for _ in range(relays)]
    threads = [threading.Thread(target=relay_loop, args=(r,)) for r in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in workers:
        r.close()
    counts = Counter(published)
    assert {m: n for m, n in counts.items() if n > 1} == {}
    assert counts == Counter({f"o{i}": 1 for i in range(rows)})


def test_relay_killed_mid_batch_loses_nothing_and_the_inbox_applies_once(
    db: Db, stream: str, tmp_path: Path
) -> None:
    """A relay process SIGKILLed after publishing part of a batch (before marking it sent) and
    restarted: every message reaches the broker, the killed batch's part twice with the same
    ids, and a consumer with an inbox applies each effect exactly once."""
    total, batch, hang_after = 60, 25, 37  # dies 12 messages into the second batch
    conn = db.connect()
    for i in range(total):
        db.outbox.add(conn, "orders", f"payload-{i}", message_id=f"order-{i}")
    conn.commit()
    marker = tmp_path / "hung"
    worker = str(HERE / "outbox_relay_worker.py")
    args = [db.url, db.outbox.table, REDIS_URL, stream, str(batch)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, worker, *args, str(hang_after), str(marker)], env=env)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert first.poll() is None, "the relay exited before reaching the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    second = subprocess.run([sys.executable, worker, *args, "0", str(marker)], env=env, timeout=60)
    assert second.returncode == 0

    client = redis.Redis.from_url(REDIS_URL)
    entries = client.xrange(stream)
    client.close()
    delivered = [e[1][b"mid"].decode() for e in entries]
    assert len(delivered) == total + (hang_after - batch)  # the killed part went out twice
    assert set(delivered) == {f"order-{i}" for i in range(total)}  # nothing lost
    unsent = db.run(conn, f"SELECT count(*) FROM {db.outbox.table} WHERE sent_at IS NULL")
    assert unsent[0][0] == 0
    conn.rollback()

    consumer = db.connect()  # the consumer applies every delivery through the inbox
    applied_naively = Counter(delivered)
    for mid in delivered:
        with db.inbox.receive(consumer, "billing", mid) as new:
            if new:
                db.effect(consumer, mid)
    assert max(applied_naively.values()) == 2  # without the inbox: applied twice
    assert db.effect_counts() == Counter({f"order-{i}": 1 for i in range(total)})


def _kill_backend(db: Db, conn: Any, application_name: str) -> None:
    """pg_terminate_backend on the one connection named ``application_name``."""
    killed = db.run(
        conn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (application_name,),
    )
    assert killed == [(True,)]


def test_a_relay_reconnects_after_its_connection_is_killed(tmp_path: Path) -> None:
    """pg_terminate_backend on the relay's own connection (found by application_name): the
    batch fails with StoreError, nothing is marked sent, the next batch reconnects and
    publishes; each message once. Killed again under the loop (run), the failed pass drops the
    connection and the next pass reconnects, instead of the loop ending with the error."""
    db = Db("postgres", tmp_path)
    name = f"oncely-relay-{db.tag}"
    try:
        conn = db.connect()
        db.outbox.add(conn, "t", b"x", message_id="o1")
        conn.commit()
        published: list[str] = []
        relay = Relay(
            db.outbox,
            f"{POSTGRES_URL}?application_name={name}",
            publish=lambda m: published.append(m.message_id),
        )
        assert relay.run_once() == 1
        _kill_backend(db, conn, name)
        db.outbox.add(conn, "t", b"x", message_id="o2")
        conn.commit()
        with pytest.raises(StoreError):
            relay.run_once()
        assert relay.run() == 1
        _kill_backend(db, conn, name)
        db.outbox.add(conn, "t", b"x", message_id="o3")
        conn.commit()
        assert relay.run(idle=0.05) == 1  # one failed pass, then a new connection
        relay.close()
        assert published == ["o1", "o2", "o3"]
    finally:
        db.drop()


def _kill_relay_connection(db: Db, raw: Any) -> None:
    """Kill the server side of driver connection ``raw`` (PyMySQL/aiomysql or psycopg)."""
    conn = db.connect()
    if db.kind == "mysql":
        db.run(conn, f"KILL CONNECTION {int(raw.thread_id())}")
    else:
        assert db.run(conn, "SELECT pg_terminate_backend(%s)", (raw.info.backend_pid,)) == [(True,)]
    conn.commit()


def test_a_mark_that_fails_after_the_publish_is_retried_not_republished(server_db: Db) -> None:
    """The relay's connection dies after a batch was published and before it was marked sent
    (killed from inside the publish: no crash of the relay). The relay opens a new connection
    and marks the published rows there, instead of leaving them to be published again; the
    next batches go on as usual. Each message is published once."""
    db = server_db
    conn = db.connect()
    for i in range(12):
        db.outbox.add(conn, "t", b"x", message_id=f"o{i}")
    conn.commit()
    published: list[str] = []

    def publish(message: OutboxMessage) -> None:
        published.append(message.message_id)
        if message.message_id == "o4":  # the last of the first batch
            _kill_relay_connection(db, relay._raw)

    relay = Relay(db.outbox, db.url, publish=publish, batch=5)
    assert relay.run_once() == 5
    assert relay.run(idle=0.05) == 7
    relay.close()
    assert published == [f"o{i}" for i in range(12)]
    left = db.run(conn, f"SELECT count(*) FROM {db.outbox.table} WHERE sent_at IS NULL")
    conn.commit()
    assert left == [(0,)]


async def test_an_async_relay_whose_mark_fails_after_the_publish_says_so(
    server_db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    """On a connection passed in (every async relay) the relay cannot open another one: when
    that connection dies between the publish and the mark, it raises a StoreError that says
    the published messages were not marked and will be published again (and logs it)."""
    db = server_db
    conn = db.connect()
    for i in range(3):
        db.outbox.add(conn, "t", b"x", message_id=f"o{i}")
    conn.commit()
    if db.kind == "mysql":
        import aiomysql

        raw: Any = await aiomysql.connect(host="127.0.0.1", user="root", db="test")
    else:
        import psycopg

        raw = await psycopg.AsyncConnection.connect(POSTGRES_URL)

    def publish(message: OutboxMessage) -> None:
        if message.message_id == "o2":
            _kill_relay_connection(db, raw)

    relay = Relay(db.outbox, raw, publish=publish)
    try:
        with (
            caplog.at_level("ERROR", logger="oncely"),
            pytest.raises(StoreError, match=r"3 message.*could not mark them sent"),
        ):
            await relay.arun_once()
        assert "published again" in caplog.text
    finally:
        with contextlib.suppress(Exception):
            await raw.close() if db.kind == "postgres" else raw.close()
    left = db.run(conn, f"SELECT count(*) FROM {db.outbox.table} WHERE sent_at IS NULL")
    conn.commit()
    assert left == [(3,)]


def test_a_relay_holds_one_connection_and_gives_up_after_bounded_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pass of a loop runs on the same connection (one connect for 10 passes); a
    database that stays down is tried ``reconnects + 1`` times, then the error is raised."""
    import oncely.messaging.outbox as outbox_module

    opened: list[str] = []
    real_connect = outbox_module.connect

    def counting(url: str, **options: Any) -> Any:
        opened.append(url)
        return real_connect(url, **options)

    monkeypatch.setattr(outbox_module, "connect", counting)
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    outbox = Outbox("relay_conn")
    conn = connect(url)
    outbox.create_table(conn)
    for i in range(10):
        outbox.add(conn, "t", b"x", message_id=f"o{i}")
    conn.commit()
    published: list[str] = []
    relay = Relay(outbox, url, publish=lambda m: published.append(m.message_id), batch=1)
    assert relay.run() == 10
    assert len(opened) == 1
    relay.close()
    down = Relay(Outbox(), "postgresql://postgres@127.0.0.1:1/test", publish=print)
    opened.clear()
    with pytest.raises(StoreUnavailable, match="run it again"):
        down.run(idle=0.01, reconnects=2)
    assert len(opened) == 3
    with pytest.raises(ConfigurationError, match="reconnects"):
        down.run(reconnects=-1)


def test_a_relay_with_the_database_down_says_so() -> None:
    relay = Relay(Outbox(), "postgresql://postgres@127.0.0.1:1/test", publish=print)
    with pytest.raises(StoreUnavailable, match="run it again"):
        relay.run_once()


def test_outbox_purge_deletes_only_old_sent_rows(db: Db) -> None:
    conn = db.connect()
    for i in range(6):
        db.outbox.add(conn, "t", b"x", message_id=f"o{i}")
    conn.commit()
    relay = Relay(db.outbox, db.url, publish=lambda m: None, batch=4)
    assert relay.run_once() == 4  # o0..o3 sent, o4 and o5 unsent
    relay.close()
    assert db.outbox.purge(conn, older_than=3600) == 0  # sent just now
    db.run(conn, f"UPDATE {db.outbox.table} SET created_at = created_at - 7200")
    db.run(conn, f"UPDATE {db.outbox.table} SET sent_at = sent_at - 7200 WHERE sent_at IS NOT NULL")
    conn.commit()
    assert db.outbox.purge(conn, older_than=3600, batch=3) == 4
    rows = db.run(conn, f"SELECT message_id FROM {db.outbox.table} ORDER BY id")
    ids = [r[0] if isinstance(r[0], str) else bytes(r[0]).decode() for r in rows]
    assert ids == ["o4", "o5"]  # unsent rows are never purged (MariaDB: VARBINARY, bytes)
    conn.rollback()


def test_outbox_bad_input(db: Db) -> None:
    conn = db.connect()
    with pytest.raises(InvalidPayload, match="bytes or str"):
        db.outbox.add(conn, "t", {"a": 1})  # type: ignore[arg-type]
    with pytest.raises(InvalidPayload, match="headers"):
        db.outbox.add(conn, "t", b"x", headers={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidPayload, match="topic"):
        db.outbox.add(conn, "", b"x")
    with pytest.raises(InvalidKey):
        db.outbox.add(conn, "t", b"x", message_id="")
    with pytest.raises(ConfigurationError, match="batch"):
        Relay(db.outbox, conn, publish=print, batch=0)
    with pytest.raises(ConfigurationError, match="callable"):
        Relay(db.outbox, conn, publish=None)  # type: ignore[arg-type]
    db.outbox.add(conn, "t", b"x", message_id="o1")
    with pytest.raises(ConfigurationError, match="no open transaction"):
        Relay(db.outbox, conn, publish=print).run_once()
    conn.commit()

    async def coroutine(message: OutboxMessage) -> None:
        return None

    relay = Relay(db.outbox, db.url, publish=coroutine)
    with pytest.raises(ConfigurationError, match="async faces"):
        relay.run_once()
    relay.close()
    rows = db.run(conn, f"SELECT sent_at FROM {db.outbox.table}")
    assert rows == [(None,)]  # nothing marked sent
    conn.rollback()
    with pytest.raises(ConfigurationError, match="sqlite:///"):
        Relay(db.outbox, "mongodb://x", publish=print)


# -- the CLI -------------------------------------------------------------------------------------
def test_cli_purges_inbox_and_outbox(db: Db) -> None:
    conn = db.connect()
    db.inbox.accept(conn, "billing", "m1")
    db.outbox.add(conn, "t", b"x", message_id="o1")
    conn.commit()
    Relay(db.outbox, conn, publish=lambda m: None).run()
    runner = CliRunner()
    result = runner.invoke(app, ["inbox", "purge", db.url, "--table", db.inbox.table])
    assert result.exit_code == 0 and "purged 0 inbox row(s)" in result.output
    result = runner.invoke(
        app, ["inbox", "purge", db.url, "--table", db.inbox.table, "--older-than", "0"]
    )
    assert result.exit_code == 0 and "purged 1 inbox row(s)" in result.output, result.output
    result = runner.invoke(
        app,
        [
            "outbox",
            "purge",
            db.url,
            "--table",
            db.outbox.table,
            "--older-than",
            "0s",
            "--batch",
            "5",
        ],
    )
    assert result.exit_code == 0 and "purged 1 sent outbox row(s)" in result.output
    result = runner.invoke(app, ["inbox", "purge", db.url, "--older-than", "soon"])
    assert result.exit_code != 0 and "duration" in result.output
    result = runner.invoke(app, ["inbox", "purge", db.url, "--table", f"missing_{db.tag}"])
    assert result.exit_code == 1 and "create" in result.output


# -- the guide's examples run ----------------------------------------------------------------------
def test_the_guides_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    monkeypatch.chdir(tmp_path)
    text = (HERE.parent / "docs" / "messaging-inbox.md").read_text()
    found = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(found) == 3
    for code in found:
        exec(compile(code, "messaging-inbox.md", "exec"), {"__name__": "docs_example"})


def test_ids_no_store_keeps_as_text_are_refused_before_anything_is_written(db: Db) -> None:
    # redteam4 (inbox_nul.py): SQLite cut "m\x00one" at the NUL and recorded "m", so
    # "m\x00two" and "m" were skipped as duplicates; PostgreSQL refused the text with a driver
    # error. The inbox and the outbox now refuse such ids (and consumer names) with InvalidKey.
    conn = db.connect()
    for mid in ["m\x00one", "m\ud800"]:
        with pytest.raises(InvalidKey, match="message id"):
            db.inbox.accept(conn, "billing", mid)
        with pytest.raises(InvalidKey, match="message id"), db.inbox.receive(conn, "billing", mid):
            raise AssertionError("the body must not run")
        with pytest.raises(InvalidKey, match="message id"):
            db.outbox.add(conn, "orders", b"x", message_id=mid)
    with pytest.raises(InvalidKey, match="consumer"):
        db.inbox.accept(conn, "bill\x00ing", "m")
    assert db.inbox.accept(conn, "billing", "m") is True  # "m" was never recorded
    conn.commit()
    assert db.run(conn, f"SELECT count(*) FROM {db.outbox.table}")[0][0] == 0
    conn.rollback()


def test_outbox_topic_and_payload_no_store_keeps_are_refused(db: Db) -> None:
    conn = db.connect()
    for topic in ("orders\x00x", "orders\ud800"):
        with pytest.raises(InvalidPayload, match="topic"):
            db.outbox.add(conn, topic, b"x", message_id="m-topic")
    with pytest.raises(InvalidPayload, match="UTF-8"):
        db.outbox.add(conn, "orders", "bad \ud800", message_id="m-payload")
    conn.commit()
    assert db.run(conn, f"SELECT count(*) FROM {db.outbox.table}")[0][0] == 0
    conn.rollback()


# -- a concurrent writer's refusal is DatabaseBusy (retryable), as for insert_once ---------------
def _wait_until_blocked(db: Db, *conns: Any) -> None:
    """Return once every connection in ``conns`` waits on a row lock (read from the server's
    own lock tables, not guessed with a sleep)."""
    watcher = db.connect()
    if db.kind == "postgres":
        ids = [c.info.backend_pid for c in conns]
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid = ANY(%s)"
        )
    else:
        ids = [c.thread_id() for c in conns]
        sql = (
            "SELECT count(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT' "
            "AND trx_mysql_thread_id IN %s"
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        (count,) = db.run(watcher, sql, (ids if db.kind == "postgres" else tuple(ids),))[0]
        watcher.rollback()
        if count == len(conns):
            return
        time.sleep(0.01)
    raise AssertionError(f"the connections never waited on a lock ({count} of {len(conns)})")


@pytest.mark.parametrize("face", ["accept", "receive"])
def test_postgres_repeatable_read_duplicate_is_database_busy(tmp_path: Path, face: str) -> None:
    """At REPEATABLE READ a duplicate delivery that waited for the first one's commit gets a
    serialization failure: raised as DatabaseBusy (retryable), the same type insert_once and
    the barrier raise, and running it again answers "already applied"."""
    from oncely.errors import DatabaseBusy
    from oncely.sql.connections import retryable

    db = Db("postgres", tmp_path)
    try:
        first, second = db.connect(), db.connect()
        for c in (first, second):
            db.run(c, "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            c.commit()
        assert db.inbox.accept(first, "billing", "m1") is True
        outcome: list[Any] = []

        def duplicate() -> None:
            try:
                if face == "accept":
                    outcome.append(db.inbox.accept(second, "billing", "m1"))
                else:
                    with db.inbox.receive(second, "billing", "m1") as answer:
                        outcome.append(answer)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=duplicate)
        waiter.start()
        _wait_until_blocked(db, second)
        first.commit()
        waiter.join(20)
        [err] = outcome
        assert isinstance(err, DatabaseBusy) and retryable(err), repr(err)
        second.rollback()
        assert db.inbox.accept(second, "billing", "m1") is False  # run again: a duplicate
        second.rollback()
    finally:
        db.drop()


@pytest.mark.parametrize("face", ["accept", "receive"])
def test_mariadb_first_delivery_rolled_back_waiters_get_database_busy(
    tmp_path: Path, face: str
) -> None:
    """MariaDB: three duplicate deliveries wait on the first, which rolls back; InnoDB's
    deadlock detector refuses some waiters (1213). Each refusal is DatabaseBusy (retryable),
    never a plain StoreError, and running the refused ones again applies the message once."""
    from oncely.errors import DatabaseBusy
    from oncely.sql.connections import retryable

    db = Db("mysql", tmp_path)
    try:
        holder = db.connect()
        waiters = [db.connect() for _ in range(3)]
        assert db.inbox.accept(holder, "billing", "m1") is True
        outcome: list[Any] = []

        def duplicate(conn: Any) -> None:
            try:
                if face == "accept":
                    outcome.append(db.inbox.accept(conn, "billing", "m1"))
                    conn.commit()
                else:
                    with db.inbox.receive(conn, "billing", "m1") as answer:
                        outcome.append(answer)
            except BaseException as exc:
                conn.rollback()
                outcome.append(exc)

        threads = [threading.Thread(target=duplicate, args=(c,)) for c in waiters]
        for t in threads:
            t.start()
        _wait_until_blocked(db, *waiters)
        holder.rollback()
        for t in threads:
            t.join(30)
        errors = [o for o in outcome if isinstance(o, BaseException)]
        assert len(outcome) == 3 and errors, outcome  # InnoDB refuses at least one waiter
        assert all(isinstance(e, DatabaseBusy) and retryable(e) for e in errors), errors
        answers = [o for o in outcome if isinstance(o, bool)]
        for conn in waiters[: len(errors)]:  # run the refused deliveries again
            answers.append(db.inbox.accept(conn, "billing", "m1"))
            conn.commit()
        assert answers.count(True) == 1, outcome
    finally:
        db.drop()
