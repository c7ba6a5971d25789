"""The SQLite file's writer thread: async callers queue their write statements on it, it runs
them as group commits and wakes each event loop once per batch (issue 13: HTTP on SQLite)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import oncely.backends.sqlite as backend
from oncely import idempotent
from oncely.backends.plans import Exec, Plan
from oncely.backends.sqlite import writer_gate
from oncely.core import deadline
from oncely.core.deadline import DeadlinePassed
from oncely.core.lease import Claimed, keeper
from oncely.core.ops import Claim, aperform
from oncely.core.records import New, RecordKey, Replay
from oncely.core.settle import asettle_later, settle_later
from oncely.errors import InFlightError, StoreError, StoreUnavailable
from oncely.http import GLOBAL, IdempotencyConfig
from oncely.locks import Lock
from oncely.locks.base import Hold
from oncely.locks.sqlite import SQLiteLockBackend
from oncely.stores import open_store
from oncely.stores.sqlite import SQLiteStore
from sqlite_holder import OtherWriter

from http_apps.harness import FACES


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the wake-ups other threads ask of it."""

    def __init__(self) -> None:
        super().__init__()
        self.woken = 0

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        self.woken += 1
        return super().call_soon_threadsafe(callback, *args, **kw)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Yield to the loop until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def store_at(tmp_path: Path, name: str, query: str = "") -> SQLiteStore:
    store = open_store(f"sqlite:///{tmp_path}/{name}{query}")
    assert isinstance(store, SQLiteStore)
    store.claim(RecordKey.of("", "warm"), "fp", 30, 60)  # the file and table exist
    return store


def test_two_loops_in_two_threads_and_sync_threads_win_each_key_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    first, second = open_store(url), open_store(url)  # two pools on one file, one gate
    keys = [f"k{i}" for i in range(40)]
    effects: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    async def tasks(store: Any, who: str) -> None:
        async def one(key: str) -> None:
            record_key = RecordKey.of("t", key)
            outcome = await store.aclaim(record_key, "fp", 30, 60)
            if isinstance(outcome, New):
                effects.append(key)
                await store.acomplete(record_key, outcome.fence, who.encode(), "raw", 60)

        for offset in range(0, len(keys), 8):  # 8 waves of every key, rotated
            await asyncio.gather(*(one(keys[(i + offset) % len(keys)]) for i in range(len(keys))))

    def in_loop(store: Any, who: str) -> None:
        try:
            barrier.wait()
            asyncio.run(tasks(store, who))
        except BaseException as exc:
            errors.append(exc)

    def in_thread(store: Any, who: str) -> None:
        try:
            barrier.wait()
            for key in reversed(keys):
                record_key = RecordKey.of("t", key)
                outcome = store.claim(record_key, "fp", 30, 60)
                if isinstance(outcome, New):
                    effects.append(key)
                    store.complete(record_key, outcome.fence, who.encode(), "raw", 60)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=in_loop, args=(first, "loop-1")),
        threading.Thread(target=in_loop, args=(second, "loop-2")),
        threading.Thread(target=in_thread, args=(first, "sync-1")),
        threading.Thread(target=in_thread, args=(second, "sync-2")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(effects) == sorted(keys)  # each effect happened once
    for key in keys:  # and each winner's completion is the stored result
        outcome = first.claim(RecordKey.of("t", key), "fp", 30, 60)
        assert isinstance(outcome, Replay)
    first.close()
    second.close()


def test_a_batch_wakes_its_event_loop_once(tmp_path: Path) -> None:
    store = store_at(tmp_path, "wake.db")
    gate = writer_gate(store.path)
    loop = CountingLoop()

    async def main() -> list[Any]:
        assert gate.acquire(1)  # the writes queue behind the gate...
        try:
            tasks = [
                asyncio.ensure_future(store.aclaim(RecordKey.of("", f"k{i}"), "fp", 30, 60))
                for i in range(20)
            ]
            await until(lambda: len(gate.pending) >= 20, "20 queued writes", timeout=2)
        finally:
            gate.release()  # ...and go in one group commit
        return await asyncio.gather(*tasks)

    try:
        outcomes = loop.run_until_complete(main())
    finally:
        loop.close()
    assert all(isinstance(o, New) for o in outcomes)
    assert loop.woken == 1  # one wake-up for the 20 replies, not one per statement
    store.close()


def test_a_caller_cancelled_while_queued_never_writes(tmp_path: Path) -> None:
    store = store_at(tmp_path, "queued.db")
    gate = writer_gate(store.path)
    key = RecordKey.of("", "cancelled")

    async def main() -> None:
        assert gate.acquire(1)
        try:
            task = asyncio.ensure_future(store.aclaim(key, "fp", 30, 60))
            await until(lambda: len(gate.pending) == 1, "the queued claim")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert gate.pending == []  # withdrawn: no batch will run it
        finally:
            gate.release()
        assert isinstance(await store.aclaim(RecordKey.of("", "next"), "fp", 30, 60), New)

    asyncio.run(main())
    assert store.get(key) is None
    store.close()


def hold_write_lock(path: str) -> sqlite3.Connection:
    """Another connection takes the file's write lock (as another process would)."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_a_caller_cancelled_after_its_batch_took_it_still_commits(tmp_path: Path) -> None:
    store = store_at(tmp_path, "taken.db")
    gate = writer_gate(store.path)
    key = RecordKey.of("", "taken")

    async def main() -> None:
        other = hold_write_lock(store.path)
        try:
            task = asyncio.ensure_future(store.aclaim(key, "fp", 30, 60))
            await until(lambda: gate.pending == [] and gate._held, "the batch")
            task.cancel()  # its statement waits for SQLite's lock inside the batch
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            other.execute("COMMIT")
            other.close()
        # Queued after it: answered only once the cancelled caller's batch has committed.
        assert isinstance(await store.aclaim(RecordKey.of("", "after"), "fp", 30, 60), New)

    asyncio.run(main())
    record = store.get(key)
    assert record is not None and record.status == "in_progress"
    store.close()


def test_a_loop_closed_before_its_reply_leaves_the_writer_serving(tmp_path: Path) -> None:
    store = store_at(tmp_path, "closed.db")
    gate = writer_gate(store.path)
    other = hold_write_lock(store.path)
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(store.aclaim(RecordKey.of("", "orphan"), "fp", 30, 60))

        async def taken() -> None:
            await until(lambda: gate.pending == [] and gate._held, "the batch")

        loop.run_until_complete(taken())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(task)
    finally:
        loop.close()  # the batch answers a closed loop
        other.execute("COMMIT")
        other.close()
    outcome = asyncio.run(store.aclaim(RecordKey.of("", "later"), "fp", 30, 60))
    assert isinstance(outcome, New)
    assert store.get(RecordKey.of("", "orphan")) is not None
    store.close()


def test_one_failing_statement_fails_alone_in_its_batch(tmp_path: Path) -> None:
    store = store_at(tmp_path, "fail.db")
    gate = writer_gate(store.path)

    async def main() -> list[Any]:
        assert gate.acquire(1)
        try:
            claims = [
                asyncio.ensure_future(store.aclaim(RecordKey.of("", f"k{i}"), "fp", 30, 60))
                for i in range(5)
            ]
            bad = asyncio.ensure_future(store._aexecute(Exec("INSERT INTO nowhere VALUES (1)", {})))
            claims += [
                asyncio.ensure_future(store.aclaim(RecordKey.of("", f"k{i}"), "fp", 30, 60))
                for i in range(5, 10)
            ]
            await until(lambda: len(gate.pending) == 11, "the batch")
        finally:
            gate.release()
        with pytest.raises(StoreError):  # its table is missing
            await bad
        return await asyncio.gather(*claims)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, New) for o in outcomes)
    assert all(store.get(RecordKey.of("", f"k{i}")) is not None for i in range(10))
    store.close()


def test_an_async_write_behind_a_gate_held_past_the_timeout_is_a_typed_error(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path, "held.db", "?busy_timeout=0.2")
    gate = writer_gate(store.path)
    assert gate.acquire(1)
    try:
        with pytest.raises(StoreUnavailable, match="busy_timeout"):
            asyncio.run(store.aclaim(RecordKey.of("", "k"), "fp", 30, 60))
    finally:
        gate.release()
    assert isinstance(asyncio.run(store.aclaim(RecordKey.of("", "k"), "fp", 30, 60)), New)
    store.close()


def test_the_writer_thread_stops_when_idle_and_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "WRITER_IDLE", 0.05)
    store = store_at(tmp_path, "idle.db")
    gate = writer_gate(store.path)
    assert isinstance(asyncio.run(store.aclaim(RecordKey.of("", "a"), "fp", 30, 60)), New)
    writer = gate._writer
    assert writer is not None and writer.name == "oncely-sqlite-writer"
    writer.join(10)
    assert not writer.is_alive() and gate._writer is None
    assert isinstance(asyncio.run(store.aclaim(RecordKey.of("", "b"), "fp", 30, 60)), New)
    assert gate._writer is not None and gate._writer is not writer
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_gets_its_own_writer_thread(tmp_path: Path) -> None:
    store = store_at(tmp_path, "fork.db")
    assert isinstance(asyncio.run(store.aclaim(RecordKey.of("", "parent"), "fp", 30, 60)), New)
    parent_gate = writer_gate(store.path)
    assert parent_gate._writer is not None  # alive at the fork: gone in the child
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            outcome = asyncio.run(store.aclaim(RecordKey.of("", "child"), "fp", 30, 60))
            gate = writer_gate(store.path)
            fresh = gate is not parent_gate and gate._writer is not parent_gate._writer
            code = 0 if isinstance(outcome, New) and fresh else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get(RecordKey.of("", "child")) is not None
    assert isinstance(asyncio.run(store.aclaim(RecordKey.of("", "again"), "fp", 30, 60)), New)
    store.close()


def test_writes_to_two_files_in_one_iteration_each_go_to_their_own_writer(tmp_path: Path) -> None:
    first, second = store_at(tmp_path, "one.db"), store_at(tmp_path, "two.db")

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(
                store.aclaim(RecordKey.of("", f"k{i}"), "fp", 30, 60)
                for i in range(10)
                for store in (first, second)
            )
        )

    outcomes = asyncio.run(main())
    assert len(outcomes) == 20 and all(isinstance(o, New) for o in outcomes)
    for store in (first, second):
        assert all(store.get(RecordKey.of("", f"k{i}")) is not None for i in range(10))
        assert writer_gate(store.path)._writer is not None
    first.close()
    second.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition()`` from a plain thread; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_a_sync_write_behind_more_than_a_batch_of_async_writes_gets_its_own_rows(
    tmp_path: Path,
) -> None:
    """rt12 F1: a sync caller holding the gate took the BATCH oldest queued writes (not its
    own) and returned "no rows" while its claim still waited; it ran later (an orphaned claim)."""
    store = store_at(tmp_path, "flood.db")
    gate = writer_gate(store.path)
    queued = backend.BATCH * 3
    outcomes: dict[str, Any] = {}

    def flood() -> None:
        async def main() -> list[Any]:
            return await asyncio.gather(
                *(store.aclaim(RecordKey.of("a", f"k{i}"), "fp", 30, 60) for i in range(queued))
            )

        try:
            outcomes["async"] = asyncio.run(main())
        except BaseException as exc:
            outcomes["async"] = exc

    def sync() -> None:
        try:
            outcomes["sync"] = store.claim(RecordKey.of("s", "k"), "fp", 30, 60)
        except BaseException as exc:
            outcomes["sync"] = exc

    assert gate.acquire(5)  # everything queues behind this thread
    threads = [threading.Thread(target=flood), threading.Thread(target=sync)]
    try:
        threads[0].start()
        wait_for(lambda: len(gate.pending) >= queued, "the async writes to queue")
        threads[1].start()  # queued last, behind more than a batch
        wait_for(lambda: len(gate._waiters) == 2, "the writer thread and the sync caller to wait")
    finally:
        gate.release()
    for thread in threads:
        thread.join(30)
    assert isinstance(outcomes["sync"], New), outcomes["sync"]
    assert all(isinstance(o, New) for o in outcomes["async"]), outcomes["async"]
    assert not gate.pending
    store.close()


def test_sync_writes_during_an_async_flood_each_get_their_own_rows(tmp_path: Path) -> None:
    """rt12 F1 as seen in the field: one loop floods async claims, a thread claims and
    completes synchronously; every sync claim is won by its caller and completes."""
    store = store_at(tmp_path, "storm.db")
    stop = threading.Event()
    failures: list[BaseException] = []
    done = [0]

    def sync_side() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            key = RecordKey.of("s", f"k{i}")
            try:
                outcome = store.claim(key, "fp", 30, 60)
                assert isinstance(outcome, New), outcome
                store.complete(key, outcome.fence, b"v", "raw", 60)
                done[0] += 1
            except BaseException as exc:
                failures.append(exc)

    async def flood() -> None:
        for wave in range(6):
            await asyncio.gather(
                *(store.aclaim(RecordKey.of("a", f"{wave}-{j}"), "fp", 30, 60) for j in range(300))
            )

    thread = threading.Thread(target=sync_side)
    thread.start()
    try:
        asyncio.run(flood())
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures[:3]
    assert done[0] > 0
    store.close()


@pytest.mark.serial
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_child_forked_during_an_async_write_storm_can_write(tmp_path: Path) -> None:
    """rt12 F2: forked while another thread's writer was inside a write transaction, the child
    inherited SQLite's in-process lock state ("a connection of this process holds the write
    lock") and every one of its writes waited busy_timeout and failed. The fork now waits for
    the writer gates, so no write transaction is open at the fork."""
    store = store_at(tmp_path, "storm-fork.db")
    stop = threading.Event()
    storming: list[BaseException] = []

    def storm() -> None:
        async def main() -> None:
            wave = 0
            while not stop.is_set():
                keys = (RecordKey.of("p", f"{wave}-{j}") for j in range(50))
                await asyncio.gather(*(store.aclaim(key, "fp", 30, 60) for key in keys))
                wave += 1

        try:
            asyncio.run(main())
        except BaseException as exc:
            storming.append(exc)

    thread = threading.Thread(target=storm)
    thread.start()
    codes: list[int] = []
    try:
        wait_for(lambda: store.get(RecordKey.of("p", "2-0")) is not None, "the storm to write")
        for n in range(6):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    import faulthandler

                    faulthandler.dump_traceback_later(20, exit=True)  # never hang the suite

                    async def child(n: int = n) -> list[Any]:
                        keys = (RecordKey.of("c", f"{n}-{i}") for i in range(20))
                        claims = (store.aclaim(key, "fp", 30, 60) for key in keys)
                        return await asyncio.wait_for(asyncio.gather(*claims), 5)

                    outcomes = asyncio.run(child())
                    code = 0 if all(isinstance(o, New) for o in outcomes) else 2
                except BaseException:
                    code = 3
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
    finally:
        stop.set()
        thread.join(30)
    assert codes == [0] * 6, codes
    assert not storming, storming
    store.close()


@pytest.mark.serial
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_child_forked_while_threads_read_can_write(tmp_path: Path) -> None:
    """rt12 F2, reads: a child forked while other threads were opening connections for their
    SELECTs inherited SQLite's process-wide mutexes held and hung in its first connect. The
    fork now waits for the SELECTs in progress (and new ones wait for the fork)."""
    store = store_at(tmp_path, "read-fork.db", "?busy_timeout=3")
    keys = [RecordKey.of("r", f"{i}") for i in range(100)]
    for key in keys:
        store.claim(key, "fp", 30, 60)
    store.close()  # the readers open their connections while the forks happen
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for key in keys:
                store.get(key)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    codes: list[int] = []
    try:
        for n in range(6):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    import faulthandler

                    faulthandler.dump_traceback_later(10, exit=True)  # a hang fails, bounded
                    claims = [
                        store.claim(RecordKey.of("c", f"{n}-{i}"), "fp", 30, 60) for i in range(10)
                    ]
                    code = 0 if all(isinstance(o, New) for o in claims) else 2
                except BaseException:
                    code = 3
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
    finally:
        stop.set()
        for thread in readers:
            thread.join(30)
    assert codes == [0] * 6, codes
    store.close()


# -- a caller's deadline on a file another process keeps locked ---------------------------------
#: Seconds a bounded caller may overrun its bound (thread hand-offs, a loaded machine).
MARGIN = 0.5


class WatchingStore(SQLiteStore):
    """A SQLite store that says when a duplicate call started waiting for the first one."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.watching = threading.Event()

    def _watch(self, key: RecordKey, fence: int, timeout: float) -> Plan[bool]:
        self.watching.set()
        return (yield from super()._watch(key, fence, timeout))


@pytest.mark.serial
@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_duplicate_waiting_for_the_first_call_ends_at_wait_timeout_while_the_file_is_locked(
    tmp_path: Path, face: str
) -> None:
    """A duplicate call waits wait_timeout (1 s) for the first one; when it claimed again, the
    file was held by another process's write lock, and the claim waited busy_timeout (4 s) and
    raised StoreUnavailable (5 s in all). It now ends at wait_timeout with InFlightError, the
    error wait_timeout documents, having written nothing; once the file is free the first call
    completes and the duplicate replays its result."""
    path = f"{tmp_path}/dup.db"
    store = WatchingStore(f"sqlite:///{path}?busy_timeout=4")
    store.claim(RecordKey.of("", "warm"), "fp", 30, 60)  # the file and table exist
    started, finish = threading.Event(), threading.Event()
    runs: list[int] = []

    @idempotent(store=store, key=lambda n: f"k{n}", wait_timeout=1)
    def first(n: int) -> int:
        runs.append(n)
        started.set()
        assert finish.wait(30)
        return n * 10

    @idempotent(store=store, key=lambda n: f"k{n}", wait_timeout=1)
    async def afirst(n: int) -> int:
        runs.append(n)
        started.set()
        assert await asyncio.to_thread(finish.wait, 30)
        return n * 10

    call: Callable[[int], Any] = first if face == "sync" else (lambda n: asyncio.run(afirst(n)))
    holder = threading.Thread(target=call, args=(7,))
    holder.start()
    assert started.wait(10)
    outcome: list[Any] = []

    def duplicate() -> None:
        begun = time.monotonic()
        try:
            outcome.append(call(7))
        except Exception as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - begun)

    try:
        with OtherWriter(path, hold=False) as other:
            waiter = threading.Thread(target=duplicate)
            waiter.start()
            assert store.watching.wait(10)  # the duplicate got InFlight and waits for the first
            other.lock()
            waiter.join(30)
            error, took = outcome
            assert isinstance(error, InFlightError), error
            assert took < 1 + MARGIN, took
    finally:
        finish.set()  # the other process let go: the first call's result is stored
    holder.join(30)
    assert call(7) == 70  # replayed
    assert runs == [7]
    store.close()


@pytest.mark.serial
def test_bounded_and_unbounded_writes_in_one_batch_each_keep_their_own_wait(
    tmp_path: Path,
) -> None:
    """Three async claims in one group commit while another process holds the file's write
    lock: one bounded at 0.5 s, one unbounded (busy_timeout 2 s), one bounded at 3.5 s. Each
    ends at its own bound: DeadlinePassed at 0.5 s (the others go on waiting),
    StoreUnavailable at busy_timeout, and the last one, still waiting when the other process
    lets go, commits. The two that failed wrote nothing."""
    path = f"{tmp_path}/batch.db"
    store = SQLiteStore(f"sqlite:///{path}?busy_timeout=2")
    store.claim(RecordKey.of("", "warm"), "fp", 30, 60)
    keys = [RecordKey.of("", name) for name in ("short", "plain", "long")]

    async def claim(key: RecordKey, bound: float | None, begun: float) -> tuple[Any, float]:
        with deadline.within(None if bound is None else begun + bound):
            try:
                outcome: Any = await store.aclaim(key, "fp", 30, 60)
            except Exception as exc:
                outcome = exc
        return outcome, time.monotonic() - begun

    async def main(other: OtherWriter) -> list[tuple[Any, float]]:
        begun = time.monotonic()
        tasks = [
            asyncio.ensure_future(claim(key, bound, begun))
            for key, bound in zip(keys, (0.5, None, 3.5), strict=True)
        ]
        await asyncio.wait(tasks[:2])  # the short and the plain one are answered
        await asyncio.to_thread(other.release)  # the long one is still waiting: let go
        return [await task for task in tasks]

    with OtherWriter(path) as other:
        (short, short_took), (plain, plain_took), (long, _) = asyncio.run(main(other))
    assert isinstance(short, DeadlinePassed), short
    assert short_took < 0.5 + MARGIN, short_took
    assert isinstance(plain, StoreUnavailable), plain
    assert 2 - 0.1 <= plain_took < 2 + MARGIN, plain_took  # the unbounded wait is busy_timeout
    assert isinstance(long, New), long
    assert store.get(keys[0]) is None and store.get(keys[1]) is None  # nothing half-written
    assert store.get(keys[2]) is not None
    store.close()


@pytest.mark.serial
def test_bounded_writes_behind_a_writer_waiting_for_the_file_end_at_their_deadline(
    tmp_path: Path,
) -> None:
    """A sync claim without a deadline holds the writer gate while it waits for another
    process's write lock (busy_timeout 2 s). Behind it, a sync and an async claim bounded at
    0.5 s end at 0.5 s (the gate wait, and the queued async write withdrawn at its deadline)
    with DeadlinePassed, and a sync claim bounded at 3.5 s outlives busy_timeout and commits
    once the other process lets go; the first claim gets StoreUnavailable at busy_timeout."""
    path = f"{tmp_path}/gate.db"
    store = SQLiteStore(f"sqlite:///{path}?busy_timeout=2")
    store.claim(RecordKey.of("", "warm"), "fp", 30, 60)
    gate = writer_gate(store.path)
    results: dict[str, tuple[Any, float]] = {}

    def claim(name: str, bound: float | None, face: str = "sync") -> None:
        begun = time.monotonic()
        key = RecordKey.of("", name)
        with deadline.within(None if bound is None else begun + bound):
            try:
                outcome: Any = (
                    store.claim(key, "fp", 30, 60)
                    if face == "sync"
                    else asyncio.run(store.aclaim(key, "fp", 30, 60))
                )
            except Exception as exc:
                outcome = exc
        results[name] = (outcome, time.monotonic() - begun)

    def gate_held() -> bool:
        if gate.acquire(0):
            gate.release()
            return False
        return True

    with OtherWriter(path) as other:
        plain = threading.Thread(target=claim, args=("plain", None))
        plain.start()
        limit = time.monotonic() + 10
        while not gate_held():  # the plain claim waits for the file holding the gate
            assert time.monotonic() < limit
            time.sleep(0.001)
        bounded = [
            threading.Thread(target=claim, args=("short", 0.5)),
            threading.Thread(target=claim, args=("ashort", 0.5, "async")),
            threading.Thread(target=claim, args=("long", 3.5)),
        ]
        for thread in bounded:
            thread.start()
        plain.join(30)
        for thread in bounded[:2]:
            thread.join(30)
        other.release()
        bounded[2].join(30)
    for name in ("short", "ashort"):
        outcome, took = results[name]
        assert isinstance(outcome, DeadlinePassed), (name, outcome)
        assert took < 0.5 + MARGIN, (name, took)
        assert store.get(RecordKey.of("", name)) is None
    outcome, took = results["plain"]
    assert isinstance(outcome, StoreUnavailable), outcome
    assert 2 - 0.1 <= took < 2 + MARGIN, took
    assert store.get(RecordKey.of("", "plain")) is None
    assert isinstance(results["long"][0], New), results["long"]
    assert store.get(RecordKey.of("", "long")) is not None
    store.close()


@pytest.mark.serial
@pytest.mark.parametrize("face", ["asgi", "wsgi"])
def test_a_duplicate_request_waiting_on_a_locked_file_gets_409_at_its_wait(
    tmp_path: Path, face: str
) -> None:
    """HTTP: a duplicate request waits ``wait`` (1 s) for the first; its claim after the wait
    met another process's write lock and waited busy_timeout (4 s), ending in 503. It now gets
    the 409 request-in-flight that ``wait`` documents, at 1 s, and replays once the file is
    free and the first request finished."""
    path = f"{tmp_path}/http.db"
    store = WatchingStore(f"sqlite:///{path}?busy_timeout=4")
    store.claim(RecordKey.of("", "warm"), "fp", 30, 60)
    started, finish = threading.Event(), threading.Event()

    async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        started.set()
        assert await asyncio.to_thread(finish.wait, 30)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        started.set()
        assert finish.wait(30)
        start_response("200 OK", [])
        return [b"done"]

    app = asgi_app if face == "asgi" else wsgi_app
    web = FACES[face](IdempotencyConfig(store=store, scope=GLOBAL, wait=1), app=app)
    key = [("Idempotency-Key", '"dup-1"')]

    async def main(other: OtherWriter) -> None:
        first = asyncio.ensure_future(web.request("POST", "/x", key))
        await asyncio.to_thread(started.wait, 10)
        begun = time.monotonic()
        duplicate = asyncio.ensure_future(web.request("POST", "/x", key))
        await asyncio.to_thread(store.watching.wait, 10)  # it waits for the first
        await asyncio.to_thread(other.lock)
        reply = await duplicate
        took = time.monotonic() - begun
        assert (reply.status, reply.problem) == (409, "request-in-flight"), reply
        assert took < 1 + MARGIN, took
        await asyncio.to_thread(other.release)
        finish.set()
        assert (await first).status == 200
        again = await web.request("POST", "/x", key)
        assert (again.status, again.body, again.replayed) == (200, b"done", True)

    try:
        with OtherWriter(path, hold=False) as other:
            asyncio.run(main(other))
    finally:
        finish.set()  # a failed assertion leaves no request waiting
    store.close()


@pytest.mark.serial
@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_background_completion_gives_up_at_its_settle_time_while_the_file_is_locked(
    tmp_path: Path, face: str
) -> None:
    """A completion retried in the background for settle_for (1 s here) met another process's
    write lock: its attempt waited busy_timeout (4 s) first. It now gives up at settle_for,
    having written nothing; once the file is free the claim completes as usual."""
    path = f"{tmp_path}/settle.db"
    store = SQLiteStore(f"sqlite:///{path}?busy_timeout=4")
    key = RecordKey.of("", "settle")
    claim = store.claim(key, "fp", 30, 60)
    assert isinstance(claim, New)
    done = threading.Event()

    async def asettle() -> None:
        asettle_later(
            lambda: store.acomplete(key, claim.fence, b"1", "json", 60), done.set, "r", 1.0
        )
        assert await asyncio.to_thread(done.wait, 10)

    with OtherWriter(path):
        begun = time.monotonic()
        if face == "sync":
            settle_later(
                lambda: store.complete(key, claim.fence, b"1", "json", 60), done.set, "r", 1.0
            )
            assert done.wait(10)
        else:
            asyncio.run(asettle())
        took = time.monotonic() - begun
    assert took < 1 + MARGIN, took
    record = store.get(key)
    assert record is not None and record.status == "in_progress"  # nothing written
    store.complete(key, claim.fence, b"2", "json", 60)
    record = store.get(key)
    assert record is not None and (record.status, record.result) == ("completed", b"2")
    store.close()


class RenewalStore(SQLiteStore):
    """A SQLite store that says when a lease renewal ended (and how)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.renewals: list[tuple[float, BaseException | None]] = []
        self.renewed = threading.Event()

    def renew(self, key: RecordKey, fence: int, lease: float) -> float:
        try:
            until = super().renew(key, fence, lease)
        except BaseException as exc:
            self.renewals.append((time.monotonic(), exc))
            raise
        finally:
            self.renewed.set()
        self.renewals.append((time.monotonic(), None))
        return until


@pytest.mark.serial
def test_a_lease_renewal_ends_at_the_lease_bound_while_the_file_is_locked(tmp_path: Path) -> None:
    """A claim's renewal (lease 1.5 s: due at 0.5 s, bound at 1.5 s) met another process's
    write lock and waited busy_timeout (4 s), holding the store's renewal lane, and committed
    if the file came free meanwhile: a lease renewed after it was reported lost. It now ends at
    the bound without writing; the lease runs out in the store as reported."""
    path = f"{tmp_path}/renew.db"
    store = RenewalStore(f"sqlite:///{path}?busy_timeout=4")
    key = RecordKey.of("", "renew")
    with OtherWriter(path, hold=False) as other:
        sent_at = time.monotonic()
        claim = store.claim(key, "fp", 1.5, 60)
        assert isinstance(claim, New)
        claimed = Claimed(key, claim.fence, 1.5, store)
        keeper.keep(claimed, sent_at)
        try:
            other.lock()  # before the renewal is due (0.5 s)
            assert store.renewed.wait(10)
            ended, error = store.renewals[0]
            assert isinstance(error, DeadlinePassed), error
            assert ended - sent_at < 1.5 + MARGIN, ended - sent_at
            assert claimed.lost is not None
        finally:
            keeper.stop(claimed)
        other.release()
    record = store.get(key)
    assert record is not None and record.lease_until == claim.lease_until  # never renewed
    store.close()


class ExtendSignalling(SQLiteLockBackend):
    """A SQLite lock backend that says when an extension ended (and how)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.extensions: list[tuple[float, BaseException | None]] = []
        self.extended = threading.Event()

    def extend(self, hold: Hold, ttl: float) -> float | None:
        try:
            result = super().extend(hold, ttl)
        except BaseException as exc:
            self.extensions.append((time.monotonic(), exc))
            raise
        finally:
            self.extended.set()
        self.extensions.append((time.monotonic(), None))
        return result


@pytest.mark.serial
def test_a_lock_renewal_ends_at_the_hold_bound_while_the_file_is_locked(tmp_path: Path) -> None:
    """The watchdog's extension of a SQLite lock (ttl 1.5 s) met another process's write lock
    and waited busy_timeout (4 s): it now ends at the hold's bound (DeadlinePassed, the lock
    reported lost), and once the file is free the lock can be taken again."""
    path = f"{tmp_path}/lock-renew.db"
    backend = ExtendSignalling(f"sqlite:///{path}?busy_timeout=4")
    lock = Lock(backend, f"renew-{os.getpid()}", ttl=1.5, auto_renew=True)
    with OtherWriter(path, hold=False) as other:
        sent_at = time.monotonic()
        lock.acquire()
        other.lock()  # before the renewal is due (0.5 s)
        assert backend.extended.wait(10)
        ended, error = backend.extensions[0]
        assert isinstance(error, DeadlinePassed), error
        assert ended - sent_at < 1.5 + MARGIN, ended - sent_at
        other.release()
    assert lock.lost.wait(10)
    again = Lock(backend, lock.name, ttl=5)
    assert again.acquire(timeout=5) > 0
    again.release()
    backend.close()


class ReleaseWatching(SQLiteStore):
    """A SQLite store that notes the caller's deadline each release sees."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.release_deadlines: list[float | None] = []
        self.released = threading.Event()

    async def arelease(self, key: RecordKey, fence: int) -> None:
        self.release_deadlines.append(deadline.current())
        try:
            await super().arelease(key, fence)
        finally:
            self.released.set()


def test_the_undo_of_a_cancelled_bounded_claim_is_not_bound_by_its_deadline(
    tmp_path: Path,
) -> None:
    """A caller cancelled during a claim that carries a deadline: the claim goes on and its
    release (the undo) runs in the background. That release is cleanup, waiting busy_timeout
    as any: it must not inherit the claim's deadline from the caller's context."""
    store = ReleaseWatching(f"sqlite:///{tmp_path}/undo.db")
    store.claim(RecordKey.of("", "warm"), "fp", 30, 60)
    gate = writer_gate(store.path)
    key = RecordKey.of("", "undo")

    async def main() -> None:
        assert gate.acquire(1)  # the claim stays queued until the caller is cancelled
        try:
            op = Claim(key, "fp", 30, 60, time.monotonic() + 30)
            caller = asyncio.ensure_future(aperform(store, op))
            await until(lambda: bool(gate.pending), "the claim queued")
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        finally:
            gate.release()
        await asyncio.to_thread(store.released.wait, 10)

    asyncio.run(main())
    assert store.release_deadlines == [None]
    assert store.get(key) is None  # released
    store.close()


@pytest.mark.serial
def test_async_writes_with_a_deadline_behind_a_held_gate_wait_without_spinning(
    tmp_path: Path,
) -> None:
    """busy_timeout=0 and the writer gate held by another thread: a write without a deadline
    fails at once (StoreUnavailable, as before), while async writes with a deadline (0.5 s)
    wait for the gate until then, and the writer thread waits with them instead of retrying
    a zero wait in a loop (the process used a whole core for 0.5 s). They end with
    DeadlinePassed, having written nothing, and write as usual once the gate is free."""
    store = store_at(tmp_path, "spin.db", "?busy_timeout=0")
    gate = writer_gate(store.path)
    keys = [RecordKey.of("", f"k{i}") for i in range(3)]

    async def claim(key: RecordKey, bound: float | None) -> Any:
        with deadline.within(None if bound is None else time.monotonic() + bound):
            try:
                return await store.aclaim(key, "fp", 30, 60)
            except Exception as exc:
                return exc

    async def main() -> tuple[list[Any], float, float]:
        begun, cpu = time.monotonic(), time.process_time()
        outcomes = await asyncio.gather(
            claim(keys[0], None), claim(keys[1], 0.5), claim(keys[2], 0.5)
        )
        return outcomes, time.monotonic() - begun, time.process_time() - cpu

    assert gate.acquire(1)
    try:
        outcomes, took, cpu = asyncio.run(main())
    finally:
        gate.release()
    assert isinstance(outcomes[0], StoreUnavailable), outcomes[0]
    assert all(isinstance(o, DeadlinePassed) for o in outcomes[1:]), outcomes
    assert 0.5 - 0.1 <= took < 0.5 + MARGIN, took
    assert cpu < 0.25, cpu  # waited, not spun
    assert all(store.get(key) is None for key in keys)
    assert all(isinstance(store.claim(key, "fp", 30, 60), New) for key in keys)
    store.close()


@pytest.mark.serial
@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_bounded_claim_on_a_store_not_set_up_yet_ends_at_its_deadline(
    tmp_path: Path, face: str
) -> None:
    """The store's first use of the file -- switching it to WAL, creating the schema -- waits
    for another process holding the file's write lock. A claim bounded at 1 s (what a
    duplicate's claim after its wait carries, oncely.core.deadline) ends at 1 s with
    DeadlinePassed, having written nothing; it waited busy_timeout (4 s) and raised
    StoreUnavailable. Once the other process lets go, the store sets the file up and works."""
    path = f"{tmp_path}/cold.db"
    store = SQLiteStore(f"sqlite:///{path}?busy_timeout=4")
    key = RecordKey.of("", "cold")
    with OtherWriter(path) as other:
        begun = time.monotonic()
        with deadline.within(begun + 1.0), pytest.raises(DeadlinePassed):
            if face == "sync":
                store.claim(key, "fp", 30, 60)
            else:
                asyncio.run(store.aclaim(key, "fp", 30, 60))
        took = time.monotonic() - begun
        assert 1.0 - 0.1 <= took < 1.0 + MARGIN, took
        other.release()
    assert isinstance(store.claim(key, "fp", 30, 60), New)
    store.close()


@pytest.mark.serial
@pytest.mark.parametrize("file", ["cold", "warm"])
@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_write_that_waited_for_the_gate_says_which_wait_ran_out(
    tmp_path: Path, face: str, file: str
) -> None:
    """A sync claim without a deadline (busy_timeout 3 s) holds the process's writer gate while
    it waits for another process's write lock on the file (``cold``: to set the file up, WAL
    and schema; ``warm``: for its statement). A claim of another store on the file
    (busy_timeout 0.5 s; sync, or async through the file's writer thread) waits for the gate
    behind it and gives up at 0.5 s: its message says the file is
    locked by another connection or process; it said "another thread of this process kept
    writing" (red team 15: 19 of 20 first claims). A gate held by this process's own write,
    not waiting for the file, is still told as such."""
    path = f"{tmp_path}/gate.db"
    patient = SQLiteStore(f"sqlite:///{path}?busy_timeout=3")
    hasty = SQLiteStore(f"sqlite:///{path}?busy_timeout=0.5")
    if file == "warm":
        patient.claim(RecordKey.of("", "warm"), "fp", 30, 60)
        hasty.claim(RecordKey.of("", "warm2"), "fp", 30, 60)
    gate = writer_gate(patient.path)

    def claim(store: SQLiteStore, name: str, how: str = face) -> Any:
        try:
            if how == "sync":
                return store.claim(RecordKey.of("", name), "fp", 30, 60)
            return asyncio.run(store.aclaim(RecordKey.of("", name), "fp", 30, 60))
        except Exception as exc:
            return exc

    first: list[Any] = []
    with OtherWriter(path):
        waiting = threading.Thread(  # sync: a thread of its own holds the gate
            target=lambda: first.append(claim(patient, "first", "sync"))
        )
        waiting.start()
        limit = time.monotonic() + 10
        while gate.acquire(0):  # until the first claim holds the gate (waiting for the file)
            gate.release()
            assert time.monotonic() < limit
            time.sleep(0.001)
        begun = time.monotonic()
        second = claim(hasty, "second")
        took = time.monotonic() - begun
        waiting.join(30)
    assert isinstance(second, StoreUnavailable), second
    assert 0.5 - 0.1 <= took < 0.5 + MARGIN, took
    assert "locked by another connection or process" in str(second), second
    assert "another thread of this process kept writing" not in str(second), second
    assert isinstance(first[0], StoreUnavailable), first  # busy_timeout, 3 s
    # this process's own writes: the gate held by a thread that is not waiting for the file
    assert gate.acquire(0)
    try:
        own = claim(hasty, "own")
    finally:
        gate.release()
    assert isinstance(own, StoreUnavailable), own
    assert "other threads of this process kept writing" in str(own), own
    patient.close()
    hasty.close()


@pytest.mark.serial
@pytest.mark.parametrize("file", ["cold", "warm"])
def test_unbounded_writes_queued_behind_bounded_ones_end_at_busy_timeout_after_queueing(
    tmp_path: Path, file: str
) -> None:
    """Two sync claims bounded at 1.5 s hold the writer gate, waiting for another process's
    write lock (``cold``: to set the file up; ``warm``: for their statement). Queued behind
    them, two sync claims and one async claim without a deadline (busy_timeout 2 s) end with
    StoreUnavailable at about 2 s after each was queued; their batch began at 1.5 s, and they
    waited busy_timeout from then, until 3.5 s (red team 16: 7.05 s with busy_timeout 4 behind
    3 s). Once the other process lets go, every write works."""
    path = f"{tmp_path}/queued.db"
    store = SQLiteStore(f"sqlite:///{path}?busy_timeout=2")
    if file == "warm":
        store.claim(RecordKey.of("", "warm"), "fp", 30, 60)
    gate = writer_gate(store.path)
    results: dict[str, tuple[Any, float]] = {}

    def claim(name: str, bound: float | None, face: str = "sync") -> None:
        begun = time.monotonic()
        key = RecordKey.of("", name)
        with deadline.within(None if bound is None else begun + bound):
            try:
                outcome: Any = (
                    store.claim(key, "fp", 30, 60)
                    if face == "sync"
                    else asyncio.run(store.aclaim(key, "fp", 30, 60))
                )
            except Exception as exc:
                outcome = exc
        results[name] = (outcome, time.monotonic() - begun)

    with OtherWriter(path) as other:
        bounded = [threading.Thread(target=claim, args=(f"b{i}", 1.5)) for i in range(2)]
        for thread in bounded:
            thread.start()
        limit = time.monotonic() + 10
        while gate.on_file is None:  # a bounded claim holds the gate, waiting for the file
            assert time.monotonic() < limit
            time.sleep(0.001)
        plain = [
            threading.Thread(target=claim, args=("u0", None)),
            threading.Thread(target=claim, args=("u1", None)),
            threading.Thread(target=claim, args=("ua", None, "async")),
        ]
        for thread in plain:
            thread.start()
        for thread in bounded + plain:
            thread.join(30)
        other.release()
    for name in ("b0", "b1"):
        outcome, took = results[name]
        assert isinstance(outcome, DeadlinePassed), (name, outcome)
        assert took < 1.5 + MARGIN, (name, took)
    plain_ends = {name: results[name] for name in ("u0", "u1", "ua")}
    for outcome, took in plain_ends.values():
        assert isinstance(outcome, StoreUnavailable), plain_ends
        assert 2 - 0.1 <= took < 2 + MARGIN, plain_ends  # not 3.5 s
    for name in ("b0", "b1", "u0", "u1", "ua"):
        assert store.get(RecordKey.of("", name)) is None  # nothing written
    # the other process let go: every write works, sync and async, bounded or not
    assert isinstance(store.claim(RecordKey.of("", "after"), "fp", 30, 60), New)
    assert isinstance(asyncio.run(store.aclaim(RecordKey.of("", "aafter"), "fp", 30, 60)), New)
    with deadline.within(time.monotonic() + 5):
        assert isinstance(store.claim(RecordKey.of("", "bafter"), "fp", 30, 60), New)
    lock = Lock(f"sqlite:///{path}?busy_timeout=2", "after")
    assert lock.acquire(timeout=2)
    lock.release()
    store.close()
