"""The shop's features, one module each, and what they share.

Each module exposes ``feature(shop) -> Feature``: its routes, and for the HTTP
``Idempotency-Key`` middleware which paths it protects. A feature whose oncely mechanism is not
built yet is a :func:`pending` feature: its routes answer ``501`` problem+json naming the
mechanism, and the storm skips it and says so. A later mechanism plugs in by replacing that
module's ``feature`` with the implementation (protected and unprotected), nothing else.

=================  ==============================================  ==========================
module             endpoints                                       mechanism
=================  ==============================================  ==========================
``orders``         ``POST /orders``                                ``oncely.http`` (dedup
                                                                   table over HTTP)
``payments``       ``POST /payment-tokens``,                       ``oncely.tokens``,
                   ``POST /orders/{id}/pay``                       ``@idempotent``
``accounts``       ``GET /accounts/{id}``,                         ``oncely.http.conditional``,
                   ``POST /accounts/{id}/credit``                  ``oncely.sql``
``cancel``         ``POST /orders/{id}/cancel``                    ``oncely.statemachine``
``shipping``       ``POST /orders/{id}/ship``                      ``oncely.messaging``
                                                                   (outbox, relay, inbox)
``webhooks``       ``POST /webhooks/payment``                      ``oncely.messaging.dedup``
``settlement``     (a periodic job, no endpoint)                   ``oncely.locks``
``verify``         ``GET /healthz``, ``/ledger``, ``/stock/{sku}``  none (for verification)
=================  ==============================================  ==========================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from oncely.demo.shop.db import Order, ShopDB
from oncely.demo.shop.settings import Settings
from oncely.demo.shop.web import Problem, caller
from oncely.errors import EntityNotFound, IllegalTransition
from oncely.http import Rule
from oncely.stores import Store
from oncely.tokens import Tokens

__all__ = ["Feature", "Shop", "order_not_found", "pending"]

T = TypeVar("T")


def order_not_found(order_id: str) -> Problem:
    """The ``404 order-not-found`` problem: no such order, or not the caller's."""
    return Problem(404, "order-not-found", "Unknown order", f"no order {order_id!r}")


@dataclass
class Shop:
    """What features share inside one worker process."""

    settings: Settings
    db: ShopDB
    #: oncely's store and token issuer; ``None`` in unprotected mode.
    store: Store | None = None
    tokens: Tokens | None = None

    @property
    def protected(self) -> bool:
        return self.settings.protected

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking database call on a worker thread."""
        return await anyio.to_thread.run_sync(fn, *args)

    async def own_order(self, request: Request, order_id: str) -> Order:
        """The order ``order_id`` if the caller may see it (no caller: anyone may).

        :raises Problem: ``404 order-not-found``: no such order, or another customer's.
        """
        order = await self.run(self.db.order, order_id)
        who = caller(request)
        if order is None or (who is not None and who != order.customer):
            raise order_not_found(order_id)
        return order

    async def move_order(
        self,
        step: Callable[[str], object],
        order_id: str,
        refused: Callable[[str, str], Problem],
    ) -> None:
        """Run ``step(order_id)``, a transition of the order machine (one conditional update).

        :raises Problem: ``refused(order_id, current status)`` when the machine refuses the
            transition from the order's current state; ``404 order-not-found`` when the order
            is gone.
        """
        try:
            await self.run(step, order_id)
        except IllegalTransition as exc:
            raise refused(order_id, str(exc.current)) from None
        except EntityNotFound:
            raise order_not_found(order_id) from None


@dataclass
class Feature:
    """One shop feature: its routes and how the Idempotency-Key middleware treats them."""

    name: str
    mechanism: str
    routes: Sequence[BaseRoute]
    #: path patterns the middleware protects (``*`` = one segment)
    idempotent_paths: Sequence[str] = ()
    #: per-path overrides of the middleware's settings
    rules: Mapping[str, Rule] = field(default_factory=dict)
    live: bool = True


def pending(
    name: str, mechanism: str, what: str, endpoints: Sequence[tuple[str, Sequence[str]]]
) -> Feature:
    """A feature waiting for ``mechanism``: every endpoint answers 501 problem+json."""

    async def not_yet(request: Request) -> Response:
        raise Problem(
            501,
            "not-implemented",
            "Not implemented yet",
            f"{what} needs {mechanism}, which oncely does not have yet",
            mechanism=mechanism,
            feature=name,
        )

    routes: list[BaseRoute] = [
        Route(path, not_yet, methods=list(methods), name=f"{name}:{path}")
        for path, methods in endpoints
    ]
    return Feature(name=name, mechanism=mechanism, routes=routes, live=False)


Handler = Callable[[Request], Awaitable[Response]]
