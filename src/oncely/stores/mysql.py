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
  makes the read see exactly what it decided. The claim carries a not-after bound on the
  server's clock (the end of its caller's ``read_timeout``, from an estimate of that clock kept
  from earlier claims' rows, :mod:`oncely.core.storeclock`): a claim the server runs later (it
  sat in a paused server's socket) inserts and takes over nothing.
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

Layout: this module holds the SQL text; what the SQL stores share is in :mod:`oncely.stores.sql`
and the connection handling in :mod:`oncely.backends.mysql`. Each operation is written once, as
a plan of statements (:mod:`oncely.backends.plans`), run by the sync face on a small
thread-safe pool of PyMySQL connections and by the async face on one aiomysql pool per running
event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import aiomysql  # type: ignore[import-untyped]
import pymysql

from oncely.backends.forks import after_fork, inherit
from oncely.backends.loops import LoopLocal
from oncely.backends.mysql import (
    GONE,
    Busy,
    LoopPool,
    Result,
    SyncConn,
    SyncPool,
    aexecute,
    close_quietly,
    collect,
    driver_args,
    errno,
    server_version,
    supports_returning,
)
from oncely.backends.plans import Exec, Plan, Sleep
from oncely.backends.urls import redact_url
from oncely.core.cancelsafe import keep_cancel
from oncely.core.records import ClaimOutcome, Record, RecordKey
from oncely.core.storeclock import StoreClock
from oncely.core.text import literal_bytes
from oncely.errors import (
    OncelyError,
    ResultTooLarge,
    SchemaMissing,
    StoreError,
    StoreUnavailable,
)
from oncely.settings import flag, seconds, whole
from oncely.stores.planned import PlannedStore
from oncely.stores.polling import poll_plan
from oncely.stores.sql import (
    COLUMNS,
    Params,
    changed,
    check_lease,
    fence_params,
    key_params,
    list_params,
    nonce,
    nonce_outcome,
    record,
    renew_params,
    schema_missing,
    validate_table,
)

__all__ = ["MySQLStore"]

Records = list[Record]  # named here: inside the class, ``list`` is the method

# -- SQL ---------------------------------------------------------------------------------------
# ``{t}`` is the backquoted table name and ``{h}`` its fence keeper (``<table>_fences``). Times
# are DOUBLE epoch seconds on the server's clock.

_NOW: Final = "UNIX_TIMESTAMP(NOW(6))"
_NOW_US: Final = f"CAST({_NOW} * 1000000 AS SIGNED)"

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
# ``not_after`` (epoch milliseconds on the server's clock, a whole number, or NULL): the caller
# stops waiting for the reply then (its read_timeout ends; oncely.core.storeclock). A claim the
# server runs later (it was queued in a paused server's socket, or its caller's process is gone)
# inserts nothing, so it takes nothing over either: RETURNING returns no row, and the read of
# the transaction form says it was too late (its last column).
_IN_TIME: Final = f"(%(not_after)s IS NULL OR {_NOW} * 1000 <= %(not_after)s)"
UPSERT: Final = (
    f"INSERT INTO {{t}} ({COLUMNS}, claim_id) SELECT "
    f"%(scope)s, %(digest)s, 'in_progress', %(fingerprint)s, GREATEST(h.high + 1, {_NOW_US}), "
    f"{_NOW} + %(lease)s, {_NOW} + %(keep)s, {_NOW}, NULL, NULL, %(nonce)s "
    f"FROM {{h}} AS h WHERE h.id = 0 AND {_IN_TIME} LOCK IN SHARE MODE "
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
    f"SELECT {_CLAIM_ROW.replace(_NOW, _TX_NOW)}, {_IN_TIME.replace(_NOW, _TX_NOW)} "
    f"FROM {{t}} WHERE {_KEY}; COMMIT"
)

_FENCED: Final = f"WHERE {_KEY} AND fence = %(fence)s"
# Completes the caller's claim. A record already completed under this fence with this very
# result is the caller's own earlier completion whose reply was lost: it matches too (FOUND_ROWS
# counts it) and keeps its expiry. Assignments run left to right, so expires_at reads the old
# status. The result travels once (its SHA-256 stands for it in the comparison): the whole
# statement must fit in max_allowed_packet, and a second copy halved the result that fits.
COMPLETE: Final = (
    f"UPDATE {{t}} SET expires_at = IF(status = 'completed', expires_at, {_NOW} + %(ttl)s), "
    "status = 'completed', lease_until = NULL, result = UNHEX(%(result)s), codec = %(codec)s "
    f"{_FENCED} AND (status = 'in_progress' OR (status = 'completed' "
    "AND SHA2(result, 256) <=> %(result_sha)s AND codec <=> %(codec)s))"
)
#: Copies of the result (hex text, two characters a byte) in the completing statement.
_RESULT_COPIES: Final = COMPLETE.count("%(result)s")
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
# With running false, a running record (in progress, lease not run out) stays (forget()).
_DELETABLE: Final = (
    f"{_KEY} AND (%(running)s OR NOT (status = 'in_progress' AND lease_until > {_TX_NOW} "
    f"AND expires_at > {_TX_NOW}))"
)
DELETE: Final = (
    f"START TRANSACTION; SET {_TX_NOW} = {_NOW}; "
    + _RAISE_HIGH.replace("{max}", f"SELECT MAX(fence) FROM {{t}} WHERE {_DELETABLE}")
    + f"; SELECT {_LIVE} FROM {{t}} WHERE {_DELETABLE} AND fence <= {_HIGH} FOR UPDATE; "
    f"DELETE FROM {{t}} WHERE {_DELETABLE} AND fence <= {_HIGH}; COMMIT"
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

# -- pure helpers shared by both faces ------------------------------------------------------------

_DEADLOCK = 1213
_NO_SUCH_TABLE = 1146
_BAD_FIELD = 1054
_LOCK_WAIT_TIMEOUT = 1205
# A deadlock rolls the whole statement (or transaction) back, so running it again is safe.
_ATTEMPTS = 5
#: ER_NET_PACKET_TOO_LARGE; a server may instead just close the connection (2006, 2013).
_PACKET_TOO_LARGE = 1153
_GONE_AWAY = frozenset({2006, 2013})
#: Bytes of a statement besides the result (SQL text, key, codec): kept free of the packet.
_STATEMENT_MARGIN = 64 * 1024
_PACKET_QUERY: Final = "SELECT @@max_allowed_packet"
# Longest lease or ttl stored (about 317 years); also turns float('inf') into "forever".
_FOREVER = 1e10


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


def _seconds(value: float) -> float:
    return min(float(value), _FOREVER)


def _claim_params(key: RecordKey, fingerprint: str, lease: float, ttl: float) -> Params:
    lease = _seconds(lease)
    return {
        "scope": key.scope,
        "digest": key.digest,
        "fingerprint": fingerprint,
        "lease": lease,
        "keep": max(lease, _seconds(ttl)),
        "nonce": nonce(),
        "not_after": None,  # set by the executor just before it sends the statement
    }


def _sent(sql: str, params: Params) -> int:
    """Bytes of a statement as sent (what counts against max_allowed_packet): the SQL text
    plus each value as many times as the statement names it (quoted; a number at most 32
    characters). An upper bound for text with characters to escape, exact for hex."""
    size = len(sql.encode("utf-8"))
    for name, value in params.items():
        copies = sql.count(f"%({name})s")
        if not copies:
            continue
        if isinstance(value, str):
            width = literal_bytes(value)
        elif isinstance(value, bytes):
            width = 2 * len(value) + 3
        else:
            width = 32
        size += copies * (width - len(f"%({name})s"))
    return size


def _complete_params(key: RecordKey, fence: int, result: bytes, codec: str, ttl: float) -> Params:
    return {
        "scope": key.scope,
        "digest": key.digest,
        "fence": int(fence),
        # Hex text rather than bytes: aiomysql cannot escape bytes on PyMySQL 1.2.3+
        # (aio-libs/aiomysql#1080), and PyMySQL 1.2 sends bytes as hex anyway.
        "result": bytes(result).hex(),
        "result_sha": hashlib.sha256(result).hexdigest(),
        "codec": codec,
        "ttl": _seconds(ttl),
    }


def _check_keeper(result: Result, outdated: Callable[[], SchemaMissing]) -> None:
    if not result.rows or result.rows[0][0] != 1:
        raise outdated()


class MySQLStore(PlannedStore):
    """Records in a MySQL / MariaDB InnoDB table; pooled autocommit connections, server clock.

    ``max_size`` bounds the connections in use (per process for the sync face, per event loop
    for the async face); they are opened on demand and kept. ``timeout`` bounds connecting and
    waiting for a pooled connection (seconds); each reply is awaited for at most
    ``read_timeout`` (default :data:`oncely.backends.mysql.READ_TIMEOUT`, 30 s), on both
    faces. Further keyword ``options`` go to :func:`pymysql.connect` (and those it shares to
    :func:`aiomysql.connect`), e.g. ``password=…`` to keep a secret out of the URL,
    ``ssl=ssl_context`` or ``read_timeout=60``.
    """

    schemes = ("mysql", "mariadb")

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        driver_args(url, 5.0, {})

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
        self.table = validate_table(table, 57, "database", 64)
        max_size = whole(max_size, "max_size", where="MySQLStore", minimum=1)
        timeout = seconds(timeout, "timeout", where="MySQLStore")
        self.create_schema = flag(create_schema, "create_schema", where="MySQLStore")
        self.max_size = max_size
        self.timeout = float(timeout)
        self._sync_args, self._async_args, self._read_timeout = driver_args(
            url, self.timeout, options
        )
        #: The session's ``max_allowed_packet`` in bytes (None: not connected yet).
        self.max_packet: int | None = None
        #: Whether the server has ``INSERT … RETURNING`` (None: not connected yet).
        self._returning: bool | None = None
        self._statements = {flag: _Statements(self.table, flag) for flag in (True, False)}
        #: The estimate of the server's clock that bounds each claim (oncely.core.storeclock).
        self._clock = StoreClock()
        self._lock = threading.Lock()
        self._pool: SyncPool | None = None
        self._loops = LoopLocal(
            lambda: LoopPool(self.max_size, self.timeout), LoopPool.aclose, LoopPool.abandon
        )
        self._schema_ready = False
        after_fork(self, MySQLStore._forked)

    def _forked(self) -> None:
        """In a forked child: the parent's sockets are never used; a new pool opens on demand."""
        inherit(self._pool)
        self._pool = None
        self._lock = threading.Lock()

    # -- errors --------------------------------------------------------------------------------
    @property
    def _where(self) -> str:
        return redact_url(self.url)

    @property
    def _sql(self) -> _Statements:
        return self._statements[bool(self._returning)]

    def _schema_missing(self) -> SchemaMissing:
        return schema_missing(self.table, self._where, self._where)

    def _schema_outdated(self) -> SchemaMissing:
        return SchemaMissing(
            f"table {self.table!r} in {self._where} was made by an older oncely: its fence "
            f"keeper {self.table}_fences is missing; run `oncely init {self._where}` (it adds it) "
            "or open the store with create_schema=True"
        )

    def _translate(
        self, exc: BaseException, params: Params | None = None, sql: str = ""
    ) -> OncelyError:
        """The oncely error for a driver error met running ``sql`` with ``params``."""
        code = errno(exc)
        packet = self.max_packet
        sent = _sent(sql, params) if params is not None else 0
        # A server answers an oversized packet by closing the connection, often before the
        # client finished sending it (a reset: 2006 / 2013, or to aiomysql a reply out of
        # sequence): any failure of a statement over the packet, and a disconnect on one within
        # the margin of it, is that refusal -- deterministic, never an outage.
        over = packet is not None and sent > packet
        near = packet is not None and sent + _STATEMENT_MARGIN > packet
        if code == _PACKET_TOO_LARGE or over or (near and code in _GONE_AWAY):
            # The statement was too big for the server: deterministic, not an outage.
            result = params.get("result") if params is not None else None
            return ResultTooLarge(
                f"MySQL at {self._where} refused a {sent}-byte statement ({exc}): it is over "
                f"max_allowed_packet ({packet} bytes)",
                len(result) // 2 if isinstance(result, str) else sent,
                self.max_result_bytes or 0,
            )
        if code == _NO_SUCH_TABLE:
            if "_fences" in str(exc):
                # A statement that meets the keeper first (purge, delete) says only that the
                # keeper is missing, also when the table itself does not exist.
                return SchemaMissing(
                    f"table {self.table!r} or its fence keeper {self.table}_fences does not "
                    f"exist in {self._where} (a table made by an older oncely lacks the "
                    f"keeper); run `oncely init {self._where}` (it creates what is missing) or "
                    "open the store with create_schema=True"
                )
            return self._schema_missing()
        if code == _BAD_FIELD:
            return StoreError(
                f"table {self.table!r} in {self._where} lacks oncely's columns ({exc}); it was "
                "created by something else or by another oncely version: give oncely its own "
                "table (table=..., or --table on the command line)"
            )
        if code == _LOCK_WAIT_TIMEOUT:
            return StoreUnavailable(
                f"MySQL at {self._where} gave up waiting for a row lock ({exc}); another "
                "session holds locks on the oncely table for too long"
            )
        if isinstance(exc, Busy):
            return StoreUnavailable(
                f"no MySQL connection to {self._where} within {self.timeout:g}s: all "
                f"{self.max_size} pooled connections stayed busy; raise max_size or timeout"
            )
        if (
            isinstance(exc, (pymysql.err.InterfaceError, OSError, asyncio.TimeoutError))
            or code in GONE
            or 2000 <= code < 3000
        ):
            return StoreUnavailable(
                f"MySQL at {self._where} failed: {exc}; check that the server is running and "
                "reachable (the operation may or may not have been applied)"
            )
        return StoreError(f"MySQL error on {self._where}: {type(exc).__name__}: {exc}")

    def _unreachable(self, exc: BaseException) -> OncelyError:
        if isinstance(exc, pymysql.err.ProgrammingError):
            return self._translate(exc)
        return StoreUnavailable(
            f"cannot connect to MySQL at {self._where}: {exc}; check that the server is running, "
            "that host, port, user, password and database in the URL are right, and that this "
            "machine may connect"
        )

    def _learn(self, server_version: str) -> None:
        if self._returning is None:
            self._returning = supports_returning(server_version)

    def _learn_packet(self, rows: Sequence[Sequence[Any]]) -> None:
        """Take the session's ``max_allowed_packet`` (read once per pool, when it opens): a
        result is sent as hex text (two characters a byte), once, in one statement that must
        fit in the packet, so at most half of the packet, less a margin for the rest of the
        statement, fits (:meth:`Store.check_result_size`; :data:`_RESULT_COPIES` counts the
        copies the statement carries)."""
        packet = int(rows[0][0]) if rows and rows[0] and rows[0][0] is not None else 0
        if packet > 0:
            self.max_packet = packet
            fits = max(packet - _STATEMENT_MARGIN, 0) // (2 * _RESULT_COPIES)
            # A lower limit set on the store by its user stays.
            self.max_result_bytes = min(fits, self.max_result_bytes or fits)
            self.max_result_source = (
                f"the server's max_allowed_packet is {packet} bytes and a result is sent as hex "
                "text; raise max_allowed_packet on the server, or return a smaller result"
            )

    # -- sync plumbing -------------------------------------------------------------------------
    def _connect(self) -> SyncConn:
        return pymysql.connect(**self._sync_args)

    def _sync_pool(self) -> SyncPool:
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                # Connect once now: a wrong URL or a dead server fails here with the driver's
                # reason, and we learn which SQL dialect the server speaks.
                pool = SyncPool(self._connect, self.max_size, self.timeout)
                try:
                    conn = pool.get()
                except (pymysql.Error, OSError) as exc:
                    raise self._unreachable(exc) from exc
                healthy = False
                try:
                    self._learn(server_version(conn))
                    with conn.cursor() as cur:
                        cur.execute(_PACKET_QUERY)
                        self._learn_packet(cur.fetchall())
                    if self.create_schema and not self._schema_ready:
                        self._init_schema_on(conn)
                    healthy = True
                except pymysql.Error as exc:
                    raise self._translate(exc) from exc
                finally:
                    pool.put(conn, healthy)
                self._pool = pool
            return self._pool

    def _run(self, name: str, params: Params) -> Result:
        for attempt in range(1, _ATTEMPTS + 1):
            pool = self._sync_pool()
            try:
                conn = pool.get()
            except Busy as exc:
                raise self._translate(exc) from None
            except (pymysql.Error, OSError) as exc:
                raise self._unreachable(exc) from exc
            healthy = False
            try:
                self._not_after(params)
                with conn.cursor() as cur:
                    cur.execute(getattr(self._sql, name), params)
                    result = collect(cur)
                healthy = True
                return result
            except pymysql.Error as exc:
                if errno(exc) == _DEADLOCK and attempt < _ATTEMPTS:
                    continue
                raise self._translate(exc, params, getattr(self._sql, name)) from exc
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

    # -- every operation, once: a plan of statements (oncely.backends.plans) -------------------
    def _claim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> Plan[ClaimOutcome]:
        clock = self._clock
        if clock.state is None and self._read_timeout is not None:
            # Once per store: the server's clock, so that even the first claim is bounded.
            sent = time.monotonic()
            now = float((yield Exec("now", {})).rows[0][0])
            clock.observe(now, sent, time.monotonic())
        params = _claim_params(key, fingerprint, lease, ttl)
        sent = time.monotonic()
        result: Result = yield Exec("claim", params)
        if not result.rows:
            if params["not_after"] is not None:
                clock.state = None  # no clock came back: read it again before the next claim
                raise self._too_late(key)
            # the upsert always leaves the row: this is not the table we made
            raise StoreError(f"the claim on {key.scope!r} read no row back; check the table")
        row = result.rows[0]
        clock.observe(float(row[11]), sent, time.monotonic())
        if len(row) > 12 and row[12] is not None and not int(row[12]):  # the transaction form
            raise self._too_late(key)
        return nonce_outcome(row, params["nonce"], fingerprint)

    def _too_late(self, key: RecordKey) -> StoreUnavailable:
        return StoreUnavailable(
            f"the claim of {key.scope!r}/{key.digest[:16]}… reached MySQL at {self._where} only "
            "after its caller stopped waiting for it (its read_timeout had ended; the server was "
            "paused or overloaded and ran the queued statement late), so it decided nothing and "
            "wrote nothing. Retry. (No row came back at all: if this repeats, check the table's "
            "fence keeper row with `oncely check`.)"
        )

    def _not_after(self, params: Params) -> None:
        """A claim's ``not_after``, set just before it is sent: when its caller stops waiting
        for the reply (``read_timeout`` from now), in the server's clock."""
        if "not_after" in params and self._read_timeout is not None:
            bound = self._clock.not_after(time.monotonic() + self._read_timeout)
            params["not_after"] = None if bound is None else int(bound * 1000) + 1

    def _complete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> Plan[None]:
        params = _complete_params(key, fence, result, codec, ttl)
        check_lease((yield Exec("complete", params)).rowcount, key, fence)

    def _release(self, key: RecordKey, fence: int) -> Plan[None]:
        check_lease((yield Exec("release", fence_params(key, fence))).rowcount, key, fence)

    def _renew(self, key: RecordKey, fence: int, lease: float) -> Plan[float]:
        rows = (yield Exec("renew", renew_params(key, fence, _seconds(lease)))).rows
        check_lease(len(rows), key, fence)
        return float(rows[0][0])

    def _watch(self, key: RecordKey, fence: int, timeout: float) -> Plan[bool]:
        params = key_params(key)

        def look() -> Plan[bool]:
            return changed((yield Exec("state", params)).rows, fence)

        return (yield from poll_plan(look, timeout))

    def _get(self, key: RecordKey) -> Plan[Record | None]:
        rows = (yield Exec("get", key_params(key))).rows
        return record(rows[0]) if rows else None

    def _delete(self, key: RecordKey, running: bool) -> Plan[bool]:
        params = {**key_params(key), "running": int(running)}
        return any(row[0] for row in (yield Exec("delete", params)).rows)

    def _purge_expired(self, limit: int) -> Plan[int]:
        return int((yield Exec("purge", {"limit": max(0, int(limit))})).rows[0][0])

    def _list(self, scope: str | None, limit: int) -> Plan[Records]:
        name = "list_all" if scope is None else "list_scope"
        return [record(row) for row in (yield Exec(name, list_params(scope, limit))).rows]

    def _now(self) -> Plan[float]:
        return float((yield Exec("now", {})).rows[0][0])

    def _execute(self, request: Any) -> Any:
        if type(request) is Sleep:
            time.sleep(request.seconds)
            return None
        return self._run(request.statement, request.params)

    async def _aexecute(self, request: Any) -> Any:
        if type(request) is Sleep:
            await asyncio.sleep(request.seconds)
            return None
        return await self._arun(request.statement, request.params)

    # -- async plumbing ------------------------------------------------------------------------
    async def _aacquire(self, slot: LoopPool, pool: Any) -> Any:
        """A connection from the loop's ``pool``; the caller holds one of ``slot.slots``."""
        try:
            conn = await pool.acquire()
        except (pymysql.Error, OSError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        slot.conns.add(conn)
        return conn

    async def _apool(self) -> LoopPool:
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
                            self._learn(server_version(conn))
                            async with conn.cursor() as cur:
                                await cur.execute(_PACKET_QUERY)
                                self._learn_packet(await cur.fetchall())
                            if self.create_schema and not self._schema_ready:
                                async with conn.cursor() as cur:
                                    await cur.execute(self._sql.ddl)
                                self._schema_ready = True
                            healthy = True
                        except pymysql.Error as exc:
                            raise self._translate(exc) from exc
                        finally:
                            if not healthy:
                                close_quietly(conn)
                            pool.release(conn)
                finally:
                    if healthy:  # published only now: the schema is complete
                        slot.pool = pool
                    else:
                        pool.close()
        return slot

    async def _arun(self, name: str, params: Params) -> Result:
        with keep_cancel():  # asyncio.wait_for can drop a cancel (Python 3.11)
            return await self._attempts(name, params)

    async def _attempts(self, name: str, params: Params) -> Result:
        for attempt in range(1, _ATTEMPTS + 1):
            slot = await self._apool()
            pool = slot.pool
            if slot.slots.locked():
                try:
                    await asyncio.wait_for(slot.slots.acquire(), self.timeout)
                except asyncio.TimeoutError:
                    raise self._translate(Busy()) from None
            else:
                await slot.slots.acquire()
            try:
                conn = await self._aacquire(slot, pool)
                healthy = False
                try:
                    self._not_after(params)
                    # aiomysql has no read timeout: bound the round trip like PyMySQL's.
                    result = await asyncio.wait_for(
                        aexecute(conn, getattr(self._sql, name), params), self._read_timeout
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
                    if errno(exc) == _DEADLOCK and attempt < _ATTEMPTS:
                        continue
                    raise self._translate(exc, params, getattr(self._sql, name)) from exc
                finally:
                    # Cancelled or failed mid-statement: the connection may be mid-result or
                    # inside the transaction; close it rather than hand it back.
                    if not healthy:
                        close_quietly(conn)
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
