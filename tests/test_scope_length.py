"""The longest scope every store keeps, checked when built by every component that puts a name
into a scope.

Outside retest 6: ``IdempotentConsumer(name="n" * 1004)`` was accepted, then every message on
the MySQL store was Retry forever (DataError 1406: its ``scope`` column is
``VARBINARY(1020)``). Every name that becomes part of a record's scope is checked against
:data:`oncely.core.text.MAX_SCOPE_BYTES` when its object is built; a scope made per call that
is too long is :class:`~oncely.errors.InvalidKey` before anything is sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from oncely import idempotent
from oncely.core.records import RecordKey
from oncely.core.text import MAX_SCOPE_BYTES
from oncely.errors import ConfigurationError, InvalidKey
from oncely.messaging import Delivery, IdempotentConsumer
from oncely.stores import Store

from conftest import StoreFactory

pytestmark = pytest.mark.timeout(60)

EMOJI = "\U0001f600"  # 4 bytes in UTF-8


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 's.db'}"


@pytest.mark.parametrize("name", ["n" * 1004, "n" * 5000, EMOJI * 251])
def test_a_consumer_name_no_store_keeps_is_refused_when_built(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="name"):
        IdempotentConsumer(lambda d: None, name=name, store=_url(tmp_path), dedup_id="message_id")


def test_a_transactional_consumer_name_past_the_inbox_column_is_refused(tmp_path: Path) -> None:
    from oncely.messaging import Inbox
    from oncely.messaging.inbox import MAX_CONSUMER_LENGTH

    with pytest.raises(ConfigurationError, match="name"):
        IdempotentConsumer(
            lambda d, conn: None, name="n" * (MAX_CONSUMER_LENGTH + 1), dedup_id="message_id",
            inbox=Inbox(), connect=_url(tmp_path),
        )  # fmt: skip


def runs_into(runs: list[bytes]) -> Callable[[Delivery], None]:
    return lambda d: runs.append(d.body)


def test_the_longest_consumer_name_works_on_every_store(store: Store) -> None:
    """The longest name accepted (ASCII, and 4-byte characters) is kept by every store."""
    most = MAX_SCOPE_BYTES - len("oncely.messaging:")
    for name in ("n" * most, EMOJI * (most // 4)):
        runs: list[bytes] = []
        consumer = IdempotentConsumer(
            runs_into(runs), name=name, store=store, dedup_id="message_id"
        )
        mid = uuid.uuid4().hex
        assert type(consumer.process(Delivery(b"x", message_id=mid))).__name__ == "Ack"
        assert type(consumer.process(Delivery(b"x", message_id=mid))).__name__ == "Ack"
        assert runs == [b"x"]


def test_mysql_keeps_the_longest_scope_and_one_byte_more_is_refused(
    make_store: StoreFactory,
) -> None:
    store, _, _ = make_store("mysql")
    assert store.claim(RecordKey.of("s" * MAX_SCOPE_BYTES, "k"), "fp", 2.0, 60.0).fence > 0
    with pytest.raises(InvalidKey, match="scope"):
        RecordKey.of("s" * (MAX_SCOPE_BYTES + 1), "k")
    with pytest.raises(InvalidKey, match="scope"):
        RecordKey.of(EMOJI * (MAX_SCOPE_BYTES // 4) + "s", "k")


def test_decorator_http_and_token_scopes_are_checked_when_built(tmp_path: Path) -> None:
    from oncely.http import GLOBAL, IdempotencyConfig
    from oncely.tokens import Tokens

    url = _url(tmp_path)
    long = "s" * (MAX_SCOPE_BYTES + 1)

    def f(k: str) -> str:
        return k

    with pytest.raises(ConfigurationError, match="scope"):
        idempotent(store=url, name="s.long", key=["k"], scope=long)(f)
    with pytest.raises(ConfigurationError, match="namespace"):
        IdempotencyConfig(store=url, scope=GLOBAL, namespace=long)
    with pytest.raises(ConfigurationError, match="scope"):
        Tokens(secret="s" * 32, store=url, scope=long)
    # the longest accepted still works
    g = idempotent(store=url, name="s.most", key=["k"], scope="s" * MAX_SCOPE_BYTES)(f)
    assert g("a") == "a"
