"""Red team 18 F7: a Redis state machine entity whose keys hold another Redis type, or whose
state is not UTF-8, raised raw driver errors (``ResponseError: WRONGTYPE``,
``UnicodeDecodeError``); now ``EntityStateInvalid``, and nothing is changed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio

from oncely.errors import EntityStateInvalid
from oncely.statemachine import Machine, Transition
from oncely.statemachine.redis import RedisStateMachine

from conftest import REDIS_URL

ORDER = Machine(
    "rt18order",
    ["pending", "paid"],
    "pending",
    [Transition("pay", "pending", "paid")],
)


@pytest.fixture
def rsm() -> Iterator[tuple[RedisStateMachine, redis.Redis]]:
    client = redis.Redis.from_url(REDIS_URL)
    sm = RedisStateMachine(ORDER, prefix=f"oncely-test-rt18-{uuid.uuid4().hex[:10]}")
    yield sm, client
    keys = list(client.scan_iter(match=f"{sm.prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def aclient() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.mark.parametrize("kind", ["string", "list"])
async def test_entity_key_of_another_type(
    rsm: tuple[RedisStateMachine, redis.Redis], aclient: redis.asyncio.Redis, kind: str
) -> None:
    sm, r = rsm
    key = sm.key(1)
    if kind == "string":
        r.set(key, "x")
    else:
        r.rpush(key, "x")
    for idem in (None, "k1"):
        with pytest.raises(EntityStateInvalid, match=f"Redis {kind}"):
            sm.apply(r, 1, "pay", key=idem)
        with pytest.raises(EntityStateInvalid, match=f"Redis {kind}"):
            await sm.aapply(aclient, 1, "pay", key=idem)
    with pytest.raises(EntityStateInvalid, match="hash key"):
        sm.create(r, 1)
    with pytest.raises(EntityStateInvalid, match="hash key"):
        await sm.acreate(aclient, 1)
    with pytest.raises(EntityStateInvalid):
        sm.state(r, 1)
    assert r.type(key) == kind.encode()
    assert not r.exists(f"{key}:history", f"{key}:keys")


def test_state_not_utf8(rsm: tuple[RedisStateMachine, redis.Redis]) -> None:
    sm, r = rsm
    r.hset(sm.key(1), "state", b"\xff")
    for idem in (None, "k1"):
        with pytest.raises(EntityStateInvalid) as info:
            sm.apply(r, 1, "pay", key=idem)
        assert info.value.current == b"\xff"
    with pytest.raises(EntityStateInvalid):
        sm.state(r, 1)
    assert sm.create(r, 1) is False
    assert r.hget(sm.key(1), "state") == b"\xff"
    assert sm.history(r, 1) == []


@pytest.mark.parametrize("which", ["history", "keys"])
def test_history_or_keys_of_another_type_change_nothing(
    rsm: tuple[RedisStateMachine, redis.Redis], which: str
) -> None:
    """The script checks its keys' types before it writes: it used to set the state and then
    fail on RPUSH to a history key holding a string (a Lua error rolls nothing back), so the
    entity moved with no history entry."""
    sm, r = rsm
    sm.create(r, 1)
    r.set(f"{sm.key(1)}:{which}", "x")
    with pytest.raises(EntityStateInvalid, match="history list" if which == "history" else "used"):
        sm.apply(r, 1, "pay", key="k1")
    assert sm.state(r, 1) == "pending"
    assert r.get(f"{sm.key(1)}:{which}") == b"x"
