"""A block oncely opens as a savepoint in the caller's transaction on a SQLAlchemy
``Connection`` / ``Session`` (sync and async) or in Django's ``atomic()``, whose body ends that
transaction or savepoint itself: SQLAlchemy's ``conn.rollback()`` / ``session.rollback()``, a
raw ``ROLLBACK``, a ``RELEASE`` or ``ROLLBACK TO`` of a savepoint the caller made before the
block. Real SQLite, PostgreSQL and MariaDB.

Before the fix the leave paths of these adapters raised the framework's error (SQLAlchemy's
``InvalidRequestError`` "This nested transaction is inactive" / ``ResourceClosedError`` "This
transaction is closed", or the driver's "savepoint does not exist" wrapped by SQLAlchemy or
Django), and left the caller's transaction open with the body's later writes in it: a caller
that caught the error and committed committed them, key-less, again on every retry. The raw
DB-API connections already raised :class:`~oncely.errors.TransactionLost` and rolled the
caller's transaction back; now every adapter does, through the same classifier
(``savepoint_gone``). Each test here failed on the code before the fix."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from oncely.errors import TransactionLost
from oncely.messaging import Inbox
from oncely.sql import create_tables, transaction

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

sqlalchemy = pytest.importorskip("sqlalchemy")
from sqlalchemy import text  # noqa: E402

HERE = Path(__file__).resolve().parent

#: How the body ends what oncely opened: SQLAlchemy's own rollback(), a raw ROLLBACK, or a
#: RELEASE / ROLLBACK TO of the savepoint the caller made before the block (which takes
#: oncely's savepoint with it).
ENDINGS = ["rollback", "raw-rollback", "release-outer", "rollback-to-outer"]


def _tables(db: Db, *, inbox: bool = False) -> tuple[str, str]:
    """(the keys or inbox table, the effects table), created."""
    effects = db.name("spl_fx")
    db.run(f"CREATE TABLE {effects} (k VARCHAR(50) NOT NULL)")
    conn = db.connect()
    if inbox:
        table = db.name("spl_inbox")
        Inbox(table=table).create_table(conn)
    else:
        table = db.name("spl_keys")
        create_tables(conn, table=table)
    conn.commit()
    return table, effects


def _rows(db: Db, table: str) -> list[str]:
    return sorted(r[0] for r in db.run(f"SELECT k FROM {table}"))


def _recorded(db: Db, table: str) -> int:
    return int(db.run(f"SELECT count(*) FROM {table}")[0][0])


def _write(c: Any, effects: str, value: str) -> None:
    c.execute(text(f"INSERT INTO {effects} (k) VALUES (:k)"), {"k": value})


def _raw(c: Any, sql: str) -> None:
    conn = c.connection() if hasattr(c, "get_bind") else c  # a Session's Connection
    conn.exec_driver_sql(sql)


def _end(c: Any, ending: str) -> None:
    if ending == "rollback":
        c.rollback()
    elif ending == "raw-rollback":
        _raw(c, "ROLLBACK")
    elif ending == "release-outer":
        _raw(c, "RELEASE SAVEPOINT outer_sp")
    else:
        _raw(c, "ROLLBACK TO SAVEPOINT outer_sp")


def _open(engine: Any, kind: str) -> Any:
    from sqlalchemy.orm import Session

    return engine.connect() if kind == "connection" else Session(engine)


def _begin(c: Any, effects: str) -> None:
    """The caller's transaction: a write of its own, then a savepoint of its own."""
    c.begin()
    _write(c, effects, "caller")
    _raw(c, "SAVEPOINT outer_sp")


def _block(c: Any, mechanism: str, table: str) -> Any:
    if mechanism == "transaction":
        return transaction(c, operation="spl.op", key="k1", scope="s", table=table)
    return Inbox(table=table).receive(c, "billing", "m1")


@pytest.mark.parametrize("mechanism", ["transaction", "inbox"])
@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("kind", ["connection", "session"])
def test_sqlalchemy_body_that_ends_the_savepoint(
    db: Db, kind: str, ending: str, mechanism: str
) -> None:
    table, effects = _tables(db, inbox=mechanism == "inbox")
    engine = sqlalchemy.create_engine(db.url())
    try:
        with _open(engine, kind) as c:
            for attempt in range(2):  # a delivery and its redelivery: the same each time
                _begin(c, effects)
                with (
                    pytest.raises(TransactionLost, match="savepoint") as info,
                    _block(c, mechanism, table) as handle,
                ):
                    _write(c, effects, f"before-{attempt}")
                    _end(c, ending)
                    _write(c, effects, f"after-{attempt}")
                    if attempt and mechanism == "transaction":  # the result UPDATE, then leave
                        handle.set_result({"paid": 1})
                assert not isinstance(info.value.__cause__, TransactionLost)
                c.commit()  # a caller that catches it and commits commits nothing of it
            assert _rows(db, effects) == []
            assert _recorded(db, table) == 0
            for _ in range(2):  # a retry with a well-behaved body runs once, then replays
                _begin(c, effects)
                with _block(c, mechanism, table) as first:
                    if first is True or (first is not False and not first.replayed):
                        _write(c, effects, "done")
                c.commit()
        assert _rows(db, effects) == ["caller", "caller", "done"]
        assert _recorded(db, table) == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["connection", "session"])
def test_sqlalchemy_body_that_ends_the_savepoint_then_raises(db: Db, kind: str) -> None:
    """The rollback path: the body ends the caller's transaction, writes on, then raises. The
    savepoint's rollback finds it gone (SQLAlchemy's inactive nested transaction: its
    rollback() only warned) and the caller's transaction is rolled back, not left holding the
    write made after."""
    table, effects = _tables(db)
    engine = sqlalchemy.create_engine(db.url())
    try:
        with _open(engine, kind) as c:
            _begin(c, effects)
            with (
                pytest.raises(TransactionLost),
                transaction(c, operation="spl.op", key="k1", scope="s", table=table),
            ):
                c.rollback()
                _write(c, effects, "after")
                raise RuntimeError("boom")
            c.commit()
        assert _rows(db, effects) == []
        assert _recorded(db, table) == 0
    finally:
        engine.dispose()


async def _aend(c: Any, ending: str) -> None:
    if ending == "rollback":
        await c.rollback()
        return
    sql = {
        "raw-rollback": "ROLLBACK",
        "release-outer": "RELEASE SAVEPOINT outer_sp",
        "rollback-to-outer": "ROLLBACK TO SAVEPOINT outer_sp",
    }[ending]
    conn = await c.connection() if hasattr(c, "get_bind") else c
    await conn.exec_driver_sql(sql)


async def _abegin(c: Any, effects: str) -> None:
    await c.begin()
    await c.execute(text(f"INSERT INTO {effects} (k) VALUES ('caller')"))
    conn = await c.connection() if hasattr(c, "get_bind") else c
    await conn.exec_driver_sql("SAVEPOINT outer_sp")


@pytest.mark.parametrize("kind", ["connection", "session"])
async def test_sqlalchemy_async_body_that_ends_the_savepoint_then_raises(db: Db, kind: str) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    table, effects = _tables(db)
    engine = create_async_engine(db.url("async"))
    try:
        c: Any = engine.connect() if kind == "connection" else AsyncSession(engine)
        async with c:
            await _abegin(c, effects)
            with pytest.raises(TransactionLost):
                async with transaction(c, operation="spl.op", key="k1", scope="s", table=table):
                    await c.rollback()
                    await c.execute(text(f"INSERT INTO {effects} (k) VALUES ('after')"))
                    raise RuntimeError("boom")
            await c.commit()
        assert _rows(db, effects) == []
        assert _recorded(db, table) == 0
    finally:
        await engine.dispose()


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("kind", ["connection", "session"])
async def test_sqlalchemy_async_body_that_ends_the_savepoint(
    db: Db, kind: str, ending: str
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    table, effects = _tables(db)
    engine = create_async_engine(db.url("async"))
    try:
        c: Any = engine.connect() if kind == "connection" else AsyncSession(engine)
        async with c:
            for attempt in range(2):
                await _abegin(c, effects)
                with pytest.raises(TransactionLost, match="savepoint"):
                    async with transaction(c, operation="spl.op", key="k1", scope="s", table=table):
                        await c.execute(text(f"INSERT INTO {effects} (k) VALUES ('b{attempt}')"))
                        await _aend(c, ending)
                        await c.execute(text(f"INSERT INTO {effects} (k) VALUES ('a{attempt}')"))
                await c.commit()
            assert _rows(db, effects) == []
            assert _recorded(db, table) == 0
            for _ in range(2):
                await _abegin(c, effects)
                async with transaction(
                    c, operation="spl.op", key="k1", scope="s", table=table
                ) as tx:
                    if not tx.replayed:
                        await c.execute(text(f"INSERT INTO {effects} (k) VALUES ('done')"))
                await c.commit()
        assert _rows(db, effects) == ["caller", "caller", "done"]
        assert _recorded(db, table) == 1
    finally:
        await engine.dispose()


@pytest.mark.parametrize("vendor", ["sqlite", "postgresql", "mysql"])
def test_django_body_that_ends_the_savepoint(vendor: str, tmp_path: Path) -> None:
    """The same in a caller's ``transaction.atomic()`` (tests/sql_savepoint_lost_django.py,
    in a fresh interpreter: Django settings are process-wide)."""
    pytest.importorskip("django")
    tag = uuid.uuid4().hex[:10]
    target = f"sqlite:{tmp_path / 'dj.db'}" if vendor == "sqlite" else vendor
    out = subprocess.run(
        [sys.executable, str(HERE / "sql_savepoint_lost_django.py"), target, tag],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=HERE.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK"), out.stdout[-2000:]


# -- the body commits the transaction the block owns (red team round 9) ------------------------
@pytest.mark.parametrize("kind", ["connection", "session"])
def test_sqlalchemy_body_that_commits_the_blocks_own_transaction(db: Db, kind: str) -> None:
    """On MariaDB the block's final commit met SQLAlchemy's ``ResourceClosedError`` /
    ``InvalidRequestError`` (the body's ``commit()`` closed the transaction the block began)
    and let it out raw; PostgreSQL and SQLite already raised TransactionLost. Now every
    dialect does, and what the body wrote after its commit is rolled back."""
    table, effects = _tables(db)
    engine = sqlalchemy.create_engine(db.url())
    try:
        with _open(engine, kind) as c:
            with (
                pytest.raises(TransactionLost),
                transaction(c, operation="spl.op", key="k2", scope="s", table=table) as tx,
            ):
                _write(c, effects, "before")
                c.commit()
                _write(c, effects, "after")
                tx.set_result({"paid": 1})
            c.commit()  # a caller that catches it and commits commits nothing more of it
        assert "after" not in _rows(db, effects)
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["connection", "session"])
async def test_sqlalchemy_async_body_that_commits_the_blocks_own_transaction(
    db: Db, kind: str
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    if db.dialect == "sqlite":
        pytest.skip("no async SQLite driver here")
    table, effects = _tables(db)
    engine = create_async_engine(db.url("async"))
    try:
        c: Any = engine.connect() if kind == "connection" else AsyncSession(engine)
        async with c:
            with pytest.raises(TransactionLost):
                async with transaction(
                    c, operation="spl.op", key="k2", scope="s", table=table
                ) as tx:
                    await c.execute(text(f"INSERT INTO {effects} (k) VALUES ('before')"))
                    await c.commit()
                    await c.execute(text(f"INSERT INTO {effects} (k) VALUES ('after')"))
                    tx.set_result({"paid": 1})
            await c.commit()
        assert "after" not in _rows(db, effects)
    finally:
        await engine.dispose()


# -- the body caught the error of a failed statement (PostgreSQL aborts the transaction) ------
@pytest.mark.parametrize("inside", [False, True], ids=["own", "callers"])
async def test_async_session_body_that_caught_a_failed_statement(db: Db, inside: bool) -> None:
    """An AsyncSession's ``failed()`` looked only at SQLAlchemy's transaction, which a caught
    statement error leaves active: the block's exit raised psycopg's raw
    ``InFailedSqlTransaction`` (own transaction) or SQLAlchemy's ``InternalError`` (inside the
    caller's). Now it reads the driver's transaction status too: TransactionFailed."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from oncely.errors import TransactionFailed

    if db.dialect != "postgresql":
        pytest.skip("only PostgreSQL aborts a transaction at a failed statement")
    table, effects = _tables(db)
    engine = create_async_engine(db.url("async"))
    try:
        async with AsyncSession(engine) as c:
            if inside:
                await c.execute(text(f"INSERT INTO {effects} (k) VALUES ('caller')"))
            with pytest.raises(TransactionFailed):
                async with transaction(c, operation="spl.op", key="k3", scope="s", table=table):
                    await c.execute(text(f"INSERT INTO {effects} (k) VALUES ('body')"))
                    with contextlib.suppress(sqlalchemy.exc.DBAPIError):
                        await c.execute(text("SELECT 1 / 0"))
            await c.commit()
        assert "body" not in _rows(db, effects)
        assert _recorded(db, table) == 0
    finally:
        await engine.dispose()
