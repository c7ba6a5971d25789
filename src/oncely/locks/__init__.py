"""Distributed locks that stay correct: owner-checked, renewed, fenced.

>>> from oncely.locks import Lock
>>> with Lock("redis://localhost:6379/0", "orders:42", ttl=10) as lock:  # doctest: +SKIP
...     write_with_fence(lock.token)

Backends by URL: ``redis://…``, ``sqlite:///path.db``, ``postgresql://…``, and
:class:`Redlock` over several independent Redis servers. Every acquisition returns a fencing
token that strictly grows per lock name; :mod:`oncely.locks.fencing` makes the protected
resource refuse writes from a holder whose lock was taken over (the one thing a lease cannot
do by itself). See ``docs/locks.md``.
"""

from typing import TYPE_CHECKING, Any

from oncely.locks.base import LockBackend
from oncely.locks.fencing import (
    afenced_set,
    afenced_update,
    fenced_get,
    fenced_set,
    fenced_table_sql,
    fenced_update,
)
from oncely.locks.lock import Lock, LostCallback

if TYPE_CHECKING:
    from oncely.locks.redlock import Redlock

__all__ = [
    "Lock",
    "LockBackend",
    "LostCallback",
    "Redlock",
    "afenced_set",
    "afenced_update",
    "fenced_get",
    "fenced_set",
    "fenced_table_sql",
    "fenced_update",
]


def __getattr__(name: str) -> Any:
    # Redlock needs redis-py; import it only when asked for, so `import oncely.locks` works
    # without the extra.
    if name == "Redlock":
        from oncely.locks.redlock import Redlock

        return Redlock
    raise AttributeError(f"module 'oncely.locks' has no attribute {name!r}")
