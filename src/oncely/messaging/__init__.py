"""Message dedup (mechanism 8 of DESIGN.md): idempotent consumers, dedup windows
(:mod:`oncely.messaging.dedup`), the transactional inbox and outbox
(:mod:`oncely.messaging.inbox`, :mod:`oncely.messaging.outbox`).

* :mod:`oncely.messaging.consumer`: the broker-independent core, :class:`IdempotentConsumer`
  (claim, handle, complete, then ack; returns a :class:`Verdict` the adapter carries out);
* adapters, each a thin loop around it: :mod:`oncely.messaging.redis_streams`,
  :mod:`oncely.messaging.rabbitmq` (aio-pika), :mod:`oncely.messaging.nats` (JetStream),
  :mod:`oncely.messaging.mqtt` (paho-mqtt), :mod:`oncely.messaging.celery`.

Adapters import their broker client, so they are imported from their own module (each needs
its extra: ``oncely[redis]``, ``oncely[rabbitmq]``, ``oncely[nats]``, ``oncely[mqtt]``,
``oncely[celery]``). See ``docs/messaging.md``.
"""

from __future__ import annotations

from oncely.messaging.consumer import (
    Ack,
    DeadLetter,
    DedupSource,
    Delivery,
    IdempotentConsumer,
    Retry,
    Verdict,
    dedup_id_reader,
)

__all__ = [
    "Ack",
    "DeadLetter",
    "DedupSource",
    "Delivery",
    "IdempotentConsumer",
    "Retry",
    "Verdict",
    "dedup_id_reader",
]
