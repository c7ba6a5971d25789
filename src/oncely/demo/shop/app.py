"""The shop as a Starlette app: ``create_app(settings)``, or the Uvicorn factory
``oncely.demo.shop.app:create_app`` (settings from the ``ONCELY_DEMO_*`` environment).

Protected, the app sits behind :class:`oncely.http.IdempotencyMiddleware` (scope: the customer
of ``Authorization: Bearer <customer>``) and the features get oncely's store and token issuer;
unprotected, the same features run without any of it.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import AsyncIterator
from typing import cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from oncely.demo.shop.db import ShopDB
from oncely.demo.shop.features import (
    Feature,
    Shop,
    accounts,
    cancel,
    orders,
    payments,
    shipping,
    verify,
    webhooks,
)
from oncely.demo.shop.queue import EmbeddedQueue
from oncely.demo.shop.settings import Settings
from oncely.demo.shop.web import customer_of, problem_handler, problem_response
from oncely.errors import HttpProblem
from oncely.http import HttpRequest, IdempotencyConfig, IdempotencyMiddleware, Rule
from oncely.http.conditional import ConditionalMiddleware
from oncely.stores import open_store
from oncely.tokens import Tokens

__all__ = ["FEATURES", "create_app", "features_of"]

#: Every feature of the shop, in routing order.
FEATURES = (verify, orders, payments, accounts, cancel, shipping, webhooks)


def customer_scope(request: HttpRequest) -> str:
    """The idempotency scope: the customer of ``Authorization: Bearer <customer>``, so two
    customers' keys never meet (draft §6); ``""`` for anonymous requests."""
    return customer_of(request.header("authorization")) or ""


def features_of(shop: Shop) -> list[Feature]:
    return [module.feature(shop) for module in FEATURES]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    return problem_response(
        exc.status_code, slug, str(exc.detail), str(exc.detail), tuple((exc.headers or {}).items())
    )


def create_app(settings: Settings | None = None) -> ASGIApp:
    settings = settings or Settings.from_env()
    db = ShopDB(settings.shop_db)
    shop = Shop(settings=settings, db=db)
    if settings.protected:
        shop.store = open_store(settings.store, **settings.store_options())
        shop.tokens = Tokens(settings.secret, shop.store, scope="shop-payment-tokens")
    features = features_of(shop)
    config: IdempotencyConfig | None = None
    if shop.store is not None:
        rules: dict[str, Rule] = {}
        for f in features:
            rules.update(f.rules)
        config = IdempotencyConfig(
            store=shop.store,
            methods=["POST"],
            include=[p for f in features for p in f.idempotent_paths],
            routes=rules,
            scope=customer_scope,
            lease=settings.lease,
            ttl=3600.0,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = threading.Event()
        if shop.protected:  # the shipping relay and consumer (see features.shipping)
            shipper = shipping.Shipper(ShopDB(settings.shop_db), EmbeddedQueue(settings.queue_db))
            threading.Thread(target=shipper.run, args=(stop,), daemon=True).start()
        yield
        stop.set()
        if shop.store is not None:
            await shop.store.aclose()
            shop.store.close()
        db.close()

    app = Starlette(
        routes=[route for f in features for route in f.routes],
        exception_handlers={
            HttpProblem: problem_handler,
            HTTPException: _http_error,
            Exception: problem_handler,
        },
        lifespan=lifespan,
    )
    if config is None:
        return app
    # Outermost: a credit without If-Match gets its 428 before any key is claimed.
    conditional = ConditionalMiddleware(
        IdempotencyMiddleware(app, config), methods=["POST"], paths=accounts.is_credit_path
    )
    return cast(ASGIApp, conditional)


def dev_settings(workdir: str) -> Settings:
    """Settings for a quick local run (a fresh token secret)."""
    from pathlib import Path

    return Settings(workdir=Path(workdir), secret=secrets.token_urlsafe(32))
