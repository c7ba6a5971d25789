"""Recovery points for multi-step operations (brandur, "Implementing Stripe-like idempotency
keys in Postgres": atomic phases; DESIGN.md).

An operation is a list of named phases. Each phase runs in its own database transaction and
commits its writes **together with its recovery point** (the phase's name) and the ``state``
carried to later phases. A retry with the same key resumes after the last committed phase
instead of starting again; a finished operation replays its result. A phase that calls an
outside system (a card charge) passes :attr:`PhaseContext.downstream_key` as that system's
idempotency key, so a phase re-run after a crash cannot charge twice.

::

    booking = Operation("book_ride", table="oncely_sql_keys")

    @booking.phase("ride_created")
    def create_ride(ctx):
        ctx.state["ride_id"] = insert_ride(ctx.conn, ctx.params)          # same transaction

    @booking.phase("charge_created")
    def charge(ctx):
        charge = payments.charge(amount=..., idempotency_key=ctx.downstream_key)
        ctx.state["charge_id"] = charge.id

    @booking.phase("receipt_sent")          # the last phase: its return value is the result
    def send_receipt(ctx):
        queue_receipt(ctx.conn, ctx.state["ride_id"])
        return {"ride": ctx.state["ride_id"], "charge": ctx.state["charge_id"]}

    result = booking.run(conn, key=request_key, scope=user_id, params={"from": ..., "to": ...})

The row is locked by ``locked_at`` (database clock) and a random ``locked_by`` token: a second
caller with the same key while a worker holds it gets :class:`~oncely.errors.InFlightError`
(``retry_after`` seconds); a worker whose lock timed out and was taken over cannot commit its
phase (the fence is ``locked_by``; :class:`~oncely.errors.LeaseLost`, its writes rolled back).
A phase that raises rolls back its writes and unlocks the key, so a retry resumes at once.
:meth:`Operation.complete_abandoned` (the completer) re-drives operations abandoned mid-way
(unlocked, or locked longer ago than ``lock_timeout``, brandur's 90 s) from their stored
``params``; :func:`reap` (the reaper) deletes finished records after ``retention`` seconds
(brandur: 72 h), for :func:`oncely.sql.transaction` records too.

Errors: :class:`~oncely.errors.IdempotencyKeyMismatch` (same key, other params),
:class:`~oncely.errors.ConfigurationError` (called inside an open transaction: each phase
commits; or a key that belongs to another operation), plus those of
:func:`oncely.sql.transaction`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from oncely.backends.plans import Exec, Plan
from oncely.codecs import stored_json
from oncely.core.records import RecordKey
from oncely.errors import ConfigurationError, IdempotencyKeyMismatch, InFlightError, LeaseLost
from oncely.settings import count, seconds
from oncely.sql.connections import (
    Block,
    Enter,
    Leave,
    SqlConnection,
    adapt,
    arun,
    busy,
    check_identifier,
    cleanup,
    duplicate_of,
    first_use_guarded,
    roll_back,
    run,
)
from oncely.sql.keys import record_key
from oncely.sql.schema import (
    DEFAULT_TABLE,
    FINISHED,
    digest_bytes,
    now_sql,
    schema_missing,
    text_of,
)

__all__ = ["STARTED", "Operation", "PhaseContext", "areap", "reap"]

#: The recovery point of an operation whose first phase has not committed yet.
STARTED = "started"
#: brandur's lock timeout (seconds) and reaper retention (72 h).
LOCK_TIMEOUT = 90.0
RETENTION = 72 * 3600.0


@dataclass
class PhaseContext:
    """What a phase function gets.

    ``conn``: the caller's connection (its writes commit with the phase's recovery point);
    ``params``: the operation's parameters (JSON values, stored for the completer);
    ``state``: a dict carried between phases (JSON values; committed with each phase);
    ``downstream_key``: a stable key for outside calls (hex SHA-256 of scope and key digest;
    the raw key is never stored, so the completer can rebuild only this);
    ``recovery_point``: the name of the phase running.
    """

    conn: Any
    params: Any
    state: dict[str, Any]
    downstream_key: str
    recovery_point: str = STARTED
    scope: str = field(default="", repr=False)


class _CallPhase(NamedTuple):
    number: int
    ctx: PhaseContext


def _encode(value: Any) -> bytes:
    return stored_json(
        value,
        "recovery-point params, state and results",
        why=" values",
        sort_keys=True,
        separators=(",", ":"),
    ).encode("utf-8")


def _decode(data: Any) -> Any:
    if data is None:
        return None
    return json.loads(bytes(data).decode("utf-8"))


class Operation:
    """A multi-step operation of named phases (see the module docstring).

    :param name: stored with each record; the completer picks records by it.
    :param table: the keys table (:func:`oncely.sql.create_tables`).
    :param lock_timeout: seconds after which a held lock counts as abandoned (database clock).
    """

    def __init__(
        self, name: str, *, table: str = DEFAULT_TABLE, lock_timeout: float = LOCK_TIMEOUT
    ) -> None:
        if not isinstance(name, str) or not name or len(name) > 255:
            raise ConfigurationError(
                f"Operation: name={name!r}: an Operation needs a name of 1 to 255 characters"
            )
        self.name = name
        self.table = check_identifier(table)
        self.lock_timeout = float(
            seconds(lock_timeout, "lock_timeout", where=f"Operation {name!r}")
        )
        self.phases: list[tuple[str, Callable[[PhaseContext], Any]]] = []

    def phase(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the next phase under ``name`` (its recovery point); sync or async."""
        if name in (STARTED, FINISHED) or not name or len(name) > 64:
            raise ConfigurationError(
                f"phase name {name!r}: 1 to 64 characters, not {STARTED!r} or {FINISHED!r}"
            )
        if any(n == name for n, _ in self.phases):
            raise ConfigurationError(f"{self.name} already has a phase {name!r}")

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.phases.append((name, fn))
            return fn

        return register

    # -- statements ----------------------------------------------------------------------------
    def _sql(self, c: SqlConnection) -> dict[str, str]:
        t = c.quote(self.table)
        now = now_sql(c.dialect)
        key = "scope = :scope AND digest = :digest"
        stale = f"(locked_at IS NULL OR locked_at < {now} - :timeout)"
        insert = (
            f"INSERT INTO {t} (scope, digest, recovery_point, operation, params, result, "
            "locked_at, locked_by, created_at, updated_at) VALUES (:scope, :digest, "
            f"'{STARTED}', :operation, :params, :state, {now}, :token, {now}, {now})"
        )
        if c.dialect != "mysql":
            insert += " ON CONFLICT (scope, digest) DO NOTHING"
        return {
            "insert": insert,
            "take": (
                f"UPDATE {t} SET locked_at = {now}, locked_by = :token WHERE {key} "
                f"AND operation = :operation AND recovery_point <> '{FINISHED}' AND {stale}"
            ),
            "read": (
                f"SELECT recovery_point, operation, params, result, locked_at, {now} "
                f"FROM {t} WHERE {key}"
            ),
            "advance": (
                f"UPDATE {t} SET recovery_point = :point, result = :state, updated_at = {now}, "
                f"locked_at = {now} WHERE {key} AND locked_by = :token AND recovery_point = :prev"
            ),
            "finish": (
                f"UPDATE {t} SET recovery_point = '{FINISHED}', result = :state, "
                f"updated_at = {now}, locked_at = NULL, locked_by = NULL "
                f"WHERE {key} AND locked_by = :token AND recovery_point = :prev"
            ),
            "unlock": (
                f"UPDATE {t} SET locked_at = NULL, locked_by = NULL "
                f"WHERE {key} AND locked_by = :token"
            ),
            "abandoned": (
                f"SELECT scope, digest FROM {t} WHERE operation = :operation "
                f"AND recovery_point <> '{FINISHED}' AND {stale} ORDER BY updated_at LIMIT :limit"
            ),
        }

    # -- the plan ------------------------------------------------------------------------------
    def _drive(self, c: SqlConnection, key: RecordKey, params: Any, resume_only: bool) -> Plan[Any]:
        if not self.phases:
            raise ConfigurationError(f"operation {self.name!r} has no phases")
        if c.in_transaction():
            raise ConfigurationError(
                f"{self.name}: recovery points commit each phase, so the operation must start "
                "outside a transaction: commit or roll back first (not inside atomic())"
            )
        # each phase's code runs in a transaction oncely opens; in autocommit a write after the
        # phase's own rollback() or commit() would commit without its recovery point
        c.require_held()
        sql = self._sql(c)
        token = secrets.token_hex(32)
        base = {"scope": key.scope, "digest": digest_bytes(key)}
        p_bytes = None if resume_only else _encode(params)
        inserted = False
        try:
            if not resume_only:
                block: Block = yield Enter(False)
                try:
                    try:
                        res = yield Exec(
                            sql["insert"],
                            {
                                **base,
                                "operation": self.name,
                                "params": p_bytes,
                                "state": _encode({"state": {}}),
                                "token": token,
                            },
                        )
                        inserted = res.rowcount == 1
                    except Exception as exc:
                        if duplicate_of(exc) is None:
                            raise
                    yield Leave(block, True)
                except BaseException as exc:
                    yield from roll_back(block, exc)
                    raise
            state: dict[str, Any] = {}
            if inserted:
                point = STARTED
            else:
                block = yield Enter(False)
                try:
                    taken = yield Exec(
                        sql["take"],
                        {
                            **base,
                            "operation": self.name,
                            "token": token,
                            "timeout": self.lock_timeout,
                        },
                    )
                    res = yield Exec(sql["read"], base)
                    stored_params = res.rows[0][2] if res.rows else None
                    if (
                        p_bytes is not None
                        and stored_params is not None
                        and bytes(stored_params) != p_bytes
                    ):
                        # roll the take back: a mismatched call must not keep the key locked
                        # from the genuine retry for lock_timeout
                        raise IdempotencyKeyMismatch(
                            "this key was used with other params: a retry must send the same "
                            "params; a new operation needs a new key"
                        )
                    yield Leave(block, True)
                except BaseException as exc:
                    yield from roll_back(block, exc)
                    raise
                if not res.rows:
                    raise InFlightError("the record vanished (reaped); retry", retry_after=0.0)
                point, operation, stored, blob, locked_at, now = res.rows[0]
                point, operation = text_of(point), text_of(operation)
                if operation != self.name:
                    raise ConfigurationError(
                        f"this key belongs to another operation ({operation!r}), not {self.name!r}"
                    )
                if p_bytes is not None and stored is not None and bytes(stored) != p_bytes:
                    raise IdempotencyKeyMismatch(
                        "this key was used with other params: a retry must send the same "
                        "params; a new operation needs a new key"
                    )
                data = _decode(blob) or {}
                if point == FINISHED:
                    return data.get("result")
                if taken.rowcount != 1:
                    left = float(locked_at or 0) + self.lock_timeout - float(now)
                    raise InFlightError(
                        f"{self.name} with this key is running elsewhere (at recovery point "
                        f"{point!r})",
                        retry_after=max(0.0, left),
                    )
                state = data.get("state") or {}
                if resume_only:
                    params = _decode(stored)
        except Exception as exc:
            typed = schema_missing(exc, self.table)
            if typed is exc:
                typed = busy(exc, f"operation {self.name!r} taking its key")
            if typed is exc:
                raise
            raise typed from exc

        names = [n for n, _ in self.phases]
        start = 0 if point == STARTED else names.index(point) + 1
        downstream = hashlib.sha256(f"{key.scope}\x00{key.digest}".encode()).hexdigest()
        value: Any = None
        for i in range(start, len(self.phases)):
            last = i == len(self.phases) - 1
            ctx = PhaseContext(c.raw, params, state, downstream, names[i], key.scope)
            block = yield Enter(False)
            try:
                value = yield _CallPhase(i, ctx)
                if not last:
                    value = None
                payload = {"state": ctx.state} if not last else {"result": value}
                res = yield Exec(
                    sql["finish" if last else "advance"],
                    {
                        **base,
                        "point": names[i],
                        "prev": point,
                        "token": token,
                        "state": _encode(payload),
                    },
                )
                if res.rowcount != 1:
                    raise LeaseLost(
                        f"{self.name}: the lock on this key timed out and was taken over; "
                        f"phase {names[i]!r} was rolled back"
                    )
            except BaseException as exc:
                yield from roll_back(block, exc)
                if not isinstance(exc, LeaseLost):
                    with cleanup(exc, "unlocking the key"):
                        unlock = yield Enter(False)
                        yield Exec(sql["unlock"], {**base, "token": token})
                        yield Leave(unlock, True)
                raise
            yield Leave(block, True)
            point, state = names[i], ctx.state
        return value

    # -- faces ---------------------------------------------------------------------------------
    def _call(self, request: Any) -> Any:
        if not isinstance(request, _CallPhase):
            raise TypeError(f"unknown request {request!r}")
        result = self.phases[request.number][1](request.ctx)
        if inspect.isawaitable(result):
            raise ConfigurationError(
                f"phase {self.phases[request.number][0]!r} is async: use await op.arun(...)"
            )
        return result

    async def _acall(self, request: Any) -> Any:
        if not isinstance(request, _CallPhase):
            raise TypeError(f"unknown request {request!r}")
        result = self.phases[request.number][1](request.ctx)
        if inspect.isawaitable(result):
            result = await result
        return result

    def run(self, conn: Any, *, key: str, scope: object, params: Any = None) -> Any:
        """Run (or resume, or replay) the operation for ``key`` in ``scope``; returns the last
        phase's return value. ``params`` (JSON values) must be the same on every retry."""
        c = adapt(conn)
        return run(self._drive(c, record_key(key, scope), params, False), c, self._call)

    async def arun(self, conn: Any, *, key: str, scope: object, params: Any = None) -> Any:
        """The async face of :meth:`run` (phases may be sync or async)."""
        c = adapt(conn)
        plan = self._drive(c, record_key(key, scope), params, False)
        return await arun(plan, c, self._acall)

    def complete_abandoned(self, conn: Any, *, limit: int = 100) -> int:
        """The completer: resume up to ``limit`` operations of this name that were abandoned
        mid-way (unlocked after an error, or locked longer than ``lock_timeout`` ago, database
        clock) from their stored params. Returns how many it finished; one that fails again
        keeps its recovery point and is unlocked for the next pass.

        :raises ConfigurationError: ``limit`` is not an int from 1 to
            :data:`oncely.settings.MAX_COUNT`."""
        c = adapt(conn)
        found = run(self._abandoned(c, limit), c)
        done = 0
        for scope, digest in found:
            try:
                run(self._drive(c, RecordKey(scope, digest), None, True), c, self._call)
                done += 1
            except (InFlightError, LeaseLost):
                continue
        return done

    async def acomplete_abandoned(self, conn: Any, *, limit: int = 100) -> int:
        """The async face of :meth:`complete_abandoned`."""
        c = adapt(conn)
        found = await arun(self._abandoned(c, limit), c)
        done = 0
        for scope, digest in found:
            try:
                plan = self._drive(c, RecordKey(scope, digest), None, True)
                await arun(plan, c, self._acall)
                done += 1
            except (InFlightError, LeaseLost):
                continue
        return done

    def _abandoned(self, c: SqlConnection, limit: int) -> Plan[list[tuple[str, str]]]:
        limit = count(limit, "limit", where="complete_abandoned")
        block = yield Enter(False)
        try:
            res = yield Exec(
                self._sql(c)["abandoned"],
                {"operation": self.name, "timeout": self.lock_timeout, "limit": limit},
            )
        finally:
            yield Leave(block, True)
        return [(str(text_of(s)), bytes(d).hex()) for s, d in res.rows]


def _check_retention(retention: object) -> float:
    # the shared duration check (oncely.settings.seconds: >= 0, finite, at most MAX_SECONDS);
    # a negative retention would delete records finished just now, and their retries would
    # run the effect again
    return float(seconds(retention, "retention", where="reap", above=False))


def _reap(c: SqlConnection, table: str, retention: float) -> Plan[int]:
    t = c.quote(table)
    block = yield Enter(False)
    try:
        res = yield Exec(
            f"DELETE FROM {t} WHERE recovery_point = '{FINISHED}' "
            f"AND updated_at <= {now_sql(c.dialect)} - :retention",
            {"retention": float(retention)},
        )
    except BaseException as exc:
        yield from roll_back(block, exc)
        raise
    yield Leave(block, True)
    return int(res.rowcount)


def _reap_plan(c: SqlConnection, table: str, retention: float) -> Plan[int]:
    """:func:`_reap`; inside the caller's open transaction (where its block is no savepoint) the
    first use per connection and table runs in a savepoint (first_use_guarded), so a failing
    ``DELETE`` on PostgreSQL does not silently abort the caller's transaction."""
    plan = _reap(c, table, retention)
    if c.in_transaction():
        plan = first_use_guarded(c, ("reap", table), plan)
    return plan


def reap(conn: Any, *, table: str = DEFAULT_TABLE, retention: float = RETENTION) -> int:
    """The reaper: delete finished records (recovery points and :func:`oncely.sql.transaction`
    alike) whose last write is older than ``retention`` seconds (database clock; default 72 h,
    brandur's); returns how many. Unfinished operations are left for the completer.
    Raises :class:`~oncely.errors.ConfigurationError` for a negative or non-finite
    ``retention``."""
    retention = _check_retention(retention)
    table = check_identifier(table)
    c = adapt(conn)
    count: int = run(_reap_plan(c, table, retention), c, what=f"reap of {table}")
    return count


async def areap(conn: Any, *, table: str = DEFAULT_TABLE, retention: float = RETENTION) -> int:
    """The async face of :func:`reap`."""
    retention = _check_retention(retention)
    table = check_identifier(table)
    c = adapt(conn)
    count: int = await arun(_reap_plan(c, table, retention), c, what=f"reap of {table}")
    return count
