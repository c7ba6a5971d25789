"""The branch barrier: a TCC or saga branch call that is safe to repeat, reorder and cancel.

DTM's sub-transaction barrier and Seata's TCC fence (DESIGN.md, "Compensation"). Call
:func:`barrier` *inside the business transaction*, on the same connection, before the business
writes; it answers one :class:`Verdict`:

==========================  ================================================================
verdict                     meaning, and what to do
==========================  ================================================================
``EXECUTE``                 first call of this (gid, branch, op): run the business writes
``DUPLICATE``               this op already ran (or is running and committed meanwhile): skip
``EMPTY_COMPENSATION``      a ``cancel``/``compensate`` that arrived before its ``try``/
                            ``action``: succeed without doing anything, and the late try is
                            now blocked
``HANGING``                 a ``try``/``action`` after its cancel: skip it (it would hang
                            resources nobody releases)
==========================  ================================================================

Only ``EXECUTE`` runs the business writes (``verdict.run``); every other verdict is a success
that does nothing. The rule, in rows of one table keyed (gid, branch, op), each written with
``INSERT ... ON CONFLICT DO NOTHING`` (``INSERT IGNORE`` on MariaDB/MySQL):

1. insert the row of the current op; if it was already there: DUPLICATE, or HANGING when the
   row is a ``try``/``action`` row that a compensation wrote;
2. for ``cancel``/``compensate``, insert the row of the original op (``try``/``action``),
   marked as written by the compensation; if it was new, the original never ran:
   EMPTY_COMPENSATION (and the late original now finds its row: HANGING);
3. otherwise EXECUTE.

The barrier only inserts (and reads a row its insert found): it never reads a missing row
with ``SELECT ... FOR UPDATE``, the gap lock that makes two transactions deadlock on MariaDB/MySQL
at REPEATABLE READ when each then inserts into the other's gap (the usual cause of Seata's
fence deadlock). Try and cancel of one branch at once wait on one row, the ``try`` row, and
the test suite runs them from two processes on MariaDB at REPEATABLE READ. Because the rows
commit or roll back with the business writes, a crash leaves both or neither.

Cleanup (:func:`purge`, ``oncely barrier purge URL``) removes every row of a gid, whatever its
status, once the gid's *newest* row is older than the horizon: a late call of a global
transaction that is still within the horizon always finds every row of it.

:func:`redis_barrier` is the same rule in one Lua script, for effects kept in Redis: pass the
effect as Redis commands and the script applies them only on ``EXECUTE``, atomically with the
verdict; the gid's rows expire ``horizon`` seconds after its newest row (the store's clock).
Effects that fail half way mark the branch broken in the same script
(:class:`~oncely.errors.BarrierEffectsPartial`): a retry never applies them twice.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sequence
from typing import Any, Final

from oncely.backends.lua import Script, aevalsha, evalsha
from oncely.backends.plans import Exec, Plan
from oncely.core.text import sendable, stored_text, utf8
from oncely.errors import (
    BarrierEffectsPartial,
    BarrierTableMissing,
    ConfigurationError,
    InvalidBarrierCall,
)
from oncely.settings import MAX_COUNT, seconds, text
from oncely.sql.connections import (
    Enter,
    Leave,
    SqlConnection,
    adapt,
    busy,
    exact_text,
    first_use_guarded,
    missing_object,
    roll_back,
)
from oncely.sql.connections import arun as sql_arun
from oncely.sql.connections import run as sql_run

__all__ = [
    "DEFAULT_HORIZON",
    "DEFAULT_TABLE",
    "EFFECT_COMMANDS",
    "OPS",
    "Verdict",
    "abarrier",
    "acreate_table",
    "apurge",
    "aredis_barrier",
    "barrier",
    "create_table",
    "purge",
    "redis_barrier",
]

DEFAULT_TABLE: Final = "oncely_barrier"
#: Seconds a gid's rows are kept after its newest row (purge horizon, Redis expiry): 7 days.
DEFAULT_HORIZON: Final = 7 * 24 * 3600.0
#: op -> the original op it compensates (None: not a compensation). TCC: try/confirm/cancel;
#: saga: action/compensate.
OPS: Final[dict[str, str | None]] = {
    "try": None,
    "confirm": None,
    "cancel": "try",
    "action": None,
    "compensate": "action",
}
_ORIGINALS: Final = frozenset(v for v in OPS.values() if v)
MAX_ID: Final = 128


class Verdict(enum.Enum):
    """The barrier's answer; only :attr:`EXECUTE` runs the business writes (:attr:`run`)."""

    EXECUTE = "EXECUTE"
    DUPLICATE = "DUPLICATE"
    EMPTY_COMPENSATION = "EMPTY_COMPENSATION"
    HANGING = "HANGING"

    @property
    def run(self) -> bool:
        """True only for EXECUTE: the business writes must run."""
        return self is Verdict.EXECUTE


def check_call(gid: object, branch: object, op: object) -> tuple[str, str, str]:
    """Validate a barrier call. Raises :class:`~oncely.errors.InvalidBarrierCall`."""
    for what, value in (("gid", gid), ("branch", branch)):
        if not isinstance(value, str) or not value or len(value) > MAX_ID:
            raise InvalidBarrierCall(
                f"barrier {what} must be a non-empty str of at most {MAX_ID} characters, "
                f"got {value!r}: pass the global transaction id and the branch id the "
                "coordinator sent"
            )
        stored_text(value, f"barrier {what}", InvalidBarrierCall)
    if not isinstance(op, str) or op not in OPS:
        raise InvalidBarrierCall(f"barrier op must be one of {sorted(OPS)}, got {op!r}")
    assert isinstance(gid, str) and isinstance(branch, str) and isinstance(op, str)
    return gid, branch, op


# -- SQL ----------------------------------------------------------------------------------------
_NOW: Final = {
    "postgresql": "extract(epoch from clock_timestamp())",
    "mysql": "UNIX_TIMESTAMP(NOW(6))",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}


def _insert(conn: SqlConnection, table: str) -> str:
    cols = f"{table} (gid, branch, op, reason, created_at)"
    vals = f"VALUES (:gid, :branch, :op, :reason, {_NOW[conn.dialect]})"
    if conn.dialect == "mysql":
        return f"INSERT IGNORE INTO {cols} {vals}"
    return f"INSERT INTO {cols} {vals} ON CONFLICT DO NOTHING"


def _select_reason(conn: SqlConnection, table: str) -> str:
    sql = f"SELECT reason FROM {table} WHERE gid = :gid AND branch = :branch AND op = :op"
    # The row was just found by the INSERT (a locking read); read it the same way so a
    # REPEATABLE READ snapshot taken earlier in the caller's transaction cannot hide it.
    return sql + " LOCK IN SHARE MODE" if conn.dialect == "mysql" else sql


def decide(conn: SqlConnection, table: str, gid: str, branch: str, op: str) -> Plan[Verdict]:
    """The barrier as a sans-IO plan of :class:`~oncely.backends.plans.Exec` requests (see the
    module docstring for the rule). Driver errors propagate, a missing table as
    :class:`~oncely.errors.BarrierTableMissing`."""
    insert = _insert(conn, table)
    try:
        res = yield Exec(insert, {"gid": gid, "branch": branch, "op": op, "reason": op})
        if res.rowcount == 0:
            if op in _ORIGINALS:
                found = yield Exec(
                    _select_reason(conn, table), {"gid": gid, "branch": branch, "op": op}
                )
                if found.rows and found.rows[0][0] != op:
                    return Verdict.HANGING
            return Verdict.DUPLICATE
        origin = OPS[op]
        if origin is not None:
            res = yield Exec(insert, {"gid": gid, "branch": branch, "op": origin, "reason": op})
            if res.rowcount != 0:
                return Verdict.EMPTY_COMPENSATION
        return Verdict.EXECUTE
    except Exception as exc:
        typed = busy(exc, f"barrier({gid!r}, {branch!r}, {op!r})")
        if typed is not exc:
            raise typed from exc
        if missing_object(exc) is not None:
            raise BarrierTableMissing(
                f"the barrier table {table} does not exist in this database: create it with "
                f"`oncely barrier init URL --table {table}` or "
                "oncely.statemachine.barrier.create_table(conn)"
            ) from exc
        raise


def _table(conn: SqlConnection, table: str) -> str:
    return conn.quote(table)


def barrier(conn: Any, gid: str, branch: str, op: str, *, table: str = DEFAULT_TABLE) -> Verdict:
    """Decide a branch call inside the caller's open business transaction on ``conn``.

    :param conn: what the business writes go through: a DB-API connection (sqlite3, psycopg,
        PyMySQL), a SQLAlchemy ``Connection``/``Session`` or ``django.db.connection`` (see
        :func:`oncely.sql.connections.adapt`). The barrier rows commit or roll back with the
        caller's transaction; nothing is committed here.
    :param gid: the global transaction id (at most 128 characters).
    :param branch: the branch id within it (at most 128 characters).
    :param op: ``try``, ``confirm``, ``cancel`` (TCC) or ``action``, ``compensate`` (saga).
    :returns: a :class:`Verdict`; run the business writes only if ``verdict.run``.
    :raises InvalidBarrierCall: missing gid or branch, unknown op.
    :raises BarrierTableMissing: the table does not exist (create it with
        :func:`create_table`). On PostgreSQL the connection's first call per table runs in a
        savepoint (:func:`oncely.sql.connections.first_use_guarded`): the business
        transaction keeps its earlier writes and the message says so; after a call that
        worked, a table dropped since aborts the transaction, and the message says to roll it
        back.
    :raises ConfigurationError: ``conn`` is in autocommit mode with no transaction open (the
        barrier row would commit alone, before the business writes; the one check of
        :meth:`oncely.sql.connections.SqlConnection.require_transaction`, as ``Inbox.accept``).
    :raises DatabaseBusy: deadlock, serialization failure, lock wait ran out or SQLite
        "database is locked": roll the business transaction back and run it again.
    """
    gid, branch, op = check_call(gid, branch, op)
    c = adapt(conn)
    c.require_transaction("barrier()")
    plan = first_use_guarded(c, ("barrier", table), decide(c, _table(c, table), gid, branch, op))
    verdict: Verdict = sql_run(plan, c)
    return verdict


async def abarrier(
    conn: Any, gid: str, branch: str, op: str, *, table: str = DEFAULT_TABLE
) -> Verdict:
    """The async face of :func:`barrier` (psycopg ``AsyncConnection``, aiomysql, SQLAlchemy
    ``AsyncConnection``/``AsyncSession``)."""
    gid, branch, op = check_call(gid, branch, op)
    c = adapt(conn)
    c.require_transaction("abarrier()")
    plan = first_use_guarded(c, ("barrier", table), decide(c, _table(c, table), gid, branch, op))
    verdict: Verdict = await sql_arun(plan, c)
    return verdict


def _ddl(conn: SqlConnection, table: str) -> list[str]:
    ts = "DOUBLE PRECISION" if conn.dialect == "postgresql" else "DOUBLE"
    if conn.dialect == "sqlite":
        ts = "REAL"
    suffix = " ENGINE=InnoDB" if conn.dialect == "mysql" else ""
    name = conn.quote(table)
    index = conn.quote(f"{table.split('.')[-1]}_created")
    create_index = (
        f"CREATE INDEX {index} ON {name} (created_at)"
        if conn.dialect == "mysql"
        else f"CREATE INDEX IF NOT EXISTS {index} ON {name} (created_at)"
    )
    ident = exact_text(conn.dialect, MAX_ID)  # 'G1', 'g1' and 'g1 ' are three gids
    return [
        f"CREATE TABLE IF NOT EXISTS {name} ("
        f"gid {ident} NOT NULL, branch {ident} NOT NULL, op VARCHAR(16) NOT NULL, "
        f"reason VARCHAR(16) NOT NULL, created_at {ts} NOT NULL, "
        f"PRIMARY KEY (gid, branch, op)){suffix}",
        create_index,
    ]


def _create_plan(conn: SqlConnection, table: str) -> Plan[None]:
    block = yield Enter(savepoint=True)
    try:
        statements = _ddl(conn, table)
        yield Exec(statements[0], {})
        try:
            yield Exec(statements[1], {})
        except Exception as exc:  # MySQL has no CREATE INDEX IF NOT EXISTS: 1061 = exists
            if "1061" not in str(exc) and "Duplicate key name" not in str(exc):
                raise
    except BaseException as exc:
        yield from roll_back(block, exc)
        raise
    yield Leave(block, True)


def create_table(conn: Any, table: str = DEFAULT_TABLE) -> None:
    """Create the barrier table (and its ``created_at`` index) if missing, in the business
    database ``conn`` points at; commits when no transaction was open. Idempotent."""
    c = adapt(conn)
    sql_run(_create_plan(c, table), c)


async def acreate_table(conn: Any, table: str = DEFAULT_TABLE) -> None:
    """The async face of :func:`create_table`."""
    c = adapt(conn)
    await sql_arun(_create_plan(c, table), c)


def _purge_sql(conn: SqlConnection, table: str) -> str:
    now = _NOW[conn.dialect]
    old = (
        f"SELECT gid FROM {table} GROUP BY gid HAVING MAX(created_at) < {now} - :older_than "
        "LIMIT :batch"
    )
    if conn.dialect == "mysql":
        # MySQL refuses a subquery on the table being deleted from, but not a derived table.
        return f"DELETE b FROM {table} b JOIN ({old}) o ON b.gid = o.gid"
    return f"DELETE FROM {table} WHERE gid IN ({old})"


def _seconds(value: Any, name: str, minimum: float) -> float:
    """A duration argument by the settings rule (:func:`oncely.settings.seconds`: seconds, or a
    text with a unit such as ``"7d"``), at least ``minimum``.

    :raises InvalidBarrierCall: not such a duration (the message names the argument).
    """
    try:
        return float(seconds(value, name, where="barrier", minimum=minimum, above=False))
    except ConfigurationError as exc:
        raise InvalidBarrierCall(str(exc)) from None


def _purge_plan(conn: SqlConnection, table: str, older_than: float, batch: int) -> Plan[int]:
    older_than = _seconds(older_than, "older_than", 0.0)
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_COUNT:
        raise InvalidBarrierCall(
            f"purge batch={batch!r}: give an int from 1 to {MAX_COUNT} (gids per statement)"
        )
    sql = _purge_sql(conn, _table(conn, table))
    removed = 0
    while True:
        block = yield Enter(savepoint=True)
        try:
            res = yield Exec(sql, {"older_than": float(older_than), "batch": batch})
        except BaseException as exc:
            yield from roll_back(block, exc)
            if missing_object(exc) is not None:
                raise BarrierTableMissing(
                    f"the barrier table {table} does not exist: nothing to purge (create it "
                    f"with `oncely barrier init URL --table {table}`)"
                ) from exc
            raise
        yield Leave(block, True)
        removed += max(int(res.rowcount), 0)
        if res.rowcount <= 0:
            return removed


def purge(
    conn: Any, older_than: float = DEFAULT_HORIZON, *, table: str = DEFAULT_TABLE, batch: int = 500
) -> int:
    """Remove every barrier row of each gid whose newest row is older than ``older_than``
    seconds (the database's clock), whatever the rows' ops: the safe horizon. Runs in batches
    of ``batch`` gids, each committed on its own (a savepoint when ``conn`` is already in a
    transaction). Returns the number of rows removed.

    ``older_than`` must exceed the longest time a branch call can still arrive after its global
    transaction's last barrier row (the coordinator's retry window); within it, every row a
    late call needs stays.

    :raises BarrierTableMissing: the table does not exist.
    :raises InvalidBarrierCall: a negative ``older_than``, or a ``batch`` that is not an int
        from 1 to :data:`oncely.settings.MAX_COUNT`.
    """
    c = adapt(conn)
    removed: int = sql_run(
        _purge_plan(c, table, older_than, batch), c, what=f"barrier purge of {table}"
    )
    return removed


async def apurge(
    conn: Any, older_than: float = DEFAULT_HORIZON, *, table: str = DEFAULT_TABLE, batch: int = 500
) -> int:
    """The async face of :func:`purge`."""
    c = adapt(conn)
    removed: int = await sql_arun(
        _purge_plan(c, table, older_than, batch), c, what=f"barrier purge of {table}"
    )
    return removed


# -- Redis --------------------------------------------------------------------------------------
_BARRIER = Script("oncely.statemachine", "barrier")


#: The commands an effect may be: data commands that write the keys they name, by where their
#: keys are: "first" (the first argument), "two" (the first two), "all" (every argument),
#: "pairs" (every other argument from the first: MSET). Anything else (FLUSHALL, FLUSHDB,
#: CONFIG, SHUTDOWN, SCRIPT, EVAL, FUNCTION, SELECT, MOVE, COPY, reads...) is refused.
# fmt: off
_FIRST_KEY: Final = (
    "SET", "SETNX", "SETEX", "PSETEX", "GETSET", "GETDEL", "GETEX", "APPEND", "SETRANGE",
    "INCR", "INCRBY", "INCRBYFLOAT", "DECR", "DECRBY", "SETBIT",
    "HSET", "HSETNX", "HMSET", "HDEL", "HINCRBY", "HINCRBYFLOAT",
    "SADD", "SREM", "SPOP",
    "ZADD", "ZREM", "ZINCRBY", "ZREMRANGEBYSCORE", "ZREMRANGEBYRANK", "ZREMRANGEBYLEX",
    "LPUSH", "RPUSH", "LPUSHX", "RPUSHX", "LPOP", "RPOP", "LREM", "LSET", "LTRIM", "LINSERT",
    "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST",
    "PFADD", "XADD", "XDEL", "XTRIM", "GEOADD",
)
# fmt: on
EFFECT_COMMANDS: Final[dict[str, str]] = {
    **dict.fromkeys(_FIRST_KEY, "first"),
    **dict.fromkeys(("RENAME", "RENAMENX", "SMOVE", "LMOVE", "RPOPLPUSH"), "two"),
    **dict.fromkeys(("DEL", "UNLINK"), "all"),
    **dict.fromkeys(("MSET", "MSETNX"), "pairs"),
}


def _keys(args: list[str]) -> list[str]:
    where = EFFECT_COMMANDS[args[0].upper()]
    rest = args[1:]
    if where == "first":
        return rest[:1]
    if where == "two":
        return rest[:2]
    if where == "pairs":
        return rest[::2]
    return rest


def _commands(effects: Any, key: str, gid: str, cluster: bool) -> list[list[str]]:
    """``effects`` as a list of Redis commands of str arguments, or
    :class:`~oncely.errors.InvalidBarrierCall` (checked before anything is sent): each a data
    command of :data:`EFFECT_COMMANDS` with its keys, none of them the barrier's own hash
    ``key`` nor any other gid's barrier hash (``<prefix>:{<gid>}``, the shape of ``key``), and
    on a cluster (``cluster``) every key in ``key``'s hash slot."""
    rows = key[: key.rindex(":{") + 2]  # "<prefix>:{": every gid's barrier hash starts so
    how = (
        "effects must be a list of Redis commands, each a list of str/int/float arguments: "
        '[("HINCRBY", "stock", "sku-1", -2)]'
    )
    if isinstance(effects, (str, bytes)) or not isinstance(effects, Sequence):
        raise InvalidBarrierCall(f"{how}, got {effects!r}")
    out = []
    for command in effects:
        if isinstance(command, (str, bytes)) or not isinstance(command, Sequence) or not command:
            raise InvalidBarrierCall(f"{how}; {command!r} is not a command")
        args = []
        for a in command:
            if isinstance(a, bool) or not isinstance(a, (str, int, float)):
                raise InvalidBarrierCall(f"{how}; argument {a!r} of {command!r} is neither")
            if isinstance(a, float) and not math.isfinite(a):
                raise InvalidBarrierCall(f"{how}; argument {a!r} of {command!r} is not finite")
            sendable(a, f"effect {command!r}: an argument", InvalidBarrierCall)
            args.append(a if isinstance(a, str) else str(a))
        name = args[0].upper()
        if name not in EFFECT_COMMANDS:
            raise InvalidBarrierCall(
                f"effect {command!r}: {args[0]!r} is not a data command the barrier runs; an "
                "effect writes the keys it names, one of "
                f"{', '.join(sorted(EFFECT_COMMANDS))} (server, admin, script and keyless "
                "commands such as FLUSHALL, CONFIG or EVAL are refused)"
            )
        keys = _keys(args)
        wanted = {"first": 1, "two": 2}.get(EFFECT_COMMANDS[name], 1)
        if len(keys) < wanted or (EFFECT_COMMANDS[name] == "pairs" and len(args) % 2 == 0):
            raise InvalidBarrierCall(f"effect {command!r}: {name} without its key(s)")
        for k in keys:
            if k == key or (k.startswith(rows) and k.endswith("}")):
                raise InvalidBarrierCall(
                    f"effect {command!r} writes the barrier hash {k!r}: an effect writes "
                    "business keys, never a barrier's rows (this gid's or another's: deleting "
                    "another gid's rows would let its branches run again)"
                )
            if cluster and _slot(k) != _slot(key):
                raise InvalidBarrierCall(
                    f"effect {command!r}: key {k!r} is not in the gid's hash slot (the script "
                    f"runs on the node of {key!r}): put the gid in braces in its name, e.g. "
                    f"'stock:{{{gid}}}'"
                )
        out.append(args)
    return out


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(utf8(key, "effect key", InvalidBarrierCall)))


def _cluster(client: Any) -> bool:
    """True for a Redis Cluster client (sync or asyncio): effects must stay in the gid's slot."""
    try:
        from redis.asyncio.cluster import RedisCluster as AsyncCluster
        from redis.cluster import RedisCluster
    except ImportError:  # pragma: no cover - redis is what calls this
        return False
    return isinstance(client, (RedisCluster, AsyncCluster))


def _redis_args(
    prefix: str,
    gid: str,
    branch: str,
    op: str,
    horizon: float,
    effects: Sequence[Sequence[Any]],
    cluster: bool,
) -> tuple[Any, ...]:
    gid, branch, op = check_call(gid, branch, op)
    prefix = text(prefix, "prefix", where="barrier")
    horizon = _seconds(horizon, "horizon", 0.001)
    key = f"{prefix}:{{{gid}}}"
    encoded = json.dumps(_commands(effects, key, gid, cluster))
    return (key, branch, op, OPS[op] or "", int(horizon * 1000), encoded)


def _verdict(reply: Any, key: str, gid: str, branch: str) -> Verdict:
    """The script's reply as a :class:`Verdict`; a branch marked broken (its effects applied
    in part) raises :class:`~oncely.errors.BarrierEffectsPartial`."""
    if isinstance(reply, (list, tuple)):
        raw = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        info = json.loads(raw)
        commands = info["effects"] if isinstance(info.get("effects"), list) else []
        n = int(info["applied"])
        applied, failed = commands[:n], (commands[n] if n < len(commands) else [])
        field = f"!partial:{branch}"
        raise BarrierEffectsPartial(
            f"redis_barrier({gid!r}, {branch!r}, {info['op']!r}): effect {n + 1} {failed!r} "
            f"failed ({info['error']}) after {applied!r} were applied; Redis does not roll a "
            "script back, so the branch is marked broken and no call on it (retry, "
            "compensation, confirm) runs anything until an operator repairs the data and "
            f"clears the mark: HDEL {key} {field}",
            key=key,
            field=field,
            op=str(info["op"]),
            applied=applied,
            failed=failed,
            error=str(info["error"]),
        )
    return Verdict(reply.decode() if isinstance(reply, bytes) else reply)


def redis_barrier(
    client: Any,
    gid: str,
    branch: str,
    op: str,
    *,
    effects: Sequence[Sequence[Any]] = (),
    prefix: str = "oncely:barrier",
    horizon: float = DEFAULT_HORIZON,
) -> Verdict:
    """The barrier on Redis, one Lua script: the same rule and verdicts as :func:`barrier`.

    :param client: a :class:`redis.Redis`.
    :param effects: Redis commands (``[("HINCRBY", "stock", "sku-1", "-2")]``) run by the same
        script only when the verdict is EXECUTE, so the verdict and the effect are one atomic
        step. Without them, an EXECUTE followed by a crash before your own effect leaves the
        branch marked done: pass the effect here when it lives in Redis. Each effect is a
        data command of :data:`EFFECT_COMMANDS` with its keys (FLUSHALL, CONFIG, EVAL and
        other server, script or keyless commands are refused), none of them the barrier's own
        hash; on a Redis Cluster client every key must hash to the gid's slot (put ``{gid}``
        in their names). The effects run before the branch's row is written: if the *first*
        command fails (``WRONGTYPE``), nothing was applied and the error propagates, the
        branch left to run again. If a *later* one fails, the ones before it stay applied
        (Redis does not roll a script back): the same script marks the branch broken and
        :class:`~oncely.errors.BarrierEffectsPartial` names what was applied; every later
        call on the branch raises it again, never re-applying anything, until an operator
        repairs the data and clears the mark (``HDEL``, named in the error). Put the command
        that may fail first.
    :param horizon: seconds the gid's rows live after its newest row (store clock, ``PEXPIRE``).
    :raises InvalidBarrierCall: missing gid or branch, unknown op, bad horizon, an effect that
        is not an allowed data command, or (cluster) a key outside the gid's slot.
    :raises BarrierEffectsPartial: the branch's effects were applied in part (now or before).
    :raises redis.ResponseError: the first effect failed; nothing was applied or recorded.
    """
    key, *args = _redis_args(prefix, gid, branch, op, horizon, effects, _cluster(client))
    reply = evalsha(client, _BARRIER, 1, key, *args)
    return _verdict(reply, key, gid, branch)


async def aredis_barrier(
    client: Any,
    gid: str,
    branch: str,
    op: str,
    *,
    effects: Sequence[Sequence[Any]] = (),
    prefix: str = "oncely:barrier",
    horizon: float = DEFAULT_HORIZON,
) -> Verdict:
    """The async face of :func:`redis_barrier`, for a :class:`redis.asyncio.Redis`."""
    key, *args = _redis_args(prefix, gid, branch, op, horizon, effects, _cluster(client))
    reply = await aevalsha(client, _BARRIER, 1, key, *args)
    return _verdict(reply, key, gid, branch)
