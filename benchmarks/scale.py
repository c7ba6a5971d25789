"""Benchmark: growth curves of every store (issue 13, item 6), in one run.

    .venv/bin/python benchmarks/scale.py [--quick] [--parts concurrency,bytes,purge]
        [--stores memory,sqlite,postgres,mysql,redis] [--seconds 2] [--max-concurrency 256]
        [--keys 10000,100000,1000000] [--purge-records 1000000] [--write-docs]

Three parts:

* ``concurrency``: throughput and p99 latency of ``@idempotent`` first-time calls (new keys)
  and replays (the same keys again) against 1, 2, 4, ... ``--max-concurrency`` callers: threads
  on the sync face, asyncio tasks on the async face. Each point runs ``--seconds``.
* ``bytes``: bytes per stored (completed) record at each ``--keys`` count. Redis: a private
  ``redis-server`` on a free port (``INFO used_memory`` delta per key, and ``MEMORY USAGE`` of
  sampled keys), filled through the store's own claim and complete plans sent in pipelines;
  PostgreSQL: ``pg_total_relation_size`` of the table (indexes and TOAST included); SQLite: the
  database file after a checkpoint; MariaDB: ``data_length + index_length``. The SQL tables are
  filled by copying a record the store itself wrote (every column but the key and the fence),
  so the rows have the store's real format.
* ``purge``: records/s of ``purge_expired(limit)`` loops on every store and of ``oncely purge``,
  and on PostgreSQL the purge of ``--purge-records`` expired records while live claims (new
  keys and take-overs of expired, not yet purged keys) run beside it: their max and p99
  latency during the purge against the same load without a purge, in the same run.

``--quick`` is a smoke run (tiny counts, two concurrency levels). ``--write-docs`` writes the
"Growth curves" section of ``docs/performance.md`` and the plots ``docs/perf-*.png``. This
machine is shared and noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docs_section import PERFORMANCE_MD, write_section
from harness import private_redis

from oncely import idempotent
from oncely.core.records import New, RecordKey, digest_key
from oncely.stores import Store, open_store

POSTGRES_URL = os.environ.get("ONCELY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("ONCELY_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("ONCELY_TEST_REDIS", "redis://127.0.0.1:6379/0")
DOCS = PERFORMANCE_MD.parent
ASYNC_STORES = ("memory", "postgres", "mysql", "redis")
# A realistic small result (a 100-byte JSON document) and a tiny one.
RESULTS = {
    "100-byte JSON": json.dumps(
        {
            "order_id": "ord_0123456789",
            "status": "paid",
            "amount": 1999,
            "currency": "EUR",
            "ref": "x" * 15,
        },
        separators=(",", ":"),
    ).encode(),
    "tiny (4 bytes)": b"true",
}
assert len(RESULTS["100-byte JSON"]) == 100, len(RESULTS["100-byte JSON"])


NOTES = """\
### How it was measured

* **Concurrency.** Each point runs for `--seconds`: every caller makes first-time calls (a new
  key each) for that long, then replays its own keys for as long. Threads share one store
  object (one pool), asyncio tasks run on one event loop; the decorated function returns a
  small dict at once, so the curves show the store and oncely, not the work. PostgreSQL and
  MariaDB use the stores' default pools (16 connections): past 16 callers the others queue for
  a connection, so throughput stays flat and p99 grows with the queue. On Redis concurrent
  callers' scripts share writes (auto-pipelining, see [redis.md](redis.md)).
* **Bytes per key.** Redis: a `redis-server` of the benchmark's own, empty at the start; the
  records are written by the store's own claim and complete plans (its Lua scripts, the same
  bytes as `@idempotent` sends), 1,000 scripts per pipeline; `used_memory` delta per key, and
  `MEMORY USAGE … SAMPLES 0` of 500 sampled keys (key name, value and the key's expiry
  included; the delta adds the keyspace's dict and jemalloc's rounding). Keys are
  `oncely:billing.charge:<64 hex digits>` with a 32-character fingerprint, as the decorator
  makes them. SQL stores: one record is written through the store (claim, complete), then
  copied server-side with only the digest (SHA-256 of `k<i>`, so inserts land at random places
  in the primary key, as real keys do) and the fence changed: PostgreSQL `INSERT … SELECT …
  generate_series`, MariaDB the same over its `seq_1_to_n` table, SQLite one `executemany` of
  the same `INSERT … SELECT`. Sizes: PostgreSQL `pg_total_relation_size` (heap, TOAST, primary
  key and expiry index; the fence sequence is one page) after `VACUUM ANALYZE`; SQLite the
  database file after a WAL checkpoint (the fence keeper table is one row); MariaDB
  `data_length + index_length` of the table and its fence keeper after `ANALYZE TABLE`. A real
  first-time call writes each SQL row twice (claim, then complete), so a table that was not
  vacuumed yet also holds the dead first versions.
* **Purge.** Expired records are made the same way (copies with `expires_at` an hour ago).
  `purge_expired(limit)` is called until it deletes nothing; `oncely purge` runs as a process
  (its time includes starting Python). On PostgreSQL the purge of `--purge-records` runs while
  4 threads claim: 2 on new keys, 2 on random keys of the expired set (a take-over while the
  row is not purged yet: it waits for the purge batch that holds that row's lock, if any). The
  same 4 threads run 3 s without a purge first: the reference in the same run. What the claim
  statements waited for during the purge is sampled from `pg_stat_activity` every 5 ms:
"""
ANALYSIS = """
### What the curves say

* **Concurrency.** Read the curves as shapes: this 2-core machine ran other benchmarks and
  test suites beside this one, so single points jump by 2x between neighbours. Memory and Redis
  scale with callers until the two cores are busy (Redis replays reach about 10,000/s at 32
  callers, 2 to 3 times the sequential rate, because concurrent scripts share writes); past
  that, throughput stays flat or falls and p99 grows in proportion to the queue. PostgreSQL and
  MariaDB flatten at their 16-connection pools; first-time calls there are bound by the commit's
  WAL flush (PostgreSQL's sequential first-time calls are far below its replays). SQLite serialises
  writers on one gate per file, so its first-time p99 grows with the number of threads while
  replays (readers in WAL mode) keep scaling.
* **Bytes per key** is flat from 10^4 to 10^6 keys on every store: no structure grows faster
  than the records. On Redis the gap between `MEMORY USAGE` (what the key itself takes: its name,
  the listpack, the object and the dict entry) and the `used_memory` delta (about 55 to 65 bytes
  more) is the keyspace itself: the expiry dict's entry and both dicts' bucket arrays. Of a
  completed key with a 100-byte result, 136 bytes are the key's name (86 characters, 64 of them
  the digest, in a 96-byte allocation), its dict entry and its object header, and 192 the
  listpack (jemalloc's size class for its fields: the packed completed record of
  [redis.md](redis.md#record-layout-and-memory), with the fence inside the status, the
  fingerprint's hex as raw bytes and no creation time, lease end, codec or expiry field of its
  own); the piece layout before it took 392 (a 256-byte listpack), and the layout before that
  1,016, because the 100-byte value turned the hash into a hashtable (the reference rows,
  measured the same way). The tiny result meets "2x + 200 bytes" (208) by `MEMORY USAGE`: 136
  bytes for the key's name and its entries whatever the hash holds, and a 64-byte listpack (the
  compact layout's was 84, rounded to 96: 232). By the `used_memory` delta it is 257: the expiry
  index's entry and the buckets come on top for any key with a TTL. A shorter key name (a binary
  or base64 digest) would save 16 or 32 bytes more, but an earlier build would not find the new
  names and would run the call again; not done.
  PostgreSQL and SQLite keep about 470 and 450 bytes for a 100-byte result (the row with the
  64-character digest and the fingerprint, the primary key on (scope, digest) that repeats the
  digest, the expiry index, and pages filled about 70% by keys that arrive in random order);
  MariaDB about 590 (InnoDB clusters the rows on the primary key, and its expiry index carries
  the primary key again).
* **Purge.** PostgreSQL deletes 10^6 expired records well within the 60 s target, in batches
  through the expiry index (`FOR UPDATE SKIP LOCKED`, so rows a claim holds are skipped and rows
  the purge holds make a take-over wait for one batch only). The claims beside it spend their
  waiting on WAL flushes (the purge writes tens of MB of WAL), not on the purge's row locks: see
  the sampled wait events above. A take-over of a row in the batch being deleted waits for that
  one statement, at most the slowest purge call above; `--batch 1000` makes each statement
  shorter but, in a run made while tuning, not the slowest one (the WAL flushes dominate there
  too), and took 12.8 s for the 10^6 records instead of 4.7 s. That is why the purge commits
  asynchronously
  (`synchronous_commit` off for its own transaction: a purge lost in a crash leaves expired rows,
  which every reader treats as absent and the next purge deletes; later synchronous commits flush
  it anyway). In the runs made while changing it (2 pairs under the same load), the slowest
  claim beside the purge went from 91 to 107 ms to 69 to 93 ms; in
  another run of the same measurement the slowest claim of the reference period, with no purge
  at all, reached 230 ms, so on this shared disk a single max figure is within the machine's
  noise, and the p99 is the steadier number. `oncely purge` now loops in
  `--batch`-sized statements until nothing is left, each its own short transaction (its rate
  above includes starting the process, about 2 s). Redis
  drops expired records itself (`PEXPIREAT`), so it has no purge to measure.
"""
WAITS: list[str] = []  # what claims waited for during the PostgreSQL purge (filled by the run)


def p99(latencies: list[float]) -> float:
    lat = sorted(latencies)
    return lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")


# -- private servers and tables -------------------------------------------------------------------
@dataclass
class Target:
    """One store to measure: its URL and options, and how to drop what it made."""

    kind: str
    url: str
    options: dict[str, Any]
    cleanup: Callable[[], None] = lambda: None

    def open(self) -> Store:
        store = open_store(self.url, **self.options)
        store.init_schema()
        return store


def target(kind: str, folder: str, redis_url: str = REDIS_URL) -> Target:
    tag = f"scale_{uuid.uuid4().hex[:8]}"
    if kind == "memory":
        return Target(kind, "memory://", {})
    if kind == "sqlite":
        return Target(kind, f"sqlite:///{folder}/{tag}.db", {})
    if kind == "postgres":

        def drop_pg() -> None:
            import psycopg

            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {tag}")

        return Target(kind, POSTGRES_URL, {"table": tag, "create_schema": True}, drop_pg)
    if kind == "mysql":

        def drop_my() -> None:
            conn = mysql_connect()
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {tag}, {tag}_fences")
            conn.close()

        return Target(kind, MYSQL_URL, {"table": tag, "create_schema": True}, drop_my)
    if kind == "redis":
        prefix = f"oncely-{tag}"

        def drop_redis() -> None:
            import redis

            client = redis.Redis.from_url(redis_url)
            batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(batch), 1000):
                client.delete(*batch[i : i + 1000])
            client.close()

        return Target(kind, redis_url, {"prefix": prefix}, drop_redis)
    raise SystemExit(f"unknown store {kind!r}")


def mysql_connect() -> Any:
    import pymysql

    return pymysql.connect(
        host="127.0.0.1", port=3306, user="root", database="test", autocommit=True
    )


# -- part 1: throughput and p99 against concurrency -----------------------------------------------
@dataclass
class Point:
    store: str
    face: str
    phase: str
    concurrency: int
    calls: int
    seconds: float
    latencies: list[float] = field(repr=False)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    @property
    def p99_ms(self) -> float:
        return p99(self.latencies) * 1000


def _key(mine: list[str], worker: int, i: int, fresh: bool) -> str:
    """Call ``i``'s key of ``worker``: a new one (``w<worker>-<i>``, appended to ``mine``) with
    ``fresh``, else the next of ``mine`` in turn."""
    if fresh:
        mine.append(f"w{worker}-{i}")
        return mine[-1]
    return mine[i % len(mine)]


def run_threads(
    fn: Callable[[str], Any], keys: list[list[str]], seconds: float, fresh: bool
) -> tuple[int, float, list[float]]:
    """Each thread calls ``fn`` on its own keys until ``seconds`` pass (new keys with
    ``fresh``, appended to its list; else cycling through them)."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(len(keys) + 1)
    stop = [0.0]

    def work(mine: list[str], worker: int) -> None:
        out = []
        start.wait()
        i = 0
        while i == 0 or time.perf_counter() < stop[0]:  # one call at least: the replay
            k = _key(mine, worker, i, fresh)  # phase cycles through the keys it made
            t0 = time.perf_counter()
            fn(k)
            out.append(time.perf_counter() - t0)
            i += 1
        with lock:
            latencies.extend(out)

    threads = [threading.Thread(target=work, args=(keys[w], w)) for w in range(len(keys))]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    return len(latencies), time.perf_counter() - t0, latencies


async def run_tasks(
    fn: Callable[[str], Any], keys: list[list[str]], seconds: float, fresh: bool
) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def work(mine: list[str], worker: int) -> None:
        i = 0
        while i == 0 or time.perf_counter() < stop:
            k = _key(mine, worker, i, fresh)
            t0 = time.perf_counter()
            await fn(k)
            latencies.append(time.perf_counter() - t0)
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(work(keys[w], w) for w in range(len(keys))))
    return len(latencies), time.perf_counter() - t0, latencies


def concurrency_curve(kind: str, tgt: Target, levels: list[int], seconds: float) -> list[Point]:
    points: list[Point] = []
    store = tgt.open()
    faces = ["sync"] + (["async"] if kind in ASYNC_STORES else [])
    try:
        for face in faces:
            for c in levels:
                name = f"scale.{face}.{c}.{uuid.uuid4().hex[:6]}"
                keys: list[list[str]] = [[] for _ in range(c)]
                if face == "sync":

                    @idempotent(store=store, name=name, key=["order_id"])
                    def handle(order_id: str) -> dict[str, Any]:
                        return {"order_id": order_id, "ok": True}

                    handle("warm-up")  # the pool's first connection is not part of the curve
                    for phase, fresh in (("first", True), ("replay", False)):
                        n, secs, lat = run_threads(handle, keys, seconds, fresh)
                        points.append(Point(kind, face, phase, c, n, secs, lat))
                else:

                    @idempotent(store=store, name=name, key=["order_id"])
                    async def ahandle(order_id: str) -> dict[str, Any]:
                        return {"order_id": order_id, "ok": True}

                    async def both(ahandle: Any = ahandle, keys: Any = keys, c: int = c) -> None:
                        await ahandle("warm-up")
                        for phase, fresh in (("first", True), ("replay", False)):
                            n, secs, lat = await run_tasks(ahandle, keys, seconds, fresh)
                            points.append(Point(kind, "async", phase, c, n, secs, lat))
                        await store.aclose()

                    asyncio.run(both())
                last = points[-2:]
                print(
                    f"  {kind:8} {face:5} c={c:<3} "
                    + "  ".join(f"{p.phase} {p.rate:8,.0f}/s p99 {p.p99_ms:8.1f} ms" for p in last),
                    flush=True,
                )
    finally:
        store.close()
    return points


# -- filling tables and keyspaces fast, in the store's own format ---------------------------------
def load_redis_scripts(store: Store) -> None:
    """Run one claim and complete the ordinary way, so the pipelines' EVALSHA find the scripts."""
    key = RecordKey("scale.warm", digest_key("warm"))
    outcome: Any = store.claim(key, "f" * 32, 60, 60)
    store.complete(key, outcome.fence, b"1", "json", 60)
    store.delete(key)


def template_row(store: Store, scope: str, result: bytes, ttl: float) -> str:
    """Write one real record through the store (claim + complete); its digest."""
    digest = digest_key("template")
    key = RecordKey(scope, digest)
    outcome: Any = store.claim(key, "f" * 32, 60, ttl)
    if isinstance(outcome, New):  # else: written by an earlier fill (a Replay)
        store.complete(key, outcome.fence, result, "json", ttl)
    return digest


def sql_columns(kind: str, conn: Any, table: str) -> list[str]:
    if kind == "sqlite":
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
    query = (
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
        "AND table_schema = {} ORDER BY ordinal_position"
    )
    query = query.format("current_schema()" if kind == "postgres" else "DATABASE()")
    if kind == "postgres":
        return [row[0] for row in conn.execute(query, (table,))]
    with conn.cursor() as cur:
        cur.execute(query, (table,))
        return [row[0] for row in cur.fetchall()]


def fill_sql(
    kind: str,
    store: Store,
    scope: str,
    start: int,
    count: int,
    result: bytes,
    expired: bool = False,
    ttl: float = 3600,
) -> None:
    """Add ``count`` records (keys ``k{start}`` ...) by copying the store's own template
    record: every column as the store wrote it, except the digest (the SHA-256 of the key,
    as :func:`digest_key` makes it), the fence (template + i, above the template's) and, with
    ``expired``, ``expires_at`` an hour in the past."""
    table = store.table  # type: ignore[attr-defined]
    digest = template_row(store, scope, result, ttl)
    if kind == "postgres":
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            cols = sql_columns(kind, conn, table)
            exprs = {
                "digest": "encode(sha256(convert_to('k' || i, 'UTF8')), 'hex')",
                "fence": "t.fence + i",
            }
            if expired:
                exprs["expires_at"] = "now() - interval '1 hour'"
            select = ", ".join(exprs.get(c, f"t.{c}") for c in cols)
            for lo in range(start, start + count, 200_000):
                hi = min(start + count, lo + 200_000) - 1
                conn.execute(
                    f"INSERT INTO {table} ({', '.join(cols)}) SELECT {select} FROM {table} t, "
                    f"generate_series({lo}, {hi}) i WHERE t.scope = %s AND t.digest = %s",
                    (scope, digest),
                )
            conn.execute(
                f"SELECT setval('{table}_fence_seq', (SELECT max(fence) FROM {table}) + 1)"
            )
            conn.execute(f"VACUUM ANALYZE {table}")
    elif kind == "mysql":
        conn = mysql_connect()
        cols = sql_columns(kind, conn, table)
        exprs = {"digest": "SHA2(CONCAT('k', s.seq), 256)", "fence": "t.fence + s.seq"}
        if expired:
            exprs["expires_at"] = "UNIX_TIMESTAMP(NOW(6)) - 3600"
        select = ", ".join(exprs.get(c, f"t.{c}") for c in cols)
        with conn.cursor() as cur:
            for lo in range(start, start + count, 100_000):
                hi = min(start + count, lo + 100_000) - 1
                cur.execute(
                    f"INSERT INTO {table} ({', '.join(cols)}) SELECT {select} FROM {table} t, "
                    f"seq_{lo}_to_{hi} s WHERE t.scope = %s AND t.digest = %s",
                    (scope, digest),
                )
            cur.execute(f"ANALYZE TABLE {table}")
            cur.fetchall()
        conn.close()
    else:
        path = store.path  # type: ignore[attr-defined]
        conn = sqlite3.connect(path, timeout=30)
        cols = sql_columns(kind, conn, table)
        exprs = {"digest": "?", "fence": "t.fence + ?"}
        if expired:
            exprs["expires_at"] = "t.created_at - 3600"
        select = ", ".join(exprs.get(c, f"t.{c}") for c in cols)
        sql = (
            f"INSERT INTO {table} ({', '.join(cols)}) SELECT {select} FROM {table} t "
            "WHERE t.scope = ? AND t.digest = ?"
        )
        # the placeholders come in column order: digest before fence in the table
        order = [c for c in cols if c in ("digest", "fence")]
        with conn:
            conn.executemany(
                sql,
                (
                    (
                        *tuple(digest_key(f"k{i}") if c == "digest" else i for c in order),
                        scope,
                        digest,
                    )
                    for i in range(start, start + count)
                ),
            )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()


def sql_bytes(kind: str, store: Store) -> int:
    table = store.table  # type: ignore[attr-defined]
    if kind == "postgres":
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            row = conn.execute(f"SELECT pg_total_relation_size('{table}')").fetchone()
            return int(row[0]) if row else 0
    if kind == "mysql":
        conn = mysql_connect()
        with conn.cursor() as cur:
            cur.execute(
                "SELECT SUM(data_length + index_length) FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name IN (%s, %s)",
                (table, f"{table}_fences"),
            )
            total = int(cur.fetchone()[0])
        conn.close()
        return total
    path = store.path  # type: ignore[attr-defined]
    return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))


@dataclass
class Size:
    store: str
    result: str
    keys: int
    bytes_per_key: float
    memory_usage: float | None = None  # Redis MEMORY USAGE, sampled keys (mean)


def bytes_per_key(kinds: list[str], counts: list[int], folder: str) -> list[Size]:
    sizes: list[Size] = []
    for kind in kinds:
        if kind == "memory":
            continue
        for label, result in RESULTS.items():
            if kind == "redis":
                sizes += redis_sizes(counts, label, result)
                continue
            if kind == "mysql" and label != "100-byte JSON":
                continue  # MariaDB is the slow one to fill: one result size
            tgt = target(kind, folder)
            store = tgt.open()
            try:
                empty = sql_bytes(kind, store)
                done = 0
                for n in counts:
                    fill_sql(kind, store, f"scale.bytes.{kind}", done, n - done, result)
                    done = n
                    total = sql_bytes(kind, store)
                    sizes.append(Size(kind, label, n, (total - empty) / n))
                    print(
                        f"  {kind:8} {label:15} {n:>9,} keys: {(total - empty) / n:7.1f} B/key",
                        flush=True,
                    )
            finally:
                store.close()
                tgt.cleanup()
    return sizes


def redis_sizes(counts: list[int], label: str, result: bytes) -> list[Size]:
    import redis

    sizes = []
    with private_redis() as url:
        client = redis.Redis.from_url(url)
        store = open_store(url, prefix="oncely")
        load_redis_scripts(store)
        empty = int(client.info("memory")["used_memory"])
        done = 0
        scope = "billing.charge"
        for n in counts:
            fill_redis_range(store, scope, done, n, result)
            done = n
            used = int(client.info("memory")["used_memory"])
            sample = random.Random(n).sample(range(n), min(n, 500))
            usage = [
                client.memory_usage(
                    store._key(RecordKey(scope, digest_key(f"k{i}"))),  # type: ignore[attr-defined]
                    samples=0,
                )
                for i in sample
            ]
            size = Size("redis", label, n, (used - empty) / n, statistics.mean(usage))
            sizes.append(size)
            enc = client.object("encoding", store._key(RecordKey(scope, digest_key("k0"))))  # type: ignore[attr-defined]
            print(
                f"  redis    {label:15} {n:>9,} keys: used_memory {size.bytes_per_key:7.1f} B/key,"
                f" MEMORY USAGE {size.memory_usage:7.1f} B ({enc.decode()})",
                flush=True,
            )
        store.close()
        client.close()
    sizes.append(earlier_redis_layout(counts[0], label, result))
    return sizes


def earlier_redis_layout(count: int, label: str, result: bytes) -> Size:
    """The reference: ``count`` completed records in the layout oncely wrote before results
    were kept in pieces (the whole result in ``rs``, plus ``sc`` and ``dg`` fields), field for
    field what the earlier claim and complete scripts left, on a fresh private server."""
    import redis

    with private_redis() as url:
        client = redis.Redis.from_url(url)
        empty = int(client.info("memory")["used_memory"])
        now = int(time.time() * 1000)
        scope = "billing.charge"
        names = []
        for start in range(0, count, 1000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(count, start + 1000)):
                digest = digest_key(f"k{i}")
                name = f"oncely:{scope}:{digest}"
                names.append(name)
                pipe.hset(
                    name,
                    mapping={
                        "st": "completed",
                        "fe": str(now * 1000 + i),
                        "fp": "f" * 32,
                        "ea": str(now + 3_600_000),
                        "ca": str(now),
                        "sc": scope,
                        "dg": digest,
                        "rs": result,
                        "cd": "json",
                    },
                )
                pipe.pexpireat(name, now + 3_600_000)
            pipe.execute()
        used = int(client.info("memory")["used_memory"])
        sample = random.Random(count).sample(names, min(count, 500))
        usage = statistics.mean(client.memory_usage(n, samples=0) for n in sample)
        enc = client.object("encoding", names[0]).decode()
        client.close()
    size = Size("redis (layout before)", label, count, (used - empty) / count, usage)
    print(
        f"  redis (layout before) {label:15} {count:>9,} keys: used_memory "
        f"{size.bytes_per_key:7.1f} B/key, MEMORY USAGE {usage:7.1f} B ({enc})",
        flush=True,
    )
    return size


def fill_redis_range(store: Store, scope: str, lo: int, hi: int, result: bytes) -> None:
    for start in range(lo, hi, 50_000):
        _fill_redis_keys(store, scope, range(start, min(hi, start + 50_000)), result)


def _fill_redis_keys(store: Store, scope: str, numbers: range, result: bytes) -> None:
    """Claim and complete keys ``k{i}`` for ``i`` in ``numbers`` through the store's own plans
    (its Lua scripts), 1,000 scripts per pipeline."""
    client: Any = store.redis.client  # type: ignore[attr-defined]
    for start in range(numbers.start, numbers.stop, 1000):
        keys = [
            RecordKey(scope, digest_key(f"k{i}"))
            for i in range(start, min(numbers.stop, start + 1000))
        ]
        replies = _pipeline(client, [store._claim(k, "f" * 32, 60, 3600) for k in keys])  # type: ignore[attr-defined]
        completes = []
        for k, outcome in zip(keys, replies):
            assert isinstance(outcome, New), outcome
            completes.append(store._complete(k, outcome.fence, result, "json", 3600))  # type: ignore[attr-defined]
        _pipeline(client, completes)


def _pipeline(client: Any, plans: list[Any]) -> list[Any]:
    """Run one-request plans (each sends one script) in one pipeline; their return values."""
    pipe = client.pipeline(transaction=False)
    for plan in plans:
        req = next(plan)
        pipe.execute_command("EVALSHA", req.script.sha, req.numkeys, *req.keys_and_args)
    out = []
    for plan, reply in zip(plans, pipe.execute()):
        try:
            plan.send(reply)
        except StopIteration as stop:
            out.append(stop.value)
        else:  # pragma: no cover - every plan used here sends one request
            raise AssertionError("plan sent a second request")
    return out


# -- part 3: purge -------------------------------------------------------------------------------
@dataclass
class Purge:
    store: str
    how: str
    records: int
    seconds: float
    claims_p99_ms: float | None = None
    claims_max_ms: float | None = None
    baseline_p99_ms: float | None = None
    baseline_max_ms: float | None = None
    claims: int = 0

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def fill_expired(kind: str, store: Store, count: int) -> None:
    scope = "scale.purge"
    if kind == "memory":
        for i in range(count):
            key = RecordKey(scope, digest_key(f"k{i}"))
            outcome: Any = store.claim(key, "f" * 32, 0.001, 0.001)
            store.complete(key, outcome.fence, RESULTS["100-byte JSON"], "json", 0.001)
        time.sleep(0.01)  # let the 1 ms records expire
        return
    fill_sql(kind, store, scope, 0, count, RESULTS["100-byte JSON"], expired=True)
    # the template itself is live; make it expired too so the count is exact
    key = RecordKey(scope, digest_key("template"))
    store.delete(key)


def purge_loop(store: Store, batch: int, slowest: list[float] | None = None) -> tuple[int, float]:
    """``purge_expired(batch)`` until it deletes nothing; the count and seconds (and the
    slowest single call in ``slowest``: how long a row lock of the purge can be held)."""
    total = 0
    t0 = time.perf_counter()
    worst = 0.0
    while True:
        t1 = time.perf_counter()
        n = store.purge_expired(batch)
        worst = max(worst, time.perf_counter() - t1)
        if n == 0:
            break
        total += n
    if slowest is not None:
        slowest.append(worst)
    return total, time.perf_counter() - t0


def wait_sampler(table: str, stop: threading.Event) -> tuple[Counter[str], threading.Thread]:
    """Every 5 ms, what this table's claim statements wait for (``pg_stat_activity``): row
    locks of the purge show as ``Lock:transactionid``, WAL flushes as ``IO:WALSync`` and
    ``LWLock:WALWrite``."""
    import psycopg

    seen: Counter[str] = Counter()

    def run() -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE "
                    "state = 'active' AND query LIKE 'WITH cur AS%%' AND query LIKE %s",
                    (f"%{table}%",),
                ).fetchall()
                for kind, event in rows:
                    seen["running" if kind is None else f"{kind}:{event}"] += 1
                stop.wait(0.005)

    thread = threading.Thread(target=run)
    thread.start()
    return seen, thread


def claim_load(
    store: Store, count: int, stop: threading.Event, threads: int = 4
) -> tuple[dict[str, list[float]], list[threading.Thread]]:
    """``threads`` callers claiming (and completing what they claimed) until ``stop``: half on
    new keys, half on random keys of the expired set (take-overs while they are not purged
    yet; once purged, a plain insert). Claim latencies by kind: ``new``, ``take-over``."""
    latencies: dict[str, list[float]] = {"new": [], "take-over": []}
    lock = threading.Lock()

    def work(worker: int) -> None:
        rng = random.Random(worker)
        kind = "take-over" if worker % 2 else "new"
        mine = []
        while not stop.is_set():
            if kind == "take-over":
                key = RecordKey("scale.purge", digest_key(f"k{rng.randrange(count)}"))
            else:
                key = RecordKey("scale.live", digest_key(uuid.uuid4().hex))
            t0 = time.perf_counter()
            outcome = store.claim(key, "f" * 32, 30, 3600)
            mine.append(time.perf_counter() - t0)
            if isinstance(outcome, New):
                store.complete(key, outcome.fence, b"1", "json", 3600)
        with lock:
            latencies[kind].extend(mine)

    workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for t in workers:
        t.start()
    return latencies, workers


def purge_rates(kinds: list[str], count: int, big: int, batch: int, folder: str) -> list[Purge]:
    out: list[Purge] = []
    for kind in kinds:
        if kind == "redis":
            continue  # Redis drops expired records itself (PEXPIREAT): purge_expired is 0
        tgt = target(kind, folder)
        store = tgt.open()
        try:
            fill_expired(kind, store, count)
            n, secs = purge_loop(store, batch)
            out.append(Purge(kind, f"purge_expired({batch}) loop", n, secs))
            print(
                f"  {kind:8} purge_expired({batch}) loop: {n:,} in {secs:.2f} s = "
                f"{n / secs:,.0f}/s",
                flush=True,
            )
            if kind != "memory":
                fill_expired(kind, store, count)
                t0 = time.perf_counter()
                cli = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "oncely",
                        "purge",
                        tgt.url,
                        "--table",
                        tgt.options.get("table", "oncely_records"),
                        "--batch",
                        str(batch),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                secs = time.perf_counter() - t0
                left = store.purge_expired(count)
                print(
                    f"  {kind:8} oncely purge: {cli.stdout.strip() or cli.stderr[-300:]} in "
                    f"{secs:.2f} s (left behind: {left})",
                    flush=True,
                )
                if cli.returncode == 0:
                    out.append(Purge(kind, f"`oncely purge --batch {batch}`", count - left, secs))
            if kind == "postgres" and big:
                out += purge_under_load(store, big, batch)
        finally:
            store.close()
            tgt.cleanup()
    return out


def purge_under_load(store: Store, count: int, batch: int) -> list[Purge]:
    """PostgreSQL: purge ``count`` expired records while claims run; the same claims for 3 s
    without a purge first (the reference, same run)."""
    fill_expired("postgres", store, count)
    stop = threading.Event()
    base, workers = claim_load(store, count, stop)
    time.sleep(3)
    stop.set()
    for t in workers:
        t.join()
    stop = threading.Event()
    during, workers = claim_load(store, count, stop)
    waits, sampler = wait_sampler(store.table, stop)  # type: ignore[attr-defined]
    slowest: list[float] = []
    n, secs = purge_loop(store, batch, slowest)
    stop.set()
    for t in [*workers, sampler]:
        t.join()
    total = sum(waits.values()) or 1
    WAITS.append(
        f"slowest purge_expired({batch}) call {slowest[0] * 1000:,.0f} ms; claim statements "
        "sampled every 5 ms during the purge: "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in waits.most_common(6))
    )
    print("  " + WAITS[-1], flush=True)
    out = []
    for kind in ("new", "take-over"):
        d, b = during[kind], base[kind]
        p = Purge(
            "postgres",
            f"{count:,} expired, purge_expired({batch}) loop; {kind} claims beside it",
            n,
            secs,
            p99(d) * 1000,
            max(d) * 1000,
            p99(b) * 1000,
            max(b) * 1000,
            len(d),
        )
        out.append(p)
        print(
            f"  postgres purge of {n:,} under load: {secs:.1f} s ({n / secs:,.0f}/s); {kind} "
            f"claims during purge p99 {p.claims_p99_ms:.1f} ms max {p.claims_max_ms:.1f} ms "
            f"({len(d):,} claims); without purge p99 {p.baseline_p99_ms:.1f} ms max "
            f"{p.baseline_max_ms:.1f} ms ({len(b):,})",
            flush=True,
        )
    return out


# -- output --------------------------------------------------------------------------------------
def plot(
    points: list[Point], sizes: list[Size], purges: list[Purge], folder: Path = DOCS
) -> list[str]:
    """Draw the PNGs into ``folder``; their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if points:
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
        series = sorted({(p.store, p.face) for p in points})
        for col, phase in enumerate(("first", "replay")):
            for store, face in series:
                row = [p for p in points if (p.store, p.face, p.phase) == (store, face, phase)]
                xs = [p.concurrency for p in row]
                style = "-" if face == "sync" else "--"
                axes[0][col].plot(
                    xs, [p.rate for p in row], style, marker="o", ms=3, label=f"{store} {face}"
                )
                axes[1][col].plot(
                    xs, [p.p99_ms for p in row], style, marker="o", ms=3, label=f"{store} {face}"
                )
            axes[0][col].set_title(f"{phase} calls: throughput")
            axes[1][col].set_title(f"{phase} calls: p99 latency")
            axes[0][col].set_ylabel("calls/s")
            axes[1][col].set_ylabel("p99 (ms)")
            for ax in (axes[0][col], axes[1][col]):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("concurrent callers (threads: solid, asyncio tasks: dashed)")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7, ncol=2)
        fig.suptitle("@idempotent against concurrency (benchmarks/scale.py)")
        fig.tight_layout()
        fig.savefig(folder / "perf-concurrency.png", dpi=80)
        made.append("perf-concurrency.png")
    if sizes:
        fig, ax = plt.subplots(figsize=(8, 5))
        for store, label in sorted({(s.store, s.result) for s in sizes}):
            row = [s for s in sizes if (s.store, s.result) == (store, label)]
            ax.plot(
                [s.keys for s in row],
                [s.bytes_per_key for s in row],
                marker="o",
                label=f"{store}, {label}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("stored (completed) keys")
        ax.set_ylabel("bytes per key")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Bytes per stored key (benchmarks/scale.py)")
        fig.tight_layout()
        fig.savefig(folder / "perf-bytes-per-key.png", dpi=80)
        made.append("perf-bytes-per-key.png")
    if purges:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        bars = {
            f"{p.store}\n{p.how.split(';')[0]}"
            + (", beside claims" if ";" in p.how else ""): p.rate
            for p in purges
        }
        ax.barh(list(bars), list(bars.values()))
        ax.set_xlabel("expired records purged per second")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title("Purge rate (benchmarks/scale.py)")
        fig.tight_layout()
        fig.savefig(folder / "perf-purge.png", dpi=80)
        made.append("perf-purge.png")
    plt.close("all")
    return made


def targets(sizes: list[Size], purges: list[Purge]) -> list[str]:
    """Issue 13's two growth targets, measured in this run."""
    rows = []
    for s in sizes:
        if not s.store.startswith("redis") or s.memory_usage is None:
            continue
        if s.store == "redis" and s.keys != max(x.keys for x in sizes if x.store == "redis"):
            continue
        size = len(RESULTS[s.result])
        goal = 2 * size + 200
        which = "layout before this change (reference)" if s.store != "redis" else "now"
        rows.append(
            f"| Redis memory per completed key, {s.result} result, {s.keys:,} keys, {which} "
            f"(MEMORY USAGE / used_memory delta) | {s.memory_usage:,.0f} / "
            f"{s.bytes_per_key:,.0f} B | ≤ {goal} B | "
            f"MEMORY USAGE {'met' if s.memory_usage <= goal else 'missed'}, "
            f"delta {'met' if s.bytes_per_key <= goal else 'missed'} |"
        )
    for p in purges:
        if p.claims_max_ms is not None:
            kind = p.how.rsplit("; ", 1)[1].split(" claims")[0]
            rows.append(
                f"| PostgreSQL purge of {p.records:,} expired records | {p.seconds:,.1f} s | "
                f"< 60 s | {'met' if p.seconds < 60 else 'missed'} |"
            )
            rows.append(
                f"| max latency of {kind} claims during that purge (without purge, same run) | "
                f"{p.claims_max_ms:,.1f} ms ({p.baseline_max_ms:,.1f} ms) | ≤ 100 ms | "
                f"{'met' if p.claims_max_ms <= 100 else 'missed'} |"
            )
    if not rows:
        return []
    rows = list(dict.fromkeys(rows))  # the purge time row comes once per claim kind
    return [
        "### Targets (issue 13)",
        "",
        "| target | measured | goal | |",
        "|---|---:|---:|---|",
        *rows,
        "",
    ]


def section(
    command: str, points: list[Point], sizes: list[Size], purges: list[Purge], plots: list[str]
) -> str:
    lines = [
        "## Growth curves (`benchmarks/scale.py`)",
        "",
        f"`{command}`, run {time.strftime('%Y-%m-%d')} on the 2-core shared machine, "
        "servers on loopback.",
        "",
    ]
    if points:
        lines += [
            "### Throughput and p99 against concurrency",
            "",
            "![throughput and p99 against concurrency](perf-concurrency.png)",
            "",
            "| store | face | callers | first calls/s | first p99 ms | replays/s | replay p99 ms |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for store, face, c in sorted(
            {(p.store, p.face, p.concurrency) for p in points}, key=lambda t: (t[0], t[1], t[2])
        ):
            first = next(
                p
                for p in points
                if (p.store, p.face, p.concurrency, p.phase) == (store, face, c, "first")
            )
            rep = next(
                p
                for p in points
                if (p.store, p.face, p.concurrency, p.phase) == (store, face, c, "replay")
            )
            lines.append(
                f"| {store} | {face} | {c} | {first.rate:,.0f} | {first.p99_ms:,.1f} | "
                f"{rep.rate:,.0f} | {rep.p99_ms:,.1f} |"
            )
        lines.append("")
    if sizes:
        lines += [
            "### Bytes per stored key",
            "",
            "![bytes per stored key](perf-bytes-per-key.png)",
            "",
            "| store | result | keys | bytes/key | Redis MEMORY USAGE (sampled) | target (Redis) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for s in sizes:
            size = len(RESULTS[s.result])
            goal = f"≤ {2 * size + 200}" if s.store.startswith("redis") else ""
            usage = "" if s.memory_usage is None else f"{s.memory_usage:,.0f}"
            lines.append(
                f"| {s.store} | {s.result} | {s.keys:,} | {s.bytes_per_key:,.0f} | "
                f"{usage} | {goal} |"
            )
        lines.append("")
    if purges:
        lines += [
            "### Purge of expired records",
            "",
            "![purge rate](perf-purge.png)",
            "",
            "| store | how | records | seconds | records/s | claim p99 / max ms during "
            "purge | same claims without purge p99 / max ms |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for p in purges:
            during = (
                ""
                if p.claims_p99_ms is None
                else f"{p.claims_p99_ms:,.1f} / {p.claims_max_ms:,.1f}"
            )
            base = (
                ""
                if p.baseline_p99_ms is None
                else f"{p.baseline_p99_ms:,.1f} / {p.baseline_max_ms:,.1f}"
            )
            lines.append(
                f"| {p.store} | {p.how} | {p.records:,} | {p.seconds:,.1f} | "
                f"{p.rate:,.0f} | {during} | {base} |"
            )
        lines.append("")
    lines += targets(sizes, purges)
    lines.append(NOTES)
    lines += [f"  {w}." for w in WAITS]
    lines.append(ANALYSIS)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny counts")
    parser.add_argument("--parts", default="concurrency,bytes,purge")
    parser.add_argument("--stores", default="memory,sqlite,postgres,mysql,redis")
    parser.add_argument("--seconds", type=float, default=2.0, help="per concurrency point")
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--keys", default="10000,100000,1000000", help="bytes-per-key counts")
    parser.add_argument(
        "--purge-count",
        type=int,
        default=100_000,
        help="expired records per store for the purge rates",
    )
    parser.add_argument(
        "--purge-records",
        type=int,
        default=1_000_000,
        help="PostgreSQL purge under live claims (0: skip)",
    )
    parser.add_argument("--batch", type=int, default=10_000, help="purge_expired limit")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--save", help="write the measurements to this JSON file")
    parser.add_argument(
        "--from-json", help="measure nothing: write the docs from a file --save wrote"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.max_concurrency = min(args.seconds, 0.2), min(args.max_concurrency, 4)
        args.keys, args.purge_count, args.purge_records, args.batch = "200,500", 300, 0, 100
    parts = set(args.parts.split(","))
    kinds = args.stores.split(",")
    levels = [1 << i for i in range(20) if 1 << i <= args.max_concurrency]
    counts = [int(k) for k in args.keys.split(",")]
    command = "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    points: list[Point] = []
    sizes: list[Size] = []
    purges: list[Purge] = []
    folder = tempfile.mkdtemp(prefix="oncely-scale-")
    if args.from_json:  # several files: a later file's sizes replace an earlier's same rows
        commands = []
        by_row: dict[tuple[str, str, int], Size] = {}
        for path in args.from_json.split(","):
            saved = json.loads(Path(path).read_text())
            commands.append(re.sub(r" --save \S+", "", saved["command"]).strip())
            points += [Point(**p) for p in saved["points"]]
            for x in saved["sizes"]:
                by_row[x["store"], x["result"], x["keys"]] = Size(**x)
            purges += [Purge(**x) for x in saved["purges"]]
            WAITS.extend(saved["waits"])
        sizes = list(by_row.values())
        command = "`, then `".join(commands)
        parts = set()
    try:
        if "concurrency" in parts:
            print("throughput and p99 against concurrency", flush=True)
            for kind in kinds:
                tgt = target(kind, folder)
                try:
                    points += concurrency_curve(kind, tgt, levels, args.seconds)
                finally:
                    tgt.cleanup()
        if "bytes" in parts:
            print("bytes per stored key", flush=True)
            sizes = bytes_per_key(kinds, counts, folder)
        if "purge" in parts:
            print("purge rate", flush=True)
            purges = purge_rates(kinds, args.purge_count, args.purge_records, args.batch, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.save:
        Path(args.save).write_text(
            json.dumps(
                {
                    "command": command,
                    "points": [dataclasses.asdict(p) for p in points],
                    "sizes": [dataclasses.asdict(x) for x in sizes],
                    "purges": [dataclasses.asdict(x) for x in purges],
                    "waits": WAITS,
                }
            )
        )
    if args.write_docs:
        made = plot(points, sizes, purges)
        body = section(command.strip(), points, sizes, purges, made)
        write_section("growth", body)
        print("wrote docs/performance.md (growth) and docs/" + ", docs/".join(made))


if __name__ == "__main__":
    main()
