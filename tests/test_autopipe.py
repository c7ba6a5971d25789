"""Auto-pipelining on redis-py (oncely.backends.autopipe) and the Redis pools under concurrency.

Against the real Redis (``ONCELY_TEST_REDIS``) or a private ``redis-server`` that a test may pause
(SIGSTOP). What is checked: concurrent commands share writes and every caller gets its own reply;
a caller alone still makes one write per command; a cancelled caller or an error reply does not
shift anyone else's reply; a server that stops answering fails the calls in flight within the
socket timeout and the next call reconnects; a bounded pool waits for a connection (bounded) or
says it is exhausted, instead of raising redis-py's ``MaxConnectionsError`` at once.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from oncely.backends.autopipe import AsyncPipeline, SyncPipeline
from oncely.core.records import New, RecordKey
from oncely.errors import StoreUnavailable
from oncely.stores.redis import RedisStore

from lock_workers import RedisServer

REDIS_URL = os.environ.get("ONCELY_TEST_REDIS", "redis://127.0.0.1:6379/0")


class _CountingWriter:
    """A connection's stream writer that counts its writes (the pipeline writes a batch
    straight to it when the write cannot wait, else through ``send_packed_command``)."""

    def __init__(self, writer: Any, owner: type[CountingAsyncConnection]) -> None:
        self._writer = writer
        self._owner = owner

    def writelines(self, data: Any) -> None:
        self._owner.writes += 1
        self._writer.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class CountingAsyncConnection(redis.asyncio.Connection):
    writes = 0

    async def _connect(self) -> None:
        await super()._connect()
        self._writer = _CountingWriter(self._writer, type(self))  # type: ignore[assignment]


class CountingConnection(redis.Connection):
    writes = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        super().send_packed_command(command, check_health)


def _kwargs(url: str = REDIS_URL, timeout: float = 5.0) -> dict[str, Any]:
    kwargs = dict(redis.ConnectionPool.from_url(url).connection_kwargs)
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    return kwargs


def _apipe(url: str = REDIS_URL, timeout: float = 5.0) -> AsyncPipeline:
    class Counting(CountingAsyncConnection):
        writes = 0

    pipe = AsyncPipeline(lambda: Counting(**_kwargs(url, timeout)), timeout)
    pipe.counter = Counting  # type: ignore[attr-defined]
    return pipe


async def test_concurrent_commands_share_writes_and_get_their_own_replies() -> None:
    pipe = _apipe()
    try:
        await pipe.execute_command("PING")  # connect (the handshake's writes are not counted)
        before = pipe.counter.writes  # type: ignore[attr-defined]
        replies = await asyncio.gather(*(pipe.execute_command("ECHO", f"v{i}") for i in range(300)))
        assert replies == [f"v{i}".encode() for i in range(300)]
        writes = pipe.counter.writes - before  # type: ignore[attr-defined]
        assert writes <= 2, writes  # one loop iteration's commands go out in one write
        # One caller alone: one write per command, one round trip each.
        before = pipe.counter.writes  # type: ignore[attr-defined]
        for i in range(5):
            assert await pipe.execute_command("ECHO", str(i)) == str(i).encode()
        assert pipe.counter.writes - before == 5  # type: ignore[attr-defined]
    finally:
        await pipe.aclose()


async def test_cancelled_callers_do_not_shift_the_replies_of_others() -> None:
    """Callers are cancelled before and after their command was written; the replies of the
    rest stay matched (the dropped replies are read and thrown away)."""
    pipe = _apipe()
    rng = random.Random(7)
    try:
        for _ in range(20):
            tasks = [
                asyncio.ensure_future(pipe.execute_command("ECHO", f"r{i}")) for i in range(100)
            ]
            victims = rng.sample(range(100), 40)
            for i in victims[:20]:
                tasks[i].cancel()  # before the write
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            for i in victims[20:]:
                tasks[i].cancel()  # most likely written already
            done = await asyncio.gather(*tasks, return_exceptions=True)
            for i, reply in enumerate(done):
                if isinstance(reply, asyncio.CancelledError):
                    assert i in victims
                else:
                    assert reply == f"r{i}".encode()
        assert await pipe.execute_command("ECHO", "after") == b"after"
    finally:
        await pipe.aclose()


async def test_an_error_reply_goes_to_its_own_caller_only() -> None:
    pipe = _apipe()
    try:
        calls = [pipe.execute_command("ECHO", f"e{i}") for i in range(50)]
        calls.insert(25, pipe.execute_command("EVALSHA", "0" * 40, 0))
        out = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(out[25], NoScriptError)
        rest = out[:25] + out[26:]
        assert rest == [f"e{i}".encode() for i in range(50)]
    finally:
        await pipe.aclose()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
async def test_a_silent_server_fails_the_calls_in_flight_within_the_timeout(
    private_redis: RedisServer,
) -> None:
    pipe = _apipe(private_redis.url, timeout=0.5)
    try:
        assert await pipe.execute_command("PING") in (b"PONG", True)
        private_redis.pause()
        try:
            started = time.monotonic()
            out = await asyncio.gather(
                *(pipe.execute_command("ECHO", str(i)) for i in range(20)),
                return_exceptions=True,
            )
            assert time.monotonic() - started < 2.0
            assert all(isinstance(e, (RedisTimeoutError, redis.ConnectionError)) for e in out)
        finally:
            private_redis.resume()
        # The connection whose replies could no longer be matched was dropped: a new one works.
        assert await pipe.execute_command("ECHO", "back") == b"back"
    finally:
        await pipe.aclose()


def test_threads_share_writes_and_get_their_own_replies() -> None:
    class Counting(CountingConnection):
        writes = 0

    pipe = SyncPipeline(lambda: Counting(**_kwargs()))
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(100):
                value = f"t{t}-{i}"
                if i == 50 and t % 4 == 0:
                    with pytest.raises(NoScriptError):
                        pipe.execute_command("EVALSHA", "0" * 40, 0)
                assert pipe.execute_command("ECHO", value) == value.encode()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert Counting.writes < 32 * 100 * 0.9  # batches were shared
    before = Counting.writes
    assert pipe.execute_command("ECHO", "alone") == b"alone"
    assert Counting.writes == before + 1
    pipe.close()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_threads_see_a_silent_server_fail_within_the_timeout(private_redis: RedisServer) -> None:
    pipe = SyncPipeline(lambda: redis.Connection(**_kwargs(private_redis.url, 0.5)))
    assert pipe.execute_command("ECHO", "x") == b"x"
    private_redis.pause()
    outcomes: list[Any] = []
    try:
        started = time.monotonic()

        def call() -> None:
            try:
                outcomes.append(pipe.execute_command("ECHO", "y"))
            except Exception as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        # Leaders take turns; each waits at most one timeout.
        assert time.monotonic() - started < 8 * 0.5 + 2
        assert len(outcomes) == 8
        assert all(isinstance(o, (RedisTimeoutError, redis.ConnectionError)) for o in outcomes)
    finally:
        private_redis.resume()
    assert pipe.execute_command("ECHO", "z") == b"z"
    pipe.close()


# -- the store: red-team fault (a), a bounded pool under concurrency -------------------------------
def _keys(n: int) -> list[RecordKey]:
    return [RecordKey("s", uuid.uuid4().hex) for _ in range(n)]


@pytest.mark.parametrize("options", [{}, {"autopipeline": False}], ids=["pipelined", "pooled"])
async def test_async_claims_beyond_max_connections_wait_instead_of_failing(
    options: dict[str, Any],
) -> None:
    """Red-team fault (a): 200 concurrent claims on a store with ``max_connections=2``. The old
    code raised redis-py's MaxConnectionsError (as StoreUnavailable "is Redis running?") for
    all but two; now scripts share the pipelined connection, and without the pipeline a caller
    waits for a pooled connection (bounded by ``pool_timeout``)."""
    store = RedisStore(
        REDIS_URL,
        prefix=f"oncely-test-{uuid.uuid4().hex}",
        max_connections=2,
        **options,
    )
    keys = _keys(200)
    try:
        out = await asyncio.gather(*(store.aclaim(k, "fp", 5, 30) for k in keys))
        assert all(isinstance(o, New) for o in out)
    finally:
        for k in keys:
            await store.adelete(k)
        await store.aclose()


def test_threads_beyond_max_connections_wait_instead_of_failing() -> None:
    store = RedisStore(REDIS_URL, prefix=f"oncely-test-{uuid.uuid4().hex}", max_connections=2)
    keys = _keys(256)
    out: list[Any] = []

    def work(chunk: list[RecordKey]) -> None:
        for k in chunk:
            try:
                out.append(store.claim(k, "fp", 5, 30))
            except Exception as exc:
                out.append(exc)

    threads = [threading.Thread(target=work, args=(keys[i::32],)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(out) == 256
        assert all(isinstance(o, New) for o in out), [o for o in out if not isinstance(o, New)][:2]
    finally:
        for k in keys:
            store.delete(k)
        store.close()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
async def test_an_exhausted_pool_is_a_bounded_typed_error() -> None:
    """Every pooled connection held for longer than ``pool_timeout``: the next pooled command
    fails with StoreUnavailable naming the pool, after about ``pool_timeout`` seconds, not at
    once and not never."""
    store = RedisStore(
        REDIS_URL,
        prefix=f"oncely-test-{uuid.uuid4().hex}",
        max_connections=1,
        pool_timeout=0.3,
        autopipeline=False,
    )
    key = RecordKey("s", uuid.uuid4().hex)
    try:
        claim = await store.aclaim(key, "fp", 5, 30)
        assert isinstance(claim, New)
        # A pool of one leaves no connection for a subscribed waiter: waiters poll, so their
        # own probes can still run.
        assert await store.awatch(key, claim.fence, 0.2) is False
        pool: Any = store.redis.aclient().connection_pool  # type: ignore[attr-defined]
        held = await pool.get_connection()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no free connection"):
                await store.aget(key)
            assert 0.25 < time.monotonic() - started < 2.0
        finally:
            await pool.release(held)
        assert (await store.aget(key)) is not None
    finally:
        await store.adelete(key)
        await store.aclose()


async def test_an_idle_connection_the_server_closed_is_reopened(private_redis: RedisServer) -> None:
    """A restart closes the idle pipelined connections; the next command must not fail on them
    (they are checked before a write, as redis-py's pool checks on checkout)."""
    apipe = _apipe(private_redis.url)
    spipe = SyncPipeline(lambda: redis.Connection(**_kwargs(private_redis.url)))
    try:
        assert await apipe.execute_command("ECHO", "a") == b"a"
        assert spipe.execute_command("ECHO", "s") == b"s"
        private_redis.restart()
        await asyncio.sleep(0.05)  # let the loop see the close
        assert await apipe.execute_command("ECHO", "b") == b"b"
        assert spipe.execute_command("ECHO", "t") == b"t"
    finally:
        await apipe.aclose()
        spipe.close()


async def test_cancelled_claims_leave_every_other_claim_its_own_reply() -> None:
    """Claims of 200 tasks share the pipelined connection; a third of them are cancelled at
    random points. Every claim that returned got the reply of its own key (its fence is the
    one the store keeps for that key), so no reply went to the wrong caller."""
    store = RedisStore(REDIS_URL, prefix=f"oncely-test-{uuid.uuid4().hex}")
    keys = _keys(200)
    rng = random.Random(3)
    try:
        tasks = [
            asyncio.ensure_future(store.aclaim(k, f"fp-{i}", 5, 30)) for i, k in enumerate(keys)
        ]
        for _ in range(3):
            await asyncio.sleep(0)
            for i in rng.sample(range(200), 22):
                tasks[i].cancel()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        answered = [(k, o) for k, o in zip(keys, out) if isinstance(o, New)]
        assert len(answered) >= 100
        assert all(isinstance(o, (New, asyncio.CancelledError)) for o in out)
        for key, outcome in answered:
            record = await store.aget(key)
            assert record is not None and record.fence == outcome.fence
            assert record.fingerprint == f"fp-{keys.index(key)}"
    finally:
        for k in keys:
            await store.adelete(k)
        await store.aclose()


async def test_the_pipeline_survives_its_tasks_being_cancelled() -> None:
    """Some code cancels every other task (a shutdown hook, a test harness): the sender and
    reader go with them, and the next command must neither hang nor fail."""
    pipe = _apipe()
    try:
        assert await pipe.execute_command("ECHO", "1") == b"1"
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        assert await asyncio.wait_for(pipe.execute_command("ECHO", "2"), 5) == b"2"
    finally:
        await pipe.aclose()
