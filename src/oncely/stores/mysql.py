"""``mysql://…`` / ``mariadb://…``: records in a MySQL or MariaDB (InnoDB) table.

Every decision is one round trip to the server on an autocommit connection from a pool, and
its clock is the server's ``NOW(6)`` (fixed for the whole statement, unlike ``SYSDATE(6)``),
read as epoch seconds with the session time zone pinned to UTC; the client clock is never
consulted.

* A claim is one ``INSERT … ON DUPLICATE KEY UPDATE`` that always leaves the row behind: if the
  stored row may be taken over, every column is replaced and ``claim_id`` becomes the caller's
  random nonce; otherwise every column keeps its value. The row comes back in the same round
  trip, and comparing its ``claim_id`` with the nonce tells New from the rest. MariaDB 10.5+
  returns it with ``INSERT … RETURNING``; on MySQL (no ``RETURNING``) the upsert and a read of
  the row travel together as one multi-statement transaction, so the row lock the upsert takes
  makes the read see exactly what it decided.
* complete / release / renew are one ``UPDATE`` guarded by scope, digest, fence and
  ``status = 'in_progress'`` (renew reads the new lease back inside the same transaction).
* Release keeps an expired tombstone (``status = 'released'``) so the next claim's fence is
  still ``old + 1`` even within the same microsecond.
* There are no notifications: :meth:`MySQLStore.watch` polls one cheap ``SELECT`` with backoff.

URL forms: ``mysql://user:password@host:3306/dbname``, ``mariadb://…`` and SQLAlchemy
spellings such as ``mysql+pymysql://…`` (the driver part is dropped). Query options:
``unix_socket=/path``, ``ssl=true`` (verified TLS with the system CAs), ``ssl_ca=/ca.pem``,
``ssl_cert=…``/``ssl_key=…`` (client certificate) and ``charset=utf8mb4`` (the only charset
used). Needs ``pip install 'oncely[mysql]'`` (PyMySQL for the sync face, aiomysql for the async
face).

The table is not created behind the operator's back: run ``oncely init URL`` once (it calls
:meth:`MySQLStore.init_schema`), or pass ``create_schema=True``.

Layout: the SQL text, the parameters and the parsing of rows are module-level and shared by the
sync face (a small thread-safe pool of PyMySQL connections) and the async face (one aiomysql
pool per running event loop); only the plumbing that takes a connection and awaits (or not)
differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import queue
import re
import select
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

import aiomysql  # type: ignore[import-untyped]
import pymysql
from pymysql.constants import CLIENT

from oncely.cancelsafe import keep_cancel
from oncely.errors import ConfigurationError, SchemaMissing, StoreError, StoreUnavailable
from oncely.records import ClaimOutcome, New, Record, RecordKey
from oncely.stores.base import Store, classify, lease_lost, redact_url
from oncely.stores.loops import LoopLocal
from oncely.stores.polling import apoll_until, poll_until

__all__ = ["MySQLStore"]

Row = tuple[Any, ...]
Params = dict[str, Any]
Records = list[Record]  # named here: inside the class, ``list`` is the method
SyncConn: TypeAlias = "pymysql.connections.Connection[pymysql.cursors.Cursor]"

# -- SQL ---------------------------------------------------------------------------------------
# ``{t}`` is the backquoted table name and ``{h}`` its fence keeper (``<table>_fences``). Times
# are DOUBLE epoch seconds on the server's clock.

_NOW: Final = "UNIX_TIMESTAMP(NOW(6))"
_NOW_US: Final = f"CAST({_NOW} * 1000000 AS SIGNED)"
COLUMNS: Final = (
    "scope, digest, status, fingerprint, fence, lease_until, expires_at, created_at, result, codec"
)

# scope is VARBINARY so that it compares byte for byte: a case-insensitive or PAD SPACE
# collation would let 'Tenant' read the records of 'tenant' (or 'tenant ').
DDL: Final = """\
CREATE TABLE IF NOT EXISTS {t} (
    scope       VARBINARY(1020) NOT NULL,
    digest      CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    status      VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    fingerprint VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    fence       BIGINT NOT NULL,
    lease_until DOUBLE NULL,
    expires_at  DOUBLE NOT NULL,
    created_at  DOUBLE NOT NULL,
    result      LONGBLOB NULL,
    codec       VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    claim_id    BIGINT NOT NULL,
    PRIMARY KEY (scope, digest),
    KEY expires_at_idx (expires_at)
) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS {h} (
    id   TINYINT NOT NULL PRIMARY KEY,
    high BIGINT NOT NULL
) ENGINE=InnoDB;
INSERT IGNORE INTO {h} (id, high) VALUES (0, 0)"""

# Fences. The fence keeper's one row holds ``high``, at least the fence of every row ever
# removed from the table (delete, purge). Every claim reads it with a shared lock; delete and
# purge raise it under an exclusive lock, in the same transaction that removes rows, and remove
# only rows whose fence it covers. A new row's fence is above ``high`` (and above the clock in
# microseconds), a taken-over row's above its old fence; so a key's fences only grow, whatever
# happened between two claims and whatever the clock does. The shared locks never wait for each
# other: only delete and purge make claims wait, for the length of their own transaction.
_HIGH: Final = "(SELECT high FROM {h} WHERE id = 0)"
_KEY: Final = "scope = %(scope)s AND digest = %(digest)s"
_MINE: Final = f"WHERE {_KEY} AND fence = %(fence)s AND status = 'in_progress'"

# The claimable predicate of oncely.stores.base.claimable, on the stored row. A released
# tombstone is claimable whatever the clock says: NOW() is fixed when a statement starts, so a
# claim that waited for the row lock of a release can start "before" the tombstone's expiry.
_CLAIMABLE: Final = (
    f"status = 'released' OR expires_at <= {_NOW} "
    f"OR (status = 'in_progress' AND (lease_until IS NULL OR lease_until <= {_NOW}))"
)

# MySQL evaluates ON DUPLICATE KEY UPDATE assignments left to right, and each one sees the
# columns assigned before it. So the claimable test runs exactly once, in the FIRST assignment,
# which turns ``claim_id`` into the caller's nonce; every later column asks only "is claim_id
# my nonce now?", a question that assigning the other columns cannot change. (Testing the
# claimable predicate in every assignment would break as soon as lease_until or expires_at
# had been rewritten.) ``fence`` reads its own old value: it is assigned after claim_id only.
_TAKE_OVER: Final = (
    ("fence", f"GREATEST(fence + 1, {_NOW_US})"),
    ("status", "'in_progress'"),
    ("fingerprint", "%(fingerprint)s"),
    ("lease_until", f"{_NOW} + %(lease)s"),
    ("expires_at", f"{_NOW} + %(keep)s"),
    ("created_at", _NOW),
    ("result", "NULL"),
    ("codec", "NULL"),
)
UPSERT: Final = (
    f"INSERT INTO {{t}} ({COLUMNS}, claim_id) SELECT "
    f"%(scope)s, %(digest)s, 'in_progress', %(fingerprint)s, GREATEST(h.high + 1, {_NOW_US}), "
    f"{_NOW} + %(lease)s, {_NOW} + %(keep)s, {_NOW}, NULL, NULL, %(nonce)s "
    "FROM {h} AS h WHERE h.id = 0 LOCK IN SHARE MODE "
    f"ON DUPLICATE KEY UPDATE claim_id = IF({_CLAIMABLE}, %(nonce)s, claim_id), "
    + ", ".join(f"{col} = IF(claim_id = %(nonce)s, {new}, {col})" for col, new in _TAKE_OVER)
)
_CLAIM_ROW: Final = f"{COLUMNS}, claim_id, {_NOW}"
CLAIM_RETURNING: Final = f"{UPSERT} RETURNING {_CLAIM_ROW}"
# The upsert keeps its exclusive row lock until COMMIT, so the SELECT reads the row it decided.
# Every statement has its own NOW(), so the clock is read once into a session variable: the
# decision and the reported ``now`` are the same instant, as with RETURNING.
_TX_NOW: Final = "@oncely_now"
CLAIM_TRANSACTION: Final = (
    f"START TRANSACTION; SET {_TX_NOW} = {_NOW}; {UPSERT.replace(_NOW, _TX_NOW)}; "
    f"SELECT {_CLAIM_ROW.replace(_NOW, _TX_NOW)} FROM {{t}} WHERE {_KEY}; COMMIT"
)

_FENCED: Final = f"WHERE {_KEY} AND fence = %(fence)s"
# Completes the caller's claim. A record already completed under this fence with this very
# result is the caller's own earlier completion whose reply was lost: it matches too (FOUND_ROWS
# counts it) and keeps its expiry. Assignments run left to right, so expires_at reads the old
# status.
COMPLETE: Final = (
    f"UPDATE {{t}} SET expires_at = IF(status = 'completed', expires_at, {_NOW} + %(ttl)s), "
    "status = 'completed', lease_until = NULL, result = UNHEX(%(result)s), codec = %(codec)s "
    f"{_FENCED} AND (status = 'in_progress' OR (status = 'completed' "
    "AND result <=> UNHEX(%(result)s) AND codec <=> %(codec)s))"
)
# An expired tombstone rather than a DELETE: a repeated release finds its own tombstone (and
# succeeds), and the next claim takes the row over with fence old + 1.
RELEASE: Final = (
    f"UPDATE {{t}} SET status = 'released', lease_until = {_NOW}, expires_at = {_NOW}, "
    f"result = NULL, codec = NULL {_FENCED} AND status IN ('in_progress', 'released')"
)
# MySQL and MariaDB have no UPDATE … RETURNING: the new lease is read back inside the same
# transaction (the UPDATE holds the row lock until COMMIT). No row back means LeaseLost.
RENEW: Final = (
    "START TRANSACTION; "
    f"UPDATE {{t}} SET lease_until = {_NOW} + %(lease)s, "
    f"expires_at = GREATEST(expires_at, {_NOW} + %(lease)s) {_MINE}; "
    f"SELECT lease_until FROM {{t}} {_MINE}; "
    "COMMIT"
)
_LIVE: Final = f"status <> 'released' AND expires_at > {_NOW}"
GET: Final = f"SELECT {COLUMNS} FROM {{t}} WHERE {_KEY} AND {_LIVE}"
# What watch needs to know: is the record still in progress under the caller's fence?
STATE: Final = f"SELECT status, fence, expires_at > {_NOW} FROM {{t}} WHERE {_KEY}"
# Removes tombstones and expired rows too, but reports only whether a live record was there.
# The fence keeper is raised to the row's fence first (its exclusive lock holds claims off until
# COMMIT), and only a row whose fence it covers is removed.
_RAISE_HIGH: Final = "UPDATE {h} SET high = GREATEST(high, COALESCE(({max}), 0)) WHERE id = 0"
DELETE: Final = (
    "START TRANSACTION; "
    + _RAISE_HIGH.replace("{max}", f"SELECT MAX(fence) FROM {{t}} WHERE {_KEY}")
    + f"; SELECT {_LIVE} FROM {{t}} WHERE {_KEY} AND fence <= {_HIGH} FOR UPDATE; "
    f"DELETE FROM {{t}} WHERE {_KEY} AND fence <= {_HIGH}; COMMIT"
)
# Up to ``limit`` expired rows (tombstones included), oldest first; reports how many went.
_EXPIRED: Final = f"expires_at <= {_TX_NOW} ORDER BY expires_at LIMIT %(limit)s"
PURGE: Final = (
    f"START TRANSACTION; SET {_TX_NOW} = {_NOW}; "
    + _RAISE_HIGH.replace(
        "{max}", f"SELECT MAX(p.fence) FROM (SELECT fence FROM {{t}} WHERE {_EXPIRED}) AS p"
    )
    + f"; DELETE FROM {{t}} WHERE fence <= {_HIGH} AND {_EXPIRED}; SELECT ROW_COUNT(); COMMIT"
)
LIST_ALL: Final = (
    f"SELECT {COLUMNS} FROM {{t}} WHERE {_LIVE} ORDER BY scope, digest LIMIT %(limit)s"
)
LIST_SCOPE: Final = (
    f"SELECT {COLUMNS} FROM {{t}} WHERE scope = %(scope)s AND {_LIVE} "
    "ORDER BY digest LIMIT %(limit)s"
)
NOW: Final = f"SELECT {_NOW}"
# The table has oncely's columns; its fence keeper has its row.
CHECK: Final = f"SELECT {COLUMNS}, claim_id FROM {{t}} LIMIT 0"
KEEPER: Final = "SELECT COUNT(*) FROM {h} WHERE id = 0"

# Every connection: UTC (so UNIX_TIMESTAMP(NOW(6)) is unambiguous across DST changes) and
# strict mode (so an over-long scope is an error, never silently truncated into another's).
INIT_COMMAND: Final = (
    "SET time_zone = '+00:00', "
    "sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO'"
)

# -- pure helpers shared by both faces ------------------------------------------------------------

# 57 characters at most: the fence keeper is ``<table>_fences`` and names end at 64.
_TABLE_RE = re.compile(r"(?:[a-z_][a-z0-9_]{0,63}\.)?[a-z_][a-z0-9_]{0,56}")
_MARIADB_RE = re.compile(r"(\d+)\.(\d+)\.\d+-MariaDB", re.IGNORECASE)
_DEADLOCK = 1213
_NO_SUCH_TABLE = 1146
_BAD_FIELD = 1054
_LOCK_WAIT_TIMEOUT = 1205
# Server errors that mean "the connection or the server went away" (client errors are 2000+).
_GONE = frozenset({1040, 1053, 1077, 1152, 1153, 1158, 1159, 1160, 1161, 1927, 4031})
# A deadlock rolls the whole statement (or transaction) back, so running it again is safe.
_ATTEMPTS = 5
# An idle pooled connection older than this is pinged before use (idle TCP may have been cut).
_PING_AFTER = 30.0
# Longest lease or ttl stored (about 317 years); also turns float('inf') into "forever".
_FOREVER = 1e10
_RESERVED = frozenset(
    {
        "autocommit",
        "charset",
        "client_flag",
        "collation",
        "conv",
        "cursorclass",
        "defer_connect",
        "init_command",
        "sql_mode",
        "use_unicode",
    }
)
#: Seconds PyMySQL waits for each reply (and each write) before the call fails with
#: StoreUnavailable, unless ``read_timeout=`` / ``write_timeout=`` say otherwise: a server that
#: stops answering cannot hang a call forever. Above InnoDB's usual lock waits (oncely's own
#: statements hold row locks for milliseconds), below its 50 s ``innodb_lock_wait_timeout``.
READ_TIMEOUT: Final = 30.0
_URL_OPTIONS = ("charset", "ssl", "ssl_ca", "ssl_cert", "ssl_key", "unix_socket")


@dataclass(frozen=True, slots=True)
class _Result:
    """What one round trip answered: the first statement's row count, the first row set."""

    rowcount: int
    rows: list[Row]


class _Statements:
    """The SQL of one table, for servers with (MariaDB 10.5+) or without ``RETURNING``."""

    def __init__(self, table: str, returning: bool) -> None:
        quoted = ".".join(f"`{part}`" for part in table.split("."))
        keeper = ".".join(f"`{part}`" for part in f"{table}_fences".split("."))

        def render(template: str) -> str:
            return template.replace("{t}", quoted).replace("{h}", keeper)

        self.claim = render(CLAIM_RETURNING if returning else CLAIM_TRANSACTION)
        self.delete = render(DELETE)
        self.complete = render(COMPLETE)
        self.release = render(RELEASE)
        self.renew = render(RENEW)
        self.get = render(GET)
        self.state = render(STATE)
        self.purge = render(PURGE)
        self.list_all = render(LIST_ALL)
        self.list_scope = render(LIST_SCOPE)
        self.check = render(CHECK)
        self.keeper = render(KEEPER)
        self.ddl = render(DDL)
        self.now = NOW


def _validate_table(table: str) -> str:
    if not isinstance(table, str) or not _TABLE_RE.fullmatch(table):
        raise ConfigurationError(
            f"table name {table!r} is not a plain lowercase SQL identifier (at most 57 "
            "characters, optionally database-qualified); use e.g. 'oncely_records' or "
            "'app.oncely_records'"
        )
    return table


def _supports_returning(server_version: str) -> bool:
    """MariaDB 10.5+ has ``INSERT … RETURNING`` (and ``DELETE … RETURNING``); MySQL has neither."""
    match = _MARIADB_RE.search(server_version)
    return match is not None and (int(match[1]), int(match[2])) >= (10, 5)


def _connect_args(url: str) -> dict[str, Any]:
    """PyMySQL keyword arguments for ``url`` (``mysql+pymysql://`` etc. normalised)."""
    scheme, sep, rest = url.partition("://")
    example = "'mysql://user:password@host:3306/dbname'"
    if not sep or scheme.lower().split("+", 1)[0] not in MySQLStore.schemes:
        raise ConfigurationError(f"MySQL URL {redact_url(url)!r} must look like {example}")
    try:
        parts = urlsplit(f"mysql://{rest}")
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(
            f"MySQL URL {redact_url(url)!r} is malformed ({exc}); use e.g. {example}"
        ) from exc
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ConfigurationError(
            f"MySQL URL {redact_url(url)!r} must name one database, e.g. {example}"
        )
    args: dict[str, Any] = {"host": parts.hostname or "localhost", "port": port or 3306}
    args["database"] = database
    if parts.username is not None:
        args["user"] = unquote(parts.username)
    if parts.password is not None:
        args["password"] = unquote(parts.password)
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(_URL_OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {', '.join(unknown)} in MySQL URL {redact_url(url)!r}; "
            f"known: {', '.join(_URL_OPTIONS)} (pass other driver options as keyword arguments)"
        )
    if query.get("charset", "utf8mb4").lower() != "utf8mb4":
        raise ConfigurationError(
            "oncely always talks utf8mb4 to MySQL; drop 'charset' from the URL"
        )
    if "unix_socket" in query:
        args["unix_socket"] = query["unix_socket"]
    context = _ssl_context(query, redact_url(url))
    if context is not None:
        args["ssl"] = context
    return args


def _ssl_context(query: dict[str, str], where: str) -> ssl.SSLContext | None:
    wanted = query.get("ssl", "").lower()
    if wanted not in ("", "true", "1", "yes", "false", "0", "no"):
        raise ConfigurationError(f"ssl={query['ssl']!r} in {where!r}: use ssl=true or ssl=false")
    files = [query.get(k) for k in ("ssl_ca", "ssl_cert", "ssl_key")]
    if wanted in ("", "false", "0", "no") and not any(files):
        return None
    try:
        context = ssl.create_default_context(cafile=files[0] or None)
        if files[1]:
            context.load_cert_chain(files[1], files[2] or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot set up TLS for {where!r}: {exc}") from exc
    return context


def _seconds(value: float) -> float:
    return min(float(value), _FOREVER)


def _nonce() -> int:
    return int.from_bytes(os.urandom(8), "big", signed=True)


def _key_params(key: RecordKey) -> Params:
    return {"scope": key.scope, "digest": key.digest}


def _claim_params(key: RecordKey, fingerprint: str, lease: float, ttl: float) -> Params:
    lease = _seconds(lease)
    return {
        "scope": key.scope,
        "digest": key.digest,
        "fingerprint": fingerprint,
        "lease": lease,
        "keep": max(lease, _seconds(ttl)),
        "nonce": _nonce(),
    }


def _complete_params(key: RecordKey, fence: int, result: bytes, codec: str, ttl: float) -> Params:
    return {
        "scope": key.scope,
        "digest": key.digest,
        "fence": int(fence),
        # Hex text rather than bytes: aiomysql cannot escape bytes on PyMySQL 1.2.3+
        # (aio-libs/aiomysql#1080), and PyMySQL 1.2 sends bytes as hex anyway.
        "result": bytes(result).hex(),
        "codec": codec,
        "ttl": _seconds(ttl),
    }


def _fence_params(key: RecordKey, fence: int) -> Params:
    return {"scope": key.scope, "digest": key.digest, "fence": int(fence)}


def _renew_params(key: RecordKey, fence: int, lease: float) -> Params:
    return {"scope": key.scope, "digest": key.digest, "fence": int(fence), "lease": _seconds(lease)}


def _list_params(scope: str | None, limit: int) -> Params:
    return {"scope": scope, "limit": max(0, int(limit))}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _record(row: Row) -> Record:
    scope, digest, status, fingerprint, fence, lease_until, expires_at, created_at = row[:8]
    result, codec = row[8], row[9]
    return Record(
        scope=_text(scope),
        digest=_text(digest),
        status=status,
        fingerprint=_text(fingerprint),
        fence=int(fence),
        lease_until=None if lease_until is None else float(lease_until),
        expires_at=float(expires_at),
        created_at=float(created_at),
        result=None if result is None else bytes(result),
        codec=codec,
    )


def _claim_outcome(result: _Result, params: Params) -> ClaimOutcome:
    if not result.rows:  # the upsert always leaves the row: this is not the table we made
        raise StoreError(f"the claim on {params['scope']!r} read no row back; check the table")
    row = result.rows[0]
    record, claim_id, now = _record(row), int(row[10]), float(row[11])
    if claim_id == params["nonce"]:
        assert record.lease_until is not None
        return New(record.fence, record.lease_until, now)
    return classify(record, params["fingerprint"], now)


def _changed(result: _Result, fence: int) -> bool:
    """Watch's test: the record is gone, expired, finished or held under another fence."""
    if not result.rows:
        return True
    status, current, live = result.rows[0]
    return status != "in_progress" or int(current) != fence or not live


def _check_lease(result: _Result, key: RecordKey, fence: int) -> None:
    if result.rowcount < 1:
        raise lease_lost(key, fence)


def _check_keeper(result: _Result, outdated: Callable[[], SchemaMissing]) -> None:
    if not result.rows or result.rows[0][0] != 1:
        raise outdated()


def _renewed(result: _Result, key: RecordKey, fence: int) -> float:
    if not result.rows:
        raise lease_lost(key, fence)
    return float(result.rows[0][0])


def _errno(exc: BaseException) -> int:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


def _collect(cur: pymysql.cursors.Cursor) -> _Result:
    """Read every result of a (multi-)statement: a later statement's error surfaces here."""
    rowcount, rows = cur.rowcount, None
    while True:
        if rows is None and cur.description is not None:
            rows = [tuple(r) for r in cur.fetchall()]
        if not cur.nextset():
            return _Result(rowcount, rows or [])


async def _acollect(cur: Any) -> _Result:
    rowcount, rows = int(cur.rowcount), None
    while True:
        if rows is None and cur.description is not None:
            rows = [tuple(r) for r in await cur.fetchall()]
        if not await cur.nextset():
            return _Result(rowcount, rows or [])


async def _aexecute(conn: Any, query: str, params: Params) -> _Result:
    async with conn.cursor() as cur:
        await cur.execute(query, params)
        return await _acollect(cur)


def _server_version(conn: Any) -> str:
    """The handshake's version string, e.g. ``5.5.5-10.11.19-MariaDB`` or ``8.4.3``."""
    return _text(getattr(conn, "server_version", "") or "")


def _looks_dead(conn: Any) -> bool:
    """True if an idle connection has something to read: an idle one has nothing, so this is
    the server's goodbye (an error packet or EOF). One poll(2), no round trip."""
    sock = getattr(conn, "_sock", None)
    if sock is None:
        return True
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


class _Busy(Exception):
    """No pooled connection became free in time."""


class _SyncPool:
    """At most ``size`` PyMySQL connections, opened lazily, most recently used first.

    A connection that failed in any way is closed rather than handed back (it may sit in an
    open transaction or in the middle of a result). An idle one the server has closed is
    noticed without a round trip and replaced; one idle for a while is pinged first.
    """

    def __init__(self, connect: Callable[[], SyncConn], size: int, timeout: float) -> None:
        self._connect = connect
        self._idle: queue.LifoQueue[tuple[SyncConn, float]] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> SyncConn:
        if not self._slots.acquire(timeout=self._timeout):
            raise _Busy
        try:
            while True:
                try:
                    conn, since = self._idle.get_nowait()
                except queue.Empty:
                    return self._connect()
                if _looks_dead(conn):  # the server closed it (restart, wait_timeout, KILL)
                    _close_quietly(conn)
                    continue
                if time.monotonic() - since < _PING_AFTER:
                    return conn
                try:
                    conn.ping(reconnect=False)
                    return conn
                except pymysql.Error:
                    _close_quietly(conn)
        except BaseException:
            self._slots.release()
            raise

    def put(self, conn: SyncConn, healthy: bool) -> None:
        try:
            with self._lock:
                if healthy and not self._closed:
                    self._idle.put((conn, time.monotonic()))
                    return
            _close_quietly(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                conn, _ = self._idle.get_nowait()
            except queue.Empty:
                return
            _close_quietly(conn)


class _LoopPool:
    """The aiomysql pool of one event loop, and every connection it handed out."""

    __slots__ = ("conns", "lock", "pool", "slots", "timeout")

    def __init__(self, size: int, timeout: float) -> None:
        self.lock = asyncio.Lock()
        # aiomysql's pool does not wake a waiter when a closed connection is released, so it
        # never gets to make anyone wait: this semaphore bounds the connections in use.
        self.slots = asyncio.Semaphore(size)
        self.pool: Any = None
        self.conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self.timeout = timeout

    def abandon(self) -> None:
        """Close every connection without awaiting (the loop is closing or closed)."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
        for conn in list(self.conns):
            _close_quietly(conn)
        self.conns.clear()

    async def aclose(self) -> None:
        """Close the pool, wait (up to ``timeout``) for its connections to come back, and close
        whatever is left."""
        pool = self.pool
        if pool is not None:
            pool.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pool.wait_closed(), self.timeout)
        self.abandon()


class MySQLStore(Store):
    """Records in a MySQL / MariaDB InnoDB table; pooled autocommit connections, server clock.

    ``max_size`` bounds the connections in use (per process for the sync face, per event loop
    for the async face); they are opened on demand and kept. ``timeout`` bounds connecting and
    waiting for a pooled connection (seconds); each reply is awaited for at most
    ``read_timeout`` (default :data:`READ_TIMEOUT`, 30 s), on both faces. Further keyword
    ``options`` go to :func:`pymysql.connect` (and those it shares to :func:`aiomysql.connect`),
    e.g.
    ``password=…`` to keep a secret out of the URL, ``ssl=ssl_context`` or ``read_timeout=60``.
    """

    schemes = ("mysql", "mariadb")

    def __init__(
        self,
        url: str,
        *,
        table: str = "oncely_records",
        create_schema: bool = False,
        max_size: int = 16,
        timeout: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(url)
        self.table = _validate_table(table)
        if not isinstance(max_size, int) or max_size < 1:
            raise ConfigurationError(f"max_size={max_size!r}: give a number of connections >= 1")
        if not timeout > 0:
            raise ConfigurationError(f"timeout={timeout!r}: give a number of seconds above 0")
        self.create_schema = create_schema
        self.max_size = max_size
        self.timeout = float(timeout)
        args = _connect_args(url)
        accepted = inspect.signature(pymysql.connections.Connection.__init__).parameters
        for name in options:
            if name in _RESERVED or name not in accepted or name == "self":
                raise ConfigurationError(
                    f"option {name!r} cannot be passed to the MySQL store: oncely sets "
                    f"{', '.join(sorted(_RESERVED))} itself; other options must be "
                    "pymysql.connect() keyword arguments"
                )
        args.update(
            charset="utf8mb4",
            autocommit=True,
            init_command=INIT_COMMAND,
            connect_timeout=self.timeout,
            read_timeout=READ_TIMEOUT,
            write_timeout=READ_TIMEOUT,
        )
        args.update(options)
        self._sync_args = {**args, "client_flag": CLIENT.MULTI_STATEMENTS | CLIENT.FOUND_ROWS}
        #: Seconds each reply is awaited (both faces; None: without bound).
        self._read_timeout: float | None = args.get("read_timeout")
        # aiomysql spells database "db", always asks for multi-statements, and knows fewer options.
        known = inspect.signature(aiomysql.connect).parameters
        async_args = {("db" if k == "database" else k): v for k, v in args.items()}
        self._async_args = {k: v for k, v in async_args.items() if k in known}
        self._async_args["client_flag"] = CLIENT.FOUND_ROWS
        #: Whether the server has ``INSERT … RETURNING`` (None: not connected yet).
        self._returning: bool | None = None
        self._statements = {flag: _Statements(self.table, flag) for flag in (True, False)}
        self._lock = threading.Lock()
        self._pool: _SyncPool | None = None
        self._pid = os.getpid()
        self._loops = LoopLocal(
            lambda: _LoopPool(self.max_size, self.timeout), _LoopPool.aclose, _LoopPool.abandon
        )
        self._schema_ready = False

    # -- errors --------------------------------------------------------------------------------
    @property
    def _where(self) -> str:
        return redact_url(self.url)

    @property
    def _sql(self) -> _Statements:
        return self._statements[bool(self._returning)]

    def _schema_missing(self) -> SchemaMissing:
        table = "" if self.table == "oncely_records" else f" (table {self.table!r})"
        return SchemaMissing(
            f"table {self.table!r} does not exist in {self._where}; run "
            f"`oncely init {self._where}`{table} or open the store with create_schema=True"
        )

    def _schema_outdated(self) -> SchemaMissing:
        return SchemaMissing(
            f"table {self.table!r} in {self._where} was made by an older oncely: its fence "
            f"keeper {self.table}_fences is missing; run `oncely init {self._where}` (it adds it) "
            "or open the store with create_schema=True"
        )

    def _translate(self, exc: BaseException) -> StoreError:
        code = _errno(exc)
        if code == _NO_SUCH_TABLE:
            if "_fences" in str(exc):
                return self._schema_outdated()
            return self._schema_missing()
        if code == _BAD_FIELD:
            return StoreError(
                f"table {self.table!r} in {self._where} lacks oncely's columns ({exc}); it was "
                "created by something else or by another oncely version: use another table"
            )
        if code == _LOCK_WAIT_TIMEOUT:
            return StoreUnavailable(
                f"MySQL at {self._where} gave up waiting for a row lock ({exc}); another "
                "session holds locks on the oncely table for too long"
            )
        if isinstance(exc, _Busy):
            return StoreUnavailable(
                f"no MySQL connection to {self._where} within {self.timeout:g}s: all "
                f"{self.max_size} pooled connections stayed busy; raise max_size or timeout"
            )
        if (
            isinstance(exc, (pymysql.err.InterfaceError, OSError, asyncio.TimeoutError))
            or code in _GONE
            or 2000 <= code < 3000
        ):
            return StoreUnavailable(
                f"MySQL at {self._where} failed: {exc}; check that the server is running and "
                "reachable (the operation may or may not have been applied)"
            )
        return StoreError(f"MySQL error on {self._where}: {type(exc).__name__}: {exc}")

    def _unreachable(self, exc: BaseException) -> StoreError:
        if isinstance(exc, pymysql.err.ProgrammingError):
            return self._translate(exc)
        return StoreUnavailable(
            f"cannot connect to MySQL at {self._where}: {exc}; check that the server is running, "
            "that host, port, user, password and database in the URL are right, and that this "
            "machine may connect"
        )

    def _learn(self, server_version: str) -> None:
        if self._returning is None:
            self._returning = _supports_returning(server_version)

    # -- sync plumbing -------------------------------------------------------------------------
    def _connect(self) -> SyncConn:
        return pymysql.connect(**self._sync_args)

    def _sync_pool(self) -> _SyncPool:
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
                self._pid, self._pool = os.getpid(), None
            if self._pool is None:
                # Connect once now: a wrong URL or a dead server fails here with the driver's
                # reason, and we learn which SQL dialect the server speaks.
                pool = _SyncPool(self._connect, self.max_size, self.timeout)
                try:
                    conn = pool.get()
                except (pymysql.Error, OSError) as exc:
                    raise self._unreachable(exc) from exc
                healthy = False
                try:
                    self._learn(_server_version(conn))
                    if self.create_schema and not self._schema_ready:
                        self._init_schema_on(conn)
                    healthy = True
                except pymysql.Error as exc:
                    raise self._translate(exc) from exc
                finally:
                    pool.put(conn, healthy)
                self._pool = pool
            return self._pool

    def _run(self, name: str, params: Params) -> _Result:
        for attempt in range(1, _ATTEMPTS + 1):
            pool = self._sync_pool()
            try:
                conn = pool.get()
            except _Busy as exc:
                raise self._translate(exc) from None
            except (pymysql.Error, OSError) as exc:
                raise self._unreachable(exc) from exc
            healthy = False
            try:
                with conn.cursor() as cur:
                    cur.execute(getattr(self._sql, name), params)
                    result = _collect(cur)
                healthy = True
                return result
            except pymysql.Error as exc:
                if _errno(exc) == _DEADLOCK and attempt < _ATTEMPTS:
                    continue
                raise self._translate(exc) from exc
            finally:
                pool.put(conn, healthy)
        raise AssertionError("unreachable")  # pragma: no cover

    def _init_schema_on(self, conn: SyncConn) -> None:
        with conn.cursor() as cur:
            cur.execute(self._sql.ddl)
        self._schema_ready = True

    # -- schema --------------------------------------------------------------------------------
    def schema_sql(self) -> str:
        """The DDL :meth:`init_schema` runs, for review or for a migration tool."""
        return self._sql.ddl

    def init_schema(self) -> None:
        """Create the table and its expiry index if missing; safe to run concurrently."""
        self._run("ddl", {})
        self._schema_ready = True

    def check_schema(self) -> None:
        self._run("check", {})
        _check_keeper(self._run("keeper", {}), self._schema_outdated)

    def close(self) -> None:
        """Close the sync pool, and the async pools of event loops that are not running.

        The store stays usable: the next call opens new connections.
        """
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        self._loops.close_idle()

    # -- sync face -----------------------------------------------------------------------------
    def claim(self, key: RecordKey, fingerprint: str, lease: float, ttl: float) -> ClaimOutcome:
        params = _claim_params(key, fingerprint, lease, ttl)
        return _claim_outcome(self._run("claim", params), params)

    def complete(self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float) -> None:
        params = _complete_params(key, fence, result, codec, ttl)
        _check_lease(self._run("complete", params), key, fence)

    def release(self, key: RecordKey, fence: int) -> None:
        _check_lease(self._run("release", _fence_params(key, fence)), key, fence)

    def renew(self, key: RecordKey, fence: int, lease: float) -> float:
        return _renewed(self._run("renew", _renew_params(key, fence, lease)), key, fence)

    def watch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        params = _key_params(key)
        return poll_until(lambda: _changed(self._run("state", params), fence), timeout)

    def get(self, key: RecordKey) -> Record | None:
        rows = self._run("get", _key_params(key)).rows
        return _record(rows[0]) if rows else None

    def delete(self, key: RecordKey) -> bool:
        return any(row[0] for row in self._run("delete", _key_params(key)).rows)

    def purge_expired(self, limit: int = 1000) -> int:
        return int(self._run("purge", {"limit": max(0, int(limit))}).rows[0][0])

    def list(self, scope: str | None = None, limit: int = 100) -> Records:
        name = "list_all" if scope is None else "list_scope"
        return [_record(row) for row in self._run(name, _list_params(scope, limit)).rows]

    def now(self) -> float:
        return float(self._run("now", {}).rows[0][0])

    # -- async plumbing ------------------------------------------------------------------------
    async def _aacquire(self, slot: _LoopPool, pool: Any) -> Any:
        """A connection from the loop's ``pool``; the caller holds one of ``slot.slots``."""
        try:
            conn = await pool.acquire()
        except (pymysql.Error, OSError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        slot.conns.add(conn)
        return conn

    async def _apool(self) -> _LoopPool:
        slot = self._loops.get()
        if slot.pool is not None:
            return slot
        async with slot.lock:
            if slot.pool is None:
                pool = await aiomysql.create_pool(
                    minsize=0, maxsize=self.max_size, **self._async_args
                )
                healthy = False
                try:
                    async with slot.slots:
                        conn = await self._aacquire(slot, pool)
                        try:
                            self._learn(_server_version(conn))
                            if self.create_schema and not self._schema_ready:
                                async with conn.cursor() as cur:
                                    await cur.execute(self._sql.ddl)
                                self._schema_ready = True
                            healthy = True
                        except pymysql.Error as exc:
                            raise self._translate(exc) from exc
                        finally:
                            if not healthy:
                                _close_quietly(conn)
                            pool.release(conn)
                finally:
                    if healthy:  # published only now: the schema is complete
                        slot.pool = pool
                    else:
                        pool.close()
        return slot

    async def _arun(self, name: str, params: Params) -> _Result:
        with keep_cancel():  # asyncio.wait_for can drop a cancel (Python 3.11)
            return await self._attempts(name, params)

    async def _attempts(self, name: str, params: Params) -> _Result:
        for attempt in range(1, _ATTEMPTS + 1):
            slot = await self._apool()
            pool = slot.pool
            if slot.slots.locked():
                try:
                    await asyncio.wait_for(slot.slots.acquire(), self.timeout)
                except asyncio.TimeoutError:
                    raise self._translate(_Busy()) from None
            else:
                await slot.slots.acquire()
            try:
                conn = await self._aacquire(slot, pool)
                healthy = False
                try:
                    # aiomysql has no read timeout: bound the round trip like PyMySQL's.
                    result = await asyncio.wait_for(
                        _aexecute(conn, getattr(self._sql, name), params), self._read_timeout
                    )
                    healthy = True
                    return result
                except asyncio.TimeoutError:
                    raise StoreUnavailable(
                        f"MySQL at {self._where} did not answer within {self._read_timeout:g}s "
                        "(read_timeout); check that the server is running and reachable (the "
                        "operation may or may not have been applied)"
                    ) from None
                except pymysql.Error as exc:
                    if _errno(exc) == _DEADLOCK and attempt < _ATTEMPTS:
                        continue
                    raise self._translate(exc) from exc
                finally:
                    # Cancelled or failed mid-statement: the connection may be mid-result or
                    # inside the transaction; close it rather than hand it back.
                    if not healthy:
                        _close_quietly(conn)
                    pool.release(conn)
            finally:
                slot.slots.release()
        raise AssertionError("unreachable")  # pragma: no cover

    async def ainit_schema(self) -> None:
        """Async :meth:`init_schema`."""
        await self._arun("ddl", {})
        self._schema_ready = True

    async def acheck_schema(self) -> None:
        """Async :meth:`check_schema`."""
        await self._arun("check", {})
        _check_keeper(await self._arun("keeper", {}), self._schema_outdated)

    async def aclose(self) -> None:
        await self._loops.aclose()

    # -- async face ----------------------------------------------------------------------------
    async def aclaim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome:
        params = _claim_params(key, fingerprint, lease, ttl)
        return _claim_outcome(await self._arun("claim", params), params)

    async def acomplete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> None:
        params = _complete_params(key, fence, result, codec, ttl)
        _check_lease(await self._arun("complete", params), key, fence)

    async def arelease(self, key: RecordKey, fence: int) -> None:
        _check_lease(await self._arun("release", _fence_params(key, fence)), key, fence)

    async def arenew(self, key: RecordKey, fence: int, lease: float) -> float:
        return _renewed(await self._arun("renew", _renew_params(key, fence, lease)), key, fence)

    async def awatch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        params = _key_params(key)

        async def changed() -> bool:
            return _changed(await self._arun("state", params), fence)

        return await apoll_until(changed, timeout)

    async def aget(self, key: RecordKey) -> Record | None:
        rows = (await self._arun("get", _key_params(key))).rows
        return _record(rows[0]) if rows else None

    async def adelete(self, key: RecordKey) -> bool:
        return any(row[0] for row in (await self._arun("delete", _key_params(key))).rows)

    async def apurge_expired(self, limit: int = 1000) -> int:
        return int((await self._arun("purge", {"limit": max(0, int(limit))})).rows[0][0])

    async def alist(self, scope: str | None = None, limit: int = 100) -> Records:
        name = "list_all" if scope is None else "list_scope"
        return [_record(row) for row in (await self._arun(name, _list_params(scope, limit))).rows]

    async def anow(self) -> float:
        return float((await self._arun("now", {})).rows[0][0])
