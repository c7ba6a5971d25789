"""Red-team round 5 on oncely.statemachine: an entity id the database converts to match a row
(SQLite's type affinity, MySQL's collations and numeric comparison, PostgreSQL's casts) is
refused, instead of changing the row and recording its history under the caller's spelling,
where ``history(conn, <the row's key>)`` never finds it. On real SQLite, PostgreSQL and
MariaDB; each test failed on the code before the fix."""

from __future__ import annotations

import pytest

from oncely.errors import InvalidEntityId
from oncely.statemachine import Machine, Transition
from oncely.statemachine.sql import SqlStateMachine, Table

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

ORDER = Machine(
    "order",
    ["pending", "paid", "cancelled"],
    "pending",
    [Transition("pay", "pending", "paid"), Transition("cancel", ["pending", "paid"], "cancelled")],
)


def _machine(db: Db, id_type: str) -> tuple[SqlStateMachine, str]:
    orders = db.name("rt5_orders")
    collate = " COLLATE utf8mb4_general_ci" if db.dialect == "mysql" and "CHAR" in id_type else ""
    db.run(
        f"CREATE TABLE {orders} (id {id_type}{collate} PRIMARY KEY, status VARCHAR(20) NOT NULL)"
    )
    sm = SqlStateMachine(
        ORDER, Table(orders, id_column="id", state_column="status"), history_table=db.name("rt5_h")
    )
    conn = db.connect()
    sm.create_tables(conn)
    conn.commit()
    return sm, orders


@pytest.mark.parametrize("spelling", [" 3", "3.0", "03", "+3"])
def test_an_integer_key_spelled_otherwise_is_refused(db: Db, spelling: str) -> None:
    sm, orders = _machine(db, "INTEGER")
    db.run(f"INSERT INTO {orders} VALUES (3, 'pending')")
    conn = db.connect()
    for key in (None, "k1"):
        # PostgreSQL refuses some spellings itself ("3.0" is no integer): typed the same
        with pytest.raises(InvalidEntityId, match=r"history|type"):
            sm.apply(conn, spelling, "pay", key=key)
        conn.rollback()
    assert db.run(f"SELECT status FROM {orders}") == [("pending",)]
    assert sm.history(conn, 3) == [] and sm.history(conn, spelling) == []
    # the row's own key, as an int or as the text it prints as, works and is found
    assert sm.apply(conn, "3", "pay", key="k2").applied
    assert [e.transition for e in sm.history(conn, 3)] == ["pay"]
    # a transition that does not apply is refused the same way (no misleading answer)
    with pytest.raises(InvalidEntityId):
        sm.apply(conn, " 3", "pay", key="k2")
    conn.rollback()


def test_a_text_key_matched_by_a_case_insensitive_collation_is_refused(db: Db) -> None:
    """MariaDB's default collations compare 'ABC' equal to 'abc' and 'abc ' to 'abc'; the other
    stores compare text exactly, so there the row is simply not found."""
    sm, orders = _machine(db, "VARCHAR(20)")
    db.run(f"INSERT INTO {orders} VALUES ('abc', 'pending')")
    conn = db.connect()
    for spelling in ("ABC", "abc "):
        if db.dialect == "mysql":
            with pytest.raises(InvalidEntityId):
                sm.apply(conn, spelling, "pay")
        else:
            with pytest.raises(Exception, match="does not exist"):
                sm.apply(conn, spelling, "pay")
        conn.rollback()
    assert db.run(f"SELECT status FROM {orders}") == [("pending",)]
    assert sm.apply(conn, "abc", "pay").applied
    assert [e.transition for e in sm.history(conn, "abc")] == ["pay"]


@pytest.mark.parametrize("spelling", ["3.0", "3e0", "3abc", "0x3", "99999999999999999999"])
def test_an_id_the_database_cannot_convert_is_typed(db: Db, spelling: str) -> None:
    """Red team 6: PostgreSQL answered '3.0', '3e0', '3abc', '0x3' on an integer key with a raw
    psycopg InvalidTextRepresentation (and out of range with NumericValueOutOfRange), MariaDB
    '3abc' with OperationalError 1292. Now InvalidEntityId (or, where the database compares
    without converting, EntityNotFound), nothing changed, and the caller's transaction stays
    usable (the block was a savepoint in it)."""
    from oncely.errors import EntityNotFound

    sm, orders = _machine(db, "INTEGER")
    db.run(f"INSERT INTO {orders} VALUES (3, 'pending')")
    conn = db.connect()
    conn.cursor().execute(f"UPDATE {orders} SET status = 'pending' WHERE id = 3")
    for key in (None, "k1"):
        with pytest.raises((InvalidEntityId, EntityNotFound)) as info:
            sm.apply(conn, spelling, "pay", key=key)
        if db.dialect == "postgresql":
            assert isinstance(info.value, InvalidEntityId)
    assert sm.apply(conn, 3, "pay", key="k2").applied  # the caller's transaction goes on
    conn.commit()
    assert db.run(f"SELECT status FROM {orders}") == [("paid",)]
