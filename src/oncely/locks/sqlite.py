"""``sqlite:///path.db``: the embedded default, a row per lock decided by SQLite's clock.

Table (created on first use)::

    CREATE TABLE oncely_locks (
        name       TEXT PRIMARY KEY,
        owner      TEXT,              -- the holder's token; NULL when released
        expires_at REAL NOT NULL,     -- seconds since the epoch, SQLite's clock
        fence      INTEGER NOT NULL   -- the last fencing token handed out for this name
    ) WITHOUT ROWID

Acquire is one ``INSERT … ON CONFLICT DO UPDATE … WHERE <free or expired> RETURNING``: the owner,
expiry and next fence (``max(fence + 1, now in microseconds)``) are written in the same
statement that decides, with ``julianday('now')`` as the clock (fixed within a statement).
Release and extend are one ``UPDATE … WHERE owner = :owner AND expires_at > now`` each; release
keeps the row (owner NULL) so the fence counter survives.

SQLite cannot push a change to another process, so waiters look again every ``poll_interval``
seconds (default 0.01, with jitter); a waiting attempt that finds the lock busy writes nothing.
Statements queue on the process's writer gate and share its group commits
(:func:`oncely.backends.sqlite.execute`), waiting for another process holding SQLite's write
lock up to ``busy_timeout``. An attempt of ``acquire(timeout=T)`` / ``aacquire(timeout=T)``
passes the time left of ``T`` as its deadline instead: it waits for the gate and for the file as
long as that, shorter or longer than ``busy_timeout`` (the first use of the file included:
opening a connection, the switch to WAL, creating the table), and a file still locked then
counts as the lock being busy (:class:`~oncely.errors.LockTimeout` at ``T``), never
:class:`~oncely.errors.StoreUnavailable`; the attempt wrote nothing. Without a timeout (and for
``blocking=False``) the statement waits ``busy_timeout``, then raises
:class:`~oncely.errors.DatabaseBusy` (a StoreUnavailable). The file is opened in WAL mode with
``synchronous=NORMAL`` (a lock does not need to survive a power cut; fences stay increasing
because they are seeded from the clock). Connections are shared by all threads
(:class:`oncely.backends.sqlite.Connections`, at most 16), so short-lived threads leave nothing
open behind them. Async calls run on a small
thread pool of the backend's own.
"""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import time
from typing import Any, Final

from oncely.backends.sqlite import CLOCK as NOW
from oncely.backends.sqlite import (
    Connections,
    Workers,
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
from oncely.errors import ConfigurationError, DatabaseBusy, StoreError
from oncely.locks.base import Busy, Face, Hold, LockBackend, State
from oncely.settings import seconds, text, whole

__all__ = ["SQLiteLockBackend"]

#: Why a bounded acquire failed when its time ran out waiting for the database file.
FILE_LOCKED: Final = (
    "the SQLite database file stayed locked by another connection or process (its write "
    "lock, not this lock's holder)"
)

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS {t} (
    name       TEXT    PRIMARY KEY,
    owner      TEXT,
    expires_at REAL    NOT NULL,
    fence      INTEGER NOT NULL
) WITHOUT ROWID
"""
ACQUIRE: Final = (
    "INSERT INTO {t} (name, owner, expires_at, fence) "
    "SELECT :name, :owner, n.now + :ttl, CAST(n.now * 1000000 AS INTEGER) "
    "FROM (SELECT " + NOW + " AS now) AS n WHERE 1 "
    "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at, "
    "fence = max({t}.fence + 1, excluded.fence) "
    "WHERE {t}.owner IS NULL OR {t}.expires_at <= " + NOW + " "
    "RETURNING fence, expires_at - " + NOW
)
_MINE: Final = "WHERE name = :name AND owner = :owner AND expires_at > " + NOW
RELEASE: Final = "UPDATE {t} SET owner = NULL, expires_at = " + NOW + " " + _MINE
EXTEND: Final = "UPDATE {t} SET expires_at = " + NOW + " + :ttl " + _MINE
INSPECT: Final = (
    "SELECT owner, expires_at - " + NOW + " FROM {t} "
    "WHERE name = :name AND owner IS NOT NULL AND expires_at > " + NOW
)


class SQLiteLockBackend(LockBackend):
    """Locks in a SQLite file shared by the threads and processes of one machine.

    ``table`` names the lock table; ``busy_timeout`` (seconds, default 5) is how long a
    statement waits for another writer (an acquire with a ``timeout`` waits its time left
    instead, then counts the lock as busy); ``poll_interval`` (seconds, default 0.01) how
    often a waiter looks again.
    """

    kind = "sqlite"
    #: acquire() gets the time left: its statement waits for the file no longer than that.
    bounded_attempts = True
    #: Async holds name the lock in the store: the watchdog renews them with :meth:`extend`.
    sync_extends_async = True

    def __init__(
        self,
        url: str,
        *,
        table: str = "oncely_locks",
        busy_timeout: float | None = None,
        poll_interval: float = 0.01,
        workers: int = 4,
    ) -> None:
        # A URL shared with the store may carry its options: the lock reads them too.
        path, options = parse_url(url, "SQLite lock URL", ("synchronous", "busy_timeout"))
        if not text(table, "table", where="SQLiteLockBackend").isidentifier():
            raise ConfigurationError(f"table name {table!r} must be a plain identifier")
        workers = whole(workers, "workers", where="SQLiteLockBackend", minimum=1)
        poll_interval = seconds(
            poll_interval,
            "poll_interval",
            where="SQLiteLockBackend",
            minimum=0.001,
            above=False,
            maximum=10,
        )
        self.url = url
        self.path = path
        self.table = table
        self.busy_timeout = busy_timeout_of(busy_timeout, options, 5.0, "SQLiteLockBackend")
        self.synchronous = synchronous_of(None, options, "NORMAL")
        self.poll_interval = poll_interval
        self._sql = {
            name: text.replace("{t}", table)
            for name, text in [
                ("acquire", ACQUIRE),
                ("release", RELEASE),
                ("extend", EXTEND),
                ("inspect", INSPECT),
                ("schema", SCHEMA),
            ]
        }
        self._connections = Connections(
            self._open, path=self.path, size=max(16, workers), timeout=self.busy_timeout
        )
        self._workers = Workers(workers, "oncely-sqlite-lock")

    def __repr__(self) -> str:
        return f"SQLiteLockBackend({self.url!r})"

    # -- plumbing ---------------------------------------------------------------------------------
    def _open(self, deadline: float | None = None) -> sqlite3.Connection:
        """A new connection, the file switched to WAL and the lock table created; every wait
        for another connection or process holding the file ends at ``deadline`` (the
        borrower's, :func:`time.monotonic` seconds), else ``busy_timeout`` from now.

        :raises DeadlinePassed: the file stayed locked until ``deadline``.
        :raises StoreUnavailable: it stayed locked for ``busy_timeout`` (no deadline), or it
            cannot be opened.
        """
        end = opening_end(deadline, self.busy_timeout)
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.path, timeout=left(end), isolation_level=None, check_same_thread=False
            )
            enable_wal(conn, left(end))  # retries the lock SQLite does not wait for
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(busy_pragma(left(end)))
            conn.execute(self._sql["schema"])
            conn.execute(busy_pragma(self.busy_timeout))  # the pool's, for later statements
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise open_error(
                exc, "SQLite lock database", self.path, self.busy_timeout, deadline
            ) from exc
        return conn

    def _run(
        self, name: str, params: dict[str, Any], deadline: float | None = None
    ) -> tuple[list[Any], int]:
        """Run one statement on a borrowed connection: (every row, rowcount); ``deadline``
        (:func:`time.monotonic` seconds) bounds its waits (:func:`~oncely.backends.sqlite.execute`).

        :raises DeadlinePassed: the deadline came first; the statement did not run.
        """
        return execute(self._connections, self._sql[name], params, self._translate, deadline)

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        if is_busy(exc):
            # DatabaseBusy (a StoreUnavailable): the concurrent writer's refusal every SQL
            # mechanism raises as this one type (oncely.sql.connections.retryable is true)
            return DatabaseBusy(
                f"SQLite database {self.path!r} stayed locked for {self.busy_timeout}s; "
                "raise busy_timeout, or use a server backend for heavy lock traffic"
            )
        return StoreError(f"SQLite error on {self.path!r}: {exc}")

    def _sleep_for(self, timeout: float) -> float:
        return min(timeout, self.poll_interval * random.uniform(0.5, 1.0))

    # -- sync face --------------------------------------------------------------------------------
    def _acquire(
        self, name: str, owner: str, ttl: float, face: Face, deadline: float | None
    ) -> Hold | Busy:
        params = {"name": name, "owner": owner, "ttl": ttl}
        try:
            rows, _ = self._run("acquire", params, deadline)
        except DeadlinePassed as exc:  # the file stayed locked for the time left: busy, not down
            return Busy(reason=exc.reason or FILE_LOCKED)
        if not rows:
            return Busy()
        return Hold(name, owner, int(rows[0][0]), float(rows[0][1]), face)

    def acquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        return self._acquire(name, owner, ttl, "sync", _deadline(wait))

    def wait_release(self, name: str, busy: Busy, timeout: float) -> None:
        time.sleep(self._sleep_for(timeout))

    def release(self, hold: Hold) -> bool:
        params = {"name": hold.name, "owner": hold.owner}
        return self._run("release", params)[1] == 1

    def extend(self, hold: Hold, ttl: float) -> float | None:
        params = {"name": hold.name, "owner": hold.owner, "ttl": ttl}
        # the watchdog's renewal keeps to the hold's bound (oncely.core.deadline): past it,
        # DeadlinePassed (the extension did not run), a failed renewal like any other
        extended = self._run("extend", params, deadline.current())[1] == 1
        return ttl if extended else None

    def inspect(self, name: str, hold: Hold | None) -> State:
        rows, _ = self._run("inspect", {"name": name})
        if not rows:
            return State(locked=False, owned=False)
        row = rows[0]
        owned = hold is not None and row[0] == hold.owner
        return State(locked=True, owned=owned, ttl=float(row[1]) if owned else None)

    def close(self) -> None:
        self._connections.close()
        self._workers.close()

    # -- async face -------------------------------------------------------------------------------
    async def aacquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy:
        # the deadline is taken here, not on the worker thread (which may start late)
        return await self._workers.run(self._acquire, name, owner, ttl, "async", _deadline(wait))

    async def await_release(self, name: str, busy: Busy, timeout: float) -> None:
        await asyncio.sleep(self._sleep_for(timeout))

    async def arelease(self, hold: Hold) -> bool:
        return await self._workers.run(self.release, hold)

    async def aextend(self, hold: Hold, ttl: float) -> float | None:
        return await self._workers.run(self.extend, hold, ttl)

    async def ainspect(self, name: str, hold: Hold | None) -> State:
        return await self._workers.run(self.inspect, name, hold)


def _deadline(wait: float) -> float | None:
    """The deadline (:func:`time.monotonic` seconds) of an attempt that may wait ``wait``
    seconds, the time left of ``acquire(timeout=...)``; None for ``math.inf`` (no timeout, or
    ``blocking=False``): the statement then waits up to ``busy_timeout``. A finite one is the
    attempt's deadline, which replaces ``busy_timeout`` (shorter or longer)."""
    return time.monotonic() + wait if math.isfinite(wait) else None
