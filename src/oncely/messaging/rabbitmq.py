"""The idempotent consumer on RabbitMQ, with aio-pika (``oncely[rabbitmq]``).

Manual acks: a message is acked only after its record is completed (or it was a duplicate of
a completed one, or it was dead-lettered); a :class:`~oncely.messaging.consumer.Retry` holds
the message for ``delay`` seconds and then nacks it with ``requeue=True`` (so a redelivery
that found another consumer's claim, or a store that is down, does not spin). RabbitMQ keeps
no dedup of its own (DESIGN.md): the dedup id is the AMQP ``message_id`` property by default,
which :func:`publish` sets, with publisher confirms.

The delivery count: quorum queues send ``x-delivery-count`` (failed deliveries so far); on
classic queues the consumer counts failures in its process (``max_attempts``).

A connection that drops: use :func:`aio_pika.connect_robust` (it reconnects and consumes
again). The broker redelivers every message that was unacked on the old connection; an ack
for the old connection's delivery tag fails and is logged, and the redelivery is acked as a
duplicate once its record is complete. Nothing is lost, nothing runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from oncely.core.observe import describe
from oncely.messaging.consumer import Ack, DeadLetter, Delivery, IdempotentConsumer, Verdict
from oncely.settings import whole

__all__ = ["RabbitMQConsumer", "delivery_of", "publish"]

log = logging.getLogger("oncely")


def _text(value: Any) -> Any:
    """A header value as text; bytes that are not UTF-8 stay bytes (decoding them with
    replacement characters would make two different dedup ids equal: the consumer rejects
    them as undecodable instead)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def delivery_of(message: AbstractIncomingMessage) -> Delivery:
    """The :class:`Delivery` of an aio-pika message (``attempt`` from ``x-delivery-count``)."""
    headers = {k: _text(v) for k, v in (message.headers or {}).items()}
    count = headers.get("x-delivery-count")
    attempt = int(count) + 1 if isinstance(count, int) else None
    return Delivery(
        body=message.body,
        message_id=message.message_id,
        headers=headers,
        attempt=attempt,
        raw=message,
    )


async def publish(
    channel: AbstractChannel,
    routing_key: str,
    body: bytes,
    message_id: str,
    *,
    exchange: str = "",
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish a persistent message with ``message_id`` set; returns once the broker confirmed
    it (the channel must have publisher confirms on, aio-pika's default)."""
    target = channel.default_exchange if not exchange else await channel.get_exchange(exchange)
    await target.publish(
        aio_pika.Message(
            body,
            message_id=message_id,
            headers=headers or {},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=routing_key,
    )


class RabbitMQConsumer:
    """Consumes ``queue`` with manual acks, handling up to ``prefetch`` messages at a time.

    :param consumer: the :class:`IdempotentConsumer` (its handler, store and dedup id).
    :param queue: an aio-pika queue (declared by the caller).
    """

    def __init__(
        self, consumer: IdempotentConsumer, queue: AbstractQueue, *, prefetch: int = 100
    ) -> None:
        self.consumer = consumer
        self.queue = queue
        # basic.qos prefetch_count is an AMQP short
        self.prefetch = whole(
            prefetch, "prefetch", where="RabbitMQConsumer", minimum=1, maximum=65535
        )
        self.stats = {"ran": 0, "duplicates": 0, "retried": 0, "dead_lettered": 0}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def on_message(self, message: AbstractIncomingMessage) -> Verdict:
        """Handle one message and ack, nack-with-requeue or dead-letter-and-ack it."""
        verdict = await self.consumer.aprocess(delivery_of(message))
        try:
            if isinstance(verdict, Ack):
                self.stats["ran" if verdict.ran else "duplicates"] += 1
                await message.ack()
            elif isinstance(verdict, DeadLetter):
                self.stats["dead_lettered"] += 1
                await message.ack()
            else:
                self.stats["retried"] += 1
                await asyncio.sleep(verdict.delay)
                await message.nack(requeue=True)
        except Exception as exc:  # the channel closed: the broker redelivers the message
            log.warning(
                "oncely: could not settle message %r (%s)",
                message.message_id,
                describe(exc),
            )
        return verdict

    async def _spawn(self, message: AbstractIncomingMessage) -> None:
        # Messages are handled concurrently (up to the prefetch); retries wait off the reader.
        task = asyncio.ensure_future(self.on_message(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then stop consuming and finish the messages in hand."""
        await self.queue.channel.set_qos(prefetch_count=self.prefetch)
        tag = await self.queue.consume(self._spawn, no_ack=False)
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await self.queue.cancel(tag)
            while self._tasks:  # a message delivered just before the cancel may still start
                await asyncio.gather(*self._tasks, return_exceptions=True)
