"""oncely.statemachine: definitions, SQL (SQLite, PostgreSQL, MariaDB) and Redis transitions on
real servers, under threads: one change for 32 identical calls, one winner among conflicting
ones, idempotency keys, history, hooks, outbox, bad input."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from oncely.errors import (
    EntityNotFound,
    GuardRejected,
    IdempotencyKeyMismatch,
    IllegalTransition,
    InvalidEntityId,
    InvalidKey,
    InvalidMachine,
    SchemaMissing,
    TransactionLost,
    UnknownColumn,
    UnknownTable,
    UnknownTransition,
)
from oncely.statemachine import Machine, Outcome, Transition
from oncely.statemachine.redis import RedisStateMachine
from oncely.statemachine.sql import HookCall, SqlStateMachine, Table, table_of

from conftest import REDIS_URL
from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

ORDER = Machine(
    "order",
    states=["created", "paid", "shipped", "cancelled", "expired"],
    initial="created",
    transitions=[
        Transition("pay", "created", "paid", guard=lambda d: d.get("amount", 1) > 0),
        Transition("ship", "paid", "shipped"),
        Transition("cancel", ["created", "paid"], "cancelled"),
        Transition("expire", "created", "expired"),
    ],
)


# -- definitions ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("states", "transitions", "words"),
    [
        (["a", "b", "c"], [Transition("go", "a", "b")], "cannot be reached"),
        (["a", "b"], [Transition("go", "a", "b"), Transition("go", "b", "a")], "two transitions"),
        (["a", "b"], [Transition("go", "a", "z")], "unknown state 'z'"),
        (["a", "b"], [Transition("go", "x", "b")], "unknown state 'x'"),
        (["a", "b"], [Transition("go", "a", "b"), Transition("stay", "b", "b")], "to itself"),
        (["a", "a"], [], "more than once"),
        ([], [], "no states"),
    ],
)
def test_invalid_definitions_are_refused_when_built(
    states: list[str], transitions: list[Transition], words: str
) -> None:
    with pytest.raises(InvalidMachine, match=words):
        Machine("m", states=states, initial=states[0] if states else "a", transitions=transitions)


def test_unknown_initial_and_transition_names() -> None:
    with pytest.raises(InvalidMachine, match="initial state 'z'"):
        Machine("m", ["a"], "z", [])
    with pytest.raises(
        UnknownTransition, match=r"no transition 'refund'.*\['cancel', 'expire', 'pay', 'ship'\]"
    ):
        ORDER.transition("refund")
    assert ORDER.allowed("created") == ("pay", "cancel", "expire")
    assert ORDER.allowed("shipped") == ()


# -- SQL -----------------------------------------------------------------------------------------
class Orders:
    """An orders table of the test's own, and the machine on it."""

    def __init__(self, db: Db, rows: int = 3, **options: Any) -> None:
        self.db = db
        self.table = db.name("orders")
        self.history = db.name("order_history")
        db.run(
            f"CREATE TABLE {self.table} (id INT PRIMARY KEY, status VARCHAR(20), note VARCHAR(20))"
        )
        for i in range(1, rows + 1):
            db.run(f"INSERT INTO {self.table} VALUES ({i}, 'created', 'n{i}')")
        self.sm = SqlStateMachine(
            ORDER, Table(self.table, "id", "status"), history_table=self.history, **options
        )
        conn = db.connect()
        self.sm.create_tables(conn)
        conn.close()

    def state(self, entity: int) -> str:
        return str(self.db.run(f"SELECT status FROM {self.table} WHERE id = {entity}")[0][0])

    def history_count(self, entity: int) -> int:
        return int(
            self.db.run(f"SELECT COUNT(*) FROM {self.history} WHERE entity_id = '{entity}'")[0][0]
        )


def test_sql_transitions_retries_and_errors(db: Db) -> None:
    o = Orders(db)
    conn = db.connect()
    first = o.sm.apply(conn, 1, "pay", data={"amount": 5})
    assert first.applied and first.state == "paid" and first.row["note"] == "n1"
    again = o.sm.apply(conn, 1, "pay", data={"amount": 5})
    assert (again.applied, again.state, again.replayed) == (False, "paid", False)
    assert o.sm.apply(conn, 1, "ship").applied
    with pytest.raises(IllegalTransition) as info:
        o.sm.apply(conn, 1, "cancel")
    assert info.value.current == "shipped" and info.value.allowed == ()
    assert "'shipped'" in str(info.value) and "cancel" in str(info.value)
    with pytest.raises(
        IllegalTransition, match=r"allowed transitions are \['pay', 'cancel', 'expire'\]"
    ):
        o.sm.apply(conn, 2, "ship")
    with pytest.raises(EntityNotFound, match="create it"):
        o.sm.apply(conn, 99, "pay")
    with pytest.raises(GuardRejected):
        o.sm.apply(conn, 3, "pay", data={"amount": 0})
    assert o.state(3) == "created"
    with pytest.raises(UnknownTransition):
        o.sm.apply(conn, 3, "refund")
    with pytest.raises(InvalidKey):
        o.sm.apply(conn, 3, "pay", key="")
    assert [h.transition for h in o.sm.history(conn, 1)] == ["pay", "ship"]
    assert o.state(1) == "shipped"


def test_sql_idempotency_key_replays_after_the_state_moved_on(db: Db) -> None:
    o = Orders(db)
    conn = db.connect()
    assert o.sm.apply(conn, 1, "pay", key="pay-1").applied
    assert o.sm.apply(conn, 1, "ship").applied
    replay = o.sm.apply(conn, 1, "pay", key="pay-1")  # state is 'shipped' now
    assert replay.replayed and replay.state == "paid" and not replay.applied
    with pytest.raises(IdempotencyKeyMismatch):
        o.sm.apply(conn, 1, "cancel", key="pay-1")
    # The key is per entity: the same key on another entity is another operation.
    assert o.sm.apply(conn, 2, "pay", key="pay-1").applied
    entries = o.sm.history(conn, 1)
    assert [(h.transition, h.key) for h in entries] == [("pay", "pay-1"), ("ship", None)]
    assert entries[0].at <= entries[1].at


def test_sql_hooks_run_in_the_transaction_and_roll_back_with_it(db: Db) -> None:
    seen: list[str] = []

    def audit(call: HookCall) -> None:
        seen.append(call.outcome.transition)
        if call.data.get("fail"):
            raise RuntimeError("hook failed")

    o = Orders(db, hooks=[audit], outbox_table=db.name("order_outbox"))
    conn = db.connect()
    with pytest.raises(RuntimeError):
        o.sm.apply(conn, 1, "pay", data={"fail": True})
    assert o.state(1) == "created" and o.history_count(1) == 0
    assert o.sm.apply(conn, 1, "pay", data={"amount": 3}).applied
    assert seen == ["pay", "pay"]
    rows = db.run(f"SELECT message_id, topic FROM {o.sm.outbox_table}")
    [(hid,)] = db.run(f"SELECT id FROM {o.history}")  # the id is the history row's
    assert [(bytes(a).decode() if not isinstance(a, str) else a, b) for a, b in rows] == [
        (f"order:1:pay:{hid}", "order.pay")
    ]


def test_sql_a_hook_that_rolls_back_the_transition_commits_nothing_after(db: Db) -> None:
    """A hook that calls conn.rollback() and writes again took the transition (the state
    update and its history row) out of the transaction apply() owns: apply() checks the
    entity row before its commit and raises TransactionLost instead of committing the hook's
    later write alone (which every retry would write again; red-team F04, the same kind)."""
    o = Orders(db)
    ph = "?" if db.dialect == "sqlite" else "%s"

    def audit(call: HookCall) -> None:
        call.conn.rollback()
        cur = call.conn.cursor()
        cur.execute(f"UPDATE {o.table} SET note = {ph} WHERE id = 2", ("hooked",))
        cur.close()

    o.sm.hooks = (audit,)
    conn = db.connect()
    for _ in range(2):
        with pytest.raises(TransactionLost):
            o.sm.apply(conn, 1, "pay", data={"amount": 3})
    assert o.state(1) == "created" and o.history_count(1) == 0
    assert db.run(f"SELECT note FROM {o.table} WHERE id = 2") == [("n2",)]
    o.sm.hooks = ()
    assert o.sm.apply(conn, 1, "pay", data={"amount": 3}).applied  # a proper retry applies
    conn.close()


def test_sql_after_commit_runs_after_commit_and_is_refused_inside_a_transaction(db: Db) -> None:
    seen: list[str] = []
    o = Orders(db, after_commit=[lambda call: seen.append(o.state(1))])
    conn = db.connect()
    assert o.sm.apply(conn, 1, "pay").applied
    assert seen == ["paid"]  # another connection already sees the committed state
    cur = conn.cursor()
    cur.execute(f"UPDATE {o.table} SET note = 'x' WHERE id = 2")  # opens a transaction
    with pytest.raises(Exception, match="own its transaction"):
        o.sm.apply(conn, 2, "pay")
    conn.rollback()


def test_sql_inside_the_callers_transaction_commits_with_it(db: Db) -> None:
    o = Orders(db)
    conn = db.connect()
    cur = conn.cursor()
    cur.execute(f"UPDATE {o.table} SET note = 'caller' WHERE id = 1")
    assert o.sm.apply(conn, 1, "pay").applied
    conn.rollback()
    assert o.state(1) == "created" and o.history_count(1) == 0


def _threads(n: int, target: Callable[[int], None]) -> None:
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        target(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_sql_32_concurrent_identical_transitions_change_once(db: Db) -> None:
    o = Orders(db)
    conns = [db.connect() for _ in range(32)]
    results: list[Outcome | BaseException] = [RuntimeError("not run")] * 32

    def call(i: int) -> None:
        try:
            results[i] = o.sm.apply(conns[i], 1, "pay")
        except BaseException as exc:  # pragma: no cover - reported below
            results[i] = exc

    _threads(32, call)
    outcomes = [r for r in results if isinstance(r, Outcome)]
    assert len(outcomes) == 32, [r for r in results if not isinstance(r, Outcome)]
    assert sum(r.applied for r in outcomes) == 1
    assert all(r.state == "paid" for r in outcomes)
    assert o.history_count(1) == 1 and o.state(1) == "paid"


def test_sql_concurrent_conflicting_transitions_one_wins(db: Db) -> None:
    o = Orders(db)
    conns = [db.connect() for _ in range(16)]
    results: list[Any] = [None] * 16

    def call(i: int) -> None:
        try:
            results[i] = o.sm.apply(conns[i], 1, "pay" if i % 2 else "expire", key=f"k{i}")
        except IllegalTransition as exc:
            results[i] = exc

    _threads(16, call)
    applied = [r for r in results if isinstance(r, Outcome) and r.applied]
    assert len(applied) == 1
    winner = applied[0]
    assert o.state(1) == winner.state and o.history_count(1) == 1
    for r in results:
        if isinstance(r, IllegalTransition):
            assert r.current == winner.state
        else:
            assert isinstance(r, Outcome) and r.state == winner.state


def test_sql_same_key_32_times_at_once_is_one_transition(db: Db) -> None:
    o = Orders(db)
    conns = [db.connect() for _ in range(32)]
    results: list[Any] = [None] * 32

    def call(i: int) -> None:
        results[i] = o.sm.apply(conns[i], 1, "pay", key="same")

    _threads(32, call)
    assert sum(r.applied for r in results) == 1
    assert all(r.state == "paid" for r in results)
    assert o.history_count(1) == 1


def test_sql_bad_tables_say_what_to_do(db: Db) -> None:
    o = Orders(db)
    conn = db.connect()
    missing_history = SqlStateMachine(
        ORDER, Table(o.table, "id", "status"), history_table=db.name("nohistory")
    )
    with pytest.raises(SchemaMissing, match="create_tables"):
        missing_history.apply(conn, 1, "pay")
    conn.rollback()
    assert o.state(1) == "created"
    with pytest.raises(UnknownTable):
        SqlStateMachine(ORDER, Table(db.name("nothere")), history_table=o.history).apply(
            conn, 1, "pay"
        )
    conn.rollback()
    with pytest.raises(UnknownColumn):
        SqlStateMachine(ORDER, Table(o.table, "id", "nostate"), history_table=o.history).apply(
            conn, 1, "pay"
        )
    conn.rollback()


async def test_sql_async_face(db: Db) -> None:
    if db.dialect == "sqlite":
        pytest.skip("sqlite3 has no async driver (SQLAlchemy's aiosqlite is covered below)")
    o = Orders(db)
    conn = await db.aconnect()
    seen: list[str] = []

    async def hook(call: HookCall) -> None:
        seen.append(call.outcome.state)

    sm = SqlStateMachine(
        ORDER, Table(o.table, "id", "status"), history_table=o.history, hooks=[hook]
    )
    try:
        assert (await sm.aapply(conn, 1, "pay", key="a")).applied
        assert (await sm.aapply(conn, 1, "pay", key="a")).replayed
        with pytest.raises(IllegalTransition):
            await sm.aapply(conn, 3, "ship")
        assert [h.key for h in await sm.ahistory(conn, 1)] == ["a"]
        assert seen == ["paid"]
    finally:
        await db.aclose()


def test_sqlalchemy_model_and_session(tmp_path: Any) -> None:
    from sqlalchemy import Column, Integer, String, create_engine
    from sqlalchemy.orm import DeclarativeBase, Session

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "sa_orders"
        id = Column(Integer, primary_key=True)
        status = Column("status_col", String(20))

    engine = create_engine(f"sqlite:///{tmp_path}/sa.db")
    Base.metadata.create_all(engine)
    assert table_of(Order, "status") == Table("sa_orders", "id", "status_col")
    sm = SqlStateMachine(ORDER, Order, state_field="status")
    with Session(engine) as session:
        session.add(Order(id=1, status="created"))
        session.commit()
        sm.create_tables(session)
        session.commit()
        with session.begin():
            assert sm.apply(session, 1, "pay").applied
        assert sm.apply(session, 1, "pay").state == "paid"
        session.commit()
        assert session.get(Order, 1).status == "paid"
    engine.dispose()


def test_django_model_and_connection(tmp_path: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    check = Path(__file__).resolve().parent / "statemachine_django_check.py"
    done = subprocess.run(
        [sys.executable, str(check), str(tmp_path / "django.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-2000:]


# -- Redis ---------------------------------------------------------------------------------------
@pytest.fixture
def rsm() -> Iterator[tuple[RedisStateMachine, redis.Redis]]:
    client = redis.Redis.from_url(REDIS_URL)
    sm = RedisStateMachine(ORDER, prefix=f"oncely-test-sm-{uuid.uuid4().hex[:10]}")
    yield sm, client
    keys = list(client.scan_iter(match=f"{sm.prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_redis_transitions(rsm: tuple[RedisStateMachine, redis.Redis]) -> None:
    sm, r = rsm
    assert sm.create(r, 1) and not sm.create(r, 1)
    assert sm.apply(r, 1, "pay", key="k").applied
    assert not sm.apply(r, 1, "pay").applied
    assert sm.apply(r, 1, "ship").applied
    assert sm.apply(r, 1, "pay", key="k").replayed
    with pytest.raises(IdempotencyKeyMismatch):
        sm.apply(r, 1, "cancel", key="k")
    with pytest.raises(IllegalTransition) as info:
        sm.apply(r, 1, "cancel")
    assert info.value.current == "shipped"
    with pytest.raises(EntityNotFound):
        sm.apply(r, 2, "pay")
    assert [(h.transition, h.key) for h in sm.history(r, 1)] == [("pay", "k"), ("ship", None)]
    assert sm.state(r, 1) == "shipped"


def test_redis_32_concurrent_identical_and_conflicting(
    rsm: tuple[RedisStateMachine, redis.Redis],
) -> None:
    sm, r = rsm
    sm.create(r, 1)
    sm.create(r, 2)
    same: list[Any] = [None] * 32
    mixed: list[Any] = [None] * 32

    def call(i: int) -> None:
        same[i] = sm.apply(r, 1, "pay")
        try:
            mixed[i] = sm.apply(r, 2, "pay" if i % 2 else "expire")
        except IllegalTransition as exc:
            mixed[i] = exc

    _threads(32, call)
    assert sum(o.applied for o in same) == 1 and len(sm.history(r, 1)) == 1
    assert sum(isinstance(o, Outcome) and o.applied for o in mixed) == 1
    assert len(sm.history(r, 2)) == 1


async def test_redis_async_face(rsm: tuple[RedisStateMachine, redis.Redis]) -> None:
    import redis.asyncio

    sm, _ = rsm
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        assert await sm.acreate(client, 7)
        assert (await sm.aapply(client, 7, "cancel", key="c")).applied
        assert (await sm.aapply(client, 7, "cancel", key="c")).replayed
        assert [h.state for h in await sm.ahistory(client, 7)] == ["cancelled"]
    finally:
        await client.aclose()


def test_keys_and_entity_ids_no_store_keeps_as_text_are_refused(db: Db) -> None:
    # The one rule for ids kept as text (oncely.core.text): refused before anything is written.
    o = Orders(db)
    conn = db.connect()
    for key in ("k\x00", "k\ud800"):
        with pytest.raises(InvalidKey, match="idempotency key"):
            o.sm.apply(conn, 3, "pay", data={"amount": 5}, key=key)
    with pytest.raises(InvalidEntityId, match="surrogate"):
        o.sm.apply(conn, "3\ud800", "pay", data={"amount": 5})
    conn.rollback()
    assert o.state(3) == "created" and o.history_count(3) == 0
