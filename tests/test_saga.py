"""Sagas on real SQLite, PostgreSQL and MariaDB: the docs' worked example (an order times out,
the order is cancelled, the stock given back), the saga twice and twice at once = one run,
retries, abort before the steps arrive, kill -9 in a step and in a compensation then resume,
remote HTTP steps with a derived Idempotency-Key."""

from __future__ import annotations

import datetime
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    SagaFailed,
    SagaStuck,
    TransactionLost,
)
from oncely.sql.connections import adapt
from oncely.statemachine.saga import HttpStep, Saga, Step, idempotency_key

from saga_shop import Shop
from sql_fixtures import Db

pytest_plugins = ["sql_fixtures"]

TESTS = Path(__file__).resolve().parent
# the child imports the oncely this test runs (a relative PYTHONPATH=src would not resolve
# from the tests folder, and the child would import the installed copy instead)
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(oncely.__file__).resolve().parents[1])}
APPLE = {"sku": "apple", "qty": 3}


@pytest.fixture
def shop(db: Db) -> Iterator[Shop]:
    s = Shop(db)
    s.setup()
    yield s


class StrSub(str):
    """A str subclass: JSON gives back a plain str."""


ACTIONS = [("await_payment", "action"), ("create_order", "action"), ("reserve_stock", "action")]
# await_payment raised: its own write rolled back with its barrier row
ROLLED_BACK = sorted(
    [*ACTIONS[1:], ("create_order", "compensate"), ("reserve_stock", "compensate")]
)


def test_order_times_out_is_rolled_back_and_stock_given_back(shop: Shop) -> None:
    conn = shop.db.connect()
    saga = shop.saga(paid=False)
    with pytest.raises(SagaFailed) as info:
        saga.run(conn, "order-1", {**APPLE, "paid": False})
    assert info.value.step == "await_payment"
    assert shop.qty() == 10 and shop.order_status("order-1") == "cancelled"
    assert shop.moves_of("order-1") == ROLLED_BACK
    # the whole saga again: it raises too (redteam5: it returned a 'compensated' SagaResult,
    # which a caller that only catches SagaFailed reported as a placed order)
    with pytest.raises(SagaFailed) as again:
        saga.run(conn, "order-1", {**APPLE, "paid": False})
    assert again.value.step is None  # this run saw no step fail: the saga was rolled back
    result = again.value.result
    assert result.state == "compensated" and result.executed == () and result.compensated == ()
    assert shop.qty() == 10 and shop.moves_of("order-1") == ROLLED_BACK


def test_paid_order_completes_once(shop: Shop) -> None:
    conn = shop.db.connect()
    saga = shop.saga(paid=True)
    first = saga.run(conn, "order-2", {**APPLE, "paid": True})
    assert first.state == "completed" and len(first.executed) == 3
    second = saga.run(conn, "order-2", {**APPLE, "paid": True})
    assert second.state == "completed" and second.executed == ()
    assert shop.qty() == 7 and shop.moves_of("order-2") == ACTIONS
    assert shop.order_status("order-2") == "pending"


@pytest.mark.parametrize("paid", [True, False])
def test_the_saga_twice_at_once_is_one_run(shop: Shop, paid: bool) -> None:
    saga = shop.saga(paid=paid)
    conns = [shop.db.connect() for _ in range(6)]
    start = threading.Barrier(6)
    states: list[str] = []

    def run(conn: Any) -> None:
        start.wait()
        try:
            states.append(saga.run(conn, "order-3", {**APPLE, "paid": paid}).state)
        except SagaFailed:
            states.append("failed")

    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(states) == 6
    if paid:
        assert set(states) == {"completed"}
        assert shop.qty() == 7 and shop.moves_of("order-3") == ACTIONS
    else:
        assert set(states) == {"failed"}  # every runner raises, not only the one that failed
        assert shop.qty() == 10 and shop.order_status("order-3") == "cancelled"
        assert shop.moves_of("order-3") == ROLLED_BACK


def test_retries_roll_back_each_failed_try(shop: Shop) -> None:
    conn = shop.db.connect()
    shop.flaky["reserve_stock"] = 2  # fails twice after its writes, then succeeds
    assert shop.saga(paid=True).run(conn, "order-4", {**APPLE, "paid": True}).state == "completed"
    assert shop.qty() == 7 and shop.moves_of("order-4") == ACTIONS
    shop.flaky["create_order"] = 5  # more than its 3 attempts: the saga rolls back
    with pytest.raises(SagaFailed) as info:
        shop.saga(paid=True).run(conn, "order-5", {**APPLE, "paid": True})
    assert info.value.step == "create_order"
    assert shop.qty() == 7  # order-4's 3 stay reserved, order-5's were given back
    assert shop.moves_of("order-5") == [
        ("reserve_stock", "action"),
        ("reserve_stock", "compensate"),
    ]


def test_a_step_that_rolls_back_itself_commits_nothing_after(shop: Shop) -> None:
    """A step that calls conn.rollback() and writes again took its barrier row out of the
    transaction the saga owns: the saga checks the row before the commit and fails the step
    with TransactionLost instead of committing the later write without the row (which every
    rerun would write again; red-team F04, the same kind)."""
    conn = shop.db.connect()
    shop.rolls_back = "reserve_stock"
    with pytest.raises(SagaFailed) as info:
        shop.saga(paid=True).run(conn, "order-rb", {**APPLE, "paid": True})
    assert info.value.step == "reserve_stock"
    assert isinstance(info.value.__cause__, TransactionLost)
    assert shop.qty() == 10 and shop.moves_of("order-rb") == []


def test_abort_before_the_steps_arrive_blocks_them(shop: Shop) -> None:
    conn = shop.db.connect()
    saga = shop.saga(paid=True)
    aborted = saga.abort(conn, "order-6", {**APPLE, "paid": True})
    assert aborted.state == "compensated" and aborted.compensated == ()  # empty compensations
    with pytest.raises(SagaFailed) as late:  # a run of an aborted saga raises
        saga.run(conn, "order-6", {**APPLE, "paid": True})
    assert late.value.step is None and late.value.result.executed == ()
    assert shop.qty() == 10 and shop.moves_of("order-6") == []
    done = saga.run(conn, "order-7", {**APPLE, "paid": True})
    assert saga.abort(conn, "order-7").state == "completed" == done.state  # too late to abort


def _kill_in(shop: Shop, saga_id: str, step: str, op: str) -> None:
    db = shop.db
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "saga_shop.py"), db.dialect, str(db.path), db.tag,
         saga_id, step, op],
        cwd=TESTS, stdout=subprocess.PIPE, text=True, env=CHILD_ENV,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "PAUSED", line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_in_a_step_then_resume(shop: Shop) -> None:
    _kill_in(shop, "order-8", "create_order", "action")  # reserve_stock committed, this not
    assert shop.qty() == 7 and shop.moves_of("order-8") == [("reserve_stock", "action")]
    conn = shop.db.connect()
    result = shop.saga(paid=True).run(conn, "order-8", {**APPLE, "paid": True})
    assert result.state == "completed"
    assert result.executed == ("create_order", "await_payment")
    assert shop.qty() == 7 and shop.moves_of("order-8") == ACTIONS


def test_kill_9_after_the_pivot_then_abort_leaves_it_and_a_rerun_completes_it(
    shop: Shop,
) -> None:
    """The runner is killed right after the pivot (await_payment: no compensation, the
    customer was charged) committed, while it runs the next step (ship). An abort from
    another process must not roll the saga back (the charge would stay for a cancelled
    order): it answers ``pivoted`` and compensates nothing; a rerun completes the saga."""
    _kill_in(shop, "order-pv", "ship", "action")  # await_payment committed, ship not
    moves = ACTIONS
    assert shop.qty() == 7 and shop.moves_of("order-pv") == moves
    conn = shop.db.connect()
    saga = shop.saga(paid=True, ship=True)
    late = saga.abort(conn, "order-pv")
    assert late.state == "pivoted" and late.compensated == () and late.executed == ()
    assert shop.db.run(f"SELECT state FROM saga_{shop.db.tag}") == [("pivoted",)]
    assert saga.abort(conn, "order-pv").state == "pivoted"  # again: still left alone
    assert shop.qty() == 7 and shop.moves_of("order-pv") == moves
    assert shop.order_status("order-pv") == "pending"  # not cancelled
    result = saga.run(conn, "order-pv")  # the resume drives it forward, on the stored data
    assert result.state == "completed" and result.executed == ("ship",)
    assert saga.abort(conn, "order-pv").state == "completed"
    assert shop.qty() == 7
    assert shop.moves_of("order-pv") == sorted([*moves, ("ship", "action")])


async def test_async_past_the_pivot_goes_forward_only(shop: Shop) -> None:
    """Async faces: a step after the pivot that fails for good does not roll the saga back
    (SagaStuck, the saga stays ``pivoted``); aabort() leaves it alone; arun() completes it."""
    conn = await shop.db.aconnect()
    calls: list[str] = []
    fail = {"ship": 1}

    async def step(ctx: Any) -> None:
        calls.append(f"{ctx.step}:{ctx.op}")
        if fail.get(ctx.step, 0) > 0:
            fail[ctx.step] -= 1
            raise ValueError("carrier down")

    saga = Saga("async-pivot", [Step("reserve", step, step), Step("pay", step),
                                Step("ship", step, attempts=1)],
                table=f"saga_{shop.db.tag}", barrier_table=f"barrier_{shop.db.tag}")  # fmt: skip
    assert saga.pivot is not None and saga.pivot.name == "pay"
    try:
        with pytest.raises(SagaStuck) as stuck:
            await saga.arun(conn, "a-pv", {"n": 1})
        assert stuck.value.step == "ship" and "pivoted" in str(stuck.value)
        assert calls == ["reserve:action", "pay:action", "ship:action"]
        aborted = await saga.aabort(conn, "a-pv")
        assert aborted.state == "pivoted" and aborted.compensated == ()
        done = await saga.arun(conn, "a-pv")
        assert done.state == "completed" and done.executed == ("ship",)
        assert calls == ["reserve:action", "pay:action", "ship:action", "ship:action"]
    finally:
        await shop.db.aclose()


def test_kill_9_in_a_compensation_then_resume(shop: Shop) -> None:
    _kill_in(shop, "order-9", "reserve_stock", "compensate")  # the last compensation
    assert shop.qty() == 7 and shop.order_status("order-9") == "cancelled"
    conn = shop.db.connect()
    # The resumer finds the saga 'compensating' and finishes the compensation.
    with pytest.raises(SagaFailed) as info:
        shop.saga(paid=False).run(conn, "order-9", {**APPLE, "paid": False})
    result = info.value.result
    assert result.state == "compensated" and result.compensated == ("reserve_stock",)
    assert shop.qty() == 10 and shop.moves_of("order-9") == ROLLED_BACK


def test_resume_with_other_data_is_refused_and_abort_uses_the_stored_data(shop: Shop) -> None:
    """redteam3 F06: the saga did not keep its input. A resume with other data compensated
    another amount than the action took, and abort(conn, saga_id) without data (as documented)
    failed in every compensation that read ctx.data."""
    _kill_in(shop, "order-10", "create_order", "action")  # reserve_stock took 3, committed
    assert shop.qty() == 7
    conn = shop.db.connect()
    saga = shop.saga(paid=True)
    with pytest.raises(IdempotencyKeyMismatch, match="other data"):
        saga.run(conn, "order-10", {"sku": "apple", "qty": 1, "paid": True})
    with pytest.raises(IdempotencyKeyMismatch):
        saga.abort(conn, "order-10", {"sku": "apple", "qty": 1})
    assert shop.qty() == 7 and shop.moves_of("order-10") == [("reserve_stock", "action")]
    aborted = saga.abort(conn, "order-10")  # no data: the stored data
    assert aborted.state == "compensated" and aborted.compensated == ("reserve_stock",)
    assert shop.qty() == 10  # exactly what was taken is given back
    # the same data in another key order is the same data
    same = {"paid": True, "qty": 3, "sku": "apple"}
    with pytest.raises(SagaFailed):  # (compensated: a run of it raises)
        saga.run(conn, "order-10", same)


def test_resume_without_data_runs_on_the_stored_data(shop: Shop) -> None:
    _kill_in(shop, "order-11", "create_order", "action")
    conn = shop.db.connect()
    result = shop.saga(paid=True).run(conn, "order-11")  # a resumer that lost the input
    assert result.state == "completed" and result.executed == ("create_order", "await_payment")
    assert shop.qty() == 7 and shop.order_status("order-11") == "pending"
    with pytest.raises(ConfigurationError, match="JSON"):
        shop.saga(paid=True).run(conn, "order-12", {"x": object()})


def test_a_saga_table_without_the_data_column_is_upgraded(shop: Shop) -> None:
    """Tables made before the data column: create_tables adds it; old rows (data NULL) keep
    working with the caller's data."""
    db = shop.db
    table = db.name("oldsaga")
    key = "VARBINARY(512)" if db.dialect == "mysql" else "VARCHAR(128)"
    db.run(
        f"CREATE TABLE {table} (saga_id {key} NOT NULL PRIMARY KEY, name VARCHAR(100) NOT NULL, "
        "state VARCHAR(16) NOT NULL)"
    )
    db.run(f"INSERT INTO {table} (saga_id, name, state) VALUES ('old-1', 'order', 'running')")
    conn = db.connect()
    old = Saga("order", shop.saga(paid=True).steps, table=table, barrier_table=f"barrier_{db.tag}")
    with pytest.raises(Exception, match="create_tables"):
        old.run(conn, "old-2", {**APPLE, "paid": True})
    if db.dialect != "sqlite":
        conn.rollback()
    db.tables += [f"{table}_history"]
    old.create_tables(conn)
    old.create_tables(conn)  # idempotent
    assert old.run(conn, "old-1", {**APPLE, "paid": True}).state == "completed"
    assert db.run(f"SELECT data FROM {table} WHERE saga_id = 'old-1'") == [(None,)]
    assert old.run(conn, "old-2", {**APPLE, "paid": True}).state == "completed"
    assert shop.qty() == 4


def test_bad_input(shop: Shop) -> None:
    with pytest.raises(ConfigurationError):
        Saga("s", [])
    with pytest.raises(ConfigurationError, match="two steps"):
        Saga("s", [Step("a", print), Step("a", print)])
    conn = shop.db.connect()
    with pytest.raises(ConfigurationError, match="saga_id"):
        shop.saga(paid=True).run(conn, "")
    with pytest.raises(Exception, match="create_tables"):
        Saga("s", [Step("a", print)], table=shop.db.name("nosaga")).run(conn, "x")


# -- remote steps ---------------------------------------------------------------------------
class _Remote(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []
    effects: set[str] = set()
    fail_first = True

    def do_POST(self) -> None:
        key = self.headers.get("Idempotency-Key", "")
        _Remote.seen.append((self.path, key))
        if _Remote.fail_first:
            _Remote.fail_first = False
            self.send_response(503)
        else:
            _Remote.effects.add(key)  # the remote side deduplicates by key
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_http_step_carries_a_stable_idempotency_key(shop: Shop) -> None:
    import httpx

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Remote)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    saga_id = f"pay-{uuid.uuid4().hex[:6]}"
    _Remote.seen, _Remote.effects, _Remote.fail_first = [], set(), True
    try:
        with httpx.Client() as client:
            saga = Saga(
                "payment",
                [HttpStep("charge", f"{url}/charge", client, json={"amount": 5},
                          compensation_url=f"{url}/refund", backoff=0.01)],
                table=f"saga_{shop.db.tag}", barrier_table=f"barrier_{shop.db.tag}",
            )  # fmt: skip
            conn = shop.db.connect()
            assert saga.run(conn, saga_id).state == "completed"
            assert saga.run(conn, saga_id).state == "completed"
    finally:
        server.shutdown()
    key = idempotency_key(saga_id, "charge", "action")
    assert _Remote.seen == [("/charge", key), ("/charge", key)]  # a 503, then the retry
    assert _Remote.effects == {key}
    assert key != idempotency_key(saga_id, "charge", "compensate")


async def test_async_saga(shop: Shop) -> None:
    if shop.db.dialect == "sqlite":
        pytest.skip("sqlite3 has no async driver")
    conn = await shop.db.aconnect()
    calls: list[str] = []

    async def step(ctx: Any) -> None:
        calls.append(ctx.step)

    saga = Saga("async", [Step("one", step), Step("two", step)],
                table=f"saga_{shop.db.tag}", barrier_table=f"barrier_{shop.db.tag}")  # fmt: skip
    try:
        assert (await saga.arun(conn, "a-1")).state == "completed"
        assert (await saga.arun(conn, "a-1")).executed == ()
        assert calls == ["one", "two"]
    finally:
        await shop.db.aclose()


def test_a_saga_id_no_store_keeps_as_text_is_refused(shop: Shop) -> None:
    conn = shop.db.connect()
    for saga_id in ("order\x00-1", "order\ud800"):
        with pytest.raises(ConfigurationError, match="saga_id"):
            shop.saga(paid=True).run(conn, saga_id)
    conn.rollback()


def test_idempotency_key_of_text_with_no_utf8_form_is_invalid_key() -> None:
    # Before: a raw UnicodeEncodeError.
    from oncely.errors import InvalidKey

    with pytest.raises(InvalidKey, match="lone surrogate"):
        idempotency_key("saga-\ud800", "charge", "action")
    assert idempotency_key("saga-\x00", "charge", "action").startswith("saga-")


def test_a_run_aborted_meanwhile_raises(shop: Shop) -> None:
    """redteam5: a run that abort() rolled back while its first step was running returned a
    SagaResult (state 'compensated') instead of raising: a caller following the docs (catch
    SagaFailed, else success) reported the rolled-back order as placed."""
    db = shop.db
    if db.dialect == "sqlite":
        pytest.skip("SQLite has one writer: abort() waits for the running step to commit")
    barrier_table = f"barrier_{db.tag}"

    started = threading.Event()

    def reserve_then_wait_for_abort(ctx: Any) -> None:
        shop.reserve(ctx)
        started.set()
        # the signal: abort() has turned the saga compensating and compensated the later steps
        # (empty compensations: they are now blocked); it then waits on this step's row lock
        deadline = time.monotonic() + 30
        while not db.run(
            f"SELECT 1 FROM {barrier_table} WHERE gid = '{ctx.saga_id}' "
            "AND branch = 'create_order' AND op = 'compensate'"
        ):
            assert time.monotonic() < deadline, "abort() did not start"
            time.sleep(0.02)

    saga = Saga(
        "order",
        [Step("reserve_stock", reserve_then_wait_for_abort, shop.give_back),
         Step("create_order", shop.create_order, shop.cancel_order),
         Step("await_payment", shop.await_payment, retry_on=())],
        table=f"saga_{db.tag}", barrier_table=barrier_table,
    )  # fmt: skip
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["run"] = saga.run(db.connect(), "order-ab", {**APPLE, "paid": True})
        except Exception as exc:
            out["run"] = exc

    def abort() -> None:
        assert started.wait(30)  # the first step is running
        out["abort"] = saga.abort(db.connect(), "order-ab")

    threads = [threading.Thread(target=run), threading.Thread(target=abort)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(out["run"], SagaFailed), out["run"]
    assert out["run"].step is None and out["run"].result.executed == ("reserve_stock",)
    assert out["abort"].state == "compensated"
    assert out["abort"].compensated == ("reserve_stock",)
    assert shop.qty() == 10
    assert shop.moves_of("order-ab") == [
        ("reserve_stock", "action"),
        ("reserve_stock", "compensate"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        {"amount": Decimal("9.99")},
        {"when": (1, 2)},
        {"n": float("nan")},
        {"n": float("inf")},
        {"tags": {"a"}},
        {1: "a"},
        {"nested": {"x": [1, (2,)]}},
        {"at": datetime.datetime(2026, 1, 1)},
        {"id": uuid.UUID(int=1)},
        {"b": b"x"},
        {"s": StrSub("x")},
    ],
    ids=lambda d: type(next(iter(d.values()))).__name__,
)
def test_data_that_a_json_round_trip_changes_is_refused(shop: Shop, data: Any) -> None:
    """redteam5: Decimal and tuple data reached the first run's steps as Decimal('9.99') and
    (1, 2), but a resume after kill -9 got '9.99' and [1, 2] (the stored JSON); NaN was stored.
    Data must be plain JSON: refused before anything is written or run."""
    conn = shop.db.connect()
    saga = shop.saga(paid=True)
    with pytest.raises(ConfigurationError, match="plain JSON"):
        saga.run(conn, "order-json", {**APPLE, "paid": True, **data})
    with pytest.raises(ConfigurationError, match="plain JSON"):
        saga.abort(conn, "order-json", {**APPLE, **data})
    assert shop.qty() == 10 and shop.moves_of("order-json") == []
    assert shop.db.run(f"SELECT COUNT(*) FROM saga_{shop.db.tag}") == [(0,)]


def test_the_first_run_and_a_resume_see_the_same_data(shop: Shop) -> None:
    """The steps of the first run get the data decoded from what was stored, as a resume does:
    the same values of the same types, whatever the caller does with its own dict."""
    seen: list[Any] = []

    def record(ctx: Any) -> None:
        seen.append(ctx.data)

    def fail(ctx: Any) -> None:
        raise RuntimeError("declined")

    saga = Saga("order", [Step("a", record, record), Step("b", fail, retry_on=())],
                table=f"saga_{shop.db.tag}", barrier_table=f"barrier_{shop.db.tag}")  # fmt: skip
    data = {"d": {"k": [2.0]}, "list": [1, "x", None, True], "n": 1.5}  # keys sorted, as stored
    with pytest.raises(SagaFailed):
        saga.run(shop.db.connect(), "order-same", data)
    with pytest.raises(SagaFailed):
        saga.run(shop.db.connect(), "order-same")
    assert seen == [data, data]  # the action (first run) and the compensation
    assert [repr(d) for d in seen] == [repr(data)] * 2  # the same types too


def test_a_run_after_an_abort_before_it_started_raises_saga_failed(shop: Shop) -> None:
    """rt11: abort() of a saga id that never ran stored ``{}`` as the saga's data, so the run
    of that id with its real data raised IdempotencyKeyMismatch ('started with other data
    ({})') instead of the documented SagaFailed (step None): the order-timed-out race lost by
    the run. The abort's row carries no data now: a later run raises SagaFailed whatever its
    data, and runs no step."""
    conn = shop.db.connect()
    saga = shop.saga(paid=True)
    aborted = saga.abort(conn, "order-ab1")
    assert aborted.state == "compensated" and aborted.compensated == ()
    for data in ({**APPLE, "paid": True}, {"sku": "pear", "qty": 1, "paid": True}, None):
        with pytest.raises(SagaFailed) as info:
            saga.run(conn, "order-ab1", data)
        assert info.value.step is None
        assert info.value.result.executed == () and info.value.result.compensated == ()
    # a second abort, with or without data, finds it rolled back and does nothing
    for again in (saga.abort(conn, "order-ab1"), saga.abort(conn, "order-ab1", APPLE)):
        assert again.state == "compensated" and again.compensated == ()
    # abort(data) of a saga id that never ran checks the data but does not store it
    assert saga.abort(conn, "order-ab2", {**APPLE, "paid": True}).state == "compensated"
    with pytest.raises(SagaFailed) as other:
        saga.run(conn, "order-ab2", {"sku": "pear", "qty": 9, "paid": True})
    assert other.value.step is None
    assert shop.qty() == 10
    assert shop.moves_of("order-ab1") == [] and shop.moves_of("order-ab2") == []
    rows = shop.db.run(f"SELECT state, data FROM saga_{shop.db.tag} ORDER BY saga_id")
    assert rows == [("compensated", None), ("compensated", None)]


def test_an_abort_after_completion_leaves_the_saga_alone(shop: Shop) -> None:
    """An abort of a completed saga returns its result ``completed`` and compensates nothing;
    with other data than the saga's own it raises IdempotencyKeyMismatch (as documented)."""
    conn = shop.db.connect()
    saga = shop.saga(paid=True)
    assert saga.run(conn, "order-done", {**APPLE, "paid": True}).state == "completed"
    late = saga.abort(conn, "order-done")
    assert late.state == "completed" and late.compensated == ()
    assert saga.abort(conn, "order-done", {**APPLE, "paid": True}).state == "completed"
    with pytest.raises(IdempotencyKeyMismatch):
        saga.abort(conn, "order-done", {"sku": "apple", "qty": 1, "paid": True})
    assert shop.qty() == 7 and shop.moves_of("order-done") == ACTIONS


async def test_async_run_after_an_abort_before_it_started(shop: Shop) -> None:
    """The async face of the rt11 case: aabort() then arun() with the saga's data."""
    conn = await shop.db.aconnect()
    calls: list[str] = []

    async def step(ctx: Any) -> None:
        calls.append(f"{ctx.step}:{ctx.op}")

    saga = Saga("async", [Step("one", step, step), Step("two", step, step)],
                table=f"saga_{shop.db.tag}", barrier_table=f"barrier_{shop.db.tag}")  # fmt: skip
    try:
        assert (await saga.aabort(conn, "a-ab")).state == "compensated"
        with pytest.raises(SagaFailed) as info:
            await saga.arun(conn, "a-ab", {"sku": "apple", "n": 3})
        assert info.value.step is None and info.value.result.executed == ()
        assert (await saga.aabort(conn, "a-ab", {"n": 1})).state == "compensated"
        assert calls == []
    finally:
        await shop.db.aclose()


@pytest.mark.serial
def test_abort_racing_the_run_never_mismatches_nor_leaves_an_effect(shop: Shop) -> None:
    """rt11, the order-timed-out race: for each saga id a run (with its data) and an abort
    (without) start at the same instant on their own connections. Either the run completes
    (and the abort, which came too late, leaves it alone: ``completed``), or the run raises
    SagaFailed and everything it applied is given back. Never IdempotencyKeyMismatch, never an
    action without its compensation."""
    db = shop.db
    db.run(f"UPDATE {shop.stock} SET qty = 1000 WHERE sku = 'apple'")
    saga = shop.saga(paid=True)
    ids = [f"race-{i}" for i in range(60)]
    both = threading.Barrier(2)
    runs: dict[str, Any] = {}
    aborts: dict[str, Any] = {}

    def drive(out: dict[str, Any], call: Any) -> None:
        conn = db.connect()
        try:
            for saga_id in ids:
                both.wait(30)
                try:
                    out[saga_id] = call(conn, saga_id)
                except Exception as exc:
                    out[saga_id] = exc
                    if db.dialect != "sqlite":
                        conn.rollback()
        finally:
            conn.close()

    def abort_later(conn: Any, saga_id: str) -> Any:
        # sweep the abort's arrival over the run: 0..5 round trips on its own connection first
        # (real statements, not sleeps), so it also lands after the pivot (await_payment) has
        # committed and before the saga is marked completed
        for _ in range(int(saga_id.split("-")[1]) % 6):
            adapt(conn).execute("SELECT 1", {})
        if db.dialect != "sqlite":
            conn.rollback()
        return saga.abort(conn, saga_id)

    data = {"sku": "apple", "qty": 1, "paid": True}
    threads = [
        threading.Thread(target=drive, args=(runs, lambda c, i: saga.run(c, i, data))),
        threading.Thread(target=drive, args=(aborts, abort_later)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    completed = 0
    for saga_id in ids:
        run, abort = runs[saga_id], aborts[saga_id]
        moves = shop.moves_of(saga_id)
        assert not isinstance(abort, Exception), (saga_id, abort)
        assert len(moves) == len(set(moves)), (saga_id, moves)  # each op at most once
        if isinstance(run, SagaFailed):
            assert run.step is None, (saga_id, run)
            assert abort.state == "compensated", (saga_id, abort)
            took = {step for step, op in moves if op == "action"}
            gave = {step for step, op in moves if op == "compensate"}
            # every action that ran was compensated; await_payment, the pivot, has no
            # compensation: a saga whose payment committed must never end compensated
            assert took == gave, (saga_id, moves)
        else:
            assert not isinstance(run, Exception), (saga_id, run)
            # the abort came too late: after completion, or after the pivot committed
            assert run.state == "completed", (saga_id, run)
            assert abort.state in ("completed", "pivoted"), (saga_id, abort)
            assert abort.compensated == (), (saga_id, abort)
            assert moves == ACTIONS, (saga_id, moves)
            completed += 1
    assert shop.qty() == 1000 - completed


def _forward_only_saga(shop: Shop, calls: list[str], fail: dict[str, int]) -> Saga:
    def step(ctx: Any) -> None:
        calls.append(f"{ctx.step}:{ctx.op}")
        if fail.get(ctx.step, 0) > 0:
            fail[ctx.step] -= 1
            raise ValueError("carrier down")

    return Saga("sa-pivot", [Step("reserve", step, step), Step("pay", step),
                             Step("ship", step, attempts=1)],
                table=f"saga_{shop.db.tag}", barrier_table=f"barrier_{shop.db.tag}")  # fmt: skip


def test_sqlalchemy_past_the_pivot_goes_forward_only(shop: Shop) -> None:
    """The pivot rule through a SQLAlchemy Connection (sync): a later step that fails for good
    leaves the saga ``pivoted`` (SagaStuck), abort() compensates nothing, a rerun completes."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(shop.db.url())
    calls: list[str] = []
    saga = _forward_only_saga(shop, calls, {"ship": 1})
    try:
        with engine.connect() as conn:
            with pytest.raises(SagaStuck):
                saga.run(conn, "sa-pv", {"n": 1})
            aborted = saga.abort(conn, "sa-pv")
            assert aborted.state == "pivoted" and aborted.compensated == ()
            assert saga.run(conn, "sa-pv").state == "completed"
        assert calls == ["reserve:action", "pay:action", "ship:action", "ship:action"]
    finally:
        engine.dispose()


async def test_async_sqlalchemy_abort_before_the_pivot_still_compensates(shop: Shop) -> None:
    """Before the pivot nothing changed (async SQLAlchemy): the pivot step that fails for good
    rolls back (nothing of it stays) and the saga is compensated; a later abort says so."""
    pytest.importorskip("sqlalchemy")
    from sqlalchemy.ext.asyncio import create_async_engine

    if shop.db.dialect == "sqlite":
        pytest.importorskip("aiosqlite")
    engine = create_async_engine(shop.db.url("async"))
    calls: list[str] = []
    saga = _forward_only_saga(shop, calls, {"pay": 9})
    try:
        async with engine.connect() as conn:
            with pytest.raises(SagaFailed) as failed:
                await saga.arun(conn, "asa-pv", {"n": 1})
            assert failed.value.step == "pay"
            assert (await saga.aabort(conn, "asa-pv")).state == "compensated"
        assert calls == ["reserve:action", "pay:action", "pay:action", "pay:action",
                         "reserve:compensate"]  # fmt: skip
    finally:
        await engine.dispose()


def test_django_past_the_pivot_goes_forward_only(tmp_path: Path) -> None:
    """The pivot rule through django.db.connection (a fresh interpreter: Django's settings are
    process-wide)."""
    pytest.importorskip("django")
    proc = subprocess.run(
        [sys.executable, str(TESTS / "saga_pivot_django_check.py"), str(tmp_path / "dj.db")],
        cwd=TESTS, env=CHILD_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
