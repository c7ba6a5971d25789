"""One suite, every store, real servers: the rules written in ``oncely.stores.base``."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from oncely.core.records import InFlight, Mismatch, New, RecordKey, Replay
from oncely.errors import LeaseLost
from oncely.stores import Store

import workers


def fresh_key(scope: str = "tenant-a") -> RecordKey:
    return RecordKey.of(scope, f"order-{uuid.uuid4()}")


def wait_for_store_time(store: Store, instant: float) -> None:
    """Block until the *store's* clock has passed ``instant`` (leases and ttls run on it)."""
    while store.now() <= instant:
        time.sleep(0.01)


def claim_new(store: Store, key: RecordKey, lease: float = 30.0, ttl: float = 60.0) -> New:
    outcome = store.claim(key, "fp", lease, ttl)
    assert isinstance(outcome, New), outcome
    return outcome


def test_claim_complete_replay(store: Store) -> None:
    key = fresh_key()
    new = claim_new(store, key)
    assert new.lease_until == pytest.approx(new.now + 30.0, abs=0.01)
    assert isinstance(store.claim(key, "fp", 30.0, 60.0), InFlight)
    store.complete(key, new.fence, b"\x00\xffbinary result", "raw", 60.0)
    replay = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(replay, Replay)
    assert replay.record.result == b"\x00\xffbinary result"
    assert replay.record.codec == "raw"
    assert replay.record.status == "completed"
    assert replay.record.fence == new.fence
    assert replay.record.expires_at == pytest.approx(replay.now + 60.0, abs=1.0)


def test_in_flight_reports_holder_lease(store: Store) -> None:
    key = fresh_key()
    new = claim_new(store, key, lease=20.0)
    busy = store.claim(key, "fp", 5.0, 60.0)
    assert isinstance(busy, InFlight)
    assert busy.fence == new.fence
    assert busy.lease_until == pytest.approx(new.lease_until, abs=0.01)


def test_mismatch_on_live_record_in_flight_and_completed(store: Store) -> None:
    key = fresh_key()
    new = claim_new(store, key)
    assert isinstance(store.claim(key, "other", 30.0, 60.0), Mismatch)
    store.complete(key, new.fence, b"1", "json", 60.0)
    assert isinstance(store.claim(key, "other", 30.0, 60.0), Mismatch)
    assert isinstance(store.claim(key, "fp", 30.0, 60.0), Replay)


def test_scopes_are_isolated(store: Store) -> None:
    key_a = RecordKey.of("tenant-a", "same-key")
    key_b = RecordKey.of("tenant-b", "same-key")
    new = claim_new(store, key_a)
    store.complete(key_a, new.fence, b"a", "json", 60.0)
    assert isinstance(store.claim(key_b, "fp", 30.0, 60.0), New)
    store.delete(key_a)
    store.delete(key_b)


def test_release_lets_the_key_be_claimed_again_with_a_bigger_fence(store: Store) -> None:
    key = fresh_key()
    fences = []
    for _ in range(5):
        new = claim_new(store, key)
        fences.append(new.fence)
        store.release(key, new.fence)
        assert store.get(key) is None
    assert fences == sorted(fences) and len(set(fences)) == 5


def test_lease_expiry_lets_another_caller_reclaim(store: Store) -> None:
    key = fresh_key()
    first = claim_new(store, key, lease=0.3)
    wait_for_store_time(store, first.lease_until)
    # A different payload may take over an abandoned claim: nothing was completed under it.
    second = store.claim(key, "other-fp", 30.0, 60.0)
    assert isinstance(second, New)
    assert second.fence > first.fence


def test_zombie_writer_is_rejected_by_the_fence(store: Store) -> None:
    key = fresh_key()
    zombie = claim_new(store, key, lease=0.3)
    wait_for_store_time(store, zombie.lease_until)
    successor = claim_new(store, key)
    with pytest.raises(LeaseLost):
        store.renew(key, zombie.fence, 30.0)
    with pytest.raises(LeaseLost):
        store.complete(key, zombie.fence, b"zombie", "json", 60.0)
    with pytest.raises(LeaseLost):
        store.release(key, zombie.fence)
    store.complete(key, successor.fence, b"successor", "json", 60.0)
    replay = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(replay, Replay) and replay.record.result == b"successor"


def test_late_completion_is_accepted_when_nobody_took_over(store: Store) -> None:
    key = fresh_key()
    slow = claim_new(store, key, lease=0.3, ttl=60.0)
    wait_for_store_time(store, slow.lease_until)
    store.complete(key, slow.fence, b"late", "json", 60.0)
    replay = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(replay, Replay) and replay.record.result == b"late"


def test_renew_extends_the_lease(store: Store) -> None:
    key = fresh_key()
    new = claim_new(store, key, lease=0.3)
    lease_until = store.renew(key, new.fence, 30.0)
    assert lease_until > new.lease_until + 20
    wait_for_store_time(store, new.lease_until)
    busy = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(busy, InFlight) and busy.fence == new.fence


def test_completed_record_expires_after_ttl(store: Store) -> None:
    key = fresh_key()
    new = claim_new(store, key, lease=0.2, ttl=0.4)
    store.complete(key, new.fence, b"1", "json", 0.4)
    record = store.get(key)
    assert record is not None
    wait_for_store_time(store, record.expires_at)
    assert store.get(key) is None
    again = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(again, New) and again.fence > new.fence


def test_purge_removes_only_expired_records(store: Store) -> None:
    live, dead = fresh_key(), [fresh_key() for _ in range(5)]
    for key in dead:
        new = claim_new(store, key, lease=0.2, ttl=0.2)
        store.complete(key, new.fence, b"x", "json", 0.2)
    new = claim_new(store, live)
    store.complete(live, new.fence, b"keep", "json", 60.0)
    wait_for_store_time(store, store.now() + 0.3)
    purged = store.purge_expired(limit=3) + store.purge_expired(limit=1000)
    # Redis expires keys by itself (PEXPIREAT); SQL and memory stores delete on purge.
    assert purged in (0, 5) if type(store).__name__ == "RedisStore" else purged == 5
    assert all(store.get(key) is None for key in dead)
    kept = store.get(live)
    assert kept is not None and kept.result == b"keep"


def test_get_list_delete(store: Store) -> None:
    scope = f"list-{uuid.uuid4().hex[:8]}"
    keys = [RecordKey.of(scope, f"k{i}") for i in range(3)]
    for key in keys:
        claim_new(store, key)
    listed = store.list(scope=scope, limit=10)
    assert {r.digest for r in listed} == {k.digest for k in keys}
    assert all(r.status == "in_progress" and r.scope == scope for r in listed)
    assert len(store.list(scope=scope, limit=2)) == 2
    assert store.delete(keys[0]) is True
    assert store.delete(keys[0]) is False
    assert store.get(keys[0]) is None


def test_watch_wakes_when_the_holder_completes(store: Store) -> None:
    key = fresh_key()
    new = claim_new(store, key)
    started = threading.Event()

    def finish() -> None:
        started.wait()
        time.sleep(0.05)
        store.complete(key, new.fence, b"done", "json", 60.0)

    worker = threading.Thread(target=finish)
    worker.start()
    t0 = time.monotonic()
    started.set()
    assert store.watch(key, new.fence, timeout=10.0) is True
    woke_after = time.monotonic() - t0
    worker.join()
    assert woke_after < 2.0
    # Already changed: returns at once.
    assert store.watch(key, new.fence, timeout=10.0) is True


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_watch_times_out_while_the_holder_runs(store: Store) -> None:
    key = fresh_key()
    new = claim_new(store, key)
    t0 = time.monotonic()
    assert store.watch(key, new.fence, timeout=0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 3.0


def test_64_threads_one_key_exactly_one_new(store: Store) -> None:
    key = fresh_key()
    barrier = threading.Barrier(64)
    outcomes: list[Any] = []
    lock = threading.Lock()

    def racer() -> None:
        barrier.wait()
        outcome = store.claim(key, "fp", 30.0, 60.0)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=racer) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds.count("New") == 1 and kinds.count("InFlight") == 63


async def test_64_tasks_one_key_exactly_one_new(store: Store) -> None:
    key = fresh_key()
    outcomes = await asyncio.gather(*(store.aclaim(key, "fp", 30.0, 60.0) for _ in range(64)))
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds.count("New") == 1 and kinds.count("InFlight") == 63
    new = next(o for o in outcomes if isinstance(o, New))
    await store.acomplete(key, new.fence, b"async", "json", 60.0)
    replay = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(replay, Replay) and replay.record.result == b"async"
    await store.aclose()


async def test_async_face_matches_sync_rules(store: Store) -> None:
    key = fresh_key()
    new = await store.aclaim(key, "fp", 5.0, 60.0)
    assert isinstance(new, New)
    assert await store.arenew(key, new.fence, 30.0) > new.lease_until
    waiter = asyncio.ensure_future(store.awatch(key, new.fence, 10.0))
    await asyncio.sleep(0.05)
    await store.arelease(key, new.fence)
    assert await asyncio.wait_for(waiter, 5.0) is True
    assert await store.aget(key) is None
    with pytest.raises(LeaseLost):
        await store.acomplete(key, new.fence, b"x", "json", 60.0)
    again = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(again, New) and again.fence > new.fence
    assert await store.adelete(key) is True
    assert await store.apurge_expired(10) >= 0
    await store.aclose()


def test_4_processes_one_key_exactly_one_new(
    shared_store: tuple[Store, str, dict[str, Any]],
) -> None:
    store, url, options = shared_store
    store.init_schema()
    scope, key = "procs", f"order-{uuid.uuid4()}"
    start_at = time.time() + 1.5
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(workers.claim_once, [(url, options, scope, key, start_at)] * 4)
    kinds = [kind for kind, _ in results]
    assert kinds.count("New") == 1 and kinds.count("InFlight") == 3


def test_store_clock_decides_expiry_not_the_client_clock(
    shared_store: tuple[Store, str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = shared_store
    key = fresh_key()
    new = claim_new(store, key, lease=30.0, ttl=60.0)
    store.complete(key, new.fence, b"kept", "json", 60.0)
    real_time = time.time
    # A client whose clock runs two hours fast must still see the record as live.
    monkeypatch.setattr(time, "time", lambda: real_time() + 7200.0)
    replay = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(replay, Replay) and replay.record.result == b"kept"
    assert abs(store.now() - real_time()) < 5.0


def test_short_lived_threads_leave_nothing_behind(store: Store) -> None:
    # A thread-per-request server: 2,000 threads, 20 at a time, each claims and completes once.
    # What the store keeps open may grow with how many threads run at once, never with how many
    # threads ever used it.
    def request() -> None:
        key = fresh_key()
        new = claim_new(store, key)
        store.complete(key, new.fence, b"1", "json", 60.0)

    request()
    before = workers.open_fds()
    for _ in range(100):
        workers.run_threads(request, [()] * 20)
    assert workers.open_fds() - before <= 40


@pytest.mark.slow
def test_asyncio_run_returns_every_time_without_aclose(
    shared_store: tuple[Store, str, dict[str, Any]],
) -> None:
    # Scripts call ``asyncio.run`` again and again; none of them calls ``aclose()``. Each run must
    # return (no task or connection attempt left behind that swallows the loop's shutdown), and
    # the process must not collect connections from loops that are gone.
    store, url, options = shared_store
    store.init_schema()
    code = (
        "import sys, workers; "
        f"before, after = workers.many_event_loops({url!r}, {options!r}, 60); "
        "print(before, after)"
    )
    here = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    hung = 0
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            hung += 1
            continue
        assert proc.returncode == 0, err.decode()
        before, after = map(int, out.split())
        assert after - before <= 8, (before, after)
    assert hung == 0


# -- fences: never repeated, never going backwards ------------------------------------------------


def test_fences_never_repeat_nor_go_backwards(store: Store) -> None:
    # The rule in oncely.stores.base: whatever happens between two claims of a key (release,
    # delete, completion and delete, expiry, purge, claims racing from other threads), each new
    # holder's fence is greater than every fence the key had before. A repeated fence would let
    # the old holder's late write land on the new holder's record.
    key = fresh_key()
    fences: list[int] = []

    def claim(lease: float = 30.0, ttl: float = 60.0) -> New:
        new = claim_new(store, key, lease=lease, ttl=ttl)
        fences.append(new.fence)
        return new

    # Each way a record goes away, followed at once by the next claim (often in the same
    # millisecond, the resolution of SQLite's clock).
    for round_ in range(200):
        new = claim()
        way = round_ % 4
        if way == 0:
            store.release(key, new.fence)
        elif way == 1:
            assert store.delete(key) is True
        elif way == 2:
            store.complete(key, new.fence, b"1", "json", 60.0)
            assert store.delete(key) is True
        else:
            store.release(key, new.fence)
            store.purge_expired(limit=1000)
    # Expiry: an abandoned claim taken over, and a completed record that expired and was purged.
    for _ in range(2):
        abandoned = claim(lease=0.05, ttl=0.05)
        wait_for_store_time(store, abandoned.lease_until)
        done = claim(lease=0.05, ttl=0.05)
        store.complete(key, done.fence, b"1", "json", 0.05)
        wait_for_store_time(store, done.lease_until + 0.05)
        store.purge_expired(limit=1000)
    assert all(a < b for a, b in itertools.pairwise(fences)), fences
    assert_fences_grow_under_racing_claims(store)


def assert_fences_grow_under_racing_claims(store: Store) -> None:
    """Threads race for one key; each winner lets go at once in one of three ways. A winner's
    claim took effect after the previous winner let go, which it did after its own claim
    returned: so sorted by when their claims returned, the winners' fences must grow."""
    key = fresh_key()
    wins: list[tuple[float, int]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 30.0

    def racer(index: int) -> None:
        won = 0
        while won < 40 and time.monotonic() < deadline:
            outcome = store.claim(key, "fp", 30.0, 60.0)
            if not isinstance(outcome, New):
                continue
            returned = time.monotonic()  # before this winner lets go: its place in the order
            with lock:
                wins.append((returned, outcome.fence))
            won += 1
            way = (index + won) % 3
            if way == 0:
                store.release(key, outcome.fence)
            elif way == 1:
                store.delete(key)
            else:
                store.complete(key, outcome.fence, b"1", "json", 60.0)
                store.delete(key)

    workers.run_threads(racer, [(i,) for i in range(4)])
    assert len(wins) >= 40
    ordered = [fence for _, fence in sorted(wins)]
    assert all(a < b for a, b in itertools.pairwise(ordered)), ordered


# -- repeated fenced writes: "my own write already landed" is success -----------------------------


def test_a_repeated_fenced_write_that_already_landed_succeeds(store: Store) -> None:
    # A reply can be lost (a timeout, a cancelled await) after the server applied the write; the
    # caller then repeats it. Finding its own write is success; anything else stays LeaseLost.
    key = fresh_key()
    new = claim_new(store, key)
    store.complete(key, new.fence, b"result", "json", 60.0)
    stored = store.get(key)
    store.complete(key, new.fence, b"result", "json", 60.0)
    assert store.get(key) == stored  # nothing rewritten, the expiry not pushed out
    with pytest.raises(LeaseLost):
        store.complete(key, new.fence, b"another result", "json", 60.0)
    with pytest.raises(LeaseLost):
        store.release(key, new.fence)  # a completed record is not released
    with pytest.raises(LeaseLost):
        store.complete(key, new.fence + 1, b"result", "json", 60.0)

    key = fresh_key()
    new = claim_new(store, key)
    store.release(key, new.fence)
    store.release(key, new.fence)
    assert store.get(key) is None
    with pytest.raises(LeaseLost):
        store.complete(key, new.fence, b"result", "json", 60.0)  # released: nothing to complete
    successor = claim_new(store, key)
    with pytest.raises(LeaseLost):
        store.release(key, new.fence)  # the key is someone else's now
    store.renew(key, successor.fence, 30.0)
    store.renew(key, successor.fence, 30.0)  # renewing twice is renewing
    store.complete(key, successor.fence, b"successor", "json", 60.0)
    replay = store.claim(key, "fp", 30.0, 60.0)
    assert isinstance(replay, Replay) and replay.record.result == b"successor"


async def test_a_repeated_async_complete_that_already_landed_succeeds(store: Store) -> None:
    key = fresh_key()
    new = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    await store.acomplete(key, new.fence, b"async", "json", 60.0)
    await store.acomplete(key, new.fence, b"async", "json", 60.0)
    other = fresh_key()
    held = await store.aclaim(other, "fp", 30.0, 60.0)
    assert isinstance(held, New)
    await store.arelease(other, held.fence)
    await store.arelease(other, held.fence)
    replay = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(replay, Replay) and replay.record.result == b"async"


async def test_a_cancelled_call_is_cancelled(store: Store) -> None:
    # Cancel store calls at every moment of their round trips: each must end in CancelledError.
    # A driver's asyncio.wait_for on Python 3.11 used to drop a cancel that came as the round
    # trip finished; the waiter then kept waiting, or the caller went on as if not cancelled.
    key = fresh_key()
    new = await store.aclaim(key, "fp", 30.0, 60.0)
    assert isinstance(new, New)
    kept_running = 0
    for attempt in range(150):
        if attempt % 2:
            call = asyncio.ensure_future(store.awatch(key, new.fence, 1.0))
        else:
            call = asyncio.ensure_future(store.aget(key))
        await asyncio.sleep(0.0005 * (attempt % 10))
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            continue
        if not call.done() or call.result() is not False:  # finished before the cancel came
            continue
        kept_running += 1  # awatch ran to its timeout although it was cancelled
    assert kept_running == 0
    await store.aclose()


# -- scopes no store keeps as text (redteam4 scope_nul.py) ----------------------------------------
async def test_a_scope_no_store_keeps_as_text_is_refused_before_the_call(store: Store) -> None:
    # SQLite cut the scope "acme\x00evil" to "acme" (another tenant's records), PostgreSQL
    # refused it as a driver error; memory and Redis kept it. One rule on every store: the
    # record key refuses it with InvalidKey, before the function runs or anything is sent.
    from oncely import idempotent
    from oncely.errors import InvalidKey

    runs: list[str] = []
    tag = uuid.uuid4().hex[:8]

    @idempotent(store=store, name=f"scoped-{tag}", key=["k"], scope=lambda k, tenant: tenant)
    def charge(k: str, tenant: str) -> str:
        runs.append(tenant)
        return f"charged {tenant}"

    @idempotent(store=store, name=f"ascoped-{tag}", key=["k"], scope=lambda k, tenant: tenant)
    async def acharge(k: str, tenant: str) -> str:
        runs.append(tenant)
        return f"charged {tenant}"

    for tenant in ("acme\x00evil", "acme\ud800"):
        with pytest.raises(InvalidKey, match="scope"):
            charge("o-1", tenant)
        with pytest.raises(InvalidKey, match="scope"):
            await acharge("o-1", tenant)
        with pytest.raises(InvalidKey, match="scope"):
            RecordKey.of(tenant, "o-1")
    assert runs == []
    assert charge("o-1", "acme") == "charged acme"  # nothing was recorded for "acme"
    assert runs == ["acme"]


def test_key_parts_with_any_character_are_kept_apart(store: Store) -> None:
    # Key parts are hashed, never stored as text: a NUL or a lone surrogate is fine there. A
    # lone surrogate raised a bare UnicodeEncodeError from the digest; now it has its own.
    from oncely import idempotent

    runs: list[str] = []

    @idempotent(store=store, name=f"keys-{uuid.uuid4().hex[:8]}", key=["k"])
    def charge(k: str) -> int:
        runs.append(k)
        return len(runs)

    keys = ["a\x00b", "a\x00c", "a\ud800", "a\ud801", "a"]
    assert [charge(k) for k in keys] == [1, 2, 3, 4, 5]
    assert [charge(k) for k in keys] == [1, 2, 3, 4, 5]  # each replays its own
    assert runs == keys
