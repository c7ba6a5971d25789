"""Whether a SQLite write with a caller's deadline should join the group commit or run alone.

:func:`oncely.backends.sqlite.execute` queues a write that carries a deadline with every other
write of the process (one ``BEGIN IMMEDIATE`` ... ``COMMIT`` for the batch, its wait for another
process's lock ending at each statement's own deadline). The alternative is the way the SQLite
lock ran a bounded ``acquire`` before: take the writer gate (bounded by the deadline) and run
the statement alone, as its own autocommit transaction, with ``PRAGMA busy_timeout`` set to the
time left. Both are timed here in one run, on the same file, alternating:

* ``group``: every claim carries a deadline (10 s away: the file is free, only the path counts)
  and joins the group commit, as shipped;
* ``alone``: the same claims, each run alone under the gate;
* ``plain``: the same claims without a deadline (the group commit as before; the floor).

``--threads`` threads each run ``--ops`` claims on new keys of one :class:`SQLiteStore`
(``synchronous=FULL``, the store's default: one fsync per commit, what a group commit shares).
Printed per form and thread count: claims/s and p99 latency (median over ``--passes`` passes),
and the ratios to ``group``; only ratios within one run mean anything on a shared machine.

    .venv/bin/python benchmarks/sqlite_deadline.py [--threads 1 8 32] [--ops 100] [--passes 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import oncely.stores.sqlite as store_module
from oncely.backends import sqlite as backend
from oncely.core import deadline
from oncely.core.records import New, RecordKey
from oncely.stores.sqlite import SQLiteStore

FORMS = ("group", "alone", "plain")


def execute_alone(
    connections: backend.Connections,
    sql: str,
    params: dict[str, Any],
    translate: Callable[..., Any],
    until: float | None = None,
) -> tuple[list[Any], int]:
    """A bounded write run alone under the gate (the ``alone`` form); others as shipped."""
    if until is None or sql.lstrip()[:6].upper() == "SELECT":
        return backend.execute(connections, sql, params, translate, until)
    gate = backend.writer_gate(connections.path)
    job = backend._Write(connections, sql, params, translate, until)
    job.finished = threading.Event()
    wait, _ = backend.bound(connections.timeout, until)
    if not gate.acquire(wait):
        raise backend.overdue(connections.path, gate)
    try:
        backend._run_batch(gate, connections, [job])
    finally:
        gate.release()
    return job.result()


def run(store: SQLiteStore, form: str, threads: int, ops: int) -> tuple[float, float]:
    """(claims per second, p99 latency in ms) of ``threads`` threads x ``ops`` claims."""
    store_module.execute = execute_alone if form == "alone" else backend.execute  # type: ignore[assignment]
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)
    prefix = uuid.uuid4().hex

    def work(n: int) -> None:
        mine: list[float] = []
        start.wait()
        for i in range(ops):
            key = RecordKey.of("bench", f"{prefix}-{n}-{i}")
            begun = time.perf_counter()
            if form == "plain":
                outcome = store.claim(key, "fp", 30, 60)
            else:
                with deadline.within(time.monotonic() + 10):
                    outcome = store.claim(key, "fp", 30, 60)
            mine.append(time.perf_counter() - begun)
            assert isinstance(outcome, New)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    took = time.perf_counter() - began
    latencies.sort()
    return threads * ops / took, latencies[int(len(latencies) * 0.99) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(f"sqlite:///{tmp}/bench.db")
        store.claim(RecordKey.of("", "warm"), "fp", 30, 60)
        head = ("threads", "form", "claims/s", "p99 ms", "rate/group", "p99/group")
        print("{:>7} {:>6} {:>9} {:>7} {:>10} {:>9}".format(*head))
        for threads in args.threads:
            results: dict[str, list[tuple[float, float]]] = {form: [] for form in FORMS}
            for form in FORMS:  # warm up: connections opened, writer gate and caches in use
                run(store, form, threads, max(args.ops // 4, 10))
            for _ in range(args.passes):
                for form in FORMS:
                    results[form].append(run(store, form, threads, args.ops))
            median = {
                form: (
                    statistics.median(rate for rate, _ in runs),
                    statistics.median(p99 for _, p99 in runs),
                )
                for form, runs in results.items()
            }
            for form in FORMS:
                rate, p99 = median[form]
                print(
                    f"{threads:>7} {form:>6} {rate:>9.0f} {p99:>7.2f} "
                    f"{rate / median['group'][0]:>10.2f} {p99 / median['group'][1]:>9.2f}"
                )
        store.close()


if __name__ == "__main__":
    main()
