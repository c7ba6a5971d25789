"""Red-team findings (redteam2) on recovery points, the inbox/outbox, the SQLAlchemy guard and
retry_on_conflict: each test failed before branch fix2 (xfail reasons: git history). Real
PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import oncely.sql
from oncely.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    StaleVersion,
    TransactionFailed,
)
from oncely.sql import Operation, create_tables, transaction


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "rt2_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]
    version: Mapped[int] = mapped_column(nullable=False)
    __mapper_args__ = {"version_id_col": version}


PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
APP = "oncely-redteam2"


def _pg(**options: Any) -> Any:
    import psycopg

    return psycopg.connect(PG_URL, application_name=APP, **options)


@pytest.fixture
def pg_tables() -> Iterator[tuple[str, list[str]]]:
    tag = uuid.uuid4().hex[:10]
    made: list[str] = []
    yield tag, made
    conn = _pg(autocommit=True)
    try:
        for table in made:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        conn.close()


def test_a_mismatched_retry_does_not_lock_out_the_genuine_one(
    pg_tables: tuple[str, list[str]],
) -> None:
    tag, made = pg_tables
    keys = f"okeys_{tag}"
    made.append(keys)
    conn = _pg()
    try:
        create_tables(conn, table=keys)
        op = Operation(f"book_{tag}", table=keys)
        calls = []

        @op.phase("only")
        def only(ctx: Any) -> str:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("transient failure: the client will retry")
            return "done"

        with pytest.raises(RuntimeError):
            op.run(conn, key="ride-1", scope="rider", params={"amount": 1})
        with pytest.raises(IdempotencyKeyMismatch):  # a buggy/other client reuses the key
            op.run(conn, key="ride-1", scope="rider", params={"amount": 2})
        # the real client's retry must resume at once, as after any failed phase
        assert op.run(conn, key="ride-1", scope="rider", params={"amount": 1}) == "done"
    finally:
        conn.close()


def test_a_block_whose_transaction_failed_inside_raises_transaction_failed(
    pg_tables: tuple[str, list[str]],
) -> None:
    import psycopg

    tag, made = pg_tables
    keys, pay = f"okeys_{tag}", f"pay_{tag}"
    made += [keys, pay]
    conn = _pg()
    try:
        create_tables(conn, table=keys)
        conn.execute(f"CREATE TABLE {pay} (id INT PRIMARY KEY)")
        conn.commit()
        with (
            pytest.raises(TransactionFailed),
            transaction(conn, operation="test.op", key="k", scope="s", table=keys) as tx,
        ):
            conn.execute(f"INSERT INTO {pay} VALUES (1)")
            # the handler "handles" the duplicate and goes on
            with contextlib.suppress(psycopg.errors.UniqueViolation):
                conn.execute(f"INSERT INTO {pay} VALUES (1)")
            tx.set_result("ok")
        conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {keys}").fetchone() == (0,)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("box", "write"),
    [
        ("inbox", lambda inbox, conn: inbox.accept(conn, "billing", "m-1")),
        (
            "outbox",
            lambda outbox, conn: outbox.add(
                conn, "orders.created", b"{}", message_id="order-1-created"
            ),
        ),
    ],
)
def test_inbox_and_outbox_writes_outside_a_transaction_are_refused(
    pg_tables: tuple[str, list[str]], box: str, write: Callable[[Any, Any], object]
) -> None:
    from oncely.messaging.inbox import Inbox
    from oncely.messaging.outbox import Outbox

    tag, made = pg_tables
    table = f"{box}_{tag}"
    target = (Inbox if box == "inbox" else Outbox)(table=table)
    made.append(table)
    conn = _pg(autocommit=True)
    try:
        target.create_table(conn)
        with pytest.raises(ConfigurationError):
            write(target, conn)
        # had it been written, the row would be durable before any effect ran
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    finally:
        conn.close()


def test_guard_versioned_covers_upserts(tmp_path: Any) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.dialects.sqlite import insert
    from sqlalchemy.orm import Session
    from sqlalchemy.orm.exc import StaleDataError

    from oncely.errors import VersionBypass
    from oncely.sql.sqlalchemy import guard_versioned

    guard_versioned(Base)
    engine = create_engine(f"sqlite:///{tmp_path / 'guard.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Account(id=1, balance=100))
        s.commit()
    early = Session(engine)
    account = early.get(Account, 1)
    assert account is not None
    with Session(engine) as s:
        upsert = insert(Account).values(id=1, balance=0, version=1)
        try:
            s.execute(upsert.on_conflict_do_update(index_elements=["id"], set_={"balance": 0}))
            s.commit()
        except VersionBypass:
            return  # refusing the upsert is right too
    account.balance += 10
    with pytest.raises(StaleDataError):  # the upsert's balance=0 must not be overwritten
        early.commit()
    early.close()
    engine.dispose()


def test_retry_on_conflict_retries_an_async_callable_object() -> None:
    from oncely.optimistic import retry_on_conflict

    class Handler:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(self) -> str:
            self.calls += 1
            if self.calls < 3:
                raise StaleVersion("accounts id=1", 1, 2)
            return "ok"

    handler = Handler()
    wrapped = retry_on_conflict(handler, attempts=5, base_delay=0.0)

    async def main() -> Any:
        out = wrapped()
        return await out if asyncio.iscoroutine(out) else out

    assert asyncio.run(main()) == "ok"
    assert handler.calls == 3


def test_reap_keeps_a_fresh_record(pg_tables: tuple[str, list[str]]) -> None:
    """Held: reap with the default retention keeps a record finished just now."""
    tag, made = pg_tables
    keys = f"okeys_{tag}"
    made.append(keys)
    conn = _pg()
    try:
        create_tables(conn, table=keys)
        with transaction(conn, operation="test.op", key="k", scope="s", table=keys) as tx:
            tx.set_result(1)
        assert oncely.sql.reap(conn, table=keys) == 0
    finally:
        conn.close()
