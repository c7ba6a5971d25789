"""A dedup window on incoming payment webhooks (cache dedup, ``SET NX PX``-style:
:class:`oncely.messaging.dedup.Deduplicator`).

``POST /webhooks/payment`` ``{"event_id": str, "order_id"?: str, "amount"?: int}`` ->
``200 {"event_id", "duplicate": bool}``. Payment providers deliver a notification at least
once (Stripe retries for days); the shop acts on an event id once per window (one hour) and
answers a redelivery ``{"duplicate": true}`` with a 200, so the provider stops retrying.

Protected, one atomic ``seen(event_id)`` on oncely's store decides (one statement or script:
``INSERT … ON CONFLICT … RETURNING`` on SQL, ``SET NX PX`` on Redis); only the first sighting
writes the ``webhook`` ledger row. The window is not in the ledger's transaction: a worker that
dies between the two loses that one notification (the window fits effects that are cheap to
lose; an inbox, :mod:`oncely.messaging.inbox`, commits the record with the effect).
Unprotected, every delivery is acted upon.
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
        """Act on the event unless the window saw it; True for a duplicate. One thread call,
        so a client that hangs up cannot cut it between the decision and the effect."""
        if dedup is not None and dedup.seen(event_id):
            return True
        shop.db.record_webhook(event_id, entity, amount)
        return False

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
