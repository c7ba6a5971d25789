"""Recovery points on real SQLite, PostgreSQL and MariaDB: the docs' worked example (create
ride, charge card, send receipt) killed with SIGKILL at every phase boundary and inside every
phase, then resumed by a retry or by the completer: every phase's effect exactly once."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from typing import Any

import pytest

from oncely.errors import ConfigurationError, IdempotencyKeyMismatch, InFlightError, LeaseLost
from oncely.sql import Operation, create_tables, reap

from sql_fixtures import Db
from sql_workers import ride_operation, ride_worker

pytest_plugins = ["sql_fixtures"]

PHASES = ["ride_created", "charge_created", "receipt_sent"]
PARAMS = {"from": "A", "amount": 12}


def _tables(db: Db) -> dict[str, str]:
    t = {n: db.name(n) for n in ("keys", "rides", "charges", "calls", "receipts")}
    conn = db.connect()
    create_tables(conn, table=t["keys"])
    conn.close()
    auto = "INTEGER PRIMARY KEY" if db.dialect == "sqlite" else "SERIAL PRIMARY KEY"
    if db.dialect == "mysql":
        auto = "INTEGER AUTO_INCREMENT PRIMARY KEY"
    db.run(f"CREATE TABLE {t['rides']} (k VARCHAR(64) NOT NULL, origin VARCHAR(10))")
    ext = db.external()
    ext.run(
        f"CREATE TABLE {t['charges']} (id {auto}, idem VARCHAR(64) NOT NULL UNIQUE, "
        "amount INTEGER NOT NULL)"
    )
    ext.run(f"CREATE TABLE {t['calls']} (k VARCHAR(10))")
    db.run(f"CREATE TABLE {t['receipts']} (k VARCHAR(64) NOT NULL)")
    return t


def _count(db: Db, table: str) -> int:
    if "_charges_" in table or "_calls_" in table or table.startswith(("charges_", "calls_")):
        db = db.external()
    return int(db.run(f"SELECT COUNT(*) FROM {table}")[0][0])


def _resume(op: Operation, conn: Any, key: str) -> Any:
    """Retry until the killed worker's lock times out (database clock)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return op.run(conn, key=key, scope="riders", params=PARAMS)
        except InFlightError as exc:
            assert time.monotonic() < deadline
            threading.Event().wait(min(max(exc.retry_after, 0.05), 1.0))


def test_runs_once_then_replays(db: Db) -> None:
    t = _tables(db)
    op = ride_operation(db, t)
    conn = db.connect()
    first = op.run(conn, key="ride-1", scope="riders", params=PARAMS)
    again = op.run(conn, key="ride-1", scope="riders", params=PARAMS)
    assert first == again and set(first) == {"ride", "charge"}
    assert [_count(db, t[n]) for n in ("rides", "charges", "receipts", "calls")] == [1, 1, 1, 1]
    with pytest.raises(IdempotencyKeyMismatch):
        op.run(conn, key="ride-1", scope="riders", params={"from": "B", "amount": 12})


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start", "after_write"])
def test_kill_9_in_each_phase_then_resume_exactly_once(db: Db, when: str) -> None:
    t = _tables(db)
    ctx = multiprocessing.get_context("fork")
    op = ride_operation(db, t)
    conn = db.connect()
    for n, phase in enumerate(PHASES):
        key = f"ride-{phase}-{when}"
        proc = ctx.Process(target=ride_worker, args=(db, t, key, (phase, when)))
        proc.start()
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL
        # what committed before the kill is whole: one recovery point per committed phase
        if n % 2 == 0:
            result = _resume(op, conn, key)
        else:  # the completer picks the abandoned operation up by itself
            deadline = time.monotonic() + 30
            while op.complete_abandoned(conn) == 0:
                assert time.monotonic() < deadline
                threading.Event().wait(0.2)
            result = op.run(conn, key=key, scope="riders", params=PARAMS)  # a replay now
        assert set(result) == {"ride", "charge"}
        done = n + 1
        assert _count(db, t["rides"]) == done
        assert _count(db, t["charges"]) == done
        assert _count(db, t["receipts"]) == done
    # the card processor was called again only where the kill came after its call
    calls = _count(db, t["calls"])
    assert calls == 3 + (1 if when == "after_write" else 0)


def test_phase_error_unlocks_and_the_retry_resumes_at_once(db: Db) -> None:
    t = _tables(db)
    op = ride_operation(db, t, lock_timeout=60.0)
    fail = {"on": True}
    name, original = op.phases[2]

    def flaky(ctx: Any) -> Any:
        if fail["on"]:
            raise RuntimeError("mail server down")
        return original(ctx)

    op.phases[2] = (name, flaky)
    conn = db.connect()
    with pytest.raises(RuntimeError):
        op.run(conn, key="r", scope="riders", params=PARAMS)
    assert [_count(db, t[n]) for n in ("rides", "charges", "receipts")] == [1, 1, 0]
    fail["on"] = False
    op.run(conn, key="r", scope="riders", params=PARAMS)  # no wait: the error unlocked it
    assert [_count(db, t[n]) for n in ("rides", "charges", "receipts", "calls")] == [1, 1, 1, 1]


def test_concurrent_caller_gets_in_flight_and_a_zombie_cannot_commit(db: Db) -> None:
    if db.dialect == "sqlite":
        pytest.skip("one writer per SQLite file: no takeover while a phase transaction is open")
    t = _tables(db)
    op = ride_operation(db, t, lock_timeout=1.0)
    other = db.connect()
    seen: dict[str, Any] = {}
    name, original = op.phases[0]

    def slow_first(ctx: Any) -> Any:
        if "inflight" not in seen:
            try:
                op.run(other, key="z", scope="riders", params=PARAMS)
            except InFlightError as exc:
                seen["inflight"] = exc.retry_after
            # outlive the lock (this test is about expiry), then someone else takes over
            threading.Event().wait(1.3)
            seen["other"] = op.run(other, key="z", scope="riders", params=PARAMS)
        return original(ctx)

    op.phases[0] = (name, slow_first)
    conn = db.connect()
    with pytest.raises(LeaseLost):
        op.run(conn, key="z", scope="riders", params=PARAMS)
    assert 0 < seen["inflight"] <= 1.0
    assert set(seen["other"]) == {"ride", "charge"}
    # the zombie's ride was rolled back: every effect once
    assert [_count(db, t[n]) for n in ("rides", "charges", "receipts")] == [1, 1, 1]


def test_reaper_removes_finished_records_only(db: Db) -> None:
    t = _tables(db)
    op = ride_operation(db, t)
    conn = db.connect()
    op.run(conn, key="done", scope="riders", params=PARAMS)
    _, original = op.phases[1]

    def broken(ctx: Any) -> Any:
        raise RuntimeError

    op.phases[1] = ("charge_created", broken)
    with pytest.raises(RuntimeError):
        op.run(conn, key="half", scope="riders", params=PARAMS)
    assert reap(conn, table=t["keys"]) == 0  # younger than 72 h
    assert reap(conn, table=t["keys"], retention=0.0) == 1
    assert _count(db, t["keys"]) == 1  # the unfinished one is the completer's
    op.phases[1] = ("charge_created", original)
    assert op.complete_abandoned(conn) == 1


def test_refused_inside_a_transaction_and_bad_definitions(db: Db) -> None:
    t = _tables(db)
    op = ride_operation(db, t)
    conn = db.connect()
    conn.cursor().execute(f"INSERT INTO {t['rides']} (k) VALUES ('x')")
    with pytest.raises(ConfigurationError, match="outside a transaction"):
        op.run(conn, key="k", scope="riders", params=PARAMS)
    conn.rollback()
    with pytest.raises(ConfigurationError):
        op.phase("finished")
    with pytest.raises(ConfigurationError):
        op.phase("ride_created")
    with pytest.raises(ConfigurationError, match="JSON"):
        op.run(conn, key="k", scope="riders", params={"x": object()})


async def test_async_face(db: Db) -> None:
    t = _tables(db)
    conn = await db.aconnect()
    op = Operation("async_op", table=t["keys"])

    @op.phase("one")
    async def one(ctx: Any) -> None:
        from oncely.sql import adapt

        await adapt(ctx.conn).aexecute(
            f"INSERT INTO {t['receipts']} (k) VALUES (:k)", {"k": ctx.downstream_key}
        )
        ctx.state["n"] = 1

    @op.phase("two")
    def two(ctx: Any) -> int:
        return int(ctx.state["n"]) + 1

    assert await op.arun(conn, key="a", scope="s", params=None) == 2
    assert await op.arun(conn, key="a", scope="s", params=None) == 2
    assert _count(db, t["receipts"]) == 1
    await db.aclose()


def test_a_lock_wait_that_runs_out_taking_the_key_is_database_busy(make_db: Any) -> None:
    """Taking an unfinished key whose row another transaction holds, until PostgreSQL's
    lock_timeout runs out: DatabaseBusy (retryable), the translation every SQL mechanism
    shares (red team 17), not the driver's raw LockNotAvailable."""
    from oncely.errors import DatabaseBusy
    from oncely.sql.connections import retryable

    db = make_db("postgresql")
    table = db.name("keys")
    conn = db.connect()
    create_tables(conn, table=table)
    conn.execute("SET lock_timeout = '200ms'")
    conn.commit()
    op = Operation("busy_op", table=table)

    @op.phase("only")
    def only(ctx: Any) -> None:
        raise RuntimeError("leave the key unfinished")

    with pytest.raises(RuntimeError):
        op.run(conn, key="k1", scope="s", params={})
    holder = db.connect()
    holder.execute(f"SELECT * FROM {table} FOR UPDATE")  # holds the unfinished key's row
    try:
        with pytest.raises(DatabaseBusy) as caught:
            op.run(conn, key="k1", scope="s", params={})
        assert retryable(caught.value)
    finally:
        holder.rollback()
        holder.close()
    with pytest.raises(RuntimeError):  # free again: the key is taken and the phase runs
        op.run(conn, key="k1", scope="s", params={})
