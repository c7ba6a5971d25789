"""``memory://``: records in this process's memory.

For tests, single-process apps and as the reference model the other stores are checked
against. The logic lives in :class:`MemoryState`, a pure structure driven by an explicit clock;
:class:`MemoryStore` adds a lock and the process clock (which is this store's clock).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from oncely.backends.forks import after_fork
from oncely.core.records import ClaimOutcome, New, Record, RecordKey
from oncely.errors import ConfigurationError
from oncely.settings import count
from oncely.stores.base import Store, claimable, classify, lease_lost
from oncely.stores.polling import apoll_until

__all__ = ["MemoryState", "MemoryStore"]


class MemoryState:
    """Records in a dict, every transition a pure function of (state, arguments, now)."""

    def __init__(self) -> None:
        self.records: dict[RecordKey, Record] = {}
        #: The fence each released key was released under (a tombstone, cleared by the next
        #: claim of the key, by delete and by purge), so a repeated release is recognised.
        self.released: dict[RecordKey, int] = {}
        self._last_fence = 0

    def _live(self, key: RecordKey, fence: int, now: float) -> Record:
        record = self.records.get(key)
        if record is None or record.status != "in_progress" or record.fence != fence:
            raise lease_lost(key, fence)
        return record

    def claim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float, now: float
    ) -> ClaimOutcome:
        record = self.records.get(key)
        if not claimable(record, now):
            assert record is not None
            return classify(record, fingerprint, now)
        self._last_fence += 1  # one counter for every key: a fence is never handed out twice
        self.released.pop(key, None)
        lease_until = now + lease
        self.records[key] = Record(
            scope=key.scope,
            digest=key.digest,
            status="in_progress",
            fingerprint=fingerprint,
            fence=self._last_fence,
            lease_until=lease_until,
            expires_at=now + max(lease, ttl),
            created_at=now,
        )
        return New(self._last_fence, lease_until, now)

    def complete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float, now: float
    ) -> None:
        done = self.records.get(key)
        if done is not None and _same_completion(done, fence, result, codec):
            return  # a repeated completion that already landed: nothing to change
        record = self._live(key, fence, now)
        self.records[key] = replace(
            record,
            status="completed",
            lease_until=None,
            expires_at=now + ttl,
            result=bytes(result),
            codec=codec,
        )

    def release(self, key: RecordKey, fence: int, now: float) -> None:
        if key not in self.records and self.released.get(key) == fence:
            return  # a repeated release that already landed
        self._live(key, fence, now)
        del self.records[key]
        self.released[key] = fence

    def renew(self, key: RecordKey, fence: int, lease: float, now: float) -> float:
        record = self._live(key, fence, now)
        lease_until = now + lease
        self.records[key] = replace(
            record, lease_until=lease_until, expires_at=max(record.expires_at, lease_until)
        )
        return lease_until

    def get(self, key: RecordKey, now: float) -> Record | None:
        record = self.records.get(key)
        return None if record is None or record.expires_at <= now else record

    def delete(self, key: RecordKey, running: bool = True, now: float = 0.0) -> bool:
        record = self.records.get(key)
        if (
            not running
            and record is not None
            and record.status == "in_progress"
            and (record.lease_until or 0.0) > now
            and record.expires_at > now
        ):
            return False
        self.released.pop(key, None)
        return self.records.pop(key, None) is not None

    def purge_expired(self, limit: int, now: float) -> int:
        self.released.clear()
        expired = [k for k, r in self.records.items() if r.expires_at <= now][:limit]
        for k in expired:
            del self.records[k]
        return len(expired)

    def list(self, scope: str | None, limit: int, now: float) -> list[Record]:
        found = (
            r
            for r in self.records.values()
            if r.expires_at > now and (scope is None or r.scope == scope)
        )
        return [r for _, r in zip(range(limit), found)]

    def changed(self, key: RecordKey, fence: int, now: float) -> bool:
        record = self.records.get(key)
        return (
            record is None
            or record.status != "in_progress"
            or record.fence != fence
            or record.expires_at <= now
        )


def _same_completion(record: Record, fence: int, result: bytes, codec: str) -> bool:
    """True if ``record`` is the completion of ``fence`` with this very result."""
    return (
        record.status == "completed"
        and record.fence == fence
        and record.result == bytes(result)
        and record.codec == codec
    )


class MemoryStore(Store):
    """Thread-safe, process-local store. Waiters wake on a condition (sync) or poll (async)."""

    schemes = ("memory",)

    def __init__(self, url: str = "memory://") -> None:
        """:raises ConfigurationError: ``url`` carries options (``memory://`` takes none)."""
        super().__init__(url)
        if url.partition("://")[2].strip("/"):
            raise ConfigurationError(
                f"memory store URL {url!r} takes no host, path or options; use 'memory://'"
            )
        self.state = MemoryState()
        self._cond = threading.Condition()
        # A forked child has its own copy of the records; a condition another thread held at
        # the fork would stay locked there.
        after_fork(self, MemoryStore._forked)

    def _forked(self) -> None:
        self._cond = threading.Condition()

    def now(self) -> float:
        return time.time()

    def claim(self, key: RecordKey, fingerprint: str, lease: float, ttl: float) -> ClaimOutcome:
        with self._cond:
            return self.state.claim(key, fingerprint, lease, ttl, time.time())

    def complete(self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float) -> None:
        self.check_result_size(result)
        with self._cond:
            self.state.complete(key, fence, result, codec, ttl, time.time())
            self._cond.notify_all()

    def release(self, key: RecordKey, fence: int) -> None:
        with self._cond:
            self.state.release(key, fence, time.time())
            self._cond.notify_all()

    def renew(self, key: RecordKey, fence: int, lease: float) -> float:
        with self._cond:
            return self.state.renew(key, fence, lease, time.time())

    def watch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.state.changed(key, fence, time.time()), timeout)

    def get(self, key: RecordKey) -> Record | None:
        with self._cond:
            return self.state.get(key, time.time())

    def delete(self, key: RecordKey, running: bool = True) -> bool:
        with self._cond:
            found = self.state.delete(key, running, time.time())
            self._cond.notify_all()
            return found

    def purge_expired(self, limit: int = 1000) -> int:
        limit = count(limit, "limit", where="MemoryStore.purge_expired", minimum=0)
        with self._cond:
            return self.state.purge_expired(limit, time.time())

    def list(self, scope: str | None = None, limit: int = 100) -> list[Record]:
        limit = count(limit, "limit", where="MemoryStore.list", minimum=0)
        with self._cond:
            return self.state.list(scope, limit, time.time())

    # The async face calls the sync one: nothing here blocks on I/O, and the lock is held
    # only for a dict update.
    async def aclaim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome:
        return self.claim(key, fingerprint, lease, ttl)

    async def acomplete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> None:
        self.complete(key, fence, result, codec, ttl)

    async def arelease(self, key: RecordKey, fence: int) -> None:
        self.release(key, fence)

    async def arenew(self, key: RecordKey, fence: int, lease: float) -> float:
        return self.renew(key, fence, lease)

    async def awatch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        async def changed() -> bool:
            return self._changed(key, fence)

        return await apoll_until(changed, timeout)

    async def aget(self, key: RecordKey) -> Record | None:
        return self.get(key)

    async def adelete(self, key: RecordKey, running: bool = True) -> bool:
        return self.delete(key, running)

    async def apurge_expired(self, limit: int = 1000) -> int:
        return self.purge_expired(limit)

    def _changed(self, key: RecordKey, fence: int) -> bool:
        with self._cond:
            return self.state.changed(key, fence, time.time())
