"""insert_once on real SQLite, PostgreSQL and MariaDB: one row whatever the concurrency, every
caller gets that row, a duplicate is never an exception; bad input gives typed errors."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from oncely.errors import ConfigurationError, InvalidIdentifier, UnknownColumn, UnknownTable
from oncely.sql import ainsert_once, insert_once

from sql_fixtures import Db
from sql_workers import insert_once_worker

pytest_plugins = ["sql_fixtures"]


def _orders(db: Db) -> str:
    table = db.name("orders")
    key = "INTEGER PRIMARY KEY" if db.dialect == "sqlite" else "SERIAL PRIMARY KEY"
    if db.dialect == "mysql":
        key = "INTEGER AUTO_INCREMENT PRIMARY KEY"
    db.run(
        f"CREATE TABLE {table} (id {key}, order_no VARCHAR(40) NOT NULL UNIQUE, "
        "amount INTEGER NOT NULL)"
    )
    return table


def test_created_then_duplicate_returns_the_same_row(db: Db) -> None:
    table = _orders(db)
    conn = db.connect()
    row, created = insert_once(conn, table, {"order_no": "A-1", "amount": 5}, unique=("order_no",))
    assert created and row["order_no"] == "A-1" and row["amount"] == 5
    conn.commit()
    again, created2 = insert_once(
        conn, table, {"order_no": "A-1", "amount": 7}, unique=("order_no",)
    )
    assert not created2 and again == row
    conn.commit()
    assert db.run(f"SELECT COUNT(*) FROM {table}") == [(1,)]


def test_mariadb_reads_the_unique_index_once_per_connection(make_db: Any) -> None:
    """The MariaDB path checks the unique index in information_schema (no ON CONFLICT target),
    but only on a connection's first call for a table: a later insert is one round trip."""
    db = make_db("mysql")
    table = _orders(db)
    conn = db.connect()

    def selects() -> int:
        with conn.cursor() as cur:
            cur.execute("SHOW SESSION STATUS LIKE 'Com_select'")
            return int(cur.fetchone()[1])

    insert_once(conn, table, {"order_no": "B-1", "amount": 1}, unique=("order_no",))
    conn.commit()
    before = selects()
    _, created = insert_once(conn, table, {"order_no": "B-2", "amount": 2}, unique=("order_no",))
    conn.commit()
    assert created
    assert selects() == before  # INSERT ... RETURNING only: no schema read, no re-read
    other = db.connect()  # a new connection checks again (and still refuses a missing index)
    with pytest.raises(ConfigurationError):
        insert_once(other, table, {"amount": 3, "order_no": "B-3"}, unique=("amount",))


def test_32_threads_one_row_everyone_gets_it(db: Db) -> None:
    table = _orders(db)
    barrier = threading.Barrier(32)

    def one(n: int) -> tuple[Any, ...]:
        conn = db.connect()
        try:
            barrier.wait(30)
            row, created = insert_once(
                conn, table, {"order_no": "A-1", "amount": n}, unique=("order_no",)
            )
            conn.commit()
            return (row["id"], row["amount"], created)
        finally:
            conn.close()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert sum(created for _, _, created in results) == 1
    assert len({(i, a) for i, a, _ in results}) == 1
    assert db.run(f"SELECT COUNT(*) FROM {table}") == [(1,)]


@pytest.mark.slow
def test_32_processes_one_row_everyone_gets_it(db: Db) -> None:
    table = _orders(db)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(32), ctx.Queue()
    procs = [
        ctx.Process(target=insert_once_worker, args=(db, table, barrier, n, out)) for n in range(32)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(created for _, _, created in results) == 1
    assert len({(i, a) for i, a, _ in results}) == 1
    assert db.run(f"SELECT COUNT(*) FROM {table}") == [(1,)]


def test_postgres_serializable_conflict_is_retryable(make_db: Any) -> None:
    from oncely.sql import retryable

    db = make_db("postgresql")
    table = _orders(db)
    a, b = db.connect(), db.connect()
    b.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    b.execute("SELECT 1").fetchall()  # b's snapshot predates a's row
    insert_once(a, table, {"order_no": "A-1", "amount": 1}, unique=("order_no",))
    a.commit()
    with pytest.raises(Exception) as info:
        insert_once(b, table, {"order_no": "A-1", "amount": 2}, unique=("order_no",))
    assert retryable(info.value)
    b.rollback()
    row, created = insert_once(b, table, {"order_no": "A-1", "amount": 2}, unique=("order_no",))
    assert not created and row["amount"] == 1


async def test_async_twin(db: Db) -> None:
    table = _orders(db)
    conn = await db.aconnect()
    row, created = await ainsert_once(
        conn, table, {"order_no": "B-1", "amount": 1}, unique=("order_no",)
    )
    again, created2 = await ainsert_once(
        conn, table, {"order_no": "B-1", "amount": 2}, unique=("order_no",)
    )
    assert created and not created2 and again == row
    await conn.commit()
    await db.aclose()


def test_sqlalchemy_session(db: Db) -> None:
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    table = _orders(db)
    engine = create_engine(db.url())
    try:
        with Session(engine) as session:
            _, created = insert_once(
                session, table, {"order_no": "C-1", "amount": 1}, unique=("order_no",)
            )
            _, created2 = insert_once(
                session, table, {"order_no": "C-1", "amount": 1}, unique=("order_no",)
            )
            session.commit()
        assert created and not created2
    finally:
        engine.dispose()


def test_bad_input_is_typed_and_writes_nothing(db: Db) -> None:
    table = _orders(db)
    conn = db.connect()
    with pytest.raises(InvalidIdentifier):
        insert_once(conn, f"{table}; DROP TABLE x", {"order_no": "A"}, unique=("order_no",))
    with pytest.raises(InvalidIdentifier):
        insert_once(conn, table, {"order_no": "A", "amount = 1 --": 1}, unique=("order_no",))
    with pytest.raises(ConfigurationError, match="non-NULL"):
        insert_once(conn, table, {"amount": 1}, unique=("order_no",))
    with pytest.raises(UnknownTable):
        insert_once(conn, f"nope_{db.tag}", {"order_no": "A"}, unique=("order_no",))
    conn.rollback()
    with pytest.raises(UnknownColumn):
        insert_once(conn, table, {"order_no": "A", "nope": 1}, unique=("order_no",))
    conn.rollback()
    if db.dialect != "mysql":  # MySQL's INSERT names no conflict target
        with pytest.raises(ConfigurationError, match="no unique constraint"):
            insert_once(conn, table, {"order_no": "A", "amount": 1}, unique=("amount",))
        conn.rollback()
    conn.commit()
    assert db.run(f"SELECT COUNT(*) FROM {table}") == [(0,)]


def test_failed_transaction_is_refused(make_db: Any) -> None:
    from oncely.errors import TransactionFailed

    db = make_db("postgresql")
    table = _orders(db)
    conn = db.connect()
    with pytest.raises(Exception, match="division by zero"):
        conn.execute("SELECT 1/0")
    with pytest.raises(TransactionFailed, match="roll it back"):
        insert_once(conn, table, {"order_no": "A", "amount": 1}, unique=("order_no",))
    conn.rollback()
    assert insert_once(conn, table, {"order_no": "A", "amount": 1}, unique=("order_no",))[1]


def test_a_missing_unique_constraint_keeps_the_callers_transaction(db: Db) -> None:
    """unique= naming columns with no unique constraint, inside the caller's transaction that
    already wrote: ConfigurationError, and the caller's transaction is still usable and
    commits its earlier write. On PostgreSQL the failing ON CONFLICT used to abort the
    transaction, and psycopg's commit() then rolled it back without an error."""
    table = _orders(db)
    conn = db.connect()
    cur = conn.cursor()
    mark = "?" if db.dialect == "sqlite" else "%s"
    cur.execute(f"INSERT INTO {table} (order_no, amount) VALUES ({mark}, 1)", ("earlier",))
    cur.close()
    with pytest.raises(ConfigurationError, match="no unique constraint"):
        insert_once(conn, table, {"order_no": "X", "amount": 5}, unique=("amount",))
    # the same transaction goes on: a correct call works, and both writes commit
    row, created = insert_once(conn, table, {"order_no": "Y", "amount": 6}, unique=("order_no",))
    assert created and row["order_no"] == "Y"
    conn.commit()
    rows = db.run(f"SELECT order_no FROM {table}")
    assert sorted(r[0] for r in rows) == ["Y", "earlier"]


def test_postgres_missing_table_keeps_the_callers_transaction(make_db: Any) -> None:
    db = make_db("postgresql")
    table = _orders(db)
    conn = db.connect()
    conn.execute(f"INSERT INTO {table} (order_no, amount) VALUES ('earlier', 1)")
    with pytest.raises(UnknownTable):
        insert_once(conn, f"nothere_{db.tag}", {"k": 1}, unique=("k",))
    conn.commit()
    assert db.run(f"SELECT order_no FROM {table}") == [("earlier",)]


def test_postgres_checks_the_arbiter_once_per_connection(make_db: Any) -> None:
    """A connection's first call for (table, columns) runs in a savepoint (the refusal of a
    missing arbiter cannot abort the caller's transaction; red team 18 replaced the catalog
    lookup, which checked neither the values columns nor the values): every later call is the
    one INSERT ... ON CONFLICT statement."""
    import psycopg

    sent: list[str] = []

    class Counting(psycopg.Cursor[Any]):
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append(str(query))
            return super().execute(query, *args, **kwargs)

    db = make_db("postgresql")
    table = _orders(db)
    conn = db.connect(cursor_factory=Counting)
    insert_once(conn, table, {"order_no": "C-1", "amount": 1}, unique=("order_no",))
    assert len(sent) == 3 and "SAVEPOINT" in sent[0] and "RELEASE" in sent[2], sent
    sent.clear()
    insert_once(conn, table, {"order_no": "C-2", "amount": 2}, unique=("order_no",))
    insert_once(conn, table, {"order_no": "C-1", "amount": 1}, unique=("order_no",))
    conn.commit()
    assert len(sent) == 2 and not any("SAVEPOINT" in s for s in sent)  # one statement each
    # a unique index that ON CONFLICT cannot use as its arbiter is refused the same way
    db.run(f"CREATE UNIQUE INDEX part_{db.tag} ON {table} (amount) WHERE amount > 100")
    with pytest.raises(ConfigurationError):
        insert_once(conn, table, {"order_no": "C-3", "amount": 200}, unique=("amount",))
    conn.rollback()


def test_mariadb_first_inserter_rolls_back_waiters_get_the_row_or_database_busy(
    make_db: Any,
) -> None:
    """What docs/sql.md states: when the first inserter rolls back, InnoDB's deadlock detector
    refuses some of the callers waiting on its row (1213). Each refusal is DatabaseBusy
    (retryable), never a second row; run again, every caller gets the one row."""
    import time

    from oncely.errors import DatabaseBusy
    from oncely.sql.connections import retryable

    db = make_db("mysql")
    table = _orders(db)
    holder = db.connect()
    waiters = [db.connect() for _ in range(3)]
    insert_once(holder, table, {"order_no": "K", "amount": 1}, unique=("order_no",))
    outcome: list[Any] = []

    def call(conn: Any, amount: int) -> None:
        try:
            row, created = insert_once(
                conn, table, {"order_no": "K", "amount": amount}, unique=("order_no",)
            )
            conn.commit()
            outcome.append((created, row["amount"]))
        except BaseException as exc:
            conn.rollback()
            outcome.append(exc)

    threads = [threading.Thread(target=call, args=(c, 10 + i)) for i, c in enumerate(waiters)]
    for t in threads:
        t.start()
    watcher = db.connect()
    ids = tuple(c.thread_id() for c in waiters)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # every waiter waits on the holder's row lock
        with watcher.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM information_schema.INNODB_TRX "
                "WHERE trx_state = 'LOCK WAIT' AND trx_mysql_thread_id IN %s",
                (ids,),
            )
            if cur.fetchone()[0] == len(waiters):
                break
        watcher.rollback()
        time.sleep(0.01)
    holder.rollback()
    for t in threads:
        t.join(30)
    errors = [o for o in outcome if isinstance(o, BaseException)]
    assert len(outcome) == 3 and errors, outcome  # InnoDB refuses at least one waiter
    assert all(isinstance(e, DatabaseBusy) and retryable(e) for e in errors), errors
    answers = [o for o in outcome if isinstance(o, tuple)]
    for conn in waiters[: len(errors)]:  # run the refused calls again
        row, created = insert_once(
            conn, table, {"order_no": "K", "amount": 99}, unique=("order_no",)
        )
        conn.commit()
        answers.append((created, row["amount"]))
    assert sum(1 for created, _ in answers if created) == 1, answers
    assert len({a[1] for a in answers}) == 1  # every caller got the one row
    assert db.run(f"SELECT COUNT(*) FROM {table}") == [(1,)]


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_sqlalchemy_pooled_connection_is_checked_once(make_db: Any, dialect: str) -> None:
    """Under SQLAlchemy the check is remembered on the pooled DB-API connection: a new
    engine.connect() on the same pooled connection sends the one INSERT statement only."""
    import sqlalchemy as sa

    from conftest import MYSQL_URL, POSTGRES_URL

    db = make_db(dialect)
    table = _orders(db)
    url = POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://")
    if dialect == "mysql":
        url = MYSQL_URL.replace("mysql://", "mysql+pymysql://")
    engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    sent: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    try:
        for n in range(3):
            with engine.connect() as conn:
                sent.clear()
                insert_once(conn, table, {"order_no": f"S-{n}", "amount": n}, unique=("order_no",))
                conn.commit()
                checks = [s for s in sent if "SAVEPOINT" in s or "STATISTICS" in s]
                assert len(checks) == ((2 if dialect == "postgresql" else 1) if n == 0 else 0), sent
    finally:
        engine.dispose()
