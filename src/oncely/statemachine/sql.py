"""State machines persisted in the user's own SQL table (SQLite, PostgreSQL, MariaDB/MySQL).

:class:`SqlStateMachine` binds a :class:`~oncely.statemachine.definition.Machine` to a table the
user already has: a plain table (:class:`Table`: table, id and state columns named by the
user), a SQLAlchemy model or a Django model (:func:`table_of`). :meth:`SqlStateMachine.apply`
makes one transition, in one block of the caller's transaction (a savepoint), or in its own
transaction when none is open:

1. ``UPDATE t SET state = :target WHERE id = :id AND state IN (:sources) RETURNING *``: the
   one atomic decision. Concurrent callers queue on the row lock; the database re-checks the
   ``WHERE`` on the row the winner committed, so exactly one of them changes the state.
   Where ``UPDATE ... RETURNING`` is missing (MariaDB and MySQL have none for ``UPDATE``;
   SQLite before 3.35) the row is read back in the same transaction once the history row is
   in (step 2; a key used before needs no row), while the ``UPDATE`` still holds its lock.
2. If it applied: one audit history row (machine, entity, transition, state reached, key, the
   database's clock), an outbox message if asked, and the in-transaction hooks, all in the same
   transaction: a hook that raises rolls the state change back. The outbox message is written
   through :meth:`oncely.messaging.outbox.Outbox.add_plan` into an :class:`~oncely.messaging.
   outbox.Outbox` table, so :class:`~oncely.messaging.outbox.Relay` publishes it: topic
   ``"<machine>.<transition>"``, message id ``"<machine>:<entity>:<transition>:<n>"`` (``n``:
   the ``id`` of the transition's history row, which the history ``INSERT`` gives back with
   ``RETURNING id`` or, where ``INSERT ... RETURNING`` is missing (MySQL, MariaDB < 10.5),
   as the driver's last insert id: no statement of its own; an id longer than 255 characters
   carries the entity's sha256 instead of the entity), payload the JSON object
   ``{"machine", "entity_id", "transition", "state", "key", "data"}``. History ids only grow
   (``AUTOINCREMENT``, a sequence, InnoDB's persistent ``AUTO_INCREMENT``), so deleting history
   rows never makes a later transition repeat a message id (and a new id is above every
   ``n`` of the older scheme, which counted the entity's history rows). A call that does not
   apply (a replay by key, "already happened") writes no message; an attempt rolled back and
   run again (a serialization failure) committed no message, so the one committed message of
   a transition has one id, and the relay publishes that id on every try.
3. If it did not: the idempotency key's history row answers if there is one (a replay, even if
   the state has moved on since); else the row (one statement reads both, with a ``LEFT
   JOIN`` of the key's history row and the entity row) and :func:`~oncely.statemachine.
   definition.explain` says "already happened" (a success, ``applied=False``), "illegal"
   (:class:`~oncely.errors.IllegalTransition`) or "missing" (:class:`~oncely.errors.
   EntityNotFound`). These reads only explain a decision already made; MariaDB/MySQL read
   with ``LOCK IN SHARE MODE`` so a REPEATABLE READ snapshot cannot show an older state.

Connections: anything :func:`oncely.sql.connections.adapt` takes (DB-API sqlite3 / psycopg /
PyMySQL / aiomysql, SQLAlchemy Connection / Session sync and async, Django connections).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, NamedTuple

from oncely.backends.plans import Exec, Plan
from oncely.codecs import stored_json, to_jsonable
from oncely.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    InvalidEntityId,
    OncelyError,
    SchemaMissing,
)
from oncely.settings import text
from oncely.sql.connections import (
    Enter,
    Leave,
    Result,
    SqlConnection,
    adapt,
    busy,
    commit_if_held,
    exact_text,
    exec_in_block,
    lost_message,
    missing_object,
    other_key,
    quote,
    retryable,
    roll_back,
    unconvertible,
    value_refused,
)
from oncely.sql.connections import arun as sql_arun
from oncely.sql.connections import run as sql_run
from oncely.statemachine.definition import (
    MAX_ENTITY_ID,
    MAX_KEY,
    HistoryEntry,
    Machine,
    Outcome,
    Transition,
    check_entity,
    check_key,
    explain,
)

__all__ = [
    "DEFAULT_HISTORY",
    "Hook",
    "HookCall",
    "SqlStateMachine",
    "Table",
    "table_of",
]

DEFAULT_HISTORY: Final = "oncely_sm_history"
#: Tries of a transition that owns its transaction and meets a serialization failure.
_ATTEMPTS: Final = 20

_NOW: Final = {
    "postgresql": "extract(epoch from clock_timestamp())",
    "mysql": "UNIX_TIMESTAMP(NOW(6))",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}


def _text(value: Any) -> Any:
    """A history column read back: bytes on MariaDB/MySQL (:func:`exact_text` columns)."""
    return value.decode() if isinstance(value, (bytes, bytearray)) else value


def _message_id(machine: str, entity: str, transition: str, history_id: int) -> str:
    """``"<machine>:<entity>:<transition>:<history id>"``; past 255 characters the entity's
    sha256 stands for the entity."""
    message_id = f"{machine}:{entity}:{transition}:{history_id}"
    if len(message_id) > 255:
        digest = hashlib.sha256(entity.encode()).hexdigest()
        message_id = f"{machine}:sha256-{digest}:{transition}:{history_id}"
    return message_id


def _update_returning(c: SqlConnection) -> bool:
    """``UPDATE ... RETURNING``: PostgreSQL, SQLite >= 3.35; MariaDB has it for ``INSERT`` and
    ``DELETE`` only, MySQL not at all."""
    return c.returning and c.dialect != "mysql"


@dataclass(frozen=True, slots=True)
class Table:
    """A plain table: its name (``schema.table`` allowed), id column and state column."""

    name: str
    id_column: str = "id"
    state_column: str = "state"

    def __post_init__(self) -> None:
        """:raises ConfigurationError: a name that is not a plain SQL identifier."""
        from oncely.messaging.inbox import check_table

        check_table(self.name, "name")
        for param in ("id_column", "state_column"):
            if "." in check_table(getattr(self, param), param):
                raise ConfigurationError(f"{param}={getattr(self, param)!r}: give a column name")


def table_of(model: Any, state_field: str = "state") -> Table:
    """The :class:`Table` of a SQLAlchemy declarative model or a Django model class (its table,
    primary key column and the column of ``state_field``).

    :raises ConfigurationError: not a model, a composite primary key, no such field.
    """
    if isinstance(model, Table):
        return model
    meta = getattr(model, "_meta", None)
    if meta is not None and hasattr(meta, "db_table"):  # Django
        try:
            column = meta.get_field(state_field).column
        except Exception:
            raise ConfigurationError(
                f"Django model {model.__name__} has no field {state_field!r}: pass "
                "state_field= the name of its state field"
            ) from None
        return Table(meta.db_table, meta.pk.column, column)
    table = getattr(model, "__table__", None)
    if table is not None and hasattr(table, "primary_key"):  # SQLAlchemy
        pk = list(table.primary_key.columns)
        if len(pk) != 1:
            raise ConfigurationError(
                f"{model.__name__} has a composite primary key: a state machine needs one id column"
            )
        try:
            column = getattr(model, state_field).property.columns[0].name
        except Exception:
            raise ConfigurationError(
                f"SQLAlchemy model {model.__name__} has no column attribute {state_field!r}: "
                "pass state_field= the attribute holding the state"
            ) from None
        name = f"{table.schema}.{table.name}" if table.schema else table.name
        return Table(name, pk[0].name, column)
    raise ConfigurationError(
        f"{model!r} is neither a Table, a SQLAlchemy model nor a Django model: pass "
        "Table('orders', id_column='id', state_column='state')"
    )


@dataclass(frozen=True, slots=True)
class HookCall:
    """What a hook gets: ``conn`` (the connection the caller passed, inside the transaction for
    in-transaction hooks), the machine, the :class:`~oncely.statemachine.definition.Outcome`,
    the call's ``data`` and idempotency ``key``."""

    conn: Any
    machine: Machine
    outcome: Outcome
    data: Mapping[str, Any]
    key: str | None


#: A hook: called with a :class:`HookCall`; async connections may use ``async def`` hooks.
Hook = Callable[[HookCall], Any]


class _RunHook(NamedTuple):
    hook: Hook
    call: HookCall


@dataclass(frozen=True, slots=True)
class _Queries:
    update: dict[str, str] = field(default_factory=dict)
    select_row: str = ""
    insert_history: str = ""
    select_key: str = ""
    #: the key's history row (transition, state: NULL if none), 1 if the entity row exists,
    #: then the entity row's columns: one statement for a call with a key that did not apply
    select_key_row: str = ""
    select_history: str = ""
    #: ``insert_history`` ends in ``RETURNING id`` (else the id is the cursor's ``lastrowid``)
    history_returning: bool = False


class SqlStateMachine:
    """A machine on a SQL table. Sync and async faces share one plan.

    :param machine: the :class:`~oncely.statemachine.definition.Machine`.
    :param table: a :class:`Table`, a SQLAlchemy model or a Django model class.
    :param state_field: the model attribute holding the state (models only).
    :param history_table: the audit history table (create it with :meth:`create_tables`).
    :param outbox_table: if set, each applied transition also writes a message into this
        :class:`~oncely.messaging.outbox.Outbox` table in the same transaction (topic
        ``"<machine>.<transition>"``, a stable message id, the transition and ``data`` as a
        JSON payload; see the module docstring), published after commit by oncely's
        :class:`~oncely.messaging.outbox.Relay` (at least once, unlike ``after_commit``).
        :meth:`create_tables` creates the Outbox table.
    :param hooks: in-transaction hooks, run after an applied change and before commit; one
        that raises rolls the change back and its error propagates.
    :param after_commit: callbacks run once the transaction this call opened has committed
        (at most once: a crash right after the commit skips them; use ``outbox_table`` for
        effects that must happen). They need the call to own its transaction: inside a
        caller's transaction they are refused with :class:`~oncely.errors.ConfigurationError`.
    """

    def __init__(
        self,
        machine: Machine,
        table: Table | Any,
        *,
        state_field: str = "state",
        history_table: str = DEFAULT_HISTORY,
        outbox_table: str | None = None,
        hooks: Sequence[Hook] = (),
        after_commit: Sequence[Hook] = (),
    ) -> None:
        if not isinstance(machine, Machine):
            raise ConfigurationError("SqlStateMachine needs a Machine as its first argument")
        self.machine = machine
        from oncely.messaging.inbox import check_table

        text(state_field, "state_field", where="SqlStateMachine")
        self.table = table_of(table, state_field)
        self.history_table = check_table(history_table, "history_table")
        self.outbox_table = outbox_table
        if outbox_table is not None:
            check_table(outbox_table, "outbox_table")
        self.outbox: Any = None
        if outbox_table:
            from oncely.messaging.outbox import Outbox  # only a machine with an outbox needs it

            self.outbox = Outbox(outbox_table)
        self.hooks = tuple(hooks)
        self.after_commit = tuple(after_commit)

    # -- statements ------------------------------------------------------------------------
    @lru_cache(maxsize=8)  # noqa: B019 - a few dialects per machine, machines live long
    def _queries(self, dialect: str, returning: bool, insert_returning: bool) -> _Queries:
        from oncely.sql.connections import quote

        d: Any = dialect
        t = quote(self.table.name, d)
        idc = quote(self.table.id_column, d)
        st = quote(self.table.state_column, d)
        h = quote(self.history_table, d)
        lock = " LOCK IN SHARE MODE" if dialect == "mysql" else ""
        update = {}
        for tr in self.machine.transitions:
            marks = ", ".join(f":s{i}" for i in range(len(tr.sources)))
            sql = f"UPDATE {t} SET {st} = :target WHERE {idc} = :id AND {st} IN ({marks})"
            update[tr.name] = sql + (" RETURNING *" if returning else "")
        ignore = "INSERT IGNORE INTO" if dialect == "mysql" else "INSERT INTO"
        conflict = "" if dialect == "mysql" else " ON CONFLICT DO NOTHING"
        history = (
            f"{ignore} {h} (machine, entity_id, transition, state, idem_key, at) VALUES "
            f"(:machine, :entity, :transition, :state, :key, {_NOW[dialect]}){conflict}"
            + (" RETURNING id" if insert_returning else "")
        )
        return _Queries(
            update=update,
            select_row=f"SELECT * FROM {t} WHERE {idc} = :id{lock}",
            insert_history=history,
            select_key_row=(
                f"SELECT k.transition, k.state, CASE WHEN e.{idc} IS NULL THEN 0 ELSE 1 END, "
                f"e.* FROM (SELECT 1 AS oncely_one) d LEFT JOIN {h} k ON k.machine = :machine "
                f"AND k.entity_id = :entity AND k.idem_key = :key LEFT JOIN {t} e ON "
                f"e.{idc} = :id{lock}"
            ),
            select_key=(
                f"SELECT transition, state FROM {h} WHERE machine = :machine AND "
                f"entity_id = :entity AND idem_key = :key{lock}"
            ),
            select_history=(
                f"SELECT entity_id, transition, state, at, idem_key FROM {h} WHERE "
                "machine = :machine AND entity_id = :entity ORDER BY id"
            ),
            history_returning=insert_returning,
        )

    def ddl(self, dialect: str) -> list[str]:
        """The ``CREATE`` statements of the history (and outbox) tables for ``dialect``."""
        from oncely.sql.connections import quote

        d: Any = dialect
        serial = {
            "postgresql": "BIGSERIAL PRIMARY KEY",
            "mysql": "BIGINT AUTO_INCREMENT PRIMARY KEY",
            "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
        }[dialect]
        ts = {"postgresql": "DOUBLE PRECISION", "mysql": "DOUBLE", "sqlite": "REAL"}[dialect]
        engine = " ENGINE=InnoDB" if dialect == "mysql" else ""
        h = quote(self.history_table, d)
        uniq = quote(f"{self.history_table.split('.')[-1]}_key", d)
        machine, entity, key = (exact_text(d, n) for n in (100, MAX_ENTITY_ID, MAX_KEY))
        out = [
            f"CREATE TABLE IF NOT EXISTS {h} (id {serial}, machine {machine} NOT NULL, "
            f"entity_id {entity} NOT NULL, transition VARCHAR(64) NOT NULL, "
            f"state VARCHAR(64) NOT NULL, idem_key {key} NULL, at {ts} NOT NULL, "
            f"CONSTRAINT {uniq} UNIQUE (machine, entity_id, idem_key)){engine}",
        ]
        if self.outbox is not None:
            out.extend(self.outbox.schema_sql(d))
        return out

    # -- plans ------------------------------------------------------------------------------
    def _create_plan(self, c: SqlConnection) -> Plan[None]:
        yield from exec_in_block(self.ddl(c.dialect))

    def _replay(self, t: Transition, entity_id: Any, key: str, found: Any) -> Outcome:
        transition, state = found.rows[0][0], found.rows[0][1]
        if transition != t.name:
            raise IdempotencyKeyMismatch(
                f"idempotency key {key!r} was used for {self.machine.name}.{transition} of "
                f"{entity_id!r}, not {t.name!r}: a new operation needs a new key"
            )
        return Outcome(entity_id, t.name, state, applied=False, replayed=True)

    def _outbox_plan(
        self, c: SqlConnection, entry: dict[str, Any], history_id: int, data: Mapping[str, Any]
    ) -> Plan[str]:
        """The applied transition's message, in the Outbox's format (see the module doc); its
        id comes from the history row this transition just inserted (no statement of its
        own)."""
        m, entity, name = entry["machine"], entry["entity"], entry["transition"]
        message_id = _message_id(m, entity, name, history_id)
        body = {
            "machine": m,
            "entity_id": entity,
            "transition": name,
            "state": entry["state"],
            "key": entry["key"],
            "data": dict(data),
        }
        payload = self._payload(body)  # checked by _prepare: it cannot fail here
        mid: str = yield from self.outbox.add_plan(c, f"{m}.{name}", payload, message_id=message_id)
        return mid

    def _payload(self, value: Any) -> str:
        """``value`` (the call's data, or the message body holding it) as the outbox's JSON
        text; :class:`~oncely.errors.ConfigurationError` for NaN, Infinity or an object JSON
        has no form for (:func:`oncely.codecs.stored_json`)."""
        return stored_json(
            value,
            f"{self.machine.name}: data (with outbox_table=, the outbox message carries it)",
            default=to_jsonable,
        )

    def _missing(self, exc: BaseException) -> BaseException | None:
        """The typed error for a driver error: a missing table or column, or a value the
        database refused (:func:`~oncely.sql.connections.value_refused`, as every mechanism
        writing in the caller's tables); None for anything else."""
        if isinstance(exc, OncelyError):
            return None
        missing = missing_object(exc)
        if missing is None:
            # the transition's block (a savepoint, or its own transaction) was rolled back
            return value_refused(exc, f"{self.machine.name} on {self.table.name}")
        text = str(missing)
        if self.history_table in text or (self.outbox_table and self.outbox_table in text):
            return SchemaMissing(
                f"{text}: create the state machine's history/outbox tables once with "
                "SqlStateMachine.create_tables(conn) (then roll back this transaction and retry)"
            )
        return missing

    def _check_key(self, entity_id: Any, res: Result) -> None:
        """Raise :class:`~oncely.errors.InvalidEntityId` when the row ``entity_id`` matched
        holds another key (:func:`~oncely.sql.connections.other_key`: the database converted
        the id to compare it). The history, the idempotency key and the outbox message would be
        recorded under the caller's spelling, which :meth:`history` of the row's key never
        finds."""
        found = other_key(self.table.id_column, entity_id, res)
        if found is not None:
            raise InvalidEntityId(
                f"entity id {entity_id!r} matched the row whose {self.table.id_column} is "
                f"{found!r} (the database converted it to compare): its history would be "
                f"recorded under {str(entity_id)!r}, where history({found!r}) never finds it. "
                f"Pass the key as the row holds it ({found!r}); nothing was changed"
            )

    def _apply_plan(
        self,
        c: SqlConnection,
        conn: Any,
        t: Transition,
        entity_id: Any,
        key: str | None,
        data: Mapping[str, Any],
    ) -> Plan[Outcome]:
        """The transition, run again when it owns its transaction and the database rolled it
        back as a serialization failure or deadlock (PostgreSQL at REPEATABLE READ or
        SERIALIZABLE answers a concurrent change of the row with 40001 instead of re-checking
        the ``WHERE``): the retry sees the winner's committed state and answers as at READ
        COMMITTED; so is SQLite's "database is locked". Inside the caller's transaction (or
        when the attempts run out) it is raised as :class:`~oncely.errors.DatabaseBusy`
        (:func:`oncely.sql.busy`): only the caller can run its whole transaction again."""
        owned = not c.in_transaction()
        attempt = 0
        while True:
            attempt += 1
            try:
                return (yield from self._apply_once(c, conn, t, entity_id, key, data))
            except Exception as exc:
                if owned and attempt < _ATTEMPTS and retryable(exc):
                    continue
                typed = busy(exc, f"{self.machine.name}.{t.name} of {entity_id!r}")
                if typed is exc:
                    raise
                raise typed from exc

    def _apply_once(
        self,
        c: SqlConnection,
        conn: Any,
        t: Transition,
        entity_id: Any,
        key: str | None,
        data: Mapping[str, Any],
    ) -> Plan[Outcome]:
        check_entity(entity_id)
        returning = _update_returning(c)
        q = self._queries(c.dialect, returning, c.returning)
        m = self.machine.name
        block = yield Enter(savepoint=True, held=bool(self.hooks))
        open_block = True
        try:
            if self.after_commit and not block.owned:
                raise ConfigurationError(
                    "after_commit callbacks need the transition to own its transaction, but "
                    "the connection is already inside one: call apply() outside a transaction, "
                    "or use outbox_table= for effects after the caller's commit"
                )
            params: dict[str, Any] = {"id": entity_id, "target": t.target}
            params.update({f"s{i}": s for i, s in enumerate(t.sources)})
            try:
                res = yield Exec(q.update[t.name], params)
            except Exception as exc:
                if isinstance(entity_id, str) and unconvertible(exc, entity_id):
                    raise InvalidEntityId(
                        f"entity id {entity_id!r} is not a value of the "
                        f"{self.table.id_column} column's type (the database refused to "
                        f"convert it: {str(exc).strip()}); pass the key as the row holds it "
                        "(3, not '3.0'); nothing was changed"
                    ) from exc
                raise
            applied = bool(res.rows) if returning else res.rowcount > 0
            if applied:
                if returning:
                    self._check_key(entity_id, res)
                entry = {
                    "machine": m,
                    "entity": str(entity_id),
                    "transition": t.name,
                    "state": t.target,
                    "key": key,
                }
                hist = yield Exec(q.insert_history, entry)
                history_id: Any
                if q.history_returning:
                    inserted = bool(hist.rows)
                    history_id = hist.rows[0][0] if inserted else None
                else:  # MySQL, MariaDB < 10.5, SQLite < 3.35: the driver's last insert id
                    inserted = hist.rowcount > 0
                    history_id = hist.lastrowid
                if not inserted:  # the key was used before, for another transition
                    open_block = False
                    yield Leave(block, False)
                    found = yield Exec(
                        q.select_key, {"machine": m, "entity": str(entity_id), "key": key}
                    )
                    return self._replay(t, entity_id, str(key), found)
                if not returning:  # read after the history row: a used key needs no row
                    res = yield Exec(q.select_row, {"id": entity_id})
                    self._check_key(entity_id, res)  # rolls the history row back with the rest
                row = dict(zip(res.columns, res.rows[0])) if res.rows else {}
                if not history_id and (self.outbox is not None or self.hooks):  # no lastrowid
                    last = "last_insert_rowid()" if c.dialect == "sqlite" else "LAST_INSERT_ID()"
                    history_id = (yield Exec(f"SELECT {last}", {})).rows[0][0]
                outcome = Outcome(entity_id, t.name, t.target, applied=True, row=row)
                if self.outbox is not None:
                    yield from self._outbox_plan(c, entry, int(history_id), data)
                for hook in self.hooks:
                    yield _RunHook(hook, HookCall(conn, self.machine, outcome, data, key))
                open_block = False
                if self.hooks:  # a hook that ended the transaction: commit nothing more
                    # the history row: only this transaction can have written its id
                    yield from commit_if_held(
                        c,
                        block,
                        quote(self.history_table, c.dialect),
                        "id = :history_id",
                        {"history_id": history_id},
                        lost_message("a transition hook", "the transition's history row"),
                    )
                else:
                    yield Leave(block, True)
                for hook in self.after_commit:
                    yield _RunHook(hook, HookCall(conn, self.machine, outcome, data, key))
                return outcome
            if key is not None:  # the key's history row and the entity row, one statement
                both = yield Exec(
                    q.select_key_row,
                    {"machine": m, "entity": str(entity_id), "key": key, "id": entity_id},
                )
                open_block = False
                yield Leave(block, True)
                first = both.rows[0]
                res = Result([first[3:]] if first[2] else [], -1, both.columns[3:])
                self._check_key(entity_id, res)
                if first[0] is not None:  # the key was used: a replay
                    return self._replay(t, entity_id, key, both)
            else:
                res = yield Exec(q.select_row, {"id": entity_id})
                open_block = False
                yield Leave(block, True)
                self._check_key(entity_id, res)
            if not res.rows:
                current = None
                row = {}
            else:
                row = dict(zip(res.columns, res.rows[0]))
                current = row.get(self.table.state_column)
                if current is None:  # a driver that upper-cases names
                    current = res.rows[0][
                        [col.lower() for col in res.columns].index(self.table.state_column.lower())
                    ]
            current = _text(current)  # a binary column's bytes on MariaDB/MySQL
            return explain(self.machine, t, entity_id, current, row, exists=bool(res.rows))
        except BaseException as exc:
            if open_block:
                open_block = False
                yield from roll_back(block, exc)
            better = self._missing(exc) if isinstance(exc, Exception) else None
            if better is not None and better is not exc:
                raise better from exc
            raise

    def apply_plan(
        self,
        conn: SqlConnection,
        entity_id: Any,
        transition: str,
        *,
        key: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Plan[Outcome]:
        """:meth:`apply` as a sans-IO plan on an adapted connection, for mechanisms that compose
        it with their own statements (the saga does). Hooks are yielded as requests the
        executor of :meth:`apply` knows; a machine without hooks yields only ``Exec``,
        ``Enter`` and ``Leave``."""
        t, key, payload = self._prepare(transition, key, data)
        return self._apply_plan(conn, conn.raw, t, entity_id, key, payload)

    def _history_plan(self, c: SqlConnection, entity_id: Any) -> Plan[list[HistoryEntry]]:
        check_entity(entity_id)
        q = self._queries(c.dialect, _update_returning(c), c.returning)
        try:
            res = yield Exec(
                q.select_history, {"machine": self.machine.name, "entity": str(entity_id)}
            )
        except Exception as exc:
            better = self._missing(exc)
            if better is not None:
                raise better from exc
            raise
        return [HistoryEntry(_text(r[0]), r[1], r[2], float(r[3]), _text(r[4])) for r in res.rows]

    # -- the state machine's own request: everything else runs on oncely.sql.connections ----
    @staticmethod
    def _run_hook(r: Any) -> Any:
        if not isinstance(r, _RunHook):
            raise TypeError(f"unknown request {r!r}")
        result = r.hook(r.call)
        if inspect.isawaitable(result):
            raise ConfigurationError(
                f"hook {r.hook!r} is async but the connection is sync: use a plain "
                "function, or an async connection and aapply()"
            )
        return result

    @staticmethod
    async def _arun_hook(r: Any) -> Any:
        if not isinstance(r, _RunHook):
            raise TypeError(f"unknown request {r!r}")
        result = r.hook(r.call)
        if inspect.isawaitable(result):
            result = await result
        return result

    # -- public faces -------------------------------------------------------------------------
    def create_tables(self, conn: Any) -> None:
        """Create the history (and outbox) tables if missing; commits when no transaction was
        open. The entity table is the user's own."""
        c = adapt(conn)
        sql_run(self._create_plan(c), c, self._run_hook)

    async def acreate_tables(self, conn: Any) -> None:
        """The async face of :meth:`create_tables`."""
        c = adapt(conn)
        await sql_arun(self._create_plan(c), c, self._arun_hook)

    def _prepare(
        self, transition: str, key: str | None, data: Mapping[str, Any] | None
    ) -> tuple[Transition, str | None, Mapping[str, Any]]:
        t = self.machine.transition(transition)
        key = check_key(key)
        self.machine.guard(t, data)
        payload = dict(data or {})
        if self.outbox is not None:  # refused before any statement, not half-way
            self._payload(payload)
        return t, key, payload

    def apply(
        self,
        conn: Any,
        entity_id: Any,
        transition: str,
        *,
        key: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Apply ``transition`` to the entity ``entity_id`` (its id column's value).

        :param key: optional idempotency key (at most 255 characters): the same key again is the
            same outcome (``replayed=True``), even after the state has moved on.
        :param data: the call's data, for the guard, hooks and the outbox row (JSON-able: with
            ``outbox_table=``, NaN, Infinity and objects JSON has no form for are refused with
            :class:`~oncely.errors.ConfigurationError` before anything is written).
        :returns: the :class:`~oncely.statemachine.definition.Outcome`; ``applied`` is True
            only for the call that changed the state.
        :raises UnknownTransition: no such transition in the machine.
        :raises GuardRejected: the guard refused ``data``.
        :raises ConfigurationError: ``data`` cannot be the outbox message's JSON.
        :raises IllegalTransition: the current state allows neither this transition nor is it
            its target (carries ``current`` and ``allowed``).
        :raises EntityNotFound: no row with this id.
        :raises EntityStateInvalid: the row's state is NULL or not one of the machine's states.
        :raises IdempotencyKeyMismatch: ``key`` was used for another transition of this entity.
        :raises SchemaMissing: the history table is missing (:meth:`create_tables`).
        :raises DatabaseBusy: a deadlock, serialization failure, lock wait that ran out or
            SQLite "database is locked" that retrying (when ``apply`` owns the transaction)
            did not get past; nothing was changed: roll back (if yours) and run it again.
        :raises UnknownTable: / :raises UnknownColumn: the entity table or its columns are not
            there (check :class:`Table`).
        """
        t, key, payload = self._prepare(transition, key, data)
        c = adapt(conn)
        plan = self._apply_plan(c, conn, t, entity_id, key, payload)
        outcome: Outcome = sql_run(plan, c, self._run_hook)
        return outcome

    async def aapply(
        self,
        conn: Any,
        entity_id: Any,
        transition: str,
        *,
        key: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """The async face of :meth:`apply` (psycopg ``AsyncConnection``, aiomysql, SQLAlchemy
        ``AsyncConnection``/``AsyncSession``); hooks may be ``async def``."""
        t, key, payload = self._prepare(transition, key, data)
        c = adapt(conn)
        plan = self._apply_plan(c, conn, t, entity_id, key, payload)
        outcome: Outcome = await sql_arun(plan, c, self._arun_hook)
        return outcome

    def history(self, conn: Any, entity_id: Any) -> list[HistoryEntry]:
        """The entity's applied transitions, oldest first."""
        c = adapt(conn)
        entries: list[HistoryEntry] = sql_run(self._history_plan(c, entity_id), c, self._run_hook)
        return entries

    async def ahistory(self, conn: Any, entity_id: Any) -> list[HistoryEntry]:
        """The async face of :meth:`history`."""
        c = adapt(conn)
        plan = self._history_plan(c, entity_id)
        entries: list[HistoryEntry] = await sql_arun(plan, c, self._arun_hook)
        return entries
