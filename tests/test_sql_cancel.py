"""A cancelled oncely.sql block raises the cancellation, not the error of its rollback.

aiomysql closes a connection whose statement was cancelled ("Cancelled during execution"), so
the rollback oncely runs while the ``CancelledError`` leaves the block raised PyMySQL's
``InterfaceError``, which replaced the cancellation: ``asyncio.timeout`` raised that instead of
``TimeoutError`` (red team 10). Real servers: ``SELECT SLEEP(1)`` / ``pg_sleep(1)`` cancelled by
``asyncio.timeout``; nothing is committed, the key is not recorded, and a retry runs once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import oncely.sql
from oncely.messaging.inbox import Inbox

pytest_plugins = ["sql_fixtures"]

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout: 3.11+")

SLEEP = {"mysql": "SELECT SLEEP(1)", "postgresql": "SELECT pg_sleep(1)"}


async def _write(conn: Any, sql: str, *args: Any) -> None:
    if type(conn).__module__.startswith("aiomysql"):
        cur = await conn.cursor()
        await cur.execute(sql, args)
        await cur.close()
    else:
        await conn.execute(sql, args)


@pytest.mark.parametrize("kind", ["transaction", "inbox"])
@pytest.mark.parametrize("dialect", ["mysql", "postgresql"])
def test_a_cancelled_block_raises_the_cancellation_and_commits_nothing(
    make_db: Callable[[str], Any], dialect: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db(dialect)
    keys, inbox_table, effects = db.name("cx_keys"), db.name("cx_inbox"), db.name("cx_effects")
    inbox = Inbox(table=inbox_table)
    key = uuid.uuid4().hex

    def block(conn: Any) -> Any:
        if kind == "transaction":
            return oncely.sql.transaction(conn, operation="op", key=key, scope="s", table=keys)
        return inbox.areceive(conn, "consumer", key)

    async def run_once(conn: Any, tag: str) -> bool:
        """The block with one effect; True when its body ran (not a replay / duplicate)."""
        async with block(conn) as handle:
            first = not handle.replayed if kind == "transaction" else bool(handle)
            if first:
                await _write(conn, f"INSERT INTO {effects} (k, tag) VALUES (%s, %s)", key, tag)
        return first

    async def main() -> None:
        try:
            await scenario()
        finally:
            await db.aclose()

    async def scenario() -> None:
        setup = await db.aconnect()
        await _write(setup, f"CREATE TABLE {effects} (k VARCHAR(64), tag VARCHAR(16))")
        await setup.commit()
        if kind == "transaction":
            await oncely.sql.acreate_tables(setup, table=keys)
        else:
            await inbox.acreate_table(setup)
        await setup.commit()

        conn = await db.aconnect()
        with pytest.raises(TimeoutError) as raised:
            async with asyncio.timeout(0.05):
                async with block(conn):
                    await _write(conn, f"INSERT INTO {effects} (k, tag) VALUES (%s, %s)", key, "a")
                    await _write(conn, SLEEP[dialect])  # cancelled mid-statement
        assert isinstance(raised.value.__cause__, asyncio.CancelledError)
        if dialect == "mysql":  # aiomysql closed it: it cannot commit the block's writes later
            assert conn.closed

        check = db.run
        assert check(f"SELECT tag FROM {effects}") == []
        recorded = keys if kind == "transaction" else inbox_table
        assert check(f"SELECT count(*) FROM {recorded}") == [(0,)]

        retry = await db.aconnect()
        assert await run_once(retry, "r") is True
        assert await run_once(retry, "again") is False  # recorded: replayed / a duplicate
        assert check(f"SELECT tag FROM {effects}") == [("r",)]

    with caplog.at_level(logging.WARNING, logger="oncely"):
        asyncio.run(main())
    if dialect == "mysql":  # the rollback's failure is logged, not raised
        assert any(
            "CancelledError" in r.getMessage() and "InterfaceError" in r.getMessage()
            for r in caplog.records
        )
