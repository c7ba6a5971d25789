"""What only the Redis store promises: its key layout, one EVALSHA per operation, script reload,
physical expiry, pub/sub wake-ups, and how it reports a bad URL or a server it cannot reach.

The rules every store shares are in ``test_store_conformance.py``. These tests talk to the real
Redis at ``ONCELY_TEST_REDIS`` (default ``redis://127.0.0.1:6379/0``), each under its own prefix.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from oncely.backends.lua import script_source
from oncely.core.records import InFlight, Mismatch, New, RecordKey, Replay
from oncely.errors import ConfigurationError, LeaseLost, StoreError, StoreUnavailable
from oncely.stores import open_store
from oncely.stores.redis import RedisStore
from redis_cluster import RedisServer as ClusterNode

from lock_workers import RedisServer

REDIS_URL = os.environ.get("ONCELY_TEST_REDIS", "redis://127.0.0.1:6379/0")
#: Nothing listens on port 1, so connecting is refused at once.
DEAD_URL = "redis://oncely:s3cret@127.0.0.1:1/0"
SCRIPTS = ["claim", "complete", "release", "renew", "get", "delete", "probe", "list"]


def round_trips(commands: list[str]) -> list[str]:
    """The commands sent, with a NOSCRIPT reload (EVALSHA then EVAL) counted as one EVALSHA.

    Other clients of the shared server may ``SCRIPT FLUSH`` at any time (oncely's tests do so
    only on a private redis-server); the reload itself is checked in
    :func:`test_scripts_reload_after_script_flush`.
    """
    out: list[str] = []
    for command in commands:
        if not (command == "EVAL" and out and out[-1] == "EVALSHA"):
            out.append(command)
    return out


class CountingRedis(redis.Redis):
    """A real client that records the name of every command it sends (one per round trip)."""

    commands: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]))
        return super().execute_command(*args, **options)


class CountingAsyncRedis(redis.asyncio.Redis):
    commands: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]))
        return await super().execute_command(*args, **options)


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    yield client
    client.close()


@pytest.fixture
def prefix(raw: redis.Redis) -> Iterator[str]:
    name = f"oncely-rt-{uuid.uuid4().hex[:12]}"
    yield name
    keys = list(raw.scan_iter(match=f"{name}:*"))
    if keys:
        raw.delete(*keys)


@pytest.fixture
def store(prefix: str) -> Iterator[RedisStore]:
    store = RedisStore(REDIS_URL, prefix=prefix)
    yield store
    store.close()


@pytest.fixture
def counting(prefix: str) -> Iterator[tuple[RedisStore, CountingRedis]]:
    client = CountingRedis.from_url(REDIS_URL)
    client.commands = []
    store = RedisStore(REDIS_URL, prefix=prefix, client=client)
    yield store, client
    client.close()


def rkey(scope: str = "tenant-1") -> RecordKey:
    return RecordKey.of(scope, uuid.uuid4().hex)


def record_key(prefix: str, key: RecordKey) -> str:
    return f"{prefix}:{key.scope}:{key.digest}"


# -- round trips ----------------------------------------------------------------------------------
def test_every_operation_is_one_evalsha(counting: tuple[RedisStore, CountingRedis]) -> None:
    store, client = counting
    key = rkey()

    def calls(run: Any) -> list[str]:
        client.commands.clear()
        run()
        return round_trips(client.commands)

    outcome = store.claim(key, "fp", 5, 60)
    assert isinstance(outcome, New)
    assert calls(lambda: store.claim(key, "fp", 5, 60)) == ["EVALSHA"]  # in flight
    assert calls(lambda: store.claim(key, "other", 5, 60)) == ["EVALSHA"]  # mismatch
    assert calls(lambda: store.renew(key, outcome.fence, 10)) == ["EVALSHA"]
    assert calls(lambda: store.complete(key, outcome.fence, b"r", "raw", 60)) == ["EVALSHA"]
    assert calls(lambda: store.claim(key, "fp", 5, 60)) == ["EVALSHA"]  # replay
    assert calls(lambda: store.get(key)) == ["EVALSHA"]
    assert calls(lambda: store.delete(key)) == ["EVALSHA"]
    assert calls(lambda: store.now()) == ["TIME"]
    assert calls(lambda: store.purge_expired()) == []
    fresh = store.claim(key, "fp", 5, 60)
    assert isinstance(fresh, New)
    assert calls(lambda: store.release(key, fresh.fence)) == ["EVALSHA"]
    assert calls(lambda: store.watch(key, fresh.fence, 0)) == ["EVALSHA"]


def test_first_call_is_two_round_trips_and_replay_is_one(
    counting: tuple[RedisStore, CountingRedis],
) -> None:
    store, client = counting
    # A store's very first claim reads the server's clock first (now.lua: the estimate its
    # claims' bounds come from, oncely.core.storeclock), once per store; none after that.
    warm = rkey()
    client.commands.clear()
    assert isinstance(store.claim(warm, "fp", 5, 60), New)
    assert round_trips(client.commands) == ["EVALSHA", "EVALSHA"]
    store.delete(warm)
    key = rkey()
    client.commands.clear()
    outcome = store.claim(key, "fp", 5, 60)
    assert isinstance(outcome, New)
    store.complete(key, outcome.fence, b"result", "raw", 60)
    assert round_trips(client.commands) == ["EVALSHA", "EVALSHA"]
    client.commands.clear()
    assert isinstance(store.claim(key, "fp", 5, 60), Replay)
    assert round_trips(client.commands) == ["EVALSHA"]


async def test_async_face_is_one_evalsha_per_operation(prefix: str) -> None:
    client = CountingAsyncRedis.from_url(REDIS_URL)
    client.commands = []
    store = RedisStore(REDIS_URL, prefix=prefix, async_client=client)
    try:
        warm = rkey()  # the store's first claim reads the server's clock first, once
        await store.aclaim(warm, "fp", 5, 60)
        await store.adelete(warm)
        client.commands.clear()
        key = rkey()
        outcome = await store.aclaim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        await store.arenew(key, outcome.fence, 10)
        await store.acomplete(key, outcome.fence, b"r", "raw", 60)
        assert isinstance(await store.aclaim(key, "fp", 5, 60), Replay)
        assert await store.aget(key) is not None
        assert await store.adelete(key)
        assert round_trips(client.commands) == ["EVALSHA"] * 6
        client.commands.clear()
        await store.anow()
        assert client.commands == ["TIME"]
        assert await store.apurge_expired() == 0
    finally:
        await store.aclose()  # not ours: leaves the client open
        await client.aclose()
        store.close()


# SCRIPT FLUSH runs on a private redis-server: on the shared one it would break other runs'
# exact command counts, and another run's client could load the script again between the flush
# and the check (so no NOSCRIPT would be seen here).
def test_scripts_reload_after_script_flush(private_redis: RedisServer) -> None:
    client = CountingRedis.from_url(private_redis.url)
    client.commands = []
    store = RedisStore(private_redis.url, prefix="oncely-rt", client=client)
    try:
        key = rkey()
        store.claim(key, "fp", 5, 60)
        client.script_flush()
        client.commands.clear()
        assert isinstance(store.claim(key, "fp", 5, 60), InFlight)
        assert client.commands == ["EVALSHA", "EVAL"]  # NOSCRIPT, then EVAL (which caches it)
        client.commands.clear()
        assert isinstance(store.claim(key, "fp", 5, 60), InFlight)
        assert client.commands == ["EVALSHA"]
    finally:
        store.close()
        client.close()


async def test_async_scripts_reload_after_script_flush(private_redis: RedisServer) -> None:
    client = CountingAsyncRedis.from_url(private_redis.url)
    client.commands = []
    store = RedisStore(private_redis.url, prefix="oncely-rt", async_client=client)
    try:
        key = rkey()
        outcome = await store.aclaim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        with redis.Redis.from_url(private_redis.url) as admin:
            admin.script_flush()
        client.commands.clear()
        await store.acomplete(key, outcome.fence, b"r", "raw", 60)
        assert client.commands == ["EVALSHA", "EVAL"]  # NOSCRIPT, then EVAL
        assert isinstance(await store.aclaim(key, "fp", 5, 60), Replay)
    finally:
        await store.aclose()
        await client.aclose()
        store.close()


def test_lua_scripts_ship_as_package_resources() -> None:
    folder = resources.files("oncely.stores") / "lua"
    for name in SCRIPTS:
        assert (folder / f"{name}.lua").read_text().startswith(f"-- {name}.lua")


# -- layout, expiry, fences -----------------------------------------------------------------------
def test_record_layout_and_pexpireat(store: RedisStore, raw: redis.Redis, prefix: str) -> None:
    key = rkey("acme")
    outcome = store.claim(key, "fp-1", 5, 60)
    assert isinstance(outcome, New)
    name = record_key(prefix, key)
    assert raw.type(name) == b"hash"
    fields = raw.hgetall(name)
    # the scope and the digest are in the key's name only
    assert set(fields) == {b"st", b"fe", b"fp", b"lu", b"ea", b"ca"}
    assert fields[b"st"] == b"in_progress"
    assert int(fields[b"fe"]) == outcome.fence
    assert fields[b"fp"] == b"fp-1"
    assert int(fields[b"lu"]) == round(outcome.lease_until * 1000)
    assert int(fields[b"ea"]) == int(fields[b"ca"]) + 60_000
    assert raw.pexpiretime(name) == int(fields[b"ea"])

    created = int(fields[b"ca"])

    store.complete(key, outcome.fence, b"done", "json", 120)
    fields = raw.hgetall(name)
    # the packed completed record: the fence in st, no lease, the expiry only as PEXPIREAT, the
    # fingerprint moved to ft/fx, no codec for JSON, created_at is the fence's millisecond (the
    # fence is the claim's TIME in microseconds here)
    assert outcome.fence // 1000 == created
    assert set(fields) == {b"st", b"ft", b"ea", b"rs"}
    assert (unpack_status(fields[b"st"]), fields[b"ft"]) == ((outcome.fence, 0), b"fp-1")
    assert (fields[b"rs"], fields[b"ea"]) == (b"done", b"9e99")
    expires = raw.pexpiretime(name)
    assert abs(expires - (time.time() + 120) * 1000) < 10_000
    record = store.get(key)
    assert record is not None
    assert (record.status, record.fingerprint, record.fence) == ("completed", "fp-1", outcome.fence)
    assert record.expires_at == expires / 1000
    assert record.created_at == created / 1000
    assert record.lease_until is None
    assert [r.created_at for r in store.list("acme")] == [created / 1000]


def unpack_status(st: bytes) -> tuple[int, int]:
    """The fence and the piece count N of a packed completed record's status (``C``, the fence
    in 8 base-94 digits ``!`` .. ``~``, then N if the result is in N + 1 pieces): decoded here
    on their own, not by the store's scripts."""
    assert st[:1] == b"C" and len(st) >= 9, st
    fence = 0
    for digit in st[1:9]:
        assert 33 <= digit <= 126, st
        fence = fence * 94 + digit - 33
    return fence, int(st[9:] or 0)


def test_a_packed_record_keeps_a_codec_other_than_json(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    for codec, result in (("pickle", b"\x80\x05K\x01."), ("json", b"x" * 200)):
        key = rkey("acme")
        outcome = store.claim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        store.complete(key, outcome.fence, result, codec, 60)
        fields = raw.hgetall(record_key(prefix, key))
        assert fields.get(b"cd") == (None if codec == "json" else codec.encode())
        assert unpack_status(fields[b"st"]) == (outcome.fence, 0 if len(result) <= 64 else 3)
        for got in (store.get(key), store.list("acme")[-1]):
            assert got is not None
            assert (got.result, got.codec, got.fence) == (result, codec, outcome.fence)
        replay = store.claim(key, "fp", 5, 60)
        assert isinstance(replay, Replay)
        assert (replay.record.result, replay.record.codec) == (result, codec)


def test_a_fence_past_the_packed_range_keeps_the_compact_layout(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    """Fences of 94^8 or more (microseconds after 2163, or a counter pushed there) do not fit
    the packed status: such a record is completed in the compact layout, and read back alike."""
    for fence_at in (94**8 - 2, 94**8 - 1):  # the next fence is the last packed / first not
        raw.set(f"{prefix}:fence", fence_at)
        key = rkey("acme")
        outcome = store.claim(key, "ab" * 16, 5, 60)
        assert isinstance(outcome, New) and outcome.fence == fence_at + 1
        store.complete(key, outcome.fence, b'"ok"', "json", 60)
        fields = raw.hgetall(record_key(prefix, key))
        if outcome.fence < 94**8:
            assert unpack_status(fields[b"st"]) == (outcome.fence, 0)
        else:
            assert (fields[b"st"], int(fields[b"fe"]), fields[b"cd"]) == (
                b"c",
                outcome.fence,
                b"json",
            )
            assert int(fields[b"ea"]) == raw.pexpiretime(record_key(prefix, key))
        got = store.get(key)
        assert got is not None and (got.fence, got.result) == (outcome.fence, b'"ok"')
        replay = store.claim(key, "ab" * 16, 5, 60)
        assert isinstance(replay, Replay) and replay.record.fence == outcome.fence
        store.complete(key, outcome.fence, b'"ok"', "json", 60)  # the lost-reply repeat
        with pytest.raises(LeaseLost, match="already completed under this fence"):
            store.renew(key, outcome.fence, 5)


@pytest.mark.parametrize(
    ("fingerprint", "ft", "fx"),
    [
        ("0123456789abcdef" * 2, None, bytes.fromhex("0123456789abcdef" * 2)),
        ("ab" * 20, None, b"\xab" * 20),
        ("sha256:" + "9f" * 32, b"sha256:", b"\x9f" * 32),
        ("abc", b"a", b"\xbc"),  # odd: the first digit stays text
        ("0123ABCD", b"0123ABCD", None),  # upper case is not packed (it would come back lower)
        ("fp-1", b"fp-1", None),
        ("1", b"1", None),
        ("", None, None),
        ("caf\u00e9ab12", "caf\u00e9".encode(), b"\xab\x12"),
        ("00", None, b"\x00"),
        ("a" * 20_000 + "!" + "b" * 20_000, ("a" * 20_000 + "!").encode(), b"\xbb" * 10_000),
        ("prix-\u00e9t\u00e9", "prix-\u00e9t\u00e9".encode(), None),
    ],
)
def test_completed_fingerprint_is_packed_and_comes_back_exactly(
    store: RedisStore, raw: redis.Redis, prefix: str, fingerprint: str, ft: Any, fx: Any
) -> None:
    """A completed record keeps the fingerprint's hex tail as raw bytes (fx) and the rest as text
    (ft); every reader gets the very same string back, and another one is still a mismatch."""
    key = rkey("acme")
    outcome = store.claim(key, fingerprint, 5, 60)
    assert isinstance(outcome, New)
    store.complete(key, outcome.fence, b"r", "json", 60)
    fields = raw.hgetall(record_key(prefix, key))
    assert (fields.get(b"ft"), fields.get(b"fx"), fields.get(b"fp")) == (ft, fx, None)
    replay = store.claim(key, fingerprint, 5, 60)
    assert isinstance(replay, Replay) and replay.record.fingerprint == fingerprint
    got = store.get(key)
    assert got is not None and got.fingerprint == fingerprint
    assert [r.fingerprint for r in store.list("acme")] == [fingerprint]
    others = (fingerprint + "0", fingerprint.upper() + "x", "x" + fingerprint, "0" + fingerprint)
    for other in others:
        assert isinstance(store.claim(key, other, 5, 60), Mismatch), other
    store.complete(key, outcome.fence, b"r", "json", 60)  # the lost-reply repeat still matches


def test_created_at_is_kept_when_the_fence_is_not_the_claim_time(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    """The fence counter ahead of the clock: the fence says nothing about the claim's time, so the
    completed record keeps ``ca``, and created_at stays the claim's time."""
    key = rkey("acme")
    raw.set(f"{prefix}:fence", str(int(store.now() * 1_000_000) + 10**12))
    outcome = store.claim(key, "ab" * 16, 5, 60)
    assert isinstance(outcome, New)
    created = int(raw.hget(record_key(prefix, key), "ca") or 0)
    assert outcome.fence // 1000 != created
    store.complete(key, outcome.fence, b"r", "json", 60)
    assert int(raw.hget(record_key(prefix, key), "ca") or 0) == created
    for record in (store.get(key), store.list("acme")[0]):
        assert record is not None and record.created_at == created / 1000
    replay = store.claim(key, "ab" * 16, 5, 60)
    assert isinstance(replay, Replay) and replay.record.created_at == created / 1000


@pytest.mark.parametrize("size", [0, 64, 65, 128, 200, 1024, 1025, 5000])
def test_results_up_to_1024_bytes_keep_the_hash_a_listpack(
    store: RedisStore, raw: redis.Redis, prefix: str, size: int
) -> None:
    """One hash value over hash-max-listpack-value (64) would make the whole record a
    hashtable (2.5x the memory of a 100-byte result): results of 65 to 1,024 bytes are kept in
    64-byte pieces, and every reader gets the whole result back."""
    key = rkey("acme")
    result = bytes(i % 256 for i in range(size))  # NUL and high bytes included
    outcome = store.claim(key, "fp", 5, 60)
    assert isinstance(outcome, New)
    store.complete(key, outcome.fence, result, "raw", 60)
    name = record_key(prefix, key)
    fields = raw.hgetall(name)
    if 64 < size <= 1024:
        pieces = -(-size // 64) - 1
        assert set(fields) == {b"st", b"ft", b"ea", b"cd", b"rs"} | {
            f"r{i}".encode() for i in range(1, pieces + 1)
        }
        assert unpack_status(fields[b"st"]) == (outcome.fence, pieces)  # N further pieces
    else:
        assert fields[b"rs"] == result and b"r1" not in fields
        assert unpack_status(fields[b"st"]) == (outcome.fence, 0)
    expected = b"listpack" if size <= 1024 else b"hashtable"
    assert raw.object("encoding", name) == expected
    got = store.get(key)
    assert got is not None and got.result == result
    replay = store.claim(key, "fp", 5, 60)
    assert isinstance(replay, Replay) and replay.record.result == result
    assert [r.result for r in store.list("acme")] == [result]
    store.complete(key, outcome.fence, result, "raw", 60)  # a repeat finds its own completion
    with pytest.raises(LeaseLost):
        store.complete(key, outcome.fence, result + b"x", "raw", 60)
    with pytest.raises(LeaseLost):
        store.complete(key, outcome.fence, result, "json", 60)


def test_records_of_the_earlier_layout_are_read(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    """Records written before the result pieces (the whole result in ``rs``, and ``sc``/``dg``
    fields) are replayed, listed, completed again and taken over as before."""
    now = int(store.now() * 1000)
    result = b"r" * 100
    done, running = rkey("old:scope"), rkey("old:scope")
    raw.hset(
        record_key(prefix, done),
        mapping={
            "st": "completed",
            "fe": "7",
            "fp": "fp",
            "ea": now + 60_000,
            "ca": now,
            "rs": result,
            "cd": "json",
            "sc": done.scope,
            "dg": done.digest,
        },
    )
    raw.pexpireat(record_key(prefix, done), now + 60_000)
    raw.hset(
        record_key(prefix, running),
        mapping={
            "st": "in_progress",
            "fe": "8",
            "fp": "fp",
            "lu": now + 60_000,
            "ea": now + 60_000,
            "ca": now,
            "sc": running.scope,
            "dg": running.digest,
        },
    )
    raw.pexpireat(record_key(prefix, running), now + 60_000)
    got = store.get(done)
    assert got is not None and (got.result, got.codec, got.fence) == (result, "json", 7)
    replay = store.claim(done, "fp", 5, 60)
    assert isinstance(replay, Replay) and replay.record.result == result
    assert isinstance(store.claim(done, "other", 5, 60), Mismatch)
    store.complete(done, 7, result, "json", 60)  # the lost-reply repeat of the old completion
    assert isinstance(store.claim(running, "fp", 5, 60), InFlight)
    store.complete(running, 8, result, "json", 60)
    assert raw.object("encoding", record_key(prefix, running)) == b"listpack"
    listed = {(r.scope, r.digest, r.result) for r in store.list("old:scope")}
    assert listed == {(k.scope, k.digest, result) for k in (done, running)}
    assert store.delete(done) and store.get(done) is None


EARLIER = Path(__file__).parent / "redis_earlier"


def earlier(raw: redis.Redis, script: str, numkeys: int, *args: Any) -> Any:
    """Run a script of the piece layout, the one before the compact completed records (its
    ``claim``, ``complete``, ``get`` and ``list``, kept in ``tests/redis_earlier``): what a
    build of that layout does on the same keys."""
    return raw.eval((EARLIER / f"{script}.lua").read_text(), numkeys, *args)


def test_records_of_the_piece_layout_are_read_and_finished(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    """Records written by the scripts of the layout before the compact completed records (st
    'completed', fp, ca, results in pieces with rn) are replayed, listed, repeated, completed,
    released, renewed and deleted by this build, whatever their size."""
    fence_key = f"{prefix}:fence"
    small, big = b'{"ok":1}', bytes(range(256)) * 2 + b"tail"
    fp = "ab" * 16
    keys = {name: rkey("old:scope") for name in ("small", "big", "running", "gives_up", "renews")}
    fences = {}
    for name, key in keys.items():
        reply = earlier(raw, "claim", 2, record_key(prefix, key), fence_key, fp, 5_000, 60_000)
        assert reply[0] == b"N"
        fences[name] = int(reply[2])
    for name, result in (("small", small), ("big", big)):
        args = (fences[name], result, "json", 60_000, store._channel(keys[name]))
        assert earlier(raw, "complete", 1, record_key(prefix, keys[name]), *args) == [b"ok"]
    assert b"rn" in raw.hgetall(record_key(prefix, keys["big"]))  # the piece layout's rn
    created = int(raw.hget(record_key(prefix, keys["small"]), "ca") or 0)
    for name, result in (("small", small), ("big", big)):
        key = keys[name]
        got = store.get(key)
        assert got is not None
        assert (got.result, got.fingerprint, got.fence) == (result, fp, fences[name])
        assert got.created_at == int(raw.hget(record_key(prefix, key), "ca") or 0) / 1000
        replay = store.claim(key, fp, 5, 60)
        assert isinstance(replay, Replay) and replay.record.result == result
        assert isinstance(store.claim(key, fp + "0", 5, 60), Mismatch)
        store.complete(key, fences[name], result, "json", 60)  # the lost-reply repeat
        with pytest.raises(LeaseLost, match="already completed"):
            store.complete(key, fences[name], result + b"x", "json", 60)
    assert created / 1000 in {r.created_at for r in store.list("old:scope")}
    assert {r.digest for r in store.list("old:scope")} == {k.digest for k in keys.values()}
    running = keys["running"]
    assert isinstance(store.claim(running, fp, 5, 60), InFlight)
    store.complete(running, fences["running"], big, "json", 60)
    st = raw.hget(record_key(prefix, running), "st") or b""
    assert unpack_status(st) == (fences["running"], 8)  # packed, in 9 pieces
    replay = store.claim(running, fp, 5, 60)
    assert isinstance(replay, Replay) and replay.record.result == big
    store.release(keys["gives_up"], fences["gives_up"])
    assert isinstance(store.claim(keys["gives_up"], fp, 5, 60), New)
    assert store.renew(keys["renews"], fences["renews"], 30) > store.now() + 20
    assert store.delete(keys["small"]) and store.get(keys["small"]) is None


def test_a_build_of_the_piece_layout_never_runs_a_compact_record_again(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    """A rolling upgrade: a build that reads only the earlier layout finds no ``fp`` in a compact
    completed record and answers Mismatch (a typed error, the call does not run), never New;
    it sees this build's claims in flight (their layout did not change)."""
    fence_key = f"{prefix}:fence"
    fp = "sha256:" + "9f" * 32
    for result in (b"r", b"x" * 100, b"y" * 2000):
        key = rkey("acme")
        outcome = store.claim(key, fp, 5, 60)
        assert isinstance(outcome, New)
        store.complete(key, outcome.fence, result, "json", 60)
        for fingerprint in (fp, "other"):
            name = record_key(prefix, key)
            reply = earlier(raw, "claim", 2, name, fence_key, fingerprint, 5_000, 60_000)
            assert reply[0] == b"M", reply
        assert earlier(raw, "get", 1, record_key(prefix, key)) is None
        replay = store.claim(key, fp, 5, 60)
        assert isinstance(replay, Replay) and replay.record.result == result
    running = rkey("acme")
    outcome = store.claim(running, fp, 5, 60)
    assert isinstance(outcome, New)
    reply = earlier(raw, "claim", 2, record_key(prefix, running), fence_key, fp, 5_000, 60_000)
    assert (reply[0], int(reply[2])) == (b"I", outcome.fence)


COMPACT = Path(__file__).parent / "redis_compact"


def compact_build(raw: redis.Redis, script: str, numkeys: int, *args: Any) -> Any:
    """Run a script of the compact layout, the one before the packed completed records (its
    ``claim``, ``complete``, ``get``, ``list``, ``renew``, ``release``, ``delete`` and the
    ``record.lua`` they include, kept as they were in ``tests/redis_compact``, put together
    by the store's own loader): what a build of that layout does."""
    return raw.eval(script_source(COMPACT, script), numkeys, *args)


def test_records_of_the_compact_layout_are_read_and_finished(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    """Records completed by a build of the compact layout (st 'c'/'cN', fe, ea, cd) are replayed,
    listed, repeated and deleted by this build; its claims in flight are seen, completed (now
    packed), released and renewed."""
    fence_key = f"{prefix}:fence"
    fp = "0123456789abcdef" * 2
    results = {
        "small": (b'"ok"', "json"),
        "pieces": (b"y" * 200, "json"),
        "pickled": (b"\x80K.", "pickle"),
    }
    keys = {name: rkey("cmp:scope") for name in (*results, "running", "gives_up", "renews")}
    fences = {}
    for name, key in keys.items():
        name_key = record_key(prefix, key)
        reply = compact_build(
            raw, "claim", 2, name_key, fence_key, fp, 5_000, 60_000, "", bytes.fromhex(fp)
        )
        assert reply[0] == b"N"
        fences[name] = int(reply[2])
    for name, (result, codec) in results.items():
        args = (fences[name], result, codec, 60_000, store._channel(keys[name]))
        assert compact_build(raw, "complete", 1, record_key(prefix, keys[name]), *args) == [b"ok"]
        fields = raw.hgetall(record_key(prefix, keys[name]))
        assert (int(fields[b"fe"]), fields[b"cd"]) == (fences[name], codec.encode())
        assert fields[b"st"] == (b"c3" if name == "pieces" else b"c")
    for name, (result, codec) in results.items():
        key = keys[name]
        expires = raw.pexpiretime(record_key(prefix, key)) / 1000
        got = store.get(key)
        assert got is not None
        assert (got.result, got.codec, got.fingerprint, got.fence) == (
            result,
            codec,
            fp,
            fences[name],
        )
        assert got.expires_at == expires
        replay = store.claim(key, fp, 5, 60)
        assert isinstance(replay, Replay) and replay.record.result == result
        assert isinstance(store.claim(key, fp + "0", 5, 60), Mismatch)
        store.complete(key, fences[name], result, codec, 60)  # the lost-reply repeat
        with pytest.raises(LeaseLost, match="already completed under this fence"):
            store.complete(key, fences[name], result + b"x", codec, 60)
        with pytest.raises(LeaseLost, match="already completed under this fence"):
            store.renew(key, fences[name], 5)
    listed = {r.digest: (r.result, r.codec) for r in store.list("cmp:scope")}
    assert {keys[n].digest: results[n] for n in results}.items() <= listed.items()
    running = keys["running"]
    assert isinstance(store.claim(running, fp, 5, 60), InFlight)
    store.complete(running, fences["running"], b"z" * 100, "json", 60)
    assert unpack_status(raw.hget(record_key(prefix, running), "st") or b"") == (
        fences["running"],
        1,
    )
    store.release(keys["gives_up"], fences["gives_up"])
    assert isinstance(store.claim(keys["gives_up"], fp, 5, 60), New)
    assert store.renew(keys["renews"], fences["renews"], 30) > store.now() + 20
    assert store.delete(keys["small"]) and store.get(keys["small"]) is None


def test_a_build_of_the_compact_layout_never_runs_a_packed_record_again(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    """A rolling upgrade: a build of the compact layout finds no ``fp`` in a packed completed
    record and answers Mismatch (typed, the call does not run), never New; its get and list do
    not see it; its complete, renew and release answer 'lost' with a status it can decode as
    text (its LeaseLost message), never the packed status's bytes raw; it sees this build's
    claims in flight (their layout did not change)."""
    fence_key = f"{prefix}:fence"
    fp = "sha256:" + "9f" * 32
    head, tail = "sha256:", b"\x9f" * 32
    for result in (b"r", b"x" * 100, b"y" * 2000):
        key = rkey("acme")
        name = record_key(prefix, key)
        outcome = store.claim(key, fp, 5, 60)
        assert isinstance(outcome, New)
        store.complete(key, outcome.fence, result, "json", 60)
        for fingerprint in (fp, "other"):
            reply = compact_build(
                raw, "claim", 2, name, fence_key, fingerprint, 5_000, 60_000, head, tail
            )
            assert reply[0] == b"M", reply
        assert compact_build(raw, "get", 1, name) is None
        assert compact_build(raw, "list", 1, name) == []
        channel = store._channel(key)
        for script, args in (
            ("complete", (outcome.fence, result, "json", 60_000, channel)),
            ("renew", (outcome.fence, 5_000)),
            ("release", (outcome.fence, channel, 1_000)),
        ):
            reply = compact_build(raw, script, 1, name, *args)
            assert reply[0] == b"lost", (script, reply)
            reply[1].decode("utf-8")  # as the compact build's _check_fenced does: text
        replay = store.claim(key, fp, 5, 60)
        assert isinstance(replay, Replay) and replay.record.result == result
    running = rkey("acme")
    outcome = store.claim(running, fp, 5, 60)
    assert isinstance(outcome, New)
    reply = compact_build(
        raw, "claim", 2, record_key(prefix, running), fence_key, fp, 5_000, 60_000, head, tail
    )
    assert (reply[0], int(reply[2])) == (b"I", outcome.fence)


def test_the_expiry_of_a_packed_record_without_pexpiretime() -> None:
    """Before Redis 7.0 there is no PEXPIRETIME: a packed record's expiry is then the server's
    TIME plus PTTL, to the millisecond (a server with the command renamed away stands in for
    such a Redis; with it, the expiry is exact: test_record_layout_and_pexpireat)."""
    server = ClusterNode("--rename-command", "PEXPIRETIME", "")
    store = RedisStore(server.url)
    raw = redis.Redis.from_url(server.url)
    try:
        key = RecordKey.of("acme", "no-pexpiretime")
        with pytest.raises(redis.ResponseError, match="unknown command"):
            raw.execute_command("PEXPIRETIME", "any")  # the server stands in for Redis 6
        outcome = store.claim(key, "fp", 5, 60)
        assert isinstance(outcome, New)
        before = store.now()
        store.complete(key, outcome.fence, b"done", "json", 120)
        after = store.now()
        for got in (store.get(key), store.list("acme")[0]):
            assert got is not None
            assert before + 120 - 0.002 <= got.expires_at <= after + 120 + 0.002
        replay = store.claim(key, "fp", 5, 60)
        assert isinstance(replay, Replay)
        assert before + 120 - 0.002 <= replay.record.expires_at <= after + 120 + 0.002
    finally:
        raw.close()
        store.close()
        server.stop()


#: A realistic 100-byte JSON result and the function decorator's fingerprint (32 hex digits).
RESULT_100 = b'{"order_id":"ord_0123456789","status":"paid","amount":1999,"currency":"EUR","ref":"'
RESULT_100 += b"x" * (100 - len(RESULT_100) - 2) + b'"}'
FINGERPRINT = "0123456789abcdef" * 2


def completed_usage(url: str, result: bytes, order: str) -> int:
    """``MEMORY USAGE`` (exact, key name included) of the completed record of ``result`` under
    the key ``order`` (scope ``billing.charge``, so a key name of 86 bytes)."""
    store = RedisStore(url)
    raw = redis.Redis.from_url(url)
    try:
        key = RecordKey.of("billing.charge", order)
        outcome = store.claim(key, FINGERPRINT, 5, 3600)
        assert isinstance(outcome, New)
        store.complete(key, outcome.fence, result, "json", 3600)
        used = raw.memory_usage(f"oncely:billing.charge:{key.digest}", samples=0)
        assert raw.object("encoding", f"oncely:billing.charge:{key.digest}") == b"listpack"
        return int(used)
    finally:
        raw.close()
        store.close()


def test_memory_usage_of_a_completed_key(private_redis: RedisServer) -> None:
    """Issue 13's target, 2x the result + 200 bytes, by ``MEMORY USAGE``: a 100-byte JSON result
    takes 328 bytes (392 in the piece layout, 1,016 before the result pieces), a 4-byte one 200
    (232 in the compact layout, 264 in the piece layout): the key name, its robj and dict entry
    take 136 of them whatever the hash holds, and the packed record's listpack is 64 bytes, the
    fence inside its status; see docs/redis.md."""
    assert len(RESULT_100) == 100
    assert completed_usage(private_redis.url, RESULT_100, "order-0001") <= 328 <= 2 * 100 + 200
    assert completed_usage(private_redis.url, b'"ok"', "order-0002") <= 2 * 4 + 200


def test_used_memory_per_completed_key_meets_the_target(private_redis: RedisServer) -> None:
    """Issue 13's target by the server's own count: ``used_memory`` grows by at most 2x the result
    + 200 bytes per completed key of a 100-byte result, with 10^5 keys (the expiry dict's entry
    and both dicts' buckets included: about 60 bytes over ``MEMORY USAGE``). The piece layout:
    453 bytes a key; this one 389."""
    store = RedisStore(private_redis.url)
    raw = redis.Redis.from_url(private_redis.url)
    count = 100_000
    try:
        warm = RecordKey.of("billing.charge", "warm")  # the store learns the server's clock
        store.claim(warm, FINGERPRINT, 60, 3600)
        store.delete(warm)
        empty = int(raw.info("memory")["used_memory"])
        for start in range(0, count, 2000):
            keys = [RecordKey.of("billing.charge", f"o-{i}") for i in range(start, start + 2000)]
            plans = [store._claim(k, FINGERPRINT, 60, 3600) for k in keys]
            claims = pipelined(raw, plans)
            plans = [
                store._complete(k, c.fence, RESULT_100, "json", 3600) for k, c in zip(keys, claims)
            ]
            pipelined(raw, plans)
        assert raw.dbsize() == count + 1  # and the fence counter
        per_key = (int(raw.info("memory")["used_memory"]) - empty) / count
        assert per_key <= 2 * len(RESULT_100) + 200, per_key
    finally:
        raw.close()
        store.close()


def pipelined(raw: redis.Redis, plans: list[Any]) -> list[Any]:
    """Run plans of one script call each (the store's own claim and complete) in one pipeline."""
    pipe = raw.pipeline(transaction=False)
    for plan in plans:
        request = next(plan)
        pipe.eval(request.script.source, request.numkeys, *request.keys_and_args)
    out = []
    for plan, reply in zip(plans, pipe.execute()):
        with pytest.raises(StopIteration) as stop:
            plan.send(reply)
        out.append(stop.value.value)
    return out


def test_renew_moves_pexpireat_when_the_lease_outgrows_the_ttl(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    key = rkey()
    outcome = store.claim(key, "fp", 5, 10)  # still held when renew comes, even after a stall
    assert isinstance(outcome, New)
    lease_until = store.renew(key, outcome.fence, 30)
    name = record_key(prefix, key)
    assert raw.pexpiretime(name) == round(lease_until * 1000)
    assert int(raw.hget(name, "ea") or 0) == round(lease_until * 1000)


def test_expired_records_disappear_by_themselves(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    key = rkey()
    outcome = store.claim(key, "fp", 0.05, 0.05)
    assert isinstance(outcome, New)
    store.complete(key, outcome.fence, b"r", "raw", 0.1)
    assert raw.exists(record_key(prefix, key))
    time.sleep(0.25)
    assert not raw.exists(record_key(prefix, key))
    assert store.purge_expired() == 0  # nothing left to purge: Redis expired it
    assert store.get(key) is None


def test_result_bytes_are_binary_safe(store: RedisStore) -> None:
    key = rkey()
    payload = bytes(range(256)) * 3 + b"\r\n\x00"
    outcome = store.claim(key, "fp", 5, 60)
    assert isinstance(outcome, New)
    store.complete(key, outcome.fence, payload, "pickle", 60)
    replay = store.claim(key, "fp", 5, 60)
    assert isinstance(replay, Replay)
    assert replay.record.result == payload
    assert replay.record.codec == "pickle"


def test_reclaim_fence_is_above_the_old_one_even_if_it_ran_ahead_of_the_clock(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    key = rkey()
    first = store.claim(key, "fp", 5, 60)
    assert isinstance(first, New)
    assert first.fence == int(raw.hget(record_key(prefix, key), "fe") or 0)
    assert first.fence > 1_600_000_000 * 10**6  # microseconds from TIME, exact as an int
    # An abandoned record whose fence is far ahead of the clock: the next fence is old + 1.
    ahead = first.fence + 10**12
    raw.hset(record_key(prefix, key), mapping={"fe": str(ahead), "lu": "0"})
    second = store.claim(key, "fp", 5, 60)
    assert isinstance(second, New)
    assert second.fence == ahead + 1


def test_new_lease_and_expiry_use_the_store_clock(store: RedisStore, raw: redis.Redis) -> None:
    key = rkey()
    outcome = store.claim(key, "fp", 2.5, 0)
    assert isinstance(outcome, New)
    assert outcome.lease_until == pytest.approx(outcome.now + 2.5, abs=1e-6)
    seconds, micros = raw.time()
    assert abs(outcome.now - (seconds + micros / 1e6)) < 1.0
    assert abs(store.now() - time.time()) < 5.0  # same machine, so roughly the same clock


# -- lost leases ----------------------------------------------------------------------------------
def test_lease_lost_says_why(store: RedisStore) -> None:
    key = rkey()
    old = store.claim(key, "fp", 0.05, 60)
    assert isinstance(old, New)
    time.sleep(0.1)
    new = store.claim(key, "fp", 5, 60)
    assert isinstance(new, New)
    assert new.fence > old.fence
    with pytest.raises(LeaseLost, match="re-claimed"):
        store.complete(key, old.fence, b"late", "raw", 60)
    with pytest.raises(LeaseLost, match="re-claimed"):
        store.renew(key, old.fence, 5)
    store.complete(key, new.fence, b"r", "raw", 60)
    with pytest.raises(LeaseLost, match="already completed"):
        store.release(key, new.fence)
    assert store.delete(key)
    with pytest.raises(LeaseLost, match="gone"):
        store.complete(key, new.fence, b"r", "raw", 60)


# -- list -----------------------------------------------------------------------------------------
def test_list_escapes_the_scope_and_skips_foreign_keys(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    keys = {scope: rkey(scope) for scope in ["a*", "ab", "a", "a:b", "[a]"]}
    for key in keys.values():
        assert isinstance(store.claim(key, "fp", 5, 60), New)
    # Keys under the prefix that are not records.
    raw.set(f"{prefix}:a:not-a-hash", b"x")
    raw.hset(f"{prefix}:a:other-hash", mapping={"foo": "bar"})
    raw.hset(f"{prefix}:a:bad-status", mapping={"st": "weird", "fe": "1", "ea": "9" * 15})

    def scopes(found: list[Any]) -> list[str]:
        return sorted(record.scope for record in found)

    assert scopes(store.list()) == sorted(keys)
    assert scopes(store.list("a*")) == ["a*"]
    assert scopes(store.list("a")) == ["a"]  # not "a:b", although its key matches "a:*"
    assert scopes(store.list("a:b")) == ["a:b"]
    assert scopes(store.list("[a]")) == ["[a]"]
    assert scopes(store.list("nope")) == []
    assert len(store.list(limit=2)) == 2
    assert store.list(limit=0) == []
    found = store.list("ab")
    assert found[0].digest == keys["ab"].digest
    assert found[0].status == "in_progress"


async def test_alist_and_anow(store: RedisStore) -> None:
    key = rkey("async-scope")
    assert isinstance(await store.aclaim(key, "fp", 5, 60), New)
    found = await store.alist("async-scope")
    assert [r.digest for r in found] == [key.digest]
    assert abs(await store.anow() - store.now()) < 1.0
    await store.aclose()


# -- watch ----------------------------------------------------------------------------------------
def numsub(raw: redis.Redis, prefix: str, key: RecordKey) -> int:
    channel = f"{prefix}:done:{key.scope}:{key.digest}"
    return int(dict(raw.pubsub_numsub(channel))[channel.encode()])


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
@pytest.mark.parametrize("how", ["complete", "release", "delete"])
def test_watch_wakes_on_publish(store: RedisStore, raw: redis.Redis, prefix: str, how: str) -> None:
    key = rkey()
    outcome = store.claim(key, "fp", 30, 60)
    assert isinstance(outcome, New)

    def finish() -> None:
        while numsub(raw, prefix, key) == 0:
            time.sleep(0.005)
        if how == "complete":
            store.complete(key, outcome.fence, b"r", "raw", 60)
        elif how == "release":
            store.release(key, outcome.fence)
        else:
            store.delete(key)

    thread = threading.Thread(target=finish)
    started = time.monotonic()
    thread.start()
    assert store.watch(key, outcome.fence, 10) is True
    thread.join()
    assert time.monotonic() - started < 5
    assert numsub(raw, prefix, key) == 0  # unsubscribed, connection handed back


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_watch_sees_a_change_that_happened_before_it_subscribed(store: RedisStore) -> None:
    key = rkey()
    outcome = store.claim(key, "fp", 30, 60)
    assert isinstance(outcome, New)
    store.complete(key, outcome.fence, b"r", "raw", 60)
    started = time.monotonic()
    assert store.watch(key, outcome.fence, 5) is True
    assert time.monotonic() - started < 1


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_watch_times_out_and_unsubscribes(store: RedisStore, raw: redis.Redis, prefix: str) -> None:
    key = rkey()
    outcome = store.claim(key, "fp", 30, 60)
    assert isinstance(outcome, New)
    started = time.monotonic()
    assert store.watch(key, outcome.fence, 0.2) is False
    assert 0.15 < time.monotonic() - started < 2
    assert numsub(raw, prefix, key) == 0
    assert store.watch(key, outcome.fence, 0) is False


@pytest.mark.serial  # asserts a wall-clock bound: run alone, after the parallel phase
def test_watch_returns_when_the_lease_runs_out(store: RedisStore) -> None:
    key = rkey()
    outcome = store.claim(key, "fp", 0.2, 60)
    assert isinstance(outcome, New)
    started = time.monotonic()
    assert store.watch(key, outcome.fence, 5) is True  # nobody published, but it is claimable
    assert time.monotonic() - started < 2
    assert isinstance(store.claim(key, "fp", 5, 60), New)


def test_watch_keeps_waiting_when_the_holder_renews(store: RedisStore) -> None:
    key = rkey()
    outcome = store.claim(key, "fp", 0.15, 60)
    assert isinstance(outcome, New)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(0.05):
            store.renew(key, outcome.fence, 0.15)

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        assert store.watch(key, outcome.fence, 0.6) is False
    finally:
        stop.set()
        thread.join()


async def test_awatch_wakes_on_complete(store: RedisStore, raw: redis.Redis, prefix: str) -> None:
    key = rkey()
    outcome = await store.aclaim(key, "fp", 30, 60)
    assert isinstance(outcome, New)
    waiter = asyncio.create_task(store.awatch(key, outcome.fence, 10))
    while numsub(raw, prefix, key) == 0:
        await asyncio.sleep(0.005)
    await store.acomplete(key, outcome.fence, b"r", "raw", 60)
    assert await asyncio.wait_for(waiter, 5) is True
    assert numsub(raw, prefix, key) == 0
    assert await store.awatch(key, outcome.fence, 1) is True  # already completed
    await store.aclose()


async def test_awatch_times_out(store: RedisStore) -> None:
    key = rkey()
    outcome = await store.aclaim(key, "fp", 30, 60)
    assert isinstance(outcome, New)
    assert await store.awatch(key, outcome.fence, 0.2) is False
    assert await store.awatch(key, outcome.fence, 0) is False
    await store.aclose()


async def test_cancelled_awatch_unsubscribes(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    key = rkey()
    outcome = await store.aclaim(key, "fp", 30, 60)
    assert isinstance(outcome, New)
    waiter = asyncio.create_task(store.awatch(key, outcome.fence, 30))
    while numsub(raw, prefix, key) == 0:
        await asyncio.sleep(0.005)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    deadline = time.monotonic() + 2
    while numsub(raw, prefix, key) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert numsub(raw, prefix, key) == 0
    await store.aclose()


# -- event loops ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the first loop's sockets, on purpose
def test_async_face_works_across_event_loops(store: RedisStore) -> None:
    key = rkey()

    async def claim(fingerprint: str, close: bool) -> Any:
        try:
            return await store.aclaim(key, fingerprint, 5, 60)
        finally:
            if close:
                await store.aclose()

    first = asyncio.run(claim("fp", close=False))  # this loop closes without aclose()
    assert isinstance(first, New)
    second = asyncio.run(claim("fp", close=True))  # a new loop gets its own client and pool
    assert isinstance(second, InFlight)
    assert second.fence == first.fence
    assert isinstance(asyncio.run(claim("other", close=True)), Mismatch)
    assert len(store.redis._aclients) == 0  # closed loops were forgotten, the others closed
    gc.collect()  # let the first loop's sockets go while their warnings are ignored


# -- configuration and failures -------------------------------------------------------------------
def test_open_store_picks_redis(prefix: str) -> None:
    store = open_store(REDIS_URL, prefix=prefix)
    try:
        assert isinstance(store, RedisStore)
        assert store.prefix == prefix
        assert "rediss" in RedisStore.schemes
    finally:
        store.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:6379/0",
        "redis://localhost:notaport/0",
        "redis://localhost:6379/notadb",
        "redis://localhost:6379/0?decode_responses=True",
    ],
)
def test_wrong_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisStore(url)


def test_wrong_options_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="prefix"):
        RedisStore(REDIS_URL, prefix="")
    with pytest.raises(ConfigurationError, match="decode_responses"):
        RedisStore(REDIS_URL, decode_responses=True)
    decoding = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    with pytest.raises(ConfigurationError, match="decode_responses"):
        RedisStore(REDIS_URL, client=decoding)
    decoding.close()


def test_password_is_redacted_in_repr() -> None:
    store = RedisStore(DEAD_URL)
    assert "s3cret" not in repr(store)
    assert "***" in repr(store)
    store.close()


def test_unreachable_server_is_store_unavailable() -> None:
    store = RedisStore(DEAD_URL)
    key = rkey()
    with pytest.raises(StoreUnavailable) as caught:
        store.claim(key, "fp", 5, 60)
    message = str(caught.value)
    assert "redis://oncely:***@127.0.0.1:1/0" in message
    assert "s3cret" not in message
    with pytest.raises(StoreUnavailable):
        store.complete(key, 1, b"r", "raw", 60)
    with pytest.raises(StoreUnavailable):
        store.now()
    with pytest.raises(StoreUnavailable):
        store.list()
    with pytest.raises(StoreUnavailable):
        store.watch(key, 1, 0.1)
    store.close()


async def test_unreachable_server_is_store_unavailable_async() -> None:
    store = RedisStore(DEAD_URL)
    key = rkey()
    with pytest.raises(StoreUnavailable, match=r"\*\*\*"):
        await store.aclaim(key, "fp", 5, 60)
    with pytest.raises(StoreUnavailable):
        await store.awatch(key, 1, 0.1)
    await store.aclose()


def test_other_redis_errors_are_store_errors(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    key = rkey()
    raw.set(record_key(prefix, key), b"not a hash")
    with pytest.raises(StoreError, match="WRONGTYPE") as caught:
        store.claim(key, "fp", 5, 60)
    assert not isinstance(caught.value, StoreUnavailable)


# -- a lost reply ---------------------------------------------------------------------------------
def test_a_lost_reply_to_complete_is_success_not_lease_lost(private_redis: RedisServer) -> None:
    # The reply to complete times out (a private server is frozen right after the call ran); the
    # complete lands once the server resumes, and the decorator's retry finds the record
    # completed under its own fence with its own result. That is success: the call ran once and
    # a second call replays. It used to raise LeaseLost ("another caller may have run it too").
    from oncely import idempotent

    probe = redis.Redis.from_url(private_redis.url)
    landed: list[Any] = []

    class FreezingStore(RedisStore):
        """Resumes the frozen server as soon as a complete's reply timed out, and waits
        until the server has run that complete (it answers a PING queued after it)."""

        def complete(self, *args: Any) -> None:
            try:
                super().complete(*args)
            except StoreUnavailable:
                private_redis.resume()
                probe.ping()
                landed.append(self.get(args[0]))
                raise

    store = FreezingStore(private_redis.url, socket_timeout=0.2)
    warm = rkey()  # load the scripts first: a frozen EVALSHA must not meet NOSCRIPT
    new = store.claim(warm, "fp", 30, 60)
    assert isinstance(new, New)
    store.complete(warm, new.fence, b"1", "json", 60)
    runs: list[str] = []

    @idempotent(store=store, key=["order"])
    def charge(order: str) -> int:
        runs.append(order)
        private_redis.pause()
        return 42

    try:
        assert charge("o-1") == 42
        assert charge("o-1") == 42
        assert runs == ["o-1"]
        # The scenario happened: the timed-out complete had landed before the retry.
        assert len(landed) == 1 and landed[0].status == "completed"
    finally:
        private_redis.resume()
        store.close()
        probe.close()


# -- the async hot path ---------------------------------------------------------------------------
async def test_async_claim_and_complete_answer_as_their_plans(prefix: str) -> None:
    """``aclaim`` and ``acomplete`` send their plan's one script without the plan driver (issue
    13: one coroutine and one generator less on every keyed request); every answer, error and
    stored byte is the plan's, run on the same store side by side."""
    from oncely.backends.plans import arun

    store = RedisStore(REDIS_URL, prefix=prefix)

    async def by_plan(op: str, *args: Any) -> Any:
        return await arun(getattr(store, f"_{op}")(*args), store._aexecute)

    try:
        fast, plan = rkey(), rkey()
        first = [
            await store.aclaim(fast, "fp-1", 5, 60),
            await by_plan("claim", plan, "fp-1", 5, 60),
        ]
        assert [type(o) for o in first] == [New, New]
        assert first[0].fence > 0 and first[1].fence > first[0].fence
        for fingerprint, kind in (("fp-1", InFlight), ("fp-2", Mismatch)):
            again = [
                await store.aclaim(fast, fingerprint, 5, 60),
                await by_plan("claim", plan, fingerprint, 5, 60),
            ]
            assert [type(o) for o in again] == [kind, kind]
        with pytest.raises(LeaseLost) as fast_lost:
            await store.acomplete(fast, first[0].fence + 1000, b"r", "raw", 60)
        with pytest.raises(LeaseLost) as plan_lost:
            await by_plan("complete", plan, first[1].fence + 1000, b"r", "raw", 60)
        # the same message, but for the digest and the fences
        assert re.sub(r"[0-9a-f]{16}…|\d+", "_", str(fast_lost.value)) == re.sub(
            r"[0-9a-f]{16}…|\d+", "_", str(plan_lost.value)
        )
        await store.acomplete(fast, first[0].fence, b"result \x00 bytes", "raw", 60)
        await by_plan("complete", plan, first[1].fence, b"result \x00 bytes", "raw", 60)
        replays = [await store.aclaim(fast, "fp-1", 5, 60), await store.aclaim(plan, "fp-1", 5, 60)]
        assert [type(o) for o in replays] == [Replay, Replay]
        fast_record, plan_record = (r.record for r in replays if isinstance(r, Replay))
        assert (
            (fast_record.result, fast_record.codec, fast_record.status)
            == (
                plan_record.result,
                plan_record.codec,
                plan_record.status,
            )
            == (b"result \x00 bytes", "raw", "completed")
        )
        assert isinstance(await store.aclaim(fast, "fp-2", 5, 60), Mismatch)
    finally:
        await store.aclose()
        store.close()
