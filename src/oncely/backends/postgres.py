"""PostgreSQL connections: conninfo from a URL, bounded network waits, advisory lock ids, and
the per-event-loop connection cache of the async faces.

What the PostgreSQL store and the PostgreSQL lock backend share; no mechanism.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import select
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Conninfo, TransactionStatus
from psycopg.rows import TupleRow

from oncely.backends.urls import (
    Number,
    check_numbers,
    check_options,
    query_options,
    redact_url,
    scheme_of,
)
from oncely.errors import ConfigurationError
from oncely.settings import MAX_SECONDS, text

__all__ = [
    "TCP_DEFAULTS",
    "AsyncConn",
    "ConnectionSlots",
    "LoopConnections",
    "SyncConn",
    "check_connect_options",
    "conninfo",
    "network_defaults",
    "schema_lock_id",
]

SyncConn = psycopg.Connection[TupleRow]
AsyncConn = psycopg.AsyncConnection[TupleRow]

#: libpq settings every connection gets unless the URL or an option sets them: TCP keepalive
#: probes after 5 s idle, 1 s apart, 3 of them, and ``tcp_user_timeout`` (ms): a server the
#: network cut off is noticed within about 10 s instead of the OS default of over two hours.
#: (libpq has no read timeout: a server that is up but never answers still stalls a call.)
TCP_DEFAULTS: Final[dict[str, int]] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}

# An idle connection older than this is checked (one poll(2), no round trip) before use.
_CHECK_AFTER: Final = 30.0


def conninfo(url: str) -> str:
    """The libpq URL for ``url``: ``postgresql+psycopg://`` and ``postgres://`` normalised.

    Query options are libpq connection parameters (``?sslmode=require&connect_timeout=10``);
    oncely's own options (``table=``, ``max_size=``) are keyword arguments, not URL options.

    :raises ConfigurationError: not a string, not a PostgreSQL URL, an option given twice, or
        a query option libpq does not know (the message names the closest one), refused here
        rather than at the first connect.
    """
    _, sep, rest = text(url, "url", where="PostgreSQL URL").partition("://")
    if not sep or scheme_of(url) not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"PostgreSQL URL {redact_url(url)!r} must look like "
            "'postgresql://user:password@host:5432/dbname'"
        )
    query = urlsplit(f"postgresql://{rest}").query
    given = query_options(query, url, "PostgreSQL URL")
    check_options(given, _libpq_keywords(), url, "PostgreSQL URL")
    check_numbers(given, NUMBERS, url, "PostgreSQL URL")
    return f"postgresql://{rest}"


#: libpq's numeric connection parameters (whole numbers: libpq reads the text), checked when
#: the store is built rather than at the first connect.
NUMBERS: Final = {
    "connect_timeout": Number(whole=True, maximum=MAX_SECONDS),
    "keepalives": Number(whole=True, maximum=1),
    "keepalives_idle": Number(whole=True, maximum=MAX_SECONDS),
    "keepalives_interval": Number(whole=True, maximum=MAX_SECONDS),
    "keepalives_count": Number(whole=True),
    "tcp_user_timeout": Number(whole=True, maximum=MAX_SECONDS * 1000),  # milliseconds
    "prepare_threshold": Number(whole=True),
}

#: Keyword arguments :func:`psycopg.connect` takes besides libpq's connection parameters.
_PSYCOPG_OPTIONS: Final = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)


def check_connect_options(options: dict[str, Any], url: str, own: tuple[str, ...] = ()) -> None:
    """Refuse a keyword option :func:`psycopg.connect` would not take (a misspelled libpq
    parameter fails only at the first connection otherwise), naming the closest one.

    :param own: the caller's own option names (``table``), so a misspelling of one is named too.

    :raises ConfigurationError: ``unknown option 'sslmod'; did you mean 'sslmode'?``.
    """
    known = _libpq_keywords() | _PSYCOPG_OPTIONS | set(own)
    check_options(options, known, url, "PostgreSQL options for")
    check_numbers(options, NUMBERS, url, "PostgreSQL options for")


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    """Every connection parameter the installed libpq knows."""
    return frozenset(option.keyword.decode() for option in Conninfo.get_defaults())


def network_defaults(conninfo: str, timeout: float) -> dict[str, Any]:
    """Bounded network waits for :func:`psycopg.connect`, except what ``conninfo`` sets itself.

    ``connect_timeout`` is ``timeout`` seconds (at least 2, libpq's minimum), plus
    :data:`TCP_DEFAULTS`.
    """
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.Error:  # a malformed URL fails at connect, with libpq's own message
        given = {}
    defaults: dict[str, Any] = {"connect_timeout": max(2, round(timeout)), **TCP_DEFAULTS}
    return {k: v for k, v in defaults.items() if k not in given}


def schema_lock_id(table: str) -> int:
    """The advisory lock (one bigint) that serialises concurrent schema set-ups of ``table``."""
    raw = hashlib.sha256(f"oncely:init:{table}".encode()).digest()[:8]
    return int.from_bytes(raw, "big", signed=True)


def looks_dead(conn: AsyncConn) -> bool:
    """True if an idle connection is closed, or has something to read: an idle connection that
    listens to nothing has nothing, so this is the server's goodbye (an error or EOF)."""
    if conn.closed or conn.broken:
        return True
    try:
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


class ConnectionSlots:
    """The idle connections of one kind (say decisions, or watchers) on one event loop, and a
    semaphore that bounds how many are in use."""

    __slots__ = ("idle", "size", "slots")

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots = asyncio.Semaphore(size)
        self.idle: list[tuple[AsyncConn, float]] = []  # most recently used last


class LoopConnections:
    """Every connection an async face opened on one event loop, kept for the next call. No
    background task runs (unlike :class:`psycopg_pool.AsyncConnectionPool`, whose tasks can
    swallow the final cancellation of ``asyncio.run`` and hang the process): a call opens a
    connection when none is idle, and gives it back when it is done with it. Held in a
    :class:`~oncely.backends.loops.LoopLocal`, so the loop's shutdown closes them."""

    __slots__ = ("closed", "conns", "main", "watch")

    def __init__(self, size: int, watch_size: int) -> None:
        self.main = ConnectionSlots(size)
        self.watch = ConnectionSlots(watch_size)
        self.conns: weakref.WeakSet[AsyncConn] = weakref.WeakSet()
        self.closed = False

    async def take(
        self,
        kind: ConnectionSlots,
        timeout: float,
        open: Callable[[LoopConnections], Awaitable[AsyncConn]],
    ) -> AsyncConn | None:
        """A connection of ``kind`` (an idle one, or ``await open(self)``, which adds what it
        opens to :attr:`conns` at once); None if all ``kind.size`` stay in use for ``timeout``
        seconds. Give it back with :meth:`give`."""
        if kind.slots.locked():
            try:
                await asyncio.wait_for(kind.slots.acquire(), timeout)
            except asyncio.TimeoutError:
                return None
        else:
            await kind.slots.acquire()
        try:
            now = time.monotonic()
            while kind.idle:
                conn, since = kind.idle.pop()
                if now - since < _CHECK_AFTER and not conn.closed:
                    return conn
                if not looks_dead(conn):
                    return conn
                conn.pgconn.finish()
            return await open(self)
        except BaseException:
            kind.slots.release()
            raise

    def give(self, kind: ConnectionSlots, conn: AsyncConn) -> None:
        """Take back a connection from :meth:`take`: kept if it is idle and usable, else closed
        (cancelled or failed mid-statement, it may still be busy or inside a transaction)."""
        try:
            idle = conn.info.transaction_status == TransactionStatus.IDLE
            if idle and not conn.broken and not self.closed:
                kind.idle.append((conn, time.monotonic()))
            elif not conn.closed:
                conn.pgconn.finish()
        finally:
            kind.slots.release()

    def abandon(self) -> None:
        """Close every connection without the loop (it is closing or closed)."""
        self.closed = True
        for conn in list(self.conns):  # before the idle lists let go of the last references
            if not conn.closed:
                conn.pgconn.finish()
        self.conns.clear()
        self.main.idle.clear()
        self.watch.idle.clear()

    async def aclose(self) -> None:
        """Close the idle connections; those in use are closed when they come back."""
        self.closed = True
        for kind in (self.main, self.watch):
            idle, kind.idle = kind.idle, []
            for conn, _ in idle:
                await conn.close()
