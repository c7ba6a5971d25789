"""The transactional inbox: a message's effect on the database happens once, even if the ack
is lost.

The consumer records ``(consumer, message id)`` in an inbox table *in the same transaction* as
the handler's writes. A redelivery finds the row and skips the handler; a crash before the
commit leaves neither the row nor the effect, so the redelivery runs it. The case that matters
is the consumer that dies after the commit and before the ack: the broker redelivers, the row is
there, and the effect is not applied twice (Eventuate's and MassTransit's inbox, DESIGN.md)::

    from oncely.messaging.inbox import Inbox

    inbox = Inbox()                              # table "oncely_inbox"
    inbox.create_table(conn)                     # once (idempotent)

    with inbox.receive(conn, consumer="billing", message_id=msg.id) as first:
        if first:                                # not applied before
            conn.execute("UPDATE accounts SET ...")
    msg.ack()                                    # after the commit

or, inside a transaction you manage yourself, ``if inbox.accept(conn, "billing", msg.id): ...``.

``conn`` is whatever :func:`oncely.sql.connections.adapt` takes: a sqlite3, psycopg 3, PyMySQL
or aiomysql connection, a SQLAlchemy ``Connection``/``Session`` (sync or async) or Django's
``connection``. The async faces (:meth:`Inbox.aaccept`, :meth:`Inbox.areceive`) take the async
ones.

The decision is one statement: ``INSERT … ON CONFLICT DO NOTHING`` (``INSERT IGNORE`` on
MySQL/MariaDB), whose row count says whether the row is new. The row is unique on
``(consumer, message_id)``: a second transaction inserting the same pair *waits* for the first
to commit or roll back (the unique index locks it), then sees the row (0 rows: duplicate) or not
(1 row: it runs), so two concurrent deliveries never both apply the effect; this is the "inbox
row truly locked" that MassTransit users needed. Under PostgreSQL's REPEATABLE READ or
SERIALIZABLE the waiting transaction gets a serialization failure instead, and MariaDB's deadlock
detector may refuse waiters when the first rolls back: both raise
:class:`~oncely.errors.DatabaseBusy` (retryable): roll back and run it again.

The hook for an idempotent consumer (:mod:`oncely.messaging.consumer`) is
:meth:`Inbox.accept`: ``accept(conn, consumer, message_id) -> bool`` (``aaccept`` async),
called inside the handler's transaction.

Rows are kept until :meth:`Inbox.purge` removes those older than a window (``oncely inbox
purge URL``): keep them longer than the longest a broker may redeliver (MassTransit's default
duplicate-detection window is 30 minutes; the default here is 7 days).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

from oncely.backends.plans import Exec, Plan
from oncely.core.records import digest_key
from oncely.core.text import stored_text
from oncely.errors import (
    ConfigurationError,
    InvalidKey,
    OncelyError,
    SchemaMissing,
    StoreError,
)
from oncely.messaging.dedup import MAX_ID_LENGTH, message_id_text
from oncely.settings import count as count_of
from oncely.settings import seconds
from oncely.sql.connections import (
    Dialect,
    Enter,
    Leave,
    SqlConnection,
    adapt,
    arun,
    busy,
    commit_if_held,
    exec_in_block,
    first_use_guarded,
    leave_usable,
    lost_message,
    missing_object,
    quote,
    roll_back,
    run,
    value_refused,
)

__all__ = [
    "DEFAULT_KEEP",
    "DIGEST_PREFIX",
    "MAX_CONSUMER_LENGTH",
    "Inbox",
    "check_connect_url",
    "connect",
    "inbox_message_id",
    "now_sql",
    "purge_in_batches",
]

#: Seconds an inbox row is kept by default before :meth:`Inbox.purge` may delete it (7 days).
DEFAULT_KEEP: Final = 7 * 86400.0
#: Longest consumer name, in characters.
MAX_CONSUMER_LENGTH: Final = 200
#: The prefix of a dedup id the transactional consumer stores in digest form
#: (:func:`inbox_message_id`).
DIGEST_PREFIX: Final = "oncely-sha256:"


def inbox_message_id(dedup_id: str) -> str:
    """The message id under which the transactional consumer (``IdempotentConsumer(inbox=...)``)
    records ``dedup_id`` in the inbox: ``dedup_id`` itself when it fits the column (at most
    :data:`~oncely.messaging.dedup.MAX_ID_LENGTH`, 255, characters) and does not start with
    :data:`DIGEST_PREFIX`; else ``"oncely-sha256:" + sha256(dedup_id as UTF-8).hexdigest()``
    (78 characters), the digest the record stores key claim mode by
    (:func:`oncely.core.records.digest_key`). So the transactional mode takes every dedup id the
    claim mode takes (a 300-character id, a 400-digit number), and two ids share a row only if
    their SHA-256 digests collide (an id that itself starts with the prefix is digested too, so
    it never meets another id's digest form). To find such a message's row yourself, call this
    function on its dedup id."""
    if len(dedup_id) <= MAX_ID_LENGTH and not dedup_id.startswith(DIGEST_PREFIX):
        return dedup_id
    return DIGEST_PREFIX + digest_key(dedup_id)


_NOW: Final[dict[str, str]] = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "extract(epoch FROM clock_timestamp())::float8",
    "mysql": "UNIX_TIMESTAMP(NOW(6))",
}


def now_sql(dialect: str) -> str:
    """The database's clock in seconds since the epoch, as SQL for ``dialect`` (``sqlite``,
    ``postgresql``, ``mysql``); what inbox and outbox rows are stamped and purged with."""
    return _NOW[dialect]


#: The query options a ``sqlite:///`` URL given to :func:`connect` takes.
_SQLITE_OPTIONS: Final = ("busy_timeout",)


def check_connect_url(url: str, *, is_async: bool = False) -> None:
    """Refuse a database URL :func:`connect` (or, ``is_async``, the transactional consumer's
    async face) would refuse, without connecting: a misspelled query option
    (``?connect_timout=1``), a bad number, another scheme. A component given a connection URL
    checks it when it is built, as a store URL is (:meth:`oncely.stores.base.Store.check_url`),
    not at every message.

    :raises ConfigurationError: the URL is not one :func:`connect` opens.
    """
    from oncely.backends.urls import redact_url, scheme_of
    from oncely.settings import text

    scheme = scheme_of(text(url, "url", where="database URL"))
    if scheme == "sqlite" and not is_async:
        from oncely.backends.sqlite import parse_url

        parse_url(url, "SQLite URL", _SQLITE_OPTIONS)
    elif scheme in ("postgresql", "postgres"):
        from oncely.backends.postgres import conninfo

        conninfo(url)
    elif scheme in ("mysql", "mariadb"):
        from oncely.backends.mysql import connect_args

        connect_args(url)
    elif is_async:
        raise ConfigurationError(_ASYNC_SCHEMES.format(url=redact_url(url)))
    else:
        raise ConfigurationError(_SCHEMES.format(url=redact_url(url)))


_SCHEMES: Final = (
    "{url!r}: give sqlite:///file.db, postgresql://user@host/db or mysql://user@host/db"
)
_ASYNC_SCHEMES: Final = (
    "{url!r}: an async handler needs postgresql:// or mysql:// (or pass connect= a callable "
    "returning an async connection, e.g. an SQLAlchemy AsyncConnection on sqlite+aiosqlite); "
    "or make the handler sync"
)


def connect(url: str, *, create: bool = True) -> Any:
    """A new DB-API connection for ``sqlite:///file.db``, ``postgresql://…`` or
    ``mysql://…`` / ``mariadb://…`` (for relays and ``oncely inbox purge``); close it when
    done. ``create=False``: never create a missing SQLite file (opened ``mode=rw``, as
    ``oncely check`` opens stores), for commands that only read or delete.

    :raises ConfigurationError: another scheme, or a malformed URL.
    :raises SchemaMissing: ``create=False`` and the SQLite file does not exist.
    """
    from oncely.backends.urls import scheme_of

    scheme = scheme_of(url)
    if scheme == "sqlite":
        from oncely.backends.sqlite import parse_url

        path, options = parse_url(url, "SQLite URL", _SQLITE_OPTIONS)
        target = path
        if not create and path != ":memory:":
            if not os.path.exists(path):
                raise SchemaMissing(
                    f"{path!r} does not exist (nothing was created): check the path, or create "
                    "the table first (Inbox().create_table(conn) / Outbox().create_table(conn))"
                )
            target = pathlib.Path(os.path.abspath(path)).as_uri() + "?mode=rw"
        conn = sqlite3.connect(
            target,
            timeout=float(options.get("busy_timeout", 15)),
            check_same_thread=False,
            uri=target != path,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        return conn
    if scheme in ("postgresql", "postgres"):
        import psycopg

        from oncely.backends.postgres import conninfo

        return psycopg.connect(conninfo(url))
    if scheme in ("mysql", "mariadb"):
        import pymysql

        from oncely.backends.mysql import connect_args

        return pymysql.connect(**connect_args(url), charset="utf8mb4")
    raise ConfigurationError(
        f"{url!r}: give sqlite:///file.db, postgresql://user@host/db or mysql://user@host/db"
    )


def _index_name(table: str, suffix: str) -> str:
    return f"{table.rsplit('.', 1)[-1]}_{suffix}"[:63]


def check_table(table: Any, param: str = "table") -> str:
    """``table`` if it is a plain SQL identifier, optionally ``schema.table``.

    :param param: the argument's name, for the message (``"history_table"``).
    :raises ConfigurationError: not a str, or not such an identifier.
    """
    if not isinstance(table, str) or not re.fullmatch(
        r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?", table
    ):
        raise ConfigurationError(
            f"{param}={table!r} is not a plain SQL identifier: use letters, digits and '_' "
            "(at most 63, not starting with a digit), optionally 'schema.table'"
        )
    return table


def translate(exc: Exception, what: str) -> BaseException:
    """A driver error as a typed oncely error: a concurrent writer's refusal (serialization
    failure, deadlock, lock wait timeout, SQLite busy) is :class:`~oncely.errors.DatabaseBusy`
    through :func:`oncely.sql.connections.busy`, the one translation every SQL mechanism uses
    (retryable: roll back and run the transaction again); a missing table says how to create
    it; anything else is a :class:`~oncely.errors.StoreError`."""
    transient = busy(exc, what)
    if transient is not exc:
        return transient
    missing = missing_object(exc)
    if missing is not None:
        return type(missing)(f"{missing} ({what})")
    refused = value_refused(exc, what)
    if refused is not None:
        return refused
    return StoreError(f"{what} failed: {type(exc).__name__}: {exc}")


def purge_in_batches(
    conn: SqlConnection, delete: str, params: dict[str, Any], batch: int
) -> Plan[int]:
    """Delete in batches of at most ``batch`` rows, each batch its own short transaction, until
    one deletes fewer: a plan (sync or async). Refuses a connection inside a transaction (the
    batches must commit as they go, so live inserts never wait long)."""
    batch = count_of(batch, "batch", where="purge")
    if conn.in_transaction():
        raise ConfigurationError(
            "purge commits after each batch: give it a connection with no open transaction "
            "(commit or roll back first, or open a new one)"
        )
    total = 0
    while True:
        # READ COMMITTED on MySQL/MariaDB: the DELETE locks only the rows it deletes, no gaps,
        # so rows inserted or marked meanwhile (stamped now, at the end of the time index)
        # never wait for a purge batch
        block = yield Enter(savepoint=False, read_committed=True)
        try:
            result = yield Exec(delete, {**params, "batch": batch})
        except BaseException as exc:
            yield from roll_back(block, exc)
            if isinstance(exc, Exception) and not isinstance(exc, OncelyError):
                raise translate(exc, "purge") from exc
            raise
        yield Leave(block, True)
        count = int(result.rowcount)
        total += max(0, count)
        if count < batch:
            return total


class Inbox:
    """The inbox table ``table`` (see the module docs): rows ``(consumer, message_id,
    received_at)``, unique on ``(consumer, message_id)``, ``received_at`` in seconds since the
    epoch on the database's clock.

    :param table: table name, optionally ``schema.table`` (plain identifiers only).
    :raises ConfigurationError: a table name that is not a plain identifier.
    """

    def __init__(self, table: str = "oncely_inbox") -> None:
        self.table = check_table(table)

    def __repr__(self) -> str:
        return f"Inbox(table={self.table!r})"

    # -- SQL -----------------------------------------------------------------------------------
    def schema_sql(self, dialect: Dialect) -> list[str]:
        """The statements :meth:`create_table` runs on ``dialect`` (for a migration tool)."""
        t = quote(self.table, dialect)
        index = quote(_index_name(self.table, "received_at"), dialect)
        if dialect == "mysql":
            return [
                # VARBINARY: byte comparison (utf8mb4_bin is PAD SPACE: "m-1 " would be taken
                # for a redelivery of "m-1" and its handler skipped)
                f"CREATE TABLE IF NOT EXISTS {t} (consumer VARBINARY({4 * MAX_CONSUMER_LENGTH})"
                " NOT NULL, message_id VARBINARY(1020) NOT NULL, received_at DOUBLE NOT NULL, "
                f"PRIMARY KEY (consumer, message_id), KEY {index} (received_at)) "
                "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
            ]
        kind = "REAL" if dialect == "sqlite" else "double precision"
        return [
            f"CREATE TABLE IF NOT EXISTS {t} (consumer TEXT NOT NULL, message_id TEXT NOT NULL, "
            f"received_at {kind} NOT NULL, PRIMARY KEY (consumer, message_id))",
            f"CREATE INDEX IF NOT EXISTS {index} ON {t} (received_at)",
        ]

    def _accept_sql(self, dialect: Dialect) -> str:
        t = quote(self.table, dialect)
        values = f"(:consumer, :message_id, {_NOW[dialect]})"
        if dialect == "mysql":
            return f"INSERT IGNORE INTO {t} (consumer, message_id, received_at) VALUES {values}"
        return (
            f"INSERT INTO {t} (consumer, message_id, received_at) VALUES {values} "
            "ON CONFLICT (consumer, message_id) DO NOTHING"
        )

    def _purge_sql(self, dialect: Dialect) -> str:
        t = quote(self.table, dialect)
        old = f"received_at < {_NOW[dialect]} - :older_than"
        if dialect == "mysql":
            return f"DELETE FROM {t} WHERE {old} ORDER BY received_at LIMIT :batch"
        if dialect == "sqlite":
            return (
                f"DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} WHERE {old} LIMIT :batch)"
            )
        # SKIP LOCKED: rows a live transaction holds are left for the next run, never waited on
        return (
            f"DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {old} "
            "LIMIT :batch FOR UPDATE SKIP LOCKED))"
        )

    # -- plans ---------------------------------------------------------------------------------
    def _create(self, conn: SqlConnection) -> Plan[None]:
        yield from exec_in_block(self.schema_sql(conn.dialect))

    def commit_held(
        self, conn: SqlConnection, block: Any, consumer: Any, message_id: Any, who: str
    ) -> Plan[None]:
        """Commit ``block`` only if, when it owns its transaction, the row :meth:`accept`
        inserted is still in it (:func:`oncely.sql.connections.commit_if_held`: on PostgreSQL
        the check goes with the ``COMMIT``, one round trip). ``who`` names the code that ran
        inside, for the error.

        :raises TransactionLost: that code ended the transaction itself (a rollback or a
            commit): what was still open is rolled back, nothing is committed.
        """
        return commit_if_held(
            conn,
            block,
            quote(self.table, conn.dialect),
            "consumer = :consumer AND message_id = :message_id",
            self.key_params(consumer, message_id),
            lost_message(who, "the inbox row"),
        )

    @staticmethod
    def key_params(consumer: Any, message_id: Any) -> dict[str, str]:
        """The parameters ``consumer`` and ``message_id`` of a row, validated.

        :raises InvalidKey: an empty or over-long consumer or message id.
        """
        return {"consumer": _consumer(consumer), "message_id": message_id_text(message_id)}

    def _accept(
        self, conn: SqlConnection, consumer: Any, message_id: Any, guarded: bool = False
    ) -> Plan[bool]:
        params = self.key_params(consumer, message_id)
        conn.check_usable()
        conn.require_transaction("Inbox.accept")
        plan = self._insert(conn, params)
        if guarded:  # in the caller's transaction (receive() has a block of its own)
            plan = first_use_guarded(conn, ("inbox", self.table), plan)
        return (yield from plan)

    def accept_plan(self, conn: SqlConnection, consumer: Any, message_id: Any) -> Plan[bool]:
        """:meth:`accept` as a sans-IO plan on an adapted connection, for a mechanism that runs
        it in a block of its own whose commit checks the row (the transactional consumer,
        :meth:`commit_held`): no first-use savepoint, since a row written in a savepoint carries
        the subtransaction's id, not the one the check compares. Same rules and errors."""
        return self._accept(conn, consumer, message_id)

    def _insert(self, conn: SqlConnection, params: dict[str, str]) -> Plan[bool]:
        try:
            result = yield Exec(self._accept_sql(conn.dialect), params)
        except Exception as exc:
            raise translate(exc, f"inbox {self.table!r}") from exc
        return bool(result.rowcount == 1)

    def _purge(self, conn: SqlConnection, older_than: float, batch: int) -> Plan[int]:
        older_than = seconds(older_than, "older_than", where="Inbox.purge", above=False)
        sql = self._purge_sql(conn.dialect)
        return (yield from purge_in_batches(conn, sql, {"older_than": older_than}, batch))

    # -- sync face -----------------------------------------------------------------------------
    def create_table(self, conn: Any) -> None:
        """Create the table and its index if missing (a transaction of its own, or a savepoint
        inside the caller's)."""
        c = adapt(conn)
        run(self._create(c), c)

    def accept(self, conn: Any, consumer: str, message_id: Any) -> bool:
        """Record ``message_id`` for ``consumer`` in the caller's open transaction: True the
        first time (apply the effect in the same transaction), False for a message already
        recorded by a committed transaction. Waits for an uncommitted transaction holding the
        same pair. One statement; commits nothing.

        :raises InvalidKey: an empty or over-long consumer or message id.
        :raises UnknownTable: the inbox table does not exist (run :meth:`create_table`). On
            PostgreSQL the connection's first call per table runs in a savepoint
            (:func:`oncely.sql.connections.first_use_guarded`): the caller's transaction keeps
            its earlier writes. After a call that worked, a failing statement (the table
            dropped since) aborts the transaction: the message says so; roll it back.
        :raises ValueRefused: the database refused a value (same rule for the transaction).
        :raises TransactionFailed: the caller's transaction already failed.
        :raises ConfigurationError: ``conn`` is in autocommit mode with no transaction open
            (the inbox row would commit before the handler's writes; use :meth:`receive`).
        """
        c = adapt(conn)
        return bool(run(self._accept(c, consumer, message_id, guarded=True), c))

    @contextlib.contextmanager
    def receive(self, conn: Any, consumer: str, message_id: Any) -> Iterator[bool]:
        """A block that yields :meth:`accept`'s answer: commits on success, rolls back (the
        inbox row with the effect) if the body raises, so the redelivery runs it again. With no
        transaction open on ``conn`` the block is its own transaction; inside one it is a
        savepoint and the caller commits.

        :raises AutocommitConnection: ``conn`` is in autocommit mode (even inside a ``BEGIN``
            the caller sent; psycopg's ``with conn.transaction():`` is taken).
        :raises TransactionLost: the body ended the block's own transaction, or the caller's,
            itself (called ``conn.rollback()`` or ``conn.commit()``): nothing more is
            committed (see :meth:`commit_held`).
        :raises TransactionFailed: a statement in the body failed and the body caught the error
            (PostgreSQL aborts the transaction): the block is rolled back, the message is not
            recorded (its redelivery runs it again)."""
        c = adapt(conn)
        block = c.enter(savepoint=True, held=True)
        try:
            first = run(self._accept(c, consumer, message_id), c)
            yield first
        except BaseException as exc:
            # a failing rollback (a connection a cancelled statement left dead) never
            # replaces a cancellation or an interrupt (roll_back)
            run(roll_back(block, exc), c)
            raise
        if first and block.owned:
            run(self.commit_held(c, block, consumer, message_id, "the receive() block"), c)
        else:
            run(leave_usable(c, block), c)

    def purge(self, conn: Any, older_than: float = DEFAULT_KEEP, *, batch: int = 1000) -> int:
        """Delete rows received more than ``older_than`` seconds ago (database clock), in
        batches of ``batch`` rows, each its own transaction (PostgreSQL skips rows a live
        transaction holds). Returns how many. ``conn`` must have no open transaction."""
        c = adapt(conn)
        return int(run(self._purge(c, older_than, batch), c, what=f"purge of {self.table}"))

    # -- async face ----------------------------------------------------------------------------
    async def acreate_table(self, conn: Any) -> None:
        """The async face of :meth:`create_table`."""
        c = adapt(conn)
        await arun(self._create(c), c)

    async def aaccept(self, conn: Any, consumer: str, message_id: Any) -> bool:
        """The async face of :meth:`accept`."""
        c = adapt(conn)
        return bool(await arun(self._accept(c, consumer, message_id, guarded=True), c))

    @contextlib.asynccontextmanager
    async def areceive(self, conn: Any, consumer: str, message_id: Any) -> AsyncIterator[bool]:
        """The async face of :meth:`receive`."""
        c = adapt(conn)
        block = await c.aenter(savepoint=True, held=True)
        try:
            first = await arun(self._accept(c, consumer, message_id), c)
            yield first
        except BaseException as exc:
            await arun(roll_back(block, exc), c)
            raise
        if first and block.owned:
            held = self.commit_held(c, block, consumer, message_id, "the areceive() block")
            await arun(held, c)
        else:
            await arun(leave_usable(c, block), c)

    async def apurge(
        self, conn: Any, older_than: float = DEFAULT_KEEP, *, batch: int = 1000
    ) -> int:
        """The async face of :meth:`purge`."""
        c = adapt(conn)
        return int(await arun(self._purge(c, older_than, batch), c, what=f"purge of {self.table}"))


def _consumer(consumer: Any) -> str:
    if isinstance(consumer, str) and consumer and len(consumer) <= MAX_CONSUMER_LENGTH:
        return stored_text(consumer, "consumer")
    raise InvalidKey(
        f"consumer={consumer!r}: name the consumer (a non-empty str of at most "
        f"{MAX_CONSUMER_LENGTH} characters, stable across deploys, e.g. 'billing')"
    )
