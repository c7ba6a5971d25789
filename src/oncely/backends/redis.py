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
import weakref
from typing import Any, Final, NamedTuple, Protocol, cast
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MaxConnectionsError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from oncely.backends import budget as _budget
from oncely.backends.autopipe import AsyncPipeline, SyncPipeline
from oncely.backends.budget import PARTS, AsyncBoundedPool, BoundedPool, end, part, start
from oncely.backends.durable import (
    EvalWait,
    Exchange,
    Locate,
    Moved,
    eval_routed,
    eval_wait,
)
from oncely.backends.loops import LoopLocal
from oncely.backends.lua import Script, aevalsha, command, evalsha, is_noscript
from oncely.backends.plans import Command, Eval, Sleep, arun, run
from oncely.backends.urls import Number, check_numbers, check_options, query_options, redact_url
from oncely.core.cancelsafe import keep_cancel
from oncely.errors import ConfigurationError, ResultTooLarge, StoreError, StoreUnavailable
from oncely.settings import MAX_SECONDS

#: The smallest ``proto-max-bulk-len`` a Redis server accepts (1 MiB): only an argument larger
#: than this can be over a server's limit.
MIN_BULK_LIMIT: Final = 2**20

__all__ = [
    "CONNECT_TIMEOUT",
    "DRIVER_ERRORS",
    "MAX_CONNECTIONS",
    "MIN_BULK_LIMIT",
    "READ_TIMEOUT",
    "AsyncClient",
    "AsyncPubSub",
    "RedisClients",
    "SyncClient",
    "SyncPubSub",
    "ms",
    "waiting_aclient",
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


#: What redis-py raises: its errors, and the cluster client's own (not a RedisError).
DRIVER_ERRORS: Final = (RedisError, RedisClusterException)


def ms(seconds: float) -> int:
    """A duration in whole milliseconds for a script (negative durations count as zero)."""
    return max(0, round(seconds * 1000))


#: The words a flag option takes in a URL (or as text): on, and off ("" is off too).
_ON: Final = ("1", "true", "yes", "y", "on")
_OFF: Final = ("", "0", "false", "no", "n", "off")


def truthy(value: Any, name: str) -> bool:
    """A URL or keyword option ``name`` read as a flag: a bool, 0 or 1, or one of the words of
    :data:`_ON` / :data:`_OFF` (any case).

    :raises ConfigurationError: anything else (``autopipeline=fasle`` would otherwise have
        left the option on without a word).
    """
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _ON:
            return True
        if word in _OFF:
            return False
    elif isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ConfigurationError(
        f"Redis option {name}={value!r} is not valid: use 1/true/yes/on or 0/false/no/off"
    )


#: The numeric options redis-py reads (from a URL as plain numbers), checked when the client
#: is built: a negative ``socket_timeout`` would otherwise fail at the first command with a bare
#: ``ValueError``.
NUMBERS: Final = {
    "socket_timeout": Number(above=True, units=False),
    "socket_connect_timeout": Number(above=True, units=False),
    "timeout": Number(above=True, units=False),
    "pool_timeout": Number(above=True, units=False),
    "health_check_interval": Number(whole=True, maximum=MAX_SECONDS),
    "socket_read_size": Number(whole=True, minimum=1),
    "max_connections": Number(whole=True, minimum=1),
    "protocol": Number(whole=True, minimum=2, maximum=3),
}


def check_url(url: str) -> None:
    """Refuse what redis-py would misread: another scheme, a bad port, a non-numeric database,
    a query option it does not take (named with the closest one), an option given twice.

    :raises ConfigurationError: with an example of a good URL.
    """
    example = "e.g. 'redis://localhost:6379/0' or 'rediss://:password@host:6380/0'"
    if not isinstance(url, str):
        raise ConfigurationError(f"Redis URL must be a string, not {type(url).__name__}; {example}")
    if is_cluster(url):
        cluster_nodes(url)
        query = url.partition("?")[2]
        given = {k: v for k, v in query_options(query, url, "Redis Cluster URL").items()
                 if k not in URL_OWN_OPTIONS}  # fmt: skip
        if given:
            check_options(given, _options(url), url, "Redis Cluster URL")
            raise ConfigurationError(
                f"Redis Cluster URL {redact_url(url)!r}: options are not read from a cluster URL "
                f"({', '.join(sorted(given))}); pass them as keyword options instead, e.g. "
                "open_store('redis+cluster://10.0.0.1:7000,10.0.0.2:7000', socket_timeout=2)"
            )
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigurationError(
            f"Redis URL {redact_url(url)!r} is malformed ({exc}); {example}"
        ) from exc
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"Redis URL {redact_url(url)!r} must start with redis://, rediss:// (TLS), "
            f"unix:// or redis+cluster://; {example}"
        )
    if parts.scheme != "unix":
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigurationError(
                f"Redis URL {redact_url(url)!r}: the path must be a database number, not "
                f"{db!r}; {example}"
            )
    given = query_options(parts.query, url, "Redis URL")
    check_options(
        given, (_url_options(parts.scheme) - _OBJECT_OPTIONS) | URL_OWN_OPTIONS, url, "Redis URL"
    )
    check_numbers(given, NUMBERS, url, "Redis URL")


def own_url_options(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without oncely's own query options (:data:`URL_OWN_OPTIONS`, which redis-py
    would refuse), and those options (the last value of each)."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, {}
    pairs = [(k, v) for k, vs in parse_qs(query, keep_blank_values=True).items() for v in vs]
    own = {k: v for k, v in pairs if k in URL_OWN_OPTIONS}
    rest = [(k, v) for k, v in pairs if k not in URL_OWN_OPTIONS]
    return (f"{base}?{urlencode(rest)}" if rest else base), own


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
    return frozenset(names - _INTERNAL)


#: redis-py ``__init__`` parameters that are its own plumbing (set by redis-py itself, e.g. for
#: maintenance notifications), not options a user gives: neither accepted nor listed.
_INTERNAL: Final = frozenset(
    {
        "cache_factory",
        "command_packer",
        "event_dispatcher",
        "himport_registry",
        "maint_notifications_pool_handler",
        "maintenance_notification_hash",
        "maintenance_state",
        "orig_host_address",
        "orig_socket_connect_timeout",
        "orig_socket_timeout",
        "oss_cluster_maint_notifications_handler",
    }
)
#: Keyword options that take a Python object (a class, a callable, a client object): a URL
#: query cannot carry them, so a URL's unknown-option message does not list them.
_OBJECT_OPTIONS: Final = frozenset(
    {
        "connection_class",
        "credential_provider",
        "driver_info",
        "maint_notifications_config",
        "parser",
        "parser_class",
        "redis_connect_func",
        "retry",
        "socket_keepalive_options",
        "socket_type",
    }
)

#: oncely's options that a URL query may carry too (``redis://h:6379/0?wait_replicas=1``).
URL_OWN_OPTIONS: Final = frozenset(
    {"wait_replicas", "wait_timeout_ms", "pool_timeout", "autopipeline"}
)
#: The keyword options oncely itself reads (not redis-py's): see :class:`RedisClients`.
OWN_OPTIONS: Final = URL_OWN_OPTIONS
#: Connections per pool when ``max_connections`` is given neither as a keyword nor in the URL
#: (redis-py's own default size; its default pool does not wait, oncely's does).
MAX_CONNECTIONS: Final = 100
#: Milliseconds ``WAIT`` waits for the replicas unless ``wait_timeout_ms`` says otherwise.
WAIT_TIMEOUT_MS: Final = 500


class Durable(NamedTuple):
    """``WAIT replicas timeout_ms`` after each decision that must survive a failover."""

    replicas: int
    timeout_ms: int


def durable_options(
    replicas: Any, timeout_ms: Any, socket_timeout: float | None, where: str
) -> Durable | None:
    """The checked ``wait_replicas`` / ``wait_timeout_ms`` options; None when
    ``wait_replicas`` is 0 (no ``WAIT``).

    :raises ConfigurationError: not whole numbers, a negative count, a timeout under 1 ms, or a
        timeout not shorter than the socket timeout (the reply would never be waited for).
    """
    try:
        count, timeout = int(replicas), int(timeout_ms)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"Redis at {where}: wait_replicas and wait_timeout_ms must be whole numbers, not "
            f"{replicas!r} / {timeout_ms!r}; e.g. wait_replicas=1, wait_timeout_ms=500"
        ) from exc
    if count < 0 or timeout < 1:
        raise ConfigurationError(
            f"Redis at {where}: wait_replicas must be >= 0 and wait_timeout_ms >= 1, not "
            f"{count} / {timeout}; e.g. wait_replicas=1, wait_timeout_ms=500"
        )
    if count == 0:
        return None
    if socket_timeout is not None and timeout / 1000 >= socket_timeout:
        raise ConfigurationError(
            f"Redis at {where}: wait_timeout_ms={timeout} is not shorter than the socket "
            f"timeout ({socket_timeout} s), which bounds the wait for WAIT's reply; lower "
            "wait_timeout_ms or raise socket_timeout"
        )
    return Durable(count, timeout)


@functools.cache
def _cluster_options() -> frozenset[str]:
    """The keyword arguments both of redis-py's cluster clients (sync and asyncio) take."""
    names = []
    for cls in (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster):
        params = inspect.signature(cls.__init__).parameters.items()
        names.append(
            {
                name
                for name, param in params
                if name not in ("self", "host", "port", "startup_nodes")
                and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
            }
        )
    return frozenset(names[0] & names[1])


def _options(url: str) -> frozenset[str]:
    """The keyword options :class:`RedisClients` takes for ``url``: redis-py's for its scheme
    (the cluster clients' too for ``redis+cluster://``) and oncely's own
    (:data:`OWN_OPTIONS`)."""
    scheme = url.split("://", 1)[0].lower()
    if is_cluster(url):
        base = "rediss" if scheme.startswith("rediss") else "redis"
        return _url_options(base) | _cluster_options() | OWN_OPTIONS
    return _url_options(scheme) | OWN_OPTIONS


CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")


def is_cluster(url: str) -> bool:
    """True for a Redis Cluster URL (``redis+cluster://`` or ``rediss+cluster://``)."""
    return isinstance(url, str) and url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


class ClusterURL(NamedTuple):
    """The parts of ``redis+cluster://[user:password@]host:port,host:port,...``."""

    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None
    ssl: bool


def cluster_nodes(url: str) -> ClusterURL:
    """The startup nodes and credentials of a cluster URL.

    :raises ConfigurationError: no node, a node without a numeric port, or a database path
        (a cluster has database 0 only).
    """
    example = "e.g. 'redis+cluster://10.0.0.1:7000,10.0.0.2:7000'"
    where = redact_url(url)
    scheme, rest = url.split("://", 1)
    netloc, _, path = rest.split("?", 1)[0].partition("/")
    if path not in ("", "0"):
        raise ConfigurationError(
            f"Redis Cluster URL {where!r}: a cluster has only database 0, drop '/{path}'; {example}"
        )
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(
                f"Redis Cluster URL {where!r}: {item!r} is not host:port; {example}"
            )
        nodes.append((host.strip("[]"), int(port)))
    return ClusterURL(
        nodes,
        unquote(username) or None,
        unquote(password) or None,
        scheme.lower().startswith("rediss"),
    )


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


async def _aclose_pipeline(pipeline: AsyncPipeline) -> None:
    await pipeline.aclose()


def _drop_pipeline(pipeline: AsyncPipeline) -> None:
    pipeline.abandon()


async def _forget_lock(lock: asyncio.Lock) -> None:
    """A loop's init lock holds nothing to close."""


def _drop_lock(lock: asyncio.Lock) -> None:
    """A loop's init lock holds nothing to close."""


_REDIS_PACKAGE: Final = redis.__file__.rsplit("/", 1)[0] + "/"


def driver_fault(exc: BaseException) -> bool:
    """True for an ``AttributeError`` / ``TypeError`` raised inside redis-py, not by oncely.

    redis-py's asyncio connections can be torn down by one task while another uses them (its
    cluster client re-reads the slot map after ``MOVED`` and drops connections; redis-py
    issue 3546 and kin), which surfaces as ``'NoneType' object has no attribute
    'writelines'``. The command may or may not have been sent, so the caller must get
    :class:`~oncely.errors.StoreUnavailable`, never a bare traceback.
    """
    if not isinstance(exc, (AttributeError, TypeError)):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_REDIS_PACKAGE):
            return True
        tb = tb.tb_next
    return False


class _Translated:
    """``with _Translated(clients, budget):`` the async faces' one way to meet redis-py's
    errors: the block runs within ``budget`` (:func:`~oncely.backends.budget.start`), and a
    redis-py error, or an ``AttributeError`` / ``TypeError`` raised inside redis-py
    (:func:`driver_fault`), leaves it as ``clients.error(exc)`` (raised from it); anything
    else passes unchanged. A class, not a generator: it is on every async command."""

    __slots__ = ("_budget", "_clients", "_token")

    def __init__(self, clients: RedisClients, budget: float | None) -> None:
        self._clients = clients
        self._budget = budget

    def __enter__(self) -> None:
        self._token = start(self._budget)

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        try:
            if isinstance(exc, DRIVER_ERRORS) or (exc is not None and driver_fault(exc)):
                raise self._clients.error(cast(Exception, exc)) from exc
        finally:
            end(self._token)


def _blocking(budget: float | None, args: tuple[Any, ...]) -> float | None:
    """The budget of command ``args``: ``budget``, plus the seconds a ``BLPOP`` may block on
    the server before it answers (its last argument)."""
    if budget is not None and args and args[0] == "BLPOP":
        return budget + float(args[-1])
    return budget


def _pool_exhausted(exc: Exception) -> bool:
    return isinstance(exc, MaxConnectionsError) or "No connection available" in str(exc)


def _driver_query(url: str) -> dict[str, str]:
    """The query options of ``url`` (the last value of each)."""
    query = url.partition("?")[2]
    return {k: vs[-1] for k, vs in parse_qs(query, keep_blank_values=True).items()}


def waiting_aclient(url: str) -> redis.asyncio.Redis:
    """A plain :class:`redis.asyncio.Redis` for ``url`` (redis-py's options from its query,
    its defaults otherwise) on a pool that waits for a free connection: ``max_connections``
    (default :data:`MAX_CONNECTIONS`), waiting up to ``timeout`` seconds (default: the URL's
    ``socket_timeout``, else :data:`CONNECT_TIMEOUT`), then ``ConnectionError("No connection
    available.")``. For clients that run their own commands (the stream consumer's).

    :raises ValueError: a malformed URL (redis-py's)."""
    query = _driver_query(url)
    wait = float(query.get("timeout", query.get("socket_timeout", CONNECT_TIMEOUT)))
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=wait
    )
    return redis.asyncio.Redis.from_pool(pool)


class RedisClients:
    """The clients of one Redis URL, sync and async, and their plumbing.

    ``client`` / ``async_client`` use existing redis-py clients (not closed by :meth:`close` /
    :meth:`aclose`; they must not decode responses). Otherwise pools are opened from ``url``
    with ``pool_options`` (:meth:`redis.ConnectionPool.from_url`), bounded by :func:`bounded`.
    The pools do not retry a failed command: a write whose reply was lost may have run, so the
    error goes to the caller as :class:`~oncely.errors.StoreUnavailable`.

    Scripts (every decision) go through an auto-pipeline (:mod:`oncely.backends.autopipe`):
    one connection shared by the threads (group commit) and one per event loop, on which the
    scripts of concurrent callers share one write. ``autopipeline=False`` turns that off (each
    script then takes a pooled connection, as redis-py does); with ``client`` /
    ``async_client`` given, that face uses the given client as it is. Other commands
    (``TIME``, ``SCAN``, blocking ``BLPOP``, pub/sub) use the pools.

    Every pool is redis-py's blocking pool of ``max_connections`` (given as a keyword, in the
    URL, which wins as in redis-py, or :data:`MAX_CONNECTIONS`): a caller that finds every
    connection busy waits for one up to ``pool_timeout`` seconds (keyword or URL; default: the
    socket timeout, else 5 s), then gets :class:`~oncely.errors.StoreUnavailable` naming the
    pool size and the wait (redis-py's plain pools raise ``MaxConnectionsError`` at once). The
    sync Redis Cluster client's node pools wait too; redis-py's asyncio cluster client has no
    waiting pool. ``autopipeline`` may be given in the URL as well.

    Each operation (:meth:`call`, :meth:`eval`, :meth:`eval_wait` and their async faces) has
    one :attr:`budget` for all its waits, pool, connect, send and reply
    (:mod:`oncely.backends.budget`): the larger of ``socket_timeout`` and ``pool_timeout``.

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
        check_options(pool_options, _options(url), url, "Redis options for")
        check_numbers(pool_options, NUMBERS, url, "Redis options for")
        if truthy(pool_options.get("decode_responses", False), "decode_responses"):
            raise ConfigurationError(
                "decode_responses=True is not supported: oncely stores results as bytes"
            )
        self.url = url
        self.where = redact_url(url)
        driver_url, own = own_url_options(url)
        #: The URL redis-py opens (oncely's own query options taken out).
        self.driver_url = driver_url
        wait_replicas = pool_options.pop("wait_replicas", own.get("wait_replicas", 0))
        wait_timeout = pool_options.pop(
            "wait_timeout_ms", own.get("wait_timeout_ms", WAIT_TIMEOUT_MS)
        )
        autopipeline = truthy(
            pool_options.pop("autopipeline", own.get("autopipeline", True)), "autopipeline"
        )
        pool_timeout = pool_options.pop("pool_timeout", own.get("pool_timeout"))
        # The URL's own redis-py options (max_connections, socket_timeout, timeout) override
        # keywords in redis-py's from_url: read them here so the pool is sized and timed alike
        # however they are given.
        from_url = _driver_query(driver_url)
        if pool_timeout is None:
            pool_timeout = pool_options.get("timeout", from_url.get("timeout"))
        self.pool_options = bounded(url, pool_options)
        if "max_connections" in from_url:
            self.pool_options["max_connections"] = int(from_url["max_connections"])
        elif self.pool_options.get("max_connections") is None:
            self.pool_options["max_connections"] = MAX_CONNECTIONS
        if pool_timeout is None:
            read = from_url.get("socket_timeout", self.pool_options.get("socket_timeout"))
            pool_timeout = read if read is not None else CONNECT_TIMEOUT
        #: Seconds a caller waits for a free pooled connection before StoreUnavailable.
        self.pool_timeout = float(pool_timeout)
        read_timeout = from_url.get("socket_timeout", self.pool_options.get("socket_timeout"))
        #: Seconds one operation may take in all, pool wait, connecting, sending and the reply
        #: together (:mod:`oncely.backends.budget`): the larger of ``socket_timeout`` and
        #: ``pool_timeout``; None when ``socket_timeout`` is None (no bound).
        self.budget: float | None = (
            None if read_timeout is None else max(float(read_timeout), self.pool_timeout)
        )
        #: Connections in each pool (sync, and each event loop's).
        self.max_connections: int = self.pool_options["max_connections"]
        self.pool_options["timeout"] = self.pool_timeout
        # Always the blocking pools: redis-py's plain pools raise MaxConnectionsError at once
        # when every connection is busy, instead of waiting for one.
        # Their waits (pool, connect, send, reply) are cut to each operation's budget.
        self._pool_class: Any = BoundedPool
        self._apool_class: Any = AsyncBoundedPool
        #: True for a Redis Cluster URL (``redis+cluster://``): redis-py's cluster clients route
        #: each script by the slot of its keys (one slot per script: hash tags), and follow
        #: MOVED / ASK redirects; no auto-pipelining.
        self.cluster = is_cluster(url)
        #: The sync face's script client: the group-commit pipeline, or the plain client.
        self.scripts: SyncClient
        if self.cluster and client is None:
            self._pipeline = None
            autopipeline = False
            self.client = cast(SyncClient, self._open_cluster(redis.cluster))
            self._owns_client = True
        elif client is None:
            try:
                pool = self._pool_class.from_url(driver_url, **self.pool_options)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"cannot use Redis URL {self.where!r}: {exc}; e.g. 'redis://localhost:6379/0'"
                ) from exc
            if truthy(pool.connection_kwargs.get("decode_responses", False), "decode_responses"):
                raise ConfigurationError(
                    f"Redis URL {self.where!r} asks for decode_responses; oncely stores "
                    "results as bytes, so drop that option"
                )
            self.client = cast(SyncClient, redis.Redis.from_pool(pool))
            self._owns_client = True
            self._pipeline = (
                SyncPipeline(lambda: pool.connection_class(**pool.connection_kwargs), self.budget)
                if autopipeline
                else None
            )
        else:
            _check_decoding(client, "the Redis client")
            self.client = cast(SyncClient, client)
            self._owns_client = False
            self._pipeline = None
        self.scripts = cast(SyncClient, self._pipeline) if self._pipeline else self.client
        kwargs = getattr(getattr(self.client, "connection_pool", None), "connection_kwargs", None)
        if kwargs is None:
            kwargs = self.pool_options
        #: Seconds the sync client waits for each reply (None: without bound).
        self.socket_timeout: float | None = kwargs.get("socket_timeout")
        #: ``WAIT`` after decisions that must survive a failover (``wait_replicas``), or None.
        self.durable = durable_options(wait_replicas, wait_timeout, self.socket_timeout, self.where)
        if async_client is not None:
            _check_decoding(async_client, "the async Redis client")
        self._async_client = cast("AsyncClient | None", async_client)
        # One client per event loop, closed when the loop shuts down (or by aclose()).
        self._aclients = LoopLocal(self._new_aclient, _aclose_client, _drop_client)
        self._ready: weakref.WeakSet[Any] = weakref.WeakSet()
        self._init_locks = LoopLocal(asyncio.Lock, _forget_lock, _drop_lock)
        self._apipelines: LoopLocal[AsyncPipeline] | None = None
        if autopipeline and async_client is None:
            self._apipelines = LoopLocal(self._new_apipeline, _aclose_pipeline, _drop_pipeline)

    def error(self, exc: Exception) -> StoreError | ConfigurationError:
        """The oncely error for a redis-py error (a ConfigurationError for a cluster URL that
        names a server not in cluster mode)."""
        if self.cluster and "Cluster mode is not enabled" in str(exc):
            return ConfigurationError(
                f"Redis Cluster URL {self.where!r}: the server answering is not in cluster mode "
                f"({exc}); for a single server use redis://host:port/0 instead of "
                "redis+cluster://"
            )
        if _pool_exhausted(exc):
            waited = (
                "the pool does not wait (Redis Cluster, async)"
                if isinstance(exc, MaxConnectionsError)
                else f"waited pool_timeout={self.pool_timeout:g} s, or what was left of the "
                f"operation's {self.budget:g} s budget"
                if self.budget is not None and self.budget > self.pool_timeout
                else f"waited pool_timeout={self.pool_timeout:g} s"
            )
            return StoreUnavailable(
                f"no free connection to Redis at {self.where} ({type(exc).__name__}: {exc}): "
                f"all {self.max_connections} pooled connections were busy ({waited}); nothing "
                "was decided. Raise max_connections or pool_timeout, or lower the concurrency; "
                "if Redis is slow or stopped, every connection waits on it."
            )
        if driver_fault(exc):
            return StoreUnavailable(
                f"Redis at {self.where}: the connection was torn down while in use "
                f"({type(exc).__name__} inside redis-py: {exc}); the command may have run, so "
                "nothing can be assumed either way. Retry; if it keeps happening, lower the "
                "concurrency on one client."
            )
        if isinstance(exc, OutOfMemoryError):
            return StoreUnavailable(
                f"Redis at {self.where} is out of memory and refused the write ({exc}): the "
                "script stopped at its first write, so nothing was written and nothing was "
                "decided (fail closed). Free memory or raise maxmemory; keep maxmemory-policy "
                "noeviction (an evicting policy would drop records silently, and a repeated "
                "call would run again). `oncely check URL` shows the memory in use."
            )
        if isinstance(
            exc, (ClusterDownError, TryAgainError, AskError, ClusterError, RedisClusterException)
        ):
            return StoreUnavailable(
                f"Redis Cluster at {self.where} cannot serve the key now ({type(exc).__name__}: "
                f"{exc}): a failover or resharding is under way, or nodes are unreachable; "
                "nothing was decided, so retry shortly."
            )
        ran_out = part(exc) if isinstance(exc, RedisTimeoutError) else None
        if ran_out is not None:
            words, may_have_run = PARTS[ran_out]
            bound = (
                f"its {self.budget:g} s budget" if self.budget is not None else "its socket timeout"
            )
            outcome = (
                "the command may have run, so nothing can be assumed either way (a claim may "
                "hold its key until its lease ends)"
                if may_have_run
                else "nothing was sent, so nothing was decided"
            )
            return StoreUnavailable(
                f"Redis at {self.where} is unavailable: it did not answer in time, the operation "
                f"ran out of {bound} "
                f"(pool wait, connecting, sending and the reply together; the larger of "
                f"socket_timeout and pool_timeout) while {words} ({type(exc).__name__}: {exc}); "
                f"{outcome}. Check that Redis runs and is not overloaded or paused; retry once "
                "it answers."
            )
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            return StoreUnavailable(
                f"Redis at {self.where} is unavailable ({type(exc).__name__}: {exc}). Check that "
                "the server runs and that the host, port, password and TLS setting (rediss://) "
                "in the URL are right; nothing was decided, so retry once Redis is back."
            )
        return StoreError(f"Redis at {self.where} failed: {type(exc).__name__}: {exc}")

    def _oversized(self, exc: Exception, args: tuple[Any, ...]) -> tuple[int, bool]:
        """``(bytes of the largest argument, whether the server certainly refused it)``: the
        server answers a bulk string over its ``proto-max-bulk-len`` (1 MiB at the least) with
        "invalid bulk length", or, while a big one is still being sent, by hanging up."""
        largest = max(
            (len(a) for a in args if isinstance(a, (bytes, bytearray, memoryview, str))), default=0
        )
        if largest <= MIN_BULK_LIMIT:
            return 0, False
        return largest, isinstance(exc, ResponseError) and "invalid bulk length" in str(exc)

    def _too_large(self, exc: Exception, largest: int) -> ResultTooLarge:
        return ResultTooLarge(
            f"Redis at {self.where} refused a command with a {largest}-byte argument ({exc}): it "
            "is over the server's proto-max-bulk-len; raise that on the server (and the store's "
            "max_result_bytes with it), or return a smaller result",
            largest,
            MIN_BULK_LIMIT,
        )

    def refusal(self, exc: Exception, args: tuple[Any, ...]) -> Exception:
        """The oncely error for ``exc`` met sending ``args``: :class:`ResultTooLarge` when the
        server refused an argument for its size (a hang-up counts when the server still answers
        a ``PING`` right after: it is up, and closed on the oversized command), else
        :meth:`error`. Deterministic, so never an outage: retrying would meet it again."""
        largest, refused = self._oversized(exc, args)
        if largest and not refused and isinstance(exc, RedisConnectionError):
            token = start(self.budget)
            try:
                refused = bool(self.client.execute_command("PING"))
            except Exception:  # down after all: the outage it looked like
                refused = False
            finally:
                end(token)
        return self._too_large(exc, largest) if refused else self.error(exc)

    async def arefusal(self, exc: Exception, args: tuple[Any, ...]) -> Exception:
        """The async face of :meth:`refusal`."""
        largest, refused = self._oversized(exc, args)
        if largest and not refused and isinstance(exc, RedisConnectionError):
            token = start(self.budget)
            try:
                refused = bool(await (await self.aready()).execute_command("PING"))
            except Exception:  # down after all: the outage it looked like
                refused = False
            finally:
                end(token)
        return self._too_large(exc, largest) if refused else self.error(exc)

    # -- sync --------------------------------------------------------------------------------------
    def call(self, *args: Any) -> Any:
        """One command on the sync client, within one budget (:attr:`budget`; plus the
        seconds a ``BLPOP`` blocks on the server)."""
        token = start(_blocking(self.budget, args))
        try:
            return self.client.execute_command(*args)
        except DRIVER_ERRORS as exc:
            raise self.error(exc) from exc
        finally:
            end(token)

    def eval(self, script: Script, numkeys: int, *keys_and_args: Any) -> Any:
        """One script on the sync client (:func:`oncely.backends.lua.evalsha`); on a cluster,
        routed by oncely (:func:`oncely.backends.durable.eval_routed`). One budget
        (:attr:`budget`) for all of it: an ``EVAL`` after ``NOSCRIPT``, redirects."""
        token = start(self.budget)
        try:
            if self.cluster and self._owns_client:
                return run(eval_routed(script, numkeys, keys_and_args), self._wait_step)[0]
            return evalsha(self.scripts, script, numkeys, *keys_and_args)
        except DRIVER_ERRORS as exc:
            raise self.refusal(exc, keys_and_args) from exc
        finally:
            end(token)

    def execute(self, request: Any) -> Any:
        """The sync executor of plans: :class:`Eval`, :class:`Command`, :class:`Sleep`."""
        if type(request) is Eval:
            return self.eval(request.script, request.numkeys, *request.keys_and_args)
        if type(request) is Command:
            return self.call(*request.args)
        if type(request) is EvalWait:
            return self.eval_wait(request)
        if type(request) is Sleep:
            time.sleep(request.seconds)
            return None
        raise TypeError(f"not a Redis request: {request!r}")

    # -- EVALSHA + WAIT (oncely.backends.durable) -----------------------------------------------
    def _wait_plan(self, request: EvalWait) -> Any:
        durable = self.durable
        if durable is None:
            raise ConfigurationError("EvalWait without wait_replicas")  # pragma: no cover
        return eval_wait(
            request.script,
            request.numkeys,
            request.keys_and_args,
            durable.replicas,
            durable.timeout_ms,
        )

    def eval_wait(self, request: EvalWait) -> tuple[Any, int]:
        """One script then ``WAIT`` on one connection (:func:`oncely.backends.durable.eval_wait`):
        ``(script reply, replicas that acknowledged)``, within one budget."""
        token = start(self.budget)
        try:
            outcome: tuple[Any, int] = run(self._wait_plan(request), self._wait_step)
            return outcome
        except DRIVER_ERRORS as exc:
            raise self.error(exc) from exc
        finally:
            end(token)

    def _wait_step(self, request: Any) -> Any:
        kind = type(request)
        client: Any = self.client
        if kind is Exchange:
            if request.node is None:
                pool = client.connection_pool
            else:
                pool = client.get_redis_connection(self._node(client, request.node)).connection_pool
            try:
                connection = pool.get_connection()
                try:
                    connection.send_packed_command(connection.pack_commands(request.commands))
                    replies: list[Any] = []
                    for _ in request.commands:
                        try:
                            replies.append(connection.read_response(disconnect_on_error=False))
                        except ResponseError as exc:  # an error reply: the connection is fine
                            replies.append(exc)
                    return replies
                except BaseException:
                    connection.disconnect()
                    raise
                finally:
                    pool.release(connection)
            except (RedisConnectionError, RedisTimeoutError):
                if request.node is not None:
                    self._refresh_slots(client, request.node)
                raise
        if kind is Locate:
            if not self.cluster:
                return None
            node = client.get_node_from_key(request.key)
            return (node.host, int(node.port))
        if kind is Moved:
            client.nodes_manager.move_slot(request.error)
            return (request.error.host, int(request.error.port))
        return self.execute(request)

    @staticmethod
    def _refresh_slots(client: Any, address: tuple[str, int]) -> None:
        """After a connection error on a cluster node: re-read the slot map (the node may be
        dead and its slots served by a promoted replica), trying that node last, as redis-py's
        cluster client does; a failure here leaves the map for the next error."""
        manager = client.nodes_manager
        try:
            manager.move_node_to_end_of_cached_nodes(f"{address[0]}:{address[1]}")
            manager.initialize()
        except DRIVER_ERRORS:
            pass

    @staticmethod
    async def _arefresh_slots(client: Any, address: tuple[str, int]) -> None:
        """The async face of :meth:`_refresh_slots`."""
        manager = client.nodes_manager
        try:
            manager.move_node_to_end_of_cached_nodes(f"{address[0]}:{address[1]}")
            await manager.initialize()
        except DRIVER_ERRORS:
            pass

    @staticmethod
    def _node(client: Any, address: tuple[str, int]) -> Any:
        node = client.get_node(host=address[0], port=address[1])
        if node is None:
            raise ClusterError(f"node {address[0]}:{address[1]} is not in the slot map")
        return node

    async def aeval_wait(self, request: EvalWait) -> tuple[Any, int]:
        """The async face of :meth:`eval_wait`."""
        with _Translated(self, self.budget), keep_cancel():
            outcome: tuple[Any, int] = await arun(self._wait_plan(request), self._await_step)
            return outcome

    async def _aexchange(self, client: Any, request: Exchange) -> list[Any]:
        node: Any = None
        if request.node is None:
            pool = client.connection_pool
            connection = await pool.get_connection()
        else:
            node = self._node(client, request.node)
            connection = node.acquire_connection()
        try:
            await connection.send_packed_command(connection.pack_commands(request.commands))
            replies: list[Any] = []
            for _ in request.commands:
                try:
                    replies.append(await connection.read_response(disconnect_on_error=False))
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            if node is None:
                await pool.release(connection)
            else:
                node.release(connection)

    async def _await_step(self, request: Any) -> Any:
        kind = type(request)
        client: Any = await self.aready()
        if kind is Exchange:
            try:
                return await self._aexchange(client, request)
            except (RedisConnectionError, RedisTimeoutError):
                if request.node is not None:
                    await self._arefresh_slots(client, request.node)
                raise
        if kind is Locate:
            if not self.cluster:
                return None
            found = client.get_node_from_key(request.key)
            return (found.host, int(found.port))
        if kind is Moved:
            await client.nodes_manager.move_slot(request.error)
            return (request.error.host, int(request.error.port))
        return await self.aexecute(request)

    def memory(self) -> list[dict[str, Any]]:
        """``INFO memory`` of the server (of each primary of a cluster): dicts with ``node``
        (``host:port``), ``used_memory`` and ``maxmemory`` (bytes; 0 is no limit) and
        ``maxmemory_policy``.

        :raises StoreUnavailable: the server cannot be reached.
        """
        client: Any = self.client
        token = start(self.budget)
        try:
            if self.cluster:
                nodes = [
                    (f"{n.host}:{n.port}", client.get_redis_connection(n))
                    for n in client.get_primaries()
                ]
            else:
                kwargs = client.connection_pool.connection_kwargs
                nodes = [(f"{kwargs.get('host', 'unix')}:{kwargs.get('port', '')}", client)]
            rows = []
            for name, node in nodes:
                info = node.info("memory")
                rows.append(
                    {
                        "node": name,
                        "used_memory": int(info.get("used_memory", 0)),
                        "maxmemory": int(info.get("maxmemory", 0)),
                        "maxmemory_policy": str(info.get("maxmemory_policy", "")),
                    }
                )
            return rows
        except DRIVER_ERRORS as exc:
            raise self.error(exc) from exc
        finally:
            end(token)

    def pubsub(self) -> SyncPubSub:
        return self.client.pubsub()

    def close(self) -> None:
        """Close the sync pool (a client passed in is left to its owner), and forget the async
        clients of event loops that are not running."""
        if self._owns_client:
            self.client.close()
        if self._pipeline is not None:
            self._pipeline.close()
        self._aclients.close_idle()
        if self._apipelines is not None:
            self._apipelines.close_idle()

    # -- async -------------------------------------------------------------------------------------
    def _open_cluster(self, module: Any) -> Any:
        """A redis-py cluster client (``module``: :mod:`redis.cluster` or
        :mod:`redis.asyncio.cluster`) for the URL's startup nodes.

        It does not retry a command after a connection error or timeout (a write whose reply
        was lost may have run: the caller gets StoreUnavailable), but follows MOVED / ASK
        redirects, which say the command did not run where it was sent.

        A ``MOVED`` reply only patches the slot map (``reinitialize_steps=0`` unless given):
        redis-py's default (5) closes *every* connection of the client on each fifth ``MOVED``,
        the ones other callers are waiting on too (redis-py 8.1, asyncio
        ``RedisCluster._execute_command`` → ``aclose()``), so during a resharding scripts in
        flight lost their replies (``Connection lost``) and completions were not stored.
        """
        parts = cluster_nodes(self.url)
        options = dict(self.pool_options)
        options.setdefault("reinitialize_steps", 0)
        options.update(
            username=parts.username,
            password=parts.password,
            ssl=parts.ssl,
            retry=Retry(NoBackoff(), 0),
        )
        if module is redis.cluster:
            # Each node's pool waits up to pool_timeout for a free connection, as a single
            # node's does. redis-py's sync cluster client opens its nodes with
            # ``connection_pool_class`` only when given a ``url`` (the first startup node's;
            # the scheme says TLS), else plain pools that raise MaxConnectionsError at once.
            # The wait goes to the pools alone: plain clients do not take ``timeout``.
            # (redis-py's asyncio cluster has no waiting pool: it raises at once.)
            options["connection_pool_class"] = functools.partial(
                BoundedPool, timeout=options.pop("timeout")
            )
            host, port = parts.nodes[0]
            host = f"[{host}]" if ":" in host else host
            options["url"] = f"{'rediss' if options.pop('ssl') else 'redis'}://{host}:{port}/0"
        else:
            options.pop("timeout", None)
        nodes = [module.ClusterNode(host, port) for host, port in parts.nodes]
        try:
            cluster = module.RedisCluster(startup_nodes=nodes, **options)
            if module is not redis.cluster:
                # redis-py's asyncio cluster picks its connection class itself (SSL or not):
                # cut the waits of the one it picked to each operation's budget.
                for kwargs in (cluster.connection_kwargs, cluster.nodes_manager.connection_kwargs):
                    cls = kwargs.get("connection_class", redis.asyncio.Connection)
                    kwargs["connection_class"] = _budget.async_connection_class(cls)
                for node in cluster.nodes_manager.startup_nodes.values():
                    node.connection_class = _budget.async_connection_class(node.connection_class)
            return cluster
        except DRIVER_ERRORS as exc:
            raise self.error(exc) from exc
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"cannot use Redis Cluster URL {self.where!r}: {exc}; e.g. "
                "'redis+cluster://10.0.0.1:7000,10.0.0.2:7000'"
            ) from exc

    def _new_aclient(self) -> AsyncClient:
        if self.cluster:
            return cast(AsyncClient, self._open_cluster(redis.asyncio.cluster))
        pool = self._apool_class.from_url(self.driver_url, **self.pool_options)
        return cast(AsyncClient, redis.asyncio.Redis.from_pool(pool))

    def _new_apipeline(self) -> AsyncPipeline:
        pool: Any = cast(Any, self.aclient()).connection_pool
        return AsyncPipeline(lambda: pool.connection_class(**pool.connection_kwargs), self.budget)

    def ascripts(self) -> AsyncClient:
        """The running loop's script client: its auto-pipeline, or the plain client."""
        if self._apipelines is not None:
            return cast(AsyncClient, self._apipelines.get())
        return self.aclient()

    def aclient(self) -> AsyncClient:
        """The running loop's client (the one passed in as ``async_client``, if any)."""
        if self._async_client is not None:
            return self._async_client
        return self._aclients.get()

    async def aready(self) -> AsyncClient:
        """The running loop's client, ready for concurrent use.

        A cluster client is initialized (slot map, first connections) once, by one task:
        redis-py's asyncio cluster client fails some of many concurrent first commands
        (``Connection closed by server``, ``'NoneType' object has no attribute 'writelines'``)
        when they race its lazy initialization.
        """
        client = self.aclient()
        if self.cluster and client not in self._ready:
            async with self._init_locks.get():
                if client not in self._ready:
                    with keep_cancel():
                        await cast(Any, client).initialize()
                    self._ready.add(client)
        return client

    async def acall(self, *args: Any) -> Any:
        """The async face of :meth:`call`."""
        # keep_cancel: redis-py's wait_for can drop a cancel (Python 3.11)
        with _Translated(self, _blocking(self.budget, args)), keep_cancel():
            return await (await self.aready()).execute_command(*args)

    async def aeval(self, script: Script, numkeys: int, *keys_and_args: Any) -> Any:
        """The async face of :meth:`eval`."""
        token = None
        try:
            if self._apipelines is not None and not self.cluster:
                # The auto-pipeline awaits a plain future: no wait_for to drop a cancel. Both
                # sends share the operation's deadline.
                pipeline = self._apipelines.get()
                deadline = _budget.DEADLINE.get()
                if self.budget is not None:
                    mine = time.monotonic() + self.budget
                    deadline = mine if deadline is None or mine < deadline else deadline
                try:
                    return await pipeline.send_command(
                        command(script, numkeys, keys_and_args), deadline
                    )
                except ResponseError as exc:
                    if not is_noscript(exc):
                        raise
                return await pipeline.send_command(
                    command(script, numkeys, keys_and_args, source=True), deadline
                )
            token = start(self.budget)
            with keep_cancel():  # redis-py's wait_for can drop a cancel (Python 3.11)
                if self.cluster and self._async_client is None:
                    plan = eval_routed(script, numkeys, keys_and_args)
                    return (await arun(plan, self._await_step))[0]
                client = self.ascripts() if not self.cluster else await self.aready()
                return await aevalsha(client, script, numkeys, *keys_and_args)
        except DRIVER_ERRORS as exc:
            raise await self.arefusal(exc, keys_and_args) from exc
        except (AttributeError, TypeError) as exc:
            if driver_fault(exc):
                raise self.error(exc) from exc
            raise
        finally:
            end(token)

    async def aexecute(self, request: Any) -> Any:
        """The async executor of plans (see :meth:`execute`)."""
        if type(request) is Eval:
            return await self.aeval(request.script, request.numkeys, *request.keys_and_args)
        if type(request) is Command:
            return await self.acall(*request.args)
        if type(request) is EvalWait:
            return await self.aeval_wait(request)
        if type(request) is Sleep:
            await asyncio.sleep(request.seconds)
            return None
        raise TypeError(f"not a Redis request: {request!r}")

    def apubsub(self) -> AsyncPubSub:
        return self.aclient().pubsub()

    async def aclose(self) -> None:
        """Close the running loop's client and pool (``async_client`` is left to its owner)."""
        if self._apipelines is not None:
            await self._apipelines.aclose()
        if self._async_client is None:
            await self._aclients.aclose()
