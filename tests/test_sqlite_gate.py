"""The SQLite writer gate: threads of one process queue for the write lock instead of meeting
in SQLite's busy handler, without changing who wins a key (issue 13, item 3)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from oncely.backends.sqlite import WriterGate, writer_gate
from oncely.core.records import New, RecordKey
from oncely.errors import StoreError, StoreUnavailable
from oncely.stores import open_store

import workers


def test_32_threads_on_one_file_get_exactly_one_claim_per_key(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/t.db")
    keys = [f"k{i}" for i in range(30)]
    won: list[str] = []
    barrier = threading.Barrier(32)

    def claim_all(offset: int) -> None:
        barrier.wait()
        for i in range(len(keys)):
            key = keys[(i + offset) % len(keys)]
            if isinstance(store.claim(RecordKey.of("t", key), "fp", 30, 60), New):
                won.append(key)

    workers.run_threads(claim_all, [(n * 3,) for n in range(32)])
    store.close()
    assert sorted(won) == sorted(keys)


def test_4_processes_of_8_threads_get_exactly_one_claim_per_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/p.db"
    open_store(url).close()  # the file and table exist before the race
    keys = [f"k{i}" for i in range(30)]
    start_at = time.time() + 1.5
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(
            workers.claim_keys_in_threads, [(url, keys, 8, start_at) for _ in range(4)]
        )
    won = [key for result in results for key in result]
    assert sorted(won) == sorted(keys)


def test_the_gate_is_fifo_and_times_out_without_leaking() -> None:
    gate = WriterGate()
    assert gate.acquire(1)
    order: list[int] = []

    def wait(n: int) -> None:
        assert gate.acquire(5)
        order.append(n)
        gate.release()

    threads = []
    for n in range(5):
        t = threading.Thread(target=wait, args=(n,))
        t.start()
        threads.append(t)
        while len(gate._waiters) < n + 1:  # each is queued before the next starts
            time.sleep(0.001)
    assert not gate.acquire(0.05)  # taken: a timed-out waiter leaves the queue
    assert len(gate._waiters) == 5
    gate.release()
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3, 4]
    assert gate.acquire(0)  # open again
    gate.release()


def test_a_failing_write_statement_releases_the_gate(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/e.db")
    store.claim(RecordKey.of("", "warm"), "fp", 30, 60)
    with pytest.raises(StoreError):
        store._execute(
            type("R", (), {"statement": "INSERT INTO nowhere VALUES (1)", "params": {}})()
        )
    with pytest.raises(sqlite3.Error):
        # a missing parameter: sqlite3.ProgrammingError, raised through untranslated
        store._execute(
            type(
                "R", (), {"statement": "DELETE FROM oncely_records WHERE scope = :x", "params": {}}
            )()
        )
    gate = writer_gate(store.path)
    assert gate.acquire(0)  # nothing kept it
    gate.release()
    assert isinstance(store.claim(RecordKey.of("", "after"), "fp", 30, 60), New)
    store.close()


def test_cancelled_async_claims_release_the_gate(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/c.db")

    async def main() -> None:
        tasks = [
            asyncio.ensure_future(store.aclaim(RecordKey.of("", f"k{i}"), "fp", 30, 60))
            for i in range(64)
        ]
        await asyncio.sleep(0.001)
        for task in tasks[::2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(
            await asyncio.wait_for(store.aclaim(RecordKey.of("", "after"), "fp", 30, 60), 10),
            New,
        )

    asyncio.run(main())
    time.sleep(0.2)  # the worker threads finish the cancelled tasks' statements
    gate = writer_gate(store.path)
    assert gate.acquire(2)
    gate.release()
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_gets_a_fresh_gate_even_if_the_parent_held_it(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/f.db")
    store.claim(RecordKey.of("", "parent"), "fp", 30, 60)
    gate = writer_gate(store.path)
    assert gate.acquire(1)  # held by this thread at the fork: in the child no one releases it
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                outcome = store.claim(RecordKey.of("", "child"), "fp", 30, 60)
                code = 0 if isinstance(outcome, New) and writer_gate(store.path) is not gate else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        gate.release()
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get(RecordKey.of("", "child")) is not None
    store.close()


def test_a_gate_held_past_the_timeout_is_a_typed_error(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/h.db?busy_timeout=0.2")
    store.claim(RecordKey.of("", "warm"), "fp", 30, 60)
    gate = writer_gate(store.path)
    assert gate.acquire(1)
    try:
        result: list[BaseException] = []

        def claim() -> None:
            try:
                store.claim(RecordKey.of("", "k"), "fp", 30, 60)
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=claim)
        t.start()
        t.join()
        assert len(result) == 1 and isinstance(result[0], StoreUnavailable)
        assert "busy_timeout" in str(result[0])
    finally:
        gate.release()
    store.close()
