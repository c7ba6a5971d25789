"""Pay an order with a one-time ``Payment-Token`` (source §3.2, :mod:`oncely.tokens`), the card
charge itself made once per order with :func:`oncely.idempotent`.

* ``POST /payment-tokens`` ``{"order_id"}`` -> ``201 {"token"}``: a signed token bound to the
  order's customer (subject) and to ``pay:<order_id>`` (purpose).
* ``POST /orders/{order_id}/pay`` ``{"amount"}`` with ``Payment-Token`` -> ``200 {"order_id",
  "status": "paid", "transaction_id"}``. The token is consumed in one atomic store round trip
  before anything else: a reused token gets ``409 token-reused`` (with ``order_status``), so a
  double-submitted payment charges once. An ``Idempotency-Key`` is optional here; with one, a
  retry of a completed payment replays its ``200`` instead.

The card charge (the payment provider, simulated: it takes ``latency`` seconds and then writes
the ``charge`` ledger row) is wrapped in ``@idempotent(key=["order_id"])``, so even a second
token for the same order cannot charge it twice while the first charge runs or after it.

Unprotected, the handler only checks that the order is still ``placed`` before charging, the
classic check-then-act: concurrent duplicates all pass the check and all charge.

Protected, the charge's transaction also writes one payment row per order under a unique key
(:func:`oncely.sql.insert_once`): a charge run again because its worker died after the commit
but before the decorator stored its result returns the first transaction id. The order moves
``placed -> paid`` through the order state machine in the same transaction, so an order
cancelled while the card was charged is not marked paid (the charge rolls back: 409).
"""

from __future__ import annotations

import asyncio
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oncely import idempotent
from oncely.demo.shop.db import Order
from oncely.demo.shop.features import Feature, Shop
from oncely.demo.shop.web import Problem, integer, json_body, path_id, text
from oncely.errors import IllegalTransition, TokenError, TokenReused
from oncely.http import Rule
from oncely.tokens import TokenUse

__all__ = ["feature"]

TOKEN_TTL = 900.0


def _not_payable(status: str) -> Problem:
    return Problem(
        409,
        "order-not-payable",
        "Order cannot be paid",
        "the order is not awaiting payment",
        order_status=status,
    )


def feature(shop: Shop) -> Feature:
    async def provider_charge(order_id: str, amount: int) -> str:
        """The payment provider charges the card: the effect that must happen once."""
        await asyncio.sleep(shop.settings.latency)
        transaction_id = f"txn_{uuid.uuid4().hex[:20]}"
        return await shop.run(
            shop.db.record_charge, order_id, amount, transaction_id, shop.protected
        )

    charge = provider_charge
    if shop.store is not None:
        charge = idempotent(
            store=shop.store,
            name="shop.provider.charge",
            scope="shop",
            key=["order_id"],
            validate=["amount"],
            lease=shop.settings.lease,
        )(provider_charge)

    async def issue(request: Request) -> Response:
        body = await json_body(request)
        order = await shop.own_order(request, text(body, "order_id"))
        if shop.tokens is not None:
            token = await shop.tokens.aissue(order.customer, f"pay:{order.id}", TOKEN_TTL)
        else:
            token = f"unchecked-{uuid.uuid4().hex}"
        return JSONResponse({"token": token, "expires_in": int(TOKEN_TTL)}, status_code=201)

    async def consume(request: Request, order: Order) -> TokenUse | None:
        if shop.tokens is None:
            return None
        token = request.headers.get("payment-token")
        if not token:
            raise Problem(
                400,
                "token-missing",
                "A one-time token is required",
                "send the Payment-Token header",
            )
        try:
            return await shop.tokens.aconsume(token, order.customer, f"pay:{order.id}")
        except TokenReused:
            current = await shop.run(shop.db.order, order.id)
            raise Problem(
                409,
                "token-reused",
                "The one-time token was already used",
                "this payment was already submitted",
                order_status=current.status if current else order.status,
            ) from None
        except TokenError as exc:
            raise Problem(
                403, "token-invalid", "The one-time token is invalid", type(exc).__name__
            ) from None

    async def pay(request: Request) -> Response:
        order_id = path_id(request, "order_id")
        body = await json_body(request)
        amount = integer(body, "amount")
        order = await shop.own_order(request, order_id)
        use = await consume(request, order)
        try:
            if amount != order.amount:
                raise Problem(
                    422,
                    "amount-mismatch",
                    "Wrong amount",
                    f"the order is for {order.amount}",
                    expected=order.amount,
                )
            current = await shop.run(shop.db.order, order_id)
            if current is None or current.status != "placed":
                raise _not_payable(current.status if current else "unknown")
            try:
                transaction_id = await charge(order_id, amount)
            except IllegalTransition as exc:  # cancelled while the charge ran: rolled back
                raise _not_payable(str(exc.current)) from None
        except BaseException:
            if use is not None and shop.tokens is not None:
                await shop.tokens.arelease(use)  # give the token back: the user may retry
            raise
        return JSONResponse(
            {"order_id": order_id, "status": "paid", "transaction_id": transaction_id}
        )

    return Feature(
        name="payments",
        mechanism="oncely.tokens",
        routes=[
            Route("/payment-tokens", issue, methods=["POST"]),
            Route("/orders/{order_id}/pay", pay, methods=["POST"]),
        ],
        idempotent_paths=["/orders/*/pay"],
        rules={"/orders/*/pay": Rule(required=False)},
    )
