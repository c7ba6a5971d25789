"""A store or lock backend opened before ``fork()`` (Gunicorn ``--preload``, multiprocessing's
fork start method) works in the children and in the parent at the same time.

Red-team input (session brief, item 4): a PostgreSQL store used by a parent and then by three
forked children shared the parent's pooled connections; their statements interleaved on one
socket, so processes read each other's replies (a child's ``get`` returned the parent's
result, claims came back as someone else's record). Each test forks for real, on the real
server, while the parent keeps working, then checks every process got exactly its own
answers, a lease renewal ran in the child (its renewal threads started anew), and the parent's
connections still work after the children are gone.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncely import current_claim, idempotent
from oncely.backends.forks import inherited_count
from oncely.core.records import New, RecordKey
from oncely.errors import LockNotOwned
from oncely.locks import Lock
from oncely.stores import Store
from test_http_chunked import serving
from test_http_servers import free_port, server_env

from conftest import POSTGRES_URL, REDIS_URL, SHARED_KINDS, StoreFactory

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()"),
]

CHILDREN = 3
ROUNDS = 60


def round_trips(store: Store, tag: str, rounds: int = ROUNDS) -> list[str]:
    """Claim, complete and read back ``rounds`` fresh keys; the problems seen."""
    problems = []
    for _ in range(rounds):
        key = RecordKey("fork", uuid.uuid4().hex * 2)
        try:
            outcome = store.claim(key, tag, 5, 60)
            if not isinstance(outcome, New):
                problems.append(f"fresh key claimed as {outcome!r}")
                continue
            store.complete(key, outcome.fence, tag.encode(), "raw", 60)
            record = store.get(key)
            if record is None or record.result != tag.encode() or record.fingerprint != tag:
                problems.append(f"read back {record!r}")
        except Exception as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
    return problems


def in_children(work: Callable[[int], list[str]], parent: Callable[[], list[str]]) -> None:
    """Fork :data:`CHILDREN` children running ``work(i)`` while the parent runs ``parent()``;
    fail with every problem any process reported."""
    pipes, pids = [], []
    for index in range(CHILDREN):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running any parent cleanup
            os.close(read)
            try:
                problems = work(index)
            except BaseException:
                problems = [traceback.format_exc()]
            os.write(write, "\n".join(problems).encode())
            os._exit(0)
        os.close(write)
        pipes.append(read)
        pids.append(pid)
    problems = [f"parent: {p}" for p in parent()]
    for index, (pid, read) in enumerate(zip(pids, pipes)):
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"child {index} died"
        problems += [f"child {index}: {p}" for p in b"".join(chunks).decode().split("\n") if p]
    assert problems == [], "\n".join(problems[:20])


def renewed_in_child(store: Store, tag: str) -> list[str]:
    """A call outliving its 2 s lease: only a renewal from this process keeps it."""

    @idempotent(store=store, key=["k"], lease=2, name=f"fork.slow.{tag}")
    def slow(k: str) -> str:
        time.sleep(3)
        current_claim().check()  # raises LeaseLost if no renewal was confirmed in time
        return k

    key = uuid.uuid4().hex
    try:
        if slow(key) != key:
            return ["the slow call returned another result"]
    except Exception as exc:
        return [f"the renewed call failed: {type(exc).__name__}: {exc}"]
    return []


def async_renewed_in_child(store: Store, tag: str) -> list[str]:
    """An async call blocking its event loop past its 2 s lease: only a renewal by this
    process's watchdog, through the store's sync face, keeps it."""

    @idempotent(store=store, key=["k"], lease=2, name=f"fork.ablock.{tag}")
    async def blocking(k: str) -> str:
        time.sleep(3)  # blocks the loop: no renewal can run on it
        current_claim().check()  # raises LeaseLost if no renewal was confirmed in time
        return k

    key = uuid.uuid4().hex
    try:
        if asyncio.run(blocking(key)) != key:
            return ["the blocking async call returned another result"]
    except Exception as exc:
        return [f"the blocking async call failed: {type(exc).__name__}: {exc}"]
    return []


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_a_store_opened_before_fork_serves_parent_and_children(
    kind: str, make_store: StoreFactory
) -> None:
    store = make_store(kind)[0]
    assert round_trips(store, "before", 3) == []  # the parent's connections are open now
    asyncio.run(store.aget(RecordKey("fork", "0" * 64)))  # and an event loop's

    def child(index: int) -> list[str]:
        tag = f"child{index}"
        problems = round_trips(store, tag)
        problems += renewed_in_child(store, tag)
        problems += async_renewed_in_child(store, tag)

        async def async_face() -> list[str]:
            key = RecordKey("fork", uuid.uuid4().hex * 2)
            outcome = await store.aclaim(key, tag, 5, 60)
            assert isinstance(outcome, New)
            await store.acomplete(key, outcome.fence, tag.encode(), "raw", 60)
            record = await store.aget(key)
            return [] if record is not None and record.result == tag.encode() else ["async"]

        problems += asyncio.run(async_face())
        if kind in ("sqlite", "postgres", "mysql") and inherited_count() == 0:
            problems.append("nothing was set aside: the parent's connections were reused")
        return problems

    in_children(child, lambda: round_trips(store, "parent"))
    # The children exited (and collected their garbage): the parent's connections still work.
    assert round_trips(store, "after", 5) == []


def test_a_pipelined_redis_store_never_shares_its_pipelines_with_children() -> None:
    """The auto-pipelines (:mod:`oncely.backends.autopipe`) hold their own connections, outside
    redis-py's pools (which reset themselves in a child): the group-commit pipeline of the
    threads and one pipeline per event loop, with its sender and reader tasks. A child that
    kept the parent's would write on the parent's socket and read its replies. Here the parent
    keeps both faces busy (threads, and a loop of its own in a thread) while the children
    work; every process must get only its own answers, and each child's pipelines must be new."""
    from oncely.backends.autopipe import AsyncPipeline, SyncPipeline
    from oncely.stores.redis import RedisStore

    store = RedisStore(REDIS_URL, prefix=f"oncely-fork-{uuid.uuid4().hex[:8]}")
    redis = store.redis
    sync_pipe = redis._pipeline
    assert isinstance(sync_pipe, SyncPipeline)
    assert round_trips(store, "before", 3) == []
    parents_socket = sync_pipe._connection._sock
    assert parents_socket is not None

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    async def async_round_trips(tag: str, rounds: int) -> list[str]:
        problems = []
        for _ in range(rounds):
            key = RecordKey("fork", uuid.uuid4().hex * 2)
            outcome = await store.aclaim(key, tag, 5, 60)
            if not isinstance(outcome, New):
                problems.append(f"async: fresh key claimed as {outcome!r}")
                continue
            await store.acomplete(key, outcome.fence, tag.encode(), "raw", 60)
            record = await store.aget(key)
            if record is None or record.result != tag.encode():
                problems.append(f"async: read back {record!r}")
        return problems

    def on_parents_loop(tag: str, rounds: int) -> list[str]:
        return asyncio.run_coroutine_threadsafe(async_round_trips(tag, rounds), loop).result(30)

    try:
        assert on_parents_loop("before", 3) == []
        parents_apipe = asyncio.run_coroutine_threadsafe(_ascripts(redis), loop).result(5)
        assert isinstance(parents_apipe, AsyncPipeline) and parents_apipe._session is not None

        def child(index: int) -> list[str]:
            tag = f"child{index}"
            problems = []
            if sync_pipe._connection is not None:
                problems.append("the child kept the parent's pipelined connection")
            if not parents_apipe._closed or parents_apipe._session is not None:
                problems.append("the parent loop's pipeline stayed usable in the child")
            problems += round_trips(store, tag)
            sock = sync_pipe._connection and sync_pipe._connection._sock
            if sock is None or sock is parents_socket:
                problems.append(f"the child's pipeline writes on {sock!r}")

            async def async_face() -> list[str]:
                mine = await _ascripts(redis)
                found = [] if mine is not parents_apipe else ["the parent's async pipeline"]
                return found + await async_round_trips(tag, ROUNDS)

            problems += asyncio.run(async_face())
            if inherited_count() == 0:
                problems.append("nothing was set aside: the parent's pipelines were reused")
            return problems

        def parent() -> list[str]:
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(round_trips, store, f"parent{i}") for i in range(3)]
                futures.append(pool.submit(on_parents_loop, "parent-async", ROUNDS))
                return [p for f in futures for p in f.result()]

        in_children(child, parent)
        assert round_trips(store, "after", 5) == []
        assert on_parents_loop("after", 5) == []
        assert sync_pipe._connection._sock is parents_socket  # the parent's own, still in use
    finally:
        asyncio.run_coroutine_threadsafe(redis.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
        store.close()


async def _ascripts(redis: Any) -> Any:
    return redis.ascripts()


LOCK_URLS = {
    "sqlite": lambda tmp: f"sqlite:///{tmp}/locks.db",
    "postgres": lambda tmp: POSTGRES_URL,
    "redis": lambda tmp: REDIS_URL,
}


@pytest.mark.parametrize("kind", list(LOCK_URLS))
def test_a_lock_backend_opened_before_fork_serves_parent_and_children(
    kind: str, tmp_path: Any
) -> None:
    url = LOCK_URLS[kind](tmp_path)
    prefix = f"fork-{uuid.uuid4().hex[:8]}"
    with Lock(url, f"{prefix}-warm", ttl=5):  # opens the backend's pool in the parent
        pass

    def hold(tag: str, rounds: int = 20) -> list[str]:
        problems = []
        for i in range(rounds):
            name = f"{prefix}-{tag}-{i}"
            first, second = Lock(url, name, ttl=5), Lock(url, name, ttl=5)
            if not first.acquire(timeout=5):
                problems.append(f"{name}: not acquired")
                continue
            if second.acquire(blocking=False):  # another holder while first holds it
                problems.append(f"{name}: two holders")
                second.release()
            first.release()
        return problems

    def child(index: int) -> list[str]:
        problems = hold(f"child{index}")
        # A held lock outliving its ttl, kept by the child's own renewal.
        lock = Lock(url, f"{prefix}-renewed-{index}", ttl=2, auto_renew=True)
        with lock:
            time.sleep(3)
            try:
                lock.check()
            except Exception as exc:
                problems.append(f"renewal: {type(exc).__name__}: {exc}")
        return problems

    in_children(child, lambda: hold("parent"))
    assert hold("after", 3) == []


@pytest.mark.parametrize("kind", list(LOCK_URLS))
def test_a_lock_held_at_fork_stays_the_parents(kind: str, tmp_path: Any) -> None:
    """A child's copy of a held Lock does not hold it: its release would free the parent's
    lock (same owner token) while the parent still works under it."""
    url = LOCK_URLS[kind](tmp_path)
    name = f"fork-held-{uuid.uuid4().hex[:8]}"
    lock = Lock(url, name, ttl=5)
    token = lock.acquire(timeout=5)

    def child(index: int) -> list[str]:
        problems = []
        try:
            lock.release()
            problems.append("the child released the parent's lock")
        except LockNotOwned:
            pass
        if Lock(url, name, ttl=5).acquire(blocking=False) is not None:
            problems.append("the lock was free while the parent held it")
        return problems

    in_children(child, lambda: [])
    lock.check()  # still the parent's
    assert lock.token == token
    lock.release()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_a_lock_another_thread_held_at_fork_does_not_hang_the_child(
    kind: str, make_store: StoreFactory
) -> None:
    """Only the forking thread survives a fork; a lock another thread held stays locked in the
    child forever unless it is made anew (on Redis: the group-commit pipeline's mutex)."""
    store = make_store(kind)[0]
    assert round_trips(store, "before", 1) == []
    held = {
        "memory": lambda: store._cond,  # type: ignore[attr-defined]
        "sqlite": lambda: store._connections._lock,  # type: ignore[attr-defined]
        "redis": lambda: store.redis._pipeline._mutex,  # type: ignore[attr-defined]
    }[kind]()
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with held:
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(5)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if round_trips(store, "child", 3) == [] else 1)
        deadline = time.monotonic() + 15
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the child hung on a lock another thread held at the fork")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        leave.set()
        thread.join()


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_gunicorn_preload_workers_do_not_share_the_masters_connections(
    kind: str, make_store: StoreFactory, tmp_path: Path
) -> None:
    """Gunicorn ``--preload`` imports the app (which uses its store) in the master, then forks
    the workers. Every request must get its own answer: 40 new keys run 40 times, and their
    retries replay exactly their own responses."""
    store, url, options = make_store(kind)
    store.init_schema()
    executions = tmp_path / "executions.log"
    if kind in ("postgres", "mysql"):
        options = {**options, "create_schema": False}
    env = server_env(url, options, executions)
    port = free_port()
    command = [
        sys.executable, "-m", "gunicorn", "http_apps.preload_app:wsgi_app", "--preload",
        "--workers", "2", "--worker-class", "gthread", "--threads", "8",
        "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
    ]  # fmt: skip
    keys = [f'"{uuid.uuid4()}"' for _ in range(40)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            return await asyncio.gather(
                *[
                    client.post(
                        "/orders",
                        content=b'{"item": "%d"}' % i,
                        headers={"Idempotency-Key": key, "Authorization": "Bearer a"},
                    )
                    for i, key in enumerate(keys)
                ]
            )

    with serving(command, env, f"http://127.0.0.1:{port}"):
        first = asyncio.run(fire())
        again = asyncio.run(fire())
    assert [r.status_code for r in first] == [201] * 40, [r.text[:100] for r in first]
    assert not any("idempotent-replayed" in r.headers for r in first)
    assert len(executions.read_text().split()) == 40
    assert all(r.headers.get("idempotent-replayed") == "true" for r in again)
    assert [r.content for r in again] == [r.content for r in first]
