"""The store contract every backend fulfils, in a sync and an async face.

Each operation is one atomic decision made by the store itself (one Lua script or one SQL
statement) and every time that decides correctness comes from the store's clock.

Semantics shared by all stores (the conformance suite in ``tests/test_store_conformance.py``
checks them on every backend):

``claim(key, fingerprint, lease, ttl)``
    * no record, or the record expired (``expires_at <= now``), or an ``in_progress`` record whose
      lease ran out (``lease_until <= now``, whatever its fingerprint): write an ``in_progress``
      record with ``lease_until = now + lease``, ``expires_at = now + max(lease, ttl)`` and a fence
      greater than every earlier fence of this key (see *Fences* below) ->
      :class:`~oncely.core.records.New`;
    * a live record with a different fingerprint -> :class:`~oncely.core.records.Mismatch`;
    * a live ``in_progress`` record -> :class:`~oncely.core.records.InFlight`;
    * a live ``completed`` record -> :class:`~oncely.core.records.Replay`.
``complete(key, fence, result, codec, ttl)``
    if the record is ``in_progress`` with this fence (even if its lease ran out, as long as
    nobody re-claimed it): status ``completed``, ``expires_at = now + ttl``; wakes waiters. If it
    is already ``completed`` under this fence with this very ``result`` and ``codec``, that is the
    caller's own earlier completion (its reply was lost, or its ``await`` was cancelled, and the
    caller repeated it): success, and nothing changes. Otherwise
    :class:`~oncely.errors.LeaseLost` (another fence holds the record, it was released, deleted
    or expired, or this fence completed it with another result). A ``result`` larger than the
    store can take (:meth:`Store.check_result_size`) raises
    :class:`~oncely.errors.ResultTooLarge` and writes nothing: the caller stores a small
    "ran, result not storable" marker instead (:func:`oncely.core.steps.complete`).
``release(key, fence)``
    if ``in_progress`` with this fence: the record becomes a tombstone (hidden from every
    reader, taken over by any claim); wakes waiters. If the tombstone of this very fence is still
    there, that is the caller's own earlier release: success. Otherwise
    :class:`~oncely.errors.LeaseLost`.
``renew(key, fence, lease)``
    only if ``in_progress`` with this fence: ``lease_until = now + lease`` (and ``expires_at``
    at least that); returns the new ``lease_until``; renewing again is renewing again.
    Otherwise :class:`~oncely.errors.LeaseLost`.
``watch(key, fence, timeout)``
    returns once the record is no longer a live ``in_progress`` record under ``fence``
    (completed, released, deleted, expired or re-claimed) or ``timeout`` passed; returns
    ``True`` if it saw the change. A lease running out wakes nobody (nothing writes), so
    callers cap ``timeout`` at the holder's ``lease_until`` and claim again afterwards.
``delete(key, running=True)``
    removes the record whatever its state and reports whether a live one was there. With
    ``running=False`` a *running* record (``in_progress`` with a lease that has not run out,
    by the store's clock) is left alone, in the same atomic step, and the call returns
    ``False``: a duplicate must never run while the holder still works (``forget()`` uses it).
``get`` / ``purge_expired(limit)`` / ``list(scope, limit)`` / ``now()``
    inspection and housekeeping; ``get`` and ``list`` hide expired records;
    ``purge_expired`` deletes up to ``limit`` records with ``expires_at <= now`` and returns
    how many it deleted. ``limit`` is an int from 1 (``list``: 0) to
    :data:`oncely.settings.MAX_COUNT`; anything else (a float, None, a bool, 0 or less, a
    larger number) raises :class:`~oncely.errors.ConfigurationError` on every store, before
    anything is sent.

Release tombstones are expired rows (SQL stores: until ``purge_expired`` removes them; Redis: for
a minute; memory: until the key is claimed or deleted, or a purge); ``get``/``list``/``delete``
treat them as absent. A repeated fenced write that finds its own earlier write succeeds, so a
caller may repeat ``complete``, ``release`` or ``renew`` after a timeout or a cancellation (see
:mod:`oncely.core.cancelsafe`); ``LeaseLost`` always means that the claim is gone. Callers that must
not leave a claim behind shield the claim and undo it (see :mod:`oncely.functions.drivers`).

Fences never repeat and never go backwards for a key, whatever happens between two claims
(release, delete, expiry, purge, concurrent claims that started in another order) and whatever
the store's clock does: each new holder's fence is greater than every fence the key ever had, so
an old holder's late write can never land on a new holder's record, and a protected resource
that remembers the highest fence it saw refuses the old holder. Each store keeps a high-water
mark that outlives its records, read and raised in the same atomic decision:

* memory: one counter for every key;
* SQLite: ``<table>_fences``, raised by a trigger whenever a row is deleted (``delete``,
  ``purge_expired``); a new row's fence is above it, a taken-over row's above its old fence
  (SQLite serialises writers);
* PostgreSQL: the sequence ``<table>_fence_seq``, drawn under a transaction-scoped advisory lock
  on the key, so one key's fences are drawn in the order its claims take effect;
* MySQL / MariaDB: ``<table>_fences``, raised by ``delete`` and ``purge_expired`` in the
  transaction that removes rows (exclusive lock) and read by every claim (shared lock);
* Redis: the counter ``<prefix>:fence``.

The clock (in microseconds) only seeds the high-water mark. ``tests/test_store_conformance.py``
(``test_fences_never_repeat_nor_go_backwards``) checks the rule on every store.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
from collections.abc import Sequence

from oncely.backends.urls import redact_url
from oncely.core.records import ClaimOutcome, InFlight, Mismatch, Record, RecordKey, Replay
from oncely.errors import LeaseLost, ResultTooLarge
from oncely.settings import text

__all__ = ["Store", "claimable", "classify", "lease_lost"]


def lease_lost(key: RecordKey, fence: int) -> LeaseLost:
    """The error every SQL and memory store raises for a fenced write whose claim is gone."""
    return LeaseLost(
        f"the claim on {key.scope!r}/{key.digest[:16]}… with fence {fence} is gone: its lease "
        "ran out and another caller re-claimed the key, or the record was completed, released "
        "or deleted; do not trust work done after the lease was lost"
    )


def claimable(record: Record | None, now: float) -> bool:
    """True if a claim at ``now`` may take the key over (absent, expired, or lease ran out)."""
    if record is None or record.expires_at <= now:
        return True
    return record.status == "in_progress" and (record.lease_until or 0.0) <= now


def classify(record: Record, fingerprint: str, now: float) -> ClaimOutcome:
    """The outcome of a claim that found ``record`` live (not :func:`claimable`)."""
    if record.fingerprint != fingerprint:
        return Mismatch(now)
    if record.status == "completed":
        return Replay(record, now)
    return InFlight(record.fence, record.lease_until or now, now)


class Store(abc.ABC):
    """A place to keep idempotency records; one object serves sync and async callers."""

    #: The URL scheme(s) this store answers to, e.g. ``("redis", "rediss")``.
    schemes: Sequence[str] = ()

    #: The largest result (bytes) one ``complete`` can store; None: no limit of its own.
    max_result_bytes: int | None = None
    #: True if the sync face can renew what the async face claimed, so async calls' leases are
    #: renewed on the watchdog thread and survive a blocked event loop
    #: (:class:`oncely.core.lease.AsyncRenewer`); False renews them on the caller's loop.
    renews_from_thread: bool = True
    #: Where :attr:`max_result_bytes` comes from, for the error message.
    max_result_source: str = "the store's max_result_bytes"

    def __init__(self, url: str) -> None:
        """:raises ConfigurationError: ``url`` is not a non-empty string."""
        self.url: str = text(url, "url", where=type(self).__name__)

    @classmethod
    def check_url(cls, url: str) -> None:
        """Refuse a URL this store would refuse when opened (a misspelled query option, a bad
        port or number), without opening anything: a component given a store URL checks it
        when it is built (:func:`oncely.stores.configured_store`), not at its first call.

        :raises ConfigurationError: the URL is not one this store opens.
        """
        text(url, "url", where=cls.__name__)

    def check_result_size(self, result: bytes) -> None:
        """Refuse a result the store can never take, before sending anything (no I/O: the
        limit is known, or was read when the store connected).

        :raises ResultTooLarge: ``result`` is over :attr:`max_result_bytes`.
        """
        limit = self.max_result_bytes
        size = len(result)
        if limit is not None and size > limit:
            raise ResultTooLarge(
                f"the result is {size} bytes, more than {type(self).__name__} can store in one "
                f"record ({limit} bytes: {self.max_result_source})",
                size,
                limit,
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r})"

    # -- sync face -----------------------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, key: RecordKey, fingerprint: str, lease: float, ttl: float) -> ClaimOutcome: ...

    @abc.abstractmethod
    def complete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> None: ...

    @abc.abstractmethod
    def release(self, key: RecordKey, fence: int) -> None: ...

    @abc.abstractmethod
    def renew(self, key: RecordKey, fence: int, lease: float) -> float: ...

    @abc.abstractmethod
    def watch(self, key: RecordKey, fence: int, timeout: float) -> bool: ...

    @abc.abstractmethod
    def get(self, key: RecordKey) -> Record | None: ...

    @abc.abstractmethod
    def delete(self, key: RecordKey, running: bool = True) -> bool: ...

    @abc.abstractmethod
    def purge_expired(self, limit: int = 1000) -> int: ...

    @abc.abstractmethod
    def list(self, scope: str | None = None, limit: int = 100) -> list[Record]: ...

    @abc.abstractmethod
    def now(self) -> float:
        """The store's clock, in seconds since the epoch."""

    def init_schema(self) -> None:
        """Create tables or other structures; idempotent. Stores without a schema do nothing."""

    def check_schema(self) -> None:
        """Raise :class:`~oncely.errors.SchemaMissing` if the store is not initialised."""

    def close(self) -> None:
        """Release connections held by the sync face."""

    # -- async face ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def aclaim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome: ...

    @abc.abstractmethod
    async def acomplete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> None: ...

    @abc.abstractmethod
    async def arelease(self, key: RecordKey, fence: int) -> None: ...

    @abc.abstractmethod
    async def arenew(self, key: RecordKey, fence: int, lease: float) -> float: ...

    @abc.abstractmethod
    async def awatch(self, key: RecordKey, fence: int, timeout: float) -> bool: ...

    @abc.abstractmethod
    async def aget(self, key: RecordKey) -> Record | None: ...

    @abc.abstractmethod
    async def adelete(self, key: RecordKey, running: bool = True) -> bool: ...

    @abc.abstractmethod
    async def apurge_expired(self, limit: int = 1000) -> int: ...

    async def anow(self) -> float:
        """The store's clock, async. Stores with an async driver answer on the loop."""
        return await asyncio.to_thread(self.now)

    async def alist(self, scope: str | None = None, limit: int = 100) -> builtins.list[Record]:
        """Async :meth:`list`. Stores with an async driver answer on the loop."""
        return await asyncio.to_thread(self.list, scope, limit)

    async def aclose(self) -> None:
        """Release connections held by the async face (for the running event loop)."""
