"""Locks across real processes: mutual exclusion under contention, a holder paused past its
ttl (SIGSTOP) whose late write the fence refuses, and a Redis restart that forgets a held lock.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from oncely.errors import LockLost
from oncely.locks import Lock, fenced_table_sql

from lock_workers import (
    KINDS,
    POSTGRES_URL,
    REDIS_URL,
    RedisServer,
    count_under_lock,
    fenced_write,
    make_lock,
    paused_holder,
    read_resource,
    unique_name,
)

#: The lock tests' fixtures (redlock_nodes, spec_for, pg_fence_table) live there.
pytest_plugins = ["lock_workers"]

PROCESSES = 8


def _mutual_exclusion(spec: dict[str, Any], tmp_path: Path, rounds: int) -> None:
    counter = tmp_path / f"counter-{unique_name()}"
    counter.write_text("0")
    name = unique_name("counter")
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 1.5  # every child is up and connected-ish before the race starts
    with ctx.Pool(PROCESSES) as pool:
        results = [
            pool.apply_async(count_under_lock, (spec, name, str(counter), rounds, start_at))
            for _ in range(PROCESSES)
        ]
        done = [r.get(timeout=170) for r in results]
    assert done == [rounds] * PROCESSES
    # A lost update (two holders at once) would leave the counter short.
    assert int(counter.read_text()) == PROCESSES * rounds


@pytest.mark.parametrize("kind", KINDS)
def test_mutual_exclusion_8_processes(kind: str, spec_for: Any, tmp_path: Path) -> None:
    """8 processes x 100 read-modify-writes of a file under the lock end exactly right."""
    _mutual_exclusion(spec_for(kind), tmp_path, rounds=100)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_mutual_exclusion_8_processes_full(kind: str, spec_for: Any, tmp_path: Path) -> None:
    """The issue's full size: 8 processes x 500 acquisitions on each backend."""
    _mutual_exclusion(spec_for(kind), tmp_path, rounds=500)


# -- a holder paused past its ttl -----------------------------------------------------------------
def _resource(kind: str, tmp_path: Path) -> dict[str, Any]:
    """The protected resource next to each backend: a Redis hash, a SQLite or PG row."""
    if kind in ("redis", "redlock"):
        return {"kind": "redis", "url": REDIS_URL, "key": f"oncely-test-resource-{unique_name()}"}
    if kind == "sqlite":
        path = str(tmp_path / "resource.db")
        conn = sqlite3.connect(path)
        conn.execute(fenced_table_sql("resource"))
        conn.close()
        return {"kind": "sqlite", "path": path}
    import psycopg

    table = f"oncely_test_res_{unique_name('t').replace('-', '_')}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(fenced_table_sql(table))
    return {"kind": "postgres", "url": POSTGRES_URL, "table": table}


def _drop_resource(resource: dict[str, Any]) -> None:
    if resource["kind"] == "postgres":
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {resource['table']}")
    elif resource["kind"] == "redis":
        import redis

        client = redis.Redis.from_url(resource["url"])
        client.delete(resource["key"])
        client.close()


@pytest.mark.parametrize("kind", KINDS)
def test_paused_holder_is_fenced_off(kind: str, spec_for: Any, tmp_path: Path) -> None:
    """SIGSTOP a holder past its ttl; another process takes the lock and writes; after SIGCONT
    the paused holder's write is refused by the fence, and its release() raises LockLost
    without deleting the new holder's lock."""
    spec = spec_for(kind)
    name = unique_name()
    resource = _resource(kind, tmp_path)
    report = tmp_path / "report.json"
    ctx = multiprocessing.get_context("spawn")
    acquired, go = ctx.Event(), ctx.Event()
    ttl = 1.0
    child = ctx.Process(
        target=paused_holder, args=(spec, name, resource, str(report), acquired, go, ttl)
    )
    child.start()
    try:
        assert acquired.wait(60), "the child did not acquire the lock"
        assert child.pid is not None
        os.kill(child.pid, signal.SIGSTOP)
        # Blocks until the paused holder's ttl runs out on the store's clock (for PostgreSQL:
        # until the server ends its idle session), then takes the lock.
        new = make_lock(spec, name, ttl=30)
        new_token = new.acquire(timeout=30)
        assert fenced_write(resource, new_token, "new holder")
        os.kill(child.pid, signal.SIGCONT)
        go.set()
        child.join(60)
        assert child.exitcode == 0
        outcome = json.loads(report.read_text())
        assert outcome["first"] is True
        assert new_token > outcome["token"]
        assert outcome["second"] is False, "the stale holder's write got through the fence"
        assert outcome["release"].startswith("LockLost")
        assert outcome["lost_event"] is True
        assert read_resource(resource) == ("new holder", new_token)
        new.check()  # the stale release did not delete the new holder's lock
        assert new.owned()
        new.release()
    finally:
        if child.is_alive():
            assert child.pid is not None
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
        _drop_resource(resource)


# -- Redis restarted while a lock is held ---------------------------------------------------------
def test_redis_restart_loses_the_lock_but_fencing_holds(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """Without persistence a restart forgets the lock, so a second holder gets in while the
    first still runs. What keeps the data right:

    * the first holder learns it lost the lock (check() and release() raise LockLost);
    * fencing tokens still grow: they are seeded from the server's TIME in microseconds, so the
      counter that vanished with the restart does not start again at 1;
    * the protected data lives on a store that survived (here a SQLite file), so its fence
      refuses the first holder's late write.
    """
    resource = _resource("sqlite", tmp_path)
    name = unique_name()
    first = Lock(private_redis.url, name, ttl=30)
    t1 = first.acquire()
    assert fenced_write(resource, t1, "first")
    private_redis.restart()
    second = Lock(private_redis.url, name, ttl=30)
    t2 = second.acquire(blocking=False)  # the restarted server has no lock any more
    assert t2 is not None and t2 > t1
    assert fenced_write(resource, t2, "second")
    with pytest.raises(LockLost):
        first.check()
    assert fenced_write(resource, t1, "first, late") is False
    with pytest.raises(LockLost):
        first.release()
    assert second.owned()
    second.release()
    assert read_resource(resource) == ("second", t2)
