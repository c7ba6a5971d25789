"""Read-modify-write loops for the optimistic-locking tests, run by threads and by child
processes (importable by spawn): the oncely loop, and the source's two broken shapes."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from oncely.errors import StaleVersion
from oncely.optimistic import retry_on_conflict
from oncely.sql import versioned_update

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
PAUSE = 0.002  # the business logic between the read and the write (seconds)


def connect(dialect: str, path: str | Path | None = None) -> Any:
    if dialect == "sqlite":
        return sqlite3.connect(str(path), timeout=60, check_same_thread=False)
    if dialect == "postgresql":
        import psycopg

        return psycopg.connect(POSTGRES, application_name="oncely-optimistic-test")
    import pymysql

    return pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")


def _ph(conn: Any) -> str:
    return "?" if isinstance(conn, sqlite3.Connection) else "%s"


def read(conn: Any, table: str, row_id: int) -> tuple[int, int]:
    cur = conn.cursor()
    cur.execute(f"SELECT balance, version FROM {table} WHERE id = {_ph(conn)}", (row_id,))
    balance, version = cur.fetchone()
    cur.close()
    return int(balance), int(version)


def increments(
    conn: Any, table: str, row_id: int, times: int, shape: str, retry_on: Any = None
) -> int:
    """Add 1 to the balance ``times`` times; returns how many conflicts were retried.

    ``shape``: ``"oncely"`` (versioned_update + retry_on_conflict), ``"unchecked"`` (read,
    compute, UPDATE without a version check), ``"ignored"`` (the version check is in the
    UPDATE but its zero rows are ignored, as in the source).
    """
    retried = 0

    def count(*_: Any) -> None:
        nonlocal retried
        retried += 1

    @retry_on_conflict(
        attempts=5000,
        base_delay=0.001,
        max_delay=0.02,
        on_retry=count,
        retry_on=retry_on or StaleVersion,
    )
    def once() -> None:
        try:
            balance, version = read(conn, table, row_id)
            time.sleep(PAUSE)
            if shape == "oncely":
                versioned_update(conn, table, row_id, {"balance": balance + 1}, version)
            else:
                ph = _ph(conn)
                cur = conn.cursor()
                if shape == "unchecked":
                    cur.execute(
                        f"UPDATE {table} SET balance = {ph}, version = version + 1 WHERE id = {ph}",
                        (balance + 1, row_id),
                    )
                else:  # "ignored": checked, but nobody looks at the row count
                    cur.execute(
                        f"UPDATE {table} SET balance = {ph}, version = version + 1 "
                        f"WHERE id = {ph} AND version = {ph}",
                        (balance + 1, row_id, version),
                    )
                cur.close()
            conn.commit()
        except BaseException:
            conn.rollback()
            raise

    for _ in range(times):
        once()
    return retried


def process_worker(
    dialect: str, path: str | None, table: str, row_id: int, times: int, shape: str, start: float
) -> int:
    conn = connect(dialect, path)
    try:
        while time.time() < start:
            time.sleep(0.001)
        return increments(conn, table, row_id, times, shape)
    finally:
        conn.close()
