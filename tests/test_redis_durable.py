"""``wait_replicas``: claims, completions and renewals acknowledged by replicas (Redis ``WAIT``).

On servers of our own (a master and a replica on free ports, started here) and on the session's
6-node cluster (tests/redis_cluster.py). What is checked:

* the decision is on the replica when the call returns (the replica is read directly);
* ``WAIT`` runs on the connection (and node) that ran the script, in the same write;
* a replica that does not acknowledge: a claim raises :class:`NotReplicated` (a
  :class:`StoreUnavailable`) within about ``wait_timeout_ms``, the body does not run and the
  key is free again; a completion is never released: the caller gets ``ResultNotStored`` and
  the background retry stores it once a replica acknowledges;
* the options are checked like every other (typos, bad values, a timeout not under the socket
  timeout).
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from oncely import idempotent
from oncely.core.records import New, RecordKey, Replay, digest_key
from oncely.errors import (
    ConfigurationError,
    NotReplicated,
    ResultNotStored,
    StoreUnavailable,
)
from oncely.stores import open_store
from oncely.stores.redis import RedisStore
from redis_cluster import RedisServer, cluster_url

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def _prefix() -> str:
    return f"oncely-cluster2-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master and its replica, both ours."""
    master = RedisServer()
    replica = RedisServer(replica_of=master.port)
    try:
        master.wait_replicas(1)
        yield master, replica
    finally:
        replica.stop()
        master.stop()


def _waits(server: RedisServer) -> int:
    """How many WAIT commands the server ran (INFO commandstats)."""
    for line in server.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_wait:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def test_decisions_are_on_the_replica_when_the_call_returns(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = pair
    store = RedisStore(f"{master.url}?wait_replicas=1&wait_timeout_ms=1000", prefix=_prefix())
    direct = redis.Redis(port=replica.port)
    waits = _waits(master)
    try:
        for i in range(30):
            key = RecordKey("durable", digest_key(f"k{i}"))
            claim = store.claim(key, "fp", 5, 60)
            assert isinstance(claim, New)
            assert direct.hget(store._key(key), "st") == b"in_progress"
            store.complete(key, claim.fence, b"done", "raw", 60)
            assert (direct.hget(store._key(key), "st") or b"")[:1] == b"C"  # completed (packed)
            assert direct.hget(store._key(key), "rs") == b"done"
            assert isinstance(store.claim(key, "fp", 5, 60), Replay)
        # claim, complete and the replayed claim; the first claim and completion found no
        # script loaded (NOSCRIPT, then EVAL and WAIT again).
        assert 90 <= _waits(master) - waits <= 92
    finally:
        direct.close()
        store.close()


async def test_async_decisions_are_on_the_replica(pair: tuple[RedisServer, RedisServer]) -> None:
    master, replica = pair
    store = RedisStore(master.url, prefix=_prefix(), wait_replicas=1, wait_timeout_ms=1000)
    direct = redis.Redis(port=replica.port)
    try:

        async def one(i: int) -> None:
            key = RecordKey("durable", digest_key(f"a{i}"))
            claim = await store.aclaim(key, "fp", 5, 60)
            assert isinstance(claim, New)
            await store.acomplete(key, claim.fence, b"done", "raw", 60)
            assert (direct.hget(store._key(key), "st") or b"")[:1] == b"C"  # completed (packed)

        await asyncio.gather(*(one(i) for i in range(20)))
    finally:
        direct.close()
        await store.aclose()
        store.close()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_a_claim_no_replica_acknowledges_fails_closed_and_frees_the_key() -> None:
    master = RedisServer()
    replica = RedisServer(replica_of=master.port)
    try:
        master.wait_replicas(1)
        store = RedisStore(master.url, prefix=_prefix(), wait_replicas=1, wait_timeout_ms=300)
        runs: list[str] = []

        @idempotent(store=store, key=["k"], lease=5)
        def charge(k: str) -> str:
            runs.append(k)
            return "charged"

        assert charge("before") == "charged"
        replica.stop()
        started = time.monotonic()
        with pytest.raises(NotReplicated, match="acknowledged by 0 of the 1 replicas") as caught:
            charge("order-1")
        took = time.monotonic() - started
        assert isinstance(caught.value, StoreUnavailable)
        assert caught.value.acked == 0 and caught.value.wanted == 1
        assert 0.25 < took < 2  # bounded by wait_timeout_ms, not by a lease or the socket
        assert runs == ["before"]  # the body did not run
        # The claim was released: the key is free (no in-flight record left behind).
        assert store.get(RecordKey(charge_scope(store), digest_key("order-1"))) is None
        # Without a replica every call fails closed; with one back, it runs once.
        again = RedisServer(replica_of=master.port)
        try:
            master.wait_replicas(1)
            assert charge("order-1") == "charged"
            assert charge("order-1") == "charged"
            assert runs == ["before", "order-1"]
        finally:
            again.stop()
        store.close()
    finally:
        replica.stop()
        master.stop()


def charge_scope(store: RedisStore) -> str:
    """The scope the decorated ``charge`` of these tests records under."""
    for record in store.list(limit=10):
        return record.scope
    raise AssertionError("no record")


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_a_completion_no_replica_acknowledges_is_kept_and_stored_later() -> None:
    """The body ran: the key is never released. The caller gets ResultNotStored (with the
    result); a duplicate replays the outcome the master has; once a replica is back, the
    background retry gets it acknowledged."""
    master = RedisServer()
    replica = RedisServer(replica_of=master.port)
    later: RedisServer | None = None
    try:
        master.wait_replicas(1)
        store = RedisStore(master.url, prefix=_prefix(), wait_replicas=1, wait_timeout_ms=200)
        runs: list[str] = []

        @idempotent(store=store, key=["k"], lease=3)
        def charge(k: str) -> str:
            runs.append(k)
            replica.stop()  # the claim was acknowledged; the completion will not be
            return "charged"

        started = time.monotonic()
        with pytest.raises(ResultNotStored) as caught:
            charge("order-2")
        assert caught.value.result == "charged"
        assert time.monotonic() - started < 3  # 3 tries of 0.2 s and two short pauses
        # The master has the outcome: a duplicate replays it (the body does not run again).
        assert charge("order-2") == "charged"
        later = RedisServer(replica_of=master.port)
        master.wait_replicas(1)
        # The background retry stores it again until a replica acknowledges (the repeat is a
        # write, so its WAIT covers the first completion too).
        direct = redis.Redis(port=later.port)
        (record,) = store.list(limit=10)
        record_key = store._key(RecordKey(record.scope, record.digest))
        deadline = time.monotonic() + 15
        while (direct.hget(record_key, "st") or b"")[:1] != b"C":  # not completed yet
            assert time.monotonic() < deadline, "the completion never reached the replica"
            time.sleep(0.05)
        direct.close()
        assert runs == ["order-2"]
        store.close()
    finally:
        if later is not None:
            later.stop()
        replica.stop()
        master.stop()


def test_cluster_decisions_wait_on_the_node_that_ran_the_script() -> None:
    """Keys on every master: each claim and completion is on that master's replica when it
    returns (read from the replicas directly), with ``?wait_replicas=1`` in the URL."""
    url = cluster_url()
    store = RedisStore(url + "?wait_replicas=1&wait_timeout_ms=1000", prefix=_prefix())
    client: Any = store.redis.client
    try:
        masters = set()
        for i in range(40):
            key = RecordKey("durable", digest_key(f"c{i}"))
            claim = store.claim(key, "fp", 5, 60)
            assert isinstance(claim, New)
            store.complete(key, claim.fence, b"done", "raw", 60)
            slot = client.keyslot(store._key(key))
            master = client.nodes_manager.get_node_from_slot(slot)
            masters.add(master.port)
            replicas = _replicas_of(master.port)
            assert replicas
            for port in replicas:
                direct = redis.Redis(port=port)
                try:
                    direct.execute_command("READONLY")
                    assert (direct.hget(store._key(key), "st") or b"")[
                        :1
                    ] == b"C"  # completed (packed)
                finally:
                    direct.close()
        assert len(masters) == 3
    finally:
        store.close()


def _replicas_of(port: int) -> list[int]:
    """The ports of the replicas of the cluster master on ``port`` (CLUSTER REPLICAS)."""
    admin = redis.Redis(port=port)
    try:
        me = admin.execute_command("CLUSTER", "MYID").decode()
        lines = admin.execute_command("CLUSTER", "REPLICAS", me)
    finally:
        admin.close()
    return [int(line.decode().split()[1].split("@")[0].rsplit(":", 1)[1]) for line in lines]


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
async def test_cluster_asks_for_more_replicas_than_there_are() -> None:
    """Each master has one replica: ``wait_replicas=2`` cannot be met. A claim fails closed
    within about the timeout (sync and async), and the key is left free."""
    store = RedisStore(cluster_url(), prefix=_prefix(), wait_replicas=2, wait_timeout_ms=200)
    try:
        key = RecordKey("durable", digest_key("two"))
        started = time.monotonic()
        with pytest.raises(NotReplicated, match="acknowledged by 1 of the 2"):
            store.claim(key, "fp", 5, 60)
        assert time.monotonic() - started < 2
        assert store.get(key) is None
        started = time.monotonic()
        with pytest.raises(NotReplicated):
            await store.aclaim(key, "fp", 5, 60)
        assert time.monotonic() - started < 2
        assert await store.aget(key) is None
    finally:
        await store.aclose()
        store.close()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"wait_replicas": "x"}, "whole numbers"),
        ({"wait_replicas": -1}, ">= 0"),
        ({"wait_replicas": 1, "wait_timeout_ms": 0}, ">= 1"),
        ({"wait_replicas": 1, "wait_timeout_ms": 5000}, "not shorter than the socket timeout"),
        ({"wait_replica": 1}, "did you mean 'wait_replicas'"),
    ],
)
def test_bad_wait_options_are_configuration_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RedisStore("redis://127.0.0.1:6379/0", **options)


def test_wait_options_in_urls() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'wait_replicas'"):
        open_store("redis://127.0.0.1:6379/0?wait_replica=1")
    store = open_store("redis://127.0.0.1:6379/0?wait_replicas=1&wait_timeout_ms=100")
    assert isinstance(store, RedisStore) and store._durable == (1, 100)
    store.close()
    with pytest.raises(ConfigurationError, match="options are not read from a cluster URL"):
        open_store("redis+cluster://127.0.0.1:7000?socket_timeout=1&wait_replicas=1")
