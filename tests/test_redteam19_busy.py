"""Red team 19 G2-G6 on real SQLite, PostgreSQL and MariaDB: what oncely calls "the database
was busy, nothing was decided" (DatabaseBusy, retryable).

G2-G4: the classification read ``__context__``, so a real error (a NOT NULL violation, a UNIQUE
conflict, a handler's business error, even ``raise ... from None``) raised inside an ``except``
block that had caught a lock error was DatabaseBusy: insert_once said "the database was busy",
a saga reran its action forever without compensating, the inbox consumer retried a poison
message forever. It now reads the error itself, and its ``__cause__`` only where that is
oncely's (or SQLAlchemy's / Django's) translation of the driver's error.

G5/G6: a lock wait ended by PostgreSQL ``statement_timeout`` (57014) or MariaDB
``max_statement_time`` (1969) is DatabaseBusy too (it was the raw driver error, StoreError, or
a saga step's failure: compensated, SagaFailed for good).

Locks are held by another session (LOCK TABLE checked granted in pg_locks, LOCK TABLES, an
uncommitted row, SQLite BEGIN IMMEDIATE); waits end by the server's own settings: no sleeps.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest

from oncely.errors import DatabaseBusy, SagaFailed, ValueRefused
from oncely.messaging import DeadLetter, Delivery, IdempotentConsumer, Inbox, Retry
from oncely.sql import insert_once, versioned_update
from oncely.sql.connections import busy, retryable, undecided
from oncely.statemachine import barrier as barriers
from oncely.statemachine.saga import Step
from test_redteam18_busy import _short_statements, _waiter, held, saga_on

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]


def _lock_error(db: Db, table: str) -> Exception:
    """A real lock error: the waiter's write to ``table`` while another session holds it."""
    waiter = _waiter(db)
    with held(db, table):
        try:
            waiter.cursor().execute(f"INSERT INTO {table} (id, k, v) VALUES (99, 'z', 'z')")
        except Exception as exc:
            waiter.rollback()
            return exc
    raise AssertionError("the write was not refused")


# -- G2 ------------------------------------------------------------------------------------------
def test_an_error_raised_while_handling_a_lock_error_is_itself(db: Db) -> None:
    """insert_once with a NULL into a NOT NULL column, called in the except block of a caught
    lock error: ValueRefused (old code: DatabaseBusy "the database was busy (... not-null)")."""
    table = db.name("rt19_cx")
    db.run(f"CREATE TABLE {table} (id INT PRIMARY KEY, k VARCHAR(5) UNIQUE, v TEXT NOT NULL)")
    lock = _lock_error(db, table)
    assert undecided(lock) and isinstance(busy(lock, "x"), DatabaseBusy)
    conn = db.connect()
    try:
        raise lock
    except Exception:
        with pytest.raises(ValueRefused) as info:
            insert_once(conn, table, {"id": 1, "k": "a", "v": None}, unique=("k",))
        assert "busy" not in str(info.value)
    conn.rollback()
    # the classifier on errors with a busy __context__ / a caller's own explicit cause
    for suppress in (False, True):
        try:
            try:
                raise lock
            except Exception:
                if suppress:
                    raise KeyError("business") from None
                raise KeyError("business")  # noqa: B904
        except KeyError as exc:
            assert not retryable(exc) and not undecided(exc) and busy(exc, "x") is exc
    try:
        raise RuntimeError("mine") from lock
    except RuntimeError as exc:
        assert not undecided(exc) and busy(exc, "x") is exc
    # oncely's own translation is still recognised, and so is its cause chain
    typed = busy(lock, "x")
    assert retryable(typed) and undecided(typed) and busy(typed, "y") is typed
    try:
        try:
            raise typed from lock
        except DatabaseBusy as inner:
            raise ValueRefused("a typed error of oncely") from inner
    except ValueRefused as outer:
        assert not undecided(outer) and busy(outer, "x") is outer


# -- G3 ------------------------------------------------------------------------------------------
def test_a_unique_conflict_in_a_lock_error_fallback_is_the_steps_failure(make_db: Any) -> None:
    """A saga step catches a lock error and falls back to an insert that hits a UNIQUE
    conflict: the step failed, the saga compensates and does not run the action again (old
    code: DatabaseBusy on every run, the action rerun each time, nothing compensated)."""
    db = make_db("sqlite")
    other = db.external()
    shelf = other.name("rt19_shelf")
    other.run(f"CREATE TABLE {shelf} (id INT PRIMARY KEY, n INT)")
    side = _waiter(other)
    dup = sqlite3.connect(":memory:")
    dup.execute("CREATE TABLE t (id INT PRIMARY KEY)")
    dup.execute("INSERT INTO t VALUES (1)")
    ran: list[str] = []
    undone: list[str] = []

    def s2(ctx: Any) -> None:
        ran.append("s2")
        try:
            side.execute(f"INSERT INTO {shelf} VALUES (1, 1)")
        except sqlite3.OperationalError:
            side.rollback()
            dup.execute("INSERT INTO t VALUES (1)")  # sqlite3.IntegrityError

    saga = saga_on(
        db,
        "rt19c",
        [
            Step("s1", lambda ctx: ran.append("s1"), lambda ctx: undone.append("s1")),
            Step("s2", s2, attempts=1),
        ],
    )
    conn = db.connect()
    with held(other, shelf):
        with pytest.raises(SagaFailed) as info:
            saga.run(conn, "id1")
        assert info.value.step == "s2"
        with pytest.raises(SagaFailed):
            saga.run(conn, "id1")
    assert ran == ["s1", "s2"] and undone == ["s1"]


# -- G4 ------------------------------------------------------------------------------------------
def test_a_business_error_raised_while_handling_a_lock_error_is_dead_lettered(
    make_db: Any,
) -> None:
    """The transactional (inbox) consumer's handler raises its own error (``from None``) in
    the except block of a lock error it caught: an attempt, dead-lettered after max_attempts
    (old code: Retry "store is unavailable" forever)."""
    db = make_db("sqlite")
    other = db.external()
    shelf = other.name("rt19_shelf3")
    other.run(f"CREATE TABLE {shelf} (id INT PRIMARY KEY, n INT)")
    side = _waiter(other)
    inbox = Inbox(table=db.name("rt19_inbox"))
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()

    class OutOfStock(Exception):
        pass

    runs: list[int] = []

    def handler(message: Any, conn: Any) -> None:
        runs.append(1)
        try:
            side.execute(f"INSERT INTO {shelf} VALUES (1, 1)")
        except sqlite3.OperationalError:
            side.rollback()
            raise OutOfStock("item 7") from None

    dead: list[BaseException] = []
    consumer = IdempotentConsumer(
        handler,
        name="rt19g4",
        dedup_id="body:id",
        inbox=inbox,
        connect=f"sqlite:///{db.path}",
        max_attempts=3,
        on_dead_letter=lambda d, e: dead.append(e),
    )
    verdicts = []
    with held(other, shelf):
        for attempt in (1, 2, 3):
            body = json.dumps({"id": "m1"}).encode()
            verdicts.append(consumer.process(Delivery(body, attempt=attempt)))
    assert [type(v) for v in verdicts] == [Retry, Retry, DeadLetter]
    assert len(runs) == 3 and [type(e) for e in dead] == [OutOfStock]


# -- G5 / G6 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_a_statement_timeout_ending_a_lock_wait_is_database_busy(
    make_db: Any, dialect: str
) -> None:
    """insert_once, barrier, versioned_update and Inbox.accept whose lock wait is ended by
    statement_timeout / max_statement_time: DatabaseBusy (old code: QueryCanceled / pymysql
    1969 / StoreError), and the call works once the lock is gone."""
    db = make_db(dialect)
    io, ver, bar = db.name("rt19_io"), db.name("rt19_ver"), db.name("rt19_bar")
    inbox = Inbox(table=db.name("rt19_ib"))
    db.run(f"CREATE TABLE {io} (id INT PRIMARY KEY, k VARCHAR(10) UNIQUE)")
    db.run(f"CREATE TABLE {ver} (id INT PRIMARY KEY, name VARCHAR(5), version INT NOT NULL)")
    db.run(f"INSERT INTO {ver} VALUES (1, 'a', 0)")
    setup = db.connect()
    inbox.create_table(setup)
    barriers.create_table(setup, table=bar)
    setup.commit()
    conn = _short_statements(db)
    calls = {
        io: lambda: insert_once(conn, io, {"id": 1, "k": "a"}, unique=("k",)),
        bar: lambda: barriers.barrier(conn, "g", "b", "action", table=bar),
        ver: lambda: versioned_update(conn, ver, 1, {"name": "b"}, 0),
        inbox.table: lambda: inbox.accept(conn, "x", "m1"),
    }
    for table, call in calls.items():
        with held(db, table):
            with pytest.raises(DatabaseBusy) as info:
                call()
            assert retryable(info.value)
            conn.rollback()
        call()
        conn.commit()
