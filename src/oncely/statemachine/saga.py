"""Sagas: steps with compensations, the branch barrier on every step, resumable after a crash.

A :class:`Saga` is a name and :class:`Step` s (local functions) or :class:`HttpStep` s (remote
calls). :meth:`Saga.run` drives one saga instance, identified by ``saga_id``, on the business
database:

* the saga's row (``oncely_saga``: id, name, state ``running`` / ``pivoted`` / ``completed`` /
  ``compensating`` / ``compensated``, and ``data``, the saga's input as JSON, written by the
  statement that creates the row; only plain JSON is accepted, data a JSON round trip gives
  back unchanged) moves through a
  :class:`~oncely.statemachine.sql.SqlStateMachine`, so deciding to roll back is one
  conditional ``UPDATE`` that concurrent runners cannot both win or undo;
* each step runs in its own database transaction: :func:`~oncely.statemachine.barrier.barrier`
  with op ``action`` (or ``compensate``) first, then the step's writes, then commit. A step
  that already committed answers DUPLICATE and is skipped; a crash (kill -9) rolls the open
  step back, barrier row and writes together, so running the saga again with the same id
  resumes after the last committed step;
* a step that raises is retried (``attempts``, exponential ``backoff`` with jitter, capped at
  ``max_backoff`` seconds); when its attempts run out, or it raises an error not in
  ``retry_on``, the saga turns ``compensating`` and every step's compensation runs, last step
  first. The barrier turns a compensation of a step that never ran into an empty compensation
  (nothing runs) and blocks that step if it arrives late (HANGING), so a runner racing a
  rollback cannot apply a step after its compensation;
* the first step with no compensation is the saga's **pivot** (:attr:`Saga.pivot`), its point
  of no return: the pivot's own transaction moves the saga row ``running`` -> ``pivoted`` (one
  conditional ``UPDATE``) before the step's code runs, committed or rolled back with the step.
  Rolling back is the ``compensate`` transition, from ``running`` only: a saga past its pivot is
  never compensated (:meth:`Saga.abort` returns state ``pivoted``), and a pivot step that finds
  the saga ``compensating`` runs nothing and rolls back. After the pivot a run only goes
  forward: a later step that fails for good raises :class:`~oncely.errors.SagaStuck` and the
  saga stays ``pivoted`` until a run completes it, so steps after the pivot must be retriable;
* :class:`HttpStep` sends its request with ``Idempotency-Key`` derived from the saga id, the step
  and the op (:func:`idempotency_key`): a retry after a crash between the remote call and the
  local commit is deduplicated by the remote side.

The saga run twice, one after the other or at the same time, has the effect of one run:
concurrent runners meet on the barrier rows (the second waits on the first's row lock, then
sees DUPLICATE). :meth:`Saga.abort` rolls a saga back from outside (an order that timed out).

The saga keeps its input: the first run stores ``data`` with the saga's row, and every later
run, resume or :meth:`Saga.abort` of the same saga id works on the stored data. Called without
data they use it (``abort(conn, saga_id)`` compensates with what the steps took); called with
other data they raise :class:`~oncely.errors.IdempotencyKeyMismatch` and run nothing, so a
compensation never gives back another amount than its action took. Rows of saga tables made
before the ``data`` column existed have none stored (NULL): they use the caller's data, as
before; :meth:`Saga.create_tables` adds the column to such a table.

:meth:`Saga.abort` of a saga id that never ran (the order timed out before its saga started)
creates the saga's row already ``compensating`` and stores no data (NULL): no step ran, so
there is nothing to give back and nothing a later run's data could be compared with. A run of
that id, with any data or none, raises :class:`~oncely.errors.SagaFailed` (``.step`` None) and
runs no step; so does a run racing the abort that loses the race for the row.

:meth:`Saga.run` returns only for a saga that completed: every run that ends compensated (its
step failed, :meth:`Saga.abort` rolled it back before or meanwhile, or an earlier run did)
raises :class:`~oncely.errors.SagaFailed`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from oncely.backends.plans import Exec, Plan, Sleep
from oncely.codecs import stored_json
from oncely.core.text import literal_bytes, stored_text, utf8
from oncely.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    IllegalTransition,
    SagaFailed,
    SagaStuck,
    SchemaMissing,
)
from oncely.settings import seconds, text, whole
from oncely.sql.connections import (
    Enter,
    Leave,
    SqlConnection,
    adapt,
    busy,
    commit_if_held,
    exact_text,
    lost_message,
    missing_object,
    quote,
    retryable,
    roll_back,
    undecided,
)
from oncely.sql.connections import arun as sql_arun
from oncely.sql.connections import run as sql_run
from oncely.statemachine import barrier as _barrier
from oncely.statemachine.definition import Machine, Transition
from oncely.statemachine.sql import SqlStateMachine, Table

__all__ = [
    "DEFAULT_TABLE",
    "SAGA_MACHINE",
    "HttpStep",
    "SagaResult",
    "Step",
    "StepContext",
    "idempotency_key",
]

DEFAULT_TABLE: Final = "oncely_saga"

#: The saga's own state machine (its row in the saga table).
SAGA_MACHINE: Final = Machine(
    "saga",
    states=["running", "pivoted", "completed", "compensating", "compensated"],
    initial="running",
    transitions=[
        # the pivot step's own transaction moves the saga past its point of no return
        Transition("pivot", "running", "pivoted"),
        Transition("complete", ("running", "pivoted"), "completed"),
        # only a saga before its pivot can be rolled back
        Transition("compensate", "running", "compensating"),
        Transition("finish", "compensating", "compensated"),
    ],
)


def idempotency_key(saga_id: str, step: str, op: str) -> str:
    """The ``Idempotency-Key`` of a remote step call: stable for (saga id, step, op), 43
    characters, reveals neither.

    :raises InvalidKey: one of them holds a lone surrogate (it has no UTF-8 form).
    """
    digest = hashlib.sha256(utf8(f"{saga_id}\x00{step}\x00{op}", "saga id, step or op")).hexdigest()
    return f"saga-{digest[:38]}"


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step function gets: ``conn`` (the caller's connection, inside the step's
    transaction: write through it so the writes commit with the barrier row), ``saga_id``,
    ``step``, ``op`` (``action`` or ``compensate``), ``data`` (the saga's input),
    ``idempotency_key`` (for calls to other services) and ``attempt`` (1, 2, ...)."""

    conn: Any
    saga_id: str
    step: str
    op: str
    data: Mapping[str, Any]
    idempotency_key: str
    attempt: int


#: A step function: sync for :meth:`Saga.run`, sync or ``async def`` for :meth:`Saga.arun`.
StepFn = Callable[[StepContext], Any]


def _check_backoff(step: Any, texts: tuple[str, ...] = ()) -> None:
    """Check a step's options when it is made: ``name`` and ``texts`` (an HTTP step's ``url``,
    ``method``...) non-empty strings, ``attempts`` a whole number >= 1, ``backoff`` and
    ``max_backoff`` by the settings rule (seconds, or a text with a unit:
    :func:`oncely.settings.seconds`).

    :raises ConfigurationError: a wrong type or range (the message names the step and argument).
    """
    text(step.name, "name", where="Step")
    where = f"step {step.name!r}"
    for name in texts:
        value = getattr(step, name)
        if value is not None or name != "compensation_url":
            text(value, name, where=where)
    whole(step.attempts, "attempts", where=where, minimum=1)
    for name in ("backoff", "max_backoff"):
        value = seconds(getattr(step, name), name, where=f"step {step.name!r}", above=False)
        object.__setattr__(step, name, value)


@dataclass(frozen=True, slots=True)
class Step:
    """A local step: ``action`` and its ``compensation`` (None: nothing to undo).

    :param attempts: tries of the action (and of the compensation) before giving up (>= 1).
    :param backoff: seconds before the 2nd try, doubled each time (with jitter: 50-100 %).
    :param max_backoff: cap of one wait, seconds.
    :param retry_on: exception types that are retried; any other fails the step at once
        (a database deadlock or serialization failure is always retried).
    """

    name: str
    action: StepFn
    compensation: StepFn | None = None
    attempts: int = 3
    backoff: float = 0.05
    max_backoff: float = 5.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        _check_backoff(self)


class RemoteRefused(Exception):
    """A remote step answered 4xx (other than 408, 409, 425, 429): not retried."""


class RemoteUnavailable(Exception):
    """A remote step answered 5xx, 408, 409, 425 or 429, or the call failed: retried."""


@dataclass(frozen=True, slots=True)
class HttpStep:
    """A remote step: ``method url`` with ``json`` (a value, or a function of the
    :class:`StepContext`), sent with ``Idempotency-Key`` (:func:`idempotency_key`) through
    ``client`` (an ``httpx.Client`` for :meth:`Saga.run`, an ``httpx.AsyncClient`` for
    :meth:`Saga.arun`, or anything with the same ``request(method, url, json=, headers=)``).
    ``compensation_url`` (optional) is called the same way to undo it.

    2xx is success; 4xx (except 408/409/425/429) fails the step without retrying
    (:class:`RemoteRefused`); anything else is retried.
    """

    name: str
    url: str
    client: Any
    method: str = "POST"
    json: Any = None
    compensation_url: str | None = None
    compensation_method: str = "POST"
    attempts: int = 3
    backoff: float = 0.05
    max_backoff: float = 5.0
    retry_on: tuple[type[BaseException], ...] = (RemoteUnavailable,)

    def __post_init__(self) -> None:
        _check_backoff(self, ("url", "method", "compensation_url", "compensation_method"))

    def _request(self, ctx: StepContext) -> tuple[str, str, dict[str, Any]]:
        url = self.url if ctx.op == "action" else str(self.compensation_url)
        method = self.method if ctx.op == "action" else self.compensation_method
        body = self.json(ctx) if callable(self.json) else self.json
        headers = {"Idempotency-Key": ctx.idempotency_key}
        return method, url, {"json": body, "headers": headers}

    @staticmethod
    def _check(response: Any) -> Any:
        status = int(response.status_code)
        if 200 <= status < 300:
            return response
        if 400 <= status < 500 and status not in (408, 409, 425, 429):
            raise RemoteRefused(f"{status} from {response.request.url}")
        raise RemoteUnavailable(f"{status} from {response.request.url}")

    def call(self, ctx: StepContext) -> Any:
        method, url, kwargs = self._request(ctx)
        try:
            response = self.client.request(method, url, **kwargs)
        except Exception as exc:
            raise RemoteUnavailable(f"{method} {url}: {exc}") from exc
        return self._check(response)

    async def acall(self, ctx: StepContext) -> Any:
        method, url, kwargs = self._request(ctx)
        try:
            response = await self.client.request(method, url, **kwargs)
        except Exception as exc:
            raise RemoteUnavailable(f"{method} {url}: {exc}") from exc
        return self._check(response)


@dataclass(frozen=True, slots=True)
class SagaResult:
    """How a saga ended: ``state`` (``completed`` or ``compensated``), the steps whose action
    this call executed and those whose compensation it executed, and ``failed_step`` (the step
    of this call that failed, if any).

    :meth:`Saga.run` returns one only when the saga **completed**: every run that ends
    compensated (its own step failed, the saga was aborted meanwhile, or the saga id was
    rolled back before) raises :class:`~oncely.errors.SagaFailed`, whose ``result`` is this
    object. :meth:`Saga.abort` returns it with state ``compensated``, or ``completed`` (the
    saga had completed before the abort) or ``pivoted`` (its pivot, a step with no
    compensation, had committed: it only goes forward, a run completes it); those two are
    left alone."""

    saga_id: str
    state: str
    executed: tuple[str, ...] = ()
    compensated: tuple[str, ...] = ()
    failed_step: str | None = field(default=None)


def _input(data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"saga data must be a mapping, not {type(data).__name__}")
    return dict(data)


def _canonical(name: str, saga_id: str, data: Mapping[str, Any]) -> str:
    """``data`` as the JSON stored with the saga's row (keys sorted: the same data is the same
    text). Only plain JSON is accepted, what a JSON round trip gives back unchanged (no
    Decimal, tuple, set, datetime, NaN...): a resume or abort without data gets the stored
    data decoded, so the steps of every run must see exactly the same values.

    :raises ConfigurationError: ``data`` is not plain JSON (the message names where).
    """
    return stored_json(
        dict(data),
        f"saga {name} {saga_id!r}: data",
        plain=True,
        why=(
            ", what a JSON round trip gives back unchanged (it is stored with the saga's row, "
            "and resumes and abort get it back decoded)"
        ),
        sort_keys=True,
        separators=(",", ":"),
    )


#: Saga data longer than this (characters) is checked against MariaDB/MySQL's limits first.
_CHECKED_DATA: Final = 64 * 1024
#: Bytes of the statement storing saga data besides the data (id, name, protocol).
_STATEMENT_MARGIN: Final = 4 * 1024
#: Bytes a MariaDB/MySQL ``MEDIUMTEXT`` column holds.
_MEDIUMTEXT: Final = 2**24 - 1


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


def _compensable(step: Step | HttpStep) -> bool:
    """Whether ``step`` has a compensation (a function, or a compensation URL)."""
    if isinstance(step, Step):
        return step.compensation is not None
    return step.compensation_url is not None


class _Call(NamedTuple):
    step: Step | HttpStep
    ctx: StepContext


class Saga:
    """A saga definition; run instances of it with :meth:`run` / :meth:`arun`.

    :param name: the saga's name (at most 100 characters).
    :param steps: :class:`Step` s and :class:`HttpStep` s, in order; names unique.
    :param table: the saga table; :param barrier_table: the barrier table (both created by
        :meth:`create_tables`, in the business database).
    :raises ConfigurationError: no steps, duplicate step names, attempts < 1.

    ``pivot`` is the saga's pivot: its first step with no compensation (None when every step
    has one). Once it committed the saga is ``pivoted`` and only goes forward.
    """

    def __init__(
        self,
        name: str,
        steps: Sequence[Step | HttpStep],
        *,
        table: str = DEFAULT_TABLE,
        barrier_table: str = _barrier.DEFAULT_TABLE,
    ) -> None:
        if not isinstance(name, str) or not name or len(name) > 100:
            raise ConfigurationError("a saga needs a name: a non-empty str of at most 100 chars")
        self.name = name
        self.steps = tuple(steps)
        if not self.steps:
            raise ConfigurationError(f"saga {name!r} has no steps")
        names = [s.name for s in self.steps]
        for s in self.steps:
            if not isinstance(s, (Step, HttpStep)):
                raise ConfigurationError(f"saga {name!r}: {s!r} is not a Step or HttpStep")
            if not isinstance(s.name, str) or not s.name or len(s.name) > _barrier.MAX_ID:
                raise ConfigurationError(
                    f"saga {name!r}: step name {s.name!r} must be a non-empty str of at most "
                    f"{_barrier.MAX_ID} characters (it is the step's barrier branch)"
                )
            if names.count(s.name) > 1:
                raise ConfigurationError(f"saga {name!r} has two steps named {s.name!r}")
            if not isinstance(s.attempts, int) or s.attempts < 1:
                raise ConfigurationError(f"saga {name!r}: step {s.name!r} needs attempts >= 1")
        self.table = table
        self.barrier_table = barrier_table
        #: the pivot: the first step with no compensation (None: every step has one)
        self.pivot: Step | HttpStep | None = next(
            (s for s in self.steps if not _compensable(s)), None
        )
        self._rows = SqlStateMachine(
            SAGA_MACHINE, Table(table, "saga_id", "state"), history_table=f"{table}_history"
        )

    # -- set-up -----------------------------------------------------------------------------
    @staticmethod
    def _data_type(c: SqlConnection) -> str:
        return "MEDIUMTEXT" if c.dialect == "mysql" else "TEXT"

    def _ddl(self, c: SqlConnection) -> str:
        t = quote(self.table, c.dialect)
        engine = " ENGINE=InnoDB" if c.dialect == "mysql" else ""
        return (
            f"CREATE TABLE IF NOT EXISTS {t} (saga_id {exact_text(c.dialect, 128)} NOT NULL "
            "PRIMARY KEY, "
            f"name VARCHAR(100) NOT NULL, state VARCHAR(16) NOT NULL, "
            f"data {self._data_type(c)} NULL){engine}"
        )

    def _create_plan(self, c: SqlConnection) -> Plan[None]:
        t = quote(self.table, c.dialect)
        block = yield Enter(savepoint=True)
        try:
            yield Exec(self._ddl(c), {})
            # a table made before the data column: add it (its rows keep data NULL)
            probe = yield Enter(savepoint=True)
            try:
                yield Exec(f"SELECT data FROM {t} WHERE 1 = 0", {})
            except Exception as exc:
                yield Leave(probe, False)
                if missing_object(exc) is None:
                    raise
                yield Exec(f"ALTER TABLE {t} ADD COLUMN data {self._data_type(c)} NULL", {})
            else:
                yield Leave(probe, True)
        except BaseException as exc:
            yield from roll_back(block, exc)
            raise
        yield Leave(block, True)

    def create_tables(self, conn: Any) -> None:
        """Create the saga table, its history table and the barrier table if missing (each
        committed when no transaction was open). Idempotent."""
        c = adapt(conn)
        sql_run(self._create_plan(c), c, self._other)
        self._rows.create_tables(conn)
        _barrier.create_table(conn, self.barrier_table)

    async def acreate_tables(self, conn: Any) -> None:
        """The async face of :meth:`create_tables`."""
        c = adapt(conn)
        await sql_arun(self._create_plan(c), c, self._aother)
        await self._rows.acreate_tables(conn)
        await _barrier.acreate_table(conn, self.barrier_table)

    # -- the plan ----------------------------------------------------------------------------
    def _start(
        self, c: SqlConnection, saga_id: str, data: Mapping[str, Any] | None, abort: bool
    ) -> Plan[tuple[str, Mapping[str, Any]]]:
        """Create the saga's row with its input (one statement) or find it (a second one, only
        for a saga that already exists: a new row is what this call wrote); returns its state
        and the data the steps get: the stored data (the caller's must equal it).

        An abort creates the row of a saga that never ran already ``compensating`` and with no
        data (NULL): no step ran, so there is nothing a later run's data could be compared
        with, and a run meeting the row (even one racing the abort) finds it rolled back and
        never runs a step."""
        t = quote(self.table, c.dialect)
        born = "'compensating'" if abort else "'running'"
        cols = f"{t} (saga_id, name, state, data) VALUES (:id, :name, {born}, :data)"
        insert = (
            f"INSERT IGNORE INTO {cols}"
            if c.dialect == "mysql"
            else f"INSERT INTO {cols} ON CONFLICT DO NOTHING"
        )
        given = None if data is None else _canonical(self.name, saga_id, data)
        lock = " LOCK IN SHARE MODE" if c.dialect == "mysql" else ""
        block = yield Enter(savepoint=True)
        try:
            stored_data = None if abort else (given or "{}")
            if c.dialect == "mysql" and len(stored_data or "") > _CHECKED_DATA:
                yield from self._check_packet(c, saga_id, str(stored_data), insert)
            params = {"id": saga_id, "name": self.name, "data": stored_data}
            inserted = yield Exec(insert, params)
            fresh = inserted.rowcount == 1  # a new saga: its row is what was just written
            if not fresh:
                select = f"SELECT state, name, data FROM {t} WHERE saga_id = :id{lock}"
                res = yield Exec(select, {"id": saga_id})
        except BaseException as exc:
            yield from roll_back(block, exc)
            if isinstance(exc, Exception) and missing_object(exc) is not None:
                raise SchemaMissing(
                    "the saga tables are missing (or older than the data column): run "
                    f"Saga.create_tables(conn) once ({exc})"
                ) from exc
            typed = busy(exc, f"saga {self.name} {saga_id!r}")
            if typed is not exc:
                raise typed from exc
            raise
        yield Leave(block, True)
        if fresh:  # the steps get the data decoded from what was stored, as a resume would
            # (an abort's new row is compensating: its compensations are all empty ones)
            state = "compensating" if abort else "running"
            return state, (json.loads(given) if given is not None else {})
        state, name, stored = res.rows[0]
        if isinstance(stored, (bytes, bytearray)):
            stored = stored.decode()
        if name != self.name:
            raise ConfigurationError(
                f"saga id {saga_id!r} belongs to saga {name!r}, not {self.name!r}: use a new id"
            )
        if stored is None:  # no data stored: a row from before the data column, or one an
            # abort() created before any run (no step ran: nothing to compare): the caller's data
            return str(state), dict(data or {})
        if given is not None and given != stored:
            raise IdempotencyKeyMismatch(
                f"saga {self.name} {saga_id!r} was started with other data ({_short(stored)}), "
                f"not {_short(given)}: a resume or abort must pass the same data, or none (the "
                "stored data is used); a new saga needs a new id"
            )
        loaded = json.loads(stored)
        return str(state), loaded if isinstance(loaded, dict) else {}

    def _check_packet(self, c: SqlConnection, saga_id: str, data: str, insert: str) -> Plan[None]:
        """Refuse saga data MariaDB/MySQL cannot take, before anything is written: a statement
        over the session's ``max_allowed_packet`` is refused by the server closing the
        connection (PyMySQL raises a bare ``InterfaceError(0, '')``, aiomysql a reply out of
        sequence), and the ``MEDIUMTEXT`` data column holds at most 16 MiB.

        :raises ConfigurationError: the data does not fit (the message says which limit)."""
        size = len(data.encode("utf-8"))
        sent = len(insert.encode("utf-8")) + literal_bytes(data) + _STATEMENT_MARGIN
        packet = int((yield Exec("SELECT @@max_allowed_packet", {})).rows[0][0])
        if sent > packet or size > _MEDIUMTEXT:
            limit = (
                f"the server's max_allowed_packet is {packet} bytes, and the statement that "
                f"stores it would be about {sent} bytes"
                if sent > packet
                else f"the data column (MEDIUMTEXT) holds at most {_MEDIUMTEXT} bytes"
            )
            raise ConfigurationError(
                f"saga {self.name} {saga_id!r}: data is {size} bytes as JSON, too large for "
                f"MariaDB/MySQL: {limit}; pass a reference (an id, a URL) instead of the "
                "content, or raise max_allowed_packet on the server; nothing was written"
            )

    def _attempt(
        self,
        c: SqlConnection,
        saga_id: str,
        step: Step | HttpStep,
        op: str,
        data: Any,
        pivot: bool = False,
    ) -> Plan[_barrier.Verdict]:
        """One try of one step's op: barrier and the step's writes in one transaction.

        ``pivot``: the step is the saga's pivot. Its transaction first moves the saga row
        ``running`` -> ``pivoted`` (one conditional ``UPDATE``, which holds the row's lock
        until this transaction ends), before the step's code runs: it commits with the step's
        writes and barrier row, or rolls back with them. When the saga is no longer
        ``running`` (an abort turned it ``compensating``), nothing of the step runs, the
        transaction (barrier row included) rolls back, and the verdict is HANGING."""
        attempt = 0
        while True:
            attempt += 1
            block = yield Enter(savepoint=True, held=True)
            refused = False
            try:
                table = quote(self.barrier_table, c.dialect)
                verdict = yield from _barrier.decide(c, table, saga_id, step.name, op)
                if verdict.run and pivot:
                    try:
                        yield from self._rows.apply_plan(c, saga_id, "pivot")
                    except IllegalTransition:  # compensating: the abort came first
                        refused = True
                if verdict.run and not refused:
                    fn = step.action if op == "action" and isinstance(step, Step) else None
                    if isinstance(step, Step) and op == "compensate":
                        fn = step.compensation
                    ctx = StepContext(
                        c.raw, saga_id, step.name, op, data,
                        idempotency_key(saga_id, step.name, op), attempt,
                    )  # fmt: skip
                    if isinstance(step, HttpStep):
                        if op == "action" or step.compensation_url is not None:
                            yield _Call(step, ctx)
                    elif fn is not None:
                        yield _Call(step, ctx)
            except Exception as exc:
                yield Leave(block, False)
                # a deadlock or serialization failure is retried whatever retry_on says
                again = isinstance(exc, step.retry_on) or retryable(exc)
                if not again or attempt >= step.attempts:
                    raise
                delay = min(step.backoff * 2 ** (attempt - 1), step.max_backoff)
                yield Sleep(delay * (0.5 + random.random() / 2))
                continue
            except BaseException as exc:
                yield from roll_back(block, exc)
                raise
            if refused:  # nothing ran: the barrier row goes too, the abort's compensation of
                # this step finds no action and blocks it (EMPTY_COMPENSATION)
                yield Leave(block, False)
                return _barrier.Verdict.HANGING
            if verdict.run:  # the step's code ran inside: commit only if the barrier row is
                # still in the transaction (the step did not roll back or commit it itself)
                yield from commit_if_held(
                    c,
                    block,
                    table,
                    "gid = :gid AND branch = :branch AND op = :op",
                    {"gid": saga_id, "branch": step.name, "op": op},
                    lost_message(f"saga step {step.name!r} ({op})", "its barrier row"),
                )
            else:
                yield Leave(block, True)
            return verdict

    def _transition(self, c: SqlConnection, saga_id: str, name: str) -> Plan[str]:
        """Move the saga row; returns its state afterwards (a lost race is not an error)."""
        try:
            outcome = yield from self._rows.apply_plan(c, saga_id, name)
        except IllegalTransition as exc:
            return exc.current
        return outcome.state

    def _compensate(
        self, c: SqlConnection, saga_id: str, data: Any, executed: list[str]
    ) -> Plan[list[str]]:
        done: list[str] = []
        for step in reversed(self.steps):
            try:
                verdict = yield from self._attempt(c, saga_id, step, "compensate", data)
            except Exception as exc:
                if undecided(exc):  # nothing was decided: not the compensation's failure
                    stop = self._stopped(saga_id, step.name, "compensate", exc)
                    if stop is exc:
                        raise
                    raise stop from exc
                raise SagaStuck(
                    f"saga {self.name} {saga_id!r}: the compensation of {step.name!r} kept "
                    f"failing ({exc}); the saga stays 'compensating': run it again to resume",
                    step.name,
                ) from exc
            has_compensation = (
                step.compensation is not None
                if isinstance(step, Step)
                else step.compensation_url is not None
            )
            if verdict is _barrier.Verdict.EXECUTE and has_compensation:
                done.append(step.name)
        yield from self._transition(c, saga_id, "finish")
        return done

    def _plan(
        self, c: SqlConnection, saga_id: str, given: Mapping[str, Any] | None, abort: bool
    ) -> Plan[SagaResult]:
        if not isinstance(saga_id, str) or not saga_id or len(saga_id) > 128:
            raise ConfigurationError("saga_id must be a non-empty str of at most 128 characters")
        stored_text(saga_id, "saga_id", ConfigurationError)
        state, data = yield from self._start(c, saga_id, given, abort)
        executed: list[str] = []
        failed: str | None = None
        error: BaseException | None = None
        if abort and state == "running":
            # the one decision: refused once the pivot step committed (the saga is 'pivoted')
            state = yield from self._transition(c, saga_id, "compensate")
        if abort and state == "pivoted":  # past the point of no return: left alone, a run
            # (the one under way, or a resume) drives it forward
            return SagaResult(saga_id, "pivoted")
        if state in ("running", "pivoted"):
            past = state == "pivoted"
            for step in self.steps:
                is_pivot = step is self.pivot
                try:
                    verdict = yield from self._attempt(
                        c, saga_id, step, "action", data, pivot=is_pivot and not past
                    )
                except Exception as exc:
                    if undecided(exc):  # the database (or store) refused: nothing was
                        # decided, so not the step's failure; stop, the saga stays as it is
                        stop = self._stopped(saga_id, step.name, "action", exc)
                        if stop is exc:
                            raise
                        raise stop from exc
                    if past:  # no rollback after the pivot: the run must go forward
                        raise self._forward_stuck(saga_id, step.name, exc, executed) from exc
                    failed, error = step.name, exc
                    break
                if verdict is _barrier.Verdict.HANGING:  # a rollback has begun meanwhile
                    if past:  # cannot happen: no compensation starts after the pivot
                        raise self._forward_stuck(saga_id, step.name, None, executed)
                    break
                if verdict is _barrier.Verdict.EXECUTE:
                    executed.append(step.name)
                past = past or is_pivot  # EXECUTE or DUPLICATE: the pivot committed
            else:
                state = yield from self._transition(c, saga_id, "complete")
            if state == "running":
                state = yield from self._transition(c, saga_id, "compensate")
            if state == "pivoted":  # another run took the saga past its pivot meanwhile
                raise self._forward_stuck(saga_id, failed or "", error, executed)
        if state == "completed":
            return SagaResult(saga_id, "completed", tuple(executed))
        compensated: list[str] = []
        if state == "compensating":
            compensated = yield from self._compensate(c, saga_id, data, executed)
        result = SagaResult(saga_id, "compensated", tuple(executed), tuple(compensated), failed)
        if abort:
            return result
        # a run that ends compensated raises, whoever rolled the saga back: no exception from
        # run() always means the saga completed
        if failed is not None:
            raise SagaFailed(
                f"saga {self.name} {saga_id!r}: step {failed!r} failed ({error}); every step "
                "was compensated",
                failed,
                result,
            ) from error
        raise SagaFailed(
            f"saga {self.name} {saga_id!r} was rolled back (by abort(), or by an earlier run "
            "whose step failed); every step was compensated and nothing of it stays applied: "
            "a new attempt needs a new saga id",
            None,
            result,
        )

    def _stopped(self, saga_id: str, step: str, op: str, exc: Exception) -> BaseException:
        """The error of a run stopped by an infrastructure refusal (:func:`undecided`): the
        driver's busy error as :class:`~oncely.errors.DatabaseBusy`, an oncely
        :class:`~oncely.errors.StoreUnavailable` as it is. The saga's row is left as it was
        (no step counted as failed, nothing compensated for it): the next run (or abort)
        continues where this one stopped."""
        typed = busy(exc, f"saga {self.name} {saga_id!r}, step {step!r} ({op})")
        return typed if typed is not exc else exc

    def _forward_stuck(
        self, saga_id: str, step: str, error: BaseException | None, executed: list[str]
    ) -> SagaStuck:
        """The error of a run that cannot finish a saga past its pivot (it is never rolled
        back): run it again to drive it forward."""
        why = f"step {step!r} kept failing ({error})" if error is not None else "it was stopped"
        return SagaStuck(
            f"saga {self.name} {saga_id!r} is past its pivot "
            f"({self.pivot.name if self.pivot else None!r} committed) and can only go forward, "
            f"but {why}; the saga stays 'pivoted': run it again to complete it "
            f"(this call executed {list(executed)})",
            step,
        )

    # -- the saga's own requests (sleep, call a step): the rest runs on oncely.sql.connections --
    @staticmethod
    def _other(r: Any) -> Any:
        import time

        if isinstance(r, Sleep):
            return time.sleep(r.seconds)
        if isinstance(r, _Call):
            if isinstance(r.step, HttpStep):
                return r.step.call(r.ctx)
            fn = r.step.action if r.ctx.op == "action" else r.step.compensation
            assert fn is not None
            result = fn(r.ctx)
            if inspect.isawaitable(result):
                raise ConfigurationError(f"step {r.step.name!r} is async: run the saga with arun()")
            return result
        raise TypeError(f"unknown request {r!r}")

    @staticmethod
    async def _aother(r: Any) -> Any:
        import asyncio

        if isinstance(r, Sleep):
            return await asyncio.sleep(r.seconds)
        if isinstance(r, _Call):
            if isinstance(r.step, HttpStep):
                return await r.step.acall(r.ctx)
            fn = r.step.action if r.ctx.op == "action" else r.step.compensation
            assert fn is not None
            result = fn(r.ctx)
            if inspect.isawaitable(result):
                result = await result
            return result
        raise TypeError(f"unknown request {r!r}")

    # -- public faces ---------------------------------------------------------------------------
    def run(self, conn: Any, saga_id: str, data: Mapping[str, Any] | None = None) -> SagaResult:
        """Run (or resume) the saga ``saga_id`` on ``conn``, which must not be inside a
        transaction (each step commits its own).

        :param data: the saga's input (a mapping of plain JSON), given to every step as
            ``ctx.data``. The first run stores it with the saga's row; a later run (a resume
            after a crash) may pass the same data or None, and then gets the stored data.
        :returns: a :class:`SagaResult` with state ``completed``: a run never returns for a
            saga that ends compensated.
        :raises IdempotencyKeyMismatch: ``saga_id`` was started with other data; nothing ran.
        :raises ConfigurationError: ``data`` is not a mapping of plain JSON (what a JSON round
            trip gives back unchanged: no Decimal, tuple, set, NaN, non-str key...).
        :raises SagaFailed: the saga ended compensated: a step of this run failed for good
            (``.step``), or the saga was rolled back by :meth:`abort` (before or during this
            run) or by an earlier run (``.step`` None); ``.result`` says what this call did.
        :raises SagaStuck: a compensation kept failing, or a step after the pivot failed for
            good (the saga stays ``pivoted``: it is never compensated); run again later to
            resume.
        :raises SchemaMissing: the saga tables are missing (:meth:`create_tables`).
        :raises AutocommitConnection: ``conn`` is in autocommit mode (a step's write after its
            own ``rollback()`` would commit at once); nothing was written.
        """
        c = self._adapt(conn)
        plan = self._plan(c, saga_id, _input(data), False)
        result: SagaResult = sql_run(plan, c, self._other, self._what(saga_id))
        return result

    async def arun(
        self, conn: Any, saga_id: str, data: Mapping[str, Any] | None = None
    ) -> SagaResult:
        """The async face of :meth:`run` (async connection; steps may be ``async def``)."""
        c = self._adapt(conn)
        plan = self._plan(c, saga_id, _input(data), False)
        result: SagaResult = await sql_arun(plan, c, self._aother, self._what(saga_id))
        return result

    def abort(self, conn: Any, saga_id: str, data: Mapping[str, Any] | None = None) -> SagaResult:
        """Roll the saga back (an order that timed out): turn it ``compensating`` unless it
        already completed, then compensate every step (steps that never ran get empty
        compensations and are blocked if they arrive late). A completed saga is left alone
        (its result says ``completed``), and so is a saga past its pivot (the first step with
        no compensation committed: it cannot be undone), whose result says ``pivoted``: the
        decision is the one conditional ``UPDATE`` of the saga row from ``running``, which the
        pivot step's own transaction also takes, so exactly one of them wins. A run (the one
        under way, or a resume) completes a ``pivoted`` saga.

        A saga id that never ran gets its row now, already ``compensating`` and with no data:
        every later :meth:`run` of it raises :class:`~oncely.errors.SagaFailed` (``.step``
        None) whatever its data, and runs no step. Aborting again returns ``compensated`` and
        does nothing.

        :param data: None (the usual case): the compensations get the data the saga was started
            with, stored with its row. Given, it must equal the stored data
            (:class:`~oncely.errors.IdempotencyKeyMismatch` otherwise); for a saga id that never
            ran (or one aborted before it ran) it is checked to be plain JSON but not stored:
            no step ran, nothing is given back.
        :returns: a :class:`SagaResult`, state ``compensated`` (``compensated`` lists the
            compensations this call executed), ``completed`` when the saga had completed, or
            ``pivoted`` when its pivot had committed (nothing compensated).
        :raises IdempotencyKeyMismatch: ``data`` differs from the data stored for the saga (one
            that ran); nothing ran.
        :raises SagaStuck: as :meth:`run`."""
        c = self._adapt(conn)
        plan = self._plan(c, saga_id, _input(data), True)
        result: SagaResult = sql_run(plan, c, self._other, self._what(saga_id))
        return result

    async def aabort(
        self, conn: Any, saga_id: str, data: Mapping[str, Any] | None = None
    ) -> SagaResult:
        """The async face of :meth:`abort`."""
        c = self._adapt(conn)
        plan = self._plan(c, saga_id, _input(data), True)
        result: SagaResult = await sql_arun(plan, c, self._aother, self._what(saga_id))
        return result

    def _what(self, saga_id: object) -> str:
        return f"saga {self.name} {saga_id!r}"

    @staticmethod
    def _adapt(conn: Any) -> SqlConnection:
        c = adapt(conn)
        if c.in_transaction():
            raise ConfigurationError(
                "a saga commits each step on its own: pass a connection that is not inside a "
                "transaction (commit or roll back first)"
            )
        # every step runs in a block oncely opens around user code (Enter held): refuse an
        # autocommit connection here, before the saga's row is written, not at the first step
        # (the row committed at once and the refused step left the saga compensating)
        c.require_held()
        return c
