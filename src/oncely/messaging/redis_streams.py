"""The idempotent consumer on Redis Streams (redis-py asyncio): consumer groups, ``XACK``,
``XAUTOCLAIM`` of entries left by dead consumers.

Each round reads a batch (``XREADGROUP … >``, ``count`` entries), hands it to
:meth:`~oncely.messaging.consumer.IdempotentConsumer.aprocess_many` (the claims of a batch
overlap on the store's pool) and acks every acked or dead-lettered entry with one ``XACK``.
An entry whose verdict is :class:`~oncely.messaging.consumer.Retry` stays pending: it comes
back through ``XAUTOCLAIM`` once it has been idle ``min_idle`` seconds.

The min-idle time is tied to the lease (DESIGN.md: a min-idle time shorter than the slowest
handler hands one entry to two workers): it defaults to the consumer's lease, and while a batch
runs its entries are touched every ``min_idle / 3`` (``XCLAIM … JUSTID`` to this consumer,
which resets their idle time and not their delivery count), so a live handler's entry is never
idle long enough to be taken. An entry of a consumer that died stops being touched and is
taken over after ``min_idle``; even then the record's claim decides who runs (a takeover while
the claim is live waits or is retried, and never runs the handler a second time).

``XAUTOCLAIM`` scans at most ``COUNT x 10`` pending entries per call and may return none
although more are due further on; :meth:`RedisStreamConsumer.reclaim` pages with the returned
cursor until the server answers ``0-0``, so a long run of pending entries owned by live
consumers never hides a dead consumer's entries behind it.

Entries are maps of fields. :func:`publish` writes ``id`` (the dedup id) and ``body``;
:class:`~oncely.messaging.consumer.Delivery` gets ``message_id`` from the field ``id``,
``body`` from ``body`` and every field (as text) in ``headers``, so ``dedup_id="header:<field>"``
reads any other field. The entry id is ``raw[0]``; it is not a dedup id (each ``XADD`` of the
same message gets a new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from oncely.core.observe import describe
from oncely.errors import ConfigurationError
from oncely.messaging.consumer import Ack, DeadLetter, Delivery, IdempotentConsumer, Verdict
from oncely.settings import MAX_COUNT, seconds, text, whole

__all__ = ["RedisStreamConsumer", "publish"]

log = logging.getLogger("oncely")

Entry = tuple[Any, dict[Any, Any]]


def _text(value: Any) -> Any:
    """A field as text; bytes that are not UTF-8 stay bytes (never decoded with replacement
    characters, which would make two different dedup ids equal: the consumer rejects them)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return str(value)


def delivery_of(entry: Entry, attempt: int | None) -> Delivery:
    """The :class:`Delivery` of one stream entry ``(entry id, fields)``."""
    entry_id, fields = entry
    headers = {_text(k): _text(v) for k, v in fields.items()}
    raw_body: Any = fields.get(b"body", fields.get("body", b""))
    body = raw_body.encode() if isinstance(raw_body, str) else bytes(raw_body or b"")
    return Delivery(
        body=body,
        message_id=headers.get("id"),
        headers=headers,
        attempt=attempt,
        raw=(_text(entry_id), fields),
    )


async def publish(
    client: redis.asyncio.Redis, stream: str, body: bytes | str, message_id: str
) -> str:
    """``XADD`` one message with the fields ``id`` (its dedup id) and ``body``; returns the entry
    id. Redis keeps no publish dedup: a repeated publish is a new entry, and the consumer's
    claim drops its effect."""
    entry_id = await client.xadd(stream, {"id": message_id, "body": body})
    return str(_text(entry_id))


class RedisStreamConsumer:
    """Runs an :class:`IdempotentConsumer` on one stream as member ``member`` of ``group``.

    :param client: a redis-py asyncio client (responses not decoded).
    :param count: entries per ``XREADGROUP`` / ``XAUTOCLAIM`` call (the batch).
    :param block: seconds ``XREADGROUP`` waits for new entries.
    :param min_idle: seconds an entry must be idle before another member takes it over with
        ``XAUTOCLAIM`` (default: the consumer's lease; must be at least the lease).
    :raises ConfigurationError: ``min_idle`` shorter than the lease, or a bad count.
    """

    def __init__(
        self,
        consumer: IdempotentConsumer,
        client: redis.asyncio.Redis,
        stream: str,
        group: str,
        member: str,
        *,
        count: int = 100,
        block: float = 1.0,
        min_idle: float | None = None,
    ) -> None:
        min_idle = (
            consumer.lease
            if min_idle is None
            else seconds(min_idle, "min_idle", where="RedisStreamConsumer")
        )
        if min_idle < consumer.lease:
            raise ConfigurationError(
                f"min_idle ({min_idle}s) is shorter than the lease ({consumer.lease}s): a slow "
                "but live handler's entry would be claimed by another member; raise min_idle"
            )
        where = "RedisStreamConsumer"
        self.count = whole(count, "count", where=where, minimum=1, maximum=MAX_COUNT)
        block = seconds(block, "block", where=where, above=False)
        self.consumer = consumer
        self.client = client
        self.stream = text(stream, "stream", where=where)
        self.group = text(group, "group", where=where)
        self.member = text(member, "member", where=where)
        self.block_ms = max(int(block * 1000), 1)
        self.min_idle = min_idle
        self.stats = {"ran": 0, "duplicates": 0, "retried": 0, "dead_lettered": 0}
        self._next_reclaim = 0.0

    async def ensure_group(self) -> None:
        """Create the group (and the stream) if missing; from the start of the stream."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set. A dropped connection is retried with backoff (the
        unacked entries stay pending and are reclaimed: nothing is lost)."""
        stop = stop or asyncio.Event()
        backoff = 0.1
        await self._retrying(self.ensure_group, stop)
        while not stop.is_set():
            try:
                await self.step()
                backoff = 0.1
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning(
                    "oncely: redis stream %r: %s; reconnecting",
                    self.stream,
                    describe(exc),
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)

    async def _retrying(self, fn: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await fn()
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning(
                    "oncely: redis stream %r: %s; retrying",
                    self.stream,
                    describe(exc),
                )
                await asyncio.sleep(0.5)

    async def step(self) -> int:
        """One round: reclaim idle entries when due, else read new ones; returns how many
        entries it handled."""
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self.min_idle / 2
            handled = await self.reclaim()
            if handled:
                return handled
        reply: Any = await self.client.xreadgroup(
            self.group, self.member, {self.stream: ">"}, count=self.count, block=self.block_ms
        )
        entries: list[Entry] = reply[0][1] if reply else []
        if entries:
            await self.handle(entries, [1] * len(entries))
        return len(entries)

    async def reclaim(self) -> int:
        """Take over entries idle for ``min_idle`` (of dead members, or handed back with
        :class:`Retry`) and handle them; pages past ``XAUTOCLAIM``'s scan limit."""
        cursor: Any = "0-0"
        handled = 0
        while True:
            reply: Any = await self.client.xautoclaim(
                self.stream,
                self.group,
                self.member,
                int(self.min_idle * 1000),
                start_id=cursor,
                count=self.count,
            )
            cursor, entries = reply[0], [e for e in reply[1] if e[1] is not None]
            if entries:
                await self.handle(entries, await self._attempts(entries))
                handled += len(entries)
            if _text(cursor) == "0-0":
                return handled

    async def _attempts(self, entries: Sequence[Entry]) -> list[int | None]:
        ids = [_text(e[0]) for e in entries]
        rows = await self.client.xpending_range(
            self.stream, self.group, ids[0], ids[-1], len(ids) + 64, consumername=self.member
        )
        counts = {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}
        return [counts.get(i) for i in ids]

    async def handle(
        self, entries: Sequence[Entry], attempts: Sequence[int | None]
    ) -> list[tuple[Delivery, Verdict]]:
        """Process a batch; ``XACK`` the acked and dead-lettered entries in one call. Returns
        each delivery with its verdict."""
        deliveries = [delivery_of(e, a) for e, a in zip(entries, attempts)]
        touch = asyncio.ensure_future(self._touch([e[0] for e in entries]))
        try:
            verdicts = await self.consumer.aprocess_many(deliveries)
        finally:
            touch.cancel()
        done = [e[0] for e, v in zip(entries, verdicts) if self._count(v)]
        if done:
            await self.client.xack(self.stream, self.group, *done)
        return list(zip(deliveries, verdicts))

    def _count(self, verdict: Verdict) -> bool:
        if isinstance(verdict, Ack):
            self.stats["ran" if verdict.ran else "duplicates"] += 1
            return True
        if isinstance(verdict, DeadLetter):
            self.stats["dead_lettered"] += 1
            return True
        self.stats["retried"] += 1
        return False

    async def _touch(self, ids: list[Any]) -> None:
        """Reset the idle time of the batch's entries every ``min_idle / 3`` while it runs."""
        while True:
            await asyncio.sleep(self.min_idle / 3)
            try:
                await self.client.xclaim(self.stream, self.group, self.member, 0, ids, justid=True)
            except Exception as exc:  # the next touch, or the claim's lease, covers it
                log.warning(
                    "oncely: could not touch pending entries of %r (%s)",
                    self.stream,
                    describe(exc),
                )
