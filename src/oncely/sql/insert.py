"""Insert-once (mechanism 1 of DESIGN.md, source §3.1): insert a row unless its unique key is
already there, and either way return *the* row.

``insert_once(conn, "orders", {"order_no": "A-1", "amount": 10}, unique=("order_no",))``
returns ``(row, created)``: ``row`` is a dict of every column of the stored row, ``created``
says whether this call inserted it. A duplicate is never an exception and never a second row.

Per dialect (the trap to avoid: ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` returns nothing
for the conflicting row, and a no-op ``DO UPDATE`` that forces a row back writes a new row
version, bloats the table and fires triggers; oncely never does that):

* **PostgreSQL**: on a connection's first call for a (table, columns) pair, a catalog read
  (``pg_index``) checks that ``ON CONFLICT (unique)`` has an arbiter, so a wrong ``unique=`` or
  a missing table is refused without a failing statement (which would abort the caller's
  transaction, and psycopg's ``commit()`` of an aborted transaction rolls back without an
  error); then, and on every later call, one statement, a CTE: ``WITH ins AS (INSERT ... ON
  CONFLICT (unique) DO NOTHING RETURNING *) SELECT true, ins.* FROM ins UNION ALL SELECT false,
  t.* FROM t WHERE <unique> AND NOT EXISTS (SELECT 1 FROM ins)``. When the conflicting row was
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
:class:`~oncely.errors.TransactionFailed` when the caller's transaction already failed.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from oncely.backends.plans import Exec, Plan
from oncely.core.text import sendable
from oncely.errors import ConfigurationError, UnknownTable
from oncely.sql.connections import (
    Result,
    SqlConnection,
    adapt,
    arun,
    busy,
    duplicate_of,
    missing_object,
    run,
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
    return exc


def _no_unique_message(table: str, unique: Sequence[str]) -> str:
    cols = ", ".join(unique)
    return (
        f"{table} has no unique constraint or primary key on exactly ({cols}) (PostgreSQL: a "
        f"non-partial, non-deferrable one): add one (CREATE UNIQUE INDEX ... ON {table} "
        f"({cols})) or pass the columns of an existing one as unique="
    )


#: PostgreSQL: does the table exist, and has it a unique index ``ON CONFLICT (cols)`` can use
#: as its arbiter (unique, valid, immediate, no predicate, no expression, key columns exactly
#: ``:cols``, sorted and comma-joined; identifiers are plain, so no name holds a comma)?
_PG_ARBITER = (
    "SELECT to_regclass(CAST(:t AS text)) IS NOT NULL, EXISTS (SELECT 1 FROM pg_index i "
    "WHERE i.indrelid = to_regclass(CAST(:t AS text)) AND i.indisunique AND i.indisvalid "
    "AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL AND (SELECT string_agg("
    "CAST(a.attname AS text), ',' ORDER BY CAST(a.attname AS text) COLLATE \"C\") "
    "FROM pg_attribute a WHERE a.attrelid = i.indrelid "
    "AND a.attnum = ANY((CAST(i.indkey AS int2[]))[0:i.indnkeyatts - 1])) = :cols)"
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

    def row(res: Result, skip: int = 0) -> Row:
        return dict(zip(res.columns[skip:], res.rows[0][skip:]))

    try:
        if c.dialect == "postgresql":
            # a failing ON CONFLICT (no unique index on exactly these columns: 42P10) would
            # abort the caller's transaction, and psycopg's commit() of an aborted transaction
            # rolls back without an error: the caller's earlier writes would be silently gone.
            # So the arbiter is looked up in the catalog first, once per connection and
            # (table, columns) like MariaDB's schema read, and refused without a failing
            # statement; later calls are the one statement below.
            key = (table, frozenset(unique))
            checked = _unique_checked(c.raw)
            if key not in checked:
                res = yield Exec(_PG_ARBITER, {"t": t, "cols": ",".join(sorted(set(unique)))})
                present, found = res.rows[0]
                if not present:
                    raise UnknownTable(
                        f"relation {table!r} does not exist: create the table first (or fix its "
                        "name); nothing was sent that fails, the transaction is still usable"
                    )
                if not found:
                    raise ConfigurationError(_no_unique_message(table, unique))
                checked.add(key)
            cte = (
                f"WITH ins AS ({insert} ON CONFLICT ({target}) DO NOTHING RETURNING *) "
                "SELECT true AS oncely_created, ins.* FROM ins UNION ALL "
                f"SELECT false, {t}.* FROM {t} WHERE {where} "
                "AND NOT EXISTS (SELECT 1 FROM ins)"
            )
            for _ in range(5):
                res = yield Exec(cte, params)
                if res.rows:
                    return row(res, 1), bool(res.rows[0][0])
                # the conflicting row committed after this statement's snapshot
                res = yield Exec(select, params)
                if res.rows:
                    return row(res), False
        elif c.dialect == "sqlite":
            returning = " RETURNING *" if c.returning else ""
            for _ in range(5):
                res = yield Exec(f"{insert} ON CONFLICT ({target}) DO NOTHING{returning}", params)
                if res.rows:
                    return row(res), True
                created = not c.returning and res.rowcount == 1
                res = yield Exec(select, params)
                if res.rows:
                    return row(res), created
        else:
            # MariaDB/MySQL have no ON CONFLICT target to check the constraint: without a
            # unique index on exactly these columns the INSERT would simply add a second row.
            # Refuse that as PostgreSQL and SQLite do (a schema read, not a decision on data).
            schema, _, name = table.rpartition(".")
            checked = _unique_checked(c.raw)
            # the schema read runs once per connection (see _UNIQUE_CHECKED), not per call
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
                        return row(res), False
                    raise  # the duplicate was on another unique key
                if res.rows:
                    return row(res), True
                res = yield Exec(select, params)
                if res.rows:
                    return row(res), True
    except Exception as exc:
        typed = _translate(exc, table, unique)
        if typed is exc:
            raise
        raise typed from exc
    raise ConfigurationError(  # pragma: no cover - a row deleted between every try
        f"insert_once on {table}: the conflicting row kept disappearing (deleted concurrently)"
    )


#: Per user connection (weakly held): the (table, unique columns) whose unique index was found,
#: so the MariaDB schema read happens once per connection, not once per insert_once call. Only
#: a found index is remembered; dropping it while the connection lives is an operator's act.
_UNIQUE_CHECKED: weakref.WeakKeyDictionary[Any, set[tuple[str, frozenset[str]]]] = (
    weakref.WeakKeyDictionary()
)


def _owner(raw: Any) -> Any:
    """What a check is remembered on: under an SQLAlchemy ``Connection`` / ``AsyncConnection``
    (a new one per ``engine.connect()`` or ``Session`` transaction) the pooled DB-API
    connection, which outlives them, so a pooled connection is checked once; else ``raw``."""
    if not type(raw).__module__.startswith("sqlalchemy"):
        return raw
    try:
        sync = getattr(raw, "sync_connection", None) or raw
        dbapi = sync.connection.dbapi_connection
    except Exception:
        return raw
    return raw if dbapi is None else dbapi


def _unique_checked(raw: Any) -> set[tuple[str, frozenset[str]]]:
    try:
        return _UNIQUE_CHECKED.setdefault(_owner(raw), set())
    except TypeError:  # an object that takes no weak reference: check every time
        return set()
