"""Versioned updates: optimistic locking on a row of the user's own table (source §3.3).

The source's optimistic update (``UPDATE t SET balance = ?, version = version + 1 WHERE id = ?
AND version = ?``) is right until its result is ignored: when another writer got there first
the statement changes zero rows, nobody looks, and the caller's change is silently lost.
:func:`versioned_update` runs that statement and never lets zero rows pass: it returns the new
version, or raises

* :class:`~oncely.errors.StaleVersion` (``expected``, ``current``): the row is at another
  version; read it again, recompute, retry (:func:`oncely.optimistic.retry_on_conflict`);
* :class:`~oncely.errors.NotFound`: there is no such row (never was, or deleted meanwhile);
* :class:`~oncely.errors.UnversionedRow`: the row's version column is NULL;
  :class:`~oncely.errors.VersionExhausted` (one of them): it is at 2^63 - 1, which no write can
  raise (no ``UPDATE`` is sent: SQLite would make the version a REAL);
* :class:`~oncely.errors.ValueRefused`: the database refused a value (too long, too large,
  NULL into ``NOT NULL``, a ``dict``), or the id is not of the key column's type or names
  another key (MariaDB compares ``'1abc'`` equal to 1: the ``UPDATE`` matches the id's text
  exactly, and the reporting ``SELECT`` names the key it found, the state machine's check
  :func:`~oncely.sql.connections.other_key`).

Nothing is written in those cases. The statement runs in the caller's transaction (commit as
usual; on an error roll back before the next attempt, so that the next read is fresh). On
PostgreSQL a statement the server refuses aborts the transaction (and psycopg's ``commit()`` of
it rolls back without an error), so a connection's first call per (table, columns) runs in a
savepoint (:func:`~oncely.sql.connections.first_use_guarded`, as ``insert_once``); later calls
are the statements alone. The error of a failed statement (``ValueRefused``, ``UnknownTable``,
``UnknownColumn``) says whether the transaction is still usable or aborted ("roll it back");
on SQLite and MariaDB/MySQL only the statement failed and the transaction goes on.

Statements per dialect (the decision is always the one ``UPDATE``; nothing is read first):

* PostgreSQL, and SQLite >= 3.35: ``UPDATE t SET …, version = version + 1 WHERE id = :id AND
  version = :expected RETURNING version``: one statement on success.
* MariaDB / MySQL (no ``UPDATE … RETURNING``, even in MariaDB 11): the same ``UPDATE`` without
  ``RETURNING``; its row count decides, and the new version is ``expected + 1`` (the statement
  matched exactly that version and added one).
* Zero rows, every dialect: one ``SELECT version FROM t WHERE id = :id`` in the same
  transaction tells a stale version from a missing row or a NULL version (MariaDB: ``LOCK IN
  SHARE MODE``, a locking read that sees the latest committed row, not the REPEATABLE READ
  snapshot). It only reports; the write was already refused.

The table needs an integer version column, ``NOT NULL`` (start it at 1)::

    CREATE TABLE accounts (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL,
                           version BIGINT NOT NULL DEFAULT 1);
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from oncely.backends.plans import Exec, Plan
from oncely.core.text import sendable
from oncely.errors import (
    ConfigurationError,
    InvalidIdentifier,
    NotFound,
    StaleVersion,
    UnversionedRow,
    ValueRefused,
    VersionExhausted,
)
from oncely.sql.connections import (
    Dialect,
    Result,
    SqlConnection,
    adapt,
    arun,
    busy,
    first_use_guarded,
    missing_object,
    other_key,
    quote,
    run,
    value_refused,
)

__all__ = ["aversioned_update", "versioned_update"]


#: The largest version a BIGINT (or SQLite INTEGER) column can hold; a larger expected version
#: (an If-Match of 19+ digits) can match no row, so it is reported stale, never sent as an
#: overflowing parameter.
_MAX_VERSION = 2**63 - 1


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigurationError(
            f"expected_version must be the int version you read (>= 0), not {version!r}"
        )
    return version


def _exact(id: object) -> bool:
    """Whether ``id`` is of a type whose text the key check compares (str, int, UUID: those of
    :func:`~oncely.sql.connections.other_key`); the UPDATE then matches that text exactly."""
    return not isinstance(id, bool) and isinstance(id, (str, int, uuid.UUID))


def _statements(
    conn: SqlConnection,
    table: str,
    id: object,
    changes: Mapping[str, Any],
    id_column: str,
    version_column: str,
) -> tuple[str, str, dict[str, Any], bool]:
    if not isinstance(changes, Mapping):
        raise ConfigurationError(
            f"changes must be a mapping of column -> value, not {type(changes).__name__}"
        )
    returning = conn.dialect == "postgresql" or (
        conn.dialect == "sqlite" and conn.version >= (3, 35)
    )
    for name in (table, id_column, version_column, *changes):
        if not isinstance(name, str):
            raise InvalidIdentifier(
                f"an SQL identifier must be a str, not {type(name).__name__} ({name!r})"
            )
    columns = tuple(changes)
    exact = _exact(id)
    update, select = _texts(
        conn.dialect, returning, table, columns, id_column, version_column, exact
    )
    params = {f"c{i}": value for i, value in enumerate(changes.values())}
    return update, select, params, returning


@lru_cache(maxsize=512)
def _texts(
    dialect: Dialect,
    returning: bool,
    table: str,
    columns: tuple[str, ...],
    id_column: str,
    version_column: str,
    exact: bool,
) -> tuple[str, str]:
    """The UPDATE and the reporting SELECT (cached: names are validated once per shape).

    ``exact``: the UPDATE also compares the key column's text with the id's
    (``CAST(id AS TEXT) = :oncely_key``; MariaDB/MySQL byte for byte), so an id the database
    would convert to another key (MariaDB ``'1abc'`` = 1) writes nothing; the reporting SELECT,
    which matches as the database does, then names the key it found (:func:`other_key`)."""
    t, idc, vc = quote(table, dialect), quote(id_column, dialect), quote(version_column, dialect)
    if id_column.casefold() == version_column.casefold():
        raise ConfigurationError("id_column and version_column must be different columns")
    sets: list[str] = []
    # SQL identifiers are case-insensitive (SQLite, MariaDB/MySQL, unquoted PostgreSQL):
    # {"Version": 0} would reset the version and {"ID": 8} move the row, so compare folded.
    reserved = (id_column.casefold(), version_column.casefold())
    for i, column in enumerate(columns):
        if column.casefold() in reserved:
            raise ConfigurationError(
                f"changes must not set {column!r}: oncely sets the version and the id "
                "selects the row"
            )
        sets.append(f"{quote(column, dialect)} = :c{i}")
    sets.append(f"{vc} = {vc} + 1")
    update = (
        f"UPDATE {t} SET {', '.join(sets)} WHERE {idc} = :oncely_id AND {vc} = :oncely_expected"
    )
    if exact and dialect == "mysql":
        update += f" AND CAST({idc} AS BINARY) = CAST(:oncely_key AS BINARY)"
    elif exact:
        update += f" AND CAST({idc} AS TEXT) = :oncely_key"
    if returning:
        update += f" RETURNING {vc}"
    lock = " LOCK IN SHARE MODE" if dialect == "mysql" else ""
    select = f"SELECT {vc}, {idc} FROM {t} WHERE {idc} = :oncely_id{lock}"
    return update, select


def _plan(
    conn: SqlConnection,
    table: str,
    id: Any,
    changes: Mapping[str, Any],
    expected_version: int,
    id_column: str,
    version_column: str,
) -> Plan[int]:
    expected = _check_version(expected_version)
    if id is None:
        raise ConfigurationError("id must not be None: pass the primary key of the row to update")
    sendable(id, "versioned_update: id", ConfigurationError)
    if isinstance(changes, Mapping):
        for column, value in changes.items():
            sendable(value, f"versioned_update: the value of column {column!r}", ConfigurationError)
    update, select, params, returning = _statements(
        conn, table, id, changes, id_column, version_column
    )
    params.update(oncely_id=id, oncely_expected=expected)
    if _exact(id):
        params["oncely_key"] = str(id)
    conn.check_usable()
    entity = f"{table} {id_column}={id!r}"
    # 2^63 - 1: version + 1 would not fit (SQLite makes it a REAL, the others refuse it);
    # larger: no BIGINT holds it. Nothing is sent that could write; the SELECT tells.
    send = expected < _MAX_VERSION
    # on PostgreSQL a failing statement aborts the caller's transaction: the first use per
    # connection and (table, columns) runs in a savepoint (first_use_guarded, the guard of
    # every mechanism writing in the caller's transaction); later calls are the statements
    # alone, and their error says the transaction is aborted
    guard = ("versioned_update", table, frozenset(changes), id_column, version_column)
    written, result = yield from first_use_guarded(
        conn, guard, _send(update, select, params, returning, send, entity, table, id_column)
    )
    if written == 1:
        return int(result.rows[0][0]) if returning else expected + 1
    found = result
    key = other_key(id_column, id, found) if _exact(id) else None
    if key is not None:
        raise ValueRefused(
            f"versioned_update of {entity}: the id matched the row whose {id_column} is "
            f"{key!r} (the database converted {id!r} to compare); nothing was written. Pass "
            f"the key as the row holds it ({key!r})"
        )
    if not found.rows:
        raise NotFound(
            entity, f"{entity} does not exist (or was deleted meanwhile); nothing written"
        )
    current = found.rows[0][0]
    if current is None:
        raise UnversionedRow(
            entity,
            f"{entity} has a NULL {version_column!r}: no version to compare with; backfill it "
            f"(UPDATE {table} SET {version_column} = 1 WHERE {version_column} IS NULL) and "
            "declare the column NOT NULL DEFAULT 1",
        )
    try:
        current = int(current)
    except (TypeError, ValueError):
        raise UnversionedRow(
            entity, f"{entity}: {version_column!r} holds {current!r}, not an integer version"
        ) from None
    if current == expected and expected < _MAX_VERSION:
        # the row is at the version, yet the UPDATE matched nothing: only its exact-text
        # match of the id refused it (a key other_key does not compare, such as a decimal)
        raise ValueRefused(
            f"versioned_update of {entity}: the id matched a row whose {id_column} is not "
            f"{str(id)!r} as text (the database converted {id!r} to compare); nothing was "
            "written. Pass the key as the row holds it"
        )
    if current == expected:  # at 2^63 - 1: the one version no write can raise
        raise VersionExhausted(
            entity,
            f"{entity} is at {version_column!r} {current}, the largest a 64-bit integer holds: "
            "no write can raise it (SQLite would turn it into a REAL, PostgreSQL and MariaDB "
            "refuse it); nothing was written. Versions only get there when set by hand",
        )
    raise StaleVersion(entity, expected, current)


def _send(
    update: str,
    select: str,
    params: dict[str, Any],
    returning: bool,
    send: bool,
    entity: str,
    table: str,
    id_column: str,
) -> Plan[tuple[int, Result]]:
    """The statements: the ``UPDATE`` (unless ``send`` is false), and when it wrote nothing the
    reporting ``SELECT``; returns (rows written, the result of the last statement). Driver
    errors typed (missing names, busy, refused values)."""
    try:
        written = 0
        if send:
            result: Result = yield Exec(update, params)
            written = len(result.rows) if returning else result.rowcount
        if written == 1:
            return written, result
        if written > 1:
            raise ConfigurationError(
                f"{update!r} changed {written} rows: {id_column!r} is not unique in "
                f"{table!r}; roll the transaction back and use the primary key"
            )
        found: Result = yield Exec(select, {"oncely_id": params["oncely_id"]})
    except Exception as exc:
        typed = missing_object(exc) or busy(exc, f"versioned_update of {entity}")
        if typed is not exc:
            raise typed from exc
        refused = value_refused(exc, f"versioned_update of {entity}")
        if refused is not None:
            raise refused from exc
        raise
    return 0, found


def versioned_update(
    conn: Any,
    table: str,
    id: Any,
    changes: Mapping[str, Any],
    expected_version: int,
    *,
    id_column: str = "id",
    version_column: str = "version",
) -> int:
    """Set ``changes`` (column -> value) on row ``id`` of ``table`` if its ``version_column``
    is still ``expected_version``, adding one to the version; return the new version.

    ``conn`` is anything :func:`oncely.sql.connections.adapt` takes, used in its current
    transaction: sqlite3, psycopg 3, PyMySQL, a SQLAlchemy ``Connection`` / ``Session``, or
    Django's ``connection``. Table and column names are validated and quoted; values are bound
    parameters. ``changes`` may be empty (only the version moves: a "touch").

    :raises ~oncely.errors.StaleVersion: the row is at another version (``current``).
    :raises ~oncely.errors.NotFound: no row has that id.
    :raises ~oncely.errors.UnversionedRow: the row's version is NULL;
        :class:`~oncely.errors.VersionExhausted` (a subclass) when it is 2^63 - 1, the largest
        a 64-bit column holds (nothing is sent that could write).
    :raises ~oncely.errors.ValueRefused: the database refused a value of ``changes`` or the
        id (too long, too large, NULL into ``NOT NULL``, a type the driver cannot send), or the
        id matched a row whose key is another text (MariaDB ``'1abc'`` = 1, SQLite ``'1.0'``,
        PostgreSQL ``' 1'``); ``__cause__`` is the driver's error. Nothing was written. The
        transaction: on PostgreSQL the message says whether it is still usable (a first call
        per connection and columns runs in a savepoint) or aborted (roll back); on SQLite and
        MariaDB/MySQL it goes on.
    :raises ~oncely.errors.UnknownTable: / :raises ~oncely.errors.UnknownColumn: names the
        database does not have. :raises ~oncely.errors.InvalidIdentifier: a name that is not
        a plain identifier. :raises ~oncely.errors.TransactionFailed: the caller's
        transaction already failed (roll it back first). :raises ConfigurationError: bad
        arguments (changes naming the id or version column, a negative version).
    """
    sql = adapt(conn)
    result: int = run(
        _plan(sql, table, id, changes, expected_version, id_column, version_column), sql
    )
    return result


async def aversioned_update(
    conn: Any,
    table: str,
    id: Any,
    changes: Mapping[str, Any],
    expected_version: int,
    *,
    id_column: str = "id",
    version_column: str = "version",
) -> int:
    """The async face of :func:`versioned_update`, for a psycopg ``AsyncConnection``, an
    aiomysql connection, or a SQLAlchemy ``AsyncConnection`` / ``AsyncSession``."""
    sql = adapt(conn)
    result: int = await arun(
        _plan(sql, table, id, changes, expected_version, id_column, version_column), sql
    )
    return result
