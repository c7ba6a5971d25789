"""The hook metrics, traces and structured logs plug into: zero cost while none is installed.

Every store operation of the decorator and the HTTP layer goes through
:func:`oncely.core.ops.perform` / :func:`~oncely.core.ops.aperform`, every lease renewal and
lost lease of a claim through :mod:`oncely.core.lease`, every completion handed to the
background through :mod:`oncely.core.settle`, and every renewal and loss of a lock through
:mod:`oncely.locks.lock`; those places call this module only when :data:`observers` is not
empty (one truth test otherwise). Core imports no third-party package: the Prometheus and
OpenTelemetry observers live in :mod:`oncely.observability`.

What an observer is told is bounded: the store's kind (its first URL scheme, e.g. ``redis``)
or the lock backend's kind (:attr:`oncely.locks.base.LockBackend.kind`), the operation
(``claim``, ``complete``, ``release``, ``watch``, ``renew``) and an outcome (``new``,
``replay``, ``in_flight``, ``mismatch`` for claims; ``ok`` or ``error`` otherwise; see
:data:`BACKGROUND_OUTCOMES` for background completions). The record key is passed as a
:class:`~oncely.core.records.RecordKey`, whose ``digest`` is the SHA-256 of the caller's key:
the raw key never reaches an observer, and neither does a lock's name. An observer that writes
the key out (a log record, a span) uses :func:`log_digest`, keyed by the ``log_key`` setting
when one is set (the plain SHA-256 of an enumerable key is reversible by guessing).

The hooks added later (:meth:`Observer.background`, :meth:`Observer.lock_renewed`,
:meth:`Observer.lock_lost`) are optional: an observer written before them, without those
methods, keeps working and is simply not told.

**An observer never changes the outcome of a call.** Every call into an observer (each hook,
each scope's ``done``) goes through this module, which catches any :class:`Exception` it
raises, counts it in :data:`errors` and logs it on the ``oncely.observe`` logger (with the
traceback, at most once per :data:`REPORT_EVERY` seconds per observer class and hook), then
carries on: the store operation, the lease renewal, the background completion and the lock
renewal go ahead as if no observer were installed. A failing metrics exporter (e.g.
Prometheus' multiprocess directory missing) therefore costs metrics, never a completion.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import Counter
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol

from oncely.core.records import InFlight, Mismatch, New, RecordKey, Replay
from oncely.errors import ConfigurationError
from oncely.settings import resolve

if TYPE_CHECKING:
    from oncely.stores.base import Store

__all__ = [
    "BACKGROUND_OUTCOMES",
    "REPORT_EVERY",
    "Background",
    "BackgroundScope",
    "Observer",
    "OperationScope",
    "Watch",
    "add",
    "background",
    "claim_outcome",
    "describe",
    "errors",
    "lease_lost",
    "lease_renewed",
    "lock_lost",
    "lock_renewed",
    "log_digest",
    "observers",
    "operation",
    "remove",
    "set_log_key",
    "store_kind",
]

#: How a background completion ends: ``succeeded`` (the write landed), ``given_up`` (the store
#: stayed unreachable for the whole bound, :data:`oncely.core.settle.SETTLE_FOR`) or ``failed``
#: (the claim was lost meanwhile, or another store error).
BACKGROUND_OUTCOMES: Final = ("succeeded", "given_up", "failed")


class OperationScope(Protocol):
    """What an observer keeps for one running store operation (e.g. an open span)."""

    def done(self, outcome: str, seconds: float, error: BaseException | None) -> None:
        """The operation ended after ``seconds`` with ``outcome`` (``error`` if it raised)."""


class BackgroundScope(Protocol):
    """What an observer keeps for one background completion (e.g. an open span)."""

    def done(self, outcome: str, seconds: float) -> None:
        """The completion ended after ``seconds`` with ``outcome`` (:data:`BACKGROUND_OUTCOMES`)."""


class Observer(Protocol):
    """Told about store operations, leases, background completions and locks. Methods must be
    quick and must not raise."""

    def operation(self, store: str, name: str, key: RecordKey) -> OperationScope:
        """A store operation ``name`` on a store of kind ``store`` starts."""

    def lease_renewed(self, store: str, ok: bool) -> None:
        """A renewal of a claim's lease was confirmed (``ok``) or failed."""

    def lease_lost(self, store: str, key: RecordKey) -> None:
        """A claim's lease was lost (reported once per claim)."""

    def background(self, store: str) -> BackgroundScope:
        """A completion that the store did not take at once is handed to the background
        (:mod:`oncely.core.settle`) on a store of kind ``store``. Optional."""

    def lock_renewed(self, backend: str, ok: bool) -> None:
        """An automatic renewal of a lock on a backend of kind ``backend`` was confirmed
        (``ok``) or failed. Optional."""

    def lock_lost(self, backend: str) -> None:
        """A lock held on a backend of kind ``backend`` was lost (reported once per hold).
        Optional."""


#: The installed observers (empty: the hooks cost one truth test).
observers: list[Observer] = []

#: Exceptions raised by observers and ignored, by (observer class name, hook), e.g.
#: ``("PrometheusObserver", "operation.done")``; a hook is a method of :class:`Observer`, or
#: ``operation.done`` / ``background.done`` for a scope's :meth:`~OperationScope.done`.
errors: Counter[tuple[str, str]] = Counter()

#: Seconds between two log records about the same observer class and hook raising (the first
#: is logged at once; the ones in between are only counted in :data:`errors`).
REPORT_EVERY: Final = 60.0

log = logging.getLogger("oncely.observe")
_reported: dict[tuple[str, str], float] = {}
_errors_lock = threading.Lock()


def _failed(observer: object, hook: str) -> None:
    """Count and (rate-limited) log the exception being handled, raised by ``observer``'s
    ``hook``; call only from an ``except`` block. Never raises."""
    where = (type(observer).__qualname__, hook)
    now = time.monotonic()
    with _errors_lock:
        errors[where] += 1
        count = errors[where]
        last = _reported.get(where)
        if last is not None and now - last < REPORT_EVERY:
            return
        _reported[where] = now
    log.error(  # logging itself never raises: a failing handler goes to Handler.handleError
        "oncely: observer %s raised in %s (ignored; the call goes on; %d so far)",
        where[0],
        hook,
        count,
        exc_info=True,
    )


def add(observer: Observer) -> None:
    """Install ``observer`` (installing the same one twice is a no-op)."""
    if observer not in observers:
        observers.append(observer)


def remove(observer: Observer) -> None:
    """Uninstall ``observer`` (no-op if it is not installed)."""
    if observer in observers:
        observers.remove(observer)


def store_kind(store: Store) -> str:
    """A bounded label for ``store``: its first URL scheme, else its class name in lower case."""
    schemes = getattr(store, "schemes", ())
    return schemes[0] if schemes else type(store).__name__.lower()


_CLAIM_OUTCOMES: dict[type, str] = {
    New: "new",
    Replay: "replay",
    InFlight: "in_flight",
    Mismatch: "mismatch",
}


def claim_outcome(result: object) -> str:
    """``new``, ``replay``, ``in_flight`` or ``mismatch`` for a claim's result, else ``ok``."""
    return _CLAIM_OUTCOMES.get(type(result), "ok")


_UNRESOLVED: Final = object()
_INVALID: Final = object()
_log_key: object = _UNRESOLVED


def describe(exc: BaseException) -> str:
    """How oncely's log lines name an exception: ``"TypeName: message"``, or the type's name
    alone when the message is empty, so that ``TimeoutError()`` or ``CancelledError()`` never
    reads as an empty ``()`` in a log. An exception whose ``str()`` fails is named by its type
    and ``repr``-less marker instead of failing the log call."""
    name = type(exc).__qualname__
    try:
        text = str(exc)
    except Exception:
        return f"{name}: <message unavailable>"
    return f"{name}: {text}" if text else name


def set_log_key(secret: str | bytes | None = None) -> None:
    """Set the secret of :func:`log_digest`: ``secret`` if given, else ``$ONCELY_LOG_KEY`` (the
    ``log_key`` setting, :mod:`oncely.settings`), else none (the plain SHA-256). Read on the
    first :func:`log_digest` if never called; call it again after changing the variable.

    :raises oncely.errors.ConfigurationError: a secret shorter than 16 bytes.
    """
    global _log_key
    value = resolve("log_key", secret, where="oncely log digest", param="secret")
    _log_key = value.encode("utf-8") if isinstance(value, str) else value


def log_digest(key: RecordKey) -> str:
    """The digest of ``key`` that logs and spans carry (64 hex digits), never the raw key.

    Without a secret (the default): ``key.digest``, the SHA-256 of the caller's key, the same
    as the stored record's, so a log line matches ``oncely inspect``; a pseudonym only: for an
    enumerable key (a user id, an order number) anyone reading it finds the key by hashing
    candidates. With the ``log_key`` setting (:func:`set_log_key`, ``$ONCELY_LOG_KEY``):
    HMAC-SHA256 of ``key.digest`` under that secret, which needs the secret to reverse or to
    match to a record. The store's record digest is never changed by this. Never raises: a
    bad ``$ONCELY_LOG_KEY`` read here (oncely checks it at start-up otherwise) is logged and
    gives ``invalid-log-key`` rather than the unkeyed digest.
    """
    global _log_key
    secret = _log_key
    if secret is _UNRESOLVED:
        try:
            set_log_key()
        except ConfigurationError:  # a bad $ONCELY_LOG_KEY set after start-up: never leak
            log.exception("oncely: no key digest in logs and spans until ONCELY_LOG_KEY is fixed")
            _log_key = _INVALID
        secret = _log_key
    if secret is _INVALID:
        return "invalid-log-key"
    if secret is None:
        return key.digest
    assert isinstance(secret, bytes)
    return hmac.new(secret, key.digest.encode("ascii"), hashlib.sha256).hexdigest()


class Watch:
    """Times one store operation and tells every observer; use as a context manager.

    Set :attr:`outcome` before leaving the block; an exception makes the outcome ``error``.
    """

    __slots__ = ("_scopes", "_started", "outcome")

    def __init__(self, store: Store, name: str, key: RecordKey) -> None:
        kind = store_kind(store)
        scopes: list[tuple[Observer, OperationScope]] = []
        for o in list(observers):
            try:
                scopes.append((o, o.operation(kind, name, key)))
            except Exception:
                _failed(o, "operation")
        self._scopes = scopes
        self.outcome = "ok"
        self._started = time.perf_counter()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._started
        outcome = "error" if exc is not None else self.outcome
        for o, scope in self._scopes:
            try:
                scope.done(outcome, seconds, exc)
            except Exception:
                _failed(o, "operation.done")


def operation(store: Store, name: str, key: RecordKey) -> Watch:
    """Start watching store operation ``name`` on ``key`` (call only if :data:`observers`)."""
    return Watch(store, name, key)


def lease_renewed(store: Store, ok: bool) -> None:
    """Tell the observers a lease renewal on ``store`` succeeded (``ok``) or failed."""
    kind = store_kind(store)
    for o in list(observers):
        try:
            o.lease_renewed(kind, ok)
        except Exception:
            _failed(o, "lease_renewed")


def lease_lost(store: Store, key: RecordKey) -> None:
    """Tell the observers the lease on ``key`` was lost."""
    kind = store_kind(store)
    for o in list(observers):
        try:
            o.lease_lost(kind, key)
        except Exception:
            _failed(o, "lease_lost")


class Background:
    """Times one background completion and tells every observer that has the hook."""

    __slots__ = ("_scopes", "_started")

    def __init__(self, store: str) -> None:
        self._scopes: list[tuple[Observer, BackgroundScope]] = []
        for o in list(observers):
            hook = getattr(o, "background", None)
            if hook is not None:
                try:
                    self._scopes.append((o, hook(store)))
                except Exception:
                    _failed(o, "background")
        self._started = time.perf_counter()

    def done(self, outcome: str) -> None:
        """The completion ended with ``outcome`` (one of :data:`BACKGROUND_OUTCOMES`)."""
        seconds = time.perf_counter() - self._started
        for o, scope in self._scopes:
            try:
                scope.done(outcome, seconds)
            except Exception:
                _failed(o, "background.done")


def background(store: str) -> Background:
    """Start watching a background completion on a store of kind ``store`` (call only if
    :data:`observers`)."""
    return Background(store)


def lock_renewed(backend: str, ok: bool) -> None:
    """Tell the observers a lock renewal on a backend of kind ``backend`` succeeded (``ok``)
    or failed."""
    for o in list(observers):
        hook = getattr(o, "lock_renewed", None)
        if hook is not None:
            try:
                hook(backend, ok)
            except Exception:
                _failed(o, "lock_renewed")


def lock_lost(backend: str) -> None:
    """Tell the observers a lock on a backend of kind ``backend`` was lost."""
    for o in list(observers):
        hook = getattr(o, "lock_lost", None)
        if hook is not None:
            try:
                hook(backend)
            except Exception:
                _failed(o, "lock_lost")
