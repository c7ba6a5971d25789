"""The idempotent consumer on MQTT QoS 1 (paho-mqtt 2), against Mosquitto on this machine."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from messaging_storm import Storm, check_storm, run_storm, storm_ids, storm_table
from oncely.errors import ConfigurationError
from oncely.messaging import Delivery, IdempotentConsumer
from oncely.messaging.mqtt import MQTTConsumer, connect, publish
from oncely.stores import Store

from conftest import REDIS_URL, StoreFactory, drop_redis_prefix


def publisher(client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    return client


def drop_session(client_id: str) -> None:
    """End a persistent session (clean start, expiry 0)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", 1883, clean_start=True)
    client.loop_start()
    time.sleep(0.1)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store("redis")[0]


@pytest.mark.serial  # a storm on 2 s leases: a busy neighbour stalling a handler 2 s lapses one
@pytest.mark.slow
def test_storm_shared_subscription_one_member_killed(tmp_path: Path) -> None:
    """1,000 messages, 30% duplicate publishes, two members of a shared subscription with
    persistent sessions, one SIGKILLed mid-batch and restarted under its client id (the
    broker resends what it had not acked), every 13th message failing once (retried before
    its PUBACK): each effect once, none lost."""
    n = 1000
    storm = Storm("mqtt", tmp_path, n)
    topic = f"oncely/test/{storm.tag}"
    prefix = f"oncely-test-{storm.tag}"
    client_id = f"oncely-test-{storm.tag}"
    config = {
        "topic": f"$share/{storm.tag}/{topic}",
        "client_id": client_id,
        "store": REDIS_URL,
        "store_options": {"prefix": prefix},
        "name": "storm",
        "fail_every": 13,
        "lease": 2.0,
    }

    def send() -> None:
        client = publisher(f"{client_id}-pub")
        for i, mid in enumerate(storm_ids(n)):
            info = publish(client, topic, b"{}", mid)
            if i % 100 == 99:
                info.wait_for_publish(10)
        info.wait_for_publish(10)
        client.disconnect()
        client.loop_stop()

    fixture = storm_table(storm)
    next(fixture)
    try:
        result = run_storm(storm, config, lambda: True, publish=send)
    finally:
        next(fixture, None)
        for member in ("a", "b"):
            drop_session(f"{client_id}-{member}")
        drop_redis_prefix(prefix)
    check_storm(result, n)


def test_duplicates_and_redelivery_after_restart(store: Store) -> None:
    """A member stops with a message still failing (never acked); the broker resends it
    when the session reconnects, and the new run handles it once. Duplicate publishes and
    messages without the user property (dead-lettered, acked) are handled too."""
    tag = uuid.uuid4().hex[:8]
    topic, cid = f"oncely/test/{tag}", f"oncely-test-{tag}"
    ran: list[str | None] = []
    letters: list[Any] = []
    fail = threading.Event()
    fail.set()

    def handler(d: Delivery) -> None:
        if d.message_id == "m-2" and fail.is_set():
            raise RuntimeError("not yet")
        ran.append(d.message_id)

    def member() -> MQTTConsumer:
        consumer = IdempotentConsumer(
            handler,
            name="c",
            store=store,
            dedup_id="header:message_id",
            retry_delay=0.05,
            max_attempts=0,
            on_dead_letter=lambda d, e: letters.append(e),
        )
        m = MQTTConsumer(consumer, connect("127.0.0.1", 1883, cid), topic)
        m.start()
        assert m.subscribed.wait(10)
        return m

    try:
        first = member()
        pub = publisher(f"{cid}-pub")
        for mid in ["m-1", "m-2", "m-1", "m-3"]:
            publish(pub, topic, b"{}", mid).wait_for_publish(5)
        pub.publish(topic, b"no id", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while (len(ran) < 2 or not letters) and time.monotonic() < deadline:
            time.sleep(0.05)
        first.stop()  # m-2 is still failing: never acked
        assert sorted(ran) == ["m-1", "m-3"] and len(letters) == 1
        assert first.stats["duplicates"] == 1
        fail.clear()
        second = member()
        deadline = time.monotonic() + 10
        while "m-2" not in ran and time.monotonic() < deadline:
            time.sleep(0.05)
        second.stop()
        pub.disconnect()
        pub.loop_stop()
        assert sorted(ran) == ["m-1", "m-2", "m-3"]
    finally:
        drop_session(cid)


def test_async_handler_is_refused(store: Store) -> None:
    async def handler(d: Delivery) -> None: ...

    consumer = IdempotentConsumer(handler, name="c", store=store)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
    with pytest.raises(ConfigurationError, match="sync"):
        MQTTConsumer(consumer, client, "t")


def test_a_dedup_id_callable_that_raises_fails_that_message_only(store: Store) -> None:
    """Red team 18 F5: a ``dedup_id`` callable that raised (KeyError) escaped process() in the
    worker thread: the message was never acked nor dead-lettered. Now it is a failed attempt
    of that message, dead-lettered after max_attempts and acked; the good one runs."""
    tag = uuid.uuid4().hex[:8]
    topic, cid = f"oncely/test/{tag}", f"oncely-test-{tag}"
    ran: list[str] = []
    letters: list[BaseException] = []
    consumer = IdempotentConsumer(
        lambda d: ran.append(d.json()["id"]),
        name=f"c-{tag}",
        store=store,
        dedup_id=lambda d: d.json()["id"],
        retry_delay=0.05,
        max_attempts=2,
        on_dead_letter=lambda d, e: letters.append(e),
    )
    member = MQTTConsumer(consumer, connect("127.0.0.1", 1883, cid), topic)
    pub = publisher(f"{cid}-pub")
    try:
        member.start()
        assert member.subscribed.wait(10)
        publish(pub, topic, b'{"noid": 1}', "m-bad").wait_for_publish(5)
        publish(pub, topic, b'{"id": "good"}', "m-good").wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not (ran and letters) and time.monotonic() < deadline:
            time.sleep(0.05)
        member.stop()
        assert ran == ["good"]
        assert len(letters) == 1 and isinstance(letters[0], KeyError)
        assert member.stats == {"ran": 1, "duplicates": 0, "retried": 1, "dead_lettered": 1}
    finally:
        pub.disconnect()
        pub.loop_stop()
        drop_session(cid)
