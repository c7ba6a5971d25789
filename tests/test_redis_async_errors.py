"""The async faces of ``RedisClients`` meet redis-py's errors one way (``_Translated``): a
redis-py error, or an ``AttributeError`` / ``TypeError`` raised inside redis-py, becomes the
oncely error; anything else passes unchanged; the operation's budget ends either way."""

from __future__ import annotations

import pytest

from oncely.backends import budget
from oncely.backends.durable import EvalWait
from oncely.backends.lua import Script
from oncely.backends.redis import RedisClients
from oncely.errors import StoreError, StoreUnavailable

from conftest import REDIS_URL

CLOSED = "redis://127.0.0.1:1/0"  # nothing listens on port 1


class _BadRepr(float):
    """A float whose ``repr`` is not a string: redis-py's encoder raises ``TypeError`` on it,
    inside redis-py (nothing is sent)."""

    def __repr__(self) -> str:
        return 1  # type: ignore[return-value]


async def test_acall_turns_redis_py_errors_into_oncely_errors_and_ends_its_budget() -> None:
    clients = RedisClients(CLOSED, socket_timeout=1)
    try:
        with pytest.raises(StoreUnavailable, match="unavailable") as caught:
            await clients.acall("PING")
        assert caught.value.__cause__ is not None
        assert budget.DEADLINE.get() is None
    finally:
        await clients.aclose()
        clients.close()


async def test_acall_errors_the_server_answers_and_faults_inside_redis_py() -> None:
    clients = RedisClients(REDIS_URL, socket_timeout=5)
    try:
        with pytest.raises(StoreError, match="unknown command"):
            await clients.acall("ONCELY-NO-SUCH-COMMAND")
        # a TypeError raised inside redis-py: the connection state is unknown
        with pytest.raises(StoreUnavailable, match="torn down") as caught:
            await clients.acall("ECHO", _BadRepr(1.0))
        assert isinstance(caught.value.__cause__, TypeError)
        # an error that is not redis-py's passes unchanged
        with pytest.raises(IndexError):
            await clients.acall()
        assert budget.DEADLINE.get() is None
    finally:
        await clients.aclose()
        clients.close()


async def test_aeval_wait_turns_redis_py_errors_into_oncely_errors() -> None:
    clients = RedisClients(CLOSED + "?wait_replicas=1", socket_timeout=1)
    try:
        request = EvalWait(Script("oncely.stores", "get"), 1, ("k",))
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await clients.aeval_wait(request)
        assert budget.DEADLINE.get() is None
    finally:
        await clients.aclose()
        clients.close()
