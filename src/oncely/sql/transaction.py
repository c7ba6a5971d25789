"""Transactional idempotency: the key's claim, the caller's writes and the stored result commit
in **one** database transaction, or not at all.

::

    with oncely.sql.transaction(conn, operation="billing.charge", key=request_key,
                                scope=user_id, payload={"amount": amount}) as tx:
        if tx.replayed:
            return tx.result
        conn.execute("INSERT INTO payments ...")      # the same connection / session
        tx.set_result({"payment": 42})
    return tx.result

The stored key is (scope, operation, key): a refund given the charge's key is its own
operation. ``payload=`` is stored with the key (as a SHA-256 fingerprint) and a retry with
another payload raises :class:`~oncely.errors.IdempotencyKeyMismatch`.

Every peer stops at "the completion write can be lost after the effect happened" because it
keeps the record in another store than the business write (Powertools, idemkit). Here the
record lives in the same database, so kill -9 anywhere leaves all or nothing: either the claim
row *and* the writes *and* the result are committed, or none of them is, and a retry runs
again. A retry after the commit replays the stored result (``tx.replayed``, ``tx.result``);
whatever the block writes on a replay is rolled back.

How it decides, per dialect (one statement in the common case; the claim row is inserted as
``finished`` because nobody else can see it before it commits with the writes):

* **PostgreSQL**: ``WITH ins AS (INSERT ... ON CONFLICT DO NOTHING RETURNING 1) SELECT ...
  UNION ALL SELECT <stored row> ...``. A concurrent duplicate waits on the unique index entry of
  the first one's uncommitted row (the row lock) until that transaction ends, then sees its row
  (READ COMMITTED: re-read in a new snapshot) or gets a serialization failure (REPEATABLE READ,
  SERIALIZABLE), which is retried from ``BEGIN`` when this block began the transaction, never
  reported as a duplicate.
* **SQLite**: ``BEGIN IMMEDIATE`` (one writer at a time) then ``INSERT ... ON CONFLICT DO
  NOTHING`` and, for a duplicate, a ``SELECT``.
* **MySQL / MariaDB**: ``INSERT``; a duplicate waits on the row lock, gets error 1062 (InnoDB
  rolls back only that statement) and reads the stored row with ``LOCK IN SHARE MODE`` (a
  locking read sees the latest committed row at REPEATABLE READ too); deadlocks are retried
  like serialization failures.

The result is written with one ``UPDATE`` before the commit, only when ``set_result`` was
called with something other than None. If the connection has no open transaction the block
begins one and commits it at the end; inside the caller's transaction (``atomic()``, a
``Session`` that already began, ``with conn.transaction()``) it is a savepoint and the caller's
commit decides.

Errors: :class:`~oncely.errors.InvalidKey`, :class:`~oncely.errors.ConfigurationError` (no
scope), :class:`~oncely.errors.SchemaMissing` (run :func:`oncely.sql.create_tables`),
:class:`~oncely.errors.TransactionFailed` (the caller's transaction already failed),
:class:`~oncely.errors.InFlightError` (``wait=False`` and a duplicate is running, or the key
belongs to an unfinished recovery-point operation), :class:`~oncely.errors.ConfigurationError`
(the key belongs to a finished :class:`~oncely.sql.Operation`),
:class:`~oncely.errors.IdempotencyKeyMismatch` (the key came with another ``payload=``, or
other arguments of ``@idempotent_transaction``). Source: DESIGN.md mechanism 4 (dedup
table) where it meets the user's database; brandur, "Stripe-like idempotency keys in Postgres".
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType
from typing import Any

from oncely.backends.plans import Exec, Plan
from oncely.codecs import Codec, JsonCodec, encode_result, stored_json
from oncely.core.records import MAX_KEY_LENGTH, RecordKey
from oncely.core.text import text_problem
from oncely.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    InFlightError,
    TransactionLost,
)
from oncely.functions.keys import fingerprint_of
from oncely.settings import flag
from oncely.sql.connections import (
    WRITTEN_BY_THIS_TRANSACTION,
    Block,
    Dialect,
    Enter,
    ExecLeave,
    Leave,
    SqlConnection,
    adapt,
    arun,
    busy,
    check_identifier,
    cleanup,
    commit_if_held,
    duplicate_of,
    leave_or_lost,
    leave_usable,
    lock_timeout,
    lost_message,
    quote,
    retryable,
    roll_back,
    row_gone,
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

__all__ = ["Claim", "Transaction", "claim_plan", "finish_plan", "transaction"]

#: How often a claim is tried again after a serialization failure or deadlock.
CLAIM_ATTEMPTS = 20
_UNSET: Any = object()
_DEFAULT_CODEC = JsonCodec()


@dataclass(slots=True)
class Claim:
    """What the claim found: ``new`` (this block owns the key) or the stored
    ``recovery_point``, ``result``, ``operation`` (the :class:`~oncely.sql.Operation` that owns
    the key, None for :func:`transaction` keys) and ``params`` (the arguments' fingerprint
    stored with the key, if any) of an earlier operation; ``block`` is the open block."""

    block: Block
    new: bool
    recovery_point: str | None = None
    result: bytes | None = None
    operation: str | None = None
    params: bytes | None = None


def _statements(c: SqlConnection, table: str) -> tuple[str, str]:
    return _statements_for(c.dialect, table)


@lru_cache(maxsize=256)
def _statements_for(dialect: Dialect, table: str) -> tuple[str, str]:
    t = quote(table, dialect)
    now = now_sql(dialect)
    where = "scope = :scope AND digest = :digest"
    values = f"(:scope, :digest, '{FINISHED}', :params, {now}, {now})"
    cols = "(scope, digest, recovery_point, params, created_at, updated_at)"
    read = f"SELECT recovery_point, result, operation, params FROM {t} WHERE {where}"
    if dialect == "postgresql":
        claim = (
            f"WITH ins AS (INSERT INTO {t} {cols} VALUES {values} "
            "ON CONFLICT (scope, digest) DO NOTHING RETURNING 1) "
            "SELECT 1, CAST(NULL AS VARCHAR), CAST(NULL AS BYTEA), CAST(NULL AS VARCHAR), "
            "CAST(NULL AS BYTEA) FROM ins UNION ALL "
            f"SELECT 0, recovery_point, result, operation, params FROM {t} WHERE {where} "
            "AND NOT EXISTS (SELECT 1 FROM ins)"
        )
    elif dialect == "sqlite":
        claim = f"INSERT INTO {t} {cols} VALUES {values} ON CONFLICT (scope, digest) DO NOTHING"
    else:
        claim = f"INSERT INTO {t} {cols} VALUES {values}"
        read += " LOCK IN SHARE MODE"
    return claim, read


def _nowait(c: SqlConnection) -> Generator[Any, Any, Any]:
    """Make the claim's lock wait give up at once (PostgreSQL ``lock_timeout`` of 5 ms, local
    to the transaction; MySQL ``innodb_lock_wait_timeout``, its minimum of 1 s); returns what
    :func:`_restore` needs to put the caller's own value back."""
    if c.dialect == "postgresql":
        res = yield Exec(
            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', '5ms', true)", {}
        )
        return res.rows[0][0]
    if c.dialect == "mysql":  # one statement: assignments run left to right
        yield Exec(
            "SET @oncely_lock_wait = @@SESSION.innodb_lock_wait_timeout, "
            "SESSION innodb_lock_wait_timeout = 1",
            {},
        )
        return True
    return None


def _restore(c: SqlConnection, saved: Any) -> Generator[Any, Any, None]:
    """Put back the lock wait :func:`_nowait` changed (the caller's value, not a default)."""
    if c.dialect == "postgresql":
        yield Exec("SELECT set_config('lock_timeout', :v, true)", {"v": saved})
    elif c.dialect == "mysql":
        yield Exec("SET SESSION innodb_lock_wait_timeout = @oncely_lock_wait", {})


def claim_plan(
    c: SqlConnection,
    table: str,
    key: RecordKey,
    *,
    wait: bool = True,
    params: bytes | None = None,
) -> Plan[Claim]:
    """Open a block and claim ``key`` in it (see the module docstring). Serialization failures
    and deadlocks are retried from ``BEGIN`` when the block owns the transaction; other errors
    roll the block back and are raised (a missing table as
    :class:`~oncely.errors.SchemaMissing`)."""
    claim, read = _statements(c, table)
    args = {"scope": key.scope, "digest": digest_bytes(key), "params": params}
    where = {"scope": key.scope, "digest": digest_bytes(key)}
    for attempt in range(CLAIM_ATTEMPTS):
        block: Block = yield Enter(held=True)
        saved: Any = None
        try:
            if not wait:
                saved = yield from _nowait(c)
            if c.dialect == "postgresql":
                res = yield Exec(claim, args)
                if not res.rows:  # the row committed after this statement's snapshot
                    res = yield Exec(read, where)
                    rows = [(0, *r) for r in res.rows]
                else:
                    rows = res.rows
                found = (bool(rows[0][0]), *rows[0][1:]) if rows else None
            elif c.dialect == "sqlite":
                res = yield Exec(claim, args)
                found = (True, None, None, None, None) if res.rowcount == 1 else None
                if found is None:
                    res = yield Exec(read, where)
                    found = (False, *res.rows[0]) if res.rows else None
            else:
                try:
                    yield Exec(claim, args)
                    found = (True, None, None, None, None)
                except Exception as exc:
                    if duplicate_of(exc) is None:
                        raise
                    res = yield Exec(read, where)
                    found = (False, *res.rows[0]) if res.rows else None
            if not wait:
                yield from _restore(c, saved)
        except BaseException as exc:
            # also on cancellation (a task cancelled while its claim waits on a duplicate's
            # row lock): roll back the block it began, or the pooled connection stays in a
            # failed transaction. A rollback that fails (aiomysql closes the connection a
            # cancelled statement was on) never replaces a cancellation (roll_back)
            yield from roll_back(block, exc)
            if saved is not None and c.dialect == "mysql":  # a session setting: put it back
                with cleanup(exc, "restoring innodb_lock_wait_timeout"):
                    yield from _restore(c, saved)
            if not isinstance(exc, Exception):
                raise
            if lock_timeout(exc) and not wait:  # checked first: SQLite's busy is both
                raise InFlightError(
                    "another transaction with this key is running; retry after it ends",
                    retry_after=1.0,
                ) from exc
            if retryable(exc) and block.owned and attempt < CLAIM_ATTEMPTS - 1:
                continue
            typed = schema_missing(exc, table)
            if typed is exc:
                typed = busy(exc, f"the claim of an idempotency key in {table}")
            if typed is exc:
                raise
            raise typed from exc
        if found is None:  # the row vanished between the two statements (a reaper): again
            yield Leave(block, False)
            continue
        new, point, result, operation, stored = found
        if isinstance(result, memoryview):
            result = bytes(result)
        if stored is not None:
            stored = bytes(stored)
        return Claim(block, new, text_of(point), result, text_of(operation), stored)
    raise InFlightError(  # pragma: no cover - CLAIM_ATTEMPTS conflicts in a row
        "could not claim the key: too many serialization failures in a row", retry_after=0.1
    )


def finish_plan(
    c: SqlConnection,
    table: str,
    key: RecordKey,
    claim: Claim,
    ok: bool,
    result: bytes | None,
    error: BaseException | None = None,
) -> Plan[None]:
    """Close the block of ``claim``: on a new claim that went ``ok``, write ``result`` (when not
    None) and commit; otherwise (an error, or a replay) roll the block back. ``error``: the
    exception leaving the block, which a failing rollback does not replace when it is a
    cancellation or an interrupt (:func:`~oncely.sql.connections.roll_back`)."""
    if not (ok and claim.new):
        yield from roll_back(claim.block, error)
        return
    # a statement in the block raised and was caught: its writes are gone (TransactionFailed)
    yield from leave_usable(c, claim.block, commit=False)
    t = quote(table, c.dialect)
    where = "scope = :scope AND digest = :digest"
    params = {"scope": key.scope, "digest": digest_bytes(key), "result": result}
    lost = lost_message("the code inside the transaction() block", "the key's row")
    if result is None:  # (when the block owns its transaction: only if the key's row is in it)
        yield from commit_if_held(c, claim.block, t, where, params, lost)
        return
    if not claim.block.owned or c.dialect == "postgresql":
        mine = where if not claim.block.owned else f"{where} AND {WRITTEN_BY_THIS_TRANSACTION}"
        # with psycopg: the UPDATE (which fails, owned, when the row is not this
        # transaction's: the block's code ended it) and the COMMIT in one round trip
        update = f"UPDATE {t} SET result = :result WHERE {mine}"
        if claim.block.owned:
            update = f"WITH u AS ({update} RETURNING 1) SELECT 1 / count(*) FROM u"
        try:
            yield ExecLeave(claim.block, update, params)
        except Exception as exc:
            if claim.block.owned and row_gone(exc):
                raise TransactionLost(lost) from exc
            raise
        return
    res = yield Exec(f"UPDATE {t} SET result = :result WHERE {where}", params)
    if res.rowcount != 1:  # the row is gone from the transaction the block owns
        yield Leave(claim.block, False)
        raise TransactionLost(lost)
    if claim.block.held is not None:  # the commit checks it is still the block's transaction
        yield from commit_if_held(c, claim.block, t, where, params, lost)
    else:
        yield from leave_or_lost(claim.block, lost)


class Transaction:
    """The handle of ``with oncely.sql.transaction(...) as tx`` (see :func:`transaction`).

    ``tx.replayed``: the key was completed by an earlier transaction; ``tx.result``: the stored
    result then (decoded by the codec), or what :meth:`set_result` was given; ``tx.owned``: the
    block began (and commits) the transaction, rather than a savepoint in the caller's.
    """

    def __init__(
        self,
        conn: Any,
        *,
        key: str,
        scope: object,
        namespace: str,
        table: str = DEFAULT_TABLE,
        codec: Codec | None = None,
        wait: bool = True,
        fingerprint: bytes | None = None,
    ) -> None:
        """``namespace``: the operation (:func:`transaction`'s ``operation=``,
        ``@idempotent_transaction``'s name), part of the stored key; ``fingerprint``: what a
        repeat must match (ASCII bytes), stored with a new claim and compared with the one
        the claim statement returns for an earlier key.

        :raises ConfigurationError: a namespace that is not a non-empty str of at most 255
            characters without NUL or lone surrogates, or a bad scope;
            :class:`~oncely.errors.InvalidKey`: a bad key."""
        if (
            not isinstance(namespace, str)
            or not namespace
            or text_problem(namespace) is not None
            or len(namespace) > MAX_KEY_LENGTH
        ):
            raise ConfigurationError(
                f"operation={namespace!r}: name the operation this key belongs to (a non-empty "
                f"str of at most {MAX_KEY_LENGTH} characters without NUL or lone surrogates, e.g. "
                "'billing.charge'),"
                " so that two operations given the same key never share a record"
            )
        self.key = record_key(key, scope, namespace)
        self.fingerprint = fingerprint
        self.conn = adapt(conn)
        self.table = check_identifier(table)
        self.codec: Codec = codec if codec is not None else _DEFAULT_CODEC
        self.wait = flag(wait, "wait", where="oncely.sql.transaction")
        self._claim: Claim | None = None
        self._result: Any = _UNSET

    @property
    def replayed(self) -> bool:
        return self._claim is not None and not self._claim.new

    @property
    def owned(self) -> bool:
        return self._claim is not None and self._claim.block.owned

    @property
    def result(self) -> Any:
        if self._result is _UNSET:
            return None
        return self._result

    def set_result(self, value: Any) -> None:
        """Store ``value`` (encoded by the codec, JSON by default) with the commit; a retry
        replays it as ``tx.result``. Raises :class:`~oncely.errors.SerializationError` now if
        it cannot be stored, :class:`~oncely.errors.ConfigurationError` if the JSON codec's
        text holds NaN or Infinity (anywhere inside): JSON has none, so the value goes through
        :func:`oncely.codecs.stored_json`, the rule of every JSON oncely stores (recovery-point
        results in the same table too); nothing is stored, the block is not committed if the
        error leaves it."""
        if self.replayed:
            raise ConfigurationError(
                "set_result on a replayed transaction (tx.replayed is true): return tx.result "
                "instead of running the operation again"
            )
        encoded = None if value is None else encode_result(self.codec, value)
        if encoded is not None and isinstance(self.codec, JsonCodec):
            # the codec's JSON (its types dumped: a Decimal as text...) checked by the one
            # rule: json.loads reads NaN / Infinity tokens back as floats, stored_json refuses
            stored_json(json.loads(encoded), "tx.set_result(value)", path="value")
        self._encoded = encoded
        self._result = value

    _encoded: bytes | None = None

    def _claim_plan(self) -> Plan[Claim]:
        return claim_plan(self.conn, self.table, self.key, wait=self.wait, params=self.fingerprint)

    def _entered(self, claim: Claim) -> Transaction:
        self._claim = claim
        if not claim.new:
            if claim.recovery_point != FINISHED:
                raise InFlightError(
                    f"the key belongs to an unfinished multi-step operation (at recovery point "
                    f"{claim.recovery_point!r}); resume it with the same key",
                    retry_after=1.0,
                )
            if claim.operation is not None:
                raise ConfigurationError(
                    f"this key belongs to the recovery-point operation {claim.operation!r}, "
                    "not to a transaction(): replay it with that Operation's run(), or use "
                    "another key"
                )
            if (
                self.fingerprint is not None
                and claim.params is not None
                and claim.params != self.fingerprint
            ):
                raise IdempotencyKeyMismatch(
                    "this key was used with another payload (other arguments): a retry must "
                    "send the same payload; a new operation needs a new key"
                )
            self._result = None if claim.result is None else self.codec.decode(claim.result)
        return self

    def __enter__(self) -> Transaction:
        claim: Claim = run(self._claim_plan(), self.conn)
        try:
            return self._entered(claim)
        except BaseException as exc:
            run(finish_plan(self.conn, self.table, self.key, claim, False, None, exc), self.conn)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._claim is not None
        run(
            finish_plan(
                self.conn, self.table, self.key, self._claim, exc is None, self._encoded, exc
            ),
            self.conn,
        )

    async def __aenter__(self) -> Transaction:
        claim: Claim = await arun(self._claim_plan(), self.conn)
        try:
            return self._entered(claim)
        except BaseException as exc:
            plan = finish_plan(self.conn, self.table, self.key, claim, False, None, exc)
            await arun(plan, self.conn)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._claim is not None
        await arun(
            finish_plan(
                self.conn, self.table, self.key, self._claim, exc is None, self._encoded, exc
            ),
            self.conn,
        )


def transaction(
    conn: Any,
    *,
    operation: str,
    key: str,
    scope: object,
    payload: Any = _UNSET,
    table: str = DEFAULT_TABLE,
    codec: Codec | None = None,
    wait: bool = True,
) -> Transaction:
    """``with`` / ``async with``: claim ``key`` of ``operation`` in ``scope`` and commit it
    together with the block's writes (see the module docstring).

    :param conn: what the caller holds (:func:`oncely.sql.connections.adapt`): a DB-API
        connection, an SQLAlchemy Connection/Session (sync or async), ``django.db.connection``.
    :param operation: what the block does (``"billing.charge"``, ``"billing.refund"``), a
        non-empty str of at most 255 characters without NUL: part of the stored key, so a
        refund given the charge's key runs as its own operation instead of replaying the
        charge. Required: a name derived from the calling code would make every caller of a
        shared helper one operation. ``@idempotent_transaction(name=...)`` uses the same key
        space, so the decorator and a block with the same name are one operation.
    :param key: the idempotency key, a non-empty str of at most 255 characters (stored as its
        SHA-256 digest).
    :param scope: whose key space (tenant/user/client id), or :data:`oncely.sql.GLOBAL`.
    :param payload: what a retry must repeat (the amount, the order's fields): any value the
        decorator's keys accept (JSON values, dataclasses, ``Decimal``, …), fingerprinted as
        canonical JSON (SHA-256) and stored with the key. A key that comes back with another
        payload raises :class:`~oncely.errors.IdempotencyKeyMismatch` when the block is
        entered, nothing run (decided from the row the claim statement returns: no extra
        round trip). Omitted: not checked (and a record stored without one matches any).
    :param table: the keys table (:func:`oncely.sql.create_tables` creates it).
    :param codec: how ``set_result`` values are stored (default :class:`~oncely.codecs.JsonCodec`).
    :param wait: True (default): a concurrent duplicate waits for the first transaction to
        end, then replays its result. False: raise :class:`~oncely.errors.InFlightError` at
        once instead (PostgreSQL: ``lock_timeout`` of 5 ms for the claim, local to the
        transaction, then the caller's value again; MySQL: ``innodb_lock_wait_timeout`` of 1 s,
        its minimum, for the claim, then the session's own value again; SQLite has one
        writer at a time, so a duplicate always waits there for ``BEGIN IMMEDIATE``).
    :raises ConfigurationError: a missing or bad ``operation`` or ``scope``.
    :raises InvalidKey: a bad ``key``, or a ``payload`` that has no canonical JSON form.
    """
    fingerprint = (
        None if payload is _UNSET else fingerprint_of({"payload": payload}).encode("ascii")
    )
    return Transaction(
        conn,
        key=key,
        scope=scope,
        namespace=operation,
        table=table,
        codec=codec,
        wait=wait,
        fingerprint=fingerprint,
    )
