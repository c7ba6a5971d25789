"""The demo shop, in process: its contract, bad input as problem+json (never a 500, never an
effect), each feature's mechanism against duplicates (and its absence unprotected), and the
settlement job's fence."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from oncely.demo.shop.app import create_app
from oncely.demo.shop.db import ORDERS, Order, ShopDB
from oncely.demo.shop.features.settlement import settle_once
from oncely.demo.shop.features.shipping import Shipper
from oncely.demo.shop.queue import EmbeddedQueue
from oncely.demo.shop.settings import Settings
from oncely.errors import IllegalTransition, StaleVersion
from oncely.locks import Lock
from oncely.messaging.outbox import OutboxMessage


def _settings(tmp_path: Path, protected: bool) -> Settings:
    return Settings(
        workdir=tmp_path,
        protected=protected,
        run=secrets.token_hex(4),
        secret=secrets.token_urlsafe(32),
    )


@pytest.fixture(params=[True, False], ids=["protected", "unprotected"])
async def shop(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = _settings(tmp_path, request.param)
    ShopDB(settings.shop_db).create()
    app = create_app(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://shop"
    ) as client:
        yield client


def _headers(key: str | None = None, customer: str = "alice") -> dict[str, str]:
    headers = {"Authorization": f"Bearer {customer}", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


async def _order(client: httpx.AsyncClient, key: str) -> dict[str, object]:
    body = {"sku": "sku-2", "qty": 1, "customer": "alice"}
    response = await client.post("/orders", json=body, headers=_headers(key))
    assert response.status_code == 201, response.text
    data: dict[str, object] = response.json()
    return data


def _bad_requests(order_id: str) -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    def key() -> dict[str, str]:
        return _headers(f"bad-{secrets.token_hex(6)}")

    def js(value: object) -> bytes:
        return json.dumps(value).encode()

    good = {"sku": "sku-1", "qty": 1, "customer": "alice"}
    cases: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("POST", "/orders", b"{not json", key()),
        ("POST", "/orders", b"", key()),
        ("POST", "/orders", b"\xff\xfe\x00", key()),
        ("POST", "/orders", js([good]), key()),
        ("POST", "/orders", js("text"), key()),
        ("POST", "/orders", js({**good, "qty": -1}), key()),
        ("POST", "/orders", js({**good, "qty": 0}), key()),
        ("POST", "/orders", js({**good, "qty": 10**40}), key()),
        ("POST", "/orders", js({**good, "qty": 1.5}), key()),
        ("POST", "/orders", js({**good, "qty": True}), key()),
        ("POST", "/orders", js({**good, "qty": "1"}), key()),
        ("POST", "/orders", js({"sku": "sku-1", "qty": 1}), key()),
        ("POST", "/orders", js({**good, "sku": "no-such-sku"}), key()),
        ("POST", "/orders", js({**good, "sku": "x" * 5000}), key()),
        ("POST", "/orders", js({**good, "customer": ""}), key()),
        ("POST", "/orders", js({**good, "customer": "mallory"}), key()),
        ("POST", "/orders", js(good), {**key(), "Authorization": "Basic abc"}),
        ("POST", "/orders", js(good), {**key(), "Content-Type": "text/plain"}),
        ("POST", "/orders", b"[" * 100_000, key()),
        ("POST", "/payment-tokens", js({}), key()),
        ("POST", "/payment-tokens", js({"order_id": "ord_missing"}), key()),
        ("POST", "/payment-tokens", js({"order_id": 12}), key()),
        ("POST", "/payment-tokens", js({"order_id": order_id}), _headers(None, "mallory")),
        ("POST", f"/orders/{order_id}/pay", js({"amount": -1}), key()),
        ("POST", f"/orders/{order_id}/pay", js({"amount": 10**30}), key()),
        ("POST", f"/orders/{order_id}/pay", js({"amount": "200"}), key()),
        ("POST", f"/orders/{order_id}/pay", js({}), key()),
        ("POST", f"/orders/{order_id}/pay", b"{", key()),
        ("POST", "/orders/ord_missing/pay", js({"amount": 100}), key()),
        ("GET", "/stock/no-such-sku", None, {}),
        ("GET", "/orders", None, {}),
        ("DELETE", "/ledger", None, {}),
        ("GET", "/no/such/path", None, {}),
        ("GET", "/accounts/no-such-account", None, {}),
        ("POST", "/accounts/acct-1/credit", b"{", {**key(), "If-Match": '"1"'}),
        ("POST", "/accounts/acct-1/credit", js({"amount": -3}), {**key(), "If-Match": '"1"'}),
        ("POST", "/accounts/acct-1/credit", js({"amount": 10**30}), {**key(), "If-Match": '"1"'}),
        ("POST", "/accounts/acct-1/credit", js({"amount": "5"}), {**key(), "If-Match": '"1"'}),
        ("POST", "/accounts/no-such/credit", js({"amount": 5}), {**key(), "If-Match": '"1"'}),
        ("POST", "/orders/ord_missing/cancel", js({"amount": -5}), key()),
        ("POST", "/orders/ord_missing/ship", b"nope", key()),
        ("POST", f"/orders/{order_id}/ship", b"", key()),
        ("POST", "/webhooks/payment", b"{", key()),
    ]
    return cases


async def test_bad_input_gets_problem_json_and_changes_nothing(shop: httpx.AsyncClient) -> None:
    order = await _order(shop, "good-1")
    before = (await shop.get("/ledger")).json()
    stock = (await shop.get("/stock/sku-1")).json()
    for method, path, content, headers in _bad_requests(str(order["order_id"])):
        response = await shop.request(method, path, content=content, headers=headers)
        where = f"{method} {path} {content[:30] if content else b''!r}"
        assert 400 <= response.status_code < 500 or response.status_code == 501, (
            where,
            response.status_code,
            response.text,
        )
        assert response.headers["content-type"].startswith("application/problem+json"), where
        problem = response.json()
        assert problem["status"] == response.status_code
        assert problem["type"].startswith("https://"), where
    assert (await shop.get("/ledger")).json() == before
    assert (await shop.get("/stock/sku-1")).json() == stock


async def test_ship_requests_dispatch_once_through_outbox_relay_and_inbox(
    shop: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A paid order asked to ship 12 times at once, then twice more. Protected: one outbox
    message; the relay publishes it, the queue delivers it twice (a republish, as after a relay
    killed mid-batch) and the inbox lets one dispatch through. Unprotected: one per request."""
    protected = (await shop.get("/healthz")).json()["protected"]
    order = await _order(shop, "to-ship")
    oid = str(order["order_id"])
    early = await shop.post(f"/orders/{oid}/ship", headers=_headers())
    assert early.status_code == 409 and early.json()["order_status"] == "placed"
    token = await shop.post("/payment-tokens", json={"order_id": oid}, headers=_headers())
    paid = await shop.post(
        f"/orders/{oid}/pay",
        json={"amount": order["amount"]},
        headers={**_headers(), "Payment-Token": token.json()["token"]},
    )
    assert paid.status_code == 200, paid.text
    answers = await asyncio.gather(
        *(shop.post(f"/orders/{oid}/ship", headers=_headers()) for _ in range(12))
    )
    answers += [await shop.post(f"/orders/{oid}/ship", headers=_headers()) for _ in range(2)]
    assert all(a.status_code == 202 for a in answers), [a.text for a in answers]
    if protected:
        db = ShopDB(tmp_path / "shop.db")
        queue = EmbeddedQueue(tmp_path / "queue.db")
        shipper = Shipper(db, queue)
        assert shipper.relay.run_once() == 1  # one message for 14 requests
        (message,) = queue.take()
        queue.put(OutboxMessage(0, message[1], "shipments", message[2]))  # a republish
        assert shipper.step() == (0, 1)  # two deliveries, one dispatch
        assert queue.take() == [] and shipper.step() == (0, 0)
        shipper.close()
    ships = [e for e in (await shop.get("/ledger")).json() if e["kind"] == "ship"]
    assert [e["key"] for e in ships] == [oid] * (1 if protected else 14)


async def test_account_credit_contract(shop: httpx.AsyncClient) -> None:
    protected = (await shop.get("/healthz")).json()["protected"]
    read = await shop.get("/accounts/acct-2")
    assert read.status_code == 200 and read.headers["etag"] == '"1"'
    assert read.json() == {"account_id": "acct-2", "balance": 0, "version": 1}
    credit = {"amount": 7}
    ok = await shop.post(
        "/accounts/acct-2/credit", json=credit, headers={**_headers("c-1"), "If-Match": '"1"'}
    )
    assert ok.status_code == 200, ok.text
    assert ok.headers["etag"] == '"2"' and ok.json()["balance"] == 7
    stale = await shop.post(
        "/accounts/acct-2/credit", json=credit, headers={**_headers("c-2"), "If-Match": '"1"'}
    )
    missing = await shop.post("/accounts/acct-2/credit", json=credit, headers=_headers("c-3"))
    if protected:
        assert stale.status_code == 412, stale.text
        assert stale.json()["current_etag"] == '"2"'
        assert missing.status_code == 428, missing.text
        for answer in (stale, missing):
            assert answer.headers["content-type"].startswith("application/problem+json")
        # the retry after a re-read, under the same key (the 412 was not stored)
        again = await shop.post(
            "/accounts/acct-2/credit", json=credit, headers={**_headers("c-2"), "If-Match": '"2"'}
        )
        assert again.status_code == 200 and again.headers["etag"] == '"3"'
        assert (await shop.get("/accounts/acct-2")).json()["balance"] == 14
    else:  # unprotected: If-Match is ignored, every credit is written
        assert stale.status_code == 200 and missing.status_code == 200
        assert (await shop.get("/accounts/acct-2")).json()["balance"] == 21


async def test_concurrent_credits_lose_no_update_only_when_oncely_is_on(
    shop: httpx.AsyncClient,
) -> None:
    """32 clients credit one account at once, each reading its ETag and retrying on 412:
    protected, the balance is the sum of every credit; unprotected (read-modify-write without
    the version check) concurrent credits overwrite each other."""
    protected = (await shop.get("/healthz")).json()["protected"]
    conflicts = 0

    async def client(i: int) -> None:
        nonlocal conflicts
        for _ in range(200):
            tag = (await shop.get("/accounts/acct-3")).headers["etag"]
            answer = await shop.post(
                "/accounts/acct-3/credit",
                json={"amount": i + 1},
                headers={**_headers(f"credit-{i}"), "If-Match": tag},
            )
            if answer.status_code == 200:
                return
            assert answer.status_code in (409, 412), answer.text
            conflicts += 1
        raise AssertionError("a credit never got through")

    await asyncio.gather(*(client(i) for i in range(32)))
    balance = (await shop.get("/accounts/acct-3")).json()["balance"]
    credits = [e for e in (await shop.get("/ledger")).json() if e["kind"] == "credit"]
    assert len(credits) == 32 and sum(e["amount"] for e in credits) == sum(range(1, 33))
    if protected:
        assert balance == sum(range(1, 33))
        assert conflicts > 0  # the race really happened, and was retried
    else:
        assert balance < sum(range(1, 33))  # lost updates


async def test_cancel_gives_the_stock_back_once_only_when_oncely_is_on(
    shop: httpx.AsyncClient,
) -> None:
    """16 concurrent cancels of one order, then 4 more: all answer 200 cancelled; protected,
    the stock comes back once (state machine + barrier); unprotected, once per cancel that
    passed the status check. A cancelled order cannot be paid."""
    protected = (await shop.get("/healthz")).json()["protected"]
    stock = (await shop.get("/stock/sku-2")).json()["stock"]
    order = await _order(shop, "to-cancel")
    oid = order["order_id"]
    answers = await asyncio.gather(
        *(shop.post(f"/orders/{oid}/cancel", headers=_headers()) for _ in range(16))
    )
    answers += [await shop.post(f"/orders/{oid}/cancel", headers=_headers()) for _ in range(4)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert all(a.json() == {"order_id": oid, "status": "cancelled"} for a in answers)
    restocks = [e for e in (await shop.get("/ledger")).json() if e["kind"] == "restock"]
    after = (await shop.get("/stock/sku-2")).json()["stock"]
    if protected:
        assert len(restocks) == 1 and after == stock
    else:
        assert len(restocks) > 1 and after > stock
    token = await shop.post("/payment-tokens", json={"order_id": oid}, headers=_headers())
    paid = await shop.post(
        f"/orders/{oid}/pay",
        json={"amount": order["amount"]},
        headers={**_headers(), "Payment-Token": token.json()["token"]},
    )
    assert paid.status_code == 409 and paid.json()["order_status"] == "cancelled"
    other = await shop.post(f"/orders/{oid}-x/cancel", headers=_headers())
    assert other.status_code == 404


async def test_webhook_redeliveries_are_acted_upon_once_only_when_oncely_is_on(
    shop: httpx.AsyncClient,
) -> None:
    """One event delivered 12 times at once and 3 more times: protected, one ledger row and
    exactly one answer with duplicate=false; unprotected, one row per delivery."""
    protected = (await shop.get("/healthz")).json()["protected"]
    event = {"event_id": "evt-1", "order_id": "ord_x", "amount": 250}
    answers = await asyncio.gather(*(shop.post("/webhooks/payment", json=event) for _ in range(12)))
    answers += [await shop.post("/webhooks/payment", json=event) for _ in range(3)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    fresh = [a for a in answers if a.json() == {"event_id": "evt-1", "duplicate": False}]
    rows = [e for e in (await shop.get("/ledger")).json() if e["kind"] == "webhook"]
    if protected:
        assert len(fresh) == 1 and len(rows) == 1
        assert rows[0]["key"] == "evt-1" and rows[0]["amount"] == 250
    else:
        assert len(fresh) == 15 and len(rows) == 15
    other = await shop.post("/webhooks/payment", json={"event_id": "evt-2"})
    assert other.json() == {"event_id": "evt-2", "duplicate": False}


async def test_a_webhook_whose_first_worker_died_after_the_window_mark_is_still_acted_upon(
    tmp_path: Path,
) -> None:
    """The dedup window is not in the ledger's transaction: a worker SIGKILLed between the
    window's mark and the ledger row left every redelivery answered "duplicate" and the payment
    notification lost (``make demo`` once reported it as a lost operation). Now a redelivery the
    ledger does not show writes the row, once."""
    from oncely.messaging.dedup import Deduplicator

    settings = _settings(tmp_path, True)
    ShopDB(settings.shop_db).create()
    app = create_app(settings)
    url, options = settings.dedup_target()
    window = Deduplicator(url, window=3600.0, namespace="shop-payment-webhooks", **options)
    assert window.seen("evt-died") is False  # the first worker's mark; then it died
    event = {"event_id": "evt-died", "order_id": "ord_y", "amount": 300}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://shop"
    ) as shop:
        answers = await asyncio.gather(
            *(shop.post("/webhooks/payment", json=event) for _ in range(6))
        )
        assert [a.status_code for a in answers] == [200] * 6
        assert sum(a.json()["duplicate"] is False for a in answers) == 1
        rows = [e for e in (await shop.get("/ledger")).json() if e["kind"] == "webhook"]
    assert [(e["key"], e["amount"]) for e in rows] == [("evt-died", 300)]


async def test_order_and_payment_contract(shop: httpx.AsyncClient) -> None:
    order = await _order(shop, "contract-1")
    assert order["status"] == "placed" and isinstance(order["order_id"], str)
    issued = await shop.post(
        "/payment-tokens", json={"order_id": order["order_id"]}, headers=_headers()
    )
    assert issued.status_code == 201
    token = issued.json()["token"]
    pay = {"amount": order["amount"]}
    headers = {**_headers(), "Payment-Token": token}
    paid = await shop.post(f"/orders/{order['order_id']}/pay", json=pay, headers=headers)
    assert paid.status_code == 200, paid.text
    assert paid.json()["status"] == "paid" and paid.json()["transaction_id"]
    again = await shop.post(f"/orders/{order['order_id']}/pay", json=pay, headers=headers)
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")
    ledger = (await shop.get("/ledger")).json()
    assert {e["kind"] for e in ledger} == {"order", "charge"}
    assert all(set(e) == {"kind", "key", "entity", "amount", "at"} for e in ledger)
    assert (await shop.get("/healthz")).status_code == 200


async def test_duplicates_double_the_effect_only_when_oncely_is_off(
    shop: httpx.AsyncClient,
) -> None:
    protected = (await shop.get("/healthz")).json()["protected"]
    for _ in range(3):
        await _order(shop, "same-key")
    orders = [e for e in (await shop.get("/ledger")).json() if e["kind"] == "order"]
    assert len(orders) == (1 if protected else 3)


def test_a_paused_settlement_holder_is_fenced_out(tmp_path: Path) -> None:
    """Kleppmann's case: holder A reads its batch, is paused past its lease, B takes the lock
    over and settles; A's late write must change nothing."""
    settings = _settings(tmp_path, protected=True)
    db = ShopDB(settings.shop_db)
    db.create()
    order = db.place_order("alice", "sku-1", 1, "alice/k")
    assert order is not None
    db.record_charge(order.id, order.amount, "txn-1")
    url, options = settings.lock_target()
    a = Lock(url, "shop-settlement", ttl=0.3, **options)
    token_a = a.acquire()
    run_a, batch_a = db.start_settlement(1, token_a, 10)
    assert [o.id for o in batch_a] == [order.id]
    b = Lock(url, "shop-settlement", ttl=5, **options)
    token_b = b.acquire(timeout=5)  # A's lease ran out while it was "paused"
    assert token_b > token_a
    run_b, batch_b = db.start_settlement(2, token_b, 10)
    assert db.finish_settlement(run_b, batch_b, token_b) == "written"
    b.release()
    assert db.finish_settlement(run_a, batch_a, token_a) == "fenced-out"
    settles = [e for e in db.ledger() if e["kind"] == "settle"]
    assert len(settles) == 1
    # and with no lock at all (unprotected), both write: the double settlement
    assert settle_once(settings, db, None) == "empty"


def test_a_handler_run_again_after_a_crash_applies_once(tmp_path: Path) -> None:
    """A worker SIGKILLed after the order's commit but before the middleware stored the
    response: the key's lease runs out and the retry runs the handler again. Protected, the
    second run finds the first order (and the second charge the first payment)."""
    db = ShopDB(tmp_path / "shop.db")
    db.create()
    first = db.place_order("alice", "sku-1", 2, "alice/key-1", once=True)
    again = db.place_order("alice", "sku-1", 2, "alice/key-1", once=True)
    assert first is not None and again is not None and again.id == first.id
    assert db.record_charge(first.id, first.amount, "txn-a", once=True) == "txn-a"
    assert db.record_charge(first.id, first.amount, "txn-b", once=True) == "txn-a"
    kinds = [e["kind"] for e in db.ledger()]
    assert kinds == ["order", "charge"]
    # a credit run again for the same key returns the first result and writes nothing
    credited = db.credit("acct-1", 5, 1, "alice/credit-1")
    assert db.credit("acct-1", 5, 1, "alice/credit-1") == credited
    with pytest.raises(StaleVersion):  # another key with the old version: refused, no write
        db.credit("acct-1", 5, 1, "alice/credit-2")
    assert db.account("acct-1") == credited and credited.balance == 5
    assert [e["kind"] for e in db.ledger()] == ["order", "charge", "credit"]
    # a paid order cancelled twice gives its stock back once; a shipped one refuses
    assert db.cancel(first.id) is True and db.cancel(first.id) is False
    assert db.stock("sku-1") == 1_000_000
    shipped = db.place_order("alice", "sku-1", 1, "alice/key-2", once=True)
    assert shipped is not None
    db.record_charge(shipped.id, shipped.amount, "txn-c", once=True)
    with db.write() as w:
        ORDERS.apply(w, shipped.id, "ship")
    with pytest.raises(IllegalTransition):
        db.cancel(shipped.id)
    assert [e["kind"] for e in db.ledger()].count("restock") == 1
    assert db.stock("sku-1") == 1_000_000 - 1  # the shipped order's unit
    # unprotected (once=False) the same two runs are two orders: the double effect
    db.place_order("bob", "sku-1", 1, "bob/key-1")
    db.place_order("bob", "sku-1", 1, "bob/key-1")
    assert [e["key"] for e in db.ledger()].count("bob/key-1") == 2


def test_the_order_timeout_and_a_cancel_racing_it_give_the_stock_back_once(
    tmp_path: Path,
) -> None:
    """Unpaid orders expire (``placed -> cancelled`` and the stock back, behind the same
    barrier branch as a cancel); 8 threads expiring while 8 cancel the same orders: each
    order's stock comes back once. A paid order never expires."""
    db = ShopDB(tmp_path / "shop.db")
    db.create()
    orders = [db.place_order("alice", "sku-3", 2, f"alice/t-{i}", once=True) for i in range(10)]
    paid = db.place_order("alice", "sku-3", 1, "alice/t-paid", once=True)
    assert paid is not None and all(o is not None for o in orders)
    db.record_charge(paid.id, paid.amount, "txn-t", once=True)
    assert db.stock("sku-3") == 1_000_000 - 21

    def expire() -> None:
        ShopDB(db.path).expire_unpaid(0.0)

    def cancel_all() -> None:
        mine = ShopDB(db.path)
        for o in orders:
            assert o is not None
            mine.cancel(o.id)

    threads = [threading.Thread(target=fn) for fn in [expire, cancel_all] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    restocks = [e for e in db.ledger() if e["kind"] == "restock"]
    assert sorted(e["key"] for e in restocks) == sorted(o.id for o in orders if o is not None)
    assert db.stock("sku-3") == 1_000_000 - 1  # only the paid order's unit is still out
    assert db.expire_unpaid(0.0) == 0
    still = db.order(paid.id)
    assert still is not None and still.status == "paid"


def _race_a_settlement(db: ShopDB, round_: int) -> None:
    """One round: 12 paid orders; a settlement reads them, one cancel lands between the read
    and the pay-out (the settlement waits for it), 4 more threads cancel the rest meanwhile."""
    orders: list[Order] = []
    for i in range(12):
        o = db.place_order("alice", "sku-2", 1, f"alice/race-{round_}-{i}", once=True)
        assert o is not None
        db.record_charge(o.id, o.amount, f"txn-{round_}-{i}", once=True)
        orders.append(o)
    read = threading.Event()
    first_cancelled = threading.Event()

    def settle() -> None:
        mine = ShopDB(db.path)
        run, batch = mine.start_settlement(round_, None, 100)
        assert {o.id for o in orders} <= {o.id for o in batch}
        read.set()
        first_cancelled.wait(10)
        mine.finish_settlement(run, batch, None)

    def cancel(chunk: list[Order], first: bool) -> None:
        mine = ShopDB(db.path)
        read.wait(10)
        for o in chunk:
            try:
                mine.cancel(o.id)
            except IllegalTransition as exc:  # paid out first: refused, nothing given back
                assert exc.current == "settled"
            if first:
                first_cancelled.set()

    threads = [threading.Thread(target=settle)]
    threads.append(threading.Thread(target=cancel, args=(orders[:1], True)))
    threads += [threading.Thread(target=cancel, args=(orders[i::4], False)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger = db.ledger()
    settled = {e["key"] for e in ledger if e["kind"] == "settle"}
    restocked = {e["key"] for e in ledger if e["kind"] == "restock"}
    ids = {o.id for o in orders}
    assert orders[0].id in restocked  # cancelled before the pay-out statement
    assert not (settled & restocked & ids), "an order was both paid out and cancelled"
    assert (settled | restocked) & ids == ids
    for o in orders:
        now = db.order(o.id)
        assert now is not None
        assert (now.status == "cancelled") == (o.id in restocked) != (o.id in settled)


def test_a_cancel_racing_a_settlement_never_yields_a_restock_and_a_pay_out(
    tmp_path: Path,
) -> None:
    """Settlement reads its batch, then pays out; cancels of the same paid orders race it on
    other threads (their own connections to the same SQLite file). Each order ends either
    cancelled with its stock back and no pay-out, or settled and not cancelled: never both.
    One cancel is made to land between the batch's read and its pay-out every round, the
    window the old pay-out (by id only) paid a cancelled order in."""
    db = ShopDB(tmp_path / "shop.db")
    db.create()
    for round_ in range(4):
        _race_a_settlement(db, round_)


def test_the_order_timeout_uses_the_database_clock_not_the_process_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settlement process whose clock runs an hour ahead must not expire an order placed a
    moment ago with a 10-minute timeout: candidates are chosen by the database's clock."""
    import time as real_time

    from oncely.demo.shop import db as shop_db

    db = ShopDB(tmp_path / "shop.db")
    db.create()
    fresh = db.place_order("alice", "sku-4", 1, "alice/clock-1", once=True)
    assert fresh is not None

    class AheadClock:
        def __getattr__(self, name: str) -> object:
            return getattr(real_time, name)

        @staticmethod
        def time() -> float:
            return real_time.time() + 3600.0

    monkeypatch.setattr(shop_db, "time", AheadClock())
    assert ShopDB(db.path).expire_unpaid(600.0) == 0
    still = db.order(fresh.id)
    assert still is not None and still.status == "placed"
    # By the database's clock the order is past a timeout of -1 s. (Not 0: SQLite's clock has
    # millisecond resolution, so an order placed in the same millisecond is not yet "older".)
    assert db.expire_unpaid(-1.0) == 1
