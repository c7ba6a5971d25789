"""Prometheus metrics of oncely's store operations and leases (extra ``oncely[prometheus]``).

Call :func:`install` once at start-up; the metrics are registered on ``registry``
(default: ``prometheus_client.REGISTRY``) and fed by :mod:`oncely.core.observe`:

==================================  ==========================  ===============================
metric                              labels                      counts
==================================  ==========================  ===============================
``oncely_claims_total``             ``store``, ``outcome``      claims: ``new``, ``replay``,
                                                                ``in_flight``, ``mismatch``,
                                                                ``error``
``oncely_replays_total``            ``store``                   claims answered with a stored
                                                                result
``oncely_conflicts_total``          ``store``                   claims refused: another caller
                                                                holds the key (in flight)
``oncely_mismatches_total``         ``store``                   claims refused: same key,
                                                                different request fingerprint
``oncely_lease_renewals_total``     ``store``, ``outcome``      renewals: ``ok`` or ``failed``
``oncely_leases_lost_total``        ``store``                   leases lost while running
``oncely_store_operation_seconds``  ``store``, ``operation``,   latency histogram of every
                                    ``outcome``                 store operation (seconds)
``oncely_background_completions_``  ``store``                   completions handed to the
``started_total``                                               background (the store did not
                                                                take them at once)
``oncely_background_completions_``  ``store``, ``outcome``      how they ended: ``succeeded``,
``total``                                                       ``given_up`` (store unreachable
                                                                for the whole bound),
                                                                ``failed`` (claim lost, other
                                                                store error)
``oncely_background_completion_``   ``store``, ``outcome``      histogram of how long they took
``seconds``                                                     from hand-off to end (seconds)
``oncely_lock_renewals_total``      ``backend``, ``outcome``    automatic lock renewals: ``ok``
                                                                or ``failed``
``oncely_locks_lost_total``         ``backend``                 locks lost while held
==================================  ==========================  ===============================

Names follow the Prometheus naming conventions (``_total`` for counters, base unit
``_seconds``). Label values are bounded: the store's kind (its first URL scheme), the lock
backend's kind (``redis``, ``redlock``, ``postgresql``, ``sqlite``), the operation and the
outcome. No key, digest, lock name or other caller value is ever a label value (each distinct
value is a new time series).

:func:`asgi_app` / :func:`wsgi_app` are prometheus_client's own exposition apps, serving the
registry the last :func:`install` was given unless told another, GET and HEAD only (405
otherwise); :func:`with_metrics_asgi` / :func:`with_metrics_wsgi` route GET and HEAD of one
path (``/metrics``) of an existing app to them, and every other request to the app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client import make_asgi_app as _make_asgi_app
from prometheus_client import make_wsgi_app as _make_wsgi_app

from oncely.core import observe
from oncely.core.records import RecordKey
from oncely.settings import text

__all__ = [
    "BACKGROUND_BUCKETS",
    "BUCKETS",
    "METHODS",
    "PrometheusObserver",
    "asgi_app",
    "install",
    "served_registry",
    "uninstall",
    "with_metrics_asgi",
    "with_metrics_wsgi",
    "wsgi_app",
]

#: Buckets (seconds) of a background completion: from a write that lands on the first retry
#: (0.1 s) to the bound (:data:`oncely.core.settle.SETTLE_FOR`, 60 s).
BACKGROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0)

#: Latency buckets (seconds): from 50 µs (an in-memory claim) to 10 s (a stuck store).
BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _Scope:
    __slots__ = ("name", "owner", "store")

    def __init__(self, owner: PrometheusObserver, store: str, name: str) -> None:
        self.owner, self.store, self.name = owner, store, name

    def done(self, outcome: str, seconds: float, error: BaseException | None) -> None:
        where = (self.store, self.name, outcome)
        children = self.owner._children.get(where)
        if children is None:
            children = self.owner._resolve(where)
        histogram, counters = children
        histogram.observe(seconds)
        for counter in counters:
            counter.inc()


class _Background:
    __slots__ = ("owner", "store")

    def __init__(self, owner: PrometheusObserver, store: str) -> None:
        self.owner, self.store = owner, store
        owner.background_started.labels(store).inc()

    def done(self, outcome: str, seconds: float) -> None:
        self.owner.background_ended.labels(self.store, outcome).inc()
        self.owner.background_seconds.labels(self.store, outcome).observe(seconds)


class PrometheusObserver:
    """The oncely metrics on one ``CollectorRegistry`` (see the module's table)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.claims = Counter(
            "oncely_claims",
            "Claims of idempotency keys, by outcome (new, replay, in_flight, mismatch, error).",
            ["store", "outcome"],
            registry=registry,
        )
        self.replays = Counter(
            "oncely_replays",
            "Claims answered with the stored result of an earlier call.",
            ["store"],
            registry=registry,
        )
        self.conflicts = Counter(
            "oncely_conflicts",
            "Claims refused because another caller holds the key (in flight).",
            ["store"],
            registry=registry,
        )
        self.mismatches = Counter(
            "oncely_mismatches",
            "Claims refused because the key was used with a different request fingerprint.",
            ["store"],
            registry=registry,
        )
        self.renewals = Counter(
            "oncely_lease_renewals",
            "Lease renewals of running calls, by outcome (ok, failed).",
            ["store", "outcome"],
            registry=registry,
        )
        self.lost = Counter(
            "oncely_leases_lost",
            "Leases lost while their call was running.",
            ["store"],
            registry=registry,
        )
        self.seconds = Histogram(
            "oncely_store_operation_seconds",
            "Latency of store operations (claim, complete, release, watch), in seconds.",
            ["store", "operation", "outcome"],
            registry=registry,
            buckets=BUCKETS,
        )
        self.background_started = Counter(
            "oncely_background_completions_started",
            "Completions handed to the background because the store did not take them at once.",
            ["store"],
            registry=registry,
        )
        self.background_ended = Counter(
            "oncely_background_completions",
            "Background completions ended, by outcome (succeeded, given_up, failed).",
            ["store", "outcome"],
            registry=registry,
        )
        self.background_seconds = Histogram(
            "oncely_background_completion_seconds",
            "Time from a completion's hand-off to the background to its end, in seconds.",
            ["store", "outcome"],
            registry=registry,
            buckets=BACKGROUND_BUCKETS,
        )
        self.lock_renewals = Counter(
            "oncely_lock_renewals",
            "Automatic renewals of held locks, by outcome (ok, failed).",
            ["backend", "outcome"],
            registry=registry,
        )
        self.locks_lost = Counter(
            "oncely_locks_lost",
            "Locks lost while held.",
            ["backend"],
            registry=registry,
        )

        #: (store, operation, outcome) -> the histogram child and the counter children it
        #: feeds: ``labels()`` takes a lock and checks its arguments, so it runs once per set.
        self._children: dict[tuple[str, str, str], tuple[Any, tuple[Any, ...]]] = {}

    def _resolve(self, where: tuple[str, str, str]) -> tuple[Any, tuple[Any, ...]]:
        store, name, outcome = where
        counters: list[Any] = []
        if name == "claim":
            counters.append(self.claims.labels(store, outcome))
            extra = {"replay": self.replays, "in_flight": self.conflicts}
            extra["mismatch"] = self.mismatches
            if outcome in extra:
                counters.append(extra[outcome].labels(store))
        children = (self.seconds.labels(store, name, outcome), tuple(counters))
        self._children[where] = children
        return children

    def operation(self, store: str, name: str, key: RecordKey) -> _Scope:
        return _Scope(self, store, name)  # the key is deliberately dropped: never a label

    def lease_renewed(self, store: str, ok: bool) -> None:
        self.renewals.labels(store, "ok" if ok else "failed").inc()

    def lease_lost(self, store: str, key: RecordKey) -> None:
        self.lost.labels(store).inc()

    def background(self, store: str) -> _Background:
        return _Background(self, store)

    def lock_renewed(self, backend: str, ok: bool) -> None:
        self.lock_renewals.labels(backend, "ok" if ok else "failed").inc()

    def lock_lost(self, backend: str) -> None:
        self.locks_lost.labels(backend).inc()

    def unregister(self) -> None:
        """Remove these metrics from their registry."""
        for metric in (
            self.claims,
            self.replays,
            self.conflicts,
            self.mismatches,
            self.renewals,
            self.lost,
            self.seconds,
            self.background_started,
            self.background_ended,
            self.background_seconds,
            self.lock_renewals,
            self.locks_lost,
        ):
            self.registry.unregister(metric)


_installed: dict[int, PrometheusObserver] = {}

#: The registry the last :func:`install` was given: what the ``/metrics`` apps serve by default.
_served: list[CollectorRegistry] = []


def install(registry: CollectorRegistry | None = None) -> PrometheusObserver:
    """Record oncely's metrics on ``registry`` (default ``prometheus_client.REGISTRY``) from
    now on; returns the observer. Installing again on the same registry returns the same one
    (Prometheus refuses a metric name registered twice). The ``/metrics`` apps of this module
    serve this registry from now on unless given another (the last ``install()`` wins)."""
    registry = REGISTRY if registry is None else registry
    observer = _installed.get(id(registry))
    if observer is None or observer.registry is not registry:
        observer = _installed[id(registry)] = PrometheusObserver(registry)
    observe.add(observer)
    _served[:] = [registry]
    return observer


def uninstall(observer: PrometheusObserver) -> None:
    """Stop recording through ``observer`` and unregister its metrics."""
    observe.remove(observer)
    if _installed.get(id(observer.registry)) is observer:
        del _installed[id(observer.registry)]
    if _served and _served[0] is observer.registry:
        _served.clear()
    observer.unregister()


def served_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """``registry`` if given, else the one the last :func:`install` was given, else
    ``prometheus_client.REGISTRY``."""
    if registry is not None:
        return registry
    return _served[0] if _served else REGISTRY


#: Methods the ``/metrics`` apps answer; others get 405 (:func:`asgi_app`, :func:`wsgi_app`)
#: or go to the wrapped app (:func:`with_metrics_asgi`, :func:`with_metrics_wsgi`).
METHODS = frozenset({"GET", "HEAD"})
_NOT_ALLOWED = b"405 Method Not Allowed: /metrics answers GET and HEAD\n"


def asgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """An ASGI exposition app (prometheus_client's own; text format, OpenMetrics on request)
    for ``registry``, default :func:`served_registry` looked up on each request (so the registry
    of a later :func:`install` is served). GET and HEAD only; other methods get 405 with
    ``Allow: GET, HEAD``. Mount it at ``/metrics``, e.g. Starlette
    ``Mount("/metrics", app=asgi_app())``."""
    apps: dict[int, tuple[CollectorRegistry, Callable[..., Any]]] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("method") not in METHODS:
            headers = [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": 405, "headers": headers})
            await send({"type": "http.response.body", "body": _NOT_ALLOWED})
            return
        current = served_registry(registry)
        known = apps.get(id(current))
        if known is None or known[0] is not current:
            known = apps[id(current)] = (current, _make_asgi_app(current))
        await known[1](scope, receive, send)

    return app


def wsgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """A WSGI exposition app (prometheus_client's own) for ``registry``, default
    :func:`served_registry` looked up on each request; GET and HEAD only (others: 405)."""
    apps: dict[int, tuple[CollectorRegistry, Callable[..., Any]]] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in METHODS:
            headers = [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")]
            start_response("405 Method Not Allowed", headers)
            return [_NOT_ALLOWED]
        current = served_registry(registry)
        known = apps.get(id(current))
        if known is None or known[0] is not current:
            known = apps[id(current)] = (current, _make_wsgi_app(current))
        return known[1](environ, start_response)  # type: ignore[no-any-return]

    return app


def with_metrics_asgi(
    app: Callable[..., Any], path: str = "/metrics", registry: CollectorRegistry | None = None
) -> Callable[..., Any]:
    """Wrap the ASGI ``app``: GET and HEAD requests for exactly ``path`` get the metrics of
    ``registry`` (default :func:`served_registry`, looked up on each request); everything else
    (other methods, other paths, lifespan, websockets) goes to ``app``.

    :raises ConfigurationError: ``path`` is not a non-empty string."""
    path = text(path, "path", where="with_metrics_asgi")
    metrics = asgi_app(registry)

    async def route(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope.get("type") == "http"
            and scope.get("path") == path
            and scope.get("method") in METHODS
        ):
            await metrics(scope, receive, send)
        else:
            await app(scope, receive, send)

    return route


def with_metrics_wsgi(
    app: Callable[..., Iterable[bytes]],
    path: str = "/metrics",
    registry: CollectorRegistry | None = None,
) -> Callable[..., Iterable[bytes]]:
    """Wrap the WSGI ``app``: GET and HEAD requests for exactly ``path`` get the metrics of
    ``registry`` (default :func:`served_registry`, looked up on each request); others go to
    ``app``.

    :raises ConfigurationError: ``path`` is not a non-empty string."""
    path = text(path, "path", where="with_metrics_wsgi")
    metrics = wsgi_app(registry)

    def route(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == path and environ.get("REQUEST_METHOD") in METHODS:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        return app(environ, start_response)

    return route
