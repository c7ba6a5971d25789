"""The Django database as an oncely store: ``store="django"`` or ``"django://<alias>"``.

The store is the SQL store of the database's vendor (PostgreSQL, MySQL/MariaDB or SQLite)
opened on the same database as ``settings.DATABASES[alias]``, with **its own connections**:
a claim must be visible to every other request the moment it is made, so it can never run
inside the request's transaction (``ATOMIC_REQUESTS``) on Django's connection, where a
rollback would undo it and an open transaction would hide it. The table is
``oncely_records``, created by this app's migration (``manage.py migrate oncely``) or by
``manage.py oncely init``, with exactly the schema the store itself creates (the migration
calls the store's own ``init_schema``).

PostgreSQL needs ``oncely[postgres]`` (psycopg 3), MySQL ``oncely[mysql]`` (PyMySQL),
whatever driver Django itself uses. A SQLite database becomes a WAL-mode file (the store
switches it on; Django works the same in WAL mode); an in-memory SQLite database cannot be
shared and is refused.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any
from urllib.parse import quote, urlencode

from django.db import connections  # type: ignore[import-untyped]

from oncely.errors import ConfigurationError
from oncely.stores import Store, open_store

__all__ = [
    "SCHEME",
    "TABLE",
    "alias_of",
    "create_table",
    "database_store",
    "database_url",
    "drop_table",
    "init_schema",
]

#: ``store="django"`` (the ``default`` database) or ``"django://<alias>"``.
SCHEME = "django"
#: The table the migration creates and the store uses.
TABLE = "oncely_records"

# Keys of a PostgreSQL ``OPTIONS`` dict that configure Django's driver, not libpq.
_DJANGO_ONLY = frozenset(
    {"isolation_level", "server_side_binding", "pool", "assume_role", "cursor_factory", "context"}
)

_stores: dict[str, Store] = {}
_lock = threading.Lock()


def alias_of(value: object) -> str | None:
    """The database alias ``value`` names (``"django"`` → ``"default"``,
    ``"django://replica"`` → ``"replica"``), or None if it names no Django database."""
    if not isinstance(value, str):
        return None
    if value == SCHEME:
        return "default"
    prefix = SCHEME + "://"
    if value.startswith(prefix):
        return value[len(prefix) :] or "default"
    return None


def _settings_of(alias: str) -> tuple[str, dict[str, Any]]:
    try:
        connection = connections[alias]
    except Exception as exc:  # ConnectionDoesNotExist, or DATABASES is not configured
        known = ", ".join(sorted(connections.settings)) or "none"
        raise ConfigurationError(
            f"store 'django://{alias}' names no database in settings.DATABASES (known "
            f"aliases: {known})"
        ) from exc
    return str(connection.vendor), dict(connection.settings_dict)


def database_url(
    alias: str = "default",
    *,
    vendor: str | None = None,
    settings_dict: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The oncely store URL and constructor options for the database ``alias`` (or for the
    given ``vendor`` and ``settings_dict``, as a migration passes them).

    :raises ConfigurationError: the alias is unknown, the vendor is not PostgreSQL, MySQL or
        SQLite, or the SQLite database is in memory.
    """
    if vendor is None or settings_dict is None:
        vendor, settings_dict = _settings_of(alias)
    name = str(settings_dict.get("NAME") or "")
    options: dict[str, Any] = {"table": TABLE}
    if vendor == "sqlite":
        if not name or name == ":memory:" or "mode=memory" in name:
            raise ConfigurationError(
                f"database {alias!r} is an in-memory SQLite database, which other processes "
                "(and oncely's own connections) cannot share; use a file (for tests: "
                "DATABASES[...]['TEST'] = {'NAME': 'test.sqlite3'})"
            )
        return "sqlite:///" + os.path.abspath(name), {**options, "create_schema": False}
    user = quote(str(settings_dict.get("USER") or ""), safe="")
    password = quote(str(settings_dict.get("PASSWORD") or ""), safe="")
    credentials = user + (f":{password}" if password else "") + ("@" if user else "")
    host = str(settings_dict.get("HOST") or "")
    port = str(settings_dict.get("PORT") or "")
    query: dict[str, str] = {}
    if host.startswith("/"):  # a Unix socket directory
        query["host" if vendor == "postgresql" else "unix_socket"] = host
        host = ""
    netloc = credentials + (host or ("" if query else "localhost")) + (f":{port}" if port else "")
    if vendor == "postgresql":
        for key, value in (settings_dict.get("OPTIONS") or {}).items():
            if key not in _DJANGO_ONLY and isinstance(value, (str, int)):
                query[key] = str(value)
        scheme = "postgresql"
    elif vendor == "mysql":
        scheme = "mysql"
    else:
        raise ConfigurationError(
            f"database {alias!r} is {vendor}; the Django database store supports PostgreSQL, "
            "MySQL/MariaDB and SQLite (use a store URL such as 'redis://…' instead)"
        )
    url = f"{scheme}://{netloc}/{quote(name, safe='')}"
    if query:
        url += "?" + urlencode(query, quote_via=quote)  # libpq reads no "+" as a space
    return url, options


def database_store(alias: str = "default") -> Store:
    """One process-wide store on the Django database ``alias`` (opened, not connected).

    :raises ConfigurationError: see :func:`database_url`; or the vendor's oncely extra is not
        installed (the message has the ``pip install`` line).
    """
    with _lock:
        store = _stores.get(alias)
        if store is None:
            url, options = database_url(alias)
            store = _stores[alias] = open_store(url, **options)
        return store


def init_schema(vendor: str, settings_dict: dict[str, Any]) -> None:
    """Create the records table in the database described by ``vendor`` and
    ``settings_dict``, with the store's own ``init_schema`` (what ``oncely init`` runs).

    :raises ConfigurationError: see :func:`database_url`.
    """
    url, options = database_url(vendor=vendor, settings_dict=settings_dict)
    store = open_store(url, **{**options, "create_schema": True})
    try:
        store.init_schema()
    finally:
        store.close()


def create_table(apps: Any, schema_editor: Any) -> None:
    """Migration step: create the table in the database being migrated, if it is one the
    store supports and the vendor's oncely extra is installed (otherwise a warning says what
    to do: the project then keeps its records elsewhere, or runs ``manage.py oncely init``
    once the extra is installed)."""
    connection = schema_editor.connection
    try:
        init_schema(connection.vendor, dict(connection.settings_dict))
    except ConfigurationError as exc:
        warnings.warn(
            f"oncely: the {TABLE} table was not created in database {connection.alias!r}: "
            f"{exc}. Needed only with ONCELY['store'] = 'django'; create it later with "
            "`manage.py oncely init django://" + str(connection.alias) + "`",
            RuntimeWarning,
            stacklevel=1,
        )


def drop_table(apps: Any, schema_editor: Any) -> None:
    """Migration step backwards: drop the table (and so every record in it)."""
    schema_editor.execute(f"DROP TABLE IF EXISTS {schema_editor.quote_name(TABLE)}")
