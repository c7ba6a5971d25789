"""Redis Cluster and ``wait_replicas`` benchmark: what ``WAIT`` costs, and throughput with 1, 2
and 3 masters, in one run.

A *call* here is what a first-time ``@idempotent`` call asks of the store: a claim of a fresh
key and its completion (two scripts). Every server is a throwaway ``redis-server`` on loopback
ports started by this script (no persistence; never the shared Redis).

1. ``WAIT`` on one server with one replica: the default store (auto-pipelined), the same with
   ``autopipeline=False`` (each script on a pooled connection, as ``wait_replicas`` sends it),
   and ``wait_replicas=1``; 1 thread and 16 threads.
2. ``WAIT`` on a 3-master cluster with one replica each: the default store against
   ``wait_replicas=1``; 1 thread and 16 threads.
3. Clusters of 1, 2 and 3 masters (no replicas): calls per second from 2 processes of 16
   threads each.

Each figure is the median of ``--passes`` passes of ``--seconds`` each, the variants of one
table interleaved within each pass, so a busy moment of the (shared, 2-core) machine hits them
alike; compare within a table, as ratios.

    .venv/bin/python benchmarks/cluster.py [--seconds 2] [--passes 3] \\
        [--markdown docs/performance.md] [--plot docs/perf-cluster.png]
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from docs_section import write_section

from oncely.core.records import RecordKey, digest_key
from oncely.stores.redis import RedisStore
from redis_cluster import RedisCluster, RedisServer, _cli, _ports

NOTE = (
    "On this machine the masters curve measures what the cluster costs the client, not how "
    "Redis scales: the two client processes and every `redis-server` share 2 cores, so more "
    "masters add processes, not CPU, and each client thread holds a connection per master; "
    "on separate hosts each master brings its own CPU. `wait_replicas` runs its scripts on "
    "pooled connections (not through the auto-pipeline, where one `WAIT` would hold up "
    "every caller behind it), so on one server compare it with `autopipeline=False` too."
)


# -- load ---------------------------------------------------------------------------------------
def _calls(store: RedisStore, threads: int, seconds: float) -> tuple[float, list[float]]:
    """Calls per second (claim + complete of fresh keys) from ``threads`` threads, and each
    call's latency (s)."""
    run = uuid.uuid4().hex[:8]
    stop = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def work(t: int) -> None:
        mine = latencies[t]
        i = 0
        while time.monotonic() < stop:
            key = RecordKey("bench", digest_key(f"{run}-{t}-{i}"))
            started = time.perf_counter()
            claim: Any = store.claim(key, "fp", 30, 600)
            store.complete(key, claim.fence, b"result", "raw", 600)
            mine.append(time.perf_counter() - started)
            i += 1

    started = time.monotonic()
    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.monotonic() - started
    flat = [x for mine in latencies for x in mine]
    return len(flat) / elapsed, flat


def _process_calls(url: str, threads: int, seconds: float, out: Any) -> None:
    store = RedisStore(url, prefix=f"bench-{uuid.uuid4().hex[:6]}")
    store.claim(RecordKey("bench", digest_key("warm")), "fp", 30, 600)  # scripts loaded
    rate, _ = _calls(store, threads, seconds)
    store.close()
    out.put(rate)


def _multi(url: str, processes: int, threads: int, seconds: float) -> float:
    """Calls per second from ``processes`` processes of ``threads`` threads."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_process_calls, args=(url, threads, seconds, out))
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    rates = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    return sum(rates)


def _p(latencies: list[float], q: float) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


# -- servers --------------------------------------------------------------------------------------
@contextmanager
def _masters(count: int) -> Iterator[str]:
    """A cluster of ``count`` masters and no replicas (``redis-cli --cluster create`` wants 3
    masters at least, so the slots are assigned by hand: ``CLUSTER ADDSLOTSRANGE``)."""
    ports = _ports(count)
    folder = tempfile.mkdtemp(prefix="oncely-bench-cluster-")
    procs = [
        subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(p),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{p}.conf",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                folder,
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    try:
        for p in ports:
            deadline = time.monotonic() + 10
            while "PONG" not in _cli(p, "PING"):
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        step = 16384 // count
        for i, p in enumerate(ports):
            last = 16383 if i == count - 1 else (i + 1) * step - 1
            _cli(p, "CLUSTER", "ADDSLOTSRANGE", str(i * step), str(last))
            if i:
                _cli(p, "CLUSTER", "MEET", "127.0.0.1", str(ports[0]))
        deadline = time.monotonic() + 30
        while not all(
            "cluster_state:ok" in (info := _cli(p, "CLUSTER", "INFO"))
            and f"cluster_known_nodes:{count}" in info
            for p in ports
        ):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.1)
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


# -- the tables -----------------------------------------------------------------------------------
def _compare_threads(
    label: str, variants: dict[str, RedisStore], seconds: float, passes: int
) -> dict[int, dict[str, tuple[float, float, float]]]:
    """:func:`_compare` on 1 and on 16 threads (printed as they come), then close the stores."""
    results = {}
    for threads in (1, 16):
        results[threads] = _compare(variants, threads, seconds, passes)
        print(f"{label}, {threads} threads: {results[threads]}", flush=True)
    for store in variants.values():
        store.close()
    return results


def _compare(
    variants: dict[str, RedisStore], threads: int, seconds: float, passes: int
) -> dict[str, tuple[float, float, float]]:
    """Per variant: median calls/s, p50 and p99 latency (ms) over interleaved passes."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    lats: dict[str, list[float]] = {name: [] for name in variants}
    for store in variants.values():  # load the scripts, open the connections: not timed
        _calls(store, threads, 0.3)
    for _ in range(passes):
        for name, store in variants.items():
            rate, latencies = _calls(store, threads, seconds)
            rates[name].append(rate)
            lats[name] += latencies
    return {
        name: (statistics.median(rates[name]), _p(lats[name], 0.5), _p(lats[name], 0.99))
        for name in variants
    }


def _table(title: str, results: dict[int, dict[str, tuple[float, float, float]]], ref: str) -> str:
    lines = [
        title,
        "",
        f"| variant | threads | calls/s | ratio to {ref} | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for threads, rows in results.items():
        base = rows[ref][0]
        for name, (rate, p50, p99) in rows.items():
            lines.append(
                f"| {name} | {threads} | {rate:,.0f} | {rate / base:.2f}x | {p50:.2f} | {p99:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    seconds, passes = args.seconds, args.passes

    # 1. WAIT on one server with a replica.
    master = RedisServer()
    replica = RedisServer(replica_of=master.port)
    single: dict[int, dict[str, tuple[float, float, float]]] = {}
    try:
        master.wait_replicas(1)
        prefix = f"bench-{uuid.uuid4().hex[:6]}"
        variants = {
            "default (auto-pipelined)": RedisStore(master.url, prefix=prefix),
            "autopipeline=False": RedisStore(master.url, prefix=prefix, autopipeline=False),
            "wait_replicas=1": RedisStore(master.url, prefix=prefix, wait_replicas=1),
        }
        single = _compare_threads("single server", variants, seconds, passes)
    finally:
        replica.stop()
        master.stop()

    # 2. WAIT on a 3-master cluster with a replica each.
    cluster = RedisCluster()
    clustered: dict[int, dict[str, tuple[float, float, float]]] = {}
    try:
        cluster.start()
        prefix = f"bench-{uuid.uuid4().hex[:6]}"
        variants = {
            "default": RedisStore(cluster.url, prefix=prefix),
            "wait_replicas=1": RedisStore(cluster.url, prefix=prefix, wait_replicas=1),
        }
        clustered = _compare_threads("cluster", variants, seconds, passes)
    finally:
        cluster.stop()

    # 3. Throughput with 1, 2 and 3 masters.
    curve: dict[int, float] = {}
    for count in (1, 2, 3):
        with _masters(count) as url:
            curve[count] = statistics.median(_multi(url, 2, 16, seconds) for _ in range(passes))
        print(f"{count} masters: {curve[count]:,.0f} calls/s", flush=True)

    machine = (
        f"{platform.python_version()}, {platform.machine()}, {multiprocessing.cpu_count()} cores"
    )
    body = "\n\n".join(
        [
            "## Redis Cluster (`benchmarks/cluster.py`)",
            f"Measured with `benchmarks/cluster.py --seconds {seconds:g} --passes {passes}` "
            f"(Python {machine}; throwaway `redis-server` 7 processes on loopback; a *call* is "
            "a claim of a fresh key and its completion, what a first-time `@idempotent` call "
            "asks of the store). Medians of interleaved passes; compare within a table.",
            _table(
                "### `wait_replicas`: one server with one replica",
                single,
                "default (auto-pipelined)",
            ),
            _table("### `wait_replicas`: 3 masters with one replica each", clustered, "default"),
            "### Masters (no replicas), 2 client processes x 16 threads\n\n"
            "| masters | calls/s | ratio to 1 master |\n|---:|---:|---:|\n"
            + "\n".join(
                f"| {n} | {rate:,.0f} | {rate / curve[1]:.2f}x |" for n, rate in curve.items()
            ),
            NOTE,
            "![Redis Cluster throughput and the cost of WAIT](perf-cluster.png)",
        ]
    )
    print(body)
    if args.markdown:
        write_section("cluster", body, args.markdown)
    if args.plot:
        _plot(single, clustered, curve, args.plot)


def _plot(
    single: dict[int, dict[str, tuple[float, float, float]]],
    clustered: dict[int, dict[str, tuple[float, float, float]]],
    curve: dict[int, float],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    masters = sorted(curve)
    left.plot(masters, [curve[n] for n in masters], marker="o")
    left.set_xticks(masters)
    left.set_xlabel("masters (no replicas)")
    left.set_ylabel("calls/s (claim + complete)")
    left.set_title("Cluster throughput, 2 processes x 16 threads")
    left.set_ylim(bottom=0)
    labels, plain, waited = [], [], []
    for where, table, ref in (
        ("1 server", single, "default (auto-pipelined)"),
        ("cluster", clustered, "default"),
    ):
        for threads, rows in table.items():
            labels.append(f"{where}\n{threads} thr")
            plain.append(rows[ref][0])
            waited.append(rows["wait_replicas=1"][0])
    xs = range(len(labels))
    right.bar([x - 0.2 for x in xs], plain, width=0.4, label="default")
    right.bar([x + 0.2 for x in xs], waited, width=0.4, label="wait_replicas=1")
    right.set_xticks(list(xs), labels)
    right.set_ylabel("calls/s")
    right.set_title("Cost of WAIT (one replica)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
