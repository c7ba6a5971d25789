"""Benchmark: the outbox relay's throughput (messages published and marked sent per second) on
PostgreSQL, this tree's relay against another git revision's, in one run.

    .venv/bin/python benchmarks/outbox_relay.py [--n 3000] [--batch 1 10 100] [--passes 3]
        [--against main]

Each drain preloads ``n`` outbox rows in a fresh table, then :meth:`Relay.run` (no ``stop``:
until the outbox is empty) publishes them to a list, ``batch`` rows per transaction (claim
``FOR UPDATE SKIP LOCKED``, publish, mark sent, commit). Two figures: wall-clock throughput,
and the relay process's CPU time per message (which other load on the machine disturbs less).
``--against REV`` loads ``src/oncely/messaging/{inbox,outbox}.py`` of that revision (``git
show``) as a second relay, on the same installed oncely otherwise. Passes interleave
(alternating which relay goes first); each figure is the median; compare the ratios, not the
absolute numbers (shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Any

import psycopg

from oncely.messaging import outbox as current

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parent.parent


def load_revision(rev: str) -> types.ModuleType:
    """The outbox module of ``rev``, importing that revision's inbox module (not this one's)."""

    def source(path: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    tag = "".join(c if c.isalnum() else "_" for c in rev)
    inbox_name = f"_bench_{tag}_inbox"
    inbox = types.ModuleType(inbox_name)
    sys.modules[inbox_name] = inbox
    inbox_src = source("src/oncely/messaging/inbox.py")
    exec(compile(inbox_src, f"{rev}:inbox.py", "exec"), inbox.__dict__)
    outbox_src = source("src/oncely/messaging/outbox.py").replace(
        "from oncely.messaging.inbox import", f"from {inbox_name} import"
    )
    outbox_name = f"_bench_{tag}_outbox"
    outbox = types.ModuleType(outbox_name)
    sys.modules[outbox_name] = outbox
    exec(compile(outbox_src, f"{rev}:outbox.py", "exec"), outbox.__dict__)
    return outbox


def drain(module: Any, n: int, batch: int) -> tuple[float, float]:
    """(messages per second, the relay process's CPU microseconds per message)."""
    table = f"oncely_bench_outbox_{uuid.uuid4().hex[:10]}"
    box = module.Outbox(table)
    with psycopg.connect(POSTGRES_URL) as conn:
        box.create_table(conn)
        conn.commit()
        with conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO {table} (message_id, topic, payload, headers, created_at) "
                "SELECT 'm-' || i, 't', 'x'::bytea, '{}', extract(epoch FROM now()) "
                "FROM generate_series(1, %s) AS i",
                (n,),
            )
        conn.commit()
    try:
        sent: list[Any] = []
        relay = module.Relay(box, POSTGRES_URL, publish=sent.append, batch=batch)
        start, cpu = time.perf_counter(), time.process_time()
        published = relay.run()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        relay.close()
        assert published == n == len(sent), (published, n, len(sent))
        return n / seconds, cpu / n * 1e6
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def main(n: int, batches: list[int], passes: int, against: str) -> list[str]:
    relays = {f"{against} (before)": load_revision(against), "this tree (after)": current}
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for i in range(passes):
        for batch in batches:
            order = list(relays.items())
            for name, module in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                results.setdefault((name, batch), []).append(drain(module, n, batch))
    rows = []
    for batch in batches:
        rate = [statistics.median(r for r, _ in results[(name, batch)]) for name in relays]
        cpu = [statistics.median(c for _, c in results[(name, batch)]) for name in relays]
        rows.append(
            f"| {batch} | {rate[0]:,.0f} | {rate[1]:,.0f} | {rate[1] / rate[0]:.2f} "
            f"| {cpu[0]:,.0f} | {cpu[1]:,.0f} | {cpu[1] / cpu[0]:.2f} |"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="outbox rows per drain")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--passes", type=int, default=3, help="interleaved passes (median)")
    parser.add_argument("--against", default="main", help="git revision to compare with")
    args = parser.parse_args()
    print(
        f"| batch | {args.against} msg/s | this tree msg/s | ratio "
        f"| {args.against} CPU µs/msg | this tree CPU µs/msg | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(main(args.n, args.batch, args.passes, args.against)))
