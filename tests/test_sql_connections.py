"""oncely.sql.connections on real SQLite, PostgreSQL and MariaDB: every driver family adapts,
runs a statement with parameters in the caller's transaction, and its errors are recognised."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pytest

from oncely.errors import (
    InvalidIdentifier,
    TransactionFailed,
    UnknownColumn,
    UnknownTable,
    UnsupportedConnection,
)
from oncely.sql.connections import (
    adapt,
    duplicate_of,
    lock_timeout,
    missing_object,
    quote,
    render,
    retryable,
)

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]


def _make_table(db: Db) -> str:
    table = db.name("conn")
    db.run(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(50) NOT NULL UNIQUE)")
    return table


def test_render_placeholders() -> None:
    text = "SELECT :a, ':b', x::text, 5 % 2 FROM t WHERE y = :a AND z = :c"
    assert render(text, {"a": 1, "c": 2}, "named") == (text, {"a": 1, "c": 2})
    sql, params = render(text, {"a": 1, "c": 2}, "format")
    assert sql == "SELECT %s, ':b', x::text, 5 %% 2 FROM t WHERE y = %s AND z = %s"
    assert params == [1, 1, 2]
    sql, _ = render(text, {"a": 1, "c": 2}, "pyformat")
    assert "%(a)s" in sql and "%(c)s" in sql and "5 %% 2" in sql


@pytest.mark.parametrize("bad", ["t; DROP TABLE x", 'a"b', "1abc", "", "a.b.c", "a b", "x" * 64])
def test_quote_refuses_anything_but_identifiers(bad: str) -> None:
    with pytest.raises(InvalidIdentifier):
        quote(bad, "postgresql")


def test_quote_per_dialect() -> None:
    assert quote("public.orders", "postgresql") == '"public"."orders"'
    assert quote("order", "mysql") == "`order`"


def test_sync_dbapi_roundtrip_and_errors(db: Db) -> None:
    table = _make_table(db)
    conn = db.connect()
    c = adapt(conn)
    assert c.dialect == db.dialect and not c.is_async
    assert c.returning == (db.dialect != "mysql" or c.mariadb)
    res = c.execute(f"INSERT INTO {table} (id, name) VALUES (:id, :name)", {"id": 1, "name": "a"})
    assert res.rowcount == 1
    assert c.in_transaction()
    with pytest.raises(Exception) as info:
        c.execute(f"INSERT INTO {table} (id, name) VALUES (:id, :name)", {"id": 2, "name": "a"})
    dup = duplicate_of(info.value)
    assert dup is not None
    if db.dialect != "sqlite":
        assert dup.constraint
    conn.rollback()
    rows = c.execute(f"SELECT id, name FROM {table} WHERE name = :n", {"n": "a"})
    assert rows.rows == [] and rows.columns == ("id", "name")
    # a per-dialect statement
    one = c.execute({"sqlite": "SELECT 1", "postgresql": "SELECT 1", "mysql": "SELECT 1"}, {})
    assert one.rows == [(1,)]
    conn.rollback()


def test_unknown_table_and_column_are_typed(db: Db) -> None:
    table = _make_table(db)
    c = adapt(db.connect())
    with pytest.raises(Exception) as info:
        c.execute(f"SELECT * FROM nope_{db.tag}", {})
    assert isinstance(missing_object(info.value), UnknownTable)
    c.raw.rollback()
    with pytest.raises(Exception) as info:
        c.execute(f"SELECT nope FROM {table}", {})
    assert isinstance(missing_object(info.value), UnknownColumn)
    assert duplicate_of(info.value) is None and not retryable(info.value)


def test_failed_transaction_is_seen(make_db: Any) -> None:
    db = make_db("postgresql")
    c = adapt(db.connect())
    with pytest.raises(Exception, match="division by zero"):
        c.execute("SELECT 1/0", {})
    assert c.failed()
    with pytest.raises(TransactionFailed, match="roll it back"):
        c.enter()
    c.raw.rollback()
    assert not c.failed()


def test_serialization_failure_is_retryable_not_duplicate(make_db: Any) -> None:
    db = make_db("postgresql")
    table = _make_table(db)
    db.run(f"INSERT INTO {table} VALUES (1, 'x')")
    a, b = db.connect(), db.connect()
    for conn in (a, b):
        conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        conn.execute(f"SELECT * FROM {table}").fetchall()
    a.execute(f"UPDATE {table} SET name = 'a' WHERE id = 1")
    a.commit()
    with pytest.raises(Exception) as info:
        b.execute(f"UPDATE {table} SET name = 'b' WHERE id = 1")
    assert retryable(info.value) and duplicate_of(info.value) is None


def test_mysql_deadlock_is_retryable(make_db: Any) -> None:
    db = make_db("mysql")
    table = _make_table(db)
    db.run(f"INSERT INTO {table} VALUES (1, 'x'), (2, 'y')")
    a, b = adapt(db.connect()), adapt(db.connect())
    a.execute(f"UPDATE {table} SET name = 'a1' WHERE id = 1", {})
    b.execute(f"UPDATE {table} SET name = 'b2' WHERE id = 2", {})
    errors: list[BaseException] = []

    def cross() -> None:
        try:
            a.execute(f"UPDATE {table} SET name = 'a2' WHERE id = 2", {})
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=cross)
    t.start()
    try:
        b.execute(f"UPDATE {table} SET name = 'b1' WHERE id = 1", {})
    except Exception as exc:
        errors.append(exc)
    t.join()
    assert errors and all(retryable(e) for e in errors)
    a.raw.rollback()
    b.raw.rollback()


def test_lock_timeout_is_recognised(make_db: Any) -> None:
    db = make_db("postgresql")
    table = _make_table(db)
    db.run(f"INSERT INTO {table} VALUES (1, 'x')")
    a, b = db.connect(), db.connect()
    a.execute(f"UPDATE {table} SET name = 'a' WHERE id = 1")
    b.execute("SET lock_timeout = '50ms'")
    with pytest.raises(Exception) as info:
        b.execute(f"UPDATE {table} SET name = 'b' WHERE id = 1")
    assert lock_timeout(info.value) and not retryable(info.value)
    a.rollback()


async def test_async_dbapi_roundtrip(db: Db) -> None:
    table = _make_table(db)
    conn = await db.aconnect()
    c = adapt(conn)
    assert c.is_async and c.dialect == db.dialect
    await c.aexecute(f"INSERT INTO {table} (id, name) VALUES (:id, :n)", {"id": 1, "n": "a"})
    with pytest.raises(Exception) as info:
        await c.aexecute(f"INSERT INTO {table} (id, name) VALUES (:id, :n)", {"id": 2, "n": "a"})
    assert duplicate_of(info.value) is not None
    with pytest.raises(UnsupportedConnection.__mro__[1]):  # ConfigurationError
        c.execute("SELECT 1", {})
    await conn.rollback()
    await db.aclose()


def test_sqlalchemy_connection_and_session(db: Db) -> None:
    sa = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    table = _make_table(db)
    engine = sa.create_engine(db.url())
    try:
        with pytest.raises(UnsupportedConnection, match=r"engine\.connect"):
            adapt(engine)
        with engine.connect() as conn:
            c = adapt(conn)
            assert c.dialect == db.dialect
            c.execute(f"INSERT INTO {table} (id, name) VALUES (:id, :n)", {"id": 1, "n": "a"})
            assert c.in_transaction()
            with pytest.raises(Exception) as info:
                c.execute(f"INSERT INTO {table} (id, name) VALUES (:id, :n)", {"id": 2, "n": "a"})
            assert duplicate_of(info.value) is not None
            conn.rollback()
        with Session(engine) as session:
            c = adapt(session)
            c.execute(f"INSERT INTO {table} (id, name) VALUES (:id, :n)", {"id": 3, "n": "c"})
            session.commit()
        assert db.run(f"SELECT id FROM {table}") == [(3,)]
    finally:
        engine.dispose()


async def test_sqlalchemy_async(db: Db) -> None:
    pytest.importorskip("sqlalchemy")
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    table = _make_table(db)
    engine = create_async_engine(db.url("async"))
    try:
        with pytest.raises(UnsupportedConnection):
            adapt(engine)
        async with engine.connect() as conn:
            c = adapt(conn)
            assert c.is_async
            await c.aexecute(f"INSERT INTO {table} (id, name) VALUES (:i, :n)", {"i": 1, "n": "a"})
            await conn.commit()
        async with AsyncSession(engine) as session:
            c = adapt(session)
            rows = await c.aexecute(f"SELECT name FROM {table} WHERE id = :i", {"i": 1})
            assert rows.rows == [("a",)]
    finally:
        await engine.dispose()


def test_unsupported_objects_are_refused() -> None:
    with pytest.raises(UnsupportedConnection, match="sqlite3, psycopg 3"):
        adapt(object())
    with pytest.raises(UnsupportedConnection):
        adapt(sqlite3.connect(":memory:").cursor())


def test_blocks_own_or_join_the_transaction(db: Db) -> None:
    table = _make_table(db)
    c = adapt(db.connect())
    ins = f"INSERT INTO {table} (id, name) VALUES (:id, :n)"
    block = c.enter()
    assert block.owned
    c.execute(ins, {"id": 1, "n": "a"})
    assert c.in_transaction()
    c.leave(block, commit=False)
    block = c.enter()
    c.execute(ins, {"id": 2, "n": "b"})
    inner = c.enter()  # a savepoint inside the open transaction
    assert not inner.owned
    c.execute(ins, {"id": 3, "n": "c"})
    c.leave(inner, commit=False)
    c.leave(block, commit=True)
    assert db.run(f"SELECT id FROM {table} ORDER BY id") == [(2,)]
