"""Redis Cluster (``redis+cluster://``) on a real 6-node cluster of ``redis-server`` processes.

The record store's shared rules run on it in ``test_store_conformance.py`` (the
``redis-cluster`` kind). Here: what only a cluster has, namely locks across slots, the URL and
an unreachable cluster, and a failover (a master killed with SIGKILL under load, its replica
promoted) with what it does to in-flight and completed keys and to fences.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
import uuid
from typing import Any

import pytest
import redis.cluster

from oncely import idempotent
from oncely.core.records import InFlight, New, RecordKey, Replay, digest_key
from oncely.errors import ConfigurationError, StoreUnavailable
from oncely.locks import Lock
from oncely.stores import open_store
from oncely.stores.redis import RedisStore
from redis_cluster import RedisCluster, cluster_url

from conftest import REDIS_URL

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def _prefix() -> str:
    return f"oncely-test-{uuid.uuid4().hex[:12]}"


def test_locks_work_across_slots() -> None:
    """Many lock names (so many slots): acquire, a second holder refused, release, tokens grow;
    a waiter is woken by the release (BLPOP on the lock's slot)."""
    url = cluster_url()
    prefix = _prefix()
    for i in range(20):
        name = f"job-{i}-{uuid.uuid4().hex[:6]}"
        a = Lock(url, name, ttl=5, prefix=prefix)
        b = Lock(url, name, ttl=5, prefix=prefix)
        t1 = a.acquire()
        assert b.acquire(blocking=False) is None
        a.release()
        t2 = b.acquire(blocking=False)
        assert t2 is not None and t2 > t1 > 0
        b.release()
    holder = Lock(url, "handover", ttl=5, prefix=prefix)
    waiter = Lock(url, "handover", ttl=5, prefix=prefix)
    holder.acquire()
    got: list[float] = []

    def wait() -> None:
        waiter.acquire(timeout=5)
        got.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    released = time.monotonic()
    holder.release()
    thread.join(5)
    assert got and got[0] - released < 0.09  # woken, not polled (poll interval 0.1 s)
    waiter.release()


async def test_async_locks_on_a_cluster() -> None:
    url = cluster_url()
    lock = Lock(url, f"async-{uuid.uuid4().hex[:6]}", ttl=5, prefix=_prefix())
    token = await lock.aacquire()
    assert token > 0 and await lock.aowned()
    await lock.arelease()


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:x",
        "redis+cluster://127.0.0.1:7000/1",
        "redis+cluster://",
    ],
)
def test_bad_cluster_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError, match="Redis Cluster URL"):
        open_store(url)


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_an_unreachable_cluster_is_a_bounded_typed_error() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="Redis Cluster"):
        RedisStore("redis+cluster://127.0.0.1:1,127.0.0.1:2", socket_connect_timeout=0.5)
    assert time.monotonic() - started < 5


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
@pytest.mark.parametrize("order", ["unreachable first", "unreachable last"])
async def test_a_partly_reachable_node_list_works(order: str) -> None:
    """The URL's nodes are only where the client starts: one reachable node is enough, in
    either place, sync and async; the unreachable one costs at most its connect timeout."""
    real = cluster_url().split("://")[1].split(",")[0]
    nodes = ["127.0.0.1:1", real] if order == "unreachable first" else [real, "127.0.0.1:1"]
    started = time.monotonic()
    store = RedisStore(
        "redis+cluster://" + ",".join(nodes), prefix=_prefix(), socket_connect_timeout=0.5
    )
    try:
        key = RecordKey("partial", digest_key(order))
        claim = store.claim(key, "fp", 5, 60)
        assert isinstance(claim, New)
        await store.acomplete(key, claim.fence, b"ok", "raw", 60)
        assert isinstance(await store.aclaim(key, "fp", 5, 60), Replay)
        assert time.monotonic() - started < 3
    finally:
        await store.aclose()
        store.close()


def test_a_cluster_url_naming_a_single_server_is_a_configuration_error() -> None:
    """redis+cluster:// pointing at a server without cluster mode (the shared Redis): a
    ConfigurationError saying to use redis://, not a StoreUnavailable that suggests a
    failover."""
    port = REDIS_URL.split("://")[1].split("/")[0].rsplit(":", 1)[1]
    with pytest.raises(ConfigurationError, match=r"not in cluster mode.*redis://"):
        RedisStore(f"redis+cluster://127.0.0.1:{port}")


def test_a_record_and_its_fence_counter_share_a_slot() -> None:
    store = RedisStore(cluster_url(), prefix=_prefix())
    client: Any = store.redis.client
    try:
        for i in range(50):
            key = RecordKey("scope{with}braces", digest_key(str(i)))
            assert client.keyslot(store._key(key)) == client.keyslot(store._fence(key))
    finally:
        store.close()


def _master_of(url: str, key: str) -> int:
    host, port = url.split("://")[1].split(",")[0].split(":")
    client = redis.cluster.RedisCluster(host=host, port=int(port))
    try:
        return int(client.get_node_from_key(key).port)
    finally:
        client.close()


def _master_of_slot(store: RedisStore, key: RecordKey) -> int:
    """The port of the master serving ``key``'s record, from the store's slot map."""
    client: Any = store.redis.client
    return int(client.get_node_from_key(store._key(key)).port)


def test_failover_keeps_replicated_records_and_fences_grow() -> None:
    """Kill (SIGKILL) the master of some keys while claims run; its replica takes over after
    the node timeout (2 s here).

    What oncely promises across a failover, and this checks:

    * every call fails closed while the slot has no master: a claim or completion either
      returns its outcome or raises StoreUnavailable (never a wrong answer);
    * records whose completion the replica had received (``WAIT 1`` confirmed it here) are
      still there afterwards and replay;
    * fences keep growing for a key: a fence is ``max(counter + 1, TIME in µs, old + 1)``, and
      the promoted replica's clock is past any fence the lost writes could have handed out,
      because a failover takes longer than the node timeout.

    What it does not promise: Redis replicates asynchronously, so a completion acknowledged
    by the old master in the last moments before the kill may be lost (its key is then free
    again, and the work may run a second time). By default oncely does not send ``WAIT``
    after each decision (it costs a replica round trip per call); ``wait_replicas`` does
    (tests/test_redis_durable.py, docs/redis.md "Failover").
    """
    cluster = RedisCluster()
    cluster.start()
    try:
        url = cluster.url
        store = RedisStore(url, prefix=_prefix(), socket_timeout=1.0, socket_connect_timeout=1.0)
        scope = "failover"
        keys = [RecordKey(scope, digest_key(f"k{i}")) for i in range(60)]
        fences = {}
        for key in keys:
            claim = store.claim(key, "fp", 30, 600)
            assert isinstance(claim, New)
            store.complete(key, claim.fence, b"done", "raw", 600)
            fences[key] = claim.fence
        # The replicas have every completion so far.
        host, port = url.split("://")[1].split(",")[0].split(":")
        admin = redis.cluster.RedisCluster(host=host, port=int(port))
        admin.execute_command("WAIT", 1, 2000, target_nodes=redis.cluster.RedisCluster.PRIMARIES)
        admin.close()
        victim = _master_of(url, store._key(keys[0]))
        # Load while the master dies: claims of new keys, each fail-closed or decided.
        outcomes: list[Any] = []
        stop = threading.Event()
        # And calls with wait_replicas=1 on the victim's keys: every completion it acknowledged
        # must survive the failover (WAIT: the replica had it before the call returned).
        durable = RedisStore(
            url, prefix=store.prefix, socket_timeout=1.0, socket_connect_timeout=1.0,
            wait_replicas=1, wait_timeout_ms=500,
        )  # fmt: skip
        acknowledged: list[RecordKey] = []
        durable_outcomes: list[Any] = []

        def durable_load() -> None:
            i = 0
            while not stop.is_set():
                key = RecordKey(scope, digest_key(f"durable-{i}"))
                i += 1
                if _master_of_slot(durable, key) != victim:
                    continue
                try:
                    claim = durable.claim(key, "fp", 30, 600)
                    assert isinstance(claim, New)
                    durable.complete(key, claim.fence, b"kept", "raw", 600)
                    acknowledged.append(key)
                except StoreUnavailable as exc:  # NotReplicated included
                    durable_outcomes.append(exc)

        def load() -> None:
            i = 0
            while not stop.is_set():
                key = RecordKey(scope, digest_key(f"load-{i}"))
                try:
                    outcomes.append(store.claim(key, "fp", 30, 600))
                except StoreUnavailable as exc:
                    outcomes.append(exc)
                i += 1

        thread = threading.Thread(target=load)
        thread.start()
        durable_thread = threading.Thread(target=durable_load)
        durable_thread.start()
        time.sleep(0.2)
        os.kill(cluster.procs[victim].pid, signal.SIGKILL)
        cluster.procs.pop(victim).wait(5)
        cluster.wait_ok(timeout=20)  # the replica was promoted
        time.sleep(0.5)
        stop.set()
        thread.join(10)
        durable_thread.join(10)
        assert all(isinstance(o, (New, StoreUnavailable)) for o in outcomes)
        assert any(isinstance(o, StoreUnavailable) for o in outcomes)  # the slot had no master
        # Completed (and replicated) records survived and replay; fences only grew.
        deadline = time.monotonic() + 10
        while True:
            try:
                replays = [store.claim(key, "fp", 30, 600) for key in keys]
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert all(isinstance(r, Replay) for r in replays)
        # Every completion wait_replicas acknowledged before or during the kill survived.
        assert acknowledged
        # (Read through the plain store: the promoted master has no replica left, so every
        # call of the durable store would now wait its wait_timeout_ms, replays included.)
        survived = [store.claim(key, "fp", 30, 600) for key in acknowledged]
        assert all(isinstance(r, Replay) and r.record.result == b"kept" for r in survived)
        # The durable store found the promoted master too: a connection error made it re-read
        # the slot map (else it would try the dead node forever). A replay needs no ack.
        again = durable.claim(acknowledged[0], "fp", 30, 600)
        assert isinstance(again, Replay) and again.record.result == b"kept"
        durable.close()
        for key in keys[:10]:
            assert store.delete(key)
            again = store.claim(key, "fp", 30, 600)
            assert isinstance(again, New) and again.fence > fences[key]
        store.close()
    finally:
        cluster.stop()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
async def test_waiters_on_a_cluster_are_woken_across_nodes() -> None:
    """A waiter (subscribed on one node) is woken by the completion published on another."""
    store = RedisStore(cluster_url(), prefix=_prefix())
    key = RecordKey("w", digest_key(uuid.uuid4().hex))
    claim = await store.aclaim(key, "fp", 30, 60)
    assert isinstance(claim, New)
    waiter = asyncio.ensure_future(store.awatch(key, claim.fence, 10))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await store.acomplete(key, claim.fence, b"r", "raw", 60)
    assert await waiter is True
    assert time.monotonic() - started < 1.0  # the message, not the 30 s lease
    assert isinstance(await store.aclaim(key, "fp", 30, 60), Replay)
    assert not isinstance(await store.aclaim(key, "fp", 30, 60), InFlight)
    await store.adelete(key)
    await store.aclose()


@pytest.mark.serial
def test_sync_threads_beyond_a_cluster_pool_wait_for_a_connection() -> None:
    """The sync cluster client's per-node pools wait (pool_timeout) for a free connection:
    redis-py's plain node pools raised MaxConnectionsError at once."""
    store = open_store(cluster_url(), prefix=_prefix(), max_connections=2)

    @idempotent(store=store, name=f"pool-{uuid.uuid4().hex[:6]}", key=["k"])
    def f(k: str) -> str:
        time.sleep(0.01)
        return k

    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def one(i: int) -> None:
        start.wait()
        try:
            for j in range(5):
                f(f"k{i}-{j}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
