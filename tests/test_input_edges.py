"""Input edges found by the rt11 red team: counts sent to a store, lone surrogates in values,
silently accepted input (an empty --table, a repeated URL option, non-ASCII digits), and a
bounded SQLite lock acquire that waited for the file past its timeout."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from oncely.cli import app
from oncely.errors import ConfigurationError, InvalidBarrierCall, LockTimeout
from oncely.locks import Lock
from oncely.messaging.dedup import Deduplicator
from oncely.messaging.inbox import Inbox
from oncely.messaging.outbox import Outbox, Relay
from oncely.optimistic.redis import RedisVersioned
from oncely.settings import MAX_COUNT, count, resolve, whole
from oncely.sql import Operation
from oncely.sql.insert import insert_once
from oncely.sql.versioned import versioned_update
from oncely.statemachine.barrier import purge as barrier_purge
from oncely.statemachine.barrier import redis_barrier
from oncely.stores import Store, open_store
from sqlite_holder import OtherWriter

from conftest import MYSQL_URL, POSTGRES_URL, REDIS_URL

runner = CliRunner()
SURROGATE = "\ud800"
HUGE = 99999999999999999999  # more than a 64-bit integer


def one_line_error(result: Any, *says: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    text = " ".join(result.output.split())
    assert text.startswith("error: ") and "Traceback" not in result.output, result.output
    for word in says:
        assert word in text, text


# -- 1. counts sent to a store ---------------------------------------------------------------------
BAD_LIMITS = [HUGE, 2**63, MAX_COUNT + 1, 1.5, None, True, 0, -1, "10"]


def test_count_is_an_int_from_one_to_max_count() -> None:
    assert count(1, "limit") == 1 and count(MAX_COUNT, "limit") == MAX_COUNT
    assert count(0, "limit", minimum=0) == 0
    for bad in BAD_LIMITS[:-1]:
        with pytest.raises(ConfigurationError, match="limit="):
            count(bad, "limit")


def test_purge_expired_and_list_refuse_a_bad_limit_on_every_store(store: Store) -> None:
    """purge_expired(2**70) leaked OverflowError (SQLite) or a syntax error (MariaDB),
    purge_expired(1.5) / (None) a raw IntegrityError, and (-1) returned 0. A limit of 0 purges
    and lists nothing (the stores' own tests rely on it)."""
    for bad in BAD_LIMITS:
        if bad in ("10", 0):
            continue  # text is read as a number, as in the environment; 0 is a valid limit
        with pytest.raises(ConfigurationError, match=r"purge_expired: limit="):
            store.purge_expired(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"purge_expired: limit="):
            asyncio.run(store.apurge_expired(bad))  # type: ignore[arg-type]
    for bad in (HUGE, -1, 1.5, None):
        with pytest.raises(ConfigurationError, match=r"list: limit="):
            store.list(limit=bad)  # type: ignore[arg-type]
    assert store.purge_expired(MAX_COUNT) == 0
    assert store.purge_expired(0) == 0
    assert store.list(limit=0) == []


@pytest.mark.parametrize("kind", ["sqlite", "mysql"])
def test_cli_purge_and_keys_ls_with_a_huge_count_is_one_error_line(
    kind: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/c.db" if kind == "sqlite" else MYSQL_URL
    assert runner.invoke(app, ["init", url]).exit_code == 0
    one_line_error(runner.invoke(app, ["purge", url, "--batch", str(HUGE)]), "--batch=")
    one_line_error(runner.invoke(app, ["purge", url, "--limit", str(HUGE)]), "--limit=")
    one_line_error(runner.invoke(app, ["keys", "ls", url, "--limit", str(HUGE)]), "--limit=")
    listed = runner.invoke(app, ["keys", "ls", url, "--limit", str(MAX_COUNT)])
    assert listed.exit_code == 0, listed.output


def test_cli_table_purges_with_a_huge_batch_are_one_error_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    conn = sqlite3.connect(f"{tmp_path}/b.db")
    Inbox().create_table(conn)
    Outbox().create_table(conn)
    conn.commit()
    conn.close()
    assert runner.invoke(app, ["barrier", "init", url]).exit_code == 0
    for command in (["inbox", "purge"], ["outbox", "purge"], ["barrier", "purge"]):
        result = runner.invoke(app, [*command, url, "--batch", str(HUGE)])
        one_line_error(result, "batch=")


def test_batches_and_limits_of_mechanisms_are_bounded(tmp_path: Path) -> None:
    """Every other count that reaches SQL or a Lua script: inbox/outbox purge batches, the
    relay's batch, the barrier's purge batch, the deduplicator's purge limit, the completer's
    limit (int(limit) also took 1.5 and True)."""
    conn = sqlite3.connect(f"{tmp_path}/m.db", isolation_level=None)
    Inbox().create_table(conn)
    Outbox().create_table(conn)
    for bad in (HUGE, 2**63, 1.5, None, 0):
        with pytest.raises(ConfigurationError, match="batch="):
            Inbox().purge(conn, 0, batch=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="batch="):
            Outbox().purge(conn, 0, batch=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="batch="):
            Relay(Outbox(), conn, publish=print, batch=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidBarrierCall, match="batch="):
            barrier_purge(conn, 0, batch=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="limit="):
            Operation("edges_op").complete_abandoned(conn, limit=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="limit="):
            Deduplicator("memory://", window=60, namespace="edges").purge(bad)  # type: ignore[arg-type]
    conn.close()


# -- 2. lone surrogates in values ---------------------------------------------------------------
def test_redis_versioned_refuses_a_lone_surrogate_with_a_typed_error() -> None:
    versioned = RedisVersioned(REDIS_URL)
    key = f"oncely-test-edges:{uuid.uuid4().hex}"
    try:
        version = versioned.set(key, {"a": "1"}, 0)
        for fields in ({"a": SURROGATE}, {SURROGATE: "1"}, {"a": "x" + SURROGATE}):
            with pytest.raises(ConfigurationError, match="lone surrogate"):
                versioned.set(key, fields, version)
        with pytest.raises(ConfigurationError, match="lone surrogate"):
            versioned.set(SURROGATE, {"a": "1"}, 0)
        with pytest.raises(ConfigurationError, match="lone surrogate"):
            versioned.get(SURROGATE)
        assert versioned.get(key) == ({"a": b"1"}, version)  # nothing was written
    finally:
        redis.Redis.from_url(REDIS_URL).delete(key)
        versioned.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "mysql"])
def test_sql_values_with_a_lone_surrogate_are_a_typed_error(kind: str) -> None:
    """insert_once and versioned_update let the driver's UnicodeEncodeError out."""
    table = f"edges_{uuid.uuid4().hex[:10]}"
    if kind == "sqlite":
        conn: Any = sqlite3.connect(":memory:")
    elif kind == "postgres":
        import psycopg

        conn = psycopg.connect("host=127.0.0.1 user=postgres dbname=test")
    else:
        import pymysql

        conn = pymysql.connect(host="127.0.0.1", user="root", database="test")
    try:
        cur = conn.cursor()
        temporary = "" if kind == "sqlite" else "TEMPORARY "
        cur.execute(
            f"CREATE {temporary}TABLE {table} (id INT PRIMARY KEY, name VARCHAR(50), version INT)"
        )
        cur.execute(f"INSERT INTO {table} VALUES (1, 'x', 1)")
        with pytest.raises(ConfigurationError, match="column 'name' contains a lone surrogate"):
            insert_once(conn, table, {"id": 2, "name": SURROGATE}, unique=["id"])
        with pytest.raises(ConfigurationError, match="column 'name' contains a lone surrogate"):
            versioned_update(conn, table, 1, {"name": SURROGATE}, 1)
        with pytest.raises(ConfigurationError, match="id contains a lone surrogate"):
            versioned_update(conn, table, SURROGATE, {"name": "y"}, 1)
        assert versioned_update(conn, table, 1, {"name": "é"}, 1) == 2  # still usable
    finally:
        conn.rollback()
        conn.close()


def test_redis_barrier_effects_with_a_lone_surrogate_are_refused() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"oncely-test-edges-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(InvalidBarrierCall, match="lone surrogate"):
            effects = [("SET", f"{prefix}:k", SURROGATE)]
            redis_barrier(client, "g1", "b1", "try", effects=effects, prefix=prefix)
        assert client.exists(f"{prefix}:k") == 0
    finally:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()


# -- 3. silently accepted input -----------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/d.db?busy_timeout=1&busy_timeout=2",
        REDIS_URL + "?socket_timeout=1&socket_timeout=2",
        "redis+cluster://127.0.0.1:7000?wait_replicas=1&wait_replicas=1",
        POSTGRES_URL + "?connect_timeout=1&connect_timeout=2",
        MYSQL_URL + "?unix_socket=a&unix_socket=b",
    ],
)
def test_a_repeated_url_option_is_refused_by_name(url: str, tmp_path: Path) -> None:
    url = url.format(tmp=tmp_path)
    with pytest.raises(ConfigurationError, match=r"option '\w+' is given 2 times"):
        open_store(url)


def test_a_repeated_url_option_is_refused_by_the_sqlite_lock(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'busy_timeout' is given 2 times"):
        Lock(f"sqlite:///{tmp_path}/l.db?busy_timeout=1&busy_timeout=1", "x")


@pytest.mark.parametrize("command", [["init"], ["keys", "ls"], ["purge"]])
def test_an_empty_table_option_is_refused_not_taken_for_the_default(
    command: list[str], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    if command != ["init"]:
        assert runner.invoke(app, ["init", url]).exit_code == 0
    one_line_error(runner.invoke(app, [*command, url, "--table", ""]), "table=''")
    if command == ["init"]:
        assert not (tmp_path / "t.db").exists() or "oncely_records" not in _tables(tmp_path)


def test_an_empty_table_is_refused_by_inbox_and_outbox_purge(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/io.db"
    sqlite3.connect(f"{tmp_path}/io.db").close()
    for kind in ("inbox", "outbox"):
        one_line_error(runner.invoke(app, [kind, "purge", url, "--table", ""]), "table=''")


def _tables(tmp_path: Path) -> set[str]:
    conn = sqlite3.connect(f"{tmp_path}/t.db")
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()


@pytest.mark.parametrize("text", ["\u0663\u0660", "\uff13\uff10", "1_000", "3_0s", "\u0663\u0660s"])
def test_durations_and_counts_take_ascii_decimal_only(text: str, tmp_path: Path) -> None:
    """int() and float() read other scripts' digits and '_' separators."""
    with pytest.raises(ConfigurationError, match="ONCELY_LOCK_TTL"):
        resolve("lock_ttl", environ={"ONCELY_LOCK_TTL": text})
    with pytest.raises(ConfigurationError, match="ONCELY_TTL"):
        resolve("ttl", environ={"ONCELY_TTL": text})
    with pytest.raises(ConfigurationError, match="pool="):
        whole(text, "pool")
    with pytest.raises(ConfigurationError, match="busy_timeout="):
        open_store(f"sqlite:///{tmp_path}/n.db?busy_timeout={text}")
    with pytest.raises(ConfigurationError, match="connect_timeout="):
        open_store(f"{POSTGRES_URL}?connect_timeout={text}")


def test_ascii_numbers_still_read() -> None:
    assert resolve("lock_ttl", environ={"ONCELY_LOCK_TTL": " 30 "}) == 30
    assert resolve("lock_ttl", environ={"ONCELY_LOCK_TTL": "1e3"}) == 1000
    assert resolve("lock_ttl", environ={"ONCELY_LOCK_TTL": "5m\n"}) == 300
    assert whole(" 8 ", "pool") == 8


# -- 4. a bounded SQLite lock acquire waits for the file no longer than its timeout --------------
def _hold_write_lock(path: str) -> sqlite3.Connection:
    """Another writer holding SQLite's write lock on ``path`` (as a stopped process would)."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=5)
    holder.execute("BEGIN IMMEDIATE")
    return holder


@pytest.mark.serial
def test_sqlite_lock_acquire_with_a_timeout_is_a_lock_timeout_while_the_file_is_locked(
    tmp_path: Path,
) -> None:
    """The acquire statement waited busy_timeout (5 s) for the file, then raised
    StoreUnavailable, though acquire(timeout=0.5) was asked for."""
    path = f"{tmp_path}/locks.db"
    url = f"sqlite:///{path}?busy_timeout=5"
    lock = Lock(url, f"edges-{os.getpid()}", ttl=5)
    lock.acquire()
    lock.release()  # the table exists
    holder = _hold_write_lock(path)
    try:
        for attempt in range(2):
            start = time.monotonic()
            with pytest.raises(LockTimeout):
                if attempt == 0:
                    lock.acquire(timeout=0.5)
                else:
                    asyncio.run(lock.aacquire(timeout=0.5))
            assert time.monotonic() - start < 1.5
    finally:
        holder.rollback()
        holder.close()
    assert lock.acquire(timeout=1) > 0  # the connection's own busy timeout is back
    lock.release()


@pytest.mark.serial
@pytest.mark.parametrize("face", ["sync", "async"])
def test_sqlite_lock_acquire_with_a_timeout_ends_at_it_while_another_process_locks_the_file(
    tmp_path: Path, face: str
) -> None:
    """Another process holds the file's write lock. acquire(timeout=T) ends at T with
    LockTimeout, whether T is shorter than busy_timeout (T=0.5, busy_timeout=5) or longer
    (T=1.5, busy_timeout=0.5: the attempt waited busy_timeout and raised StoreUnavailable
    after 0.5 s, though the caller had asked to wait 1.5 s for the lock). Meanwhile a release
    of this process waits for the file (busy_timeout 5 s, holding the writer gate); once the
    other process lets go it commits, and every lock works."""
    path = f"{tmp_path}/locks.db"
    patient = Lock(f"sqlite:///{path}?busy_timeout=5", f"held-{os.getpid()}", ttl=30)
    short = Lock(f"sqlite:///{path}?busy_timeout=5", f"short-{os.getpid()}", ttl=5)
    hasty = Lock(f"sqlite:///{path}?busy_timeout=0.5", f"hasty-{os.getpid()}", ttl=5)
    patient.acquire()  # the table exists; released below while the file is locked
    released: list[Any] = []
    with OtherWriter(path) as other:
        releaser = threading.Thread(target=lambda: released.append(patient.release()))
        releaser.start()
        for lock, timeout in ((short, 0.5), (hasty, 1.5)):
            start = time.monotonic()
            with pytest.raises(LockTimeout, match="database file stayed locked"):
                if face == "sync":
                    lock.acquire(timeout=timeout)
                else:
                    asyncio.run(lock.aacquire(timeout=timeout))
            took = time.monotonic() - start
            assert timeout - 0.1 <= took < timeout + 0.5, (timeout, took)
        assert not released  # still waiting for the file
        other.release()
        releaser.join(30)
    assert released == [None]  # the queued release committed once the file was free
    for lock in (patient, short, hasty):  # patient's release freed it
        assert lock.acquire(timeout=1) > 0
        lock.release()


def _bounded_acquire(lock: Lock, timeout: float, face: str) -> None:
    """acquire(timeout=...) through ``face``: sync, async, or ``with`` (the Lock's own timeout,
    ``lock.timeout``; ``timeout`` is then unused)."""
    if face == "sync":
        lock.acquire(timeout=timeout)
    elif face == "async":
        asyncio.run(lock.aacquire(timeout=timeout))
    else:
        with lock:
            pass


@pytest.mark.serial
@pytest.mark.parametrize("journal", ["rollback", "wal"])
@pytest.mark.parametrize("face", ["sync", "async", "with"])
def test_sqlite_lock_acquire_with_a_timeout_on_a_file_without_the_lock_table_ends_at_it(
    tmp_path: Path, face: str, journal: str
) -> None:
    """The file exists (another application's table in it, in rollback-journal or WAL mode) but
    this process never used locks on it: no lock table yet. Another process holds the file's
    write lock. acquire(timeout=T), aacquire(timeout=T) and ``with Lock(..., timeout=T)`` end
    at T with LockTimeout, whether T is shorter than busy_timeout (T=1, busy_timeout=4) or
    longer (T=1.5, busy_timeout=0.5). The first use of the file -- switching it to WAL,
    creating the lock table -- waited busy_timeout instead, then raised StoreUnavailable
    (4.04 s for T=1.5, busy_timeout=4: red team 15). Once the other process lets go, the same
    locks work (the table is created then)."""
    path = f"{tmp_path}/cold.db"
    other_app = sqlite3.connect(path, isolation_level=None)
    if journal == "wal":
        other_app.execute("PRAGMA journal_mode=WAL")
    other_app.execute("CREATE TABLE their_rows (x)")
    other_app.close()
    locks = [
        (Lock(f"sqlite:///{path}?busy_timeout={busy}", f"cold-{busy}", ttl=5, timeout=t), t)
        for t, busy in ((1.0, 4), (1.5, 0.5))
    ]
    with OtherWriter(path) as other:
        for lock, timeout in locks:
            start = time.monotonic()
            with pytest.raises(LockTimeout, match="database file stayed locked"):
                _bounded_acquire(lock, timeout, face)
            took = time.monotonic() - start
            assert timeout - 0.5 <= took < timeout + 0.5, (timeout, took)
        other.release()
    for lock, _ in locks:
        assert lock.acquire(timeout=2) > 0
        lock.release()


@pytest.mark.serial
@pytest.mark.parametrize("face", ["sync", "async"])
def test_sqlite_lock_acquire_behind_this_process_s_own_writes_says_so(
    tmp_path: Path, face: str
) -> None:
    """A thread of this process holds the file's writer gate (its own long write; no other
    process on the file). acquire(timeout=0.5) ends at 0.5 s with LockTimeout saying this
    process's writes kept the gate; it said the file stayed locked by another connection or
    process."""
    from oncely.backends.sqlite import writer_gate

    path = f"{tmp_path}/own.db"
    lock = Lock(f"sqlite:///{path}", f"own-{os.getpid()}", ttl=5)
    lock.acquire()
    lock.release()
    gate = writer_gate(os.path.abspath(path))
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        assert gate.acquire(5)
        taken.set()
        done.wait(30)
        gate.release()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(10)
        start = time.monotonic()
        with pytest.raises(LockTimeout, match="writer gate") as info:
            _bounded_acquire(lock, 0.5, face)
        took = time.monotonic() - start
    finally:
        done.set()
        holder.join(30)
    assert 0.4 <= took < 1.0, took
    assert "another connection or process (its write lock" not in str(info.value)
    assert lock.acquire(timeout=1) > 0
    lock.release()


@pytest.mark.serial
def test_sqlite_lock_acquire_gets_the_lock_once_the_file_is_free_within_the_timeout(
    tmp_path: Path,
) -> None:
    path = f"{tmp_path}/locks.db"
    lock = Lock(f"sqlite:///{path}", f"edges-{os.getpid()}", ttl=5)
    lock.acquire()
    lock.release()
    holder = _hold_write_lock(path)
    start = time.monotonic()

    async def free_soon() -> int:
        asyncio.get_running_loop().call_later(0.2, holder.rollback)
        token = await lock.aacquire(timeout=3)
        await lock.arelease()
        return token

    try:
        assert asyncio.run(free_soon()) > 0
    finally:
        holder.close()
    assert time.monotonic() - start < 2.5
