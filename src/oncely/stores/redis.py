"""The Redis store: one hash per record, every decision one Lua script.

Layout (``prefix`` defaults to ``"oncely"``):

* record ``f"{prefix}:{scope}:{digest}"``: a hash with short fields ``st`` status, ``fe`` fence,
  ``fp`` fingerprint, ``lu`` lease_until (ms), ``ea`` expires_at (ms), ``ca`` created_at (ms),
  ``rs`` result (bytes), ``cd`` codec, ``sc`` scope, ``dg`` digest. The key carries
  ``PEXPIREAT expires_at``, so Redis drops expired records by itself. ``release`` turns the
  record into a tombstone (``st`` = ``released``) that every reader ignores and any claim takes
  over, and that Redis drops after a minute: a release repeated after a lost reply finds it.
* fence counter ``f"{prefix}:fence"``: the last fence handed out, for every key; it never
  expires.
* channel ``f"{prefix}:done:{scope}:{digest}"``: ``complete``, ``release`` and ``delete`` publish
  on it in the same script, and :meth:`RedisStore.watch` listens to it.

Every operation is one ``EVALSHA`` of a script from ``oncely/stores/lua/`` (``EVAL`` once more
if the server answers ``NOSCRIPT``, which also puts the script back in its cache). The scripts
hold the whole decision and read the time with ``TIME``, so the client's clock never decides
anything. A fence is ``max(counter + 1, TIME in microseconds, old fence + 1)`` and the counter
keeps it, so the fences of a key grow whatever happened between two claims (release, delete,
expiry) and whatever the clock does.

The sync face uses :class:`redis.Redis`; the async face uses :class:`redis.asyncio.Redis`, one
client per running event loop (redis-py's asyncio connections belong to the loop that opened
them). Argument building and reply parsing are the plain functions below, shared by both faces.
"""

from __future__ import annotations

import builtins
import hashlib
import socket
import threading
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from oncely.cancelsafe import keep_cancel
from oncely.errors import ConfigurationError, LeaseLost, StoreError, StoreUnavailable
from oncely.records import ClaimOutcome, InFlight, Mismatch, New, Record, RecordKey, Replay, Status
from oncely.stores.base import Store, redact_url
from oncely.stores.loops import LoopLocal
from oncely.stores.polling import apoll_until, poll_until

__all__ = ["RedisStore"]


# redis-py leaves a few methods unannotated; these protocols give the ones used here a type.
class _SyncPubSub(Protocol):
    def subscribe(self, *channels: str) -> None: ...
    def get_message(self, timeout: float) -> dict[str, Any] | None: ...
    def close(self) -> None: ...


class _SyncClient(Protocol):
    def execute_command(self, *args: Any) -> Any: ...
    def pubsub(self) -> _SyncPubSub: ...
    def close(self) -> None: ...


class _AsyncPubSub(Protocol):
    async def subscribe(self, *channels: str) -> None: ...
    async def get_message(self, timeout: float) -> dict[str, Any] | None: ...
    async def aclose(self) -> None: ...


class _AsyncClient(Protocol):
    async def execute_command(self, *args: Any) -> Any: ...
    def pubsub(self) -> _AsyncPubSub: ...
    async def aclose(self) -> None: ...


class _Script:
    """A Lua script shipped in ``oncely/stores/lua``, called by its SHA-1."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = (resources.files("oncely.stores") / "lua" / f"{name}.lua").read_bytes()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest()


_CLAIM: Final = _Script("claim")
_COMPLETE: Final = _Script("complete")
_RELEASE: Final = _Script("release")
_RENEW: Final = _Script("renew")
_GET: Final = _Script("get")
_DELETE: Final = _Script("delete")
_PROBE: Final = _Script("probe")
_LIST: Final = _Script("list")

_STATUS: Final[dict[bytes, Status]] = {b"in_progress": "in_progress", b"completed": "completed"}
_SCAN_COUNT: Final = 500
# How long past the holder's lease a watcher waits before it looks again (the lease may have
# been renewed, which publishes nothing).
_LEASE_SLACK: Final = 0.002
# How long a released record stays as a hidden tombstone, so that a release repeated after a
# lost reply finds the caller's own tombstone (ms).
_TOMBSTONE_MS: Final = 60_000
_GLOB_SPECIAL: Final = str.maketrans({c: "\\" + c for c in "\\*?[]"})

#: Seconds to wait for a Redis connection to open, and for each reply, unless the URL
#: (``?socket_timeout=…``) or an option says otherwise: a server that stops answering (paused,
#: overloaded, cut off) fails the call with StoreUnavailable instead of hanging it.
CONNECT_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 5.0
#: TCP keepalive for pooled connections: probes after 5 s idle, 1 s apart, 3 of them, so an
#: idle connection the network cut off is dropped before it is used.
_KEEPALIVE: Final = {
    getattr(socket, opt): value
    for opt, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3))
    if hasattr(socket, opt)
}


# -- plain functions shared by the sync and async faces -------------------------------------------
def _ms(seconds: float) -> int:
    """A duration in whole milliseconds for the scripts (negative durations count as zero)."""
    return max(0, round(seconds * 1000))


def _record(scope: str, digest: str, f: Sequence[Any]) -> Record:
    """A :class:`Record` from the fields ``st fe fp lu ea ca rs cd`` (as HMGET returns them)."""
    lease_until = f[3]
    codec = f[7]
    return Record(
        scope,
        digest,
        _STATUS[f[0]],
        f[2].decode(),
        int(f[1]),
        None if lease_until is None else int(lease_until) / 1000,
        int(f[4]) / 1000,
        int(f[5]) / 1000,
        f[6],
        None if codec is None else codec.decode(),
    )


def _parse_claim(reply: Any, key: RecordKey) -> ClaimOutcome:
    kind = reply[0]
    now = int(reply[1]) / 1000
    if kind == b"R":
        return Replay(_record(key.scope, key.digest, reply[2]), now)
    if kind == b"N":
        return New(int(reply[2]), int(reply[3]) / 1000, now)
    if kind == b"I":
        return InFlight(int(reply[2]), int(reply[3]) / 1000, now)
    if kind == b"M":
        return Mismatch(now)
    raise StoreError(f"unexpected reply from claim.lua: {reply!r}")


def _check_fenced(reply: Any, op: str, key: RecordKey, fence: int) -> Any:
    """Return ``reply`` if the fenced script succeeded, else raise :class:`LeaseLost`."""
    if reply[0] == b"ok":
        return reply
    status, current = reply[1].decode(), reply[2].decode()
    if not status:
        why = (
            "the record is gone: it was released or deleted, or it expired after its lease ran out"
        )
    elif current == str(fence):
        why = f"the record is already {status} under this fence"
    else:
        why = (
            f"the lease ran out and another caller re-claimed the key (the record is {status} "
            f"under fence {current} now)"
        )
    raise LeaseLost(
        f"cannot {op} {key.scope!r}/{key.digest[:16]}… with fence {fence}: {why}. Whatever ran "
        "under the lost lease must not be trusted; the newer holder's record wins."
    )


def _parse_renew(reply: Any, key: RecordKey, fence: int) -> float:
    return int(_check_fenced(reply, "renew", key, fence)[1]) / 1000


def _parse_get(reply: Any, key: RecordKey) -> Record | None:
    return None if reply is None else _record(key.scope, key.digest, reply)


def _parse_time(reply: Any) -> float:
    seconds, micros = reply
    return int(seconds) + int(micros) / 1_000_000


def _parse_list(rows: Any, scope: str | None) -> builtins.list[Record]:
    """Records from list.lua's rows (``st fe fp lu ea ca rs cd sc dg``), in ``scope`` if given."""
    out = []
    for row in rows:
        row_scope = row[8].decode()
        if scope is None or row_scope == scope:
            out.append(_record(row_scope, row[9].decode(), row))
    return out


def _finish_list(records: builtins.list[Record], limit: int) -> builtins.list[Record]:
    records.sort(key=lambda r: (r.created_at, r.scope, r.digest))
    return records[:limit]


def _glob_escape(text: str) -> str:
    """Escape ``text`` for a SCAN MATCH pattern."""
    return text.translate(_GLOB_SPECIAL)


def _is_message(message: Any) -> bool:
    """True for a published message (not a subscribe confirmation)."""
    return message is not None and message.get("type") in ("message", b"message")


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "n", "off")
    return bool(value)


def _check_url(url: str) -> None:
    example = "e.g. 'redis://localhost:6379/0' or 'rediss://:password@host:6380/0'"
    if not isinstance(url, str):
        raise ConfigurationError(f"Redis URL must be a string, not {type(url).__name__}; {example}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigurationError(
            f"Redis URL {redact_url(url)!r} is malformed ({exc}); {example}"
        ) from exc
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"Redis URL {redact_url(url)!r} must start with redis://, rediss:// (TLS) or "
            f"unix://; {example}"
        )
    if parts.scheme != "unix":
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigurationError(
                f"Redis URL {redact_url(url)!r}: the path must be a database number, not "
                f"{db!r}; {example}"
            )


def _bounded(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Pool options with bounded network waits (:data:`CONNECT_TIMEOUT`, :data:`READ_TIMEOUT`)
    unless given; ``None`` given explicitly means no bound (redis-py's default before 8.0)."""
    out: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": READ_TIMEOUT,
    }
    if urlsplit(url).scheme != "unix":  # a Unix socket has no TCP keepalive
        out.update(socket_keepalive=True, socket_keepalive_options=_KEEPALIVE)
    out.update(options)
    return out


def _check_decoding(client: Any, what: str) -> None:
    try:
        decode = client.get_encoder().decode_responses
    except AttributeError:
        return
    if decode:
        raise ConfigurationError(
            f"{what} has decode_responses=True; oncely stores results as bytes, so pass a client "
            "created with decode_responses=False (the default)"
        )


async def _aclose_client(client: _AsyncClient) -> None:
    await client.aclose()


def _drop_client(client: _AsyncClient) -> None:
    """A client whose loop is closed cannot be closed any more: its sockets go with it."""


class RedisStore(Store):
    """Idempotency records in Redis (``redis://`` or ``rediss://``), via ``oncely[redis]``.

    ``client`` / ``async_client`` use existing redis-py clients (not closed by :meth:`close` /
    :meth:`aclose`; they must not decode responses). Otherwise the store opens its own pools
    from ``url``; ``pool_options`` go to :meth:`redis.ConnectionPool.from_url` (e.g.
    ``max_connections``, ``socket_timeout``) for the sync pool and to
    :meth:`redis.asyncio.ConnectionPool.from_url` for each event loop's pool. Connecting and
    each reply wait at most 5 s (:data:`CONNECT_TIMEOUT`, :data:`READ_TIMEOUT`; the URL query
    ``?socket_timeout=…&socket_connect_timeout=…`` or the options override them), so a server
    that stops answering fails a call with :class:`StoreUnavailable` instead of hanging it;
    TCP keepalive drops idle connections the network cut off. Those pools do not
    retry a failed command by default, and that is on purpose: a claim or complete whose reply
    was lost may have run, so the error goes to the caller as :class:`StoreUnavailable`.
    Call :meth:`aclose` in every event loop that used the async face before the loop ends.

    ``max_watchers`` bounds how many waiters hold a subscribed connection at once (per store);
    beyond it, waiters poll the record with backoff (1 ms doubling to 50 ms) instead.
    """

    schemes = ("redis", "rediss")

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "oncely",
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
        max_watchers: int = 16,
        **pool_options: Any,
    ) -> None:
        super().__init__(url)
        _check_url(url)
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(f"prefix must be a non-empty string, not {prefix!r}")
        if _truthy(pool_options.get("decode_responses", False)):
            raise ConfigurationError(
                "decode_responses=True is not supported: oncely stores results as bytes"
            )
        self.prefix = prefix
        self._done = f"{prefix}:done:"
        self._fence_key = f"{prefix}:fence"
        # Each subscribed waiter holds a connection; past this many, waiters poll instead, so a
        # burst of duplicates cannot drain the pool that claims and completions need.
        self._watch_slots = threading.BoundedSemaphore(max(1, max_watchers))
        pool_options = _bounded(url, pool_options)
        self._pool_options = pool_options
        if client is None:
            try:
                pool = redis.ConnectionPool.from_url(url, **pool_options)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"cannot use Redis URL {redact_url(url)!r}: {exc}; "
                    "e.g. 'redis://localhost:6379/0'"
                ) from exc
            if _truthy(pool.connection_kwargs.get("decode_responses", False)):
                raise ConfigurationError(
                    f"Redis URL {redact_url(url)!r} asks for decode_responses; oncely stores "
                    "results as bytes, so drop that option"
                )
            self._client = cast(_SyncClient, redis.Redis.from_pool(pool))
            self._owns_client = True
        else:
            _check_decoding(client, "the Redis client")
            self._client = cast(_SyncClient, client)
            self._owns_client = False
        kwargs = getattr(getattr(self._client, "connection_pool", None), "connection_kwargs", {})
        #: Seconds the sync face waits for each reply (None: without bound).
        self.socket_timeout: float | None = kwargs.get("socket_timeout")
        if async_client is not None:
            _check_decoding(async_client, "the async Redis client")
        self._async_client = cast("_AsyncClient | None", async_client)
        # One client per event loop, closed when the loop shuts down (or by aclose()).
        self._aclients = LoopLocal(self._new_aclient, _aclose_client, _drop_client)

    # -- keys and errors ---------------------------------------------------------------------------
    def _key(self, key: RecordKey) -> str:
        return f"{self.prefix}:{key.scope}:{key.digest}"

    def _channel(self, key: RecordKey) -> str:
        return f"{self._done}{key.scope}:{key.digest}"

    def _claim_args(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> tuple[Any, ...]:
        """claim.lua's keys and arguments."""
        record_key, counter = self._key(key), self._fence_key
        return record_key, counter, fingerprint, _ms(lease), _ms(ttl), key.scope, key.digest

    def _scan_pattern(self, scope: str | None) -> str:
        if scope is None:
            return f"{_glob_escape(self.prefix)}:*"
        return f"{_glob_escape(self.prefix)}:{_glob_escape(scope)}:*"

    def _error(self, exc: RedisError) -> StoreError:
        where = redact_url(self.url)
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            return StoreUnavailable(
                f"Redis at {where} is unavailable ({type(exc).__name__}: {exc}). Check that the "
                "server runs and that the host, port, password and TLS setting (rediss://) in "
                "the URL are right; nothing was decided, so retry once Redis is back."
            )
        return StoreError(f"Redis at {where} failed: {type(exc).__name__}: {exc}")

    # -- sync plumbing -----------------------------------------------------------------------------
    def _call(self, *args: Any) -> Any:
        try:
            return self._client.execute_command(*args)
        except RedisError as exc:
            raise self._error(exc) from exc

    def _eval(self, script: _Script, numkeys: int, *keys_and_args: Any) -> Any:
        client = self._client
        try:
            try:
                return client.execute_command("EVALSHA", script.sha, numkeys, *keys_and_args)
            except NoScriptError:
                return client.execute_command("EVAL", script.source, numkeys, *keys_and_args)
        except RedisError as exc:
            raise self._error(exc) from exc

    # -- sync face ---------------------------------------------------------------------------------
    def claim(self, key: RecordKey, fingerprint: str, lease: float, ttl: float) -> ClaimOutcome:
        reply = self._eval(_CLAIM, 2, *self._claim_args(key, fingerprint, lease, ttl))
        return _parse_claim(reply, key)

    def complete(self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float) -> None:
        reply = self._eval(
            _COMPLETE, 1, self._key(key), fence, result, codec, _ms(ttl), self._channel(key)
        )
        _check_fenced(reply, "complete", key, fence)

    def release(self, key: RecordKey, fence: int) -> None:
        reply = self._eval(_RELEASE, 1, self._key(key), fence, self._channel(key), _TOMBSTONE_MS)
        _check_fenced(reply, "release", key, fence)

    def renew(self, key: RecordKey, fence: int, lease: float) -> float:
        return _parse_renew(self._eval(_RENEW, 1, self._key(key), fence, _ms(lease)), key, fence)

    def get(self, key: RecordKey) -> Record | None:
        return _parse_get(self._eval(_GET, 1, self._key(key)), key)

    def delete(self, key: RecordKey) -> bool:
        return bool(self._eval(_DELETE, 1, self._key(key), self._channel(key)))

    def purge_expired(self, limit: int = 1000) -> int:
        """Return 0: every record carries ``PEXPIREAT expires_at``, so Redis drops it itself."""
        return 0

    def list(self, scope: str | None = None, limit: int = 100) -> builtins.list[Record]:
        """Up to ``limit`` live records (of ``scope``, if given), oldest first.

        SCANs the keyspace, so it is for inspection, not for the hot path; with a ``limit`` it
        stops early and returns the oldest of the records it found.
        """
        if limit <= 0:
            return []
        pattern = self._scan_pattern(scope)
        records: builtins.list[Record] = []
        cursor: Any = 0
        while True:
            cursor, keys = self._call(
                "SCAN", cursor, "MATCH", pattern, "COUNT", _SCAN_COUNT, "TYPE", "hash"
            )
            if keys:
                records += _parse_list(self._eval(_LIST, len(keys), *keys), scope)
            if int(cursor) == 0 or len(records) >= limit:
                return _finish_list(records, limit)

    def now(self) -> float:
        return _parse_time(self._call("TIME"))

    def watch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        """Wait until the record is no longer ``in_progress`` under ``fence``.

        Returns ``True`` as soon as it is completed, released, deleted, re-claimed, expired, or
        its lease ran out (a claim would take it over); ``False`` once ``timeout`` passed.
        """
        record_key, fence_arg = self._key(key), str(fence)
        if timeout <= 0:
            return bool(self._eval(_PROBE, 1, record_key, fence_arg) < 0)
        if not self._watch_slots.acquire(blocking=False):
            return poll_until(lambda: self._eval(_PROBE, 1, record_key, fence_arg) < 0, timeout)
        deadline = time.monotonic() + timeout
        pubsub = self._client.pubsub()
        try:
            try:
                # Subscribe (and wait for the confirmation) before looking at the record, so
                # that a completion right after the look cannot be missed.
                pubsub.subscribe(self._channel(key))
                while (left := deadline - time.monotonic()) > 0:
                    if pubsub.get_message(timeout=left) is not None:
                        break  # the confirmation: no message can come before it
            except RedisError as exc:
                raise self._error(exc) from exc
            while True:
                lease_ms = self._eval(_PROBE, 1, record_key, fence_arg)
                if lease_ms < 0:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait_until = time.monotonic() + min(left, lease_ms / 1000 + _LEASE_SLACK)
                try:
                    while (wait := wait_until - time.monotonic()) > 0:
                        if _is_message(pubsub.get_message(timeout=wait)):
                            return True
                except RedisError as exc:
                    raise self._error(exc) from exc
        finally:
            self._watch_slots.release()
            pubsub.close()

    def close(self) -> None:
        """Close the sync pool (a client passed in as ``client`` is left to its owner), and forget
        the async clients of event loops that are not running."""
        if self._owns_client:
            self._client.close()
        self._aclients.close_idle()

    # -- async plumbing ----------------------------------------------------------------------------
    def _new_aclient(self) -> _AsyncClient:
        pool = redis.asyncio.ConnectionPool.from_url(self.url, **self._pool_options)
        return cast(_AsyncClient, redis.asyncio.Redis.from_pool(pool))

    def _aclient(self) -> _AsyncClient:
        if self._async_client is not None:
            return self._async_client
        return self._aclients.get()

    async def _acall(self, *args: Any) -> Any:
        try:
            with keep_cancel():  # redis-py's wait_for can drop a cancel (Python 3.11)
                return await self._aclient().execute_command(*args)
        except RedisError as exc:
            raise self._error(exc) from exc

    async def _aeval(self, script: _Script, numkeys: int, *keys_and_args: Any) -> Any:
        client = self._aclient()
        try:
            with keep_cancel():  # redis-py's wait_for can drop a cancel (Python 3.11)
                try:
                    return await client.execute_command(
                        "EVALSHA", script.sha, numkeys, *keys_and_args
                    )
                except NoScriptError:
                    return await client.execute_command(
                        "EVAL", script.source, numkeys, *keys_and_args
                    )
        except RedisError as exc:
            raise self._error(exc) from exc

    # -- async face --------------------------------------------------------------------------------
    async def aclaim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome:
        reply = await self._aeval(_CLAIM, 2, *self._claim_args(key, fingerprint, lease, ttl))
        return _parse_claim(reply, key)

    async def acomplete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> None:
        reply = await self._aeval(
            _COMPLETE, 1, self._key(key), fence, result, codec, _ms(ttl), self._channel(key)
        )
        _check_fenced(reply, "complete", key, fence)

    async def arelease(self, key: RecordKey, fence: int) -> None:
        reply = await self._aeval(
            _RELEASE, 1, self._key(key), fence, self._channel(key), _TOMBSTONE_MS
        )
        _check_fenced(reply, "release", key, fence)

    async def arenew(self, key: RecordKey, fence: int, lease: float) -> float:
        reply = await self._aeval(_RENEW, 1, self._key(key), fence, _ms(lease))
        return _parse_renew(reply, key, fence)

    async def aget(self, key: RecordKey) -> Record | None:
        return _parse_get(await self._aeval(_GET, 1, self._key(key)), key)

    async def adelete(self, key: RecordKey) -> bool:
        return bool(await self._aeval(_DELETE, 1, self._key(key), self._channel(key)))

    async def apurge_expired(self, limit: int = 1000) -> int:
        """Return 0: Redis drops expired records by itself (see :meth:`purge_expired`)."""
        return 0

    async def alist(self, scope: str | None = None, limit: int = 100) -> builtins.list[Record]:
        """The async face of :meth:`list`."""
        if limit <= 0:
            return []
        pattern = self._scan_pattern(scope)
        records: builtins.list[Record] = []
        cursor: Any = 0
        while True:
            cursor, keys = await self._acall(
                "SCAN", cursor, "MATCH", pattern, "COUNT", _SCAN_COUNT, "TYPE", "hash"
            )
            if keys:
                records += _parse_list(await self._aeval(_LIST, len(keys), *keys), scope)
            if int(cursor) == 0 or len(records) >= limit:
                return _finish_list(records, limit)

    async def anow(self) -> float:
        """The async face of :meth:`now`."""
        return _parse_time(await self._acall("TIME"))

    async def awatch(self, key: RecordKey, fence: int, timeout: float) -> bool:
        """The async face of :meth:`watch`."""
        record_key, fence_arg = self._key(key), str(fence)
        if timeout <= 0:
            return bool(await self._aeval(_PROBE, 1, record_key, fence_arg) < 0)
        if not self._watch_slots.acquire(blocking=False):

            async def changed() -> bool:
                return bool(await self._aeval(_PROBE, 1, record_key, fence_arg) < 0)

            return await apoll_until(changed, timeout)
        deadline = time.monotonic() + timeout
        pubsub = self._aclient().pubsub()
        try:
            try:
                with keep_cancel():
                    await pubsub.subscribe(self._channel(key))
                    while (left := deadline - time.monotonic()) > 0:
                        if await pubsub.get_message(timeout=left) is not None:
                            break  # the confirmation: no message can come before it
            except RedisError as exc:
                raise self._error(exc) from exc
            while True:
                lease_ms = await self._aeval(_PROBE, 1, record_key, fence_arg)
                if lease_ms < 0:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait_until = time.monotonic() + min(left, lease_ms / 1000 + _LEASE_SLACK)
                try:
                    with keep_cancel():
                        while (wait := wait_until - time.monotonic()) > 0:
                            if _is_message(await pubsub.get_message(timeout=wait)):
                                return True
                except RedisError as exc:
                    raise self._error(exc) from exc
        finally:
            self._watch_slots.release()
            await pubsub.aclose()

    async def aclose(self) -> None:
        """Close the running loop's client and pool (``async_client`` is left to its owner)."""
        if self._async_client is None:
            await self._aclients.aclose()
