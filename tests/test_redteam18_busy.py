"""Red team 18 F1, F4, F6 on real SQLite, PostgreSQL and MariaDB.

F1: an infrastructure refusal in which nothing was decided (DatabaseBusy, a driver's "database
is locked" / lock wait timeout, StoreUnavailable) is never a saga step's business failure: the
run (or abort) stops and raises it, the saga's row is left as it was, and the next run
continues. It used to compensate (SagaStuck, then SagaFailed for good) although no action ran.

F4: every statement oncely.sql runs goes through one executor (oncely.sql.connections.run /
arun), which types a concurrent writer's refusal as DatabaseBusy whichever path let it through:
Saga.run / abort on SQLite, Inbox / Outbox purge, barrier.purge, phases.reap, create_tables
used to raise the driver's raw error.

F6: tx.set_result(NaN / Infinity / nested -Infinity) of oncely.sql.transaction was stored and
replayed: it goes through oncely.codecs.stored_json, the rule of every JSON oncely stores.

Locks are held by another session (PostgreSQL LOCK TABLE, checked granted in pg_locks;
MariaDB LOCK TABLES, checked in information_schema.METADATA_LOCK_INFO or by the waiter's lock
wait timing out; SQLite BEGIN IMMEDIATE), and the waiter's lock wait is bounded by the
server's own setting (lock_timeout, lock_wait_timeout, sqlite3 timeout): no sleeps.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

import oncely.sql
from oncely.errors import ConfigurationError, DatabaseBusy, SagaFailed
from oncely.messaging.inbox import Inbox
from oncely.messaging.outbox import Outbox
from oncely.sql.phases import reap
from oncely.statemachine import Machine, Transition
from oncely.statemachine import barrier as barriers
from oncely.statemachine.saga import Saga, Step
from oncely.statemachine.sql import SqlStateMachine, Table

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]


def _waiter(db: Db) -> Any:
    """A connection whose lock waits run out fast (the server's own setting)."""
    if db.dialect == "sqlite":
        conn = sqlite3.connect(db.path, timeout=0.05, check_same_thread=False)
        db._opened.append(conn)
        return conn
    conn = db.connect()
    cur = conn.cursor()
    if db.dialect == "postgresql":
        cur.execute("SET lock_timeout = '200ms'")
    else:
        cur.execute("SET SESSION lock_wait_timeout = 1")
        cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
    conn.commit()
    return conn


def _short_statements(db: Db) -> Any:
    """A connection whose statements (not lock waits: those are long) run out fast."""
    conn = db.connect()
    cur = conn.cursor()
    if db.dialect == "postgresql":
        cur.execute("SET lock_timeout = '60s'")
        cur.execute("SET statement_timeout = '300ms'")
    else:
        cur.execute("SET SESSION lock_wait_timeout = 60")
        cur.execute("SET SESSION innodb_lock_wait_timeout = 60")
        cur.execute("SET SESSION max_statement_time = 0.3")
    conn.commit()
    return conn


@contextlib.contextmanager
def held(db: Db, table: str) -> Iterator[None]:
    """Another session holds ``table`` (SQLite: the whole file) until the block ends."""
    if db.dialect == "sqlite":
        holder = sqlite3.connect(db.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.rollback()
            holder.close()
        return
    holder = db.connect()
    cur = holder.cursor()
    if db.dialect == "postgresql":
        cur.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND granted "
            "AND mode = 'AccessExclusiveLock' AND pid = pg_backend_pid()",
            (table,),
        )
        assert cur.fetchone()[0] == 1  # the lock is held, by the server's own account
    else:
        cur.execute(f"LOCK TABLES {table} WRITE")
    try:
        yield
    finally:
        if db.dialect == "mysql":
            cur.execute("UNLOCK TABLES")
        holder.rollback()
        holder.close()


def saga_on(db: Db, name: str, steps: list[Step]) -> Saga:
    """A saga named ``name`` with its tables (``<name>_saga``, ``<name>_bar``) created on
    ``db`` (dropped with the fixture)."""
    saga = Saga(name, steps, table=db.name(f"{name}_saga"), barrier_table=db.name(f"{name}_bar"))
    db.tables.append(f"{saga.table}_history")
    setup = db.connect()
    saga.create_tables(setup)
    setup.commit()
    return saga


def _rows(db: Db, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(bytes(v).decode() if isinstance(v, (bytes, bytearray)) else v for v in r)
            for r in db.run(sql)]  # fmt: skip


# -- F1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("wait", ["lock_timeout", "statement_timeout"])
@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_a_locked_barrier_table_stops_the_saga_without_compensating(
    make_db: Any, dialect: str, wait: str
) -> None:
    """The barrier of step s1 waits for a lock that runs out (ended by ``lock_timeout``, or by
    ``statement_timeout`` / ``max_statement_time``: red team 19 G5): the run raises
    DatabaseBusy, no action and no compensation ran, the saga stays 'running'; once the lock is
    gone the next run completes it. (Old code: compensating -> SagaStuck, then SagaFailed for
    good.)"""
    db = make_db(dialect)
    ran: list[str] = []
    undone: list[str] = []
    saga = saga_on(
        db,
        "rt18",
        [
            Step("s1", lambda ctx: ran.append("s1"), lambda ctx: undone.append("s1"), attempts=1),
            Step("s2", lambda ctx: ran.append("s2"), lambda ctx: undone.append("s2"), attempts=1),
        ],
    )
    conn = _waiter(db) if wait == "lock_timeout" else _short_statements(db)
    with held(db, saga.barrier_table):
        with pytest.raises(DatabaseBusy):
            saga.run(conn, "id1", {"a": 1})
        conn.rollback()
    assert ran == [] and undone == []
    assert _rows(db, f"SELECT state FROM {saga.table}") == [("running",)]
    assert saga.run(conn, "id1", {"a": 1}).state == "completed"
    assert ran == ["s1", "s2"] and undone == []


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_a_locked_barrier_table_stops_an_abort_which_resumes(make_db: Any, dialect: str) -> None:
    """The compensations' barrier waits for a lock that runs out: abort raises DatabaseBusy
    (not SagaStuck: no compensation failed), the saga stays 'compensating'; the next abort
    finishes it."""
    db = make_db(dialect)
    saga = saga_on(
        db,
        "rt18a",
        [Step("s1", lambda ctx: None, lambda ctx: None, attempts=1)],
    )
    conn = _waiter(db)
    with held(db, saga.barrier_table):
        with pytest.raises(DatabaseBusy):
            saga.abort(conn, "id1")
        conn.rollback()
    assert _rows(db, f"SELECT state FROM {saga.table}") == [("compensating",)]
    assert saga.abort(conn, "id1").state == "compensated"


def test_a_step_refused_by_a_locked_database_is_not_its_failure(db: Db) -> None:
    """Step s2's own statement (on another database, held by another session) is refused:
    sqlite3 "database is locked" / lock wait timeout. The saga stops with DatabaseBusy, s1
    is not compensated, the saga stays 'running'; the next run skips s1 and completes. (Old
    code: s1 compensated, SagaFailed: a new saga id was needed.)"""
    other = db.external() if db.dialect == "sqlite" else db
    shelf = other.name("rt18_shelf")
    other.run(f"CREATE TABLE {shelf} (id INT PRIMARY KEY, n INT)")
    other.run(f"INSERT INTO {shelf} VALUES (1, 0)")
    side = _waiter(other)
    ran: list[str] = []
    undone: list[str] = []

    def s2(ctx: Any) -> None:
        cur = side.cursor()
        try:
            cur.execute(f"UPDATE {shelf} SET n = n + 1 WHERE id = 1")
            side.commit()
        except BaseException:
            side.rollback()
            raise
        ran.append("s2")

    saga = saga_on(
        db,
        "rt18s",
        [
            Step("s1", lambda ctx: ran.append("s1"), lambda ctx: undone.append("s1")),
            Step("s2", s2, lambda ctx: undone.append("s2"), attempts=2, backoff=0),
        ],
    )
    conn = db.connect()
    with held(other, shelf):
        with pytest.raises(DatabaseBusy) as info:
            saga.run(conn, "id1", {"a": 1})
        assert not isinstance(info.value, SagaFailed)
    assert ran == ["s1"] and undone == []
    assert _rows(db, f"SELECT state FROM {saga.table}") == [("running",)]
    assert saga.run(conn, "id1").state == "completed"
    assert ran == ["s1", "s2"] and undone == []
    assert other.run(f"SELECT n FROM {shelf}") == [(1,)]


def test_a_business_error_raised_while_handling_a_busy_one_is_still_the_steps_failure(
    make_db: Any,
) -> None:
    """undecided() reads the driver's (or oncely's) own error only: a step that catches the
    database's refusal and raises its own error decided something (the step failed), so the
    saga compensates as before."""
    db = make_db("sqlite")
    other = db.external()
    shelf = other.name("rt18_shelf2")
    other.run(f"CREATE TABLE {shelf} (id INT PRIMARY KEY, n INT)")
    side = _waiter(other)
    undone: list[str] = []

    def s2(ctx: Any) -> None:
        try:
            side.execute(f"INSERT INTO {shelf} VALUES (1, 1)")
        except sqlite3.OperationalError as exc:
            side.rollback()
            raise ValueError("no stock today") from exc

    saga = saga_on(
        db,
        "rt18b",
        [
            Step("s1", lambda ctx: None, lambda ctx: undone.append("s1")),
            Step("s2", s2, attempts=1),
        ],
    )
    conn = db.connect()
    with held(other, shelf), pytest.raises(SagaFailed) as info:
        saga.run(conn, "id1")
    assert info.value.step == "s2" and undone == ["s1"]


# -- F4 ----------------------------------------------------------------------------------------
def test_sqlite_busy_is_database_busy_on_every_path(db: Db) -> None:
    """Another writer holds the SQLite file (BEGIN IMMEDIATE): every oncely.sql call that
    needs the write lock raises DatabaseBusy (the driver's error its cause), not
    sqlite3.OperationalError. PostgreSQL / MariaDB: the purges and reap under a table lock."""
    setup = db.connect()
    bar = db.name("rt18f4_bar")
    keys = db.name("rt18f4_keys")
    ib = Inbox(table=db.name("rt18f4_ib"))
    ob = Outbox(table=db.name("rt18f4_ob"))
    barriers.create_table(setup, bar)
    oncely.sql.create_tables(setup, keys)
    ib.create_table(setup)
    ob.create_table(setup)
    saga = Saga(
        "rt18f4",
        [Step("s1", lambda ctx: None, lambda ctx: None)],
        table=db.name("rt18f4_saga"),
        barrier_table=db.name("rt18f4_sbar"),
    )
    db.tables.append(f"{saga.table}_history")
    saga.create_tables(setup)
    setup.commit()
    ib.accept(setup, "c", "m1")
    ob.add(setup, "t", b"x", message_id="m1")
    setup.commit()
    cases: list[tuple[str, Any]] = [
        (bar, lambda c: barriers.purge(c, table=bar, older_than=0)),
        (keys, lambda c: reap(c, table=keys, retention=0)),
        (ib.table, lambda c: ib.purge(c, older_than=0)),
        (ob.table, lambda c: ob.purge(c, older_than=0)),
    ]
    if db.dialect == "sqlite":
        machine = Machine("rt18m", ["a", "b"], "a", [Transition("go", "a", "b")])
        sm = SqlStateMachine(
            machine, Table(db.name("rt18f4_sm"), "id", "st"), history_table=db.name("rt18f4_h")
        )
        cases += [
            (None, lambda c: saga.run(c, "new1")),
            (None, lambda c: saga.abort(c, "new2")),
            (None, lambda c: oncely.sql.create_tables(c, db.name("rt18f4_keys2"))),
            (None, lambda c: sm.create_tables(c)),
        ]
    else:
        cases.append((saga.table, lambda c: saga.abort(c, "new2")))
    for table, call in cases:
        conn = _waiter(db)
        with held(db, table or ""):
            with pytest.raises(DatabaseBusy) as info:
                call(conn)
            cause = info.value.__cause__
            assert cause is not None and type(cause).__module__.split(".")[0] in (
                "sqlite3",
                "psycopg",
                "pymysql",
            ), (table, cause)
            conn.rollback()
        conn.close()


@pytest.mark.asyncio
async def test_postgres_async_barrier_purge_under_a_table_lock_is_database_busy(
    make_db: Any,
) -> None:
    db = make_db("postgresql")
    bar = db.name("rt18f4a_bar")
    setup = db.connect()
    barriers.create_table(setup, bar)
    setup.commit()
    conn = await db.aconnect()
    await conn.execute("SET lock_timeout = '200ms'")
    await conn.commit()
    try:
        with held(db, bar), pytest.raises(DatabaseBusy):
            await barriers.apurge(conn, table=bar, older_than=0)
        await conn.rollback()
    finally:
        await db.aclose()


# -- F6 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", [math.nan, math.inf, {"a": [1, {"b": -math.inf}]}], ids=["nan", "inf", "nested"]
)
def test_transaction_result_with_nan_or_infinity_is_refused(db: Db, value: Any) -> None:
    """tx.set_result(NaN / Infinity, anywhere inside) raises ConfigurationError and nothing is
    stored: the same key runs again (not a replay) and stores a JSON result."""
    table = db.name("rt18f6_keys")
    conn = db.connect()
    oncely.sql.create_tables(conn, table)
    conn.commit()
    refused = pytest.raises(ConfigurationError, match="NaN")
    block = oncely.sql.transaction(conn, operation="op", key="k", scope="s", table=table)
    with refused, block as tx:
        tx.set_result(value)
    conn.rollback()
    with oncely.sql.transaction(conn, operation="op", key="k", scope="s", table=table) as tx:
        assert not tx.replayed
        tx.set_result({"ok": 1})
    conn.commit()
    with oncely.sql.transaction(conn, operation="op", key="k", scope="s", table=table) as tx:
        assert tx.replayed and tx.result == {"ok": 1}
    conn.commit()
