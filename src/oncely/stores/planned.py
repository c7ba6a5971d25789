"""The faces of a store whose operations are plans: written once, run sync or async.

A :class:`PlannedStore` writes each operation once, as a plan (:mod:`oncely.backends.plans`): a
generator that yields its requests (a statement, a script, a sleep) and returns the outcome.
It adds one executor per face (``_execute`` and ``_aexecute``, which carry requests out on its
backend's sync and async drivers), and this class turns every plan into both faces of the
:class:`~oncely.stores.base.Store` contract. The SQLite, PostgreSQL, MySQL and Redis stores are
planned stores; the memory store drives its pure state directly.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Awaitable
from typing import Any

from oncely.backends.plans import Plan, arun, run
from oncely.core.records import ClaimOutcome, Record, RecordKey
from oncely.settings import count
from oncely.stores.base import Store

__all__ = ["PlannedStore"]


class PlannedStore(Store):
    """A :class:`~oncely.stores.base.Store` made of plans; see the module documentation.

    Each plan has the semantics of the :class:`~oncely.stores.base.Store` method of the same
    name without the underscore.
    """

    # -- what a planned store writes: one plan per operation, one executor per face ------------
    @abc.abstractmethod
    def _claim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> Plan[ClaimOutcome]: ...

    @abc.abstractmethod
    def _complete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> Plan[None]: ...

    @abc.abstractmethod
    def _release(self, key: RecordKey, fence: int) -> Plan[None]: ...

    @abc.abstractmethod
    def _renew(self, key: RecordKey, fence: int, lease: float) -> Plan[float]: ...

    @abc.abstractmethod
    def _watch(self, key: RecordKey, fence: int, timeout: float) -> Plan[bool]: ...

    @abc.abstractmethod
    def _get(self, key: RecordKey) -> Plan[Record | None]: ...

    @abc.abstractmethod
    def _delete(self, key: RecordKey, running: bool) -> Plan[bool]: ...

    @abc.abstractmethod
    def _purge_expired(self, limit: int) -> Plan[int]: ...

    @abc.abstractmethod
    def _list(self, scope: str | None, limit: int) -> Plan[builtins.list[Record]]: ...

    @abc.abstractmethod
    def _now(self) -> Plan[float]: ...

    @abc.abstractmethod
    def _execute(self, request: Any) -> Any:
        """Carry one request out on the sync driver and return the reply."""

    @abc.abstractmethod
    def _aexecute(self, request: Any) -> Awaitable[Any]:
        """Carry one request out on the async driver and return the reply (an ``async def``,
        or a plain function returning what to await)."""

    # -- sync face -------------------------------------------------------------------------------
    def claim(self, key: RecordKey, fingerprint: str, lease: float, ttl: float) -> ClaimOutcome:
        return run(self._claim(key, fingerprint, lease, ttl), self._execute)

    def complete(self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float) -> None:
        self.check_result_size(result)
        run(self._complete(key, fence, result, codec, ttl), self._execute)

    def release(self, key: RecordKey, fence: int) -> None:
        run(self._release(key, fence), self._execute)

    def renew(self, key: RecordKey, fence: int, lease: float) -> float:
        return run(self._renew(key, fence, lease), self._execute)

    def watch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        return run(self._watch(key, fence, timeout), self._execute)

    def get(self, key: RecordKey) -> Record | None:
        return run(self._get(key), self._execute)

    def delete(self, key: RecordKey, running: bool = True) -> bool:
        return run(self._delete(key, running), self._execute)

    def _purge_limit(self, limit: int) -> int:
        return count(limit, "limit", where=f"{type(self).__name__}.purge_expired", minimum=0)

    def _list_limit(self, limit: int) -> int:
        return count(limit, "limit", where=f"{type(self).__name__}.list", minimum=0)

    def purge_expired(self, limit: int = 1000) -> int:
        return run(self._purge_expired(self._purge_limit(limit)), self._execute)

    def list(self, scope: str | None = None, limit: int = 100) -> builtins.list[Record]:
        return run(self._list(scope, self._list_limit(limit)), self._execute)

    def now(self) -> float:
        """The store's clock, in seconds since the epoch."""
        return run(self._now(), self._execute)

    # -- async face ------------------------------------------------------------------------------
    async def aclaim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome:
        return await arun(self._claim(key, fingerprint, lease, ttl), self._aexecute)

    async def acomplete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> None:
        self.check_result_size(result)
        await arun(self._complete(key, fence, result, codec, ttl), self._aexecute)

    async def arelease(self, key: RecordKey, fence: int) -> None:
        await arun(self._release(key, fence), self._aexecute)

    async def arenew(self, key: RecordKey, fence: int, lease: float) -> float:
        return await arun(self._renew(key, fence, lease), self._aexecute)

    async def awatch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        return await arun(self._watch(key, fence, timeout), self._aexecute)

    async def aget(self, key: RecordKey) -> Record | None:
        return await arun(self._get(key), self._aexecute)

    async def adelete(self, key: RecordKey, running: bool = True) -> bool:
        return await arun(self._delete(key, running), self._aexecute)

    async def apurge_expired(self, limit: int = 1000) -> int:
        return await arun(self._purge_expired(self._purge_limit(limit)), self._aexecute)

    async def alist(self, scope: str | None = None, limit: int = 100) -> builtins.list[Record]:
        return await arun(self._list(scope, self._list_limit(limit)), self._aexecute)

    async def anow(self) -> float:
        return await arun(self._now(), self._aexecute)
