"""Celery tasks whose effect runs once per key: real workers on the RabbitMQ broker, one of
them SIGKILLed under acks_late."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from messaging_storm import Storm, check_storm, run_storm, storm_ids, storm_table
from oncely.messaging import Delivery
from oncely.messaging.celery import IdempotentTask

from conftest import REDIS_URL, drop_redis_prefix

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def queue_counts(name: str) -> tuple[int, int]:
    """(ready, unacked) of a queue, from rabbitmqctl (no management plugin here)."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return int(parts[1]), int(parts[2])
    return 0, 0


@pytest.mark.slow
def test_storm_workers_one_killed_under_acks_late(tmp_path: Path) -> None:
    """600 tasks, 30% sent twice (same key, new task id), two worker processes, one SIGKILLed
    mid-batch (acks_late: its tasks are redelivered) and restarted, every 13th task failing
    once (Celery retry): each effect once, none lost, nothing left in the queue."""
    n = 600
    storm = Storm("celery", tmp_path, n)
    queue = f"oncely-test-celery-{storm.tag}"
    prefix = f"oncely-test-{storm.tag}"
    app = Celery("oncely_storm_sender", broker=AMQP_URL)
    app.conf.update(task_default_queue=queue, task_ignore_result=True)
    with app.connection_for_write() as conn:
        for mid in storm_ids(n):
            app.send_task("oncely_storm.apply", args=[mid], queue=queue, connection=conn)
    config = {
        "amqp": AMQP_URL,
        "queue": queue,
        "store": REDIS_URL,
        "store_options": {"prefix": prefix},
        "fail_every": 13,
        "lease": 2.0,
    }

    def drained() -> bool:
        return queue_counts(queue) == (0, 0)

    fixture = storm_table(storm)
    next(fixture)
    try:
        result = run_storm(storm, config, drained, timeout=40)
        assert queue_counts(queue) == (0, 0)
    finally:
        next(fixture, None)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        drop_redis_prefix(prefix)
    check_storm(result, n)


def test_task_options_and_direct_calls() -> None:
    """Options given to @app.task reach the consumer; a direct call (no message) just runs."""
    app = Celery("oncely_options")
    letters: list[Any] = []

    @app.task(
        base=IdempotentTask,
        idempotency_store="memory://",
        idempotency_key=lambda order: f"order-{order}",
        idempotency_on_dead_letter=lambda d, e: letters.append(d),
        idempotency_max_attempts=2,
        name="oncely_options.charge",
    )
    def charge(order: int) -> int:
        return order * 2

    assert charge(21) == 42  # called directly: no message, no claim
    task: Any = charge
    assert task._key((7,), {}) == "order-7"
    consumer = task._consumer()
    assert consumer.name == "celery:oncely_options.charge" and consumer.max_attempts == 2
    assert consumer.on_dead_letter is not None
    consumer.on_dead_letter(Delivery(b""), RuntimeError())
    assert len(letters) == 1
