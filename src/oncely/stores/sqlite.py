"""``sqlite:///path.db``: the embedded default, safe across threads and processes.

The file is opened in WAL mode; every decision is one SQL statement whose clock is SQLite's
``julianday('now')``. Connections are shared by all threads (:class:`Connections`): a statement
borrows one and gives it back, and at most 16 exist (more threads wait their turn, as SQLite's
single writer makes them do anyway), so what the store keeps open never grows with the number of
threads that use it. The file and table are
created on first use because the file belongs to the application; ``create_schema=False`` turns
that off: the store then opens only an existing file and creates nothing (what ``oncely check``
relies on).

URL forms: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``. Query options:
``?synchronous=NORMAL`` (default ``FULL``: a completed record survives a power cut) and
``?busy_timeout=15`` (seconds to wait for another writer; default 15).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs

from oncely.errors import ConfigurationError, SchemaMissing, StoreError, StoreUnavailable
from oncely.records import ClaimOutcome, New, Record, RecordKey
from oncely.stores.base import Store, classify, lease_lost, redact_url
from oncely.stores.polling import apoll_until, poll_until

__all__ = ["Connections", "SQLiteStore", "enable_wal"]

T = TypeVar("T")

# Seconds since the epoch on SQLite's clock (millisecond resolution, fixed within a statement).
NOW = "((julianday('now') - 2440587.5) * 86400.0)"
COLUMNS = (
    "scope, digest, status, fingerprint, fence, lease_until, expires_at, created_at, result, codec"
)

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
    "RETURNING status <> 'released' AND expires_at > " + NOW
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


def _record(row: tuple[Any, ...]) -> Record:
    scope, digest, status, fp, fence, lease_until, expires_at, created_at, result, codec = row[:10]
    return Record(
        scope, digest, status, fp, fence, lease_until, expires_at, created_at, result, codec
    )


def _changed(rows: list[Any], fence: int) -> bool:
    """Watch's test: the record is gone, expired, finished or held under another fence."""
    return not rows or rows[0][0] != "in_progress" or rows[0][1] != fence or not rows[0][2]


def enable_wal(conn: sqlite3.Connection, patience: float) -> None:
    """Switch the file to WAL (persistent, so once per file is enough).

    Changing the journal mode needs a lock that SQLite does not wait for (its busy handler is not
    used), so another process opening the file at the same moment makes it fail at once: retry
    with backoff for up to ``patience`` seconds. Reading the mode takes no lock.
    """
    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline, delay = time.monotonic() + patience, 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class Connections:
    """SQLite connections shared by every thread of a process: borrowed for one statement.

    ``open`` makes a new connection (``check_same_thread=False``: a connection moves between
    threads, but is used by one at a time). At most ``size`` connections exist at once, opened
    on demand and kept idle for the next statement (the most recently used first); a statement
    that finds all of them busy waits for one, up to ``timeout`` seconds, then raises
    :class:`~oncely.errors.StoreUnavailable`. SQLite runs one writer at a time anyway, and its
    unix VFS keeps the file descriptor of a closed connection open while the process holds other
    connections to the file, so a bound on connections is the only bound on descriptors. A
    connection left inside a transaction is closed rather than kept. After ``fork()`` the child
    never touches the parent's connections (SQLite forbids it) and opens its own.
    """

    def __init__(
        self,
        open: Callable[[], sqlite3.Connection],
        *,
        path: str,
        size: int = 16,
        timeout: float = 15.0,
    ) -> None:
        self._open = open
        self._path = path
        self._size = max(1, size)
        self._timeout = timeout
        self._idle: list[sqlite3.Connection] = []
        self._slots = threading.BoundedSemaphore(self._size)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """Borrow a connection for the body of the ``with`` block."""
        conn, slots = self._take()
        try:
            yield conn
        finally:
            self._give(conn, slots)

    def _take(self) -> tuple[sqlite3.Connection, threading.BoundedSemaphore]:
        with self._lock:
            if self._pid != os.getpid():  # the parent's connections: never use or close them
                self._pid, self._idle = os.getpid(), []
                self._slots = threading.BoundedSemaphore(self._size)
            slots = self._slots
        if not slots.acquire(timeout=self._timeout):
            raise StoreUnavailable(
                f"all {self._size} connections to SQLite database {self._path!r} stayed busy "
                f"for {self._timeout:g}s; use a server store for heavy concurrency"
            )
        try:
            with self._lock:
                if self._idle and slots is self._slots:
                    return self._idle.pop(), slots
            return self._open(), slots
        except BaseException:
            slots.release()
            raise

    def _give(self, conn: sqlite3.Connection, slots: threading.BoundedSemaphore) -> None:
        try:
            reusable = not conn.in_transaction
            with self._lock:
                if reusable and slots is self._slots and self._pid == os.getpid():
                    self._idle.append(conn)
                    return
            conn.close()
        finally:
            slots.release()

    def close(self) -> None:
        """Close the idle connections; the pool stays usable (borrowed ones come back as usual)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class SQLiteStore(Store):
    """Records in a SQLite file (WAL), connections shared by all threads, clock = SQLite's."""

    schemes = ("sqlite",)

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
        path, _, query = url.partition("://")[2].partition("?")
        if not path.startswith("/") or path in ("/", "/:memory:"):
            raise ConfigurationError(
                f"SQLite URL {url!r} needs a file: use 'sqlite:///relative.db' or "
                "'sqlite:////absolute/path.db' (for a process-local store use 'memory://')"
            )
        self.path = path[1:]
        options = {k: v[-1] for k, v in parse_qs(query).items()}
        self.synchronous = (synchronous or options.get("synchronous", "FULL")).upper()
        if self.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(
                f"synchronous={self.synchronous!r}: use OFF, NORMAL, FULL (default) or EXTRA"
            )
        self.busy_timeout = float(busy_timeout or options.get("busy_timeout") or 15.0)
        if not table.isidentifier():
            raise ConfigurationError(f"table name {table!r} must be a plain identifier")
        self.table = table
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
        self._workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="oncely-sqlite")
        self._connections = Connections(
            self._open, path=self.path, size=max(16, workers), timeout=self.busy_timeout
        )
        self._lock = threading.Lock()
        self._file_ready = False
        self._create_schema = create_schema
        # Without create_schema, mode=rw: SQLite refuses to create a missing file.
        self._target = (
            self.path
            if create_schema
            else pathlib.Path(os.path.abspath(self.path)).as_uri() + "?mode=rw"
        )

    # -- plumbing ------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if not self._create_schema and not os.path.exists(self.path):
            raise SchemaMissing(
                f"SQLite database {self.path!r} does not exist; run `oncely init {self.url}` or "
                "open the store with create_schema=True"
            )
        try:
            conn = sqlite3.connect(
                self._target,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                uri=not self._create_schema,
            )
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            with self._lock:  # once per store: the first connection sets up the file
                if not self._file_ready:
                    enable_wal(conn, self.busy_timeout)
                    if self._create_schema:
                        conn.executescript(SCHEMA.replace("{t}", self.table))
                    self._file_ready = True
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc):
                raise self._translate(exc) from exc
            raise StoreUnavailable(
                f"cannot open SQLite database {self.path!r} ({exc}); check that the directory "
                "exists and is writable"
            ) from exc
        return conn

    def _execute(self, sql: str, params: dict[str, Any]) -> tuple[list[Any], int]:
        """Run one statement on a borrowed connection: (every row, rowcount)."""
        with self._connections.connection() as conn:
            try:
                cur = conn.execute(sql, params)
                return cur.fetchall(), cur.rowcount
            except sqlite3.OperationalError as exc:
                raise self._translate(exc) from exc

    def _run(self, name: str, params: dict[str, Any]) -> tuple[list[Any], int]:
        return self._execute(self._sql[name], params)

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "no such table" in text and text.endswith("_fences"):
            return self._schema_outdated()
        if "no such table" in text:
            return SchemaMissing(
                f"table {self.table!r} does not exist in {self.path!r}; run "
                f"`oncely init {self.url}` or open the store with create_schema=True"
            )
        if "locked" in text or "busy" in text:
            return StoreUnavailable(
                f"SQLite database {self.path!r} stayed locked for {self.busy_timeout}s; "
                "raise busy_timeout or use a server store for heavy write concurrency"
            )
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
        self._executor.shutdown(wait=False)
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="oncely-sqlite")

    # -- sync face -----------------------------------------------------------------------------
    def now(self) -> float:
        return float(self._execute("SELECT " + NOW, {})[0][0][0])

    def claim(self, key: RecordKey, fingerprint: str, lease: float, ttl: float) -> ClaimOutcome:
        claim_id = int.from_bytes(os.urandom(8), "big", signed=True)
        rows, _ = self._run(
            "claim",
            {
                "scope": key.scope,
                "digest": key.digest,
                "fp": fingerprint,
                "lease": lease,
                "ttl": ttl,
                "claim_id": claim_id,
            },
        )
        row = rows[0]
        now = row[11]
        if row[10] == claim_id:
            return New(row[4], row[5], now)
        return classify(_record(row), fingerprint, now)

    def complete(self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float) -> None:
        params = {"scope": key.scope, "digest": key.digest, "fence": fence}
        _, count = self._run("complete", {**params, "ttl": ttl, "result": result, "codec": codec})
        if count != 1:
            raise lease_lost(key, fence)

    def release(self, key: RecordKey, fence: int) -> None:
        _, count = self._run("release", {"scope": key.scope, "digest": key.digest, "fence": fence})
        if count != 1:
            raise lease_lost(key, fence)

    def renew(self, key: RecordKey, fence: int, lease: float) -> float:
        params = {"scope": key.scope, "digest": key.digest, "fence": fence, "lease": lease}
        rows, _ = self._run("renew", params)
        if not rows:
            raise lease_lost(key, fence)
        return float(rows[0][0])

    def watch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        params = {"scope": key.scope, "digest": key.digest}

        return poll_until(lambda: _changed(self._run("state", params)[0], fence), timeout)

    def get(self, key: RecordKey) -> Record | None:
        rows, _ = self._run("get", {"scope": key.scope, "digest": key.digest})
        return _record(rows[0]) if rows else None

    def delete(self, key: RecordKey) -> bool:
        rows, _ = self._run("delete", {"scope": key.scope, "digest": key.digest})
        return any(live for (live,) in rows)

    def purge_expired(self, limit: int = 1000) -> int:
        return self._run("purge", {"limit": limit})[1]

    def list(self, scope: str | None = None, limit: int = 100) -> list[Record]:
        where = "" if scope is None else "AND scope = :scope"
        sql = LIST.replace("{t}", self.table).replace("{where}", where)
        return [_record(row) for row in self._execute(sql, {"scope": scope, "limit": limit})[0]]

    # -- async face: SQLite has no async driver; each call runs on the store's worker threads ----
    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def aclaim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome:
        return await self._off_loop(self.claim, key, fingerprint, lease, ttl)

    async def acomplete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> None:
        await self._off_loop(self.complete, key, fence, result, codec, ttl)

    async def arelease(self, key: RecordKey, fence: int) -> None:
        await self._off_loop(self.release, key, fence)

    async def arenew(self, key: RecordKey, fence: int, lease: float) -> float:
        return await self._off_loop(self.renew, key, fence, lease)

    async def awatch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        # Poll from the loop so a waiter never holds a worker thread the holder needs.
        params = {"scope": key.scope, "digest": key.digest}

        async def changed() -> bool:
            return _changed((await self._off_loop(self._run, "state", params))[0], fence)

        return await apoll_until(changed, timeout)

    async def aget(self, key: RecordKey) -> Record | None:
        return await self._off_loop(self.get, key)

    async def adelete(self, key: RecordKey) -> bool:
        return await self._off_loop(self.delete, key)

    async def apurge_expired(self, limit: int = 1000) -> int:
        return await self._off_loop(self.purge_expired, limit)

    def __repr__(self) -> str:
        return f"SQLiteStore({redact_url(self.url)!r})"
