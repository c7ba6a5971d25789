"""Structured log records of store operations and lost leases (standard library only).

Each record carries its fields as attributes (``extra``), for JSON formatters and log shippers:
``oncely_store`` (store kind), ``oncely_operation``, ``oncely_outcome``, ``oncely_seconds``
and ``oncely_digest`` (:func:`oncely.core.observe.log_digest`), never the raw key: the SHA-256
of the caller's key (:func:`oncely.core.records.digest_key`, the record's own digest), or, when
the ``log_key`` setting (``$ONCELY_LOG_KEY``) is set, its HMAC-SHA256 under that secret. The
plain SHA-256 is a pseudonym, not an anonymisation: for an enumerable key (a user id, an order
number) anyone reading the logs recovers the key by hashing candidates; set ``ONCELY_LOG_KEY``
when the logs leave your hands (see ``docs/observability.md``).
"""

from __future__ import annotations

import logging

from oncely.core import observe
from oncely.core.records import RecordKey
from oncely.settings import whole

__all__ = ["LogObserver", "install", "uninstall"]


class _Scope:
    __slots__ = ("key", "name", "owner", "store")

    def __init__(self, owner: LogObserver, store: str, name: str, key: RecordKey) -> None:
        self.owner, self.store, self.name, self.key = owner, store, name, key

    def done(self, outcome: str, seconds: float, error: BaseException | None) -> None:
        logger = self.owner.logger
        level = logging.WARNING if error is not None else self.owner.level
        if not logger.isEnabledFor(level):
            return
        logger.log(
            level,
            "oncely: %s on %s: %s in %.3f ms",
            self.name,
            self.store,
            outcome,
            seconds * 1e3,
            extra={
                "oncely_store": self.store,
                "oncely_operation": self.name,
                "oncely_outcome": outcome,
                "oncely_seconds": seconds,
                "oncely_digest": observe.log_digest(self.key),
            },
        )


class _Background:
    __slots__ = ("owner", "store")

    def __init__(self, owner: LogObserver, store: str) -> None:
        self.owner, self.store = owner, store

    def done(self, outcome: str, seconds: float) -> None:
        level = self.owner.level if outcome == "succeeded" else logging.WARNING
        self.owner.logger.log(
            level,
            "oncely: background completion on %s: %s after %.3f s",
            self.store,
            outcome,
            seconds,
            extra={
                "oncely_store": self.store,
                "oncely_operation": "complete_later",
                "oncely_outcome": outcome,
                "oncely_seconds": seconds,
            },
        )


class LogObserver:
    """Logs each store operation and each background completion at ``level`` (failed ones at
    WARNING) and each lost lease or lock at ERROR, on ``logger`` (default: the ``oncely.ops``
    logger)."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.DEBUG) -> None:
        """:raises ConfigurationError: ``level`` is not a logging level (a whole number >= 0,
        e.g. ``logging.INFO``)."""
        self.logger = logger if logger is not None else logging.getLogger("oncely.ops")
        self.level: int = whole(level, "level", where="LogObserver")

    def operation(self, store: str, name: str, key: RecordKey) -> _Scope:
        return _Scope(self, store, name, key)

    def lease_renewed(self, store: str, ok: bool) -> None:
        pass  # a failed renewal is already logged by oncely.core.lease

    def lease_lost(self, store: str, key: RecordKey) -> None:
        self.logger.error(
            "oncely: lease lost on %s",
            store,
            extra={"oncely_store": store, "oncely_digest": observe.log_digest(key)},
        )

    def background(self, store: str) -> _Background:
        return _Background(self, store)

    def lock_renewed(self, backend: str, ok: bool) -> None:
        pass  # a failed renewal is already logged by oncely.locks.lock

    def lock_lost(self, backend: str) -> None:
        self.logger.error(
            "oncely: lock lost on %s", backend, extra={"oncely_lock_backend": backend}
        )


#: id(logger) -> its observer: installing again on the same logger returns the same one.
_installed: dict[int, LogObserver] = {}


def install(logger: logging.Logger | None = None, level: int = logging.DEBUG) -> LogObserver:
    """Log every store operation from now on; returns the observer (pass it to
    :func:`uninstall`). ``level`` is the level of successful operations. Installing again on
    the same logger returns the same observer (with the new ``level``), so each operation is
    still logged once."""
    logger = logger if logger is not None else logging.getLogger("oncely.ops")
    observer = _installed.get(id(logger))
    if observer is None or observer.logger is not logger:
        observer = _installed[id(logger)] = LogObserver(logger, level)
    observer.level = level
    observe.add(observer)
    return observer


def uninstall(observer: LogObserver) -> None:
    """Stop logging through ``observer``."""
    observe.remove(observer)
    if _installed.get(id(observer.logger)) is observer:
        del _installed[id(observer.logger)]
