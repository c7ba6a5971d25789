"""Red-team round 3 on oncely.statemachine, oncely.sql and oncely.optimistic, on real servers.

Each test failed on the code before its fix (findings F06, F07, F11, F18 of redteam3; F12 is in
tests/test_optimistic_redis.py)."""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any

import pytest

from oncely.errors import ConfigurationError, DatabaseBusy
from oncely.messaging.outbox import Relay
from oncely.sql import retryable
from oncely.sql.connections import lock_timeout
from oncely.statemachine import Machine, Transition
from oncely.statemachine.barrier import Verdict, barrier, create_table
from oncely.statemachine.sql import SqlStateMachine, Table

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

ORDER = Machine(
    "order",
    ["pending", "paid", "cancelled"],
    "pending",
    [Transition("pay", "pending", "paid"), Transition("cancel", "pending", "cancelled")],
)


# -- F07: a row that must commit with the caller's writes is refused on autocommit -------------
def test_barrier_refuses_an_autocommit_connection_with_no_transaction(db: Db) -> None:
    """F07: the barrier row committed alone; a branch dying before its writes then answered
    DUPLICATE on the coordinator's retry and the writes never happened."""
    table = db.name("rt3_barrier")
    conn = db.autocommit()
    create_table(conn, table)
    with pytest.raises(ConfigurationError, match="autocommit"):
        barrier(conn, "g1", "alice", "try", table=table)
    assert db.run(f"SELECT COUNT(*) FROM {table}") == [(0,)]
    db.begin(conn)  # inside an explicit transaction it decides, and rolls back with it
    assert barrier(conn, "g1", "alice", "try", table=table) is Verdict.EXECUTE
    conn.rollback()
    db.begin(conn)
    assert barrier(conn, "g1", "alice", "try", table=table) is Verdict.EXECUTE
    conn.commit()
    assert db.run(f"SELECT COUNT(*) FROM {table}") == [(1,)]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql"])
def test_barrier_refuses_an_sqlalchemy_autocommit_connection(make_db: Any, dialect: str) -> None:
    """SQLAlchemy with isolation_level="AUTOCOMMIT": its begin() opens no database
    transaction (yet in_transaction() says True); the driver's state decides."""
    import sqlalchemy as sa

    db = make_db(dialect)
    table = db.name("rt3_sa_barrier")
    raw = db.connect()
    create_table(raw, table)
    raw.commit()
    engine = sa.create_engine(db.url(), isolation_level="AUTOCOMMIT")
    try:
        with (
            engine.connect() as conn,
            conn.begin(),
            pytest.raises(ConfigurationError, match=r"(?i)autocommit"),
        ):
            barrier(conn, "g1", "alice", "try", table=table)
        assert db.run(f"SELECT COUNT(*) FROM {table}") == [(0,)]
        with sa.create_engine(db.url()).connect() as conn, conn.begin():  # a real transaction
            assert barrier(conn, "g1", "alice", "try", table=table) is Verdict.EXECUTE
        assert db.run(f"SELECT COUNT(*) FROM {table}") == [(1,)]
    finally:
        engine.dispose()


# -- F11: SQLite's "database is locked" is typed and retryable ---------------------------------
def _orders(db: Db, **options: Any) -> tuple[SqlStateMachine, str]:
    table = db.name("rt3_orders")
    db.run(f"CREATE TABLE {table} (id INT PRIMARY KEY, status VARCHAR(20))")
    db.run(f"INSERT INTO {table} VALUES (1, 'pending')")
    sm = SqlStateMachine(
        ORDER, Table(table, "id", "status"), history_table=db.name("rt3_hist"), **options
    )
    conn = db.connect()
    sm.create_tables(conn)
    conn.commit()
    return sm, table


def test_sqlite_busy_is_retryable_and_raised_as_database_busy(make_db: Any) -> None:
    """F11: apply() let sqlite3.OperationalError('database is locked') through and
    oncely.sql.retryable() said False for it."""
    db = make_db("sqlite")
    sm, table = _orders(db)
    btable = db.name("rt3_b")
    setup = db.connect()
    create_table(setup, btable)
    setup.close()
    holder = db.connect()
    holder.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock
    holder.execute(f"UPDATE {table} SET status = status")
    busy_conn = sqlite3.connect(db.path, timeout=0.01)
    try:
        with pytest.raises(sqlite3.OperationalError) as raw:
            busy_conn.execute("BEGIN IMMEDIATE")
        assert retryable(raw.value) and lock_timeout(raw.value)
        with pytest.raises(DatabaseBusy) as info:  # apply owns its transaction: retried, then
            sm.apply(busy_conn, 1, "pay", key="k1")
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert retryable(info.value) and not busy_conn.in_transaction
        with pytest.raises(DatabaseBusy):  # in the caller's (deferred) transaction too
            barrier(busy_conn, "g", "b", "try", table=btable)
        busy_conn.rollback()
        holder.rollback()
        assert sm.apply(busy_conn, 1, "pay", key="k1").applied  # the retry succeeds
        busy_conn.commit()
    finally:
        busy_conn.close()
        holder.close()


def test_sqlite_apply_under_contention_retries_the_busy_ones(make_db: Any) -> None:
    """Threads with a short busy timeout: every transition lands once, no driver error."""
    db = make_db("sqlite")
    table = db.name("rt3_many")
    db.run(f"CREATE TABLE {table} (id INT PRIMARY KEY, status VARCHAR(20))")
    for i in range(40):
        db.run(f"INSERT INTO {table} VALUES ({i}, 'pending')")
    sm = SqlStateMachine(ORDER, Table(table, "id", "status"), history_table=db.name("rt3_h2"))
    conn = db.connect()
    sm.create_tables(conn)
    conn.commit()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        c = sqlite3.connect(db.path, timeout=0.005, check_same_thread=False)
        for i in range(40):
            tr = "pay" if (i + n) % 2 else "cancel"
            try:
                sm.apply(c, i, tr, key=f"{tr}-{i}")
            except Exception as exc:
                if type(exc).__name__ != "IllegalTransition":
                    errors.append(exc)
        c.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(e, DatabaseBusy) for e in errors), errors[:3]
    changed = db.run(f"SELECT COUNT(*) FROM {table} WHERE status != 'pending'")[0][0]
    assert changed == 40 - len(errors) or changed == 40


# -- F18: the state machine's outbox is an Outbox oncely's Relay publishes ---------------------
def _relay_url(db: Db) -> str:
    if db.dialect == "sqlite":
        return f"sqlite:///{db.path}"
    return db.url().replace("+psycopg", "").replace("+pymysql", "")


def test_statemachine_outbox_is_published_by_the_relay(db: Db) -> None:
    """F18: SqlStateMachine(outbox_table=...) wrote rows with none of the columns Relay needs."""
    sm, _table = _orders(db, outbox_table=db.name("rt3_outbox"))
    conn = db.connect()
    assert sm.apply(conn, 1, "pay", key="pay-1", data={"amount": 5}).applied
    assert sm.apply(conn, 1, "pay", key="pay-1", data={"amount": 5}).replayed  # no 2nd message
    sent: list[Any] = []
    relay = Relay(sm.outbox, _relay_url(db), publish=sent.append)
    try:
        assert relay.run_once() == 1
        assert relay.run_once() == 0
    finally:
        relay.close()
    [message] = sent
    [(hid,)] = db.run(f"SELECT id FROM {sm.history_table}")  # the history row's id
    assert (message.topic, message.message_id) == ("order.pay", f"order:1:pay:{hid}")
    assert json.loads(message.payload) == {
        "machine": "order",
        "entity_id": "1",
        "transition": "pay",
        "state": "paid",
        "key": "pay-1",
        "data": {"amount": 5},
    }


def test_statemachine_outbox_message_rolls_back_with_the_transition(db: Db) -> None:
    """A hook that raises rolls the transition back, and its message with it; a caller's own
    transaction commits the message with its writes."""

    def boom(call: Any) -> None:
        raise RuntimeError("hook failed")

    sm, table = _orders(db, outbox_table=db.name("rt3_outbox2"), hooks=[boom])
    conn = db.connect()
    with pytest.raises(RuntimeError):
        sm.apply(conn, 1, "pay")
    assert db.run(f"SELECT COUNT(*) FROM {sm.outbox_table}") == [(0,)]
    quiet = SqlStateMachine(
        ORDER, Table(table, "id", "status"), history_table=sm.history_table,
        outbox_table=sm.outbox_table,
    )  # fmt: skip
    assert quiet.apply(conn, 1, "cancel").applied
    conn.commit()
    ids = db.run(f"SELECT message_id FROM {sm.outbox_table}")
    [(hid,)] = db.run(f"SELECT id FROM {sm.history_table}")
    assert [bytes(i).decode() if not isinstance(i, str) else i for (i,) in ids] == [
        f"order:1:cancel:{hid}"
    ]


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_lock_wait_timeouts_are_typed_by_every_sql_mechanism(make_db: Any, dialect: str) -> None:
    """PostgreSQL 55P03 and MariaDB 1205 (a lock wait that ran out) reach the caller as
    DatabaseBusy from versioned_update and SqlStateMachine.apply, the driver's error kept as the
    cause (lock_timeout(), not retryable(): the typed error is the one to retry on)."""
    from oncely.sql import versioned_update

    db = make_db(dialect)
    sm, table = _orders(db)
    db.run(f"ALTER TABLE {table} ADD COLUMN version BIGINT NOT NULL DEFAULT 1")
    holder = db.connect()
    cur = holder.cursor()
    cur.execute(f"UPDATE {table} SET status = status WHERE id = 1")  # holds the row lock
    waiter = db.connect()
    wcur = waiter.cursor()
    if dialect == "postgresql":
        wcur.execute("SET lock_timeout = '200ms'")
    else:
        wcur.execute("SET SESSION innodb_lock_wait_timeout = 1")
    waiter.commit()
    try:
        with pytest.raises(DatabaseBusy) as info:
            versioned_update(waiter, table, 1, {"status": "paid"}, 1)
        assert lock_timeout(info.value.__cause__) and not retryable(info.value.__cause__)
        assert retryable(info.value)
        waiter.rollback()
        with pytest.raises(DatabaseBusy):
            sm.apply(waiter, 1, "pay")
        waiter.rollback()
    finally:
        holder.rollback()
    assert sm.apply(waiter, 1, "pay").applied


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_apply_refuses_sqlalchemy_autocommit_where_it_cannot_be_atomic(
    make_db: Any, dialect: str
) -> None:
    """With isolation_level="AUTOCOMMIT", the state change committed alone although the hook
    after it raised (SQLAlchemy's begin() opened no database transaction)."""
    import sqlalchemy as sa

    def boom(call: Any) -> None:
        raise RuntimeError("hook failed")

    db = make_db(dialect)
    sm, table = _orders(db, hooks=[boom])
    engine = sa.create_engine(db.url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn, pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
            sm.apply(conn, 1, "pay")
        assert db.run(f"SELECT status FROM {table} WHERE id = 1") == [("pending",)]
    finally:
        engine.dispose()
