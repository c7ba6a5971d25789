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


def tx_worker(db: Db, keys_table: str, effects: str, keys: list[str], progress: Any) -> None:
    """Run one transactional operation per key (two effect rows and a result each); the test
    kills this process with SIGKILL at a random point."""
    from oncely.sql import transaction

    conn = db.connect()
    for key in keys:
        with transaction(conn, key=key, scope="kill", table=keys_table) as tx:
            if tx.replayed:
                continue
            for part in (1, 2):
                conn.cursor().execute(
                    f"INSERT INTO {effects} (k, part) VALUES ({_ph(db)}, {_ph(db)})", (key, part)
                )
            tx.set_result({"key": key})
        progress.value += 1


def _ph(db: Db) -> str:
    return "?" if db.dialect == "sqlite" else "%s"
