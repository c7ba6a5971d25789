"""Red-team tests for oncely.statemachine: inputs a demanding user sends, on real servers.

Each test here failed on the code before its fix (or is marked xfail strict)."""

from __future__ import annotations

import uuid

import pytest

from oncely.statemachine import Machine, Transition
from oncely.statemachine.barrier import Verdict, barrier, create_table
from oncely.statemachine.sql import SqlStateMachine, Table

from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

ORDER = Machine(
    "order",
    ["pending", "paid", "shipped", "cancelled"],
    "pending",
    [
        Transition("pay", "pending", "paid"),
        Transition("ship", "paid", "shipped"),
        Transition("cancel", ["pending", "paid"], "cancelled"),
    ],
)


# -- identities compared by the database's collation -------------------------------------------
# MariaDB's default collation (utf8mb4_general_ci) is case- and accent-insensitive and ignores
# trailing spaces: two gids or keys a caller sees as different were one row.
DIFFERENT = [("Gid-1", "gid-1"), ("gid-1", "gid-1 "), ("resume", "résumé")]


@pytest.mark.parametrize(("first", "second"), DIFFERENT)
def test_barrier_gids_differing_only_by_case_space_or_accent_are_different(
    db: Db, first: str, second: str
) -> None:
    table = db.name("rt_barrier")
    conn = db.connect()
    create_table(conn, table)
    conn.commit()
    tag = uuid.uuid4().hex[:8]
    assert barrier(conn, tag + first, "b", "try", table=table) is Verdict.EXECUTE
    conn.commit()
    # another global transaction: its try must run, and its cancel must not be empty
    assert barrier(conn, tag + second, "b", "try", table=table) is Verdict.EXECUTE
    conn.commit()
    assert barrier(conn, "x" + tag, first, "try", table=table) is Verdict.EXECUTE
    assert barrier(conn, "x" + tag, second, "try", table=table) is Verdict.EXECUTE
    conn.commit()


@pytest.mark.parametrize(("first", "second"), DIFFERENT)
def test_state_machine_keys_differing_only_by_case_space_or_accent_are_different(
    db: Db, first: str, second: str
) -> None:
    orders = db.name("rt_orders")
    db.run(f"CREATE TABLE {orders} (id INTEGER PRIMARY KEY, status VARCHAR(20))")
    db.run(f"INSERT INTO {orders} VALUES (1, 'pending')")
    sm = SqlStateMachine(
        ORDER,
        Table(orders, id_column="id", state_column="status"),
        history_table=db.name("rt_hist"),
    )
    conn = db.connect()
    sm.create_tables(conn)
    assert sm.apply(conn, 1, "pay", key=first).applied
    shipped = sm.apply(conn, 1, "ship", key=second)  # a different key: a new operation
    assert shipped.applied and shipped.state == "shipped"
    assert [h.key for h in sm.history(conn, 1)] == [first, second]


# -- identities longer than their column -------------------------------------------------------
# MariaDB's INSERT IGNORE turns "data too long" into a warning and truncates: two long names
# sharing a prefix became one barrier row (the second step never ran); PostgreSQL raised a raw
# driver error in the middle of a saga.


def test_saga_refuses_step_names_longer_than_the_barrier_column() -> None:
    from oncely.errors import ConfigurationError
    from oncely.statemachine.saga import Saga, Step

    long = "reserve-stock-" + "x" * 120
    with pytest.raises(ConfigurationError, match="step name"):
        Saga("s", [Step(long + "-a", lambda ctx: None), Step(long + "-b", lambda ctx: None)])
    with pytest.raises(ConfigurationError, match=r"step name|Step: name='' is not valid"):
        Saga("s", [Step("", lambda ctx: None)])


def test_state_machine_refuses_entity_ids_longer_than_the_history_column(db: Db) -> None:
    from oncely.errors import StateMachineError

    orders = db.name("rt_lorders")
    db.run(f"CREATE TABLE {orders} (id VARCHAR(400) PRIMARY KEY, status VARCHAR(20))")
    long = "customer-" + "x" * 260
    db.run(f"INSERT INTO {orders} VALUES ('{long}-a', 'pending')")
    db.run(f"INSERT INTO {orders} VALUES ('{long}-b', 'pending')")
    sm = SqlStateMachine(
        ORDER,
        Table(orders, id_column="id", state_column="status"),
        history_table=db.name("rt_lhist"),
    )
    conn = db.connect()
    sm.create_tables(conn)
    with pytest.raises(StateMachineError, match="255"):
        sm.apply(conn, long + "-a", "pay", key="k")
    # nothing half-written
    assert db.run(f"SELECT status FROM {orders} ORDER BY id") == [("pending",), ("pending",)]


# -- Redis barrier effects given in a wrong shape ----------------------------------------------


@pytest.fixture
def rclient():  # type: ignore[no-untyped-def]
    import redis

    from conftest import REDIS_URL

    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"oncely-rt3-{uuid.uuid4().hex[:8]}"
    yield client, prefix
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def test_redis_barrier_refuses_effects_that_are_not_a_list_of_commands(rclient) -> None:  # type: ignore[no-untyped-def]
    from oncely.errors import InvalidBarrierCall
    from oncely.statemachine.barrier import redis_barrier

    r, prefix = rclient
    stock = f"{prefix}:{{g1}}:stock"
    bad: list[object] = [
        ("HINCRBY", stock, "sku", "-1"),  # one command, not a list of commands
        [("HINCRBY", stock, "sku", b"-1")],  # bytes would be sent as "b'-1'"
        [()],  # an empty command
        [("HINCRBY", stock, "sku", None)],  # None would be sent as "None"
    ]
    for effects in bad:
        with pytest.raises(InvalidBarrierCall):
            redis_barrier(r, "g1", "b", "try", effects=effects, prefix=prefix)  # type: ignore[arg-type]
    assert r.exists(f"{prefix}:{{g1}}") == 0 and r.exists(stock) == 0
    # the horizon is sent in whole milliseconds: less than 1 ms would PEXPIRE 0 (delete now)
    with pytest.raises(InvalidBarrierCall):
        redis_barrier(r, "g1", "b", "cancel", prefix=prefix, horizon=0.0001)
    # the right shape still runs
    ok = [("HINCRBY", stock, "sku", -1)]
    assert redis_barrier(r, "g1", "b", "try", effects=ok, prefix=prefix).run
    assert r.hget(stock, "sku") == b"-1"


# -- PostgreSQL at SERIALIZABLE / REPEATABLE READ ------------------------------------------------
# The loser of a concurrent UPDATE got psycopg's SerializationFailure out of apply(), which owned
# its transaction and could have run it again: the contract says one applied, the rest
# applied=False (same transition) or IllegalTransition (a conflicting one).


@pytest.mark.parametrize("level", ["SERIALIZABLE", "REPEATABLE_READ"])
def test_postgres_strict_isolation_concurrent_apply_gives_typed_answers(level: str) -> None:
    import threading

    import psycopg

    from oncely.errors import IllegalTransition

    from conftest import POSTGRES_URL

    tag = uuid.uuid4().hex[:8]
    orders, hist = f"rt_iso_{tag}", f"rt_isoh_{tag}"
    admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    try:
        admin.execute(f"CREATE TABLE {orders} (id INT PRIMARY KEY, status TEXT)")
        admin.execute(f"INSERT INTO {orders} SELECT g, 'pending' FROM generate_series(1, 10) g")
        race = Machine(
            "race",
            ["pending", "paid", "expired"],
            "pending",
            [Transition("pay", "pending", "paid"), Transition("expire", "pending", "expired")],
        )
        sm = SqlStateMachine(race, Table(orders, "id", "status"), history_table=hist)
        with psycopg.connect(POSTGRES_URL) as c0:
            sm.create_tables(c0)
        results: list[object] = []
        barrier_ = threading.Barrier(6)

        def worker(i: int) -> None:
            with psycopg.connect(POSTGRES_URL, application_name="oncely-rt3") as c:
                c.isolation_level = getattr(psycopg.IsolationLevel, level)
                barrier_.wait()
                for entity in range(1, 11):
                    try:
                        out = sm.apply(c, entity, "pay" if i % 3 else "expire")
                        results.append((entity, out.transition, out.applied))
                    except IllegalTransition:
                        results.append((entity, "illegal", False))
                    except Exception as exc:  # pragma: no cover - the fault
                        results.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors[:3]
        for entity in range(1, 11):
            mine = [r for r in results if isinstance(r, tuple) and r[0] == entity]
            assert len(mine) == 6
            assert sum(1 for r in mine if r[2]) == 1  # exactly one changed the state
    finally:
        admin.execute(f"DROP TABLE IF EXISTS {orders}")
        admin.execute(f"DROP TABLE IF EXISTS {hist}")
        admin.close()


# -- entity ids and data of the wrong type -----------------------------------------------------
# PyMySQL bound [1] as (1): the transition hit entity 1 while its history was recorded under
# "[1]"; other drivers answered with raw errors (OverflowError, psycopg UndefinedFunction,
# DataError for NUL), and data=[1] was a builtin TypeError.


@pytest.mark.parametrize("entity", [[1], (1,), b"1", 1.0, True, 2**64, "a\x00b", None, {"id": 1}])
def test_entity_ids_of_a_wrong_type_are_refused_before_anything_is_written(
    db: Db, entity: object
) -> None:
    from oncely.errors import InvalidEntityId

    orders = db.name("rt_torders")
    db.run(f"CREATE TABLE {orders} (id INTEGER PRIMARY KEY, status VARCHAR(20))")
    db.run(f"INSERT INTO {orders} VALUES (1, 'pending')")
    sm = SqlStateMachine(
        ORDER, Table(orders, id_column="id", state_column="status"), history_table=db.name("rt_th")
    )
    conn = db.connect()
    sm.create_tables(conn)
    with pytest.raises(InvalidEntityId):
        sm.apply(conn, entity, "pay")
    with pytest.raises(InvalidEntityId):
        sm.history(conn, entity)
    assert db.run(f"SELECT status FROM {orders}") == [("pending",)]


def test_data_that_is_not_a_mapping_is_a_typed_error(rclient) -> None:  # type: ignore[no-untyped-def]
    from oncely.errors import InvalidEntityId, InvalidPayload
    from oncely.statemachine.redis import RedisStateMachine

    r, prefix = rclient
    rsm = RedisStateMachine(ORDER, prefix=prefix)
    rsm.create(r, 1)
    with pytest.raises(InvalidPayload):
        rsm.apply(r, 1, "pay", data=[("amount", 5)])  # type: ignore[arg-type]
    with pytest.raises(InvalidEntityId):
        rsm.apply(r, [1], "pay")
    assert rsm.state(r, 1) == "pending"


# -- the same mistake outside the state machines: the inbox --------------------------------------
# Its MariaDB table used utf8mb4_bin, which is PAD SPACE: message 'm-1 ' was taken for 'm-1' and
# dropped as a duplicate.


def test_inbox_message_ids_differing_by_a_trailing_space_are_different(db: Db) -> None:
    from oncely.messaging.inbox import Inbox

    inbox = Inbox(db.name("rt_inbox"))
    conn = db.connect()
    inbox.create_table(conn)
    conn.commit()
    assert inbox.accept(conn, "billing", "m-1") is True
    conn.commit()
    assert inbox.accept(conn, "billing", "m-1 ") is True
    assert inbox.accept(conn, "billing ", "m-1") is True
    conn.commit()


# -- and the dedup window on MariaDB (utf8mb4_bin, PAD SPACE) -----------------------------------


def test_dedup_ids_differing_by_a_trailing_space_are_different_on_mariadb() -> None:
    import pymysql

    from oncely.messaging.dedup import Deduplicator

    from conftest import MYSQL_URL

    tag = uuid.uuid4().hex[:10]
    d = Deduplicator(MYSQL_URL, window=60, namespace=f"rt-{tag}", table=f"rt_dedup_{tag}")
    try:
        assert d.seen("m-1") is False
        assert d.seen("m-1 ") is False  # another message
        assert d.filter_new(["M-1", "m-1", "m-2"]) == ["M-1", "m-2"]
    finally:
        d.close()
        conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS rt_dedup_{tag}")
        conn.close()


# -- and oncely.sql's key table: scope was VARCHAR in MariaDB's case-insensitive collation -------


def test_sql_operation_scopes_differing_only_by_case_are_different_tenants(db: Db) -> None:
    from test_sql_phases import PARAMS, _count, _tables, ride_operation

    t = _tables(db)
    op = ride_operation(db, t)
    conn = db.connect()
    op.run(conn, key="ride-1", scope="riders", params=PARAMS)
    op.run(conn, key="ride-1", scope="Riders", params=PARAMS)  # another tenant: runs
    assert _count(db, t["rides"]) == 2
