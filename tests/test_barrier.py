"""The branch barrier on real SQLite, PostgreSQL, MariaDB and Redis: generated interleavings of
try/confirm/cancel with duplicates (verdicts and business effect), concurrent try and cancel from
two processes (MariaDB at REPEATABLE READ: no deadlock), purge under load, bad input."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oncely.errors import BarrierEffectsPartial, BarrierTableMissing, InvalidBarrierCall
from oncely.statemachine.barrier import (
    Verdict,
    aredis_barrier,
    barrier,
    create_table,
    purge,
    redis_barrier,
)

from conftest import REDIS_URL
from lock_workers import RedisServer
from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

E, D, EC, H = Verdict.EXECUTE, Verdict.DUPLICATE, Verdict.EMPTY_COMPENSATION, Verdict.HANGING


def expected(ops: list[str]) -> list[Verdict]:
    """The verdicts DTM's barrier gives, stated by what came before (not by rows)."""
    out = []
    for i, op in enumerate(ops):
        before = ops[:i]
        if op == "try":
            # the try row belongs to whoever came first: an earlier try (duplicate) or a cancel
            first = next((o for o in before if o in ("try", "cancel")), None)
            out.append({None: E, "try": D, "cancel": H}[first])
        elif op == "cancel":
            out.append(D if "cancel" in before else E if "try" in before else EC)
        else:
            out.append(D if "confirm" in before else E)
    return out


# A global transaction either confirms (after its try) or cancels (at any time, even before the
# try arrives); every call may be duplicated and delivered late.
def _interleavings() -> st.SearchStrategy[list[str]]:
    confirm = st.lists(st.sampled_from(["try", "confirm"]), min_size=1, max_size=7).map(
        lambda ops: ["try", *ops] if ops[0] != "try" else ops
    )
    cancel = st.lists(st.sampled_from(["try", "cancel"]), min_size=1, max_size=7)
    return st.one_of(confirm, cancel)


class Account:
    """The business: a balance with a frozen part (TCC try freezes 10, confirm spends it, cancel
    gives it back)."""

    def __init__(self, db: Db) -> None:
        self.db = db
        self.table = db.name("acct")
        self.barrier = db.name("barrier")
        db.run(f"CREATE TABLE {self.table} (id VARCHAR(64) PRIMARY KEY, available INT, frozen INT)")
        conn = db.connect()
        create_table(conn, self.barrier)
        conn.close()

    def open(self, gid: str) -> None:
        self.db.run(f"INSERT INTO {self.table} VALUES ('{gid}', 100, 0)")

    def call(self, conn: Any, gid: str, op: str, hold: float = 0.0) -> Verdict:
        """One branch call in one transaction: barrier, then the business writes."""
        effect = {
            "try": "available = available - 10, frozen = frozen + 10",
            "confirm": "frozen = frozen - 10",
            "cancel": "available = available + 10, frozen = frozen - 10",
        }[op]
        cur = conn.cursor()
        try:
            verdict = barrier(conn, gid, "b1", op, table=self.barrier)
            if verdict.run:
                sql = f"UPDATE {self.table} SET {effect} WHERE id = %s"
                cur.execute(sql.replace("%s", "?") if self.db.dialect == "sqlite" else sql, (gid,))
            if hold:
                time.sleep(hold)
            conn.commit()
            return verdict
        except BaseException:
            conn.rollback()
            raise

    def balance(self, gid: str) -> tuple[int, int]:
        row = self.db.run(f"SELECT available, frozen FROM {self.table} WHERE id = '{gid}'")[0]
        return int(row[0]), int(row[1])


def business(ops: list[str]) -> tuple[int, int]:
    if "cancel" in ops:
        return 100, 0
    return 90, 0 if "confirm" in ops else 10


@pytest.fixture
def account(db: Db) -> Iterator[Account]:
    yield Account(db)


def test_interleavings_with_duplicates(account: Account) -> None:
    conn = account.db.connect()

    @settings(
        max_examples=25 if account.db.dialect == "mysql" else 60,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(_interleavings())
    def check(ops: list[str]) -> None:
        gid = uuid.uuid4().hex
        account.open(gid)
        verdicts = [account.call(conn, gid, op) for op in ops]
        assert verdicts == expected(ops), ops
        assert account.balance(gid) == business(ops), ops

    check()


def test_cancel_before_try_and_try_after_cancel(account: Account) -> None:
    conn = account.db.connect()
    account.open("g")
    assert account.call(conn, "g", "cancel") is EC  # empty compensation: nothing to give back
    assert account.call(conn, "g", "try") is H  # the late try is blocked
    assert account.call(conn, "g", "cancel") is D
    assert account.balance("g") == (100, 0)


def test_rolled_back_call_leaves_no_row(account: Account) -> None:
    conn = account.db.connect()
    account.open("g")
    assert barrier(conn, "g", "b1", "try", table=account.barrier) is E
    conn.rollback()  # the business transaction failed: the try never happened
    assert account.call(conn, "g", "try") is E
    assert account.balance("g") == (90, 10)


def test_bad_input_and_missing_table(db: Db) -> None:
    conn = db.connect()
    for gid, branch, op in [("", "b", "try"), ("g", "", "try"), (None, "b", "try"),
                            ("g", "b", "rollback"), ("g" * 129, "b", "try")]:  # fmt: skip
        with pytest.raises(InvalidBarrierCall):
            barrier(conn, gid, branch, op)  # type: ignore[arg-type]
    with pytest.raises(BarrierTableMissing, match="oncely barrier init"):
        barrier(conn, "g", "b", "try", table=db.name("nobarrier"))
    conn.rollback()
    with pytest.raises(BarrierTableMissing):
        purge(conn, 10, table=db.name("nobarrier2"))
    conn.rollback()
    with pytest.raises(InvalidBarrierCall):
        purge(conn, -1)


# -- two processes: try and cancel at once ------------------------------------------------------
def _branch(
    dialect: str, path: str, tag: str, gids: list[str], op: str, start: Any, out: Any
) -> None:
    from pathlib import Path

    db = Db(dialect, Path(path).parent)
    db.tag, db.path = tag, Path(path)
    acct = Account.__new__(Account)
    acct.db, acct.table, acct.barrier = db, f"acct_{tag}", f"barrier_{tag}"
    conn = db.connect(isolation="REPEATABLE READ") if dialect == "mysql" else db.connect()
    verdicts = []
    for gid in gids:
        start.wait(30)
        try:
            verdicts.append(acct.call(conn, gid, op, hold=random.random() * 0.02).value)
        except Exception as exc:  # a deadlock or lock timeout is a failure of the test
            verdicts.append(f"error: {exc!r}")
    out.put((op, verdicts))
    conn.close()


def test_concurrent_try_and_cancel_from_two_processes(account: Account, tmp_path: Any) -> None:
    db = account.db
    gids = [uuid.uuid4().hex for _ in range(25)]
    for gid in gids:
        account.open(gid)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_branch, args=(db.dialect, str(db.path), db.tag, gids, op, start, out))
        for op in ("try", "cancel")
    ]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    for i, gid in enumerate(gids):
        pair = (results["try"][i], results["cancel"][i])
        # try first: it runs, the cancel compensates it; cancel first: empty, the try hangs.
        assert pair in {("EXECUTE", "EXECUTE"), ("HANGING", "EMPTY_COMPENSATION")}, pair
        assert account.balance(gid) == (100, 0)


# -- purge -----------------------------------------------------------------------------------------
def test_purge_keeps_every_row_of_a_gid_with_a_young_row(account: Account) -> None:
    db = account.db
    conn = db.connect()
    for gid in ("old", "mixed"):
        account.open(gid)
        account.call(conn, gid, "cancel")  # rows: cancel + the try row the cancel wrote
    db.run(f"UPDATE {account.barrier} SET created_at = created_at - 1000 WHERE gid = 'old'")
    db.run(
        f"UPDATE {account.barrier} SET created_at = created_at - 1000 "
        "WHERE gid = 'mixed' AND op = 'cancel'"
    )
    assert purge(conn, 500, table=account.barrier) == 2  # both rows of 'old', whatever their op
    left = db.run(f"SELECT gid, op FROM {account.barrier} ORDER BY op")
    # gid is VARBINARY on MariaDB (compared byte for byte): read back as bytes there
    left = [(g.decode() if isinstance(g, bytes) else g, op) for g, op in left]
    assert left == [("mixed", "cancel"), ("mixed", "try")]
    assert account.call(conn, "mixed", "try") is H  # a late try still finds its row
    db.run(f"UPDATE {account.barrier} SET created_at = created_at - 1000")
    assert purge(conn, 500, table=account.barrier, batch=1) == 2
    assert db.run(f"SELECT COUNT(*) FROM {account.barrier}") == [(0,)]


def test_purge_under_load_never_removes_a_row_a_late_call_needs(account: Account) -> None:
    db = account.db
    horizon = 1.5
    stop = threading.Event()
    purged = [0]
    failures: list[str] = []

    def purger() -> None:
        conn = db.connect()
        while not stop.is_set():
            try:
                purged[0] += purge(conn, horizon, table=account.barrier)
            except Exception as exc:  # deadlock victims retry; anything else fails the test
                from oncely.sql.connections import retryable

                if not retryable(exc):
                    failures.append(repr(exc))
            time.sleep(0.01)
        conn.close()

    def call(conn: Any, gid: str, op: str) -> Verdict:
        # A deadlock victim (MySQL 1213 against the purger's DELETE: DatabaseBusy) had its whole
        # transaction rolled back, barrier row included: an application runs it again, as here
        from oncely.sql.connections import retryable

        for attempt in range(30):
            try:
                return account.call(conn, gid, op)
            except Exception as exc:
                if not retryable(exc) or attempt == 29:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def worker(n: int) -> None:
        conn = db.connect()
        rng = random.Random(n)
        for _ in range(8):
            gid = uuid.uuid4().hex
            account.open(gid)
            first = rng.choice(["try", "cancel"])
            call(conn, gid, first)
            time.sleep(rng.random() * horizon * 0.5)
            call(conn, gid, "cancel")
            time.sleep(rng.random() * horizon * 0.5)
            late = call(conn, gid, "try")  # within the horizon of the gid's newest row
            if late is not (D if first == "try" else H):
                failures.append(f"{gid}: late try got {late} after {first}")
            if account.balance(gid) != (100, 0):
                failures.append(f"{gid}: {account.balance(gid)}")
        conn.close()

    threads = [threading.Thread(target=purger)] + [
        threading.Thread(target=worker, args=(i,)) for i in range(4)
    ]
    for t in threads[1:]:
        t.start()
    threads[0].start()
    for t in threads[1:]:
        t.join(120)
    time.sleep(horizon + 0.5)
    stop.set()
    threads[0].join(30)
    assert not failures, failures[:5]
    assert purged[0] > 0  # the purger did remove the rows of finished global transactions
    assert db.run(f"SELECT COUNT(*) FROM {account.barrier}") == [(0,)]


# -- Redis ---------------------------------------------------------------------------------------
@pytest.fixture
def rclient() -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"oncely-test-barrier-{uuid.uuid4().hex[:10]}"
    yield client, prefix
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_redis_interleavings_with_effects(rclient: tuple[redis.Redis, str]) -> None:
    r, prefix = rclient

    @settings(
        max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(_interleavings())
    def check(ops: list[str]) -> None:
        gid = uuid.uuid4().hex
        acct = f"{prefix}:acct:{{{gid}}}"
        r.hset(acct, mapping={"available": 100, "frozen": 0})
        effects = {
            "try": [("HINCRBY", acct, "available", -10), ("HINCRBY", acct, "frozen", 10)],
            "confirm": [("HINCRBY", acct, "frozen", -10)],
            "cancel": [("HINCRBY", acct, "available", 10), ("HINCRBY", acct, "frozen", -10)],
        }
        verdicts = [
            redis_barrier(r, gid, "b1", op, effects=effects[op], prefix=prefix, horizon=60)
            for op in ops
        ]
        assert verdicts == expected(ops), ops
        got = r.hgetall(acct)
        assert (int(got[b"available"]), int(got[b"frozen"])) == business(ops), ops

    check()


def test_redis_concurrent_try_and_cancel_and_expiry(rclient: tuple[redis.Redis, str]) -> None:
    r, prefix = rclient
    for _ in range(50):
        gid = uuid.uuid4().hex
        results: dict[str, Verdict] = {}
        start = threading.Barrier(2)

        def call(op: str, gid: str = gid, start: Any = start, results: Any = results) -> None:
            start.wait()
            results[op] = redis_barrier(r, gid, "b", op, prefix=prefix, horizon=30)

        threads = [threading.Thread(target=call, args=(op,)) for op in ("try", "cancel")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (results["try"], results["cancel"]) in {(E, E), (H, EC)}
    ttl = r.pttl(f"{prefix}:{{{gid}}}")
    assert 0 < ttl <= 30_000  # the horizon, on the server's clock
    with pytest.raises(InvalidBarrierCall):
        redis_barrier(r, "", "b", "try", prefix=prefix)


def test_cli_barrier_init_and_purge(tmp_path: Any) -> None:
    import sqlite3

    from typer.testing import CliRunner

    from oncely.cli import app

    url = f"sqlite:///{tmp_path}/cli.db"
    runner = CliRunner()
    nofile = runner.invoke(app, ["barrier", "purge", url])
    assert nofile.exit_code == 1 and "no SQLite database" in nofile.output
    assert not (tmp_path / "cli.db").exists()  # purge creates nothing
    sqlite3.connect(tmp_path / "cli.db").close()
    missing = runner.invoke(app, ["barrier", "purge", url])
    assert missing.exit_code == 1 and "oncely barrier init" in missing.output
    assert runner.invoke(app, ["barrier", "init", url]).exit_code == 0
    conn = sqlite3.connect(tmp_path / "cli.db")
    for gid in ("old", "new"):
        barrier(conn, gid, "b", "cancel")
    conn.execute("UPDATE oncely_barrier SET created_at = created_at - 7200 WHERE gid = 'old'")
    conn.commit()
    done = runner.invoke(app, ["barrier", "purge", url, "--older-than", "1h"])
    assert done.exit_code == 0 and "purged 2 barrier row(s)" in done.output
    assert conn.execute("SELECT DISTINCT gid FROM oncely_barrier").fetchall() == [("new",)]
    bad = runner.invoke(app, ["barrier", "purge", url, "--older-than", "soon"])
    assert bad.exit_code == 1 and "not a duration" in bad.output
    assert runner.invoke(app, ["barrier", "purge", "redis://127.0.0.1"]).exit_code == 1


async def test_async_barrier(account: Account) -> None:
    from oncely.statemachine.barrier import abarrier, apurge

    if account.db.dialect == "sqlite":
        pytest.skip("sqlite3 has no async driver")
    conn = await account.db.aconnect()
    try:
        assert await abarrier(conn, "ga", "b", "cancel", table=account.barrier) is EC
        assert await abarrier(conn, "ga", "b", "try", table=account.barrier) is H
        await conn.commit()
        assert await apurge(conn, 0, table=account.barrier) >= 0
    finally:
        await account.db.aclose()


def test_redis_failing_effect_leaves_the_branch_to_run_again(
    rclient: tuple[redis.Redis, str],
) -> None:
    r, prefix = rclient
    acct = f"{prefix}:acct"
    r.set(acct, "not a hash")
    with pytest.raises(redis.ResponseError):
        redis_barrier(r, "g", "b", "try", effects=[("HINCRBY", acct, "n", 1)], prefix=prefix)
    r.delete(acct)
    assert (
        redis_barrier(r, "g", "b", "try", effects=[("HINCRBY", acct, "n", 1)], prefix=prefix) is E
    )
    assert r.hget(acct, "n") == b"1"


def test_ids_no_store_keeps_as_text_are_refused(account: Account) -> None:
    # redteam4: the one rule for ids kept as text (oncely.core.text): a NUL character or a
    # lone surrogate is refused before anything is written, on every database (SQLite would
    # cut "g\x00x" to "g", another transaction's gid; PostgreSQL refused it as a driver error).
    conn = account.db.connect()
    for gid, branch in [("g\x00x", "b"), ("g", "b\x00"), ("g\ud800", "b")]:
        with pytest.raises(InvalidBarrierCall, match=r"NUL|surrogate"):
            barrier(conn, gid, branch, "try", table=account.barrier)
    conn.rollback()
    # "g" was never recorded
    assert barrier(conn, "g", "b", "try", table=account.barrier) is Verdict.EXECUTE
    conn.rollback()


def test_redis_refuses_the_same_ids(rclient: tuple[redis.Redis, str]) -> None:
    r, prefix = rclient
    with pytest.raises(InvalidBarrierCall, match="NUL"):
        redis_barrier(r, "g\x00x", "b", "try", prefix=prefix)


def test_redis_effects_failing_half_way_never_apply_twice(
    rclient: tuple[redis.Redis, str],
) -> None:
    """redteam5: a command failing in the middle of the effects (WRONGTYPE) left the ones
    before it applied and no row, so the retry applied them again (INCRBY 5 twice: 10). Now
    the same script marks the branch broken: the error names what stayed applied, and every
    later call on the branch (retry, cancel, confirm) raises it again and applies nothing."""
    r, prefix = rclient
    gid = uuid.uuid4().hex
    k1, k2 = f"{prefix}:a:{{{gid}}}", f"{prefix}:b:{{{gid}}}"
    r.set(k2, "not a hash")
    effects = [("INCRBY", k1, 5), ("HINCRBY", k2, "f", 1), ("INCRBY", k1, 100)]
    with pytest.raises(BarrierEffectsPartial) as info:
        redis_barrier(r, gid, "b1", "try", effects=effects, prefix=prefix)
    err = info.value
    assert err.op == "try" and err.applied == [["INCRBY", k1, "5"]]
    assert err.failed == ["HINCRBY", k2, "f", "1"] and "WRONGTYPE" in err.error
    assert f"HDEL {err.key} {err.field}" in str(err)
    assert r.get(k1) == b"5"
    for op in ("try", "try", "cancel", "confirm"):  # retries and the branch's other ops
        with pytest.raises(BarrierEffectsPartial) as again:
            redis_barrier(r, gid, "b1", op, effects=[("INCRBY", k1, 5)], prefix=prefix)
        assert again.value.applied == [["INCRBY", k1, "5"]] and again.value.op == "try"
    assert r.get(k1) == b"5"  # applied once, never again
    assert r.pttl(err.key) > 0  # the mark expires with the gid's rows (horizon)
    # another branch of the gid is not affected
    assert redis_barrier(r, gid, "b2", "try", prefix=prefix) is E
    # the operator repairs the data and clears the mark: the branch runs again
    r.delete(k2)
    r.hdel(err.key, err.field)
    assert redis_barrier(r, gid, "b1", "try", effects=effects[1:], prefix=prefix) is E
    assert r.get(k1) == b"105"


async def test_async_redis_effects_failing_half_way(rclient: tuple[redis.Redis, str]) -> None:
    import redis.asyncio

    r, prefix = rclient
    gid = uuid.uuid4().hex
    k1, k2 = f"{prefix}:a:{{{gid}}}", f"{prefix}:b:{{{gid}}}"
    r.set(k2, "x")
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        for _ in range(2):
            with pytest.raises(BarrierEffectsPartial):
                await aredis_barrier(
                    client, gid, "b", "action",
                    effects=[("INCRBY", k1, 5), ("HSET", k2, "f", 1)], prefix=prefix,
                )  # fmt: skip
    finally:
        await client.aclose()
    assert r.get(k1) == b"5"


def test_redis_effects_are_data_commands_on_their_keys(private_redis: RedisServer) -> None:
    """redteam5: any command was accepted as an effect, FLUSHALL included (the red team
    flushed a shared server through it). On a private server: server, admin, script and keyless
    commands, and commands without their key, are refused before anything is sent; so is an
    effect on the barrier's own hash."""
    r = redis.Redis.from_url(private_redis.url)
    r.set("canary", "1")
    refused = [
        [("FLUSHALL",)], [("flushdb",)], [("CONFIG", "SET", "maxmemory", "1")],
        [("SHUTDOWN",)], [("SCRIPT", "FLUSH")], [("EVAL", "return 1", "0")],
        [("FUNCTION", "FLUSH")], [("SELECT", "1")], [("SWAPDB", "0", "1")],
        [("DEBUG", "SLEEP", "0")], [("COPY", "canary", "c2", "DB", "1")],
        [("SET", "ok:{g}", 1), ("FLUSHALL",)],  # after a valid one: nothing is run
        [("DEL",)], [("SET",)], [("RENAME", "canary")], [("MSET", "a", "1", "b")],
        [("DEL", "oncely:barrier:{g}")],  # the barrier's own rows
        [("DEL", "oncely:barrier:{other}")],  # another gid's rows: its branches would rerun
        [("HDEL", "oncely:barrier:{other}", "try:b")],
        [("INCRBYFLOAT", "x", float("nan"))],
    ]  # fmt: skip
    for effects in refused:
        with pytest.raises(InvalidBarrierCall):
            redis_barrier(r, "g", "b", "try", effects=effects)
    assert r.get("canary") == b"1" and r.get("ok:{g}") is None
    assert r.exists("oncely:barrier:{g}") == 0  # nothing was sent
    ok = [("set", "s:{g}", "v"), ("DEL", "x:{g}", "y:{g}"), ("MSET", "m1", 1, "m2", 2)]
    assert redis_barrier(r, "g", "b", "try", effects=ok) is E
    assert r.mget("s:{g}", "m1", "m2") == [b"v", b"1", b"2"]
    r.close()


def test_redis_cluster_effects_must_stay_in_the_gids_slot() -> None:
    """On a Redis Cluster the script runs on the node of the gid's hash: an effect key of
    another slot failed there half way (the keys before it applied). It is refused before
    anything is sent, with the rule in the message."""
    import shutil

    import redis.cluster

    if shutil.which("redis-server") is None:  # pragma: no cover - depends on the machine
        pytest.skip("redis-server is not installed")
    from redis_cluster import cluster_url

    host, port = cluster_url().split("://")[1].split(",")[0].split(":")
    r = redis.cluster.RedisCluster(host=host, port=int(port))
    gid = uuid.uuid4().hex
    prefix = f"oncely-test-barrier-{gid[:8]}"
    mine, other = f"{prefix}:a:{{{gid}}}", f"{prefix}:other"
    try:
        with pytest.raises(InvalidBarrierCall, match="hash slot"):
            redis_barrier(
                r, gid, "b", "try", effects=[("INCRBY", mine, 1), ("INCRBY", other, 1)],
                prefix=prefix,
            )  # fmt: skip
        assert r.get(mine) is None and r.get(other) is None
        assert redis_barrier(r, gid, "b", "try", effects=[("INCRBY", mine, 1)], prefix=prefix) is E
        assert r.get(mine) == b"1"
    finally:
        r.delete(mine)
        r.delete(f"{prefix}:{{{gid}}}")
        r.close()
