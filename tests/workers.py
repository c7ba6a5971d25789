"""Functions run in child processes by the multi-process and crash tests (importable by spawn)."""

from __future__ import annotations

import os
import time
from typing import Any

from oncely.core.records import New, RecordKey
from oncely.stores import open_store


def claim_once(
    url: str, options: dict[str, Any], scope: str, key: str, start_at: float
) -> tuple[str, int]:
    """Open the store, wait for a shared start instant, claim once; report outcome and pid."""
    store = open_store(url, **options)
    try:
        record_key = RecordKey.of(scope, key)
        store.get(record_key)  # connect before the start line so all claims race together
        while time.time() < start_at:
            time.sleep(0.0005)
        outcome = store.claim(record_key, "fp", 30.0, 60.0)
        return type(outcome).__name__, (outcome.fence if isinstance(outcome, New) else 0)
    finally:
        store.close()


def pid() -> int:
    return os.getpid()


def run_decorated(
    url: str,
    options: dict[str, Any],
    key: str,
    log_path: str,
    start_at: float,
    work_seconds: float,
    lease: float = 30.0,
) -> Any:
    """Call an idempotent function that appends one line to ``log_path`` per real execution."""
    from oncely import idempotent

    store = open_store(url, **options)

    @idempotent(store=store, name="workers.append", key=["key"], lease=lease, wait_timeout=60)
    def append(key: str) -> dict[str, Any]:
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(work_seconds)
        return {"pid": os.getpid()}

    try:
        store.get(RecordKey.of("", "warm-up"))
        while time.time() < start_at:
            time.sleep(0.0005)
        return append(key)
    finally:
        store.close()


def crash_inside(url: str, options: dict[str, Any], key: str, log_path: str, lease: float) -> None:
    """Claim, log the execution, then hang inside the function until killed (SIGKILL)."""
    from oncely import idempotent

    store = open_store(url, **options)

    @idempotent(store=store, name="workers.append", key=["key"], lease=lease)
    def append(key: str) -> dict[str, Any]:
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(3600)
        return {"pid": os.getpid()}

    append(key)


def run_threads(target: Any, args: list[tuple[Any, ...]]) -> None:
    """Run ``target(*a)`` for every ``a`` in ``args``, each in a thread of its own; wait for all."""
    import threading

    threads = [threading.Thread(target=target, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def assert_upgraded(store: Any, key: RecordKey, high: int) -> New:
    """After an upgrade of a table made by an older version: its schema checks out, and once the
    legacy record of ``key`` (fence ``high``) is deleted, the next claim's fence is above it."""
    store.check_schema()
    assert store.delete(key) is True
    again = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(again, New) and again.fence > high
    return again


def open_fds() -> int:
    """How many file descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def many_event_loops(url: str, options: dict[str, Any], loops: int) -> tuple[int, int]:
    """Call an async decorated function under ``loops`` separate ``asyncio.run`` calls, the way a
    script or a test suite does, without ever calling ``aclose()``; report the open file
    descriptors after the first loop and after the last one."""
    import asyncio
    import gc
    import uuid

    from oncely import idempotent

    store = open_store(url, **options)

    @idempotent(store=store, key=["k"])
    async def call(k: str) -> int:
        return len(k)

    asyncio.run(call(str(uuid.uuid4())))
    gc.collect()
    before = open_fds()
    for _ in range(loops - 1):
        assert asyncio.run(call(str(uuid.uuid4()))) == 36
    gc.collect()
    return before, open_fds()


def claim_keys_in_threads(url: str, keys: list[str], threads: int, start_at: float) -> list[str]:
    """``threads`` threads of this process each claim every key in ``keys`` (shuffled) on one
    shared store; the keys this process won (one entry per ``New``)."""
    import random
    import threading

    store = open_store(url)
    won: list[str] = []
    errors: list[BaseException] = []

    def claim_all() -> None:
        order = list(keys)
        random.shuffle(order)
        try:
            for key in order:
                if isinstance(store.claim(RecordKey.of("mp", key), "fp", 30.0, 60.0), New):
                    won.append(key)
        except BaseException as exc:
            errors.append(exc)

    try:
        store.get(RecordKey.of("mp", "warm-up"))
        while time.time() < start_at:
            time.sleep(0.0005)
        pool = [threading.Thread(target=claim_all) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if errors:
            raise errors[0]
        return won
    finally:
        store.close()
