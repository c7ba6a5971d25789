"""Metrics, spans and structured logs of store operations, on real stores, a real
``CollectorRegistry`` and the real OpenTelemetry SDK (InMemorySpanExporter)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, generate_latest

from oncely import current_claim, idempotent
from oncely.core import observe
from oncely.core.records import digest_key
from oncely.core.settle import settle_later
from oncely.errors import (
    IdempotencyKeyMismatch,
    InFlightError,
    LeaseLost,
    LockError,
    LockLost,
    ResultNotStored,
    StoreUnavailable,
)
from oncely.locks import Lock
from oncely.observability import logs, otel, prometheus
from oncely.stores import Store
from test_redteam import CompleteFailsStore

KINDS = ["memory", "sqlite", "redis"]


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    observer = prometheus.install(reg)
    yield reg
    prometheus.uninstall(observer)
    assert observer not in observe.observers


@pytest.fixture(params=KINDS)
def kind_store(request: pytest.FixtureRequest, make_store) -> tuple[str, Store]:  # type: ignore[no-untyped-def]
    kind = request.param
    store, _, _ = make_store(kind)
    return kind, store


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    got = reg.get_sample_value(name, labels)
    return 0.0 if got is None else got


def store_label(kind: str) -> str:
    return {"memory": "memory", "sqlite": "sqlite", "redis": "redis"}[kind]


def exercise(store: Store, order: str) -> None:
    """One first-time call, one replay, one in-flight (nested) call and one mismatch."""

    @idempotent(store=store, key=["order_id"], validate=True, on_duplicate="raise")
    def charge(order_id: str, amount: int) -> int:
        if amount == 1:
            with pytest.raises(InFlightError):
                charge(order_id, 1)  # the same key while this call holds it
        return amount

    assert charge(order, 1) == 1  # first time (and, inside, one in-flight claim)
    assert charge(order, 1) == 1  # replay
    with pytest.raises(IdempotencyKeyMismatch):
        charge(order, 2)  # same key, another request


def test_counters_by_outcome(registry: CollectorRegistry, kind_store: tuple[str, Store]) -> None:
    kind, store = kind_store
    label = store_label(kind)
    exercise(store, f"order-{uuid.uuid4()}")
    assert value(registry, "oncely_claims_total", store=label, outcome="new") == 1
    assert value(registry, "oncely_claims_total", store=label, outcome="replay") == 1
    assert value(registry, "oncely_claims_total", store=label, outcome="in_flight") == 1
    assert value(registry, "oncely_claims_total", store=label, outcome="mismatch") == 1
    assert value(registry, "oncely_replays_total", store=label) == 1
    assert value(registry, "oncely_conflicts_total", store=label) == 1
    assert value(registry, "oncely_mismatches_total", store=label) == 1
    count = "oncely_store_operation_seconds_count"
    assert value(registry, count, store=label, operation="claim", outcome="new") == 1
    assert value(registry, count, store=label, operation="complete", outcome="ok") == 1
    total = value(
        registry,
        "oncely_store_operation_seconds_sum",
        store=label,
        operation="claim",
        outcome="new",
    )
    assert 0 < total < 5


def test_async_calls_are_counted(
    registry: CollectorRegistry, kind_store: tuple[str, Store]
) -> None:
    kind, store = kind_store
    label = store_label(kind)

    @idempotent(store=store, key=["order_id"])
    async def charge(order_id: str) -> str:
        return order_id

    async def main() -> None:
        order = f"order-{uuid.uuid4()}"
        assert await charge(order) == order
        assert await charge(order) == order
        await store.aclose()

    asyncio.run(main())
    assert value(registry, "oncely_claims_total", store=label, outcome="new") == 1
    assert value(registry, "oncely_replays_total", store=label) == 1


def test_lost_lease_and_renewals_are_counted(
    registry: CollectorRegistry, kind_store: tuple[str, Store], caplog: pytest.LogCaptureFixture
) -> None:
    kind, store = kind_store
    label = store_label(kind)
    order = f"order-{uuid.uuid4()}"
    digests: list[str] = []

    @idempotent(store=store, key=["order_id"], lease=0.3)
    def victim(order_id: str) -> None:
        claim = current_claim()
        assert claim is not None
        deadline = time.monotonic() + 5  # at least one renewal is confirmed first
        while value(registry, "oncely_lease_renewals_total", store=label, outcome="ok") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        digests.append(claim.key.digest)
        store.delete(claim.key)  # an operator removed the record mid-call
        while claim.lost is None and time.monotonic() < deadline:
            time.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="oncely"), pytest.raises(LeaseLost):
        victim(order)
    assert value(registry, "oncely_leases_lost_total", store=label) == 1
    (lost,) = [r for r in caplog.records if r.getMessage().startswith("oncely: lease lost")]
    assert lost.oncely_digest == digests[0]  # type: ignore[attr-defined]
    assert order not in lost.getMessage() and order not in str(lost.__dict__)
    assert value(registry, "oncely_lease_renewals_total", store=label, outcome="ok") >= 1


def test_no_label_value_holds_the_key_or_its_digest(
    registry: CollectorRegistry, kind_store: tuple[str, Store]
) -> None:
    _, store = kind_store
    order = f"order-{uuid.uuid4()}"
    exercise(store, order)
    allowed = {"memory", "sqlite", "redis", "claim", "complete", "release", "watch"}
    allowed |= {"new", "replay", "in_flight", "mismatch", "ok", "error", "failed"}
    seen = 0
    for metric in registry.collect():
        for sample in metric.samples:
            for name, label_value in sample.labels.items():
                if name == "le":
                    continue
                seen += 1
                assert label_value in allowed, (sample.name, name, label_value)
    assert seen > 0
    text = generate_latest(registry).decode()
    assert order not in text
    assert "order" not in text.replace("oncely", "")  # no part of the key either
    for part in (order, f'["{order}"]'):
        assert digest_key(part)[:16] not in text


def test_spans_follow_the_database_conventions(kind_store: tuple[str, Store]) -> None:
    kind, store = kind_store
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = otel.install(provider)
    try:
        exercise(store, f"order-{uuid.uuid4()}")
    finally:
        otel.uninstall(observer)
    spans = exporter.get_finished_spans()
    system = {"memory": "oncely.memory", "sqlite": "sqlite", "redis": "redis"}[kind]
    claims = [
        s
        for s in spans
        if s.attributes is not None and s.attributes["db.operation.name"] == "claim"
    ]
    assert sorted(str(s.attributes["oncely.outcome"]) for s in claims if s.attributes) == [
        "in_flight",
        "mismatch",
        "new",
        "replay",
    ]
    for span in spans:
        assert span.kind is SpanKind.CLIENT
        assert span.attributes is not None
        assert span.attributes["db.system.name"] == system
        assert span.name == f"{span.attributes['db.operation.name']} {system}"
        digest = str(span.attributes["oncely.key.digest"])
        assert len(digest) == 64 and "order" not in digest
    assert {s.attributes["db.operation.name"] for s in spans if s.attributes} >= {
        "claim",
        "complete",
    }


def test_a_failed_operation_is_an_error_span() -> None:
    from oncely.stores import open_store

    store = open_store("redis://127.0.0.1:1/0")  # nothing listens on port 1
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = otel.install(provider)
    reg = CollectorRegistry()
    metrics = prometheus.install(reg)

    @idempotent(store=store, key=["k"])
    def f(k: str) -> str:
        return k

    try:
        with pytest.raises(StoreUnavailable):
            f("x")
        assert value(reg, "oncely_claims_total", store="redis", outcome="error") == 1
    finally:
        otel.uninstall(observer)
        prometheus.uninstall(metrics)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "StoreUnavailable"


def test_log_records_carry_the_digest_never_the_key(
    caplog: pytest.LogCaptureFixture, kind_store: tuple[str, Store]
) -> None:
    _, store = kind_store
    order = f"order-{uuid.uuid4()}"
    observer = logs.install()
    try:
        with caplog.at_level(logging.DEBUG, logger="oncely"):
            exercise(store, order)
    finally:
        logs.uninstall(observer)
    records = [r for r in caplog.records if hasattr(r, "oncely_operation")]
    assert {r.oncely_outcome for r in records} >= {"new", "replay", "in_flight", "mismatch"}  # type: ignore[attr-defined]
    digests = {r.oncely_digest for r in records}  # type: ignore[attr-defined]
    assert len(digests) == 1 and len(next(iter(digests))) == 64
    for record in caplog.records:
        assert order not in record.getMessage()
        assert order not in str(record.__dict__)


def test_nothing_is_recorded_without_an_observer(make_store) -> None:  # type: ignore[no-untyped-def]
    store, _, _ = make_store("memory")
    assert observe.observers == []
    reg = CollectorRegistry()
    metrics = prometheus.install(reg)
    prometheus.uninstall(metrics)

    @idempotent(store=store, key=["k"])
    def f(k: str) -> str:
        return k

    f("x")
    assert value(reg, "oncely_claims_total", store="memory", outcome="new") == 0


def test_metrics_route_under_starlette(registry: CollectorRegistry, make_store) -> None:  # type: ignore[no-untyped-def]
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    store, _, _ = make_store("memory")

    @idempotent(store=store, key=["k"])
    def f(k: str) -> str:
        return k

    f("x")

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("home")

    app = Starlette(routes=[Route("/", home), Mount("/metrics", app=prometheus.asgi_app(registry))])
    wrapped = prometheus.with_metrics_asgi(Starlette(routes=[Route("/", home)]), registry=registry)

    async def main() -> None:
        for asgi in (app, wrapped):
            transport = httpx.ASGITransport(app=asgi)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://t", follow_redirects=True
            ) as client:
                reply = await client.get("/metrics")
                assert reply.status_code == 200
                assert reply.headers["content-type"].startswith("text/plain")
                assert 'oncely_claims_total{outcome="new",store="memory"} 1.0' in reply.text
                assert "oncely_store_operation_seconds_bucket" in reply.text
                assert (await client.get("/")).text == "home"

    asyncio.run(main())


def test_metrics_route_under_wsgi(registry: CollectorRegistry, make_store) -> None:  # type: ignore[no-untyped-def]
    store, _, _ = make_store("sqlite")

    @idempotent(store=store, key=["k"])
    def f(k: str) -> str:
        return k

    f("x")

    def app(environ: dict[str, object], start_response):  # type: ignore[no-untyped-def]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"home"]

    wrapped = prometheus.with_metrics_wsgi(app, registry=registry)
    with httpx.Client(transport=httpx.WSGITransport(app=wrapped), base_url="http://t") as client:
        reply = client.get("/metrics")
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain")
        assert 'oncely_claims_total{outcome="new",store="sqlite"} 1.0' in reply.text
        assert client.get("/").text == "home"


def test_counts_are_exact_under_concurrent_callers(
    registry: CollectorRegistry, kind_store: tuple[str, Store]
) -> None:
    kind, store = kind_store
    label = store_label(kind)
    order = f"order-{uuid.uuid4()}"
    start = threading.Barrier(16)

    @idempotent(store=store, key=["order_id"], on_duplicate="raise", lease=5)
    def charge(order_id: str) -> str:
        time.sleep(0.05)
        return order_id

    def caller() -> str:
        start.wait()
        try:
            return charge(order)
        except InFlightError:
            return "in_flight"

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: caller(), range(16)))
    outcomes = {
        o: value(registry, "oncely_claims_total", store=label, outcome=o)
        for o in ("new", "replay", "in_flight", "mismatch", "error")
    }
    assert outcomes["new"] == 1 and outcomes["mismatch"] == outcomes["error"] == 0
    assert sum(outcomes.values()) == 16
    assert outcomes["in_flight"] == answers.count("in_flight")
    assert value(registry, "oncely_conflicts_total", store=label) == outcomes["in_flight"]
    assert value(registry, "oncely_replays_total", store=label) == outcomes["replay"]


def test_http_layer_claims_are_counted_and_served(registry: CollectorRegistry) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from oncely.http import GLOBAL, IdempotencyConfig, IdempotencyMiddleware
    from oncely.stores.memory import MemoryStore

    async def orders(request: object) -> JSONResponse:
        return JSONResponse({"id": str(uuid.uuid4())}, status_code=201)

    inner = Starlette(routes=[Route("/orders", orders, methods=["POST"])])
    app = prometheus.with_metrics_asgi(
        IdempotencyMiddleware(inner, IdempotencyConfig(store=MemoryStore(), scope=GLOBAL)),
        registry=registry,
    )
    key = str(uuid.uuid4())

    async def main() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = await client.post("/orders", json={"a": 1}, headers={"Idempotency-Key": key})
            again = await client.post("/orders", json={"a": 1}, headers={"Idempotency-Key": key})
            assert first.status_code == again.status_code == 201
            assert first.json() == again.json()
            return (await client.get("/metrics")).text

    text = asyncio.run(main())
    assert 'oncely_claims_total{outcome="new",store="memory"} 1.0' in text
    assert 'oncely_replays_total{store="memory"} 1.0' in text
    assert key not in text and digest_key(key) not in text


# -- background completions and locks ------------------------------------------------------------
def _wait_for(reg: CollectorRegistry, name: str, want: float, **labels: str) -> None:
    deadline = time.monotonic() + 10
    while value(reg, name, **labels) < want:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {want}"
        time.sleep(0.01)


@pytest.mark.parametrize("face", ["sync", "async"])
def test_background_completions_are_counted_and_traced(
    registry: CollectorRegistry, face: str
) -> None:
    """A completion the store refused 4 times is handed to the background and lands there:
    started and succeeded are counted (with its duration), and it is one INTERNAL span, a
    child of the span the call ran in."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    observer = otel.install(provider)
    store = CompleteFailsStore(failures=4)  # async too: acomplete calls complete
    order = f"order-{uuid.uuid4()}"
    try:
        with tracer.start_as_current_span("request") as parent:
            if face == "sync":

                @idempotent(store=store, key=["k"], lease=2)
                def charge(k: str) -> str:
                    return "charged"

                with pytest.raises(ResultNotStored):
                    charge(order)
            else:

                @idempotent(store=store, key=["k"], lease=2)
                async def acharge(k: str) -> str:
                    return "charged"

                async def main() -> None:
                    with pytest.raises(ResultNotStored):
                        await acharge(order)
                    while store.failures or not value(
                        registry,
                        "oncely_background_completions_total",
                        store="memory",
                        outcome="succeeded",
                    ):
                        await asyncio.sleep(0.01)  # the task runs on this loop

                asyncio.run(main())
        _wait_for(
            registry, "oncely_background_completions_total", 1, store="memory", outcome="succeeded"
        )
    finally:
        otel.uninstall(observer)
    assert value(registry, "oncely_background_completions_started_total", store="memory") == 1
    seconds = "oncely_background_completion_seconds"
    assert value(registry, f"{seconds}_count", store="memory", outcome="succeeded") == 1
    assert 0 < value(registry, f"{seconds}_sum", store="memory", outcome="succeeded") < 10
    (span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("complete_later")]
    assert span.name == "complete_later oncely.memory"
    assert span.kind is SpanKind.INTERNAL
    assert span.attributes is not None and span.attributes["oncely.outcome"] == "succeeded"
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert order not in generate_latest(registry).decode()


def test_background_completions_that_give_up_or_fail_are_counted(
    registry: CollectorRegistry,
) -> None:
    """The retry's two other ends: the store stays unreachable for the whole bound
    (``given_up``), the claim is lost meanwhile (``failed``); both ERROR spans."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = otel.install(provider)

    def unreachable() -> None:
        raise StoreUnavailable("injected: the store is unreachable")

    def lost() -> None:
        raise LeaseLost("injected: the claim was taken over")

    try:
        for write in (unreachable, lost):
            ended = threading.Event()
            settle_later(write, ended.set, "the test's result", settle_for=0.3, store="redis")
            assert ended.wait(10)
    finally:
        otel.uninstall(observer)
    total = "oncely_background_completions_total"
    assert value(registry, "oncely_background_completions_started_total", store="redis") == 2
    assert value(registry, total, store="redis", outcome="given_up") == 1
    assert value(registry, total, store="redis", outcome="failed") == 1
    assert value(registry, total, store="redis", outcome="succeeded") == 0
    spans = [s for s in exporter.get_finished_spans() if s.name == "complete_later redis"]
    assert sorted(str((s.attributes or {})["oncely.outcome"]) for s in spans) == [
        "failed",
        "given_up",
    ]
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)


def test_lock_renewals_and_a_lost_lock_are_counted(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """A lock (ttl 2 s, auto_renew) on a real SQLite file: its renewals are counted ``ok``;
    an operator deletes its row, the next renewal finds it gone: one ``failed`` renewal and
    one lost lock, labelled by the backend's kind, never by the lock's name."""
    name = f"lock-{uuid.uuid4()}"
    url = f"sqlite:///{tmp_path / 'locks.db'}"
    lock = Lock(url, name, ttl=2, auto_renew=True)
    lock.acquire()
    try:
        _wait_for(registry, "oncely_lock_renewals_total", 1, backend="sqlite", outcome="ok")
        with sqlite3.connect(tmp_path / "locks.db") as conn:
            conn.execute("DELETE FROM oncely_locks")
        assert lock.lost.wait(10)
    finally:
        with contextlib.suppress(LockError):
            lock.release()
    assert value(registry, "oncely_locks_lost_total", backend="sqlite") == 1
    assert value(registry, "oncely_lock_renewals_total", backend="sqlite", outcome="failed") == 1
    exposed = generate_latest(registry).decode()
    assert name not in exposed and "oncely_locks_lost_total" in exposed


def test_a_lost_lock_is_an_event_on_the_current_span(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = otel.install(provider)
    name = f"lock-{uuid.uuid4()}"
    lock = Lock(f"sqlite:///{tmp_path / 'locks.db'}", name, ttl=2)
    try:
        lock.acquire()
        with sqlite3.connect(tmp_path / "locks.db") as conn:
            conn.execute("DELETE FROM oncely_locks")
        with provider.get_tracer("test").start_as_current_span("settle"), pytest.raises(LockLost):
            lock.extend()
    finally:
        otel.uninstall(observer)
    (span,) = exporter.get_finished_spans()
    (event,) = span.events
    assert event.name == "oncely.lock_lost"
    assert dict(event.attributes or {}) == {"oncely.lock.backend": "sqlite"}


def test_an_observer_without_the_newer_hooks_keeps_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An observer written before the background and lock hooks (only ``operation``,
    ``lease_renewed``, ``lease_lost``) is skipped for them, not broken; the log observer
    logs a background completion's end with its fields and no key."""

    class Old:
        def operation(self, store: str, name: str, key: Any) -> Any:
            return self

        def done(self, outcome: str, seconds: float, error: BaseException | None) -> None:
            pass

        def lease_renewed(self, store: str, ok: bool) -> None:
            pass

        def lease_lost(self, store: str, key: Any) -> None:
            pass

    old = Old()
    observe.add(old)  # type: ignore[arg-type]
    log_observer = logs.install(level=logging.INFO)
    try:
        ended = threading.Event()
        with caplog.at_level(logging.INFO, logger="oncely.ops"):
            settle_later(lambda: None, ended.set, "a result", store="sqlite")
            assert ended.wait(10)
        lock = Lock(f"sqlite:///{tmp_path / 'locks.db'}", "compat", ttl=2)
        lock.acquire()
        with sqlite3.connect(tmp_path / "locks.db") as conn:
            conn.execute("DELETE FROM oncely_locks")
        with pytest.raises(LockLost):
            lock.extend()
    finally:
        observe.remove(old)  # type: ignore[arg-type]
        logs.uninstall(log_observer)
    (record,) = [r for r in caplog.records if "background completion" in r.getMessage()]
    assert record.oncely_outcome == "succeeded"  # type: ignore[attr-defined]
    assert record.oncely_operation == "complete_later"  # type: ignore[attr-defined]


# -- an observer never changes the outcome of a call ----------------------------------------------
HOOKS = (
    "operation",
    "operation.done",
    "lease_renewed",
    "lease_lost",
    "background",
    "background.done",
    "lock_renewed",
    "lock_lost",
)


class Raising:
    """An observer whose hooks in ``raising`` raise (a full disk, a broken exporter); every
    call is counted by hook, and ``called[hook]`` is set on each."""

    def __init__(self, *raising: str) -> None:
        self.raising = set(raising)
        self.calls: dict[str, int] = dict.fromkeys(HOOKS, 0)
        self.lock = threading.Lock()
        self.second: dict[str, threading.Event] = {h: threading.Event() for h in HOOKS}

    def _hook(self, hook: str) -> None:
        with self.lock:
            self.calls[hook] += 1
            if self.calls[hook] >= 2:
                self.second[hook].set()
        if hook in self.raising:
            raise OSError(28, f"No space left on device ({hook})")

    def operation(self, store: str, name: str, key: Any) -> Any:
        self._hook("operation")
        return _RaisingScope(self, "operation.done")

    def lease_renewed(self, store: str, ok: bool) -> None:
        self._hook("lease_renewed")

    def lease_lost(self, store: str, key: Any) -> None:
        self._hook("lease_lost")

    def background(self, store: str) -> Any:
        self._hook("background")
        return _RaisingScope(self, "background.done")

    def lock_renewed(self, backend: str, ok: bool) -> None:
        self._hook("lock_renewed")

    def lock_lost(self, backend: str) -> None:
        self._hook("lock_lost")


class _RaisingScope:
    def __init__(self, owner: Raising, hook: str) -> None:
        self.owner, self.hook = owner, hook

    def done(self, *args: Any) -> None:
        self.owner._hook(self.hook)


@pytest.fixture
def raising() -> Iterator[Raising]:
    observer = Raising(*HOOKS)
    observe.add(observer)  # type: ignore[arg-type]
    yield observer
    observe.remove(observer)  # type: ignore[arg-type]


def _errors(hook: str) -> int:
    return observe.errors[(Raising.__qualname__, hook)]


@pytest.mark.parametrize("hook", ["operation", "operation.done"])
@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_an_observer_that_raises_never_skips_the_call_or_its_completion(
    make_store,
    kind: str,
    face: str,
    hook: str,  # type: ignore[no-untyped-def]
) -> None:
    """F01: an observer raising on every store operation (at its start, or when it ends, as
    the span or metric is written): the body runs once, the result is stored, the call returns
    it, and a retry replays it; the errors are counted, not raised."""
    store, _, _ = make_store(kind)
    observer = Raising(hook)
    ran: list[str] = []
    before = _errors(hook)
    observe.add(observer)  # type: ignore[arg-type]
    try:
        if face == "sync":

            @idempotent(store=store, key=["order_id"], on_duplicate="raise")
            def charge(order_id: str) -> str:
                ran.append(order_id)
                return f"charged {order_id}"

            answers = [charge("o-1"), charge("o-1")]
        else:

            @idempotent(store=store, key=["order_id"], on_duplicate="raise")
            async def acharge(order_id: str) -> str:
                ran.append(order_id)
                return f"charged {order_id}"

            async def twice() -> list[str]:
                return [await acharge("o-1"), await acharge("o-1")]

            answers = asyncio.run(twice())
    finally:
        observe.remove(observer)  # type: ignore[arg-type]
    assert answers == ["charged o-1", "charged o-1"]
    assert ran == ["o-1"]
    assert observer.calls[hook] >= 3  # claim, complete, claim (the replay)
    assert _errors(hook) - before == observer.calls[hook]


@pytest.mark.parametrize("hook", ["operation", "operation.done"])
@pytest.mark.parametrize("face", ["asgi", "wsgi"])
def test_an_observer_that_raises_never_skips_an_http_completion(face: str, hook: str) -> None:
    """F01b: the observer raises on every store operation; the handler runs once, the retry
    is the stored replay."""
    from oncely.http import GLOBAL, IdempotencyConfig, IdempotencyMiddleware
    from oncely.http.wsgi import WSGIIdempotencyMiddleware
    from oncely.stores.memory import MemoryStore

    paid: list[int] = []
    config = IdempotencyConfig(store=MemoryStore(), scope=GLOBAL)
    key = str(uuid.uuid4())
    headers = {"Idempotency-Key": key}
    raising = Raising(hook)
    observe.add(raising)  # type: ignore[arg-type]
    try:
        if face == "asgi":

            async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
                await receive()
                paid.append(1)
                body = f'{{"paid":{len(paid)}}}'.encode()
                await send({"type": "http.response.start", "status": 201, "headers": []})
                await send({"type": "http.response.body", "body": body})

            async def main() -> list[httpx.Response]:
                transport = httpx.ASGITransport(app=IdempotencyMiddleware(asgi, config))
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    return [await client.post("/pay", json={}, headers=headers) for _ in range(2)]

            first, again = asyncio.run(main())
        else:

            def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
                paid.append(1)
                start_response("201 Created", [("Content-Type", "application/json")])
                return [f'{{"paid":{len(paid)}}}'.encode()]

            transport = httpx.WSGITransport(app=WSGIIdempotencyMiddleware(wsgi, config))
            with httpx.Client(transport=transport, base_url="http://t") as client:
                first, again = (client.post("/pay", json={}, headers=headers) for _ in range(2))
    finally:
        observe.remove(raising)  # type: ignore[arg-type]
    assert paid == [1]
    assert first.status_code == again.status_code == 201
    assert again.json() == {"paid": 1}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert raising.calls[hook] >= 3


@pytest.mark.parametrize("face", ["sync", "async"])
def test_an_observer_that_raises_on_a_lease_renewal_never_drops_the_lease(
    raising: Raising,
    make_store,
    face: str,  # type: ignore[no-untyped-def]
) -> None:
    """F02: the store renews fine but the observer raises on every renewal: renewals go on
    (a second one is confirmed, 2 s lease renewed every 0.67 s), the lease is never lost."""
    store, _, _ = make_store("sqlite")
    lost: list[BaseException | None] = []

    def hold() -> None:
        assert raising.second["lease_renewed"].wait(5), "the renewals stopped"
        claim = current_claim()
        assert claim is not None
        lost.append(claim.lost)

    if face == "sync":

        @idempotent(store=store, key=["k"], lease=2)
        def work(k: str) -> str:
            hold()
            return "done"

        assert work("x") == "done"
    else:

        @idempotent(store=store, key=["k"], lease=2)
        async def awork(k: str) -> str:
            await asyncio.to_thread(hold)
            return "done"

        assert asyncio.run(awork("x")) == "done"
    assert lost == [None]
    assert raising.calls["lease_renewed"] >= 2


@pytest.mark.parametrize("hook", ["background", "background.done"])
def test_an_observer_that_raises_never_stops_a_background_completion(hook: str) -> None:
    raising = Raising(hook)
    observe.add(raising)  # type: ignore[arg-type]
    try:
        written, ended = threading.Event(), threading.Event()
        settle_later(written.set, ended.set, "a result", store="sqlite")
        assert ended.wait(10) and written.is_set()
        deadline = time.monotonic() + 10  # the end is told right after done()
        while raising.calls[hook] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        observe.remove(raising)  # type: ignore[arg-type]
    assert raising.calls[hook] == 1


def test_an_observer_that_raises_never_stops_a_lock_renewal(
    raising: Raising, tmp_path: Path
) -> None:
    """Lock renewals go on past an observer raising on each; a lost lock still raises
    :class:`LockLost`, not the observer's error."""
    lock = Lock(f"sqlite:///{tmp_path / 'locks.db'}", "renewed", ttl=2, auto_renew=True)
    lock.acquire()
    try:
        assert raising.second["lock_renewed"].wait(5), "the lock renewals stopped"
        assert not lock.lost.is_set()
    finally:
        lock.release()
    other = Lock(f"sqlite:///{tmp_path / 'locks.db'}", "lost", ttl=2)
    other.acquire()
    with sqlite3.connect(tmp_path / "locks.db") as conn:
        conn.execute("DELETE FROM oncely_locks")
    with pytest.raises(LockLost):
        other.extend()
    assert raising.calls["lock_lost"] == 1


def test_observer_errors_are_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    class Noisy(Raising):
        pass

    observer = Noisy("operation")
    observe.add(observer)  # type: ignore[arg-type]
    try:

        @idempotent(store="memory://", key=["k"])
        def f(k: str) -> str:
            return k

        with caplog.at_level(logging.ERROR, logger="oncely.observe"):
            for i in range(5):
                f(str(i))
    finally:
        observe.remove(observer)  # type: ignore[arg-type]
    assert observe.errors[(Noisy.__qualname__, "operation")] == 10  # claim + complete, 5 times
    (record,) = caplog.records  # one record within REPORT_EVERY, with the traceback
    assert "Noisy raised in operation" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], OSError)


def test_prometheus_with_its_multiprocess_directory_missing_never_fails_a_call(
    tmp_path: Path,
) -> None:
    """F03: the shipped Prometheus observer in multiprocess mode with the directory missing
    raises FileNotFoundError on every write; the call runs once, completes and replays."""
    import subprocess
    import sys

    code = (
        "from prometheus_client import CollectorRegistry\n"
        "from oncely import idempotent\n"
        "from oncely.core import observe\n"
        "from oncely.observability import prometheus\n"
        "prometheus.install(CollectorRegistry())\n"
        "runs = []\n"
        "@idempotent(store='memory://', name='t.charge', key=['k'], on_duplicate='raise')\n"
        "def charge(k):\n"
        "    runs.append(k)\n"
        "    return 'charged'\n"
        "print(charge('o-1'), charge('o-1'), len(runs), sum(observe.errors.values()) > 0)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.stdout.split() == ["charged", "charged", "1", "True"], out.stderr
    assert "FileNotFoundError" in out.stderr  # logged once, with the traceback


# -- install() twice, the /metrics route, the log digest ----------------------------------------
def test_otel_install_twice_traces_each_operation_once() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    first = otel.install(provider)
    second = otel.install(provider)
    try:

        @idempotent(store="memory://", key=["k"])
        def f(k: str) -> str:
            return k

        f("a")
        f("a")
    finally:
        otel.uninstall(first)
    assert first is second and first not in observe.observers
    assert [s.name for s in exporter.get_finished_spans()] == [
        "claim oncely.memory",
        "complete oncely.memory",
        "claim oncely.memory",
    ]
    again = otel.install(provider)  # after uninstall: a fresh observer
    otel.uninstall(again)
    assert again is not first


def test_logs_install_twice_logs_each_operation_once(caplog: pytest.LogCaptureFixture) -> None:
    first, second = logs.install(level=logging.INFO), logs.install(level=logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="oncely.ops"):

            @idempotent(store="memory://", key=["k"])
            def f(k: str) -> str:
                return k

            f("a")
    finally:
        logs.uninstall(first)
    assert first is second
    assert [r.oncely_operation for r in caplog.records] == ["claim", "complete"]  # type: ignore[attr-defined]


def test_metrics_apps_serve_the_installed_registry_on_get_and_head_only(
    registry: CollectorRegistry,
) -> None:
    """F20: without registry=, the apps serve the registry install() was given (not
    prometheus_client's default); POST /metrics reaches the wrapped app, and the bare apps
    answer it 405."""

    @idempotent(store="memory://", key=["k"])
    def f(k: str) -> str:
        return k

    f("x")

    async def home(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app " + scope["path"].encode()})

    def whome(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app " + environ["PATH_INFO"].encode()]

    async def main() -> list[httpx.Response]:
        replies = []
        for asgi in (prometheus.with_metrics_asgi(home), prometheus.asgi_app()):
            transport = httpx.ASGITransport(app=asgi)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                replies += [await client.get("/metrics"), await client.post("/metrics")]
        return replies

    replies = asyncio.run(main())
    for wsgi in (prometheus.with_metrics_wsgi(whome), prometheus.wsgi_app()):
        with httpx.Client(transport=httpx.WSGITransport(app=wsgi), base_url="http://t") as c:
            replies += [c.get("/metrics"), c.post("/metrics")]
    gets, posts = replies[0::2], replies[1::2]
    assert all(r.status_code == 200 for r in gets)
    assert all('oncely_claims_total{outcome="new",store="memory"} 1.0' in r.text for r in gets)
    assert [p.status_code for p in posts] == [200, 405, 200, 405]
    assert posts[0].text == posts[2].text == "app /metrics"
    assert posts[1].headers["allow"] == "GET, HEAD"


@pytest.fixture
def log_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    secret = "a-log-key-of-32-bytes-for-tests!"
    monkeypatch.setenv("ONCELY_LOG_KEY", secret)
    observe.set_log_key()
    yield secret
    monkeypatch.delenv("ONCELY_LOG_KEY")
    observe.set_log_key()


def test_with_a_log_key_logs_and_spans_carry_a_keyed_digest(
    log_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """F19: with $ONCELY_LOG_KEY, the digest in logs and spans is HMAC-SHA256 under it (not
    the plain SHA-256 anyone can compute for a guessed user id); the store's digest is not."""
    import hashlib
    import hmac

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer, logger = otel.install(provider), logs.install(level=logging.INFO)
    seen: list[str] = []
    try:

        @idempotent(store="memory://", key=["user_id"])
        def f(user_id: int) -> int:
            claim = current_claim()
            assert claim is not None
            seen.append(claim.key.digest)
            return user_id

        with caplog.at_level(logging.INFO, logger="oncely.ops"):
            f(48213)
    finally:
        otel.uninstall(tracer)
        logs.uninstall(logger)
    (stored,) = seen
    keyed = hmac.new(log_key.encode(), stored.encode(), hashlib.sha256).hexdigest()
    assert keyed != stored
    assert {r.oncely_digest for r in caplog.records} == {keyed}  # type: ignore[attr-defined]
    digests = {s.attributes["oncely.key.digest"] for s in exporter.get_finished_spans()}  # type: ignore[index]
    assert digests == {keyed}


def test_without_a_log_key_the_digest_is_the_records_and_a_short_key_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from oncely.core.records import RecordKey
    from oncely.errors import ConfigurationError

    monkeypatch.delenv("ONCELY_LOG_KEY", raising=False)
    observe.set_log_key()
    key = RecordKey.of("scope", "48213")
    assert observe.log_digest(key) == key.digest == digest_key("48213")
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        observe.set_log_key("short")
    assert observe.log_digest(key) == key.digest  # unchanged by the refused secret


def test_a_bad_log_key_read_late_never_raises_nor_leaks_the_plain_digest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease lost is logged with the digest from core: a bad $ONCELY_LOG_KEY first read there
    must not raise in that path, nor fall back to the unkeyed digest."""
    from oncely.core.records import RecordKey

    monkeypatch.setenv("ONCELY_LOG_KEY", "short")
    monkeypatch.setattr(observe, "_log_key", observe._UNRESOLVED)
    with caplog.at_level(logging.ERROR, logger="oncely.observe"):
        assert observe.log_digest(RecordKey.of("s", "48213")) == "invalid-log-key"
    assert "ONCELY_LOG_KEY" in caplog.text


@pytest.mark.parametrize("hook", ["operation", "operation.done"])
def test_an_observer_that_raises_never_makes_a_consumer_run_a_redelivery(
    make_store: Any, hook: str
) -> None:
    from oncely.messaging.consumer import Ack, Delivery, IdempotentConsumer

    store, _, _ = make_store("sqlite")
    seen: list[bytes] = []
    consumer = IdempotentConsumer(lambda d: seen.append(d.body), name="c", store=store)
    raising = Raising(hook)
    observe.add(raising)  # type: ignore[arg-type]
    try:
        first = consumer.process(Delivery(body=b"a", message_id="m-1", headers={}))
        again = consumer.process(Delivery(body=b"a", message_id="m-1", headers={}))
    finally:
        observe.remove(raising)  # type: ignore[arg-type]
    assert (first, again) == (Ack(ran=True), Ack(ran=False))
    assert seen == [b"a"] and raising.calls[hook] >= 3
