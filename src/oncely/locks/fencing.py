"""Fencing: the protected resource refuses writes from a holder whose lock was taken over.

A lock's ttl cannot stop a holder that was paused (GC, swap, SIGSTOP, a slow network) past its
ttl from writing when it wakes up: by then another process holds the lock. Kleppmann's fix is a
fencing token that grows with every acquisition, checked by the resource itself. Every oncely
lock returns one (``lock.acquire()``, ``lock.token``); these helpers do the check in the same
statement or script as the write, so there is no gap between checking and writing.

SQL (SQLite or PostgreSQL): keep the token next to the data it protects::

    CREATE TABLE IF NOT EXISTS balances (
        key   TEXT PRIMARY KEY,
        fence BIGINT NOT NULL,      -- the token of the last holder that wrote this row
        value TEXT
    );

and write with :func:`fenced_update`, which runs, in the caller's transaction::

    INSERT INTO balances (key, fence, value) VALUES (:key, :token, :value)
    ON CONFLICT (key) DO UPDATE SET fence = excluded.fence, value = excluded.value
    WHERE balances.fence <= excluded.fence

A stale holder's token is strictly smaller than the newer holder's, so its write changes no row
and the helper returns ``False``. The comparison is ``<=``, not ``<``, so one holder may write
the same row several times under one token. For an ``UPDATE`` of your own, add
``AND fence <= :token`` to its ``WHERE`` and set ``fence = :token``.

Redis: :func:`fenced_set` stores ``{fence, value}`` in a hash and writes only if the token is
not older than the stored one (``fenced_set.lua``, one script).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping
from typing import Any, Final

from oncely.backends.lua import Script, aevalsha, evalsha
from oncely.errors import ConfigurationError

__all__ = [
    "afenced_set",
    "afenced_update",
    "fenced_get",
    "fenced_set",
    "fenced_table_sql",
    "fenced_update",
]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _ident(name: str, what: str) -> str:
    parts = name.split(".") if isinstance(name, str) else [""]
    if len(parts) > 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise ConfigurationError(
            f"{what} {name!r} is not a plain SQL identifier (letters, digits, underscores, "
            "optionally schema-qualified); e.g. 'balances' or 'app.balances'"
        )
    return ".".join(f'"{p}"' for p in parts)


def _check_token(token: object) -> int:
    if isinstance(token, bool) or not isinstance(token, int) or token <= 0:
        raise ConfigurationError(
            f"fencing token {token!r} is not a positive int; pass the value lock.acquire() "
            "returned (or lock.token)"
        )
    return token


def fenced_table_sql(table: str, columns: Mapping[str, str] | None = None) -> str:
    """The ``CREATE TABLE`` of a fenced table: ``key``, ``fence`` and your ``columns``.

    ``columns`` maps column names to SQL types (default ``{"value": "TEXT"}``).

    :raises ConfigurationError: ``columns`` is not a mapping, or a name is not an identifier.
    """
    if columns is not None and not isinstance(columns, Mapping):
        raise ConfigurationError(
            f"columns= takes a mapping of column names to SQL types, not {type(columns).__name__}"
        )
    cols = {"value": "TEXT"} if columns is None else dict(columns)
    body = ", ".join(f"{_ident(c, 'column')} {kind}" for c, kind in cols.items())
    extra = f", {body}" if body else ""
    return (
        f"CREATE TABLE IF NOT EXISTS {_ident(table, 'table')} "
        f'("key" TEXT PRIMARY KEY, "fence" BIGINT NOT NULL{extra})'
    )


def _upsert(
    table: str, values: Mapping[str, Any], key_column: str, fence_column: str, style: str
) -> str:
    t = _ident(table, "table")
    k, f = _ident(key_column, "key_column"), _ident(fence_column, "fence_column")
    cols = [_ident(c, "column") for c in values]

    def param(name: str) -> str:
        return f":{name}" if style == "named" else f"%({name})s"

    names = ", ".join([k, f, *cols])
    params = ", ".join(
        [param("pkey"), param("ptoken")] + [param(f"p{i}") for i in range(len(cols))]
    )
    sets = ", ".join(f"{c} = excluded.{c}" for c in [f, *cols])
    return (
        f"INSERT INTO {t} ({names}) VALUES ({params}) ON CONFLICT ({k}) DO UPDATE SET {sets} "
        f"WHERE {t}.{f} <= excluded.{f}"
    )


def _update_args(
    conn: Any,
    table: str,
    key: Any,
    token: int,
    values: Mapping[str, Any],
    key_column: str,
    fence_column: str,
) -> tuple[str, dict[str, Any]]:
    _check_token(token)
    style = "named" if isinstance(conn, sqlite3.Connection) else "pyformat"
    query = _upsert(table, values, key_column, fence_column, style)
    params = {"pkey": key, "ptoken": token}
    params.update({f"p{i}": v for i, v in enumerate(values.values())})
    return query, params


def fenced_update(
    conn: Any,
    table: str,
    key: Any,
    token: int,
    values: Mapping[str, Any],
    *,
    key_column: str = "key",
    fence_column: str = "fence",
) -> bool:
    """Write ``values`` to row ``key`` of ``table`` unless a newer token wrote it already.

    ``conn`` is a :class:`sqlite3.Connection` or a psycopg connection; the statement runs in
    its current transaction (commit it as usual). Returns ``True`` if the row was written,
    ``False`` if the write was refused because ``token`` is older than the row's fence: the
    caller's lock was lost, and it must stop.
    """
    query, params = _update_args(conn, table, key, token, values, key_column, fence_column)
    cursor = conn.execute(query, params)
    return bool(cursor.rowcount == 1)


async def afenced_update(
    conn: Any,
    table: str,
    key: Any,
    token: int,
    values: Mapping[str, Any],
    *,
    key_column: str = "key",
    fence_column: str = "fence",
) -> bool:
    """The async face of :func:`fenced_update`, for a psycopg ``AsyncConnection``."""
    query, params = _update_args(conn, table, key, token, values, key_column, fence_column)
    cursor = await conn.execute(query, params)
    return bool(cursor.rowcount == 1)


# -- Redis ----------------------------------------------------------------------------------------
_FENCED_SET: Final = Script("oncely.locks", "fenced_set")


def _set_args(key: str, value: bytes | str, token: int, px: float | None) -> tuple[Any, ...]:
    _check_token(token)
    ms = 0 if px is None else max(1, round(px * 1000))
    return (1, key, token, value, ms)


def fenced_set(
    client: Any, key: str, value: bytes | str, token: int, *, px: float | None = None
) -> bool:
    """Set Redis hash ``key`` to ``{fence: token, value}`` unless a newer token wrote it.

    ``client`` is a :class:`redis.Redis`; ``px`` an optional expiry in seconds. Returns
    ``False`` if the write was refused (the caller's lock was lost).
    """
    reply = evalsha(client, _FENCED_SET, *_set_args(key, value, token, px))
    return int(reply[0]) == 1


async def afenced_set(
    client: Any, key: str, value: bytes | str, token: int, *, px: float | None = None
) -> bool:
    """The async face of :func:`fenced_set`, for a :class:`redis.asyncio.Redis`."""
    reply = await aevalsha(client, _FENCED_SET, *_set_args(key, value, token, px))
    return int(reply[0]) == 1


def fenced_get(client: Any, key: str) -> tuple[bytes | None, int | None]:
    """The value and fence :func:`fenced_set` stored at ``key`` (``(None, None)`` if none)."""
    value, fence = client.execute_command("HMGET", key, "value", "fence")
    return value, None if fence is None else int(fence)
