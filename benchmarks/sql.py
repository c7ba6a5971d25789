"""Transactional idempotency benchmark: the same business transaction with and without
``oncely.sql.transaction``, on SQLite and PostgreSQL, sequential and 16 concurrent, one run.

The business transaction: insert an order (``RETURNING id``) and debit its account, commit.
The oncely form runs the same two statements inside ``with oncely.sql.transaction(conn,
operation="bench.pay", key=<new uuid>, scope="bench") as tx`` and stores the order id with
``tx.set_result``, so each operation claims a new key (the work a first request does; a
replay is cheaper).

Round trips per operation (PostgreSQL) are counted from libpq's protocol trace (each time the
client, having sent messages, reads the server's answer); statements per operation
(SQLite) from sqlite3's trace callback. Rates are the median of ``--passes`` interleaved
passes of ``--seconds`` each; within a pass every thread alternates batches of the two forms,
so a busy moment (a slow fsync on the shared disk) hits both forms alike.

    .venv/bin/python benchmarks/sql.py [--seconds 2] [--passes 3] [--write-docs]

``--write-docs`` replaces the ``## SQL`` section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import random
import sqlite3
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from docs_section import write_section
from harness import interleaved, median_rates, sqlite_connect

import oncely.sql

POSTGRES_URL = os.environ.get("ONCELY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
ACCOUNTS = 1000
CONCURRENCY = 16
BATCH = 20


class Backend:
    def __init__(self, dialect: str, folder: Path) -> None:
        self.dialect = dialect
        self.tag = uuid.uuid4().hex[:8]
        self.path = folder / f"bench-{self.tag}.db"
        self.orders, self.accounts = f"bench_orders_{self.tag}", f"bench_accounts_{self.tag}"
        self.keys = f"bench_keys_{self.tag}"
        self.ph = "?" if dialect == "sqlite" else "%s"

    def connect(self) -> Any:
        if self.dialect == "sqlite":
            return sqlite_connect(self.path)
        import psycopg

        return psycopg.connect(POSTGRES_URL, application_name="oncely-bench-sql")

    def setup(self) -> None:
        conn = self.connect()
        serial = "INTEGER PRIMARY KEY" if self.dialect == "sqlite" else "BIGSERIAL PRIMARY KEY"
        cur = conn.cursor()
        cur.execute(
            f"CREATE TABLE {self.orders} (id {serial}, account INTEGER NOT NULL, "
            "amount INTEGER NOT NULL)"
        )
        cur.execute(
            f"CREATE TABLE {self.accounts} (id INTEGER PRIMARY KEY, balance BIGINT NOT NULL)"
        )
        cur.executemany(
            f"INSERT INTO {self.accounts} VALUES ({self.ph}, 1000000)",
            [(i,) for i in range(ACCOUNTS)],
        )
        conn.commit()
        oncely.sql.create_tables(conn, table=self.keys)
        conn.close()

    def teardown(self) -> None:
        if self.dialect == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            return
        conn = self.connect()
        for table in (self.orders, self.accounts, self.keys):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.commit()
        conn.close()

    # the business transaction, written as an application would
    def business(self, conn: Any) -> int:
        account, amount = random.randrange(ACCOUNTS), random.randint(1, 100)
        cur = conn.cursor()
        cur.execute(
            f"INSERT INTO {self.orders} (account, amount) VALUES ({self.ph}, {self.ph}) "
            "RETURNING id",
            (account, amount),
        )
        order_id = int(cur.fetchone()[0])
        cur.execute(
            f"UPDATE {self.accounts} SET balance = balance - {self.ph} WHERE id = {self.ph}",
            (amount, account),
        )
        return order_id

    def plain(self, conn: Any) -> None:
        if self.dialect == "sqlite":
            conn.execute("BEGIN IMMEDIATE")  # one writer at a time; the same as oncely's block
        self.business(conn)
        conn.commit()

    def with_oncely(self, conn: Any) -> None:
        with oncely.sql.transaction(
            conn, operation="bench.pay", key=uuid.uuid4().hex, scope="bench", table=self.keys
        ) as tx:
            if tx.replayed:
                return
            tx.set_result(self.business(conn))


def measure(
    backend: Backend, forms: dict[str, Callable[[Any], None]], threads: int, seconds: float
) -> dict[str, float]:
    """ops/s of each form, measured together on ``threads`` connections of their own (see
    :func:`harness.interleaved`: batches of each form in turn on every thread)."""
    conns = [backend.connect() for _ in range(threads)]
    try:
        return interleaved(
            [{n: functools.partial(op, conn) for n, op in forms.items()} for conn in conns],
            seconds,
            BATCH,
        )
    finally:
        for conn in conns:
            conn.close()


def round_trips(backend: Backend, op: Callable[[Any], None], n: int = 50) -> tuple[float, float]:
    """(round trips, statements) per operation, counted on the wire (PostgreSQL: libpq
    trace) or by sqlite3's statement trace."""
    conn = backend.connect()
    for _ in range(5):
        op(conn)
    if backend.dialect == "sqlite":
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        for _ in range(n):
            op(conn)
        conn.set_trace_callback(None)
        conn.close()
        return len(statements) / n, len(statements) / n
    import psycopg

    with tempfile.TemporaryFile("w+") as f:
        conn.pgconn.trace(f.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        for _ in range(n):
            op(conn)
        conn.pgconn.untrace()
        f.seek(0)
        trips = stmts = 0
        last = "B"
        for line in f:
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            side, kind = parts[0], parts[2].strip()
            if side == "F" and kind in ("Query", "Execute"):
                stmts += 1
            if side == "B" and last == "F":
                trips += 1
            last = side
    conn.close()
    return trips / n, stmts / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="oncely-bench-sql-") as folder:
        for dialect in ("sqlite", "postgresql"):
            backend = Backend(dialect, Path(folder))
            backend.setup()
            try:
                trips = {
                    "plain": round_trips(backend, backend.plain),
                    "oncely": round_trips(backend, backend.with_oncely),
                }
                for threads in (1, CONCURRENCY):
                    forms = {"plain": backend.plain, "oncely": backend.with_oncely}
                    rates = median_rates(
                        functools.partial(measure, backend, forms, threads, args.seconds),
                        args.passes,
                    )
                    plain, once = rates["plain"], rates["oncely"]
                    mode = "sequential" if threads == 1 else f"{threads} threads"
                    rows.append((dialect, mode, plain, once, trips["plain"], trips["oncely"]))
                    print(
                        f"{dialect:10} {mode:11} plain {plain:8,.0f}/s  oncely {once:8,.0f}/s  "
                        f"ratio {once / plain:.2f}  round trips {trips['plain'][0]:.1f} -> "
                        f"{trips['oncely'][0]:.1f}  statements {trips['plain'][1]:.1f} -> "
                        f"{trips['oncely'][1]:.1f}",
                        flush=True,
                    )
            finally:
                backend.teardown()

    if args.write_docs:
        lines = [
            "## SQL (`benchmarks/sql.py`)",
            "",
            f"`.venv/bin/python benchmarks/sql.py --seconds {args.seconds:g} --passes "
            f"{args.passes} --write-docs`, run {dt.date.today()} on the shared machine "
            f"(Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, PostgreSQL "
            "on loopback). The business transaction (insert an order `RETURNING id`, debit its "
            "account, commit) alone and inside `oncely.sql.transaction` with a new key each "
            "time and the order id stored as the result. Each thread alternates batches of both "
            "forms; median of the passes; round "
            "trips counted on the wire (libpq trace), SQLite statements by its trace callback.",
            "",
            "| database | mode | plain ops/s | oncely ops/s | oncely / plain | round trips "
            "plain → oncely | statements plain → oncely |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for dialect, mode, plain, once, tp, to in rows:
            trips = "n/a (in-process)" if dialect == "sqlite" else f"{tp[0]:.0f} → {to[0]:.0f}"
            lines.append(
                f"| {dialect} | {mode} | {plain:,.0f} | {once:,.0f} | {once / plain:.2f} | "
                f"{trips} | {tp[1]:.0f} → {to[1]:.0f} |"
            )
        lines += [
            "",
            "On PostgreSQL the claim is one statement (a CTE) and the stored result travels "
            "with the `COMMIT` in one pipeline, so oncely adds one round trip to the business "
            "transaction; the extra statements are the claim row's insert and the result's "
            "update, both in the same transaction. The commit's WAL flush dominates both forms "
            "on this shared disk, so the ratio moves between runs (0.61 to 0.74 at 16 threads "
            "in the runs made while tuning; sending the result `UPDATE` and the `COMMIT` "
            "separately measured 0.54 to 0.63). SQLite commits in-process in tens of "
            "microseconds, so the claim row's B-tree insert (a random page: keys are hashes) "
            "and oncely's Python work weigh far more there.",
        ]
        write_section("sql", "\n".join(lines))


if __name__ == "__main__":
    main()
