"""A relay process for tests/test_messaging_inbox.py: publishes an outbox to a Redis stream.

``python outbox_relay_worker.py DB_URL TABLE REDIS_URL STREAM BATCH HANG_AFTER MARKER``: with
HANG_AFTER > 0 it stops dead after that many publishes (mid-batch, before the batch is marked
sent), writes MARKER and waits to be killed; with 0 it publishes everything and exits.
"""

from __future__ import annotations

import sys
import threading

import redis

from oncely.messaging.outbox import Outbox, OutboxMessage, Relay


def main() -> None:
    db_url, table, redis_url, stream, batch, hang_after, marker = sys.argv[1:8]
    client = redis.Redis.from_url(redis_url)
    published = 0

    def publish(message: OutboxMessage) -> None:
        nonlocal published
        client.xadd(stream, {"mid": message.message_id, "payload": message.payload})
        published += 1
        if int(hang_after) and published == int(hang_after):
            with open(marker, "w") as f:
                f.write(str(published))
            threading.Event().wait()  # the test SIGKILLs this process here, mid-batch

    relay = Relay(Outbox(table), db_url, publish=publish, batch=int(batch))
    relay.run()
    relay.close()


if __name__ == "__main__":
    main()
