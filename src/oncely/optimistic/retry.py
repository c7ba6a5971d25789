"""Retrying a read-modify-write that lost a version race (optimistic locking, source §3.3).

A versioned write (:func:`oncely.sql.versioned_update`,
:class:`oncely.optimistic.redis.RedisVersioned`, a Django or SQLAlchemy versioned model, an
HTTP ``If-Match``) refuses to
overwrite what someone else wrote after you read it: it raises
:class:`~oncely.errors.StaleVersion` and writes nothing (source §3.3). The caller then has to
read again, recompute and write again. :func:`retry_on_conflict` is that loop::

    from oncely.optimistic import retry_on_conflict
    from oncely.sql import versioned_update

    @retry_on_conflict(attempts=10)
    def deposit(conn, account_id, amount):
        with conn:                                  # one transaction per attempt
            balance, version = conn.execute(
                "SELECT balance, version FROM accounts WHERE id = ?", (account_id,)
            ).fetchone()
            return versioned_update(conn, "accounts", account_id,
                                    {"balance": balance + amount}, expected_version=version)

The function must do the whole read-modify-write on every call (read inside the attempt, not
before it), and undo its own partial work when it raises (a ``with conn:`` / ``session.begin()``
block per attempt does).

Waits between attempts follow "exponential backoff with full jitter" (Marc Brooker, AWS
Architecture Blog, 2015): before attempt ``n + 1`` sleep a uniformly random time in
``[0, min(max_delay, base_delay * 2 ** (n - 1))]`` seconds, which spreads contending writers
apart instead of making them collide again in lock step. The decision (retry or give up, and
how long to wait) is :meth:`ConflictRetry.next_delay`, shared by the sync and async faces.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast, overload

from oncely.core.calls import is_async_callable
from oncely.errors import ConfigurationError, StaleVersion
from oncely.settings import seconds

__all__ = ["ATTEMPTS", "BASE_DELAY", "MAX_DELAY", "ConflictRetry", "retry_on_conflict"]

#: Default number of attempts (the first call included).
ATTEMPTS: Final = 10
#: Default cap of the first wait, in seconds (doubles per attempt, see the module docstring).
BASE_DELAY: Final = 0.005
#: Default cap of any wait, in seconds.
MAX_DELAY: Final = 0.5

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

OnRetry = Callable[[BaseException, int, float], None]


@dataclass(frozen=True, slots=True)
class ConflictRetry:
    """The retry decision of :func:`retry_on_conflict` (sans-IO: no sleeping, no calling).

    ``attempts`` counts calls, the first one included (``1`` never retries). ``base_delay`` and
    ``max_delay`` are seconds. ``retry_on`` is an exception class, a tuple of them, or a
    predicate ``exc -> bool`` (default: :class:`~oncely.errors.StaleVersion` only; add your
    driver's serialization failures here if you run at SERIALIZABLE / REPEATABLE READ).
    ``on_retry(exc, attempt, delay)`` is called before each wait (logging, metrics).

    :raises ConfigurationError: on a non-positive ``attempts``, a negative delay, or
        ``base_delay`` above ``max_delay`` (the cap would make every wait ``max_delay``'s
        jitter, never the doubling asked for: say which one you mean).
    """

    attempts: int = ATTEMPTS
    base_delay: float = BASE_DELAY
    max_delay: float = MAX_DELAY
    retry_on: Any = StaleVersion
    on_retry: OnRetry | None = None

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigurationError(f"attempts must be an int >= 1, not {self.attempts!r}")
        if self.attempts < 1:
            raise ConfigurationError(
                f"attempts must be >= 1 (1 means no retry), not {self.attempts}"
            )
        # A frozen dataclass: the checked seconds (units allowed) replace what was given.
        for name in ("base_delay", "max_delay"):
            value = seconds(getattr(self, name), name, where="ConflictRetry", above=False)
            object.__setattr__(self, name, value)
        if self.base_delay > self.max_delay:
            raise ConfigurationError(
                f"base_delay ({self.base_delay}s) must not be above max_delay "
                f"({self.max_delay}s): max_delay caps every wait, so the doubling from "
                "base_delay would never happen; lower base_delay or raise max_delay"
            )
        rule = self.retry_on
        ok = callable(rule) and not isinstance(rule, type)
        ok = ok or (isinstance(rule, type) and issubclass(rule, BaseException))
        ok = ok or (
            isinstance(rule, tuple)
            and bool(rule)
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in rule)
        )
        if not ok:
            raise ConfigurationError(
                f"retry_on must be an exception class, a tuple of them or a predicate "
                f"exc -> bool, not {rule!r}"
            )

    def retries(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a conflict worth another attempt."""
        rule = self.retry_on
        if isinstance(rule, (type, tuple)):
            return isinstance(exc, rule)
        return bool(rule(exc))

    def next_delay(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before the next attempt after attempt number ``attempt`` (1-based)
        raised ``exc``, or ``None`` to give up and let ``exc`` propagate."""
        if attempt >= self.attempts or not self.retries(exc):
            return None
        cap = min(self.max_delay, self.base_delay * (2.0 ** min(attempt - 1, 60)))
        delay = random.uniform(0.0, cap)  # full jitter
        if self.on_retry is not None:
            self.on_retry(exc, attempt, delay)
        return delay

    # -- the two faces -------------------------------------------------------------------------
    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` until it returns, retrying conflicts."""
        attempt = 1
        while True:
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                delay = self.next_delay(exc, attempt)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    async def acall(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """The async face of :meth:`call`: awaits ``fn(*args, **kwargs)``, sleeps with
        :func:`asyncio.sleep` (a cancel during the wait or the call propagates at once)."""
        attempt = 1
        while True:
            try:
                return await fn(*args, **kwargs)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                delay = self.next_delay(exc, attempt)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    def wrap(self, fn: F) -> F:
        """``fn`` retried on conflicts: an async wrapper for a coroutine function, else sync.

        :raises ConfigurationError: ``fn`` is a generator or async generator function: calling
            it only creates the generator, its body (and its conflict) runs later while the
            caller iterates, outside any retry, and items already handed out cannot be taken
            back. Retry a function that consumes it (``list(gen())``) instead.
        """
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            kind = "an async generator" if inspect.isasyncgenfunction(fn) else "a generator"
            raise ConfigurationError(
                f"retry_on_conflict cannot retry {kind} function "
                f"({getattr(fn, '__qualname__', fn)!r}): calling it only creates the "
                "generator, its body runs later while you iterate, outside the retry, and "
                "what it already yielded cannot be taken back; retry a function that runs "
                "it to the end (e.g. returns list(gen())) instead"
            )
        if is_async_callable(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await self.acall(fn, *args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self.call(fn, *args, **kwargs)

        return cast(F, wrapper)


@overload
def retry_on_conflict(
    fn: F,
    /,
    *,
    attempts: int = ...,
    base_delay: float = ...,
    max_delay: float = ...,
    retry_on: Any = ...,
    on_retry: OnRetry | None = ...,
) -> F: ...


@overload
def retry_on_conflict(
    fn: None = None,
    /,
    *,
    attempts: int = ...,
    base_delay: float = ...,
    max_delay: float = ...,
    retry_on: Any = ...,
    on_retry: OnRetry | None = ...,
) -> Callable[[F], F]: ...


def retry_on_conflict(
    fn: F | None = None,
    /,
    *,
    attempts: int = ATTEMPTS,
    base_delay: float = BASE_DELAY,
    max_delay: float = MAX_DELAY,
    retry_on: Any = StaleVersion,
    on_retry: OnRetry | None = None,
) -> F | Callable[[F], F]:
    """Retry ``fn`` when it raises :class:`~oncely.errors.StaleVersion` (or what ``retry_on``
    names), up to ``attempts`` calls in all, waiting with full jitter in between (seconds, see
    :class:`ConflictRetry`); the last conflict propagates unchanged once attempts run out, and
    any other exception at once.

    Three forms, sync or async alike (a coroutine function gets an async wrapper; a generator
    or async generator function is refused with :class:`~oncely.errors.ConfigurationError`: its
    body runs while the caller iterates, outside any retry)::

        @retry_on_conflict                      # decorator, defaults
        def bump(conn, id): ...

        @retry_on_conflict(attempts=20)         # decorator with options
        async def abump(conn, id): ...

        new_version = retry_on_conflict(bump, attempts=20)(conn, 7)   # call form

    :raises ConfigurationError: bad options (see :class:`ConflictRetry`: ``base_delay`` above
        ``max_delay`` too), or ``fn`` is a generator function (see :meth:`ConflictRetry.wrap`).
    """
    policy = ConflictRetry(attempts, base_delay, max_delay, retry_on, on_retry)
    if fn is None:
        return policy.wrap
    if not callable(fn):
        raise ConfigurationError(f"retry_on_conflict needs a callable, not {fn!r}")
    return policy.wrap(fn)
