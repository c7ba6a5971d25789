"""Benchmark: ``@idempotent`` on every store, side by side with AWS Lambda Powertools'
``idempotent_function`` and raw redis-py round trips, in one run.

    .venv/bin/python benchmarks/decorator.py [--n 2000] [--concurrency 32] [--write-docs]

Measures ops/s and p50/p99 latency of a trivial decorated function: first-time calls (new
keys) and replays (the same keys again), sequential and with 32 concurrent callers (threads
for sync, tasks for async). On Redis it also counts server commands per call. This machine is
shared and noisy: compare the ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis
from docs_section import write_section

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
    is_redis = store_name == "redis"  # round trips are counted on the sync face
    results = []
    for mode, c in (("sync seq", 1), (f"sync {conc} threads", conc)):
        fn = oncely_sync(store, f"{store_name}-{mode}-{uuid.uuid4().hex[:6]}")
        keys = [f"k{i}" for i in range(n)]
        for phase in ("first", "replay"):
            calls = [lambda k=k, fn=fn: fn(k) for k in keys]
            results.append(measure(f"oncely {store_name}", mode, phase, calls, c, is_redis))
    if is_redis:
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


def cleanup() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    for pattern in ("bench-raw:*", "oncely-bench:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])


def median_of(runs: list[Result]) -> Result:
    """The pass with the median rate (its latencies come along with it)."""
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stores", default="memory,sqlite,postgres,redis")
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    parser.add_argument(
        "--passes", type=int, default=3, help="interleaved passes; the median rate is reported"
    )
    args = parser.parse_args()
    n, conc = args.n, args.concurrency
    tag = uuid.uuid4().hex[:8]
    stores: dict[str, Store] = {}
    for name in args.stores.split(","):
        if name == "memory":
            stores[name] = open_store("memory://")
        elif name == "sqlite":
            stores[name] = open_store(f"sqlite:////tmp/oncely-bench-{tag}.db")
        elif name == "postgres":
            stores[name] = open_store(POSTGRES_URL, table=f"oncely_bench_{tag}", create_schema=True)
        elif name == "redis":
            stores[name] = open_store(REDIS_URL, prefix="oncely-bench", client=counting_client())

    passes: list[list[Result]] = []
    try:
        for number in range(args.passes):
            print(f"... pass {number + 1}/{args.passes}", flush=True)
            this = bench_raw_redis(n, conc) + bench_powertools(n, conc)
            for store_name, store in stores.items():
                this += bench_oncely(store_name, store, n, conc)
            passes.append(this)
    finally:
        if "postgres" in stores:
            import psycopg

            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS oncely_bench_{tag}")
        for store in stores.values():
            store.close()
        cleanup()

    results = [median_of([p[i] for p in passes]) for i in range(len(passes[0]))]
    table = [
        "| implementation | mode | phase | ops/s | p50 µs | p99 µs | round trips/call |",
        "|---|---|---|---:|---:|---:|---:|",
        *[r.row() for r in results],
    ]
    by = {(r.name, r.mode, r.phase): r.rate for r in results}
    amode = f"async {conc} tasks"
    tmode = f"sync {conc} threads"

    onc, pt = "oncely redis", "Powertools redis"
    setnx, get = "raw redis-py SET NX", "raw redis-py GET"
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
            "≥ 0.4x",
        ),
        (
            f"{amode} replay, oncely / raw async GET",
            (onc, amode, "replay"),
            (get, amode, "replay"),
            "≥ 0.8x",
        ),
        (f"{tmode} replay, oncely / Powertools", (onc, tmode, "replay"), (pt, tmode, "replay"), ""),
        (
            f"{tmode} first-time, oncely / Powertools",
            (onc, tmode, "first"),
            (pt, tmode, "first"),
            "",
        ),
    ]
    ratios = ["| ratio (Redis, same run) | measured | target |", "|---|---:|---:|"]
    for label, a, b, goal in targets:
        measured = f"{by[a] / by[b]:.2f}x" if a in by and b in by else "n/a"
        ratios.append(f"| {label} | {measured} | {goal} |")
    text = "\n".join(table) + "\n\n" + "\n".join(ratios) + "\n"
    print(text)
    if args.write_docs:
        write_docs(text, n, conc)


HOW_TO_READ = """\
How to read it: the round-trips column is counted on the client (one per command sent), so
it shows the design, not the weather: oncely on Redis makes 2 round trips for a first call
(claim, complete: one Lua script each) and 1 for a replay, 0 with `cache_size`; Powertools makes
2 and 3 (its Redis layer overwrites a record with an unconditional SET after a GET, a race
oncely's scripts do not have). Measured per operation on this
machine the same day (`store.claim` against `SET NX` in one loop), one oncely script
round trip costs about 1.1-1.3x a plain command (the script does `TIME`, `HMGET`, `HSET`,
`PEXPIREAT` server-side, about 15 µs more than `SET`), and the decorator's own Python work is
about 20 µs per call (memory store: ~30k first calls/s). So a first call is bound near
2 x round trip + 20 µs, i.e. about 0.4x a single raw `SET NX` when a loopback round trip costs
~70 µs, and lower when the shared machine's round trip grows to 120-200 µs as in this run.
"""


def write_docs(text: str, n: int, conc: int) -> None:
    stamp = time.strftime("%Y-%m-%d")
    write_section(
        "decorator",
        "## Decorator (`benchmarks/decorator.py`)\n\n"
        f"`make bench` (`.venv/bin/python benchmarks/decorator.py --n {n} --concurrency {conc} "
        f"--write-docs`), run {stamp} on the 2-core shared machine, servers on loopback; each "
        f"row is the median of interleaved passes.\n\n{text}\n\n{HOW_TO_READ}",
    )


if __name__ == "__main__":
    main()
