"""An async holder that blocks its own event loop keeps its lease while the process is alive.

An ``async def`` body that calls a sync SDK (or ``time.sleep``) blocks its event loop. Async
leases used to be renewed by a timer on that loop, so a block longer than the lease let the
lease lapse and a retry (another process, another loop) took the key over and ran the body
twice. Renewals of async holders now run on the watchdog thread, through the store's sync face:
here the holder blocks its loop well past a 2 s lease (until the test says it may go on) while
another caller tries the same key or lock; it must find it taken.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncely import InFlightError, current_claim, idempotent
from oncely.core.lease import AsyncRenewer, Claimed
from oncely.core.records import New, RecordKey
from oncely.core.renewal import report
from oncely.errors import LeaseLost
from test_http_servers import ROOT, TESTS, running

from conftest import StoreFactory
from lock_workers import make_lock, unique_name

#: The lock tests' fixtures (redlock_nodes, spec_for) live there.
pytest_plugins = ["lock_workers"]

pytestmark = pytest.mark.timeout(120)

LEASE = 2.0
#: How long past the claim the contender tries: well past the lease (a lapsed lease would
#: have let it in), well before the holder's block ends.
PAST_LEASE = LEASE * 1.75
#: The longest a holder blocks its loop when nobody tells it to go on (a failing test).
BLOCK_LIMIT = 20.0


def block_until(flag: threading.Event | Path) -> None:
    """Block the calling thread (and so its event loop) until ``flag`` is set or exists."""
    deadline = time.monotonic() + BLOCK_LIMIT
    done: Callable[[], bool] = flag.is_set if isinstance(flag, threading.Event) else flag.exists
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)  # a sync call inside async def: the loop runs nothing meanwhile


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@contextmanager
def in_thread(target: Callable[[], Any]) -> Iterator[dict[str, Any]]:
    """Run ``target`` on a thread of its own; yields a dict that gets its ``result`` or
    ``error``, joined when the block ends."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = target()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        thread.join(BLOCK_LIMIT + 10)
        assert not thread.is_alive()


# -- @idempotent async def ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres", "mysql", "redis"])
def test_an_async_body_blocking_its_loop_past_the_lease_keeps_the_key(
    kind: str, make_store: StoreFactory
) -> None:
    store, _, _ = make_store(kind)
    store.init_schema()
    runs: list[str] = []
    started, go_on = threading.Event(), threading.Event()

    async def body(order: str, who: str) -> str:
        runs.append(who)
        started.set()
        block_until(go_on)  # e.g. a sync payment SDK called inside async def
        return f"charged by {who}"

    name = f"blocking.{uuid.uuid4().hex}"
    charge = idempotent(store=store, name=name, key=["order"], lease=LEASE)(body)
    # on_duplicate="raise": the contender must not wait for the holder's block to end
    contender = idempotent(
        store=store, name=name, key=["order"], lease=LEASE, on_duplicate="raise"
    )(body)
    order = f"order-{uuid.uuid4()}"
    with in_thread(lambda: asyncio.run(charge(order, "holder"))) as holder:
        assert started.wait(10)
        claimed_at = time.monotonic()
        wait_until(lambda: time.monotonic() - claimed_at >= PAST_LEASE, PAST_LEASE + 1)
        try:
            with pytest.raises(InFlightError):
                asyncio.run(contender(order, "contender"))  # another thread, another loop
        finally:
            go_on.set()
    assert "error" not in holder, holder
    assert holder["result"] == "charged by holder"
    assert runs == ["holder"]
    assert asyncio.run(contender(order, "late")) == "charged by holder"  # replayed
    assert runs == ["holder"]


def test_a_redis_store_given_only_an_async_client_renews_on_the_loop() -> None:
    """retest4 finding 1: a RedisStore given only ``async_client`` (its own auth, TLS, ...) has
    a sync face built from the URL, which need not reach the same server; renewing through it
    failed, the lease lapsed and a second caller ran the body again. Such a store renews its
    async leases on the caller's loop. Here the URL names a closed port: only the loop can
    renew."""
    import redis.asyncio

    from oncely.stores.redis import RedisStore

    from conftest import REDIS_URL
    from lock_workers import free_port

    runs: list[str] = []
    name = f"asyncclient.{uuid.uuid4().hex}"
    order = f"order-{uuid.uuid4()}"

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", async_client=client)
        assert store.renews_from_thread is False

        async def body(order: str, who: str) -> str:
            runs.append(who)
            await asyncio.sleep(PAST_LEASE + 1.0)  # alive and awaiting: the loop runs
            return f"charged by {who}"

        charge = idempotent(store=store, name=name, key=["order"], lease=LEASE)(body)
        contender = idempotent(
            store=store, name=name, key=["order"], lease=LEASE, on_duplicate="raise"
        )(body)
        holder = asyncio.ensure_future(charge(order, "holder"))
        await asyncio.sleep(PAST_LEASE)
        with pytest.raises(InFlightError):
            await contender(order, "contender")
        assert await holder == "charged by holder"
        await store.aclose()
        await client.aclose()

    asyncio.run(main())
    assert runs == ["holder"]


def test_a_lost_async_lease_is_reported_on_the_holders_loop(make_store: StoreFactory) -> None:
    """The renewal thread finds the loss; ``on_lease_lost`` runs on the holder's loop (it may
    touch the loop's objects, such as an :class:`asyncio.Event`)."""
    store, _, _ = make_store("redis")
    seen: list[tuple[int, BaseException]] = []
    loop_thread: list[int] = []

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        told = asyncio.Event()

        def on_lost(claim: Claimed, error: BaseException) -> None:
            seen.append((threading.get_ident(), error))
            told.set()  # only safe on its own loop

        @idempotent(
            store=store,
            name=f"lost.{uuid.uuid4().hex}",
            key=["order"],
            lease=LEASE,
            on_lease_lost=on_lost,
        )
        async def body(order: str) -> bool:
            claim = current_claim()
            assert claim is not None
            store.delete(claim.key)  # somebody else removes the record: the renewal fails
            await asyncio.wait_for(told.wait(), LEASE * 3)
            with pytest.raises(LeaseLost):
                claim.check()
            return True

        await body(f"order-{uuid.uuid4()}")

    with pytest.raises(LeaseLost):
        asyncio.run(main())  # the body ran, but the key is gone: its outcome is not stored
    assert len(seen) == 1
    assert seen[0][0] == loop_thread[0]
    assert isinstance(seen[0][1], LeaseLost)


def test_a_report_for_a_closed_loop_runs_on_a_thread_of_its_own() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    ran: list[int] = []
    done = threading.Event()

    def callback() -> None:
        ran.append(threading.get_ident())
        done.set()

    report(callback, what="test callback", loop=loop)
    assert done.wait(5)
    assert ran and ran[0] != threading.get_ident()


# -- the HTTP layer under a real ASGI server ------------------------------------------------------
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_an_async_endpoint_blocking_its_loop_past_the_lease_runs_once(
    kind: str, make_store: StoreFactory, tmp_path: Path
) -> None:
    """Uvicorn, two workers: the handler blocks its worker's loop past the 2 s lease; a retry
    (served by the other worker) gets 409 in flight, never a second run."""
    store, url, options = make_store(kind)
    store.init_schema()
    options = {**options, "create_schema": False} if kind == "postgres" else options
    executions = tmp_path / "executions.log"
    go_on = tmp_path / "go-on"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")]),
        "SERVER_APP_STORE": url,
        "SERVER_APP_STORE_OPTIONS": json.dumps(options),
        "SERVER_APP_LOG": str(executions),
        "SERVER_APP_LEASE": str(LEASE),
        "SERVER_APP_GO_ON": str(go_on),
    }
    headers = {"Idempotency-Key": f'"{uuid.uuid4()}"'}
    with running("uvicorn", env, tmp_path) as base:
        with in_thread(
            lambda: httpx.post(base + "/blocking", headers=headers, timeout=BLOCK_LIMIT + 10)
        ) as first:
            try:
                wait_until(executions.exists, 10)
                claimed_at = time.monotonic()
                wait_until(lambda: time.monotonic() - claimed_at >= PAST_LEASE, PAST_LEASE + 1)
                # the blocked worker accepts nothing: the other worker answers
                retry = httpx.post(base + "/blocking", headers=headers, timeout=10)
                assert retry.status_code == 409, (retry.status_code, retry.text)
                assert "in-flight" in retry.json()["type"]
            finally:
                go_on.touch()
        assert first["result"].status_code == 201
        again = httpx.post(base + "/blocking", headers=headers, timeout=10)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert len(executions.read_text().split()) == 1


# -- locks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["redis", "sqlite", "redlock"])
def test_an_async_lock_holder_blocking_its_loop_past_the_ttl_keeps_the_lock(
    kind: str, spec_for: Any
) -> None:
    spec = dict(spec_for(kind))
    name = unique_name()
    holder = make_lock(spec, name, ttl=LEASE, auto_renew=True)
    contender = make_lock(spec, name, ttl=LEASE)
    started, go_on = threading.Event(), threading.Event()

    async def hold() -> bool:
        async with holder:
            started.set()
            block_until(go_on)
            await holder.acheck()
            return holder.lost.is_set()

    with in_thread(lambda: asyncio.run(hold())) as out:
        assert started.wait(10)
        acquired_at = time.monotonic()
        wait_until(lambda: time.monotonic() - acquired_at >= PAST_LEASE, PAST_LEASE + 1)
        try:
            assert contender.acquire(blocking=False) is None
        finally:
            go_on.set()
    assert "error" not in out, out
    assert out["result"] is False
    token = contender.acquire(blocking=False)
    assert token is not None
    contender.release()


# -- a holder whose loop closed -------------------------------------------------------------------
def test_a_claim_whose_loop_closed_stops_renewing(make_store: StoreFactory) -> None:
    """A call that died with its event loop (never stopped its renewer) lets the key go one
    lease later, as the loop timer did: the watchdog does not renew it forever."""
    store, _, _ = make_store("redis")
    key = RecordKey.of("blocking", f"order-{uuid.uuid4()}")

    async def claim_and_vanish() -> Claimed:
        sent_at = time.monotonic()
        outcome = await store.aclaim(key, "fp", LEASE, 60)
        assert isinstance(outcome, New)
        claimed = Claimed(key, outcome.fence, LEASE, store)
        AsyncRenewer(claimed, sent_at)  # never stopped
        return claimed

    claimed = asyncio.run(claim_and_vanish())
    wait_until(lambda: claimed.lost is not None, LEASE * 2)
    assert isinstance(claimed.lost, LeaseLost) and "event loop" in str(claimed.lost)
    wait_until(lambda: isinstance(store.claim(key, "fp", LEASE, 60), New), LEASE * 2)


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_an_async_lock_whose_loop_closed_stops_renewing(kind: str, spec_for: Any) -> None:
    spec = dict(spec_for(kind))
    name = unique_name()
    holder = make_lock(spec, name, ttl=LEASE, auto_renew=True)
    contender = make_lock(spec, name, ttl=LEASE)

    async def acquire_and_vanish() -> None:
        await holder.aacquire()  # never released

    asyncio.run(acquire_and_vanish())
    assert holder.lost.wait(LEASE * 2)
    assert contender.acquire(timeout=LEASE * 2) is not None
    contender.release()
