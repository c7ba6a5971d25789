"""Leases under a stuck store: renewals isolated per store, the local bound, bounded waits.

A store that stops answering (a SIGSTOPped private redis-server, or a TCP proxy that stops
forwarding) must hurt only its own leases: renewals of other stores go on, a holder whose
renewals hang finds out from ``check()`` once its lease may have run out, and a call to the
stuck server fails with ``StoreUnavailable`` instead of hanging.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from oncely import LeaseLost, StoreUnavailable, current_claim, idempotent
from oncely.core.records import RecordKey
from oncely.errors import LockLost
from oncely.http import GLOBAL, IdempotencyConfig
from oncely.locks import Lock
from oncely.stores.redis import RedisStore

from conftest import MYSQL_URL, POSTGRES_URL, REDIS_URL, drop, drop_redis_prefix
from http_apps.harness import FACES
from lock_workers import RedisServer, free_port, unique_name

#: The lock tests' fixtures (pg_fence_table) live there.
pytest_plugins = ["lock_workers"]

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def healthy_store() -> Iterator[RedisStore]:
    """A store on the shared Redis, under a prefix of its own."""
    prefix = f"oncely-test-{uuid.uuid4().hex[:12]}"
    store = RedisStore(REDIS_URL, prefix=prefix)
    yield store
    store.close()
    drop_redis_prefix(prefix)


def unique() -> str:
    return f"order-{uuid.uuid4()}"


class Stop(Exception):
    """Ends a decorated call after its checks (its claim is released, nothing is stored)."""


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def lease_until(store: RedisStore, key: RecordKey) -> float:
    record = store.get(key)
    assert record is not None and record.lease_until is not None
    return record.lease_until


# -- item 1: a stuck store delays only its own renewals --------------------------------------------
@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_a_stuck_store_does_not_delay_renewals_on_a_healthy_one(
    private_redis: RedisServer, healthy_store: RedisStore
) -> None:
    """The issue's scenario: a paused Redis holds an auto-renewed lock; an ``@idempotent`` call
    on another, healthy Redis keeps its lease renewed (its record's lease_until moves on) while
    the lock's renewal hangs. With one renewal thread for everything, it did not."""
    lock = Lock(private_redis.url, unique_name(), ttl=0.9, auto_renew=True)
    lock.acquire()
    private_redis.pause()
    try:
        time.sleep(0.5)  # scenario: the lock's renewal (due every 0.3 s) now hangs on the pause
        seen: list[tuple[float, float]] = []

        # A 2 s lease on the healthy store: its renewals are what is tested, not its expiry,
        # and a loaded machine can stall them ~1 s.
        @idempotent(store=healthy_store, key=["order_id"], lease=2)
        def charge(order_id: str) -> str:
            claim = current_claim()
            assert claim is not None
            first = lease_until(healthy_store, claim.key)
            time.sleep(3)  # scenario: a slow charge, 1.5 leases long
            seen.append((first, lease_until(healthy_store, claim.key)))
            claim.check()
            return "charged"

        assert charge(unique()) == "charged"
        first, later = seen[0]
        assert later - first >= 1.0  # renewed (every 0.67 s) while the other store hung
        assert lock.lost.is_set()  # the lock on the paused server was reported lost meanwhile
    finally:
        private_redis.resume()
    with pytest.raises(LockLost):
        lock.release()


# -- item 1: check() fails once the local bound passed --------------------------------------------
def test_claim_check_fails_once_the_bound_passed_while_renewals_hang(
    private_redis: RedisServer,
) -> None:
    store = RedisStore(private_redis.url)
    lost: list[BaseException] = []

    # 2 s: the check() before the pause must find the lease alive even after a ~1 s stall;
    # the expiry itself is waited for on the claim's own bound (held_until).
    @idempotent(store=store, key=["order_id"], lease=2, on_lease_lost=lambda c, e: lost.append(e))
    def charge(order_id: str) -> str:
        claim = current_claim()
        assert claim is not None
        claim.check()
        private_redis.pause()
        try:
            assert wait_for(lambda: time.monotonic() > claim.held_until, 10)
            # The renewal still hangs on the paused server, but the lease may be gone.
            with pytest.raises(LeaseLost, match="no renewal"):
                claim.check()
            # ... and the holder is told without waiting for the hanging renewal.
            assert wait_for(lambda: bool(lost), 2)
            assert isinstance(lost[0], LeaseLost)
        finally:
            private_redis.resume()
        raise Stop

    with pytest.raises(Stop):
        charge(unique())
    store.close()


async def test_async_claim_check_fails_once_the_bound_passed_while_renewals_hang(
    private_redis: RedisServer,
) -> None:
    store = RedisStore(private_redis.url)
    lost: list[BaseException] = []

    # 2 s: the check() before the pause must find the lease alive even after a ~1 s stall;
    # the expiry itself is waited for on the claim's own bound (held_until).
    @idempotent(store=store, key=["order_id"], lease=2, on_lease_lost=lambda c, e: lost.append(e))
    async def charge(order_id: str) -> str:
        claim = current_claim()
        assert claim is not None
        claim.check()
        private_redis.pause()
        try:
            while time.monotonic() <= claim.held_until:
                await asyncio.sleep(0.01)
            with pytest.raises(LeaseLost):
                claim.check()
            deadline = time.monotonic() + 2
            while not lost and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert lost  # the renewal gave up at the bound instead of awaiting the server
        finally:
            private_redis.resume()
        raise Stop

    with pytest.raises(Stop):
        await charge(unique())
    await store.aclose()
    store.close()


def test_lock_check_fails_once_the_bound_passed_while_renewals_hang(
    private_redis: RedisServer,
) -> None:
    lock = Lock(private_redis.url, unique_name(), ttl=0.9, auto_renew=True)
    sent = time.monotonic()
    lock.acquire()
    private_redis.pause()
    try:
        time.sleep(max(0.0, sent + 0.9 - time.monotonic()) + 0.05)  # scenario: past the ttl
        with pytest.raises(LockLost):
            lock.check()  # decided locally: the store is not asked (it would not answer)
        assert lock.lost.is_set()
    finally:
        private_redis.resume()
    with pytest.raises(LockLost, match="lost earlier"):
        lock.release()


async def test_async_lock_check_fails_once_the_bound_passed_while_renewals_hang(
    private_redis: RedisServer,
) -> None:
    lost = asyncio.Event()
    lock = Lock(
        private_redis.url,
        unique_name(),
        ttl=0.9,
        auto_renew=True,
        on_lost=lambda _l, _e: lost.set(),
    )
    sent = time.monotonic()
    await lock.aacquire()
    private_redis.pause()
    try:
        await asyncio.sleep(max(0.0, sent + 0.9 - time.monotonic()) + 0.05)
        with pytest.raises(LockLost):
            await lock.acheck()
        assert lost.is_set()
    finally:
        private_redis.resume()
    with pytest.raises(LockLost, match="lost earlier"):
        await lock.arelease()
    await lock.backend.aclose()


def test_lock_without_renewal_fails_check_after_its_ttl(private_redis: RedisServer) -> None:
    """No auto_renew: the ttl from the acquire's send time is the bound, store reachable or not."""
    # 2 s: the first check() must find the lock alive even after a ~1 s stall.
    lock = Lock(private_redis.url, unique_name(), ttl=2)
    sent = time.monotonic()
    lock.acquire()
    lock.check()
    time.sleep(max(0.0, sent + 2 - time.monotonic()) + 0.05)  # scenario: the holder overran its ttl
    private_redis.pause()
    try:
        with pytest.raises(LockLost, match="no renewal was confirmed"):
            lock.check()
        assert not lock.owned()
    finally:
        private_redis.resume()
    with pytest.raises(LockLost):
        lock.release()


# -- item 1: the bound counts from when the request was sent -------------------------------------
def test_the_bound_counts_from_the_claims_send_time(private_redis: RedisServer) -> None:
    """A claim whose reply came 0.5 s late has 0.5 s less lease left than a clock started at the
    reply believes: held_until is at most send time + lease."""
    store = RedisStore(private_redis.url)
    store.now()  # the connection is open: the claim below is sent at once
    held: list[float] = []

    @idempotent(store=store, key=["order_id"], lease=5)
    def charge(order_id: str) -> str:
        claim = current_claim()
        assert claim is not None
        held.append(claim.held_until)
        return "charged"

    results: list[str] = []
    private_redis.pause()
    called = time.monotonic()
    worker = threading.Thread(target=lambda: results.append(charge(unique())))
    worker.start()
    try:
        time.sleep(0.5)  # scenario: the claim waits in the server
    finally:
        resumed = time.monotonic()
        private_redis.resume()
    worker.join(10)
    assert results == ["charged"]
    assert called + 5 <= held[0] < resumed + 5
    store.close()


async def test_the_async_bound_counts_from_the_claims_send_time(
    private_redis: RedisServer,
) -> None:
    store = RedisStore(private_redis.url)
    await store.anow()
    held: list[float] = []

    @idempotent(store=store, key=["order_id"], lease=5)
    async def charge(order_id: str) -> str:
        claim = current_claim()
        assert claim is not None
        held.append(claim.held_until)
        return "charged"

    private_redis.pause()
    called = time.monotonic()
    task = asyncio.ensure_future(charge(unique()))
    try:
        await asyncio.sleep(0.5)
    finally:
        resumed = time.monotonic()
        private_redis.resume()
    assert await task == "charged"
    assert called + 5 <= held[0] < resumed + 5
    await store.aclose()
    store.close()


@pytest.mark.parametrize("face_name", ["asgi", "wsgi"])
async def test_http_claims_count_the_bound_from_the_send_time(
    private_redis: RedisServer, face_name: str
) -> None:
    store = RedisStore(private_redis.url)
    held: list[float] = []

    def record() -> None:
        claim = current_claim()
        assert claim is not None
        held.append(claim.held_until)

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        record()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
        record()
        start_response("201 Created", [])
        return [b"ok"]

    app = asgi_app if face_name == "asgi" else wsgi_app
    face = FACES[face_name](IdempotencyConfig(store=store, lease=5, scope=GLOBAL), app=app)
    await store.anow()
    store.now()
    private_redis.pause()
    called = time.monotonic()
    request = asyncio.ensure_future(
        face.request("POST", "/orders", [("Idempotency-Key", f'"{uuid.uuid4()}"')], b"{}")
    )
    try:
        await asyncio.sleep(0.5)
    finally:
        resumed = time.monotonic()
        private_redis.resume()
    reply = await request
    assert reply.status == 201, reply
    assert called + 5 <= held[0] < resumed + 5
    await store.aclose()
    store.close()


# -- item 12: no network call waits forever -------------------------------------------------------
def test_a_paused_redis_fails_calls_within_the_default_timeout(
    private_redis: RedisServer,
) -> None:
    """Store and lock calls to a server that stopped answering end with StoreUnavailable (5 s
    read timeout by default), not a hang."""
    store = RedisStore(private_redis.url)
    lock = Lock(private_redis.url, unique_name(), ttl=60)
    store.now()
    lock.acquire()
    private_redis.pause()
    outcomes: list[BaseException] = []

    def calls() -> None:
        for call in (store.now, lock.check):
            try:
                call()
            except BaseException as exc:
                outcomes.append(exc)

    worker = threading.Thread(target=calls, daemon=True)
    try:
        worker.start()
        worker.join(30)
    finally:
        private_redis.resume()
    assert not worker.is_alive()
    assert [type(e) for e in outcomes] == [StoreUnavailable, StoreUnavailable]
    lock.release()
    store.close()


class FreezingProxy:
    """A TCP proxy to a real server that can stop forwarding (a server that stops answering,
    without touching the shared server itself).

    Each connection's pump thread owns its two sockets and closes them itself; ``close()``
    stops the pumps and joins them, so no socket is closed under a thread that is using it
    (a ``select`` on a socket another thread closed raises EBADF in the pump)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        with self.listener:
            while not self.closed.is_set():
                try:
                    client, _ = self.listener.accept()
                except TimeoutError:
                    continue
                client.settimeout(None)
                server = socket.create_connection(self.target)
                pump = threading.Thread(target=self._pump, args=(client, server), daemon=True)
                self.threads.append(pump)
                pump.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        with a, b:
            while not self.closed.is_set():
                if self.frozen.is_set():
                    time.sleep(0.01)
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for sock in ready:
                    try:
                        data = sock.recv(65536)
                        if data:
                            peers[sock].sendall(data)
                    except OSError:  # a peer reset: the connection is over
                        return
                    if not data:
                        return

    def close(self) -> None:
        self.closed.set()
        for thread in list(self.threads):
            thread.join(5)
        assert not any(t.is_alive() for t in self.threads), "a proxy thread did not stop"


def test_the_freezing_proxy_closes_under_live_traffic() -> None:
    """The harness itself: closing the proxy while its pumps forward traffic raises in no
    thread (the old proxy closed sockets under a pump's ``select``: EBADF in the thread, which
    failed a CI run of the MySQL test below)."""
    for _ in range(30):
        proxy = FreezingProxy("127.0.0.1", 6379)
        clients = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(4)]
        for client in clients:
            client.sendall(b"PING\r\n")
            assert client.recv(64) == b"+PONG\r\n"
        for client in clients:
            client.sendall(b"PING\r\n")  # in flight while the proxy closes
        proxy.close()
        for client in clients:
            client.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_mysql_server_that_stops_answering_fails_the_call(
    monkeypatch: pytest.MonkeyPatch, face: str
) -> None:
    """PyMySQL waits for a reply without limit by default, aiomysql has no limit at all; the
    store bounds both faces."""
    from oncely.backends import mysql as mysql_backend
    from oncely.stores import mysql

    monkeypatch.setattr(mysql_backend, "READ_TIMEOUT", 1.0)  # the default is 30 s
    proxy = FreezingProxy("127.0.0.1", 3306)
    table = f"oncely_t_{uuid.uuid4().hex[:12]}"
    url = MYSQL_URL.replace("127.0.0.1:3306", f"127.0.0.1:{proxy.port}")
    store = mysql.MySQLStore(url, table=table, create_schema=True)
    outcome: list[BaseException] = []

    async def async_face() -> None:
        await store.anow()
        proxy.frozen.set()
        try:
            await asyncio.wait_for(store.anow(), 20)
        except BaseException as exc:
            outcome.append(exc)
        proxy.frozen.clear()
        await store.aclose()

    def call() -> None:
        if face == "async":
            asyncio.run(async_face())
            return
        store.now()
        proxy.frozen.set()
        try:
            store.now()
        except BaseException as exc:
            outcome.append(exc)

    try:
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "the call hung on a server that stopped answering"
        assert isinstance(outcome[0], StoreUnavailable), outcome
    finally:
        proxy.frozen.clear()
        proxy.close()
        store.close()
        drop("mysql", store)


def test_postgres_connections_notice_a_cut_network(pg_fence_table: str) -> None:
    """libpq has no read timeout; its sockets get keepalive and a TCP user timeout instead,
    so a server the network cut off is noticed within seconds (not the OS's two hours)."""
    from oncely.stores.postgres import PostgresStore

    store = PostgresStore(POSTGRES_URL, table=f"oncely_t_{uuid.uuid4().hex[:12]}")
    # The URL overrides a default; the lock's own connection (the session holding it) is checked.
    lock = Lock(POSTGRES_URL + "?keepalives_idle=7", unique_name(), table=pg_fence_table)

    def assert_bounded(conn: Any, idle: int) -> None:
        sock = socket.socket(fileno=conn.fileno())
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10_000
        finally:
            sock.detach()

    try:
        with store._main_pool().connection() as conn:
            assert_bounded(conn, 5)
        with lock:
            assert_bounded(lock.connection, 7)
    finally:
        store.close()
        lock.backend.close()


# -- item 12: Redlock never waits forever on unreachable nodes ------------------------------------
def test_redlock_without_timeout_and_unreachable_nodes_fails_naming_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from oncely.locks import Redlock

    urls = [f"redis://127.0.0.1:{free_port()}/0" for _ in range(3)]  # nothing listens there
    lock = Redlock(urls, unique_name(), ttl=5)
    outcome: list[BaseException] = []

    def acquire() -> None:
        try:
            lock.acquire()  # no timeout: the docs' sample
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=acquire, daemon=True)
    with caplog.at_level("WARNING", logger="oncely.locks"):
        worker.start()
        worker.join(30)
    assert not worker.is_alive(), "acquire() without a timeout hung on unreachable nodes"
    assert isinstance(outcome[0], StoreUnavailable)
    for url in urls:
        assert url in str(outcome[0])
    assert any(urls[0] in r.getMessage() for r in caplog.records)  # said so while retrying
    assert not lock.held


async def test_async_redlock_without_timeout_and_unreachable_nodes_fails() -> None:
    from oncely.locks import Redlock

    urls = [f"redis://127.0.0.1:{free_port()}/0" for _ in range(3)]
    lock = Redlock(urls, unique_name(), ttl=5, unavailable_wait=0.5)
    with pytest.raises(StoreUnavailable, match="no answer from"):
        await asyncio.wait_for(lock.aacquire(), 30)


def test_renewals_of_many_calls_in_flight_overlap_their_round_trips() -> None:
    """A batch of calls in flight (a consumer's batch, many requests) each needs a renewal every
    lease / 3, each a round trip. One thread per store sending them one by one fell behind
    (a CI storm: leases lapsed and another consumer ran 21 messages again). Here every renewal
    takes 50 ms: 40 calls need 40 x 50 ms = 2 s per round on one thread, more than the 0.67 s
    between renewals of a 2 s lease; the lane overlaps them and no lease is lost."""
    from oncely.stores.memory import MemoryStore

    class SlowRenewals(MemoryStore):
        def renew(self, key: RecordKey, fence: int, lease: float) -> float:
            time.sleep(0.05)  # the round trip of a far or loaded store
            return super().renew(key, fence, lease)

    store = SlowRenewals()
    lost: list[BaseException] = []

    @idempotent(
        store=store,
        name=f"lanes.{uuid.uuid4().hex}",
        key=["n"],
        lease=2.0,
        on_lease_lost=lambda claim, error: lost.append(error),
    )
    async def work(n: int) -> int:
        await asyncio.sleep(3.5)  # past the lease: renewed several times
        claim = current_claim()
        assert claim is not None
        claim.check()
        return n

    async def main() -> list[int]:
        return await asyncio.gather(*(work(n) for n in range(40)))

    assert asyncio.run(main()) == list(range(40))
    assert lost == []
