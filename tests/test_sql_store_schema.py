"""What the two server SQL stores (:class:`~oncely.stores.postgres.PostgresStore`,
:class:`~oncely.stores.mysql.MySQLStore`) share beyond the store rules of
``test_store_conformance.py``: a schema that is missing, created by ``oncely init`` or on first
use, safely by many at once; and an unreachable server, reported fast without the password.

One test per rule, run against each real server (``ONCELY_TEST_POSTGRES``,
``ONCELY_TEST_MYSQL``); every test works in a table of its own and drops it afterwards.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from oncely.core.records import New, RecordKey
from oncely.errors import SchemaMissing, StoreUnavailable
from oncely.stores.base import Store

from conftest import MYSQL_URL, POSTGRES_URL


@dataclass(frozen=True)
class Server:
    """One SQL server kind: how to open its store and look at its tables from outside."""

    kind: str
    url: str
    #: the scheme its messages name (``oncely init <scheme>://…``)
    scheme: str
    open: Callable[..., Store]
    table_exists: Callable[[str], bool]
    drop: Callable[[str], None]
    #: options for a store that holds few connections (eight of them race in one test)
    few: dict[str, Any] = field(default_factory=dict)
    #: options for a store that gives up on an unreachable server fast, and how fast
    dead_options: dict[str, Any] = field(default_factory=dict)
    gives_up_within: float = 3.0


def _postgres() -> Server:
    psycopg = pytest.importorskip("psycopg")
    from oncely.stores.postgres import PostgresStore

    def drop(table: str) -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")

    def table_exists(table: str) -> bool:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            row = conn.execute("SELECT to_regclass(%s)", [table]).fetchone()
        return row is not None and row[0] is not None

    return Server(
        "postgres",
        POSTGRES_URL,
        "postgresql",
        PostgresStore,
        table_exists,
        drop,
        few={"min_size": 0},
    )


def _mysql() -> Server:
    pytest.importorskip("pymysql")
    pytest.importorskip("aiomysql")
    from mysql_admin import sql, table_exists
    from oncely.stores.mysql import MySQLStore

    def drop(table: str) -> None:
        sql(f"DROP TABLE IF EXISTS {table}, {table}_fences")

    return Server(
        "mysql",
        MYSQL_URL,
        "mysql",
        MySQLStore,
        table_exists,
        drop,
        dead_options={"timeout": 1.0},
        gives_up_within=2.0,
    )


@pytest.fixture(params=["postgres", "mysql"])
def server(request: pytest.FixtureRequest) -> Server:
    return _postgres() if request.param == "postgres" else _mysql()


@pytest.fixture
def table(server: Server) -> Iterator[str]:
    """A table name nobody created yet; dropped afterwards if a test created it."""
    name = f"oncely_test_{uuid.uuid4().hex[:12]}"
    yield name
    server.drop(name)


def fresh_key(scope: str = "tenant-a") -> RecordKey:
    return RecordKey.of(scope, f"order-{uuid.uuid4()}")


# -- schema --------------------------------------------------------------------------------------


def test_missing_schema_says_how_to_create_it(server: Server, table: str) -> None:
    s = server.open(server.url, table=table)
    try:
        with pytest.raises(SchemaMissing, match=rf"oncely init {server.scheme}://") as info:
            s.claim(fresh_key(), "fp", 30.0, 60.0)
        assert "create_schema=True" in str(info.value)
        with pytest.raises(SchemaMissing):
            s.check_schema()
        with pytest.raises(SchemaMissing):
            s.get(fresh_key())
        with pytest.raises(SchemaMissing):
            s.renew(fresh_key(), 1, 30.0)  # MySQL: a multi-statement transaction fails the same
        assert not server.table_exists(table)
        s.init_schema()  # type: ignore[attr-defined]
        s.init_schema()  # type: ignore[attr-defined]  # idempotent
        s.check_schema()
        assert isinstance(s.claim(fresh_key(), "fp", 30.0, 60.0), New)
        assert "CREATE TABLE IF NOT EXISTS" in s.schema_sql()  # type: ignore[attr-defined]
    finally:
        s.close()


async def test_missing_schema_async(server: Server, table: str) -> None:
    s: Any = server.open(server.url, table=table)
    try:
        with pytest.raises(SchemaMissing, match="oncely init"):
            await s.aclaim(fresh_key(), "fp", 30.0, 60.0)
        await s.ainit_schema()
        if server.kind == "mysql":  # PostgresStore has no async face of check_schema
            await s.acheck_schema()
        assert isinstance(await s.aclaim(fresh_key(), "fp", 30.0, 60.0), New)
    finally:
        await s.aclose()
        s.close()


def test_init_schema_is_safe_concurrently(server: Server, table: str) -> None:
    stores = [server.open(server.url, table=table, **server.few) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def init(s: Any) -> None:
        try:
            s.now()  # connect first so that the CREATE TABLEs race each other
            barrier.wait()
            s.init_schema()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with ThreadPoolExecutor(len(stores)) as pool:  # a thread each: they meet at the barrier
        list(pool.map(init, stores))
    try:
        assert errors == []
        assert server.table_exists(table)
        stores[0].check_schema()
        assert isinstance(stores[1].claim(fresh_key(), "fp", 30.0, 60.0), New)
    finally:
        for s in stores:
            s.close()


def test_create_schema_true_creates_the_table_on_first_use(server: Server, table: str) -> None:
    s = server.open(server.url, table=table, create_schema=True)
    try:
        assert not server.table_exists(table)
        assert isinstance(s.claim(fresh_key(), "fp", 30.0, 60.0), New)
        assert server.table_exists(table)
        s.check_schema()
    finally:
        s.close()


# -- an unreachable server -----------------------------------------------------------------------


def _dead(server: Server) -> Any:
    return server.open(f"{server.scheme}://oncely:s3cret@127.0.0.1:1/test", **server.dead_options)


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_unreachable_server_fails_fast_and_hides_the_password(server: Server) -> None:
    s = _dead(server)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            s.claim(fresh_key(), "fp", 30.0, 60.0)
        assert time.monotonic() - t0 < server.gives_up_within
        message = str(info.value)
        assert "s3cret" not in message
        assert f"{server.scheme}://oncely:***@127.0.0.1:1/test" in message
        assert "check that the server is running" in message
        with pytest.raises(StoreUnavailable):
            s.now()
    finally:
        s.close()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
async def test_unreachable_server_async(server: Server) -> None:
    s = _dead(server)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"cannot connect .*oncely:\*\*\*@") as info:
            await s.aclaim(fresh_key(), "fp", 30.0, 60.0)
        assert time.monotonic() - t0 < server.gives_up_within
        assert "s3cret" not in str(info.value)
        with pytest.raises(StoreUnavailable, match="cannot connect"):
            await s.aget(fresh_key())
    finally:
        await s.aclose()
        s.close()
