"""Exactly-once message processing (mechanism 8 of DESIGN.md): idempotent consumers, dedup
windows, the transactional inbox and the outbox.

* :mod:`oncely.messaging.consumer`: the broker-independent core, :class:`IdempotentConsumer`
  (claim, handle, complete, then ack; returns a :class:`Verdict` the adapter carries out);
* adapters, each a thin loop around it: :mod:`oncely.messaging.redis_streams`,
  :mod:`oncely.messaging.rabbitmq` (aio-pika), :mod:`oncely.messaging.nats` (JetStream),
  :mod:`oncely.messaging.mqtt` (paho-mqtt), :mod:`oncely.messaging.celery`;
* :mod:`oncely.messaging.inbox`: :class:`Inbox`, the dedup row that commits with the
  handler's database writes (the transactional mode);
* :mod:`oncely.messaging.outbox`: :class:`Outbox` and its :class:`Relay`;
* :mod:`oncely.messaging.dedup`: :class:`Deduplicator`, dedup windows (``seen``,
  ``filter_new``).

Adapters import their broker client, so they are imported from their own module (each needs
its extra: ``oncely[redis]``, ``oncely[rabbitmq]``, ``oncely[nats]``, ``oncely[mqtt]``,
``oncely[celery]``). See ``docs/messaging.md`` and ``docs/messaging-inbox.md``.
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
from oncely.messaging.dedup import Deduplicator
from oncely.messaging.inbox import Inbox
from oncely.messaging.outbox import Outbox, OutboxMessage, Relay

__all__ = [
    "Ack",
    "DeadLetter",
    "DedupSource",
    "Deduplicator",
    "Delivery",
    "IdempotentConsumer",
    "Inbox",
    "Outbox",
    "OutboxMessage",
    "Relay",
    "Retry",
    "Verdict",
    "dedup_id_reader",
]
