"""Functions run in child processes by the oncely.sql tests (fork context: module level)."""

from __future__ import annotations

from typing import Any

from sql_fixtures import Db


def insert_once_worker(db: Db, table: str, barrier: Any, n: int, out: Any) -> None:
    from oncely.sql import insert_once

    conn = db.connect()
    try:
        barrier.wait(30)
        row, created = insert_once(
            conn, table, {"order_no": "A-1", "amount": n}, unique=("order_no",)
        )
        conn.commit()
        out.put((row["id"], row["amount"], created))
    finally:
        conn.close()
