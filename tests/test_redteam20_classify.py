"""Red team 20 H1, H2, H6 on real SQLite, PostgreSQL and MariaDB: the one "nothing was decided
/ the database was busy" classification (:func:`oncely.sql.connections.busy` /
:func:`~oncely.sql.connections.undecided`) and its users.

H1: the classification followed ``__cause__`` of any exception whose class lives in django.* or
sqlalchemy.*, so a caller's business error such as Django's ``ValidationError`` or
SQLAlchemy's ``NoResultFound`` raised ``from`` a lock error was "busy": a saga raised
DatabaseBusy on every run and never compensated, the inbox consumer retried the message
forever. Only the database-error wrappers (``sqlalchemy.exc.DBAPIError``'s ``orig``, Django's
``django.db.utils.Error`` family raised ``from`` the driver's error) are read through now.

H2: the transactional consumer decided "busy" itself (``retryable`` or ``lock_timeout``), so a
handler's lock wait ended by ``statement_timeout`` (PostgreSQL 57014) / ``max_statement_time``
(MariaDB 1969) was a failed attempt and dead-lettered. It uses :func:`busy` now.

H6: an exception group (``asyncio.TaskGroup``) holding only busy errors is busy; one other
error in it makes it not.

Locks are held by another session (LOCK TABLE checked granted in pg_locks, LOCK TABLES, SQLite
BEGIN IMMEDIATE); waits end by the server's own settings: no sleeps.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy
from django.core.exceptions import ValidationError
from django.db.utils import DatabaseErrorWrapper
from sqlalchemy.exc import NoResultFound

from oncely.errors import DatabaseBusy, SagaFailed
from oncely.messaging import DeadLetter, Delivery, IdempotentConsumer, Inbox, Retry
from oncely.sql.connections import busy, lock_timeout, retryable, statement_timeout, undecided
from oncely.statemachine.saga import Step
from test_redteam18_busy import _rows, _waiter, held, saga_on
from test_redteam19_busy import _lock_error

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

DIALECTS = ["sqlite", "postgresql", "mysql"]


def _driver(db: Db) -> Any:
    if db.dialect == "sqlite":
        return sqlite3
    if db.dialect == "postgresql":
        import psycopg

        return psycopg
    import pymysql

    return pymysql


def _django_wrapped(db: Db, error: Exception) -> Exception:
    """``error`` as Django raises it: translated by Django's own ``DatabaseErrorWrapper`` (a
    ``django.db.utils.OperationalError`` raised ``from`` the driver's error)."""
    try:
        with DatabaseErrorWrapper(SimpleNamespace(Database=_driver(db), errors_occurred=False)):
            raise error
    except Exception as exc:
        assert type(exc).__module__ == "django.db.utils" and exc.__cause__ is error
        return exc
    raise AssertionError("not translated")


def _sa_lock_error(db: Db, table: str) -> Exception:
    """A real lock error raised through SQLAlchemy (``sqlalchemy.exc.OperationalError``)."""
    args = {"timeout": 0.05} if db.dialect == "sqlite" else {}
    engine = sqlalchemy.create_engine(db.url(), poolclass=sqlalchemy.NullPool, connect_args=args)
    try:
        with engine.connect() as conn:
            if db.dialect == "postgresql":
                conn.exec_driver_sql("SET lock_timeout = '200ms'")
            elif db.dialect == "mysql":
                conn.exec_driver_sql("SET SESSION lock_wait_timeout = 1")
                conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
            conn.commit()
            with held(db, table):
                try:
                    conn.exec_driver_sql(f"INSERT INTO {table} (id, k, v) VALUES (98, 'y', 'y')")
                except sqlalchemy.exc.DBAPIError as exc:
                    conn.rollback()
                    return exc
    finally:
        engine.dispose()
    raise AssertionError("the write was not refused")


def _not_busy(exc: BaseException) -> bool:
    return (
        not retryable(exc)
        and not lock_timeout(exc)
        and not statement_timeout(exc)
        and not undecided(exc)
        and busy(exc, "x") is exc
    )


def _raised_from(error: Exception, cause: BaseException) -> Exception:
    try:
        raise error from cause
    except Exception as exc:
        return exc


# -- H1 ------------------------------------------------------------------------------------------
def test_a_frameworks_business_error_raised_from_a_lock_error_is_not_busy(db: Db) -> None:
    """Django's ValidationError / SQLAlchemy's NoResultFound raised ``from`` a real lock error
    (the driver's, Django's or SQLAlchemy's translation of it) is the caller's error (old code:
    undecided, DatabaseBusy); the frameworks' database-error wrappers of the same lock error
    are still busy."""
    table = db.name("rt20_cl")
    db.run(f"CREATE TABLE {table} (id INT PRIMARY KEY, k VARCHAR(5) UNIQUE, v TEXT NOT NULL)")
    lock = _lock_error(db, table)
    wrapped = [lock, _django_wrapped(db, lock), _sa_lock_error(db, table)]
    for err in wrapped:
        assert lock_timeout(err) and undecided(err), repr(err)
        assert isinstance(busy(err, "x"), DatabaseBusy) and busy(err, "x").__cause__ is err
    for cause in wrapped:
        for own in (ValidationError("order 7 is shipped"), NoResultFound("no such coupon")):
            assert _not_busy(_raised_from(own, cause)), (own, cause)


def _saga_error(kind: str) -> Exception:
    if kind == "django":
        return ValidationError("order 7 is already shipped: cannot change it")
    return NoResultFound("no such coupon")


@pytest.mark.parametrize("kind", ["django", "sqlalchemy"])
@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_saga_step_raising_a_business_error_from_a_lock_error_compensates(
    make_db: Any, dialect: str, kind: str
) -> None:
    """The action catches a real lock error and refuses with the framework's business error
    ``from`` it: the step failed, s1 is compensated once, the action is not rerun (old code:
    DatabaseBusy on every run, the saga 'running' for ever, nothing compensated)."""
    db = make_db(dialect)
    other = db.external()
    shelf = other.name("rt20_shelf")
    other.run(f"CREATE TABLE {shelf} (id INT PRIMARY KEY, n INT)")
    side = _waiter(other)
    ran: list[str] = []
    undone: list[str] = []

    def s2(ctx: Any) -> None:
        ran.append("s2")
        try:
            side.cursor().execute(f"INSERT INTO {shelf} VALUES (1, 1)")
        except Exception as exc:
            side.rollback()
            assert lock_timeout(exc)
            raise _saga_error(kind) from exc

    saga = saga_on(
        db,
        "rt20h1",
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
        assert type(info.value.__cause__) is type(_saga_error(kind))
        with pytest.raises(SagaFailed):
            saga.run(conn, "id1")
    assert ran == ["s1", "s2"] and undone == ["s1"]
    assert _rows(db, f"SELECT state FROM {saga.table}") == [("compensated",)]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_handlers_validation_error_from_a_lock_error_is_dead_lettered(
    make_db: Any, dialect: str
) -> None:
    """The transactional consumer's handler refuses with Django's ValidationError raised
    ``from`` the lock error it caught: an attempt, dead-lettered after max_attempts (old code:
    Retry "the store is unavailable" for ever)."""
    db = make_db(dialect)
    other = db.external()
    shelf = other.name("rt20_shelf2")
    other.run(f"CREATE TABLE {shelf} (id INT PRIMARY KEY, n INT)")
    side = _waiter(other)
    inbox = Inbox(table=db.name("rt20_inbox"))
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()
    runs: list[int] = []

    def handler(message: Any, conn: Any) -> None:
        runs.append(1)
        try:
            side.cursor().execute(f"INSERT INTO {shelf} VALUES (1, 1)")
        except Exception as exc:
            side.rollback()
            raise ValidationError("order 1 is being shipped: refuse this change") from exc

    dead: list[BaseException] = []
    consumer = IdempotentConsumer(
        handler,
        name=f"rt20h1{dialect}",
        dedup_id="body:id",
        inbox=inbox,
        connect=db.connect,
        max_attempts=3,
        on_dead_letter=lambda d, e: dead.append(e),
    )
    verdicts = []
    with held(other, shelf):
        for attempt in (1, 2, 3):
            body = json.dumps({"id": "m1"}).encode()
            verdicts.append(consumer.process(Delivery(body, attempt=attempt)))
    assert [type(v) for v in verdicts] == [Retry, Retry, DeadLetter]
    assert len(runs) == 3 and [type(e) for e in dead] == [ValidationError]


# -- H2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["statement", "lock"])
@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_a_handlers_lock_wait_ended_by_statement_timeout_is_retried(
    make_db: Any, dialect: str, limit: str
) -> None:
    """The handler's UPDATE waits on a row lock another session holds and the wait is ended by
    statement_timeout / max_statement_time (or, as before, by lock_timeout): DatabaseBusy, the
    message is retried and not counted (never dead-lettered), and once the lock is gone it
    runs once (old code, statement limit: a failed attempt, dead-lettered at attempt 3)."""
    db = make_db(dialect)
    table = db.name("rt20_row")
    db.run(f"CREATE TABLE {table} (id INT PRIMARY KEY, n INT)")
    db.run(f"INSERT INTO {table} VALUES (1, 0)")
    inbox = Inbox(table=db.name("rt20_inbox2"))
    setup = db.connect()
    inbox.create_table(setup)
    setup.commit()

    def connect() -> Any:
        conn = db.connect()
        cur = conn.cursor()
        if dialect == "postgresql":
            cur.execute(
                "SET lock_timeout = '60s'" if limit == "statement" else "SET lock_timeout = '200ms'"
            )
            cur.execute(
                "SET statement_timeout = '300ms'"
                if limit == "statement"
                else "SET statement_timeout = 0"
            )
        else:
            cur.execute(
                f"SET SESSION innodb_lock_wait_timeout = {60 if limit == 'statement' else 1}"
            )
            cur.execute(f"SET SESSION max_statement_time = {0.3 if limit == 'statement' else 0}")
        conn.commit()
        return conn

    errors: list[BaseException] = []

    def handler(message: Any, conn: Any) -> None:
        try:
            conn.cursor().execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1")
        except Exception as exc:
            errors.append(exc)
            raise

    dead: list[BaseException] = []
    consumer = IdempotentConsumer(
        handler,
        name=f"rt20h2{dialect}{limit}",
        dedup_id="body:id",
        inbox=inbox,
        connect=connect,
        max_attempts=3,
        on_dead_letter=lambda d, e: dead.append(e),
    )
    body = json.dumps({"id": "m1"}).encode()
    holder = db.connect()
    holder.cursor().execute(f"UPDATE {table} SET n = n WHERE id = 1")  # holds the row lock
    try:
        verdicts = [consumer.process(Delivery(body, attempt=a)) for a in (1, 2, 3, 4)]
    finally:
        holder.rollback()
    assert len(errors) == 4
    expected = statement_timeout if limit == "statement" else lock_timeout
    assert all(expected(e) for e in errors), errors
    assert [type(v) for v in verdicts] == [Retry] * 4 and dead == []
    assert type(consumer.process(Delivery(body, attempt=5))).__name__ == "Ack"
    assert db.run(f"SELECT n FROM {table}") == [(1,)]


# -- H6 ------------------------------------------------------------------------------------------
needs_groups = pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup: 3.11+")


@needs_groups
def test_an_exception_group_of_busy_errors_is_busy(db: Db) -> None:
    """ExceptionGroup (what asyncio.TaskGroup raises) of real lock errors: undecided and
    DatabaseBusy (old code: neither); a group with one business error or a cancellation in
    it is not busy."""
    table = db.name("rt20_grp")
    db.run(f"CREATE TABLE {table} (id INT PRIMARY KEY, k VARCHAR(5) UNIQUE, v TEXT NOT NULL)")
    lock = _lock_error(db, table)
    typed = busy(lock, "x")
    groups = [
        ExceptionGroup("tasks", [lock]),  # noqa: F821
        ExceptionGroup("tasks", [lock, ExceptionGroup("inner", [typed])]),  # noqa: F821
        ExceptionGroup("tasks", [_django_wrapped(db, lock)]),  # noqa: F821
    ]
    for group in groups:
        assert undecided(group), group
        assert isinstance(busy(group, "x"), DatabaseBusy) and busy(group, "x").__cause__ is group
    mixed = [
        ExceptionGroup("tasks", [lock, ValueError("business")]),  # noqa: F821
        ExceptionGroup("tasks", [ExceptionGroup("inner", [lock, KeyError("k")])]),  # noqa: F821
        ExceptionGroup("tasks", [_raised_from(ValidationError("no"), lock)]),  # noqa: F821
        BaseExceptionGroup("tasks", [lock, KeyboardInterrupt()]),  # noqa: F821
    ]
    for group in mixed:
        assert not undecided(group) and busy(group, "x") is group, group


@needs_groups
@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_saga_action_raising_a_group_of_lock_errors_stops_without_compensating(
    make_db: Any, dialect: str
) -> None:
    """A saga action whose parallel writes (a TaskGroup) all hit a lock: DatabaseBusy, nothing
    compensated, the saga stays 'running' and the next run completes it (old code: the step's
    failure, s1 compensated, SagaFailed for good). A group with a business error in it still
    fails the step and compensates."""
    db = make_db(dialect)
    other = db.external()
    shelf = other.name("rt20_shelf3")
    other.run(f"CREATE TABLE {shelf} (id INT PRIMARY KEY, n INT)")
    side = _waiter(other)
    ran: list[str] = []
    undone: list[str] = []

    def s2(ctx: Any) -> None:
        ran.append("s2")
        try:
            side.cursor().execute(f"INSERT INTO {shelf} VALUES (1, 1)")
            side.commit()
        except Exception as exc:
            side.rollback()
            errors: list[Exception] = [exc]
            if ctx.saga_id == "mixed":
                errors.append(ValueError("out of stock"))
            raise ExceptionGroup("unhandled errors in a TaskGroup", errors) from None  # noqa: F821

    saga = saga_on(
        db,
        "rt20h6",
        [
            Step("s1", lambda ctx: ran.append("s1"), lambda ctx: undone.append("s1")),
            Step("s2", s2, attempts=1),
        ],
    )
    conn = db.connect()
    with held(other, shelf):
        with pytest.raises(DatabaseBusy):
            saga.run(conn, "busy")
        assert undone == []
        assert _rows(db, f"SELECT state FROM {saga.table}") == [("running",)]
        with pytest.raises(SagaFailed) as info:
            saga.run(conn, "mixed")
        assert info.value.step == "s2" and undone == ["s1"]
    assert saga.run(conn, "busy").state == "completed"
    assert ran == ["s1", "s2", "s1", "s2", "s2"] and undone == ["s1"]
