"""Stores, picked by URL as SQLAlchemy and ``limits`` do.

========================  =====================================================
URL                       store
========================  =====================================================
``memory://``             :class:`oncely.stores.memory.MemoryStore` (one process)
``sqlite:///path.db``     :class:`oncely.stores.sqlite.SQLiteStore` (the embedded default)
``postgresql://…``        :class:`oncely.stores.postgres.PostgresStore` (``oncely[postgres]``)
``mysql://…``             :class:`oncely.stores.mysql.MySQLStore` (``oncely[mysql]``; MariaDB too)
``redis://…``             :class:`oncely.stores.redis.RedisStore` (``oncely[redis]``)
========================  =====================================================
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from oncely.errors import ConfigurationError
from oncely.stores.base import Store

__all__ = ["DEFAULT_URL", "Store", "open_store", "shared_store", "store_class"]

#: The embedded default: a SQLite file in the working directory.
DEFAULT_URL = "sqlite:///oncely.db"

_BACKENDS: dict[str, tuple[str, str, str]] = {
    # scheme: (module, class, extra that installs its driver)
    "memory": ("oncely.stores.memory", "MemoryStore", ""),
    "sqlite": ("oncely.stores.sqlite", "SQLiteStore", ""),
    "postgresql": ("oncely.stores.postgres", "PostgresStore", "postgres"),
    "postgres": ("oncely.stores.postgres", "PostgresStore", "postgres"),
    "mysql": ("oncely.stores.mysql", "MySQLStore", "mysql"),
    "mariadb": ("oncely.stores.mysql", "MySQLStore", "mysql"),
    "redis": ("oncely.stores.redis", "RedisStore", "redis"),
    "rediss": ("oncely.stores.redis", "RedisStore", "redis"),
}

_shared: dict[str, Store] = {}
_shared_lock = threading.Lock()


def open_store(url: str, **options: Any) -> Store:
    """Open a new store for ``url``; ``options`` go to the store's constructor."""
    store: Store = store_class(url)(url, **options)
    return store


def store_class(url: str) -> type[Store]:
    """The store class that serves ``url`` (its driver imported; nothing is connected).

    :raises ConfigurationError: not a URL, an unknown scheme, or the driver's extra is missing.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"store URL {url!r} is not a URL; use e.g. 'sqlite:///oncely.db', 'memory://', "
            "'redis://localhost:6379/0' or 'postgresql://user@host/db'"
        )
    scheme = url.split("://", 1)[0].lower()
    scheme = scheme.split("+", 1)[0]  # postgresql+psycopg://, mysql+pymysql://
    try:
        module_name, class_name, extra = _BACKENDS[scheme]
    except KeyError:
        known = ", ".join(sorted(_BACKENDS))
        raise ConfigurationError(
            f"unknown store URL scheme {scheme!r} in {url!r}; known schemes: {known}"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"the {scheme!r} store needs an extra package ({exc.name}); "
            f"install it with: pip install 'oncely[{extra}]'"
        ) from exc
    cls: type[Store] = getattr(module, class_name)
    return cls


def shared_store(url_or_store: str | Store) -> Store:
    """Return one process-wide store per URL, so decorators naming the same URL share a pool."""
    if isinstance(url_or_store, Store):
        return url_or_store
    with _shared_lock:
        store = _shared.get(url_or_store)
        if store is None:
            store = _shared[url_or_store] = open_store(url_or_store)
        return store
