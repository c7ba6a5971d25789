"""Celery tasks whose effect runs once per key: real workers on the RabbitMQ broker, one of
them SIGKILLed under acks_late."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from messaging_storm import Storm, check_storm, run_storm, storm_ids, storm_table
from oncely.errors import InvalidKey
from oncely.messaging import Delivery
from oncely.messaging.celery import IdempotentTask

from conftest import REDIS_URL, StoreFactory, drop_redis_prefix

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


@pytest.mark.serial  # a storm on 2 s leases: a busy neighbour stalling a handler 2 s lapses one
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


@pytest.mark.parametrize(
    "bad",
    [
        {"order": "o-1", "amount": 5},  # another key order would be another key
        [1, 2],
        (1, 2),
        1.5,  # would share a key with "1.5"
        True,
        None,  # was dead-lettered: SUCCESS with result None, taken for a duplicate
        "",
        "o\x00-1",
    ],
)
def test_a_bad_idempotency_key_fails_the_task(make_store: StoreFactory, bad: Any) -> None:
    """idempotency_key must return a key part as every surface takes it (a non-empty str, an
    int or a UUID): anything else fails the task with InvalidKey (state FAILURE), the task
    never runs. Red team 5: dicts, lists, tuples and floats were turned into text (the same
    dict in another key order ran twice; 1.5 and "1.5" shared a key) and None or "" ended
    as SUCCESS with result None."""
    store = make_store("redis")[0]
    app = Celery("oncely_keys", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True
    runs: list[Any] = []

    @app.task(
        base=IdempotentTask,
        idempotency_store=store,
        idempotency_key=lambda payload: payload,
        name=f"oncely_keys.charge_{uuid.uuid4().hex[:8]}",
    )
    def charge(payload: Any) -> str:
        runs.append(payload)
        return "charged"

    result = charge.apply(args=(bad,))
    assert result.state == "FAILURE" and isinstance(result.result, InvalidKey), result.result
    assert "idempotency_key" in str(result.result)
    assert runs == []
    good = uuid.uuid4()
    for key in ("o-1", 7, good):
        assert charge.apply(args=(key,)).result == "charged"
        again = charge.apply(args=(key,))
        assert again.state == "SUCCESS" and again.result is None  # a duplicate: not run
    assert runs == ["o-1", 7, good]


def test_a_dead_lettered_task_fails_with_its_last_error(make_store: StoreFactory) -> None:
    """A task that fails idempotency_max_attempts times goes to on_dead_letter once and ends in
    state FAILURE with the task's last error: it used to end as SUCCESS with result None, what a
    duplicate looks like (red team 5)."""
    store = make_store("redis")[0]
    app = Celery("oncely_dead", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True
    runs: list[str] = []
    letters: list[tuple[str, BaseException]] = []

    @app.task(
        base=IdempotentTask,
        bind=True,
        idempotency_store=store,
        idempotency_key=lambda order: order,
        idempotency_max_attempts=2,
        idempotency_on_dead_letter=lambda d, e: letters.append((d.message_id, e)),
        name=f"oncely_dead.charge_{uuid.uuid4().hex[:8]}",
    )
    def charge(self: Any, order: str) -> str:
        runs.append(order)
        raise ValueError(f"card declined for {order}")

    order = f"o-{uuid.uuid4().hex[:8]}"
    result = charge.apply(args=(order,))
    assert result.state == "FAILURE", (result.state, result.result)
    assert (
        isinstance(result.result, ValueError) and str(result.result) == f"card declined for {order}"
    )
    assert runs == [order, order]
    assert [(key, str(error)) for key, error in letters] == [(order, f"card declined for {order}")]


def test_an_idempotency_key_that_raises_is_retried_then_dead_lettered(
    make_store: StoreFactory,
) -> None:
    """Red team 18 F5: an ``idempotency_key`` that raises (a field missing from this call's
    arguments) failed the task at once, on_dead_letter never called, max_attempts ignored. Now
    it is a failed attempt of that task as for every consumer: retried, then dead-lettered
    once, FAILURE with its error; the task body never runs."""
    store = make_store("redis")[0]
    app = Celery("oncely_keyraise", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True
    runs: list[Any] = []
    letters: list[BaseException] = []

    @app.task(
        base=IdempotentTask,
        idempotency_store=store,
        idempotency_key=lambda payload: payload["id"],
        idempotency_max_attempts=2,
        idempotency_on_dead_letter=lambda d, e: letters.append(e),
        name=f"oncely_keyraise.charge_{uuid.uuid4().hex[:8]}",
    )
    def charge(payload: Any) -> str:
        runs.append(payload)
        return "charged"

    result = charge.apply(args=({"noid": 1},))
    assert result.state == "FAILURE" and isinstance(result.result, KeyError), result.result
    assert runs == [] and len(letters) == 1 and isinstance(letters[0], KeyError)
    assert charge.apply(args=({"id": "o-1"},)).result == "charged"
    assert runs == [{"id": "o-1"}]


@pytest.mark.slow
def test_prefork_child_killed_mid_task_is_redelivered_and_runs_once(tmp_path: Path) -> None:
    """The documented setup (RabbitMQ, prefork pool, IdempotentTask with its defaults): SIGKILL
    the pool child mid-task. Celery acks a message whose child died unless the task rejects it
    on worker loss; IdempotentTask does by default, so the task is redelivered and, once the
    dead child's lease ends, completes exactly once; nothing is left in the queue."""
    import os
    import signal
    import sys
    import time
    import uuid

    tag = uuid.uuid4().hex[:10]
    queue, prefix, log = f"oncely-test-prefork-{tag}", f"oncely-test-{tag}", tmp_path / "log"
    env = {
        **os.environ,
        "ONCELY_CELERY_QUEUE": queue,
        "ONCELY_CELERY_LOG": str(log),
        "ONCELY_CELERY_PREFIX": prefix,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    celery_bin = str(Path(sys.executable).parent / "celery")
    err = (tmp_path / "worker.err").open("w")  # closed with the worker, below
    worker = subprocess.Popen(
        [celery_bin, "-A", "celery_prefork_app", "worker", "--pool", "prefork", "-c", "1",
         "-Q", queue, "--loglevel", "warning", "--without-mingle", "--without-gossip"],
        env=env, stdout=subprocess.DEVNULL, stderr=err,
    )  # fmt: skip
    sender = Celery("oncely_prefork_sender", broker=AMQP_URL)
    try:
        sender.send_task("celery_prefork_app.charge", args=[f"order-{tag}"], queue=queue)

        def lines(word: str) -> list[str]:
            text = log.read_text() if log.exists() else ""
            return [line for line in text.splitlines() if line.startswith(word)]

        deadline = time.monotonic() + 60
        while not lines("start") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lines("start"), (tmp_path / "worker.err").read_text()[-2000:]
        child = int(lines("start")[0].split()[1])
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not lines("done") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(lines("done")) == 1, (log.read_text(), (tmp_path / "worker.err").read_text())
        deadline = time.monotonic() + 30
        while queue_counts(queue) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert queue_counts(queue) == (0, 0)
        assert len(lines("done")) == 1
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        err.close()
        with sender.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        drop_redis_prefix(prefix)


def test_idempotent_task_defaults_survive_worker_loss() -> None:
    """acks_late and reject_on_worker_lost default to True and stay overridable per task."""
    app = Celery("oncely_defaults")

    @app.task(base=IdempotentTask, idempotency_store="memory://", name="oncely_defaults.a")
    def a() -> None: ...

    @app.task(base=IdempotentTask, idempotency_store="memory://", name="oncely_defaults.b",
              acks_late=False, reject_on_worker_lost=False)  # fmt: skip
    def b() -> None: ...

    task_a: Any = a
    task_b: Any = b
    assert task_a.acks_late is True and task_a.reject_on_worker_lost is True
    assert task_b.acks_late is False and task_b.reject_on_worker_lost is False
