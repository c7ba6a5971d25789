"""``sqlite:///path.db``: the embedded default, safe across threads and processes.

The file is opened in WAL mode; every decision is one SQL statement whose clock is SQLite's
``julianday('now')``. Connections are shared by all threads (:class:`Connections`): a statement
borrows one and gives it back, and at most 16 exist (more threads wait their turn, as SQLite's
single writer makes them do anyway), so what the store keeps open never grows with the number of
threads that use it. Writes from the threads of one process queue on the file's writer gate
and share group commits (:func:`oncely.backends.sqlite.execute`): they never meet in SQLite's
busy handler, whose sleeps made the tail of 32 writing threads half a second; other processes
on the file are waited for with ``busy_timeout``. The async face queues its writes on the
file's writer thread (:func:`oncely.backends.sqlite.aexecute`: group commits, each event loop
woken once per batch) and runs its reads on ``workers`` threads. The file and table are
created on first use because the file belongs to the application; ``create_schema=False`` turns
that off: the store then opens only an existing file and creates nothing (what ``oncely check``
relies on).

URL forms: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``. Query options:
``?synchronous=NORMAL`` (default ``FULL``: a completed record survives a power cut) and
``?busy_timeout=15`` (seconds to wait for another writer; default 15).

A caller with a shorter bound of its own waits no longer than that: a duplicate call waiting
``wait_timeout`` for the first one claims again with the wait's deadline
(:mod:`oncely.core.deadline`), and if another process keeps the file locked until then, the
claim writes nothing and the call ends with :class:`~oncely.errors.InFlightError` (HTTP: 409)
at ``wait_timeout``, as if the first call were still running, not with
:class:`~oncely.errors.StoreUnavailable` after ``busy_timeout``. The same bound ends the waits
of opening a connection (the first one also switches the file to WAL and creates the schema,
in one transaction).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import sqlite3
import threading
import time
from typing import Any, Final

from oncely.backends.forks import after_fork
from oncely.backends.plans import Exec, Plan, Sleep
from oncely.backends.sqlite import CLOCK as NOW
from oncely.backends.sqlite import (
    Connections,
    Workers,
    aexecute,
    busy_error,
    busy_pragma,
    busy_timeout_of,
    enable_wal,
    execute,
    is_busy,
    left,
    open_error,
    opening_end,
    parse_url,
    synchronous_of,
)
from oncely.core import deadline
from oncely.core.deadline import DeadlinePassed
from oncely.core.records import ClaimOutcome, Record, RecordKey
from oncely.errors import (
    ConfigurationError,
    OncelyError,
    ResultTooLarge,
    SchemaMissing,
    StoreError,
    StoreUnavailable,
)
from oncely.settings import flag, text, whole
from oncely.stores.planned import PlannedStore
from oncely.stores.polling import poll_plan
from oncely.stores.sql import (
    COLUMNS,
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
)

__all__ = ["SQLiteStore"]

Records = list[Record]  # named here: inside the class, ``list`` is the method

SCHEMA = """
CREATE TABLE IF NOT EXISTS {t} (
    scope       TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    fence       INTEGER NOT NULL,
    lease_until REAL,
    expires_at  REAL    NOT NULL,
    created_at  REAL    NOT NULL,
    result      BLOB,
    codec       TEXT,
    claim_id    INTEGER NOT NULL,
    PRIMARY KEY (scope, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {t}_expires ON {t} (expires_at);
CREATE TABLE IF NOT EXISTS {t}_fences (
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    high INTEGER NOT NULL
);
INSERT OR IGNORE INTO {t}_fences (id, high) VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS {t}_keep_fence AFTER DELETE ON {t} BEGIN
    UPDATE {t}_fences SET high = max(high, old.fence) WHERE id = 0;
END;
"""
# Fences: a row that goes away (delete, purge) leaves its fence in ``{t}_fences.high`` through
# the trigger, in the same statement; a new row's fence is above it and above the clock in
# microseconds, a taken-over row's is above its old one. Writers are serialised by SQLite, and a
# write statement reads the latest data, so fences of a key only grow, whatever happened between
# two claims.
_HIGH = "coalesce((SELECT high FROM {t}_fences WHERE id = 0), 0) + 1"

# One statement decides the claim. The upsert always returns the row: if the stored row may be
# taken over (C), every column is replaced and ``claim_id`` becomes ours; otherwise each column
# keeps its value. Comparing the returned ``claim_id`` with ours tells New from the rest.
_C = (
    "({t}.status = 'released' OR {t}.expires_at <= excluded.created_at OR "
    "({t}.status = 'in_progress' AND {t}.lease_until <= excluded.created_at))"
)
_TAKE = ", ".join(
    f"{col} = CASE WHEN {_C} THEN {new} ELSE {{t}}.{col} END"
    for col, new in [
        ("status", "'in_progress'"),
        ("fingerprint", "excluded.fingerprint"),
        ("fence", "max({t}.fence + 1, excluded.fence)"),
        ("lease_until", "excluded.lease_until"),
        ("expires_at", "excluded.expires_at"),
        ("created_at", "excluded.created_at"),
        ("result", "NULL"),
        ("codec", "NULL"),
        ("claim_id", "excluded.claim_id"),
    ]
)
CLAIM = (
    "INSERT INTO {t} (" + COLUMNS + ", claim_id) "
    "SELECT :scope, :digest, 'in_progress', :fp, max("
    + _HIGH
    + ", CAST(n.now * 1000000 AS INTEGER)), "
    "n.now + :lease, n.now + max(:lease, :ttl), n.now, NULL, NULL, :claim_id "
    "FROM (SELECT " + NOW + " AS now) AS n WHERE 1 "
    "ON CONFLICT (scope, digest) DO UPDATE SET " + _TAKE + " "
    "RETURNING " + COLUMNS + ", claim_id, " + NOW
)
_FENCED = "WHERE scope = :scope AND digest = :digest AND fence = :fence "
_MINE = _FENCED + "AND status = 'in_progress'"
# Completes the caller's claim; a completion under this fence with this very result is the
# caller's own earlier write (its reply was lost): it matches too and changes nothing.
COMPLETE = (
    "UPDATE {t} SET status = 'completed', lease_until = NULL, expires_at = "
    "CASE WHEN status = 'completed' THEN expires_at ELSE " + NOW + " + :ttl END, "
    "result = :result, codec = :codec " + _FENCED + "AND (status = 'in_progress' OR "
    "(status = 'completed' AND result IS :result AND codec IS :codec))"
)
# Release leaves an expired tombstone rather than deleting the row: a repeated release finds its
# own tombstone (success), and the next claim takes the row over with fence ``old + 1``.
RELEASE = (
    "UPDATE {t} SET status = 'released', lease_until = "
    + NOW
    + ", expires_at = CASE WHEN status = 'released' THEN expires_at ELSE "
    + NOW
    + " END "
    + _FENCED
    + "AND status IN ('in_progress', 'released')"
)
RENEW = (
    "UPDATE {t} SET lease_until = " + NOW + " + :lease, "
    "expires_at = max(expires_at, " + NOW + " + :lease) " + _MINE + " RETURNING lease_until"
)
GET = (
    "SELECT "
    + COLUMNS
    + " FROM {t} WHERE scope = :scope AND digest = :digest AND status <> 'released' "
    + "AND expires_at > "
    + NOW
)
STATE = (
    "SELECT status, fence, expires_at > "
    + NOW
    + " FROM {t} WHERE scope = :scope AND digest = :digest"
)
# Removes tombstones and expired rows too, but reports only whether a live record was there.
DELETE = (
    "DELETE FROM {t} WHERE scope = :scope AND digest = :digest "
    "AND (:running OR NOT (status = 'in_progress' AND lease_until > "
    + NOW
    + " AND expires_at > "
    + NOW
    + ")) RETURNING status <> 'released' AND expires_at > "
    + NOW
)
PURGE = (
    "DELETE FROM {t} WHERE (scope, digest) IN "
    "(SELECT scope, digest FROM {t} WHERE expires_at <= " + NOW + " LIMIT :limit)"
)
LIST = (
    "SELECT "
    + COLUMNS
    + " FROM {t} WHERE status <> 'released' AND expires_at > "
    + NOW
    + " {where} LIMIT :limit"
)
# Every part of the schema is there (a file made by an older version lacks the fence keeper).
CHECK = (
    "SELECT (SELECT count(*) FROM {t}_fences WHERE id = 0) + (SELECT count(*) FROM sqlite_master "
    "WHERE type = 'trigger' AND name = '{t}_keep_fence') "
    "WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE 0)"
)


#: SQLite's compile-time default of SQLITE_MAX_LENGTH (bytes), for Pythons without getlimit.
_SQLITE_MAX_LENGTH: Final = 1_000_000_000
#: SQLITE_TOOBIG: a string, BLOB or row over SQLITE_LIMIT_LENGTH.
_SQLITE_TOOBIG: Final = 18
#: Bytes of a row besides the result (scope, digest, fingerprint, codec, numbers).
_ROW_MARGIN: Final = 64 * 1024


def _length_limit(conn: sqlite3.Connection) -> int:
    """The connection's SQLITE_LIMIT_LENGTH (Python 3.11+ can read it), else the default."""
    getlimit = getattr(conn, "getlimit", None)
    which = getattr(sqlite3, "SQLITE_LIMIT_LENGTH", None)
    if getlimit is None or which is None:
        return _SQLITE_MAX_LENGTH
    return int(getlimit(which))


def _schema_error(text: str) -> bool:
    """An error of the schema (a missing table, or a table of this name with other columns),
    not of opening the file."""
    return any(part in text for part in ("no such table", "no such column", "has no column named"))


#: The query options a SQLite store URL takes.
_URL_OPTIONS = ("synchronous", "busy_timeout")


class SQLiteStore(PlannedStore):
    """Records in a SQLite file (WAL), connections shared by all threads, clock = SQLite's."""

    schemes = ("sqlite",)

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        _, options = parse_url(url, "SQLite URL", _URL_OPTIONS)
        synchronous_of(None, options, "FULL")

    max_result_source = (
        "SQLite's SQLITE_LIMIT_LENGTH, the largest string, BLOB or row it stores, read from the "
        "connection, less 64 KiB for the record's other columns"
    )

    def __init__(
        self,
        url: str,
        *,
        table: str = "oncely_records",
        create_schema: bool = True,
        synchronous: str | None = None,
        busy_timeout: float | None = None,
        workers: int = 8,
    ) -> None:
        super().__init__(url)
        self.path, options = parse_url(url, "SQLite URL", _URL_OPTIONS)
        self.synchronous = synchronous_of(synchronous, options, "FULL")
        self.busy_timeout = busy_timeout_of(busy_timeout, options, 15.0, "SQLiteStore")
        if not text(table, "table", where="SQLiteStore").isidentifier():
            raise ConfigurationError(f"table name {table!r} must be a plain identifier")
        self.table = table
        workers = whole(workers, "workers", where="SQLiteStore", minimum=1)
        create_schema = flag(create_schema, "create_schema", where="SQLiteStore")
        self._sql = {
            name: sql.replace("{t}", table)
            for name, sql in [
                ("claim", CLAIM),
                ("complete", COMPLETE),
                ("release", RELEASE),
                ("renew", RENEW),
                ("get", GET),
                ("state", STATE),
                ("delete", DELETE),
                ("purge", PURGE),
                ("check", CHECK),
            ]
        }
        self._workers = Workers(workers, "oncely-sqlite")
        self._connections = Connections(
            self._open, path=self.path, size=max(16, workers), timeout=self.busy_timeout
        )
        self._lock = threading.Lock()
        self._file_ready = False
        after_fork(self, SQLiteStore._forked)
        self._create_schema = create_schema
        # Without create_schema, mode=rw: SQLite refuses to create a missing file.
        self._target = (
            self.path
            if create_schema
            else pathlib.Path(os.path.abspath(self.path)).as_uri() + "?mode=rw"
        )

    def _forked(self) -> None:
        # Its Connections and Workers reset themselves; a lock held at the fork would not.
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------
    def _connect(self, timeout: float) -> sqlite3.Connection:
        return sqlite3.connect(
            self._target,
            timeout=timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=not self._create_schema,
        )

    def _open(self, until: float | None = None) -> sqlite3.Connection:
        """A new connection; the first of the store also switches the file to WAL and creates
        the schema. Every wait -- for another connection or process holding the file, for
        another thread of this process setting it up -- ends at ``until`` (the borrower's
        deadline, :func:`time.monotonic` seconds), else ``busy_timeout`` from now.

        :raises DeadlinePassed: the file stayed locked (or set up by another thread) until
            ``until``; nothing of the caller's was written.
        :raises StoreUnavailable: the same for ``busy_timeout`` (no deadline), or the file
            cannot be opened.
        """
        if not self._create_schema and not os.path.exists(self.path):
            raise SchemaMissing(
                f"SQLite database {self.path!r} does not exist; run `oncely init {self.url}` or "
                "open the store with create_schema=True"
            )
        end = opening_end(until, self.busy_timeout)
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect(left(end))
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            if not self._file_ready:
                self._set_up(conn, end, until)
            conn.execute(busy_pragma(self.busy_timeout))  # the pool's, for later statements
            if self.max_result_bytes is None:
                # The limit holds for a whole row too: keep room for the record's other columns.
                self.max_result_bytes = max(_length_limit(conn) - _ROW_MARGIN, 0)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.OperationalError) and _schema_error(str(exc)):
                raise self._translate(exc) from exc
            raise open_error(exc, "SQLite database", self.path, self.busy_timeout, until) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return conn

    def _set_up(self, conn: sqlite3.Connection, end: float, until: float | None) -> None:
        """Once per store, on its first connection: WAL and the schema (one transaction, so
        one wait for another process's write lock), every wait ending at ``end``.

        :raises DeadlinePassed: another thread of this process was still setting the file up
            at ``until`` (the caller's deadline).
        :raises StoreUnavailable: the same for ``busy_timeout`` (no deadline).
        """
        if not self._lock.acquire(timeout=left(end)):
            text = (
                f"another thread of this process was still setting up SQLite database "
                f"{self.path!r} (switching it to WAL, creating the schema: it waits for another "
                "connection or process holding the file)"
            )
            busy = StoreUnavailable(
                f"{text} for {self.busy_timeout:g}s (busy_timeout); raise busy_timeout or use a "
                "server store for heavy write concurrency"
            )
            if until is not None:
                raise DeadlinePassed(
                    f"the caller's deadline passed while {text}; nothing was written"
                ) from busy  # what a caller without a deadline would be told
            raise busy
        try:
            if self._file_ready:
                return
            enable_wal(conn, left(end))
            if self._create_schema:
                conn.execute(busy_pragma(left(end)))
                conn.executescript(
                    "BEGIN IMMEDIATE;\n" + SCHEMA.replace("{t}", self.table) + "COMMIT;\n"
                )
            self._file_ready = True
        finally:
            self._lock.release()

    def _run(self, name: str, params: dict[str, Any]) -> tuple[list[Any], int]:
        """Run one statement on a borrowed connection: (every row, rowcount)."""
        return execute(
            self._connections,
            self._sql.get(name, name),
            params,
            lambda exc: self._translate(exc, params),
            deadline.current(),
        )

    def _translate(self, exc: sqlite3.Error, params: dict[str, Any] | None = None) -> OncelyError:
        text = str(exc)
        result = (params or {}).get("result")
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_TOOBIG and result is not None:
            # Deterministic, not an outage: the same row never fits.
            return ResultTooLarge(
                f"SQLite refused the record in {self.path!r} ({text}): it is over the "
                "connection's SQLITE_LIMIT_LENGTH, which bounds a whole row",
                len(result) if isinstance(result, bytes) else 0,
                self.max_result_bytes or 0,
            )
        if "no such table" in text and text.endswith("_fences"):
            return self._schema_outdated()
        if "no such table" in text:
            return schema_missing(self.table, repr(self.path), self.url)
        if _schema_error(text):
            return SchemaMissing(
                f"table {self.table!r} in {self.path!r} exists but is not an oncely records "
                f"table ({text}): another program's table has this name; give oncely its own "
                "(table=..., or --table on the command line), or rename or drop that table"
            )
        if is_busy(exc):
            return busy_error("SQLite database", self.path, self.busy_timeout)
        return StoreError(f"SQLite error on {self.path!r}: {text}")

    def init_schema(self) -> None:
        with self._connections.connection() as conn:
            try:
                conn.executescript(SCHEMA.replace("{t}", self.table))
            except sqlite3.OperationalError as exc:
                raise self._translate(exc) from exc

    def check_schema(self) -> None:
        rows, _ = self._run("check", {})
        if rows[0][0] != 2:
            raise self._schema_outdated()

    def _schema_outdated(self) -> SchemaMissing:
        return SchemaMissing(
            f"table {self.table!r} in {self.path!r} lacks its fence keeper "
            f"({self.table}_fences and its trigger; the file was made by an older oncely): "
            f"run `oncely init {self.url}` or open the store with create_schema=True"
        )

    def close(self) -> None:
        self._connections.close()
        self._workers.close()

    # -- every operation, once: a plan of statements (oncely.backends.plans) -------------------
    def _claim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> Plan[ClaimOutcome]:
        claim_id = nonce()
        params = {**key_params(key), "fp": fingerprint, "lease": lease, "ttl": ttl}
        rows, _ = yield Exec("claim", {**params, "claim_id": claim_id})
        return nonce_outcome(rows[0], claim_id, fingerprint)

    def _complete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> Plan[None]:
        params = {**fence_params(key, fence), "ttl": ttl, "result": result, "codec": codec}
        _, count = yield Exec("complete", params)
        check_lease(count, key, fence)

    def _release(self, key: RecordKey, fence: int) -> Plan[None]:
        _, count = yield Exec("release", fence_params(key, fence))
        check_lease(count, key, fence)

    def _renew(self, key: RecordKey, fence: int, lease: float) -> Plan[float]:
        rows, _ = yield Exec("renew", renew_params(key, fence, lease))
        check_lease(len(rows), key, fence)
        return float(rows[0][0])

    def _watch(self, key: RecordKey, fence: int, timeout: float) -> Plan[bool]:
        params = key_params(key)

        def look() -> Plan[bool]:
            rows, _ = yield Exec("state", params)
            return changed(rows, fence)

        return (yield from poll_plan(look, timeout))

    def _get(self, key: RecordKey) -> Plan[Record | None]:
        rows, _ = yield Exec("get", key_params(key))
        return record(rows[0]) if rows else None

    def _delete(self, key: RecordKey, running: bool) -> Plan[bool]:
        rows, _ = yield Exec("delete", {**key_params(key), "running": int(running)})
        return any(live for (live,) in rows)

    def _purge_expired(self, limit: int) -> Plan[int]:
        _, count = yield Exec("purge", {"limit": limit})
        return int(count)

    def _list(self, scope: str | None, limit: int) -> Plan[Records]:
        where = "" if scope is None else "AND scope = :scope"
        sql = LIST.replace("{t}", self.table).replace("{where}", where)
        rows, _ = yield Exec(sql, list_params(scope, limit))
        return [record(row) for row in rows]

    def _now(self) -> Plan[float]:
        rows, _ = yield Exec("SELECT " + NOW, {})
        return float(rows[0][0])

    # -- the two executors: statements on a borrowed connection; async writes are queued on the
    # -- file's writer thread, async reads run on a worker thread (oncely.backends.sqlite) -----
    def _execute(self, request: Any) -> Any:
        if type(request) is Sleep:
            time.sleep(request.seconds)
            return None
        return self._run(request.statement, request.params)

    async def _aexecute(self, request: Any) -> Any:
        if type(request) is Sleep:
            # Sleep on the loop, so a waiter never holds a worker thread the holder needs.
            await asyncio.sleep(request.seconds)
            return None
        params = request.params
        return await aexecute(
            self._connections,
            self._workers,
            self._sql.get(request.statement, request.statement),
            params,
            lambda exc: self._translate(exc, params),
            deadline.current(),
        )
