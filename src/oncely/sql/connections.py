"""What the user holds, as one small uniform connection: run one statement with parameters in
the caller's current transaction and read rows back.

:func:`adapt` takes

* a DB-API connection: :mod:`sqlite3`, psycopg 3 (``psycopg.Connection`` and
  ``psycopg.AsyncConnection``), PyMySQL and aiomysql;
* a SQLAlchemy ``Connection``, ``Session``, ``AsyncConnection`` or ``AsyncSession`` (an
  ``Engine`` is refused: it holds no transaction, so there is nothing to join);
* Django's ``django.db.connection`` or ``django.db.connections[alias]``;

and returns a :class:`SqlConnection` that knows the :data:`Dialect` (``"sqlite"``,
``"postgresql"``, ``"mysql"`` for MySQL and MariaDB), the server version, whether
``RETURNING`` is available (SQLite >= 3.35, MariaDB >= 10.5, PostgreSQL), and whether a
transaction is open or failed.

The mechanisms of :mod:`oncely.sql` are sans-IO plans (:mod:`oncely.backends.plans`): they
yield :class:`~oncely.backends.plans.Exec` requests whose ``statement`` is the text with
``:name`` placeholders (or a mapping dialect -> text, see :func:`statement_for`) plus
:class:`Enter` / :class:`Leave` for transaction blocks, and :func:`run` / :func:`arun` carry
them out on a sync or an async connection. Other mechanisms ask "run this statement text per
dialect" the same way, without knowing the driver::

    conn = adapt(user_conn)
    rows = conn.execute({"postgresql": "SELECT now()", "sqlite": "SELECT unixepoch()"}, {}).rows

Errors: :func:`duplicate_of` recognises a unique violation from every driver above (also for
users who insert themselves); :func:`retryable` a serialization failure, a deadlock or
SQLite's "database is locked" (the transaction must be run again from the start);
:func:`lock_timeout` a lock wait that ran out; :func:`busy` turns either into the typed
:class:`~oncely.errors.DatabaseBusy`.
"""

from __future__ import annotations

import builtins
import contextlib
import re
import sqlite3
import sys
import uuid
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Literal, NamedTuple, TypeVar

from oncely.backends.plans import Exec, Plan
from oncely.backends.plans import arun as arun_plan
from oncely.backends.plans import run as run_plan
from oncely.core.cancelsafe import akept_pipeline, cleanup, kept_pipeline
from oncely.core.text import sendable
from oncely.errors import (
    AutocommitConnection,
    ConfigurationError,
    DatabaseBusy,
    InvalidIdentifier,
    OncelyError,
    StoreUnavailable,
    TransactionFailed,
    TransactionLost,
    UnknownColumn,
    UnknownTable,
    UnsupportedConnection,
    ValueRefused,
)

__all__ = [
    "ABORTED_NOTE",
    "DIALECTS",
    "KEPT_NOTE",
    "USABLE_NOTE",
    "WRITTEN_BY_THIS_TRANSACTION",
    "Dialect",
    "Duplicate",
    "Enter",
    "ExecLeave",
    "Leave",
    "Result",
    "SqlConnection",
    "Text",
    "aborted_noted",
    "adapt",
    "arun",
    "busy",
    "check_identifier",
    "cleanup",
    "commit_if_held",
    "duplicate_of",
    "exact_text",
    "exec_in_block",
    "first_use_guarded",
    "leave_or_lost",
    "leave_usable",
    "lock_timeout",
    "lost_message",
    "missing_object",
    "noted",
    "other_key",
    "quote",
    "refused_value",
    "remembered",
    "render",
    "retryable",
    "roll_back",
    "row_gone",
    "run",
    "savepoint_gone",
    "savepoint_lost",
    "statement_for",
    "statement_timeout",
    "transaction_noted",
    "unconvertible",
    "undecided",
    "value_refused",
]

Dialect = Literal["sqlite", "postgresql", "mysql"]
DIALECTS: Final[tuple[Dialect, ...]] = ("sqlite", "postgresql", "mysql")

#: A statement: the text with ``:name`` placeholders, or one text per dialect.
Text = str | Mapping[str, str]

Paramstyle = Literal["named", "pyformat", "format"]


@dataclass(frozen=True, slots=True)
class Result:
    """What one statement gave back: ``rows`` (tuples, column order of the statement),
    ``rowcount`` (rows written, -1 when the driver does not say), ``columns`` (names),
    ``lastrowid`` (the id the statement's ``INSERT`` generated, as the driver's cursor says it
    with no statement of its own: sqlite3, PyMySQL, aiomysql, SQLAlchemy and Django on those;
    None where the driver has none, as psycopg, or for a statement that returns rows)."""

    rows: list[tuple[Any, ...]]
    rowcount: int
    columns: tuple[str, ...]
    lastrowid: int | None = None


class Enter(NamedTuple):
    """Request: open a transaction block. If no transaction is open, one is begun (SQLite:
    ``BEGIN IMMEDIATE``) and the block *owns* it; otherwise the block is a savepoint inside the
    caller's transaction. The reply is a block handle for :class:`Leave`.

    ``held``: the block will be closed by :func:`commit_if_held` (user code runs inside it).
    An owned block is then begun so that its end can tell, in the statement that commits,
    whether it is still the same transaction (see :func:`commit_if_held`): sqlite3 begins it
    with ``SAVEPOINT <name>`` (a deferred transaction: every held block writes first, which
    takes the write lock, waiting for it as ``BEGIN IMMEDIATE`` would), PyMySQL and aiomysql
    on MariaDB with ``BEGIN NOT ATOMIC START TRANSACTION; SAVEPOINT <name>; END`` (one
    statement, as ``BEGIN`` is), SQLAlchemy on SQLite with ``SAVEPOINT <name>`` in place of
    pysqlite's implicit ``BEGIN``. Other connections ignore it."""

    savepoint: bool = True
    held: bool = False
    #: MySQL/MariaDB: a transaction the block begins runs at READ COMMITTED (see
    #: :meth:`SqlConnection.enter_read_committed`); ignored on other databases and when the
    #: block joins a transaction already open.
    read_committed: bool = False


#: MySQL/MariaDB: the next transaction of the session runs at READ COMMITTED (sent outside a
#: transaction; it applies to that one transaction only).
READ_COMMITTED_NEXT: Final = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED"


class Leave(NamedTuple):
    """Request: close ``block``; ``commit`` True commits (or releases the savepoint), False
    rolls back (to the savepoint). The reply is ``None``."""

    block: Any
    commit: bool


class ExecLeave(NamedTuple):
    """Request: run one statement, then close ``block`` committing (what ends a block that
    writes its result last). On PostgreSQL with psycopg both go in one pipeline: one round
    trip. If either fails the block is rolled back and the error raised. Reply: the
    statement's :class:`Result`."""

    block: Any
    statement: Text
    params: Mapping[str, Any]


@dataclass(slots=True)
class Block:
    """An open block: ``owned`` when it began the transaction, else a savepoint named ``name``
    (``handle`` is what the driver needs to close it: a Django ``atomic`` or SQLAlchemy
    transaction object). ``held``: the name of the savepoint an owned block was begun with
    (``Enter(held=True)``), whose ``RELEASE`` fails once the transaction has ended."""

    owned: bool
    name: str | None = None
    handle: Any = None
    held: str | None = None


# -- clean-up while an error propagates ----------------------------------------------------------
def roll_back(block: Block, exc: BaseException | None) -> Plan[None]:
    """Roll ``block`` back while ``exc`` propagates (``yield from roll_back(block, exc)``, then
    ``raise``): a failing rollback never replaces a cancellation or an interrupt (see
    :class:`cleanup`). A sqlite3, psycopg, PyMySQL or aiomysql connection whose rollback of a
    block it owns failed is closed by its ``leave``, so it cannot commit later writes
    (SQLAlchemy invalidates such a connection itself, Django closes it)."""
    with cleanup(exc):
        yield Leave(block, False)


def exec_in_block(statements: Sequence[str], *, savepoint: bool = True) -> Plan[None]:
    """Run ``statements`` (no parameters: DDL) in one block and commit it; on any error the
    block is rolled back through :func:`roll_back` and the error raised. ``savepoint``: that of
    the block's :class:`Enter`."""
    block = yield Enter(savepoint=savepoint)
    try:
        for statement in statements:
            yield Exec(statement, {})
    except BaseException as exc:
        yield from roll_back(block, exc)
        raise
    yield Leave(block, True)


# -- identifiers and placeholders --------------------------------------------------------------
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


def check_identifier(name: object, param: str = "table") -> str:
    """``name`` if it is a plain SQL identifier, optionally ``schema.table`` (the rule of
    :func:`quote`), checked when a table is configured rather than at the first statement.

    :param param: the argument's name, for the message.
    :raises InvalidIdentifier: not a str, or not such an identifier; the message names
        ``param``.
    """
    parts = name.split(".") if isinstance(name, str) else []
    if not parts or len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise InvalidIdentifier(
            f"{param}={name!r} is not a plain SQL identifier: use letters, digits and '_' (at "
            "most 63, not starting with a digit), optionally 'schema.table'"
        )
    assert isinstance(name, str)
    return name


@lru_cache(maxsize=4096)
def quote(name: str, dialect: Dialect) -> str:
    """``name`` (``table`` or ``schema.table``) quoted for ``dialect``: each part must be a
    plain SQL identifier (letters, digits, ``_``, ``$``; at most 63 characters, PostgreSQL's
    limit), else :class:`~oncely.errors.InvalidIdentifier`. Quoting keeps reserved words
    usable; validating keeps SQL out of table and column names."""
    if not isinstance(name, str):
        raise InvalidIdentifier(f"an SQL identifier must be a str, not {type(name).__name__}")
    parts = name.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise InvalidIdentifier(
            f"{name!r} is not a plain SQL identifier: use letters, digits and '_' (at most 63, "
            "not starting with a digit), optionally 'schema.table'"
        )
    q = "`" if dialect == "mysql" else '"'
    return ".".join(f"{q}{p}{q}" for p in parts)


def exact_text(dialect: Dialect, chars: int) -> str:
    """The column type of an identity compared byte for byte (a gid, an idempotency key, an
    entity id): ``VARCHAR(chars)`` on PostgreSQL and SQLite (binary comparison by default),
    ``VARBINARY(4 * chars)`` on MariaDB/MySQL, whose default collations are case- and
    accent-insensitive and ``PAD SPACE`` (``utf8mb4_bin`` included), so ``'Key'``, ``'key'``
    and ``'key '`` would be one row. Values are sent as str (utf-8) and read back as bytes."""
    return f"VARBINARY({4 * chars})" if dialect == "mysql" else f"VARCHAR({chars})"


# A quoted string or identifier (kept as is), or a ``:name`` placeholder (not ``::`` casts).
_TOKEN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|(?<![:\w]):([A-Za-z_]\w*)""")


@lru_cache(maxsize=1024)
def _render(text: str, style: Paramstyle) -> tuple[str, tuple[str, ...]]:
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0) if style == "named" else m.group(0).replace("%", "%%")
        names.append(name)
        if style == "named":
            return m.group(0)
        return f"%({name})s" if style == "pyformat" else "%s"

    out = []
    pos = 0
    for m in _TOKEN.finditer(text):
        plain = text[pos : m.start()]
        out.append(plain if style == "named" else plain.replace("%", "%%"))
        out.append(sub(m))
        pos = m.end()
    tail = text[pos:]
    out.append(tail if style == "named" else tail.replace("%", "%%"))
    return "".join(out), tuple(names)


def render(text: str, params: Mapping[str, Any], style: Paramstyle) -> tuple[str, Any]:
    """``text`` with ``:name`` placeholders in the driver's ``style``: ``named`` (sqlite3,
    SQLAlchemy ``text()``), ``pyformat`` (``%(name)s``: psycopg, PyMySQL), ``format``
    (``%s`` with a list: Django's cursors). Returns (text, parameters).

    :raises ConfigurationError: a ``str`` parameter holds a lone surrogate (no driver can
        encode it; checked here, before anything is sent, for every statement oncely runs on
        a caller's connection)."""
    for name, value in params.items():
        sendable(value, f"a text value sent to the database (:{name})", ConfigurationError)
    out, names = _render(text, style)
    if style == "format":
        return out, [params[n] for n in names]
    return out, params


def statement_for(text: Text, dialect: Dialect) -> str:
    """The text of ``text`` for ``dialect`` (a plain str is every dialect's)."""
    if isinstance(text, str):
        return text
    try:
        return text[dialect]
    except KeyError:
        raise ConfigurationError(
            f"this statement has no form for {dialect} (it has {sorted(text)})"
        ) from None


# -- errors -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Duplicate:
    """A unique violation: ``constraint`` is the index or constraint name when the driver says
    (PostgreSQL, MySQL), else None; ``message`` is the driver's."""

    constraint: str | None
    message: str


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen) or len(seen) > 8:
            continue
        seen.append(e)
        todo.extend([getattr(e, "orig", None), e.__cause__, e.__context__])
    return seen


def _translated(e: BaseException) -> BaseException | None:
    """The driver's error ``e`` is a translation of, or None when ``e`` translates none:
    oncely's own (an :class:`~oncely.errors.OncelyError` raised ``from`` the driver's error),
    SQLAlchemy's database-error wrappers (:class:`sqlalchemy.exc.DBAPIError` and, SQLAlchemy
    2.1, ``EmulatedDBAPIException``, which keep it as ``orig``) and Django's
    (``django.db.utils.Error`` and its ``DatabaseError`` family, raised ``from`` it by Django's
    ``DatabaseErrorWrapper``). Any other class, also one of these frameworks' (Django's
    ``ValidationError``, SQLAlchemy's ``NoResultFound``), is a caller's error that a busy
    error it was raised ``from`` does not make busy."""
    if isinstance(e, OncelyError):
        orig = getattr(e, "orig", None)
        return orig if isinstance(orig, BaseException) else e.__cause__
    sa = sys.modules.get("sqlalchemy.exc")
    if sa is not None:
        wrappers = (sa.DBAPIError, getattr(sa, "EmulatedDBAPIException", sa.DBAPIError))
        if isinstance(e, wrappers):
            orig = getattr(e, "orig", None)
            return orig if isinstance(orig, BaseException) else None
    dj = sys.modules.get("django.db.utils")
    if dj is not None and isinstance(e, dj.Error):
        cause: BaseException | None = e.__cause__
        return cause
    return None


def _own_causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it translates, for the busy classification (:func:`retryable`,
    :func:`lock_timeout`, :func:`statement_timeout`): the error itself, and the driver's error
    it translates where ``exc`` is oncely's own translation or a framework's database-error
    wrapper (:func:`_translated`). Never ``__context__``: an error raised while handling a busy
    error (a NOT NULL violation, a UNIQUE conflict, a handler's business error) is that error,
    not the busy one; and never the ``__cause__`` of another class, also one of Django's or
    SQLAlchemy's: a caller's own error raised ``from`` a lock error is the caller's."""
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(seen) <= 8 and not any(e is s for s in seen):
        seen.append(e)
        e = _translated(e)
    return seen


def _mysql_code(e: BaseException) -> int | None:
    if type(e).__module__.split(".")[0] in ("pymysql", "aiomysql", "MySQLdb") and e.args:
        code = e.args[0]
        return code if isinstance(code, int) else None
    return None


_MYSQL_KEY = re.compile(r"for key '([^']+)'")


def duplicate_of(exc: BaseException) -> Duplicate | None:
    """The unique violation ``exc`` reports, or None if it is something else.

    Recognised: sqlite3 (``SQLITE_CONSTRAINT_UNIQUE`` / ``_PRIMARYKEY``), psycopg 3 and
    psycopg2 (SQLSTATE 23505), PyMySQL / aiomysql / mysqlclient (errors 1062 and 1586), also
    wrapped by SQLAlchemy (``exc.orig``) or Django (``__cause__``). Use it where you insert
    yourself::

        try:
            cur.execute("INSERT INTO orders ...")
        except Exception as exc:
            if (dup := duplicate_of(exc)) is None:
                raise
            ...  # already done: read the existing row
    """
    for e in _causes(exc):
        if isinstance(e, sqlite3.IntegrityError):
            name = getattr(e, "sqlite_errorname", "")
            text = str(e)
            if name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY") or (
                text.startswith("UNIQUE constraint failed")
            ):
                return Duplicate(None, text)
            continue
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if state == "23505":
            diag = getattr(e, "diag", None)
            return Duplicate(getattr(diag, "constraint_name", None), str(e))
        code = _mysql_code(e)
        if code in (1062, 1586):
            m = _MYSQL_KEY.search(str(e.args[1]) if len(e.args) > 1 else "")
            return Duplicate(m.group(1) if m else None, str(e))
    return None


def _sqlite_busy(e: BaseException) -> bool:
    """sqlite3's ``SQLITE_BUSY`` / ``SQLITE_LOCKED`` (extended codes included)."""
    if not isinstance(e, sqlite3.OperationalError):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
    text = str(e)
    return "database is locked" in text or "database table is locked" in text


def _typed(e: BaseException) -> bool:
    """An oncely error that already says what happened (its cause is not re-read), except
    :class:`~oncely.errors.DatabaseBusy`, which is the typed "run it again"."""
    return isinstance(e, OncelyError) and not isinstance(e, DatabaseBusy)


def retryable(exc: BaseException) -> bool:
    """True when the whole transaction should be run again from its start: a serialization
    failure or a deadlock (PostgreSQL 40001 / 40P01; MySQL 1213, MariaDB 1020 "record has
    changed"), SQLite's ``SQLITE_BUSY`` / ``SQLITE_LOCKED`` ("database is locked": SQLite has
    no deadlock detection, a writer that cannot get the lock within ``timeout`` gets this),
    and :class:`~oncely.errors.DatabaseBusy`, oncely's typed form of all of these.

    A lock wait that ran out on PostgreSQL (55P03 ``lock_not_available``) or MySQL/MariaDB
    (1205) is :func:`lock_timeout`, not retryable: another transaction holds the row, and
    running again at once usually waits again (oncely's claim answers it as in flight).
    Another oncely error is never retryable, whatever its cause (it already says what to do).
    """
    if _typed(exc):
        return False
    for e in _own_causes(exc):
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if state in ("40001", "40P01"):
            return True
        if _mysql_code(e) in (1213, 1020):
            return True
        if _sqlite_busy(e):
            return True
        if isinstance(e, DatabaseBusy):
            return True
    return False


#: PostgreSQL: true for a row the current transaction wrote (its ``xmin`` is this transaction's
#: id; ``txid_current_if_assigned()`` is NULL, so false, in a transaction that wrote nothing).
#: ``SELECT 1 / count(*) ... AND`` this fails with a division by zero (:func:`row_gone`) when a
#: row oncely inserted is no longer in the open transaction: user code committed or rolled
#: back under it. Sent with the ``COMMIT`` (:class:`ExecLeave`), a commit never follows it.
WRITTEN_BY_THIS_TRANSACTION: Final = "xmin::text::bigint = txid_current_if_assigned() % 4294967296"


def row_gone(exc: BaseException) -> bool:
    """True when ``exc`` is PostgreSQL's division by zero (SQLSTATE 22012), what a check built
    on :data:`WRITTEN_BY_THIS_TRANSACTION` raises when the row is not in the transaction."""
    return any(
        "22012" in (getattr(e, "sqlstate", None), getattr(e, "pgcode", None)) for e in _causes(exc)
    )


def savepoint_gone(exc: BaseException) -> bool:
    """True when ``exc`` says a savepoint does not exist (SQLite "no such savepoint", MySQL
    and MariaDB error 1305 ``SAVEPOINT ... does not exist``, PostgreSQL 3B001
    ``InvalidSavepointSpecification`` or 25P01 ``NoActiveSqlTransaction``), also wrapped by
    SQLAlchemy (``exc.orig``) or Django (``__cause__``), or that the SQLAlchemy transaction
    object of the block was ended under it (``Connection.rollback()`` / ``commit()`` or
    ``Session.rollback()`` / ``commit()`` inside it: closing it then raises
    ``InvalidRequestError`` "This nested transaction is inactive" or ``ResourceClosedError``
    "This transaction is closed"): the transaction that made it has ended. The one
    classifier of every connection's leave path (see :func:`savepoint_lost`)."""
    for e in _causes(exc):
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if state in ("3B001", "25P01"):
            return True
        if isinstance(e, sqlite3.OperationalError) and str(e).startswith("no such savepoint"):
            return True
        if _mysql_code(e) == 1305 and "SAVEPOINT" in str(e).upper():
            return True
        if isinstance(e, _SavepointEnded) or _sa_transaction_ended(e):
            return True
    return False


class _SavepointEnded(Exception):
    """Raised by a leave path that sees, without asking the database, that the transaction
    object of its savepoint was ended under it (SQLAlchemy: it is no longer the connection's
    or session's nested transaction after the code's ``rollback()`` / ``commit()``)."""


def _sa_transaction_ended(e: BaseException) -> bool:
    """SQLAlchemy refusing to close a transaction object that is no longer active (exactly
    the two errors its ``Transaction`` / ``SessionTransaction`` raise for that; not
    ``PendingRollbackError``, a failed flush, which is :class:`~oncely.errors.TransactionFailed`
    territory)."""
    if type(e).__module__ != "sqlalchemy.exc":
        return False
    name, text = type(e).__name__, str(e)
    if name == "ResourceClosedError":
        return text.startswith("This transaction is closed")
    return name == "InvalidRequestError" and text.startswith(
        ("This transaction is inactive", "This nested transaction is inactive")
    )


def _held_begin(c: SqlConnection, name: str) -> str | None:
    """The statement that begins an owned held block (:class:`Enter` ``held``) on ``c``'s
    dialect, or None where there is none (PostgreSQL needs none; MySQL has no compound
    statement outside a stored program)."""
    if c.dialect == "sqlite":
        return f"SAVEPOINT {name}"
    if c.dialect == "mysql" and c.mariadb and c.version >= (10, 1, 1):
        return f"BEGIN NOT ATOMIC START TRANSACTION; SAVEPOINT {name}; END"
    return None


def _held_commit(dialect: Dialect, name: str) -> str:
    if dialect == "sqlite":  # releasing the outermost savepoint commits the transaction
        return f"RELEASE SAVEPOINT {name}"
    return f"BEGIN NOT ATOMIC RELEASE SAVEPOINT {name}; COMMIT; END"


def commit_if_held(
    c: SqlConnection,
    block: Block,
    table: str,
    where: str,
    params: Mapping[str, Any],
    lost: str,
) -> Plan[None]:
    """Close ``block`` committing, but if it owns its transaction only when that transaction
    is still the one the block began, holding the row of ``table`` (quoted) matching ``where``
    (``:name`` placeholders from ``params``) that oncely wrote in it before running user code.
    User code that called ``conn.rollback()`` or ``conn.commit()`` took the row out: committing
    its later writes would apply them without the row, and every retry would apply them again.

    The check costs no statement of its own except where the last item says:

    * an owned block begun with ``Enter(held=True)`` on SQLite (sqlite3, and pysqlite or
      aiosqlite under SQLAlchemy, where the savepoint takes the place of the driver's implicit
      ``BEGIN``) and on MariaDB with PyMySQL or aiomysql: ``RELEASE SAVEPOINT <name>`` of the
      savepoint the block began with is the check and the commit (SQLite: releasing the
      outermost savepoint commits, and the driver's ``commit()`` then has nothing to send;
      MariaDB: ``BEGIN NOT ATOMIC RELEASE SAVEPOINT <name>; COMMIT; END``, one statement). A
      rollback, a commit, an implicit commit (DDL, a ``BEGIN``) all drop the savepoint, so the
      release fails whatever rows other transactions committed meanwhile;
    * PostgreSQL: one ``SELECT 1 / count(*) ... AND`` :data:`WRITTEN_BY_THIS_TRANSACTION` sent
      with the ``COMMIT`` (:class:`ExecLeave`, one pipeline with psycopg); it fails unless the
      row exists and this transaction wrote it (SQLAlchemy and Django over psycopg 3 too: the
      pipeline runs on the driver's connection; with psycopg2 / asyncpg under SQLAlchemy the
      check and the ``COMMIT`` are two round trips);
    * SQLite through Django, MariaDB/MySQL through SQLAlchemy or Django, MySQL (no compound
      statements), a block not begun held: ``SELECT count(*)`` then the commit, one statement
      more. Django's ``atomic()`` sends ``BEGIN`` itself on SQLite, and SQLAlchemy and Django
      send the ``COMMIT`` themselves on MariaDB (a savepoint there would be a statement of its
      own too, as costly as the ``SELECT``); MySQL cannot put the check and the ``COMMIT`` in
      one statement (multi-statements are off in PyMySQL and aiomysql unless the user's
      connection turns them on). No transaction id to compare: a concurrent transaction that
      committed the same row in between is taken for ours, unless ``where`` names a row only
      this transaction can have written (the state machine uses its history row's id).
      ``benchmarks/held_check.py`` measures what the ``SELECT`` costs: on SQLite a few
      microseconds (within the noise of a commit), on MariaDB a round trip.

    A savepoint block (the caller's transaction) is released as is: releasing a savepoint a
    rollback removed fails in the database.

    :raises TransactionLost: the row is gone (``lost`` is the message); what was still open
        is rolled back, nothing is committed.
    :raises TransactionFailed: a statement inside failed and the code caught the error
        (PostgreSQL aborts the transaction: ``25P02`` on anything but a rollback); the block is
        rolled back (a savepoint block: the caller's transaction is usable again).
    """
    yield from leave_usable(c, block, commit=False)
    if not block.owned:
        yield Leave(block, True)
        return
    if block.held is not None:
        try:
            yield Exec(_held_commit(c.dialect, block.held), {})
        except Exception as exc:
            yield Leave(block, False)  # what user code opened after it ended ours
            if savepoint_gone(exc):
                raise TransactionLost(lost) from exc
            raise
        if c.dialect == "sqlite":  # sqlite3 sends no COMMIT with no transaction open; this
            yield Leave(block, True)  # closes SQLAlchemy's (or commits after a "begin" event)
        return
    if c.dialect == "postgresql":
        check = f"SELECT 1 / count(*) FROM {table} WHERE {where} AND {WRITTEN_BY_THIS_TRANSACTION}"
        try:
            yield ExecLeave(block, check, params)
        except Exception as exc:
            if row_gone(exc):
                raise TransactionLost(lost) from exc
            raise
        return
    found = yield Exec(f"SELECT count(*) FROM {table} WHERE {where}", dict(params))
    if not (found.rows and found.rows[0][0]):
        yield Leave(block, False)
        raise TransactionLost(lost)
    yield from leave_or_lost(block, lost)


def leave_or_lost(block: Block, lost: str) -> Plan[None]:
    """Commit ``block``, a block that owns its transaction; if the code inside ended that
    transaction (SQLAlchemy refuses to commit a closed or inactive one: the code called
    ``commit()`` or ``rollback()``), roll back what it began since and raise
    :class:`~oncely.errors.TransactionLost` with ``lost``.

    :raises TransactionLost: see above.
    """
    try:
        yield Leave(block, True)
    except Exception as exc:
        if not savepoint_gone(exc):
            raise
        yield Leave(block, False)  # what the code (or SQLAlchemy's autobegin) opened since
        raise TransactionLost(lost) from exc


#: The :class:`~oncely.errors.TransactionFailed` message of a block whose code caught the
#: error of a failed statement.
FAILED_INSIDE: Final = (
    "a statement inside the block failed and the error was caught, so the database aborted "
    "the transaction: nothing of the block was committed (neither oncely's row nor the "
    "writes). Let the error propagate, or wrap the statement that may fail in a savepoint "
    "(with conn.transaction(): / begin_nested()), then retry"
)


def leave_usable(c: SqlConnection, block: Block, *, commit: bool = True) -> Plan[None]:
    """Close ``block`` after the code inside it returned: roll it back and raise
    :class:`~oncely.errors.TransactionFailed` if a statement in it failed and the error was
    caught (releasing or committing would raise the driver's raw error, or, for a
    transaction the block owns, PostgreSQL would answer the ``COMMIT`` with a silent
    ``ROLLBACK``); else commit it (``commit=False``: leave it open for the caller's check).

    :raises TransactionFailed: see above.
    """
    if c.failed():
        yield Leave(block, False)
        raise TransactionFailed(FAILED_INSIDE)
    if commit:
        yield Leave(block, True)


def savepoint_lost(exc: BaseException) -> TransactionLost:
    """The :class:`~oncely.errors.TransactionLost` raised (chained to ``exc``) when the
    savepoint a block made in the caller's transaction is gone: the code inside ended that
    transaction (``conn.rollback()`` / ``conn.commit()``, a raw ``ROLLBACK``, a ``RELEASE`` or
    ``ROLLBACK TO`` of an outer savepoint, the server ending it)."""
    err = TransactionLost(
        "the code in the block ended your transaction (it called conn.rollback() or "
        "conn.commit(), sent ROLLBACK, or released or rolled back to an outer savepoint): "
        "the savepoint oncely made in it is gone, so the block's work is not in one "
        "transaction any more; what was written since was rolled back, nothing of it is "
        "committed. Let the block own the transaction's end; undo part of the work with a "
        "savepoint"
    )
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def _savepoint_kept(rollback: Callable[[], object]) -> Iterator[None]:
    """Around closing (releasing or rolling back to) the savepoint of a block in the caller's
    transaction: if that fails because the savepoint is gone (:func:`savepoint_gone`), call
    ``rollback()`` (the caller's whole transaction: what the code wrote after it ended the
    transaction is not committed; a failing rollback is ignored) and raise
    :func:`savepoint_lost`. Every connection's leave path goes through this (or
    :func:`_asavepoint_kept`)."""
    try:
        yield
    except Exception as exc:
        if not savepoint_gone(exc):
            raise
        with contextlib.suppress(Exception):
            rollback()
        raise savepoint_lost(exc) from exc


@contextlib.asynccontextmanager
async def _asavepoint_kept(rollback: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """The async face of :func:`_savepoint_kept` (``rollback()`` is awaited)."""
    try:
        yield
    except Exception as exc:
        if not savepoint_gone(exc):
            raise
        with contextlib.suppress(Exception):
            await rollback()
        raise savepoint_lost(exc) from exc


def lost_message(who: str, row: str) -> str:
    """The :class:`~oncely.errors.TransactionLost` message: ``who`` ended the transaction and
    ``row`` is what it took out."""
    return (
        f"{who} ended the transaction oncely opened around it (it called conn.rollback() or "
        f"conn.commit(), or a Session.rollback() after a caught error): {row} is no longer "
        "in it, so committing now would apply the writes made after that without it, and "
        "every retry would apply them again. Nothing more was committed. Let oncely own the "
        "transaction; undo part of the work with a savepoint"
    )


def lock_timeout(exc: BaseException) -> bool:
    """True when a lock wait ran out (PostgreSQL 55P03 ``lock_timeout`` / ``NOWAIT``; MySQL
    1205; SQLite ``SQLITE_BUSY`` / ``SQLITE_LOCKED`` after ``timeout``). The error itself or
    the driver's error oncely (or SQLAlchemy / Django) wrapped, never one it was raised while
    handling (``__context__``)."""
    for e in _own_causes(exc):
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if state == "55P03" or _mysql_code(e) == 1205 or _sqlite_busy(e):
            return True
    return False


def statement_timeout(exc: BaseException) -> bool:
    """True when the server ended a statement because it ran too long: PostgreSQL 57014
    ``query_canceled`` (``statement_timeout``, also ``pg_cancel_backend()``), MariaDB 1969
    (``max_statement_time``), MySQL 3024 (``max_execution_time``). Typically a lock wait that
    the statement's own time limit ended before ``lock_timeout`` did: the statement did
    nothing, so nothing was decided (:func:`busy` makes it
    :class:`~oncely.errors.DatabaseBusy`). An asyncio cancellation is not an ``Exception`` and
    passes through as itself."""
    for e in _own_causes(exc):
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if state == "57014" or _mysql_code(e) in (1969, 3024):
            return True
    return False


#: The exception group class (Python 3.11+; on 3.10 the ``exceptiongroup`` backport's, if loaded).
_GROUP: Final = getattr(builtins, "BaseExceptionGroup", None)


def _members(exc: BaseException) -> Sequence[BaseException] | None:
    """The errors an exception group (``ExceptionGroup``, e.g. from :class:`asyncio.TaskGroup`)
    holds, or None when ``exc`` is not a group."""
    group = _GROUP or getattr(sys.modules.get("exceptiongroup"), "BaseExceptionGroup", None)
    if isinstance(group, type) and isinstance(exc, group):
        return tuple(getattr(exc, "exceptions", ()))
    return None


def _every(exc: BaseException, leaf: Callable[[BaseException], bool]) -> bool:
    """``leaf(exc)``; for an exception group, true only when every error it holds (nested groups
    included) is: a group with one error that is not busy (a business error, a cancellation)
    is that error's outcome, not busy."""
    members = _members(exc)
    if members is None:
        return leaf(exc)
    return bool(members) and all(_every(m, leaf) for m in members)


def _busy_leaf(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseBusy):
        return True
    if _typed(exc) or not isinstance(exc, Exception):
        return False
    return retryable(exc) or lock_timeout(exc) or statement_timeout(exc)


def busy(exc: BaseException, what: str) -> BaseException:
    """``exc`` as oncely raises it when the database was busy: a
    :class:`~oncely.errors.DatabaseBusy` (chained to ``exc``) for a :func:`retryable` error or a
    :func:`lock_timeout` or a :func:`statement_timeout` (a lock wait ended by the statement's own
    time limit), else ``exc`` itself; only the error itself and the driver's error it
    translates are read, never one it was raised while handling (``__context__``) nor the
    ``__cause__`` of a caller's own error. An exception group (``ExceptionGroup``, e.g. from
    :class:`asyncio.TaskGroup`) is busy when every error it holds is.
    ``what`` names the operation in the message.
    Every mechanism of :mod:`oncely.sql`, :mod:`oncely.statemachine`, :mod:`oncely.optimistic`
    and the transactional consumer raises driver busy errors through this one translation."""
    if isinstance(exc, DatabaseBusy) or _typed(exc) or not isinstance(exc, Exception):
        return exc
    if _every(exc, _busy_leaf):
        err = DatabaseBusy(
            f"{what}: the database was busy ({exc}); nothing of this attempt is kept: roll "
            "the transaction back if it is yours and run it again from its start"
        )
        err.__cause__ = exc
        return err
    return exc


#: Top-level modules of the database drivers (and the frameworks wrapping them) whose errors
#: :func:`undecided` reads.
_DRIVERS: Final = frozenset(
    {"sqlite3", "psycopg", "psycopg2", "pymysql", "aiomysql", "MySQLdb", "asyncpg", "aiosqlite",
     "sqlalchemy", "django"}
)  # fmt: skip


def undecided(exc: BaseException) -> bool:
    """True when ``exc`` is an infrastructure refusal in which nothing was decided: a
    :class:`~oncely.errors.StoreUnavailable` (:class:`~oncely.errors.DatabaseBusy` included:
    the store could not be reached, or the database refused a concurrent writer), or a
    driver's own error that :func:`busy` types as :class:`~oncely.errors.DatabaseBusy` (a
    deadlock, a serialization failure, a lock wait that ran out, a statement ended by
    ``statement_timeout`` / ``max_statement_time``, SQLite's "database is locked"; the
    driver's or its framework's exception class itself, or oncely's translation of it, never
    an exception raised while handling one, ``__context__``). Such an error is never a
    business outcome: a saga does not count it as its step's failure nor compensate for it,
    it stops and raises it, and the next run continues where it stopped.

    An exception group (``ExceptionGroup``, e.g. from :class:`asyncio.TaskGroup`) is undecided
    when every error it holds is; one other error in it (a business error) makes it not.

    Not undecided: :class:`~oncely.errors.ResultNotStored` (the work ran) and every other
    error."""
    return _every(exc, _undecided_leaf)


def _undecided_leaf(exc: BaseException) -> bool:
    if isinstance(exc, StoreUnavailable):
        return True
    if isinstance(exc, OncelyError) or type(exc).__module__.split(".")[0] not in _DRIVERS:
        return False
    return _busy_leaf(exc)


def unconvertible(exc: BaseException, value: str) -> bool:
    """True when ``exc`` is the database refusing to convert ``value`` to a column's type
    (PostgreSQL 22P02 ``invalid input syntax for type integer: "3.0"`` / 22003 out of range,
    MySQL 1292 ``Truncated incorrect DECIMAL value: '3abc'`` / 1366), naming that value."""
    for e in _causes(exc):
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        converts = state in ("22P02", "22003") or _mysql_code(e) in (1292, 1366)
        if converts and value in str(e):
            return True
    return False


def other_key(id_column: str, given: Any, res: Result) -> Any:
    """The key the row in ``res`` holds (its ``id_column`` column) when that is not ``given``
    as text: the database converted ``given`` to compare it (SQLite's type affinity takes
    ``" 3"`` and ``"3.0"`` for 3, MySQL/MariaDB compare ``"3abc"`` as 3 and ``"ABC"`` equal to
    ``"abc"`` under a case-insensitive collation, PostgreSQL casts ``" 3"`` to an integer
    column). None when it is the same key, when ``res`` has no row or no such column, or when the
    key is of a type an id cannot be (bytes, a decimal: not compared). The one id check of the
    state machine and :func:`~oncely.sql.versioned_update`."""
    if not res.rows:
        return None
    columns = [str(col).lower() for col in res.columns]
    name = id_column.lower()
    if name not in columns:
        return None
    found = res.rows[0][columns.index(name)]
    if isinstance(found, bool) or not isinstance(found, (str, int, uuid.UUID)):
        return None
    return found if str(found) != str(given) else None


# MySQL/MariaDB: 1048 NULL into NOT NULL, 1264 out of range, 1265 data truncated, 1292 / 1366
# incorrect value, 1406 data too long, 1690 out of range in an expression.
_MYSQL_REFUSED: Final = frozenset({1048, 1264, 1265, 1292, 1366, 1406, 1690})


def refused_value(exc: BaseException) -> bool:
    """True when ``exc`` is the database (or its driver) refusing a value a statement sent: a
    PostgreSQL data exception (SQLSTATE class 22: too long, out of range, invalid text for the
    type) or ``NULL`` into a ``NOT NULL`` column (23502), the MySQL/MariaDB errors of the same
    (1048, 1264, 1265, 1292, 1366, 1406, 1690), SQLite's ``NOT NULL constraint failed``, or a
    Python value the driver cannot send (sqlite3 "type ... is not supported", psycopg "cannot
    adapt type", PyMySQL's ``TypeError``, an int too large for SQLite's 64 bits)."""
    for e in _causes(exc):
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if isinstance(state, str) and (state.startswith("22") or state == "23502"):
            return True
        if _mysql_code(e) in _MYSQL_REFUSED:
            return True
        text = str(e)
        if isinstance(e, sqlite3.IntegrityError) and text.startswith("NOT NULL constraint"):
            return True
        if isinstance(e, sqlite3.ProgrammingError) and (
            "not supported" in text or "binding parameter" in text
        ):
            return True
        if type(e).__module__.startswith("psycopg") and "cannot adapt" in text:
            return True
        if isinstance(e, (TypeError, OverflowError)) and not isinstance(e, OncelyError):
            return True
    return False


_MISSING_TABLE_PG = "42P01"
_MISSING_COLUMN_PG = "42703"


def missing_object(exc: BaseException) -> UnknownTable | UnknownColumn | None:
    """The typed error for a statement that named a table or column the database does not
    have (SQLite "no such table/column", PostgreSQL 42P01 / 42703, MySQL 1146 / 1054), or
    None. The message keeps the driver's text, which names the object."""
    for e in _causes(exc):
        text = str(e)
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        code = _mysql_code(e)
        if isinstance(e, sqlite3.OperationalError):
            if text.startswith("no such table"):
                return UnknownTable(f"{text}: create the table first (or fix its name)")
            if text.startswith("no such column") or "has no column named" in text:
                return UnknownColumn(f"{text}: check the column names against the table")
        elif state == _MISSING_TABLE_PG or code == 1146:
            return UnknownTable(f"{text.strip()}: create the table first (or fix its name)")
        elif state == _MISSING_COLUMN_PG or code == 1054:
            return UnknownColumn(f"{text.strip()}: check the column names against the table")
    return None


def value_refused(exc: BaseException, what: str) -> ValueRefused | None:
    """The typed error for the database refusing a value ``what`` sent (:func:`refused_value`:
    too long, out of range, not of the column's type, NULL into ``NOT NULL``, a Python type the
    driver cannot send), or None. The one translation of refused data for every mechanism that
    writes caller values (:func:`~oncely.sql.versioned_update`, :func:`~oncely.sql.insert_once`,
    the inbox and outbox); raise it ``from exc`` (the driver's error is ``__cause__``)."""
    if not refused_value(exc):
        return None
    return ValueRefused(
        f"{what}: the database refused a value ({str(exc).strip()}); nothing was written by "
        "this call. Do not retry it as it is: fix the value"
    )


#: Appended to a typed error raised after a statement failed on PostgreSQL inside the caller's
#: transaction (the server aborted it; psycopg's commit() of it rolls back without an error).
ABORTED_NOTE: Final = (
    " PostgreSQL aborted the transaction when the statement failed: roll it back "
    "(conn.rollback(), or back to a savepoint of yours around this call); a commit() now "
    "would roll back the earlier writes of the transaction without an error"
)
#: Appended when the failing statement ran in a savepoint that was rolled back.
KEPT_NOTE: Final = (
    " The statement ran in a savepoint, rolled back: the transaction is still usable and "
    "keeps its earlier writes"
)


def noted(exc: BaseException, note: str) -> None:
    """Append ``note`` to the message of a typed error raised by oncely (not a driver's error,
    not :class:`~oncely.errors.DatabaseBusy`, whose message already says to roll back)."""
    if (
        isinstance(exc, OncelyError)
        and not isinstance(exc, (DatabaseBusy, TransactionFailed))
        and exc.args
        and isinstance(exc.args[0], str)
        and note not in exc.args[0]
    ):
        exc.args = (exc.args[0].rstrip().rstrip(".") + "." + note, *exc.args[1:])


#: Appended when a later (unguarded) call failed but the transaction did not: the driver refused
#: the value before sending it, so PostgreSQL did not abort the transaction.
USABLE_NOTE: Final = (
    " The statement did not fail on the server: the transaction is still usable and keeps "
    "its earlier writes"
)


def transaction_noted(c: SqlConnection, exc: BaseException, *, savepoint: bool) -> None:
    """The one place that says, in the message of a typed error raised after a statement failed
    in the caller's PostgreSQL transaction, what became of that transaction: ``savepoint`` (the
    statement ran in a savepoint, rolled back): still usable (:data:`KEPT_NOTE`); else aborted
    (:data:`ABORTED_NOTE`) when the server failed it, or still usable (:data:`USABLE_NOTE`) when
    the driver refused the call before sending it. Nothing is said of an error no statement
    caused (no driver error in its chain), nor on SQLite and MariaDB/MySQL (only the statement
    failed; the transaction goes on)."""
    if c.dialect != "postgresql":
        return
    if savepoint:
        noted(exc, KEPT_NOTE)
    elif c.failed():
        noted(exc, ABORTED_NOTE)
    elif any(type(e).__module__.split(".")[0] in _DRIVERS for e in _causes(exc)):
        noted(exc, USABLE_NOTE)


def aborted_noted(c: SqlConnection, exc: BaseException) -> None:
    """Say, as a note (``exc.add_note``, PEP 678: the error keeps its type and message), that the
    caller's PostgreSQL transaction is aborted after an error oncely does not type left a
    statement run in it: a driver's own error (a UNIQUE violation on another column, a CHECK,
    a foreign key, a trigger's ``RAISE``), a cancellation or a timeout that cancelled the
    statement. Only when the transaction is in the failed state now (a ``commit()`` of it would
    roll back its earlier writes without an error), once per error."""
    if c.dialect != "postgresql":
        return
    try:
        failed = c.failed()
    except Exception:
        return
    note = ABORTED_NOTE.strip()
    notes = list(getattr(exc, "__notes__", ()))
    if not failed or note in notes:
        return
    add = getattr(exc, "add_note", None)
    if add is not None:
        add(note)
    else:  # Python 3.10: no add_note; __notes__ (PEP 678) is read by the exceptiongroup backport
        with contextlib.suppress(Exception):
            exc.__notes__ = [*notes, note]  # type: ignore[attr-defined]


T = TypeVar("T")

#: Per user connection (weakly held, see :func:`_owner`): the keys :func:`first_use_guarded`
#: found to run without failing.
_FIRST_USE: weakref.WeakKeyDictionary[Any, set[Hashable]] = weakref.WeakKeyDictionary()


def _owner(raw: Any) -> Any:
    """What a per-connection memory is kept on: under an SQLAlchemy ``Connection`` /
    ``AsyncConnection`` / ``Session`` (a new one per ``engine.connect()`` or transaction) the
    pooled DB-API connection, which outlives them; under a Django connection the driver's
    connection (a new one after every reconnect); else ``raw``. A sync ``Session`` resolves to
    the pooled connection its transaction holds (``Session.connection()``, which begins the
    transaction the statements about to run would begin anyway), so a new Session per unit of
    work on the same pooled connection remembers what the earlier ones found. Under an async
    dialect the pooled object is an adapter that takes no weak reference: the driver's
    connection under it is used. An ``AsyncSession`` is its own owner (finding its pooled
    connection would take I/O)."""
    try:
        if type(raw).__module__.startswith("sqlalchemy"):
            sync = getattr(raw, "sync_connection", None) or raw
            connection = sync.connection
            if callable(connection) and type(raw).__name__ != "AsyncSession":  # a Session
                connection = connection().connection
            dbapi = connection.dbapi_connection
            if dbapi is None:
                return raw
            # async dialects pool an adapter that takes no weak reference: the driver's own
            # connection under it lives as long
            return getattr(dbapi, "driver_connection", dbapi)
        if hasattr(raw, "vendor") and hasattr(raw, "in_atomic_block"):  # Django
            return raw if raw.connection is None else raw.connection
    except Exception:  # an AsyncSession (its connection takes I/O to find): kept on itself
        return raw
    return raw


def remembered(raw: Any) -> set[Hashable]:
    """The per-connection set of keys (see :data:`_FIRST_USE`); a fresh, forgotten set for an
    object that takes no weak reference (checked every time)."""
    try:
        return _FIRST_USE.setdefault(_owner(raw), set())
    except TypeError:
        return set()


def _schema_error(exc: BaseException) -> bool:
    """A failure that says the schema is not what a remembered first use found (a table or
    column gone, no ``ON CONFLICT`` arbiter any more: PostgreSQL 42P10)."""
    if missing_object(exc) is not None:
        return True
    return any(
        (getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)) in ("42P10", "55000")
        for e in _causes(exc)
    )


def first_use_guarded(c: SqlConnection, key: Hashable, plan: Plan[T]) -> Plan[T]:
    """Run ``plan`` (statements in the caller's transaction, committing nothing) so that, on
    PostgreSQL, a statement that fails on the server does not silently cost the caller the
    earlier writes of its transaction (a failed statement aborts a PostgreSQL transaction, and
    psycopg's ``commit()`` of an aborted transaction sends ``COMMIT``, which the server answers
    with ``ROLLBACK``, without an error).

    The mechanism the state machine and :func:`oncely.sql.transaction` use, a savepoint, but
    only on the connection's first use of ``key`` (a mechanism, its table and the columns it
    names): ``SAVEPOINT``, the plan, ``RELEASE SAVEPOINT`` (two round trips more, once); on an
    error ``ROLLBACK TO SAVEPOINT`` and the error is raised saying the transaction is still
    usable. A first use that worked is remembered per connection (the pooled DB-API
    connection under SQLAlchemy), so every later call is the plan alone: no round trip and no
    subtransaction more than before (a savepoint per call would add a round trip, and past 64
    subtransactions in one transaction PostgreSQL's snapshots slow down). A later call can
    still fail (a value the server refuses, the table dropped or the search_path switched since
    the first use): the error then says that the transaction is aborted and must be rolled
    back (a typed error in its message, :func:`transaction_noted`; any other error, a driver's
    own or a cancellation, keeps its type and message and carries it as a note when the
    transaction is in the failed state, :func:`aborted_noted`), and a schema error (a table, a
    column or the ``ON CONFLICT`` arbiter gone) forgets the key, so the call after the rollback
    checks again in a savepoint.

    SQLite, MariaDB and MySQL roll back only the failing statement: the plan runs as is. So does
    an autocommit connection with no transaction open (each statement is its own transaction:
    nothing earlier to lose)."""
    if c.dialect != "postgresql" or (c.autocommits() and not c.in_transaction()):
        return (yield from plan)
    seen = remembered(c.raw)
    if key in seen:
        try:
            return (yield from plan)
        except BaseException as exc:
            if isinstance(exc, Exception) and _schema_error(exc):
                seen.discard(key)
            if isinstance(exc, OncelyError):
                transaction_noted(c, exc, savepoint=False)
            elif not isinstance(exc, GeneratorExit):  # not the plan merely closed
                aborted_noted(c, exc)
            raise
    name = c._savepoint_name()
    # psycopg (and SQLAlchemy, and Django with autocommit off) begin the transaction before the
    # SAVEPOINT if none is open: the plan then runs in it, as it would have without the guard
    yield Exec(f"SAVEPOINT {name}", {})
    try:
        result = yield from plan
    except BaseException as exc:
        with cleanup(exc):
            yield Exec(f"ROLLBACK TO SAVEPOINT {name}", {})
            yield Exec(f"RELEASE SAVEPOINT {name}", {})
            transaction_noted(c, exc, savepoint=True)
        raise
    yield Exec(f"RELEASE SAVEPOINT {name}", {})
    seen.add(key)
    return result


# -- the adapter ---------------------------------------------------------------------------------
class SqlConnection:
    """One user connection seen the same way by every mechanism.

    Attributes: ``dialect``, ``version`` (server version tuple), ``returning`` (``INSERT ...
    RETURNING`` works), ``is_async`` (use :meth:`aexecute` / :func:`arun`), ``raw`` (what the
    user passed). Subclasses implement one driver family; users only call :func:`adapt`.
    """

    dialect: Dialect
    version: tuple[int, ...]
    is_async: bool = False
    paramstyle: Paramstyle = "named"
    raw: Any

    @property
    def returning(self) -> bool:
        if self.dialect == "sqlite":
            return self.version >= (3, 35)
        if self.dialect == "mysql":
            return self.mariadb and self.version >= (10, 5)
        return True

    mariadb: bool = False

    def quote(self, name: str) -> str:
        """``name`` validated and quoted for this dialect (see :func:`quote`)."""
        return quote(name, self.dialect)

    def text(self, text: Text) -> str:
        return statement_for(text, self.dialect)

    # transaction state
    def in_transaction(self) -> bool:  # pragma: no cover - every driver overrides
        raise NotImplementedError

    def failed(self) -> bool:
        """True when the open transaction already failed (PostgreSQL ``INERROR``, a SQLAlchemy
        session needing rollback, a Django atomic block marked ``needs_rollback``)."""
        return False

    def autocommits(self) -> bool:
        """True when each statement outside an explicit transaction commits by itself
        (sqlite3 ``isolation_level=None``/``autocommit=True``, psycopg/PyMySQL/aiomysql
        ``autocommit``, SQLAlchemy ``isolation_level="AUTOCOMMIT"``, Django outside
        ``atomic()``)."""
        return False

    def require_transaction(self, what: str) -> None:
        """Raise :class:`~oncely.errors.ConfigurationError` when ``what`` would commit by
        itself: an autocommit connection with no transaction open, where the point of ``what``
        is to commit together with the caller's writes."""
        if self.autocommits() and not self.in_transaction():
            raise AutocommitConnection(
                f"{what} must run in the caller's open transaction, with the writes it goes "
                f"with, but this {type(self.raw).__name__} is in autocommit mode with none open: "
                "the row would commit alone. Open one first (with conn.transaction(), "
                "atomic(), session.begin(), or BEGIN)"
            )

    def managed_transaction(self) -> bool:
        """True when the open transaction is managed by something that refuses ``commit()`` and
        ``rollback()`` inside it (psycopg 3's ``with conn.transaction():``), so code running in
        it cannot end it and go on writing in autocommit."""
        return False

    def require_held(self) -> None:
        """Raise :class:`~oncely.errors.AutocommitConnection` when a block oncely would begin
        around user code (:class:`Enter` ``held``: ``Inbox.receive``, the transactional
        consumer, ``idempotent_transaction``, state machine hooks, saga steps; ``Operation``
        phases call it too) cannot keep its promise on this connection. That block commits
        only if the code inside did not end the transaction (:func:`commit_if_held`; inside
        the caller's transaction, the savepoint's ``RELEASE`` fails); the promise holds
        because, once the code called ``conn.rollback()`` or ``conn.commit()``, whatever it
        writes next goes into a new implicit transaction that is then rolled back. On an
        autocommit connection each of those writes commits at once, and again on every
        redelivery or retry, whether oncely or the caller began the transaction (a ``BEGIN``
        of the caller's own ends with the code's ``rollback()`` too). So an autocommit
        connection is refused, unless its transaction is one the code cannot end
        (:meth:`managed_transaction`: psycopg's ``conn.transaction()``). Django overrides it
        (its ``atomic()`` forbids ``commit()`` / ``rollback()`` inside the block)."""
        if self.autocommits() and not self.managed_transaction():
            raise AutocommitConnection(
                f"this {type(self.raw).__name__} is in autocommit mode: oncely cannot run your "
                "code in a transaction on it (Inbox.receive(), the transactional "
                "consumer, idempotent_transaction(), state machine hooks, saga steps, "
                "recovery-point phases), since a write your code made after its own "
                "conn.rollback() or conn.commit() would commit at once, and again on every "
                "retry; a transaction you began yourself (BEGIN, conn.begin()) does not "
                "help, your code's rollback() ends it too. Give a connection without "
                "autocommit (sqlite3 isolation_level other than None, psycopg/PyMySQL/"
                "aiomysql autocommit=False), or on psycopg run the call inside "
                "`with conn.transaction():`, which refuses commit() and rollback() "
                "(not for Operation phases, which commit each phase themselves)"
            )

    def check_mode(self) -> None:
        """Raise :class:`~oncely.errors.UnsupportedConnection` if the connection is in a mode
        where oncely cannot read a statement's result before the next (psycopg's pipeline
        mode); nothing on other drivers. :func:`run` / :func:`arun` check it before a plan's
        first statement."""

    def check_usable(self) -> None:
        """Raise :class:`~oncely.errors.TransactionFailed` if the caller's transaction failed
        (and :meth:`check_mode`'s error in a mode oncely cannot use)."""
        self.check_mode()
        if self.failed():
            raise TransactionFailed(
                "the connection's transaction already failed (an earlier statement raised): "
                "roll it back (conn.rollback(), session.rollback(), or leave the atomic() "
                "block) before starting an idempotent operation on it"
            )

    # sync face
    def execute(self, text: Text, params: Mapping[str, Any]) -> Result:
        raise ConfigurationError(
            f"{type(self.raw).__name__} is an async connection: use the async form "
            "(async with / await ...) of this oncely.sql operation"
        )

    def enter(self, savepoint: bool = True, held: bool = False) -> Block:
        raise ConfigurationError(f"{type(self.raw).__name__} is an async connection")

    def leave(self, block: Block, commit: bool) -> None:
        raise ConfigurationError(f"{type(self.raw).__name__} is an async connection")

    def execute_leave(self, block: Block, text: Text, params: Mapping[str, Any]) -> Result:
        """Run one statement then close ``block`` committing (see :class:`ExecLeave`)."""
        try:
            res = self.execute(text, params)
        except BaseException as exc:
            with cleanup(exc):
                self.leave(block, False)
            raise
        self.leave(block, True)
        return res

    async def aexecute_leave(self, block: Block, text: Text, params: Mapping[str, Any]) -> Result:
        """The async face of :meth:`execute_leave`."""
        try:
            res = await self.aexecute(text, params)
        except BaseException as exc:
            with cleanup(exc):
                await self.aleave(block, False)
            raise
        await self.aleave(block, True)
        return res

    # async face
    async def aexecute(self, text: Text, params: Mapping[str, Any]) -> Result:
        raise ConfigurationError(
            f"{type(self.raw).__name__} is a sync connection: use the sync form "
            "(with / a plain call) of this oncely.sql operation"
        )

    async def aenter(self, savepoint: bool = True, held: bool = False) -> Block:
        raise ConfigurationError(f"{type(self.raw).__name__} is a sync connection")

    async def aleave(self, block: Block, commit: bool) -> None:
        raise ConfigurationError(f"{type(self.raw).__name__} is a sync connection")

    # READ COMMITTED blocks (MySQL/MariaDB)
    #: True where ``enter`` itself sends the ``START TRANSACTION`` (PyMySQL, aiomysql): the
    #: isolation is set before it. SQLAlchemy and Django begin lazily (the first statement
    #: opens the transaction on the server), so it is set just after ``enter``.
    _isolation_before_begin = False

    def enter_read_committed(self, savepoint: bool = True, held: bool = False) -> Block:
        """:meth:`enter`; on MySQL/MariaDB, when the block begins the transaction, that one
        transaction runs at READ COMMITTED (``SET TRANSACTION ISOLATION LEVEL READ
        COMMITTED`` sent outside any transaction, one round trip more; the session's own level
        is left as it is). InnoDB then takes no gap locks in searches, releases the locks of
        rows a locking read examined but did not match, and an ``UPDATE`` does not wait for a
        row another transaction holds unless its latest committed version matches (a
        "semi-consistent read"), so two transactions that lock disjoint rows never wait for
        each other. Elsewhere, or inside an open transaction: :meth:`enter` alone."""
        if self.dialect != "mysql" or self.in_transaction():
            return self.enter(savepoint, held)
        if self._isolation_before_begin:
            self.execute(READ_COMMITTED_NEXT, {})
            return self.enter(savepoint, held)
        block = self.enter(savepoint, held)
        try:
            self.execute(READ_COMMITTED_NEXT, {})
        except BaseException as exc:
            with cleanup(exc):
                self.leave(block, False)
            raise
        return block

    async def aenter_read_committed(self, savepoint: bool = True, held: bool = False) -> Block:
        """The async face of :meth:`enter_read_committed`."""
        if self.dialect != "mysql" or self.in_transaction():
            return await self.aenter(savepoint, held)
        if self._isolation_before_begin:
            await self.aexecute(READ_COMMITTED_NEXT, {})
            return await self.aenter(savepoint, held)
        block = await self.aenter(savepoint, held)
        try:
            await self.aexecute(READ_COMMITTED_NEXT, {})
        except BaseException as exc:
            with cleanup(exc):
                await self.aleave(block, False)
            raise
        return block

    # shared helpers
    def _begin_text(self) -> str:
        return {"sqlite": "BEGIN IMMEDIATE", "mysql": "START TRANSACTION"}.get(
            self.dialect, "BEGIN"
        )

    _counter = 0

    def _savepoint_name(self) -> str:
        SqlConnection._counter += 1
        return f"oncely_sp_{SqlConnection._counter}"


def _cursor_result(cur: Any) -> Result:
    if cur.description is None:
        return Result([], cur.rowcount, (), getattr(cur, "lastrowid", None))
    rows = [tuple(r) for r in cur.fetchall()]
    return Result(rows, cur.rowcount, tuple(d[0] for d in cur.description))


class _DbapiSync(SqlConnection):
    """sqlite3, psycopg 3 and PyMySQL connections: transactions by SQL and ``commit()``."""

    def __init__(self, raw: Any, dialect: Dialect, version: tuple[int, ...], style: Paramstyle):
        self.raw, self.dialect, self.version, self.paramstyle = raw, dialect, version, style

    def execute(self, text: Text, params: Mapping[str, Any]) -> Result:
        sql, args = render(self.text(text), params, self.paramstyle)
        cur = self.raw.cursor()
        try:
            cur.execute(sql, args)
            return _cursor_result(cur)
        finally:
            cur.close()

    def _raw_sql(self, sql: str) -> None:
        cur = self.raw.cursor()
        try:
            cur.execute(sql)
        finally:
            cur.close()

    def enter(self, savepoint: bool = True, held: bool = False) -> Block:
        self.check_usable()
        if held:
            self.require_held()
        if not self.in_transaction():
            mark = self._savepoint_name() if held else ""
            begin = _held_begin(self, mark) if held else None
            if begin is not None:
                self._raw_sql(begin)
                return Block(True, held=mark)
            if self.dialect == "mysql":
                self.raw.begin()
            elif self.dialect == "postgresql" and not self.raw.autocommit:
                pass  # psycopg sends BEGIN itself before the next statement
            else:
                self._raw_sql(self._begin_text())
            return Block(True)
        if not savepoint:
            return Block(False)
        name = self._savepoint_name()
        self._raw_sql(f"SAVEPOINT {name}")
        return Block(False, name)

    def leave(self, block: Block, commit: bool) -> None:
        if block.owned:
            if commit:
                self.raw.commit()
                return
            try:
                self.raw.rollback()
            except BaseException:
                # the driver's connection is dead (or its state unknown): close it, so that it
                # cannot commit the block's writes later (a closed connection refuses to)
                with contextlib.suppress(Exception):
                    self.raw.close()
                raise
        elif block.name is not None:
            with _savepoint_kept(self.raw.rollback):
                if commit:
                    self._raw_sql(f"RELEASE SAVEPOINT {block.name}")
                else:
                    self._raw_sql(f"ROLLBACK TO SAVEPOINT {block.name}")
                    if self.dialect != "mysql":
                        self._raw_sql(f"RELEASE SAVEPOINT {block.name}")


class _Sqlite(_DbapiSync):
    def __init__(self, raw: sqlite3.Connection):
        super().__init__(raw, "sqlite", sqlite3.sqlite_version_info, "named")

    def in_transaction(self) -> bool:
        return bool(self.raw.in_transaction)

    def autocommits(self) -> bool:
        if getattr(self.raw, "autocommit", None) is True:  # Python 3.12 autocommit=True
            return True
        return self.raw.isolation_level is None


def _pipelines() -> bool:
    import psycopg

    return bool(psycopg.Pipeline.is_supported())


class _PsycopgState(SqlConnection):
    """The transaction state of a psycopg 3 connection, sync or async: the same attributes
    on both (``info.transaction_status``, ``autocommit``, the open ``transaction()`` blocks)."""

    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return bool(self.raw.info.transaction_status != TransactionStatus.IDLE)

    def failed(self) -> bool:
        from psycopg.pq import TransactionStatus

        return bool(self.raw.info.transaction_status == TransactionStatus.INERROR)

    def autocommits(self) -> bool:
        return bool(self.raw.autocommit)

    def managed_transaction(self) -> bool:
        return _psycopg_managed(self.raw)

    def check_mode(self) -> None:
        """Refuse a connection in the caller's pipeline mode (``with conn.pipeline():``): there
        a statement's result (its row count, its rows) is not known until the pipeline syncs,
        and every oncely decision reads its statement's result before it decides (an inbox row
        inserted or not, a barrier row present or not). Checked before anything is sent.

        :raises UnsupportedConnection: the connection is in pipeline mode."""
        if self.raw.pgconn.pipeline_status:  # psycopg.pq.PipelineStatus.OFF is 0
            raise UnsupportedConnection(
                "the psycopg connection is in pipeline mode (inside `with conn.pipeline():`): "
                "oncely decides on each statement's result, which a pipeline gives only at its "
                "sync; call oncely outside the pipeline block (nothing was sent)"
            )


class _Psycopg(_PsycopgState, _DbapiSync):
    """psycopg 3: :meth:`execute_leave` sends its statement and the ``COMMIT`` in one pipeline
    (libpq >= 14), one round trip. (psycopg waits for its own ``BEGIN`` even in a pipeline,
    so the ``BEGIN`` stays a round trip of its own, as in any psycopg transaction.)"""

    def __init__(self, raw: Any):
        super().__init__(raw, "postgresql", _pg_version(raw), "pyformat")
        self.pipelined = _pipelines()

    def execute_leave(self, block: Block, text: Text, params: Mapping[str, Any]) -> Result:
        if not self.pipelined:
            return super().execute_leave(block, text, params)
        sql, args = render(self.text(text), params, self.paramstyle)
        with self.raw.cursor() as cur:
            try:
                with kept_pipeline(self.raw):
                    cur.execute(sql, args)
                    if block.owned:
                        self.raw.execute("COMMIT")
                    elif block.name is not None:
                        self.raw.execute(f"RELEASE SAVEPOINT {block.name}")
                return _cursor_result(cur)
            except BaseException as exc:
                with cleanup(exc):
                    super().leave(block, False)
                raise


def _psycopg_managed(raw: Any) -> bool:
    """True inside psycopg 3's ``with conn.transaction():`` (sync or async), where psycopg
    raises ``ProgrammingError`` on ``commit()`` / ``rollback()``. psycopg has no public flag
    for it: its connection counts the open ``Transaction`` blocks in ``_num_transactions``
    (psycopg 3.0 to 3.3), read here with a safe default: anything but a positive ``int``
    (a psycopg that renamed it) counts as not managed, so the connection is refused."""
    n = getattr(raw, "_num_transactions", None)
    return type(n) is int and n > 0


def _pg_version(raw: Any) -> tuple[int, ...]:
    v = int(raw.info.server_version)
    return (v // 10000, v % 10000)


def _mysql_version(info: str) -> tuple[tuple[int, ...], bool]:
    if info.startswith("5.5.5-"):  # MariaDB's replication-compatible prefix
        info = info[6:]
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", info)
    version = tuple(int(x) for x in m.groups() if x is not None) if m else (0,)
    return version, "mariadb" in info.lower()


class _MySQLState(SqlConnection):
    """The transaction state of a PyMySQL or aiomysql connection (aiomysql's connection keeps
    PyMySQL's ``server_status`` and ``get_autocommit()``)."""

    _isolation_before_begin = True

    def in_transaction(self) -> bool:
        return bool(self.raw.server_status & 1)  # SERVER_STATUS_IN_TRANS

    def autocommits(self) -> bool:
        return bool(self.raw.get_autocommit())


class _PyMySQL(_MySQLState, _DbapiSync):
    def __init__(self, raw: Any):
        super().__init__(raw, "mysql", (0,), "pyformat")
        self.version, self.mariadb = _mysql_version(raw.get_server_info())


class _DbapiAsync(SqlConnection):
    """psycopg ``AsyncConnection`` and aiomysql connections."""

    is_async = True

    def __init__(self, raw: Any, dialect: Dialect, version: tuple[int, ...]):
        self.raw, self.dialect, self.version, self.paramstyle = raw, dialect, version, "pyformat"

    async def aexecute(self, text: Text, params: Mapping[str, Any]) -> Result:
        sql, args = render(self.text(text), params, self.paramstyle)
        return await self._run(sql, args)

    async def _run(self, sql: str, args: Any) -> Result:
        cur = await _maybe_await(self.raw.cursor())
        try:
            await cur.execute(sql, args)
            if cur.description is None:
                return Result([], cur.rowcount, (), getattr(cur, "lastrowid", None))
            rows = [tuple(r) for r in await cur.fetchall()]
            return Result(rows, cur.rowcount, tuple(d[0] for d in cur.description))
        finally:
            await _maybe_await(cur.close())

    async def _raw_sql(self, sql: str) -> None:
        cur = await _maybe_await(self.raw.cursor())
        try:
            await cur.execute(sql)
        finally:
            await _maybe_await(cur.close())

    async def aenter(self, savepoint: bool = True, held: bool = False) -> Block:
        self.check_usable()
        if held:
            self.require_held()
        if not self.in_transaction():
            mark = self._savepoint_name() if held else ""
            begin = _held_begin(self, mark) if held else None
            if begin is not None:
                await self._raw_sql(begin)
                return Block(True, held=mark)
            if self.dialect == "mysql":
                await self.raw.begin()
            elif not self.raw.autocommit:
                pass  # psycopg sends BEGIN itself before the next statement
            else:
                await self._raw_sql("BEGIN")
            return Block(True)
        if not savepoint:
            return Block(False)
        name = self._savepoint_name()
        await self._raw_sql(f"SAVEPOINT {name}")
        return Block(False, name)

    async def aleave(self, block: Block, commit: bool) -> None:
        if block.owned:
            if commit:
                await self.raw.commit()
                return
            try:
                await self.raw.rollback()
            except BaseException:
                # see _DbapiSync.leave: a connection whose rollback failed is closed
                with contextlib.suppress(Exception):
                    await _maybe_await(self.raw.close())
                raise
        elif block.name is not None:
            async with _asavepoint_kept(self.raw.rollback):
                if commit:
                    await self._raw_sql(f"RELEASE SAVEPOINT {block.name}")
                else:
                    await self._raw_sql(f"ROLLBACK TO SAVEPOINT {block.name}")
                    if self.dialect != "mysql":
                        await self._raw_sql(f"RELEASE SAVEPOINT {block.name}")


async def _maybe_await(value: Any) -> Any:
    if hasattr(value, "__await__"):
        return await value
    return value


class _AsyncPsycopg(_PsycopgState, _DbapiAsync):
    """psycopg 3 ``AsyncConnection``: the same pipelining as the sync face."""

    def __init__(self, raw: Any):
        super().__init__(raw, "postgresql", _pg_version(raw))
        self.pipelined = _pipelines()

    async def aexecute_leave(self, block: Block, text: Text, params: Mapping[str, Any]) -> Result:
        if not self.pipelined:
            return await super().aexecute_leave(block, text, params)
        sql, args = render(self.text(text), params, self.paramstyle)
        async with self.raw.cursor() as cur:
            try:
                async with akept_pipeline(self.raw):
                    await cur.execute(sql, args)
                    if block.owned:
                        await self.raw.execute("COMMIT")
                    elif block.name is not None:
                        await self.raw.execute(f"RELEASE SAVEPOINT {block.name}")
                return await _acursor_result(cur)
            except BaseException as exc:
                with cleanup(exc):
                    await super().aleave(block, False)
                raise


async def _acursor_result(cur: Any) -> Result:
    if cur.description is None:
        return Result([], cur.rowcount, ())
    rows = [tuple(r) for r in await cur.fetchall()]
    return Result(rows, cur.rowcount, tuple(d[0] for d in cur.description))


class _AioMySQL(_MySQLState, _DbapiAsync):
    def __init__(self, raw: Any):
        super().__init__(raw, "mysql", (0,))
        self.version, self.mariadb = _mysql_version(raw.get_server_info())

    async def aexecute(self, text: Text, params: Mapping[str, Any]) -> Result:
        # aiomysql escapes bytes with a name PyMySQL >= 1.2 no longer exports (it is a str
        # there): bind the values here, bytes as hex literals, and send the finished text.
        sql, args = render(self.text(text), params, "pyformat")
        literal = {
            k: "X'" + bytes(v).hex() + "'"
            if isinstance(v, (bytes, bytearray, memoryview))
            else self.raw.escape(v)
            for k, v in args.items()
        }
        return await self._run(sql % literal, None)


# -- SQLAlchemy ----------------------------------------------------------------------------------
def _sa_dialect(dialect: Any) -> tuple[Dialect, tuple[int, ...], bool]:
    name = dialect.name
    version = tuple(dialect.server_version_info or (0,))
    if name == "sqlite":
        return "sqlite", sqlite3.sqlite_version_info, False
    if name == "postgresql":
        return "postgresql", version, False
    if name in ("mysql", "mariadb"):
        return "mysql", version, bool(getattr(dialect, "is_mariadb", name == "mariadb"))
    raise UnsupportedConnection(
        f"oncely.sql supports SQLite, PostgreSQL and MySQL/MariaDB; this SQLAlchemy "
        f"connection speaks {name!r}"
    )


@lru_cache(maxsize=1024)
def _sa_text(text: str) -> Any:
    from sqlalchemy import text as sa_text

    return sa_text(text)


def _sa_result(res: Any) -> Result:
    if not res.returns_rows:
        try:  # the DB-API cursor's (psycopg has none)
            lastrowid = res.lastrowid if res.context.dialect.name != "postgresql" else None
        except Exception:
            lastrowid = None
        return Result([], res.rowcount, (), lastrowid)
    rows = [tuple(r) for r in res.fetchall()]
    return Result(rows, res.rowcount, tuple(res.keys()))


def _inline_bytes(sql: str, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``sql`` with its ``bytes`` parameters written as ``X'..'`` literals."""
    rest = {k: v for k, v in params.items() if not isinstance(v, bytes)}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        value = params.get(name) if name is not None else None
        if isinstance(value, bytes):
            return "X'" + value.hex() + "'"
        return m.group(0)

    return _TOKEN.sub(sub, sql), rest


def _sa_require_transaction(sync_conn: Any, what: str) -> None:
    """:meth:`SqlConnection.require_transaction` for SQLAlchemy, also checked before every
    block oncely opens: with ``isolation_level="AUTOCOMMIT"`` SQLAlchemy's ``begin()`` and
    ``begin_nested()`` open no database transaction (its own ``in_transaction()`` says True),
    so each statement would commit alone. The driver's connection underneath decides."""
    try:
        dbapi = sync_conn.connection.dbapi_connection
    except Exception:
        return
    driver = getattr(dbapi, "driver_connection", None) or dbapi
    try:
        inner = adapt(driver)
    except OncelyError:  # a driver oncely does not adapt directly (asyncpg, aiosqlite)
        return
    if inner.autocommits() and not inner.in_transaction():
        raise AutocommitConnection(
            f"{what} needs a database transaction, but this SQLAlchemy connection uses "
            "isolation_level='AUTOCOMMIT', where begin() opens none: every statement would "
            "commit alone. Use a connection without it (an engine without "
            "isolation_level='AUTOCOMMIT', or conn.execution_options(isolation_level="
            "'READ COMMITTED'))"
        )


def _sa_failed(conn: Any) -> bool:
    """A SQLAlchemy Connection whose PostgreSQL transaction is in error."""
    try:
        dbapi = conn.connection.dbapi_connection
    except Exception:
        return False
    return _pg_inerror(dbapi)


def _pg_inerror(dbapi: Any) -> bool:
    """A DB-API connection (psycopg 3 or 2, or SQLAlchemy's adapter around an async one) whose
    PostgreSQL transaction is in error: a statement failed and its error was caught."""
    info = getattr(dbapi, "info", None)
    status = getattr(info, "transaction_status", None)
    if status is None:  # asyncpg-style adapters: psycopg's async adapter wraps the connection
        inner = getattr(dbapi, "_connection", None)
        status = getattr(getattr(inner, "info", None), "transaction_status", None)
    return status is not None and int(status) == 3  # libpq PQTRANS_INERROR


def _sa_psycopg(fairy: Any, is_async: bool) -> Any:
    """The psycopg 3 connection under a SQLAlchemy pooled connection, if it is one and
    pipelines, else None (psycopg2, asyncpg, an older libpq)."""
    driver = getattr(fairy, "driver_connection", None)
    if driver is None or type(driver).__module__.split(".")[0] != "psycopg":
        return None
    import psycopg

    kind = psycopg.AsyncConnection if is_async else psycopg.Connection
    return driver if isinstance(driver, kind) and _pipelines() else None


def _pipelined_commit(driver: Any, sql: str, args: Any) -> Result:
    """``sql`` then ``COMMIT`` in one psycopg pipeline (one round trip) on ``driver``."""
    with driver.cursor() as cur:
        with kept_pipeline(driver):
            cur.execute(sql, args)
            driver.execute("COMMIT")
        return _cursor_result(cur)


async def _apipelined_commit(driver: Any, sql: str, args: Any) -> Result:
    async with driver.cursor() as cur:
        async with akept_pipeline(driver):
            await cur.execute(sql, args)
            await driver.execute("COMMIT")
        return await _acursor_result(cur)


def _sa_check_nested(handle: Any, owner: Any) -> None:
    """Raise :class:`_SavepointEnded` when ``handle`` (a ``begin_nested()`` of ``owner``, a
    sync ``Connection`` or ``Session``; async: its proxy) is inactive and no longer
    ``owner``'s nested transaction: the code inside ended the transaction under it
    (``rollback()`` / ``commit()``). Its ``commit()`` would raise ``InvalidRequestError`` /
    ``ResourceClosedError``, but its ``rollback()`` only warns, leaving what the code wrote
    after in the caller's transaction. (A nested transaction a failed statement deactivated
    is still ``owner``'s: it is rolled back to its savepoint as usual.)"""
    sync = getattr(handle, "sync_transaction", None) or handle
    if not sync.is_active and owner.get_nested_transaction() is not sync:
        raise _SavepointEnded(
            "the SQLAlchemy transaction oncely's savepoint was made in was ended by the code "
            "inside the block"
        )


class _SaConnection(SqlConnection):
    def __init__(self, raw: Any):
        self.raw = raw
        self.dialect, self.version, self.mariadb = _sa_dialect(raw.dialect)

    def execute(self, text: Text, params: Mapping[str, Any]) -> Result:
        return _sa_result(self.raw.execute(_sa_text(self.text(text)), dict(params)))

    def in_transaction(self) -> bool:
        return bool(self.raw.in_transaction())

    def failed(self) -> bool:
        return self.raw.in_transaction() and _sa_failed(self.raw)

    def require_transaction(self, what: str) -> None:
        _sa_require_transaction(self.raw, what)

    def enter(self, savepoint: bool = True, held: bool = False) -> Block:
        self.check_usable()
        if not self.raw.in_transaction():
            # pysqlite begins lazily and deferred: the claim INSERT, the block's first
            # statement, takes SQLite's write lock (waiting for it), no read before it
            tx = self.raw.begin()
            try:  # after begin(): a "begin" event may have sent BEGIN itself
                self.require_transaction("an oncely transaction block")
                mark = self._held_mark(held)
            except BaseException as exc:
                with cleanup(exc):
                    tx.rollback()
                raise
            return Block(True, handle=tx, held=mark)
        self.require_transaction("an oncely transaction block")
        if not savepoint:
            return Block(False)
        return Block(False, "nested", self.raw.begin_nested())

    def leave(self, block: Block, commit: bool) -> None:
        if block.handle is not None:
            if not commit and block.owned and not block.handle.is_active:
                self.raw.rollback()  # user code ended ours: roll back what it began since
                return
            if block.owned:
                block.handle.commit() if commit else block.handle.rollback()
                return
            with _savepoint_kept(self.raw.rollback):  # begin_nested(): the code may end it
                _sa_check_nested(block.handle, self.raw)
                block.handle.commit() if commit else block.handle.rollback()

    def _held_mark(self, held: bool) -> str | None:
        """SQLite: begin a held block's transaction with a savepoint (pysqlite begins no
        transaction before it, so it takes the place of the implicit ``BEGIN``; its
        ``RELEASE`` commits, and SQLAlchemy's commit then finds nothing to commit)."""
        if not (held and self.dialect == "sqlite"):
            return None
        mark = self._savepoint_name()
        self.execute(f"SAVEPOINT {mark}", {})
        return mark

    def _pooled(self) -> Any:
        return self.raw.connection

    def execute_leave(self, block: Block, text: Text, params: Mapping[str, Any]) -> Result:
        """With psycopg 3 under it and a block that owns its transaction: the statement and
        the ``COMMIT`` in one pipeline on the driver's connection (one round trip, as
        :class:`_Psycopg`), then SQLAlchemy's own commit, which finds the driver's connection
        idle and sends nothing."""
        driver = _sa_psycopg(self._pooled(), False) if block.owned else None
        if driver is None:
            return super().execute_leave(block, text, params)
        return _leave_pipelined(self, driver, block, text, params)


def _leave_pipelined(
    conn: Any, driver: Any, block: Block, text: Text, params: Mapping[str, Any]
) -> Result:
    """Send ``text`` and the ``COMMIT`` in one pipeline on psycopg ``driver`` (see
    :func:`_pipelined_commit`), then close ``block`` of ``conn`` (the framework's own commit
    finds the driver idle and sends nothing); a failure closes it rolling back."""
    sql, args = render(conn.text(text), params, "pyformat")
    try:
        res = _pipelined_commit(driver, sql, args)
    except BaseException as exc:
        with cleanup(exc):
            conn.leave(block, False)
        raise
    conn.leave(block, True)
    return res


class _SaSession(_SaConnection):
    """A SQLAlchemy ``Session``: ``execute``, ``in_transaction``, ``begin`` and
    ``begin_nested`` as on a ``Connection`` (:class:`_SaConnection`'s ``enter`` and
    ``leave`` serve both); its failed state and driver connection are reached through it."""

    def __init__(self, raw: Any):
        self.raw = raw
        self.dialect, self.version, self.mariadb = _sa_dialect(raw.get_bind().dialect)

    def failed(self) -> bool:
        if not self.raw.in_transaction():
            return False
        tx = self.raw.get_transaction()
        return (tx is not None and not tx.is_active) or _sa_failed(self.raw.connection())

    def require_transaction(self, what: str) -> None:
        if self.raw.in_transaction():  # else connection() would begin one (autobegin)
            _sa_require_transaction(self.raw.connection(), what)

    def _pooled(self) -> Any:
        return self.raw.connection().connection


class _SaAsyncConnection(SqlConnection):
    is_async = True

    def __init__(self, raw: Any):
        self.raw = raw
        self.dialect, self.version, self.mariadb = _sa_dialect(raw.dialect)

    async def aexecute(self, text: Text, params: Mapping[str, Any]) -> Result:
        sql = self.text(text)
        if self.dialect == "mysql" and any(isinstance(v, bytes) for v in params.values()):
            # aiomysql escapes bytes with a name PyMySQL >= 1.2 no longer exports: send them as
            # hex literals (hex digits only) and the rest as parameters
            sql, params = _inline_bytes(sql, params)
            from sqlalchemy import text as sa_text

            return _sa_result(await self.raw.execute(sa_text(sql), dict(params)))
        return _sa_result(await self.raw.execute(_sa_text(sql), dict(params)))

    def in_transaction(self) -> bool:
        return bool(self.raw.in_transaction())

    def failed(self) -> bool:
        sync = getattr(self.raw, "sync_connection", None)
        return bool(self.raw.in_transaction() and sync is not None and _sa_failed(sync))

    def require_transaction(self, what: str) -> None:
        sync = getattr(self.raw, "sync_connection", None)
        if sync is not None:
            _sa_require_transaction(sync, what)

    async def aenter(self, savepoint: bool = True, held: bool = False) -> Block:
        self.check_usable()
        if not self.raw.in_transaction():
            tx = self.raw.begin()
            await tx.start()
            try:
                self.require_transaction("an oncely transaction block")
                mark = await self._aheld_mark(held)
            except BaseException as exc:
                with cleanup(exc):
                    await tx.rollback()
                raise
            return Block(True, handle=tx, held=mark)
        self.require_transaction("an oncely transaction block")
        if not savepoint:
            return Block(False)
        tx = self.raw.begin_nested()
        await tx.start()
        return Block(False, "nested", tx)

    async def aleave(self, block: Block, commit: bool) -> None:
        if block.handle is not None:
            if not commit and block.owned and not block.handle.is_active:
                await self.raw.rollback()  # user code ended ours: roll back what it began since
                return
            if block.owned:
                await (block.handle.commit() if commit else block.handle.rollback())
                return
            async with _asavepoint_kept(self.raw.rollback):  # begin_nested(): see leave()
                _sa_check_nested(block.handle, self._sync())
                await (block.handle.commit() if commit else block.handle.rollback())

    def _sync(self) -> Any:
        return self.raw.sync_connection

    async def _aheld_mark(self, held: bool) -> str | None:
        """The async face of :meth:`_SaConnection._held_mark` (aiosqlite)."""
        if not (held and self.dialect == "sqlite"):
            return None
        mark = self._savepoint_name()
        await self.aexecute(f"SAVEPOINT {mark}", {})
        return mark

    async def _apooled(self) -> Any:
        return await self.raw.get_raw_connection()

    async def aexecute_leave(self, block: Block, text: Text, params: Mapping[str, Any]) -> Result:
        """The async face of :meth:`_SaConnection.execute_leave`."""
        driver = _sa_psycopg(await self._apooled(), True) if block.owned else None
        if driver is None:
            return await super().aexecute_leave(block, text, params)
        sql, args = render(self.text(text), params, "pyformat")
        try:
            res = await _apipelined_commit(driver, sql, args)
        except BaseException as exc:
            with cleanup(exc):
                await self.aleave(block, False)
            raise
        await self.aleave(block, True)
        return res


class _SaAsyncSession(_SaAsyncConnection):
    def __init__(self, raw: Any):
        self.raw = raw
        self.dialect, self.version, self.mariadb = _sa_dialect(raw.get_bind().dialect)

    def failed(self) -> bool:
        if not self.raw.in_transaction():
            return False
        tx = self.raw.sync_session.get_transaction()
        if tx is not None and not tx.is_active:
            return True
        try:  # the connection the transaction holds (no I/O: it is already open)
            connection = self.raw.sync_session.connection()
        except Exception:
            return False
        return _sa_failed(connection)

    def _sync(self) -> Any:
        return self.raw.sync_session

    async def _apooled(self) -> Any:
        return await (await self.raw.connection()).get_raw_connection()


# -- Django --------------------------------------------------------------------------------------
class _Django(SqlConnection):
    """``django.db.connection`` / ``connections[alias]``; blocks are ``transaction.atomic``."""

    paramstyle: Paramstyle = "format"

    def __init__(self, raw: Any):
        self.raw = raw
        vendor = raw.vendor
        if vendor not in DIALECTS:
            raise UnsupportedConnection(
                f"oncely.sql supports SQLite, PostgreSQL and MySQL/MariaDB; this Django "
                f"database is {vendor!r}"
            )
        self.dialect = vendor
        self.alias = raw.alias
        if vendor == "sqlite":
            self.version = sqlite3.sqlite_version_info
        else:
            raw.ensure_connection()
            self.version = tuple(raw.mysql_version if vendor == "mysql" else _django_pg(raw))
            self.mariadb = vendor == "mysql" and bool(raw.mysql_is_mariadb)

    def execute(self, text: Text, params: Mapping[str, Any]) -> Result:
        sql, args = render(self.text(text), params, "format")
        with self.raw.cursor() as cur:
            cur.execute(sql, args)
            return _cursor_result(cur)

    def in_transaction(self) -> bool:
        return bool(self.raw.in_atomic_block or not self.raw.get_autocommit())

    def autocommits(self) -> bool:
        return bool(self.raw.get_autocommit())

    def failed(self) -> bool:
        if not self.raw.in_atomic_block:
            return False
        if self.raw.needs_rollback:
            return True
        # a statement that failed with its error caught inside atomic() (Django marks the
        # block only when the error leaves an inner atomic()): PostgreSQL aborted the transaction
        return self.dialect == "postgresql" and _pg_inerror(self.raw.connection)

    def require_held(self) -> None:
        """Nothing to refuse: the block is an ``atomic()``, inside which Django refuses
        ``commit()`` and ``rollback()`` (``TransactionManagementError``), so the code in it
        cannot end the transaction and write on in autocommit."""

    def enter(self, savepoint: bool = True, held: bool = False) -> Block:
        from django.db import transaction  # type: ignore[import-untyped]

        self.check_usable()
        owned = not self.raw.in_atomic_block
        atomic = transaction.atomic(using=self.alias, savepoint=savepoint)
        atomic.__enter__()  # SQLite: deferred; the claim INSERT takes the write lock first
        return Block(owned, "atomic", atomic)

    def leave(self, block: Block, commit: bool) -> None:
        if block.owned:
            self._exit(block, commit)
            return
        # a savepoint in the caller's atomic(): the code may have ended it (a raw ROLLBACK, a
        # RELEASE / ROLLBACK TO of an outer savepoint). Django's exit then raises the driver's
        # error (wrapped) on commit; on rollback it swallows it and marks the outer block for
        # rollback itself. The caller's atomic() rolls back whatever the code wrote after.
        with _savepoint_kept(self._set_rollback):
            self._exit(block, commit)

    @staticmethod
    def _exit(block: Block, commit: bool) -> None:
        if commit:
            block.handle.__exit__(None, None, None)
        else:
            err = _Rollback()
            block.handle.__exit__(_Rollback, err, None)

    def _set_rollback(self) -> None:
        from django.db import transaction

        transaction.set_rollback(True, using=self.alias)

    def execute_leave(self, block: Block, text: Text, params: Mapping[str, Any]) -> Result:
        """PostgreSQL with psycopg 3 and a block that owns its transaction: the statement and
        the ``COMMIT`` in one pipeline on the driver's connection (one round trip), then the
        ``atomic()`` block's exit, whose commit finds the connection idle and sends nothing."""
        driver = getattr(self.raw, "connection", None) if block.owned else None
        if (
            self.dialect != "postgresql"
            or driver is None
            or type(driver).__module__.split(".")[0] != "psycopg"
            or not _pipelines()
        ):
            return super().execute_leave(block, text, params)
        return _leave_pipelined(self, driver, block, text, params)


class _Rollback(Exception):
    """Handed to ``atomic.__exit__`` to make it roll back."""


def _django_pg(raw: Any) -> tuple[int, ...]:
    v = int(raw.pg_version)
    return (v // 10000, v % 10000)


# -- adapt ---------------------------------------------------------------------------------------
def adapt(conn: Any) -> SqlConnection:
    """The :class:`SqlConnection` for what the user holds (see the module docstring).

    Raises :class:`~oncely.errors.ConfigurationError` for an SQLAlchemy ``Engine`` (pass
    ``engine.connect()`` / a ``Session``) and for any other object or dialect.
    """
    if isinstance(conn, SqlConnection):
        return conn
    if isinstance(conn, sqlite3.Connection):
        return _Sqlite(conn)
    module = type(conn).__module__
    top = module.split(".")[0]
    name = type(conn).__name__
    if top == "psycopg":
        import psycopg

        if isinstance(conn, psycopg.AsyncConnection):
            return _AsyncPsycopg(conn)
        if isinstance(conn, psycopg.Connection):
            return _Psycopg(conn)
    elif top == "pymysql":
        return _PyMySQL(conn)
    elif top == "aiomysql":
        return _AioMySQL(conn)
    elif top == "sqlalchemy":
        return _adapt_sqlalchemy(conn, name)
    elif top == "django" or (hasattr(conn, "vendor") and hasattr(conn, "in_atomic_block")):
        target = conn
        if name == "ConnectionProxy":  # django.db.connection
            from django.db import DEFAULT_DB_ALIAS, connections

            target = connections[DEFAULT_DB_ALIAS]
        return _Django(target)
    raise UnsupportedConnection(
        f"oncely.sql cannot use a {module}.{name}: pass a sqlite3, psycopg 3, PyMySQL or aiomysql "
        "connection, a SQLAlchemy Connection/Session (sync or async), or django.db.connection"
    )


def _adapt_sqlalchemy(conn: Any, name: str) -> SqlConnection:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session

    if isinstance(conn, Engine):
        raise UnsupportedConnection(
            "an SQLAlchemy Engine has no transaction to join: pass `engine.connect()` "
            "(inside `with engine.begin() as conn:`) or a Session"
        )
    if isinstance(conn, Connection):
        return _SaConnection(conn)
    if isinstance(conn, Session):
        return _SaSession(conn)
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

    if isinstance(conn, AsyncEngine):
        raise UnsupportedConnection(
            "an SQLAlchemy AsyncEngine has no transaction to join: pass "
            "`async with engine.connect() as conn` or an AsyncSession"
        )
    if isinstance(conn, AsyncConnection):
        return _SaAsyncConnection(conn)
    if isinstance(conn, AsyncSession):
        return _SaAsyncSession(conn)
    raise UnsupportedConnection(f"oncely.sql cannot use an SQLAlchemy {name}")


# -- runners -------------------------------------------------------------------------------------
#: What :func:`run` / :func:`arun` name in the :class:`~oncely.errors.DatabaseBusy` of a
#: statement whose error left the plan as it was.
STATEMENT: Final = "an oncely.sql statement"


class _Refusals:
    """The errors the statements of one plan raised (by identity): an error that leaves the
    plan as one of them is the database's own, and goes through :func:`busy` there."""

    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def note(self, exc: BaseException) -> None:
        if len(self.errors) >= 64:  # a plan retrying for long: the latest ones matter
            del self.errors[:32]
        self.errors.append(exc)

    def typed(self, exc: Exception, what: str) -> BaseException:
        if any(exc is e for e in self.errors):
            return busy(exc, what)
        return exc


def _sql_request(request: Any) -> bool:
    return isinstance(request, (Exec, Enter, Leave, ExecLeave))


def run(
    plan: Plan[Any],
    conn: SqlConnection,
    other: Callable[[Any], Any] | None = None,
    what: str = STATEMENT,
) -> Any:
    """Carry a plan out on a sync connection: :class:`~oncely.backends.plans.Exec` ->
    :class:`Result`, :class:`Enter` -> :class:`Block`, :class:`Leave` -> None; any other
    request goes to ``other(request)`` (a mechanism's own requests, e.g. "call this phase").

    The one place every mechanism of :mod:`oncely.sql`, :mod:`oncely.statemachine` and the
    SQL inbox/outbox executes statements, so the one place a concurrent writer's refusal is
    typed: an error a statement raised (a ``BEGIN IMMEDIATE``, a ``COMMIT`` or any statement)
    that leaves the plan unchanged is raised through :func:`busy` (``what`` names the
    operation): a deadlock, a serialization failure, a lock wait that ran out or SQLite's
    "database is locked" is :class:`~oncely.errors.DatabaseBusy`, whichever path of the plan
    let it through. The plan itself still sees the driver's error (it may retry or translate
    it first); errors of ``other`` requests (user code) are left as they are."""
    conn.check_mode()
    refusals = _Refusals()

    def execute(request: Any) -> Any:
        if not _sql_request(request):
            if other is not None:
                return other(request)
            raise TypeError(f"unknown request {request!r}")
        try:
            if isinstance(request, Exec):
                return conn.execute(request.statement, request.params)
            if isinstance(request, Enter):
                if request.read_committed:
                    return conn.enter_read_committed(request.savepoint, request.held)
                return conn.enter(request.savepoint, request.held)
            if isinstance(request, Leave):
                return conn.leave(request.block, request.commit)
            return conn.execute_leave(request.block, request.statement, request.params)
        except Exception as exc:
            refusals.note(exc)
            raise

    try:
        return run_plan(plan, execute)
    except Exception as exc:
        typed = refusals.typed(exc, what)
        if typed is exc:
            raise
        raise typed from exc


async def arun(
    plan: Plan[Any],
    conn: SqlConnection,
    other: Callable[[Any], Awaitable[Any]] | None = None,
    what: str = STATEMENT,
) -> Any:
    """The async face of :func:`run` (``other`` is awaited)."""
    conn.check_mode()
    refusals = _Refusals()

    async def execute(request: Any) -> Any:
        if not _sql_request(request):
            if other is not None:
                return await other(request)
            raise TypeError(f"unknown request {request!r}")
        try:
            if isinstance(request, Exec):
                return await conn.aexecute(request.statement, request.params)
            if isinstance(request, Enter):
                if request.read_committed:
                    return await conn.aenter_read_committed(request.savepoint, request.held)
                return await conn.aenter(request.savepoint, request.held)
            if isinstance(request, Leave):
                return await conn.aleave(request.block, request.commit)
            return await conn.aexecute_leave(request.block, request.statement, request.params)
        except Exception as exc:
            refusals.note(exc)
            raise

    try:
        return await arun_plan(plan, execute)
    except Exception as exc:
        typed = refusals.typed(exc, what)
        if typed is exc:
            raise
        raise typed from exc
