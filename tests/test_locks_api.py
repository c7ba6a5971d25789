"""The lock API on every backend (Redis, SQLite, PostgreSQL, Redlock over 3 redis-servers):
owner checks, fencing tokens, waiting, renewal, loss reporting, misuse and bad input.

Real servers only: Redis at ``ONCELY_TEST_REDIS``, PostgreSQL at ``ONCELY_TEST_POSTGRES``, three
throwaway ``redis-server`` processes for Redlock, SQLite files in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from typing import Any

import pytest
import redis

from oncely.core.renewal import watchdog
from oncely.errors import (
    ConfigurationError,
    InvalidLockName,
    LockError,
    LockLost,
    LockNotOwned,
    LockTimeout,
    OncelyError,
)
from oncely.locks import Lock, Redlock, fenced_get, fenced_set, fenced_table_sql, fenced_update
from oncely.locks.postgres import advisory_key

from lock_workers import KINDS, POSTGRES_URL, REDIS_URL, RedisServer, make_lock, unique_name

#: The lock tests' fixtures (redlock_nodes, spec_for, pg_fence_table) live there.
pytest_plugins = ["lock_workers"]


@pytest.fixture(params=KINDS)
def spec(request: pytest.FixtureRequest, spec_for: Any) -> dict[str, Any]:
    return dict(spec_for(request.param))


# -- the basic contract ---------------------------------------------------------------------------
def test_acquire_release_owner_checked_and_fenced(spec: dict[str, Any]) -> None:
    name = unique_name()
    a, b = make_lock(spec, name, ttl=5), make_lock(spec, name, ttl=5)
    assert not a.locked()
    t1 = a.acquire()
    assert t1 > 0 and a.token == t1 and a.held
    assert a.owned() and a.locked() and b.locked() and not b.owned()
    left = a.ttl()
    assert left is not None and 0 < left <= 5
    assert b.acquire(blocking=False) is None
    with pytest.raises(LockTimeout, match="another holder has it"):
        b.acquire(timeout=0.05)
    a.check()
    a.release()
    assert not a.locked() and not a.held
    t2 = b.acquire(blocking=False)
    assert t2 is not None and t2 > t1  # tokens strictly grow per name
    b.release()
    with pytest.raises(LockNotOwned, match="does not hold it"):
        b.release()


def test_tokens_strictly_grow(spec: dict[str, Any]) -> None:
    lock = make_lock(spec, unique_name(), ttl=5)
    tokens = []
    for _ in range(20):
        tokens.append(lock.acquire())
        lock.release()
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_extend_resets_the_ttl(spec: dict[str, Any]) -> None:
    lock = make_lock(spec, unique_name(), ttl=2)
    with lock:
        validity = lock.extend(10)
        assert 9 < validity <= 10
        left = lock.ttl()
        assert left is not None and left > 5
        assert lock.extend() <= 2  # back to the lock's own ttl


def test_expired_lock_is_taken_over_and_the_old_holder_learns(spec: dict[str, Any]) -> None:
    name = unique_name()
    old, new = make_lock(spec, name, ttl=0.3), make_lock(spec, name, ttl=5)
    t_old = old.acquire()
    # The newcomer waits for the ttl to run out on the store's clock (it is woken or re-polls).
    t_new = new.acquire(timeout=10)
    assert t_new > t_old
    assert not old.owned()
    with pytest.raises(LockLost):
        old.check()
    assert old.lost.is_set()
    with pytest.raises(LockLost, match="must not be trusted"):
        old.release()
    assert new.owned()  # the stale release deleted nothing
    with pytest.raises(LockNotOwned):
        old.extend()
    new.release()


def test_extend_after_loss_raises(spec: dict[str, Any]) -> None:
    name = unique_name()
    old, new = make_lock(spec, name, ttl=0.3), make_lock(spec, name, ttl=5)
    old.acquire()
    new.acquire(timeout=10)
    with pytest.raises(LockLost):
        old.extend()
    with pytest.raises(LockLost):
        old.release()
    new.release()


def test_waiter_wakes_on_release(spec: dict[str, Any]) -> None:
    name = unique_name()
    holder, waiter = make_lock(spec, name, ttl=30), make_lock(spec, name, ttl=30)
    holder.acquire()
    got = threading.Event()
    woke_at: list[float] = []

    def wait() -> None:
        waiter.acquire(timeout=20)
        woke_at.append(time.monotonic())
        got.set()

    thread = threading.Thread(target=wait)
    thread.start()
    released_at = time.monotonic()
    holder.release()
    assert got.wait(20)
    thread.join()
    # No ttl ran out (30 s): the waiter was woken by the release (or a short fallback poll).
    assert woke_at[0] - released_at < 1.0
    waiter.release()


def test_context_manager_and_timeout_option(spec: dict[str, Any]) -> None:
    name = unique_name()
    with make_lock(spec, name, ttl=5) as lock:
        assert lock.owned()
        other = make_lock(spec, name, ttl=5, timeout=0.05)
        with pytest.raises(LockTimeout), other:
            pass  # pragma: no cover
    assert not lock.held
    assert not make_lock(spec, name).locked()


async def test_async_face(spec: dict[str, Any]) -> None:
    name = unique_name()
    a, b = make_lock(spec, name, ttl=5), make_lock(spec, name, ttl=5)
    t1 = await a.aacquire()
    assert await a.aowned() and await b.alocked() and not await b.aowned()
    assert await b.aacquire(blocking=False) is None
    left = await a.attl()
    assert left is not None and 0 < left <= 5
    assert await a.aextend(8) > 7
    await a.acheck()
    waiter = asyncio.create_task(b.aacquire(timeout=10))
    await asyncio.sleep(0.01)
    await a.arelease()
    t2 = await waiter
    assert t2 > t1
    async with make_lock(spec, unique_name(), ttl=5) as c:
        assert await c.aowned()
    await b.arelease()
    with pytest.raises(LockNotOwned):
        await b.arelease()


async def test_async_loss_is_reported(spec: dict[str, Any]) -> None:
    name = unique_name()
    old, new = make_lock(spec, name, ttl=0.3), make_lock(spec, name, ttl=5)
    await old.aacquire()
    await new.aacquire(timeout=10)
    with pytest.raises(LockLost):
        await old.acheck()
    with pytest.raises(LockLost):
        await old.arelease()
    assert await new.aowned()
    await new.arelease()


def test_faces_do_not_mix(spec_for: Any) -> None:
    lock = make_lock(spec_for("redis"), unique_name())
    lock.acquire()

    async def release() -> None:
        await lock.arelease()

    with pytest.raises(LockError, match="sync face"):
        asyncio.run(release())
    lock.release()


# -- renewal --------------------------------------------------------------------------------------
def test_auto_renew_keeps_the_lock_past_its_ttl(spec: dict[str, Any]) -> None:
    name = unique_name()
    # ttl 2 s: a loaded machine can stall the watchdog ~1 s, which a shorter ttl would not
    # survive (the test is about renewal, not expiry).
    lock = make_lock(spec, name, ttl=2, auto_renew=True)
    other = make_lock(spec, name)
    with lock:
        # Another holder tries for 1.5 ttls and cannot get in: the watchdog renews every ttl/3.
        with pytest.raises(LockTimeout):
            other.acquire(timeout=3)
        lock.check()
        assert not lock.lost.is_set()


async def test_async_auto_renew(spec: dict[str, Any]) -> None:
    name = unique_name()
    lock = make_lock(spec, name, ttl=2, auto_renew=True)
    other = make_lock(spec, name)
    async with lock:
        with pytest.raises(LockTimeout):
            await other.aacquire(timeout=3)
        await lock.acheck()


def test_one_renewal_thread_for_all_sync_locks_and_calls(spec_for: Any) -> None:
    spec = spec_for("redis")
    lanes_before = watchdog.lanes()  # earlier tests' lanes may still run (or retire meanwhile)
    locks = [make_lock(spec, unique_name(), ttl=2, auto_renew=True) for _ in range(20)]
    for lock in locks:
        lock.acquire()
    try:
        time.sleep(0.8)  # scenario: every lock was due for renewal (ttl/3) at least once
        threads = [t for t in threading.enumerate() if t.name == "oncely-watchdog"]
        assert len(threads) == 1
        assert watchdog.pending() >= 20
        # The renewals ran on one lane thread for their store, not one thread per lock.
        assert watchdog.lanes() <= lanes_before + 1
        for lock in locks:
            lock.check()
    finally:
        for lock in locks:
            lock.release()


def test_watchdog_reports_a_lost_lock(spec_for: Any) -> None:
    """The store loses the key (an operator deletes it): the next renewal finds out and the
    holder is told by the event, the callback, check() and release()."""
    spec = spec_for("redis")
    seen: list[LockLost] = []
    name = unique_name()
    # ttl 3 s, not shorter: the loss must be found by a renewal ("no longer"), not by the ttl
    # running out on a loaded machine that stalls the watchdog for a second.
    lock = make_lock(spec, name, ttl=3, auto_renew=True, on_lost=lambda _l, e: seen.append(e))
    lock.acquire()
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(lock.backend.key(name))
    client.close()
    assert lock.lost.wait(10)  # the watchdog renews every 1 s
    assert len(seen) == 1 and "no longer" in str(seen[0])
    with pytest.raises(LockLost):
        lock.check()
    with pytest.raises(LockLost, match="lost earlier"):
        lock.release()
    # The instance can be used again afterwards.
    assert lock.acquire() > 0
    assert not lock.lost.is_set()
    lock.release()


def test_lost_lock_error_comes_after_the_event_and_callback(spec_for: Any) -> None:
    """A LockLost from release() about a loss the watchdog found is raised only once the
    watchdog has told it (on_lost ran, ``lost`` set): a holder that gets the error and then
    reads ``lock.lost`` sees it set. Before, release() raised while the watchdog thread was
    still inside on_lost, with ``lost`` unset (the paused-holder test saw lost_event False)."""
    spec = spec_for("redis")
    name = unique_name()
    entered, gate = threading.Event(), threading.Event()

    def on_lost(_lock: Any, _exc: LockLost) -> None:
        entered.set()
        gate.wait(30)  # hold the watchdog thread inside the callback

    lock = make_lock(spec, name, ttl=3, auto_renew=True, on_lost=on_lost)
    lock.acquire()
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(lock.backend.key(name))
    client.close()
    assert entered.wait(10), "the watchdog did not find the lock gone"
    seen: dict[str, Any] = {}

    def release() -> None:
        try:
            lock.release()
        except LockLost as exc:
            seen["error"] = exc
            seen["lost_set"] = lock.lost.is_set()

    releaser = threading.Thread(target=release)
    releaser.start()
    # Give the old behaviour its chance to raise early; the fixed one waits for the gate.
    releaser.join(0.5)
    gate.set()
    releaser.join(30)
    assert not releaser.is_alive()
    assert "lost earlier" in str(seen["error"])
    assert seen["lost_set"] is True, "LockLost raised before the lost event was set"


async def test_async_watchdog_reports_a_lost_lock(spec_for: Any) -> None:
    spec = spec_for("redis")
    name = unique_name()
    lost = asyncio.Event()
    lock = make_lock(spec, name, ttl=3, auto_renew=True, on_lost=lambda _l, _e: lost.set())
    await lock.aacquire()
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(lock.backend.key(name))
    client.close()
    await asyncio.wait_for(lost.wait(), 10)
    with pytest.raises(LockLost):
        await lock.arelease()


def test_failed_renewals_are_retried_while_the_lease_lasts(private_redis: RedisServer) -> None:
    """Redis stops answering for a while (SIGSTOP) but comes back before the ttl runs out: the
    renewals that failed meanwhile are retried, and the lock is kept (Redisson stops renewing
    after a failure; python-redis-lock's thread dies)."""
    lock = Lock(private_redis.url, unique_name(), ttl=3.0, auto_renew=True, socket_timeout=0.2)
    lock.acquire()
    time.sleep(0.9)  # scenario: the first renewal (at 1 s) happens during the outage
    private_redis.pause()
    time.sleep(1.0)  # scenario: the outage, shorter than what is left of the ttl
    private_redis.resume()
    time.sleep(1.5)  # scenario: past the original ttl; the retried renewal kept the lock
    assert not lock.lost.is_set()
    lock.check()
    lock.release()


# -- misuse and bad input -------------------------------------------------------------------------
def test_one_instance_is_one_holder(spec_for: Any) -> None:
    lock = make_lock(spec_for("redis"), unique_name())
    lock.acquire()
    errors: list[BaseException] = []

    def second_holder() -> None:
        try:
            lock.acquire(timeout=1)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=second_holder, name="second")
    thread.start()
    thread.join()
    assert isinstance(errors[0], LockError)
    assert "one Lock instance stands for one holder" in str(errors[0])
    assert "not reentrant" in str(errors[0])
    lock.release()


async def test_one_instance_is_one_holder_async(spec_for: Any) -> None:
    spec = spec_for("redis")
    name = unique_name()
    blocker = make_lock(spec, name)
    await blocker.aacquire()
    shared = make_lock(spec, name)
    first = asyncio.create_task(shared.aacquire(timeout=5), name="first-task")
    await asyncio.sleep(0.01)
    with pytest.raises(LockError, match="being acquired through this instance by task"):
        await shared.aacquire(timeout=5)
    await blocker.arelease()
    assert await first > 0
    await shared.arelease()


@pytest.mark.parametrize("name", ["", "x" * 256, 42, None])
def test_bad_names(name: Any) -> None:
    with pytest.raises(InvalidLockName) as info:
        Lock("sqlite:///unused.db", name)
    assert isinstance(info.value, ValueError)


# A string is a duration as in ONCELY_LOCK_TTL ("10" and "10s" are 10 seconds, see
# oncely.settings); a string without a known unit is refused.
@pytest.mark.parametrize(
    "ttl", [0, -1, float("nan"), float("inf"), "ten", "10 minutes", "0s", True, 0.0001]
)
def test_bad_ttls(ttl: Any) -> None:
    with pytest.raises(ConfigurationError, match="ttl") as info:
        Lock("sqlite:///unused.db", "name", ttl=ttl)
    assert isinstance(info.value, ValueError)


def test_name_of_255_characters_is_fine(spec_for: Any) -> None:
    lock = make_lock(spec_for("sqlite"), "n" * 255)
    lock.acquire()
    lock.release()


def test_bad_acquire_arguments(spec_for: Any) -> None:
    lock = make_lock(spec_for("sqlite"), unique_name())
    with pytest.raises(ConfigurationError, match="blocking=False"):
        lock.acquire(blocking=False, timeout=1)
    with pytest.raises(ConfigurationError, match="timeout"):
        lock.acquire(timeout=-5)
    with pytest.raises(LockNotOwned, match="acquire"):
        lock.release()
    with pytest.raises(LockNotOwned):
        lock.extend()
    with pytest.raises(LockNotOwned):
        lock.check()
    with pytest.raises(LockNotOwned):
        _ = lock.token
    assert lock.ttl() is None and not lock.owned()


@pytest.mark.parametrize(
    ("urls", "match"),
    [
        ([], "odd number"),
        (["redis://a:1", "redis://b:1"], "odd number"),
        ("redis://a:1", "list of Redis URLs"),
        (["redis://a:1", "redis://a:1", "redis://b:1"], "distinct"),
        (["nope", "redis://a:1", "redis://b:1"], "not a Redis URL"),
    ],
)
def test_bad_redlock_nodes(urls: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        Redlock(urls, "name")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("memory://", "memory:// has no lock backend"),
        ("localhost:6379", "not a URL"),
        ("sqlite:///:memory:", "needs a file"),
        ("mysql://x/y", "unknown lock URL scheme"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Lock(url, "name")


def test_bad_options() -> None:
    with pytest.raises(ConfigurationError, match="scope"):
        Lock(POSTGRES_URL, "name", scope="forever")
    with pytest.raises(ConfigurationError, match="takes no lock options"):
        Lock(Lock("sqlite:///unused.db", "x").backend, "name", scope="session")


def test_an_unreachable_store_fails_closed() -> None:
    lock = Lock("redis://127.0.0.1:1/0", unique_name())
    with pytest.raises(OncelyError, match="unavailable"):
        lock.acquire(timeout=1)
    assert not lock.held


# -- PostgreSQL specifics -------------------------------------------------------------------------
def test_advisory_key_is_stable() -> None:
    assert advisory_key("orders:42") == advisory_key("orders:42")
    assert advisory_key("orders:42") != advisory_key("orders:43")
    assert -(2**63) <= advisory_key("x") < 2**63
    # Pinned: the key must never change between releases, or two versions would not exclude.
    assert advisory_key("orders:42") == 2973003068219087351


def test_postgres_session_ends_with_the_ttl(spec_for: Any) -> None:
    """The ttl of a session lock is the server's idle limit for the session."""
    spec = spec_for("postgres")
    name = unique_name()
    holder = make_lock(spec, name, ttl=0.5)
    holder.acquire()
    setting = holder.connection.execute("SHOW idle_session_timeout").fetchone()[0]
    assert setting in ("500ms", "500")
    other = make_lock(spec, name, ttl=5)
    # Blocks on the server until the idle holder's session is ended by PostgreSQL.
    assert other.acquire(timeout=10) > 0
    with pytest.raises(LockLost):
        holder.release()
    other.release()


def test_postgres_transaction_scope(spec_for: Any) -> None:
    spec = spec_for("postgres")
    name = unique_name()
    table = f"oncely_test_xact_{unique_name('t').replace('-', '_')}"
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {table} (v int)")
        try:
            with make_lock(spec, name, scope="transaction") as lock:
                lock.connection.execute(f"INSERT INTO {table} VALUES (1)")
                assert make_lock(spec, name).locked()
            assert admin.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1
            assert not make_lock(spec, name).locked()
            with pytest.raises(ZeroDivisionError), make_lock(spec, name, scope="transaction") as lk:
                lk.connection.execute(f"INSERT INTO {table} VALUES (2)")
                1 / 0  # noqa: B018
            # The exception rolled the lock's transaction back, and the lock with it.
            assert admin.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1
            assert not make_lock(spec, name).locked()
            lock1 = make_lock(spec, name, scope="transaction")
            t1 = lock1.acquire()
            lock2 = make_lock(spec, name, scope="transaction")
            assert lock2.acquire(blocking=False) is None
            lock1.release()
        finally:
            admin.execute(f"DROP TABLE {table}")
    assert t1 > 0


async def test_postgres_async_transaction_scope(spec_for: Any) -> None:
    spec = spec_for("postgres")
    name = unique_name()
    async with make_lock(spec, name, scope="transaction") as lock:
        cur = await lock.connection.execute("SELECT 1")
        assert (await cur.fetchone())[0] == 1
        assert await make_lock(spec, name).alocked()
    assert not await make_lock(spec, name).alocked()


def test_connection_is_postgres_only(spec_for: Any) -> None:
    lock = make_lock(spec_for("sqlite"), unique_name())
    with pytest.raises(LockNotOwned):
        _ = lock.connection
    with lock, pytest.raises(LockError, match="only PostgreSQL"):
        _ = lock.connection


# -- fencing helpers ------------------------------------------------------------------------------
def test_fenced_update_sqlite(tmp_path: Any) -> None:
    conn = sqlite3.connect(tmp_path / "fenced.db")
    conn.execute(fenced_table_sql("resource"))
    with conn:
        assert fenced_update(conn, "resource", "row", 5, {"value": "a"})
    with conn:
        assert fenced_update(conn, "resource", "row", 5, {"value": "b"})  # same holder again
    with conn:
        assert fenced_update(conn, "resource", "row", 7, {"value": "c"})
    with conn:
        assert not fenced_update(conn, "resource", "row", 6, {"value": "stale"})
    assert conn.execute("SELECT value, fence FROM resource").fetchone() == ("c", 7)
    with pytest.raises(ConfigurationError, match="identifier"):
        fenced_update(conn, "resource; drop", "row", 8, {"value": "x"})
    with pytest.raises(ConfigurationError, match="token"):
        fenced_update(conn, "resource", "row", 0, {"value": "x"})
    conn.close()


def test_fenced_update_postgres() -> None:
    import psycopg

    table = f"oncely_test_fenced_{unique_name('t').replace('-', '_')}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(fenced_table_sql(table, {"value": "text", "amount": "int"}))
        try:
            assert fenced_update(conn, table, "k", 10, {"value": "a", "amount": 1})
            assert not fenced_update(conn, table, "k", 9, {"value": "stale", "amount": 2})
            assert fenced_update(conn, table, "k", 11, {"value": "b", "amount": 3})
            row = conn.execute(f"SELECT value, amount, fence FROM {table}").fetchone()
            assert row == ("b", 3, 11)
        finally:
            conn.execute(f"DROP TABLE {table}")


def test_fenced_set_redis() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    key = f"oncely-test-fenced-{unique_name()}"
    try:
        assert fenced_set(client, key, "a", 100)
        assert not fenced_set(client, key, "stale", 99)
        assert fenced_set(client, key, "b", 100)
        assert fenced_get(client, key) == (b"b", 100)
        assert fenced_set(client, key, "c", 101, px=60)
        assert 0 < client.pttl(key) <= 60_000
    finally:
        client.delete(key)
        client.close()


@pytest.mark.parametrize("url", ["sqlite:///unused.db", REDIS_URL, POSTGRES_URL])
@pytest.mark.parametrize("name", ["orders\x0042", "orders\ud800"])
def test_names_no_store_keeps_as_text_are_refused(url: str, name: str) -> None:
    # The one rule for ids kept as text (oncely.core.text), checked before any I/O.
    with pytest.raises(InvalidLockName, match=r"NUL|surrogate"):
        Lock(url, name)


def test_sqlite_lock_file_locked_past_busy_timeout_is_database_busy(tmp_path: Any) -> None:
    """The lock file held by another writer past busy_timeout (no deadline): DatabaseBusy, the
    concurrent writer's refusal every SQL mechanism raises as one type (red team 17); still a
    StoreUnavailable."""
    import sqlite3

    from oncely.errors import DatabaseBusy
    from oncely.sql.connections import retryable

    path = tmp_path / "locks.db"
    lock = Lock(f"sqlite:///{path}?busy_timeout=0.2", "rt17")
    assert lock.acquire(blocking=False)
    lock.release()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseBusy) as caught:
            lock.acquire(blocking=False)
        assert retryable(caught.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert lock.acquire(blocking=False)
    lock.release()
