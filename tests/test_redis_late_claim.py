"""A claim the server runs after its caller gave up decides nothing (red team rt14, F1).

Redis paused (SIGSTOP) longer than a running call's lease: a duplicate's claim is written to
the socket, its caller's budget ends (StoreUnavailable: nothing decided), and when Redis
resumes it runs the queued claim. The holder's lease had ended by the store's clock, so the
late claim took the key over with a fence nobody owned: the holder's completion was refused
("another caller re-claimed the key") and a retry ran the body a second time. Now a claim
carries a bound in the store's clock (the end of its caller's budget, from an estimate of that
clock; oncely.core.storeclock) and claim.lua refuses it, writing nothing, once the store's
time is past it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
import redis

from oncely import idempotent
from oncely.core.records import New, RecordKey
from oncely.errors import InFlightError, ResultNotStored, StoreUnavailable
from oncely.stores import open_store
from oncely.stores.redis import _CLAIM, RedisStore

from lock_workers import RedisServer

pytestmark = pytest.mark.timeout(120)

LEASE = 2.0
BUDGET = 0.5


def _store(server: RedisServer) -> RedisStore:
    store = open_store(server.url, socket_timeout=BUDGET)
    assert isinstance(store, RedisStore)
    return store


class _Loop:
    """An event loop on a thread of its own, kept for the whole test (so its connections stay
    open across the pause); ``run`` waits for a coroutine's outcome from another thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self, *stores: RedisStore) -> None:
        for store in stores:
            self.run(store.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.mark.serial
@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_claim_queued_in_a_paused_server_does_not_take_the_key_over(
    private_redis: RedisServer, face: str
) -> None:
    holder_store = _store(private_redis)
    # The duplicates come from another worker: a store of its own, its connection open.
    other_store = _store(private_redis)
    loop = _Loop() if face == "async" else None
    started, go = threading.Event(), threading.Event()
    runs: list[str] = []

    def make(store: RedisStore) -> Any:
        options: dict[str, Any] = dict(
            store=store, name="late-claim", key=["k"], lease=LEASE, on_duplicate="raise",
            cache_size=0,
        )  # fmt: skip
        if loop is None:

            @idempotent(**options)
            def op(k: str) -> str:
                runs.append(k)
                started.set()
                assert go.wait(60)
                return f"done-{len(runs)}"

            return op

        @idempotent(**options)
        async def aop(k: str) -> str:
            runs.append(k)
            started.set()
            assert await asyncio.to_thread(go.wait, 60)
            return f"done-{len(runs)}"

        return lambda k: loop.run(aop(k))

    holder_op, other_op = make(holder_store), make(other_store)
    warm = RecordKey("warm", uuid.uuid4().hex)
    if loop is None:
        other_store.claim(warm, "", 10, 60)
    else:
        loop.run(other_store.aclaim(warm, "", 10, 60))
    k = uuid.uuid4().hex
    first: list[Any] = []

    def holder() -> None:
        try:
            first.append(holder_op(k))
        except ResultNotStored as exc:  # its completion is stored in the background
            first.append(exc.result)
        except Exception as exc:
            first.append(exc)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert started.wait(30)
        (claimed,) = [
            r for r in holder_store.list() if r.status == "in_progress" and r.scope != "warm"
        ]
        rk = RecordKey(claimed.scope, claimed.digest)
        private_redis.pause()
        paused_at = time.monotonic()
        try:
            # Duplicates while Redis is stopped: each claim is written, the caller gives up.
            for _ in range(2):
                with pytest.raises(StoreUnavailable):
                    other_op(k)
            # The pause outlasts the holder's lease (the scenario), then the body finishes.
            time.sleep(max(0.0, paused_at + LEASE + 1.0 - time.monotonic()))
            go.set()
            thread.join(30)
            assert not thread.is_alive()
        finally:
            private_redis.resume()
        assert first and first[0] == "done-1", first
        # Until the holder's completion (stored in the background) lands, or another caller's
        # claim took the key over (the old fault): a retry before either would find the lease
        # run out and take the key over, as a lease allows.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            record = holder_store.get(rk)
            assert record is not None
            if record.status != "in_progress" or record.fence != claimed.fence:
                break
            time.sleep(0.01)
        # Retries until they replay.
        replayed = None
        deadline = time.monotonic() + 60
        while replayed is None and time.monotonic() < deadline:
            try:
                replayed = other_op(k)
            except (InFlightError, StoreUnavailable):
                time.sleep(0.1)
        assert runs == [k], runs  # the body ran once
        assert replayed == "done-1"
    finally:
        go.set()
        thread.join(30)
        if loop is not None:
            loop.close(holder_store, other_store)
        holder_store.close()
        other_store.close()


def test_claim_lua_refuses_a_claim_past_its_bound_and_writes_nothing(
    private_redis: RedisServer,
) -> None:
    client = redis.Redis(port=private_redis.port)
    try:
        sha = client.script_load(_CLAIM.source)
        key, counter = f"late:{uuid.uuid4().hex}", "late:fence"
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
        # A bound one second in the store's past: refused, nothing written.
        reply = client.evalsha(sha, 2, key, counter, "fp", 10_000, 60_000, "", "", now_ms - 1000)
        assert reply[0] == b"L"
        assert int(reply[1]) >= now_ms
        assert client.exists(key, counter) == 0
        assert client.dbsize() == 0
        # The same claim with its bound ahead (or none) claims the key.
        reply = client.evalsha(sha, 2, key, counter, "fp", 10_000, 60_000, "", "", now_ms + 60_000)
        assert reply[0] == b"N"
        other = f"late:{uuid.uuid4().hex}"
        assert client.evalsha(sha, 2, other, counter, "fp", 10_000, 60_000, "", "", "")[0] == b"N"
        assert client.evalsha(sha, 2, f"late:{uuid.uuid4().hex}", counter, "fp", 10_000, 60_000,
                              "", "")[0] == b"N"  # fmt: skip
        # An expired holder is not taken over by a late claim either.
        client.hset(key, "lu", str(now_ms - 5000))
        before = client.hgetall(key)
        reply = client.evalsha(sha, 2, key, counter, "fp2", 10_000, 60_000, "", "", now_ms - 1)
        assert reply[0] == b"L"
        assert client.hgetall(key) == before
    finally:
        client.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_store_refuses_its_own_late_claim_as_unavailable(
    private_redis: RedisServer, face: str
) -> None:
    """The bound the store sends is the end of the caller's budget in the store's clock: an
    estimate that is one minute behind the store makes every claim late, and the caller gets
    StoreUnavailable with nothing written; the refusal's reply corrects the estimate."""
    store = _store(private_redis)

    def claim(key: RecordKey) -> Any:
        if face == "sync":
            return store.claim(key, "", 10, 60)

        async def main() -> Any:
            try:
                return await store.aclaim(key, "", 10, 60)
            finally:
                await store.aclose()

        return asyncio.run(main())

    try:
        key = RecordKey("late", uuid.uuid4().hex)
        assert store._clock.state is None
        claim(RecordKey("late", uuid.uuid4().hex))  # the first claim reads the clock first
        assert store._clock.state is not None
        offset, taken = store._clock.state or (0.0, 0.0)
        store._clock.state = (offset - 60.0, taken)
        with pytest.raises(StoreUnavailable, match="nothing was decided"):
            claim(key)
        assert store.get(key) is None
        assert isinstance(claim(key), New)
    finally:
        store.close()
