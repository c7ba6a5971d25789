"""Credit an account with ``If-Match`` on its version (source §3.3, optimistic locking).

Pending ``oncely.sql``'s versioned compare-and-set: until it lands both endpoints answer 501.
The contract (``docs/demo.md``): ``GET /accounts/{id}`` 200 with an ``ETag``;
``POST /accounts/{id}/credit`` ``{"amount"}`` with ``If-Match``: 200 with the new ``ETag``,
412 when stale (RFC 9110), 428 when missing (RFC 6585 §3).
"""

from __future__ import annotations

from oncely.demo.shop.features import Feature, Shop, pending

__all__ = ["feature"]


def feature(shop: Shop) -> Feature:
    return pending(
        "accounts",
        "oncely.sql",
        "crediting an account with If-Match (optimistic locking)",
        [("/accounts/{account_id}", ["GET"]), ("/accounts/{account_id}/credit", ["POST"])],
    )
