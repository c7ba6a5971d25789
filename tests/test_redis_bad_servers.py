"""A Redis that is full or slow (issue 13, "Bad input"), on servers of our own (never the
shared one): typed errors, fail closed, nothing half-written, bounded waits.

* Full: ``maxmemory`` with ``noeviction``. A script's first write that needs memory (HSET,
  SET) is refused with ``OOM`` and Redis stops the script there; once a script wrote, Redis lets
  its later writes through (``scriptCall``: the OOM check applies only while the script has
  not written yet), so a script is never cut in half by OOM. The caller gets
  StoreUnavailable saying what to do; the record and the fence counter are untouched.
* Slow: ``DEBUG SLEEP`` / ``CLIENT PAUSE``: every call ends within the socket timeout with
  StoreUnavailable, and the body does not run.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from typer.testing import CliRunner

from oncely import idempotent
from oncely.cli import app
from oncely.core.records import New, RecordKey, Replay, digest_key
from oncely.errors import ResultNotStored, ResultTooLarge, SerializationError, StoreUnavailable
from oncely.stores.redis import RedisStore
from redis_cluster import RedisServer

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def _prefix() -> str:
    return f"oncely-cluster2-{uuid.uuid4().hex[:10]}"


def _fill(port: int) -> None:
    """Write 10 kB values until Redis refuses with OOM, then lower ``maxmemory`` under the
    memory in use (our own server), so that it stays full whatever small buffers are freed."""
    client = redis.Redis(port=port)
    try:
        for i in range(100_000):
            try:
                client.set(f"fill-{i}", b"x" * 10_000)
            except redis.exceptions.OutOfMemoryError:
                used = int(client.info("memory")["used_memory"])
                client.config_set("maxmemory", used - 500_000)
                return
        raise AssertionError("Redis never ran out of memory")
    finally:
        client.close()


def _free(port: int) -> None:
    """Undo :func:`_fill`: drop its values, ``maxmemory`` back to 3 MB."""
    client = redis.Redis(port=port)
    try:
        client.delete(*client.keys("fill-*"))
        client.config_set("maxmemory", "3mb")
    finally:
        client.close()


@pytest.fixture
def full() -> Iterator[RedisServer]:
    server = RedisServer("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    try:
        yield server
    finally:
        server.stop()


def test_a_full_redis_refuses_claims_closed_and_writes_nothing(full: RedisServer) -> None:
    store = RedisStore(full.url, prefix=_prefix())
    direct = redis.Redis(port=full.port)
    runs: list[str] = []

    @idempotent(store=store, key=["k"], lease=5)
    def charge(k: str) -> str:
        runs.append(k)
        return "charged"

    try:
        assert charge("before") == "charged"
        _fill(full.port)
        fence_before = direct.get(f"{store.prefix}:fence")
        keys_before = direct.dbsize()
        with pytest.raises(StoreUnavailable, match="out of memory") as caught:
            charge("order-1")
        message = str(caught.value)
        assert "nothing was written" in message and "maxmemory" in message
        assert "oncely check" in message
        assert runs == ["before"]  # the body did not run
        # Nothing half-written: no record, the fence counter as it was.
        assert direct.dbsize() == keys_before
        assert direct.get(f"{store.prefix}:fence") == fence_before
        # A replay needs no memory and still works.
        assert charge("before") == "charged"
        # Memory freed: the same call runs once.
        _free(full.port)
        assert charge("order-1") == "charged"
        assert runs == ["before", "order-1"]
    finally:
        direct.close()
        store.close()


async def test_a_full_redis_async_face(full: RedisServer) -> None:
    store = RedisStore(full.url, prefix=_prefix())
    try:
        key = RecordKey("full", digest_key("a"))
        _fill(full.port)
        with pytest.raises(StoreUnavailable, match="out of memory"):
            await store.aclaim(key, "fp", 5, 60)
        assert await store.aget(key) is None
    finally:
        await store.aclose()
        store.close()


def test_a_completion_refused_by_a_full_redis_lands_after_memory_is_freed(
    full: RedisServer,
) -> None:
    """The body ran when Redis filled up: its completion is refused (OOM), the key is not
    released; the caller gets ResultNotStored, and the background retry stores it once memory
    is freed."""
    store = RedisStore(full.url, prefix=_prefix())
    direct = redis.Redis(port=full.port)

    @idempotent(store=store, key=["k"], lease=3)
    def charge(k: str) -> str:
        _fill(full.port)
        return "charged"

    try:
        with pytest.raises(ResultNotStored) as caught:
            charge("order-3")
        assert caught.value.result == "charged"
        (record,) = store.list(limit=5)
        assert record.status == "in_progress"  # kept, never released
        _free(full.port)  # memory freed, the claim kept
        deadline = time.monotonic() + 10
        while (record := store.list(limit=5)[0]).status != "completed":
            assert time.monotonic() < deadline, "the background retry never stored it"
            time.sleep(0.05)
        assert record.result is not None
        assert charge("order-3") == "charged"
    finally:
        direct.close()
        store.close()


def test_oncely_check_shows_memory_and_warns_when_full_or_evicting(full: RedisServer) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["check", full.url])
    assert ok.exit_code == 0, ok.output
    assert "maxmemory-policy noeviction" in " ".join(ok.output.split())
    _fill(full.port)
    near = runner.invoke(app, ["check", full.url, "--json"])
    assert near.exit_code == 0, near.output
    assert "near maxmemory" in near.output
    subprocess.run(
        ["redis-cli", "-p", str(full.port), "CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
        check=True,
        capture_output=True,
    )
    evicting = runner.invoke(app, ["check", full.url])
    assert "set it to noeviction" in " ".join(evicting.output.split())


@pytest.fixture
def slow() -> Iterator[RedisServer]:
    server = RedisServer("--enable-debug-command", "yes")
    try:
        yield server
    finally:
        server.stop()


def _pause_server(port: int, command: list[str]) -> threading.Thread:
    """Run ``command`` (DEBUG SLEEP, CLIENT PAUSE) on our own server from another thread."""
    thread = threading.Thread(
        target=subprocess.run,
        args=(["redis-cli", "-p", str(port), *command],),
        kwargs={"capture_output": True, "timeout": 10},
    )
    thread.start()
    return thread


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
@pytest.mark.parametrize(
    "command", [["DEBUG", "SLEEP", "2"], ["CLIENT", "PAUSE", "2000", "ALL"]], ids=str
)
def test_a_slow_redis_fails_claims_closed_within_the_socket_timeout(
    slow: RedisServer, command: list[str]
) -> None:
    store = RedisStore(slow.url, prefix=_prefix(), socket_timeout=0.5)
    runs: list[str] = []

    @idempotent(store=store, key=["k"], lease=2)
    def charge(k: str) -> str:
        runs.append(k)
        return "charged"

    try:
        assert charge("warm") == "charged"
        started_pause = _pause_server(slow.port, command)
        time.sleep(0.2)  # the pause command reached the server
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            charge("order-1")
        assert time.monotonic() - started < 1.5  # the socket timeout, not the pause
        assert runs == ["warm"]
        started_pause.join(10)
        # Back to normal: the claim the server may have run after the pause holds the key
        # for its lease at most; the call runs at most once.
        deadline = time.monotonic() + 8
        while True:
            try:
                assert charge("order-1") == "charged"
                break
            except Exception:  # in flight under the first claim's lease, or still paused
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert runs == ["warm", "order-1"]
    finally:
        store.close()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
async def test_a_slow_redis_async_tasks_fail_closed_within_the_socket_timeout(
    slow: RedisServer,
) -> None:
    store = RedisStore(slow.url, prefix=_prefix(), socket_timeout=0.5)
    try:
        assert isinstance(await store.aclaim(RecordKey("slow", digest_key("w")), "fp", 5, 60), New)
        pause = _pause_server(slow.port, ["DEBUG", "SLEEP", "2"])
        await asyncio.sleep(0.2)
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(store.aclaim(RecordKey("slow", digest_key(f"k{i}")), "fp", 5, 60) for i in range(20)),
            return_exceptions=True,
        )
        assert time.monotonic() - started < 1.5
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        await asyncio.to_thread(pause.join, 10)
        replay = await store.aclaim(RecordKey("slow", digest_key("w")), "fp", 5, 60)
        assert not isinstance(replay, Replay)  # still in progress (never completed)
    finally:
        await store.aclose()
        store.close()


# -- a server with a lower proto-max-bulk-len (redteam4) ------------------------------------------
@pytest.fixture(scope="module")
def small_bulk() -> Iterator[RedisServer]:
    server = RedisServer("--proto-max-bulk-len", "1mb")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("size", [2_000_000, 20_000_000])
def test_a_result_over_the_servers_bulk_limit_is_ran_not_storable(
    small_bulk: RedisServer, size: int
) -> None:
    # The store assumes Redis's default proto-max-bulk-len (512 MB: it cannot read the setting
    # on managed servers). A server set lower refused the completion -- "invalid bulk length"
    # (a plain StoreError: the key stayed claimed, and after the lease a retry ran the body
    # again), or for a bigger one a hang-up mid-send (an outage: ResultNotStored, a background
    # settle, and again a second run). Both are now ResultTooLarge: ran, result not storable.
    store = RedisStore(small_bulk.url, prefix=_prefix())
    runs: list[str] = []

    @idempotent(store=store, name="big-redis", key=["k"], lease=2, wait_timeout=5)
    def export(k: str) -> str:
        runs.append(k)
        return "x" * size

    try:
        with pytest.raises(ResultTooLarge, match="proto-max-bulk-len"):
            export("o-1")
        with pytest.raises(SerializationError, match="already ran"):
            export("o-1")
        assert runs == ["o-1"]
    finally:
        store.close()


async def test_the_async_face_takes_a_hang_up_on_a_big_result_for_too_large(
    small_bulk: RedisServer,
) -> None:
    store = RedisStore(small_bulk.url, prefix=_prefix())
    try:
        key = RecordKey.of("t", "async-big")
        outcome = await store.aclaim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        for size in (2_000_000, 20_000_000):
            with pytest.raises(ResultTooLarge):
                await store.acomplete(key, outcome.fence, b"x" * size, "raw", 60)
        await store.acomplete(key, outcome.fence, b"fits", "raw", 60)  # the claim is intact
    finally:
        await store.aclose()
        store.close()


def test_a_big_result_to_a_redis_that_is_down_is_still_an_outage() -> None:
    # The hang-up counts as a refusal only if the server answers right after; a server that
    # is gone is the outage it looks like.
    server = RedisServer("--proto-max-bulk-len", "1mb")
    store = RedisStore(server.url, prefix=_prefix())
    try:
        key = RecordKey.of("t", "down-big")
        outcome = store.claim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        server.stop()
        with pytest.raises(StoreUnavailable):
            store.complete(key, outcome.fence, b"x" * 2_000_000, "raw", 60)
    finally:
        store.close()
        server.stop()
