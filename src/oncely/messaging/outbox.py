"""The transactional outbox: messages written in the business transaction, published after it
commits by a relay, with stable ids.

Publishing to a broker inside a database transaction is two writes that cannot commit together:
a crash between them loses the message or sends one for a rolled-back change. The outbox writes
the message as a row in the same transaction as the business change; a :class:`Relay` publishes
committed rows and marks them sent::

    from oncely.messaging.outbox import Outbox, Relay

    outbox = Outbox()                                  # table "oncely_outbox"
    outbox.create_table(conn)
    with conn:                                          # the business transaction
        conn.execute("INSERT INTO orders ...")
        outbox.add(conn, "orders.created", payload, message_id=f"order-{order_id}")

    relay = Relay(outbox, "postgresql://…", publish=send)   # send(message) -> None
    relay.run(stop)                                     # or relay.run_once()

Delivery is at least once, with the same message id every time: a relay killed after
publishing part of a batch and before marking it sent publishes that part again after a
restart, with the same ids, so a consumer with an :class:`~oncely.messaging.inbox.Inbox` (or a
broker that drops duplicate publishes by id, like NATS JetStream's ``Nats-Msg-Id`` inside its
window) applies each message once. Nothing is lost: a row is marked sent only in the
transaction that claimed it, after its publish returned.

A relay claims a batch in one transaction: ``SELECT … WHERE sent_at IS NULL ORDER BY id LIMIT n
FOR UPDATE SKIP LOCKED`` on PostgreSQL and MariaDB/MySQL (concurrent relays take different
rows), under SQLite's single writer (``BEGIN IMMEDIATE``: keep batches small there, since
business writes wait while a batch is published). It publishes each message in id order, then
marks the published ones sent (by primary key) and commits. If a publish raises, the messages
before it are marked sent, the rest stay for the next batch, and the error propagates. A
connection that dies (the relay was killed) rolls the claim back on the server, so the rows are
free again.

On MariaDB/MySQL the batch's transaction runs at READ COMMITTED: under REPEATABLE READ two
relays' marks deadlocked (a scan of the primary key locking the rows the other relay claimed)
and InnoDB rolled one back after its batch was published, which was then published again. If
the mark still fails after the publish (a deadlock, a dead connection), the published rows are
marked in a new transaction (:data:`MARK_ATTEMPTS`; on a new connection for a relay opened from
a URL) instead of being published again; only if that fails too does the pass raise a
:class:`~oncely.errors.StoreError` saying they will be published again (see
docs/messaging-inbox.md).

:meth:`Outbox.purge` deletes sent rows older than a window in short batches (``oncely outbox
purge URL``); unsent rows are never purged.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from oncely.backends.plans import Exec, Plan
from oncely.backends.urls import redact_url, scheme_of
from oncely.core.observe import describe
from oncely.core.text import stored_text
from oncely.errors import (
    ConfigurationError,
    InvalidPayload,
    OncelyError,
    StoreError,
    StoreUnavailable,
)
from oncely.messaging.dedup import message_id_text
from oncely.messaging.inbox import (
    check_table,
    connect,
    now_sql,
    purge_in_batches,
    translate,
)
from oncely.settings import count, seconds
from oncely.sql.connections import (
    Dialect,
    Enter,
    Leave,
    SqlConnection,
    adapt,
    arun,
    exec_in_block,
    first_use_guarded,
    quote,
    retryable,
    roll_back,
    run,
)

__all__ = [
    "DEFAULT_KEEP_SENT",
    "DEFAULT_RECONNECTS",
    "MAX_TOPIC_LENGTH",
    "Outbox",
    "OutboxMessage",
    "Relay",
]

#: Seconds a sent row is kept by default before :meth:`Outbox.purge` may delete it (1 day).
DEFAULT_KEEP_SENT: Final = 86400.0
#: Failed passes in a row :meth:`Relay.run` reconnects after before it raises.
DEFAULT_RECONNECTS: Final = 3
#: Longest topic, in characters.
MAX_TOPIC_LENGTH: Final = 255
#: Transactions a relay tries, after the batch's own failed, to mark published rows sent.
MARK_ATTEMPTS: Final = 3

log = logging.getLogger("oncely")


@dataclass(frozen=True)
class OutboxMessage:
    """One message as the relay hands it to ``publish``: ``message_id`` is stable (publish it
    as the broker's message id, ``Nats-Msg-Id``, a header...), ``payload`` bytes, ``headers``
    a dict of str, ``id`` the row's sequence number (a batch's publish order; rows commit in
    another order than their ids, so there is no global order: see docs/messaging-inbox.md)."""

    id: int
    message_id: str
    topic: str
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)


class _Unmarked(Exception):
    """Internal: ``ids`` (``message_ids``) were published but their batch's transaction failed
    before it committed the mark (``cause``); ``failure`` the publish error that ended the
    batch, if one did."""

    def __init__(
        self,
        ids: list[int],
        message_ids: list[str],
        failure: BaseException | None,
        cause: BaseException,
    ) -> None:
        super().__init__(f"{len(ids)} published message(s) not marked sent")
        self.ids, self.message_ids, self.failure, self.cause = ids, message_ids, failure, cause


class _MarkFailed(StoreError):
    """Messages were published but could not be marked sent: they stay unsent, and the next
    batch (of any relay) publishes them again with the same message ids."""

    def __init__(self, table: str, unmarked: _Unmarked, exc: BaseException) -> None:
        shown = ", ".join(repr(m) for m in unmarked.message_ids[:5])
        more = "" if len(unmarked.message_ids) <= 5 else ", ..."
        super().__init__(
            f"outbox relay on {table!r} published {len(unmarked.ids)} message(s) ({shown}{more}) "
            f"but could not mark them sent ({describe(exc)}): they will be published again "
            "with the same message ids (consumers drop the repeats with an Inbox)"
        )
        self.unmarked = unmarked


class _Publish(NamedTuple):
    """Request: publish ``message`` (the reply is ``None``)."""

    message: OutboxMessage


def _payload(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        try:
            return payload.encode()
        except UnicodeEncodeError as exc:
            raise InvalidPayload(
                f"outbox payload has no UTF-8 form ({exc}): encode it to bytes yourself"
            ) from None
    raise InvalidPayload(
        f"outbox payload must be bytes or str, not {type(payload).__name__}: encode it first "
        "(e.g. json.dumps(obj).encode())"
    )


def _headers(headers: Mapping[str, str] | None) -> str:
    if headers is None:
        return "{}"
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise InvalidPayload("outbox headers must be a mapping of str to str")
    return json.dumps(dict(headers), sort_keys=True)


class Outbox:
    """The outbox table ``table`` (see the module docs): rows ``(id, message_id, topic,
    payload, headers, created_at, sent_at)``, ``message_id`` unique, times in seconds since the
    epoch on the database's clock.

    :param table: table name, optionally ``schema.table`` (plain identifiers only).
    :raises ConfigurationError: a table name that is not a plain identifier.
    """

    def __init__(self, table: str = "oncely_outbox") -> None:
        self.table = check_table(table)

    def __repr__(self) -> str:
        return f"Outbox(table={self.table!r})"

    # -- SQL -----------------------------------------------------------------------------------
    # MariaDB/MySQL: message_id is VARBINARY (compared byte for byte: utf8mb4_bin is PAD SPACE,
    # so "m-1 " would be a duplicate of "m-1" and never sent).
    def schema_sql(self, dialect: Dialect) -> list[str]:
        """The statements :meth:`create_table` runs on ``dialect`` (for a migration tool)."""
        t = quote(self.table, dialect)
        base = self.table.rsplit(".", 1)[-1]
        unsent = quote(f"{base}_unsent"[:63], dialect)
        sent = quote(f"{base}_sent_at"[:63], dialect)
        if dialect == "mysql":
            return [
                f"CREATE TABLE IF NOT EXISTS {t} (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, "
                "message_id VARBINARY(1020) NOT NULL, topic VARCHAR(255) NOT NULL, "
                "payload LONGBLOB NOT NULL, headers TEXT NOT NULL, created_at DOUBLE NOT NULL, "
                f"sent_at DOUBLE NULL, UNIQUE KEY {quote(base + '_message_id', dialect)} "
                f"(message_id), KEY {unsent} (sent_at, id)) "
                "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
            ]
        if dialect == "sqlite":
            columns = (
                "id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE, "
                "topic TEXT NOT NULL, payload BLOB NOT NULL, headers TEXT NOT NULL, "
                "created_at REAL NOT NULL, sent_at REAL"
            )
        else:
            columns = (
                "id bigserial PRIMARY KEY, message_id text NOT NULL UNIQUE, topic text NOT NULL, "
                "payload bytea NOT NULL, headers text NOT NULL, "
                "created_at double precision NOT NULL, sent_at double precision"
            )
        return [
            f"CREATE TABLE IF NOT EXISTS {t} ({columns})",
            f"CREATE INDEX IF NOT EXISTS {unsent} ON {t} (id) WHERE sent_at IS NULL",
            f"CREATE INDEX IF NOT EXISTS {sent} ON {t} (sent_at) WHERE sent_at IS NOT NULL",
        ]

    def _add_sql(self, dialect: Dialect) -> str:
        t = quote(self.table, dialect)
        columns = "(message_id, topic, payload, headers, created_at)"
        values = f"(:message_id, :topic, :payload, :headers, {now_sql(dialect)})"
        if dialect == "mysql":
            # hex text, not bytes: aiomysql cannot escape bytes on PyMySQL 1.2.3+ (aiomysql#1080)
            values = values.replace(":payload", "UNHEX(:payload)")
            return f"INSERT IGNORE INTO {t} {columns} VALUES {values}"
        return f"INSERT INTO {t} {columns} VALUES {values} ON CONFLICT (message_id) DO NOTHING"

    def _claim_sql(self, dialect: Dialect) -> str:
        t = quote(self.table, dialect)
        lock = "" if dialect == "sqlite" else " FOR UPDATE SKIP LOCKED"
        return (
            f"SELECT id, message_id, topic, payload, headers FROM {t} WHERE sent_at IS NULL "
            f"ORDER BY id LIMIT :batch{lock}"
        )

    def _sent_sql(self, dialect: Dialect, count: int) -> str:
        t = quote(self.table, dialect)
        ids = ", ".join(f":i{n}" for n in range(count))
        # by primary key, in id order; "sent_at IS NULL": a mark run again after its batch's
        # transaction failed (_mark) keeps the time of a mark that did commit
        return (
            f"UPDATE {t} SET sent_at = {now_sql(dialect)} WHERE id IN ({ids}) AND sent_at IS NULL"
        )

    def _purge_sql(self, dialect: Dialect) -> str:
        t = quote(self.table, dialect)
        old = f"sent_at IS NOT NULL AND sent_at < {now_sql(dialect)} - :older_than"
        if dialect == "mysql":
            return f"DELETE FROM {t} WHERE {old} ORDER BY sent_at LIMIT :batch"
        if dialect == "sqlite":
            return f"DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE {old} LIMIT :batch)"
        return (
            f"DELETE FROM {t} WHERE id = ANY(ARRAY(SELECT id FROM {t} WHERE {old} "
            "LIMIT :batch FOR UPDATE SKIP LOCKED))"
        )

    # -- plans ---------------------------------------------------------------------------------
    def _create(self, conn: SqlConnection) -> Plan[None]:
        yield from exec_in_block(self.schema_sql(conn.dialect))

    def _add(
        self,
        conn: SqlConnection,
        topic: Any,
        payload: Any,
        message_id: Any,
        headers: Mapping[str, str] | None,
        guarded: bool = False,
    ) -> Plan[str]:
        if not isinstance(topic, str) or not topic or len(topic) > MAX_TOPIC_LENGTH:
            raise InvalidPayload(
                f"topic={topic!r}: give a non-empty str of at most {MAX_TOPIC_LENGTH} characters"
            )
        stored_text(topic, "topic", InvalidPayload)
        mid = uuid.uuid4().hex if message_id is None else message_id_text(message_id)
        body = _payload(payload)
        params: dict[str, Any] = {
            "message_id": mid,
            "topic": topic,
            # hex text on MySQL (see _add_sql)
            "payload": body.hex() if conn.dialect == "mysql" else body,
            "headers": _headers(headers),
        }
        conn.check_usable()
        conn.require_transaction("Outbox.add")
        plan = self._insert(conn, params)
        if guarded:  # in the caller's transaction (add_plan runs in a block of its caller's)
            plan = first_use_guarded(conn, ("outbox", self.table), plan)
        yield from plan
        return mid

    def _insert(self, conn: SqlConnection, params: dict[str, Any]) -> Plan[None]:
        try:
            yield Exec(self._add_sql(conn.dialect), params)
        except Exception as exc:
            raise translate(exc, f"outbox {self.table!r}") from exc

    def _purge(self, conn: SqlConnection, older_than: float, batch: int) -> Plan[int]:
        older_than = seconds(older_than, "older_than", where="Outbox.purge", above=False)
        sql = self._purge_sql(conn.dialect)
        return (yield from purge_in_batches(conn, sql, {"older_than": older_than}, batch))

    def _batch(self, conn: SqlConnection, batch: int) -> Plan[int]:
        """Claim up to ``batch`` unsent rows, publish them in order, mark the published ones
        sent, commit; the number published. A database error comes out as a typed oncely
        error (:class:`~oncely.errors.StoreError` and kin); a publish error as itself, after
        the messages before it were marked sent."""
        if conn.in_transaction():
            raise ConfigurationError(
                "a relay runs its own transactions: give it a connection with no open "
                "transaction, used by nothing else"
            )
        try:
            done, failure = yield from self._claim_publish_mark(conn, batch)
        except _Unmarked as unmarked:
            # published, but the batch's transaction failed: mark them in a new one
            log.warning(
                "oncely: outbox relay on %r published %d message(s) but could not mark them "
                "sent (%s); marking them again in a new transaction",
                self.table,
                len(unmarked.ids),
                describe(unmarked.cause),
            )
            yield from self._mark(conn, unmarked)
            done, failure = len(unmarked.ids), unmarked.failure
        except OncelyError:
            raise
        except Exception as exc:
            raise translate(exc, f"outbox relay on {self.table!r}") from exc
        if failure is not None:
            raise failure
        return done

    def _mark(self, conn: SqlConnection, unmarked: _Unmarked) -> Plan[None]:
        """Mark ``unmarked.ids`` (published) sent in a transaction of their own, running it
        again on a deadlock or serialization failure, up to :data:`MARK_ATTEMPTS` times.

        :raises _MarkFailed: it did not commit (a :class:`~oncely.errors.StoreError`; the
            rows stay unsent and are published again by the next batch)."""
        params = {f"i{n}": i for n, i in enumerate(unmarked.ids)}
        sql = self._sent_sql(conn.dialect, len(unmarked.ids))
        for attempt in range(1, MARK_ATTEMPTS + 1):
            try:
                block = yield Enter(savepoint=False, read_committed=True)
                try:
                    yield Exec(sql, params)
                except BaseException as exc:
                    yield from roll_back(block, exc)
                    raise
                yield Leave(block, True)
                return
            except Exception as exc:
                if attempt < MARK_ATTEMPTS and retryable(exc):
                    continue
                raise _MarkFailed(self.table, unmarked, exc) from exc

    def _claim_publish_mark(
        self, conn: SqlConnection, batch: int
    ) -> Plan[tuple[int, BaseException | None]]:
        # READ COMMITTED on MySQL/MariaDB: under REPEATABLE READ the claim's gap locks and the
        # mark's scan (which may read rows past its own) made two relays deadlock on their
        # marks, and the loser rolled back a batch it had published (see the module docs)
        block = yield Enter(savepoint=False, read_committed=True)
        done: list[int] = []
        messages: list[str] = []
        failure: BaseException | None = None
        try:
            claimed = yield Exec(self._claim_sql(conn.dialect), {"batch": batch})
            for row in claimed.rows:
                message = OutboxMessage(
                    int(row[0]), _text(row[1]), _text(row[2]), bytes(row[3]), json.loads(row[4])
                )
                try:
                    yield _Publish(message)
                except Exception as exc:
                    failure = exc
                    break
                done.append(message.id)
                messages.append(message.message_id)
            if done:
                params = {f"i{n}": i for n, i in enumerate(done)}
                yield Exec(self._sent_sql(conn.dialect, len(done)), params)
        except BaseException as exc:
            if not (done and isinstance(exc, Exception)):
                yield from roll_back(block, exc)
                raise
            # published, not marked: whatever the rollback says (a dead connection fails it
            # too, and the server rolls back itself), the published rows are marked again
            with contextlib.suppress(Exception):
                yield from roll_back(block, exc)
            raise _Unmarked(done, messages, failure, exc) from exc
        try:
            yield Leave(block, True)
        except Exception as exc:
            if done:
                raise _Unmarked(done, messages, failure, exc) from exc
            raise
        return len(done), failure

    def add_plan(
        self,
        conn: SqlConnection,
        topic: str,
        payload: bytes | str,
        *,
        message_id: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Plan[str]:
        """:meth:`add` as a sans-IO plan on an adapted connection (one ``Exec``), for mechanisms
        that write a message inside a plan of their own (:class:`~oncely.statemachine.sql.
        SqlStateMachine` with ``outbox_table=``). Same rules and errors as :meth:`add`."""
        return self._add(conn, topic, payload, message_id, headers)

    # -- sync face -----------------------------------------------------------------------------
    def create_table(self, conn: Any) -> None:
        """Create the table and its indexes if missing."""
        c = adapt(conn)
        run(self._create(c), c)

    def add(
        self,
        conn: Any,
        topic: str,
        payload: bytes | str,
        *,
        message_id: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Write a message in the caller's open transaction (it is published only if that
        transaction commits); returns its message id. ``message_id`` should be stable for the
        business fact (``f"order-{id}-created"``), so a retried transaction that already
        committed adds nothing the second time (``ON CONFLICT DO NOTHING``; the first payload
        wins); default: a new UUID. One statement; commits nothing.

        :raises ConfigurationError: ``conn`` is in autocommit mode with no transaction open
            (the message would commit alone, outside the business transaction).
        :raises InvalidPayload: payload not bytes/str, headers not str to str, a bad topic.
        :raises InvalidKey: an unusable message id.
        :raises UnknownTable: the outbox table does not exist (run :meth:`create_table`). On
            PostgreSQL the connection's first call per table runs in a savepoint
            (:func:`oncely.sql.connections.first_use_guarded`): the caller's transaction keeps
            its earlier writes. After a call that worked, a failing statement (the table
            dropped since) aborts the transaction: the message says so; roll it back.
        :raises ValueRefused: the database refused a value (same rule for the transaction).
        """
        c = adapt(conn)
        return str(run(self._add(c, topic, payload, message_id, headers, guarded=True), c))

    def purge(self, conn: Any, older_than: float = DEFAULT_KEEP_SENT, *, batch: int = 1000) -> int:
        """Delete rows sent more than ``older_than`` seconds ago (database clock) in batches of
        ``batch``, each its own transaction; unsent rows are never deleted. Returns how many.
        ``conn`` must have no open transaction."""
        c = adapt(conn)
        return int(run(self._purge(c, older_than, batch), c, what=f"purge of {self.table}"))

    # -- async face ----------------------------------------------------------------------------
    async def acreate_table(self, conn: Any) -> None:
        """The async face of :meth:`create_table`."""
        c = adapt(conn)
        await arun(self._create(c), c)

    async def aadd(
        self,
        conn: Any,
        topic: str,
        payload: bytes | str,
        *,
        message_id: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """The async face of :meth:`add`."""
        c = adapt(conn)
        return str(await arun(self._add(c, topic, payload, message_id, headers, guarded=True), c))

    async def apurge(
        self, conn: Any, older_than: float = DEFAULT_KEEP_SENT, *, batch: int = 1000
    ) -> int:
        """The async face of :meth:`purge`."""
        c = adapt(conn)
        return int(await arun(self._purge(c, older_than, batch), c, what=f"purge of {self.table}"))


Publish = Callable[[OutboxMessage], Any]


class Relay:
    """Publishes committed outbox rows (see the module docs).

    :param outbox: the :class:`Outbox`.
    :param connection: a URL (``sqlite:///…``, ``postgresql://…``, ``mysql://…``; the relay
        opens its own DB-API connection) or a connection :func:`~oncely.sql.connections.adapt`
        takes, used by the relay alone and never inside a transaction. The async faces need an
        async connection (psycopg ``AsyncConnection``, aiomysql, SQLAlchemy async).
    :param publish: ``publish(message: OutboxMessage)``; returns once the broker has the
        message (publisher confirms, ``XADD``'s reply, a JetStream ack). May be a coroutine
        function on the async faces. Raising stops the batch (see the module docs).
    :param batch: rows claimed per transaction (>= 1).
    """

    def __init__(
        self, outbox: Outbox, connection: Any, *, publish: Publish, batch: int = 100
    ) -> None:
        if not isinstance(outbox, Outbox):
            raise ConfigurationError("Relay(outbox, ...) takes an oncely Outbox")
        if not callable(publish):
            raise ConfigurationError("publish= must be a callable taking an OutboxMessage")
        batch = count(batch, "batch", where="Relay")
        self.outbox = outbox
        self.publish = publish
        self.batch = batch
        self._url = connection if isinstance(connection, str) else None
        self._raw: Any = None
        self._conn: SqlConnection | None = None
        if self._url is None:
            self._raw, self._conn = connection, adapt(connection)
        elif scheme_of(self._url) not in ("sqlite", "postgresql", "postgres", "mysql", "mariadb"):
            connect(self._url)  # raises ConfigurationError: a bad URL fails here, not later

    def _connection(self) -> SqlConnection:
        """The relay's connection; one opened from the URL is opened again after a failure."""
        if self._conn is None:
            assert self._url is not None
            try:
                self._raw = connect(self._url)
            except ConfigurationError:
                raise
            except Exception as exc:
                raise StoreUnavailable(
                    f"outbox relay cannot connect to {redact_url(self._url)}: {exc}; nothing "
                    "was published or marked, run it again once the database is back"
                ) from exc
            self._conn = adapt(self._raw)
        return self._conn

    def _failed(self) -> None:
        """After a database error: drop a connection the relay opened (the next batch opens a
        new one); one passed in is the caller's to repair."""
        if self._url is not None and self._raw is not None:
            raw, self._raw, self._conn = self._raw, None, None
            with contextlib.suppress(Exception):
                raw.close()

    def close(self) -> None:
        """Close the connection the relay opened from a URL (one passed in is the caller's)."""
        if self._url is not None and self._raw is not None:
            raw, self._raw, self._conn = self._raw, None, None
            raw.close()

    def _unmarked(self, exc: StoreError) -> StoreError:
        """Log (ERROR) that published messages stay unsent; the error to raise."""
        log.error("oncely: %s", describe(exc))
        return exc

    def _still_unmarked(self, first: _MarkFailed, again: StoreError) -> StoreError:
        if isinstance(again, _MarkFailed):
            return again
        return _MarkFailed(self.outbox.table, first.unmarked, again)

    def _remarked(self, exc: _MarkFailed) -> int:
        """After marking ``exc``'s messages on a new connection: their count, or the publish
        error that ended their batch."""
        if exc.unmarked.failure is not None:
            raise exc.unmarked.failure
        return len(exc.unmarked.ids)

    # -- the relay's own request (publish): the rest runs on oncely.sql.connections.run/arun --
    def _publish(self, request: Any) -> None:
        if type(request) is not _Publish:
            raise TypeError(f"unknown request {request!r}")
        result = self.publish(request.message)
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if close is not None:
                close()  # a coroutine never awaited
            raise ConfigurationError(
                "publish returned an awaitable: use the async faces (arun_once / arun)"
            )

    async def _apublish(self, request: Any) -> None:
        if type(request) is not _Publish:
            raise TypeError(f"unknown request {request!r}")
        result = self.publish(request.message)
        if inspect.isawaitable(result):
            await result

    # -- sync ----------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Publish one batch on the relay's connection (opened on first use and kept for the
        next passes; after a database error it is dropped, and the next pass opens a new one);
        the number of messages published (0: nothing to do).

        :raises StoreUnavailable: the database cannot be reached (nothing was published).
        :raises StoreError: the batch failed in the database (nothing of it was marked sent).
        """
        conn = self._connection()
        try:
            return int(run(self.outbox._batch(conn, self.batch), conn, self._publish))
        except _MarkFailed as exc:
            self._failed()
            if self._url is None:
                raise self._unmarked(exc) from exc
            # the connection died under the mark: mark them on a new one
            try:
                conn = self._connection()
                run(self.outbox._mark(conn, exc.unmarked), conn)
            except StoreError as again:
                self._failed()
                raise self._unmarked(self._still_unmarked(exc, again)) from again
            return self._remarked(exc)
        except StoreError:
            self._failed()
            raise

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        idle: float = 1.0,
        reconnects: int = DEFAULT_RECONNECTS,
    ) -> int:
        """Publish batches until ``stop`` is set (or, without ``stop``, until the outbox is
        empty), waiting ``idle`` seconds whenever there is nothing to publish; the total
        published.

        All passes share one connection. A pass that fails in the database drops it; the
        loop waits ``idle`` seconds and the next pass opens a new one, up to ``reconnects``
        failed passes in a row (a pass that succeeds resets the count); the one after
        that raises its :class:`~oncely.errors.StoreError`. A publish error is raised at once.
        """
        _check_reconnects(reconnects)
        total = 0
        failures = 0
        while stop is None or not stop.is_set():
            try:
                count = self.run_once()
            except StoreError:
                failures += 1
                if failures > reconnects:
                    raise
                if stop is None:
                    time.sleep(idle)
                else:
                    stop.wait(idle)
                continue
            failures = 0
            total += count
            if count == 0:
                if stop is None:
                    return total
                stop.wait(idle)
        return total

    # -- async ---------------------------------------------------------------------------------
    async def arun_once(self) -> int:
        """The async face of :meth:`run_once`."""
        conn = self._connection()
        try:
            return int(await arun(self.outbox._batch(conn, self.batch), conn, self._apublish))
        except _MarkFailed as exc:
            self._failed()
            if self._url is None:
                raise self._unmarked(exc) from exc
            try:
                conn = self._connection()
                await arun(self.outbox._mark(conn, exc.unmarked), conn)
            except StoreError as again:
                self._failed()
                raise self._unmarked(self._still_unmarked(exc, again)) from again
            return self._remarked(exc)
        except StoreError:
            self._failed()
            raise

    async def arun(
        self,
        stop: asyncio.Event | None = None,
        *,
        idle: float = 1.0,
        reconnects: int = DEFAULT_RECONNECTS,
    ) -> int:
        """The async face of :meth:`run`."""
        _check_reconnects(reconnects)
        total = 0
        failures = 0
        while stop is None or not stop.is_set():
            try:
                count = await self.arun_once()
            except StoreError:
                failures += 1
                if failures > reconnects:
                    raise
                if stop is None:
                    await asyncio.sleep(idle)
                else:
                    await _wait(stop, idle)
                continue
            failures = 0
            total += count
            if count == 0:
                if stop is None:
                    return total
                await _wait(stop, idle)
        return total


def _check_reconnects(reconnects: Any) -> None:
    if not isinstance(reconnects, int) or isinstance(reconnects, bool) or reconnects < 0:
        raise ConfigurationError(f"reconnects={reconnects!r}: give a whole number >= 0")


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


def _text(value: Any) -> str:
    """A text column as ``str`` (MariaDB/MySQL VARBINARY columns come back as bytes)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    return str(value)
