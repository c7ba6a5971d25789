"""One atomic decision, one round trip: operations that sent an extra statement per call
(a count probe, a check before the commit) are counted here on real connections
(:mod:`roundtrips`), per dialect."""

from __future__ import annotations

import json
from typing import Any

import pytest

from oncely.sql.connections import adapt
from oncely.statemachine import Machine, Transition
from oncely.statemachine.sql import SqlStateMachine, Table
from roundtrips import counts, traced

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

ORDER = Machine(
    "order",
    ["pending", "paid", "cancelled"],
    "pending",
    [
        Transition("pay", "pending", "paid"),
        Transition("cancel", ["pending", "paid"], "cancelled"),
        Transition("reopen", "cancelled", "pending"),
    ],
)


def _text(value: Any) -> str:
    return bytes(value).decode() if isinstance(value, (bytes, bytearray, memoryview)) else value


def _machine(db: Db, **options: Any) -> tuple[SqlStateMachine, str]:
    table = db.name("rt_orders")
    db.run(f"CREATE TABLE {table} (id INT PRIMARY KEY, status VARCHAR(20))")
    db.run(f"INSERT INTO {table} VALUES (1, 'pending'), (2, 'pending')")
    sm = SqlStateMachine(
        ORDER,
        Table(table, "id", "status"),
        history_table=db.name("rt_hist"),
        outbox_table=db.name("rt_outbox"),
        **options,
    )
    conn = db.connect()
    sm.create_tables(conn)
    conn.commit()
    return sm, table


def _message_ids(db: Db, sm: SqlStateMachine) -> list[str]:
    return [_text(m) for (m,) in db.run(f"SELECT message_id FROM {sm.outbox_table} ORDER BY id")]


def _history_ids(db: Db, sm: SqlStateMachine) -> list[int]:
    return [int(i) for (i,) in db.run(f"SELECT id FROM {sm.history_table} ORDER BY id")]


# -- the state machine's outbox message id ----------------------------------------------------
def test_outbox_message_id_costs_no_statement(db: Db) -> None:
    """The message id comes from the history row the transition inserts: the history table is
    written once and never counted (the old id counted the entity's history rows with a
    SELECT COUNT(*) per applied transition)."""
    sm, _table = _machine(db)
    conn, log = traced(db)
    assert sm.apply(conn, 1, "pay", key="p1").applied
    history = [s for s in log if sm.history_table in s]
    assert len(history) == 1 and history[0].lstrip().upper().startswith("INSERT"), log
    assert counts(log, "count(") == 0, log
    assert _message_ids(db, sm) == [f"order:1:pay:{_history_ids(db, sm)[0]}"]
    log.clear()  # a replay writes no message and no history row
    assert sm.apply(conn, 1, "pay", key="p1").replayed
    assert counts(log, "count(") == 0 and len(_message_ids(db, sm)) == 1


def test_outbox_message_id_never_repeats_after_history_is_deleted(db: Db) -> None:
    """Deleting an entity's history rows (a purge) made the next transition count the same n
    again: the same message id as an earlier message, which the outbox's unique message id
    silently dropped (and a consumer deduplicating by id would drop too)."""
    sm, _table = _machine(db)
    conn = db.connect()
    for name in ("pay", "cancel", "reopen"):
        assert sm.apply(conn, 1, name).applied
    db.run(f"DELETE FROM {sm.history_table}")
    assert sm.apply(conn, 1, "pay").applied  # the second pay of entity 1
    ids = _message_ids(db, sm)
    assert len(ids) == 4 and len(set(ids)) == 4, ids
    assert ids[0].startswith("order:1:pay:") and ids[3].startswith("order:1:pay:")


def _no_returning(c: Any) -> Any:
    """``c`` as a connection without ``INSERT ... RETURNING`` (MySQL, MariaDB < 10.5): the
    history id is then the driver's last insert id."""
    base = type(c)
    cls = type(f"NoReturning{base.__name__}", (base,), {"returning": property(lambda s: False)})
    c.__class__ = cls
    return c


@pytest.mark.parametrize("driver", ["dbapi", "sqlalchemy"])
def test_outbox_message_id_from_lastrowid_where_insert_has_no_returning(
    db: Db, driver: str
) -> None:
    """Without INSERT ... RETURNING the id is the cursor's lastrowid, no statement either."""
    sm, _table = _machine(db)
    if db.dialect == "postgresql":
        pytest.skip("PostgreSQL always has RETURNING (psycopg has no lastrowid)")
    if driver == "dbapi":
        raw, log = traced(db)
        assert sm.apply(_no_returning(adapt(raw)), 1, "pay").applied
        assert counts(log, "count(") == 0 and counts(log, "last_insert") == 0, log
    else:
        import sqlalchemy as sa

        engine = sa.create_engine(db.url())
        sent: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", lambda *a: sent.append(str(a[2])))
        try:
            with engine.connect() as raw:
                assert sm.apply(_no_returning(adapt(raw)), 1, "pay").applied
            assert counts(sent, "count(") == 0 and counts(sent, "last_insert") == 0, sent
        finally:
            engine.dispose()
    [hid] = _history_ids(db, sm)
    assert _message_ids(db, sm) == [f"order:1:pay:{hid}"]


async def test_outbox_message_id_async_drivers(db: Db) -> None:
    """psycopg AsyncConnection (RETURNING id) and aiomysql (lastrowid, RETURNING switched off)."""
    sm, _table = _machine(db)
    conn = await db.aconnect()
    try:
        c = adapt(conn)
        if db.dialect == "mysql":
            c = _no_returning(c)
        assert (await sm.aapply(c, 1, "pay")).applied
        assert (await sm.aapply(c, 1, "cancel")).applied
    finally:
        await db.aclose()
    h = _history_ids(db, sm)
    assert _message_ids(db, sm) == [f"order:1:pay:{h[0]}", f"order:1:cancel:{h[1]}"]


# -- the "is our row still in this transaction" check before a commit -------------------------
class _Held:
    """One mechanism whose block runs user code and then commits only if its row is still in
    the transaction: ``run(conn, body)`` runs ``body(conn)`` inside it."""

    def __init__(self, db: Db, kind: str) -> None:
        self.db, self.kind = db, kind
        self.effects = db.name("rt_effects")
        db.run(f"CREATE TABLE {self.effects} (name VARCHAR(50))")
        setup = db.connect()
        if kind == "inbox":
            from oncely.messaging.inbox import Inbox

            self.inbox = Inbox(db.name("rt_inbox"))
            self.inbox.create_table(setup)
        elif kind.startswith("transaction"):
            from oncely.sql import create_tables

            self.keys = db.name("rt_keys")
            create_tables(setup, self.keys)
        else:
            self.sm, _ = _machine(db, hooks=[lambda call: self.body(call.conn)])
        setup.commit()
        setup.close()
        db._opened.remove(setup)
        self.body: Any = None

    def effect(self, conn: Any, name: str) -> None:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {self.effects} (name) VALUES ('{name}')")
        cur.close()

    def effect_names(self) -> list[str]:
        return sorted(n for (n,) in self.db.run(f"SELECT name FROM {self.effects}"))

    def run(self, conn: Any, body: Any, ident: int = 1) -> None:
        """One operation (message, key, entity ``ident``: 1 or 2) with ``body`` inside."""
        self.body = body
        if self.kind == "inbox":
            with self.inbox.receive(conn, "billing", f"m{ident}") as first:
                assert first
                body(conn)
        elif self.kind.startswith("transaction"):
            from oncely.sql import GLOBAL, transaction

            with transaction(
                conn, operation="op", key=f"k{ident}", scope=GLOBAL, table=self.keys
            ) as tx:
                assert not tx.replayed
                body(conn)
                if self.kind == "transaction+result":
                    tx.set_result({"by": id(conn)})  # each connection its own result
        else:
            assert self.sm.apply(conn, ident, "pay").applied


HELD = ["inbox", "transaction", "transaction+result", "statemachine-hook"]


@pytest.mark.parametrize("kind", HELD)
def test_the_held_check_rides_with_the_commit(db: Db, kind: str) -> None:
    """SQLite and MariaDB sent a SELECT count(*) of the row before the COMMIT; the commit is
    now RELEASE SAVEPOINT of the savepoint the block began with, which fails if the
    transaction ended (one statement). PostgreSQL: the check is pipelined with the COMMIT."""
    held = _Held(db, kind)
    conn, log = traced(db)
    held.run(conn, lambda c: held.effect(c, "e1"))
    assert held.effect_names() == ["e1"]
    if db.dialect == "postgresql":
        assert log[-1] == "COMMIT" and "txid_current_if_assigned" in log[-2], log
        return
    assert counts(log, "count(") == 0, log
    assert "RELEASE SAVEPOINT" in log[-1] and counts(log, "COMMIT") <= 1, log
    # statements in all (SQLite) / round trips (MariaDB): begin, the row, the body's write,
    # the result UPDATE if any, the state machine's row read (MariaDB: no UPDATE RETURNING),
    # history and outbox inserts, the commit
    expected = {"inbox": 4, "transaction": 4, "transaction+result": 5}.get(kind)
    if expected is None:
        expected = 6 if db.dialect == "sqlite" else 7
    assert len(log) == expected, log


@pytest.mark.parametrize("kind", HELD)
def test_the_held_check_is_not_fooled_by_a_concurrent_commit_of_the_same_row(
    db: Db, kind: str
) -> None:
    """User code rolls back the block's transaction, another connection then commits the same
    row (the same inbox message, key, transition), and the user code writes again. The old
    SQLite/MariaDB check (SELECT count(*) of the row) found the other transaction's row and
    committed the later write without ours (and, with a result, wrote our result over the
    other's row); the savepoint the block began with is gone, so it raises TransactionLost and
    commits nothing. (PostgreSQL was not fooled: only a row this transaction wrote counts.)"""
    from oncely.errors import TransactionLost

    held = _Held(db, kind)
    conn = db.connect()
    rival = db.connect()

    def body(c: Any) -> None:
        held.effect(c, "before")
        c.rollback()
        held.body = lambda c2: held.effect(c2, "rival")
        held.run(rival, held.body)  # the same message / key / transition, committed
        held.body = body
        held.effect(c, "after")

    with pytest.raises(TransactionLost):
        held.run(conn, body)
    conn.rollback()
    assert held.effect_names() == ["rival"]
    if kind == "transaction+result":
        [(result,)] = held.db.run(f"SELECT result FROM {held.keys}")
        assert json.loads(bytes(result)) == {"by": id(rival)}  # the rival's, not overwritten


# -- a saga's start: a new saga's row is what its INSERT wrote ----------------------------------
def test_a_new_saga_is_started_with_one_statement(db: Db) -> None:
    """The saga's start inserted its row and then always read it back; a new row is what the
    INSERT wrote, so only a saga that already exists is read (its state and stored data)."""
    from oncely.statemachine.saga import Saga, Step

    table = db.name("rt_saga")
    db.tables.append(f"{table}_history")
    steps = [Step("one", lambda ctx: None)]
    saga = Saga("rt", steps, table=table, barrier_table=db.name("rt_barrier"))
    setup = db.connect()
    saga.create_tables(setup)
    setup.commit()
    conn, log = traced(db)
    assert saga.run(conn, "s1", {"n": 1}).state == "completed"
    assert [s for s in log if "SELECT state, name, data" in s] == [], log
    log.clear()  # a run of a saga that exists reads its row, once
    assert saga.run(conn, "s1", {"n": 1}).executed == ()
    assert len([s for s in log if "SELECT state, name, data" in s]) == 1, log


# -- a transition with a key that did not apply: its explanation is one read -------------------
def test_a_keyed_call_that_did_not_apply_is_explained_by_one_read(db: Db) -> None:
    """A call with an idempotency key whose UPDATE changed nothing read the key's history row,
    then (no such row) the entity row: two statements; now one reads both. On MariaDB (no
    UPDATE RETURNING) a transition that applied but whose key was used for another one read
    the entity row before finding that out: the row is now read after the history row."""
    from oncely.errors import EntityNotFound, IdempotencyKeyMismatch, IllegalTransition

    sm, _table = _machine(db)
    conn, log = traced(db)
    assert sm.apply(conn, 1, "pay", key="k1").applied

    def reads() -> int:
        return sum(s.lstrip().upper().startswith("SELECT") for s in log)

    for call, expected in [
        (lambda: sm.apply(conn, 1, "pay", key="k2"), "already"),  # a new key, already paid
        (lambda: sm.apply(conn, 1, "pay", key="k1"), "replayed"),
        (lambda: sm.apply(conn, 1, "reopen", key="k3"), IllegalTransition),
        (lambda: sm.apply(conn, 1, "cancel", key="k1"), IdempotencyKeyMismatch),
        (lambda: sm.apply(conn, 9, "pay", key="k4"), EntityNotFound),
    ]:
        log.clear()
        if isinstance(expected, str):
            outcome = call()
            assert not outcome.applied and outcome.replayed == (expected == "replayed")
            assert outcome.state == "paid"
        else:
            with pytest.raises(expected):
                call()
        assert reads() == 1, log


# -- SQLAlchemy on psycopg: the statement that ends a block goes with the COMMIT --------------
@pytest.mark.parametrize("make_db_dialect", ["postgresql"])
@pytest.mark.parametrize("kind", ["transaction+result", "statemachine-hook"])
def test_sqlalchemy_psycopg_sends_the_last_statement_with_the_commit(
    make_db: Any, make_db_dialect: str, kind: str
) -> None:
    """Raw psycopg sent the last statement of a block it owns (the result UPDATE, the held
    check) and the COMMIT in one pipeline; through SQLAlchemy they were two round trips. Now
    the same on the wire: counted by libpq's trace, SQLAlchemy's round trips equal psycopg's."""
    import sqlalchemy as sa

    from roundtrips import PgWire

    db = make_db(make_db_dialect)
    held = _Held(db, kind)
    raw = db.connect()
    with PgWire(raw) as direct:
        held.run(raw, lambda c: held.effect(c, "raw"))
    engine = sa.create_engine(db.url())
    try:
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            insert = sa.text(f"INSERT INTO {held.effects} (name) VALUES ('sa')")
            with PgWire(driver) as through:
                held.run(conn, lambda c: c.execute(insert), ident=2)
    finally:
        engine.dispose()
    assert held.effect_names() == ["raw", "sa"]
    assert through.trips == direct.trips, (through.queries, direct.queries)


async def test_sqlalchemy_async_psycopg_sends_the_result_update_with_the_commit(
    make_db: Any,
) -> None:
    """The async face: an AsyncConnection and an AsyncSession on psycopg's AsyncConnection."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from oncely.sql import GLOBAL, transaction
    from roundtrips import PgWire

    db = make_db("postgresql")
    held = _Held(db, "transaction+result")
    raw = db.connect()
    with PgWire(raw) as direct:
        held.run(raw, lambda c: held.effect(c, "raw"))
    engine = create_async_engine(db.url())
    try:
        for face in ("connection", "session"):
            async with engine.connect() as conn:
                pooled = await conn.get_raw_connection()
                target: Any = conn if face == "connection" else AsyncSession(bind=conn)
                with PgWire(pooled.driver_connection) as through:
                    async with transaction(
                        target, operation="op", key=face, scope=GLOBAL, table=held.keys
                    ) as tx:
                        assert not tx.replayed
                        await target.execute(
                            sa.text(f"INSERT INTO {held.effects} (name) VALUES ('{face}')")
                        )
                        tx.set_result({"by": face})
                assert through.trips == direct.trips, (face, through.queries, direct.queries)
    finally:
        await engine.dispose()
    assert held.effect_names() == ["connection", "raw", "session"]


# -- SQLAlchemy on SQLite: the held check is the commit there too -------------------------------
@pytest.mark.parametrize("make_db_dialect", ["sqlite"])
@pytest.mark.parametrize("kind", HELD)
def test_sqlalchemy_sqlite_held_check_is_the_commit(
    make_db: Any, make_db_dialect: str, kind: str
) -> None:
    """Through a SQLAlchemy Connection on pysqlite the check was a SELECT count(*) before the
    COMMIT (and took another transaction's row for ours); the block now begins with a
    savepoint (in place of pysqlite's implicit BEGIN) whose RELEASE commits. Counted by
    sqlite3's trace callback on the driver's connection."""
    import sqlalchemy as sa

    from oncely.errors import TransactionLost

    db = make_db(make_db_dialect)
    held = _Held(db, kind)
    engine = sa.create_engine(db.url(), connect_args={"timeout": 30})
    try:
        with engine.connect() as conn, engine.connect() as rival:
            log: list[str] = []
            conn.connection.driver_connection.set_trace_callback(log.append)

            def write(c: Any, name: str) -> None:
                c.execute(sa.text(f"INSERT INTO {held.effects} (name) VALUES ('{name}')"))

            held.run(conn, lambda c: write(c, "e1"))
            assert counts(log, "count(") == 0 and counts(log, "COMMIT") == 0, log
            assert log[0].startswith("SAVEPOINT") and log[-1].startswith("RELEASE"), log

            def body(c: Any) -> None:  # ends the block's transaction; a rival commits the row
                write(c, "before")
                c.rollback()
                held.body = lambda c2: write(c2, "rival")
                held.run(rival, held.body, ident=2)
                held.body = body
                write(c, "after")

            with pytest.raises(TransactionLost):
                held.run(conn, body, ident=2)
            assert not conn.in_transaction() or conn.rollback() is None
    finally:
        engine.dispose()
    assert held.effect_names() == ["e1", "rival"]


# -- a transaction-scoped PostgreSQL advisory lock: BEGIN goes with the lock --------------------
@pytest.mark.parametrize("wait", [0.0, 2.0])
def test_postgres_transaction_scoped_lock_begins_in_the_same_round_trip(wait: float) -> None:
    """The lock backend sent BEGIN, waited for its answer, then the lock statement: two round
    trips for an acquire; BEGIN now goes in the lock statement's pipeline. Counted on the wire
    (libpq trace) of the pool's one connection."""
    import uuid

    from oncely.locks.postgres import PostgresLockBackend
    from roundtrips import PgWire

    from conftest import POSTGRES_URL

    table = f"rt_lock_fences_{uuid.uuid4().hex[:8]}"
    backend = PostgresLockBackend(POSTGRES_URL, table=table, max_size=1)
    name = f"rt-lock-{uuid.uuid4().hex[:8]}"
    try:
        first = backend.acquire(name, "o1", 5.0, wait, "session")  # opens the one connection
        assert backend.release(first)
        pool = backend._get_pool()
        with pool.connection() as pooled:
            driver = pooled
        with PgWire(driver) as wire:
            hold = backend.acquire(name, "o2", 5.0, wait, "transaction")
            assert hold.data.conn is driver  # type: ignore[union-attr]
            assert backend.release(hold)  # type: ignore[arg-type]
        assert wire.trips == 2, wire.queries  # BEGIN + lock, then COMMIT
    finally:
        backend.close()
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP TABLE IF EXISTS {table}")
