"""Lock backends, picked by URL as the stores are.

==========================  ===========================================================
URL                         backend
==========================  ===========================================================
``redis://…``               :class:`oncely.locks.redis.RedisLockBackend` (``oncely[redis]``)
``sqlite:///path.db``       :class:`oncely.locks.sqlite.SQLiteLockBackend` (the embedded default)
``postgresql://…``          :class:`oncely.locks.postgres.PostgresLockBackend` (postgres extra)
``[url1, url2, url3]``      :class:`oncely.locks.redlock.RedlockBackend` (via :class:`Redlock`)
==========================  ===========================================================

Backends are shared per process and per (URL, options): every :class:`~oncely.locks.Lock` on
the same URL uses the same connection pool, so creating one lock instance per holder is cheap.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from oncely.errors import ConfigurationError
from oncely.locks.base import LockBackend

__all__ = ["backend_class", "shared_backend"]

_BACKENDS: dict[str, tuple[str, str, str]] = {
    "redis": ("oncely.locks.redis", "RedisLockBackend", "redis"),
    "rediss": ("oncely.locks.redis", "RedisLockBackend", "redis"),
    "sqlite": ("oncely.locks.sqlite", "SQLiteLockBackend", ""),
    "postgresql": ("oncely.locks.postgres", "PostgresLockBackend", "postgres"),
    "postgres": ("oncely.locks.postgres", "PostgresLockBackend", "postgres"),
}

_shared: dict[Any, LockBackend] = {}
_shared_lock = threading.Lock()


def backend_class(url: str) -> type[LockBackend]:
    """The backend class for ``url``'s scheme (imports its driver on first use)."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"lock URL {url!r} is not a URL; use e.g. 'redis://localhost:6379/0', "
            "'sqlite:///locks.db' or 'postgresql://user@host/db' (for Redlock pass a list of "
            "Redis URLs to Redlock(...))"
        )
    scheme = url.split("://", 1)[0].lower().split("+", 1)[0]
    try:
        module_name, class_name, extra = _BACKENDS[scheme]
    except KeyError:
        known = ", ".join(sorted(_BACKENDS))
        raise ConfigurationError(
            f"unknown lock URL scheme {scheme!r} in {url!r}; known schemes: {known} "
            "(memory:// has no lock backend: a lock must be shared between processes)"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"the {scheme!r} lock backend needs an extra package ({exc.name}); "
            f"install it with: pip install 'oncely[{extra}]'"
        ) from exc
    cls: type[LockBackend] = getattr(module, class_name)
    return cls


def shared_backend(cls: type[LockBackend], key: Any, *args: Any, **options: Any) -> LockBackend:
    """One backend per (class, key, options) in this process; unhashable options get their own."""
    try:
        cache_key: Any = (cls, key, tuple(sorted(options.items())))
        hash(cache_key)
    except TypeError:
        return cls(*args, **options)
    with _shared_lock:
        backend = _shared.get(cache_key)
        if backend is None:
            backend = _shared[cache_key] = cls(*args, **options)
        return backend
