"""Endpoints for verification, no mechanism: ``GET /healthz``, ``GET /ledger`` (every applied
effect, one row each, never deduplicated) and ``GET /stock/{sku}``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oncely.demo.shop.features import Feature, Shop
from oncely.demo.shop.web import Problem, path_id

__all__ = ["feature"]


def feature(shop: Shop) -> Feature:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "protected": shop.protected})

    async def ledger(request: Request) -> Response:
        return JSONResponse(await shop.run(shop.db.ledger))

    async def stock(request: Request) -> Response:
        sku = path_id(request, "sku")
        units = await shop.run(shop.db.stock, sku)
        if units is None:
            raise Problem(404, "sku-not-found", "Unknown product", f"no product {sku!r}")
        return JSONResponse({"sku": sku, "stock": units})

    return Feature(
        name="verify",
        mechanism="",
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/ledger", ledger, methods=["GET"]),
            Route("/stock/{sku}", stock, methods=["GET"]),
        ],
    )
