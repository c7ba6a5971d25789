"""The table :mod:`oncely.sql` keeps its keys in (transactional idempotency and recovery points).

One row per ``(scope, digest)``: ``digest`` is the SHA-256 of the caller's key, stored as its
32 bytes (a primary key half the size of the hex form)
(:class:`~oncely.core.records.RecordKey`; raw keys are never stored), ``recovery_point`` is
``"finished"`` for a completed operation or the last committed phase of a multi-step one
(brandur's atomic phases, DESIGN.md), ``result`` the stored result (codec bytes),
``operation``/``params`` what the completer needs to re-drive an abandoned operation,
``locked_at`` when a worker took it and ``locked_by`` that worker's random token (the fence a
phase's commit checks), ``created_at``/``updated_at`` epoch seconds on the
database's clock.

The table is created by an explicit :func:`create_tables` (or the statements of :func:`ddl`
in your own migration: Alembic ``op.execute``, Django ``migrations.RunSQL``); oncely never
creates it behind your back. A missing table raises :class:`~oncely.errors.SchemaMissing`
naming this fix.
"""

from __future__ import annotations

from typing import Any, Final

from oncely.backends.plans import Plan
from oncely.core.records import RecordKey
from oncely.errors import SchemaMissing, UnknownTable
from oncely.sql.connections import (
    Dialect,
    SqlConnection,
    adapt,
    arun,
    check_identifier,
    exec_in_block,
    missing_object,
    quote,
    run,
)

__all__ = [
    "DEFAULT_TABLE",
    "FINISHED",
    "acreate_tables",
    "create_tables",
    "ddl",
    "digest_bytes",
    "now_sql",
    "schema_missing",
    "text_of",
]

#: The default table name (``table=`` changes it everywhere).
DEFAULT_TABLE: Final = "oncely_sql_keys"
#: The ``recovery_point`` of a completed operation.
FINISHED: Final = "finished"

_TYPES: Final = {  # text, 32-byte digest, blob, float, table options
    "sqlite": ("TEXT", "BLOB", "BLOB", "REAL", ""),
    "postgresql": ("VARCHAR(255)", "BYTEA", "BYTEA", "DOUBLE PRECISION", ""),
    # VARBINARY: MariaDB/MySQL compare VARCHAR by collation (the default utf8mb4_general_ci
    # folds case, ignores trailing spaces and equates every emoji; utf8mb4_bin still pads), so
    # scopes "Alice"/"alice" would share results; bytes compare byte for byte, no padding.
    # 1020 bytes = 255 utf8mb4 characters.
    "mysql": ("VARBINARY(1020)", "BINARY(32)", "LONGBLOB", "DOUBLE", " ENGINE=InnoDB"),
}


def digest_bytes(key: RecordKey) -> bytes:
    """The stored form of ``key.digest`` (the 32 bytes of the hex SHA-256)."""
    return bytes.fromhex(key.digest)


def text_of(value: Any) -> Any:
    """A text column's value as ``str``: MariaDB/MySQL keep them VARBINARY (byte comparison),
    so drivers return bytes there; None and str pass through."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    return value


def now_sql(dialect: Dialect) -> str:
    """An SQL expression for the database's current time in epoch seconds (a float)."""
    if dialect == "sqlite":
        return "((julianday('now') - 2440587.5) * 86400.0)"
    if dialect == "postgresql":
        return "CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION)"
    return "CAST(UNIX_TIMESTAMP(NOW(6)) AS DOUBLE)"


def ddl(dialect: Dialect, table: str = DEFAULT_TABLE) -> list[str]:
    """The ``CREATE TABLE`` / ``CREATE INDEX`` statements (idempotent: ``IF NOT EXISTS``) for
    ``table`` on ``dialect``; paste them into a migration or run :func:`create_tables`."""
    text, digest, blob, real, engine = _TYPES[dialect]
    t = quote(table, dialect)
    index = quote(table.split(".")[-1] + "_unfinished", dialect)
    point = {"sqlite": "TEXT", "postgresql": "VARCHAR(64)"}.get(dialect, "VARBINARY(256)")
    operation = "VARBINARY(1020)" if dialect == "mysql" else text
    lock = "CHAR(64)" if dialect != "sqlite" else "TEXT"
    rowid = " WITHOUT ROWID" if dialect == "sqlite" else ""  # one B-tree, not two
    statements = [
        f"CREATE TABLE IF NOT EXISTS {t} ("
        f"scope {text} NOT NULL, digest {digest} NOT NULL, recovery_point {point} NOT NULL, "
        f"operation {operation}, params {blob}, result {blob}, locked_at {real}, locked_by {lock}, "
        f"created_at {real} NOT NULL, updated_at {real} NOT NULL, "
        f"PRIMARY KEY (scope, digest)){rowid}{engine}",
    ]
    # The completer's index covers unfinished operations only (a partial index), so the
    # finished rows every transaction() writes never touch it (no hot index page under
    # concurrent inserts). MariaDB has no partial indexes; its secondary entries are ordered
    # by the primary key after the indexed columns, so they spread out instead. The reaper
    # scans (run it off-peak, e.g. hourly).
    if dialect == "mysql":
        # MariaDB takes IF NOT EXISTS on CREATE INDEX (MySQL 8 does not)
        statements.append(
            f"CREATE INDEX IF NOT EXISTS {index} ON {t} (recovery_point, operation, locked_at)"
        )
    else:
        statements.append(
            f"CREATE INDEX IF NOT EXISTS {index} ON {t} (operation, locked_at) "
            f"WHERE recovery_point <> '{FINISHED}'"
        )
    return statements


def _create(c: SqlConnection, table: str) -> Plan[None]:
    check_identifier(table)  # before BEGIN: a bad name is a configuration error, not a DDL one
    yield from exec_in_block(ddl(c.dialect, table), savepoint=False)


def create_tables(conn: Any, table: str = DEFAULT_TABLE) -> None:
    """Create ``table`` (if missing) through ``conn`` and commit (DDL commits implicitly on
    MySQL anyway). ``conn`` is anything :func:`~oncely.sql.connections.adapt` takes."""
    c = adapt(conn)
    run(_create(c, table), c)


async def acreate_tables(conn: Any, table: str = DEFAULT_TABLE) -> None:
    """The async twin of :func:`create_tables`."""
    c = adapt(conn)
    await arun(_create(c, table), c)


def schema_missing(exc: BaseException, table: str) -> BaseException:
    """:class:`~oncely.errors.SchemaMissing` (saying how to create ``table``) when ``exc``
    reports a missing table, else ``exc`` itself (or the typed unknown-column error)."""
    missing = missing_object(exc)
    if missing is None:
        return exc
    if isinstance(missing, UnknownTable):
        return SchemaMissing(
            f"the oncely.sql table {table!r} does not exist: run oncely.sql.create_tables(conn"
            f"{'' if table == DEFAULT_TABLE else f', table={table!r}'}) once, or add the "
            "statements of oncely.sql.schema.ddl(dialect) to your migrations"
        )
    return missing
