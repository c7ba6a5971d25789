"""The errors oncely raises: one small hierarchy, each message says what to do next.

Everything derives from :class:`OncelyError`. Input mistakes also derive from
:class:`ValueError` so that generic handlers keep working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AutocommitConnection",
    "BarrierEffectsPartial",
    "BarrierError",
    "BarrierTableMissing",
    "ConfigurationError",
    "DatabaseBusy",
    "EntityNotFound",
    "EntityStateInvalid",
    "GuardRejected",
    "HttpProblem",
    "IdempotencyKeyMismatch",
    "IllegalTransition",
    "InFlightError",
    "InvalidBarrierCall",
    "InvalidEntityId",
    "InvalidIdentifier",
    "InvalidIfMatch",
    "InvalidKey",
    "InvalidLockName",
    "InvalidMachine",
    "InvalidPayload",
    "LeaseLost",
    "LockError",
    "LockLost",
    "LockNotOwned",
    "LockTimeout",
    "MessageRejected",
    "NotFound",
    "NotReplicated",
    "OncelyError",
    "PreconditionFailed",
    "PreconditionRequired",
    "ResultNotStored",
    "ResultTooLarge",
    "SagaError",
    "SagaFailed",
    "SagaStuck",
    "SchemaMissing",
    "SerializationError",
    "SettingWarning",
    "StaleVersion",
    "StateMachineError",
    "StoreError",
    "StoreUnavailable",
    "StoredFailure",
    "TokenError",
    "TokenExpired",
    "TokenForeign",
    "TokenForged",
    "TokenReused",
    "TransactionFailed",
    "TransactionLost",
    "UnfinishedResult",
    "UnknownColumn",
    "UnknownTable",
    "UnknownTransition",
    "UnsupportedConnection",
    "UnversionedRow",
    "ValueRefused",
    "VersionBypass",
    "VersionExhausted",
]


class OncelyError(Exception):
    """Base class of every error oncely raises on purpose."""


class ConfigurationError(OncelyError, ValueError):
    """A setting or store URL is wrong; the message names the setting and a valid example."""


class SettingWarning(UserWarning):
    """An ``ONCELY_*`` environment variable that is not a setting (the message names the closest).

    Warned once per name and process; see :mod:`oncely.settings`.
    """


class UnfinishedResult(ConfigurationError, TypeError):
    """A function returned work that is not done yet (a coroutine, a generator, an awaitable):
    storing it would store nothing of the work's result. Make the function ``async def`` (and
    ``await`` inside it), or return the finished value (a list instead of a generator)."""


class InvalidKey(OncelyError, ValueError):
    """An idempotency key is empty, too long or otherwise unusable."""


class IdempotencyKeyMismatch(OncelyError):
    """The key was already used with a different payload (HTTP 422 in the draft).

    Retries must send the same payload as the first attempt; a new operation needs a new key.
    """


class InFlightError(OncelyError):
    """Another call with the same key is still running (HTTP 409 in the draft).

    ``retry_after`` is the number of seconds (store clock) until that call's lease runs out.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LeaseLost(OncelyError):
    """The caller's claim is gone: its lease ran out and a newer fence took over, or it was removed.

    This is the zombie-writer case. Whatever the caller did after losing the lease must not be
    trusted; the newer holder's record wins.
    """


class SerializationError(OncelyError, TypeError):
    """A result could not be encoded or decoded by the configured codec."""


class ResultTooLarge(SerializationError):
    """An encoded result is larger than the store can take in one write.

    Deterministic, not an outage: the same result never fits, so the call is recorded as
    "ran, result not storable" (a small marker record) and retries raise
    :class:`SerializationError` instead of running again. ``size`` and ``limit`` are in bytes;
    the message names where the limit comes from (MySQL ``max_allowed_packet``, PostgreSQL's
    1 GB field limit, Redis ``proto-max-bulk-len``, SQLite ``SQLITE_LIMIT_LENGTH``).
    """

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class StoredFailure(OncelyError):
    """The replay of a stored exception (``store_errors=`` of ``@idempotent``) whose class is
    not among the ``store_errors`` classes of the function replaying it (they changed since the
    record was written), so it cannot be raised again as itself.

    ``type_name`` is the original exception's qualified class name, ``detail`` its message.
    Classes listed in ``store_errors`` are raised again as themselves (see
    docs/decorator.md, "Stored exceptions").
    """

    def __init__(self, type_name: str, detail: str) -> None:
        super().__init__(f"{type_name}: {detail}")
        self.type_name = type_name
        self.detail = detail


class StoreError(OncelyError):
    """The store failed in a way oncely cannot hide."""


class StoreUnavailable(StoreError):
    """The store cannot be reached. By default nothing runs unprotected (fail closed)."""


class NotReplicated(StoreUnavailable):
    """A Redis store with ``wait_replicas=N``: a decision was written on the master but fewer
    than ``N`` replicas acknowledged it within ``wait_timeout_ms`` (Redis ``WAIT``), so a
    failover could lose it. A claim is released and its body does not run (fail closed); a
    completion is retried like any :class:`StoreUnavailable` one (the caller gets
    :class:`ResultNotStored` if it stays unconfirmed). ``acked`` / ``wanted`` say how many
    replicas acknowledged and how many were asked for."""

    def __init__(self, message: str, acked: int = 0, wanted: int = 0) -> None:
        super().__init__(message)
        self.acked = acked
        self.wanted = wanted


class DatabaseBusy(StoreUnavailable):
    """The database answered "busy, run it again": a deadlock, a serialization failure, a lock
    wait that ran out, or SQLite's ``SQLITE_BUSY`` / ``SQLITE_LOCKED`` ("database is locked").
    Nothing of the failed attempt is kept: roll the transaction back (if it is yours) and run
    it again from its start. :func:`oncely.sql.retryable` answers True for it; the driver's
    error is its ``__cause__``."""


class ResultNotStored(StoreError):
    """The call ran (its effect happened) but its outcome could not be stored.

    Not a :class:`StoreUnavailable`: that one means nothing ran. ``result`` is what the call
    returned (or, for an exception listed in ``store_errors``, that exception). The key is not
    released: oncely keeps it claimed, with its lease renewed, and retries storing the outcome
    in the background for a bounded time (:data:`oncely.core.settle.SETTLE_FOR` seconds), so a
    retry meanwhile finds the call in flight (waits, or gets :class:`InFlightError`) and then
    replays it. Only if the store stays unreachable past that bound does the lease run out and
    a later retry run the call again; act on ``result`` instead of retrying blindly.
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class SchemaMissing(StoreError):
    """The store's table does not exist. Run ``oncely init URL`` or pass ``create_schema=True``."""


class LockError(OncelyError):
    """A distributed lock (:mod:`oncely.locks`) could not do what was asked."""


class LockLost(LockError):
    """The lock this instance held is gone: its ttl ran out, or the store lost it.

    Another holder may have run meanwhile, so whatever was done under the lock must not be
    trusted unless its writes were fenced (see :mod:`oncely.locks.fencing`).
    """


class LockTimeout(LockError, TimeoutError):
    """``acquire(timeout=...)`` gave up: someone else held the lock for the whole timeout (on
    SQLite: or another connection kept the database file's write lock that long; the message
    says which)."""


class LockNotOwned(LockError, RuntimeError):
    """``release()``/``extend()``/``token`` on a lock instance that does not hold the lock.

    Like :meth:`threading.Lock.release` on an unlocked lock: a programming mistake, not a race.
    """


class InvalidLockName(LockError, ValueError):
    """A lock name is empty, not a string, or longer than 255 characters."""


# -- one-time tokens (oncely.tokens) and HTTP (oncely.http) ---------------------------------------
class TokenError(OncelyError):
    """A one-time token was refused; the subclass says why (each maps to its own HTTP problem)."""


class TokenForged(TokenError, ValueError):
    """The token is malformed or its signature does not verify: it was not issued by us."""


class TokenExpired(TokenError):
    """The token's lifetime ran out (judged by the store's clock); ask for a new token."""


class TokenReused(TokenError):
    """The token was already consumed: this is a repeat of an operation that happened once."""


class TokenForeign(TokenError):
    """The token is genuine but was issued under another token scope, to another subject or for
    another purpose (``what`` says which: ``"scope"``, ``"subject"`` or ``"purpose"``)."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


class InvalidPayload(OncelyError, ValueError):
    """A request payload cannot be fingerprinted (e.g. not JSON when JSON fields are chosen)."""


class HttpProblem(OncelyError):
    """An HTTP error to answer with ``application/problem+json`` (RFC 9457).

    Raise it from a handler or dependency behind oncely's HTTP middleware to get a problem
    response; ``slug`` is the last part of the stable ``type`` URI (see ``docs/http.md``).
    """

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        headers: tuple[tuple[str, str], ...] = (),
        **extra: object,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers
        self.extra = extra


# -- optimistic locking (oncely.optimistic, oncely.sql, oncely.http.conditional) -------------------
class StaleVersion(OncelyError):
    """A versioned write lost the race: the row (or hash, or resource) is no longer at
    ``expected`` (source §3.3, optimistic locking; HTTP 412 Precondition Failed, RFC 9110 §15.5.13).

    Nothing was written. Read the entity again, recompute, and write with the version you read
    (:func:`oncely.optimistic.retry_on_conflict` does the loop). ``expected`` is the version the
    caller wrote against, ``current`` the version found (``None`` if it could not be read),
    ``entity`` names what was written (e.g. ``"accounts id=7"``, a Redis key).
    """

    def __init__(
        self, entity: str, expected: object, current: object, message: str | None = None
    ) -> None:
        super().__init__(
            message
            or f"{entity} is at version {current!r}, not {expected!r}: someone else wrote it "
            "first; read it again and retry (oncely.optimistic.retry_on_conflict)"
        )
        self.entity = entity
        self.expected = expected
        self.current = current


class NotFound(OncelyError, LookupError):
    """The row or key a versioned write names does not exist (it was never there, or it was
    deleted meanwhile). Nothing was written; ``entity`` names what was looked for."""

    def __init__(self, entity: str, message: str | None = None) -> None:
        super().__init__(
            message or f"{entity} does not exist; create it first (or it was deleted meanwhile)"
        )
        self.entity = entity


class UnversionedRow(OncelyError, ValueError):
    """The version column of the row is NULL (or the stored version is not an integer), so no
    compare-and-set can be decided. Backfill it (``UPDATE t SET version = 1 WHERE version IS
    NULL``) and declare the column ``NOT NULL DEFAULT 1``. ``entity`` names the row."""

    def __init__(self, entity: str, message: str) -> None:
        super().__init__(message)
        self.entity = entity


class VersionExhausted(UnversionedRow):
    """The stored version is at the top of what the store counts exactly, so no write can move
    it: 2^63 - 1 in a SQL ``BIGINT`` (SQLite would turn ``version + 1`` into a REAL, PostgreSQL
    and MariaDB refuse it), 2^53 - 1 in a Redis hash (Lua's numbers are doubles: past 2^53
    ``+ 1`` is lost and a stale writer matches). A Redis hash already holding 2^53 or more is
    refused the same way. Nothing was written. Versions only get there when set by hand (or
    migrated from nanosecond clocks); a :class:`UnversionedRow`, so one ``except`` covers every
    version no compare-and-set can use. ``entity`` names the row or key."""


class ValueRefused(OncelyError, ValueError):
    """The database refused a value a write sent (too long or too large for its column, NULL
    into a ``NOT NULL`` column, not a value of the column's type, a Python type the driver
    cannot send such as a ``dict``): :func:`~oncely.sql.versioned_update`,
    :func:`~oncely.sql.insert_once` (also: the values conflict with a row on another unique key
    than ``unique=``), the inbox, the outbox, a state machine's state column; for
    ``versioned_update`` also an id not of the key column's type (PostgreSQL ``'abc'`` for a
    ``BIGINT``) or naming another key than the row it matched (MariaDB compares ``'1abc'`` equal
    to 1, SQLite ``'1.0'``, PostgreSQL ``' 1'``). The driver's error is ``__cause__`` (none for an
    id that matched another key: nothing was sent that could write). One translation:
    :func:`oncely.sql.connections.value_refused`.

    Nothing was written by this call. The caller's transaction: on SQLite and MariaDB/MySQL it
    is still usable. On PostgreSQL a statement the server refused aborts the transaction (every
    later statement fails until ``rollback()``, and psycopg's ``commit()`` then rolls it back
    without an error), unless the statement ran in a savepoint: the state machine always, and
    ``insert_once``, the inbox and the outbox on a connection's first call per table and
    columns (:func:`oncely.sql.connections.first_use_guarded`). The message says which: "aborted
    the transaction ... roll it back", or "still usable". Do not retry as it is: fix the
    value."""


class VersionBypass(OncelyError):
    """A write to a versioned table would skip the version check and bump (an SQLAlchemy bulk
    ``update()``, a Django ``QuerySet.update()``, ...) and the guard is set to refuse it.

    Set the version column in the statement yourself (``version = version + 1``), or let the
    guard add the bump (``on_bulk="bump"``); see ``docs/optimistic.md``.
    """


class PreconditionFailed(HttpProblem):
    """HTTP 412 (RFC 9110 §13.1.1, §15.5.13): the request's ``If-Match`` names no current
    version of the resource (someone changed it since the client read it, or it is gone).
    The client should fetch the resource again (new ``ETag``) and redo its change."""

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(412, "precondition-failed", "Precondition Failed", detail, (), **extra)


class PreconditionRequired(HttpProblem):
    """HTTP 428 (RFC 6585 §3): this route changes a versioned resource and needs ``If-Match``
    with the ``ETag`` the client read, so that it cannot overwrite a change it never saw."""

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(428, "precondition-required", "Precondition Required", detail, (), **extra)


class InvalidIfMatch(HttpProblem, ValueError):
    """HTTP 400: the ``If-Match`` value is neither ``*`` nor a list of entity tags
    (RFC 9110 §13.1.1, §8.8.3), e.g. a version without its double quotes."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            400,
            "if-match-invalid",
            "If-Match header is invalid",
            f'{detail}; send If-Match: "<the ETag you read>", e.g. If-Match: "7"',
        )


class MessageRejected(OncelyError, ValueError):
    """A message an idempotent consumer cannot handle safely: it carries no dedup id, or its
    body cannot be decoded to read one. It is dead-lettered (never run without a dedup id);
    ``reason`` names what is missing (see ``docs/messaging.md``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- SQL (oncely.sql) ---------------------------------------------------------------------------
class UnsupportedConnection(ConfigurationError):
    """``oncely.sql`` was given a connection it cannot use (an SQLAlchemy ``Engine``, an unknown
    driver or dialect); the message lists what it takes."""


class AutocommitConnection(UnsupportedConnection):
    """A connection in autocommit mode was given to an API whose guarantee rests on a
    transaction: one the caller holds (``Inbox.accept``, ``Outbox.add``, ``barrier()``;
    refused with no transaction open: open it first) or one oncely runs user code in and
    commits only if that code did not end it (``Inbox.receive``, the transactional consumer,
    ``idempotent_transaction``, state machine hooks, saga steps, recovery-point phases). For
    the latter, on such a connection a write made after the code's own ``rollback()`` /
    ``commit()`` commits at once, and again on every retry, even inside a ``BEGIN`` the
    caller sent (the code's ``rollback()`` ends it too): give a connection without
    autocommit, or on psycopg run the block inside ``with conn.transaction():``, which
    forbids ``commit()`` / ``rollback()``."""


class InvalidIdentifier(OncelyError, ValueError):
    """A table or column name is not a plain SQL identifier (letters, digits, ``_``; at most 63
    characters); names are never pasted into SQL unchecked."""


class UnknownTable(ConfigurationError):
    """A statement named a table the database does not have; create it (or fix the name)."""


class UnknownColumn(ConfigurationError):
    """A statement named a column the table does not have; check the column names."""


class TransactionFailed(OncelyError):
    """The connection's transaction already failed (an earlier statement raised and it was not
    rolled back); roll back before starting an idempotent operation on it."""


class TransactionLost(TransactionFailed):
    """The transaction oncely opened around user code (a transactional consumer's handler, an
    ``oncely.sql`` transaction block) was ended by that code: it committed or rolled back the
    connection itself, so the row that records "done" is no longer part of the transaction
    oncely would commit. Nothing more is committed (what is still open is rolled back); let
    oncely own the transaction, and undo part of the work with a savepoint instead."""


# -- state machines, the branch barrier and sagas (oncely.statemachine) ----------------------------
class StateMachineError(OncelyError):
    """A state machine (:mod:`oncely.statemachine`) refused a call; the subclass says why."""


class InvalidMachine(ConfigurationError):
    """A machine definition is wrong (unknown state, duplicate transition name, unreachable state,
    a transition that does not change the state); raised when the machine is built, and the
    message names the offending state or transition."""


class UnknownTransition(StateMachineError, ValueError):
    """The transition name is not one of the machine's; the message lists the machine's names."""


class IllegalTransition(StateMachineError):
    """The entity's current state is not a source of the transition (and the transition did not
    already happen). ``current`` is the state found, ``transition`` the name asked for,
    ``allowed`` the transitions that state allows (empty for a final state)."""

    def __init__(self, message: str, current: str, transition: str, allowed: tuple[str, ...]):
        super().__init__(message)
        self.current = current
        self.transition = transition
        self.allowed = allowed


class GuardRejected(StateMachineError):
    """A transition's guard returned False for this call's data; nothing was written."""


class EntityNotFound(StateMachineError, LookupError):
    """No entity with this id (no row in the table, no hash in Redis): create it first, in its
    machine's initial state."""


class EntityStateInvalid(StateMachineError):
    """The entity exists but its stored state is not one of the machine's states: NULL (a SQL
    row whose state column is NULL, a Redis hash with no ``state`` field) or a name the machine
    does not have (a row written outside the machine, or by another version of it). No
    transition can be decided from it and nothing was changed: fix the stored state (set one
    of the machine's states), not the call. ``current`` is the value found (None for NULL)."""

    def __init__(self, message: str, current: Any = None) -> None:
        super().__init__(message)
        self.current = current


class InvalidEntityId(StateMachineError, ValueError):
    """An entity id whose text (``str(entity_id)``) is empty or longer than the history
    column (255 characters): nothing was written."""


class BarrierError(OncelyError):
    """The branch barrier (:mod:`oncely.statemachine.barrier`) could not decide."""


class InvalidBarrierCall(BarrierError, ValueError):
    """A barrier call without a gid or branch, or with an operation the barrier does not know
    (``try``, ``confirm``, ``cancel``, ``action``, ``compensate``)."""


class BarrierTableMissing(BarrierError, SchemaMissing):
    """The barrier table does not exist in this database: create it once with ``oncely barrier
    init URL`` or :func:`oncely.statemachine.barrier.create_table` (it must live in the business
    database, next to the tables the branch writes)."""


class BarrierEffectsPartial(BarrierError):
    """A :func:`~oncely.statemachine.barrier.redis_barrier` effect failed after the ones before
    it were applied (Redis does not roll a script back). The same script marked the branch
    broken, so no retry applies those commands twice: every later call on the branch (a retry,
    its compensation, its confirm) raises this error until an operator repairs the data and
    clears the mark (``HDEL key field``, both named here and in the message).

    ``op`` is the op whose effects failed, ``applied`` the commands that stayed applied,
    ``failed`` the one that failed, ``error`` the server's error, ``key`` and ``field`` the
    mark."""

    def __init__(
        self,
        message: str,
        *,
        key: str,
        field: str,
        op: str,
        applied: list[list[str]],
        failed: list[str],
        error: str,
    ):
        super().__init__(message)
        self.op = op
        self.key = key
        self.field = field
        self.applied = applied
        self.failed = failed
        self.error = error


class SagaError(OncelyError):
    """A saga (:mod:`oncely.statemachine.saga`) did not complete."""


class SagaFailed(SagaError):
    """The saga is rolled back: every completed step was compensated. ``Saga.run`` raises it
    whenever the saga ends compensated, so "no exception" always means the saga completed:

    * a step of this run failed for good: ``step`` names it, ``__cause__`` is its last error;
    * the saga was rolled back by ``Saga.abort`` (before or during this run) or by an earlier
      run whose step failed (a re-run of a compensated saga id): ``step`` is None.

    ``result`` is the :class:`~oncely.statemachine.saga.SagaResult` of this call (state
    ``compensated``, the steps it executed and compensated)."""

    def __init__(self, message: str, step: str | None, result: Any = None):
        super().__init__(message)
        self.step = step
        self.result = result


class SagaStuck(SagaError):
    """A saga could not finish this time; running it again (same saga id) resumes it:

    * a compensation kept failing after its retries: the saga stays ``compensating`` and the
      next run resumes the compensation where it stopped;
    * a step after the saga's pivot (its first step with no compensation, which committed)
      failed for good: the saga stays ``pivoted``, is never compensated, and the next run
      drives it forward to ``completed``.

    ``step`` names the step."""

    def __init__(self, message: str, step: str):
        super().__init__(message)
        self.step = step
