"""Red team 17 on oncely.statemachine (findings 4, 9, 10): on real SQLite, PostgreSQL, MariaDB
and Redis; each test failed on the code before the fix.

* #4: caller data stored as JSON (a state machine's outbox payload, saga data, recovery-point
  params) with NaN/Infinity or an object JSON has no form for is refused with one typed error
  (:class:`~oncely.errors.ConfigurationError`, :func:`oncely.codecs.stored_json`) before anything
  is written. The outbox used to carry ``{"x": NaN}`` (not JSON) and ``object()`` was a raw
  ``TypeError``.
* #9: an entity that exists with a NULL (or unknown) state is
  :class:`~oncely.errors.EntityStateInvalid`, not ``EntityNotFound`` ("create it") nor an
  ``IllegalTransition`` from a "final state" the machine does not have.
* #10: saga data over MariaDB's ``max_allowed_packet`` is a typed error with nothing written
  (it was a bare ``pymysql.err.InterfaceError(0, '')`` on a dead connection); PostgreSQL and
  SQLite store such data and give it back whole.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis

from oncely.errors import ConfigurationError, EntityNotFound, EntityStateInvalid, StateMachineError
from oncely.sql import Operation, create_tables
from oncely.statemachine import Machine, Transition
from oncely.statemachine.redis import RedisStateMachine
from oncely.statemachine.saga import Saga, Step
from oncely.statemachine.sql import SqlStateMachine, Table

from conftest import REDIS_URL
from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

ORDER = Machine(
    "rt17order",
    ["pending", "paid", "shipped"],
    "pending",
    [Transition("pay", "pending", "paid"), Transition("ship", "paid", "shipped")],
)

NOT_JSON = [
    pytest.param({"x": float("nan")}, id="nan"),
    pytest.param({"x": float("inf")}, id="inf"),
    pytest.param({"x": [1, {"y": -math.inf}]}, id="nested-inf"),
    pytest.param({"o": object()}, id="object"),
]


def _orders(db: Db, **options: Any) -> tuple[SqlStateMachine, str]:
    orders = db.name("rt17_orders")
    db.run(f"CREATE TABLE {orders} (id INTEGER PRIMARY KEY, status VARCHAR(20) NULL)")
    db.run(f"INSERT INTO {orders} VALUES (1, 'pending'), (2, NULL), (3, 'lost')")
    sm = SqlStateMachine(
        ORDER, Table(orders, "id", "status"), history_table=db.name("rt17_h"), **options
    )
    conn = db.connect()
    sm.create_tables(conn)
    conn.commit()
    conn.close()
    return sm, orders


# -- #4: one typed error for data that cannot be stored as JSON -----------------------------------
@pytest.mark.parametrize("data", NOT_JSON)
def test_outbox_data_not_json_is_refused_before_anything_is_written(
    db: Db, data: dict[str, Any]
) -> None:
    sm, orders = _orders(db, outbox_table=db.name("rt17_ob"))
    conn = db.connect()
    with pytest.raises(ConfigurationError, match="JSON") as err:
        sm.apply(conn, 1, "pay", key="k1", data=data)
    assert "it was not written" in str(err.value)
    conn.rollback()
    assert db.run(f"SELECT status FROM {orders} WHERE id = 1") == [("pending",)]
    assert db.run(f"SELECT COUNT(*) FROM {sm.history_table}") == [(0,)]
    assert db.run(f"SELECT COUNT(*) FROM {sm.outbox_table}") == [(0,)]
    # the same call with JSON data (a Decimal is rendered as before) goes through, once
    out = sm.apply(conn, 1, "pay", key="k1", data={"x": 1.5, "amount": Decimal("9.99")})
    assert out.applied
    (payload,) = db.run(f"SELECT payload FROM {sm.outbox_table}")[0]
    text = bytes(payload).decode() if not isinstance(payload, str) else payload

    def strict(constant: str) -> Any:
        raise AssertionError(f"not JSON: {constant}")

    assert json.loads(text, parse_constant=strict)["data"] == {"x": 1.5, "amount": "9.99"}
    conn.close()


def test_without_an_outbox_data_is_not_serialised(db: Db) -> None:
    """No outbox: data only reaches the guard and hooks, as given (nothing stores it)."""
    sm, _orders_table = _orders(db)
    conn = db.connect()
    assert sm.apply(conn, 1, "pay", data={"x": float("nan"), "o": object()}).applied
    conn.close()


@pytest.mark.parametrize("data", NOT_JSON)
def test_saga_and_recovery_points_refuse_the_same_way(db: Db, data: dict[str, Any]) -> None:
    ran: list[str] = []
    table = db.name("rt17_saga")
    saga = Saga(
        "rt17",
        [Step("a", lambda ctx: ran.append("a"), lambda ctx: None)],
        table=table,
        barrier_table=db.name("rt17_bar"),
    )
    db.name(f"{table}_history")
    conn = db.connect()
    saga.create_tables(conn)
    conn.commit()
    with pytest.raises(ConfigurationError, match="JSON"):
        saga.run(conn, "s1", data)
    conn.rollback()
    assert ran == [] and db.run(f"SELECT COUNT(*) FROM {table}") == [(0,)]

    keys = db.name("rt17_keys")
    create_tables(conn, table=keys)
    op = Operation("rt17op", table=keys)
    op.phase("only")(lambda ctx: ran.append("phase"))
    with pytest.raises(ConfigurationError, match="JSON"):
        op.run(conn, key="k", scope="s", params=data)
    conn.rollback()
    assert ran == [] and db.run(f"SELECT COUNT(*) FROM {keys}") == [(0,)]
    conn.close()


# -- #9: an entity with a NULL or unknown state --------------------------------------------------
def test_sql_row_with_null_or_unknown_state(db: Db) -> None:
    sm, orders = _orders(db)
    conn = db.connect()
    for key in (None, "k9"):
        with pytest.raises(EntityStateInvalid, match="NULL") as null:
            sm.apply(conn, 2, "ship", key=key)
        assert null.value.current is None and "exists" in str(null.value)
        assert not isinstance(null.value, EntityNotFound)
        conn.rollback()
        with pytest.raises(EntityStateInvalid, match="'lost', not one of its states") as odd:
            sm.apply(conn, 3, "pay", key=key)
        assert odd.value.current == "lost" and isinstance(odd.value, StateMachineError)
        conn.rollback()
        with pytest.raises(EntityNotFound):  # a row that is not there is still "create it"
            sm.apply(conn, 4, "pay", key=key)
        conn.rollback()
    assert db.run(f"SELECT id, status FROM {orders} WHERE id > 1 ORDER BY id") == [
        (2, None),
        (3, "lost"),
    ]
    assert sm.history(conn, 2) == [] and sm.history(conn, 3) == []
    conn.close()


@pytest.fixture
def rsm() -> Iterator[tuple[RedisStateMachine, redis.Redis]]:
    client = redis.Redis.from_url(REDIS_URL)
    sm = RedisStateMachine(ORDER, prefix=f"oncely-test-rt17-{uuid.uuid4().hex[:10]}")
    yield sm, client
    keys = list(client.scan_iter(match=f"{sm.prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_redis_hash_with_no_or_unknown_state(rsm: tuple[RedisStateMachine, redis.Redis]) -> None:
    sm, r = rsm
    r.hset(sm.key(2), "note", "made by hand, no state field")
    r.hset(sm.key(3), "state", "lost")
    for key in (None, "k9"):
        with pytest.raises(EntityStateInvalid, match="NULL") as null:
            sm.apply(r, 2, "ship", key=key)
        assert null.value.current is None
        with pytest.raises(EntityStateInvalid, match="'lost'"):
            sm.apply(r, 3, "pay", key=key)
        with pytest.raises(EntityNotFound):
            sm.apply(r, 4, "pay", key=key)
    assert r.hgetall(sm.key(2)) == {b"note": b"made by hand, no state field"}
    assert r.hget(sm.key(3), "state") == b"lost"
    assert sm.history(r, 2) == [] and sm.history(r, 3) == []


# -- #10: saga data too large for the database --------------------------------------------------
def test_saga_data_larger_than_a_mariadb_packet(db: Db) -> None:
    """17 MB of data: over MariaDB's default 16 MiB ``max_allowed_packet`` (typed, nothing
    written, the connection still usable); PostgreSQL and SQLite store it and give it back."""
    seen: list[int] = []
    table = db.name("rt17_big")
    saga = Saga(
        "rt17big",
        [Step("a", lambda ctx: seen.append(len(ctx.data["blob"])), lambda ctx: None)],
        table=table,
        barrier_table=db.name("rt17_bigbar"),
    )
    db.name(f"{table}_history")
    conn = db.connect()
    saga.create_tables(conn)
    conn.commit()
    blob = "y" * 17_000_000
    packet = 0
    if db.dialect == "mysql":
        cur = conn.cursor()
        cur.execute("SELECT @@max_allowed_packet")
        packet = int(cur.fetchone()[0])
        conn.rollback()
    if db.dialect == "mysql" and packet < 17_100_000:
        with pytest.raises(ConfigurationError, match="max_allowed_packet") as err:
            saga.run(conn, "big", {"blob": blob})
        assert "nothing was written" in str(err.value)
        conn.rollback()
        assert seen == [] and db.run(f"SELECT COUNT(*) FROM {table}") == [(0,)]
        # the connection was never broken: the same saga with small data runs on it
        assert saga.run(conn, "big", {"blob": "y"}).state == "completed"
        assert seen == [1]
    else:
        assert saga.run(conn, "big", {"blob": blob}).state == "completed"
        assert seen == [len(blob)]
        conn.commit()
        # stored whole; a resume without data reads it back
        stored = json.dumps({"blob": blob}, separators=(",", ":"))
        assert db.run(f"SELECT LENGTH(data) FROM {table}") == [(len(stored),)]
        assert saga.run(conn, "big").state == "completed"
    conn.close()


async def test_saga_data_larger_than_a_mariadb_packet_async(make_db: Any) -> None:
    """The same through aiomysql (which met the closed connection as a reply out of sequence)."""
    db = make_db("mysql")
    table = db.name("rt17_abig")
    saga = Saga(
        "rt17abig",
        [Step("a", lambda ctx: None, lambda ctx: None)],
        table=table,
        barrier_table=db.name("rt17_abigbar"),
    )
    db.name(f"{table}_history")
    conn = db.connect()
    saga.create_tables(conn)
    conn.commit()
    conn.close()
    aconn = await db.aconnect()
    try:
        with pytest.raises(ConfigurationError, match="max_allowed_packet"):
            await saga.arun(aconn, "big", {"blob": "y" * 17_000_000})
        await aconn.rollback()
        assert db.run(f"SELECT COUNT(*) FROM {table}") == [(0,)]
        assert (await saga.arun(aconn, "big", {"blob": "y"})).state == "completed"
    finally:
        await db.aclose()
