"""The consumer's transactional mode: the inbox row and the handler's writes commit together,
then the message is acked.

``IdempotentConsumer(handler, name=..., inbox=Inbox(...), connect=...)`` runs each message as

1. take a connection (``connect``: a database URL, or a callable returning a connection);
2. begin a transaction the consumer owns;
3. :meth:`oncely.messaging.inbox.Inbox.accept` (one ``INSERT … ON CONFLICT DO NOTHING``):
   a duplicate (0 rows) rolls back and is acked without running the handler;
4. ``handler(delivery, conn)`` writes through ``conn``, in that transaction;
5. commit: the inbox row and the effect together, or neither; only then the adapter acks.

A consumer killed anywhere before the commit leaves nothing (the database rolls back a dead
session's transaction) and the redelivery runs; killed after the commit and before the ack,
the redelivery finds the row and is acked without running. So the effect on the database is
applied exactly once, with no kill window (Eventuate's and MassTransit's transactional inbox,
DESIGN.md "Messages").

No record-store claim is made in this mode. The inbox row *is* the claim: its unique index
makes a concurrent delivery of the same message wait until the first transaction commits (then
it is a duplicate) or rolls back (then it runs), so it is also the in-flight guard, held
exactly as long as the effect is uncommitted, released by the database when a consumer dies.
A record-store claim on top would decide nothing the row does not (a completed record only
ever follows a committed row), would make a redelivery after a kill wait out a lease, and would
make progress depend on a second system being up.

The logic is one sans-IO plan (:func:`transaction_plan`) run by a sync executor (sync handler,
sync connection) and an async one (async handler, async connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from oncely.backends.plans import Plan
from oncely.errors import (
    ConfigurationError,
    DatabaseBusy,
    OncelyError,
    StoreUnavailable,
    TransactionLost,
)
from oncely.messaging.inbox import Inbox, check_connect_url
from oncely.messaging.inbox import connect as connect_url
from oncely.sql.connections import (
    Enter,
    Leave,
    SqlConnection,
    adapt,
    arun,
    busy,
    run,
)

__all__ = ["Connections", "DatabaseBusy", "HandlerFailed", "transaction_plan"]


class _Accept(NamedTuple):
    """Request: insert the inbox row; the reply is True when it is new."""


class _Handle(NamedTuple):
    """Request: call the handler with the open connection; the reply is None."""


class HandlerFailed(Exception):
    """The handler raised ``error`` inside the transaction (which was rolled back)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


def transaction_plan(
    conn: SqlConnection, held: Callable[[Any], Plan[None]] | None = None
) -> Plan[bool]:
    """Begin, accept, handle (if new), check, commit; returns whether the handler ran. On any
    error the transaction is rolled back (a failed rollback is ignored: the connection is then
    discarded) and the error raised, a handler's wrapped in :class:`HandlerFailed`.

    ``held(block)``: the plan that commits the block only if the inbox row is still in it
    (:meth:`Inbox.commit_held`). If the handler ended the transaction itself (a rollback or a
    commit), nothing more is committed and :class:`HandlerFailed` wrapping
    :class:`~oncely.errors.TransactionLost` is raised: a failed attempt."""
    if conn.in_transaction():
        raise ConfigurationError(
            "connect() gave a connection with a transaction already open; the transactional "
            "consumer must own the transaction it commits (give a fresh or idle connection)"
        )
    block = yield Enter(savepoint=False, held=held is not None)
    try:
        first = yield _Accept()
        if first:
            try:
                yield _Handle()
            except Exception as exc:
                raise HandlerFailed(exc) from exc
        if first and held is not None:
            try:
                yield from held(block)
            except TransactionLost as exc:
                raise HandlerFailed(exc) from exc
            return True
        yield Leave(block, bool(first))  # a duplicate rolls back: it wrote nothing
    except BaseException as exc:
        with contextlib.suppress(Exception):
            yield Leave(block, False)
        # busy or not: the one classification every mechanism shares (busy()), so a lock wait
        # ended by statement_timeout is retried like one ended by lock_timeout
        if isinstance(exc, Exception) and not isinstance(exc, (OncelyError, HandlerFailed)):
            if isinstance(busy(exc, "the inbox transaction"), DatabaseBusy):
                raise DatabaseBusy(f"the inbox transaction was rolled back: {exc}") from exc
            raise StoreUnavailable(f"the inbox transaction failed: {exc}") from exc
        if isinstance(exc, HandlerFailed) and isinstance(
            busy(exc.error, "the handler's transaction"), DatabaseBusy
        ):
            raise DatabaseBusy(f"the handler's transaction was rolled back: {exc.error}") from exc
        raise
    return bool(first)


class Connections:
    """The transactional consumer's connections: made by ``connect``, kept for reuse (at most
    ``size`` idle), at most ``size`` in use at once on the async face. A connection whose
    transaction could not be ended is closed, never reused.

    :param connect: a database URL (``sqlite:///…``, ``postgresql://…``, ``mysql://…``; sync
        connections, or psycopg ``AsyncConnection`` / aiomysql for an async handler) or a
        callable returning a connection :func:`oncely.sql.connections.adapt` takes (for an
        async handler it may return an awaitable).
    """

    def __init__(self, connect: str | Callable[[], Any], size: int, is_async: bool) -> None:
        if not (isinstance(connect, str) or callable(connect)):
            raise ConfigurationError(
                f"connect={connect!r}: give a database URL or a callable returning a connection"
            )
        if not isinstance(size, int) or size < 1:
            raise ConfigurationError("pool_size must be an int >= 1")
        if isinstance(connect, str):  # a typo is refused now, not at every message
            try:
                check_connect_url(connect, is_async=is_async)
            except ConfigurationError as exc:
                raise ConfigurationError(f"connect=: {exc}") from None
        self.connect = connect
        self.size = size
        self.is_async = is_async
        self._idle: list[Any] = []
        self._mutex = threading.Lock()
        self._limit: asyncio.Semaphore | None = None

    # -- making connections ----------------------------------------------------------------------
    def _new(self) -> Any:
        if isinstance(self.connect, str):
            return connect_url(self.connect)
        return self.connect()

    async def _anew(self) -> Any:
        if isinstance(self.connect, str):
            return await _aconnect_url(self.connect)
        made = self.connect()
        return await made if inspect.isawaitable(made) else made

    def _checked(self, raw: Any) -> SqlConnection:
        conn = adapt(raw)
        if conn.is_async != self.is_async:
            face = "an async" if self.is_async else "a sync"
            raise ConfigurationError(
                f"the handler is {'async' if self.is_async else 'sync'}, so connect must give "
                f"{face} connection (got {type(raw).__name__})"
            )
        return conn

    def take(self) -> Any:
        """An idle connection, or a new one.

        :raises StoreUnavailable: the database cannot be reached.
        """
        with self._mutex:
            if self._idle:
                return self._idle.pop()
        try:
            return self._new()
        except OncelyError:
            raise
        except Exception as exc:
            raise StoreUnavailable(f"cannot connect to the inbox's database: {exc}") from exc

    async def atake(self) -> Any:
        """The async face of :meth:`take`."""
        with self._mutex:
            if self._idle:
                return self._idle.pop()
        try:
            return await self._anew()
        except OncelyError:
            raise
        except Exception as exc:
            raise StoreUnavailable(f"cannot connect to the inbox's database: {exc}") from exc

    def give_back(self, raw: Any, conn: SqlConnection | None) -> Any:
        """Keep ``raw`` for reuse if its transaction ended, else close it; returns what the
        close returned when it must be awaited (an async connection), else None."""
        reusable = conn is not None and not _in_transaction(conn)
        with self._mutex:
            if reusable and len(self._idle) < self.size:
                self._idle.append(raw)
                return None
        close = getattr(raw, "close", None)
        try:
            result = close() if close is not None else None
        except Exception:
            return None
        return result if inspect.isawaitable(result) else None

    def close(self) -> None:
        """Close the idle connections."""
        with self._mutex:
            idle, self._idle = self._idle, []
        for raw in idle:
            pending = self.give_back(raw, None)
            if pending is not None:  # an async connection closed outside its loop
                with contextlib.suppress(Exception):
                    pending.close()

    async def aclose(self) -> None:
        """The async face of :meth:`close`."""
        with self._mutex:
            idle, self._idle = self._idle, []
        for raw in idle:
            pending = self.give_back(raw, None)
            if pending is not None:
                with contextlib.suppress(Exception):
                    await pending

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``size`` transaction slots of the async face (a sync handler's
        transaction on a worker thread takes one too)."""
        if self._limit is None:
            self._limit = asyncio.Semaphore(self.size)
        async with self._limit:
            yield

    # -- one message -------------------------------------------------------------------------------
    def transact(
        self, inbox: Inbox, consumer: str, dedup_id: str, call: Callable[[Any], Any]
    ) -> bool:
        """Run one message's transaction on a sync connection (see :func:`transaction_plan`);
        ``call(conn)`` runs the handler. Returns whether it ran."""
        raw = self.take()
        conn: SqlConnection | None = None
        try:
            conn = self._checked(raw)
            c = conn

            def other(request: Any) -> Any:
                if isinstance(request, _Accept):
                    return run(inbox.accept_plan(c, consumer, dedup_id), c)
                call(raw)
                return None

            def held(block: Any) -> Plan[None]:
                return inbox.commit_held(c, block, consumer, dedup_id, "the handler")

            return bool(run(transaction_plan(c, held), c, other))
        finally:
            self.give_back(raw, conn)

    async def atransact(
        self, inbox: Inbox, consumer: str, dedup_id: str, call: Callable[[Any], Any]
    ) -> bool:
        """The async face of :meth:`transact` (``call(conn)`` is awaited)."""
        async with self.slot():
            raw = await self.atake()
            conn: SqlConnection | None = None
            try:
                conn = self._checked(raw)
                c = conn

                async def other(request: Any) -> Any:
                    if isinstance(request, _Accept):
                        return await arun(inbox.accept_plan(c, consumer, dedup_id), c)
                    await call(raw)
                    return None

                def held(block: Any) -> Plan[None]:
                    return inbox.commit_held(c, block, consumer, dedup_id, "the handler")

                return bool(await arun(transaction_plan(c, held), c, other))
            finally:
                pending = self.give_back(raw, conn)
                if pending is not None:
                    with contextlib.suppress(Exception):
                        await pending


def _in_transaction(conn: SqlConnection) -> bool:
    try:
        return conn.in_transaction()
    except Exception:
        return True


async def _aconnect_url(url: str) -> Any:
    """An async connection for ``url`` (psycopg ``AsyncConnection`` or aiomysql)."""
    from oncely.backends.urls import scheme_of

    scheme = scheme_of(url)
    if scheme in ("postgresql", "postgres"):
        import psycopg

        from oncely.backends.postgres import conninfo

        return await psycopg.AsyncConnection.connect(conninfo(url))
    if scheme in ("mysql", "mariadb"):
        import aiomysql  # type: ignore[import-untyped]

        from oncely.backends.mysql import connect_args

        args = connect_args(url)
        args["db"] = args.pop("database", args.get("db"))
        args.pop("read_timeout", None)
        args.pop("write_timeout", None)
        return await aiomysql.connect(**args, charset="utf8mb4", autocommit=False)
    check_connect_url(url, is_async=True)  # no async driver for this scheme: raises
    raise AssertionError(f"no async connection for {scheme!r}")  # pragma: no cover
