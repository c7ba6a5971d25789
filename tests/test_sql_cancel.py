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
from oncely.errors import TransactionLost
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


# -- a cancellation after the server released the block's savepoint ------------------------------
# Red team 11: cancelled after the pipelined key INSERT + RELEASE SAVEPOINT ran on the server but
# before psycopg read the replies, the rollback found no savepoint; oncely rolled the caller's
# whole transaction back and the cancellation hid it, so the caller's next commit went without
# its earlier writes. A proxy between psycopg and PostgreSQL holds the server's replies back.
PG_HOST, PG_PORT = "127.0.0.1", 5432


class _SlowReplies:
    """A TCP proxy to PostgreSQL: client bytes pass at once, server bytes wait ``delay``
    seconds (0 unless set) before they are forwarded."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(PG_HOST, PG_PORT)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while data := await src.read(65536):
                    if slow and self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (
            asyncio.ensure_future(pump(reader, up_writer, False)),
            asyncio.ensure_future(pump(up_reader, writer, True)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _pg_dsn(port: int) -> str:
    return f"host={PG_HOST} port={port} dbname=test user=postgres"


@pytest.mark.serial  # the cancel must land 0.1 s into a leave: a busy neighbour could delay it
def test_a_cancellation_after_the_savepoint_release_raises_transaction_lost() -> None:
    """The caller writes 'c', then runs a block (a savepoint in its transaction) under
    ``asyncio.timeout``; the timeout lands while psycopg waits for the replies of the block's
    key INSERT + RELEASE SAVEPOINT, which the server already ran. The caller's transaction is
    rolled back as a whole: the caller gets TransactionLost (not TimeoutError), the task is not
    left cancelled, nothing of the transaction is committed, and a retry runs the effect once."""
    psycopg = pytest.importorskip("psycopg")

    suffix = uuid.uuid4().hex[:8]
    effects, keys = f"cl_effects_{suffix}", f"cl_keys_{suffix}"
    key = uuid.uuid4().hex

    async def block(conn: Any, tag: str) -> None:
        async with oncely.sql.transaction(
            conn, operation="op", key=key, scope=key, table=keys
        ) as tx:
            if not tx.replayed:
                await conn.execute(f"INSERT INTO {effects} (k, tag) VALUES (%s, %s)", (key, tag))
                tx.set_result({"tag": tag})

    async def scenario(proxy: _SlowReplies) -> None:
        setup = await psycopg.AsyncConnection.connect(_pg_dsn(PG_PORT), autocommit=True)
        try:
            await setup.execute(f"CREATE TABLE {effects} (k VARCHAR(64), tag VARCHAR(16))")
            await oncely.sql.acreate_tables(setup, table=keys)
            conn = await psycopg.AsyncConnection.connect(_pg_dsn(proxy.port))
            try:
                await conn.execute(f"INSERT INTO {effects} (k, tag) VALUES (%s, %s)", (key, "c"))
                loop = asyncio.get_running_loop()
                with pytest.raises(TransactionLost) as raised:
                    async with asyncio.timeout(None) as timeout:
                        # armed once the body ran: only the leave is left to cancel
                        async with oncely.sql.transaction(
                            conn, operation="op", key=key, scope=key, table=keys
                        ) as tx:
                            assert not tx.replayed
                            await conn.execute(
                                f"INSERT INTO {effects} (k, tag) VALUES (%s, %s)", (key, "a")
                            )
                            tx.set_result({"tag": "a"})  # the leave: UPDATE + RELEASE, pipelined
                            # the leave's replies come 0.5 s late; the timeout lands 0.1 s in
                            proxy.delay = 0.5
                            timeout.reschedule(loop.time() + 0.1)
                assert "cancelled while oncely was closing it" in str(raised.value)
                assert "rolled back as a whole" in str(raised.value)
                assert isinstance(raised.value.__cause__, TransactionLost)
                task = asyncio.current_task()
                assert task is not None and task.cancelling() == 0
                proxy.delay = 0.0
                # the caller goes on as the old code let it: its next write and commit must not
                # carry its earlier row silently: 'c' is gone with the rolled back transaction,
                # and the caller was told so
                await conn.execute(f"INSERT INTO {effects} (k, tag) VALUES (%s, %s)", (key, "u"))
                await conn.commit()
            finally:
                await conn.close()
            rows = await setup.execute(f"SELECT tag FROM {effects} WHERE k = %s", (key,))
            assert sorted(t for (t,) in await rows.fetchall()) == ["u"]
            # the key is not recorded: a retry (the caller runs its transaction again) runs once
            for tag in ("r", "r2"):
                retry = await psycopg.AsyncConnection.connect(_pg_dsn(PG_PORT))
                try:
                    await block(retry, tag)
                    await retry.commit()
                finally:
                    await retry.close()
            rows = await setup.execute(f"SELECT tag FROM {effects} WHERE k = %s", (key,))
            assert sorted(t for (t,) in await rows.fetchall()) == ["r", "u"]
        finally:
            await setup.execute(f"DROP TABLE IF EXISTS {effects}")
            await setup.execute(f"DROP TABLE IF EXISTS {keys}")
            await setup.close()

    async def main() -> None:
        proxy = _SlowReplies()
        await proxy.start()
        try:
            await scenario(proxy)
        finally:
            await proxy.close()

    asyncio.run(main())
