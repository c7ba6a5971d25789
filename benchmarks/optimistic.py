"""Optimistic locking benchmark: versioned_update against a plain UPDATE, in one run.

1. Sequential writes, one connection, each its own transaction (commit per write), on SQLite
   (a file, WAL), PostgreSQL and MariaDB:
   * ``plain UPDATE``: ``UPDATE t SET balance = ? WHERE id = ?`` on the raw driver (baseline);
   * ``hand-written CAS``: ``UPDATE … SET balance = ?, version = version + 1 WHERE id = ? AND
     version = ?`` on the raw driver, row count checked (what versioned_update sends);
   * ``versioned_update``: the same through oncely (adapter, identifier quoting, plan).
2. Contended read-modify-write: 8 threads add 1 to one row 40 times each: the unchecked loop
   (read, compute, plain UPDATE: fast and wrong, its lost updates are counted) against
   versioned_update + retry_on_conflict (exact; its retries are counted).
3. Redis: ``RedisVersioned.set`` (one Lua script) against a plain ``HSET``.

Rates are the median of ``--passes`` interleaved passes, so a busy moment hits every variant.

    .venv/bin/python benchmarks/optimistic.py [--n 2000] [--passes 5] [--markdown]
"""

from __future__ import annotations

import argparse
import platform
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from docs_section import write_section

from oncely.optimistic import retry_on_conflict
from oncely.optimistic.redis import RedisVersioned
from oncely.sql import versioned_update

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
DIALECTS = ("sqlite", "postgresql", "mysql")
THREADS, PER_THREAD, PAUSE = 8, 40, 0.001


def connect(dialect: str, path: Path) -> Any:
    if dialect == "sqlite":
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn
    if dialect == "postgresql":
        import psycopg

        return psycopg.connect(POSTGRES, application_name="oncely-bench-optimistic")
    import pymysql

    return pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")


def ph(dialect: str) -> str:
    return "?" if dialect == "sqlite" else "%s"


def execute(conn: Any, sql: str, args: tuple[Any, ...]) -> int:
    cur = conn.cursor()
    cur.execute(sql, args)
    count = int(cur.rowcount)
    cur.close()
    return count


def rate(fn: Callable[[int], None], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def sequential(dialect: str, path: Path, n: int, passes: int) -> dict[str, float]:
    table = f"bench_opt_{uuid.uuid4().hex[:8]}"
    conn = connect(dialect, path)
    p = ph(dialect)
    execute(
        conn,
        f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, balance BIGINT NOT NULL, "
        "version BIGINT NOT NULL DEFAULT 1)",
        (),
    )
    execute(conn, f"INSERT INTO {table} (id, balance, version) VALUES (1, 0, 1)", ())
    conn.commit()
    version = 1

    def plain(i: int) -> None:
        execute(conn, f"UPDATE {table} SET balance = {p} WHERE id = {p}", (i, 1))
        conn.commit()

    def hand(i: int) -> None:
        nonlocal version
        sql = (
            f"UPDATE {table} SET balance = {p}, version = version + 1 "
            f"WHERE id = {p} AND version = {p}"
        )
        if execute(conn, sql, (i, 1, version)) != 1:
            raise RuntimeError("lost the row")
        conn.commit()
        version += 1

    def oncely(i: int) -> None:
        nonlocal version
        version = versioned_update(conn, table, 1, {"balance": i}, version)
        conn.commit()

    variants = {"plain UPDATE": plain, "hand-written CAS": hand, "versioned_update": oncely}
    results: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for fn in variants.values():  # warm up
            rate(fn, min(100, n))
        for _ in range(passes):
            for name, fn in variants.items():
                results[name].append(rate(fn, n))
    finally:
        execute(conn, f"DROP TABLE {table}", ())
        conn.commit()
        conn.close()
    return {name: statistics.median(r) for name, r in results.items()}


def _race(dialect: str, path: Path, table: str, shape: str) -> tuple[float, int]:
    """8 threads x 40 increments of row 1 in ``shape``; (seconds, retries)."""
    p = ph(dialect)
    retries = 0
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS + 1)

    def count(*_: Any) -> None:
        nonlocal retries
        with lock:
            retries += 1

    def worker() -> None:
        conn = connect(dialect, path)

        @retry_on_conflict(attempts=10_000, base_delay=0.001, max_delay=0.02, on_retry=count)
        def once() -> None:
            try:
                cur = conn.cursor()
                cur.execute(f"SELECT balance, version FROM {table} WHERE id = {p}", (1,))
                balance, version = cur.fetchone()
                cur.close()
                time.sleep(PAUSE)
                if shape == "unchecked loop":
                    sql = f"UPDATE {table} SET balance = {p} WHERE id = {p}"
                    execute(conn, sql, (balance + 1, 1))
                else:
                    versioned_update(conn, table, 1, {"balance": balance + 1}, version)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise

        barrier.wait()
        for _ in range(PER_THREAD):
            once()
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, retries


def contended(dialect: str, path: Path) -> dict[str, tuple[float, int, int]]:
    """name -> (increments/s, final counter, lost updates or retries)."""
    table = f"bench_optc_{uuid.uuid4().hex[:8]}"
    admin = connect(dialect, path)
    execute(
        admin,
        f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, balance BIGINT NOT NULL, "
        "version BIGINT NOT NULL DEFAULT 1)",
        (),
    )
    admin.commit()
    out: dict[str, tuple[float, int, int]] = {}
    total = THREADS * PER_THREAD
    try:
        for shape in ("unchecked loop", "versioned_update + retry"):
            execute(admin, f"DELETE FROM {table}", ())
            execute(admin, f"INSERT INTO {table} (id, balance, version) VALUES (1, 0, 1)", ())
            admin.commit()
            elapsed, retries = _race(dialect, path, table, shape)
            cur = admin.cursor()
            cur.execute(f"SELECT balance FROM {table} WHERE id = 1")
            final = int(cur.fetchone()[0])
            cur.close()
            admin.commit()
            extra = total - final if shape == "unchecked loop" else retries
            out[shape] = (total / elapsed, final, extra)
    finally:
        execute(admin, f"DROP TABLE {table}", ())
        admin.commit()
        admin.close()
    return out


def redis_bench(n: int, passes: int) -> dict[str, float]:
    key = f"oncely-bench-cas:{uuid.uuid4().hex}"
    raw = redis.Redis.from_url(REDIS)
    store = RedisVersioned(REDIS)
    version = store.set(key, {"n": 0}, 0)

    def plain(i: int) -> None:
        raw.hset(key, "n", i)

    def cas(i: int) -> None:
        nonlocal version
        version = store.set(key, {"n": i}, version, merge=True)

    variants = {"plain HSET": plain, "RedisVersioned.set": cas}
    results: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for fn in variants.values():
            rate(fn, min(200, n))
        for _ in range(passes):
            for name, fn in variants.items():
                results[name].append(rate(fn, n))
    finally:
        raw.delete(key)
        raw.close()
        store.close()
    return {name: statistics.median(r) for name, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=2000, help="writes per pass and variant")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--markdown", action="store_true", help="write docs/performance.md")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="oncely-bench-opt-"))
    seq_rows, con_rows = [], []
    ratios = []
    for dialect in DIALECTS:
        seq = sequential(dialect, folder / "seq.db", args.n, args.passes)
        base = seq["plain UPDATE"]
        for name, value in seq.items():
            seq_rows.append(f"| {dialect} | {name} | {value:,.0f} | {value / base:.2f}x |")
        ratios.append(
            f"| {dialect} | {seq['versioned_update'] / base:.2f}x | "
            f"{seq['versioned_update'] / seq['hand-written CAS']:.2f}x |"
        )
        con = contended(dialect, folder / "con.db")
        for name, (per_s, final, extra) in con.items():
            what = f"{extra} lost" if name == "unchecked loop" else f"{extra} retries"
            con_rows.append(
                f"| {dialect} | {name} | {per_s:,.0f} | {final} / {THREADS * PER_THREAD} | {what} |"
            )
        print(dialect, seq, con, flush=True)
    red = redis_bench(args.n, args.passes)
    print("redis", red, flush=True)
    command = f"python benchmarks/optimistic.py --n {args.n} --passes {args.passes}" + (
        " --markdown" if args.markdown else ""
    )
    body = "\n".join(
        [
            "## Optimistic locking (`benchmarks/optimistic.py`)",
            "",
            f"Measured by `{command}` on {platform.machine()} / Python "
            f"{platform.python_version()}, servers on loopback, all variants in the same run "
            "(medians of interleaved passes). Each write is its own transaction (commit per "
            "write).",
            "",
            "| database | variant | writes/s | vs plain UPDATE |",
            "|---|---|---:|---:|",
            *seq_rows,
            "",
            "| database | versioned_update / plain UPDATE | versioned_update / hand-written CAS |",
            "|---|---:|---:|",
            *ratios,
            "",
            f"Contended: {THREADS} threads x {PER_THREAD} read-modify-writes of one row "
            f"({PAUSE * 1000:.0f} ms of work between the read and the write).",
            "",
            "| database | loop | increments/s | final counter | |",
            "|---|---|---:|---:|---|",
            *con_rows,
            "",
            "| Redis | writes/s | vs plain HSET |",
            "|---|---:|---:|",
            *(
                f"| {name} | {value:,.0f} | {value / red['plain HSET']:.2f}x |"
                for name, value in red.items()
            ),
            "",
            "How to read it: on PostgreSQL and MariaDB each write waits for its commit, so the "
            "three variants sit within this shared machine's noise of each other (the order "
            "changes between runs): the version check costs no extra round trip on success. "
            "SQLite has no network, so oncely's own Python work per call (the connection "
            "adapter, the cached statement, the plan, reading `RETURNING`) shows as the gap to "
            "the hand-written CAS. Under contention the unchecked loop is faster only because "
            "it throws most increments away (the final counter); versioned_update + "
            "retry_on_conflict applies every one, and pays for it with retries and jittered "
            "waits on one hot row, which is the price of not losing updates. "
            "`RedisVersioned.set` is one `EVALSHA` (`HGET`, `HSET`, `HINCRBY` inside) against "
            "one `HSET`.",
        ]
    )
    print(body)
    if args.markdown:
        write_section("optimistic", body)


if __name__ == "__main__":
    main()
