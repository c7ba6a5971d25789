"""``sqlite:///path.db``: the embedded default, safe across threads and processes.

The file is opened in WAL mode with one connection per thread; every decision is one SQL
statement whose clock is SQLite's ``julianday('now')``. The file and table are created on first
use because the file belongs to the application; ``create_schema=False`` turns that off: the
store then opens only an existing file and creates nothing (what ``oncely check`` relies on).

URL forms: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``. Query options:
``?synchronous=NORMAL`` (default ``FULL``: a completed record survives a power cut) and
``?busy_timeout=15`` (seconds to wait for another writer; default 15).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs

from oncely.errors import ConfigurationError, SchemaMissing, StoreError, StoreUnavailable
from oncely.records import ClaimOutcome, New, Record, RecordKey
from oncely.stores.base import Store, classify, lease_lost, redact_url
from oncely.stores.polling import apoll_until, poll_until

__all__ = ["SQLiteStore", "enable_wal"]

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
"""

# One statement decides the claim. The upsert always returns the row: if the stored row may be
# taken over (C), every column is replaced and ``claim_id`` becomes ours; otherwise each column
# keeps its value. Comparing the returned ``claim_id`` with ours tells New from the rest.
_C = (
    "({t}.expires_at <= excluded.created_at OR "
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
    "SELECT :scope, :digest, 'in_progress', :fp, CAST(n.now * 1000000 AS INTEGER), "
    "n.now + :lease, n.now + max(:lease, :ttl), n.now, NULL, NULL, :claim_id "
    "FROM (SELECT " + NOW + " AS now) AS n WHERE 1 "
    "ON CONFLICT (scope, digest) DO UPDATE SET " + _TAKE + " "
    "RETURNING " + COLUMNS + ", claim_id, " + NOW
)
_MINE = "WHERE scope = :scope AND digest = :digest AND fence = :fence AND status = 'in_progress'"
COMPLETE = (
    "UPDATE {t} SET status = 'completed', lease_until = NULL, expires_at = "
    + NOW
    + " + :ttl, result = :result, codec = :codec "
    + _MINE
)
# Release leaves an expired tombstone rather than deleting the row, so the next claim's fence is
# still ``old + 1`` even within the same millisecond (SQLite's clock resolution).
RELEASE = (
    "UPDATE {t} SET status = 'released', lease_until = "
    + NOW
    + ", expires_at = "
    + NOW
    + " "
    + _MINE
)
RENEW = (
    "UPDATE {t} SET lease_until = " + NOW + " + :lease, "
    "expires_at = max(expires_at, " + NOW + " + :lease) " + _MINE + " RETURNING lease_until"
)
GET = (
    "SELECT "
    + COLUMNS
    + " FROM {t} WHERE scope = :scope AND digest = :digest AND expires_at > "
    + NOW
)
STATE = (
    "SELECT status, fence, expires_at > "
    + NOW
    + " FROM {t} WHERE scope = :scope AND digest = :digest"
)
# Removes tombstones and expired rows too, but reports only whether a live record was there.
DELETE = "DELETE FROM {t} WHERE scope = :scope AND digest = :digest RETURNING expires_at > " + NOW
PURGE = (
    "DELETE FROM {t} WHERE (scope, digest) IN "
    "(SELECT scope, digest FROM {t} WHERE expires_at <= " + NOW + " LIMIT :limit)"
)
LIST = "SELECT " + COLUMNS + " FROM {t} WHERE expires_at > " + NOW + " {where} LIMIT :limit"


def _record(row: tuple[Any, ...]) -> Record:
    scope, digest, status, fp, fence, lease_until, expires_at, created_at, result, codec = row[:10]
    return Record(
        scope, digest, status, fp, fence, lease_until, expires_at, created_at, result, codec
    )


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


class SQLiteStore(Store):
    """Records in a SQLite file (WAL), one connection per thread, clock = SQLite's."""

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
            ]
        }
        self._workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="oncely-sqlite")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
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
    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
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
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    def _run(self, name: str, params: dict[str, Any]) -> sqlite3.Cursor:
        conn = self._connect()
        try:
            return conn.execute(self._sql[name], params)
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
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
        conn = self._connect()
        try:
            conn.executescript(SCHEMA.replace("{t}", self.table))
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc

    def check_schema(self) -> None:
        self._run("state", {"scope": "", "digest": ""}).fetchall()

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
        self._executor.shutdown(wait=False)
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="oncely-sqlite")

    # -- sync face -----------------------------------------------------------------------------
    def now(self) -> float:
        return float(self._connect().execute("SELECT " + NOW).fetchone()[0])

    def claim(self, key: RecordKey, fingerprint: str, lease: float, ttl: float) -> ClaimOutcome:
        claim_id = int.from_bytes(os.urandom(8), "big", signed=True)
        row = self._run(
            "claim",
            {
                "scope": key.scope,
                "digest": key.digest,
                "fp": fingerprint,
                "lease": lease,
                "ttl": ttl,
                "claim_id": claim_id,
            },
        ).fetchone()
        now = row[11]
        if row[10] == claim_id:
            return New(row[4], row[5], now)
        return classify(_record(row), fingerprint, now)

    def complete(self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float) -> None:
        params = {"scope": key.scope, "digest": key.digest, "fence": fence}
        cur = self._run("complete", {**params, "ttl": ttl, "result": result, "codec": codec})
        if cur.rowcount != 1:
            raise lease_lost(key, fence)

    def release(self, key: RecordKey, fence: int) -> None:
        cur = self._run("release", {"scope": key.scope, "digest": key.digest, "fence": fence})
        if cur.rowcount != 1:
            raise lease_lost(key, fence)

    def renew(self, key: RecordKey, fence: int, lease: float) -> float:
        params = {"scope": key.scope, "digest": key.digest, "fence": fence, "lease": lease}
        row = self._run("renew", params).fetchone()
        if row is None:
            raise lease_lost(key, fence)
        return float(row[0])

    def watch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        params = {"scope": key.scope, "digest": key.digest}

        def changed() -> bool:
            row = self._run("state", params).fetchone()
            return row is None or row[0] != "in_progress" or row[1] != fence or not row[2]

        return poll_until(changed, timeout)

    def get(self, key: RecordKey) -> Record | None:
        row = self._run("get", {"scope": key.scope, "digest": key.digest}).fetchone()
        return None if row is None else _record(row)

    def delete(self, key: RecordKey) -> bool:
        rows = self._run("delete", {"scope": key.scope, "digest": key.digest}).fetchall()
        return any(live for (live,) in rows)

    def purge_expired(self, limit: int = 1000) -> int:
        return self._run("purge", {"limit": limit}).rowcount

    def list(self, scope: str | None = None, limit: int = 100) -> list[Record]:
        where = "" if scope is None else "AND scope = :scope"
        sql = LIST.replace("{t}", self.table).replace("{where}", where)
        conn = self._connect()
        try:
            rows = conn.execute(sql, {"scope": scope, "limit": limit}).fetchall()
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc
        return [_record(row) for row in rows]

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
            row = await self._off_loop(lambda: self._run("state", params).fetchone())
            return row is None or row[0] != "in_progress" or row[1] != fence or not row[2]

        return await apoll_until(changed, timeout)

    async def aget(self, key: RecordKey) -> Record | None:
        return await self._off_loop(self.get, key)

    async def adelete(self, key: RecordKey) -> bool:
        return await self._off_loop(self.delete, key)

    async def apurge_expired(self, limit: int = 1000) -> int:
        return await self._off_loop(self.purge_expired, limit)

    def __repr__(self) -> str:
        return f"SQLiteStore({redact_url(self.url)!r})"
