"""The idempotent consumer on MQTT QoS 1, with paho-mqtt >= 2 (``oncely[mqtt]``).

QoS 1 is at-least-once: the broker resends a PUBLISH until the client's PUBACK arrives, and
after a reconnect it resends every unacknowledged one (with the DUP flag). The client here
acks by hand (paho's ``manual_ack``): a message's PUBACK is sent only once its record is
complete (or it was a duplicate, or it was dead-lettered). For the broker to keep unacked
messages across a restart, connect with MQTT v5, ``clean_start=False`` and a session expiry
interval, under a stable client id (:func:`connect`).

MQTT has no negative ack: a :class:`~oncely.messaging.consumer.Retry` (the store is down,
another consumer holds the claim, the handler failed) is retried here after ``delay``, and
the message stays unacked meanwhile; if this process dies, the broker resends it to the
session when it reconnects. Nothing is acked that was not handled.

The dedup id comes from an MQTT v5 user property (``dedup_id="header:message_id"``, the one
:func:`publish` sets, which also fills :attr:`Delivery.message_id`) or from the payload
(``dedup_id="body:id"``). Handlers run on a thread pool (sync handlers only: the paho network
loop is a thread).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from oncely.errors import ConfigurationError
from oncely.messaging.consumer import Ack, DeadLetter, Delivery, IdempotentConsumer, Retry
from oncely.settings import text, whole

__all__ = ["MESSAGE_ID", "MQTTConsumer", "connect", "delivery_of", "publish"]

log = logging.getLogger("oncely")

#: The user property :func:`publish` puts the dedup id in.
MESSAGE_ID = "message_id"


def delivery_of(message: mqtt.MQTTMessage) -> Delivery:
    """The :class:`Delivery` of a paho message (headers: its v5 user properties)."""
    props = getattr(message, "properties", None)
    pairs = getattr(props, "UserProperty", None) or []
    headers = {str(k): str(v) for k, v in pairs}
    return Delivery(
        body=bytes(message.payload),
        message_id=headers.get(MESSAGE_ID),
        headers=headers,
        attempt=None,
        raw=message,
    )


def connect(
    host: str,
    port: int,
    client_id: str,
    *,
    session_expiry: int = 3600,
    keepalive: int = 30,
) -> mqtt.Client:
    """A paho client (MQTT v5, manual acks) connected with a persistent session:
    ``clean_start=False`` and ``session_expiry`` seconds, so unacked messages survive a
    restart of this client id. Call ``loop_start()`` (or use :class:`MQTTConsumer`)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True
    )
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry
    client.connect(host, port, keepalive=keepalive, clean_start=False, properties=props)
    return client


def publish(
    client: mqtt.Client, topic: str, payload: bytes, message_id: str, *, qos: int = 1
) -> mqtt.MQTTMessageInfo:
    """Publish with the dedup id in the user property ``message_id`` (MQTT v5 clients)."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [(MESSAGE_ID, message_id)]
    return client.publish(topic, payload, qos=qos, properties=props)


class MQTTConsumer:
    """Subscribes ``client`` to ``topic`` at QoS 1 and runs each message through ``consumer``
    on ``workers`` threads; PUBACK only after the verdict allows it.

    :param client: from :func:`connect` (``manual_ack=True``, MQTT v5).
    :param topic: a topic filter; ``$share/<group>/<filter>`` spreads messages over members.
    :raises ConfigurationError: an async handler, or a client without manual acks.
    """

    def __init__(
        self, consumer: IdempotentConsumer, client: mqtt.Client, topic: str, *, workers: int = 8
    ) -> None:
        if consumer.is_async:
            raise ConfigurationError("the MQTT adapter runs sync handlers (on a thread pool)")
        if not getattr(client, "_manual_ack", True):
            raise ConfigurationError("the client must be created with manual_ack=True")
        self.topic = text(topic, "topic", where="MQTTConsumer")
        workers = whole(workers, "workers", where="MQTTConsumer", minimum=1)
        self.consumer = consumer
        self.client = client
        self.stats = {"ran": 0, "duplicates": 0, "retried": 0, "dead_lettered": 0}
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="oncely-mqtt")
        self._stopping = threading.Event()
        self._mutex = threading.Lock()
        #: Set once the broker confirmed the subscription (SUBACK).
        self.subscribed = threading.Event()
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_message = self._on_message

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._pool.submit(self.handle, message)

    def handle(self, message: mqtt.MQTTMessage) -> None:
        """Process one message until a verdict allows its PUBACK (retrying after delays)."""
        delivery = delivery_of(message)
        while not self._stopping.is_set():
            verdict = self.consumer.process(delivery)
            if isinstance(verdict, Retry):
                self._count("retried")
                self._stopping.wait(verdict.delay)
                continue
            if isinstance(verdict, Ack):
                self._count("ran" if verdict.ran else "duplicates")
            elif isinstance(verdict, DeadLetter):
                self._count("dead_lettered")
            self.client.ack(message.mid, message.qos)
            return

    def _count(self, what: str) -> None:
        with self._mutex:
            self.stats[what] += 1

    def start(self) -> None:
        """Start paho's network thread (it subscribes on every (re)connect)."""
        self.client.loop_start()

    def stop(self) -> None:
        """Stop taking messages, let running handlers finish, disconnect. Messages not acked
        stay with the broker's session."""
        self.client.on_message = None
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.disconnect()
        self.client.loop_stop()
