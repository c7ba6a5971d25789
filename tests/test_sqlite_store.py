"""SQLite-specific behaviour: the embedded default opened by many parties at once."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from oncely import idempotent
from oncely.core.records import New, RecordKey
from oncely.errors import (
    ConfigurationError,
    ResultTooLarge,
    SerializationError,
    StoreUnavailable,
)
from oncely.locks import Lock
from oncely.stores import Store, open_store
from oncely.stores.sqlite import SQLiteStore

import workers


def race_to_open(url: str, parties: int) -> tuple[list[str], list[BaseException]]:
    """``parties`` separate store objects open one new file and claim one key at once."""
    stores = [open_store(url) for _ in range(parties)]
    barrier = threading.Barrier(parties)
    kinds: list[str] = []
    errors: list[BaseException] = []

    def claim(store: Store) -> None:
        barrier.wait()
        try:
            kinds.append(type(store.claim(RecordKey.of("", "k"), "", 30, 60)).__name__)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores:
        store.close()
    return kinds, errors


def test_many_stores_opening_a_fresh_file_at_once_all_work(tmp_path: Path) -> None:
    # Each store object stands for a process: each one switches the new file to WAL and
    # creates the table. SQLite does not wait on the journal-mode lock, so this used to fail
    # with "database is locked" at once.
    for attempt in range(10):
        kinds, errors = race_to_open(f"sqlite:///{tmp_path}/fresh-{attempt}.db", 32)
        assert errors == []
        assert sorted(kinds) == ["InFlight"] * 31 + ["New"]


def test_bad_urls_and_unopenable_files_get_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="memory://"):
        open_store("sqlite:///:memory:")
    with pytest.raises(ConfigurationError, match="synchronous"):
        open_store(f"sqlite:///{tmp_path}/x.db?synchronous=SOMETIMES")
    missing_dir = open_store(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    with pytest.raises(StoreUnavailable, match="writable"):
        missing_dir.claim(RecordKey.of("", "k"), "", 30, 60)


@pytest.mark.parametrize("value", ["abc", "-3", "5 jiffies", "inf"])
def test_a_bad_busy_timeout_is_refused_when_the_store_is_built(tmp_path: Path, value: str) -> None:
    # F14 (redteam3): busy_timeout=abc failed at the first call with a bare ValueError, and
    # busy_timeout=-3 was taken.
    with pytest.raises(ConfigurationError, match=f"busy_timeout='{value}'"):
        open_store(f"sqlite:///{tmp_path}/x.db?busy_timeout={value}")
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        Lock(f"sqlite:///{tmp_path}/x.db?busy_timeout={value}", "l")


def test_a_bad_synchronous_level_is_refused_naming_the_levels_and_the_default(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/x.db?synchronous=sometimes"
    store_levels = "use OFF, NORMAL, FULL (default) or EXTRA"
    with pytest.raises(ConfigurationError, match=re.escape(f"'SOMETIMES': {store_levels}")):
        open_store(url)
    with pytest.raises(ConfigurationError, match=re.escape(f"'NEVER': {store_levels}")):
        open_store(f"sqlite:///{tmp_path}/x.db", synchronous="never")
    lock_levels = "use OFF, NORMAL (default), FULL or EXTRA"
    with pytest.raises(ConfigurationError, match=re.escape(f"'SOMETIMES': {lock_levels}")):
        Lock(url, "l")
    with pytest.raises(ConfigurationError, match="synchronous must be a string, not int"):
        open_store(f"sqlite:///{tmp_path}/x.db", synchronous=1)  # type: ignore[arg-type]
    assert open_store(f"sqlite:///{tmp_path}/x.db?synchronous=normal").synchronous == "NORMAL"
    assert open_store(f"sqlite:///{tmp_path}/x.db").synchronous == "FULL"


def test_busy_timeout_takes_units_and_zero(tmp_path: Path) -> None:
    assert open_store(f"sqlite:///{tmp_path}/x.db?busy_timeout=250ms").busy_timeout == 0.25
    assert open_store(f"sqlite:///{tmp_path}/x.db?busy_timeout=0").busy_timeout == 0.0
    assert open_store(f"sqlite:///{tmp_path}/x.db", busy_timeout="2s").busy_timeout == 2.0


@pytest.mark.parametrize("opener", ["store", "lock"])
def test_a_file_locked_at_open_is_reported_as_locked(tmp_path: Path, opener: str) -> None:
    # F14: a database another writer held past busy_timeout while the store opened it was
    # reported with "check that the directory exists and is writable".
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # another writer, mid-transaction (a rollback journal)
    try:
        url = f"sqlite:///{path}?busy_timeout=0.2"
        if opener == "store":
            store = open_store(url)
            with pytest.raises(StoreUnavailable, match="locked by another writer") as info:
                store.claim(RecordKey.of("", "k"), "", 30, 60)
            store.close()
        else:  # no timeout: busy_timeout bounds it (a timeout would end in LockTimeout)
            with pytest.raises(StoreUnavailable, match="locked by another writer") as info:
                Lock(url, "l").acquire()
        assert "directory" not in str(info.value)
        assert "busy_timeout (0.2s)" in str(info.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_lock_threads_opening_a_fresh_lock_file_at_once_all_work(tmp_path: Path) -> None:
    # The SQLite lock backend opens one connection per thread and shares the WAL set-up with
    # the store (``enable_wal``), so first opens under concurrency do not fail either.
    from oncely.locks import Lock

    for attempt in range(5):
        url = f"sqlite:///{tmp_path}/locks-{attempt}.db"
        barrier = threading.Barrier(16)
        errors: list[BaseException] = []

        def take(
            index: int,
            url: str = url,
            barrier: threading.Barrier = barrier,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                with Lock(url, f"name-{index}", ttl=5):
                    pass
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_short_lived_threads_taking_locks_leave_nothing_open(tmp_path: Path) -> None:
    # The lock backend is shared per URL; 2,000 threads (20 at a time) each take and give back a
    # lock once. Connections must not pile up per thread that ever ran.
    from oncely.locks import Lock

    url = f"sqlite:///{tmp_path}/locks.db"

    def take(index: int) -> None:
        with Lock(url, f"name-{index % 7}", ttl=5, timeout=30):
            pass

    take(0)
    before = workers.open_fds()
    for batch in range(100):
        workers.run_threads(take, [(batch * 20 + i,) for i in range(20)])
    assert workers.open_fds() - before <= 40


def test_a_file_from_an_older_version_gets_its_fence_keeper(tmp_path: Path) -> None:
    # Files made before the fence keeper (a table and a trigger that remember the fences of
    # deleted rows): check_schema says so, and opening with create_schema (the default) adds it.
    # A legacy row's fence then still bounds the next claim after the row is deleted.
    import sqlite3
    import time

    from oncely.errors import SchemaMissing

    path = tmp_path / "old.db"
    high = int(time.time() * 1_000_000) + 10**12  # above anything the clock gives soon
    key = RecordKey.of("s", "legacy")
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE oncely_records (
                scope TEXT NOT NULL, digest TEXT NOT NULL, status TEXT NOT NULL,
                fingerprint TEXT NOT NULL, fence INTEGER NOT NULL, lease_until REAL,
                expires_at REAL NOT NULL, created_at REAL NOT NULL, result BLOB, codec TEXT,
                claim_id INTEGER NOT NULL, PRIMARY KEY (scope, digest)) WITHOUT ROWID;
            """
        )
        conn.execute(
            "INSERT INTO oncely_records VALUES (?, ?, 'completed', 'fp', ?, NULL, ?, ?, x'31', "
            "'json', 0)",
            (key.scope, key.digest, high, time.time() + 3600, time.time()),
        )
    conn.close()
    url = f"sqlite:///{path}"
    strict = open_store(url, create_schema=False)
    with pytest.raises(SchemaMissing, match="fence keeper"):
        strict.check_schema()
    strict.close()
    store = open_store(url)
    try:
        workers.assert_upgraded(store, key, high)
    finally:
        store.close()


def test_a_hundred_concurrent_threads_share_at_most_16_connections(tmp_path: Path) -> None:
    # SQLite keeps the descriptor of a closed connection open while others to the same file
    # are open, so only a bound on connections bounds descriptors: 100 threads at once, 1,000
    # in all, leave at most 16 connections (one descriptor each for the file and its WAL).
    import os
    import uuid

    path = tmp_path / "busy.db"
    store = open_store(f"sqlite:///{path}?synchronous=NORMAL")

    def request() -> None:
        key = RecordKey.of("s", str(uuid.uuid4()))
        new = store.claim(key, "fp", 30, 60)
        assert isinstance(new, New)
        store.complete(key, new.fence, b"1", "json", 60)

    def open_files() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the descriptor listdir itself used
                count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        return count

    try:
        for _ in range(10):
            workers.run_threads(request, [()] * 100)
        assert 1 <= open_files() <= 16
    finally:
        store.close()
    assert open_files() == 0


# -- a result over SQLITE_LIMIT_LENGTH (redteam4) -------------------------------------------------
_SMALL_LIMIT = 200_000


class _SmallLimitStore(SQLiteStore):
    """A real SQLite store whose connections take a lower SQLITE_LIMIT_LENGTH (as a build or
    an application setting ``setlimit`` may give them)."""

    def _connect(self, timeout: float) -> sqlite3.Connection:
        conn = super()._connect(timeout)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _SMALL_LIMIT)
        return conn


@pytest.mark.skipif(not hasattr(sqlite3.Connection, "setlimit"), reason="Python 3.11+")
def test_a_result_near_the_length_limit_is_ran_not_storable(tmp_path: Path) -> None:
    # The limit bounds a whole row, not just the result: a result just under it passed the
    # store's check and failed at the write with a bare sqlite3.DataError ("string or blob too
    # big"). The store now keeps room for the other columns, and SQLite's refusal at the write
    # is ResultTooLarge too: the call is kept as "ran, result not storable", never run again.
    store = _SmallLimitStore(f"sqlite:///{tmp_path}/big.db", create_schema=True)
    runs: list[str] = []

    @idempotent(store=store, name="big-sqlite", key=["k"], lease=2, wait_timeout=5)
    def export(k: str) -> str:
        runs.append(k)
        return "x" * (_SMALL_LIMIT - 10)

    try:
        with pytest.raises(ResultTooLarge, match="SQLITE_LIMIT_LENGTH"):
            export("o-1")
        with pytest.raises(SerializationError, match="already ran"):
            export("o-1")
        assert runs == ["o-1"]
        assert store.max_result_bytes is not None and store.max_result_bytes < _SMALL_LIMIT
        # Past the check (a limit lowered since): SQLite's refusal at the write is the same.
        key = RecordKey.of("t", "direct")
        outcome = store.claim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        store.max_result_bytes = None
        with pytest.raises(ResultTooLarge, match="SQLITE_LIMIT_LENGTH"):
            store.complete(key, outcome.fence, b"y" * (_SMALL_LIMIT - 10), "raw", 60)
        store.complete(key, outcome.fence, b"fits", "raw", 60)  # the claim is intact
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(sqlite3.Connection, "setlimit"), reason="Python 3.11+")
async def test_the_async_face_refuses_at_the_write_too(tmp_path: Path) -> None:
    store = _SmallLimitStore(f"sqlite:///{tmp_path}/big.db", create_schema=True)
    try:
        key = RecordKey.of("t", "async")
        outcome = await store.aclaim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        store.max_result_bytes = None
        with pytest.raises(ResultTooLarge):
            await store.acomplete(key, outcome.fence, b"y" * (_SMALL_LIMIT - 10), "raw", 60)
        await store.acomplete(key, outcome.fence, b"fits", "raw", 60)
    finally:
        await store.aclose()
        store.close()
