"""The ASGI middleware's tasks and timers per request, and cancellation at each step.

A keyed request runs its flow in one task of its own from the claim on (no shielded claim
task, no separate app task), and the leases of a loop's running requests put no timer on the
loop (they are renewed on the watchdog thread). These tests pin that down, and check that the
guarantees the extra tasks and timers used to give still hold: a cancelled request's claim
is undone, its handler finishes (``on_cancel="finish"``) or is cancelled and the key released
(``"release"``), a waiter leaves at once, and a long handler's lease is renewed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from oncely.core.records import ClaimOutcome, RecordKey, digest_key
from oncely.http import GLOBAL, IdempotencyConfig, IdempotencyMiddleware
from oncely.stores.memory import MemoryStore
from oncely.stores.redis import RedisStore
from test_redteam import _asgi_scope, _receive_once

from conftest import REDIS_URL

pytestmark = pytest.mark.timeout(60)


def _scope(key: str, path: str = "/orders") -> dict[str, Any]:
    return _asgi_scope(key, path)


def _receive() -> Any:
    return _receive_once(b"{}")


class _Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None


async def _created(status: int = 201, body: bytes = b"ok") -> list[dict[str, Any]]:
    return [
        {"type": "http.response.start", "status": status, "headers": []},
        {"type": "http.response.body", "body": body},
    ]


def _key_of(key: str) -> RecordKey:
    return RecordKey("http:", digest_key(key))


@pytest.fixture
def redis_store() -> Iterator[RedisStore]:
    prefix = f"oncely-test-{uuid.uuid4().hex[:12]}"
    store = RedisStore(REDIS_URL, prefix=prefix)
    yield store
    store.close()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


# -- one task per keyed request, one timer per loop ------------------------------------------------
async def test_a_keyed_request_runs_in_one_task() -> None:
    loop = asyncio.get_running_loop()
    created: list[Any] = []
    default = loop.get_task_factory()

    def factory(the_loop: Any, coro: Any, **kwargs: Any) -> Any:
        created.append(getattr(coro, "__qualname__", coro))
        if default is not None:
            return default(the_loop, coro, **kwargs)
        return asyncio.Task(coro, loop=the_loop, **kwargs)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in await _created():
            await send(message)

    middleware = IdempotencyMiddleware(app, IdempotencyConfig(store=MemoryStore(), scope=GLOBAL))
    loop.set_task_factory(factory)
    try:
        for _ in range(20):
            sent = _Sent()
            await middleware(_scope(str(uuid.uuid4())), _receive(), sent)
            assert sent.status == 201
    finally:
        loop.set_task_factory(default)
    # Before: a shielded claim task and an app task per request (40).
    assert len(created) == 20, created


async def test_running_requests_share_one_lease_timer() -> None:
    loop = asyncio.get_running_loop()
    release = asyncio.Event()
    running = 0
    all_in = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal running
        running += 1
        if running == 30:
            all_in.set()
        await release.wait()
        for message in await _created():
            await send(message)

    config = IdempotencyConfig(store=MemoryStore(), scope=GLOBAL, lease=30)
    middleware = IdempotencyMiddleware(app, config)
    before = len([h for h in loop._scheduled if not h.cancelled()])  # type: ignore[attr-defined]
    senders = [_Sent() for _ in range(30)]
    requests = [
        asyncio.ensure_future(middleware(_scope(str(uuid.uuid4())), _receive(), sent))
        for sent in senders
    ]
    await asyncio.wait_for(all_in.wait(), 10)
    timers = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    # Before: one timer per running request (30 more).
    assert len(timers) - before <= 1
    release.set()
    await asyncio.wait_for(asyncio.gather(*requests), 10)
    assert [s.status for s in senders] == [201] * 30


async def test_a_long_handler_is_renewed_also_when_it_is_due_before_the_others(
    redis_store: RedisStore,
) -> None:
    # The shared timer is armed for the earliest due renewal: a short lease that joins after
    # a long one must re-arm it earlier, or its renewal would come after its lease ran out.
    release = asyncio.Event()
    started: dict[str, asyncio.Event] = {"/long": asyncio.Event(), "/short": asyncio.Event()}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started[scope["path"]].set()
        await release.wait()
        for message in await _created():
            await send(message)

    long = IdempotencyMiddleware(app, IdempotencyConfig(store=redis_store, scope=GLOBAL, lease=30))
    short = IdempotencyMiddleware(app, IdempotencyConfig(store=redis_store, scope=GLOBAL, lease=2))
    long_key, short_key = str(uuid.uuid4()), str(uuid.uuid4())
    first = asyncio.ensure_future(long(_scope(long_key, "/long"), _receive(), _Sent()))
    await asyncio.wait_for(started["/long"].wait(), 10)
    sent = _Sent()
    second = asyncio.ensure_future(short(_scope(short_key, "/short"), _receive(), sent))
    await asyncio.wait_for(started["/short"].wait(), 10)
    try:
        record = await redis_store.aget(_key_of(short_key))
        assert record is not None and record.lease_until is not None
        granted = record.lease_until
        # Renewed every lease / 3 (0.67 s): within 3 s the lease must have been extended, and
        # the record must still be held (a lease of 2 s without renewal would have run out).
        extended = False
        for _ in range(30):
            await asyncio.sleep(0.1)
            record = await redis_store.aget(_key_of(short_key))
            assert record is not None and record.status == "in_progress"
            assert record.lease_until is not None
            if record.lease_until > granted + 0.3:
                extended = True
        assert extended
    finally:
        release.set()  # the handlers end either way, so a failure cannot leave them waiting
        await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 10)
    assert sent.status == 201
    record = await redis_store.aget(_key_of(short_key))
    assert record is not None and record.status == "completed"


# -- cancelling the request task at each step ----------------------------------------------------
class _GatedClaims(MemoryStore):
    """A memory store whose async claims wait for ``gate`` before they are applied (a claim
    still on the wire when its request task is cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def aclaim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome:
        self.waiting.set()
        await self.gate.wait()
        return await super().aclaim(key, fingerprint, lease, ttl)


async def test_a_request_cancelled_during_its_claim_frees_the_key_and_runs_nothing() -> None:
    store = _GatedClaims()
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        for message in await _created():
            await send(message)

    middleware = IdempotencyMiddleware(app, IdempotencyConfig(store=store, scope=GLOBAL))
    key = str(uuid.uuid4())
    task = asyncio.ensure_future(middleware(_scope(key), _receive(), _Sent()))
    await asyncio.wait_for(store.waiting.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store.gate.set()  # the claim lands after its request task left: it must be undone
    for _ in range(100):
        await asyncio.sleep(0.01)
        record = store.get(_key_of(key))
        if record is None or record.status != "in_progress":
            break
    assert calls == []
    retry = _Sent()
    await asyncio.wait_for(middleware(_scope(key), _receive(), retry), 10)
    assert retry.status == 201  # not 409: the cancelled request's claim was released
    assert calls == ["/orders"]


async def test_a_waiting_duplicate_leaves_at_once_when_cancelled() -> None:
    store = MemoryStore()
    release = asyncio.Event()
    entered = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await release.wait()
        for message in await _created():
            await send(message)

    middleware = IdempotencyMiddleware(app, IdempotencyConfig(store=store, scope=GLOBAL, wait=30))
    key = str(uuid.uuid4())
    first = asyncio.ensure_future(middleware(_scope(key), _receive(), _Sent()))
    await asyncio.wait_for(entered.wait(), 10)
    waiter = asyncio.ensure_future(middleware(_scope(key), _receive(), _Sent()))
    await asyncio.sleep(0.2)  # the duplicate waits for the first one's outcome
    assert not waiter.done()
    tasks_before = len(asyncio.all_tasks())
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 2)
    await asyncio.sleep(0)
    # The waiter's own flow task was cancelled with it (nothing left waiting in the background).
    assert len(asyncio.all_tasks()) < tasks_before
    release.set()
    await asyncio.wait_for(first, 10)


@pytest.mark.parametrize("on_cancel", ["finish", "release"])
async def test_a_request_cancelled_while_its_handler_runs(on_cancel: str) -> None:
    store = MemoryStore()
    entered = asyncio.Event()
    finished: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        try:
            await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            finished.append(False)
            raise
        finished.append(True)
        for message in await _created(body=b"done"):
            await send(message)

    config = IdempotencyConfig(store=store, scope=GLOBAL, on_cancel=on_cancel)  # type: ignore[arg-type]
    middleware = IdempotencyMiddleware(app, config)
    key = str(uuid.uuid4())
    task = asyncio.ensure_future(middleware(_scope(key), _receive(), _Sent()))
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    if on_cancel == "release":
        # The handler was cancelled and the key released before the request task ended.
        assert finished == [False]
        record = store.get(_key_of(key))
        assert record is None or record.status != "in_progress"
        return
    # finish: the handler goes on to its end and its response settles the key.
    for _ in range(100):
        record = store.get(_key_of(key))
        if record is not None and record.status == "completed":
            break
        await asyncio.sleep(0.02)
    assert finished == [True]
    replay = _Sent()
    await asyncio.wait_for(middleware(_scope(key), _receive(), replay), 10)
    assert replay.status == 201
    assert replay.messages[1]["body"] == b"done"
    assert finished == [True]


def test_a_handler_cut_off_by_the_end_of_its_event_loop_keeps_its_key() -> None:
    """on_cancel="finish": the request task is cancelled while the handler runs, then the event
    loop ends (asyncio.run returning, as at a server's shutdown) and cancels the shielded
    handler. It may have acted: the key stays claimed until its lease ends, never released for
    a second run (red team 13 found the decorator's twin of this; the HTTP flow released)."""
    store = MemoryStore()
    runs: list[int] = []
    key = str(uuid.uuid4())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(1)
        await asyncio.sleep(5)  # waiting for the payment provider when the loop ends
        for message in await _created(body=b"done"):
            await send(message)

    async def first() -> None:
        middleware = IdempotencyMiddleware(app, IdempotencyConfig(store=store, scope=GLOBAL))
        task = asyncio.ensure_future(middleware(_scope(key), _receive(), _Sent()))
        while not runs:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # return at once: asyncio.run cancels the handler that is still running

    asyncio.run(first())
    record = store.get(_key_of(key))
    assert record is not None and record.status == "in_progress"
    assert runs == [1]


# -- the remembered route lookup ----------------------------------------------------------------
async def test_a_route_added_later_is_found_although_the_lookup_was_remembered() -> None:
    # The middleware remembers where a path leads (so it does not match every route twice);
    # a route added to the live table afterwards must be seen: the same key, refused with 404
    # before (key released), runs once it exists and is then replayed.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    calls: list[str] = []

    async def late(request: Request) -> JSONResponse:
        calls.append("late")
        return JSONResponse({"n": len(calls)}, status_code=201)

    app = Starlette(routes=[Route("/orders", late, methods=["POST"])])
    app.add_middleware(
        IdempotencyMiddleware, config=IdempotencyConfig(store=MemoryStore(), scope=GLOBAL)
    )
    headers = {"Idempotency-Key": f'"{uuid.uuid4()}"'}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/late", headers=headers, json={})).status_code == 404
        assert (await client.post("/late", headers=headers, json={})).status_code == 404
        app.router.routes.append(Route("/late", late, methods=["POST"]))
        first = await client.post("/late", headers=headers, json={})
        assert first.status_code == 201  # not a replayed 404: the key was released
        again = await client.post("/late", headers=headers, json={})
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.json() == first.json()
    assert calls == ["late"]
