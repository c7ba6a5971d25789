"""An in-process LRU of completed records, so a hot replay costs no round trip.

Entries expire on the monotonic clock after the time the *store* said the record has left
(``expires_at - now``, both store-clock), so client clock skew cannot stretch them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable

from oncely.core.records import Record

__all__ = ["ResultCache"]


class ResultCache:
    """Thread-safe LRU of ``Record`` by key, bounded by ``size`` and each record's remaining ttl."""

    def __init__(self, size: int, max_age: float | None = None) -> None:
        if size <= 0:
            raise ValueError("cache size must be positive")
        self.size = size
        self.max_age = max_age
        self._items: OrderedDict[Hashable, tuple[float, Record]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Record | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] <= time.monotonic():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: Hashable, record: Record, remaining: float) -> None:
        if self.max_age is not None:
            remaining = min(remaining, self.max_age)
        if remaining <= 0:
            return
        with self._lock:
            self._items[key] = (time.monotonic() + remaining, record)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
