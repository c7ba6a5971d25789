"""The idempotent consumer on NATS JetStream, with nats-py (``oncely[nats]``).

A durable pull consumer: each round fetches a batch, hands it to
:meth:`~oncely.messaging.consumer.IdempotentConsumer.aprocess_many` and settles each message:

* acked (or dead-lettered) messages with ``ack_sync()``, the double ack: the server confirms
  the ack, so a lost ack is seen (and the redelivery is acked as a duplicate later);
* :class:`~oncely.messaging.consumer.Retry` with ``nak(delay)``, so the server redelivers after
  the delay instead of at once.

Ack-wait aware: while a batch runs, every message in it gets ``in_progress()`` every
``ack_wait / 3`` seconds, which resets the server's ack-wait timer, so a long handler's
message is not redelivered while it runs (the claim's lease is renewed alongside it by the
consumer core). ``ack_wait`` is read from the consumer's configuration.

JetStream drops duplicate *publishes* by ``Nats-Msg-Id`` within the stream's duplicate window
(2 minutes by default, capped by the stream's max age), but not redeliveries to consumers
(DESIGN.md); :func:`publish` sets the header, and the consumer's dedup id is that header by
default, so a duplicate published after the window is also dropped by the claim. The delivery
count is ``metadata.num_delivered``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.client import JetStreamContext

from oncely.core.observe import describe
from oncely.messaging.consumer import Ack, DeadLetter, Delivery, IdempotentConsumer, Verdict
from oncely.settings import count, seconds

__all__ = ["MSG_ID", "JetStreamConsumer", "delivery_of", "publish"]

log = logging.getLogger("oncely")

#: The header JetStream dedups publishes by.
MSG_ID = "Nats-Msg-Id"


def delivery_of(msg: Msg) -> Delivery:
    """The :class:`Delivery` of a JetStream message (``attempt``: ``num_delivered``)."""
    headers = dict(msg.headers or {})
    try:
        attempt: int | None = int(msg.metadata.num_delivered)
    except Exception:  # not a JetStream message (no reply subject to read metadata from)
        attempt = None
    return Delivery(
        body=msg.data, message_id=headers.get(MSG_ID), headers=headers, attempt=attempt, raw=msg
    )


async def publish(
    js: JetStreamContext,
    subject: str,
    body: bytes,
    message_id: str,
    *,
    headers: dict[str, str] | None = None,
) -> bool:
    """Publish with ``Nats-Msg-Id`` set; returns True if the server kept it, False if it
    dropped it as a duplicate publish within the stream's duplicate window."""
    ack = await js.publish(subject, body, headers={**(headers or {}), MSG_ID: message_id})
    return not ack.duplicate


class JetStreamConsumer:
    """Runs an :class:`IdempotentConsumer` on a durable pull subscription.

    :param subscription: from ``js.pull_subscribe(subject, durable=..., stream=...)``.
    :param batch: messages per fetch.
    :param fetch_timeout: seconds a fetch waits for messages.
    """

    def __init__(
        self,
        consumer: IdempotentConsumer,
        subscription: JetStreamContext.PullSubscription,
        *,
        batch: int = 100,
        fetch_timeout: float = 1.0,
    ) -> None:
        self.consumer = consumer
        self.subscription = subscription
        self.batch = count(batch, "batch", where="JetStreamConsumer")
        self.fetch_timeout = float(
            seconds(fetch_timeout, "fetch_timeout", where="JetStreamConsumer")
        )
        self.ack_wait: float | None = None
        self.stats = {"ran": 0, "duplicates": 0, "retried": 0, "dead_lettered": 0}

    async def _ack_wait(self) -> float:
        if self.ack_wait is None:
            info = await self.subscription.consumer_info()
            self.ack_wait = float(info.config.ack_wait or 30.0)
            if self.ack_wait < self.consumer.lease:
                log.warning(
                    "oncely: JetStream ack_wait (%ss) is shorter than the lease (%ss); "
                    "messages are kept alive with in_progress() every ack_wait / 3",
                    self.ack_wait,
                    self.consumer.lease,
                )
        return self.ack_wait

    async def step(self) -> int:
        """Fetch one batch and handle it; returns how many messages it handled."""
        try:
            msgs = await self.subscription.fetch(self.batch, timeout=self.fetch_timeout)
        except (NatsTimeoutError, asyncio.TimeoutError, TimeoutError):
            # nats-py ends an empty wait with its own TimeoutError or, at times, the builtin
            # one (asyncio's): both mean "no messages yet", not a failure
            return 0
        await self.handle(msgs)
        return len(msgs)

    async def handle(self, msgs: Sequence[Msg]) -> list[tuple[Delivery, Verdict]]:
        """Handle a batch (kept in progress while it runs) and settle each message."""
        deliveries = [delivery_of(m) for m in msgs]
        keep = asyncio.ensure_future(self._in_progress(msgs, await self._ack_wait()))
        try:
            verdicts = await self.consumer.aprocess_many(deliveries)
        finally:
            keep.cancel()
        await asyncio.gather(*(self._settle(m, v) for m, v in zip(msgs, verdicts)))
        return list(zip(deliveries, verdicts))

    async def _settle(self, msg: Msg, verdict: Verdict) -> None:
        try:
            if isinstance(verdict, Ack):
                self.stats["ran" if verdict.ran else "duplicates"] += 1
                await msg.ack_sync()
            elif isinstance(verdict, DeadLetter):
                self.stats["dead_lettered"] += 1
                await msg.ack_sync()
            else:
                self.stats["retried"] += 1
                await msg.nak(delay=verdict.delay)
        except Exception as exc:  # the server redelivers after ack_wait; the claim decides
            log.warning("oncely: could not settle JetStream message (%s)", describe(exc))

    async def _in_progress(self, msgs: Sequence[Msg], ack_wait: float) -> None:
        while True:
            await asyncio.sleep(ack_wait / 3)
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and handle until ``stop`` is set; connection errors are retried (nats-py
        reconnects; unacked messages are redelivered after ack_wait)."""
        while not stop.is_set():
            try:
                await self.step()
            except Exception as exc:
                log.warning("oncely: JetStream fetch failed (%s); retrying", describe(exc))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
