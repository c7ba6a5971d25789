"""SQLAlchemy's optimistic locking (``version_id_col``), and a guard for the UPDATEs it skips.

SQLAlchemy's mapper option ``version_id_col`` is optimistic locking done right for the unit of
work: every flush of a changed object runs ``UPDATE … SET …, version = :new WHERE id = :id AND
version = :old`` and raises ``StaleDataError`` when no row matched::

    class Account(Base):
        __tablename__ = "accounts"
        id: Mapped[int] = mapped_column(primary_key=True)
        balance: Mapped[int]
        version: Mapped[int] = mapped_column(nullable=False)
        __mapper_args__ = {"version_id_col": version}

Its known trap (SQLAlchemy's docs, "Configuring a Version Counter": the feature "only applies
to the Session.flush() process"): an ORM-enabled ``update(Account).where(…).values(…)`` and
any Core ``update(accounts_table)`` neither check nor bump the version. The row changes under
the same version, so an object loaded before it still flushes without ``StaleDataError`` and
silently overwrites the bulk change: a lost update. (Checked on SQLAlchemy 2.1: ORM "bulk
UPDATE by primary key" and ``Session.bulk_update_mappings`` do check and bump the version,
and raise a bare ``KeyError`` when a row's mapping leaves it out.)

:func:`guard_versioned` closes the gap for the versioned tables of a declarative base (or of
one mapped class): every UPDATE statement on them that does not move the version column
itself (``version=Account.version``, the column set to itself, does not count: the Django
guard's rule for ``version=F("version")``) is either given ``version = version + 1``
(``on_bulk="bump"``, the default: stale objects then fail their flush, as they should) or
refused with :class:`~oncely.errors.VersionBypass` before it runs (``on_bulk="refuse"``). A
statement may opt out with ``.execution_options(oncely_unversioned=True)``. The guard is an
engine ``before_execute`` hook, so it sees ORM and Core statements, sync and async engines alike.

For a compare-and-set without the ORM, :func:`oncely.sql.versioned_update` takes a SQLAlchemy
``Connection`` or ``Session`` as well. ``StaleDataError`` from a flush counts as a conflict for
:func:`~oncely.optimistic.retry_on_conflict` with ``retry_on=(StaleVersion, StaleDataError)``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

from sqlalchemy import Engine, Integer, event, inspect
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.sql.elements import BindParameter, Cast, ColumnClause, TypeCoerce
from sqlalchemy.sql.schema import Table

from oncely.errors import ConfigurationError, VersionBypass

__all__ = ["OPT_OUT", "guard_versioned", "guarded_tables", "unguard_versioned"]

#: Execution option that lets one statement through unguarded.
OPT_OUT: Final = "oncely_unversioned"

OnBulk = Literal["bump", "refuse"]

# Table -> (version column, what to do); read by the hook on every UPDATE.
_GUARDED: dict[Any, tuple[Any, OnBulk]] = {}
_LOCK = threading.Lock()
_INSTALLED = False


def _mappers(target: Any) -> list[Mapper[Any]]:
    registry = getattr(target, "registry", None)
    if isinstance(target, Mapper):
        return [target]
    if isinstance(target, type) and registry is not None and hasattr(target, "__mapper__"):
        return [target.__mapper__]  # one mapped class
    if registry is not None and hasattr(registry, "mappers"):
        return list(registry.mappers)  # a declarative base
    try:
        found = inspect(target)
    except Exception:
        found = None
    if isinstance(found, Mapper):
        return [found]
    raise ConfigurationError(
        f"guard_versioned needs a declarative base, a mapped class or a Mapper, not {target!r}"
    )


def _counts(mapper: Mapper[Any], column: Any) -> bool:
    """True when the version is SQLAlchemy's integer counter (so ``+ 1`` is the right bump)."""
    gen: Any = mapper.version_id_generator
    if not callable(gen) or not isinstance(column.type, Integer):
        return False
    try:
        return bool(gen(41) == 42 and gen(None) == 1)
    except Exception:
        return False


def guard_versioned(target: Any, *, on_bulk: OnBulk = "bump") -> list[Table[Any]]:
    """Guard the versioned tables of ``target`` (a declarative base: all its mapped classes with
    ``version_id_col``; a mapped class; a ``Mapper``) against UPDATE statements that skip the
    version: ``on_bulk="bump"`` adds ``version = version + 1`` to them, ``"refuse"`` raises
    :class:`~oncely.errors.VersionBypass` before they run. Call it once the classes are
    declared; calling again updates the setting. Returns the guarded tables.

    Tables whose version is not SQLAlchemy's integer counter (``version_id_generator=False``
    or a custom generator) are always refused: oncely cannot compute their next version.

    :raises ConfigurationError: ``target`` has no versioned mapper, or a bad ``on_bulk``.
    """
    global _INSTALLED
    if on_bulk not in ("bump", "refuse"):
        raise ConfigurationError(f"on_bulk must be 'bump' or 'refuse', not {on_bulk!r}")
    found: list[tuple[Any, Any, OnBulk]] = []
    for mapper in _mappers(target):
        column = mapper.version_id_col
        table = mapper.local_table
        if column is None or not isinstance(table, Table):
            continue
        mode: OnBulk = on_bulk if _counts(mapper, column) else "refuse"
        found.append((table, column, mode))
    if not found:
        raise ConfigurationError(
            f"{target!r} maps no class with version_id_col; add "
            '__mapper_args__ = {"version_id_col": version} to the versioned classes first'
        )
    with _LOCK:
        for table, column, mode in found:
            _GUARDED[table] = (column, mode)
        if not _INSTALLED:
            event.listen(Engine, "before_execute", _before_execute, retval=True)
            _INSTALLED = True
    return [t for t, _, _ in found]


def unguard_versioned(target: Any) -> None:
    """Stop guarding the versioned tables of ``target``."""
    with _LOCK:
        for mapper in _mappers(target):
            _GUARDED.pop(mapper.local_table, None)


def guarded_tables() -> dict[str, OnBulk]:
    """``{table name: "bump" | "refuse"}`` of every guarded table (for checks and logs)."""
    return {t.fullname: mode for t, (_, mode) in _GUARDED.items()}


def _keys(mapping: Any) -> Iterable[str]:
    if isinstance(mapping, Mapping):
        for key in mapping:
            if isinstance(key, str):
                yield key
            else:
                yield str(getattr(key, "key", None) or getattr(key, "name", ""))


def _unmoved(value: Any, column: Any) -> bool:
    """``version=Account.version`` (or ``table.c.version``, ``column("version")``, one of them
    labelled, cast or in parentheses): "sets the version itself" to what it is, so it does not
    move and an object loaded before could flush over the change. The rule of the Django guard
    for ``version=F("version")``: it does not count as setting the version."""
    for _ in range(8):
        element = getattr(value, "__clause_element__", None)
        if element is not None:
            value = element()
        inner = getattr(value, "element", None)  # Label, Grouping
        if inner is None and isinstance(value, (Cast, TypeCoerce)):
            inner = value.clause
        if inner is None or isinstance(value, BindParameter):
            break
        value = inner
    if not isinstance(value, ColumnClause) or value.name != column.name:
        return False
    table = getattr(value, "table", None)
    return table is None or table is column.table


def _version_value(stmt: Update, column: Any) -> tuple[bool, Any]:
    """Whether ``stmt.values(...)`` names the version column, and the key it is under."""
    names = {column.key, column.name}
    for key in getattr(stmt, "_values", None) or {}:  # .values(...) of the statement
        if names.intersection(_keys({key: None})):
            return True, key
    return False, None


def _sets_version(stmt: Update, column: Any, multiparams: Any, params: Any) -> bool:
    names = {column.key, column.name}
    named, key = _version_value(stmt, column)
    if named:
        return not _unmoved((stmt._values or {})[key], column)
    if names.intersection(_keys(params)):
        return True
    rows = multiparams if isinstance(multiparams, (list, tuple)) else [multiparams]
    dicts = [r for r in rows if isinstance(r, Mapping)]
    return bool(dicts) and all(names.intersection(_keys(r)) for r in dicts)


def _upsert_sets(stmt: Any) -> list[str] | None:
    """The columns an upsert's conflict clause sets (PostgreSQL/SQLite ``on_conflict_do_update``,
    MySQL/MariaDB ``on_duplicate_key_update``), or None for a plain INSERT / DO NOTHING."""
    clause = getattr(stmt, "_post_values_clause", None)
    if clause is None:
        return None
    pairs = getattr(clause, "update_values_to_set", None)  # OnConflictDoUpdate
    if pairs is not None:
        keys = [pair[0] for pair in pairs]
    else:
        update = getattr(clause, "update", None)  # MySQL OnDuplicateClause
        if update is None:
            return None  # on_conflict_do_nothing
        keys = list(update) if isinstance(update, Mapping) else [pair[0] for pair in update]
    return [
        k if isinstance(k, str) else str(getattr(k, "key", None) or getattr(k, "name", ""))
        for k in keys
    ]


def _check_upsert(stmt: Any, execution_options: Any) -> None:
    guarded = _GUARDED.get(stmt.table)
    if guarded is None:
        return
    if (execution_options or {}).get(OPT_OUT) or stmt.get_execution_options().get(OPT_OUT):
        return
    sets = _upsert_sets(stmt)
    column, _ = guarded
    if sets is None or {column.key, column.name}.intersection(sets):
        return
    raise VersionBypass(
        f"this upsert of {stmt.table.fullname!r} updates existing rows without setting their "
        f"version column {column.key!r}, so it skips optimistic locking (an object loaded "
        f"before would then overwrite it); add {column.key}={stmt.table.name}.c.{column.key} + 1 "
        f"to its set_ (on_conflict_do_update / on_duplicate_key_update), or pass "
        f".execution_options({OPT_OUT}=True) if you mean it"
    )


def _before_execute(
    conn: Any, clauseelement: Any, multiparams: Any, params: Any, execution_options: Any
) -> tuple[Any, Any, Any]:
    if _GUARDED and isinstance(clauseelement, Insert):
        _check_upsert(clauseelement, execution_options)
        return clauseelement, multiparams, params
    if not _GUARDED or not isinstance(clauseelement, Update):
        return clauseelement, multiparams, params
    guarded = _GUARDED.get(clauseelement.table)
    if guarded is None:
        return clauseelement, multiparams, params
    if (execution_options or {}).get(OPT_OUT) or clauseelement.get_execution_options().get(OPT_OUT):
        return clauseelement, multiparams, params
    column, mode = guarded
    if _sets_version(clauseelement, column, multiparams, params):
        return clauseelement, multiparams, params
    table: Any = clauseelement.table
    if mode == "refuse":
        raise VersionBypass(
            f"this UPDATE of {table.fullname!r} does not move its version column "
            f"{column.key!r} ({column.key}={column.key} does not count), so it skips "
            "optimistic locking (a stale object could then "
            f"overwrite it); add .values({column.key}={column.key} + 1), update through the "
            f"ORM unit of work, or pass .execution_options({OPT_OUT}=True) if you mean it"
        )
    named, key = _version_value(clauseelement, column)  # version=version: bump it instead
    bumped = clauseelement.values({key if named else column: column + 1})
    return bumped, multiparams, params
