"""The record store on each backend, picked by URL (:mod:`oncely.backends.registry` holds the
URL table; its store functions are re-exported here).

* ``memory://``: :class:`oncely.stores.memory.MemoryStore` (one process)
* ``sqlite:///path.db``: :class:`oncely.stores.sqlite.SQLiteStore` (the embedded default)
* ``postgresql://…``: :class:`oncely.stores.postgres.PostgresStore` (``oncely[postgres]``)
* ``mysql://…``: :class:`oncely.stores.mysql.MySQLStore` (``oncely[mysql]``; MariaDB too)
* ``redis://…``: :class:`oncely.stores.redis.RedisStore` (``oncely[redis]``)

The three SQL stores share :mod:`oncely.stores.sql`; each dialect's module keeps its SQL text.
"""

from __future__ import annotations

from oncely.backends.registry import (
    DEFAULT_URL,
    configured_store,
    open_store,
    shared_store,
    store_class,
)
from oncely.stores.base import Store

__all__ = [
    "DEFAULT_URL",
    "Store",
    "configured_store",
    "open_store",
    "shared_store",
    "store_class",
]
