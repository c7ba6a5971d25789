"""The shop's business database: products and stock, orders, the ledger, settlement runs.

One SQLite file in the work directory, shared by the web workers and the settlement processes:
WAL mode, a 15 s busy timeout, one connection per thread, and every write in one
``BEGIN IMMEDIATE`` transaction (a writer waits for the lock instead of failing on upgrade).

The **ledger** records every applied effect -- an order placed, a card charged, an order
settled -- as its own row, and never deduplicates: a double effect shows as two rows with the
same ``(kind, key)``. That is what the storm verifies. This module holds no protection of its
own; what keeps effects single is in the features (oncely), and in unprotected mode it is off.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oncely.errors import IllegalTransition
from oncely.locks import fenced_table_sql, fenced_update
from oncely.messaging.inbox import Inbox, now_sql
from oncely.messaging.outbox import Outbox
from oncely.sql import insert_once, versioned_update
from oncely.statemachine import Machine, Transition
from oncely.statemachine.barrier import barrier
from oncely.statemachine.barrier import create_table as create_barrier_table
from oncely.statemachine.sql import SqlStateMachine, Table

__all__ = ["ACCOUNTS", "ORDERS", "ORDER_MACHINE", "PRODUCTS", "Account", "Order", "ShopDB"]

#: sku -> (price in cents, initial stock in units)
PRODUCTS: dict[str, tuple[int, int]] = {f"sku-{i}": (100 * i, 1_000_000) for i in range(1, 9)}
#: the accounts the shop opens (balance 0, version 1); a few, so that credits contend
ACCOUNTS: tuple[str, ...] = tuple(f"acct-{i}" for i in range(1, 9))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    sku   TEXT PRIMARY KEY,
    price INTEGER NOT NULL,
    stock INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id             TEXT PRIMARY KEY,
    customer       TEXT NOT NULL,
    sku            TEXT NOT NULL,
    qty            INTEGER NOT NULL,
    amount         INTEGER NOT NULL,
    status         TEXT NOT NULL,
    request_key    TEXT NOT NULL,
    transaction_id TEXT,
    settled        INTEGER NOT NULL DEFAULT 0,
    created_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_to_settle ON orders (status, settled);
-- a paid-out order is never cancelled (no refund after the pay-out): checked inside the
-- cancelling UPDATE itself, so a cancel racing a settlement loses or wins as one statement
CREATE TRIGGER IF NOT EXISTS orders_settled_not_cancelled
BEFORE UPDATE OF status ON orders
WHEN NEW.status = 'cancelled' AND OLD.settled = 1
BEGIN SELECT RAISE(ABORT, 'order-settled'); END;
-- protected mode only: one order per request key, one charge per order (insert-once)
CREATE TABLE IF NOT EXISTS order_requests (
    request_key TEXT PRIMARY KEY,
    order_id    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS payments (
    order_id       TEXT PRIMARY KEY,
    transaction_id TEXT NOT NULL
);
-- the credit requests applied (protected mode: one per request key, insert-once)
CREATE TABLE IF NOT EXISTS credits (
    request_key TEXT PRIMARY KEY,
    account     TEXT NOT NULL,
    balance     INTEGER NOT NULL,
    version     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    id      TEXT PRIMARY KEY,
    balance INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS ledger (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    kind   TEXT NOT NULL,
    key    TEXT NOT NULL,
    entity TEXT NOT NULL,
    amount INTEGER NOT NULL,
    at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_kind_key ON ledger (kind, key);
CREATE TABLE IF NOT EXISTS settlement_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pid         INTEGER NOT NULL,
    fence       INTEGER,
    started_at  REAL NOT NULL,
    finished_at REAL,
    outcome     TEXT,
    orders      INTEGER NOT NULL DEFAULT 0
);
"""
FENCE_TABLE = "settlement_fence"

#: An order's life (protected mode moves it only through these transitions, one conditional
#: ``UPDATE`` each: :class:`oncely.statemachine.sql.SqlStateMachine`).
ORDER_MACHINE = Machine(
    "order",
    states=["placed", "paid", "shipped", "cancelled"],
    initial="placed",
    transitions=[
        Transition("pay", "placed", "paid"),
        Transition("ship", "paid", "shipped"),
        Transition("cancel", ("placed", "paid"), "cancelled"),
        Transition("expire", "placed", "cancelled"),  # the order timeout: unpaid only
    ],
)
ORDERS = SqlStateMachine(ORDER_MACHINE, Table("orders", id_column="id", state_column="status"))
#: The barrier branch of an order's stock reservation: ``action`` when the order takes the
#: stock, ``compensate`` when a cancel gives it back (DTM's sub-transaction barrier).
STOCK_BRANCH = "stock"
#: shipping: the request writes its message in the outbox, in the order's transaction; the
#: carrier's consumer records each message in the inbox, in the dispatch's transaction
OUTBOX = Outbox(table="shop_outbox")
INBOX = Inbox(table="shop_inbox")
CARRIER = "carrier"
#: The database's clock (seconds since the epoch) in SQL: what orders are stamped and expired
#: by, so a web worker or settlement process with a skewed clock never expires an order early.
_NOW = now_sql("sqlite")


@contextmanager
def _settled_is_final(order_id: str, transition: str) -> Iterator[None]:
    """The ``orders_settled_not_cancelled`` trigger's refusal as the machine's
    :class:`~oncely.errors.IllegalTransition` (``current="settled"``)."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if "order-settled" not in str(exc):
            raise
        raise IllegalTransition(
            f"order {order_id!r} was paid out (settled): it can no longer be cancelled",
            "settled",
            transition,
            ("ship",),
        ) from exc


#: insert-once tables: table -> (unique key column, value column)
_ONCE = {"order_requests": ("request_key", "order_id"), "payments": ("order_id", "transaction_id")}


def _insert_once(w: sqlite3.Connection, table: str, key: str, value: str) -> str | None:
    """Record ``key -> value`` unless ``key`` is there already (:func:`oncely.sql.insert_once`:
    one statement decides); return ``None`` when this call inserted it, else the value stored
    first."""
    key_column, value_column = _ONCE[table]
    row, created = insert_once(
        w, table, {key_column: key, value_column: value}, unique=(key_column,)
    )
    return None if created else str(row[value_column])


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    customer: str
    sku: str
    qty: int
    amount: int
    status: str
    transaction_id: str | None


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    balance: int
    version: int


class ShopDB:
    """The business database of one shop (thread-safe: one connection per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        # One writer per process at a time: threads queue here instead of in SQLite's busy
        # handler, which sleeps in growing steps (up to 100 ms) and wastes most of the time
        # under contention. Other processes still meet at SQLite's lock (busy timeout).
        self._writer = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=15.0, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 15000")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error)."""
        conn = self._conn()
        with self._writer:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def create(self) -> None:
        """Create the schema and stock the products (safe to run again)."""
        conn = self._conn()
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(_SCHEMA)
        conn.execute(fenced_table_sql(FENCE_TABLE, {"run": "INTEGER"}))
        ORDERS.create_tables(conn)
        create_barrier_table(conn)
        OUTBOX.create_table(conn)
        INBOX.create_table(conn)
        with self.write() as w:
            w.executemany(
                "INSERT OR IGNORE INTO products (sku, price, stock) VALUES (?, ?, ?)",
                [(sku, price, stock) for sku, (price, stock) in PRODUCTS.items()],
            )
            w.executemany(
                "INSERT OR IGNORE INTO accounts (id, balance, version) VALUES (?, 0, 1)",
                [(a,) for a in ACCOUNTS],
            )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- reads ------------------------------------------------------------------------------------
    def price(self, sku: str) -> int | None:
        row = self._conn().execute("SELECT price FROM products WHERE sku = ?", (sku,)).fetchone()
        return None if row is None else int(row[0])

    def stock(self, sku: str) -> int | None:
        row = self._conn().execute("SELECT stock FROM products WHERE sku = ?", (sku,)).fetchone()
        return None if row is None else int(row[0])

    def order(self, order_id: str) -> Order | None:
        row = (
            self._conn()
            .execute(
                "SELECT id, customer, sku, qty, amount, status, transaction_id FROM orders "
                "WHERE id = ?",
                (order_id,),
            )
            .fetchone()
        )
        return None if row is None else Order(*row)

    def account(self, account_id: str) -> Account | None:
        row = (
            self._conn()
            .execute("SELECT id, balance, version FROM accounts WHERE id = ?", (account_id,))
            .fetchone()
        )
        return None if row is None else Account(*row)

    def ledger(self) -> list[dict[str, Any]]:
        rows = self._conn().execute("SELECT kind, key, entity, amount, at FROM ledger ORDER BY seq")
        return [
            {"kind": k, "key": key, "entity": e, "amount": a, "at": at} for k, key, e, a, at in rows
        ]

    def settlement_outcomes(self) -> dict[str, int]:
        rows = self._conn().execute(
            "SELECT coalesce(outcome, 'running'), count(*) FROM settlement_runs GROUP BY 1"
        )
        return {str(outcome): int(n) for outcome, n in rows}

    def open_settlement(self) -> tuple[int, int] | None:
        """(run id, pid) of a settlement run that holds its batch and has not written yet."""
        row = (
            self._conn()
            .execute(
                "SELECT id, pid FROM settlement_runs WHERE finished_at IS NULL AND orders > 0 "
                "ORDER BY id DESC LIMIT 1"
            )
            .fetchone()
        )
        return None if row is None else (int(row[0]), int(row[1]))

    # -- writes: each one transaction -------------------------------------------------------------
    def place_order(
        self, customer: str, sku: str, qty: int, request_key: str, once: bool = False
    ) -> Order | None:
        """Take ``qty`` units of stock and record the order and its ledger row; ``None`` if the
        stock is short (nothing written).

        ``once=True`` (protected mode) records ``request_key`` in the same transaction, unique:
        a second run for the same key (its first run's worker died after this commit but
        before the HTTP response was stored, so the key's lease ran out and a retry ran the
        handler again) returns the first order and changes nothing.
        """
        order_id = f"ord_{uuid.uuid4().hex[:20]}"
        with self.write() as w:
            if once:
                first = _insert_once(w, "order_requests", request_key, order_id)
                if first is not None:
                    return self.order(first)
            row = w.execute(
                "UPDATE products SET stock = stock - ? WHERE sku = ? AND stock >= ? "
                "RETURNING price",
                (qty, sku, qty),
            ).fetchone()
            if row is None:
                w.execute("DELETE FROM order_requests WHERE request_key = ?", (request_key,))
                return None
            amount = int(row[0]) * qty
            now = time.time()
            if once:  # the reservation is the saga's action: its compensation gives it back
                barrier(w, order_id, STOCK_BRANCH, "action")
            w.execute(  # stamped by the database's clock, as the order timeout compares it
                "INSERT INTO orders (id, customer, sku, qty, amount, status, request_key, "
                f"created_at) VALUES (?, ?, ?, ?, ?, 'placed', ?, {_NOW})",
                (order_id, customer, sku, qty, amount, request_key),
            )
            w.execute(
                "INSERT INTO ledger (kind, key, entity, amount, at) VALUES ('order', ?, ?, ?, ?)",
                (request_key, order_id, amount, now),
            )
        return Order(order_id, customer, sku, qty, amount, "placed", None)

    def record_charge(
        self, order_id: str, amount: int, transaction_id: str, once: bool = False
    ) -> str:
        """The payment provider charged ``amount``: ledger row, order marked paid; returns the
        transaction id. ``once=True``: one payment row per order (insert-once), so a charge
        run again after a crash returns the first transaction id and writes nothing."""
        with self.write() as w:
            if once:
                first = _insert_once(w, "payments", order_id, transaction_id)
                if first is not None:
                    return first
                # placed -> paid, one conditional UPDATE: a cancelled order is not marked paid
                # (IllegalTransition rolls the charge back).
                ORDERS.apply(w, order_id, "pay")
            w.execute(
                "INSERT INTO ledger (kind, key, entity, amount, at) VALUES ('charge', ?, ?, ?, ?)",
                (order_id, transaction_id, amount, time.time()),
            )
            w.execute(
                "UPDATE orders SET status = 'paid', transaction_id = ? WHERE id = ?",
                (transaction_id, order_id),
            )
        return transaction_id

    def expire_unpaid(self, older_than: float, limit: int = 100) -> int:
        """The order timeout: cancel orders still ``placed`` after ``older_than`` seconds and
        give their stock back, each through the machine's ``expire`` (``placed -> cancelled``
        only: an order paid meanwhile is left alone) and the same barrier branch as a cancel,
        so a timeout racing a cancel gives the stock back once. Returns how many expired.

        Candidates are selected by the database's clock in the statement (``created_at`` is
        stamped by it too), never by this process's ``time.time()``: a process whose clock runs
        ahead would otherwise cancel orders before their time (the project's rule: expiry uses
        the store's clock)."""
        rows = self._conn().execute(
            f"SELECT id FROM orders WHERE status = 'placed' AND created_at < {_NOW} - ? LIMIT ?",
            (older_than, limit),
        )
        expired = 0
        for (order_id,) in rows.fetchall():
            try:
                if self.cancel(str(order_id), "expire"):
                    expired += 1
            except IllegalTransition:  # paid or cancelled in between
                continue
        return expired

    def cancel(self, order_id: str, transition: str = "cancel") -> bool:
        """Protected cancel: ``placed|paid -> cancelled`` through the order machine and the
        stock given back behind the barrier (``compensate`` of the order's ``stock`` branch),
        in one transaction. Returns whether this call gave the stock back; a repeat (or a
        concurrent duplicate, which waits on the write lock) changes nothing and returns
        ``False``.

        :raises ~oncely.errors.IllegalTransition: the order has shipped, or was paid out
            (settled: ``current`` is ``"settled"``).
        :raises ~oncely.errors.EntityNotFound: no such order.
        """
        with self.write() as w, _settled_is_final(order_id, transition):
            ORDERS.apply(w, order_id, transition)  # already cancelled: a success, no change
            if not barrier(w, order_id, STOCK_BRANCH, "compensate").run:
                return False
            sku, qty = w.execute("SELECT sku, qty FROM orders WHERE id = ?", (order_id,)).fetchone()
            self._restock(w, order_id, str(sku), int(qty))
        return True

    def cancel_unchecked(self, order_id: str, sku: str, qty: int) -> None:
        """Unprotected cancel: the handler checked the status earlier (check-then-act); this
        writes the cancellation and gives the stock back whatever happened since (a paid-out
        order still refuses: :class:`~oncely.errors.IllegalTransition`)."""
        with self.write() as w, _settled_is_final(order_id, "cancel"):
            w.execute("UPDATE orders SET status = 'cancelled' WHERE id = ?", (order_id,))
            self._restock(w, order_id, sku, qty)

    @staticmethod
    def _restock(w: sqlite3.Connection, order_id: str, sku: str, qty: int) -> None:
        w.execute("UPDATE products SET stock = stock + ? WHERE sku = ?", (qty, sku))
        w.execute(
            "INSERT INTO ledger (kind, key, entity, amount, at) VALUES ('restock', ?, ?, ?, ?)",
            (order_id, sku, qty, time.time()),
        )

    def credit(
        self, account_id: str, amount: int, expected_version: int, request_key: str
    ) -> Account:
        """Protected credit: add ``amount`` to the balance if the account is still at
        ``expected_version`` (:func:`oncely.sql.versioned_update`, one ``UPDATE`` decides),
        with its ledger row, in one transaction. ``request_key`` is recorded with
        :func:`oncely.sql.insert_once` in the same transaction: a credit run again for the same
        key (its worker died after the commit, before the HTTP layer stored the answer) returns
        the first result and writes nothing.

        :raises ~oncely.errors.StaleVersion: the account moved on (answered 412).
        :raises ~oncely.errors.NotFound: no such account.
        """
        with self.write() as w:
            row, created = insert_once(
                w,
                "credits",
                {"request_key": request_key, "account": account_id, "balance": 0, "version": 0},
                unique=("request_key",),
            )
            if not created:
                return Account(account_id, int(row["balance"]), int(row["version"]))
            current = w.execute(
                "SELECT balance FROM accounts WHERE id = ?", (account_id,)
            ).fetchone()
            balance = (0 if current is None else int(current[0])) + amount
            version = versioned_update(
                w, "accounts", account_id, {"balance": balance}, expected_version
            )
            w.execute(
                "UPDATE credits SET balance = ?, version = ? WHERE request_key = ?",
                (balance, version, request_key),
            )
            w.execute(
                "INSERT INTO ledger (kind, key, entity, amount, at) VALUES ('credit', ?, ?, ?, ?)",
                (request_key, account_id, amount, time.time()),
            )
        return Account(account_id, balance, version)

    def overwrite_balance(
        self, account_id: str, balance: int, request_key: str, amount: int
    ) -> Account:
        """Unprotected credit: write the balance the handler computed from what it read
        earlier (read-modify-write without a version check: a credit that landed in between
        is overwritten, the lost update of source §3.3)."""
        with self.write() as w:
            (version,) = w.execute(
                "UPDATE accounts SET balance = ?, version = version + 1 WHERE id = ? "
                "RETURNING version",
                (balance, account_id),
            ).fetchone()
            w.execute(
                "INSERT INTO ledger (kind, key, entity, amount, at) VALUES ('credit', ?, ?, ?, ?)",
                (request_key, account_id, amount, time.time()),
            )
        return Account(account_id, balance, int(version))

    def ship(self, order_id: str) -> None:
        """Protected ship request: ``paid -> shipped`` through the order machine and the
        shipment message in the outbox (stable id ``ship-<order id>``), one transaction. A
        repeat changes nothing and adds nothing.

        :raises ~oncely.errors.IllegalTransition: the order is not paid (or cancelled).
        :raises ~oncely.errors.EntityNotFound: no such order.
        """
        with self.write() as w:
            ORDERS.apply(w, order_id, "ship")
            OUTBOX.add(w, "shipments", order_id, message_id=f"ship-{order_id}")

    def ship_unchecked(self, order_id: str) -> None:
        """Unprotected ship request: the carrier is called directly, once per request."""
        with self.write() as w:
            w.execute("UPDATE orders SET status = 'shipped' WHERE id = ?", (order_id,))
            self._dispatch(w, order_id)

    def dispatch(self, message_id: str, order_id: str) -> bool:
        """The carrier's consumer: dispatch the parcel unless the inbox has the message already
        (same transaction: a redelivery after a crash between commit and ack finds the row).
        True when this call dispatched it."""
        with self.write() as w:
            if not INBOX.accept(w, CARRIER, message_id):
                return False
            self._dispatch(w, order_id)
        return True

    @staticmethod
    def _dispatch(w: sqlite3.Connection, order_id: str) -> None:
        w.execute(
            "INSERT INTO ledger (kind, key, entity, amount, at) VALUES ('ship', ?, ?, 1, ?)",
            (order_id, CARRIER, time.time()),
        )

    def record_webhook(self, event_id: str, entity: str, amount: int) -> None:
        """A payment notification acted upon: its ledger row (kind ``webhook``, key the event
        id)."""
        with self.write() as w:
            w.execute(
                "INSERT INTO ledger (kind, key, entity, amount, at) VALUES ('webhook', ?, ?, ?, ?)",
                (event_id, entity, amount, time.time()),
            )

    def record_webhook_once(self, event_id: str, entity: str, amount: int) -> bool:
        """:meth:`record_webhook` unless the ledger already holds the event's row; True if
        this call wrote it (one statement in a ``BEGIN IMMEDIATE`` transaction: SQLite's one
        writer makes the check and the insert one decision)."""
        with self.write() as w:
            cur = w.execute(
                "INSERT INTO ledger (kind, key, entity, amount, at) "
                "SELECT 'webhook', ?, ?, ?, ? WHERE NOT EXISTS "
                "(SELECT 1 FROM ledger WHERE kind = 'webhook' AND key = ?)",
                (event_id, entity, amount, time.time(), event_id),
            )
            return cur.rowcount == 1

    def has_webhook(self, event_id: str) -> bool:
        """Whether the ledger holds the event's row (a read: no write lock)."""
        row = (
            self._conn()
            .execute("SELECT 1 FROM ledger WHERE kind = 'webhook' AND key = ?", (event_id,))
            .fetchone()
        )
        return row is not None

    def start_settlement(self, pid: int, fence: int | None, limit: int) -> tuple[int, list[Order]]:
        """Open a settlement run over up to ``limit`` paid, unsettled orders (read, not
        claimed: what keeps two runs apart is the lock and the fence)."""
        with self.write() as w:
            run = w.execute(
                "INSERT INTO settlement_runs (pid, fence, started_at) VALUES (?, ?, ?) "
                "RETURNING id",
                (pid, fence, time.time()),
            ).fetchone()[0]
            rows = w.execute(
                "SELECT id, customer, sku, qty, amount, status, transaction_id FROM orders "
                "WHERE status = 'paid' AND settled = 0 ORDER BY created_at LIMIT ?",
                (limit,),
            ).fetchall()
            w.execute("UPDATE settlement_runs SET orders = ? WHERE id = ?", (len(rows), run))
        return int(run), [Order(*r) for r in rows]

    def finish_settlement(
        self, run: int, orders: list[Order], fence: int | None, outcome: str = "written"
    ) -> str:
        """Pay out ``orders`` (one ledger row each) and mark them settled, in one transaction.

        The batch was read earlier (:meth:`start_settlement`), so an order may have been
        cancelled meanwhile. The pay-out is decided by one statement, ``UPDATE orders SET
        settled = 1 WHERE id IN (...) AND status = 'paid' RETURNING id, amount``: only the
        orders it returns get a ``settle`` row, so a cancel that committed first is never paid
        out as well. (It does not test ``settled``: two overlapping runs are kept apart by the
        lock and the fence, and with them off, the unprotected shop, they both pay out.)

        With a ``fence`` the write goes through :func:`oncely.locks.fenced_update` first: a
        holder whose lock was taken over (its token is older than the last writer's) writes
        nothing and gets ``"fenced-out"``.
        """
        with self.write() as w:
            if orders and outcome == "written":
                if fence is not None and not fenced_update(
                    w, FENCE_TABLE, "settlement", fence, {"run": run}
                ):
                    outcome = "fenced-out"
                else:
                    marks = ", ".join("?" * len(orders))
                    still_paid = w.execute(
                        f"UPDATE orders SET settled = 1 WHERE id IN ({marks}) "
                        "AND status = 'paid' RETURNING id, amount",
                        [o.id for o in orders],
                    ).fetchall()
                    now = time.time()
                    w.executemany(
                        "INSERT INTO ledger (kind, key, entity, amount, at) "
                        "VALUES ('settle', ?, ?, ?, ?)",
                        [(i, f"settlement-{run}", amount, now) for i, amount in still_paid],
                    )
            elif not orders:
                outcome = "empty"
            w.execute(
                "UPDATE settlement_runs SET finished_at = ?, outcome = ? WHERE id = ?",
                (time.time(), outcome, run),
            )
        return outcome
