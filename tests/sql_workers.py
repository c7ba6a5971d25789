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
        with transaction(conn, operation="test.op", key=key, scope="kill", table=keys_table) as tx:
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


# -- recovery points: the docs' worked example (create ride, charge card, send receipt) ---------
def ride_operation(
    db: Db, tables: dict[str, str], kill_at: tuple[str, str] | None = None, lock_timeout=1.0
) -> Any:
    """The ride-booking operation of docs/sql.md; ``kill_at=(phase, "start"|"after_write")``
    SIGKILLs the process there (at a phase's start = right after the previous phase committed;
    after its writes = before its recovery point commits)."""
    import os
    import signal

    from oncely.sql import Operation, insert_once

    op = Operation("book_ride", table=tables["keys"], lock_timeout=lock_timeout)
    ph = _ph(db)

    def maybe_die(phase: str, when: str) -> None:
        if kill_at == (phase, when):
            os.kill(os.getpid(), signal.SIGKILL)

    @op.phase("ride_created")
    def create_ride(ctx: Any) -> None:
        maybe_die("ride_created", "start")
        ctx.conn.cursor().execute(
            f"INSERT INTO {tables['rides']} (k, origin) VALUES ({ph}, {ph})",
            (ctx.downstream_key, ctx.params["from"]),
        )
        ctx.state["ride"] = ctx.downstream_key[:12]
        maybe_die("ride_created", "after_write")

    @op.phase("charge_created")
    def charge(ctx: Any) -> None:
        maybe_die("charge_created", "start")
        # the card processor: another system, idempotent by the key we pass it
        card = db.external().connect()
        try:
            card.cursor().execute(f"INSERT INTO {tables['calls']} (k) VALUES ({ph})", ("c",))
            row, _ = insert_once(
                card,
                tables["charges"],
                {"idem": ctx.downstream_key, "amount": ctx.params["amount"]},
                unique=("idem",),
            )
            card.commit()
        finally:
            card.close()
        ctx.state["charge"] = row["id"]
        maybe_die("charge_created", "after_write")

    @op.phase("receipt_sent")
    def send_receipt(ctx: Any) -> dict[str, Any]:
        maybe_die("receipt_sent", "start")
        ctx.conn.cursor().execute(
            f"INSERT INTO {tables['receipts']} (k) VALUES ({ph})", (ctx.state["ride"],)
        )
        maybe_die("receipt_sent", "after_write")
        return {"ride": ctx.state["ride"], "charge": ctx.state["charge"]}

    return op


def ride_worker(db: Db, tables: dict[str, str], key: str, kill_at: tuple[str, str]) -> None:
    op = ride_operation(db, tables, kill_at)
    conn = db.connect()
    op.run(conn, key=key, scope="riders", params={"from": "A", "amount": 12})
