"""Helpers of the lock tests: child-process functions (importable by spawn) and throwaway
redis-server instances.

Children report through files and multiprocessing events only; nothing here sleeps in place of
a signal, except the deliberate scenario pauses the tests ask for.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REDIS_URL = os.environ.get("ONCELY_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("ONCELY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
#: The fence table the PostgreSQL lock tests use: unique per test session (a fixed name would be
#: shared with concurrent runs, and the first run to finish would drop it under the others), and
#: dropped at the end of the session.
PG_FENCE_TABLE = f"oncely_test_lock_fences_{uuid.uuid4().hex[:12]}"


# -- throwaway Redis servers ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` on a loopback port, no persistence; restartable on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="oncely-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # pragma: no cover - depends on the machine
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Kill the server (SIGKILL: no shutdown save; without persistence all data is gone)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, 19)  # SIGSTOP

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, 18)  # SIGCONT

    def close(self) -> None:
        if self.proc is not None:
            self.resume()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def redis_servers(count: int) -> Iterator[list[RedisServer]]:
    servers = [RedisServer() for _ in range(count)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.close()


# -- locks by kind --------------------------------------------------------------------------------
def make_lock(spec: dict[str, Any], name: str, **kwargs: Any) -> Any:
    """A lock from a picklable spec: ``{"kind": "redlock", "urls": [...]}`` or a URL + options."""
    from oncely.locks import Lock, Redlock

    options = dict(spec.get("options", {}))
    options.update(kwargs)
    if spec["kind"] == "redlock":
        return Redlock(spec["urls"], name, **options)
    return Lock(spec["url"], name, **options)


# -- child processes ------------------------------------------------------------------------------
def count_under_lock(
    spec: dict[str, Any], name: str, counter: str, rounds: int, start_at: float
) -> int:
    """Increment a number in a file ``rounds`` times, each a read-modify-write under the lock."""
    lock = make_lock(spec, name, ttl=10.0)
    path = Path(counter)
    while time.time() < start_at:
        time.sleep(0.001)
    done = 0
    for _ in range(rounds):
        with lock:
            value = int(path.read_text() or "0")
            path.write_text(str(value + 1))
            done += 1
    return done


def paused_holder(
    spec: dict[str, Any],
    name: str,
    resource: dict[str, Any],
    report: str,
    acquired: Any,
    go: Any,
    ttl: float,
) -> None:
    """Acquire, write once with the token, signal, then (after the parent's SIGSTOP/SIGCONT and
    ``go``) write again and release; the outcomes go to the ``report`` JSON file."""
    from oncely.errors import LockLost

    lost_by_callback: list[str] = []
    lock = make_lock(
        spec, name, ttl=ttl, auto_renew=True, on_lost=lambda _l, e: lost_by_callback.append(str(e))
    )
    token = lock.acquire()
    first = fenced_write(resource, token, f"first-{os.getpid()}")
    acquired.set()
    go.wait(60)
    second = fenced_write(resource, token, f"stale-{os.getpid()}")
    try:
        lock.release()
        released = "ok"
    except LockLost as exc:
        released = f"LockLost: {exc}"
    Path(report).write_text(
        json.dumps(
            {
                "token": token,
                "first": first,
                "second": second,
                "release": released,
                "lost_event": lock.lost.is_set(),
                "callback": lost_by_callback,
            }
        )
    )


def fenced_write(resource: dict[str, Any], token: int, value: str) -> bool:
    """Write ``value`` to the protected resource, fenced by ``token``."""
    from oncely.locks import fenced_set, fenced_update

    kind = resource["kind"]
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(resource["url"])
        try:
            return fenced_set(client, resource["key"], value, token)
        finally:
            client.close()
    if kind == "sqlite":
        import sqlite3

        conn = sqlite3.connect(resource["path"], timeout=10)
        try:
            with conn:
                return fenced_update(conn, "resource", "row", token, {"value": value})
        finally:
            conn.close()
    if kind == "postgres":
        import psycopg

        with psycopg.connect(resource["url"], autocommit=True) as pg:
            return fenced_update(pg, resource["table"], "row", token, {"value": value})
    raise AssertionError(kind)


def read_resource(resource: dict[str, Any]) -> tuple[str | None, int | None]:
    """The value and fence stored in the protected resource."""
    kind = resource["kind"]
    if kind == "redis":
        import redis

        from oncely.locks import fenced_get

        client = redis.Redis.from_url(resource["url"])
        try:
            value, fence = fenced_get(client, resource["key"])
        finally:
            client.close()
        return (None if value is None else value.decode()), fence
    if kind == "sqlite":
        import sqlite3

        conn = sqlite3.connect(resource["path"])
        try:
            row = conn.execute("SELECT value, fence FROM resource WHERE key = 'row'").fetchone()
        finally:
            conn.close()
        return (row[0], row[1]) if row else (None, None)
    import psycopg

    with psycopg.connect(resource["url"], autocommit=True) as pg:
        row = pg.execute(
            f"SELECT value, fence FROM {resource['table']} WHERE key = 'row'"
        ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def spec_urls(spec: dict[str, Any]) -> Sequence[str]:
    return spec["urls"] if spec["kind"] == "redlock" else [spec["url"]]


# -- fixtures (imported by the test_locks_* modules) ----------------------------------------------
import pytest  # noqa: E402

KINDS = ["redis", "sqlite", "postgres", "redlock"]


@pytest.fixture(scope="session")
def redlock_nodes() -> Iterator[list[RedisServer]]:
    """Three independent redis-server processes on random loopback ports, for Redlock."""
    if shutil.which("redis-server") is None:  # pragma: no cover - depends on the machine
        pytest.skip("redis-server is not installed")
    with redis_servers(3) as servers:
        yield servers


@pytest.fixture(scope="session")
def pg_fence_table() -> Iterator[str]:
    yield PG_FENCE_TABLE
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {PG_FENCE_TABLE}")
    except Exception:  # pragma: no cover - best effort
        pass


def _drop_redis_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


@pytest.fixture
def spec_for(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``spec_for(kind)``: an isolated, picklable lock spec of that kind (cleaned up after)."""
    made: list[dict[str, Any]] = []

    def make(kind: str) -> dict[str, Any]:
        tag = uuid.uuid4().hex[:10]
        prefix = f"oncely-test-lock-{tag}"
        if kind == "redis":
            spec: dict[str, Any] = {"kind": kind, "url": REDIS_URL, "options": {"prefix": prefix}}
        elif kind == "sqlite":
            spec = {"kind": kind, "url": f"sqlite:///{tmp_path}/locks-{tag}.db", "options": {}}
        elif kind == "postgres":
            request.getfixturevalue("pg_fence_table")
            spec = {"kind": kind, "url": POSTGRES_URL, "options": {"table": PG_FENCE_TABLE}}
        elif kind == "redlock":
            nodes = request.getfixturevalue("redlock_nodes")
            spec = {"kind": kind, "urls": [n.url for n in nodes], "options": {"prefix": prefix}}
        else:
            raise AssertionError(kind)
        made.append(spec)
        return spec

    yield make
    for spec in made:
        prefix = spec["options"].get("prefix")
        if prefix:
            for url in spec_urls(spec):
                _drop_redis_prefix(url, prefix)


def unique_name(what: str = "lock") -> str:
    return f"{what}-{uuid.uuid4().hex[:12]}"
