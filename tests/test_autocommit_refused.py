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


def test_receive_refuses_autocommit_even_inside_the_callers_begin(db: Db) -> None:
    """Red team 6, DOUBLE EFFECT through the documented remedy: on an autocommit connection
    the caller's own BEGIN (``conn.begin()`` on PyMySQL) made receive() a savepoint, but the
    body's rollback() ended that transaction too, and its later write committed at once, once
    per redelivery (3 deliveries, 3 rows). Refused now, before the body runs."""
    inbox = Inbox(table=db.name("rt6_inbox"))
    effects = _effects(db)
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()
    conn = db.autocommit()
    for _ in range(3):
        db.begin(conn)
        with (
            pytest.raises(AutocommitConnection, match="BEGIN"),
            inbox.receive(conn, consumer="b", message_id="m1") as first,
        ):
            if first:
                _write(db, conn, effects, "before")
                conn.rollback()
                _write(db, conn, effects, "after-rollback")
        conn.rollback()
    assert _rows(db, effects) == []
    assert db.run(f"SELECT count(*) FROM {inbox.table}") == [(0,)]


def test_sql_transaction_refuses_autocommit_even_inside_the_callers_begin(db: Db) -> None:
    """The same through ``oncely.sql.transaction``: 3 attempts with one key, 3 rows."""
    keys = db.name("rt6_keys")
    effects = _effects(db)
    setup = db.connect()
    create_tables(setup, table=keys)
    setup.commit()
    conn = db.autocommit()
    for _ in range(3):
        db.begin(conn)
        with (
            pytest.raises(AutocommitConnection),
            transaction(conn, operation="rt6.op", key="k", scope="s", table=keys) as tx,
        ):
            if not tx.replayed:
                _write(db, conn, effects, "a")
                conn.rollback()
                _write(db, conn, effects, "b")
        conn.rollback()
    assert _rows(db, effects) == []
    assert db.run(f"SELECT count(*) FROM {keys}") == [(0,)]


def test_receive_inside_psycopg_transaction_on_autocommit_still_works(make_db: Any) -> None:
    """psycopg's ``with conn.transaction():`` refuses commit() and rollback() inside it, so
    the body cannot end it: receive() is a savepoint in it, as before."""
    db = make_db("postgresql")
    inbox = Inbox(table=db.name("rt6_inbox"))
    effects = _effects(db)
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()
    conn = db.autocommit()
    seen = []
    for _ in range(2):
        with conn.transaction(), inbox.receive(conn, consumer="b", message_id="m1") as first:
            if first:
                _write(db, conn, effects, "m1")
        seen.append(first)
    assert seen == [True, False]
    assert _rows(db, effects) == ["m1"]
    import psycopg

    with (
        pytest.raises(psycopg.ProgrammingError),
        conn.transaction(),
        inbox.receive(conn, consumer="b", message_id="m2"),
    ):
        _write(db, conn, effects, "m2")
        conn.rollback()
    assert _rows(db, effects) == ["m1"]


async def test_areceive_refuses_autocommit_inside_the_callers_begin(db: Db) -> None:
    if db.dialect == "sqlite":
        pytest.skip("sqlite3 has no async driver")
    inbox = Inbox(table=db.name("rt6_inbox"))
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()
    conn = await db.aautocommit(begin=True)
    try:
        with pytest.raises(AutocommitConnection):
            async with inbox.areceive(conn, consumer="b", message_id="m1") as first:
                assert first
        await conn.rollback()
        if db.dialect == "postgresql":  # psycopg's managed transaction is still taken
            async with (
                conn.transaction(),
                inbox.areceive(conn, consumer="b", message_id="m1") as first,
            ):
                assert first
            assert db.run(f"SELECT count(*) FROM {inbox.table}") == [(1,)]
        else:
            assert db.run(f"SELECT count(*) FROM {inbox.table}") == [(0,)]
    finally:
        await db.aclose()


def test_ending_the_callers_transaction_raises_transaction_lost(db: Db) -> None:
    """Red team 6 (LOW): inside a transaction the caller opened on a normal connection, a body
    that ended it got the driver's error from the savepoint's RELEASE (SQLite "no such
    savepoint", PostgreSQL InvalidSavepointSpecification, MySQL 1305); now TransactionLost,
    and the writes it made after the rollback are rolled back."""
    keys = db.name("rt6_keys")
    effects = _effects(db)
    conn = db.connect()
    create_tables(conn, table=keys)
    conn.commit()
    for ends in ("rollback", "commit"):
        _write(db, conn, effects, "callers")
        with (
            pytest.raises(TransactionLost, match="savepoint"),
            transaction(conn, operation="rt6.op", key="k", scope=ends, table=keys),
        ):
            _write(db, conn, effects, "a")
            getattr(conn, ends)()
            _write(db, conn, effects, "b")
        conn.commit()
    assert "b" not in _rows(db, effects)  # what the body's own commit() took stays
    assert db.run(f"SELECT count(*) FROM {keys} WHERE scope = 'rollback'") == [(0,)]


async def _awrite(conn: Any, table: str, value: str) -> None:
    cur = conn.cursor()
    if hasattr(cur, "__await__"):  # aiomysql
        cur = await cur
    await cur.execute(f"INSERT INTO {table} (k) VALUES (%s)", (value,))


async def test_ending_the_callers_transaction_raises_transaction_lost_async(db: Db) -> None:
    if db.dialect == "sqlite":
        pytest.skip("sqlite3 has no async driver")
    keys = db.name("rt6_keys")
    effects = _effects(db)
    setup = db.connect()
    create_tables(setup, table=keys)
    setup.commit()
    conn = await db.aconnect()
    try:
        if db.dialect == "mysql":
            await conn.begin()
        await _awrite(conn, effects, "callers")
        with pytest.raises(TransactionLost):
            async with transaction(conn, operation="rt6.op", key="k", scope="s", table=keys):
                await conn.rollback()
                await _awrite(conn, effects, "b")
        await conn.commit()
        assert _rows(db, effects) == []
    finally:
        await db.aclose()


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
    conn = await db.aautocommit()
    try:
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


@pytest.mark.parametrize("begin", [False, True], ids=["no-transaction", "callers-begin"])
def test_state_machine_hooks_refuse_an_autocommit_connection(db: Db, begin: bool) -> None:
    """A hook that rolls back and writes on: refused on autocommit, also inside a BEGIN of the
    caller's own (its later writes would commit at once, on every retry)."""
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
    for _ in range(3):
        if begin:
            db.begin(conn)
        with pytest.raises(AutocommitConnection):
            sm.apply(conn, 1, "pay", key="k1")
        if begin:
            conn.rollback()
    assert _rows(db, effects) == []
    assert db.run(f"SELECT state FROM {orders}") == [("pending",)]
    if begin:
        return
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


def test_saga_run_refuses_an_autocommit_connection_before_writing(db: Db) -> None:
    """Red team 6: Saga.run on an autocommit connection wrote the saga's row (committed at
    once), then the first step was refused and the saga was left 'compensating' (SagaStuck);
    a rerun with a good connection raised SagaFailed. Now refused before anything is written,
    and the rerun with a good connection completes."""
    from oncely.statemachine.saga import Saga, Step

    effects = _effects(db)
    sg = Saga(
        db.name("rt6saga"),
        [Step("take", lambda ctx: _write(db, ctx.conn, effects, "took"), lambda ctx: None)],
        table=db.name("rt6_saga"),
        barrier_table=db.name("rt6_sbar"),
    )
    setup = db.connect()
    sg.create_tables(setup)
    setup.commit()
    conn = db.autocommit()
    for call in (sg.run, sg.abort):
        with pytest.raises(AutocommitConnection):
            call(conn, "order-1", {"n": 1})
    assert db.run(f"SELECT count(*) FROM {sg.table}") == [(0,)]
    assert _rows(db, effects) == []
    assert sg.run(db.connect(), "order-1", {"n": 1}).state == "completed"
    assert _rows(db, effects) == ["took"]


async def test_saga_arun_refuses_an_async_autocommit_connection(db: Db) -> None:
    from oncely.statemachine.saga import Saga, Step

    if db.dialect == "sqlite":
        pytest.skip("sqlite3 has no async driver")
    sg = Saga(
        db.name("rt6saga"),
        [Step("take", lambda ctx: None, lambda ctx: None)],
        table=db.name("rt6_saga"),
        barrier_table=db.name("rt6_sbar"),
    )
    setup = db.connect()
    sg.create_tables(setup)
    setup.commit()
    conn = await db.aautocommit()
    try:
        with pytest.raises(AutocommitConnection):
            await sg.arun(conn, "order-1", {"n": 1})
        assert db.run(f"SELECT count(*) FROM {sg.table}") == [(0,)]
    finally:
        await db.aclose()
