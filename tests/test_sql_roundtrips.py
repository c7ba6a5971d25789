"""One atomic decision, one round trip: operations that sent an extra statement per call
(a count probe, a check before the commit) are counted here on real connections
(:mod:`roundtrips`), per dialect."""

from __future__ import annotations

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
    db.run(f"INSERT INTO {table} VALUES (1, 'pending')")
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
