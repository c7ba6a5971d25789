"""Red-team round 5, DOUBLE EFFECT: the APIs that open a transaction around user code and commit
it only if that code did not end it (``Inbox.receive``, the transactional consumer,
``oncely.sql.transaction``, state machine hooks) refuse an autocommit connection with no
transaction open, through one check (``SqlConnection.require_held``, the twin of
``require_transaction``), on real SQLite, PostgreSQL and MariaDB.

On such a connection the guard "the code ended the transaction" did not hold: after the code's
own ``rollback()`` (or ``commit()``) each later write committed at once, and again on every
redelivery (``['m3b', 'm3b']``); the transactional consumer committed an "after-rollback" row on
each of 4 attempts. Each test failed on the code before the fix."""

from __future__ import annotations

from typing import Any

import pytest

from oncely.errors import AutocommitConnection, ConfigurationError, TransactionLost
from oncely.messaging import Delivery, IdempotentConsumer, Inbox, Retry
from oncely.sql import Operation, create_tables, transaction
from oncely.statemachine import Machine, Transition
from oncely.statemachine.sql import HookCall, SqlStateMachine, Table

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]


def _effects(db: Db) -> str:
    table = db.name("rt5_fx")
    db.run(f"CREATE TABLE {table} (k VARCHAR(50) NOT NULL)")
    return table


def _write(db: Db, conn: Any, table: str, value: str) -> None:
    ph = "?" if db.dialect == "sqlite" else "%s"
    conn.cursor().execute(f"INSERT INTO {table} (k) VALUES ({ph})", (value,))


def _rows(db: Db, table: str) -> list[str]:
    return sorted(r[0] for r in db.run(f"SELECT k FROM {table}"))


def test_error_type() -> None:
    assert issubclass(AutocommitConnection, ConfigurationError)


@pytest.mark.parametrize("ends", ["rollback", "commit"])
def test_receive_refuses_an_autocommit_connection(db: Db, ends: str) -> None:
    """The body ends the transaction receive() began, then writes: on autocommit that write
    committed at once, and again on the redelivery."""
    inbox = Inbox(table=db.name("rt5_inbox"))
    effects = _effects(db)
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()
    conn = db.autocommit()
    for _ in range(2):  # a delivery, then its redelivery
        with (
            pytest.raises(AutocommitConnection, match="autocommit"),
            inbox.receive(conn, consumer="b", message_id="m3") as first,
        ):
            if first:
                _write(db, conn, effects, "m3a")
                getattr(conn, ends)()
                _write(db, conn, effects, "m3b")
    assert _rows(db, effects) == []
    assert db.run(f"SELECT count(*) FROM {inbox.table}") == [(0,)]


def test_receive_inside_the_callers_transaction_on_autocommit_still_works(db: Db) -> None:
    """With a transaction the caller opened, receive() is a savepoint in it and the caller
    commits: nothing to refuse."""
    inbox = Inbox(table=db.name("rt5_inbox"))
    effects = _effects(db)
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()
    conn = db.autocommit()
    seen = []
    for _ in range(2):
        db.begin(conn)
        with inbox.receive(conn, consumer="b", message_id="m1") as first:
            if first:
                _write(db, conn, effects, "m1")
        conn.commit()
        seen.append(first)
    assert seen == [True, False]
    assert _rows(db, effects) == ["m1"]


def test_receive_on_a_normal_connection_still_catches_the_rollback(db: Db) -> None:
    """The control: without autocommit the write after the rollback lands in a new implicit
    transaction, which receive() rolls back (TransactionLost), so nothing is applied twice."""
    inbox = Inbox(table=db.name("rt5_inbox"))
    effects = _effects(db)
    conn = db.connect()
    inbox.create_table(conn)
    conn.commit()
    for _ in range(2):
        with (
            pytest.raises(TransactionLost),
            inbox.receive(conn, consumer="b", message_id="m3") as first,
        ):
            assert first
            _write(db, conn, effects, "m3a")
            conn.rollback()
            _write(db, conn, effects, "m3b")
    assert _rows(db, effects) == []


async def test_areceive_refuses_an_async_autocommit_connection(db: Db) -> None:
    if db.dialect == "sqlite":
        pytest.skip("sqlite3 has no async driver")
    inbox = Inbox(table=db.name("rt5_inbox"))
    effects = _effects(db)
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()
    conn = await db.aconnect()
    try:
        if db.dialect == "postgresql":
            await conn.set_autocommit(True)
        else:
            await conn.autocommit(True)
        with pytest.raises(AutocommitConnection):
            async with inbox.areceive(conn, consumer="b", message_id="m1") as first:
                assert first
        assert _rows(db, effects) == []
        assert db.run(f"SELECT count(*) FROM {inbox.table}") == [(0,)]
    finally:
        await db.aclose()


def test_transactional_consumer_refuses_autocommit_connections(db: Db) -> None:
    """connect= returning an autocommit connection: the handler's write after its rollback
    committed on every attempt (4 over 4). Now every attempt is refused before the handler
    runs: a Retry naming the cause, nothing written."""
    inbox = Inbox(table=db.name("rt5_inbox"))
    effects = _effects(db)
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()
    calls = []

    def handler(delivery: Delivery, conn: Any) -> None:
        calls.append(1)
        _write(db, conn, effects, "before")
        conn.rollback()
        _write(db, conn, effects, "after-rollback")

    consumer = IdempotentConsumer(
        handler,
        name="rt5-txc",
        dedup_id="body:id",
        inbox=inbox,
        connect=lambda: db.autocommit(),
        max_attempts=3,
        retry_delay=0.01,
    )
    try:
        verdicts = [consumer.process(Delivery(b'{"id": "x-1"}')) for _ in range(4)]
    finally:
        consumer.close()
    assert _rows(db, effects) == []
    assert calls == []
    for verdict in verdicts:
        assert isinstance(verdict, Retry) and "autocommit" in verdict.reason


def test_sql_transaction_refuses_an_autocommit_connection(db: Db) -> None:
    keys = db.name("rt5_keys")
    effects = _effects(db)
    setup = db.connect()
    create_tables(setup, table=keys)
    setup.commit()
    conn = db.autocommit()
    for _ in range(2):
        with (
            pytest.raises(AutocommitConnection),
            transaction(conn, operation="rt5.op", key="k", scope="s", table=keys) as tx,
        ):
            if not tx.replayed:
                _write(db, conn, effects, "a")
                conn.rollback()
                _write(db, conn, effects, "b")
    assert _rows(db, effects) == []
    assert db.run(f"SELECT count(*) FROM {keys}") == [(0,)]


ORDER = Machine(
    "order",
    ["pending", "paid"],
    "pending",
    [Transition("pay", "pending", "paid")],
)


def _orders(db: Db) -> str:
    table = db.name("rt5_orders")
    db.run(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, state VARCHAR(20) NOT NULL)")
    db.run(f"INSERT INTO {table} VALUES (1, 'pending')")
    return table


def test_state_machine_hooks_refuse_an_autocommit_connection(db: Db) -> None:
    orders = _orders(db)
    effects = _effects(db)
    history = db.name("rt5_hist")

    def hook(call: HookCall) -> None:
        call.conn.rollback()
        _write(db, call.conn, effects, "after-rollback")

    sm = SqlStateMachine(ORDER, Table(orders), history_table=history, hooks=[hook])
    setup = db.connect()
    sm.create_tables(setup)
    setup.commit()
    conn = db.autocommit()
    for _ in range(2):
        with pytest.raises(AutocommitConnection):
            sm.apply(conn, 1, "pay", key="k1")
    assert _rows(db, effects) == []
    assert db.run(f"SELECT state FROM {orders}") == [("pending",)]
    # without hooks no user code runs inside: the call still works on autocommit, atomically
    plain = SqlStateMachine(ORDER, Table(orders), history_table=history)
    assert plain.apply(conn, 1, "pay", key="k2").applied
    assert db.run(f"SELECT state FROM {orders}") == [("paid",)]


def test_recovery_point_phases_refuse_an_autocommit_connection(db: Db) -> None:
    """A phase's code runs in a transaction oncely opens and commits with its recovery point;
    in autocommit its writes after its own rollback() committed at once, without the point,
    and ran again when the operation was retried."""
    keys = db.name("rt5_keys")
    effects = _effects(db)
    setup = db.connect()
    create_tables(setup, table=keys)
    setup.commit()
    op = Operation("rt5_op", table=keys)
    runs = []

    @op.phase("one")
    def one(ctx: Any) -> None:
        runs.append(1)
        _write(db, ctx.conn, effects, "a")
        ctx.conn.rollback()
        _write(db, ctx.conn, effects, "b")

    @op.phase("two")
    def two(ctx: Any) -> str:
        raise RuntimeError("crash before the operation finishes")

    conn = db.autocommit()
    for _ in range(2):
        with pytest.raises(AutocommitConnection):
            op.run(conn, key="k", scope="s", params={})
    assert runs == [] and _rows(db, effects) == []
