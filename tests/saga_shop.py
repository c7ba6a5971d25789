"""The docs' worked example as a test helper: an order saga (reserve stock, create the order,
wait for payment) on the test's own tables; also run in child processes that get kill -9."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from oncely.sql.connections import adapt
from oncely.statemachine import Machine, Transition
from oncely.statemachine.saga import Saga, Step, StepContext
from oncely.statemachine.sql import SqlStateMachine, Table

from sql_fixtures import Db

ORDER = Machine(
    "order",
    states=["pending", "paid", "cancelled"],
    initial="pending",
    transitions=[
        Transition("pay", "pending", "paid"),
        Transition("cancel", "pending", "cancelled"),
    ],
)


class OutOfStock(Exception):
    pass


class PaymentTimeout(Exception):
    pass


class Shop:
    def __init__(self, db: Db) -> None:
        self.db = db
        self.stock = f"stock_{db.tag}"
        self.orders = f"orders_{db.tag}"
        self.moves = f"moves_{db.tag}"
        self.orders_sm = SqlStateMachine(
            ORDER, Table(self.orders, "id", "status"), history_table=f"order_history_{db.tag}"
        )
        self.pause_at: tuple[str, str] | None = None  # (step, op): print PAUSED and hang
        self.flaky: dict[str, int] = {}  # step -> failures left before it succeeds
        self.rolls_back: str | None = None  # a step that calls conn.rollback() then writes

    def setup(self) -> None:
        for t in (self.stock, self.orders, self.moves):
            self.db.tables.append(t)
        self.db.tables += [f"order_history_{self.db.tag}", f"saga_{self.db.tag}",
                           f"saga_{self.db.tag}_history", f"barrier_{self.db.tag}"]  # fmt: skip
        self.db.run(f"CREATE TABLE {self.stock} (sku VARCHAR(20) PRIMARY KEY, qty INT)")
        self.db.run(f"INSERT INTO {self.stock} VALUES ('apple', 10)")
        self.db.run(
            f"CREATE TABLE {self.orders} (id VARCHAR(64) PRIMARY KEY, sku VARCHAR(20), qty INT, "
            "status VARCHAR(20))"
        )
        self.db.run(
            f"CREATE TABLE {self.moves} (saga_id VARCHAR(64), step VARCHAR(30), op VARCHAR(20))"
        )
        conn = self.db.connect()
        self.orders_sm.create_tables(conn)
        self.saga(paid=True).create_tables(conn)
        conn.close()

    # -- the steps -------------------------------------------------------------------------------
    def _move(self, ctx: StepContext) -> None:
        if self.rolls_back == ctx.step and ctx.op == "action":
            ctx.conn.rollback()  # ends the step's transaction: its barrier row with it
        adapt(ctx.conn).execute(
            f"INSERT INTO {self.moves} VALUES (:s, :step, :op)",
            {"s": ctx.saga_id, "step": ctx.step, "op": ctx.op},
        )
        if self.flaky.get(ctx.step, 0) > 0:
            self.flaky[ctx.step] -= 1
            raise ConnectionError("flaky step")  # after its writes: they must roll back
        if self.pause_at == (ctx.step, ctx.op):
            print("PAUSED", flush=True)
            time.sleep(60)

    def reserve(self, ctx: StepContext) -> None:
        res = adapt(ctx.conn).execute(
            f"UPDATE {self.stock} SET qty = qty - :n WHERE sku = :sku AND qty >= :n",
            {"n": ctx.data["qty"], "sku": ctx.data["sku"]},
        )
        if res.rowcount != 1:
            raise OutOfStock(ctx.data["sku"])
        self._move(ctx)

    def give_back(self, ctx: StepContext) -> None:
        adapt(ctx.conn).execute(
            f"UPDATE {self.stock} SET qty = qty + :n WHERE sku = :sku",
            {"n": ctx.data["qty"], "sku": ctx.data["sku"]},
        )
        self._move(ctx)

    def create_order(self, ctx: StepContext) -> None:
        adapt(ctx.conn).execute(
            f"INSERT INTO {self.orders} VALUES (:id, :sku, :n, 'pending')",
            {"id": ctx.saga_id, "sku": ctx.data["sku"], "n": ctx.data["qty"]},
        )
        self._move(ctx)

    def cancel_order(self, ctx: StepContext) -> None:
        # inside the step's transaction: a savepoint of it
        self.orders_sm.apply(ctx.conn, ctx.saga_id, "cancel", key=f"{ctx.saga_id}:cancel")
        self._move(ctx)

    def await_payment(self, ctx: StepContext) -> None:
        self._move(ctx)
        if not ctx.data.get("paid"):
            raise PaymentTimeout(f"order {ctx.saga_id} was not paid in time")

    def ship(self, ctx: StepContext) -> None:
        """After the pivot (await_payment): retriable, driven forward, never compensated."""
        self._move(ctx)

    def saga(self, paid: bool, ship: bool = False) -> Saga:
        after = [Step("ship", self.ship, retry_on=(ConnectionError,))] if ship else []
        return Saga(
            "order",
            [
                Step("reserve_stock", self.reserve, self.give_back, retry_on=(ConnectionError,)),
                Step(
                    "create_order",
                    self.create_order,
                    self.cancel_order,
                    retry_on=(ConnectionError,),
                ),
                Step("await_payment", self.await_payment, retry_on=(ConnectionError,)),
                *after,
            ],
            table=f"saga_{self.db.tag}",
            barrier_table=f"barrier_{self.db.tag}",
        )

    # -- what happened -----------------------------------------------------------------------------
    def qty(self) -> int:
        return int(self.db.run(f"SELECT qty FROM {self.stock} WHERE sku = 'apple'")[0][0])

    def moves_of(self, saga_id: str) -> list[tuple[str, str]]:
        rows = self.db.run(f"SELECT step, op FROM {self.moves} WHERE saga_id = '{saga_id}'")
        return sorted((str(a), str(b)) for a, b in rows)

    def order_status(self, saga_id: str) -> str | None:
        rows = self.db.run(f"SELECT status FROM {self.orders} WHERE id = '{saga_id}'")
        return str(rows[0][0]) if rows else None


def child(dialect: str, path: str, tag: str, saga_id: str, step: str, op: str) -> None:
    """Run the saga until ``(step, op)`` has written, then hang there (the test kills -9)."""
    db = Db(dialect, Path(path).parent)
    db.tag, db.path = tag, Path(path)
    shop = Shop(db)
    shop.pause_at = (step, op)
    conn = db.connect()
    data = {"sku": "apple", "qty": 3, "paid": op == "action"}
    try:
        shop.saga(paid=op == "action", ship=step == "ship").run(conn, saga_id, data)
    except Exception as exc:
        print(f"ENDED {exc!r}", flush=True)
    print("DONE", flush=True)
    os._exit(0)


if __name__ == "__main__":
    child(*sys.argv[1:7])
