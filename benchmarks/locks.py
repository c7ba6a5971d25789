"""Lock benchmark: oncely's Redis lock against redis-py, pottery and python-redis-lock, in one run.

1. Uncontended: acquire + release of one lock per second, one client, one thread.
2. Contended: 4 processes take turns on one name (hold 1 ms, then 1 ms outside the lock, so
   someone is always waiting);
   the hand-over latency is the time from one holder's release to the next holder's acquire,
   counted when that next holder was already waiting at the release.

Redis: throwaway ``redis-server`` processes (no persistence, random loopback ports): one for
the single-node runs (or ``--redis URL``), three for the 3-node Redlocks. Uncontended rates are
the median of ``--passes`` interleaved passes, so a busy moment hits every library alike.

    .venv/bin/python benchmarks/locks.py [--rounds 5000] [--seconds 3] \\
        [--markdown docs/performance.md]

``--markdown`` writes (or replaces) the ``## Locks`` section of that file, leaving other sections.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from docs_section import write_section

HOLD = 0.001
THINK = 0.001
PROCESSES = 4


# -- throwaway redis-servers ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_servers(count: int) -> Iterator[list[str]]:
    procs, urls, dirs = [], [], []
    try:
        for _ in range(count):
            port, folder = _free_port(), tempfile.mkdtemp(prefix="oncely-bench-")
            dirs.append(folder)
            procs.append(
                subprocess.Popen(
                    [
                        shutil.which("redis-server") or "redis-server",
                        *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
                        *("--appendonly", "no", "--dir", folder),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            urls.append(f"redis://127.0.0.1:{port}/0")
        import redis

        for url in urls:
            client = redis.Redis.from_url(url)
            for _ in range(500):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.01)
            client.close()
        yield urls
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for folder in dirs:
            shutil.rmtree(folder, ignore_errors=True)


# -- the contenders: each returns (acquire, release) for a lock name ------------------------------
Pair = tuple[Callable[[], Any], Callable[[], Any]]


def make(lib: str, urls: list[str], name: str) -> Pair:
    if lib == "oncely Lock":
        from oncely.locks import Lock

        lock = Lock(urls[0], name, ttl=30)
        return lock.acquire, lock.release
    if lib.startswith("oncely Redlock"):
        from oncely.locks import Redlock

        rl = Redlock(urls, name, ttl=30)
        return rl.acquire, rl.release
    if lib == "redis-py Lock":
        import redis

        client = redis.Redis.from_url(urls[0])
        lk = client.lock(f"bench-redispy:{name}", timeout=30)
        return lk.acquire, lk.release
    if lib == "python-redis-lock":
        import redis
        import redis_lock

        client = redis.Redis.from_url(urls[0])
        prl = redis_lock.Lock(client, f"bench-prl:{name}", expire=30)
        return prl.acquire, prl.release
    if lib.startswith("pottery Redlock"):
        import redis
        from pottery import Redlock as PotteryRedlock

        masters = {redis.Redis.from_url(url) for url in urls}
        pl = PotteryRedlock(key=f"bench-pottery:{name}", masters=masters, auto_release_time=30)
        return pl.acquire, pl.release
    raise AssertionError(lib)


def uncontended(plan: list[tuple[str, str, list[str]]], rounds: int, passes: int) -> list[float]:
    """Median acquire+release/s of each entry, over ``passes`` interleaved passes (so that a
    busy moment of the machine hits every library alike)."""
    pairs = [make(lib, urls, f"u-{uuid.uuid4().hex[:8]}") for lib, _, urls in plan]
    for acquire, release in pairs:  # warm up connections and script caches
        for _ in range(200):
            acquire()
            release()
    samples: list[list[float]] = [[] for _ in pairs]
    per_pass = max(1, rounds // passes)
    for p in range(passes):
        # Rotate the order every pass, so no library always runs right after another.
        for i in [(p + k) % len(pairs) for k in range(len(pairs))]:
            acquire, release = pairs[i]
            started = time.perf_counter()
            for _ in range(per_pass):
                acquire()
                release()
            samples[i].append(per_pass / (time.perf_counter() - started))
    return [statistics.median(s) for s in samples]


def contender(lib: str, urls: list[str], name: str, start_at: float, seconds: float) -> list[Any]:
    acquire, release = make(lib, urls, name)
    log = []
    while time.time() < start_at:
        time.sleep(0.001)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        acquire()
        got = time.monotonic()
        spin = got + HOLD
        while time.monotonic() < spin:
            pass
        let_go = time.monotonic()
        release()
        log.append((got, let_go, start, os.getpid()))
        time.sleep(THINK)
    return log


def contended(lib: str, urls: list[str], seconds: float) -> tuple[float, float, int]:
    name = f"c-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0
    with ctx.Pool(PROCESSES) as pool:
        parts = pool.starmap(contender, [(lib, urls, name, start_at, seconds)] * PROCESSES)
    events = sorted(e for part in parts for e in part)
    # A hand-over: the next holder is another process, already waiting at the release.
    handovers = [
        (nxt[0] - cur[1]) * 1000
        for cur, nxt in itertools.pairwise(events)
        if nxt[3] != cur[3] and nxt[2] < cur[1]
    ]
    if not handovers:
        return float("nan"), float("nan"), 0
    p50 = statistics.median(handovers)
    p99 = statistics.quantiles(handovers, n=100)[98] if len(handovers) >= 100 else max(handovers)
    return p50, p99, len(handovers)


# -- report ---------------------------------------------------------------------------------------
def render(rows: list[tuple[str, str, float, float, float, int]], args: Any) -> str:
    lines = [
        "| library | nodes | uncontended acquire+release/s | hand-over p50 (ms) | "
        "hand-over p99 (ms) | hand-overs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for lib, nodes, ops, p50, p99, count in rows:
        lines.append(f"| {lib} | {nodes} | {ops:,.0f} | {p50:.2f} | {p99:.2f} | {count} |")
    return "\n".join(lines)


def write_markdown(path: Path, table: str, args: Any) -> None:
    version = args.redis_version
    section = "\n".join(
        [
            "## Locks",
            "",
            f"Measured by `python benchmarks/locks.py --rounds {args.rounds} --passes "
            f"{args.passes} --seconds {args.seconds}` on {platform.machine()} / "
            f"Python {platform.python_version()} / Redis {version} on loopback (a private "
            f"redis-server), {os.cpu_count()} CPUs, all libraries in the same run.",
            "",
            "* uncontended: one client acquires and releases one lock in a loop (median of "
            "interleaved passes);",
            f"* hand-over: {PROCESSES} processes take turns on one name (hold {HOLD * 1000:g} ms, "
            f"then {THINK * 1000:g} ms outside the lock); latency from a release to the next "
            "acquire by another process that was already waiting at the release.",
            "",
            table,
            "",
            "Why the hand-over differs: oncely's release script pushes a wake-up that waiters "
            "BLPOP, so the next holder runs about one round trip after the release; redis-py's "
            "`Lock` polls every 100 ms by default and pottery's Redlock retries after a random "
            "delay; python-redis-lock also wakes waiters with BLPOP. Uncontended, oncely's "
            "acquire script does a little more than `SET NX PX` (the fencing `INCR` and `TIME`), "
            "in the same single round trip.",
            "",
        ]
    )
    write_section("locks", section, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--redis", default=None, help="single-node Redis URL (default: a private redis-server)"
    )
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with redis_servers(4) as servers:
        single, three = [args.redis or servers[3]], servers[:3]
        args.redis = single[0]
        import redis

        args.redis_version = redis.Redis.from_url(args.redis).info("server")["redis_version"]
        plan = [
            ("oncely Lock", "1", single),
            ("redis-py Lock", "1", single),
            ("python-redis-lock", "1", single),
            ("oncely Redlock", "1", single),
            ("pottery Redlock", "1", single),
            ("oncely Redlock", "3", three),
            ("pottery Redlock", "3", three),
        ]
        ops_all = uncontended(plan, args.rounds, args.passes)
        for (lib, nodes, urls), ops in zip(plan, ops_all):
            p50, p99, count = contended(lib, urls, args.seconds)
            rows.append((lib, nodes, ops, p50, p99, count))
            print(
                f"{lib:<20} nodes={nodes}  {ops:>9,.0f} acq+rel/s   hand-over p50 {p50:7.2f} ms  "
                f"p99 {p99:7.2f} ms  ({count} hand-overs)",
                flush=True,
            )
    table = render(rows, args)
    print()
    print(table)
    if args.markdown is not None:
        write_markdown(args.markdown, table, args)
        print(f"\nwrote the ## Locks section of {args.markdown}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
