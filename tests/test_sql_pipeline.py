"""psycopg's pipeline mode in the caller's hands (``with conn.pipeline():``): a statement's
result is not known until the pipeline syncs, so every oncely decision read a result that was
not there yet (red team 21: a new message's ``Inbox.accept`` answered False while its row
committed: the message lost; a barrier answered EXECUTE twice; ``versioned_update`` said
NotFound while its UPDATE committed). Refused now, before anything is sent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from oncely.errors import UnsupportedConnection
from oncely.messaging.inbox import Inbox
from oncely.sql import insert_once, versioned_update
from oncely.statemachine.barrier import abarrier, barrier
from oncely.statemachine.barrier import create_table as create_barrier

from conftest import POSTGRES_URL


@pytest.fixture
def tables() -> Iterator[tuple[str, str, str]]:
    base = f"pipe_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_URL) as conn:
        conn.execute(f"CREATE TABLE {base} (id INT PRIMARY KEY, version BIGINT NOT NULL, n INT)")
        conn.execute(f"INSERT INTO {base} VALUES (1, 1, 0)")
        conn.execute(f"CREATE TABLE {base}_io (k TEXT PRIMARY KEY)")
        Inbox(table=f"{base}_ib").create_table(conn)
        create_barrier(conn, f"{base}_bar")
    yield base, f"{base}_ib", f"{base}_bar"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        for t in (base, f"{base}_io", f"{base}_ib", f"{base}_bar"):
            conn.execute(f"DROP TABLE IF EXISTS {t}")


def test_sync_calls_in_a_pipeline_are_refused_before_anything_is_sent(
    tables: tuple[str, str, str],
) -> None:
    base, inbox_table, barrier_table = tables
    inbox = Inbox(table=inbox_table)
    with psycopg.connect(POSTGRES_URL) as conn:
        with conn.pipeline():
            calls = {
                "accept": lambda: inbox.accept(conn, "c", "m1"),
                "barrier": lambda: barrier(conn, "g", "b", "try", table=barrier_table),
                "versioned_update": lambda: versioned_update(conn, base, 1, {"n": 1}, 1),
                "insert_once": lambda: insert_once(conn, f"{base}_io", {"k": "a"}, unique=("k",)),
            }
            for name, call in calls.items():
                with pytest.raises(UnsupportedConnection, match="pipeline"):
                    call()
                    pytest.fail(f"{name} was not refused")
        conn.commit()
        # nothing was written; outside the pipeline the same calls decide as usual
        assert conn.execute(f"SELECT count(*) FROM {inbox_table}").fetchone() == (0,)
        assert conn.execute(f"SELECT version, n FROM {base}").fetchone() == (1, 0)
        assert inbox.accept(conn, "c", "m1") is True
        assert inbox.accept(conn, "c", "m1") is False
        conn.commit()


def test_async_calls_in_a_pipeline_are_refused_before_anything_is_sent(
    tables: tuple[str, str, str],
) -> None:
    _, inbox_table, barrier_table = tables
    inbox = Inbox(table=inbox_table)

    async def scenario() -> None:
        conn = await psycopg.AsyncConnection.connect(POSTGRES_URL)
        try:
            async with conn.pipeline():
                with pytest.raises(UnsupportedConnection, match="pipeline"):
                    await inbox.aaccept(conn, "c", "m1")
                with pytest.raises(UnsupportedConnection, match="pipeline"):
                    await abarrier(conn, "g", "b", "try", table=barrier_table)
            await conn.commit()
            cur = await conn.execute(f"SELECT count(*) FROM {inbox_table}")
            assert await cur.fetchone() == (0,)
        finally:
            await conn.close()

    asyncio.run(scenario())
