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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for member, proc in self.procs.items():
                assert proc.poll() is None, f"worker {member} exited with {proc.returncode}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {len(self.effects())} effects")

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
