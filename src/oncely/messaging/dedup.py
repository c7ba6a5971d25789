"""Dedup windows: drop a message id seen before within a window (the source's cache dedup).

::

    from oncely.messaging.dedup import Deduplicator

    dedup = Deduplicator("redis://127.0.0.1:6379/0", window=300, namespace="clicks")
    if not dedup.seen(message_id):          # first sighting inside 5 minutes
        handle(message)
    fresh = dedup.filter_new(batch_of_ids)  # the new ones, in order, one round trip

Each decision is one round trip to the store, decided on the store's clock (DESIGN.md):

=================  =========================================================================
store              ``seen(id)`` / ``filter_new(ids)``
=================  =========================================================================
``memory://``      a dict under a lock (one process; the process's monotonic clock)
``redis://``       ``SET key 1 NX PX window`` / one Lua script doing that for every id
``sqlite:///f.db`` one ``INSERT … SELECT … FROM json_each(:ids) ON CONFLICT … DO UPDATE …
                   WHERE expired RETURNING id`` (``julianday('now')``)
``postgresql://``  one ``INSERT … SELECT … FROM unnest(%(ids)s) ON CONFLICT … DO UPDATE …
                   WHERE expired RETURNING id`` (``now()``)
``mysql://``       MariaDB >= 10.5: one round trip, ``DELETE`` of the batch's expired rows then
                   ``INSERT IGNORE … RETURNING id`` (``UNIX_TIMESTAMP(NOW(6))``); a batch
                   over ``max_allowed_packet`` goes in several such statements
=================  =========================================================================

An id is *new* when it has no unexpired record: the statement inserts it, or takes over its
expired row, and only then returns it. Concurrent callers with the same id are serialised by
the key (Redis runs one command at a time; PostgreSQL's ``ON CONFLICT`` waits for the other
insert and re-checks the row; SQLite has one writer), so exactly one of them is told "new".
The window is fixed from the first sighting (like ``SET NX EX``): a repeat inside it does not
extend it. Expired SQL rows are taken over by the next sighting and deleted by
:meth:`Deduplicator.purge` (``oncely`` runs no background job); Redis expires keys itself.

**Bloom-filter mode** (``bloom=True``): constant memory, no per-id record, and a
false-positive rate: a *new* id is reported as seen with probability up to ``error_rate``
once ``capacity`` distinct ids arrived in one window (below capacity it is lower). Never the
other way round: a repeat inside the window is always caught. Use it only where dropping that
fraction of new messages is acceptable (metrics, analytics, best-effort fan-out), never for
payments. Two generations of filters cover the window: an id is remembered for between
``window`` and ``2 * window`` seconds. Each generation is sized for ``error_rate / 2`` so the
two together stay within ``error_rate``. On ``memory://`` the filters are rbloom's
(``pip install 'oncely[bloom]'``); on Redis a bit array per generation, set and tested by one
Lua script with k hashes (double hashing of SHA-1, Kirsch and Mitzenmacher 2006); the sizes are
the textbook ``m = -n ln p / (ln 2)^2`` bits and ``k = (m / n) ln 2`` hashes.

Namespaces: every :class:`Deduplicator` names its ``namespace=`` (required): two deduplicators
share their ids only if they name the same one, so different streams never silence each other
by accident.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any, Final, NamedTuple, TypeVar

from oncely.backends.plans import Command, Eval, Exec, Plan, arun, run
from oncely.backends.urls import redact_url, scheme_of
from oncely.core.text import literal_bytes, stored_text
from oncely.errors import (
    ConfigurationError,
    InvalidKey,
    SchemaMissing,
    StoreError,
    StoreUnavailable,
)
from oncely.settings import MAX_SECONDS, count, flag, fraction, seconds, text, whole

__all__ = [
    "MAX_BLOOM_BITS",
    "MAX_ID_LENGTH",
    "MAX_WINDOW",
    "Deduplicator",
    "bloom_size",
    "message_id_text",
]

Id = TypeVar("Id")

#: Longest message id accepted, in characters (Stripe's limit for idempotency keys).
MAX_ID_LENGTH: Final = 255
#: Longest window, in seconds: :data:`oncely.settings.MAX_SECONDS` (1e9 s, about 31.7 years),
#: the bound of every duration option, checked when the :class:`Deduplicator` is built rather
#: than at its first call.
MAX_WINDOW: Final = MAX_SECONDS
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class _Count(NamedTuple):
    """Request: run one SQL statement; the reply is its row count (a plan's ``Exec`` reply is
    its rows)."""

    statement: str
    params: dict[str, Any]


#: The largest Bloom generation in bits: a Redis string holds 2**32 bits (512 MiB), and
#: memory:// (rbloom) refuses the same, rather than aborting the process on allocation.
MAX_BLOOM_BITS: Final = 2**32


def bloom_size(capacity: int, error_rate: float) -> tuple[int, int]:
    """Bits ``m`` and hashes ``k`` of a Bloom filter holding ``capacity`` ids with a
    false-positive rate of ``error_rate``: ``m = ceil(-n ln p / (ln 2)^2)``,
    ``k = max(1, round(m / n * ln 2))`` (Bloom 1970; the usual optimum)."""
    m = math.ceil(-capacity * math.log(error_rate) / (math.log(2) ** 2))
    k = max(1, round(m / capacity * math.log(2)))
    return m, k


def _busy(exc: BaseException, what: str) -> BaseException:
    """``exc`` through :func:`oncely.sql.connections.busy`, the one translation of a concurrent
    writer's refusal (serialization failure, deadlock, lock wait timeout, SQLite busy) into
    :class:`~oncely.errors.DatabaseBusy` every SQL mechanism shares."""
    from oncely.sql.connections import busy

    return busy(exc, what)


def message_id_text(message_id: Any) -> str:
    """``message_id`` as the text every store compares (``str(id)``).

    :raises InvalidKey: not a non-empty str, int or UUID of at most :data:`MAX_ID_LENGTH`
        characters, or holding a NUL character or a lone surrogate (no store keeps those
        exactly: :func:`oncely.core.text.stored_text`).
    """
    if isinstance(message_id, (str, int, uuid.UUID)) and not isinstance(message_id, bool):
        text = str(message_id)
        if text and len(text) <= MAX_ID_LENGTH:
            return stored_text(text, "message id")
    raise InvalidKey(
        f"message id {message_id!r} cannot be deduplicated: give a non-empty str, int or UUID of "
        f"at most {MAX_ID_LENGTH} characters (take it from the broker's message id, a header or "
        "a body field)"
    )


def _normalise(ids: Iterable[Any]) -> tuple[list[Any], list[str]]:
    """(originals, texts): each distinct id once, in first-seen order; every id validated
    before anything is sent (nothing half-written)."""
    if isinstance(ids, (str, bytes)):
        raise InvalidKey("filter_new() takes an iterable of ids, not one id: use seen(id)")
    originals: list[Any] = []
    texts: list[str] = []
    known: set[str] = set()
    for message_id in ids:
        text = message_id_text(message_id)
        if text not in known:
            known.add(text)
            originals.append(message_id)
            texts.append(text)
    return originals, texts


# -- the backends: each decision a plan (oncely.backends.plans), run on a sync or async face --
class _Backend:
    """One store's plans: ``filter`` returns the positions of the new ids among ``texts``."""

    def filter(self, texts: list[str]) -> Plan[list[int]]:
        raise NotImplementedError

    def seen(self, text: str) -> Plan[bool]:
        new = yield from self.filter([text])
        return not new

    def purge(self, limit: int) -> Plan[int]:
        return 0
        yield  # pragma: no cover - a plan without requests

    def execute(self, request: Any) -> Any:
        raise TypeError(f"unexpected request {request!r}")  # pragma: no cover

    async def aexecute(self, request: Any) -> Any:
        return self.execute(request)

    def close(self) -> None:
        """Close the sync connections."""

    async def aclose(self) -> None:
        """Close the running loop's connections."""


class _MemoryWindow(_Backend):
    """Exact window in this process: id -> expiry on the monotonic clock. Deduplicators of
    one process naming the same namespace share one table, as they would on a server."""

    def __init__(self, window: float, namespace: str) -> None:
        self.window = window
        self.state = _memory_state(("window", namespace), dict)

    def filter(self, texts: list[str]) -> Plan[list[int]]:
        new: list[int] = []
        state = self.state
        with state.lock:
            now = time.monotonic()
            if now >= state.next_sweep:  # drop expired ids at most once a window
                state.value = {k: v for k, v in state.value.items() if v > now}
                state.next_sweep = now + self.window
            expires = state.value
            for i, text in enumerate(texts):
                if expires.get(text, 0.0) <= now:
                    expires[text] = now + self.window
                    new.append(i)
        return new
        yield  # pragma: no cover

    def purge(self, limit: int) -> Plan[int]:
        state = self.state
        with state.lock:
            now = time.monotonic()
            gone = [k for k, v in state.value.items() if v <= now][:limit]
            for k in gone:
                del state.value[k]
        return len(gone)
        yield  # pragma: no cover


class _State:
    __slots__ = ("gen", "lock", "next_sweep", "prev", "value")

    def __init__(self, value: Any) -> None:
        self.lock = threading.Lock()
        self.value = value
        self.prev: Any = None
        self.gen = 0
        self.next_sweep = 0.0


_MEMORY: dict[tuple[Any, ...], _State] = {}
_MEMORY_LOCK = threading.Lock()


def _memory_state(key: tuple[Any, ...], make: Any) -> _State:
    with _MEMORY_LOCK:
        state = _MEMORY.get(key)
        if state is None:
            state = _MEMORY[key] = _State(make())
        return state


class _MemoryBloom(_Backend):
    """Two rbloom generations, each covering one window of the monotonic clock (shared by the
    deduplicators of this process with the same namespace, window and sizes)."""

    def __init__(self, window: float, namespace: str, capacity: int, error_rate: float) -> None:
        try:
            from rbloom import Bloom
        except ImportError as exc:
            raise ConfigurationError(
                "bloom=True on memory:// needs rbloom: pip install 'oncely[bloom]'"
            ) from exc
        self.bloom_class: Any = Bloom
        self.capacity, self.rate = capacity, error_rate / 2
        self.window = window
        self.state = _memory_state(("bloom", namespace, window, capacity, error_rate), self.make)
        with self.state.lock:
            if self.state.prev is None:
                self.state.prev = self.make()
                self.state.gen = math.floor(time.monotonic() / window)

    def make(self) -> Any:
        return self.bloom_class(self.capacity, self.rate)

    def filter(self, texts: list[str]) -> Plan[list[int]]:
        new: list[int] = []
        state = self.state
        with state.lock:
            gen = math.floor(time.monotonic() / self.window)
            if gen != state.gen:
                state.prev = state.value if gen == state.gen + 1 else self.make()
                state.value, state.gen = self.make(), gen
            cur, prev = state.value, state.prev
            for i, text in enumerate(texts):
                if text not in cur and text not in prev:
                    cur.add(text)
                    new.append(i)
        return new
        yield  # pragma: no cover


_FILTER_SCRIPT: Any = None
_BLOOM_SCRIPT: Any = None


def _scripts() -> tuple[Any, Any]:
    global _FILTER_SCRIPT, _BLOOM_SCRIPT
    if _FILTER_SCRIPT is None:
        from oncely.backends.lua import Script

        _FILTER_SCRIPT = Script("oncely.messaging", "dedup_filter")
        _BLOOM_SCRIPT = Script("oncely.messaging", "dedup_bloom")
    return _FILTER_SCRIPT, _BLOOM_SCRIPT


class _Redis(_Backend):
    """Exact window (``SET NX PX``) or the Lua Bloom filter, keys ``{prefix}:{namespace}:…``.

    The namespace is the key's hash tag, so a batch's keys share one Redis Cluster slot."""

    def __init__(
        self, url: str, client: Any, prefix: str, namespace: str, window: float, bloom: Any
    ) -> None:
        from oncely.backends.redis import RedisClients, ms

        # A client passed in serves its own face only: the other would need a URL.
        self.faces: tuple[str, ...] = ("sync", "async")
        if client is None:
            self.clients = RedisClients(url)
        elif asyncio.iscoroutinefunction(client.execute_command):
            self.clients = RedisClients(url, async_client=client)
            self.faces = ("async",)
        else:
            self.clients = RedisClients(url, client=client)
            self.faces = ("sync",)
        # the namespace is length-prefixed (and ids / bloom generations get their own tag), so
        # no (namespace, id) pair spells another's key: "n}:b" + "c" vs "n" + "b}:c"
        self.base = f"{prefix}:{{{len(namespace)}:{namespace}}}:"
        self.window_ms = max(1, ms(window))
        self.bloom = bloom  # (m, k) or None
        self.filter_script, self.bloom_script = _scripts()

    def seen(self, text: str) -> Plan[bool]:
        if self.bloom is not None:
            return (yield from super().seen(text))
        reply = yield Command(("SET", self.base + "i:" + text, b"1", "NX", "PX", self.window_ms))
        return reply is None

    def filter(self, texts: list[str]) -> Plan[list[int]]:
        if not texts:
            return []
        if self.bloom is None:
            keys = tuple(self.base + "i:" + t for t in texts)
            reply = yield Eval(self.filter_script, len(keys), (*keys, self.window_ms))
        else:
            m, k = self.bloom
            args = (self.base + "b", self.window_ms, m, k, *texts)
            reply = yield Eval(self.bloom_script, 1, args)
        return [int(i) - 1 for i in reply]

    def wrong_face(self, face: str) -> ConfigurationError:
        other = "aseen/afilter_new" if face == "sync" else "seen/filter_new"
        given = "an async" if face == "sync" else "a sync"
        return ConfigurationError(
            f"this Deduplicator was given {given} Redis client, so it has no {face} face: use "
            f"{other}, or pass the URL so that both faces open their own connections"
        )

    def execute(self, request: Any) -> Any:
        if "sync" not in self.faces:
            raise self.wrong_face("sync")
        return self.clients.execute(request)

    async def aexecute(self, request: Any) -> Any:
        if "async" not in self.faces:
            raise self.wrong_face("async")
        return await self.clients.aexecute(request)

    def close(self) -> None:
        self.clients.close()

    async def aclose(self) -> None:
        await self.clients.aclose()


# -- SQL -------------------------------------------------------------------------------------------
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS {t} (
    namespace  TEXT NOT NULL,
    id         TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (namespace, id)
);
CREATE INDEX IF NOT EXISTS {t}_expires ON {t} (expires_at);
"""
_SQLITE_FILTER = (
    "INSERT INTO {t} (namespace, id, expires_at) "
    "SELECT :ns, j.value, n.now + :window FROM json_each(:ids) AS j, "
    "(SELECT " + _SQLITE_NOW + " AS now) AS n WHERE 1 "
    "ON CONFLICT (namespace, id) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE {t}.expires_at <= excluded.expires_at - :window "
    "RETURNING id"
)
_SQLITE_PURGE = (
    "DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} WHERE expires_at <= "
    + _SQLITE_NOW
    + " LIMIT :limit)"
)
_PG_DDL = """
CREATE TABLE IF NOT EXISTS {t} (
    namespace  text NOT NULL,
    id         text NOT NULL,
    expires_at double precision NOT NULL,
    PRIMARY KEY (namespace, id)
);
CREATE INDEX IF NOT EXISTS {t}_expires ON {t} (expires_at);
"""
_PG_NOW = "extract(epoch FROM now())::float8"
_PG_FILTER = (
    "INSERT INTO {t} AS d (namespace, id, expires_at) "
    "SELECT %(ns)s, i, " + _PG_NOW + " + %(window)s FROM unnest(%(ids)s::text[]) AS i "
    "ON CONFLICT (namespace, id) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE d.expires_at <= " + _PG_NOW + " "
    "RETURNING d.id"
)
_PG_PURGE = (
    "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE expires_at <= "
    + _PG_NOW
    + " LIMIT %(limit)s)) AND expires_at <= "
    + _PG_NOW
)


class _Sql(_Backend):
    """The window as rows ``(namespace, id, expires_at)``, on the store's clock."""

    filter_sql: str
    purge_sql: str

    def __init__(self, table: str, namespace: str, window: float) -> None:
        if not isinstance(table, str) or not _TABLE.match(table):
            raise ConfigurationError(
                f"table {table!r} is not a plain SQL identifier: use letters, digits and '_' "
                "(at most 63, not starting with a digit)"
            )
        self.table = table
        self.namespace = namespace
        self.window = float(window)

    def ids_param(self, texts: list[str]) -> Any:
        return texts

    def filter(self, texts: list[str]) -> Plan[list[int]]:
        if not texts:
            return []
        # Sorted: concurrent batches lock their keys in one order, so they never deadlock.
        ordered = sorted(texts)
        params = {"ns": self.namespace, "window": self.window, "ids": self.ids_param(ordered)}
        rows = yield Exec(self.filter_sql, params)
        position = {t: i for i, t in enumerate(texts)}
        return sorted(position[r[0]] for r in rows)

    def purge(self, limit: int) -> Plan[int]:
        count = yield _Count(self.purge_sql, {"limit": limit})
        return int(count)


class _SQLite(_Sql):
    def __init__(self, url: str, table: str, namespace: str, window: float, create: bool) -> None:
        from oncely.backends.sqlite import Connections, Workers, enable_wal, parse_url

        super().__init__(table, namespace, window)
        self.path, options = parse_url(url, "SQLite URL", ("busy_timeout",))
        self.busy = float(options.get("busy_timeout", 15))
        self.create = create
        self.ready = False
        self.ready_lock = threading.Lock()
        self.enable_wal = enable_wal
        self.connections = Connections(self.open, path=self.path, timeout=self.busy)
        self.workers = Workers(4, f"oncely-dedup-{table}")
        self.filter_sql = _SQLITE_FILTER.format(t=table)
        self.purge_sql = _SQLITE_PURGE.format(t=table)

    def open(self, deadline: float | None = None) -> sqlite3.Connection:
        # ``deadline``: the borrower's bound (Connections); dedup calls carry none.
        if not self.create and not os.path.exists(self.path):
            raise SchemaMissing(f"SQLite database {self.path!r} does not exist")
        conn = sqlite3.connect(
            self.path, timeout=self.busy, isolation_level=None, check_same_thread=False
        )
        try:
            self.enable_wal(conn, self.busy)
            if self.create and not self.ready:
                with self.ready_lock:
                    conn.executescript(_SQLITE_DDL.format(t=self.table))
                    self.ready = True
        except BaseException:
            conn.close()
            raise
        return conn

    def ids_param(self, texts: list[str]) -> Any:
        return json.dumps(texts)

    def execute(self, request: Any) -> Any:
        try:
            with self.connections.connection() as conn:
                cur = conn.execute(request.statement, request.params)
                rows = cur.fetchall()
                return cur.rowcount if type(request) is _Count else rows
        except sqlite3.Error as exc:
            text = str(exc)
            if text.startswith("no such table"):
                raise SchemaMissing(
                    f"dedup table {self.table!r} is missing in {self.path!r}: create it with "
                    "create_schema=True"
                ) from exc
            transient = _busy(exc, f"dedup table {self.table!r} in {self.path!r}")
            if transient is not exc:
                raise transient from exc
            if "locked" in text or "busy" in text or "unable to open" in text:
                raise StoreUnavailable(f"SQLite database {self.path!r}: {exc}") from exc
            raise StoreError(f"SQLite database {self.path!r} failed: {exc}") from exc

    async def aexecute(self, request: Any) -> Any:
        return await self.workers.run(self.execute, request)

    def close(self) -> None:
        self.connections.close()
        self.workers.close()


class _Postgres(_Sql):
    def __init__(
        self, url: str, table: str, namespace: str, window: float, create: bool, size: int
    ) -> None:
        from oncely.backends.loops import LoopLocal
        from oncely.backends.postgres import LoopConnections, conninfo, network_defaults

        super().__init__(table, namespace, window)
        self.conninfo = conninfo(url)
        self.where = redact_url(url)
        self.kwargs = {"autocommit": True, **network_defaults(self.conninfo, 10.0)}
        self.size = size
        self.create = create
        self.ready = not create
        self.idle: list[Any] = []  # sync connections kept for the next call
        self.pid = os.getpid()
        self.pool_lock = threading.Lock()
        self.loops: Any = LoopLocal(
            lambda: LoopConnections(size, 1), lambda lc: lc.aclose(), lambda lc: lc.abandon()
        )
        self.filter_sql = _PG_FILTER.format(t=table)
        self.purge_sql = _PG_PURGE.format(t=table)

    def ddl(self) -> list[tuple[str, dict[str, Any]]]:
        from oncely.backends.postgres import schema_lock_id

        return [
            ("SELECT pg_advisory_xact_lock(%(lock)s)", {"lock": schema_lock_id(self.table)}),
            (_PG_DDL.format(t=self.table), {}),
        ]

    def translate(self, exc: Exception) -> StoreError:
        import psycopg

        if isinstance(exc, psycopg.errors.UndefinedTable):
            return SchemaMissing(
                f"dedup table {self.table!r} is missing at {self.where}: create it with "
                "create_schema=True"
            )
        transient = _busy(exc, f"dedup table {self.table!r} at {self.where}")
        if isinstance(transient, StoreError):
            return transient
        if isinstance(exc, psycopg.OperationalError):
            return StoreUnavailable(f"PostgreSQL at {self.where} is unavailable: {exc}")
        return StoreError(f"PostgreSQL at {self.where} failed: {exc}")

    def take(self) -> Any:
        """An idle connection, or a new one (connecting fails fast when the server is down)."""
        import psycopg

        with self.pool_lock:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed and not conn.broken:
                    return conn
        conn = psycopg.connect(self.conninfo, **self.kwargs)
        try:
            if not self.ready:
                with conn.transaction():
                    for sql, params in self.ddl():
                        conn.execute(sql, params)
                self.ready = True
        except BaseException:
            conn.close()
            raise
        return conn

    def give(self, conn: Any) -> None:
        from psycopg.pq import TransactionStatus

        idle = conn.info.transaction_status == TransactionStatus.IDLE and not conn.broken
        with self.pool_lock:
            if idle and os.getpid() == self.pid and len(self.idle) < self.size:
                self.idle.append(conn)
                return
        conn.close()

    def execute(self, request: Any) -> Any:
        import psycopg

        try:
            conn = self.take()
        except psycopg.Error as exc:
            raise self.translate(exc) from exc
        try:
            cur = conn.execute(request.statement, request.params)
            return cur.rowcount if type(request) is _Count else cur.fetchall()
        except psycopg.Error as exc:
            raise self.translate(exc) from exc
        finally:
            self.give(conn)

    async def aopen(self, slot: Any) -> Any:
        import psycopg

        try:
            conn = await psycopg.AsyncConnection.connect(self.conninfo, **self.kwargs)
        except psycopg.Error as exc:
            raise self.translate(exc) from exc
        slot.conns.add(conn)
        if not self.ready:
            async with conn.transaction():
                for sql, params in self.ddl():
                    await conn.execute(sql, params)
            self.ready = True
        return conn

    async def aexecute(self, request: Any) -> Any:
        import psycopg

        slot = self.loops.get()
        conn = await slot.take(slot.main, 10.0, self.aopen)
        if conn is None:
            raise StoreUnavailable(f"PostgreSQL at {self.where}: no connection in 10 s")
        try:
            cur = await conn.execute(request.statement, request.params)
            if type(request) is _Count:
                return cur.rowcount
            return await cur.fetchall()
        except psycopg.Error as exc:
            raise self.translate(exc) from exc
        finally:
            slot.give(slot.main, conn)

    def close(self) -> None:
        with self.pool_lock:
            idle, self.idle = self.idle, []
        if os.getpid() == self.pid:
            for conn in idle:
                conn.close()
        self.loops.close_idle()

    async def aclose(self) -> None:
        await self.loops.aclose()


_MYSQL_NOW = "UNIX_TIMESTAMP(NOW(6))"
_MYSQL_DDL = (
    # VARBINARY: byte comparison (utf8mb4_bin is PAD SPACE: "x " would be a duplicate of "x")
    "CREATE TABLE IF NOT EXISTS {t} (namespace VARBINARY(400) NOT NULL, "
    "id VARBINARY(1020) NOT NULL, "
    "expires_at DOUBLE NOT NULL, PRIMARY KEY (namespace, id), KEY {t}_expires (expires_at)) "
    "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
)
_MYSQL_PURGE = (
    "DELETE FROM {t} WHERE expires_at <= " + _MYSQL_NOW + " ORDER BY expires_at LIMIT %(limit)s"
)
_DEADLOCK = 1213
_PACKET_QUERY = "SELECT @@max_allowed_packet"
#: ``max_allowed_packet`` assumed if the server does not say (MariaDB's default is 16 MiB).
_DEFAULT_PACKET = 1024 * 1024


class _Retry(StoreUnavailable):
    """A deadlock the database rolled back: the plan sends the statement again."""


class _Packet(NamedTuple):
    """Request: the server's ``max_allowed_packet`` in bytes (read once, when the first
    connection opens; no round trip once known)."""


#: Bytes of a dedup statement kept free of ``max_allowed_packet`` (the protocol's own).
_PACKET_MARGIN = 64 * 1024


class _MySQL(_Sql):
    """MariaDB >= 10.5 (``INSERT … RETURNING``): one round trip of two statements. The first
    deletes this batch's *expired* rows, the second is ``INSERT IGNORE … RETURNING id``, which
    returns only the rows it inserted. Each is atomic on its own, and that is enough: a
    statement deletes only rows already expired, so of concurrent callers exactly one
    inserts each id (the others' ``INSERT IGNORE`` finds its row)."""

    def __init__(
        self, url: str, table: str, namespace: str, window: float, create: bool, size: int
    ) -> None:
        from oncely.backends.loops import LoopLocal
        from oncely.backends.mysql import SyncPool, driver_args

        super().__init__(table, namespace, window)
        self.where = redact_url(url)
        self.sync_args, self.async_args, timeout = driver_args(url, 10.0, {})
        self.read_timeout = timeout or 30.0
        self.create = create
        self.ready = False
        self.size = size
        self.pool = SyncPool(self.sync_connect, size, 10.0)
        self.loops: Any = LoopLocal(_AsyncIdle, _AsyncIdle.aclose, _AsyncIdle.abandon)
        self.purge_sql = _MYSQL_PURGE.format(t=table)
        #: The session's ``max_allowed_packet`` in bytes (None: no connection opened yet).
        self.max_packet: int | None = None

    def learn_packet(self, rows: Any) -> None:
        value = rows[0][0] if rows and rows[0] else None
        self.max_packet = int(value) if value else _DEFAULT_PACKET

    def statement(self, count: int) -> str:
        t = self.table
        ids = ", ".join(f"%(i{n})s" for n in range(count))
        rows = ", ".join(f"(%(ns)s, %(i{n})s, {_MYSQL_NOW} + %(window)s)" for n in range(count))
        return (
            f"DELETE FROM {t} WHERE namespace = %(ns)s AND id IN ({ids}) AND expires_at <= "
            f"{_MYSQL_NOW}; INSERT IGNORE INTO {t} (namespace, id, expires_at) VALUES {rows} "
            "RETURNING id"
        )

    def filter(self, texts: list[str]) -> Plan[list[int]]:
        """One statement (one round trip) per part of the batch that fits in the server's
        ``max_allowed_packet``: a statement over it is refused by the server closing the
        connection, which looks like an outage ("server has gone away") and would be retried
        forever. Each id is still decided by one atomic ``INSERT IGNORE``; the parts go in
        sorted order, so concurrent batches still take their locks in one order."""
        if not texts:
            return []
        ordered = sorted(texts)  # one lock order for every batch
        packet = self.max_packet
        if packet is None:
            packet = yield _Packet()
        budget = max(packet - _PACKET_MARGIN, packet // 2)
        rows: list[Any] = []
        for part in self.parts(ordered, budget):
            params: dict[str, Any] = {"ns": self.namespace, "window": self.window}
            params.update((f"i{n}", text) for n, text in enumerate(part))
            for attempt in range(5):
                try:
                    rows.extend((yield Exec(self.statement(len(part)), params)))
                    break
                except _Retry:
                    if attempt == 4:
                        raise
        position = {t: i for i, t in enumerate(texts)}
        return sorted(position[r[0] if isinstance(r[0], str) else r[0].decode()] for r in rows)

    def parts(self, ordered: list[str], budget: int) -> list[list[str]]:
        """``ordered`` cut into runs whose statement is at most ``budget`` bytes as sent.

        :raises ConfigurationError: one id alone does not fit (``max_allowed_packet`` set
            below what a 255-character id needs): a permanent condition, not an outage."""
        fixed = len(self.statement(0).encode("utf-8")) + 2 * literal_bytes(self.namespace) + 64
        per_row = literal_bytes(self.namespace) + len(_MYSQL_NOW) + 64
        parts: list[list[str]] = []
        part: list[str] = []
        size = fixed
        for message_id in ordered:
            cost = per_row + 2 * literal_bytes(message_id)
            if fixed + cost > budget:
                size = len(message_id.encode("utf-8"))
                raise ConfigurationError(
                    f"MySQL at {self.where}: max_allowed_packet is {self.max_packet} bytes, too "
                    f"small for a dedup statement of one {size}-byte id; raise "
                    "max_allowed_packet on the server"
                )
            if part and size + cost > budget:
                parts.append(part)
                part, size = [], fixed
            part.append(message_id)
            size += cost
        if part:
            parts.append(part)
        return parts

    def check(self, conn: Any) -> None:
        from oncely.backends.mysql import server_version, supports_returning

        version = server_version(conn)
        if not supports_returning(version):
            raise ConfigurationError(
                f"Deduplicator on MySQL needs MariaDB >= 10.5 (INSERT ... RETURNING); "
                f"{self.where} runs {version}: use Redis, PostgreSQL or SQLite for dedup windows"
            )

    def sync_connect(self) -> Any:
        import pymysql

        conn = pymysql.connect(**self.sync_args)
        try:
            self.check(conn)
            if self.max_packet is None:
                with conn.cursor() as cur:
                    cur.execute(_PACKET_QUERY)
                    self.learn_packet(cur.fetchall())
            if self.create and not self.ready:
                with conn.cursor() as cur:
                    cur.execute(_MYSQL_DDL.format(t=self.table))
                self.ready = True
        except BaseException:
            conn.close()
            raise
        return conn

    def translate(self, exc: Exception) -> StoreError:
        from oncely.backends.mysql import GONE, errno

        code = errno(exc)
        if code == _DEADLOCK:
            return _Retry(f"MySQL at {self.where}: deadlock, rolled back")
        transient = _busy(exc, f"dedup table {self.table!r} at {self.where}")
        if isinstance(transient, StoreError):
            return transient
        if code == 1146:
            return SchemaMissing(
                f"dedup table {self.table!r} is missing at {self.where}: create it with "
                "create_schema=True"
            )
        if code in GONE or code >= 2000 or isinstance(exc, OSError):
            return StoreUnavailable(f"MySQL at {self.where} is unavailable: {exc}")
        return StoreError(f"MySQL at {self.where} failed: {exc}")

    def execute(self, request: Any) -> Any:
        import pymysql

        from oncely.backends.mysql import Busy, collect

        try:
            conn = self.pool.get()
        except Busy:
            raise StoreUnavailable(f"MySQL at {self.where}: no connection in 10 s") from None
        except (pymysql.Error, OSError) as exc:
            raise self.translate(exc) from exc
        if type(request) is _Packet:  # the connection just opened read it
            self.pool.put(conn, True)
            return self.max_packet or _DEFAULT_PACKET
        healthy = False
        try:
            with conn.cursor() as cur:
                cur.execute(request.statement, request.params)
                result = collect(cur)
            healthy = True
        except (pymysql.Error, OSError) as exc:
            raise self.translate(exc) from exc
        finally:
            self.pool.put(conn, healthy)
        return result.rowcount if type(request) is _Count else result.rows

    async def aexecute(self, request: Any) -> Any:
        import aiomysql  # type: ignore[import-untyped]
        import pymysql

        from oncely.backends.mysql import close_quietly

        idle: _AsyncIdle = self.loops.get()
        conn = idle.take()
        try:
            if conn is None:
                conn = await aiomysql.connect(**self.async_args)
                self.check(conn)
                if self.max_packet is None:
                    self.learn_packet((await _aquiet(conn, _PACKET_QUERY, {})).rows)
                if self.create and not self.ready:
                    await _aquiet(conn, _MYSQL_DDL.format(t=self.table), {})
                    self.ready = True
            if type(request) is _Packet:
                idle.give(conn, self.size)
                return self.max_packet or _DEFAULT_PACKET
            result = await asyncio.wait_for(
                _aquiet(conn, request.statement, request.params), self.read_timeout
            )
        except (pymysql.Error, OSError, asyncio.TimeoutError) as exc:
            if conn is not None:
                close_quietly(conn)
            if isinstance(exc, asyncio.TimeoutError):
                raise StoreUnavailable(f"MySQL at {self.where} did not answer in time") from None
            raise self.translate(exc) from exc
        except BaseException:
            if conn is not None:
                close_quietly(conn)
            raise
        idle.give(conn, self.size)
        return result.rowcount if type(request) is _Count else result.rows

    def close(self) -> None:
        self.pool.close()
        self.loops.close_idle()

    async def aclose(self) -> None:
        await self.loops.aclose()


_QUIET_CURSOR: Any = None


async def _aquiet(conn: Any, statement: str, params: dict[str, Any]) -> Any:
    """Run ``statement`` on an aiomysql connection without aiomysql's ``SHOW WARNINGS`` (a
    second round trip after every statement with a warning, as ``INSERT IGNORE`` of a
    duplicate has): (row count of the first statement, the first row set)."""
    global _QUIET_CURSOR
    if _QUIET_CURSOR is None:
        import aiomysql

        class Quiet(aiomysql.Cursor):  # type: ignore[misc]
            async def _show_warnings(self, conn: Any) -> None:
                return None

        _QUIET_CURSOR = Quiet
    from oncely.backends.mysql import Result

    async with conn.cursor(_QUIET_CURSOR) as cur:
        await cur.execute(statement, params)
        rowcount, rows = int(cur.rowcount), None
        while True:
            if rows is None and cur.description is not None:
                rows = [tuple(r) for r in await cur.fetchall()]
            if not await cur.nextset():
                return Result(rowcount, rows or [])


class _AsyncIdle:
    """The idle aiomysql connections of one event loop."""

    def __init__(self) -> None:
        self.conns: list[Any] = []

    def take(self) -> Any:
        while self.conns:
            conn = self.conns.pop()
            if not conn.closed:
                return conn
        return None

    def give(self, conn: Any, size: int) -> None:
        if len(self.conns) < size:
            self.conns.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self.abandon()

    def abandon(self) -> None:
        conns, self.conns = self.conns, []
        for conn in conns:
            conn.close()


# -- the public face ---------------------------------------------------------------------------
class Deduplicator:
    """A dedup window over message ids, on a store picked by URL (see the module docs).

    :param store: ``memory://``, ``redis://…`` (or a ``redis.Redis`` / ``redis.asyncio.Redis``
        client, not decoding responses; it serves its own face only), ``sqlite:///file.db``,
        ``postgresql://…`` or ``mysql://…`` (MariaDB >= 10.5).
    :param window: seconds an id is remembered from its first sighting (> 0 and at most
        :data:`MAX_WINDOW`, on every store alike; Redis rounds to milliseconds).
    :param namespace: the id space; deduplicators share ids only if they name the same one.
    :param table: SQL table (created on first use unless ``create_schema=False``).
    :param prefix: Redis key prefix; keys are ``{prefix}:{<len>:<namespace>}:i:<id>`` (the
        namespace length-prefixed, so no namespace and id spell another pair's key) with the
        namespace as the Cluster hash tag; the Bloom generations ``…:b:<n>``.
    :param bloom: Bloom-filter mode (``memory://`` and Redis only): constant memory, and a new
        id is wrongly reported as seen with probability up to ``error_rate`` once ``capacity``
        distinct ids arrive within one window.
    :param pool_size: PostgreSQL / MariaDB connections kept per face.
    :raises ConfigurationError: a bad URL, window, namespace or option (a Bloom filter past
        :data:`MAX_BLOOM_BITS` bits); a missing extra.
    """

    def __init__(
        self,
        store: Any,
        *,
        window: float,
        namespace: str,
        table: str = "oncely_dedup",
        prefix: str = "oncely:dedup",
        bloom: bool = False,
        capacity: int = 1_000_000,
        error_rate: float = 0.01,
        create_schema: bool = True,
        pool_size: int = 8,
    ) -> None:
        window = seconds(window, "window", where="Deduplicator", maximum=MAX_WINDOW)
        if not isinstance(namespace, str) or not namespace or len(namespace) > 100:
            raise ConfigurationError(
                f"namespace={namespace!r}: give a non-empty str of at most 100 characters naming "
                "the id space (deduplicators share ids only when they name the same namespace)"
            )
        where = "Deduplicator"
        table = text(table, "table", where=where)
        prefix = text(prefix, "prefix", where=where)
        bloom = flag(bloom, "bloom", where=where)
        create_schema = flag(create_schema, "create_schema", where=where)
        pool_size = whole(pool_size, "pool_size", where=where, minimum=1)
        capacity = whole(capacity, "capacity", where=where, minimum=1)
        error_rate = fraction(error_rate, "error_rate", where=where)
        stored_text(namespace, "namespace", ConfigurationError)
        if bloom and bloom_size(capacity, error_rate / 2)[0] > MAX_BLOOM_BITS:
            bits = bloom_size(capacity, error_rate / 2)[0]
            raise ConfigurationError(
                f"capacity={capacity!r}, error_rate={error_rate!r}: a generation would need "
                f"{bits} bits ({bits / 8 / 2**20:.0f} MiB), past the {MAX_BLOOM_BITS} bits "
                "(512 MiB) a Redis string holds (and more than a process should allocate); "
                "lower the capacity, raise error_rate, split ids over namespaces, or use the "
                "exact window (bloom=False)"
            )
        self.window = float(window)
        self.namespace = namespace
        self.bloom = bool(bloom)
        self.capacity = capacity
        self.error_rate = error_rate
        client = None
        if not isinstance(store, str):
            if not hasattr(store, "execute_command"):
                raise ConfigurationError(
                    f"store={type(store).__name__}: give a URL (memory://, redis://…, "
                    "sqlite:///file.db, postgresql://…) or a redis-py client"
                )
            client, store = store, "redis://client"
        scheme = scheme_of(store)
        self.url = store
        backend: _Backend
        if bloom and scheme not in ("memory", "redis", "rediss"):
            raise ConfigurationError(
                f"bloom=True works on memory:// (rbloom) and Redis, not {scheme}://; use the "
                "exact window there"
            )
        if scheme == "memory":
            backend = (
                _MemoryBloom(self.window, namespace, capacity, error_rate)
                if bloom
                else _MemoryWindow(self.window, namespace)
            )
        elif scheme in ("redis", "rediss"):
            sizes = bloom_size(capacity, error_rate / 2) if bloom else None
            if client is None:
                backend = _Redis(store, None, prefix, namespace, self.window, sizes)
            else:
                backend = _Redis("redis://localhost", client, prefix, namespace, self.window, sizes)
        elif scheme == "sqlite":
            backend = _SQLite(store, table, namespace, self.window, create_schema)
        elif scheme in ("postgresql", "postgres"):
            backend = _Postgres(store, table, namespace, self.window, create_schema, pool_size)
        elif scheme in ("mysql", "mariadb"):
            backend = _MySQL(store, table, namespace, self.window, create_schema, pool_size)
        else:
            raise ConfigurationError(
                f"store {redact_url(store)!r}: Deduplicator works on memory://, redis://, "
                "sqlite:///file.db, postgresql:// and mysql:// (MariaDB >= 10.5)"
            )
        self._backend = backend

    def __repr__(self) -> str:
        mode = ", bloom=True" if self.bloom else ""
        return (
            f"Deduplicator({redact_url(self.url)!r}, window={self.window:g}, "
            f"namespace={self.namespace!r}{mode})"
        )

    # -- sync face -----------------------------------------------------------------------------
    def seen(self, message_id: Any) -> bool:
        """True if ``message_id`` was seen within the window; False the first time, which
        also records it (one atomic round trip). Ids are compared as ``str(id)``.

        :raises InvalidKey: empty, too long, or not a str / int / UUID.
        :raises StoreUnavailable: the store cannot be reached (nothing was recorded, or the
            reply was lost: treat the message as not handled and let the broker redeliver).
        """
        b = self._backend
        return run(b.seen(message_id_text(message_id)), b.execute)

    def filter_new(self, ids: Iterable[Id]) -> list[Id]:
        """The ids of ``ids`` not seen within the window, in their order, each once (a repeat
        inside the batch counts as seen); all of them are recorded, in one round trip.

        :raises InvalidKey: any id is unusable (checked before anything is sent).
        :raises StoreUnavailable: as for :meth:`seen`.
        """
        originals, texts = _normalise(ids)
        b = self._backend
        return [originals[i] for i in run(b.filter(texts), b.execute)]

    def purge(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` expired SQL rows (store clock); returns how many. Redis
        expires keys itself and the memory store sweeps as it goes, so there it returns the
        number of expired ids dropped (memory) or 0 (Redis).

        :raises ConfigurationError: ``limit`` is not an int from 1 to
            :data:`oncely.settings.MAX_COUNT`."""
        b = self._backend
        return run(b.purge(count(limit, "limit", where="purge")), b.execute)

    def close(self) -> None:
        """Close the sync connections (the deduplicator opens them again if used)."""
        self._backend.close()

    # -- async face ----------------------------------------------------------------------------
    async def aseen(self, message_id: Any) -> bool:
        """The async face of :meth:`seen`."""
        b = self._backend
        return await arun(b.seen(message_id_text(message_id)), b.aexecute)

    async def afilter_new(self, ids: Iterable[Id]) -> list[Id]:
        """The async face of :meth:`filter_new`."""
        originals, texts = _normalise(ids)
        b = self._backend
        return [originals[i] for i in await arun(b.filter(texts), b.aexecute)]

    async def apurge(self, limit: int = 10_000) -> int:
        """The async face of :meth:`purge`."""
        b = self._backend
        return await arun(b.purge(count(limit, "limit", where="apurge")), b.aexecute)

    async def aclose(self) -> None:
        """Close the running loop's connections."""
        await self._backend.aclose()
