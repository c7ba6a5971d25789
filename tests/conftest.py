"""Shared fixtures: every store under test talks to the real server on this machine."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

# Fixture modules loaded by test files through ``pytest_plugins``: rewrite their asserts too.
pytest.register_assert_rewrite("lock_workers", "sql_fixtures")

from oncely.stores import Store, open_store  # noqa: E402

from lock_workers import RedisServer  # noqa: E402

REDIS_URL = os.environ.get("ONCELY_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("ONCELY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("ONCELY_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test")

#: ``redis-cluster``: a private 6-node Redis Cluster (tests/redis_cluster.py), started on first use.
STORE_KINDS = ["memory", "sqlite", "postgres", "mysql", "redis", "redis-cluster"]
#: Stores that other processes can share (everything but memory://).
SHARED_KINDS = ["sqlite", "postgres", "mysql", "redis"]


def stable_id(value: object) -> str:
    """``repr(value)`` without object addresses (``<... at 0x7f...>``): a test id that is the same
    in every process, as pytest-xdist needs (its workers must collect the same tests)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def store_url(kind: str, tmp_path: Path) -> tuple[str, dict[str, object]]:
    """A URL and constructor options that give this test its own isolated records."""
    tag = uuid.uuid4().hex[:12]
    if kind == "memory":
        return "memory://", {}
    if kind == "sqlite":
        # Tests check decisions, not durability: without an fsync per write (FULL) statements
        # follow each other within a millisecond, as on a fast disk, so same-instant races show.
        return f"sqlite:///{tmp_path}/oncely-{tag}.db?synchronous=NORMAL", {}
    if kind == "postgres":
        return POSTGRES_URL, {"table": f"oncely_t_{tag}", "create_schema": True}
    if kind == "mysql":
        return MYSQL_URL, {"table": f"oncely_t_{tag}", "create_schema": True}
    if kind == "redis":
        return REDIS_URL, {"prefix": f"oncely-test-{tag}"}
    if kind == "redis-cluster":
        if shutil.which("redis-server") is None:  # pragma: no cover - depends on the machine
            pytest.skip("redis-server is not installed")
        from redis_cluster import cluster_url

        return cluster_url(), {"prefix": f"oncely-test-{tag}"}
    raise AssertionError(kind)


def drop_redis_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every key under ``<prefix>:`` on the Redis server at ``url``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def drop(kind: str, store: Store) -> None:
    """Remove what a test created on a shared server."""
    if kind == "postgres":
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {store.table}")  # type: ignore[attr-defined]
    elif kind == "mysql":
        import pymysql

        conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")
        try:
            with conn.cursor() as cur:
                table = store.table  # type: ignore[attr-defined]
                cur.execute(f"DROP TABLE IF EXISTS {table}, {table}_fences")
        finally:
            conn.close()
    elif kind == "redis":
        drop_redis_prefix(store.prefix)  # type: ignore[attr-defined]
    elif kind == "redis-cluster":
        import redis.cluster

        from redis_cluster import cluster_url

        host, port = cluster_url().split("://")[1].split(",")[0].split(":")
        cluster = redis.cluster.RedisCluster(host=host, port=int(port))
        for key in cluster.scan_iter(match=f"{store.prefix}:*"):  # type: ignore[attr-defined]
            cluster.delete(key)
        cluster.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone (``lock_workers.RedisServer``: a free loopback port,
    no persistence): it may be paused (SIGSTOP), flushed, reconfigured (``CONFIG SET``),
    stopped or restarted without hurting others; closed (resumed first) after the test."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


StoreFactory = Callable[[str], tuple[Store, str, dict[str, object]]]


@pytest.fixture
def opened_stores() -> list[tuple[str, Store]]:
    """Every store the test opened through ``make_store``, with its kind."""
    return []


@pytest.fixture
async def close_async_faces(opened_stores: list[tuple[str, Store]]) -> AsyncIterator[None]:
    """After an async test, close its stores' async faces while its event loop still runs.

    Stores close a loop's connections when the loop shuts down by themselves
    (``test_asyncio_run_returns_every_time_without_aclose``); closing here keeps each test's
    connections from outliving it.
    """
    yield
    for _, store in opened_stores:
        await store.aclose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", None)
        if inspect.iscoroutinefunction(getattr(item, "function", None)) and names is not None:
            names.append("close_async_faces")


@pytest.fixture
def make_store(tmp_path: Path, opened_stores: list[tuple[str, Store]]) -> Iterator[StoreFactory]:
    """Open an isolated store of a kind; returns (store, url, options) and cleans up after."""
    opened = opened_stores

    def make(kind: str) -> tuple[Store, str, dict[str, object]]:
        url, options = store_url(kind, tmp_path)
        store = open_store(url, **options)
        opened.append((kind, store))
        return store, url, options

    yield make
    for kind, store in opened:
        try:
            drop(kind, store)
        finally:
            store.close()


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, make_store: StoreFactory) -> Store:
    return make_store(request.param)[0]


@pytest.fixture(params=SHARED_KINDS)
def shared_store(
    request: pytest.FixtureRequest, make_store: StoreFactory
) -> tuple[Store, str, dict[str, object]]:
    return make_store(request.param)
