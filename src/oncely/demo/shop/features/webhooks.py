"""A dedup window on incoming payment webhooks (cache dedup, ``SET NX EX``-style).

Pending ``oncely.messaging``: until it lands ``POST /webhooks/payment`` answers 501. The
contract: ``{"event_id": str, …}`` -> 200 ``{"duplicate": bool}``.
"""

from __future__ import annotations

from oncely.demo.shop.features import Feature, Shop, pending

__all__ = ["feature"]


def feature(shop: Shop) -> Feature:
    return pending(
        "webhooks",
        "oncely.messaging",
        "deduplicating payment webhooks in a window",
        [("/webhooks/payment", ["POST"])],
    )
