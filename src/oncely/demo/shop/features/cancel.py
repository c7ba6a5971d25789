"""Cancel an order: a state-machine transition and a barrier-protected compensation that gives
the stock back (source mechanism 5, "order timeout rollback, stock given back";
:mod:`oncely.statemachine`, DTM's sub-transaction barrier).

``POST /orders/{order_id}/cancel`` -> ``200 {"order_id", "status": "cancelled"}``, repeatable:
cancelling a cancelled order is the same success. ``409 order-not-cancellable`` (with
``order_status``) once it has shipped or been paid out by the settlement (``order_status``
``"settled"``: a cancel never refunds an order whose pay-out is written); ``404
order-not-found``.

Protected, one transaction does both halves: ``placed|paid -> cancelled`` through the order
machine (:data:`oncely.demo.shop.db.ORDER_MACHINE`, one conditional ``UPDATE``), then
``barrier(conn, order_id, "stock", "compensate")``. The order's own transaction wrote the
branch's ``action`` row when it took the stock, so the first cancel gets ``EXECUTE`` and gives
the stock back; every repeat, concurrent or late, gets ``DUPLICATE`` and gives nothing.

Unprotected, the handler reads the order, checks it is not cancelled yet, works a moment and
then cancels and gives the stock back (check-then-act): concurrent duplicates all pass the
check and give the stock back once each.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oncely.demo.shop.features import Feature, Shop
from oncely.demo.shop.web import Problem, path_id
from oncely.errors import IllegalTransition

__all__ = ["feature"]


def _not_cancellable(order_id: str, status: str) -> Problem:
    return Problem(
        409,
        "order-not-cancellable",
        "Order cannot be cancelled",
        f"order {order_id!r} is {status!r}; only placed or paid (not yet settled) orders can "
        "be cancelled",
        order_status=status,
    )


def feature(shop: Shop) -> Feature:
    async def cancel(request: Request) -> Response:
        order_id = path_id(request, "order_id")
        order = await shop.own_order(request, order_id)
        if shop.protected:
            await shop.move_order(shop.db.cancel, order_id, _not_cancellable)
        elif order.status != "cancelled":
            if order.status == "shipped":
                raise _not_cancellable(order_id, order.status)
            await asyncio.sleep(shop.settings.latency)  # the work between check and act
            try:
                await shop.run(shop.db.cancel_unchecked, order_id, order.sku, order.qty)
            except IllegalTransition as exc:  # paid out meanwhile: the database refuses
                raise _not_cancellable(order_id, str(exc.current)) from None
        return JSONResponse({"order_id": order_id, "status": "cancelled"})

    return Feature(
        name="cancel",
        mechanism="oncely.statemachine",
        routes=[Route("/orders/{order_id}/cancel", cancel, methods=["POST"])],
    )
