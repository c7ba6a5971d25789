"""Ship an order through a queue consumed by an idempotent consumer (RabbitMQ, NATS or Redis
Streams when given; an embedded SQLite-backed queue by default).

Pending ``oncely.messaging``: until it lands ``POST /orders/{id}/ship`` answers 501.
"""

from __future__ import annotations

from oncely.demo.shop.features import Feature, Shop, pending

__all__ = ["feature"]


def feature(shop: Shop) -> Feature:
    return pending(
        "shipping",
        "oncely.messaging",
        "shipping through an idempotent queue consumer",
        [("/orders/{order_id}/ship", ["POST"])],
    )
