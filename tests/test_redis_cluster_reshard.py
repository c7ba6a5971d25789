"""A MOVED / ASK storm: slots move between masters while many callers claim and complete keys
in them (issue 13, "Bad input"), on the session's real cluster (tests/redis_cluster.py).

Slots are moved by hand, as ``redis-cli --cluster reshard`` does it, one key at a time with a
pause, so the slot stays half-moved for a while: ``CLUSTER SETSLOT … IMPORTING`` on the target,
``MIGRATING`` on the source, ``MIGRATE`` of each key, then ``SETSLOT … NODE`` everywhere.
Meanwhile a script sent to the source for a key already moved gets ``ASK`` (and runs on the
target after ``ASKING``), a claim whose record and fence counter are split between the nodes
gets ``TRYAGAIN``, and after the move the old owner answers ``MOVED``. Each of those replies
means the script did not run.

What is checked: every body ran exactly once per key; every call returned that key's own
result or raised a typed error (StoreUnavailable: nothing decided; ResultNotStored: the body
ran and its result is in the error); no call waited long; and the servers did answer ASK /
TRYAGAIN and MOVED (``INFO errorstats``), so the storm really happened.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
import uuid
from typing import Any

import pytest
import redis
import redis.cluster

from oncely import idempotent
from oncely.core.records import New, RecordKey, digest_key
from oncely.errors import InFlightError, ResultNotStored, StoreUnavailable
from oncely.stores.redis import RedisStore
from redis_cluster import cluster_url

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)

NAME = "storm"


def _errorstats(ports: list[int]) -> dict[str, int]:
    """ASK / TRYAGAIN / MOVED error replies the servers sent so far (INFO errorstats)."""
    total: dict[str, int] = {"ASK": 0, "TRYAGAIN": 0, "MOVED": 0}
    for port in ports:
        client = redis.Redis(port=port)
        try:
            for name, value in client.info("errorstats").items():
                kind = name.removeprefix("errorstat_")
                if kind in total:
                    total[kind] += int(value["count"])
        finally:
            client.close()
    return total


class Mover:
    """Moves ``slots`` from one master to another and back, key by key, until stopped."""

    def __init__(self, slots: list[int], ports: list[int], source: int, target: int) -> None:
        self.slots, self.ports, self.source, self.target = slots, ports, source, target
        self.clients = {port: redis.Redis(port=port) for port in ports}
        self.ids = {
            port: c.execute_command("CLUSTER", "MYID").decode() for port, c in self.clients.items()
        }
        self.stop = threading.Event()
        self.moves = 0
        self.error: BaseException | None = None

    def move(self, slot: int, src: int, dst: int) -> None:
        source, target = self.clients[src], self.clients[dst]
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[src])
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[dst])
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
            source.execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
            time.sleep(0.005)  # the slot stays half-moved: ASK and TRYAGAIN meanwhile
        for port in (dst, src, *self.ports):
            self.clients[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.ids[dst])
        self.moves += 1
        self.agree()

    def agree(self, timeout: float = 5) -> None:
        """Until every master knows the same current epoch (at most ``timeout`` seconds).

        Without this, in about 1 of 3 sessions running both plain storms, the fourth pass
        stopped at ``MIGRATING`` with "I'm not the owner of hash slot": the source and the
        target each saw the other as the slot's owner, for good. Likely cause (inferred, not
        proven): the importing node takes a new config epoch without consensus at ``SETSLOT …
        NODE``, and with slots bouncing every few milliseconds it may not have heard of the
        last bump yet, so two masters briefly share an epoch. redis-cli --cluster reshard
        moves a slot once, so it does not race its own previous move."""
        deadline = time.monotonic() + timeout
        while True:
            epochs = {
                c.execute_command("CLUSTER", "INFO")
                .decode()
                .split("cluster_current_epoch:")[1]
                .split()[0]
                for c in self.clients.values()
            }
            if len(epochs) == 1 or time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def run(self) -> None:
        try:
            src, dst = self.source, self.target
            while not self.stop.is_set() or self.moves % (2 * len(self.slots)):
                for slot in self.slots:
                    self.move(slot, src, dst)
                src, dst = dst, src
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.error = exc

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def _keys_in(groups: set[str], count: int, run: str) -> list[str]:
    """``count`` call keys whose record digests fall in the hash-tag ``groups``."""
    out = []
    i = 0
    while len(out) < count:
        key = f"{run}-{i}"
        if digest_key(f"{NAME}\x00{key}")[:3] in groups:
            out.append(key)
        i += 1
    return out


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
@pytest.mark.parametrize("face", ["threads", "tasks"])
@pytest.mark.parametrize("options", [{}, {"wait_replicas": 1}], ids=["plain", "wait_replicas"])
def test_a_moved_ask_storm_runs_each_body_once_and_answers_right_or_typed(
    options: dict[str, Any], face: str
) -> None:
    url = cluster_url()
    prefix = f"oncely-cluster2-{uuid.uuid4().hex[:8]}"
    store = RedisStore(url, prefix=prefix, socket_timeout=2, **options)
    client: Any = store.redis.client
    masters = sorted(int(n.port) for n in client.get_primaries())
    # A few hash-tag groups, all in slots of one master: the slots that will move.
    source = masters[0]
    groups: dict[str, int] = {}
    for n in range(4096):
        group = f"{n:03x}"
        slot = client.keyslot(f"{{{group}}}")
        if int(client.nodes_manager.get_node_from_slot(slot).port) == source:
            groups[group] = slot
        if len(groups) == 4:
            break
    slots = sorted(set(groups.values()))
    run = uuid.uuid4().hex[:8]
    keys = _keys_in(set(groups), 48, run)
    runs: dict[str, int] = {}
    lock = threading.Lock()
    calls = [k for k in keys for _ in range(3)]  # each key by three callers at once
    random.Random(7).shuffle(calls)
    outcomes: list[tuple[str, Any, float]] = []
    typed = (StoreUnavailable, ResultNotStored, InFlightError)

    def count(k: str) -> str:
        with lock:
            runs[k] = runs.get(k, 0) + 1
        return f"done-{k}"

    @idempotent(store=store, name=NAME, key=["k"], lease=3, wait_timeout=10)
    def work(k: str) -> str:
        time.sleep(0.002)
        return count(k)

    @idempotent(store=store, name=NAME, key=["k"], lease=3, wait_timeout=10)
    async def awork(k: str) -> str:
        await asyncio.sleep(0.002)
        return count(k)

    def threads() -> None:
        queue = list(calls)

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    k = queue.pop()
                started = time.monotonic()
                try:
                    outcome: Any = work(k)
                except typed as exc:
                    outcome = exc
                outcomes.append((k, outcome, time.monotonic() - started))

        workers = [threading.Thread(target=worker) for _ in range(8)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(60)

    async def tasks() -> None:
        gate = asyncio.Semaphore(16)

        async def one(k: str) -> None:
            async with gate:
                started = time.monotonic()
                try:
                    outcome: Any = await awork(k)
                except typed as exc:
                    outcome = exc
                outcomes.append((k, outcome, time.monotonic() - started))

        await asyncio.gather(*(one(k) for k in calls))
        # A ResultNotStored's completion goes on in a background task (oncely.core.settle);
        # asyncio.run would cancel it, leaving the key to its lease and a second run to the
        # check below. Let it land first, as an application's shutdown should.
        left = asyncio.all_tasks() - {asyncio.current_task()}
        if left:
            await asyncio.wait(left, timeout=15)
        await store.aclose()

    # The formula in _keys_in must be the decorator's, or the keys would not be in those slots.
    assert work(keys[0]) == f"done-{keys[0]}"
    assert store.get(RecordKey("", digest_key(f"{NAME}\x00{keys[0]}"))) is not None

    before = _errorstats(masters)
    mover = Mover(slots, masters, source, masters[1])
    mover_thread = threading.Thread(target=mover.run)
    mover_thread.start()
    time.sleep(0.05)
    try:
        if face == "threads":
            threads()
        else:
            asyncio.run(tasks())
    finally:
        mover.stop.set()
        mover_thread.join(60)
        mover.close()
    assert mover.error is None, mover.error
    after = _errorstats(masters)

    assert len(outcomes) == len(calls)
    for k, outcome, took in outcomes:
        if isinstance(outcome, ResultNotStored):
            assert outcome.result == f"done-{k}"
        elif not isinstance(outcome, (StoreUnavailable, InFlightError)):
            assert outcome == f"done-{k}"  # never another key's result, never a wrong answer
        assert took < 12, (k, outcome, took)
    # Afterwards every key answers its own result, and no body ran twice.
    deadline = time.monotonic() + 20
    for k in keys:
        while True:
            try:
                assert work(k) == f"done-{k}"
                break
            except (StoreUnavailable, InFlightError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
    assert runs == {k: 1 for k in keys}
    assert mover.moves >= 2 * len(slots)
    assert after["MOVED"] > before["MOVED"]
    assert after["ASK"] + after["TRYAGAIN"] > before["ASK"] + before["TRYAGAIN"]
    store.close()


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
@pytest.mark.parametrize("options", [{}, {"wait_replicas": 1}], ids=["plain", "wait_replicas"])
async def test_a_slot_stuck_half_moved_is_a_bounded_store_unavailable(
    options: dict[str, Any],
) -> None:
    """A migration that stalls (the source MIGRATING, the fence counter still there, a new
    record not): every claim gets TRYAGAIN, so the script never runs. The client gives up after
    its redirect budget (redis-py: 16 tries; oncely's WAIT path the same) and the caller gets
    StoreUnavailable (redis-py's "TTL exhausted" ClusterError was a bare StoreError before),
    within about a second, sync and async; nothing was written."""
    url = cluster_url()
    store = RedisStore(url, prefix=f"oncely-cluster2-{uuid.uuid4().hex[:8]}", **options)
    client: Any = store.redis.client
    masters = sorted(int(n.port) for n in client.get_primaries())
    first = RecordKey("stuck", digest_key("first"))
    store.claim(first, "fp", 5, 60)  # the group's fence counter now exists on the source
    slot = client.keyslot(store._fence(first))
    source = int(client.nodes_manager.get_node_from_slot(slot).port)
    target = next(p for p in masters if p != source)
    mover = Mover([slot], masters, source, target)
    src, dst = mover.clients[source], mover.clients[target]
    counts = [c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) for c in (src, dst)]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", mover.ids[source])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", mover.ids[target])
    try:
        group = first.digest[:3]
        fresh = next(
            RecordKey("stuck", d)
            for i in range(100_000)
            if (d := digest_key(f"other-{i}"))[:3] == group
        )
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Redis Cluster"):
            store.claim(fresh, "fp", 5, 60)
        assert time.monotonic() - started < 3
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Redis Cluster"):
            await store.aclaim(fresh, "fp", 5, 60)
        assert time.monotonic() - started < 3
        # Nothing written on either node.
        assert [c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) for c in (src, dst)] == (
            counts
        )
    finally:
        for port in (source, target):
            mover.clients[port].execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        mover.close()
        await store.aclose()
        store.close()


async def test_an_ask_redirect_runs_the_script_on_the_importing_node() -> None:
    """A script for a key already moved to the importing node follows the ``ASK`` there, sync
    and async. redis-py 8.1's asyncio cluster client sent ``ASKING`` and the script as two
    pooled commands, on two different connections whenever more than one was free: the
    importing node answered ``MOVED`` back to the source, every try (with an even number of
    free connections), and after 16 tries the completion of a body that ran failed with
    StoreUnavailable (a ``ResultNotStored`` for the caller; the ``ASKING`` left on the other
    connection could let a later script of another caller run on the importing node). oncely
    now sends ``ASKING`` and the script in one write on one connection."""
    url = cluster_url()
    store = RedisStore(url, prefix=f"oncely-cluster2-{uuid.uuid4().hex[:8]}")
    client: Any = store.redis.client
    masters = sorted(int(n.port) for n in client.get_primaries())
    first = RecordKey("ask", digest_key("ask-first"))
    second = next(
        RecordKey("ask", d)
        for i in range(100_000)
        if (d := digest_key(f"ask-{i}"))[:3] == first.digest[:3]
    )
    fences = [store.claim(k, "fp", 5, 60) for k in (first, second)]
    assert all(isinstance(f, New) for f in fences)
    slot = client.keyslot(store._key(first))
    source = int(client.nodes_manager.get_node_from_slot(slot).port)
    target = next(p for p in masters if p != source)
    mover = Mover([slot], masters, source, target)
    src, dst = mover.clients[source], mover.clients[target]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", mover.ids[source])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", mover.ids[target])
    try:
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        # Every key of the slot is on the target now: the source answers ASK for each script.
        aclient: Any = await store.redis.aready()
        node = aclient.get_node(host="127.0.0.1", port=target)
        # An even number (>= 2) of free connections to the target (redis-py's node pool).
        held = [node.acquire_connection() for _ in range(len(node._free) // 2 * 2 + 2)]
        for connection in held:
            node.release(connection)
        await store.acomplete(first, fences[0].fence, b'"a"', "json", 60)
        store.complete(second, fences[1].fence, b'"b"', "json", 60)
    finally:
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port in (target, source, *masters):
            owner = mover.ids[target]
            mover.clients[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)
        mover.close()
        await store.aclose()
    done = [store.get(k) for k in (first, second)]
    store.close()
    assert [(r.status, r.result) for r in done if r is not None] == [
        ("completed", b'"a"'),
        ("completed", b'"b"'),
    ]
