"""The one URL registry: which store and which lock backend serve a URL scheme, and which
extra installs their driver. Stores and lock backends are picked by URL, as SQLAlchemy and
``limits`` do.

* ``memory://``: :class:`~oncely.stores.memory.MemoryStore` (one process); no lock backend.
* ``sqlite:///path.db``: :class:`~oncely.stores.sqlite.SQLiteStore` (the embedded default) and
  :class:`~oncely.locks.sqlite.SQLiteLockBackend`.
* ``postgresql://…`` (``postgres://``): :class:`~oncely.stores.postgres.PostgresStore` and
  :class:`~oncely.locks.postgres.PostgresLockBackend` (``oncely[postgres]``).
* ``mysql://…`` (``mariadb://``): :class:`~oncely.stores.mysql.MySQLStore` (``oncely[mysql]``);
  no lock backend.
* ``redis://…`` (``rediss://``): :class:`~oncely.stores.redis.RedisStore` and
  :class:`~oncely.locks.redis.RedisLockBackend` (``oncely[redis]``).

A class is imported when its URL is first used, so ``import oncely`` loads no driver. Adding a
backend is one row in :data:`SCHEMES`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from oncely.backends.urls import redact_url
from oncely.errors import ConfigurationError
from oncely.settings import SETTINGS, resolve, unknown_option

if TYPE_CHECKING:
    from oncely.locks.base import LockBackend
    from oncely.stores.base import Store

__all__ = [
    "DEFAULT_URL",
    "SCHEMES",
    "Scheme",
    "configured_store",
    "lock_backend_class",
    "open_store",
    "shared_lock_backend",
    "shared_store",
    "store_class",
]

#: The embedded default store: a SQLite file in the working directory (``$ONCELY_STORE``
#: overrides it, see :func:`configured_store`).
DEFAULT_URL: Final[str] = SETTINGS["store"].default


@dataclass(frozen=True)
class Scheme:
    """What serves one URL scheme: ``"module:Class"`` of its store and of its lock backend
    (``None``: there is none), and the extra that installs its driver (``""``: none needed)."""

    store: str | None
    lock: str | None
    extra: str


_SQLITE = Scheme("oncely.stores.sqlite:SQLiteStore", "oncely.locks.sqlite:SQLiteLockBackend", "")
_POSTGRES = Scheme(
    "oncely.stores.postgres:PostgresStore", "oncely.locks.postgres:PostgresLockBackend", "postgres"
)
_MYSQL = Scheme("oncely.stores.mysql:MySQLStore", None, "mysql")
_REDIS = Scheme("oncely.stores.redis:RedisStore", "oncely.locks.redis:RedisLockBackend", "redis")

#: Every URL scheme oncely knows (a SQLAlchemy driver part, ``+psycopg``, is ignored).
SCHEMES: Final[dict[str, Scheme]] = {
    "memory": Scheme("oncely.stores.memory:MemoryStore", None, ""),
    "sqlite": _SQLITE,
    "postgresql": _POSTGRES,
    "postgres": _POSTGRES,
    "mysql": _MYSQL,
    "mariadb": _MYSQL,
    "redis": _REDIS,
    "rediss": _REDIS,
}

_shared_stores: dict[str, Store] = {}
_shared_backends: dict[Any, LockBackend] = {}
_shared_lock = threading.Lock()


def _forked() -> None:
    # Another thread may have held the lock at the fork; it would stay locked in the child.
    # (The shared stores themselves reset their connections: oncely.backends.forks.)
    global _shared_lock
    _shared_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower().split("+", 1)[0]


def _load(target: str, scheme: str, extra: str, what: str) -> Any:
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"the {scheme!r} {what} needs an extra package ({exc.name}); "
            f"install it with: pip install 'oncely[{extra}]'"
        ) from exc
    return getattr(module, class_name)


_NOT_A_URL: Final = {
    "store": "use e.g. 'sqlite:///oncely.db', 'memory://', 'redis://localhost:6379/0' or "
    "'postgresql://user@host/db'",
    "lock": "use e.g. 'redis://localhost:6379/0', 'sqlite:///locks.db' or "
    "'postgresql://user@host/db' (for Redlock pass a list of Redis URLs to Redlock(...))",
}
_NO_BACKEND: Final = {
    "store": "",
    "lock": " (memory:// has no lock backend: a lock must be shared between processes)",
}


def _class_of(url: str, kind: str) -> Any:
    """The ``kind`` (``"store"``, ``"lock"``) class that serves ``url``, imported."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"{kind} URL {url!r} is not a URL; {_NOT_A_URL[kind]}")
    scheme = _scheme(url)
    entry = SCHEMES.get(scheme)
    target = None if entry is None else getattr(entry, kind)
    if entry is None or target is None:
        known = ", ".join(sorted(s for s, row in SCHEMES.items() if getattr(row, kind)))
        raise ConfigurationError(
            f"unknown {kind} URL scheme {scheme!r} in {url!r}; known schemes: {known}"
            + _NO_BACKEND[kind]
        )
    return _load(target, scheme, entry.extra, "lock backend" if kind == "lock" else "store")


# -- stores ----------------------------------------------------------------------------------------
def store_class(url: str) -> type[Store]:
    """The store class that serves ``url`` (its driver imported; nothing is connected).

    :raises ConfigurationError: not a URL, an unknown scheme, or the driver's extra is missing.
    """
    cls: type[Store] = _class_of(url, "store")
    return cls


def open_store(url: str, **options: Any) -> Store:
    """Open a new store for ``url``; ``options`` go to the store's constructor.

    :raises ConfigurationError: an unknown URL scheme or missing extra, or an option the store
        does not take (named with the closest one; a store that passes options on to its driver
        checks them against the driver's).
    """
    cls = store_class(url)
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = [name for name in params if name != "url"]
        for name in options:
            if name not in params or name == "url":
                raise unknown_option(name, known, f"{cls.__name__}({redact_url(url)!r})")
    store: Store = cls(url, **options)
    return store


def configured_store(store: str | Store | None, where: str) -> str | Store:
    """The store a component uses: ``store`` if given, else ``$ONCELY_STORE``, else
    :data:`DEFAULT_URL` (:func:`oncely.settings.resolve`); a URL's class is looked up and the
    URL checked now (:meth:`~oncely.stores.base.Store.check_url`: a misspelled query option, a
    bad port; nothing is opened), so a typo or a missing extra fails when the component is
    built, not at its first call.

    :param where: the component, for messages (``"@idempotent billing.charge"``).
    :raises ConfigurationError: not a URL or a :class:`~oncely.stores.base.Store`, an unknown
        scheme, a URL the store would refuse, or the driver's extra is not installed.
    """
    from oncely.stores.base import Store

    spec = resolve("store", store, where=where)
    if isinstance(spec, str):
        store_class(spec).check_url(spec)
    elif not isinstance(spec, Store):
        raise ConfigurationError(
            f"{where}: store= takes a URL or an oncely Store, not {type(spec).__name__}"
        )
    return spec  # type: ignore[no-any-return]


def shared_store(url_or_store: str | Store) -> Store:
    """One process-wide store per URL, so components naming the same URL share a pool; a
    :class:`~oncely.stores.base.Store` is returned as it is."""
    if not isinstance(url_or_store, str):
        return url_or_store
    with _shared_lock:
        store = _shared_stores.get(url_or_store)
        if store is None:
            store = _shared_stores[url_or_store] = open_store(url_or_store)
        return store


# -- lock backends ---------------------------------------------------------------------------------
def lock_backend_class(url: str) -> type[LockBackend]:
    """The lock backend class for ``url``'s scheme (imports its driver on first use).

    :raises ConfigurationError: not a URL, a scheme without a lock backend, or the driver's
        extra is missing.
    """
    cls: type[LockBackend] = _class_of(url, "lock")
    return cls


def shared_lock_backend(
    cls: type[LockBackend], key: Any, *args: Any, **options: Any
) -> LockBackend:
    """One backend per (class, key, options) in this process, so every lock on one URL shares
    its connection pool; unhashable options get a backend of their own."""
    try:
        cache_key: Any = (cls, key, tuple(sorted(options.items())))
        hash(cache_key)
    except TypeError:
        return cls(*args, **options)
    with _shared_lock:
        backend = _shared_backends.get(cache_key)
        if backend is None:
            backend = _shared_backends[cache_key] = cls(*args, **options)
        return backend
