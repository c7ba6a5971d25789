"""Insert-once (mechanism 1 of DESIGN.md, source §3.1): insert a row unless its unique key is
already there, and either way return *the* row.

``insert_once(conn, "orders", {"order_no": "A-1", "amount": 10}, unique=("order_no",))``
returns ``(row, created)``: ``row`` is a dict of every column of the stored row, ``created``
says whether this call inserted it. A duplicate is never an exception and never a second row.

Per dialect (the trap to avoid: ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` returns nothing
for the conflicting row, and a no-op ``DO UPDATE`` that forces a row back writes a new row
version, bloats the table and fires triggers; oncely never does that):

* **PostgreSQL**: one statement, a CTE: ``WITH ins AS (INSERT ... ON CONFLICT (unique) DO
  NOTHING RETURNING *) SELECT true, ins.* FROM ins UNION ALL SELECT false, t.* FROM t WHERE
  <unique> AND NOT EXISTS (SELECT 1 FROM ins)``. On a connection's first call for a (table,
  columns) pair it runs in a savepoint (:func:`~oncely.sql.connections.first_use_guarded`), so a
  wrong ``unique=``, a missing table or column or a refused value is refused without aborting
  the caller's transaction (psycopg's ``commit()`` of an aborted transaction rolls back without
  an error); later calls are the statement alone, and their error says when the transaction is
  aborted and must be rolled back. When the conflicting row was
  committed by a concurrent transaction after the statement's snapshot (READ COMMITTED), the CTE
  sees neither row; a second ``SELECT`` (a new snapshot) in the same transaction reads it. At
  REPEATABLE READ / SERIALIZABLE PostgreSQL raises a serialization failure there instead (see
  :func:`~oncely.sql.connections.retryable`): run the transaction again.
* **SQLite**: ``INSERT ... ON CONFLICT (unique) DO NOTHING RETURNING *`` (SQLite >= 3.35), then,
  when it returned nothing, ``SELECT`` in the same transaction (SQLite has one writer at a time,
  so the row it conflicted with is committed and visible).
* **MySQL / MariaDB**: ``INSERT ... [RETURNING *]`` (MariaDB >= 10.5); a duplicate-key error
  (InnoDB rolls back only that statement, never the caller's transaction) is followed by
  ``SELECT ... LOCK IN SHARE MODE`` in the same transaction: a locking read sees the latest
  committed row even at REPEATABLE READ, whose snapshot may predate it. ``INSERT IGNORE`` is
  not used: it would also turn bad data (truncation, NULLs) into warnings.

When the first inserter rolls back or dies, callers that waited on its row may get
:class:`~oncely.errors.DatabaseBusy` (MariaDB's deadlock detector, 1213; PostgreSQL at
REPEATABLE READ): retryable, run the transaction again and it gets the row.

The statement runs in the caller's current transaction (nothing is committed). Errors:
:class:`~oncely.errors.InvalidIdentifier` (a table or column name that is not a plain
identifier), :class:`~oncely.errors.UnknownTable` / :class:`~oncely.errors.UnknownColumn`,
:class:`~oncely.errors.ConfigurationError` when ``unique`` names no unique constraint or a
unique value is missing or NULL (NULLs never conflict, so they cannot identify a row),
:class:`~oncely.errors.ValueRefused` (a ``ValueError``, the driver's error as ``__cause__``)
for a value the database refuses (too long, NULL into ``NOT NULL``, not of the column's type)
or a conflict on another unique key than ``unique``,
:class:`~oncely.errors.TransactionFailed` when the caller's transaction already failed. On
PostgreSQL, an error after a statement failed on the server outside the first-call savepoint
says "PostgreSQL aborted the transaction ...: roll it back": roll back, do not commit (the
commit would drop the transaction's earlier writes without an error).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from oncely.backends.plans import Exec, Plan
from oncely.core.text import sendable
from oncely.errors import ConfigurationError, ValueRefused
from oncely.sql.connections import (
    Result,
    SqlConnection,
    adapt,
    arun,
    busy,
    duplicate_of,
    first_use_guarded,
    missing_object,
    remembered,
    run,
    value_refused,
)

__all__ = ["ainsert_once", "insert_once"]

Row = dict[str, Any]


def insert_once(
    conn: Any, table: str, values: Mapping[str, Any], *, unique: Sequence[str]
) -> tuple[Row, bool]:
    """Insert ``values`` into ``table`` unless a row with the same ``unique`` columns exists;
    return ``(row, created)`` (see the module docstring for the statements per dialect).

    ``conn`` is anything :func:`oncely.sql.connections.adapt` takes (sync face); ``unique``
    names the columns of a unique constraint or primary key, each present in ``values``.
    """
    c = adapt(conn)
    result: tuple[Row, bool] = run(_plan(c, table, values, unique), c)
    return result


async def ainsert_once(
    conn: Any, table: str, values: Mapping[str, Any], *, unique: Sequence[str]
) -> tuple[Row, bool]:
    """The async twin of :func:`insert_once` (psycopg ``AsyncConnection``, aiomysql,
    SQLAlchemy ``AsyncConnection`` / ``AsyncSession``)."""
    c = adapt(conn)
    result: tuple[Row, bool] = await arun(_plan(c, table, values, unique), c)
    return result


def _no_constraint(exc: BaseException) -> bool:
    text = str(exc)
    state = getattr(exc, "sqlstate", None)
    if state == "55000" and "deferrable" in text:  # a deferrable constraint is no arbiter
        return True
    return state == "42P10" or "does not match any PRIMARY KEY or UNIQUE" in text


def _translate(exc: BaseException, table: str, unique: Sequence[str]) -> BaseException:
    transient = busy(exc, f"insert_once into {table}")
    if transient is not exc:
        return transient
    missing = missing_object(exc)
    if missing is not None:
        return missing
    for e in (exc, getattr(exc, "orig", None), exc.__cause__):
        if e is not None and _no_constraint(e):
            return ConfigurationError(_no_unique_message(table, unique))
    what = f"insert_once into {table}"
    refused = value_refused(exc, what)
    if refused is not None:
        return refused
    other = duplicate_of(exc)
    if other is not None:  # ON CONFLICT (unique) covers only that key: another one conflicted
        named = f" {other.constraint!r}" if other.constraint else ""
        return ValueRefused(
            f"{what}: the values conflict with an existing row on another unique key{named} "
            f"than ({', '.join(unique)}) ({other.message.strip()}); nothing was written by "
            "this call. Do not retry it as it is: fix the values"
        )
    return exc


def _no_unique_message(table: str, unique: Sequence[str]) -> str:
    cols = ", ".join(unique)
    return (
        f"{table} has no unique constraint or primary key on exactly ({cols}) (PostgreSQL: a "
        f"non-partial, non-deferrable one): add one (CREATE UNIQUE INDEX ... ON {table} "
        f"({cols})) or pass the columns of an existing one as unique="
    )


def _plan(
    c: SqlConnection, table: str, values: Mapping[str, Any], unique: Sequence[str]
) -> Plan[tuple[Row, bool]]:
    if isinstance(unique, str):
        unique = (unique,)
    if not unique:
        raise ConfigurationError("insert_once needs unique=(columns of a unique constraint)")
    if not values:
        raise ConfigurationError("insert_once needs at least one column value")
    for col in unique:
        if values.get(col) is None:
            raise ConfigurationError(
                f"insert_once: unique column {col!r} needs a non-NULL value in values "
                "(NULLs never conflict, so they cannot identify the row)"
            )
    for col, value in values.items():
        sendable(value, f"insert_once: the value of column {col!r}", ConfigurationError)
    c.check_usable()
    t = c.quote(table)
    cols = list(values)
    names = {col: f"v{i}" for i, col in enumerate(cols)}
    params = {names[col]: values[col] for col in cols}
    col_list = ", ".join(c.quote(col) for col in cols)
    placeholders = ", ".join(f":{names[col]}" for col in cols)
    target = ", ".join(c.quote(col) for col in unique)
    where = " AND ".join(f"{c.quote(col)} = :{names[col]}" for col in unique)
    insert = f"INSERT INTO {t} ({col_list}) VALUES ({placeholders})"
    select = f"SELECT * FROM {t} WHERE {where}"

    if c.dialect == "postgresql":
        # a statement that fails (no arbiter for ON CONFLICT: 42P10, a missing table or
        # column, a refused value) aborts the caller's transaction, and psycopg's commit()
        # of an aborted transaction rolls back without an error. The first call per
        # connection and (table, columns) runs in a savepoint (first_use_guarded, the one
        # guard of every mechanism writing in the caller's transaction); later calls are
        # the one statement below.
        cte = (
            f"WITH ins AS ({insert} ON CONFLICT ({target}) DO NOTHING RETURNING *) "
            "SELECT true AS oncely_created, ins.* FROM ins UNION ALL "
            f"SELECT false, {t}.* FROM {t} WHERE {where} "
            "AND NOT EXISTS (SELECT 1 FROM ins)"
        )
        key = ("insert_once", table, frozenset(cols), frozenset(unique))
        return (
            yield from first_use_guarded(c, key, _typed(_pg(cte, select, params), table, unique))
        )

    def other() -> Plan[tuple[Row, bool] | None]:  # SQLite, MariaDB/MySQL
        if c.dialect == "sqlite":
            returning = " RETURNING *" if c.returning else ""
            for _ in range(5):
                res = yield Exec(f"{insert} ON CONFLICT ({target}) DO NOTHING{returning}", params)
                if res.rows:
                    return _row(res), True
                created = not c.returning and res.rowcount == 1
                res = yield Exec(select, params)
                if res.rows:
                    return _row(res), created
        else:
            # MariaDB/MySQL have no ON CONFLICT target to check the constraint: without a
            # unique index on exactly these columns the INSERT would simply add a second row.
            # Refuse that as PostgreSQL and SQLite do (a schema read, not a decision on data).
            schema, _, name = table.rpartition(".")
            checked = remembered(c.raw)
            # the schema read runs once per connection (connections.remembered), not per call
            if (table, frozenset(col.lower() for col in unique)) not in checked:
                res = yield Exec(
                    "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS "
                    "WHERE TABLE_SCHEMA = COALESCE(:schema, DATABASE()) AND TABLE_NAME = :name "
                    "AND NON_UNIQUE = 0",
                    {"schema": schema or None, "name": name},
                )
                indexes: dict[str, set[str]] = {}
                for index, column in res.rows:
                    indexes.setdefault(str(index), set()).add(str(column).lower())
                if {col.lower() for col in unique} not in indexes.values():
                    yield Exec(f"SELECT 1 FROM {t} WHERE 1 = 0", {})  # a missing table says so
                    raise ConfigurationError(_no_unique_message(table, unique))
                checked.add((table, frozenset(col.lower() for col in unique)))
            returning = " RETURNING *" if c.returning else ""
            for _ in range(5):
                try:
                    res = yield Exec(insert + returning, params)
                except Exception as exc:
                    if duplicate_of(exc) is None:
                        raise
                    res = yield Exec(select + " LOCK IN SHARE MODE", params)
                    if res.rows:
                        return _row(res), False
                    raise  # the duplicate was on another unique key
                if res.rows:
                    return _row(res), True
                res = yield Exec(select, params)
                if res.rows:
                    return _row(res), True
        return None

    return (yield from _typed(other(), table, unique))


def _row(res: Result, skip: int = 0) -> Row:
    return dict(zip(res.columns[skip:], res.rows[0][skip:]))


def _pg(cte: str, select: str, params: dict[str, Any]) -> Plan[tuple[Row, bool] | None]:
    """PostgreSQL: the CTE, and when the conflicting row committed after its snapshot a
    ``SELECT`` (a new snapshot); None when the row kept disappearing (see :func:`_typed`)."""
    for _ in range(5):
        res = yield Exec(cte, params)
        if res.rows:
            return _row(res, 1), bool(res.rows[0][0])
        # the conflicting row committed after this statement's snapshot
        res = yield Exec(select, params)
        if res.rows:
            return _row(res), False
    return None


def _typed(
    plan: Plan[tuple[Row, bool] | None], table: str, unique: Sequence[str]
) -> Plan[tuple[Row, bool]]:
    """Run one dialect's ``plan``: its driver errors typed (:func:`_translate`), and a plan
    that ran out of tries (the conflicting row deleted between every try) a
    :class:`~oncely.errors.ConfigurationError`."""
    try:
        result = yield from plan
    except Exception as exc:
        typed = _translate(exc, table, unique)
        if typed is exc:
            raise
        raise typed from exc
    if result is None:  # pragma: no cover - a row deleted between every try
        raise ConfigurationError(
            f"insert_once on {table}: the conflicting row kept disappearing (deleted concurrently)"
        )
    return result
