"""``@idempotent`` end to end on every store: one execution, replay, waiting, errors, crashes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import pytest

from oncely import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    InFlightError,
    InvalidKey,
    LeaseLost,
    SerializationError,
    StoredFailure,
    StoreUnavailable,
    current_claim,
    idempotent,
)
from oncely.stores import Store, open_store
from oncely.stores.memory import MemoryStore

import workers


def unique() -> str:
    return f"order-{uuid.uuid4()}"


def test_one_execution_for_64_threads(store: Store) -> None:
    runs: list[str] = []
    gate = threading.Event()

    @idempotent(store=store, key=["order_id"])
    def charge(order_id: str) -> dict[str, Any]:
        runs.append(order_id)
        gate.wait(5)
        return {"order": order_id, "ok": True}

    order = unique()
    barrier = threading.Barrier(64)
    results: list[Any] = []

    def call() -> None:
        barrier.wait()
        results.append(charge(order))

    threads = [threading.Thread(target=call) for _ in range(64)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # let the duplicates reach their wait; the first call is held by `gate`
    gate.set()
    for t in threads:
        t.join()
    assert runs == [order]
    assert results == [{"order": order, "ok": True}] * 64


async def test_one_execution_for_64_tasks(store: Store) -> None:
    runs: list[str] = []

    @idempotent(store=store, key=["order_id"])
    async def charge(order_id: str) -> dict[str, Any]:
        runs.append(order_id)
        await asyncio.sleep(0.1)
        return {"order": order_id}

    order = unique()
    results = await asyncio.gather(*(charge(order) for _ in range(64)))
    assert runs == [order]
    assert results == [{"order": order}] * 64
    await store.aclose()


def test_one_execution_for_4_processes(
    shared_store: tuple[Store, str, dict[str, Any]], tmp_path: Path
) -> None:
    _, url, options = shared_store
    log = tmp_path / "runs.log"
    key = unique()
    start_at = time.time() + 1.5
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(
            workers.run_decorated, [(url, options, key, str(log), start_at, 0.3)] * 4
        )
    executions = log.read_text().split()
    assert len(executions) == 1
    assert results == [{"pid": int(executions[0])}] * 4


@pytest.mark.slow
def test_crash_inside_the_function_then_retry_runs_exactly_once(
    shared_store: tuple[Store, str, dict[str, Any]], tmp_path: Path
) -> None:
    store, url, options = shared_store
    log = tmp_path / "runs.log"
    log.touch()
    key = unique()
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=workers.crash_inside, args=(url, options, key, str(log), 1.0))
    child.start()
    while not log.read_text():  # the child is inside the function, holding the claim
        assert child.is_alive(), "child died before reaching the function"
        time.sleep(0.01)
    # While the child lives (and renews), a retry must not run the function.
    with pytest.raises(InFlightError):
        workers_call(store, key, log, on_duplicate="raise")
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join()
    # After the lease runs out, one retry runs; further retries replay.
    first = workers_call(store, key, log, wait_timeout=10)
    second = workers_call(store, key, log, wait_timeout=10)
    executions = log.read_text().split()
    assert len(executions) == 2 and executions[1] == str(os.getpid())
    assert first == second == {"pid": os.getpid()}


def workers_call(store: Store, key: str, log: Path, **options: Any) -> Any:
    @idempotent(store=store, name="workers.append", key=["key"], **options)
    def append(key: str) -> dict[str, Any]:
        with open(log, "a") as out:
            out.write(f"{os.getpid()}\n")
        return {"pid": os.getpid()}

    return append(key)


def test_replay_returns_the_stored_result_without_running(store: Store) -> None:
    runs = []

    @idempotent(store=store, key=["order_id"], validate=["amount"])
    def charge(order_id: str, amount: int) -> dict[str, Any]:
        runs.append(amount)
        return {"charged": amount, "n": len(runs)}

    order = unique()
    assert charge(order, 100) == {"charged": 100, "n": 1}
    assert charge(order, 100) == {"charged": 100, "n": 1}
    assert charge(order_id=order, amount=100) == {"charged": 100, "n": 1}
    with pytest.raises(IdempotencyKeyMismatch, match="different payload"):
        charge(order, 999)
    assert runs == [100]
    assert charge(unique(), 5) == {"charged": 5, "n": 2}


@dataclasses.dataclass
class Receipt:
    order_id: str
    amount: Decimal
    at: dt.datetime
    tags: tuple[str, ...]


class Payment(pydantic.BaseModel):
    id: uuid.UUID
    amount: Decimal
    receipt_lines: list[str]


def test_results_round_trip_with_their_types(store: Store) -> None:
    when = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)

    @idempotent(store=store, key=["order_id"])
    def make_receipt(order_id: str) -> Receipt:
        return Receipt(order_id, Decimal("10.05"), when, ("a", "b"))

    @idempotent(store=store, key=["order_id"])
    def make_payment(order_id: str) -> Payment:
        return Payment(id=uuid.UUID(int=7), amount=Decimal("0.10"), receipt_lines=["x"])

    @idempotent(store=store, key=["order_id"])
    def make_list(order_id: str) -> list[Receipt]:
        return [Receipt(order_id, Decimal(1), when, ())]

    order = unique()
    for fn in (make_receipt, make_payment, make_list):
        first, replay = fn(order), fn(order)
        assert replay == first
        assert type(replay) is type(first)
    assert isinstance(make_receipt(order).amount, Decimal)
    assert make_receipt(order).tags == ("a", "b")
    assert isinstance(make_list(order)[0], Receipt)


def test_an_exception_releases_the_key_so_a_retry_runs(store: Store) -> None:
    attempts = []

    @idempotent(store=store, key=["order_id"])
    def flaky(order_id: str) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("bank timed out")
        return "paid"

    order = unique()
    with pytest.raises(ConnectionError):
        flaky(order)
    assert flaky(order) == "paid"
    assert flaky(order) == "paid"
    assert len(attempts) == 2


class CardDeclined(Exception):
    pass


def test_stored_errors_are_replayed_not_rerun(store: Store) -> None:
    attempts = []

    @idempotent(store=store, key=["order_id"], store_errors=[CardDeclined, KeyError])
    def charge(order_id: str) -> str:
        attempts.append(1)
        raise CardDeclined("insufficient funds")

    order = unique()
    for _ in range(3):
        with pytest.raises(CardDeclined, match="insufficient funds"):
            charge(order)
    assert len(attempts) == 1


def test_stored_error_of_a_class_no_longer_allowed_is_a_stored_failure(store: Store) -> None:
    @idempotent(store=store, name="declines", key=["order_id"], store_errors=[CardDeclined])
    def first(order_id: str) -> str:
        raise CardDeclined("no")

    @idempotent(store=store, name="declines", key=["order_id"])
    def second(order_id: str) -> str:
        return "ran"

    order = unique()
    with pytest.raises(CardDeclined):
        first(order)
    with pytest.raises(StoredFailure) as info:
        second(order)
    assert info.value.type_name.endswith("CardDeclined") and info.value.detail == "no"


def test_duplicate_can_raise_in_flight_instead_of_waiting(store: Store) -> None:
    inside, finish = threading.Event(), threading.Event()

    @idempotent(store=store, key=["order_id"], on_duplicate="raise", lease=20)
    def slow(order_id: str) -> int:
        inside.set()
        finish.wait(5)
        return 1

    order = unique()
    worker = threading.Thread(target=slow, args=(order,))
    worker.start()
    inside.wait(5)
    with pytest.raises(InFlightError) as info:
        slow(order)
    assert 0 < info.value.retry_after <= 20
    finish.set()
    worker.join()
    assert slow(order) == 1


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_waiting_duplicate_gives_up_after_wait_timeout(store: Store) -> None:
    inside, finish = threading.Event(), threading.Event()

    @idempotent(store=store, key=["order_id"], wait_timeout=0.3)
    def slow(order_id: str) -> int:
        inside.set()
        finish.wait(5)
        return 1

    order = unique()
    worker = threading.Thread(target=slow, args=(order,))
    worker.start()
    inside.wait(5)
    t0 = time.monotonic()
    with pytest.raises(InFlightError, match="wait_timeout"):
        slow(order)
    assert time.monotonic() - t0 < 3
    finish.set()
    worker.join()


def test_lease_is_renewed_while_a_slow_call_runs(store: Store) -> None:
    runs = []

    # A 2 s lease: a loaded 2-core machine can stall the renewals ~1 s (not about expiry).
    @idempotent(store=store, key=["order_id"], lease=2)
    def slow(order_id: str) -> str:
        runs.append(1)
        time.sleep(4.5)  # two leases long
        claim = current_claim()
        assert claim is not None and claim.lost is None
        return "done"

    order = unique()
    worker = threading.Thread(target=slow, args=(order,))
    worker.start()
    time.sleep(2.5)  # past an unrenewed lease
    assert slow(order) == "done"
    worker.join()
    assert runs == [1]


async def test_async_lease_is_renewed_while_a_slow_call_runs(store: Store) -> None:
    runs = []

    @idempotent(store=store, key=["order_id"], lease=2)
    async def slow(order_id: str) -> str:
        runs.append(1)
        await asyncio.sleep(4.5)
        return "done"

    order = unique()
    first = asyncio.ensure_future(slow(order))
    await asyncio.sleep(2.5)
    assert await slow(order) == "done"
    assert await first == "done"
    assert runs == [1]
    await store.aclose()


def test_a_lost_lease_is_surfaced(store: Store) -> None:
    lost: list[BaseException] = []
    order = unique()

    @idempotent(store=store, key=["order_id"], lease=0.3, on_lease_lost=lambda c, e: lost.append(e))
    def victim(order_id: str) -> str:
        claim = current_claim()
        assert claim is not None
        store.delete(claim.key)  # an operator removed the record mid-call
        deadline = time.monotonic() + 5
        while claim.lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(LeaseLost):
            claim.check()
        return "finished anyway"

    with pytest.raises(LeaseLost, match="claim was lost"):
        victim(order)
    deadline = time.monotonic() + 5  # reported on a thread of its own when a renewal found it
    while not lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(lost) == 1 and isinstance(lost[0], LeaseLost)


def test_cancelled_async_call_releases_the_key_with_on_cancel_release(store: Store) -> None:
    async def scenario() -> None:
        runs = []
        started = asyncio.Event()

        @idempotent(store=store, key=["order_id"], on_cancel="release")
        async def slow(order_id: str) -> str:
            runs.append(1)
            started.set()
            await asyncio.sleep((len(runs) == 1 and 10) or 0)
            return "done"

        order = unique()
        task = asyncio.ensure_future(slow(order))
        # Cancel once the body runs (a cancel during a slow claim would run nothing at all).
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(slow(order), 5) == "done"
        assert runs == [1, 1]
        await store.aclose()

    asyncio.run(scenario())


def test_a_body_cut_off_by_the_end_of_its_event_loop_keeps_its_key(store: Store) -> None:
    """on_cancel="finish": the caller is cancelled after the body started, then its event loop
    ends (asyncio.run cancels the shielded body, as at a server's shutdown). The body's effect
    may have happened: the key stays claimed (a retry gets InFlightError until the lease ends),
    never released for a second run (red team 13: the retry ran the body again, every time)."""
    runs: list[str] = []
    name = f"loop-end-{unique()}"

    @idempotent(store=store, name=name, key=["order_id"], lease=60, on_duplicate="raise")
    async def charge(order_id: str) -> str:
        runs.append(order_id)
        await asyncio.sleep(5)  # waiting for the provider's answer when the loop ends
        return "charged"

    order = unique()

    async def first() -> None:
        task = asyncio.ensure_future(charge(order))
        while not runs:
            await asyncio.sleep(0.001)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # return at once: asyncio.run cancels the body that is still running

    asyncio.run(first())

    async def retry() -> None:
        with pytest.raises(InFlightError):
            await charge(order)
        await store.aclose()

    asyncio.run(retry())
    assert runs == [order]


def test_a_sync_body_interrupted_by_ctrl_c_keeps_its_key(store: Store) -> None:
    """A KeyboardInterrupt (or SystemExit) inside the body is an interruption, not a failure:
    the key is not released, so a retry does not run the body a second time at once."""
    runs: list[str] = []

    @idempotent(store=store, key=["order_id"], lease=60, on_duplicate="raise")
    def charge(order_id: str) -> str:
        runs.append(order_id)
        if len(runs) == 1:  # a second run must not raise it: pytest would stop the session
            raise KeyboardInterrupt  # Ctrl-C while waiting for the provider's answer
        return "charged twice"

    order = unique()
    with pytest.raises(KeyboardInterrupt):
        charge(order)
    with pytest.raises(InFlightError):
        charge(order)
    assert runs == [order]


def test_unserializable_result_is_recorded_and_not_rerun(store: Store) -> None:
    runs = []

    @idempotent(store=store, key=["order_id"])
    def bad(order_id: str) -> object:
        runs.append(1)
        return object()

    order = unique()
    with pytest.raises(SerializationError, match="cannot be stored"):
        bad(order)
    with pytest.raises(SerializationError, match="already ran"):
        bad(order)
    assert runs == [1]


def test_bad_keys_get_typed_errors(store: Store) -> None:
    @idempotent(store=store, key=["order_id"])
    def charge(order_id: Any) -> int:
        return 1

    with pytest.raises(InvalidKey, match="empty"):
        charge("")
    with pytest.raises(InvalidKey, match="255"):
        charge("x" * 256)
    assert charge("x" * 255) == 1
    with pytest.raises(InvalidKey, match="non-empty string, an int or a UUID"):
        charge(object())
    with pytest.raises(ConfigurationError, match="not a parameter"):
        idempotent(store=store, key=["nope"])(lambda order_id: 1)
    with pytest.raises(ConfigurationError, match="positive"):
        idempotent(store=store, ttl=0)(lambda: 1)


def test_dotted_paths_callables_and_scopes(store: Store) -> None:
    runs = []

    @idempotent(
        store=store,
        key=["order.id"],
        validate=["order.amount"],
        scope=lambda order, tenant: tenant,
    )
    def place(order: dict[str, Any], tenant: str) -> int:
        runs.append(tenant)
        return len(runs)

    oid = unique()
    assert place({"id": oid, "amount": 1}, "acme") == 1
    assert place({"id": oid, "amount": 1}, "acme") == 1
    assert place({"id": oid, "amount": 1}, "globex") == 2  # same key, other tenant
    with pytest.raises(IdempotencyKeyMismatch):
        place({"id": oid, "amount": 2}, "acme")

    @idempotent(store=store, key=lambda request: request["headers"]["Idempotency-Key"])
    def handle(request: dict[str, Any]) -> str:
        runs.append("h")
        return "ok"

    req = {"headers": {"Idempotency-Key": unique()}}
    assert handle(req) == handle(req) == "ok"
    assert runs.count("h") == 1


def test_stable_name_keeps_keys_across_renames(store: Store) -> None:
    @idempotent(store=store, name="billing.charge", key=["order_id"])
    def charge_v1(order_id: str) -> str:
        return "v1"

    @idempotent(store=store, name="billing.charge", key=["order_id"])
    def charge_v2(order_id: str) -> str:
        return "v2"

    order = unique()
    assert charge_v1(order) == "v1"
    assert charge_v2(order) == "v1"


def test_forget_lets_the_call_run_again(store: Store) -> None:
    runs = []

    @idempotent(store=store, key=["order_id"])
    def charge(order_id: str) -> int:
        runs.append(1)
        return len(runs)

    order = unique()
    assert charge(order) == 1
    assert charge.forget(order) is True  # type: ignore[attr-defined]
    assert charge(order) == 2


class CountingMemoryStore(MemoryStore):
    """A real memory store that counts claims, to see the cache skip them."""

    claims = 0

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        self.claims += 1
        return super().claim(*args, **kwargs)


def test_local_cache_serves_replays_without_the_store() -> None:
    store = CountingMemoryStore()

    @idempotent(store=store, key=["order_id"], cache_size=10)
    def charge(order_id: str) -> str:
        return "ok"

    order = unique()
    assert charge(order) == "ok"  # claim + complete
    assert charge(order) == "ok"  # claim -> replay, cached
    assert charge(order) == "ok"  # cache
    assert charge(order) == "ok"  # cache
    assert store.claims == 2


def test_store_down_fails_closed_by_default_and_open_on_request() -> None:
    runs = []
    dead = open_store("redis://127.0.0.1:1/0")

    @idempotent(store=dead, key=["order_id"])
    def closed(order_id: str) -> int:
        runs.append(1)
        return 1

    @idempotent(store=dead, key=["order_id"], fail_open=True)
    def opened(order_id: str) -> int:
        runs.append(2)
        return 2

    with pytest.raises(StoreUnavailable):
        closed(unique())
    assert runs == []
    assert opened(unique()) == 2
    assert runs == [2]


def test_unknown_store_url_is_a_configuration_error_when_decorating() -> None:
    # At start-up (decorating), like IdempotencyConfig and Tokens, not at the first call.
    with pytest.raises(ConfigurationError, match="unknown store URL scheme"):

        @idempotent(store="mongodb://localhost/x", key=["k"])
        def fn(k: str) -> int:
            return 1


def test_the_default_store_is_sqlite_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = (
        "from oncely import idempotent\n"
        "runs = []\n"
        "@idempotent(key=['k'], name='default_store_check.f')  # python -c: nothing names f\n"
        "def f(k: str) -> int:\n"
        "    runs.append(k)\n"
        "    return 7\n"
        "print(f('a'), f('a'), len(runs))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ONCELY_STORE"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["7", "7", "1"]
    assert (tmp_path / "oncely.db").exists()


def test_schema_missing_is_a_typed_error_that_says_what_to_run() -> None:
    from oncely import SchemaMissing

    from conftest import POSTGRES_URL

    store = open_store(POSTGRES_URL, table=f"oncely_missing_{uuid.uuid4().hex[:8]}")
    runs = []

    @idempotent(store=store, key=["order_id"])
    def charge(order_id: str) -> int:
        runs.append(1)
        return 1

    try:
        with pytest.raises(SchemaMissing, match="oncely init"):
            charge(unique())
        assert runs == []
    finally:
        store.close()


async def test_cancelling_at_random_points_never_leaves_a_key_held(store: Store) -> None:
    import random

    rng = random.Random(7)
    runs: collections.Counter[str] = collections.Counter()

    @idempotent(store=store, key=["order_id"], lease=30, wait_timeout=5)
    async def work(order_id: str) -> str:
        await asyncio.sleep(0.002)
        runs[order_id] += 1
        return order_id

    for _ in range(25):
        order = unique()
        task = asyncio.ensure_future(work(order))
        await asyncio.sleep(rng.uniform(0, 0.006))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Whatever point the cancel hit, the key is free or completed: no 30 s lease is left.
        assert await asyncio.wait_for(work(order), 3) == order
        # ... and a body that finished (even in the loop turn of the cancel) is not run again.
        assert runs[order] == 1, (order, runs[order])
    await store.aclose()


def test_cache_refuses_another_payload_and_forget_evicts_the_key() -> None:
    store = CountingMemoryStore()
    runs = []

    @idempotent(store=store, key=["order_id"], validate=["amount"], cache_size=10)
    def charge(order_id: str, amount: int) -> int:
        runs.append(amount)
        return amount

    order = unique()
    assert charge(order, 5) == 5
    assert charge(order, 5) == 5  # replay, now cached
    with pytest.raises(IdempotencyKeyMismatch):
        charge(order, 6)  # the cached record is not served to another payload
    assert charge.forget(order, 5) is True  # type: ignore[attr-defined]
    assert charge(order, 6) == 6  # neither cache nor store remembers the key
    assert runs == [5, 6]


class RenewCrashesStore(MemoryStore):
    """A real memory store whose renewals fail with an error no store contract names."""

    def renew(self, *args: Any, **kwargs: Any) -> float:
        raise RuntimeError("driver bug")

    async def arenew(self, *args: Any, **kwargs: Any) -> float:
        raise RuntimeError("driver bug")


def test_a_lease_running_out_after_failed_renewals_reports_the_renewals_error() -> None:
    """A renewal failed and its retry was still pending when the lease's bound passed (a
    loaded machine: the retry came late): the loss is reported with that renewal's error, as
    when the failure is found too late to retry, not a bare "no renewal confirmed". The old
    code reported LeaseLost here (a CI run of the test below failed on it)."""
    from oncely.core.lease import Claimed
    from oncely.core.records import RecordKey

    lost: list[BaseException] = []
    claim = Claimed(
        RecordKey("s", "d" * 64), 1, 0.3, MemoryStore(), on_lost=lambda c, e: lost.append(e)
    )
    now = time.monotonic()
    claim.start(now)
    assert claim._failed(RuntimeError("driver bug"), now) is True  # retried while it lasts
    claim.expire()  # the bound passed before the retry ran
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:  # reported on a thread of its own
        time.sleep(0.01)
    assert len(lost) == 1 and isinstance(lost[0], RuntimeError), lost
    assert isinstance(claim.lost, RuntimeError)


@pytest.mark.parametrize("face", ["sync", "async"])
def test_an_unexpected_renewal_error_is_reported_not_swallowed(face: str) -> None:
    store = RenewCrashesStore()
    lost: list[BaseException] = []

    def on_lost(claim: Any, error: BaseException) -> None:
        lost.append(error)

    if face == "sync":

        @idempotent(store=store, key=["k"], lease=0.3, on_lease_lost=on_lost)
        def slow(k: str) -> str:
            claim = current_claim()
            assert claim is not None
            deadline = time.monotonic() + 5
            while claim.lost is None and time.monotonic() < deadline:
                time.sleep(0.01)
            return "done"

        slow(unique())
    else:

        @idempotent(store=store, key=["k"], lease=0.3, on_lease_lost=on_lost)
        async def aslow(k: str) -> str:
            claim = current_claim()
            assert claim is not None
            deadline = time.monotonic() + 5
            while claim.lost is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return "done"

        asyncio.run(aslow(unique()))
    # A loss found on a renewal thread is reported on a thread of its own (it must not stall
    # other renewals): wait for it.
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(lost) == 1 and isinstance(lost[0], RuntimeError)


# -- the default key must not leave out what tells two calls apart (issue 7, item 5) ----------


class Account:
    def __init__(self, owner: str) -> None:
        self.id = owner
        self.deposits: list[int] = []


def test_a_method_with_the_default_key_is_refused_when_decorated() -> None:
    with pytest.raises(ConfigurationError, match=r"key=.*scope=") as info:

        class Bank:
            @idempotent(store="memory://")
            def deposit(self, amount: int) -> int:
                return amount

    assert "'self'" in str(info.value)
    with pytest.raises(ConfigurationError, match="'cls'"):

        class Factory:
            @classmethod
            @idempotent(store="memory://")
            def make(cls, amount: int) -> int:
                return amount


def test_alice_and_bob_deposit_the_same_amount_and_both_run() -> None:
    class Bank(Account):
        @idempotent(store="memory://", key=["self.id", "amount"])
        def deposit(self, amount: int) -> int:
            self.deposits.append(amount)
            return len(self.deposits)

        @idempotent(store="memory://", scope=lambda self, amount: self.id, key=["amount"])
        def withdraw(self, amount: int) -> int:
            self.deposits.append(-amount)
            return len(self.deposits)

    alice, bob = Bank("alice"), Bank("bob")
    assert alice.deposit(10) == 1 and bob.deposit(10) == 1
    assert alice.deposit(10) == 1  # a retry of Alice's deposit replays hers
    assert alice.withdraw(5) == 2 and bob.withdraw(5) == 2
    assert alice.deposits == [10, -5] and bob.deposits == [10, -5]


def _wrapping(fn: Any) -> Any:
    """A decorator whose closure holds only the function it wraps (code, not data)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def test_every_callable_whose_calls_differ_by_more_than_arguments_is_refused() -> None:
    import functools

    alice = Account("alice")

    def deposit(account: Account, amount: int) -> int:
        return amount

    class Till:
        def __init__(self, account: Account) -> None:
            self.account = account

        def __call__(self, amount: int) -> int:
            return amount

    def for_account(account: Account) -> Any:
        def deposit_to(amount: int) -> int:
            account.deposits.append(amount)
            return amount

        return deposit_to

    hidden = {
        "method bound to a Teller": Teller().deposit,
        "functools.partial": functools.partial(deposit, alice),
        "callable Till object": Till(alice),
        "closure over account": for_account(alice),
    }
    for what, fn in hidden.items():
        with pytest.raises(ConfigurationError, match=what):
            idempotent(store="memory://", name=f"n.{what}")(fn)
    # Code in a closure (a wrapped function, a class) is not a hidden input.
    assert idempotent(store="memory://")(_wrapping(_double))(4) == 8


def _double(n: int) -> int:
    return n * 2


class Teller:
    def deposit(self, amount: int) -> int:
        return amount


DEPOSITS: list[int] = []


def deposit_into(account: Any, amount: int) -> int:
    DEPOSITS.append(amount)
    return amount


def test_a_function_bound_later_as_a_method_is_refused_at_its_first_call() -> None:
    @dataclasses.dataclass
    class Wallet:
        id: str

    deposit = idempotent(store="memory://", name="wallet.deposit")(deposit_into)
    Wallet.deposit = deposit  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="called as a method of Wallet"):
        Wallet("alice").deposit(10)  # type: ignore[attr-defined]
    assert DEPOSITS == []
    assert deposit("alice", 10) == 10  # called as a plain function, the arguments are the key


def test_functions_of_the_same_name_in_two_modules_do_not_share_records() -> None:
    import types

    store = MemoryStore()
    made = []
    for module in ("billing", "refunds"):
        namespace = types.ModuleType(module)
        exec(
            "def charge(order_id: str) -> str:\n    return __name__\n",
            namespace.__dict__,
        )
        made.append(idempotent(store=store, key=["order_id"])(namespace.charge))
    order = unique()
    assert made[0](order) == "billing"
    assert made[1](order) == "refunds"
    with pytest.raises(ConfigurationError, match="lambdas"):
        idempotent(store=store, key=["x"])(lambda x: x)
    assert idempotent(store=store, key=["x"], name="t.echo")(lambda x: x)("a") == "a"


# -- every key source refuses parts that do not identify an operation (issue 7, item 6) -------

NOT_KEYS = [None, "", True, False, 1.5, 0.0, {"a": 1}, ["a"], ("a",), b"k", Decimal("1")]


@pytest.mark.parametrize("bad", NOT_KEYS, ids=repr)
def test_key_paths_callables_and_scopes_refuse_parts_that_are_no_key(bad: Any) -> None:
    store = MemoryStore()
    runs: list[str] = []

    @idempotent(store=store, key=lambda r: r.get("k"))
    def by_callable(r: dict[str, Any]) -> int:
        runs.append("callable")
        return 1

    @idempotent(store=store, key=["r.k"])
    def by_path(r: dict[str, Any]) -> int:
        runs.append("path")
        return 1

    @idempotent(store=store, key=["r.k", "n"])
    def by_two_paths(r: dict[str, Any], n: str) -> int:
        runs.append("paths")
        return 1

    @idempotent(store=store, key=["n"], scope=lambda r, n: r.get("k"))
    def by_scope(r: dict[str, Any], n: str) -> int:
        runs.append("scope")
        return 1

    for call in (
        lambda: by_callable({"k": bad}),
        lambda: by_path({"k": bad}),
        lambda: by_two_paths({"k": bad}, "x"),
        lambda: by_scope({"k": bad}, "x"),
    ):
        with pytest.raises(InvalidKey):
            call()
    assert runs == []


def test_a_key_callable_returning_none_does_not_merge_calls() -> None:
    runs = []

    @idempotent(store="memory://", key=lambda r: r.get("k"))
    def f(r: dict[str, int]) -> int:
        runs.append(r["b"])
        return r["b"]

    with pytest.raises(InvalidKey, match="None"):
        f({"b": 1})
    with pytest.raises(InvalidKey, match="None"):
        f({"b": 2})
    assert runs == []


def test_ints_and_uuids_are_key_parts_and_a_static_scope_must_be_a_string() -> None:
    import enum

    class Status(str, enum.Enum):
        PAID = "paid"

    runs = []

    @idempotent(store="memory://", key=["order_id", "status"], scope=lambda order_id, status: 7)
    def ship(order_id: int | uuid.UUID, status: Status) -> int:
        runs.append(order_id)
        return len(runs)

    assert ship(42, Status.PAID) == ship(42, Status.PAID) == 1
    assert ship(uuid.UUID(int=42), Status.PAID) == 2
    # An enum member is keyed by its value, the same as the plain string.
    assert ship(42, "paid") == 1  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="scope="):
        idempotent(store="memory://", key=["k"], scope=7)(_double)  # type: ignore[arg-type]


# -- defaults (issue 7, item 16) --------------------------------------------------------------


def test_records_are_kept_24_hours_by_default(store: Store) -> None:
    @idempotent(store=store, key=["order_id"])
    def charge(order_id: str) -> int:
        return 1

    order = unique()
    charge(order)
    [record] = [r for r in store.list(limit=1000) if r.status == "completed"]
    assert record.expires_at - record.created_at == pytest.approx(86400, abs=5)


# -- every failure to store an outcome after the body ran is "ran, not storable" -------------------
def _circular() -> Any:
    order: dict[str, Any] = {"id": "o-1", "lines": []}
    order["lines"].append({"sku": "apple", "order": order})  # a back-reference
    return order


def _deep() -> Any:
    value: list[Any] = []
    for _ in range(5000):
        value = [value]
    return value


class _LockedCodec:
    """A custom codec whose encode fails with an error of its own (its key did not load)."""

    name = "locked"

    def encode(self, value: Any) -> bytes:
        raise KeyError("encryption key not loaded")

    def decode(self, data: bytes, type_hint: Any = None) -> Any:  # pragma: no cover
        raise AssertionError("nothing was stored")


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
@pytest.mark.parametrize("case", ["circular", "deep", "custom codec"])
def test_a_result_that_fails_to_encode_in_any_way_runs_once(store: Store, case: str) -> None:
    # F09 (redteam3): a RecursionError (circular or deep value) or a custom codec's own error
    # escaped bare and left the key claimed: when the lease ran out, a retry charged again.
    runs: list[str] = []
    make = {"circular": _circular, "deep": _deep, "custom codec": lambda: "ok"}[case]

    @idempotent(
        store=store,
        key=["order_id"],
        lease=2,
        wait_timeout=5,
        codec=_LockedCodec() if case == "custom codec" else None,
    )
    def charge(order_id: str) -> Any:
        runs.append(order_id)
        return make()

    order = unique()
    with pytest.raises(SerializationError, match="cannot be stored"):
        charge(order)
    started = time.monotonic()
    with pytest.raises(SerializationError, match="already ran for this key"):
        charge(order)
    assert runs == [order]
    assert time.monotonic() - started < 1.5  # replayed at once, not after the lease ran out


async def test_an_async_result_that_fails_to_encode_runs_once() -> None:
    runs: list[int] = []

    @idempotent(store="memory://", key=["n"], lease=2, wait_timeout=5)
    async def export(n: int) -> Any:
        runs.append(n)
        return _circular()

    with pytest.raises(SerializationError, match="circular"):
        await export(1)
    with pytest.raises(SerializationError, match="already ran"):
        await export(1)
    assert runs == [1]


# -- stored exceptions are raised again as themselves ----------------------------------------------
class KwOnlyDecline(Exception):
    def __init__(self, code: str, *, reason: str) -> None:
        super().__init__(code)
        self.reason = reason


class SoftDecline(KwOnlyDecline):
    """A subclass of a listed class: stored too, so replayed as itself too."""


class ObjectArg(Exception):
    pass


@pytest.mark.parametrize("raised", [KwOnlyDecline, SoftDecline])
def test_a_stored_exception_replays_as_its_own_class_with_its_attributes(
    store: Store, raised: type[KwOnlyDecline]
) -> None:
    # F10 (redteam3): an exception whose __init__ has a keyword-only argument replayed as
    # StoredFailure, so `except KwOnlyDecline:` on a retry missed it.
    runs: list[str] = []

    @idempotent(store=store, key=["order_id"], store_errors=[KwOnlyDecline])
    def charge(order_id: str) -> str:
        runs.append(order_id)
        raise raised("card_declined", reason="insufficient funds")

    order = unique()
    for _ in range(2):
        with pytest.raises(raised) as info:
            charge(order)
        assert type(info.value) is raised
        assert info.value.args == ("card_declined",)
        assert info.value.reason == "insufficient funds"
    assert runs == [order]


def test_a_stored_exception_with_a_value_json_cannot_keep_is_refused_by_name() -> None:
    # F10: ObjectArg(object()) replayed as ObjectArg() -- its argument silently dropped.
    runs: list[int] = []

    @idempotent(store="memory://", key=["n"], store_errors=[ObjectArg])
    def call(n: int) -> str:
        runs.append(n)
        raise ObjectArg(object())

    with pytest.raises(ObjectArg):  # the first caller gets what the body raised
        call(1)
    with pytest.raises(SerializationError, match=r"ObjectArg.*args\[0\] \(object\)"):
        call(1)
    assert runs == [1]


def test_a_stored_exception_whose_class_is_no_longer_listed_is_a_stored_failure() -> None:
    store = MemoryStore()
    name = f"declines-{uuid.uuid4()}"

    def body(n: int) -> str:
        raise KwOnlyDecline("card_declined", reason="insufficient funds")

    first = idempotent(store=store, name=name, key=["n"], store_errors=[KwOnlyDecline])(body)
    with pytest.raises(KwOnlyDecline):
        first(1)
    later = idempotent(store=store, name=name, key=["n"], store_errors=[ObjectArg])(body)
    with pytest.raises(StoredFailure) as info:
        later(1)
    assert info.value.type_name.endswith("KwOnlyDecline")
    assert info.value.detail == "card_declined"
