"""Cancel an order, or let it time out: a state-machine transition and a barrier-protected
compensation that gives the stock back (source: idempotent state machine; DTM's barrier).

Pending ``oncely.statemachine``: until it lands ``POST /orders/{id}/cancel`` answers 501. The
contract: 200 ``{"status": "cancelled"}``, repeatable; the stock comes back exactly once.
"""

from __future__ import annotations

from oncely.demo.shop.features import Feature, Shop, pending

__all__ = ["feature"]


def feature(shop: Shop) -> Feature:
    return pending(
        "cancel",
        "oncely.statemachine",
        "cancelling an order (state transition and compensation barrier)",
        [("/orders/{order_id}/cancel", ["POST"])],
    )
