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
the raw key never reaches an observer, and neither does a lock's name.

The hooks added later (:meth:`Observer.background`, :meth:`Observer.lock_renewed`,
:meth:`Observer.lock_lost`) are optional: an observer written before them, without those
methods, keeps working and is simply not told.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol

from oncely.core.records import InFlight, Mismatch, New, RecordKey, Replay

if TYPE_CHECKING:
    from oncely.stores.base import Store

__all__ = [
    "BACKGROUND_OUTCOMES",
    "Background",
    "BackgroundScope",
    "Observer",
    "OperationScope",
    "Watch",
    "add",
    "background",
    "claim_outcome",
    "lease_lost",
    "lease_renewed",
    "lock_lost",
    "lock_renewed",
    "observers",
    "operation",
    "remove",
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


class Watch:
    """Times one store operation and tells every observer; use as a context manager.

    Set :attr:`outcome` before leaving the block; an exception makes the outcome ``error``.
    """

    __slots__ = ("_scopes", "_started", "outcome")

    def __init__(self, store: Store, name: str, key: RecordKey) -> None:
        kind = store_kind(store)
        self._scopes = [o.operation(kind, name, key) for o in list(observers)]
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
        for scope in self._scopes:
            scope.done(outcome, seconds, exc)


def operation(store: Store, name: str, key: RecordKey) -> Watch:
    """Start watching store operation ``name`` on ``key`` (call only if :data:`observers`)."""
    return Watch(store, name, key)


def lease_renewed(store: Store, ok: bool) -> None:
    """Tell the observers a lease renewal on ``store`` succeeded (``ok``) or failed."""
    kind = store_kind(store)
    for o in list(observers):
        o.lease_renewed(kind, ok)


def lease_lost(store: Store, key: RecordKey) -> None:
    """Tell the observers the lease on ``key`` was lost."""
    kind = store_kind(store)
    for o in list(observers):
        o.lease_lost(kind, key)


class Background:
    """Times one background completion and tells every observer that has the hook."""

    __slots__ = ("_scopes", "_started")

    def __init__(self, store: str) -> None:
        self._scopes: list[BackgroundScope] = []
        for o in list(observers):
            hook = getattr(o, "background", None)
            if hook is not None:
                self._scopes.append(hook(store))
        self._started = time.perf_counter()

    def done(self, outcome: str) -> None:
        """The completion ended with ``outcome`` (one of :data:`BACKGROUND_OUTCOMES`)."""
        seconds = time.perf_counter() - self._started
        for scope in self._scopes:
            scope.done(outcome, seconds)


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
            hook(backend, ok)


def lock_lost(backend: str) -> None:
    """Tell the observers a lock on a backend of kind ``backend`` was lost."""
    for o in list(observers):
        hook = getattr(o, "lock_lost", None)
        if hook is not None:
            hook(backend)
