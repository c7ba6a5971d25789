"""A Celery app for tests/test_messaging_celery.py: one IdempotentTask with the defaults (no
acks_late or reject_on_worker_lost given), run by a real prefork worker on RabbitMQ.

Environment: ONCELY_CELERY_QUEUE, ONCELY_CELERY_LOG (a file the task writes "start PID" and
"done PID" to), ONCELY_CELERY_PREFIX (the Redis store's key prefix). The first run of a key
blocks (the test SIGKILLs the pool child running it); a later run completes at once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from celery import Celery

from oncely.messaging.celery import IdempotentTask
from oncely.stores import open_store

LOG = Path(os.environ.get("ONCELY_CELERY_LOG", "/tmp/oncely_celery_prefork.log"))
app = Celery("celery_prefork_app", broker="amqp://guest:guest@127.0.0.1:5672//")
app.conf.update(
    task_default_queue=os.environ.get("ONCELY_CELERY_QUEUE", "oncely-celery-prefork"),
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
STORE = open_store(
    os.environ.get("ONCELY_TEST_REDIS", "redis://127.0.0.1:6379/0"),
    prefix=os.environ.get("ONCELY_CELERY_PREFIX", "oncely-test-celery-prefork"),
)


@app.task(
    base=IdempotentTask,
    name="celery_prefork_app.charge",
    idempotency_store=STORE,
    idempotency_key=lambda order: order,
    idempotency_lease=2.0,
)
def charge(order: str) -> None:
    first = not LOG.exists() or "start" not in LOG.read_text()
    with LOG.open("a") as f:
        f.write(f"start {os.getpid()} {order}\n")
    if first:
        threading.Event().wait(120)  # killed here by the test
    with LOG.open("a") as f:
        f.write(f"done {os.getpid()} {order}\n")
