"""Celery tasks whose effect happens once per key (``oncely[celery]``).

Celery with ``acks_late`` redelivers a task whose worker process died (and, with
``reject_on_worker_lost``, one whose prefork pool child died), and on Redis/SQS brokers runs a
long task a second time once the visibility timeout passes (DESIGN.md; celery-once, the usual
answer, is abandoned). :class:`IdempotentTask` runs each task call through an
:class:`~oncely.messaging.consumer.IdempotentConsumer` named after the task:

* the key is ``idempotency_key(*args, **kwargs)`` if the task sets it (so two sends of the same
  logical operation count once), else the task id (so a redelivery counts once). As every
  key part in oncely, ``idempotency_key`` must return a non-empty ``str``, an ``int`` or a
  ``uuid.UUID``; anything else (``None``, ``""``, a float, a dict, a list or tuple) fails the
  task with :class:`~oncely.errors.InvalidKey` (state ``FAILURE``) before it runs;
* a call whose key completed returns ``None`` without running (the effect happened already;
  its return value is not kept: use ``@idempotent`` inside the task for that);
* a call that finds the key held by another worker, or the store down, is retried by Celery
  after a delay (``self.retry``), never run alongside;
* a task that fails ``idempotency_max_attempts`` times goes to ``on_dead_letter`` and ends in
  state ``FAILURE`` with its last error, which Celery acks (``task_acks_on_failure_or_timeout``,
  on by default), so it is not redelivered.

Options (task attributes, settable in ``@app.task(base=IdempotentTask, ...)``):
``idempotency_store`` (URL or store; default ``$ONCELY_STORE``), ``idempotency_key``,
``idempotency_lease`` (seconds, renewed while the task runs), ``idempotency_ttl`` (seconds),
``idempotency_max_attempts``, ``idempotency_on_dead_letter`` ``(Delivery, error)``.

Delivery: :class:`IdempotentTask` defaults to ``acks_late=True`` and
``reject_on_worker_lost=True``. ``acks_late`` alone is not enough: when a prefork pool child
dies mid-task (SIGKILL, the OOM killer), Celery logs ``WorkerLostError`` and *acks* the message,
so the task is lost. ``reject_on_worker_lost`` makes Celery reject and requeue it instead.
Celery warns that this can run a task twice or loop on a task that kills its worker every time;
here the claim makes the redelivery safe (a key completed runs no more; a key still held by the
dead child waits until its lease ends, then runs once). A task that kills its worker every time
(e.g. out of memory) is still redelivered without end, as in plain Celery: set
``reject_on_worker_lost=False`` on such a task to have it dropped instead. Both options can be
overridden per task (``@app.task(base=IdempotentTask, acks_late=False, ...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import celery

from oncely.core.names import MAIN_MODULES, module_name
from oncely.core.text import stored_text
from oncely.errors import InvalidKey
from oncely.functions.keys import key_part
from oncely.messaging.consumer import (
    Ack,
    DeadLetter,
    DeadLetterCallback,
    Delivery,
    IdempotentConsumer,
)
from oncely.settings import seconds
from oncely.stores import Store

__all__ = ["IdempotentTask"]


def _task_space(name: str) -> str:
    """The key space of the task named ``name``: Celery names a task defined in a script run
    directly ``__main__.<function>`` unless the app has ``main=``; that module part is named
    by :func:`oncely.core.names.module_name` (so two scripts' ``process`` tasks never share
    records), or the task is refused.

    :raises ConfigurationError: a ``__main__`` task that nothing identifies: give it
        ``@app.task(name=...)`` or ``Celery(main=...)``.
    """
    module, dot, rest = name.partition(".")
    if not dot or module not in MAIN_MODULES:
        return name
    return f"{module_name(module, what=f'celery task {name!r}')}.{rest}"


def _call_key(delivery: Delivery) -> Any:
    """The consumer's dedup id of a task call: its key, or the error ``idempotency_key``
    raised for it (raised again here, so the consumer counts it as a failed attempt)."""
    error = delivery.raw["error"]
    if error is not None:
        raise error
    return delivery.message_id


class IdempotentTask(celery.Task):  # type: ignore[misc]
    """A Celery task base whose effect runs once per key; see the module documentation."""

    #: Ack only once the task returns, and requeue the message when the pool child running it
    #: dies (Celery acks it otherwise, and the task is lost): the claim makes the redelivery
    #: run at most once per key. Override per task with ``@app.task(acks_late=False)``.
    acks_late: bool = True
    reject_on_worker_lost: bool = True
    idempotency_store: str | Store | None = None
    idempotency_key: Callable[..., Any] | None = None
    idempotency_lease: float = 30.0
    idempotency_ttl: float = 7 * 24 * 3600.0
    idempotency_max_attempts: int = 5
    idempotency_on_dead_letter: DeadLetterCallback | None = None
    _oncely_consumer: IdempotentConsumer | None = None

    def _option(self, name: str) -> Any:
        """A class option as it was given (a function set as an option is not a method)."""
        for klass in type(self).__mro__:
            if name in vars(klass):
                value = vars(klass)[name]
                return value.__func__ if isinstance(value, staticmethod) else value
        return None

    def _consumer(self) -> IdempotentConsumer:
        consumer = self._oncely_consumer
        if consumer is None:
            task = self
            lease = seconds(
                self.idempotency_lease, "idempotency_lease", where=f"celery task {self.name!r}"
            )

            def handler(delivery: Delivery) -> None:
                call = delivery.raw
                call["value"] = celery.Task.__call__(task, *call["args"], **call["kwargs"])

            consumer = type(self)._oncely_consumer = IdempotentConsumer(
                handler,
                name=f"celery:{_task_space(self.name)}",
                dedup_id=_call_key,
                store=self.idempotency_store,
                lease=lease,
                ttl=self.idempotency_ttl,
                max_attempts=self.idempotency_max_attempts,
                on_dead_letter=self._option("idempotency_on_dead_letter"),
                wait_timeout=min(lease, 5.0),
            )
        return consumer

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The call's key: ``idempotency_key``'s result checked as every key part is
        (:func:`oncely.functions.keys.key_part`: a non-empty str, an int or a UUID; then text
        every store keeps), else the task id.

        :raises InvalidKey: ``idempotency_key`` returned anything else (``None``, ``""``, a
            float, a dict, a list ...): the task fails, it is not taken for a duplicate.
        """
        key_of = self._option("idempotency_key")
        if key_of is None:
            return self.request.id  # type: ignore[no-any-return]
        what = f"celery task {self.name!r}: the result of idempotency_key"
        return stored_text(key_part(key_of(*args, **kwargs), what), what)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:  # task(...) called as a function: no message at all
            return super().__call__(*args, **kwargs)
        call: dict[str, Any] = {"args": args, "kwargs": kwargs, "value": None, "error": None}
        try:
            key = self._key(args, kwargs)
        except InvalidKey:
            raise  # a key of the wrong kind: the task fails at once, before it runs
        except Exception as exc:
            # idempotency_key itself raised (a field missing from this call's arguments): a
            # failed attempt of this task, counted under its task id, retried and then
            # dead-lettered, as every consumer treats a dedup_id callable that raises
            key, call["error"] = self.request.id, exc
        delivery = Delivery(
            body=b"",
            message_id=key,
            headers={"task": self.name, "task_id": self.request.id or ""},
            attempt=(self.request.retries or 0) + 1,
            raw=call,
        )
        verdict = self._consumer().process(delivery)
        if isinstance(verdict, Ack):
            return call["value"] if verdict.ran else None
        if isinstance(verdict, DeadLetter):
            # handed to on_dead_letter: end in FAILURE with the task's last error (SUCCESS with
            # None would read as a duplicate); Celery acks a failed task, so it is not redelivered
            raise verdict.error
        raise self.retry(countdown=verdict.delay, max_retries=None)
