"""What several benchmarks share: a SQLite connection set up as the benchmarks want it, the
interleaved measurement of two (or more) forms of one operation in the same run, a free port and
a private ``redis-server``."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

Form = Callable[[], None]


def sqlite_connect(
    path: str | Path,
    synchronous: str = "NORMAL",
    timeout: float = 60.0,
    check_same_thread: bool = False,
) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` in WAL mode with ``synchronous`` (``NORMAL``,
    or ``FULL``: the SQLite store's default); ``timeout``: seconds to wait for a lock."""
    conn = sqlite3.connect(path, timeout=timeout, check_same_thread=check_same_thread)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def interleaved(
    forms: Sequence[Mapping[str, Form]], seconds: float, batch: int, warm_up: int = 10
) -> dict[str, float]:
    """ops/s of each form, measured together on ``len(forms)`` threads for ``seconds``.

    ``forms[i]``: thread i's forms by name (each call is one operation; all threads name the
    same forms). Each form runs ``warm_up`` times on each thread first (prepared statements,
    caches). Then every thread runs batches of ``batch`` operations of each form in turn
    (thread i starts with form i mod 2), timing each batch, so a busy moment on the shared
    machine (a slow fsync) hits every form alike. A form's rate is its operations over its
    share of the time: each thread is busy with one form at a time, so rate = ops / (time in
    that form / threads).
    """
    threads = len(forms)
    for own in forms:
        for op in own.values():
            for _ in range(warm_up):
                op()
    names = list(forms[0])
    ops = {n: [0] * threads for n in names}
    spent = {n: [0.0] * threads for n in names}
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(threads)

    def worker(i: int) -> None:
        order = names[i % 2 :] + names[: i % 2]
        barrier.wait()
        while time.perf_counter() < stop:
            for name in order:
                op = forms[i][name]
                start = time.perf_counter()
                for _ in range(batch):
                    op()
                spent[name][i] += time.perf_counter() - start
                ops[name][i] += batch

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {n: sum(ops[n]) / (sum(spent[n]) / threads) for n in names}


def median_rates(measure: Callable[[], Mapping[str, float]], passes: int) -> dict[str, float]:
    """The median over ``passes`` calls of ``measure`` (ops/s by form) of each form's rate."""
    rates: dict[str, list[float]] = {}
    for _ in range(passes):
        for name, rate in measure().items():
            rates.setdefault(name, []).append(rate)
    return {name: statistics.median(values) for name, values in rates.items()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_redis(cpus: set[int] | None = None) -> Iterator[str]:
    """A ``redis-server`` of our own on a free port in a temp dir (no persistence), its URL;
    with ``cpus``, the server runs on those CPUs only (``sched_setaffinity``)."""
    folder = tempfile.mkdtemp(prefix="oncely-bench-redis-")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", folder],
        stdout=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):  # until it answers (a benchmark's start-up, not a test)
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
