"""OpenTelemetry spans of oncely's store operations (extra ``oncely[otel]``).

Call :func:`install` once at start-up. Each store operation (claim, complete, release, watch)
becomes a ``CLIENT`` span, a child of the span current where the call runs, named and described
by the OpenTelemetry database semantic conventions
(https://opentelemetry.io/docs/specs/semconv/database/database-spans/):

- name ``{db.operation.name} {db.system.name}``, e.g. ``claim redis``;
- ``db.system.name``: ``redis``, ``postgresql``, ``mysql``, ``sqlite``, or ``oncely.memory``
  for the in-process store (the conventions' enum is open; custom values carry a namespace);
- ``db.operation.name``: the store operation;
- on failure: status ``ERROR``, ``error.type`` (the exception's qualified class name) and the
  exception recorded as an event.

oncely's own attributes: ``oncely.outcome`` (``new``, ``replay``, ``in_flight``, ``mismatch``
for claims, ``ok`` otherwise) and ``oncely.key.digest`` (:func:`oncely.core.observe.log_digest`:
the SHA-256 of the caller's key, or its HMAC-SHA256 under ``$ONCELY_LOG_KEY`` when that is set,
for matching a trace to a record and to log lines; never the raw key). A lost lease adds an
``oncely.lease_lost`` event to the span current on the thread that finds out (if any), and
a lost lock an ``oncely.lock_lost`` event (attribute ``oncely.lock.backend``; never the
lock's name).

A completion handed to the background (the store did not take it at once,
:mod:`oncely.core.settle`) is an ``INTERNAL`` span ``complete_later {db.system.name}``, a child
of the span current where the call ran, from the hand-off to the end of the retries, with
``oncely.outcome`` ``succeeded``, ``given_up`` or ``failed`` (status ``ERROR`` for the last
two). Lock renewals are counted by the metrics, not traced.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

from oncely.core import observe
from oncely.core.records import RecordKey

__all__ = ["OtelObserver", "install", "system_name", "uninstall"]

_SYSTEMS = {"memory": "oncely.memory", "postgres": "postgresql", "mariadb": "mysql"}


def system_name(store: str) -> str:
    """The ``db.system.name`` for a store kind (its first URL scheme)."""
    return _SYSTEMS.get(store, store)


class _Scope:
    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def done(self, outcome: str, seconds: float, error: BaseException | None) -> None:
        span = self.span
        span.set_attribute("oncely.outcome", outcome)
        if error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()


class _Background:
    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def done(self, outcome: str, seconds: float) -> None:
        span = self.span
        span.set_attribute("oncely.outcome", outcome)
        if outcome != "succeeded":
            span.set_status(Status(StatusCode.ERROR, f"the background completion {outcome}"))
        span.end()


class OtelObserver:
    """Makes a span of each store operation with a tracer from ``tracer_provider``."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        from oncely import __version__

        self.provider = tracer_provider
        self.tracer = trace.get_tracer("oncely", __version__, tracer_provider=tracer_provider)

    def operation(self, store: str, name: str, key: RecordKey) -> _Scope:
        system = system_name(store)
        span = self.tracer.start_span(
            f"{name} {system}",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": system,
                "db.operation.name": name,
                "oncely.key.digest": observe.log_digest(key),
            },
        )
        return _Scope(span)

    def lease_renewed(self, store: str, ok: bool) -> None:
        pass  # renewals run on their own thread or task: counted by the metrics, not traced

    def lock_renewed(self, backend: str, ok: bool) -> None:
        pass  # as lease renewals: counted by the metrics, not traced

    def lock_lost(self, backend: str) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("oncely.lock_lost", {"oncely.lock.backend": backend})

    def background(self, store: str) -> _Background:
        system = system_name(store)
        span = self.tracer.start_span(
            f"complete_later {system}",
            kind=SpanKind.INTERNAL,
            attributes={"db.system.name": system, "db.operation.name": "complete_later"},
        )
        return _Background(span)

    def lease_lost(self, store: str, key: RecordKey) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                "oncely.lease_lost",
                {
                    "db.system.name": system_name(store),
                    "oncely.key.digest": observe.log_digest(key),
                },
            )


#: id(tracer provider) (``id(None)`` for the global one) -> its observer.
_installed: dict[int, OtelObserver] = {}


def install(tracer_provider: TracerProvider | None = None) -> OtelObserver:
    """Trace every store operation from now on, with ``tracer_provider`` (default: the global
    one); returns the observer (pass it to :func:`uninstall`). Installing again with the same
    provider (or the global one again) returns the same observer, so each operation is still
    one span (two app factories, a test fixture or a reload may each call ``install()``)."""
    observer = _installed.get(id(tracer_provider))
    if observer is None or observer.provider is not tracer_provider:
        observer = _installed[id(tracer_provider)] = OtelObserver(tracer_provider)
    observe.add(observer)
    return observer


def uninstall(observer: OtelObserver) -> None:
    """Stop tracing through ``observer``."""
    observe.remove(observer)
    if _installed.get(id(observer.provider)) is observer:
        del _installed[id(observer.provider)]
