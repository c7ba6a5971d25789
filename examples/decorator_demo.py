"""oncely demo on the embedded default (SQLite): many duplicate calls in, one execution out.

Run with ``python examples/decorator_demo.py`` (``make demo`` runs the shop demo, oncely.demo).
It charges three orders through a decorated ``charge`` function while
16 threads and 2 extra processes retry each order at the same time, then shows a retry with a
changed amount being refused, and a failed call that a retry runs again.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import sys
import tempfile
import threading
from decimal import Decimal
from pathlib import Path

from oncely import IdempotencyKeyMismatch, idempotent

WORK = Path(os.environ.get("ONCELY_DEMO_DIR") or tempfile.mkdtemp(prefix="oncely-demo-"))
STORE = f"sqlite:///{WORK}/oncely.db"
LEDGER = WORK / "ledger.db"


def ledger() -> sqlite3.Connection:
    conn = sqlite3.connect(LEDGER, timeout=30, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS charges (order_id TEXT, amount TEXT, pid INTEGER)")
    return conn


@idempotent(store=STORE, name="demo.charge", key=["order_id"], validate=["amount"])
def charge(order_id: str, amount: Decimal) -> dict[str, str]:
    """The side effect we must not repeat: one ledger row per real execution."""
    with ledger() as conn:
        conn.execute("INSERT INTO charges VALUES (?, ?, ?)", (order_id, str(amount), os.getpid()))
    return {"order_id": order_id, "charged": str(amount), "by_pid": str(os.getpid())}


def storm(order_ids: list[str], threads: int) -> list[dict[str, str]]:
    results: list[dict[str, str]] = []
    lock = threading.Lock()

    def worker(order_id: str) -> None:
        result = charge(order_id, Decimal("19.99"))
        with lock:
            results.append(result)

    pool = [threading.Thread(target=worker, args=(o,)) for o in order_ids for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


def child(order_ids: list[str]) -> None:
    storm(order_ids, threads=4)


def main() -> int:
    orders = ["order-1001", "order-1002", "order-1003"]
    print(f"store: {STORE}")
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=child, args=(orders,)) for _ in range(2)]
    for p in children:
        p.start()
    results = storm(orders, threads=16)
    for p in children:
        p.join()
    calls = len(results) + 2 * 4 * len(orders)
    rows = ledger().execute("SELECT order_id, COUNT(*) FROM charges GROUP BY order_id").fetchall()
    print(f"{calls} calls for {len(orders)} orders from 3 processes -> ledger rows per order:")
    for order_id, count in rows:
        print(f"  {order_id}: {count} charge(s)")
    assert all(count == 1 for _, count in rows) and len(rows) == len(orders)
    assert len({r["by_pid"] for r in results if r["order_id"] == "order-1001"}) == 1

    try:
        charge("order-1001", Decimal("999.00"))
    except IdempotencyKeyMismatch as exc:
        print(f"retry with a different amount refused: {type(exc).__name__}")

    attempts: list[int] = []

    @idempotent(store=STORE, name="demo.flaky", key=["order_id"])
    def flaky(order_id: str) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("payment provider timed out")
        return "paid"

    try:
        flaky("order-2001")
    except ConnectionError:
        print("first attempt failed -> key released")
    retry, again = flaky("order-2001"), flaky("order-2001")
    print(f"retry: {retry}, again: {again} ({len(attempts)} executions)")
    print("ok: duplicates in, one execution out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
