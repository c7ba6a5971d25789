"""The shop's embedded queue (the default when no broker is given): a SQLite file beside the
business database, fed by the outbox relay and drained by the shipping consumer.

Delivery is at least once, as from any broker: a relay killed mid-batch publishes part of it
again, and two consumers may take the same message. The consumer's inbox (in the business
transaction) makes the effect happen once. A separate file, because the relay holds the
business database's write lock while it publishes a batch (SQLite has one writer per file).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from oncely.messaging.outbox import OutboxMessage

__all__ = ["EmbeddedQueue"]


class EmbeddedQueue:
    """``put`` (the relay's ``publish``), ``take`` and ``ack``; one connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=15.0, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 15000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "message_id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL)"
            )
            self._local.conn = conn
        return conn

    def put(self, message: OutboxMessage) -> None:
        """Enqueue ``message`` (returns once it is committed: the relay may mark it sent)."""
        self._conn().execute(
            "INSERT INTO queue (message_id, topic, payload) VALUES (?, ?, ?)",
            (message.message_id, message.topic, message.payload),
        )

    def take(self, limit: int = 50) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` queued ``(seq, message_id, payload)``, oldest first (not removed)."""
        rows = self._conn().execute(
            "SELECT seq, message_id, payload FROM queue ORDER BY seq LIMIT ?", (limit,)
        )
        return [(int(s), str(m), bytes(p)) for s, m, p in rows]

    def ack(self, seq: int) -> None:
        self._conn().execute("DELETE FROM queue WHERE seq = ?", (seq,))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
