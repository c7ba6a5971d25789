"""Red-team tests for oncely.messaging, against the real brokers on this machine.

Each test reproduces a fault found by trying to break the consumer as a demanding user would.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from oncely.errors import InFlightError, StoreUnavailable
from oncely.messaging import DeadLetter, Delivery, IdempotentConsumer, Inbox
from oncely.messaging.redis_streams import RedisStreamConsumer
from oncely.stores import Store

from conftest import REDIS_URL, StoreFactory

# Two different dedup ids that are not UTF-8: decoded with errors="replace" both become
# "\ufffd-id", so one of the two messages would be acked as the other's duplicate, unrun.
BINARY_IDS = (b"\xff-id", b"\xfe-id")


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store("redis")[0]


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"oncely-redteam-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name)
    client.close()


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


async def test_redis_streams_binary_dedup_ids_never_collide(
    client: redis.asyncio.Redis, stream: str, store: Store
) -> None:
    """Two entries whose ``id`` fields are different non-UTF-8 bytes are two messages: neither
    may be acked as the other's duplicate without running (a lost message)."""
    for raw_id in BINARY_IDS:
        await client.xadd(stream, {"id": raw_id, "body": b"{}"})
    ran: list[bytes] = []
    letters: list[str] = []
    consumer = IdempotentConsumer(
        lambda d: ran.append(d.raw[1][b"id"]),
        name="c",
        store=store,
        on_dead_letter=lambda d, e: letters.append(str(e)),
    )
    member = RedisStreamConsumer(consumer, client, stream, "g", "a")
    await member.ensure_group()
    assert await member.step() == 2
    assert member.stats["duplicates"] == 0, member.stats
    assert len(ran) + len(letters) == 2


class _Busy(InFlightError):
    """What a handler gets from an @idempotent function it calls whose key is held."""


def _poison(error: Exception) -> Callable[..., None]:
    def handler(*args: object) -> None:
        raise error

    return handler


HANDLER_ERRORS = [
    StoreUnavailable("the handler's own store is down"),
    _Busy("the handler's own call is in flight", retry_after=0.1),
]


@pytest.mark.parametrize("error", HANDLER_ERRORS, ids=["StoreUnavailable", "InFlightError"])
def test_a_handler_raising_an_oncely_error_is_still_a_poison_message(
    store: Store, error: Exception
) -> None:
    """A handler that keeps raising an oncely error (its own store down, its own
    @idempotent call in flight) is a failing handler: counted and dead-lettered after
    max_attempts, not retried forever as if the consumer's claim were at fault."""
    letters: list[BaseException] = []
    consumer = IdempotentConsumer(
        _poison(error),
        name=f"poison-{uuid.uuid4().hex[:8]}",
        store=store,
        max_attempts=3,
        on_dead_letter=lambda d, e: letters.append(e),
    )
    delivery = Delivery(b"{}", message_id="m-1", attempt=3)
    assert isinstance(consumer.process(delivery), DeadLetter)
    assert isinstance(asyncio.run(consumer.aprocess(delivery)), DeadLetter)
    batch = [Delivery(b"{}", message_id=f"m-{n}", attempt=3) for n in range(2, 4)]
    verdicts = asyncio.run(consumer.aprocess_many(batch))
    assert all(isinstance(v, DeadLetter) for v in verdicts), verdicts
    assert letters == [error] * 4


@pytest.mark.parametrize("error", HANDLER_ERRORS, ids=["StoreUnavailable", "InFlightError"])
def test_transactional_handler_raising_an_oncely_error_is_still_a_poison_message(
    tmp_path: Path, error: Exception
) -> None:
    """The same in the transactional mode (the inbox on SQLite)."""
    letters: list[BaseException] = []
    consumer = IdempotentConsumer(
        _poison(error),
        name="poison",
        inbox=Inbox(table="redteam_inbox"),
        connect=f"sqlite:///{tmp_path / 'inbox.db'}",
        max_attempts=3,
        on_dead_letter=lambda d, e: letters.append(e),
    )
    conn = sqlite3.connect(tmp_path / "inbox.db")
    Inbox(table="redteam_inbox").create_table(conn)
    conn.commit()
    conn.close()
    try:
        assert isinstance(consumer.process(Delivery(b"", message_id="m", attempt=3)), DeadLetter)
    finally:
        consumer.close()
    assert letters == [error]


CLI_HANDLER = "def on_message(delivery):\n    pass\n"
CLI_BAD_SETUPS = {
    "rabbitmq-unreachable": [
        "rabbitmq", "--queue", "q-redteam", "--url", "amqp://guest:guest@127.0.0.1:1/"
    ],
    "nats-unreachable": [
        "nats", "--stream", "S", "--subject", "s", "--durable", "d", "--url", "nats://127.0.0.1:1"
    ],
    "nats-no-such-stream": [
        "nats", "--stream", "NO_SUCH_STREAM_REDTEAM", "--subject", "nope.redteam", "--durable", "d"
    ],
    "redis-bad-url": ["redis", "--stream", "s", "--group", "g", "--member", "m", "--url", "x"],
    "db-unopenable": [
        "redis", "--stream", "s", "--group", "g", "--member", "m",
        "--db", "sqlite:////nonexistent-redteam/dir/x.db",
    ],
    "mqtt-unreachable": ["mqtt", "--topic", "t", "--client-id", "c", "--port", "1"],
}  # fmt: skip


@pytest.mark.parametrize("args", list(CLI_BAD_SETUPS.values()), ids=list(CLI_BAD_SETUPS))
def test_cli_unusable_broker_or_database_is_a_clear_error(tmp_path: Path, args: list[str]) -> None:
    """``oncely consume`` given a broker it cannot reach, a stream that does not exist, a bad
    URL or a database it cannot open: exit 1 with one line saying what failed, no traceback."""
    (tmp_path / "redteam_handler.py").write_text(CLI_HANDLER)
    command = [sys.executable, "-m", "oncely", "consume", *args]
    command += ["--handler", "redteam_handler:on_message", "--name", "n", "--store", "memory://"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]  # the broker library may log a line before it
    assert "Traceback" not in out.stderr and last.startswith("error: "), out.stderr
