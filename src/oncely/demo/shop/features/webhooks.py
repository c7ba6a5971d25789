"""A dedup window on incoming payment webhooks (cache dedup, ``SET NX PX``-style:
:class:`oncely.messaging.dedup.Deduplicator`).

``POST /webhooks/payment`` ``{"event_id": str, "order_id"?: str, "amount"?: int}`` ->
``200 {"event_id", "duplicate": bool}``. Payment providers deliver a notification at least
once (Stripe retries for days); the shop acts on an event id once per window (one hour) and
answers a redelivery ``{"duplicate": true}`` with a 200, so the provider stops retrying.

Protected, one atomic ``seen(event_id)`` on oncely's store answers the common redelivery
(one statement or script: ``INSERT … ON CONFLICT … RETURNING`` on SQL, ``SET NX PX`` on Redis)
together with a read of the ledger. The window is not in the ledger's transaction, so on its
own it is at most once: a worker that dies between the window's mark and the ledger row (a
SIGKILL in the demo's storm) would leave every redelivery answered "duplicate" and the
notification lost. So a sighting the ledger does not show yet (the first one, or a redelivery
while the first is still running or after it died) writes the row only if it is still missing,
one statement under SQLite's one writer: the window saves the write lock for redeliveries,
the conditional insert makes it exactly once (an inbox, :mod:`oncely.messaging.inbox`, would
commit the record with the effect instead). Unprotected, every delivery is acted upon.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oncely.demo.shop.features import Feature, Shop
from oncely.demo.shop.web import Problem, integer, json_body, text
from oncely.messaging.dedup import Deduplicator

__all__ = ["WINDOW", "feature"]

#: seconds an event id is remembered from its first delivery
WINDOW = 3600.0


def feature(shop: Shop) -> Feature:
    dedup: Deduplicator | None = None
    if shop.protected:
        url, options = shop.settings.dedup_target()
        dedup = Deduplicator(url, window=WINDOW, namespace="shop-payment-webhooks", **options)

    def deliver(event_id: str, entity: str, amount: int) -> bool:
        """Act on the event unless it was acted upon; True for a duplicate. One thread call,
        so a client that hangs up cannot cut it between the decision and the effect."""
        if dedup is None:
            shop.db.record_webhook(event_id, entity, amount)
            return False
        if dedup.seen(event_id) and shop.db.has_webhook(event_id):
            return True  # the usual redelivery: the window and the ledger agree
        return not shop.db.record_webhook_once(event_id, entity, amount)

    async def payment(request: Request) -> Response:
        body = await json_body(request)
        event_id = text(body, "event_id", 200)
        entity = text(body, "order_id") if "order_id" in body else "-"
        amount = integer(body, "amount", 0) if "amount" in body else 0
        if event_id.strip() != event_id:
            raise Problem(
                422, "field-invalid", "Invalid field", "'event_id' has surrounding blanks"
            )
        duplicate = await shop.run(deliver, event_id, entity, amount)
        return JSONResponse({"event_id": event_id, "duplicate": duplicate})

    return Feature(
        name="webhooks",
        mechanism="oncely.messaging.dedup",
        routes=[Route("/webhooks/payment", payment, methods=["POST"])],
    )
