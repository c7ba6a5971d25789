"""Red-team findings (redteam2) on the async faces of oncely.sql.transaction (psycopg
AsyncConnection, real PostgreSQL): each test failed before branch fix2 (xfail reasons: git
history)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import oncely.sql

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
APP = "oncely-redteam2"


def test_cancelling_a_waiting_claim_rolls_back_the_block_it_began() -> None:
    import psycopg

    tag = uuid.uuid4().hex[:10]
    keys = f"okeys_{tag}"

    async def main() -> tuple[bool, object, int]:
        a = await psycopg.AsyncConnection.connect(PG_URL, application_name=APP)
        b = await psycopg.AsyncConnection.connect(PG_URL, application_name=APP)
        try:
            await oncely.sql.acreate_tables(a, table=keys)
            holding, release = asyncio.Event(), asyncio.Event()

            async def first() -> None:
                async with oncely.sql.transaction(
                    a, operation="test.op", key="x", scope="s", table=keys
                ) as tx:
                    tx.set_result(1)
                    holding.set()
                    await release.wait()

            async def second() -> tuple[bool, object]:
                async with oncely.sql.transaction(
                    b, operation="test.op", key="x", scope="s", table=keys
                ) as tx:
                    if not tx.replayed:
                        tx.set_result(2)
                return tx.replayed, tx.result

            t1 = asyncio.create_task(first())
            await holding.wait()
            waiting = asyncio.create_task(second())
            await asyncio.sleep(0.5)  # its claim now waits on first()'s uncommitted row
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            status = int(b.info.transaction_status)
            release.set()
            await t1
            replayed, result = await second()  # the connection must be usable again
            return replayed, result, status
        finally:
            await b.close()
            await a.execute(f"DROP TABLE IF EXISTS {keys}")
            await a.commit()
            await a.close()

    replayed, result, status = asyncio.run(main())
    assert status == int(psycopg.pq.TransactionStatus.IDLE)
    assert (replayed, result) == (True, 1)
