"""MySQL/MariaDB-specific behaviour of :class:`oncely.stores.mysql.MySQLStore`.

The rules every store shares are in ``test_store_conformance.py``, and what it shares with
the PostgreSQL store (a missing schema, an unreachable server) in ``test_sql_store_schema.py``;
this module covers what only this store has: URL parsing, a foreign table, the
``ON DUPLICATE KEY UPDATE`` take-over (whose assignments MySQL evaluates left to right), the two
ways the row comes back (``INSERT … RETURNING`` on MariaDB 10.5+, a multi-statement transaction
on MySQL), the connection pools and the per-loop async pools. Everything runs against the real
server (``ONCELY_TEST_MYSQL``); every test works in its own table and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pymysql = pytest.importorskip("pymysql")
pytest.importorskip("aiomysql")

from mysql_admin import admin, sql  # noqa: E402
from oncely import idempotent  # noqa: E402
from oncely.backends.mysql import supports_returning as _supports_returning  # noqa: E402
from oncely.core.records import InFlight, Mismatch, New, RecordKey, Replay  # noqa: E402
from oncely.core.text import MAX_SCOPE_BYTES  # noqa: E402
from oncely.errors import (  # noqa: E402
    ConfigurationError,
    InvalidKey,
    LeaseLost,
    ResultTooLarge,
    SchemaMissing,
    SerializationError,
    StoreError,
    StoreUnavailable,
)
from oncely.stores import open_store  # noqa: E402
from oncely.stores.mysql import MySQLStore  # noqa: E402
from oncely.stores.sql import fence_params as _fence  # noqa: E402

import workers  # noqa: E402

URL = os.environ.get("ONCELY_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test")
DEAD_URL = "mysql://oncely:s3cret@127.0.0.1:1/test"
MODES = ["returning", "transaction"]


def fresh_key(scope: str = "tenant-a") -> RecordKey:
    return RecordKey.of(scope, f"order-{uuid.uuid4()}")


def race(n: int, fn: Callable[[], Any]) -> list[Any]:
    """Run ``fn`` in ``n`` threads released together; return what each returned."""
    barrier = threading.Barrier(n)
    results: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        result = fn()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def hold_row_lock(cur: Any, table: str, key: RecordKey) -> None:
    """In ``cur``'s open transaction, insert ``key`` uncommitted: claims of it now wait."""
    cur.execute("START TRANSACTION")
    cur.execute(
        f"INSERT INTO {table} (scope, digest, status, fingerprint, fence, lease_until, "
        "expires_at, created_at, claim_id) VALUES (%s, %s, 'released', '', 1, 0, 0, 0, 0)",
        (key.scope, key.digest),
    )


def wait_for_store_time(store: MySQLStore, instant: float) -> None:
    while store.now() <= instant:
        time.sleep(0.01)


@pytest.fixture(scope="module", autouse=True)
def server() -> str:
    """Skip the module when no server is reachable; return its version string."""
    try:
        return str(sql("SELECT VERSION()")[0][0])
    except pymysql.err.OperationalError as exc:
        pytest.skip(f"MySQL is not reachable at {URL}: {exc}")


@pytest.fixture
def table() -> Iterator[str]:
    """A table name nobody created yet; dropped afterwards."""
    name = f"oncely_test_{uuid.uuid4().hex[:12]}"
    yield name
    sql(f"DROP TABLE IF EXISTS {name}, {name}_fences")


def open_mode(mode: str, server: str, table: str, **options: Any) -> MySQLStore:
    if mode == "returning" and not _supports_returning(server):
        pytest.skip("this server has no INSERT … RETURNING (MariaDB 10.5+)")
    store = MySQLStore(URL, table=table, create_schema=True, **options)
    store._returning = mode == "returning"  # chosen before the first connection
    return store


@pytest.fixture(params=MODES)
def store(request: pytest.FixtureRequest, server: str, table: str) -> Iterator[MySQLStore]:
    """A store on its own table, once per way of reading the claimed row back."""
    s = open_mode(request.param, server, table)
    yield s
    s.close()


# -- configuration -------------------------------------------------------------------------------


def test_url_forms_and_lazy_connection() -> None:
    # Constructing connects to nothing, so a dead URL is fine until first use.
    for url in (
        DEAD_URL,
        DEAD_URL.replace("mysql", "mariadb", 1),
        "mysql+pymysql://u:p%40ss@db.example:3307/app",
        "mariadb+aiomysql://u@db.example/app?charset=utf8mb4",
        "mysql://u@localhost/app?unix_socket=/run/mysqld/mysqld.sock",
    ):
        store = MySQLStore(url)
        assert "s3cret" not in repr(store) and "p%40ss" not in repr(store)
    args = MySQLStore("mysql+pymysql://u:p%40ss@db.example:3307/app")._sync_args
    assert (args["host"], args["port"], args["user"], args["password"], args["database"]) == (
        "db.example",
        3307,
        "u",
        "p@ss",
        "app",
    )
    assert MySQLStore.schemes == ("mysql", "mariadb")


def test_open_store_picks_the_mysql_store() -> None:
    for url in ("mysql://u@h/db", "mariadb://u@h/db", "mysql+pymysql://u@h/db"):
        assert isinstance(open_store(url), MySQLStore)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u@h",  # no database
        "mysql://u@h/",
        "mysql://u@h:notaport/db",
        "mysql://u@h/db?sslmode=require",  # a libpq option, not ours
        "mysql://u@h/db?charset=latin1",
        "mysql://u@h/db?ssl=maybe",
        "postgresql://u@h/db",
    ],
)
def test_bad_urls_are_rejected(url: str) -> None:
    with pytest.raises(ConfigurationError):
        MySQLStore(url)


@pytest.mark.parametrize(
    "table", ["", "Upper", "two words", "x`; DROP TABLE y; --", "a.b.c", "1abc", "x" * 58]
)
def test_table_name_must_be_a_plain_identifier(table: str) -> None:
    with pytest.raises(ConfigurationError, match="identifier"):
        MySQLStore(URL, table=table)


def test_bad_sizes_and_options_are_rejected() -> None:
    with pytest.raises(ConfigurationError):
        MySQLStore(URL, max_size=0)
    with pytest.raises(ConfigurationError):
        MySQLStore(URL, timeout=0)
    with pytest.raises(ConfigurationError, match="autocommit"):
        MySQLStore(URL, autocommit=False)
    with pytest.raises(ConfigurationError):
        MySQLStore(URL, no_such_option=1)
    MySQLStore(URL, read_timeout=30, password="")  # real PyMySQL options pass


def test_server_dialect_detection() -> None:
    assert _supports_returning("5.5.5-10.11.19-MariaDB-0+deb12u1")
    assert _supports_returning("10.5.2-MariaDB")
    assert _supports_returning("11.4.3-MariaDB-ubu2404")
    assert not _supports_returning("10.4.34-MariaDB")
    assert not _supports_returning("8.4.3")
    assert not _supports_returning("8.0.36-0ubuntu0.22.04.1")


# -- schema --------------------------------------------------------------------------------------


def test_a_foreign_table_is_reported(table: str) -> None:
    sql(f"CREATE TABLE {table} (id INT PRIMARY KEY)")
    s = MySQLStore(URL, table=table)
    try:
        with pytest.raises(StoreError, match="lacks oncely's columns"):
            s.check_schema()
    finally:
        s.close()


def test_database_qualified_table(table: str) -> None:
    database = sql("SELECT DATABASE()")[0][0]
    s = MySQLStore(URL, table=f"{database}.{table}", create_schema=True)
    try:
        key = fresh_key()
        new = s.claim(key, "fp", 30.0, 60.0)
        assert isinstance(new, New)
        assert sql(f"SELECT fence FROM {table}") == [(new.fence,)]
    finally:
        s.close()


# -- the claim: one upsert, the row back in the same round trip ----------------------------------


def test_taking_over_an_expired_completed_record_replaces_every_column(store: MySQLStore) -> None:
    # ON DUPLICATE KEY UPDATE assigns left to right and later assignments see earlier ones: if
    # the claimable test were repeated per column, rewriting expires_at would make it false for
    # the columns after it and leave a half-taken-over row (old result, old claim_id).
    key = fresh_key()
    old = store.claim(key, "old-fp", 10.0, 10.0)  # the lease outlasts a stall before complete
    assert isinstance(old, New)
    store.complete(key, old.fence, b"old result", "raw", 0.3)
    done = store.get(key)
    assert done is not None
    wait_for_store_time(store, done.expires_at)
    new = store.claim(key, "new-fp", 10.0, 20.0)
    assert isinstance(new, New), new
    assert new.fence > old.fence
    record = store.get(key)
    assert record is not None
    assert record.status == "in_progress"
    assert record.fingerprint == "new-fp"
    assert record.fence == new.fence
    assert record.result is None and record.codec is None
    assert record.created_at == pytest.approx(new.now, abs=1e-6)
    assert record.lease_until == pytest.approx(new.now + 10.0, abs=1e-3)
    assert record.expires_at == pytest.approx(new.now + 20.0, abs=1e-3)
    with pytest.raises(LeaseLost):
        store.complete(key, old.fence, b"zombie", "raw", 60.0)
    store.complete(key, new.fence, b"new result", "raw", 60.0)
    replay = store.claim(key, "new-fp", 10.0, 20.0)
    assert isinstance(replay, Replay) and replay.record.result == b"new result"


def test_taking_over_a_lapsed_lease_replaces_every_column(store: MySQLStore) -> None:
    # The record is still live (expires_at ahead) but its lease ran out: here it is rewriting
    # lease_until that would flip a per-column claimable test.
    key = fresh_key()
    old = store.claim(key, "fp", 0.2, 60.0)
    assert isinstance(old, New)
    wait_for_store_time(store, old.lease_until)
    new = store.claim(key, "other-fp", 5.0, 7.0)
    assert isinstance(new, New), new
    assert new.fence > old.fence
    record = store.get(key)
    assert record is not None
    assert (record.fingerprint, record.fence) == ("other-fp", new.fence)
    assert record.lease_until == pytest.approx(new.now + 5.0, abs=1e-3)
    # expires_at = now + max(lease, ttl), not the old record's (which was later).
    assert record.expires_at == pytest.approx(new.now + 7.0, abs=1e-3)
    assert record.created_at == pytest.approx(new.now, abs=1e-6)
    again = store.claim(key, "other-fp", 5.0, 7.0)
    assert isinstance(again, InFlight) and again.fence == new.fence


def test_a_live_record_is_left_untouched(store: MySQLStore) -> None:
    key = fresh_key()
    new = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    before = store.get(key)
    for fingerprint in ("fp", "other"):
        outcome = store.claim(key, fingerprint, 1.0, 1.0)
        assert isinstance(outcome, InFlight if fingerprint == "fp" else Mismatch)
    assert store.get(key) == before
    store.complete(key, new.fence, b"r", "json", 60.0)
    completed = store.get(key)
    assert isinstance(store.claim(key, "fp", 1.0, 1.0), Replay)
    assert isinstance(store.claim(key, "other", 1.0, 1.0), Mismatch)
    assert store.get(key) == completed


def test_release_keeps_a_tombstone_so_fences_grow_by_one(store: MySQLStore) -> None:
    key = fresh_key()
    first = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(first, New)
    store.release(key, first.fence)
    assert store.get(key) is None
    assert key.scope not in {r.scope for r in store.list()}
    rows = sql(f"SELECT status, result FROM {store.table}")
    assert rows == [("released", None)]
    fences = [first.fence]
    for _ in range(20):
        new = store.claim(key, "fp", 30.0, 60.0)
        assert isinstance(new, New)
        fences.append(new.fence)
        store.release(key, new.fence)
    assert all(b > a for a, b in itertools.pairwise(fences))
    store.release(key, fences[-1])  # released already: a repeat finds its own tombstone
    with pytest.raises(LeaseLost):
        store.release(key, fences[-2])  # an older holder's release
    assert store.delete(key) is False  # a tombstone is not a live record
    assert store.purge_expired() == 0


def test_a_claim_that_waited_for_a_release_takes_the_tombstone(store: MySQLStore) -> None:
    # NOW() is fixed when a statement starts. A claim that starts, then waits for the row lock
    # of a release, sees a tombstone whose expires_at (the release's NOW) is after its own NOW:
    # a tombstone must be claimable whatever the clock says, or this claim would be InFlight.
    key = fresh_key()
    first = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(first, New)
    holder = admin()
    try:
        with holder.cursor() as cur:
            cur.execute("START TRANSACTION")
            cur.execute(
                f"SELECT 1 FROM {store.table} WHERE scope = %s AND digest = %s FOR UPDATE",
                (key.scope, key.digest),
            )
            waiting: list[Any] = []
            claimer = threading.Thread(
                target=lambda: waiting.append(store.claim(key, "fp", 30.0, 60.0))
            )
            claimer.start()
            time.sleep(0.2)  # the claim's statement has started and waits for the lock
            cur.execute(store._sql.release, _fence(key, first.fence))  # the real release
            assert cur.rowcount == 1
            cur.execute("COMMIT")
        claimer.join(10)
        assert len(waiting) == 1 and isinstance(waiting[0], New), waiting
        assert waiting[0].fence > first.fence
    finally:
        holder.close()


def test_fence_of_a_new_row_is_the_server_clock_in_microseconds(store: MySQLStore) -> None:
    key = fresh_key()
    new = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    assert new.fence == round(new.now * 1_000_000)
    assert store.delete(key) is True
    after = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(after, New) and after.fence > new.fence


def test_renew_returns_the_lease_the_server_stored(store: MySQLStore) -> None:
    key = fresh_key()
    new = store.claim(key, "fp", 5.0, 10.0)  # still held when renew comes, even after a stall
    assert isinstance(new, New)
    lease_until = store.renew(key, new.fence, 30.0)
    record = store.get(key)
    assert record is not None
    assert record.lease_until == lease_until
    assert record.expires_at == lease_until  # raised to cover the new lease
    assert lease_until == pytest.approx(store.now() + 30.0, abs=1.0)
    store.complete(key, new.fence, b"x", "json", 60.0)
    with pytest.raises(LeaseLost):
        store.renew(key, new.fence, 30.0)
    with pytest.raises(LeaseLost):
        store.renew(fresh_key(), new.fence, 30.0)


def test_binary_results_round_trip(store: MySQLStore) -> None:
    payloads = [b"", bytes(range(256)), b"'\"\\\x00%s%(x)s", os.urandom(1 << 20)]
    for payload in payloads:
        key = fresh_key()
        new = store.claim(key, "fp", 30.0, 60.0)
        assert isinstance(new, New)
        store.complete(key, new.fence, payload, "raw", 60.0)
        replay = store.claim(key, "fp", 30.0, 60.0)
        assert isinstance(replay, Replay)
        assert replay.record.result == payload


def test_scopes_compare_byte_for_byte(store: MySQLStore) -> None:
    # A case-insensitive or PAD SPACE collation would make these one scope.
    scopes = ["tenant", "Tenant", "tenant ", "ténant", "租户"]
    for scope in scopes:
        assert isinstance(store.claim(RecordKey.of(scope, "k"), "fp", 30.0, 60.0), New)
    assert sorted(r.scope for r in store.list()) == sorted(scopes)
    for scope in scopes:
        assert [r.scope for r in store.list(scope=scope)] == [scope]
    # A NUL is refused before the store, as on every store (oncely.core.text).
    with pytest.raises(InvalidKey, match="NUL"):
        RecordKey.of("tenant\x00", "k")


def test_an_overlong_scope_is_an_error_not_a_truncation(store: MySQLStore) -> None:
    """A scope longer than the column is refused, never cut: by RecordKey itself now (every
    store keeps at most MAX_SCOPE_BYTES), and the longest allowed one is kept whole here."""
    with pytest.raises(InvalidKey, match="1020"):
        RecordKey.of("s" * 2000, "k")
    longest = RecordKey.of("s" * MAX_SCOPE_BYTES, "k")
    assert isinstance(store.claim(longest, "fp", 30.0, 60.0), New)
    assert [r.scope for r in store.list()] == ["s" * MAX_SCOPE_BYTES]


def test_delete_purge_and_list_see_only_live_records(store: MySQLStore) -> None:
    live, short, released = fresh_key(), fresh_key(), fresh_key()
    kept = store.claim(live, "fp", 30.0, 60.0)
    gone = store.claim(short, "fp", 0.1, 0.1)
    dropped = store.claim(released, "fp", 30.0, 60.0)
    assert isinstance(kept, New) and isinstance(gone, New) and isinstance(dropped, New)
    store.release(released, dropped.fence)
    wait_for_store_time(store, gone.lease_until + 0.05)
    assert [r.digest for r in store.list()] == [live.digest]
    assert store.delete(short) is False  # expired
    assert store.purge_expired(limit=0) == 0
    assert store.purge_expired(limit=1) == 1  # the tombstone
    assert store.purge_expired() == 0
    assert store.delete(live) is True
    assert store.delete(live) is False
    assert sql(f"SELECT COUNT(*) FROM {store.table}") == [(0,)]


def test_64_threads_one_key_exactly_one_new_through_a_small_pool(server: str, table: str) -> None:
    for mode in MODES:
        if mode == "returning" and not _supports_returning(server):
            continue
        s = open_mode(mode, server, table, max_size=4)
        try:
            key = fresh_key()
            outcomes = race(64, lambda s=s, key=key: s.claim(key, "fp", 30.0, 60.0))
            kinds = [type(o).__name__ for o in outcomes]
            assert kinds.count("New") == 1 and kinds.count("InFlight") == 63, (mode, kinds)
        finally:
            s.close()


def test_many_threads_race_for_released_and_expired_keys(store: MySQLStore) -> None:
    # Each round the key is released (a tombstone) or left to expire, then 16 threads race:
    # exactly one takes it over, with a fence above every earlier one.
    key = fresh_key()
    fences: list[int] = []
    race(16, store.now)  # open the connections first: the race is for the row, not the pool
    for round_ in range(6):
        # A lease (and ttl) that outlasts the race on a loaded machine: with 1 s, a stalled race
        # saw the winner's lease run out and a second New, which is right, not a double grant.
        outcomes = race(16, lambda: store.claim(key, "fp", 10.0, 20.0))
        winners = [o for o in outcomes if isinstance(o, New)]
        assert len(winners) == 1, outcomes
        assert not fences or winners[0].fence > fences[-1]
        fences.append(winners[0].fence)
        if round_ % 2:
            store.release(key, winners[0].fence)
        else:
            # Let it expire now: shorten the lease, then wait for the store's clock to pass it.
            wait_for_store_time(store, store.renew(key, winners[0].fence, 0.05))


# -- connections ---------------------------------------------------------------------------------


def test_failed_multi_statement_never_leaves_an_open_transaction(server: str, table: str) -> None:
    # renew runs START TRANSACTION; UPDATE; SELECT; COMMIT. If the UPDATE fails, the session sits
    # inside the transaction: reusing that connection would make later writes uncommitted.
    s = open_mode("transaction", server, table, max_size=1)
    try:
        s.create_schema = False
        with pytest.raises(SchemaMissing):
            s.renew(fresh_key(), 1, 30.0)
        s.init_schema()
        key = fresh_key()
        new = s.claim(key, "fp", 30.0, 60.0)
        assert isinstance(new, New)
        # Seen from another session: it was committed.
        assert sql(f"SELECT fence FROM {table}") == [(new.fence,)]
    finally:
        s.close()


def test_a_connection_the_server_closed_is_replaced(store: MySQLStore) -> None:
    store.now()
    pool = store._sync_pool()
    (conn, _) = pool._idle.queue[-1]  # the store's one idle connection
    sql(f"KILL {conn.thread_id()}")
    time.sleep(0.1)
    assert isinstance(store.claim(fresh_key(), "fp", 30.0, 60.0), New)


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_pool_exhaustion_is_store_unavailable(server: str, table: str) -> None:
    s = open_mode("transaction", server, table, max_size=1, timeout=0.3)
    key = fresh_key()
    s.claim(fresh_key(), "fp", 30.0, 60.0)  # creates the table
    holder = admin()
    blocked = threading.Thread(target=lambda: s.claim(key, "fp", 30.0, 60.0))
    try:
        with holder.cursor() as cur:
            hold_row_lock(cur, table, key)  # the store's only connection will wait for it
            blocked.start()
            time.sleep(0.2)
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="busy"):
                s.now()
            assert time.monotonic() - t0 < 1.5
            cur.execute("ROLLBACK")
        blocked.join(10)
        assert not blocked.is_alive()
        record = s.get(key)  # the blocked claim went through once the lock was gone
        assert record is not None and record.status == "in_progress"
    finally:
        holder.close()
        s.close()


def test_close_keeps_the_store_usable(store: MySQLStore) -> None:
    key = fresh_key()
    assert isinstance(store.claim(key, "fp", 30.0, 60.0), New)
    store.close()
    assert isinstance(store.claim(key, "fp", 30.0, 60.0), InFlight)


# -- async face ----------------------------------------------------------------------------------


async def test_async_face_matches_the_sync_face(store: MySQLStore) -> None:
    key = fresh_key()
    new = await store.aclaim(key, "fp", 5.0, 60.0)
    assert isinstance(new, New)
    assert isinstance(store.claim(key, "fp", 30.0, 60.0), InFlight)  # same table, sync face
    lease_until = await store.arenew(key, new.fence, 30.0)
    assert (await store.aget(key)).lease_until == lease_until  # type: ignore[union-attr]
    await store.acomplete(key, new.fence, b"\x00async\xff", "raw", 60.0)
    replay = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(replay, Replay) and replay.record.result == b"\x00async\xff"
    assert [r.digest for r in await store.alist(scope=key.scope)] == [key.digest]
    assert abs(await store.anow() - store.now()) < 1.0
    assert await store.adelete(key) is True
    assert await store.apurge_expired() == 0
    with pytest.raises(LeaseLost):
        await store.arelease(key, new.fence)
    await store.aclose()


async def test_64_tasks_through_a_small_async_pool(server: str, table: str) -> None:
    s = open_mode("transaction", server, table, max_size=3)
    try:
        key = fresh_key()
        outcomes = await asyncio.gather(*(s.aclaim(key, "fp", 30.0, 60.0) for _ in range(64)))
        kinds = [type(o).__name__ for o in outcomes]
        assert kinds.count("New") == 1 and kinds.count("InFlight") == 63
    finally:
        await s.aclose()
        s.close()


async def test_awatch_polls_without_blocking_the_loop(store: MySQLStore) -> None:
    key = fresh_key()
    new = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.ensure_future(ticker())
    try:
        assert await store.awatch(key, new.fence, 0.3) is False
        waiter = asyncio.ensure_future(store.awatch(key, new.fence, 10.0))
        await asyncio.sleep(0.05)
        await store.arelease(key, new.fence)
        assert await asyncio.wait_for(waiter, 5.0) is True
    finally:
        task.cancel()
    assert ticks > 30
    await store.aclose()


async def test_cancelled_claim_does_not_poison_the_pool(server: str, table: str) -> None:
    s = open_mode("transaction", server, table, max_size=1)
    key = fresh_key()
    await s.aclaim(fresh_key(), "fp", 30.0, 60.0)  # creates the table
    holder = admin()
    try:
        with holder.cursor() as cur:
            hold_row_lock(cur, table, key)
            task = asyncio.ensure_future(s.aclaim(key, "fp", 30.0, 60.0))
            await asyncio.sleep(0.2)  # the claim is now waiting for the row lock
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            cur.execute("ROLLBACK")
        # The connection that was mid-statement was closed; the one slot is free again. (Whether
        # the server finished the cancelled claim is unknowable, as with any cancelled write.)
        outcome = await asyncio.wait_for(s.aclaim(key, "fp", 30.0, 60.0), 5.0)
        assert isinstance(outcome, (New, InFlight))
        assert isinstance(await asyncio.wait_for(s.aclaim(fresh_key(), "fp", 30.0, 60.0), 5.0), New)
    finally:
        holder.close()
        await s.aclose()
        s.close()


def test_each_event_loop_gets_its_own_pool(store: MySQLStore) -> None:
    key = fresh_key()

    async def claim() -> str:
        return type(await store.aclaim(key, "fp", 30.0, 60.0)).__name__

    # asyncio.run closes each loop; the pool of a finished loop is cleaned up with it.
    assert asyncio.run(claim()) == "New"
    assert asyncio.run(claim()) == "InFlight"
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(asyncio.run(claim()))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["InFlight", "InFlight"]
    assert len(store._loops) == 0


def test_a_table_from_an_older_version_gets_its_fence_keeper(table: str) -> None:
    # A table made before the fence keeper: check_schema says so, init_schema adds it, and a
    # legacy row's fence still bounds the next claim once the row is deleted.
    high = int(time.time() * 1_000_000) + 10**12  # above anything the clock gives soon
    key = fresh_key()
    sql(
        f"""CREATE TABLE {table} (
            scope VARBINARY(1020) NOT NULL,
            digest CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            status VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            fingerprint VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            fence BIGINT NOT NULL, lease_until DOUBLE NULL, expires_at DOUBLE NOT NULL,
            created_at DOUBLE NOT NULL, result LONGBLOB NULL,
            codec VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
            claim_id BIGINT NOT NULL, PRIMARY KEY (scope, digest),
            KEY expires_at_idx (expires_at)) ENGINE=InnoDB"""
    )
    sql(
        f"INSERT INTO {table} VALUES (%s, %s, 'completed', 'fp', %s, NULL, %s, %s, '1', 'json', 0)",
        key.scope,
        key.digest,
        high,
        time.time() + 3600,
        time.time(),
    )
    s = MySQLStore(URL, table=table)
    try:
        with pytest.raises(SchemaMissing, match="older oncely"):
            s.check_schema()
        with pytest.raises(SchemaMissing, match="older oncely"):
            s.claim(fresh_key(), "fp", 30.0, 60.0)
        s.init_schema()
        workers.assert_upgraded(s, key, high)
    finally:
        s.close()


# -- a result larger than max_allowed_packet ------------------------------------------------------
def _packet() -> int:
    return int(sql("SELECT @@max_allowed_packet")[0][0])


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_a_result_over_max_allowed_packet_is_ran_not_storable(server: str, table: str) -> None:
    # F16 (redteam3): the server's answer to an oversized statement (a reset: 2006) was taken
    # for an outage -> ResultNotStored and a background settle; the key expired and every retry
    # ran the body again. The store knows max_allowed_packet (read once when its pool opens)
    # and refuses such a result before sending it: the call is kept as "ran, not storable".
    store = MySQLStore(URL, table=table, create_schema=True)
    runs: list[str] = []
    size = _packet() // 2 + 1  # sent as hex: twice this, over the packet

    @idempotent(store=store, name=f"export-{table}", key=["k"], lease=2, wait_timeout=5)
    def export(k: str) -> str:
        runs.append(k)
        return "x" * size

    try:
        started = time.monotonic()
        with pytest.raises(ResultTooLarge, match="max_allowed_packet") as info:
            export("o-1")
        assert info.value.size > info.value.limit == store.max_result_bytes
        with pytest.raises(SerializationError, match=r"already ran.*max_allowed_packet"):
            export("o-1")
        assert runs == ["o-1"]
        assert time.monotonic() - started < 2  # nothing waited for a lease or a settle
    finally:
        store.close()


async def test_the_async_face_knows_max_allowed_packet_too(server: str, table: str) -> None:
    store = MySQLStore(URL, table=table, create_schema=True)
    try:
        key = fresh_key()
        outcome = await store.aclaim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        assert store.max_packet == _packet()
        with pytest.raises(ResultTooLarge):
            await store.acomplete(key, outcome.fence, b"x" * (_packet() // 2 + 1), "raw", 60)
        await store.acomplete(key, outcome.fence, b"fits", "raw", 60)  # the claim is intact
    finally:
        await store.aclose()
        store.close()


def test_the_server_refusing_an_oversized_statement_is_not_an_outage(
    server: str, table: str
) -> None:
    # Should the check be passed by (a limit not known yet, or lowered on the server since),
    # the server's refusal (1153, or the reset it answers with) of a statement that big is
    # classified as ResultTooLarge, not StoreUnavailable, and the store goes on working.
    store = MySQLStore(URL, table=table, create_schema=True)
    try:
        key = fresh_key()
        outcome = store.claim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        store.max_result_bytes = None  # skip the check: the statement reaches the server
        with pytest.raises(ResultTooLarge, match="max_allowed_packet"):
            store.complete(key, outcome.fence, b"x" * (_packet() // 2 + 1), "raw", 60)
        store.complete(key, outcome.fence, b"fits", "raw", 60)
        record = store.get(key)
        assert record is not None and record.result == b"fits"
    finally:
        store.close()


def test_a_result_at_the_stores_own_limit_is_stored(server: str, table: str) -> None:
    # redteam4 (big_result_mysql_rerun.py): the store said it took results up to (packet - 64
    # KiB) / 2 bytes, but the completing statement carried the hex result twice, so a result of
    # half that (8,000,000 characters at 16 MiB) was over the packet: the server hung up, the
    # disconnect was taken for an outage (ResultNotStored, a background settle), and a retry
    # after the lease ran the body again. The limit is now computed from the statement sent.
    store = MySQLStore(URL, table=table, create_schema=True)
    try:
        key = fresh_key()
        outcome = store.claim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        limit = store.max_result_bytes
        assert limit == (_packet() - 64 * 1024) // 2
        data = os.urandom(limit // 2) * 2
        store.complete(key, outcome.fence, data, "raw", 60)
        # The caller's own completion, repeated after a lost reply, still matches it.
        store.complete(key, outcome.fence, data, "raw", 60)
        with pytest.raises(LeaseLost):
            store.complete(key, outcome.fence, data[:-1] + b"!", "raw", 60)
        record = store.get(key)
        assert record is not None and record.result == data
    finally:
        store.close()


def test_a_big_result_under_the_limit_runs_once_and_replays(server: str, table: str) -> None:
    store = MySQLStore(URL, table=table, create_schema=True)
    runs: list[str] = []

    @idempotent(store=store, name=f"big-{table}", key=["k"], lease=2, wait_timeout=5)
    def export(k: str) -> str:
        runs.append(k)
        return "x" * 8_000_000

    try:
        assert len(export("o-1")) == 8_000_000
        assert len(export("o-1")) == 8_000_000
        assert runs == ["o-1"]
    finally:
        store.close()


async def test_the_async_face_stores_a_result_at_the_limit(server: str, table: str) -> None:
    store = MySQLStore(URL, table=table, create_schema=True)
    try:
        key = fresh_key()
        outcome = await store.aclaim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        assert store.max_result_bytes is not None
        data = b"y" * store.max_result_bytes
        await store.acomplete(key, outcome.fence, data, "raw", 60)
        record = await store.aget(key)
        assert record is not None and record.result == data
    finally:
        await store.aclose()
        store.close()


async def test_the_async_face_takes_the_servers_refusal_for_too_large(
    server: str, table: str
) -> None:
    store = MySQLStore(URL, table=table, create_schema=True)
    try:
        key = fresh_key()
        outcome = await store.aclaim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        store.max_result_bytes = None  # skip the check: the statement reaches the server
        with pytest.raises(ResultTooLarge, match="max_allowed_packet"):
            await store.acomplete(key, outcome.fence, b"x" * (_packet() // 2 + 1), "raw", 60)
        await store.acomplete(key, outcome.fence, b"fits", "raw", 60)
    finally:
        await store.aclose()
        store.close()


# -- a claim run after its caller gave up (red team rt14, F1) ------------------------------------


def test_a_claim_past_its_bound_decides_nothing(store: MySQLStore, table: str) -> None:
    """A claim carries a not-after bound in the server's clock (the end of its caller's
    read_timeout); the upsert runs after it (a paused server ran the queued statement late)
    inserts nothing and takes nothing over, and the caller, if still there, gets
    StoreUnavailable."""
    held, fresh = RecordKey("late", uuid.uuid4().hex), RecordKey("late", uuid.uuid4().hex)
    first = store.claim(held, "fp", 0.05, 60)
    assert isinstance(first, New)
    wait_for_store_time(store, first.lease_until + 0.01)  # the holder's lease ran out
    before = sql(f"SELECT fence, claim_id, status FROM {table}")
    past = store.now() - 1.0

    def late(params: dict[str, Any]) -> None:
        if "not_after" in params:
            params["not_after"] = past

    store._not_after = late  # type: ignore[method-assign]
    for key in (held, fresh):
        with pytest.raises(StoreUnavailable, match="decided nothing"):
            store.claim(key, "other", 10, 60)
    assert sql(f"SELECT fence, claim_id, status FROM {table}") == before
    del store._not_after  # the store's own bound again
    assert isinstance(store.claim(fresh, "fp", 10, 60), New)
    assert isinstance(store.claim(held, "other", 10, 60), New)  # taken over in time


def test_a_wrong_clock_estimate_refuses_and_is_corrected(store: MySQLStore) -> None:
    """An estimate one minute behind the server makes claims late: StoreUnavailable, nothing
    written; the refusal sets it right, so a retry claims."""
    store.claim(RecordKey("late", uuid.uuid4().hex), "", 10, 60)  # reads the clock first
    assert store._clock.state is not None
    offset, taken = store._clock.state
    store._clock.state = (offset - 60.0, taken)
    key = RecordKey("late", uuid.uuid4().hex)
    with pytest.raises(StoreUnavailable, match="decided nothing"):
        store.claim(key, "", 10, 60)
    assert store.get(key) is None
    assert isinstance(store.claim(key, "", 10, 60), New)

    async def main() -> None:
        assert store._clock.state is not None
        offset, taken = store._clock.state
        store._clock.state = (offset - 60.0, taken)
        other = RecordKey("late", uuid.uuid4().hex)
        with pytest.raises(StoreUnavailable, match="decided nothing"):
            await store.aclaim(other, "", 10, 60)
        assert await store.aget(other) is None
        assert isinstance(await store.aclaim(other, "", 10, 60), New)
        await store.aclose()

    asyncio.run(main())
