"""Fixtures for oncely.sql tests: real SQLite files, PostgreSQL and MariaDB, raw DB-API
connections (sync and async) and SQLAlchemy engines, with per-test table names that are dropped
afterwards. Load with ``pytest_plugins = ["sql_fixtures"]``."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import MYSQL_URL, POSTGRES_URL

DIALECTS = ["sqlite", "postgresql", "mysql"]
APP = "oncely-sql-test"


class Db:
    """One database of one dialect for one test."""

    def __init__(self, dialect: str, tmp_path: Path) -> None:
        self.dialect = dialect
        self.tag = uuid.uuid4().hex[:10]
        self.path = tmp_path / f"sql-{self.tag}.db"
        self.tables: list[str] = []
        self._opened: list[Any] = []

    def external(self) -> Db:
        """Another system's database: on SQLite a second file (one writer per file would
        otherwise block a phase calling out while it holds the write lock), else this one."""
        if self.dialect != "sqlite":
            return self
        other = Db.__new__(Db)
        other.__dict__.update(self.__dict__)
        other.path = self.path.with_suffix(".ext.db")
        other.tables, other._opened = [], []
        return other

    def name(self, base: str) -> str:
        """A table name unique to this test (dropped at the end)."""
        table = f"{base}_{self.tag}"
        self.tables.append(table)
        return table

    # -- connections -------------------------------------------------------------------------
    def connect(self, **options: Any) -> Any:
        """A new raw sync DB-API connection (sqlite3 / psycopg / PyMySQL)."""
        if self.dialect == "sqlite":
            conn: Any = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        elif self.dialect == "postgresql":
            import psycopg

            conn = psycopg.connect(POSTGRES_URL, application_name=APP, **options)
        else:
            import pymysql

            conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")
            if "isolation" in options:
                with conn.cursor() as cur:
                    cur.execute(f"SET SESSION TRANSACTION ISOLATION LEVEL {options['isolation']}")
        self._opened.append(conn)
        return conn

    def autocommit(self) -> Any:
        """A new raw sync connection in autocommit mode (sqlite3 ``isolation_level=None``,
        psycopg ``autocommit=True``, PyMySQL ``autocommit(True)``)."""
        if self.dialect == "sqlite":
            conn: Any = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self._opened.append(conn)
        elif self.dialect == "postgresql":
            conn = self.connect(autocommit=True)
        else:
            conn = self.connect()
            conn.autocommit(True)
        return conn

    def begin(self, conn: Any) -> None:
        """Open a transaction on an autocommit connection of :meth:`autocommit`."""
        if self.dialect == "mysql":
            conn.begin()
        else:
            conn.cursor().execute("BEGIN")

    async def aconnect(self) -> Any:
        """A new raw async connection (psycopg AsyncConnection / aiomysql); SQLite has none."""
        if self.dialect == "postgresql":
            import psycopg

            conn: Any = await psycopg.AsyncConnection.connect(POSTGRES_URL, application_name=APP)
        elif self.dialect == "mysql":
            import aiomysql

            conn = await aiomysql.connect(host="127.0.0.1", port=3306, user="root", db="test")
        else:
            pytest.skip("sqlite3 has no async driver")
        self._opened.append(conn)
        return conn

    async def aautocommit(self, begin: bool = False) -> Any:
        """A new raw async connection of :meth:`aconnect` in autocommit mode, with a
        transaction opened on it if ``begin``."""
        conn = await self.aconnect()
        if self.dialect == "postgresql":
            await conn.set_autocommit(True)
            if begin:
                await conn.execute("BEGIN")
        else:
            await conn.autocommit(True)
            if begin:
                await conn.begin()
        return conn

    async def aclose(self) -> None:
        """Close the async connections this test opened (call at the end of an async test,
        while its event loop still runs)."""
        for conn in [c for c in self._opened if _is_async(c)]:
            self._opened.remove(conn)
            with contextlib.suppress(Exception):
                if hasattr(conn, "ensure_closed"):  # aiomysql
                    await conn.ensure_closed()
                else:
                    await conn.close()

    def url(self, driver: str = "sync") -> str:
        """The SQLAlchemy URL of this database."""
        if self.dialect == "sqlite":
            return ("sqlite+aiosqlite:///" if driver == "async" else "sqlite:///") + str(self.path)
        if self.dialect == "postgresql":
            return POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://")
        scheme = "mysql+aiomysql://" if driver == "async" else "mysql+pymysql://"
        return MYSQL_URL.replace("mysql://", scheme)

    def run(self, sql: str) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh autocommitting connection and return its rows."""
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(sql)
            rows = [tuple(r) for r in cur.fetchall()] if cur.description else []
            conn.commit()
            return rows
        finally:
            conn.close()
            self._opened.remove(conn)

    def close(self) -> None:
        for conn in self._opened:
            if not _is_async(conn):
                with contextlib.suppress(Exception):
                    conn.close()
        for table in self.tables:
            with contextlib.suppress(Exception):
                self.run(f"DROP TABLE IF EXISTS {table}")


def _is_async(conn: Any) -> bool:
    return type(conn).__module__.startswith(("aiomysql",)) or "Async" in type(conn).__name__


@pytest.fixture(params=DIALECTS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    d = Db(request.param, tmp_path)
    yield d
    d.close()


@pytest.fixture
def make_db(tmp_path: Path) -> Iterator[Any]:
    made: list[Db] = []

    def make(dialect: str) -> Db:
        d = Db(dialect, tmp_path)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
