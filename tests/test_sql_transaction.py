"""oncely.sql.transaction on real SQLite, PostgreSQL and MariaDB: the claim, the writes and the
result commit together; repeats replay; concurrent duplicates never both write; kill -9 leaves
all or nothing; bad input gives typed errors and writes nothing."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import oncely.sql
from oncely.errors import (
    AutocommitConnection,
    ConfigurationError,
    IdempotencyKeyMismatch,
    InFlightError,
    InvalidKey,
    SchemaMissing,
    SerializationError,
    TransactionFailed,
    TransactionLost,
    UnsupportedConnection,
)
from oncely.sql import GLOBAL, create_tables, idempotent_transaction, transaction

from sql_fixtures import Db
from sql_workers import tx_worker

pytest_plugins = ["sql_fixtures"]


def _setup(db: Db) -> tuple[str, str]:
    keys = db.name("okeys")
    effects = db.name("effects")
    conn = db.connect()
    create_tables(conn, table=keys)
    conn.close()
    db.run(f"CREATE TABLE {effects} (k VARCHAR(64) NOT NULL, part INTEGER NOT NULL)")
    return keys, effects


def _ph(db: Db) -> str:
    return "?" if db.dialect == "sqlite" else "%s"


def _effect(db: Db, conn: Any, effects: str, key: str, part: int = 1) -> None:
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {effects} (k, part) VALUES ({_ph(db)}, {_ph(db)})", (key, part))


def _count(db: Db, effects: str, key: str | None = None) -> int:
    where = f" WHERE k = '{key}'" if key else ""
    return int(db.run(f"SELECT COUNT(*) FROM {effects}{where}")[0][0])


def test_commit_then_replay(db: Db) -> None:
    keys, effects = _setup(db)
    conn = db.connect()
    with transaction(conn, operation="test.op", key="k1", scope="tenant-a", table=keys) as tx:
        assert not tx.replayed and tx.owned
        _effect(db, conn, effects, "k1")
        tx.set_result({"paid": 10})
    assert not conn.in_transaction if db.dialect == "sqlite" else True
    assert _count(db, effects) == 1
    with transaction(conn, operation="test.op", key="k1", scope="tenant-a", table=keys) as tx:
        assert tx.replayed and tx.result == {"paid": 10}
        _effect(db, conn, effects, "k1")  # a body that ignores tx.replayed: rolled back
    assert _count(db, effects) == 1
    # another scope is another key space
    with transaction(conn, operation="test.op", key="k1", scope="tenant-b", table=keys) as tx:
        assert not tx.replayed
    # raw keys are never stored
    assert db.run(f"SELECT COUNT(*) FROM {keys} WHERE digest = 'k1'") == [(0,)]


def test_operations_have_their_own_key_spaces_and_payloads_are_checked(db: Db) -> None:
    """redteam4 sqltx_shared_keys.py: a refund given the charge's key returned the charge's
    result (its own insert rolled back), and a retry with amount 5000 replayed the charge of
    100. Now the operation is part of the key and the payload is checked."""
    keys, effects = _setup(db)
    conn = db.connect()

    def run(operation: str, key: str, amount: int) -> tuple[bool, Any]:
        with transaction(
            conn, operation=operation, key=key, scope="user-7", table=keys, payload=amount
        ) as tx:
            if tx.replayed:
                return True, tx.result
            _effect(db, conn, effects, f"{operation}:{key}", amount)
            tx.set_result({operation: amount})
        return False, tx.result

    assert run("charge", "order-42", 100) == (False, {"charge": 100})
    assert run("refund", "order-42", 100) == (False, {"refund": 100})
    assert run("charge", "order-42", 100) == (True, {"charge": 100})
    with pytest.raises(IdempotencyKeyMismatch):
        run("charge", "order-42", 5000)
    assert _count(db, effects) == 2
    assert not oncely.sql.adapt(conn).in_transaction() or db.dialect == "mysql"
    with pytest.raises(ConfigurationError, match="operation="):
        transaction(conn, operation="", key="k", scope="s", table=keys)
    with pytest.raises(ConfigurationError, match="operation="):
        transaction(conn, operation="a\x00b", key="k", scope="s", table=keys)
    with pytest.raises(TypeError):
        transaction(conn, key="k", scope="s", table=keys)  # type: ignore[call-arg]
    # the decorator named like a block is the same operation (one key space, by name)

    @idempotent_transaction(key="key", scope="user-7", table=keys, name="charge", validate=False)
    def charge(conn: Any, key: str) -> dict[str, int]:
        raise AssertionError("replays the block's charge")

    assert charge(conn, "order-42") == {"charge": 100}


def test_a_result_that_cannot_be_encoded_is_a_serialization_error(db: Db) -> None:
    # F09 (redteam3): tx.set_result(<circular>) raised a bare RecursionError.
    keys, effects = _setup(db)
    conn = db.connect()
    order: dict[str, Any] = {"id": "o-1"}
    order["self"] = order
    with (
        pytest.raises(SerializationError, match="circular"),
        transaction(conn, operation="test.op", key="k", scope=GLOBAL, table=keys) as tx,
    ):
        _effect(db, conn, effects, "k")
        tx.set_result(order)
    assert _count(db, effects) == 0  # rolled back with the transaction


def test_error_in_block_commits_nothing(db: Db) -> None:
    keys, effects = _setup(db)
    conn = db.connect()
    with (
        pytest.raises(RuntimeError),
        transaction(conn, operation="test.op", key="k", scope=GLOBAL, table=keys),
    ):
        _effect(db, conn, effects, "k")
        raise RuntimeError("boom")
    assert _count(db, effects) == 0
    assert db.run(f"SELECT COUNT(*) FROM {keys}") == [(0,)]
    with transaction(
        conn, operation="test.op", key="k", scope=GLOBAL, table=keys
    ) as tx:  # the retry runs again
        assert not tx.replayed
        _effect(db, conn, effects, "k")
    assert _count(db, effects) == 1


@pytest.mark.parametrize("with_result", [False, True])
def test_a_block_that_rolls_back_itself_commits_nothing_after(db: Db, with_result: bool) -> None:
    """Code in the block that calls conn.rollback() (an error path that "cleans up") and goes
    on writing removed the key's row from the transaction the block owns: the block checks
    the row before its commit (PostgreSQL: with the COMMIT, one round trip) and raises
    TransactionLost instead of committing the later write without the key (which every retry
    would then apply again; red-team F04, the same kind in oncely.sql)."""
    keys, effects = _setup(db)
    conn = db.connect()
    for _ in range(3):
        with (
            pytest.raises(TransactionLost),
            transaction(conn, operation="test.op", key="k", scope=GLOBAL, table=keys) as tx,
        ):
            _effect(db, conn, effects, "k", 1)
            conn.rollback()
            _effect(db, conn, effects, "k", 2)
            if with_result:
                tx.set_result({"paid": 1})
    assert _count(db, effects) == 0
    assert db.run(f"SELECT COUNT(*) FROM {keys}") == [(0,)]
    with transaction(
        conn, operation="test.op", key="k", scope=GLOBAL, table=keys
    ) as tx:  # a proper retry runs
        assert not tx.replayed
        _effect(db, conn, effects, "k")
        tx.set_result({"paid": 1})
    assert _count(db, effects) == 1
    conn.close()


def test_inside_the_callers_transaction_is_a_savepoint(db: Db) -> None:
    keys, effects = _setup(db)
    conn = db.connect()
    c = oncely.sql.adapt(conn)
    outer = c.enter()
    _effect(db, conn, effects, "outer")
    with (
        pytest.raises(RuntimeError),
        transaction(conn, operation="test.op", key="k", scope="s", table=keys) as tx,
    ):
        assert not tx.owned
        _effect(db, conn, effects, "k")
        raise RuntimeError
    with transaction(conn, operation="test.op", key="k2", scope="s", table=keys) as tx:
        _effect(db, conn, effects, "k2")
    assert _count(db, effects) == 0  # not committed yet: the caller's commit decides
    c.leave(outer, commit=True)
    assert _count(db, effects, "outer") == 1 and _count(db, effects, "k") == 0
    assert _count(db, effects, "k2") == 1


ISOLATIONS = [
    ("sqlite", None),
    ("postgresql", "READ COMMITTED"),
    ("postgresql", "SERIALIZABLE"),
    ("mysql", "REPEATABLE READ"),
    ("mysql", "READ COMMITTED"),
]


def _connect(db: Db, isolation: str | None) -> Any:
    if db.dialect == "postgresql" and isolation:
        from psycopg import IsolationLevel

        conn = db.connect()
        conn.isolation_level = IsolationLevel[isolation.replace(" ", "_")]
        return conn
    if db.dialect == "mysql":
        return db.connect(isolation=isolation)
    return db.connect()


@pytest.mark.parametrize(("dialect", "isolation"), ISOLATIONS)
def test_32_concurrent_duplicates_one_effect_31_replays(
    make_db: Any, dialect: str, isolation: str | None
) -> None:
    db = make_db(dialect)
    keys, effects = _setup(db)
    barrier = threading.Barrier(32)

    def one(n: int) -> tuple[bool, Any]:
        conn = _connect(db, isolation)
        try:
            barrier.wait(30)
            with transaction(conn, operation="test.op", key="order-1", scope="s", table=keys) as tx:
                if tx.replayed:
                    return True, tx.result
                _effect(db, conn, effects, "order-1")
                tx.set_result({"winner": n})
            return False, tx.result
        finally:
            conn.close()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert sum(replayed for replayed, _ in results) == 31
    assert len({r["winner"] for _, r in results}) == 1
    assert _count(db, effects) == 1


def test_wait_false_gives_in_flight(make_db: Any) -> None:
    for dialect in ("postgresql", "mysql"):
        db = make_db(dialect)
        keys, effects = _setup(db)
        a, b = db.connect(), db.connect()
        with transaction(a, operation="test.op", key="k", scope="s", table=keys):
            with (
                pytest.raises(InFlightError),
                transaction(b, operation="test.op", key="k", scope="s", table=keys, wait=False),
            ):
                pytest.fail("the duplicate ran")
            _effect(db, a, effects, "k")
        with transaction(b, operation="test.op", key="k", scope="s", table=keys, wait=False) as tx:
            assert tx.replayed


@pytest.mark.slow
def test_kill_9_at_random_points_leaves_all_or_nothing(db: Db) -> None:
    keys, effects = _setup(db)
    ctx = multiprocessing.get_context("fork")
    todo = [f"op-{i}" for i in range(600)]
    for _round in range(3):
        progress = ctx.Value("i", 0)
        proc = ctx.Process(target=tx_worker, args=(db, keys, effects, todo, progress))
        proc.start()
        target = random.randint(1, 60)  # kill somewhere inside the next operations
        while progress.value < target and proc.is_alive():
            threading.Event().wait(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        done = {k for (k,) in db.run(f"SELECT DISTINCT k FROM {effects}")}
        claimed = int(db.run(f"SELECT COUNT(*) FROM {keys}")[0][0])
        for key in done:  # every committed operation is whole
            assert _count(db, effects, key) == 2
        assert claimed == len(done)
    # the retry completes every operation exactly once
    proc = ctx.Process(target=tx_worker, args=(db, keys, effects, todo, ctx.Value("i", 0)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    assert _count(db, effects) == 2 * len(todo)
    assert db.run(f"SELECT COUNT(DISTINCT k) FROM {effects}") == [(len(todo),)]


def test_decorator_replays_and_retries_serialization_failures(make_db: Any) -> None:
    from psycopg import IsolationLevel

    db = make_db("postgresql")
    keys, effects = _setup(db)
    db.run(f"INSERT INTO {effects} (k, part) VALUES ('counter', 0)")
    calls = []

    @idempotent_transaction(key="request_id", scope=GLOBAL, table=keys, attempts=40)
    def bump(conn: Any, request_id: str) -> int:
        calls.append(request_id)
        cur = conn.execute(f"SELECT part FROM {effects} WHERE k = 'counter'")
        value = cur.fetchone()[0] + 1
        conn.execute(f"UPDATE {effects} SET part = %s WHERE k = 'counter'", (value,))
        return int(value)

    barrier = threading.Barrier(16)

    def one(n: int) -> int:
        conn = db.connect()
        conn.isolation_level = IsolationLevel.SERIALIZABLE
        try:
            barrier.wait(30)
            return bump(conn, request_id=f"r{n % 8}")
        finally:
            conn.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert db.run(f"SELECT part FROM {effects} WHERE k = 'counter'") == [(8,)]
    assert sorted(set(results)) == list(range(1, 9))
    assert len(calls) > 8  # some runs were rolled back by serialization failures and redone


async def test_async_faces(db: Db) -> None:
    keys, effects = _setup(db)
    conn = await db.aconnect()

    @idempotent_transaction(key="key", scope="s", table=keys)
    async def op(conn: Any, key: str) -> dict[str, int]:
        await oncely.sql.adapt(conn).aexecute(
            f"INSERT INTO {effects} (k, part) VALUES (:k, 1)", {"k": key}
        )
        return {"n": 1}

    assert await op(conn, key="a") == {"n": 1}
    assert await op(conn, key="a") == {"n": 1}
    for _ in range(2):  # the decorated function's key space is its own: "a" is new here
        async with transaction(conn, operation="test.op", key="a", scope="s", table=keys) as tx:
            if not tx.replayed:
                tx.set_result({"n": 2})
        assert tx.result == {"n": 2}
    assert _count(db, effects) == 1
    await db.aclose()


def test_sqlalchemy_session_and_async_session(db: Db) -> None:
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    keys, effects = _setup(db)
    engine = create_engine(db.url())
    try:
        for _ in range(2):
            with Session(engine) as session:
                with transaction(
                    session, operation="test.op", key="k", scope="s", table=keys
                ) as tx:
                    if not tx.replayed:
                        session.execute(text(f"INSERT INTO {effects} VALUES ('k', 1)"))
                        tx.set_result(1)
                assert tx.result == 1
        assert _count(db, effects) == 1
    finally:
        engine.dispose()


def test_bad_input_is_typed_and_commits_nothing(db: Db) -> None:
    keys, effects = _setup(db)
    conn = db.connect()
    with pytest.raises(InvalidKey, match="at most 255"):
        transaction(conn, operation="test.op", key="x" * 256, scope="s", table=keys)
    with pytest.raises(InvalidKey):
        transaction(conn, operation="test.op", key="", scope="s", table=keys)
    with pytest.raises(ConfigurationError, match="GLOBAL"):
        transaction(conn, operation="test.op", key="k", scope=None, table=keys)
    with pytest.raises(UnsupportedConnection):
        transaction(object(), operation="test.op", key="k", scope="s")
    # Text with no UTF-8 form: typed, like a NUL (before: a raw UnicodeEncodeError for the
    # payload, and an operation name holding a lone surrogate was accepted).
    with pytest.raises(InvalidKey, match="lone surrogate"):
        transaction(conn, operation="test.op", key="k", scope="s", payload={"a": "x\ud800y"})
    with pytest.raises(ConfigurationError, match="operation="):
        transaction(conn, operation="test.\udc80op", key="k", scope="s", table=keys)
    with (
        pytest.raises(SchemaMissing, match="create_tables"),
        transaction(conn, operation="test.op", key="k", scope="s", table=f"missing_{db.tag}"),
    ):
        pytest.fail("ran without a table")
    assert not oncely.sql.adapt(conn).in_transaction() or db.dialect == "mysql"
    if db.dialect == "postgresql":
        with pytest.raises(Exception, match="division by zero"):
            conn.execute("SELECT 1/0")
        with (
            pytest.raises(TransactionFailed, match="roll"),
            transaction(conn, operation="test.op", key="k", scope="s", table=keys),
        ):
            pytest.fail("ran in a failed transaction")
        conn.rollback()
    assert _count(db, effects) == 0
    assert db.run(f"SELECT COUNT(*) FROM {keys}") == [(0,)]


def test_psycopg_autocommit_connection(make_db: Any) -> None:
    """Refused with no transaction open (AutocommitConnection): a write after the block's own
    rollback() would commit at once; inside a transaction the caller opened it is a savepoint
    and works as before (tests/test_autocommit_refused.py covers every dialect)."""
    db = make_db("postgresql")
    keys, effects = _setup(db)
    conn = db.connect(autocommit=True)
    with (
        pytest.raises(AutocommitConnection),
        transaction(conn, operation="test.op", key="k", scope="s", table=keys),
    ):
        pytest.fail("ran on an autocommit connection")
    for _ in range(2):
        with (
            conn.transaction(),
            transaction(conn, operation="test.op", key="k", scope="s", table=keys) as tx,
        ):
            if not tx.replayed:
                _effect(db, conn, effects, "k")
                tx.set_result([1, 2])
        assert tx.result == [1, 2]
    with (
        pytest.raises(RuntimeError),
        conn.transaction(),
        transaction(conn, operation="test.op", key="k2", scope="s", table=keys),
    ):
        _effect(db, conn, effects, "k2")
        raise RuntimeError
    assert _count(db, effects) == 1 and not oncely.sql.adapt(conn).in_transaction()


async def test_sqlalchemy_async_session(db: Db) -> None:
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    keys, effects = _setup(db)
    engine = create_async_engine(db.url("async"))
    try:
        for _ in range(2):
            async with AsyncSession(engine) as session:
                async with transaction(
                    session, operation="test.op", key="k", scope="s", table=keys
                ) as tx:
                    if not tx.replayed:
                        await session.execute(text(f"INSERT INTO {effects} VALUES ('k', 1)"))
                        tx.set_result({"n": 1})
                assert tx.result == {"n": 1}
        assert _count(db, effects) == 1
    finally:
        await engine.dispose()


def test_set_result_on_a_replay_is_refused(make_db: Any) -> None:
    db = make_db("sqlite")
    keys, _ = _setup(db)
    conn = db.connect()
    with transaction(conn, operation="test.op", key="k", scope="s", table=keys) as tx:
        tx.set_result(1)
    with (
        pytest.raises(ConfigurationError, match="replayed"),
        transaction(conn, operation="test.op", key="k", scope="s", table=keys) as tx,
    ):
        tx.set_result(2)
    with transaction(conn, operation="test.op", key="k", scope="s", table=keys) as tx:
        assert tx.result == 1


def test_sqlalchemy_session_in_a_failed_transaction_is_refused(make_db: Any) -> None:
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    db = make_db("postgresql")
    keys, _ = _setup(db)
    engine = create_engine(db.url())
    try:
        with Session(engine) as session:
            with pytest.raises(Exception, match="division by zero"):
                session.execute(text("SELECT 1/0"))
            with (
                pytest.raises(TransactionFailed),
                transaction(session, operation="test.op", key="k", scope="s", table=keys),
            ):
                pytest.fail("ran in a failed transaction")
            session.rollback()
            with transaction(session, operation="test.op", key="k", scope="s", table=keys) as tx:
                assert not tx.replayed
    finally:
        engine.dispose()
