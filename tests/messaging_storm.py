"""The storm every broker's test runs (issue 11, scaled down): N messages with 30% duplicate
publishes, two consumer processes (tests/messaging_workers.py), one SIGKILLed mid-batch and
restarted, forced nack/requeue redeliveries; then every effect once, nothing lost, nothing
pending."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from conftest import POSTGRES_URL

WORKER = str(Path(__file__).with_name("messaging_workers.py"))


def storm_ids(n: int, duplicates: float = 0.3, seed: int = 11) -> list[str]:
    """``n`` dedup ids, plus ``duplicates * n`` repeated ones, shuffled."""
    rng = random.Random(seed)
    ids = [f"m-{i}" for i in range(n)]
    publishes = ids + [rng.choice(ids) for _ in range(int(n * duplicates))]
    rng.shuffle(publishes)
    return publishes


@dataclass
class Storm:
    broker: str
    tmp: Path
    n: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    @property
    def table(self) -> str:
        return f"msg_effects_{self.tag}"

    def log(self, member: str, life: int) -> Path:
        return self.tmp / f"{member}-{life}.log"

    def start(self, member: str, life: int, config: dict[str, Any]) -> None:
        cfg = {
            **config,
            "member": member,
            "table": self.table,
            "postgres": POSTGRES_URL,
            "log": str(self.log(member, life)),
        }
        proc = subprocess.Popen(
            [sys.executable, WORKER, self.broker, json.dumps(cfg)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", "worker did not start"
        self.procs[member] = proc

    def effects(self) -> dict[str, int]:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            rows = conn.execute(
                f"SELECT msg_id, count(*) FROM {self.table} GROUP BY msg_id"
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``check`` until it holds. ``timeout`` (seconds) bounds a *stall*: the wait fails
        once no new effect has landed for that long, so a slow, loaded machine that is still
        making progress is not failed, and a lost message still is; four times ``timeout`` caps
        the whole wait."""
        start = time.monotonic()
        seen, last_progress = -1, start
        while True:
            if check():
                return
            for member, proc in self.procs.items():
                assert proc.poll() is None, f"worker {member} exited with {proc.returncode}"
            now = time.monotonic()
            count = len(self.effects())
            if count != seen:
                seen, last_progress = count, now
            if now - last_progress > timeout or now - start > 4 * timeout:
                raise AssertionError(
                    f"timed out waiting for {what}: {count} effects, none new for "
                    f"{now - last_progress:.1f} s, {now - start:.1f} s in all"
                )
            time.sleep(0.1)

    def kill(self, member: str) -> None:
        proc = self.procs.pop(member)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def at_risk(self, member: str, life: int) -> set[str]:
        """Ids the killed life had started (effect maybe applied) but not completed and acked."""
        started, done = set(), set()
        for line in self.log(member, life).read_text().splitlines():
            kind, _, mid = line.partition(" ")
            (started if kind == "S" else done).add(mid)
        return started - done


@dataclass
class StormResult:
    effects: dict[str, int]
    at_risk: set[str]


def storm_table(storm: Storm) -> Iterator[None]:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {storm.table} (msg_id text NOT NULL, worker text NOT NULL)")
    try:
        yield
    finally:
        storm.stop_all()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {storm.table}")


def run_storm(
    storm: Storm,
    config: dict[str, Any],
    drained: Callable[[], bool],
    timeout: float = 25.0,
    publish: Callable[[], None] | None = None,
    kill_in_flight: bool = False,
) -> StormResult:
    """Start members a and b, SIGKILL a once a third of the effects are in, restart it, wait
    until every id has an effect and ``drained()`` (nothing pending), stop both.
    ``publish``: run once both members are up (brokers that keep nothing for absent
    subscribers)."""
    storm.start("a", 1, config)
    storm.start("b", 1, config)
    if publish is not None:
        threading.Thread(target=publish, daemon=True).start()
    storm.wait_for(lambda: len(storm.effects()) >= storm.n // 3, timeout, "a third")
    if kill_in_flight:  # kill while a has started effects it has not acked (best effort)
        deadline = time.monotonic() + 5
        while not storm.at_risk("a", 1) and time.monotonic() < deadline:
            time.sleep(0.005)
    storm.kill("a")
    at_risk = storm.at_risk("a", 1)
    storm.start("a", 2, config)
    storm.wait_for(lambda: len(storm.effects()) == storm.n and drained(), timeout, "the rest")
    storm.stop_all()
    return StormResult(storm.effects(), at_risk)


def check_storm(result: StormResult, n: int) -> None:
    """Every id's effect is there; duplicates only among the ids the killed worker had applied
    but not completed when it died (the window only a transactional inbox closes)."""
    assert sorted(result.effects) == sorted(f"m-{i}" for i in range(n)), "a message was lost"
    doubled = {mid for mid, count in result.effects.items() if count > 1}
    assert doubled <= result.at_risk, f"effects applied twice outside the kill window: {doubled}"
    assert all(count <= 2 for count in result.effects.values())
    print(f"storm: {n} ids, {len(doubled)} doubled, {len(result.at_risk)} at risk at the kill")


def check_storm_exactly_once(result: StormResult, n: int) -> None:
    """The transactional mode's bar: every id's effect exactly once, the kill window included
    (no tolerance). The storm kills while messages are in flight when it can (a loaded machine
    may still land the kill between batches); the deterministic kill-window tests in
    tests/test_messaging_transactional.py cover both windows every time."""
    assert sorted(result.effects) == sorted(f"m-{i}" for i in range(n)), "a message was lost"
    doubled = {mid: c for mid, c in result.effects.items() if c != 1}
    assert not doubled, f"effects not applied exactly once: {doubled}"
    print(f"storm: {n} ids, each once; {len(result.at_risk)} in flight at the kill")


def inbox_table(name: str) -> Iterator[None]:
    """Create the transactional storm's inbox table on PostgreSQL; drop it afterwards."""
    from oncely.messaging.inbox import Inbox

    with psycopg.connect(POSTGRES_URL) as conn:
        Inbox(name).create_table(conn)
        conn.commit()
    try:
        yield
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {name}")
