"""The idempotent consumer: claim, handle, complete, then ack; written once, without broker I/O.

A broker delivers at least once: a consumer that dies after the effect and before the ack gets
the message again, and a broker may redeliver while the first delivery is still being handled
(DESIGN.md, "Messages"; mechanism 8). :class:`IdempotentConsumer` makes the *effect* happen
once per ``(consumer, dedup id)``:

1. the dedup id is read from the message (:func:`dedup_id_reader`): the broker's message id, a
   header, a field of a JSON body, or a callable. A message without one is dead-lettered with
   :class:`~oncely.errors.MessageRejected`, never run unprotected; a callable that raises is a
   failed attempt of that message (dead-lettered after ``max_attempts``);
2. the id is claimed in the record store, through the same claim engine ``@idempotent`` uses
   (:func:`oncely.functions.flow.call_flow`, driven by :mod:`oncely.functions.drivers`): one
   atomic claim, the lease renewed while the handler runs (:mod:`oncely.core.lease`), the
   record completed when it returns, released when it raises;
3. the adapter then acks. A redelivery of a completed message finds the record and is acked
   without running the handler; a redelivery that arrives while another consumer still holds
   the claim waits for it (``wait_timeout``) and is then acked, or is handed back to the broker
   for later (:class:`Retry`); it never runs the handler a second time.

The consumer returns a :class:`Verdict` and does no broker I/O itself; the adapters in
:mod:`oncely.messaging` carry it out (ack, nack-with-requeue after ``delay``, dead-letter then
ack). The decision after a failure (:meth:`IdempotentConsumer.verdict_for`) is a pure function,
shared by the sync and the async face.

Consumer identity is part of the record key (its scope is ``oncely.messaging:<name>``), so two
different consumers of one message each run once (MassTransit's inbox: unique on
``(message id, consumer)``).

**Transactional mode** (``inbox=`` and ``connect=``): instead of a record-store claim, each
message runs in one database transaction that inserts its inbox row and makes the handler's
writes (``handler(delivery, conn)``), committed before the ack; a consumer killed between its
effect and its ack never applies a message twice (:mod:`oncely.messaging.transactional`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Union

from oncely.codecs import RawCodec
from oncely.core.cancelsafe import write_through
from oncely.core.lease import AsyncRenewer, Claimed, active_claim
from oncely.core.observe import describe
from oncely.core.records import New, Record, RecordKey, Replay
from oncely.core.text import MAX_SCOPE_BYTES, stored_text, text_problem
from oncely.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    InFlightError,
    InvalidKey,
    InvalidPayload,
    LeaseLost,
    MessageRejected,
    OncelyError,
    StoreError,
)
from oncely.functions.drivers import drive, drive_async
from oncely.functions.flow import CallPolicy, call_flow
from oncely.messaging.inbox import MAX_CONSUMER_LENGTH, Inbox, inbox_message_id
from oncely.messaging.transactional import Connections, HandlerFailed
from oncely.settings import seconds, whole
from oncely.stores import Store, configured_store, shared_store

__all__ = [
    "Ack",
    "DeadLetter",
    "DedupSource",
    "Delivery",
    "IdempotentConsumer",
    "Retry",
    "Verdict",
    "dedup_id_reader",
]

log = logging.getLogger("oncely")
#: Seconds between two "store unavailable" WARNINGs of one consumer.
STORE_WARNING_INTERVAL = 10.0

#: The fingerprint of a claim with ``validate=False`` (the dedup id alone is the identity), and
#: of every claim made before payloads were fingerprinted (such records match any body).
_FINGERPRINT = "message"
#: How many dedup ids the in-process attempt counter remembers (brokers without a delivery
#: count: RabbitMQ classic queues, MQTT).
_ATTEMPT_MEMORY = 10_000
_JSON_PREFIX = "json:"


def _bytes_fingerprint(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(bytes(body)).hexdigest()


def _json_fingerprint(body: bytes) -> str | None:
    """``json:<sha256 of the canonical JSON>`` of a JSON body, as the HTTP layer compares a
    JSON request body; None if the body is not JSON."""
    from oncely.errors import InvalidPayload
    from oncely.http.fingerprint import canonical_json

    try:
        text = canonical_json(bytes(body))
    except InvalidPayload:
        return None
    return _JSON_PREFIX + hashlib.sha256(text).hexdigest()


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivered message, as an adapter hands it to the consumer (and to the handler).

    ``body``: the payload bytes; ``message_id``: the broker's message id, if any (RabbitMQ
    ``message_id``, JetStream ``Nats-Msg-Id``, the Redis Streams entry id, the Celery task id);
    ``headers``: headers or MQTT v5 user properties (str -> str; a value that is not UTF-8
    text stays ``bytes``, as does such a ``message_id``: the dedup id readers reject it as
    ``"undecodable"`` rather than decode it lossily into another message's id);
    ``attempt``: the broker's delivery count (1 for the first delivery), if the broker keeps
    one (JetStream, Redis Streams, RabbitMQ quorum queues), else None; ``raw``: the
    broker's own message object.
    """

    body: bytes
    message_id: str | bytes | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    attempt: int | None = None
    raw: Any = None

    def json(self) -> Any:
        """The body decoded as JSON (UTF-8).

        :raises MessageRejected: the body is not JSON (``reason`` is ``"undecodable"``).
        """
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise MessageRejected(
                f"the message body is not JSON ({exc}); publish JSON bodies, or read the dedup "
                "id from the message id, a header or a callable instead",
                "undecodable",
            ) from exc


@dataclass(frozen=True, slots=True)
class Ack:
    """Ack the message. ``ran``: the handler ran for this delivery (False: a duplicate of a
    completed message, acked without running)."""

    ran: bool


@dataclass(frozen=True, slots=True)
class Retry:
    """Do not ack: hand the message back to the broker to be redelivered after ``delay``
    seconds (nack with requeue, JetStream ``nak(delay)``, Redis: leave it pending). Nothing is
    lost; ``reason`` says why (store down, another consumer holds it, the handler failed)."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The message was handed to the dead-letter callback; ack it so the broker stops
    redelivering. ``error`` says why (no dedup id, undecodable body, ``max_attempts`` failures).
    """

    error: BaseException


Verdict = Union[Ack, Retry, DeadLetter]  # noqa: UP007 - a runtime alias, also for Python 3.10
DedupSource = Union[str, Callable[[Delivery], Any]]  # noqa: UP007
Handler = Callable[..., Any]  # (Delivery) -> Any; (Delivery, conn) -> Any with inbox=
DeadLetterCallback = Callable[[Delivery, BaseException], Any]


def _json_kind(value: Any) -> str:
    """What ``value`` is, in the words of the JSON it came from (``null``, not NoneType; a
    float's value, so NaN and Infinity are named)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, float):
        return f"the number {value!r}" if math.isfinite(value) else f"the non-number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _text_id(value: Any, where: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageRejected(
                f"the dedup id in {where} is not UTF-8 text", "undecodable"
            ) from exc
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise MessageRejected(
            f"the message has no usable dedup id in {where} (found {_json_kind(value)}); "
            "every message needs a stable id set by its publisher",
            "missing-dedup-id",
        )
    text = str(value)
    if not text:
        raise MessageRejected(
            f"the message has an empty dedup id in {where}; the publisher must set one",
            "missing-dedup-id",
        )
    problem = text_problem(text)
    if problem is not None:
        # A poison message, not an outage: no store can record this id, on any delivery.
        raise MessageRejected(
            f"the dedup id in {where} ({text[:60]!r}) {problem}; the publisher must set an id "
            "of printable text",
            "invalid-dedup-id",
        )
    return text


def _lookup_header(headers: Mapping[str, Any], name: str) -> Any:
    if name in headers:
        return headers[name]
    lowered = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return None


def dedup_id_reader(source: DedupSource) -> Callable[[Delivery], str]:
    """A function reading a message's dedup id, from ``source``:

    * ``"message_id"``: the broker's message id (:attr:`Delivery.message_id`);
    * ``"header:<name>"``: a header or MQTT v5 user property (name matched case-insensitively);
    * ``"body:<dotted.path>"``: a field of the JSON body (``"body:order.id"``);
    * a callable ``(Delivery) -> str``.

    The reader raises :class:`~oncely.errors.MessageRejected` when the id is absent, empty, not
    text or an integer, or the body is not JSON.

    :raises ConfigurationError: ``source`` is none of the above.
    """
    if callable(source):
        fn = source

        def from_callable(delivery: Delivery) -> str:
            return _text_id(fn(delivery), "the dedup_id callable's result")

        return from_callable
    if not isinstance(source, str):
        raise ConfigurationError(f"dedup_id must be a string or a callable, not {source!r}")
    if source == "message_id":
        return lambda d: _text_id(d.message_id, "the broker's message id")
    kind, _, name = source.partition(":")
    if kind == "header" and name:
        return lambda d: _text_id(_lookup_header(d.headers, name), f"header {name!r}")
    if kind == "body" and name:
        path = name.split(".")

        def from_body(delivery: Delivery) -> str:
            value: Any = delivery.json()
            for depth, part in enumerate(path):
                if not isinstance(value, dict) or part not in value:
                    outer = "the body" if not depth else f"body field {'.'.join(path[:depth])!r}"
                    what = (
                        f"{outer} has no field {part!r}"
                        if isinstance(value, dict)
                        else f"{outer} is {_json_kind(value)}, not an object with field {part!r}"
                    )
                    raise MessageRejected(
                        f"the message has no dedup id at body field {name!r}: {what}; every "
                        "message needs a stable id set by its publisher",
                        "missing-dedup-id",
                    )
                value = value[part]
            return _text_id(value, f"body field {name!r}")

        return from_body
    raise ConfigurationError(
        f"dedup_id {source!r} is not understood; use 'message_id', 'header:<name>', "
        "'body:<dotted.path>' or a callable"
    )


#: The scope of a consumer's records: this and its name.
_SCOPE_PREFIX: Final = "oncely.messaging:"


def _shown(error: BaseException) -> str:
    """``repr(error)``, or its type's name when its ``__repr__`` raises (a verdict is returned
    whatever the user's exception does)."""
    try:
        return repr(error)
    except Exception:
        return f"<{type(error).__qualname__}: repr() failed>"


def _surrogate_id(delivery: Delivery) -> str:
    """The key a message whose dedup id cannot be read is counted under (its failed attempts,
    its exhausted state): a digest of its broker message id and body, the same at every
    redelivery. It starts with a NUL, which no dedup id holds (they are printable text), so it
    never shares a count with a real dedup id."""
    digest = hashlib.sha256(repr(delivery.message_id).encode("utf-8", "backslashreplace"))
    digest.update(b"\0")
    digest.update(bytes(delivery.body))
    return "\0unread:" + digest.hexdigest()


@dataclass(frozen=True, slots=True)
class _Unread:
    """A delivery whose dedup id could not be read: ``verdict`` (a :class:`Retry`, or a
    :class:`DeadLetter` still to hand to the callback) and the key its attempts are counted
    under (:func:`_surrogate_id`)."""

    verdict: Verdict
    surrogate: str


class _Attempts:
    """Per dedup id, in this process: failed attempts (for brokers that count no deliveries)
    and redeliveries answered :class:`Retry` because another consumer held the claim (they
    raised the broker's delivery count without running the handler, so they are subtracted
    from it: attempts count handler runs only)."""

    def __init__(self, size: int = _ATTEMPT_MEMORY) -> None:
        self._counts: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        #: (dedup id, fingerprint) -> error of a message that used up ``max_attempts`` and
        #: whose dead-letter callback has not succeeded yet: its redeliveries go straight to
        #: the dead-letter step, the handler never runs again. Keyed by the body as well, so
        #: another body under the same dedup id (``validate=True``) does not evict it.
        self._exhausted: collections.OrderedDict[tuple[str, str], BaseException] = (
            collections.OrderedDict()
        )
        self._size = size
        self._mutex = threading.Lock()

    def _bump(self, dedup_id: str, which: int) -> list[int]:
        with self._mutex:
            counts = self._counts.pop(dedup_id, None) or [0, 0]
            counts[which] += 1
            self._counts[dedup_id] = counts
            while len(self._counts) > self._size:
                self._counts.popitem(last=False)
            return counts

    def failed(self, dedup_id: str) -> tuple[int, int]:
        """Count a failed attempt; returns (failed attempts, held-claim redeliveries)."""
        failed, held = self._bump(dedup_id, 0)
        return failed, held

    def held(self, dedup_id: str) -> None:
        """Count a redelivery handed back because another consumer held the claim."""
        self._bump(dedup_id, 1)

    def forget(self, dedup_id: str) -> None:
        with self._mutex:
            self._counts.pop(dedup_id, None)

    def exhaust(self, dedup_id: str, fingerprint: str, error: BaseException) -> None:
        """The message used up its attempts: forget its counts, remember it (its dedup id and
        body) until its dead-letter callback succeeds (:meth:`settled`)."""
        with self._mutex:
            self._counts.pop(dedup_id, None)
            self._exhausted.pop((dedup_id, fingerprint), None)
            self._exhausted[(dedup_id, fingerprint)] = error
            while len(self._exhausted) > self._size:
                self._exhausted.popitem(last=False)

    def any_exhausted(self) -> bool:
        """Whether any message waits for its dead-letter step (a read without the lock: a
        message exhausted by another thread this instant is caught by its next delivery)."""
        return bool(self._exhausted)

    def exhausted(self, dedup_id: str, fingerprint: str) -> BaseException | None:
        """The error of an exhausted message with this dedup id and body, if any."""
        with self._mutex:
            return self._exhausted.get((dedup_id, fingerprint))

    def settled(self, dedup_id: str, fingerprint: str) -> None:
        """The dead-letter step of ``dedup_id`` with this body succeeded."""
        with self._mutex:
            self._exhausted.pop((dedup_id, fingerprint), None)


class IdempotentConsumer:
    """A message handler that applies each message's effect once per ``(name, dedup id)``.

    :param handler: ``(Delivery) -> Any``, sync or ``async``; its return value is ignored. It
        may read its claim's fence with :func:`oncely.current_claim` (pass it to fenced writes).
        In transactional mode it is ``(Delivery, conn) -> Any`` and writes through ``conn``.
    :param name: the consumer's identity (part of the record key; two consumers with different
        names each handle a message once). Keep it stable across deploys.
    :param store: a store URL or object (``$ONCELY_STORE``, default ``sqlite:///oncely.db``).
    :param dedup_id: where the dedup id comes from (see :func:`dedup_id_reader`).
    :param lease: seconds a claim holds before another consumer may take it over; renewed every
        ``lease / 3`` while the handler runs (:mod:`oncely.core.lease`).
    :param ttl: seconds a completed message is remembered (redeliveries within it are acked
        without running); default 7 days.
    :param max_attempts: after this many failed attempts the message goes to
        ``on_dead_letter`` and is acked. An attempt is a run of the handler: the broker's
        delivery count when it keeps one, less the redeliveries this process handed back
        unrun because another consumer held the claim; else a count in this process. Set it
        to ``0`` to retry forever.
    :param on_dead_letter: ``(Delivery, error) -> Any``, sync or async: called for a poison
        message, a message with no dedup id or an undecodable body. If it raises, the message
        is not acked (:class:`Retry`). Default: log the message at ERROR.
    :param wait_timeout: seconds a redelivery waits for another consumer that holds the claim
        before it is handed back to the broker (:class:`Retry`).
    :param retry_delay: seconds before a retried message comes back (store down, handler
        failed); handler failures back off as ``retry_delay * 2 ** (attempt - 1)``, at most
        ``max_retry_delay``.
    :param inbox: an :class:`~oncely.messaging.inbox.Inbox`: the transactional mode. Each
        message runs in one transaction on a connection from ``connect``: the inbox row
        ``(name, dedup id)`` is inserted, the handler (if the row is new) writes through the
        same connection, then both commit and only then the message is acked. No record store
        is used (``store`` must be left out): the row is the claim and the in-flight guard (a
        concurrent delivery waits on it until the first transaction ends). See
        ``docs/messaging.md``, "Transactional mode".
    :param connect: with ``inbox``: a database URL (``sqlite:///…``, ``postgresql://…``,
        ``mysql://…``) or a callable returning a connection that
        :func:`oncely.sql.connections.adapt` takes (sqlite3, psycopg 3, PyMySQL, aiomysql,
        SQLAlchemy ``Connection``/``AsyncConnection``); sync for a sync handler, async (the
        callable may be ``async``) for an async one. The consumer keeps the connections and
        closes them in :meth:`close`.
    :param pool_size: with ``inbox``: at most this many connections kept idle (and, on the
        async face, in use at once).
    :param validate: True (default): the message body is fingerprinted (SHA-256) with its
        claim, so a *different* body under a dedup id already used is not taken for a
        duplicate: it is dead-lettered with :class:`~oncely.errors.MessageRejected` (``reason``
        ``"mismatch"``), logged at WARNING and counted as a claim ``mismatch``
        (``oncely_mismatches_total``), never acked silently; a redelivery of the same body is
        a plain duplicate. The body is compared **byte for byte**: the same JSON re-sent with
        another member order, spacing or number spelling is a different body (a mismatch).
        ``"json"``: a body that is JSON is compared by its value instead, as the HTTP layer
        compares a JSON request body (:func:`oncely.http.fingerprint.canonical_json`: member
        order, whitespace, string escapes and number spelling do not count); a body that is
        not JSON is still compared byte for byte. False: the dedup id alone is the identity
        (any body under it is a duplicate). A record is compared in the mode that claimed it,
        so changing ``validate`` turns no redelivery of an old message into a mismatch. The
        transactional mode (``inbox=``) checks no payload: the inbox row holds no fingerprint.
    :raises ConfigurationError: a bad setting, named in the message.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        store: str | Store | None = None,
        dedup_id: DedupSource = "message_id",
        lease: float = 30.0,
        ttl: float = 7 * 24 * 3600.0,
        max_attempts: int = 5,
        on_dead_letter: DeadLetterCallback | None = None,
        wait_timeout: float = 5.0,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
        inbox: Inbox | None = None,
        connect: str | Callable[[], Any] | None = None,
        pool_size: int = 10,
        validate: bool | Literal["json"] = True,
    ) -> None:
        if not callable(handler):
            raise ConfigurationError(f"handler must be callable, not {handler!r}")
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(
                "name must be a non-empty string: the consumer's identity, part of every key"
            )
        # The name is part of every record's scope: one no store keeps as text (a NUL, a lone
        # surrogate, more bytes than the MySQL store's scope column) is refused now, not at
        # every message (a DataError, Retry forever).
        stored_text(
            name, "IdempotentConsumer: name=", ConfigurationError,
            most=MAX_SCOPE_BYTES - len(_SCOPE_PREFIX),
        )  # fmt: skip
        where = f"IdempotentConsumer {name!r}"
        lease = seconds(lease, "lease", where=where)
        ttl = seconds(ttl, "ttl", where=where)
        if ttl < lease:
            raise ConfigurationError(
                f"{where}: ttl={ttl:g} is shorter than lease={lease:g}: a completed message "
                "must be remembered at least as long as a claim holds (ttl >= lease)"
            )
        retry_delay = seconds(retry_delay, "retry_delay", where=where)
        max_retry_delay = seconds(max_retry_delay, "max_retry_delay", where=where)
        if retry_delay > max_retry_delay:
            raise ConfigurationError(
                f"{where}: retry_delay={retry_delay:g} is above max_retry_delay="
                f"{max_retry_delay:g}; raise max_retry_delay or lower retry_delay"
            )
        wait_timeout = seconds(wait_timeout, "wait_timeout", where=where, above=False)
        max_attempts = whole(max_attempts, "max_attempts", where=where)  # 0: retry forever
        pool_size = whole(pool_size, "pool_size", where=where, minimum=1)
        if not isinstance(validate, bool) and validate != "json":
            raise ConfigurationError(f"validate must be True, False or 'json', not {validate!r}")
        if on_dead_letter is not None and not callable(on_dead_letter):
            raise ConfigurationError(
                f"{where}: on_dead_letter must be a callable (delivery, error) -> Any or None, "
                f"not {on_dead_letter!r}"
            )
        self.validate = validate
        self.handler = handler
        self.name = name
        self.scope = _SCOPE_PREFIX + name
        self.read_id = dedup_id_reader(dedup_id)
        self.lease = float(lease)
        self.max_attempts = max_attempts
        self.on_dead_letter = on_dead_letter
        self.retry_delay = float(retry_delay)
        self.max_retry_delay = float(max_retry_delay)
        self.is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004
        )
        self.inbox = inbox
        self.connections: Connections | None = None
        if inbox is not None or connect is not None:
            if not isinstance(inbox, Inbox) or connect is None:
                raise ConfigurationError(
                    "the transactional mode takes both inbox=Inbox(...) and connect=<database "
                    "URL or a callable returning a connection>"
                )
            if store is not None:
                raise ConfigurationError(
                    "inbox= and store= exclude each other: in the transactional mode the inbox "
                    "row, committed with the handler's writes, is the claim; leave store out"
                )
            if len(name) > MAX_CONSUMER_LENGTH:  # the inbox's consumer column
                raise ConfigurationError(
                    f"{where}: name= has {len(name)} characters; the inbox keeps consumer names "
                    f"of at most {MAX_CONSUMER_LENGTH}"
                )
            self.connections = Connections(connect, pool_size, self.is_async)
        self._store_spec = (
            None
            if self.connections is not None
            else configured_store(store, f"IdempotentConsumer {name!r}")
        )
        self._store: Store | None = None
        self._attempts = _Attempts()
        self._store_warned = -float("inf")  # time.monotonic() of the last "store down" WARNING
        self.policy = CallPolicy(
            name=f"consumer {name!r}",
            codec=RawCodec(),
            return_type=bytes,
            ttl=float(ttl),
            lease=float(lease),
            on_duplicate="wait" if wait_timeout > 0 else "raise",
            wait_timeout=float(wait_timeout),
            store_errors=(),
            fail_open=False,
            cache=None,
        )

    def __repr__(self) -> str:
        return f"IdempotentConsumer(name={self.name!r})"

    @property
    def transactional(self) -> bool:
        """True in the transactional mode (``inbox=``)."""
        return self.connections is not None

    @property
    def store(self) -> Store:
        """The store, opened on first use.

        :raises ConfigurationError: in the transactional mode (it has no store).
        """
        if self._store is None:
            if self._store_spec is None:
                raise ConfigurationError(
                    f"consumer {self.name!r} is transactional (inbox=): it uses no record store"
                )
            self._store = shared_store(self._store_spec)
        return self._store

    def close(self) -> None:
        """Close the transactional mode's idle connections (nothing to do otherwise)."""
        if self.connections is not None:
            self.connections.close()

    async def aclose(self) -> None:
        """The async face of :meth:`close` (closes async connections on the running loop)."""
        if self.connections is not None:
            await self.connections.aclose()

    def key_for(self, dedup_id: str) -> RecordKey:
        """The record key of a dedup id for this consumer."""
        return RecordKey.of(self.scope, dedup_id)

    def fingerprint_of(self, delivery: Delivery) -> str:
        """The claim's fingerprint: ``sha256:<hex of the body>`` with ``validate=True``;
        ``json:<hex of the canonical JSON>`` with ``validate="json"`` and a JSON body; else
        the same constant for every message."""
        if not self.validate:
            return _FINGERPRINT
        if self.validate == "json":
            by_value = _json_fingerprint(delivery.body)
            if by_value is not None:
                return by_value
        return _bytes_fingerprint(delivery.body)

    def _matches(self, delivery: Delivery, fingerprint: str) -> bool:
        """Whether a stored record's ``fingerprint`` matches ``delivery`` in the mode that
        claimed the record (bytes, JSON value, or none), whatever this consumer's mode."""
        if fingerprint == _FINGERPRINT or not self.validate:
            return True
        if fingerprint.startswith(_JSON_PREFIX):
            return _json_fingerprint(delivery.body) == fingerprint
        return _bytes_fingerprint(delivery.body) == fingerprint

    def _mismatch(
        self, delivery: Delivery, dedup_id: str, error: BaseException, found: Record | None
    ) -> Verdict:
        """The verdict for a claim refused as a mismatch; ``found``: the stored record. A record
        claimed before bodies were fingerprinted matches any body (a duplicate, or held), one
        claimed in another ``validate`` mode is compared in that mode (:meth:`_matches`)."""
        if found is not None and self._matches(delivery, found.fingerprint):
            if found.status == "completed":
                return Ack(ran=False)
            return Retry(self.retry_delay, "another consumer holds this message's claim")
        log.warning(
            "oncely: consumer %r got message %r with dedup id %r already used for another "
            "body; dead-lettered (reason 'mismatch'), not acked as a duplicate",
            self.name,
            delivery.message_id,
            dedup_id,
        )
        rejected = MessageRejected(
            f"dedup id {dedup_id!r} was already used by consumer {self.name!r} for a message "
            "with another body: a different message under a used dedup id is not a duplicate. "
            "Give every message its own dedup id (or validate='json' if a publisher may "
            "re-serialize the same JSON, validate=False if bodies may differ)",
            "mismatch",
        )
        rejected.__cause__ = error
        return DeadLetter(rejected)

    # -- the decision after a handled message (pure) -------------------------------------------
    def verdict_for(
        self, delivery: Delivery, dedup_id: str, error: BaseException | None, ran: bool
    ) -> Verdict:
        """What to tell the broker once the claim flow ended (no I/O, no callback).

        ``error``: what the flow raised (None: the handler ran now, or the message was already
        done; a :class:`~oncely.messaging.transactional.HandlerFailed`: the handler itself
        raised, a failed attempt whatever the type of its error); ``ran``: whether the handler
        ran for this delivery. A :class:`DeadLetter` here
        still has to be handed to the callback (:meth:`process` does it).
        """
        if error is None:
            self._attempts.forget(dedup_id)
            return Ack(ran=ran)
        if isinstance(error, HandlerFailed):
            # The handler itself raised: a failed attempt, whatever it raised (an oncely error
            # from the handler's own store or @idempotent call is not the consumer's claim).
            return self._failed_attempt(delivery, dedup_id, error.error)
        if isinstance(error, InFlightError):
            if delivery.attempt is not None:  # not a failed attempt: subtracted later
                self._attempts.held(dedup_id)
            return Retry(
                max(error.retry_after or 0.0, self.retry_delay),
                "another consumer holds this message's claim; redeliver after it finishes",
            )
        if isinstance(error, StoreError):
            self._warn_store_down(error)
            return Retry(self.retry_delay, f"the store is unavailable ({error}); not acked")
        if isinstance(error, LeaseLost):
            # The handler ran, but its claim was lost before completion: a newer holder owns
            # the record. Redeliver: the redelivery is acked once that holder completes.
            return Retry(self.retry_delay, str(error))
        if not ran and isinstance(error, (InvalidKey, InvalidPayload)):
            # refused for this message's own content: the same message is refused again at
            # every redelivery, so it is a failed attempt (dead-lettered after max_attempts),
            # never a retry forever
            log.error(
                "oncely: consumer %r cannot take message %r: %s",
                self.name,
                delivery.message_id,
                describe(error),
            )
            return self._failed_attempt(delivery, dedup_id, error)
        if not ran:  # a failure of the flow itself (e.g. a broken store reply): try again
            return Retry(self.retry_delay, f"{type(error).__name__}: {error}")
        return self._failed_attempt(delivery, dedup_id, error)

    def _failed_attempt(self, delivery: Delivery, dedup_id: str, error: BaseException) -> Verdict:
        """A failed attempt: retried with backoff, or dead-lettered after ``max_attempts``."""
        counted, held = self._attempts.failed(dedup_id)
        # the broker's count less the redeliveries this process handed back unrun because
        # another consumer held the claim; never less than the failures counted here
        attempt = counted if delivery.attempt is None else max(counted, delivery.attempt - held)
        if self.max_attempts and attempt >= self.max_attempts:
            self._attempts.exhaust(dedup_id, self.fingerprint_of(delivery), error)
            return DeadLetter(error)
        delay = min(self.retry_delay * 2 ** max(attempt - 1, 0), self.max_retry_delay)
        return Retry(delay, f"the handler failed (attempt {attempt}): {_shown(error)}")

    def _read(self, delivery: Delivery) -> str | DeadLetter | _Unread:
        """The delivery's dedup id; a :class:`DeadLetter` if the message has none (the reader
        rejected it); an :class:`_Unread` if reading it raised anything else (a ``dedup_id``
        callable's own error, e.g. ``d.json()["id"]`` on a body without ``id``): a failed
        attempt of this message, retried and dead-lettered after ``max_attempts``."""
        try:
            return self.read_id(delivery)
        except MessageRejected as exc:
            return DeadLetter(exc)
        except Exception as exc:
            log.error(
                "oncely: consumer %r cannot read the dedup id of message %r: %s",
                self.name,
                delivery.message_id,
                describe(exc),
            )
            surrogate = _surrogate_id(delivery)
            exhausted = self._exhausted(delivery, surrogate)
            if exhausted is not None:
                return _Unread(exhausted, surrogate)
            return _Unread(self._failed_attempt(delivery, surrogate, exc), surrogate)

    def _guarded(self, delivery: Delivery, error: Exception) -> _Unread:
        """The verdict when deciding a delivery's outcome raised (a bug, or a user callable's
        error that got past the narrower handling): logged at ERROR, a failed attempt of this
        message (dead-lettered after ``max_attempts``, acked), never an exception out of
        :meth:`process` that would kill a broker adapter's loop or leave a batch unacked. The
        dead-letter step itself is the caller's (sync or async callback)."""
        log.error(
            "oncely: consumer %r failed to decide message %r: %s",
            self.name,
            delivery.message_id,
            describe(error),
            exc_info=error,
        )
        surrogate = ""
        try:
            surrogate = _surrogate_id(delivery)
            return _Unread(self._failed_attempt(delivery, surrogate, error), surrogate)
        except Exception as exc:  # the attempt count itself failed (the body cannot be hashed)
            retry = Retry(self.retry_delay, f"the message could not be decided: {_shown(exc)}")
            return _Unread(retry, surrogate)

    def _exhausted(self, delivery: Delivery, dedup_id: str) -> DeadLetter | None:
        """A redelivery of a message that used up ``max_attempts`` but whose dead-letter
        callback raised: it goes to the dead-letter step again, without running the handler
        (the attempt count does not start over)."""
        if not self._attempts.any_exhausted():  # the usual case: no body hashed for it
            return None
        error = self._attempts.exhausted(dedup_id, self.fingerprint_of(delivery))
        return None if error is None else DeadLetter(error)

    # -- sync face ---------------------------------------------------------------------------------
    def process(self, delivery: Delivery) -> Verdict:
        """Handle one delivery with a sync handler; return what the adapter must do. An error of
        a user callable (``dedup_id``, the handler, ``on_dead_letter``) or any other error while
        deciding is a verdict of this message (a failed attempt, logged at ERROR), never raised.

        :raises ConfigurationError: the handler is ``async`` (use :meth:`aprocess`).
        """
        if self.is_async:
            raise ConfigurationError(
                f"consumer {self.name!r} has an async handler; call aprocess() on an event loop"
            )
        try:
            return self._process(delivery)
        except Exception as exc:  # never out of here: it would kill the adapter's loop
            return self._unread(delivery, self._guarded(delivery, exc))

    def _unread(self, delivery: Delivery, unread: _Unread) -> Verdict:
        """The verdict of an :class:`_Unread`, its dead-letter step taken (sync face)."""
        if isinstance(unread.verdict, DeadLetter):
            try:
                return self._dead_letter(delivery, unread.verdict, unread.surrogate or None)
            except Exception as exc:  # its body cannot be hashed: not acked
                return Retry(self.retry_delay, f"the message could not be decided: {_shown(exc)}")
        return unread.verdict

    async def _aunread(self, delivery: Delivery, unread: _Unread) -> Verdict:
        """:meth:`_unread` on the event loop."""
        if isinstance(unread.verdict, DeadLetter):
            try:
                return await self._adead_letter(delivery, unread.verdict, unread.surrogate or None)
            except Exception as exc:  # its body cannot be hashed: not acked
                return Retry(self.retry_delay, f"the message could not be decided: {_shown(exc)}")
        return unread.verdict

    def _process(self, delivery: Delivery) -> Verdict:
        read = self._read(delivery)
        if isinstance(read, DeadLetter):
            return self._dead_letter(delivery, read)
        if isinstance(read, _Unread):
            return self._unread(delivery, read)
        exhausted = self._exhausted(delivery, read)
        if exhausted is not None:
            return self._dead_letter(delivery, exhausted, read)
        if self.connections is not None:
            verdict = self._verdict_of_transaction(delivery, read, self._transact, None)
            if isinstance(verdict, DeadLetter):
                return self._dead_letter(delivery, verdict, read)
            return verdict
        key = self.key_for(read)
        ran = False

        def call() -> bytes:
            nonlocal ran
            ran = True
            try:
                self.handler(delivery)
            except Exception as exc:  # the handler's error, told apart from the flow's own
                raise HandlerFailed(exc) from exc
            return b""

        error: BaseException | None = None
        fingerprint = self.fingerprint_of(delivery)
        try:
            drive(
                call_flow(self.policy, key, fingerprint),
                self.store,
                key,
                fingerprint,
                self.policy,
                call,
                None,
            )
        except Exception as exc:
            error = exc
        if isinstance(error, IdempotencyKeyMismatch):
            try:
                found = self.store.get(key)
            except StoreError as exc:
                return Retry(self.retry_delay, f"the store is unavailable ({exc}); not acked")
            verdict = self._mismatch(delivery, read, error, found)
        else:
            verdict = self.verdict_for(delivery, read, error, ran)
        if isinstance(verdict, DeadLetter):
            return self._dead_letter(delivery, verdict, read)
        return verdict

    def process_many(self, deliveries: Iterable[Delivery]) -> list[Verdict]:
        """:meth:`process` each delivery, in order."""
        return [self.process(d) for d in deliveries]

    def _dead_letter(
        self, delivery: Delivery, verdict: DeadLetter, dedup_id: str | None = None
    ) -> Verdict:
        """Hand ``verdict`` to the dead-letter callback; :class:`Retry` if it raises (the
        message is not acked; an exhausted message stays exhausted, its handler does not run
        again). ``dedup_id``: the message's, once read."""
        try:
            if self.on_dead_letter is None:
                self._log_dead_letter(delivery, verdict.error)
            else:
                result = self.on_dead_letter(delivery, verdict.error)
                if inspect.isawaitable(result):
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()  # never awaited: no "coroutine was never awaited" warning
                    raise ConfigurationError(
                        "on_dead_letter is async; use aprocess() (or a sync callback)"
                    )
        except Exception as exc:
            return self._callback_failed(exc)
        if dedup_id is not None:
            self._attempts.settled(dedup_id, self.fingerprint_of(delivery))
        return verdict

    # -- async face --------------------------------------------------------------------------------
    async def aprocess(self, delivery: Delivery) -> Verdict:
        """Handle one delivery on the running event loop (a sync handler runs in a thread,
        with its claim visible to :func:`oncely.current_claim`). Raises nothing but
        :class:`BaseException` (a cancellation): an error of a user callable (``dedup_id``,
        the handler, ``on_dead_letter``) is a verdict of this message."""
        try:
            return await self._aprocess(delivery)
        except Exception as exc:  # never out of here: it would kill the adapter's loop
            return await self._aunread(delivery, self._guarded(delivery, exc))

    async def _aprocess(self, delivery: Delivery) -> Verdict:
        read = self._read(delivery)
        if isinstance(read, DeadLetter):
            return await self._adead_letter(delivery, read)
        if isinstance(read, _Unread):
            return await self._aunread(delivery, read)
        exhausted = self._exhausted(delivery, read)
        if exhausted is not None:
            return await self._adead_letter(delivery, exhausted, read)
        if self.connections is not None:
            try:
                if self.is_async:
                    outcome: BaseException | bool = await self._atransact(delivery, read)
                else:
                    async with self.connections.slot():
                        outcome = await asyncio.to_thread(self._transact, delivery, read)
            except Exception as exc:
                outcome = exc
            verdict = self._verdict_of_transaction(delivery, read, None, outcome)
            if isinstance(verdict, DeadLetter):
                return await self._adead_letter(delivery, verdict, read)
            return verdict
        key = self.key_for(read)
        ran = False
        handler = self.handler

        async def call() -> bytes:
            nonlocal ran
            ran = True
            try:
                if self.is_async:
                    await handler(delivery)
                else:
                    await asyncio.to_thread(handler, delivery)
            except Exception as exc:  # the handler's error, told apart from the flow's own
                raise HandlerFailed(exc) from exc
            return b""

        error: BaseException | None = None
        fingerprint = self.fingerprint_of(delivery)
        try:
            await drive_async(
                call_flow(self.policy, key, fingerprint),
                self.store,
                key,
                fingerprint,
                self.policy,
                call,
                None,
            )
        except Exception as exc:
            error = exc
        if isinstance(error, IdempotencyKeyMismatch):
            try:
                found = await self.store.aget(key)
            except StoreError as exc:
                return Retry(self.retry_delay, f"the store is unavailable ({exc}); not acked")
            verdict = self._mismatch(delivery, read, error, found)
        else:
            verdict = self.verdict_for(delivery, read, error, ran)
        if isinstance(verdict, DeadLetter):
            return await self._adead_letter(delivery, verdict, read)
        return verdict

    async def aprocess_many(self, deliveries: Iterable[Delivery]) -> list[Verdict]:
        """Handle a broker's batch; verdicts in delivery order.

        On a store with a batch face (:func:`oncely.messaging.batch.batch_claims`: Redis) the
        batch is claimed in one round trip and its handled messages completed in one more;
        the handlers run concurrently, each lease renewed while it runs. A message whose claim
        is held by another consumer takes the one-message path (:meth:`aprocess`: it waits for
        the holder). On other stores each message goes through :meth:`aprocess`, concurrently.

        On every store (and in the transactional mode) a dedup id repeated inside the batch is
        claimed once: an identical copy (same body, or any body with ``validate=False`` or in
        the transactional mode) shares the first one's verdict (acked as a duplicate once the
        first is acked or dead-lettered; a copy of a message dead-lettered as a mismatch is
        dead-lettered too). A *different* body under a dedup id the batch already holds is
        not a copy: it is handled on its own (:meth:`aprocess`) once the first one settled, so
        it gets the verdict it would get in the next batch (dead-lettered as a ``mismatch``
        once the first one completed), the same as :meth:`process` gives one at a time.
        """
        batch = list(deliveries)
        verdicts: list[Verdict | None] = [None] * len(batch)
        ids: dict[int, str] = {}  # the first delivery of each dedup id -> the id
        first: dict[str, int] = {}
        prints_of: dict[int, str] = {}
        copies: list[tuple[int, int]] = []
        later: list[int] = []  # same dedup id, another body: one by one once the batch is done
        by_body = self.connections is None  # the transactional mode checks no payload
        for i, delivery in enumerate(batch):
            try:
                read = self._read(delivery)
                if isinstance(read, DeadLetter):
                    verdicts[i] = await self._adead_letter(delivery, read)
                    continue
                if isinstance(read, _Unread):  # this message's failed attempt, not the batch's
                    verdicts[i] = await self._aunread(delivery, read)
                    continue
                exhausted = self._exhausted(delivery, read)
                if exhausted is not None:
                    verdicts[i] = await self._adead_letter(delivery, exhausted, read)
                    continue
                prints_of[i] = self.fingerprint_of(delivery) if by_body else _FINGERPRINT
            except Exception as exc:  # one message's failure is that message's verdict
                verdicts[i] = await self._aunread(delivery, self._guarded(delivery, exc))
                continue
            if read not in first:
                first[read] = i
                ids[i] = read
            elif prints_of[i] == prints_of[first[read]]:
                copies.append((i, first[read]))
            else:
                later.append(i)
        claims = self._batch_face() if by_body and len(ids) > 1 else None
        if claims is None:
            order = list(ids)
            for i, verdict in zip(
                order, await asyncio.gather(*(self.aprocess(batch[i]) for i in order))
            ):
                verdicts[i] = verdict
        else:
            try:
                await self._abatch(claims, batch, ids, prints_of, verdicts)
            except Exception as exc:  # the messages it left undecided are retried (not acked)
                log.error(
                    "oncely: consumer %r: a batch failed (%s); its undecided messages are retried",
                    self.name,
                    describe(exc),
                    exc_info=exc,
                )
        for i, j in copies:
            verdicts[i] = await self._copy_verdict(batch[i], verdicts[j])
        for i in later:  # in delivery order: each is claimed after the ones before it settled
            verdicts[i] = await self.aprocess(batch[i])
        return [v if v is not None else Retry(self.retry_delay, "not handled") for v in verdicts]

    async def _copy_verdict(self, delivery: Delivery, original: Verdict | None) -> Verdict | None:
        """The verdict of an identical copy of a message handled earlier in the same batch: a
        duplicate once the original is acked or dead-lettered, except that a copy of a message
        dead-lettered as a mismatch is handled on its own (a mismatch too, dead-lettered as it
        would be alone); else (not acked) the original's verdict."""
        if isinstance(original, DeadLetter):
            error = original.error
            if isinstance(error, MessageRejected) and error.reason == "mismatch":
                return await self.aprocess(delivery)
            return Ack(ran=False)
        if isinstance(original, Ack):
            return Ack(ran=False)
        return original

    def _batch_face(self) -> Any:
        try:
            from oncely.messaging.batch import batch_claims
        except ImportError:  # redis-py missing: no Redis store, no batch face
            return None
        return batch_claims(self.store)

    async def _abatch(
        self,
        claims: Any,
        batch: list[Delivery],
        ids: dict[int, str],
        prints_of: dict[int, str],
        verdicts: list[Verdict | None],
    ) -> None:
        """Claim the first delivery of each dedup id (``ids``) in one round trip, run them,
        complete them in one more; their verdicts are written into ``verdicts``."""
        order = list(ids)
        keys = [self.key_for(ids[i]) for i in order]
        prints = [prints_of[i] for i in order]
        sent_at = time.monotonic()
        try:
            outcomes = await claims.claim_many(keys, prints, self.lease, self.policy.ttl)
        except StoreError as exc:
            for i in order:
                verdicts[i] = self.verdict_for(batch[i], ids[i], exc, False)
            outcomes = []
        run: list[tuple[int, RecordKey, int]] = []
        alone: list[int] = []
        for i, key, outcome in zip(order, keys, outcomes):
            if isinstance(outcome, Replay):
                verdicts[i] = Ack(ran=False)
            elif isinstance(outcome, New):
                run.append((i, key, outcome.fence))
            else:  # held by another consumer (or a foreign record): wait for it, one by one
                alone.append(i)
        # Each claim's lease is renewed from its handler's start until its completion or
        # release is sent, not only while its own handler runs: a handler that ended early
        # waits for the slowest one before the batch's completion, and a lease let lapse
        # meanwhile is one another consumer may take over and run the message again. Each
        # renewer stops just before its claim's completion or release goes out (as on the
        # one-message path), so a renewal crossing it is not taken for a lost lease.
        renewers: dict[int, AsyncRenewer] = {}
        try:
            handled = await asyncio.gather(
                *(
                    self._run_claimed(batch[i], key, fence, sent_at, renewers, i)
                    for i, key, fence in run
                ),
                *(self.aprocess(batch[i]) for i in alone),
                return_exceptions=True,
            )
            for i, verdict in zip(alone, handled[len(run) :]):
                verdicts[i] = (
                    verdict
                    if not isinstance(verdict, BaseException)
                    else Retry(self.retry_delay, repr(verdict))
                )
            ok: list[tuple[int, RecordKey, int]] = []
            for (i, key, fence), error in zip(run, handled[: len(run)]):
                if error is None:
                    ok.append((i, key, fence))
                    continue
                assert isinstance(error, BaseException)
                if not isinstance(error, Exception):
                    raise error
                renewers.pop(i).stop()
                try:
                    await write_through(self.store.arelease, key, fence)
                except OncelyError as release_error:
                    log.warning(
                        "oncely: a failed message's claim was not released (%s)",
                        describe(release_error),
                    )
                verdicts[i] = await self._afinish(batch[i], ids[i], error)
            if ok:
                for i, _, _ in ok:
                    renewers.pop(i).stop()
                for i, error in zip((i for i, _, _ in ok), await self._complete_many(claims, ok)):
                    verdicts[i] = await self._afinish(batch[i], ids[i], error)
        finally:
            for renewer in renewers.values():
                renewer.stop()

    async def _afinish(
        self, delivery: Delivery, dedup_id: str, error: BaseException | None
    ) -> Verdict:
        """The verdict for a message whose handler ran (dead-lettered if it comes to that)."""
        verdict = self.verdict_for(delivery, dedup_id, error, True)
        if isinstance(verdict, DeadLetter):
            return await self._adead_letter(delivery, verdict, dedup_id)
        return verdict

    async def _run_claimed(
        self,
        delivery: Delivery,
        key: RecordKey,
        fence: int,
        sent_at: float,
        renewers: dict[int, AsyncRenewer],
        index: int,
    ) -> None:
        """Run the handler under a claim made by the batch, its lease renewed from now on;
        the renewer goes into ``renewers[index]``, which the batch stops when it sends the
        claim's completion or release (not when the handler returns)."""
        claimed = Claimed(key, fence, self.lease, self.store)
        renewers[index] = AsyncRenewer(claimed, sent_at)
        token = active_claim.set(claimed)
        try:
            if self.is_async:
                await self.handler(delivery)
            else:
                await asyncio.to_thread(self.handler, delivery)
        except Exception as exc:  # the handler's error, told apart from the flow's own
            raise HandlerFailed(exc) from exc
        finally:
            active_claim.reset(token)

    async def _complete_many(
        self, claims: Any, ok: list[tuple[int, RecordKey, int]]
    ) -> list[BaseException | None]:
        """Complete the handled messages in one round trip; retried while the store is briefly
        unreachable (as :func:`oncely.functions.flow.call_flow` does)."""
        items = [(key, fence) for _, key, fence in ok]
        codec = self.policy.codec.name
        for attempt in range(self.policy.complete_attempts):
            try:
                return list(await claims.complete_many(items, b"", codec, self.policy.ttl))
            except StoreError as exc:
                if attempt + 1 == self.policy.complete_attempts:
                    return [exc] * len(items)
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def _adead_letter(
        self, delivery: Delivery, verdict: DeadLetter, dedup_id: str | None = None
    ) -> Verdict:
        """:meth:`_dead_letter` on the event loop (the callback may be async)."""
        try:
            if self.on_dead_letter is None:
                self._log_dead_letter(delivery, verdict.error)
            else:
                result = self.on_dead_letter(delivery, verdict.error)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            return self._callback_failed(exc)
        if dedup_id is not None:
            self._attempts.settled(dedup_id, self.fingerprint_of(delivery))
        return verdict

    # -- transactional mode (oncely.messaging.transactional) ------------------------------------
    def _transact(self, delivery: Delivery, dedup_id: str) -> bool:
        assert self.connections is not None and self.inbox is not None
        handler = self.handler
        return self.connections.transact(
            self.inbox, self.name, inbox_message_id(dedup_id), lambda conn: handler(delivery, conn)
        )

    async def _atransact(self, delivery: Delivery, dedup_id: str) -> bool:
        assert self.connections is not None and self.inbox is not None
        handler = self.handler

        async def call(conn: Any) -> None:
            await handler(delivery, conn)

        return await self.connections.atransact(
            self.inbox, self.name, inbox_message_id(dedup_id), call
        )

    def _verdict_of_transaction(
        self,
        delivery: Delivery,
        dedup_id: str,
        transact: Callable[[Delivery, str], bool] | None,
        outcome: BaseException | bool | None,
    ) -> Verdict:
        """Run ``transact`` (sync face) or take the async face's ``outcome``; the verdict.
        Committed (ran or duplicate): ack. The handler raised: counted, retried or
        dead-lettered. The database failed or was busy: retried, not counted."""
        if transact is not None:
            try:
                outcome = transact(delivery, dedup_id)
            except Exception as exc:
                outcome = exc
        if isinstance(outcome, HandlerFailed):
            return self.verdict_for(delivery, dedup_id, outcome, True)
        if isinstance(outcome, BaseException):
            if isinstance(outcome, ConfigurationError):
                log.error("oncely: consumer %r cannot run its transaction: %s", self.name, outcome)
            return self.verdict_for(delivery, dedup_id, outcome, False)
        return self.verdict_for(delivery, dedup_id, None, bool(outcome))

    # -- shared --------------------------------------------------------------------------------
    def _warn_store_down(self, error: BaseException) -> None:
        """A WARNING that the store is unavailable (messages are retried, not acked), at most
        once every :data:`STORE_WARNING_INTERVAL` seconds per consumer: an outage is visible
        in the log without a line per message."""
        now = time.monotonic()
        if now - self._store_warned >= STORE_WARNING_INTERVAL:
            self._store_warned = now
            log.warning(
                "oncely: consumer %r: the store is unavailable; messages are not acked and come "
                "back after %.1f s: %s",
                self.name,
                self.retry_delay,
                error,
            )

    def _log_dead_letter(self, delivery: Delivery, error: BaseException) -> None:
        log.error(
            "oncely: consumer %r dead-letters message %r: %s",
            self.name,
            delivery.message_id,
            error,
        )

    def _callback_failed(self, exc: BaseException) -> Verdict:
        log.exception(
            "oncely: consumer %r: on_dead_letter failed; the message is not acked", self.name
        )
        return Retry(self.retry_delay, f"on_dead_letter failed: {_shown(exc)}")
