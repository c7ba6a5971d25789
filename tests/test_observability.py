"""Metrics, spans and structured logs of store operations, on real stores, a real
``CollectorRegistry`` and the real OpenTelemetry SDK (InMemorySpanExporter)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
