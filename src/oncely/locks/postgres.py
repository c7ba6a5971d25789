"""``postgresql://…``: PostgreSQL advisory locks with a ttl, a fencing token and server-side waits.

Names are hashed to the 64-bit key of ``pg_advisory_lock(bigint)`` with SHA-256 (stable across
processes, Python versions and machines, unlike :func:`hash`); see :func:`advisory_key`.

Scopes (``Lock(url, name, scope=...)``):

``"session"`` (default)
    The lock belongs to a database session: a connection taken from the backend's pool for as
    long as the lock is held. It ends with ``pg_advisory_unlock`` or with the session.
``"transaction"``
    ``pg_advisory_xact_lock`` inside a transaction opened on that connection. Do your work on
    :attr:`Lock.connection <oncely.locks.Lock.connection>` so it commits (``release()``) or
    rolls back (an exception leaving ``with lock:``) together with the lock.

TTL: an advisory lock has no expiry of its own; it lives as long as its session. The ttl is
the server's idle limit for that session (``idle_session_timeout``, PostgreSQL 14+, or
``idle_in_transaction_session_timeout`` for the transaction scope), set in the same statement
that takes the lock. A holder that stops talking to the server for longer than the ttl (a
crash, a hang, a SIGSTOP) has its session ended by the server, which frees the lock on the
server's clock. Any statement on the lock's connection renews it: ``extend()`` (and so
``auto_renew``), ``check()``, ``owned()`` and ``ttl()`` all do. When the session is gone,
``release()``/``check()`` raise :class:`~oncely.errors.LockLost`.

Fencing: each acquisition also runs ``INSERT … ON CONFLICT DO UPDATE SET fence =
greatest(fence + 1, clock_timestamp() in µs)`` on a small table (``oncely_lock_fences``,
created on first use) in the same statement, only if the lock was granted; the token is
durable and keeps growing even if a transaction-scope acquisition rolls back.

Waiting: a blocking ``acquire`` waits on the server (``pg_advisory_lock`` under a
``lock_timeout``), which grants the lock the moment it is released or its session ends, with
no polling. A cancelled async acquire closes its connection, and the server drops whatever
that session held.

.. warning:: **PgBouncer in transaction pooling mode breaks session-scope locks**: the session
   that holds the lock is handed to other clients between transactions, so the lock may be
   released by (or appear held by) someone else, and ``idle_session_timeout`` applies to the
   pooled server connection, not to you. Connect these locks directly to PostgreSQL (or
   through session pooling), or use ``scope="transaction"``, whose lock lives inside one
   transaction and is safe under transaction pooling.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from oncely.backends.forks import after_fork, inherit
from oncely.backends.plans import Plan, arun, run
from oncely.backends.postgres import (
    AsyncConn,
    SyncConn,
    check_connect_options,
    conninfo,
    network_defaults,
    schema_lock_id,
)
from oncely.backends.urls import redact_url
from oncely.core.cancelsafe import akept_pipeline, kept_pipeline
from oncely.errors import ConfigurationError, StoreError, StoreUnavailable
from oncely.locks.base import Busy, Face, Hold, LockBackend, State
from oncely.settings import flag, seconds, text, whole

__all__ = ["PostgresLockBackend", "Scope", "advisory_key"]

Scope = Literal["session", "transaction"]


def advisory_key(name: str) -> int:
    """The signed 64-bit advisory lock key of lock ``name`` (first 8 bytes of a SHA-256).

    Two names share a key with probability about 2**-64 per pair; they would then exclude
    each other, which is safe (never two holders), just surprising.
    """
    digest = hashlib.sha256(b"oncely.lock\x00" + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _key_parts(key: int) -> dict[str, int]:
    """``pg_locks`` shows a bigint advisory key as classid (high 32 bits) and objid (low)."""
    return {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}


DDL: Final = """\
CREATE TABLE IF NOT EXISTS {t} (
    name  text   PRIMARY KEY,
    fence bigint NOT NULL
)"""

_FENCE = """\
f AS (
    INSERT INTO {t} AS f (name, fence)
    SELECT %(name)s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
    FROM got WHERE got.ok
    ON CONFLICT (name) DO UPDATE SET fence = greatest(f.fence + 1, excluded.fence)
    RETURNING f.fence
)"""

# One statement: take the lock (or not), and only if taken bump the fence and set the ttl.
TRY: Final = (
    "WITH got AS MATERIALIZED (SELECT {try_fn}(%(key)s) AS ok),\n" + _FENCE + "\n"
    "SELECT (SELECT fence FROM f), CASE WHEN (SELECT ok FROM got) THEN "
    "set_config(%(setting)s, %(ttl)s, %(local)s) END"
)
# The same, waiting on the server for at most %(wait)s ms (lock_timeout, restored afterwards).
WAIT: Final = (
    "WITH cfg AS MATERIALIZED (SELECT current_setting('lock_timeout') AS old, "
    "set_config('lock_timeout', %(wait)s, true) AS v),\n"
    "got AS MATERIALIZED (SELECT {wait_fn}(%(key)s)::text AS v, true AS ok FROM cfg),\n"
    + _FENCE
    + "\nSELECT (SELECT fence FROM f), set_config(%(setting)s, %(ttl)s, %(local)s), "
    "set_config('lock_timeout', (SELECT old FROM cfg), true)"
)
_HELD = (
    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND classid = %(hi)s::bigint::oid AND objid = %(lo)s::bigint::oid{mine})"
)
OWNED: Final = "SELECT " + _HELD.format(mine=" AND pid = pg_backend_pid()")
LOCKED: Final = "SELECT " + _HELD.format(mine="")
EXTEND: Final = "SELECT set_config(%(setting)s, %(ttl)s, %(local)s), " + _HELD.format(
    mine=" AND pid = pg_backend_pid()"
)
UNLOCK: Final = "SELECT pg_advisory_unlock(%(key)s), set_config('idle_session_timeout', '0', false)"
INIT_LOCK: Final = "SELECT pg_advisory_xact_lock(%(lock)s)"


@dataclass(eq=False)
class PgHold:
    """What a PostgreSQL hold keeps: the connection whose session holds the lock."""

    conn: Any
    key: int
    scope: Scope
    ttl: float
    #: Set by ``with lock:`` when its body raised: the transaction scope then rolls back.
    abort: bool = False


class _Borrow(NamedTuple):
    """A connection for one hold (sync: from the pool; async: a new one)."""


#: libpq >= 14: statements can share one round trip (psycopg's pipeline mode).
_PIPELINES: Final = bool(psycopg.Pipeline.is_supported())


class _Run(NamedTuple):
    """Run ``query`` on ``conn``; the reply is its first row if ``fetch``, else None.
    ``begin``: send ``BEGIN`` first, in the same pipeline (one round trip)."""

    conn: Any
    query: Any
    params: dict[str, Any] | None = None
    fetch: bool = False
    begin: bool = False


class _GiveBack(NamedTuple):
    """Done with ``conn`` (sync: back to the pool, closed if ``broken``, rolled back first if
    ``rollback``; async: closed)."""

    conn: Any
    broken: bool = False
    rollback: bool = False


def _ms(seconds: float) -> str:
    return str(max(1, math.ceil(seconds * 1000)))


class PostgresLockBackend(LockBackend):
    """Advisory locks on one PostgreSQL database.

    ``table`` holds the fencing counters (created on first use unless ``create_schema=False``).
    ``max_size`` bounds the sync pool: each held lock and each waiter uses one connection.
    ``timeout`` bounds connecting and waiting for a pooled connection; TCP keepalive
    (:data:`oncely.backends.postgres.TCP_DEFAULTS`) notices a server the network cut off within
    about 10 s (the URL or an option overrides either). Further keyword ``options`` go to
    :func:`psycopg.connect`.
    """

    kind = "postgresql"

    server_wait = True
    #: The lock lasts as long as its session; statements on lock.connection keep that alive.
    expires = False
    #: A cancelled async acquire closes its connection; the server drops what it held.
    cancel_safe = True
    lock_option_names = ("scope",)

    def __init__(
        self,
        url: str,
        *,
        table: str = "oncely_lock_fences",
        create_schema: bool = True,
        max_size: int = 64,
        timeout: float = 5.0,
        **options: Any,
    ) -> None:
        self.url = url
        self.conninfo = conninfo(url)
        schema, _, name = text(table, "table", where="PostgresLockBackend").rpartition(".")
        if not all(part.isidentifier() for part in (name, *([schema] if schema else []))):
            raise ConfigurationError(
                f"table name {table!r} must be a plain identifier, optionally schema-qualified"
            )
        timeout = seconds(timeout, "timeout", where="PostgresLockBackend")
        max_size = whole(max_size, "max_size", where="PostgresLockBackend", minimum=1)
        create_schema = flag(create_schema, "create_schema", where="PostgresLockBackend")
        ident = sql.Identifier(schema, name) if schema else sql.Identifier(name)
        self.table = table
        self.max_size = max_size
        self.timeout = float(timeout)
        self.create_schema = create_schema
        kwargs: dict[str, Any] = network_defaults(self.conninfo, timeout)
        kwargs["application_name"] = "oncely-lock"
        check_connect_options(options, url, ("table", "create_schema", "max_size", "timeout"))
        kwargs.update(options)
        kwargs["autocommit"] = True
        self._kwargs = kwargs

        def render(template: str, **fns: str) -> bytes:
            text = sql.SQL(
                template.replace("{try_fn}", fns.get("try_fn", "")).replace(
                    "{wait_fn}", fns.get("wait_fn", "")
                )
            )
            return text.format(t=ident).as_string(None).encode()

        self._sql = {
            ("try", "session"): render(TRY, try_fn="pg_try_advisory_lock"),
            ("try", "transaction"): render(TRY, try_fn="pg_try_advisory_xact_lock"),
            ("wait", "session"): render(WAIT, wait_fn="pg_advisory_lock"),
            ("wait", "transaction"): render(WAIT, wait_fn="pg_advisory_xact_lock"),
            ("ddl", ""): render(DDL),
        }
        self._pool: ConnectionPool[SyncConn] | None = None
        self._lock = threading.Lock()
        self._schema_ready = not create_schema
        after_fork(self, PostgresLockBackend._forked)

    def _forked(self) -> None:
        """In a forked child: the parent's pool is never used or closed; a new one opens on
        demand. (A lock the parent held stays the parent's: its session is the parent's.)"""
        inherit(self._pool)
        self._pool = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresLockBackend({redact_url(self.url)!r})"

    def lock_options(self, scope: str = "session", **options: Any) -> Scope:
        super().lock_options(**options)
        if scope not in ("session", "transaction"):
            raise ConfigurationError(
                f"scope={scope!r}: use 'session' (held until release or the session ends) or "
                "'transaction' (held until the lock's transaction commits or rolls back)"
            )
        return "session" if scope == "session" else "transaction"

    # -- errors and statements --------------------------------------------------------------------
    def _unavailable(self, exc: BaseException) -> StoreError:
        where = redact_url(self.url)
        if isinstance(exc, PoolTimeout):
            return StoreUnavailable(
                f"no PostgreSQL connection to {where} within {self.timeout:g}s: the server is "
                f"down, or all {self.max_size} pooled connections hold locks or wait for one; "
                "raise max_size, or check the server"
            )
        if isinstance(exc, psycopg.OperationalError):
            return StoreUnavailable(
                f"PostgreSQL at {where} is unavailable ({str(exc).strip()}); check that the "
                "server runs and the URL is right; nothing was acquired"
            )
        return StoreError(f"PostgreSQL error on {where}: {type(exc).__name__}: {exc}")

    def _params(
        self, name: str, ttl: float, wait: float, scope: Scope
    ) -> tuple[bytes, dict[str, Any]]:
        key = advisory_key(name)
        params: dict[str, Any] = {
            "key": key,
            "name": name,
            "ttl": _ms(ttl),
            "setting": _SETTING[scope],
            "local": scope == "transaction",
        }
        if wait < 0.001:
            return self._sql[("try", scope)], params
        params["wait"] = "0" if math.isinf(wait) else _ms(wait)
        return self._sql[("wait", scope)], params

    def _hold(
        self, conn: Any, name: str, owner: str, ttl: float, scope: Scope, row: Any, face: Face
    ) -> Hold | None:
        if row is None or row[0] is None:
            return None
        data = PgHold(conn, advisory_key(name), scope, ttl)
        return Hold(name, owner, int(row[0]), ttl, face, data=data)

    # -- sync plumbing ----------------------------------------------------------------------------
    def _get_pool(self) -> ConnectionPool[SyncConn]:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    try:
                        with psycopg.connect(self.conninfo, **self._kwargs) as conn:
                            self._init_schema(conn)
                    except psycopg.Error as exc:
                        raise self._unavailable(exc) from exc
                    pool: ConnectionPool[SyncConn] = ConnectionPool(
                        self.conninfo,
                        kwargs=self._kwargs,
                        min_size=0,
                        max_size=self.max_size,
                        timeout=self.timeout,
                        open=False,
                        name="oncely-locks",
                    )
                    pool.open(wait=False)
                    self._pool = pool
        return self._pool

    def _init_schema(self, conn: SyncConn) -> None:
        if self._schema_ready:
            return
        with conn.transaction():
            conn.execute(INIT_LOCK, {"lock": schema_lock_id(self.table)})
            conn.execute(self._sql[("ddl", "")])
        self._schema_ready = True

    def _getconn(self) -> SyncConn:
        pool = self._get_pool()
        try:
            return pool.getconn()
        except PoolTimeout as exc:
            raise self._unavailable(exc) from exc

    def _putconn(self, conn: SyncConn, broken: bool = False) -> None:
        pool = self._pool
        if broken and not conn.closed:
            conn.close()
        if pool is not None:
            pool.putconn(conn)
        else:  # pragma: no cover - the pool is made before any connection
            conn.close()

    # -- every operation, once: a plan of requests (oncely.backends.plans) ----------------------
    # The sync face borrows a connection from its pool and gives it back for reuse; the async
    # face opens a connection per hold and closes it when it gives it back.
    def _acquire(
        self, name: str, owner: str, ttl: float, wait: float, scope: Scope, face: Face
    ) -> Plan[Hold | Busy]:
        query, params = self._params(name, ttl, wait, scope)
        conn = yield _Borrow()
        try:
            # a transaction-scoped lock: BEGIN and the lock in one round trip
            row = yield _Run(conn, query, params, fetch=True, begin=scope == "transaction")
        except pg_errors.LockNotAvailable:
            yield _GiveBack(conn, rollback=scope == "transaction")
            return Busy()
        except BaseException as exc:
            # Cancelled or failed: the session may hold the lock already (a session-level lock
            # survives a failed statement), so end the session and the server drops it.
            yield _GiveBack(conn, broken=True)
            if isinstance(exc, psycopg.Error):
                raise self._unavailable(exc) from exc
            raise
        hold = self._hold(conn, name, owner, ttl, scope, row, face)
        if hold is None:
            yield _GiveBack(conn, rollback=scope == "transaction")
            return Busy()
        return hold

    def _release(self, hold: Hold) -> Plan[bool]:
        data: PgHold = hold.data
        ok = False
        try:
            if data.scope == "transaction":
                yield _Run(data.conn, "ROLLBACK" if data.abort else "COMMIT")
                ok = True
            else:
                row = yield _Run(data.conn, UNLOCK, {"key": data.key}, fetch=True)
                ok = bool(row and row[0])
        except psycopg.Error:
            ok = False
        finally:
            yield _GiveBack(data.conn, broken=not ok)
        return ok

    def _extend(self, hold: Hold, ttl: float) -> Plan[float | None]:
        data: PgHold = hold.data
        params = {
            "setting": _SETTING[data.scope],
            "ttl": _ms(ttl),
            "local": data.scope == "transaction",
            **_key_parts(data.key),
        }
        try:
            row = yield _Run(data.conn, EXTEND, params, fetch=True)
        except pg_errors.InFailedSqlTransaction:
            return ttl  # the transaction keeps its lock until it rolls back
        except psycopg.Error:
            return None  # the session is gone, and the lock with it
        if not (row and row[1]):
            return None
        data.ttl = ttl
        return ttl

    def _inspect(self, name: str, hold: Hold | None) -> Plan[State]:
        parts = _key_parts(advisory_key(name))
        if hold is not None:
            data: PgHold = hold.data
            try:
                row = yield _Run(data.conn, OWNED, parts, fetch=True)
                owned = bool(row and row[0])
            except pg_errors.InFailedSqlTransaction:
                owned = True
            except psycopg.Error:
                owned = False
            if owned:
                return State(locked=True, owned=True, ttl=data.ttl)
        conn = yield _Borrow()
        try:
            row = yield _Run(conn, LOCKED, parts, fetch=True)
        except BaseException as exc:
            yield _GiveBack(conn, broken=True)
            if isinstance(exc, psycopg.Error):
                raise self._unavailable(exc) from exc
            raise
        yield _GiveBack(conn)
        return State(locked=bool(row and row[0]), owned=False)

    # -- the two executors ------------------------------------------------------------------------
    def _execute(self, request: Any) -> Any:
        kind = type(request)
        if kind is _Run:
            if request.begin and not _PIPELINES:
                request.conn.execute("BEGIN")
            if request.begin and _PIPELINES:
                with kept_pipeline(request.conn):
                    request.conn.execute("BEGIN")
                    cur = request.conn.execute(request.query, request.params)
            else:
                cur = request.conn.execute(request.query, request.params)
            return cur.fetchone() if request.fetch else None
        if kind is _Borrow:
            return self._getconn()
        if request.rollback and not request.broken:
            request.conn.execute("ROLLBACK")
        self._putconn(request.conn, broken=request.broken)
        return None

    async def _aexecute(self, request: Any) -> Any:
        kind = type(request)
        if kind is _Run:
            if request.begin and not _PIPELINES:
                await request.conn.execute("BEGIN")
            if request.begin and _PIPELINES:
                async with akept_pipeline(request.conn):
                    await request.conn.execute("BEGIN")
                    cur = await request.conn.execute(request.query, request.params)
            else:
                cur = await request.conn.execute(request.query, request.params)
            return await cur.fetchone() if request.fetch else None
        if kind is _Borrow:
            return await self._aconnect()
        await asyncio.shield(request.conn.close())
        return None

    # -- sync face --------------------------------------------------------------------------------
    def acquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        return run(
            self._acquire(name, owner, ttl, wait, options or "session", "sync"), self._execute
        )

    def wait_release(self, name: str, busy: Busy, timeout: float) -> None:
        threading.Event().wait(min(timeout, 0.05))

    def release(self, hold: Hold) -> bool:
        return run(self._release(hold), self._execute)

    def extend(self, hold: Hold, ttl: float) -> float | None:
        return run(self._extend(hold, ttl), self._execute)

    def inspect(self, name: str, hold: Hold | None) -> State:
        return run(self._inspect(name, hold), self._execute)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    # -- async face -------------------------------------------------------------------------------
    async def _aconnect(self) -> AsyncConn:
        try:
            conn = await psycopg.AsyncConnection.connect(self.conninfo, **self._kwargs)
            if not self._schema_ready:
                async with conn.transaction():
                    await conn.execute(INIT_LOCK, {"lock": schema_lock_id(self.table)})
                    await conn.execute(self._sql[("ddl", "")])
                self._schema_ready = True
        except psycopg.Error as exc:
            raise self._unavailable(exc) from exc
        return conn

    async def aacquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        plan = self._acquire(name, owner, ttl, wait, options or "session", "async")
        return await arun(plan, self._aexecute)

    async def await_release(self, name: str, busy: Busy, timeout: float) -> None:
        await asyncio.sleep(min(timeout, 0.05))

    async def arelease(self, hold: Hold) -> bool:
        return await arun(self._release(hold), self._aexecute)

    async def aextend(self, hold: Hold, ttl: float) -> float | None:
        return await arun(self._extend(hold, ttl), self._aexecute)

    async def ainspect(self, name: str, hold: Hold | None) -> State:
        return await arun(self._inspect(name, hold), self._aexecute)


_SETTING: Final[dict[Scope, str]] = {
    "session": "idle_session_timeout",
    "transaction": "idle_in_transaction_session_timeout",
}
