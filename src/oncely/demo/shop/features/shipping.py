"""Ship an order through a queue consumed by an idempotent consumer (the transactional outbox,
its relay, and an inbox: :mod:`oncely.messaging.outbox`, :mod:`oncely.messaging.inbox`).

``POST /orders/{order_id}/ship`` -> ``202 {"order_id", "status": "shipped"}``, repeatable;
``409 order-not-shippable`` (with ``order_status``) unless the order is paid or shipped; ``404
order-not-found``.

Protected, the request moves the order ``paid -> shipped`` through the order machine and writes
the shipment message (id ``ship-<order id>``) in the outbox **in the same transaction**: no
shipment without the state change, none lost after it. The settlement processes also run the
relay, which publishes committed outbox rows to the embedded queue
(:class:`oncely.demo.shop.queue.EmbeddedQueue`, a SQLite file; at least once), and the carrier's
consumer, which dispatches each message inside a transaction that first records it in the
inbox: a redelivered or republished message dispatches nothing. The ``ship`` ledger row appears
once the consumer ran (well under a second; the storm waits for it). Each web worker runs
both in a background thread (:meth:`Shipper.run`), so a worker SIGKILLed mid-batch is also a
relay killed mid-batch: its messages are published again and the inbox absorbs them.

Unprotected, every request calls the carrier directly: duplicates ship twice.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oncely.demo.shop.db import OUTBOX, ShopDB
from oncely.demo.shop.features import Feature, Shop
from oncely.demo.shop.queue import EmbeddedQueue
from oncely.demo.shop.web import Problem, path_id
from oncely.errors import OncelyError
from oncely.messaging.outbox import Relay

__all__ = ["Shipper", "feature"]


def _not_shippable(order_id: str, status: str) -> Problem:
    return Problem(
        409,
        "order-not-shippable",
        "Order cannot be shipped",
        f"order {order_id!r} is {status!r}; only paid orders can be shipped",
        order_status=status,
    )


class Shipper:
    """The relay and the carrier's consumer (protected mode), run by each web worker."""

    def __init__(self, db: ShopDB, queue: EmbeddedQueue) -> None:
        self.db = db
        self.queue = queue
        # made here, used by the shipping thread alone
        self._conn = sqlite3.connect(
            db.path, timeout=15.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA busy_timeout = 15000")
        self.relay = Relay(OUTBOX, self._conn, publish=queue.put, batch=50)

    def step(self) -> tuple[int, int]:
        """Relay one batch, then consume what is queued; (published, dispatched)."""
        published = 0
        with contextlib.suppress(OncelyError):  # the database busy: the next round retries
            published = self.relay.run_once()
        dispatched = 0
        for seq, message_id, payload in self.queue.take():
            if self.db.dispatch(message_id, payload.decode()):
                dispatched += 1
            self.queue.ack(seq)  # after the commit: a crash before it redelivers
        return published, dispatched

    def run(self, stop: threading.Event, period: float = 0.1) -> None:
        """:meth:`step` every ``period`` seconds until ``stop`` is set (a thread's target)."""
        try:
            while not stop.wait(period):
                with contextlib.suppress(Exception):  # keep shipping; the next round retries
                    self.step()
        finally:
            self.close()

    def close(self) -> None:
        self._conn.close()
        self.queue.close()


def feature(shop: Shop) -> Feature:
    async def ship(request: Request) -> Response:
        order_id = path_id(request, "order_id")
        order = await shop.own_order(request, order_id)
        if shop.protected:
            await shop.move_order(shop.db.ship, order_id, _not_shippable)
        else:
            if order.status not in ("paid", "shipped"):
                raise _not_shippable(order_id, order.status)
            await shop.run(shop.db.ship_unchecked, order_id)
        return JSONResponse({"order_id": order_id, "status": "shipped"}, status_code=202)

    return Feature(
        name="shipping",
        mechanism="oncely.messaging (outbox, relay, inbox)",
        routes=[Route("/orders/{order_id}/ship", ship, methods=["POST"])],
    )
