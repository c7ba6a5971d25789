"""``postgresql://…``: records in a PostgreSQL table, shared by every process that can reach it.

Every decision is one SQL statement on an autocommit connection from a pool, and its clock is
the server's ``now()``; the client clock is never consulted. Completion and release send
``NOTIFY oncely_done`` from the same statement, so :meth:`PostgresStore.watch` wakes at once
instead of polling.

URL forms: ``postgresql://user:password@host:5432/db?sslmode=require`` (any libpq parameter),
``postgres://…`` and ``postgresql+psycopg://…`` (the SQLAlchemy spelling; the driver part is
dropped). Needs ``pip install 'oncely[postgres]'`` (psycopg 3.2+ and psycopg-pool).

The table is not created behind the operator's back: run ``oncely init URL`` once (it calls
:meth:`PostgresStore.init_schema`), or pass ``create_schema=True``.

Layout: this module holds the SQL text; what the SQL stores share is in :mod:`oncely.stores.sql`
and the connection handling in :mod:`oncely.backends.postgres`. Each operation is written once,
as a plan of statements (:mod:`oncely.backends.plans`), run by the sync face on a
:class:`psycopg_pool.ConnectionPool` and by the async face on the connections of the running
event loop (:class:`oncely.backends.postgres.LoopConnections`, a cache with no background task,
closed by the loop's shutdown, so nobody has to call :meth:`PostgresStore.aclose`).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Final, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from oncely.backends.forks import after_fork, inherit
from oncely.backends.loops import LoopLocal
from oncely.backends.plans import Exec, Plan
from oncely.backends.postgres import (
    AsyncConn,
    LoopConnections,
    SyncConn,
    check_connect_options,
    conninfo,
    network_defaults,
    schema_lock_id,
)
from oncely.backends.urls import redact_url
from oncely.core.cancelsafe import keep_cancel
from oncely.core.records import ClaimOutcome, New, Record, RecordKey
from oncely.errors import ConfigurationError, SchemaMissing, StoreError, StoreUnavailable
from oncely.settings import flag, seconds, whole
from oncely.stores.base import claimable, classify
from oncely.stores.planned import PlannedStore
from oncely.stores.sql import (
    Params,
    Row,
    changed,
    check_lease,
    fence_params,
    key_params,
    list_params,
    record,
    renew_params,
    schema_missing,
    validate_table,
)

__all__ = ["CHANNEL", "PostgresStore"]

#: The LISTEN/NOTIFY channel completions and releases are announced on.
CHANNEL: Final = "oncely_done"

Rows = list[Row]  # named here: inside the class, ``list`` is the method
Records = list[Record]

# A claim that keeps losing the READ COMMITTED race below gives up after this many statements.
_CLAIM_ATTEMPTS = 16

# -- SQL ---------------------------------------------------------------------------------------
# ``{t}`` is the table, ``{idx}`` its expiry index and ``{seq}`` its fence sequence, quoted by
# psycopg.sql.Identifier; ``{seqname}`` and ``{tname}`` are the same names as string literals.
# Times travel as float seconds since the epoch; the server converts with ``extract(epoch …)``.

_NOW = "extract(epoch FROM now())::float8"


def _columns(alias: str, result: str = "") -> str:
    """The record columns, times as epoch seconds, in :class:`Record` field order."""
    a = f"{alias}."
    return (
        f"{a}scope, {a}digest, {a}status, {a}fingerprint, {a}fence, "
        f"extract(epoch FROM {a}lease_until)::float8, extract(epoch FROM {a}expires_at)::float8, "
        f"extract(epoch FROM {a}created_at)::float8, {result or a + 'result'}, {a}codec"
    )


DDL = """\
CREATE TABLE IF NOT EXISTS {t} (
    scope       text        NOT NULL,
    digest      text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('in_progress', 'completed', 'released')),
    fingerprint text        NOT NULL,
    fence       bigint      NOT NULL,
    lease_until timestamptz,
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL,
    result      bytea,
    codec       text,
    PRIMARY KEY (scope, digest)
);
CREATE INDEX IF NOT EXISTS {idx} ON {t} (expires_at);
DO $oncely$
DECLARE
    old_check text;
BEGIN
    IF to_regclass({seqname}) IS NULL THEN
        EXECUTE format('CREATE SEQUENCE %s OWNED BY %s.fence', {seqname}, {tname});
        PERFORM setval({seqname}, greatest(
            (extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
            (SELECT coalesce(max(fence), 0) FROM {t})));
    END IF;
    SELECT conname INTO old_check FROM pg_constraint
    WHERE conrelid = {tname}::regclass AND contype = 'c'
      AND pg_get_constraintdef(oid) LIKE '%in_progress%'
      AND pg_get_constraintdef(oid) NOT LIKE '%released%';
    IF old_check IS NOT NULL THEN
        EXECUTE format(
            'ALTER TABLE %s DROP CONSTRAINT %I, ADD CONSTRAINT %I '
            'CHECK (status IN (%L, %L, %L)) NOT VALID',
            {tname}::regclass, old_check, old_check, 'in_progress', 'completed', 'released');
    END IF;
END
$oncely$;
"""
# The DDL above, step by step: the table; its expiry index; the fence sequence (dropped with the
# table), started above the clock in microseconds and above every fence already stored (a table
# made by an older version); and, for such a table, a status check that allows tombstones.

# The claimable predicate of oncely.stores.base.claimable, on the row ``r`` the upsert found.
_CLAIMABLE = (
    "r.status = 'released' OR r.expires_at <= now() "
    "OR (r.status = 'in_progress' AND (r.lease_until IS NULL OR r.lease_until <= now()))"
)

# One statement decides a claim.
#
# ``cur`` reads the row in the statement's snapshot. If it is live, nothing is written: the
# answer (Replay, InFlight, Mismatch) comes from ``cur`` and the statement stays read-only, so
# the hot path (a replay) takes no row lock, no transaction id and no WAL flush. Otherwise the
# upsert inserts a fresh row or takes over the claimable one; ON CONFLICT serialises it against
# concurrent claims. The result travels only when the fingerprint matches (a Replay needs it, a
# Mismatch does not).
#
# Fences come from the table's sequence, taken under a transaction-scoped advisory lock on the
# key (only on this writing path: a replay takes no lock). So the fences of one key are handed
# out one claim at a time, in the order the claims take effect, from a counter that never
# repeats: they grow whatever happened to the row in between (release, delete, expiry, purge)
# and whatever the clock does. Without the lock, a claim that drew its number first could
# insert it last, after a later claim's row was deleted: a fence going backwards.
_RESULT_IF_SAME = "CASE WHEN r.fingerprint = %(fingerprint)s THEN r.result END"
CLAIM = f"""\
WITH cur AS (
    SELECT r.* FROM {{t}} AS r WHERE r.scope = %(scope)s AND r.digest = %(digest)s
), ins AS (
    INSERT INTO {{t}} AS r
        (scope, digest, status, fingerprint, fence, lease_until, expires_at, created_at)
    SELECT
        %(scope)s, %(digest)s, 'in_progress', %(fingerprint)s,
        nextval({{seqname}}),
        now() + %(lease)s * interval '1 second',
        now() + %(keep)s * interval '1 second',
        now()
    WHERE CASE WHEN NOT EXISTS (SELECT 1 FROM cur AS r WHERE NOT ({_CLAIMABLE}))
        THEN pg_advisory_xact_lock(%(space)s::int4, %(slot)s::int4) IS NOT NULL
        ELSE false END
    ON CONFLICT (scope, digest) DO UPDATE SET
        status = 'in_progress',
        fingerprint = excluded.fingerprint,
        fence = greatest(r.fence + 1, excluded.fence),
        lease_until = excluded.lease_until,
        expires_at = excluded.expires_at,
        created_at = excluded.created_at,
        result = NULL,
        codec = NULL
    WHERE {_CLAIMABLE}
    RETURNING r.*
)
SELECT 'new', {_columns("ins")}, {_NOW} FROM ins
UNION ALL
SELECT 'existing', {_columns("r", result=_RESULT_IF_SAME)}, {_NOW} FROM cur AS r
WHERE NOT EXISTS (SELECT 1 FROM ins)
"""

_FENCED = "WHERE scope = %(scope)s AND digest = %(digest)s AND fence = %(fence)s"
_MINE = f"{_FENCED} AND status = 'in_progress'"
_NOTIFY = f"SELECT pg_notify('{CHANNEL}', %(note)s)"

# Completes the caller's claim. A record already completed under this fence with this very
# result is the caller's own earlier completion whose reply was lost: it matches too, keeps its
# expiry, and the caller hears success.
COMPLETE = f"""\
WITH upd AS (
    UPDATE {{t}} SET
        status = 'completed',
        lease_until = NULL,
        expires_at = CASE WHEN status = 'completed' THEN expires_at
            ELSE now() + %(ttl)s * interval '1 second' END,
        result = %(result)s,
        codec = %(codec)s
    {_FENCED} AND (status = 'in_progress' OR (status = 'completed'
        AND result IS NOT DISTINCT FROM %(result)s AND codec IS NOT DISTINCT FROM %(codec)s))
    RETURNING 1
)
{_NOTIFY} FROM upd
"""

# Release leaves an expired tombstone (purge removes it): a repeated release finds the caller's
# own tombstone and succeeds; a claim takes the row over at once.
RELEASE = f"""\
WITH upd AS (
    UPDATE {{t}} SET
        status = 'released',
        lease_until = NULL,
        expires_at = CASE WHEN status = 'released' THEN expires_at ELSE now() END,
        result = NULL,
        codec = NULL
    {_FENCED} AND status IN ('in_progress', 'released')
    RETURNING 1
)
{_NOTIFY} FROM upd
"""

RENEW = f"""\
UPDATE {{t}} SET
    lease_until = now() + %(lease)s * interval '1 second',
    expires_at = greatest(expires_at, now() + %(lease)s * interval '1 second')
{_MINE}
RETURNING extract(epoch FROM lease_until)::float8
"""

_KEY = "WHERE r.scope = %(scope)s AND r.digest = %(digest)s"
_LIVE = "r.expires_at > now() AND r.status <> 'released'"
GET = f"SELECT {_columns('r')} FROM {{t}} AS r {_KEY} AND {_LIVE}"
# What watch needs to know: is the record still in progress under the caller's fence?
STATE = f"SELECT r.status, r.fence, r.expires_at > now() FROM {{t}} AS r {_KEY}"
# Removes tombstones and expired rows too, but reports only whether a live record was there.
DELETE = f"""\
WITH del AS (
    DELETE FROM {{t}} AS r {_KEY}
      AND (%(running)s OR NOT (r.status = 'in_progress' AND r.lease_until > now()
                               AND r.expires_at > now()))
    RETURNING {_LIVE} AS live)
{_NOTIFY}, live FROM del
"""
# Oldest first through the expiry index; rows being claimed right now are skipped, and the outer
# condition re-checks a row that a concurrent claim took over after the inner SELECT saw it.
# The purge commits asynchronously (synchronous_commit off for its own transaction only): its
# commit does not wait for the WAL flush, so a batch holds its row locks for less time and adds
# no fsync of its own beside the live claims' (measured in benchmarks/scale.py). Nothing is lost
# that matters: a purge undone by a crash leaves expired rows, which every reader treats as
# absent and the next purge deletes again; WAL is flushed in order, so a later claim's
# synchronous commit makes the purge before it durable too; fences come from the sequence.
PURGE = """\
WITH del AS (
    DELETE FROM {t}
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM {t} WHERE expires_at <= now()
        ORDER BY expires_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED))
      AND expires_at <= now()
    RETURNING 1
)
SELECT count(*) FROM del, (SELECT set_config('synchronous_commit', 'off', true)) AS async
"""
LIST_ALL = (
    f"SELECT {_columns('r')} FROM {{t}} AS r WHERE {_LIVE} "
    "ORDER BY r.scope, r.digest LIMIT %(limit)s"
)
LIST_SCOPE = (
    f"SELECT {_columns('r')} FROM {{t}} AS r WHERE r.scope = %(scope)s AND {_LIVE} "
    "ORDER BY r.digest LIMIT %(limit)s"
)
NOW = f"SELECT {_NOW}"
_NOW_QUERY: Final = NOW.encode()
# The table exists, and so does its fence sequence, and its status check allows tombstones.
CHECK = """\
SELECT to_regclass({tname}) IS NOT NULL, to_regclass({seqname}) IS NOT NULL,
    NOT EXISTS (SELECT 1 FROM pg_constraint
        WHERE conrelid = to_regclass({tname}) AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%%in_progress%%'
          AND pg_get_constraintdef(oid) NOT LIKE '%%released%%')
"""
LOCK = "SELECT pg_advisory_xact_lock(%(lock)s)"
LISTEN = f"LISTEN {CHANNEL}"
UNLISTEN = f"UNLISTEN {CHANNEL}"

# -- pure helpers shared by both faces ------------------------------------------------------------


class _Statements:
    """The SQL of one table, rendered once to bytes (psycopg caches its parsing per text)."""

    def __init__(self, table: str) -> None:
        schema, _, name = table.rpartition(".")
        ident = sql.Identifier(schema, name) if schema else sql.Identifier(name)
        idx = sql.Identifier(f"{name}_expires_at_idx")
        seq = (
            sql.Identifier(schema, f"{name}_fence_seq")
            if schema
            else sql.Identifier(f"{name}_fence_seq")
        )
        names = {
            "t": ident,
            "idx": idx,
            "seq": seq,
            "tname": sql.Literal(ident.as_string(None)),
            "seqname": sql.Literal(seq.as_string(None)),
        }

        def render(template: str) -> bytes:
            return sql.SQL(template).format(**names).as_string(None).encode()

        self.claim = render(CLAIM)
        self.complete = render(COMPLETE)
        self.release = render(RELEASE)
        self.renew = render(RENEW)
        self.get = render(GET)
        self.state = render(STATE)
        self.delete = render(DELETE)
        self.purge = render(PURGE)
        self.list_all = render(LIST_ALL)
        self.list_scope = render(LIST_SCOPE)
        self.ddl = render(DDL)
        self.check = render(CHECK)


def _note(table: str, key: RecordKey) -> str:
    """The NOTIFY payload naming a key: short and bounded whatever the scope's length."""
    where = hashlib.sha256(f"{table}\x00{key.scope}".encode()).hexdigest()[:16]
    digest = key.digest
    if len(digest) > 200:
        digest = hashlib.sha256(digest.encode()).hexdigest()
    return f"{where}:{digest}"


def _fence_lock(table: str, key: RecordKey) -> tuple[int, int]:
    """The two 32-bit keys of the transaction-scoped advisory lock under which a claim of ``key``
    draws its fence (the two-key space: apart from oncely's lock backend, which uses one bigint).
    Two keys sharing a lock only wait for each other now and then."""
    space = hashlib.sha256(f"oncely:fence:{table}".encode()).digest()[:4]
    slot = hashlib.sha256(f"{key.scope}\x00{key.digest}".encode()).digest()[:4]
    return int.from_bytes(space, "big", signed=True), int.from_bytes(slot, "big", signed=True)


def _claim_params(table: str, key: RecordKey, fingerprint: str, lease: float, ttl: float) -> Params:
    lease = float(lease)
    space, slot = _fence_lock(table, key)
    return {
        "scope": key.scope,
        "digest": key.digest,
        "fingerprint": fingerprint,
        "lease": lease,
        "keep": max(lease, float(ttl)),
        "space": space,
        "slot": slot,
    }


def _complete_params(
    table: str, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
) -> Params:
    return {
        "scope": key.scope,
        "digest": key.digest,
        "fence": fence,
        "result": bytes(result),
        "codec": codec,
        "ttl": float(ttl),
        "note": _note(table, key),
    }


def _release_params(table: str, key: RecordKey, fence: int) -> Params:
    return {**fence_params(key, fence), "note": _note(table, key)}


def _claim_outcome(rows: list[Row], fingerprint: str) -> ClaimOutcome | None:
    """The outcome of one claim statement, or None when it must run again.

    Under READ COMMITTED the upsert sees the latest committed row (it waits for a concurrent
    writer) but the plain SELECT branch sees the statement's snapshot, taken earlier. So when
    another claim inserted or took over the row meanwhile, the statement returns no row (the
    row is newer than the snapshot) or an older, claimable version of it. The next statement
    gets a fresh snapshot that includes the winner.
    """
    if not rows:
        return None
    row = rows[0]
    rec, now = record(row[1:11]), float(row[11])
    if row[0] == "new":
        assert rec.lease_until is not None
        return New(rec.fence, rec.lease_until, now)
    if rec.status == "released" or claimable(rec, now):  # type: ignore[comparison-overlap]
        return None
    return classify(rec, fingerprint, now)


class _Listening(NamedTuple):
    """A watch connection that listens on :data:`CHANNEL`, and where it goes back to."""

    conn: Any
    home: Any


class _Listen(NamedTuple):
    """A watch connection listening on :data:`CHANNEL` (None if every one stays busy until
    ``deadline``, monotonic seconds)."""

    deadline: float


class _OnListening(NamedTuple):
    """Run ``request`` (an :class:`~oncely.backends.plans.Exec`) on the listening connection."""

    listening: _Listening
    request: Exec


class _Notified(NamedTuple):
    """True once a notification with payload ``note`` arrives, False at ``deadline``."""

    listening: _Listening
    note: str
    deadline: float


class _Unlisten(NamedTuple):
    """Give the watch connection back: kept (after ``UNLISTEN``) if ``clean``, else closed."""

    listening: _Listening
    clean: bool


class PostgresStore(PlannedStore):
    """Records in a PostgreSQL table; pooled autocommit connections, clock = the server's.

    ``min_size``/``max_size`` size the pool used for decisions (per process for the sync face,
    per event loop for the async face). Waiters in :meth:`watch` hold a connection each for the
    duration of their wait, from a separate pool of up to ``watch_max_size`` (default
    ``max_size``) connections, so waiting never starves claims. ``timeout`` bounds connecting
    and waiting for a pooled connection (seconds); TCP keepalive settings
    (:data:`oncely.backends.postgres.TCP_DEFAULTS`) notice a server the network cut off within
    about 10 s. The URL or an option overrides each
    (``?connect_timeout=10&keepalives_idle=30``). Further keyword ``options`` go to
    :func:`psycopg.connect` (libpq parameters such as ``sslmode``, ``application_name``, or
    ``prepare_threshold=None`` behind PgBouncer in transaction mode).

    The async face opens connections on the running event loop (at most ``max_size`` for
    decisions and ``watch_max_size`` for waiters per loop, kept idle for the next call) and closes
    them when the loop shuts down; :meth:`aclose` closes them earlier.
    """

    schemes = ("postgresql", "postgres")

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        conninfo(url)

    #: PostgreSQL stores at most 1 GB in one field; a bytea travels as hex text (two
    #: characters a byte) inside a message that has the same limit, so half of it, less a
    #: margin for the rest of the statement.
    max_result_bytes = (2**30 - 2**20) // 2
    max_result_source = "PostgreSQL's 1 GB limit on a field and on a message, sent as hex"

    def __init__(
        self,
        url: str,
        *,
        table: str = "oncely_records",
        create_schema: bool = False,
        min_size: int = 1,
        max_size: int = 16,
        timeout: float = 5.0,
        watch_max_size: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(url)
        self.conninfo = conninfo(url)
        self.table = validate_table(table, 48, "schema", 63)
        min_size = whole(min_size, "min_size", where="PostgresStore")
        max_size = whole(max_size, "max_size", where="PostgresStore", minimum=1)
        watch_max_size = whole(
            watch_max_size, "watch_max_size", where="PostgresStore", minimum=1, none=True
        )
        if min_size < 0 or max_size < max(1, min_size):
            raise ConfigurationError(
                f"pool sizes min_size={min_size}, max_size={max_size}: need "
                "0 <= min_size <= max_size and max_size >= 1"
            )
        timeout = seconds(timeout, "timeout", where="PostgresStore")
        self.create_schema = flag(create_schema, "create_schema", where="PostgresStore")
        self.min_size = min_size
        self.max_size = max_size
        self.watch_max_size = max_size if watch_max_size is None else watch_max_size
        self.timeout = float(timeout)
        kwargs: dict[str, Any] = {"autocommit": True, **network_defaults(self.conninfo, timeout)}
        if "application_name" not in self.conninfo:
            kwargs["application_name"] = "oncely"
        check_connect_options(
            options,
            url,
            ("table", "create_schema", "min_size", "max_size", "timeout", "watch_max_size"),
        )
        kwargs.update(options)
        kwargs["autocommit"] = True
        self._kwargs = kwargs
        # Hot statements are prepared on first use unless prepared statements are switched off.
        self._prepare: bool | None = None if options.get("prepare_threshold", 5) is None else True
        self._sql = _Statements(self.table)
        self._lock = threading.Lock()
        self._pool: ConnectionPool[SyncConn] | None = None
        self._watch_pool: ConnectionPool[SyncConn] | None = None
        self._loops = LoopLocal(
            lambda: LoopConnections(self.max_size, self.watch_max_size),
            LoopConnections.aclose,
            LoopConnections.abandon,
        )
        self._schema_ready = False
        #: How many claim statements ran again because of the READ COMMITTED snapshot race.
        self.claim_retries = 0
        after_fork(self, PostgresStore._forked)

    def _forked(self) -> None:
        """In a forked child: the parent's pools (their sockets, their worker threads) are never
        used or closed; new pools open on demand."""
        inherit(self._pool, self._watch_pool)
        self._pool = self._watch_pool = None
        self._lock = threading.Lock()

    # -- errors --------------------------------------------------------------------------------
    @property
    def _where(self) -> str:
        return redact_url(self.url)

    def _schema_missing(self) -> SchemaMissing:
        return schema_missing(self.table, self._where, self._where)

    def _schema_outdated(self) -> SchemaMissing:
        return SchemaMissing(
            f"table {self.table!r} in {self._where} was made by an older oncely: its fence "
            f"sequence or its release tombstones are missing; run `oncely init {self._where}` "
            "(it upgrades the table in place) or open the store with create_schema=True"
        )

    def _translate(self, exc: psycopg.Error) -> StoreError:
        if isinstance(exc, pg_errors.UndefinedTable):
            if "fence_seq" in str(exc):
                return self._schema_outdated()
            return self._schema_missing()
        if isinstance(exc, pg_errors.CheckViolation):
            return self._schema_outdated()
        if isinstance(exc, pg_errors.UndefinedColumn):
            return SchemaMissing(
                f"table {self.table!r} in {self._where} exists but lacks oncely's columns "
                f"({str(exc).strip()}): another program's table has this name; give oncely its "
                "own (table=..., or --table on the command line), or rename or drop that table"
            )
        if isinstance(exc, PoolTimeout):
            return self._busy()
        if isinstance(exc, psycopg.OperationalError):
            return StoreUnavailable(
                f"PostgreSQL at {self._where} failed: {exc}; check that the server is running "
                "and reachable (the operation may or may not have been applied)"
            )
        return StoreError(f"PostgreSQL error on {self._where}: {type(exc).__name__}: {exc}")

    def _busy(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"no PostgreSQL connection to {self._where} within {self.timeout:g}s: the "
            f"server is down or unreachable, or all {self.max_size} pooled connections "
            "stayed busy; check the server, or raise max_size or timeout"
        )

    def _unreachable(self, exc: psycopg.Error) -> StoreError:
        if not isinstance(exc, psycopg.OperationalError):
            return self._translate(exc)
        return StoreUnavailable(
            f"cannot connect to PostgreSQL at {self._where}: {str(exc).strip()}; check that the "
            "server is running, that host, port, user and database in the URL are right, and "
            "that this machine may connect"
        )

    # -- sync plumbing -------------------------------------------------------------------------
    def _main_pool(self) -> ConnectionPool[SyncConn]:
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                # Connect once first: a wrong URL or a dead server fails now, with libpq's reason,
                # instead of a pool that retries in the background until its timeout.
                try:
                    with psycopg.connect(self.conninfo, **self._kwargs) as conn:
                        if self.create_schema and not self._schema_ready:
                            self._init_schema_on(conn)
                except psycopg.Error as exc:
                    raise self._unreachable(exc) from exc
                pool = ConnectionPool(
                    self.conninfo,
                    kwargs=self._kwargs,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    timeout=self.timeout,
                    open=False,
                    name=f"oncely-{self.table}",
                )
                pool.open(wait=False)
                self._pool = pool
            return self._pool

    def _sync_watch_pool(self) -> ConnectionPool[SyncConn]:
        pool = self._watch_pool
        if pool is not None:
            return pool
        self._main_pool()  # fails fast (and explains why) if the server cannot be reached
        with self._lock:
            if self._watch_pool is None:
                pool = ConnectionPool(
                    self.conninfo,
                    kwargs=self._kwargs,
                    min_size=0,
                    max_size=self.watch_max_size,
                    timeout=self.timeout,
                    open=False,
                    name=f"oncely-{self.table}-watch",
                )
                pool.open(wait=False)
                self._watch_pool = pool
            return self._watch_pool

    def _run(self, query: bytes, params: Params, prepare: bool | None = None) -> Rows:
        pool = self._pool or self._main_pool()
        try:
            with pool.connection() as conn:
                return conn.execute(query, params, prepare=prepare).fetchall()
        except psycopg.Error as exc:
            raise self._translate(exc) from exc

    def _init_schema_on(self, conn: SyncConn) -> None:
        with conn.transaction():
            conn.execute(LOCK, {"lock": schema_lock_id(self.table)}, prepare=False)
            conn.execute(self._sql.ddl, prepare=False)
        self._schema_ready = True

    # -- schema --------------------------------------------------------------------------------
    def schema_sql(self) -> str:
        """The DDL :meth:`init_schema` runs, for review or for a migration tool."""
        return self._sql.ddl.decode()

    def init_schema(self) -> None:
        """Create the table and its expiry index if missing; safe to run concurrently."""
        pool = self._main_pool()
        try:
            with pool.connection() as conn:
                self._init_schema_on(conn)
        except psycopg.Error as exc:
            raise self._translate(exc) from exc

    def check_schema(self) -> None:
        table, sequence, check = self._run(self._sql.check, {})[0]
        if not table:
            raise self._schema_missing()
        if not (sequence and check):
            raise self._schema_outdated()

    def close(self) -> None:
        """Close the sync pools, and the async pools of event loops that are not running.

        The store stays usable: the next call opens new pools.
        """
        with self._lock:
            pools = [self._pool, self._watch_pool]
            self._pool = self._watch_pool = None
        for pool in pools:
            if pool is not None:
                pool.close()
        self._loops.close_idle()

    # -- every operation, once: a plan of statements (oncely.backends.plans) -------------------
    def _claim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> Plan[ClaimOutcome]:
        params = _claim_params(self.table, key, fingerprint, lease, ttl)
        for _ in range(_CLAIM_ATTEMPTS):
            outcome = _claim_outcome(
                (yield Exec(self._sql.claim, params, self._prepare)), fingerprint
            )
            if outcome is not None:
                return outcome
            self.claim_retries += 1
        raise StoreError(self._no_decision(key))

    def _complete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> Plan[None]:
        params = _complete_params(self.table, key, fence, result, codec, ttl)
        check_lease(len((yield Exec(self._sql.complete, params, self._prepare))), key, fence)

    def _release(self, key: RecordKey, fence: int) -> Plan[None]:
        params = _release_params(self.table, key, fence)
        check_lease(len((yield Exec(self._sql.release, params, self._prepare))), key, fence)

    def _renew(self, key: RecordKey, fence: int, lease: float) -> Plan[float]:
        rows = yield Exec(self._sql.renew, renew_params(key, fence, lease), self._prepare)
        check_lease(len(rows), key, fence)
        return float(rows[0][0])

    def _get(self, key: RecordKey) -> Plan[Record | None]:
        rows = yield Exec(self._sql.get, key_params(key), self._prepare)
        return record(rows[0]) if rows else None

    def _delete(self, key: RecordKey, running: bool) -> Plan[bool]:
        params = {**key_params(key), "note": _note(self.table, key), "running": running}
        return any(row[1] for row in (yield Exec(self._sql.delete, params)))

    def _purge_expired(self, limit: int) -> Plan[int]:
        return int((yield Exec(self._sql.purge, {"limit": max(0, int(limit))}))[0][0])

    def _list(self, scope: str | None, limit: int) -> Plan[Records]:
        query = self._sql.list_all if scope is None else self._sql.list_scope
        return [record(row) for row in (yield Exec(query, list_params(scope, limit)))]

    def _now(self) -> Plan[float]:
        return float((yield Exec(_NOW_QUERY, {}, self._prepare))[0][0])

    def _watch(self, key: RecordKey, fence: int, timeout: float) -> Plan[bool]:
        deadline = time.monotonic() + max(0.0, timeout)
        listening = yield _Listen(deadline)
        if listening is None:
            # Every watch connection is busy: answer from one look at the record.
            return changed((yield Exec(self._sql.state, key_params(key))), fence)
        clean = False
        try:
            # Read after LISTEN: a completion that landed before it is seen here, one that lands
            # after it is delivered as a notification.
            state = Exec(self._sql.state, key_params(key), self._prepare)
            seen = changed((yield _OnListening(listening, state)), fence)
            if not seen:
                seen = yield _Notified(listening, _note(self.table, key), deadline)
            clean = True
            return seen
        finally:
            yield _Unlisten(listening, clean)

    # -- the two executors -----------------------------------------------------------------------
    def _execute(self, request: Any) -> Any:
        if type(request) is Exec:
            return self._run(request.statement, request.params, request.prepare)
        try:
            return self._listen_step(request)
        except psycopg.Error as exc:
            raise self._translate(exc) from exc

    def _listen_step(self, request: Any) -> Any:
        kind = type(request)
        if kind is _Listen:
            pool = self._sync_watch_pool()
            try:
                conn = pool.getconn(timeout=max(0.001, request.deadline - time.monotonic()))
            except PoolTimeout:
                return None
            try:
                conn.execute(LISTEN, prepare=False)
            except BaseException:
                conn.close()  # the pool replaces a closed connection
                pool.putconn(conn)
                raise
            return _Listening(conn, pool)
        conn = request.listening.conn
        if kind is _OnListening:
            query = request.request
            return conn.execute(query.statement, query.params, prepare=query.prepare).fetchall()
        if kind is _Notified:
            wait = max(0.0, request.deadline - time.monotonic())
            with contextlib.closing(conn.notifies(timeout=wait)) as notes:
                return any(n.payload == request.note for n in notes)
        clean = False
        try:
            if request.clean:
                conn.execute(UNLISTEN, prepare=False)
                for _ in conn.notifies(timeout=0):  # drop what arrived before UNLISTEN
                    pass
                clean = True
        finally:
            if not clean:
                conn.close()  # the pool replaces a closed connection
            request.listening.home.putconn(conn)
        return None

    async def _aexecute(self, request: Any) -> Any:
        if type(request) is Exec:
            return await self._arun(request.statement, request.params, request.prepare)
        try:
            with keep_cancel():  # asyncio.wait_for can drop a cancel (Python 3.11)
                return await self._alisten_step(request)
        except psycopg.Error as exc:
            raise self._translate(exc) from exc

    async def _alisten_step(self, request: Any) -> Any:
        kind = type(request)
        if kind is _Listen:
            slot = self._loops.get()
            wait = max(0.001, request.deadline - time.monotonic())
            conn = await slot.take(slot.watch, wait, self._aopen)
            if conn is None:
                return None
            try:
                await conn.execute(LISTEN, prepare=False)
            except BaseException:
                conn.pgconn.finish()
                slot.give(slot.watch, conn)
                raise
            return _Listening(conn, slot)
        conn = request.listening.conn
        if kind is _OnListening:
            query = request.request
            cur = await conn.execute(query.statement, query.params, prepare=query.prepare)
            return await cur.fetchall()
        if kind is _Notified:
            notes = conn.notifies(timeout=max(0.0, request.deadline - time.monotonic()))
            async with contextlib.aclosing(notes):
                async for n in notes:
                    if n.payload == request.note:
                        return True
            return False
        clean = False
        try:
            if request.clean:
                await conn.execute(UNLISTEN, prepare=False)
                async for _ in conn.notifies(timeout=0):  # drop what arrived before UNLISTEN
                    pass
                clean = True
        finally:
            # On cancellation or error the connection may still be listening or mid-query:
            # close it rather than keep it.
            if not clean and not conn.closed:
                conn.pgconn.finish()
            slot = request.listening.home
            slot.give(slot.watch, conn)
        return None

    # -- async plumbing ------------------------------------------------------------------------
    async def _aopen(self, slot: LoopConnections) -> AsyncConn:
        try:
            conn = await psycopg.AsyncConnection.connect(self.conninfo, **self._kwargs)
        except psycopg.Error as exc:
            raise self._unreachable(exc) from exc
        slot.conns.add(conn)
        if self.create_schema and not self._schema_ready:
            try:
                await self._ainit_schema_on(conn)
            except psycopg.Error as exc:
                await conn.close()
                raise self._translate(exc) from exc
        return conn

    @contextlib.asynccontextmanager
    async def _aconnection(self) -> AsyncIterator[AsyncConn]:
        """A connection for one decision on the running loop."""
        slot = self._loops.get()
        conn = await slot.take(slot.main, self.timeout, self._aopen)
        if conn is None:
            raise self._busy()
        try:
            yield conn
        finally:
            slot.give(slot.main, conn)

    async def _arun(self, query: bytes, params: Params, prepare: bool | None = None) -> Rows:
        try:
            with keep_cancel():  # asyncio.wait_for can drop a cancel (Python 3.11)
                async with self._aconnection() as conn:
                    cur = await conn.execute(query, params, prepare=prepare)
                    return await cur.fetchall()
        except psycopg.Error as exc:
            raise self._translate(exc) from exc

    async def _ainit_schema_on(self, conn: AsyncConn) -> None:
        async with conn.transaction():
            await conn.execute(LOCK, {"lock": schema_lock_id(self.table)}, prepare=False)
            await conn.execute(self._sql.ddl, prepare=False)
        self._schema_ready = True

    async def ainit_schema(self) -> None:
        """Async :meth:`init_schema`."""
        try:
            async with self._aconnection() as conn:
                await self._ainit_schema_on(conn)
        except psycopg.Error as exc:
            raise self._translate(exc) from exc

    async def aclose(self) -> None:
        await self._loops.aclose()

    def _no_decision(self, key: RecordKey) -> str:
        return (
            f"claim on {key} in {self._where} lost the race against concurrent claims "
            f"{_CLAIM_ATTEMPTS} times in a row; retry the call"
        )
