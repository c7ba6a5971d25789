"""Benchmark: ``@idempotent`` on every store, side by side with AWS Lambda Powertools'
``idempotent_function`` and raw driver calls (redis-py, psycopg, sqlite3), in one run.

    .venv/bin/python benchmarks/decorator.py [--n 2000] [--concurrency 32] [--write-docs]
        [--stores memory,sqlite,postgres,redis,redis-nopipe,memory-metrics,memory-traced]

Measures ops/s and p50/p99 latency of a trivial decorated function: first-time calls (new
keys) and replays (the same keys again), sequential and with 32 concurrent callers (threads
for sync, tasks for async). On Redis it also counts server commands per call. The raw SQL
baselines are one ``INSERT … ON CONFLICT DO NOTHING`` plus commit per call (what a first-time
call must at least do); the ``sync seq, alternating`` rows run raw and oncely first-time calls
call by call, alternating, on the SQL stores, so both meet the same spells of a busy disk.
Ratios are the median of the per-pass ratios. ``redis-nopipe`` is the Redis store with
``autopipeline=False`` (one pooled connection per script, as before auto-pipelining). This
machine is shared and noisy: compare the ratios within one run, not absolute numbers across
runs.

``memory-metrics`` is the memory store with :mod:`oncely.observability.prometheus` installed
(on a fresh registry) for its measurements only; ``memory-traced`` adds
:mod:`oncely.observability.otel` on an SDK ``TracerProvider`` (spans made, none exported):
the cost of observability, against plain ``memory`` in the same pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis
from docs_section import write_section
from harness import sqlite_connect

from oncely import idempotent
from oncely.stores import Store, open_store

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class Result:
    name: str
    mode: str
    phase: str
    n: int
    seconds: float
    latencies: list[float]
    commands_per_call: float | None = None

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    def row(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) * 1e6
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6
        cmds = "" if self.commands_per_call is None else f"{self.commands_per_call:.2f}"
        return (
            f"| {self.name} | {self.mode} | {self.phase} | {self.rate:,.0f} | {p50:,.0f} | "
            f"{p99:,.0f} | {cmds} |"
        )


class CountingConnection(redis.Connection):
    """A redis-py connection that counts round trips (one per packed command sent)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def counting_client() -> redis.Redis:
    pool = redis.ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection)
    return redis.Redis(connection_pool=pool)


class CountingScripts:
    """Counts the commands the Redis store's sync face sends (``store.redis.scripts``): with
    auto-pipelining several may share one write, so this is commands per call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def execute_command(self, *args: Any) -> Any:
        CountingConnection.sent += 1
        return self.inner.execute_command(*args)


def redis_store(autopipeline: bool) -> Store:
    store = open_store(REDIS_URL, prefix="oncely-bench", autopipeline=autopipeline)
    clients = store.redis  # type: ignore[attr-defined]
    clients.scripts = CountingScripts(clients.scripts)
    return store


def run_sync(calls: list[Callable[[], Any]], concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()

    def work(chunk: list[Callable[[], Any]]) -> None:
        mine = []
        for call in chunk:
            t0 = time.perf_counter()
            call()
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    chunks = [calls[i::concurrency] for i in range(concurrency)]
    t0 = time.perf_counter()
    if concurrency == 1:
        work(calls)
    else:
        threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return time.perf_counter() - t0, latencies


async def run_async(
    calls: list[Callable[[], Awaitable[Any]]], concurrency: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def work(chunk: list[Callable[[], Awaitable[Any]]]) -> None:
        for call in chunk:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(work(calls[i::concurrency]) for i in range(concurrency)))
    return time.perf_counter() - t0, latencies


def measure(
    name: str, mode: str, phase: str, calls: list[Any], concurrency: int, count: bool
) -> Result:
    """Time ``calls``; with ``count``, also round trips per call on counting sync clients."""
    before = CountingConnection.sent
    if mode.startswith("async"):
        seconds, latencies = asyncio.run(run_async(calls, concurrency))
    else:
        seconds, latencies = run_sync(calls, concurrency)
    per_call = (CountingConnection.sent - before) / len(calls) if count else None
    return Result(name, mode, phase, len(calls), seconds, latencies, per_call)


def oncely_sync(store: Store, tag: str, cache: int = 0) -> Callable[..., Any]:
    @idempotent(store=store, name=f"bench.{tag}", key=["order_id"], cache_size=cache)
    def handle(order_id: str) -> dict[str, Any]:
        return {"order_id": order_id, "ok": True}

    return handle


def oncely_async(store: Store, tag: str) -> Callable[..., Any]:
    @idempotent(store=store, name=f"bench.{tag}", key=["order_id"])
    async def handle(order_id: str) -> dict[str, Any]:
        return {"order_id": order_id, "ok": True}

    return handle


def bench_oncely(store_name: str, store: Store, n: int, conc: int) -> list[Result]:
    is_redis = store_name.startswith("redis")  # commands are counted on the sync face
    results = []
    for mode, c in (("sync seq", 1), (f"sync {conc} threads", conc)):
        fn = oncely_sync(store, f"{store_name}-{mode}-{uuid.uuid4().hex[:6]}")
        keys = [f"k{i}" for i in range(n)]
        for phase in ("first", "replay"):
            calls = [lambda k=k, fn=fn: fn(k) for k in keys]
            results.append(measure(f"oncely {store_name}", mode, phase, calls, c, is_redis))
    if store_name == "redis":
        fn = oncely_sync(store, f"cache-{uuid.uuid4().hex[:6]}", cache=n)
        keys = [f"k{i}" for i in range(n)]
        calls = [lambda k=k: fn(k) for k in keys]
        measure("oncely redis", "sync seq", "first", calls, 1, False)
        measure("oncely redis", "sync seq", "replay", calls, 1, False)  # fills the cache
        results.append(measure("oncely redis +cache", "sync seq", "replay", calls, 1, True))
    mode = f"async {conc} tasks"
    fn_async = oncely_async(store, f"{store_name}-async-{uuid.uuid4().hex[:6]}")
    keys = [f"k{i}" for i in range(n)]
    for phase in ("first", "replay"):
        calls = [lambda k=k: fn_async(k) for k in keys]
        results.append(measure(f"oncely {store_name}", mode, phase, calls, conc, False))
    return results


def bench_powertools(n: int, conc: int) -> list[Result]:
    warnings.filterwarnings("ignore")
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
    from aws_lambda_powertools.utilities.idempotency.persistence.cache import (
        CachePersistenceLayer,
    )

    layer = CachePersistenceLayer(client=counting_client())
    config = IdempotencyConfig(expires_after_seconds=3600)
    results = []
    for mode, c in (("sync seq", 1), (f"sync {conc} threads", conc)):
        tag = uuid.uuid4().hex[:8]

        @idempotent_function(data_keyword_argument="order", persistence_store=layer, config=config)
        def handle(order: dict[str, Any]) -> dict[str, Any]:
            return {"order_id": order["id"], "ok": True}

        keys = [f"{tag}-{i}" for i in range(n)]
        for phase in ("first", "replay"):
            calls = [lambda k=k: handle(order={"id": k}) for k in keys]
            results.append(measure("Powertools redis", mode, phase, calls, c, True))
    return results


def bench_raw_redis(n: int, conc: int) -> list[Result]:
    client = counting_client()
    tag = uuid.uuid4().hex[:8]
    keys = [f"bench-raw:{tag}:{i}" for i in range(n)]
    results = [
        measure(
            "raw redis-py SET NX",
            "sync seq",
            "first",
            [lambda k=k: client.set(k, b"1", nx=True, ex=3600) for k in keys],
            1,
            True,
        ),
        measure(
            "raw redis-py GET",
            "sync seq",
            "replay",
            [lambda k=k: client.get(k) for k in keys],
            1,
            True,
        ),
    ]
    tag = uuid.uuid4().hex[:8]
    keys = [f"bench-raw:{tag}:{i}" for i in range(n)]
    aclient: list[aredis.Redis] = []

    def get_client() -> aredis.Redis:
        # one client per asyncio.run loop
        loop = asyncio.get_running_loop()
        if not aclient or aclient[0]._bench_loop is not loop:  # type: ignore[attr-defined]
            c = aredis.Redis.from_url(REDIS_URL)
            c._bench_loop = loop  # type: ignore[attr-defined]
            aclient[:] = [c]
        return aclient[0]

    mode = f"async {conc} tasks"
    results.append(
        measure(
            "raw redis-py SET NX",
            mode,
            "first",
            [lambda k=k: get_client().set(k, b"1", nx=True, ex=3600) for k in keys],
            conc,
            False,
        )
    )
    results.append(
        measure(
            "raw redis-py GET",
            mode,
            "replay",
            [lambda k=k: get_client().get(k) for k in keys],
            conc,
            False,
        )
    )
    return results


def _raw_path(tag: str) -> str:
    """The SQLite file of the raw-insert baseline."""
    return f"/tmp/oncely-bench-raw-{tag}.db"


def _raw_insert(kind: str, tag: str) -> tuple[str, str, str]:
    """The raw baseline's table, its ``INSERT … ON CONFLICT DO NOTHING`` of ``(k, v)`` in the
    driver's placeholder style, and its name in the results."""
    table = f"oncely_bench_raw_{tag}"
    if kind == "postgres":
        sql = f"INSERT INTO {table} (k, v) VALUES (%s, %s) ON CONFLICT (k) DO NOTHING"
        return table, sql, "raw psycopg INSERT ON CONFLICT"
    sql = f"INSERT INTO {table} (k, v) VALUES (?, ?) ON CONFLICT (k) DO NOTHING"
    return table, sql, "raw sqlite3 INSERT ON CONFLICT"


def _inserter(connect: Callable[[], Any], sql: str, opened: list[Any]) -> Callable[[str], None]:
    """``insert(key)``: the statement and a commit on the calling thread's own connection."""
    local = threading.local()

    def insert(k: str) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = connect()
            opened.append(conn)
        conn.execute(sql, (k, b"1"))
        conn.commit()

    return insert


def bench_raw_sql(kind: str, n: int, conc: int, tag: str) -> list[Result]:
    """One ``INSERT … ON CONFLICT DO NOTHING`` and a commit per call: the least a first-time
    call on a SQL store must do (the raw single-statement rate)."""
    table, sql, name = _raw_insert(kind, tag)
    run = uuid.uuid4().hex[:8]
    results = []
    if kind == "postgres":
        import psycopg

        def connect() -> Any:
            return psycopg.connect(POSTGRES_URL)

    else:

        def connect() -> Any:
            # synchronous=FULL: the SQLite store's default
            return sqlite_connect(_raw_path(tag), "FULL", timeout=30)

    setup = connect()
    setup.execute(
        f"CREATE TABLE IF NOT EXISTS {table} "
        f"(k TEXT PRIMARY KEY, v {'BYTEA' if kind == 'postgres' else 'BLOB'})"
    )
    setup.commit()
    modes = [("sync seq", 1)] + ([(f"sync {conc} threads", conc)] if conc > 1 else [])
    for mode, c in modes:
        opened: list[Any] = []
        insert = _inserter(connect, sql, opened)
        keys = [f"{run}-{mode}-{i}" for i in range(n)]
        calls = [lambda k=k, insert=insert: insert(k) for k in keys]
        results.append(measure(name, mode, "first", calls, c, False))
        for conn in opened:
            conn.close()
    setup.close()
    return results


PAIRED = "sync seq, alternating"


def bench_sql_paired(kind: str, store: Store, n: int, tag: str, block: int = 1) -> list[Result]:
    """Sequential first-time calls, raw (one ``INSERT … ON CONFLICT`` and a commit) and oncely,
    alternating in blocks of ``block`` calls (default: call by call), so that both meet the same
    spells of a busy disk and CPU on this shared machine (separate runs of each made their ratio
    swing 0.24x-0.76x)."""
    run = uuid.uuid4().hex[:8]
    _, sql, name = _raw_insert(kind, tag)
    if kind == "postgres":
        import psycopg

        raw_conn: Any = psycopg.connect(POSTGRES_URL)
    else:
        raw_conn = sqlite_connect(_raw_path(tag), "FULL", timeout=30, check_same_thread=True)
    fn = oncely_sync(store, f"{kind}-paired-{run}")
    spent = {"raw": 0.0, "oncely": 0.0}
    latencies: dict[str, list[float]] = {"raw": [], "oncely": []}
    try:
        for start in range(0, n, block):
            for side in ("raw", "oncely") if start // block % 2 == 0 else ("oncely", "raw"):
                for i in range(start, min(start + block, n)):
                    t0 = time.perf_counter()
                    if side == "raw":
                        raw_conn.execute(sql, (f"{run}-paired-{i}", b"1"))
                        raw_conn.commit()
                    else:
                        fn(f"paired-{i}")
                    took = time.perf_counter() - t0
                    spent[side] += took
                    latencies[side].append(took)
    finally:
        raw_conn.close()
    return [
        Result(name, PAIRED, "first", n, spent["raw"], latencies["raw"]),
        Result(f"oncely {kind}", PAIRED, "first", n, spent["oncely"], latencies["oncely"]),
    ]


def drop_raw_sql(kind: str, tag: str) -> None:
    table = _raw_insert(kind, tag)[0]
    if kind == "postgres":
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    else:
        import os

        for suffix in ("", "-wal", "-shm"):
            path = f"{_raw_path(tag)}{suffix}"
            if os.path.exists(path):
                os.remove(path)


def cleanup() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    for pattern in ("bench-raw:*", "oncely-bench:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])


@contextlib.contextmanager
def observed(store_name: str) -> Iterator[None]:
    """Install the observers a ``memory-metrics`` / ``memory-traced`` measurement asks for."""
    if not store_name.startswith("memory-"):
        yield
        return
    from prometheus_client import CollectorRegistry

    from oncely.observability import otel, prometheus

    metrics = prometheus.install(CollectorRegistry())
    tracer = None
    if store_name == "memory-traced":
        from opentelemetry.sdk.trace import TracerProvider

        tracer = otel.install(TracerProvider())
    try:
        yield
    finally:
        prometheus.uninstall(metrics)
        if tracer is not None:
            otel.uninstall(tracer)


def median_of(runs: list[Result]) -> Result:
    """The pass with the median rate (its latencies come along with it)."""
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stores", default="memory,sqlite,postgres,redis,redis-nopipe")
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip raw redis-py and Powertools (e.g. for the observability ratios alone)",
    )
    parser.add_argument(
        "--passes", type=int, default=3, help="interleaved passes; the median rate is reported"
    )
    args = parser.parse_args()
    n, conc = args.n, args.concurrency
    tag = uuid.uuid4().hex[:8]
    stores: dict[str, Store] = {}
    for name in args.stores.split(","):
        if name in ("memory", "memory-metrics", "memory-traced"):
            stores[name] = open_store("memory://")
        elif name == "sqlite":
            stores[name] = open_store(f"sqlite:////tmp/oncely-bench-{tag}.db")
        elif name == "postgres":
            stores[name] = open_store(POSTGRES_URL, table=f"oncely_bench_{tag}", create_schema=True)
        elif name == "redis":
            stores[name] = redis_store(autopipeline=True)
        elif name == "redis-nopipe":
            stores[name] = redis_store(autopipeline=False)

    passes: list[list[Result]] = []
    try:
        for number in range(args.passes):
            print(f"... pass {number + 1}/{args.passes}", flush=True)
            this = [] if args.no_baselines else bench_raw_redis(n, conc) + bench_powertools(n, conc)
            for kind in ("postgres", "sqlite"):
                if kind in stores:
                    this += bench_raw_sql(kind, n, conc, tag)
            for store_name, store in stores.items():
                with observed(store_name):
                    this += bench_oncely(store_name, store, n, conc)
            for kind in ("postgres", "sqlite"):
                if kind in stores:
                    this += bench_sql_paired(kind, stores[kind], n, tag)
            passes.append(this)
    finally:
        if "postgres" in stores:
            import psycopg

            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS oncely_bench_{tag}")
        for store in stores.values():
            store.close()
        for kind in ("postgres", "sqlite"):
            if kind in stores:
                drop_raw_sql(kind, tag)
        cleanup()

    results = [median_of([p[i] for p in passes]) for i in range(len(passes[0]))]
    table = [
        "| implementation | mode | phase | ops/s | p50 µs | p99 µs | commands/call |",
        "|---|---|---|---:|---:|---:|---:|",
        *[r.row() for r in results],
    ]
    by = {(r.name, r.mode, r.phase): r.rate for r in results}
    amode = f"async {conc} tasks"
    tmode = f"sync {conc} threads"

    onc, pt = "oncely redis", "Powertools redis"
    setnx, get = "raw redis-py SET NX", "raw redis-py GET"
    nopipe = "oncely redis-nopipe"
    pg, pg_raw = "oncely postgres", "raw psycopg INSERT ON CONFLICT"
    lite, lite_raw = "oncely sqlite", "raw sqlite3 INSERT ON CONFLICT"
    targets = [
        (
            "sync seq replay, oncely / Powertools",
            (onc, "sync seq", "replay"),
            (pt, "sync seq", "replay"),
            "≥ 3x",
        ),
        (
            "sync seq first-time, oncely / Powertools",
            (onc, "sync seq", "first"),
            (pt, "sync seq", "first"),
            "≥ 1.1x",
        ),
        (
            "sync seq first-time, oncely / raw SET NX",
            (onc, "sync seq", "first"),
            (setnx, "sync seq", "first"),
            "≥ 0.45x",
        ),
        (
            f"{amode} first-time, oncely / raw async SET NX",
            (onc, amode, "first"),
            (setnx, amode, "first"),
            "≥ 0.6x" if conc == 32 else ("≥ 1.0x" if conc == 64 else ""),
        ),
        (
            f"{amode} replay, oncely / raw async GET",
            (onc, amode, "replay"),
            (get, amode, "replay"),
            "≥ 1.0x" if conc == 32 else "",
        ),
        (
            f"{tmode} first-time, oncely / Powertools",
            (onc, tmode, "first"),
            (pt, tmode, "first"),
            "≥ 1.5x" if conc == 32 else "",
        ),
        (
            f"{tmode} replay, oncely / Powertools",
            (onc, tmode, "replay"),
            (pt, tmode, "replay"),
            "≥ 4x" if conc == 32 else "",
        ),
        (
            f"{amode} first-time, auto-pipelined / not (same run)",
            (onc, amode, "first"),
            (nopipe, amode, "first"),
            "",
        ),
        (
            f"{tmode} first-time, auto-pipelined / not (same run)",
            (onc, tmode, "first"),
            (nopipe, tmode, "first"),
            "",
        ),
        (
            "PostgreSQL sync seq first-time, oncely / raw INSERT ON CONFLICT + commit, "
            f"alternating call by call ({PAIRED})",
            (pg, PAIRED, "first"),
            (pg_raw, PAIRED, "first"),
            "≥ 0.45x",
        ),
        (
            "PostgreSQL sync seq first-time, oncely / raw, each measured on its own",
            (pg, "sync seq", "first"),
            (pg_raw, "sync seq", "first"),
            "",
        ),
        (
            f"PostgreSQL {tmode} first-time, oncely / raw",
            (pg, tmode, "first"),
            (pg_raw, tmode, "first"),
            "",
        ),
        (
            "SQLite sync seq first-time, oncely / raw INSERT ON CONFLICT + commit",
            (lite, "sync seq", "first"),
            (lite_raw, "sync seq", "first"),
            "",
        ),
        (
            f"SQLite sync seq first-time, oncely / raw ({PAIRED})",
            (lite, PAIRED, "first"),
            (lite_raw, PAIRED, "first"),
            "",
        ),
        (
            f"SQLite {tmode} first-time, oncely / raw",
            (lite, tmode, "first"),
            (lite_raw, tmode, "first"),
            "",
        ),
    ]
    for variant in ("memory-metrics", "memory-traced"):
        for mode in ("sync seq", tmode):
            for phase in ("first", "replay"):
                targets.append(
                    (
                        f"{mode} {phase}, {variant} / memory (observability cost)",
                        (f"oncely {variant}", mode, phase),
                        ("oncely memory", mode, phase),
                        "",
                    )
                )
    # A ratio is the median over passes of the ratio within each pass (both sides measured
    # minutes apart at most), not the ratio of two medians taken from different passes.
    per_pass = [{(r.name, r.mode, r.phase): r.rate for r in p} for p in passes]
    ratios = [
        "| ratio (same run; median of per-pass ratios) | measured | per pass | target |",
        "|---|---:|---|---:|",
    ]
    for label, a, b, goal in targets:
        if a in by and b in by:
            values = [rates[a] / rates[b] for rates in per_pass]
            measured = f"{statistics.median(values):.2f}x"
            each = ", ".join(f"{v:.2f}" for v in values)
        else:
            measured, each = "n/a", ""
        ratios.append(f"| {label} | {measured} | {each} | {goal} |")
    text = "\n".join(table) + "\n\n" + "\n".join(ratios) + "\n"
    print(text)
    if args.write_docs:
        write_docs(text, args)


HOW_TO_READ = """\
How to read it: the commands column is counted on the client (one per command sent), so it
shows the design, not the weather: oncely on Redis sends 2 scripts for a first call (claim,
complete) and 1 for a replay, 0 with `cache_size`; Powertools sends 2 and 3 (its Redis layer
overwrites a record with an unconditional SET after a GET, a race oncely's scripts do not
have). Under concurrency oncely's scripts share writes (auto-pipelining, docs/redis.md), so
the round trips are fewer than the commands; `oncely redis-nopipe` is the same store with
`autopipeline=False`, in the same run. The raw SQL rows are one `INSERT … ON CONFLICT DO
NOTHING` and a commit per call (psycopg; sqlite3 with the store's `synchronous=FULL`), the
least a first-time call must do; oncely's SQL first call is two statements (claim, complete).
"""


def write_docs(text: str, args: argparse.Namespace) -> None:
    stamp = time.strftime("%Y-%m-%d")
    command = (
        f".venv/bin/python benchmarks/decorator.py --n {args.n} --passes {args.passes} "
        f"--concurrency {args.concurrency} --stores {args.stores} --write-docs"
    )
    write_section(
        "decorator",
        "## Decorator (`benchmarks/decorator.py`)\n\n"
        f"`{command}`, run {stamp} on the 2-core shared machine, servers on loopback; each "
        f"row is the median of interleaved passes.\n\n{text}\n\n{HOW_TO_READ}",
    )


if __name__ == "__main__":
    main()
