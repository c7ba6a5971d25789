"""PostgreSQL-specific behaviour of :class:`oncely.stores.postgres.PostgresStore`.

The rules every store shares are in ``test_store_conformance.py``, and what it shares with
the MySQL store (a missing schema, an unreachable server) in ``test_sql_store_schema.py``; this
module covers what only PostgreSQL has: the schema-qualified table, the READ COMMITTED snapshot
race of the claim statement, LISTEN/NOTIFY wake-ups, prepared statements and the per-loop async
pools. Everything runs against the real server (``ONCELY_TEST_POSTGRES``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")

from oncely.core.records import InFlight, New, RecordKey, Replay  # noqa: E402
from oncely.core.text import MAX_SCOPE_BYTES  # noqa: E402
from oncely.errors import (  # noqa: E402
    ConfigurationError,
    LeaseLost,
    SchemaMissing,
)
from oncely.stores import open_store  # noqa: E402
from oncely.stores.postgres import PostgresStore  # noqa: E402

import workers  # noqa: E402

URL = os.environ.get("ONCELY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
TABLE = f"oncely_test_{uuid.uuid4().hex[:12]}"
DEAD_URL = "postgresql://oncely:s3cret@127.0.0.1:1/test"


def admin() -> Any:
    return psycopg.connect(URL, autocommit=True)


def drop_table(table: str) -> None:
    with admin() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def fresh_key(scope: str = "tenant-a") -> RecordKey:
    return RecordKey.of(scope, f"order-{uuid.uuid4()}")


@pytest.fixture(scope="module")
def store() -> Iterator[PostgresStore]:
    """One store and one table for the whole module; each test uses its own keys."""
    try:
        with admin():
            pass
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {URL}: {exc}")
    s = PostgresStore(URL, table=TABLE, create_schema=True)
    s.init_schema()
    yield s
    s.close()
    drop_table(TABLE)


@pytest.fixture
def scratch_table() -> Iterator[str]:
    """A table name nobody created yet; dropped afterwards if a test created it."""
    table = f"oncely_test_{uuid.uuid4().hex[:12]}"
    yield table
    drop_table(table)


def wait_until_blocked_on_lock(table: str, timeout: float = 10.0) -> None:
    """Wait until some backend running a statement on ``table`` waits for a row lock."""
    deadline = time.monotonic() + timeout
    with admin() as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE %s",
                [f"%{table}%"],
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.01)
    raise AssertionError("the claim never blocked on the concurrent transaction")


# -- configuration -------------------------------------------------------------------------------


def test_url_forms_and_lazy_connection() -> None:
    # Constructing connects to nothing, so a dead URL is fine until first use.
    for url in (DEAD_URL, DEAD_URL.replace("postgresql", "postgres", 1)):
        assert PostgresStore(url).conninfo.startswith("postgresql://")
    sqlalchemy_style = PostgresStore("postgresql+psycopg://u:pw@db.example:5432/app")
    assert sqlalchemy_style.conninfo == "postgresql://u:pw@db.example:5432/app"
    assert "pw" not in repr(sqlalchemy_style)
    assert isinstance(open_store("postgresql+psycopg://u@h/db"), PostgresStore)
    assert PostgresStore.schemes == ("postgresql", "postgres")


@pytest.mark.parametrize(
    "table", ["", "Upper", "two words", 'x"; DROP TABLE y; --', "a.b.c", "1abc", "x" * 49]
)
def test_table_name_must_be_a_plain_identifier(table: str) -> None:
    with pytest.raises(ConfigurationError, match="identifier"):
        PostgresStore(URL, table=table)


def test_bad_pool_sizes_are_rejected() -> None:
    with pytest.raises(ConfigurationError):
        PostgresStore(URL, min_size=4, max_size=2)
    with pytest.raises(ConfigurationError):
        PostgresStore(URL, timeout=0)


# -- schema --------------------------------------------------------------------------------------


def test_schema_qualified_table() -> None:
    schema = f"oncely_test_schema_{uuid.uuid4().hex[:8]}"
    with admin() as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    s = PostgresStore(URL, table=f"{schema}.records", create_schema=True)
    try:
        key = fresh_key()
        new = s.claim(key, "fp", 30.0, 60.0)
        assert isinstance(new, New)
        s.complete(key, new.fence, b"ok", "raw", 60.0)
        assert isinstance(s.claim(key, "fp", 30.0, 60.0), Replay)
    finally:
        s.close()
        with admin() as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


# -- the claim statement -------------------------------------------------------------------------


def _insert_raw(conn: Any, key: RecordKey, *, live: bool, fence: int) -> None:
    expires = "now() + interval '1 hour'" if live else "now() - interval '1 second'"
    conn.execute(
        f"INSERT INTO {TABLE} (scope, digest, status, fingerprint, fence, lease_until, "
        f"expires_at, created_at) VALUES (%s, %s, 'in_progress', 'fp', %s, {expires}, "
        f"{expires}, now())",
        [key.scope, key.digest, fence],
    )


def _claim_in_thread(store: PostgresStore, key: RecordKey) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(store.claim(key, "fp", 30.0, 60.0))
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_claim_retries_when_a_concurrent_insert_is_newer_than_its_snapshot(
    store: PostgresStore,
) -> None:
    """The upsert waits for the other insert and sees its row; the SELECT branch does not."""
    key = fresh_key()
    retries = store.claim_retries
    with admin() as other:
        with other.transaction():
            _insert_raw(other, key, live=True, fence=42)
            thread, box = _claim_in_thread(store, key)
            wait_until_blocked_on_lock(TABLE)
        thread.join(10.0)
    assert len(box) == 1
    outcome = box[0]
    assert isinstance(outcome, InFlight), outcome
    assert outcome.fence == 42
    assert store.claim_retries > retries


def test_claim_retries_when_a_concurrent_takeover_is_newer_than_its_snapshot(
    store: PostgresStore,
) -> None:
    """The snapshot shows an expired row, but another claim took it over meanwhile."""
    key = fresh_key()
    with admin() as conn:
        _insert_raw(conn, key, live=False, fence=7)
    retries = store.claim_retries
    with admin() as other:
        with other.transaction():
            other.execute(
                f"UPDATE {TABLE} SET fence = 8, lease_until = now() + interval '1 hour', "
                "expires_at = now() + interval '1 hour' WHERE scope = %s AND digest = %s",
                [key.scope, key.digest],
            )
            thread, box = _claim_in_thread(store, key)
            wait_until_blocked_on_lock(TABLE)
        thread.join(10.0)
    outcome = box[0]
    assert isinstance(outcome, InFlight), outcome
    assert outcome.fence == 8
    assert store.claim_retries > retries


def _race(store: PostgresStore, key: RecordKey, n: int) -> list[Any]:
    """``n`` threads claim ``key`` at the same instant; returns outcomes (or exceptions)."""
    barrier = threading.Barrier(n)
    outcomes: list[Any] = []
    lock = threading.Lock()

    def racer() -> None:
        barrier.wait()
        try:
            outcome: Any = store.claim(key, "fp", 30.0, 60.0)
        except BaseException as exc:
            outcome = exc
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=racer) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_many_threads_on_fresh_keys_each_get_a_definite_outcome(store: PostgresStore) -> None:
    threads_per_key = 12
    for _ in range(25):
        outcomes = _race(store, fresh_key(), threads_per_key)
        kinds = [type(o).__name__ for o in outcomes]
        assert kinds.count("New") == 1, kinds
        assert kinds.count("InFlight") == threads_per_key - 1, kinds
        new = next(o for o in outcomes if isinstance(o, New))
        assert all(o.fence == new.fence for o in outcomes if isinstance(o, InFlight))


async def test_many_tasks_on_fresh_keys_each_get_a_definite_outcome(store: PostgresStore) -> None:
    for _ in range(15):
        key = fresh_key()
        outcomes = await asyncio.gather(
            *(store.aclaim(key, "fp", 30.0, 60.0) for _ in range(12)), return_exceptions=True
        )
        kinds = [type(o).__name__ for o in outcomes]
        assert kinds.count("New") == 1 and kinds.count("InFlight") == 11, kinds


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_replay_and_in_flight_are_read_only(store: PostgresStore) -> None:
    """A claim that finds a live row writes nothing, so it never waits behind a row lock."""
    # lock_timeout (a libpq option passed through) turns a regression into an error, not a hang.
    reader = PostgresStore(URL, table=TABLE, options="-c lock_timeout=1000")
    try:
        _claims_without_locks(store, reader)
    finally:
        reader.close()


def _claims_without_locks(store: PostgresStore, reader: PostgresStore) -> None:
    done, running = fresh_key(), fresh_key()
    first = store.claim(done, "fp", 30.0, 60.0)
    assert isinstance(first, New)
    store.complete(done, first.fence, b"kept", "raw", 60.0)
    assert isinstance(store.claim(running, "fp", 30.0, 60.0), New)
    with admin() as other, other.transaction():
        other.execute(f"SELECT 1 FROM {TABLE} FOR UPDATE")
        t0 = time.monotonic()
        replay = reader.claim(done, "fp", 30.0, 60.0)
        assert isinstance(replay, Replay) and replay.record.result == b"kept"
        assert isinstance(reader.claim(running, "fp", 30.0, 60.0), InFlight)
        mismatch = reader.claim(done, "other", 30.0, 60.0)
        assert type(mismatch).__name__ == "Mismatch"
        assert time.monotonic() - t0 < 1.0


def test_takeover_fence_grows_and_clears_the_old_result(store: PostgresStore) -> None:
    key = fresh_key()
    first = store.claim(key, "fp", 10.0, 10.0)
    assert isinstance(first, New)
    store.complete(key, first.fence, b"old", "raw", 0.2)
    done = store.get(key)
    assert done is not None
    # The 0.2 s ttl counts from complete (which a loaded machine may run late): wait for the
    # store's clock to pass the record's own expiry, not for a time reckoned from the claim.
    while store.now() <= done.expires_at:
        time.sleep(0.02)
    second = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(second, New) and second.fence > first.fence
    record = store.get(key)
    assert record is not None and record.result is None and record.codec is None
    assert record.status == "in_progress" and record.fence == second.fence


def test_lease_lost_explains_itself(store: PostgresStore) -> None:
    key = fresh_key()
    new = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    with pytest.raises(LeaseLost, match="fence"):
        store.complete(key, new.fence + 1, b"x", "raw", 60.0)
    with pytest.raises(LeaseLost):
        store.renew(fresh_key(), 1, 30.0)
    store.release(key, new.fence)
    store.release(key, new.fence)  # a repeated release finds its own tombstone
    with pytest.raises(LeaseLost):
        store.complete(key, new.fence, b"x", "raw", 60.0)


def test_purge_respects_limit(store: PostgresStore) -> None:
    scope = f"purge-{uuid.uuid4().hex[:8]}"
    for i in range(5):
        key = RecordKey.of(scope, f"k{i}")
        new = store.claim(key, "fp", 0.1, 0.1)
        assert isinstance(new, New)
        store.complete(key, new.fence, b"x", "raw", 0.1)
    time.sleep(0.3)
    assert store.purge_expired(limit=2) == 2
    assert store.purge_expired(limit=0) == 0
    assert store.purge_expired() >= 3
    assert store.list(scope=scope) == []


# -- watch: LISTEN/NOTIFY ------------------------------------------------------------------------


def _complete_later(store: PostgresStore, key: RecordKey, fence: int, delay: float) -> None:
    def run() -> None:
        time.sleep(delay)
        store.complete(key, fence, b"done", "raw", 60.0)

    threading.Thread(target=run).start()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_watch_wakes_promptly_from_another_store(store: PostgresStore) -> None:
    """Another pool (as in another process) completes: the NOTIFY wakes the waiter at once."""
    other = PostgresStore(URL, table=TABLE)
    try:
        for action in ("complete", "release"):
            key = fresh_key()
            new = store.claim(key, "fp", 30.0, 60.0)
            assert isinstance(new, New)

            def act(key: RecordKey = key, fence: int = new.fence, action: str = action) -> None:
                time.sleep(0.2)
                if action == "complete":
                    other.complete(key, fence, b"done", "raw", 60.0)
                else:
                    other.release(key, fence)

            threading.Thread(target=act).start()
            t0 = time.monotonic()
            assert store.watch(key, new.fence, timeout=20.0) is True
            elapsed = time.monotonic() - t0
            assert 0.15 <= elapsed < 1.0, elapsed
    finally:
        other.close()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_watch_ignores_other_keys_and_times_out(store: PostgresStore) -> None:
    mine, theirs = fresh_key(), fresh_key()
    # Same digest in another scope, too: the payload tells scopes apart.
    same_digest = RecordKey("tenant-b", mine.digest)
    held = store.claim(mine, "fp", 30.0, 60.0)
    assert isinstance(held, New)
    for key in (theirs, same_digest):
        new = store.claim(key, "fp", 30.0, 60.0)
        assert isinstance(new, New)
        _complete_later(store, key, new.fence, 0.05)
    t0 = time.monotonic()
    assert store.watch(mine, held.fence, timeout=0.5) is False
    assert 0.45 <= time.monotonic() - t0 < 2.0


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_watch_sees_a_change_that_happened_before_it_listened(store: PostgresStore) -> None:
    key = fresh_key()
    new = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    store.complete(key, new.fence, b"done", "raw", 60.0)  # before watch: no NOTIFY to catch
    t0 = time.monotonic()
    assert store.watch(key, new.fence, timeout=20.0) is True
    assert time.monotonic() - t0 < 1.0
    assert store.watch(fresh_key(), 1, timeout=20.0) is True  # no record at all


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_watch_with_a_long_scope(store: PostgresStore) -> None:
    """NOTIFY payloads are limited to 8000 bytes; the scope is hashed into the payload (the
    longest scope oncely takes, MAX_SCOPE_BYTES of 4-byte characters: 1020 bytes)."""
    key = RecordKey.of("\U0001f600" * (MAX_SCOPE_BYTES // 4), "k")
    new = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    _complete_later(store, key, new.fence, 0.1)
    t0 = time.monotonic()
    assert store.watch(key, new.fence, timeout=20.0) is True
    assert time.monotonic() - t0 < 1.0
    store.delete(key)


def test_watch_connections_are_reused_and_not_left_listening(store: PostgresStore) -> None:
    for _ in range(3):
        key = fresh_key()
        new = store.claim(key, "fp", 30.0, 60.0)
        assert isinstance(new, New)
        assert store.watch(key, new.fence, timeout=0.05) is False
    pool = store._watch_pool
    assert pool is not None
    with pool.connection() as conn:
        assert conn.execute("SELECT pg_listening_channels()").fetchall() == []


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
async def test_awatch_wakes_promptly(store: PostgresStore) -> None:
    key = fresh_key()
    new = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)

    async def finish() -> None:
        await asyncio.sleep(0.2)
        await store.acomplete(key, new.fence, b"done", "raw", 60.0)

    finisher = asyncio.ensure_future(finish())
    t0 = time.monotonic()
    assert await store.awatch(key, new.fence, timeout=20.0) is True
    assert 0.15 <= time.monotonic() - t0 < 1.0
    await finisher
    assert await store.awatch(key, new.fence, timeout=20.0) is True


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
async def test_awatch_from_sync_completion_and_timeout(store: PostgresStore) -> None:
    key = fresh_key()
    new = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    t0 = time.monotonic()
    assert await store.awatch(key, new.fence, timeout=0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 2.0
    _complete_later(store, key, new.fence, 0.1)  # the sync face, in a thread
    assert await store.awatch(key, new.fence, timeout=20.0) is True


async def test_cancelled_awatch_leaves_no_listening_connection(store: PostgresStore) -> None:
    key = fresh_key()
    new = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    waiter = asyncio.ensure_future(store.awatch(key, new.fence, timeout=20.0))
    await asyncio.sleep(0.2)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # The next waiter still works and is woken by the completion.
    again = asyncio.ensure_future(store.awatch(key, new.fence, timeout=20.0))
    await asyncio.sleep(0.1)
    await store.acomplete(key, new.fence, b"done", "raw", 60.0)
    assert await asyncio.wait_for(again, 5.0) is True
    slot = store._loops.get()
    assert slot.watch.idle  # the waiters' connections were kept, none of them listening
    for conn, _ in slot.watch.idle:
        cur = await conn.execute("SELECT pg_listening_channels()")
        assert await cur.fetchall() == []


# -- pools, prepared statements, clock -----------------------------------------------------------


def test_hot_statements_are_prepared(scratch_table: str) -> None:
    s = PostgresStore(URL, table=scratch_table, create_schema=True, min_size=1, max_size=1)
    try:
        key = fresh_key()
        new = s.claim(key, "fp", 30.0, 60.0)
        assert isinstance(new, New)
        s.complete(key, new.fence, b"x", "raw", 60.0)
        assert isinstance(s.claim(key, "fp", 30.0, 60.0), Replay)
        pool = s._pool
        assert pool is not None
        with pool.connection() as conn:
            rows = conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()
        prepared = " ".join(r[0] for r in rows)
        assert "ON CONFLICT" in prepared and "pg_notify" in prepared
    finally:
        s.close()


def test_close_then_use_again(scratch_table: str) -> None:
    s = PostgresStore(URL, table=scratch_table, create_schema=True)
    key = fresh_key()
    assert isinstance(s.claim(key, "fp", 30.0, 60.0), New)
    s.close()
    assert isinstance(s.claim(key, "fp", 30.0, 60.0), InFlight)
    s.close()
    s.close()


def test_async_pools_follow_event_loops_and_close_with_them(store: PostgresStore) -> None:
    name = f"oncely-test-{uuid.uuid4().hex[:8]}"
    s = PostgresStore(URL, table=TABLE, application_name=name)

    def backends() -> int:
        with admin() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [name]
            ).fetchone()
            return int(row[0]) if row else 0

    async def use() -> None:
        key = fresh_key()
        new = await s.aclaim(key, "fp", 30.0, 60.0)
        assert isinstance(new, New)
        assert await s.awatch(key, new.fence, timeout=0.01) is False
        await s.acomplete(key, new.fence, b"x", "raw", 60.0)
        assert isinstance(await s.aclaim(key, "fp", 30.0, 60.0), Replay)

    try:
        for _ in range(4):
            asyncio.run(use())  # no aclose(): the loop's shutdown closes its pools
            assert len(s._loops) == 0
        deadline = time.monotonic() + 5.0
        while backends() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backends() == 0
    finally:
        s.close()


def test_clock_is_the_servers(store: PostgresStore) -> None:
    with admin() as conn:
        row = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()
    assert row is not None
    assert abs(store.now() - row[0]) < 1.0


async def test_async_inspection(store: PostgresStore) -> None:
    scope = f"alist-{uuid.uuid4().hex[:8]}"
    keys = [RecordKey.of(scope, f"k{i}") for i in range(3)]
    for key in keys:
        assert isinstance(await store.aclaim(key, "fp", 30.0, 60.0), New)
    listed = await store.alist(scope=scope)
    assert sorted(r.digest for r in listed) == sorted(k.digest for k in keys)
    assert abs(await store.anow() - store.now()) < 1.0
    assert await store.adelete(keys[0]) is True
    assert await store.aget(keys[0]) is None


def test_a_table_from_an_older_version_is_upgraded_in_place(scratch_table: str) -> None:
    # A table made before the fence sequence and release tombstones: check_schema says so, and
    # init_schema upgrades it in place. The sequence starts above the fences already stored.
    high = int(time.time() * 1_000_000) + 10**12  # above anything the clock gives soon
    key = fresh_key()
    with admin() as conn:
        conn.execute(
            f"""CREATE TABLE {scratch_table} (
                scope text NOT NULL, digest text NOT NULL,
                status text NOT NULL CHECK (status IN ('in_progress', 'completed')),
                fingerprint text NOT NULL, fence bigint NOT NULL, lease_until timestamptz,
                expires_at timestamptz NOT NULL, created_at timestamptz NOT NULL,
                result bytea, codec text, PRIMARY KEY (scope, digest))"""
        )
        conn.execute(
            f"INSERT INTO {scratch_table} VALUES (%s, %s, 'completed', 'fp', %s, NULL, "
            "now() + interval '1 hour', now(), '1', 'json')",
            [key.scope, key.digest, high],
        )
    s = PostgresStore(URL, table=scratch_table)
    try:
        with pytest.raises(SchemaMissing, match="older oncely"):
            s.check_schema()
        s.init_schema()
        s.init_schema()  # twice: nothing left to upgrade
        again = workers.assert_upgraded(s, key, high)
        s.release(key, again.fence)  # the status check allows the tombstone now
        assert s.get(key) is None
    finally:
        s.close()
