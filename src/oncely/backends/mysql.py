"""MySQL / MariaDB connections: connect arguments from a URL, timeouts, the sync pool and the
per-event-loop async pools, and reading back multi-statement results.

What the MySQL store needs from its drivers (PyMySQL for the sync face, aiomysql for the async
face); no mechanism.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
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
from urllib.parse import unquote, urlsplit

import aiomysql  # type: ignore[import-untyped]
import pymysql
from pymysql.constants import CLIENT

from oncely.backends.urls import check_options, query_options, redact_url, scheme_of
from oncely.errors import ConfigurationError

__all__ = [
    "GONE",
    "READ_TIMEOUT",
    "Busy",
    "LoopPool",
    "Result",
    "SyncPool",
    "aexecute",
    "close_quietly",
    "collect",
    "connect_args",
    "driver_args",
    "errno",
    "server_version",
    "supports_returning",
]

SyncConn: TypeAlias = "pymysql.connections.Connection[pymysql.cursors.Cursor]"
Row = tuple[Any, ...]

_MARIADB_RE = re.compile(r"(\d+)\.(\d+)\.\d+-MariaDB", re.IGNORECASE)
#: Server errors that mean "the connection or the server went away" (client errors are 2000+).
GONE: Final = frozenset({1040, 1053, 1077, 1152, 1153, 1158, 1159, 1160, 1161, 1927, 4031})
#: An idle pooled connection older than this is pinged before use (idle TCP may have been cut).
PING_AFTER: Final = 30.0
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
URL_OPTIONS: Final = ("charset", "ssl", "ssl_ca", "ssl_cert", "ssl_key", "unix_socket")

# Every connection: UTC (so UNIX_TIMESTAMP(NOW(6)) is unambiguous across DST changes) and
# strict mode (so an over-long value is an error, never silently truncated into another's).
INIT_COMMAND: Final = (
    "SET time_zone = '+00:00', "
    "sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO'"
)


@dataclass(frozen=True, slots=True)
class Result:
    """What one round trip answered: the first statement's row count, the first row set."""

    rowcount: int
    rows: list[Row]


def text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def supports_returning(server_version: str) -> bool:
    """MariaDB 10.5+ has ``INSERT … RETURNING`` (and ``DELETE … RETURNING``); MySQL has neither."""
    match = _MARIADB_RE.search(server_version)
    return match is not None and (int(match[1]), int(match[2])) >= (10, 5)


def connect_args(url: str) -> dict[str, Any]:
    """PyMySQL keyword arguments for ``url`` (``mysql+pymysql://`` etc. normalised)."""
    _, sep, rest = url.partition("://")
    example = "'mysql://user:password@host:3306/dbname'"
    if not sep or scheme_of(url) not in ("mysql", "mariadb"):
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
    query = {k: v[-1] for k, v in query_options(parts.query, url, "MySQL URL").items()}
    # Other driver options are keyword arguments of the store, not URL options.
    check_options(query, URL_OPTIONS, url, "MySQL URL")
    if query.get("charset", "utf8mb4").lower() != "utf8mb4":
        raise ConfigurationError(
            "oncely always talks utf8mb4 to MySQL; drop 'charset' from the URL"
        )
    if "unix_socket" in query:
        args["unix_socket"] = query["unix_socket"]
    context = ssl_context(query, redact_url(url))
    if context is not None:
        args["ssl"] = context
    return args


def ssl_context(query: dict[str, str], where: str) -> ssl.SSLContext | None:
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


def errno(exc: BaseException) -> int:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


def collect(cur: pymysql.cursors.Cursor) -> Result:
    """Read every result of a (multi-)statement: a later statement's error surfaces here."""
    rowcount, rows = cur.rowcount, None
    while True:
        if rows is None and cur.description is not None:
            rows = [tuple(r) for r in cur.fetchall()]
        if not cur.nextset():
            return Result(rowcount, rows or [])


async def acollect(cur: Any) -> Result:
    rowcount, rows = int(cur.rowcount), None
    while True:
        if rows is None and cur.description is not None:
            rows = [tuple(r) for r in await cur.fetchall()]
        if not await cur.nextset():
            return Result(rowcount, rows or [])


async def aexecute(conn: Any, query: str, params: dict[str, Any]) -> Result:
    async with conn.cursor() as cur:
        await cur.execute(query, params)
        return await acollect(cur)


def server_version(conn: Any) -> str:
    """The handshake's version string, e.g. ``5.5.5-10.11.19-MariaDB`` or ``8.4.3``."""
    return text(getattr(conn, "server_version", "") or "")


def looks_dead(conn: Any) -> bool:
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


def close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


class Busy(Exception):
    """No pooled connection became free in time."""


class SyncPool:
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
            raise Busy
        try:
            while True:
                try:
                    conn, since = self._idle.get_nowait()
                except queue.Empty:
                    return self._connect()
                if looks_dead(conn):  # the server closed it (restart, wait_timeout, KILL)
                    close_quietly(conn)
                    continue
                if time.monotonic() - since < PING_AFTER:
                    return conn
                try:
                    conn.ping(reconnect=False)
                    return conn
                except pymysql.Error:
                    close_quietly(conn)
        except BaseException:
            self._slots.release()
            raise

    def put(self, conn: SyncConn, healthy: bool) -> None:
        try:
            with self._lock:
                if healthy and not self._closed:
                    self._idle.put((conn, time.monotonic()))
                    return
            close_quietly(conn)
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
            close_quietly(conn)


class LoopPool:
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
            close_quietly(conn)
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


def driver_args(
    url: str, timeout: float, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], float | None]:
    """The keyword arguments of :func:`pymysql.connect` and of :func:`aiomysql.connect` for
    ``url``, and the seconds each reply is awaited (``read_timeout``; None: without bound).

    Every connection talks utf8mb4 in autocommit mode, with :data:`INIT_COMMAND`, a connect
    timeout of ``timeout`` seconds and :data:`READ_TIMEOUT` for each reply and write unless
    ``options`` say otherwise. The sync connections may send several statements at once.

    :raises ConfigurationError: a bad URL, or an option oncely sets itself or PyMySQL lacks.
    """
    args = connect_args(url)
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
        connect_timeout=timeout,
        read_timeout=READ_TIMEOUT,
        write_timeout=READ_TIMEOUT,
    )
    args.update(options)
    sync_args = {**args, "client_flag": CLIENT.MULTI_STATEMENTS | CLIENT.FOUND_ROWS}
    # aiomysql spells database "db", always asks for multi-statements, and knows fewer options.
    known = inspect.signature(aiomysql.connect).parameters
    renamed = {("db" if k == "database" else k): v for k, v in args.items()}
    async_args = {k: v for k, v in renamed.items() if k in known}
    async_args["client_flag"] = CLIENT.FOUND_ROWS
    return sync_args, async_args, args.get("read_timeout")
