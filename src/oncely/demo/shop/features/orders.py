"""Place an order: ``POST /orders`` with an ``Idempotency-Key`` (source §3.4, the dedup table,
through :mod:`oncely.http`).

Protected, the middleware runs the handler once per (customer, key): a retry gets the stored
``201`` with ``Idempotent-Replayed: true``, a concurrent duplicate ``409``, a changed body under
the same key ``422``, a missing key ``400``. Unprotected, every duplicate places another order
and takes the stock again.

The middleware stores the response after the handler's transaction commits; a worker killed in
between leaves the key claimed until its lease runs out, and the retry then runs the handler
again. Protected, the order's transaction also records the (customer, key) pair under a unique
index, so that second run returns the first order instead of placing another
(:func:`oncely.sql.insert_once`).

The response sets a ``last_order`` cookie (oncely never stores or replays ``Set-Cookie``), and
a ``Demo-Fault: raise`` header makes the handler fail before it does anything (``oncely probe``
uses it to check that a failed request does not leave its key claimed).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oncely.demo.shop.features import Feature, Shop
from oncely.demo.shop.web import Problem, caller, integer, json_body, text

__all__ = ["feature"]

MAX_QTY = 1000


def feature(shop: Shop) -> Feature:
    async def place(request: Request) -> Response:
        body = await json_body(request)
        sku = text(body, "sku")
        qty = integer(body, "qty", 1, MAX_QTY)
        customer = text(body, "customer")
        who = caller(request)
        if who is not None and who != customer:
            raise Problem(
                403, "customer-mismatch", "Forbidden", "an order is placed by its own customer"
            )
        if await shop.run(shop.db.price, sku) is None:
            raise Problem(404, "sku-not-found", "Unknown product", f"no product {sku!r}")
        if request.headers.get("demo-fault") == "raise":
            # A handler that fails before doing anything (for `oncely probe`): the key must
            # not stay claimed.
            raise RuntimeError("fault injected by the Demo-Fault header")
        key = request.headers.get("idempotency-key") or "-"
        order = await shop.run(
            shop.db.place_order, customer, sku, qty, f"{customer}/{key}", shop.protected
        )
        if order is None:
            raise Problem(409, "out-of-stock", "Out of stock", f"fewer than {qty} of {sku!r} left")
        response = JSONResponse(
            {
                "order_id": order.id,
                "status": order.status,
                "customer": customer,
                "sku": sku,
                "qty": qty,
                "amount": order.amount,
            },
            status_code=201,
        )
        # A session-style cookie, as real shops set: oncely never stores or replays it.
        response.set_cookie("last_order", order.id, httponly=True, samesite="strict")
        return response

    return Feature(
        name="orders",
        mechanism="oncely.http",
        routes=[Route("/orders", place, methods=["POST"])],
        idempotent_paths=["/orders"],
    )
