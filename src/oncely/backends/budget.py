"""One time budget per Redis operation: pool wait, connecting, sending and the reply together.

redis-py bounds each wait on its own: a caller waits up to the pool's ``timeout`` for a free
connection, then up to ``socket_connect_timeout`` to connect, then up to ``socket_timeout`` for
each reply. Against a stopped server a call that got its connection late in the pool wait then
waited a whole socket timeout more: about twice the documented bound.

Here an operation starts a *deadline* (:func:`start`, a :class:`~contextvars.ContextVar`, so
per thread and per task) and redis-py's waits read what is left of it:

* :class:`BoundedPool` / :class:`AsyncBoundedPool`: the pool wait is ``min(pool timeout, time
  left)``;
* the connection classes of those pools (:func:`sync_connection_class`,
  :func:`async_connection_class`): connecting, the handshake, each write and each read wait
  at most the time left (and never more than their own timeouts).

Without a deadline (a command of redis-py's own, outside an oncely operation) they behave as
redis-py's. :class:`BudgetSpent` is the error of oncely's own waits (the auto-pipeline's queue);
:func:`part` names which wait ran out for any of them.
"""

from __future__ import annotations

import functools
import math
import time
from contextvars import ContextVar, Token
from typing import Any, Final, cast

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import SENTINEL

__all__ = [
    "DEADLINE",
    "AsyncBoundedPool",
    "BoundedPool",
    "BudgetSpent",
    "async_connection_class",
    "left",
    "part",
    "start",
    "sync_connection_class",
]

#: The monotonic time (:func:`time.monotonic`, the asyncio loop's clock too) by which the
#: current Redis operation must be done, or None outside one.
DEADLINE: Final[ContextVar[float | None]] = ContextVar("oncely_redis_deadline", default=None)

_monotonic: Final = time.monotonic

#: Seconds by which a wait may outlast its operation's deadline rather than be cut: a wait
#: whose own timeout ends at most this much after the deadline keeps that timeout. Without it
#: every operation would cut its socket's timeout (the budget is usually that very timeout, a
#: few microseconds of it already spent): two ``settimeout`` calls per write and per read.
SLACK: Final = 0.01


def start(budget: float | None) -> Token[float | None] | None:
    """Start an operation of ``budget`` seconds (None: no bound): its deadline, or the one
    already running if that is sooner (the operation is part of a larger one). Pass the token
    to :func:`end`."""
    if budget is None:
        return None
    deadline = _monotonic() + budget
    outer = DEADLINE.get()
    if outer is not None and outer < deadline:
        return None
    return DEADLINE.set(deadline)


def end(token: Token[float | None] | None) -> None:
    """End the operation :func:`start` began."""
    if token is not None:
        DEADLINE.reset(token)


def left(own: float | None) -> float | None:
    """``own`` (a timeout in seconds; None: without bound) cut to the time left of the running
    operation's budget (never negative); ``own`` itself (the same object) when it ends no
    more than :data:`SLACK` after the deadline."""
    deadline = DEADLINE.get()
    if deadline is None:
        return own
    rest = deadline - _monotonic()
    if own is not None and own <= rest + SLACK:
        return own
    return max(rest, 0.0)


class BudgetSpent(RedisTimeoutError):
    """An operation's budget ran out in one of oncely's own waits (``part``: ``"queue"``,
    waiting for its turn on the auto-pipeline, before anything was sent)."""

    def __init__(self, message: str, part: str) -> None:
        super().__init__(message)
        self.part = part


#: What each part means for the command: (words for the message, whether it may have run).
PARTS: Final = {
    "pool": ("waiting for a free pooled connection", False),
    "queue": ("waiting for its turn on the pipelined connection", False),
    "connect": ("connecting", False),
    "send": ("sending the command", True),
    "reply": ("waiting for the reply", True),
}


def part(exc: BaseException) -> str | None:
    """Which wait of an operation ``exc`` (a redis-py timeout or pool error) ended: a key of
    :data:`PARTS`, or None for an error that is no timeout."""
    if isinstance(exc, BudgetSpent):
        return exc.part
    text = str(exc)
    if isinstance(exc, RedisConnectionError) and "No connection available" in text:
        return "pool"
    if not isinstance(exc, RedisTimeoutError):
        return None
    if "connecting" in text:
        return "connect"
    if "writing" in text:
        return "send"
    return "reply"


# -- pools ----------------------------------------------------------------------------------------
class _BoundedWait:
    """Mixed into a redis-py blocking pool (sync or asyncio): its wait for a free connection,
    ``timeout`` (redis-py's own attribute, set by its ``__init__``), is cut to the time left."""

    _wait: float | None

    @property
    def timeout(self) -> float | None:
        return left(self._wait)

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._wait = value


class BoundedPool(_BoundedWait, redis.BlockingConnectionPool):
    """redis-py's blocking pool whose wait for a free connection is cut to the running
    operation's budget, and whose connections are cut to it too
    (:func:`sync_connection_class`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.connection_class = sync_connection_class(cast(Any, self.connection_class))


class AsyncBoundedPool(_BoundedWait, redis.asyncio.BlockingConnectionPool):
    """The asyncio face of :class:`BoundedPool`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_class = async_connection_class(cast(Any, self.connection_class))


# -- connections ----------------------------------------------------------------------------------
class _SyncBounded:
    """Mixed into a redis-py sync connection class: connecting (``socket_connect_timeout``),
    each write and each read (the handshake's too) wait at most the time left."""

    _sock: Any
    socket_timeout: float | None
    _socket_connect_timeout: float | None  # redis-py's own attribute

    @property
    def socket_connect_timeout(self) -> float | None:
        # 0 would make the socket non-blocking; a spent budget fails the connect at once anyway.
        wait = left(self._socket_connect_timeout)
        return None if wait is None else max(wait, 1e-6)

    @socket_connect_timeout.setter
    def socket_connect_timeout(self, value: float | None) -> None:
        self._socket_connect_timeout = value

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except RedisTimeoutError as exc:
            raise _connecting(exc) from exc

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        sock = self._sock
        own = self.socket_timeout
        wait = own if sock is None else left(own)
        if wait is own:  # no deadline, or more of it left than the socket's own timeout
            super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        # Cut to the time left: two settimeout calls, only on this (rare) path.
        sock.settimeout(None if wait is None else max(wait, 1e-6))
        try:
            super().send_packed_command(command, check_health)  # type: ignore[misc]
        finally:
            sock = self._sock
            if sock is not None:
                sock.settimeout(self.socket_timeout)

    def read_response(self, *args: Any, timeout: Any = SENTINEL, **kwargs: Any) -> Any:
        if timeout is SENTINEL:
            own = self.socket_timeout
            wait = left(own)
            if wait is not own and wait is not None:  # cut to the time left (else as it is)
                timeout = max(wait, 1e-6)
        return super().read_response(*args, timeout=timeout, **kwargs)  # type: ignore[misc]


class _AsyncBounded:
    """Mixed into a redis-py asyncio connection class: ``socket_timeout`` (each write and read)
    and ``socket_connect_timeout`` are cut to the time left."""

    _read_wait: float | None
    _connect_wait: float | None

    @property
    def socket_timeout(self) -> float | None:
        return left(self._read_wait)

    @socket_timeout.setter
    def socket_timeout(self, value: float | None) -> None:
        self._read_wait = value

    @property
    def socket_connect_timeout(self) -> float | None:
        return left(self._connect_wait)

    @socket_connect_timeout.setter
    def socket_connect_timeout(self, value: float | None) -> None:
        self._connect_wait = value

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except RedisTimeoutError as exc:
            raise _connecting(exc) from exc


def _connecting(exc: RedisTimeoutError) -> BudgetSpent:
    """A timeout while connecting (the TCP connect or the handshake's replies): nothing of the
    operation's command was sent."""
    if isinstance(exc, BudgetSpent):
        return exc
    return BudgetSpent(f"Timeout connecting to server ({exc})", "connect")


@functools.cache
def sync_connection_class(cls: type[Any]) -> type[Any]:
    """``cls`` (a redis-py sync connection class) with its waits cut to the budget."""
    if issubclass(cls, _SyncBounded):
        return cls
    return type(f"Bounded{cls.__name__}", (_SyncBounded, cls), {"__module__": __name__})


@functools.cache
def async_connection_class(cls: type[Any]) -> type[Any]:
    """``cls`` (a redis-py asyncio connection class) with its waits cut to the budget."""
    if issubclass(cls, _AsyncBounded):
        return cls
    return type(f"Bounded{cls.__name__}", (_AsyncBounded, cls), {"__module__": __name__})


def spent(deadline: float) -> bool:
    """True once ``deadline`` has passed (``math.inf``: never)."""
    return deadline != math.inf and _monotonic() >= deadline
