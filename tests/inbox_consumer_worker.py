"""A consumer process for tests/test_messaging_inbox.py: Redis Streams consumer group, effects
applied through the inbox, XACK after the commit.

``python inbox_consumer_worker.py DB_URL INBOX EFFECTS REDIS_URL STREAM GROUP DIE_AT``: takes
its pending entries first (XAUTOCLAIM: a restarted consumer finds what its dead predecessor
left), then new ones; prints ``<message id> <first>`` per delivery. With DIE_AT set it SIGKILLs
itself right after committing that message's effect, before the ack: the case that matters.
Exits 0 when nothing is left.
"""

from __future__ import annotations

import os
import signal
import sys

import redis

from oncely.messaging.inbox import Inbox, connect


def main() -> None:
    db_url, inbox_table, effects, redis_url, stream, group, die_at = sys.argv[1:8]
    client = redis.Redis.from_url(redis_url)
    conn = connect(db_url)
    inbox = Inbox(inbox_table)
    mark = "?" if db_url.startswith("sqlite") else "%s"

    def handle(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        mid = fields[b"mid"].decode()
        with inbox.receive(conn, consumer="billing", message_id=mid) as first:
            if first:
                cur = conn.cursor()
                cur.execute(f"INSERT INTO {effects} (message_id) VALUES ({mark})", (mid,))
                cur.close()
        print(mid, first, flush=True)
        if mid == die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # committed, not acked
        client.xack(stream, group, entry_id)

    _, claimed, _ = client.xautoclaim(stream, group, "c", min_idle_time=0, start_id="0-0")
    for entry_id, fields in claimed:
        handle(entry_id, fields)
    while True:
        reply = client.xreadgroup(group, "c", {stream: ">"}, count=10)
        if not reply:
            break
        for entry_id, fields in reply[0][1]:
            handle(entry_id, fields)
    conn.close()
    client.close()


if __name__ == "__main__":
    main()
