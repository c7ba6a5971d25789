"""A Redis Streams consumer process in transactional mode that SIGKILLs itself at a chosen
point (tests/test_messaging_transactional.py).

``python transactional_kill_worker.py DB_URL INBOX EFFECTS STREAM GROUP DIE_AT WHERE``:
WHERE is ``before-commit`` (inside the handler, after its write: the transaction is open) or
``before-ack`` (the batch committed, XACK not sent). With DIE_AT empty it runs until nothing
is pending or new, then exits 0, printing ``<id> <ran>`` per acked delivery.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import redis.asyncio

from oncely.messaging import Ack, Delivery, IdempotentConsumer, Inbox
from oncely.messaging.redis_streams import RedisStreamConsumer, delivery_of

from conftest import REDIS_URL


async def main() -> None:
    db_url, inbox, effects, stream, group, die_at, where = sys.argv[1:8]
    mark = "?" if db_url.startswith("sqlite") else "%s"

    def handler(d: Delivery, conn: Any) -> None:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {effects} (message_id) VALUES ({mark})", (d.message_id,))
        cur.close()
        if d.message_id == die_at and where == "before-commit":
            os.kill(os.getpid(), signal.SIGKILL)

    class Member(RedisStreamConsumer):
        async def handle(self, entries: Any, attempts: Any) -> Any:
            deliveries = [delivery_of(e, a) for e, a in zip(entries, attempts)]
            verdicts = await self.consumer.aprocess_many(deliveries)
            if where == "before-ack" and any(d.message_id == die_at for d in deliveries):
                os.kill(os.getpid(), signal.SIGKILL)  # committed, not acked
            done = [e[0] for e, v in zip(entries, verdicts) if isinstance(v, Ack)]
            for d, v in zip(deliveries, verdicts):
                print(d.message_id, isinstance(v, Ack) and v.ran, flush=True)
            if done:
                await self.client.xack(self.stream, self.group, *done)
            return list(zip(deliveries, verdicts))

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    consumer = IdempotentConsumer(
        handler, name="billing", inbox=Inbox(inbox), connect=db_url, lease=2.0
    )
    member = Member(consumer, client, stream, group, "c", count=10, block=0.2)
    while await member.step() or (await client.xpending(stream, group))["pending"]:
        pass  # the dead predecessor's entries come back through XAUTOCLAIM after min_idle
    consumer.close()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
