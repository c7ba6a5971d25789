"""Faults an outside red team found in the claim engine's users (the decorator and HTTP flows).

Each test names the fault it reproduces; each failed on the code before its fix. The stores
are real (memory, the reference model, subclassed only to inject a store failure at one
chosen step; or a real PostgreSQL table that does not exist).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import uuid
from typing import Any

import pytest

from oncely import current_claim, idempotent
from oncely.core.records import InFlight, New, RecordKey, digest_key
from oncely.errors import (
    ConfigurationError,
    InFlightError,
    LeaseLost,
    ResultNotStored,
    ResultTooLarge,
    SerializationError,
    StoreUnavailable,
)
from oncely.http import (
    GLOBAL,
    IdempotencyConfig,
    IdempotencyMiddleware,
    WSGIIdempotencyMiddleware,
)
from oncely.stores import Store, open_store
from oncely.stores.memory import MemoryStore

from conftest import POSTGRES_URL, StoreFactory
from http_apps.harness import FACES

pytestmark = pytest.mark.timeout(60)


def key_header() -> tuple[str, str]:
    return ("Idempotency-Key", f'"{uuid.uuid4()}"')


# -- A5: fail_open covers an unreachable store only ------------------------------------------------
@pytest.mark.parametrize("face_name", ["asgi", "wsgi"])
async def test_fail_open_never_covers_a_missing_schema(face_name: str) -> None:
    # SchemaMissing (or any StoreError other than StoreUnavailable) is a mistake to fix, not an
    # outage to ride out: the request must not run unprotected.
    store = open_store(POSTGRES_URL, table=f"oncely_missing_{uuid.uuid4().hex[:8]}")
    try:
        face: Any = FACES[face_name](IdempotencyConfig(store=store, fail_open=True, scope=GLOBAL))
        reply = await face.request("POST", "/orders", [key_header()], b"{}")
        assert face.calls["/orders"] == 0
        assert reply.status == 503 and reply.problem == "store-unavailable"
    finally:
        store.close()


# -- A1: the body ran but its completion could not be written --------------------------------------
class CompleteFailsStore(MemoryStore):
    """A real memory store whose next ``failures`` completions fail as if it were unreachable."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def complete(self, *args: Any, **kwargs: Any) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("injected: the store is unreachable")
        super().complete(*args, **kwargs)


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_result_that_could_not_be_stored_is_a_distinct_error_and_never_runs_twice(
    face: str,
) -> None:
    # The body ran (money moved) but every completion attempt met StoreUnavailable: the caller
    # must be able to tell that from "nothing happened", and the key must stay claimed (lease
    # renewed) while the completion is retried in the background, never released.
    store = CompleteFailsStore(failures=4)
    runs: list[str] = []
    order = f"order-{uuid.uuid4()}"
    if face == "sync":

        @idempotent(store=store, key=["k"], lease=2, on_duplicate="raise")
        def charge(k: str) -> str:
            runs.append(k)
            return "charged"

        with pytest.raises(ResultNotStored) as caught:
            charge(order)
        assert not isinstance(caught.value, StoreUnavailable)
        assert caught.value.result == "charged"
        # Until the background completion lands, a retry finds the key in flight, not free.
        with pytest.raises(InFlightError):
            charge(order)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert charge(order) == "charged"
                break
            except InFlightError:
                assert time.monotonic() < deadline, "the completion was never retried"
                time.sleep(0.05)
    else:

        @idempotent(store=store, key=["k"], lease=2, on_duplicate="raise")
        async def acharge(k: str) -> str:
            runs.append(k)
            return "charged"

        async def scenario() -> None:
            with pytest.raises(ResultNotStored) as caught:
                await acharge(order)
            assert caught.value.result == "charged"
            with pytest.raises(InFlightError):
                await acharge(order)
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert await acharge(order) == "charged"
                    return
                except InFlightError:
                    assert time.monotonic() < deadline, "the completion was never retried"
                    await asyncio.sleep(0.05)

        asyncio.run(scenario())
    assert runs == [order]


def test_the_key_stays_claimed_past_its_lease_while_the_completion_is_retried() -> None:
    # The lease (2 s) runs out long before the background retry gives up: the retry must keep
    # renewing it, or a duplicate claims the key after 2 s and charges again.
    store = CompleteFailsStore(failures=10**9)
    runs: list[str] = []
    order = f"order-{uuid.uuid4()}"

    @idempotent(store=store, key=["k"], lease=2, on_duplicate="raise")
    def charge(k: str) -> str:
        runs.append(k)
        return "charged"

    with pytest.raises(ResultNotStored):
        charge(order)
    time.sleep(3)
    with pytest.raises(InFlightError):
        charge(order)
    store.failures = 0  # the store is back: the background retry lands the result
    deadline = time.monotonic() + 10
    while True:
        try:
            assert charge(order) == "charged"
            break
        except InFlightError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert runs == [order]


# -- A3: a cancelled caller must not turn a started effect into a second run -----------------------
@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_cancelled_call_finishes_its_body_and_a_retry_replays(
    kind: str, make_store: StoreFactory
) -> None:
    store = make_store(kind)[0]

    async def scenario() -> None:
        runs: list[str] = []
        started = asyncio.Event()
        effects: list[str] = []

        @idempotent(store=store, key=["k"], lease=5)
        async def charge(k: str) -> str:
            runs.append(k)
            started.set()
            await asyncio.sleep(0.3)  # the effect is under way when the caller is cancelled
            effects.append(k)
            return "charged"

        order = f"order-{uuid.uuid4()}"
        task = asyncio.ensure_future(charge(order))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The retry finds the call still running, waits for it, and replays its result.
        assert await asyncio.wait_for(charge(order), 10) == "charged"
        assert runs == [order] and effects == [order]
        await store.aclose()

    asyncio.run(scenario())


def test_on_cancel_must_be_finish_or_release() -> None:
    with pytest.raises(ConfigurationError, match="on_cancel"):

        @idempotent(store="memory://", key=["k"], on_cancel="drop")  # type: ignore[arg-type]
        async def f(k: str) -> None: ...


# -- A2: what the duplicates waiting for a call get when that call fails ---------------------------
class Declined(Exception):
    pass


@pytest.mark.parametrize("stored", [True, False], ids=["store_errors", "released"])
def test_waiters_for_a_failed_call(stored: bool) -> None:
    # The rule (docs/decorator.md, "When the call fails"): a failure listed in store_errors is
    # the call's outcome, so every waiter gets it and nothing runs again; any other exception
    # means "no effect happened" and frees the key, so exactly one waiter takes over and runs
    # (as a retry would), and the other waiters get its result.
    store = MemoryStore()
    runs: list[int] = []
    gate = threading.Event()
    lock = threading.Lock()

    @idempotent(
        store=store, key=["k"], lease=5, store_errors=(Declined,) if stored else (), wait_timeout=10
    )
    def charge(k: str) -> str:
        with lock:
            runs.append(1)
            first = len(runs) == 1
        if first:
            gate.wait(5)
            raise Declined("card declined")
        return "charged"

    order = f"order-{uuid.uuid4()}"
    outcomes: list[object] = []

    def call() -> None:
        try:
            outcomes.append(charge(order))
        except Declined as exc:
            outcomes.append(exc)

    holder = threading.Thread(target=call)
    holder.start()
    while not runs:
        time.sleep(0.01)
    waiters = [threading.Thread(target=call) for _ in range(4)]
    for thread in waiters:
        thread.start()
    time.sleep(0.3)  # the waiters found the key in flight and wait
    gate.set()
    for thread in [holder, *waiters]:
        thread.join(10)
    assert len(outcomes) == 5
    if stored:
        assert runs == [1]
        assert all(isinstance(o, Declined) for o in outcomes)
    else:
        assert runs == [1, 1]
        assert sum(isinstance(o, Declined) for o in outcomes) == 1
        assert outcomes.count("charged") == 4


# -- A7: renewal threads, release retries ----------------------------------------------------------
class ReleaseFailsStore(MemoryStore):
    """A real memory store whose next ``failures`` releases fail as if it were unreachable."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def release(self, *args: Any, **kwargs: Any) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("injected: the store is unreachable")
        super().release(*args, **kwargs)


def test_a_release_that_meets_an_unreachable_store_is_retried_decorator() -> None:
    store = ReleaseFailsStore(failures=2)
    runs: list[int] = []

    @idempotent(store=store, key=["k"], lease=30, on_duplicate="raise")
    def charge(k: str) -> str:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("no effect happened")
        return "charged"

    order = f"order-{uuid.uuid4()}"
    with pytest.raises(RuntimeError):
        charge(order)
    assert charge(order) == "charged"  # not InFlightError for the next 30 s
    assert runs == [1, 1]


@pytest.mark.parametrize("face_name", ["asgi", "wsgi"])
async def test_a_release_that_meets_an_unreachable_store_is_retried_http(face_name: str) -> None:
    store = ReleaseFailsStore(failures=2)
    config = IdempotencyConfig(store=store, scope=GLOBAL, lease=30, store_server_errors=False)
    face: Any = FACES[face_name](config)
    key = key_header()
    first = await face.request("POST", "/boom", [key])
    assert isinstance(first.raised, RuntimeError)
    second = await face.request("POST", "/boom", [key])
    assert isinstance(second.raised, RuntimeError)  # ran again at once, not 409 for 30 s
    assert face.calls["/boom"] == 2


class DoomedRenewalStore(MemoryStore):
    """A real memory store that refuses every renewal of scope ``doomed`` (its lease is lost)."""

    def renew(self, key: Any, fence: int, lease: float) -> float:
        if key.scope == "doomed":
            raise LeaseLost("injected: the record was taken over")
        return super().renew(key, fence, lease)


def test_a_slow_on_lease_lost_callback_does_not_stall_other_renewals() -> None:
    # Both calls renew on the same store's lane. The doomed call's loss is found on that lane;
    # its callback blocks for 5 s. The other call's lease (2 s) must still be renewed.
    store = DoomedRenewalStore()
    release_callback = threading.Event()
    called = threading.Event()

    def slow_callback(claim: Any, error: BaseException) -> None:
        called.set()
        release_callback.wait(5)

    @idempotent(store=store, key=["k"], scope="doomed", lease=2, on_lease_lost=slow_callback)
    def doomed(k: str) -> str:
        called.wait(5)
        return "doomed"

    @idempotent(store=store, key=["k"], scope="fine", lease=2)
    def fine(k: str) -> str:
        time.sleep(3)
        claim = current_claim()
        assert claim is not None
        claim.check()  # LeaseLost if its renewals were stalled past the 2 s lease
        return "fine"

    results: dict[str, object] = {}

    def run(name: str, fn: Any) -> None:
        try:
            results[name] = fn(f"order-{uuid.uuid4()}")
        except Exception as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("doomed", doomed)),
        threading.Thread(target=run, args=("fine", fine)),
    ]
    for thread in threads:
        thread.start()
    threads[1].join(10)
    release_callback.set()
    threads[0].join(10)
    assert called.is_set()
    assert results["fine"] == "fine"


# (A cancelled loop renewer that kept renewing: claims no longer renew on the event loop but on
# the watchdog thread -- tests/test_async_blocking.py -- so there is no loop task to cancel.)


# -- A6: forget() on a call that is still running -------------------------------------------------
def test_delete_can_leave_a_running_record_alone_on_every_store(store: Store) -> None:
    key = RecordKey("forget", uuid.uuid4().hex)
    outcome = store.claim(key, "", 5.0, 60.0)
    assert isinstance(outcome, New)
    assert store.delete(key, running=False) is False  # in progress, lease live: kept
    record = store.get(key)
    assert record is not None and record.status == "in_progress"
    assert isinstance(store.claim(key, "", 5.0, 60.0), InFlight)
    store.complete(key, outcome.fence, b"1", "json", 60.0)
    assert store.delete(key, running=False) is True  # completed: deleted
    assert store.get(key) is None
    # A record whose lease ran out is nobody's: deleted.
    stale = RecordKey("forget", uuid.uuid4().hex)
    assert isinstance(store.claim(stale, "", 0.5, 60.0), New)
    time.sleep(0.8)
    assert store.delete(stale, running=False) is True
    # The default still deletes whatever is there (oncely keys rm).
    forced = RecordKey("forget", uuid.uuid4().hex)
    assert isinstance(store.claim(forced, "", 5.0, 60.0), New)
    assert store.delete(forced) is True


async def test_adelete_can_leave_a_running_record_alone(store: Store) -> None:
    key = RecordKey("forget", uuid.uuid4().hex)
    outcome = await store.aclaim(key, "", 5.0, 60.0)
    assert isinstance(outcome, New)
    assert await store.adelete(key, running=False) is False
    await store.acomplete(key, outcome.fence, b"1", "json", 60.0)
    assert await store.adelete(key, running=False) is True
    await store.aclose()


def test_forget_refuses_a_running_call_so_no_duplicate_runs_beside_it(store: Store) -> None:
    runs: list[int] = []
    inside = threading.Event()
    finish = threading.Event()

    @idempotent(store=store, key=["k"], lease=5, on_duplicate="raise")
    def charge(k: str) -> str:
        runs.append(1)
        inside.set()
        finish.wait(10)
        return "charged"

    order = f"order-{uuid.uuid4()}"
    holder = threading.Thread(target=charge, args=(order,))
    holder.start()
    assert inside.wait(10)
    with pytest.raises(InFlightError, match="still running"):
        charge.forget(order)  # type: ignore[attr-defined]
    with pytest.raises(InFlightError):
        charge(order)  # the record is intact: a duplicate does not run
    finish.set()
    holder.join(10)
    assert charge.forget(order) is True  # type: ignore[attr-defined]
    assert charge(order) == "charged"  # forgotten: runs again
    assert runs == [1, 1]


# -- A4: HTTP settles the key before the client can see the response complete ---------------------
def _http_key(key: str) -> RecordKey:
    return RecordKey("http:", digest_key(key))


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
async def test_asgi_completes_the_key_before_the_response_ends(streamed: bool) -> None:
    store = MemoryStore()
    key = str(uuid.uuid4())
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        if streamed:
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
            await send({"type": "http.response.body", "body": b"b", "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"ab"})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            record = store.get(_http_key(key))
            seen.append(None if record is None else record.status)

    middleware = IdempotencyMiddleware(app, IdempotencyConfig(store=store, scope=GLOBAL))
    await middleware(_asgi_scope(key), _receive_once(b"{}"), send)
    assert seen == ["completed"]


def _asgi_scope(key: str, path: str = "/orders") -> dict[str, Any]:
    """A keyed POST of a 2-byte body (with :func:`_receive_once`), as an ASGI server sends it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"idempotency-key", f'"{key}"'.encode()), (b"content-length", b"2")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }


def _receive_once(body: bytes) -> Any:
    sent = False
    forever = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await forever.wait()
        return {"type": "http.disconnect"}

    return receive


@pytest.mark.parametrize("shape", ["list", "declared-length"])
def test_wsgi_completes_the_key_before_the_body_goes_out(shape: str) -> None:
    store = MemoryStore()
    key = str(uuid.uuid4())

    def app(environ: Any, start_response: Any) -> Any:
        start_response("201 Created", [("Content-Length", "2")])
        if shape == "list":
            return [b"ab"]
        return iter([b"a", b"b"])

    middleware = WSGIIdempotencyMiddleware(app, IdempotencyConfig(store=store, scope=GLOBAL))
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/orders",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "CONTENT_LENGTH": "2",
        "HTTP_IDEMPOTENCY_KEY": f'"{key}"',
        "wsgi.input": io.BytesIO(b"{}"),
        "wsgi.url_scheme": "http",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
    }
    body = middleware(environ, lambda status, headers, exc_info=None: None)
    seen = []
    for _chunk in body:  # what a server hands to the client, chunk by chunk
        record = store.get(_http_key(key))
        seen.append(None if record is None else record.status)
    getattr(body, "close", lambda: None)()
    assert seen[-1] == "completed"


# -- A3 (HTTP): a cancelled request task leaves the handler running, its response kept -------
async def test_a_cancelled_asgi_request_finishes_its_handler_and_a_retry_replays() -> None:
    store = MemoryStore()
    calls: list[int] = []
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(1)
        started.set()
        await asyncio.sleep(0.3)  # the effect is under way when the request task is cancelled
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    config = IdempotencyConfig(store=store, scope=GLOBAL, wait=10)
    middleware = IdempotencyMiddleware(app, config)
    key = str(uuid.uuid4())
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    task = asyncio.ensure_future(middleware(_asgi_scope(key), _receive_once(b"{}"), send))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    again: list[dict[str, Any]] = []

    async def send_again(message: dict[str, Any]) -> None:
        again.append(message)

    await asyncio.wait_for(middleware(_asgi_scope(key), _receive_once(b"{}"), send_again), 10)
    assert again[0]["status"] == 201 and again[1]["body"] == b"done"
    assert calls == [1]


# -- A1 (HTTP): the handler ran but the response could not be stored -----------------------------
@pytest.mark.parametrize("face_name", ["asgi", "wsgi"])
async def test_an_http_response_not_stored_keeps_the_key_claimed(face_name: str) -> None:
    store = CompleteFailsStore(failures=10**9)
    face: Any = FACES[face_name](IdempotencyConfig(store=store, scope=GLOBAL, lease=2))
    key = key_header()
    first = await face.request("POST", "/orders", [key], b"{}")
    assert first.status == 201  # the client gets its response
    await asyncio.sleep(2.5)  # past the lease: the background retry renews it
    busy = await face.request("POST", "/orders", [key], b"{}")
    assert busy.status == 409
    store.failures = 0
    deadline = time.monotonic() + 10
    while True:
        replay = await face.request("POST", "/orders", [key], b"{}")
        if replay.status == 201:
            assert replay.replayed
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert face.calls["/orders"] == 1


# -- F16 (redteam3): a result larger than the store takes is "ran, not storable" ------------------
@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_a_result_over_the_store_limit_is_kept_as_ran_not_storable(store: Store) -> None:
    # Every store refuses a result over its limit (max_result_bytes: MySQL max_allowed_packet,
    # PostgreSQL 1 GB, Redis proto-max-bulk-len, SQLite SQLITE_LIMIT_LENGTH) before sending it;
    # the flow keeps a small marker, so a retry raises SerializationError instead of running.
    # A small limit stands in for the real one here.
    store.max_result_bytes = 1000
    runs: list[int] = []

    @idempotent(store=store, key=["n"], lease=2, wait_timeout=5)
    def export(n: int) -> str:
        runs.append(n)
        return "x" * 5000

    with pytest.raises(ResultTooLarge, match="5002 bytes"):
        export(1)
    started = time.monotonic()
    with pytest.raises(SerializationError, match=r"already ran.*more than .* can store"):
        export(1)
    assert time.monotonic() - started < 1.5
    assert runs == [1]


@pytest.mark.parametrize("face_name", ["asgi", "wsgi"])
async def test_an_http_response_over_the_store_limit_is_kept_not_replayable(
    face_name: str,
) -> None:
    store = MemoryStore()
    store.max_result_bytes = 16  # any response is larger
    face: Any = FACES[face_name](IdempotencyConfig(store=store, scope=GLOBAL, lease=2))
    key = key_header()
    first = await face.request("POST", "/orders", [key], b"{}")
    assert first.status == 201  # the client gets its response
    again = await face.request("POST", "/orders", [key], b"{}")
    assert again.status == 409 and again.problem == "response-not-replayable"
    assert face.calls["/orders"] == 1


def test_a_stored_exception_over_the_store_limit_still_reaches_the_first_caller() -> None:
    class Declined(Exception):
        pass

    store = MemoryStore()
    store.max_result_bytes = 400  # the exception (about 1 kB stored) is over, the marker not
    runs: list[int] = []

    @idempotent(store=store, key=["n"], store_errors=[Declined])
    def charge(n: int) -> str:
        runs.append(n)
        raise Declined("x" * 500)

    with pytest.raises(Declined):
        charge(1)
    with pytest.raises(SerializationError, match=r"already ran.*more than .* can store"):
        charge(1)
    assert runs == [1]


def test_a_marker_too_large_itself_is_kept_without_its_text() -> None:
    store = MemoryStore()
    store.max_result_bytes = 16  # not even the marker's reason fits
    runs: list[int] = []

    @idempotent(store=store, key=["n"], lease=2, wait_timeout=5)
    def export(n: int) -> str:
        runs.append(n)
        return "x" * 100

    with pytest.raises(ResultTooLarge):
        export(1)
    with pytest.raises(SerializationError, match="already ran"):
        export(1)
    assert runs == [1]
