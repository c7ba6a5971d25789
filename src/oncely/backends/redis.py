"""Redis clients for one URL: bounded network waits, keepalive, one asyncio client per loop.

:class:`RedisClients` is what the Redis store and the Redis lock backend share: a sync
:class:`redis.Redis` (or the caller's), one :class:`redis.asyncio.Redis` per running event loop
(redis-py's asyncio connections belong to the loop that opened them; see
:class:`~oncely.backends.loops.LoopLocal`), the translation of driver errors into
:class:`~oncely.errors.StoreUnavailable` / :class:`~oncely.errors.StoreError`, and the executors
of :mod:`oncely.backends.plans` requests (:class:`~oncely.backends.plans.Eval`,
:class:`~oncely.backends.plans.Command`, :class:`~oncely.backends.plans.Sleep`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import socket
import time
from typing import Any, Final, Protocol, cast
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from oncely.backends.loops import LoopLocal
from oncely.backends.lua import Script, aevalsha, evalsha
from oncely.backends.plans import Command, Eval, Sleep
from oncely.backends.urls import check_options, redact_url
from oncely.core.cancelsafe import keep_cancel
from oncely.errors import ConfigurationError, StoreError, StoreUnavailable

__all__ = [
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "AsyncClient",
    "AsyncPubSub",
    "RedisClients",
    "SyncClient",
    "SyncPubSub",
    "ms",
]

#: Seconds to wait for a Redis connection to open, and for each reply, unless the URL
#: (``?socket_timeout=…``) or an option says otherwise: a server that stops answering (paused,
#: overloaded, cut off) fails the call with StoreUnavailable instead of hanging it.
CONNECT_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 5.0
#: TCP keepalive for pooled connections: probes after 5 s idle, 1 s apart, 3 of them, so an
#: idle connection the network cut off is dropped before it is used.
KEEPALIVE: Final = {
    getattr(socket, opt): value
    for opt, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3))
    if hasattr(socket, opt)
}


# redis-py leaves a few methods unannotated; these protocols give the ones used here a type.
class SyncPubSub(Protocol):
    def subscribe(self, *channels: str) -> None: ...
    def get_message(self, timeout: float) -> dict[str, Any] | None: ...
    def close(self) -> None: ...


class SyncClient(Protocol):
    def execute_command(self, *args: Any) -> Any: ...
    def pubsub(self) -> SyncPubSub: ...
    def close(self) -> None: ...


class AsyncPubSub(Protocol):
    async def subscribe(self, *channels: str) -> None: ...
    async def get_message(self, timeout: float) -> dict[str, Any] | None: ...
    async def aclose(self) -> None: ...


class AsyncClient(Protocol):
    async def execute_command(self, *args: Any) -> Any: ...
    def pubsub(self) -> AsyncPubSub: ...
    async def aclose(self) -> None: ...


def ms(seconds: float) -> int:
    """A duration in whole milliseconds for a script (negative durations count as zero)."""
    return max(0, round(seconds * 1000))


def truthy(value: Any) -> bool:
    """A URL or keyword option read as a flag (``"0"``, ``"false"``, ``"no"``, ``""`` are off)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "n", "off")
    return bool(value)


def check_url(url: str) -> None:
    """Refuse what redis-py would misread: another scheme, a bad port, a non-numeric database,
    a query option it does not take (named with the closest one).

    :raises ConfigurationError: with an example of a good URL.
    """
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
    given = parse_qs(parts.query, keep_blank_values=True)
    check_options(given, _url_options(parts.scheme), url, "Redis URL")


@functools.cache
def _url_options(scheme: str) -> frozenset[str]:
    """The query options redis-py takes in a ``scheme`` URL: its URL parsers, the pool's and
    the connection class's keyword arguments (a typo would fail only at the first command)."""
    connection = {
        "rediss": redis.connection.SSLConnection,
        "unix": redis.connection.UnixDomainSocketConnection,
    }.get(scheme, redis.connection.Connection)
    names = set(redis.connection.URL_QUERY_ARGUMENT_PARSERS)
    for cls in (*connection.__mro__, redis.connection.ConnectionPool):
        init = vars(cls).get("__init__")
        if init is not None:
            names.update(
                name
                for name, param in inspect.signature(init).parameters.items()
                if name != "self"
                and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
            )
    return frozenset(names)


def bounded(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Pool options with bounded network waits (:data:`CONNECT_TIMEOUT`, :data:`READ_TIMEOUT`)
    and TCP keepalive unless given; ``None`` given explicitly means no bound (redis-py's
    default before 8.0)."""
    out: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": READ_TIMEOUT,
    }
    if urlsplit(url).scheme != "unix":  # a Unix socket has no TCP keepalive
        out.update(socket_keepalive=True, socket_keepalive_options=KEEPALIVE)
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


async def _aclose_client(client: AsyncClient) -> None:
    await client.aclose()


def _drop_client(client: AsyncClient) -> None:
    """A client whose loop is closed cannot be closed any more: its sockets go with it."""


class RedisClients:
    """The clients of one Redis URL, sync and async, and their plumbing.

    ``client`` / ``async_client`` use existing redis-py clients (not closed by :meth:`close` /
    :meth:`aclose`; they must not decode responses). Otherwise pools are opened from ``url``
    with ``pool_options`` (:meth:`redis.ConnectionPool.from_url`), bounded by :func:`bounded`.
    The pools do not retry a failed command: a write whose reply was lost may have run, so the
    error goes to the caller as :class:`~oncely.errors.StoreUnavailable`.

    :raises ConfigurationError: a malformed URL or a decoding client.
    """

    def __init__(
        self,
        url: str,
        *,
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
        **pool_options: Any,
    ) -> None:
        check_url(url)
        # A misspelled option would fail only at the first command, with redis-py's TypeError.
        check_options(pool_options, _url_options(urlsplit(url).scheme), url, "Redis options for")
        if truthy(pool_options.get("decode_responses", False)):
            raise ConfigurationError(
                "decode_responses=True is not supported: oncely stores results as bytes"
            )
        self.url = url
        self.where = redact_url(url)
        self.pool_options = bounded(url, pool_options)
        if client is None:
            try:
                pool = redis.ConnectionPool.from_url(url, **self.pool_options)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"cannot use Redis URL {self.where!r}: {exc}; e.g. 'redis://localhost:6379/0'"
                ) from exc
            if truthy(pool.connection_kwargs.get("decode_responses", False)):
                raise ConfigurationError(
                    f"Redis URL {self.where!r} asks for decode_responses; oncely stores "
                    "results as bytes, so drop that option"
                )
            self.client = cast(SyncClient, redis.Redis.from_pool(pool))
            self._owns_client = True
        else:
            _check_decoding(client, "the Redis client")
            self.client = cast(SyncClient, client)
            self._owns_client = False
        kwargs = getattr(getattr(self.client, "connection_pool", None), "connection_kwargs", {})
        #: Seconds the sync client waits for each reply (None: without bound).
        self.socket_timeout: float | None = kwargs.get("socket_timeout")
        if async_client is not None:
            _check_decoding(async_client, "the async Redis client")
        self._async_client = cast("AsyncClient | None", async_client)
        # One client per event loop, closed when the loop shuts down (or by aclose()).
        self._aclients = LoopLocal(self._new_aclient, _aclose_client, _drop_client)

    def error(self, exc: RedisError) -> StoreError:
        """The oncely error for a redis-py error."""
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            return StoreUnavailable(
                f"Redis at {self.where} is unavailable ({type(exc).__name__}: {exc}). Check that "
                "the server runs and that the host, port, password and TLS setting (rediss://) "
                "in the URL are right; nothing was decided, so retry once Redis is back."
            )
        return StoreError(f"Redis at {self.where} failed: {type(exc).__name__}: {exc}")

    # -- sync --------------------------------------------------------------------------------------
    def call(self, *args: Any) -> Any:
        """One command on the sync client."""
        try:
            return self.client.execute_command(*args)
        except RedisError as exc:
            raise self.error(exc) from exc

    def eval(self, script: Script, numkeys: int, *keys_and_args: Any) -> Any:
        """One script on the sync client (:func:`oncely.backends.lua.evalsha`)."""
        try:
            return evalsha(self.client, script, numkeys, *keys_and_args)
        except RedisError as exc:
            raise self.error(exc) from exc

    def execute(self, request: Any) -> Any:
        """The sync executor of plans: :class:`Eval`, :class:`Command`, :class:`Sleep`."""
        if type(request) is Eval:
            return self.eval(request.script, request.numkeys, *request.keys_and_args)
        if type(request) is Command:
            return self.call(*request.args)
        if type(request) is Sleep:
            time.sleep(request.seconds)
            return None
        raise TypeError(f"not a Redis request: {request!r}")

    def pubsub(self) -> SyncPubSub:
        return self.client.pubsub()

    def close(self) -> None:
        """Close the sync pool (a client passed in is left to its owner), and forget the async
        clients of event loops that are not running."""
        if self._owns_client:
            self.client.close()
        self._aclients.close_idle()

    # -- async -------------------------------------------------------------------------------------
    def _new_aclient(self) -> AsyncClient:
        pool = redis.asyncio.ConnectionPool.from_url(self.url, **self.pool_options)
        return cast(AsyncClient, redis.asyncio.Redis.from_pool(pool))

    def aclient(self) -> AsyncClient:
        """The running loop's client (the one passed in as ``async_client``, if any)."""
        if self._async_client is not None:
            return self._async_client
        return self._aclients.get()

    async def acall(self, *args: Any) -> Any:
        """The async face of :meth:`call`."""
        try:
            with keep_cancel():  # redis-py's wait_for can drop a cancel (Python 3.11)
                return await self.aclient().execute_command(*args)
        except RedisError as exc:
            raise self.error(exc) from exc

    async def aeval(self, script: Script, numkeys: int, *keys_and_args: Any) -> Any:
        """The async face of :meth:`eval`."""
        try:
            with keep_cancel():  # redis-py's wait_for can drop a cancel (Python 3.11)
                return await aevalsha(self.aclient(), script, numkeys, *keys_and_args)
        except RedisError as exc:
            raise self.error(exc) from exc

    async def aexecute(self, request: Any) -> Any:
        """The async executor of plans (see :meth:`execute`)."""
        if type(request) is Eval:
            return await self.aeval(request.script, request.numkeys, *request.keys_and_args)
        if type(request) is Command:
            return await self.acall(*request.args)
        if type(request) is Sleep:
            await asyncio.sleep(request.seconds)
            return None
        raise TypeError(f"not a Redis request: {request!r}")

    def apubsub(self) -> AsyncPubSub:
        return self.aclient().pubsub()

    async def aclose(self) -> None:
        """Close the running loop's client and pool (``async_client`` is left to its owner)."""
        if self._async_client is None:
            await self._aclients.aclose()
