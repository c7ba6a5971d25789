"""One value per running event loop (a client, a pool), cleaned up when that loop shuts down.

Async drivers (redis-py's asyncio client, psycopg's and aiomysql's connections) belong to the
event loop that opened them, so a store keeps one set per loop. Scripts and test suites call
``asyncio.run`` again and again and never call ``aclose()``; what a store keeps for a loop must go
away with the loop, or it grows with the number of loops that ever ran.

:class:`LoopLocal` registers a tiny async generator with the running loop next to each value.
``asyncio.run`` (and :class:`asyncio.Runner`) call ``loop.shutdown_asyncgens()`` after cancelling
the remaining tasks and before closing the loop; that finalizes the generator, which awaits the
value's ``cleanup`` while the loop still runs. Nothing else runs in the background: no task is
left for the loop's final cancellation to wait for. A loop that was closed without that step
(``loop.close()`` by hand) leaves its value behind until the next loop asks for one, which
``abandon``\\ s it (closes it without a loop).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Generic, TypeVar

from oncely.backends.forks import after_fork, inherit

__all__ = ["LoopLocal"]

T = TypeVar("T")


class LoopLocal(Generic[T]):
    """``make()`` builds the value of a loop on first use; ``cleanup(value)`` is awaited when the
    loop shuts down or :meth:`aclose` is called on it; ``abandon(value)`` closes it without a
    loop (the loop is closed, or not running). After ``fork()`` the child drops the parent's
    values without touching them."""

    def __init__(
        self,
        make: Callable[[], T],
        cleanup: Callable[[T], Awaitable[None]],
        abandon: Callable[[T], None],
    ) -> None:
        self._make = make
        self._cleanup = cleanup
        self._abandon = abandon
        self._lock = threading.Lock()
        self._values: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[T, AsyncGenerator[None, None]]
        ] = weakref.WeakKeyDictionary()
        #: The last loop's value, (weak reference to the loop, value), read in one step: one
        #: loop (the usual server) finds its value without the weak dictionary's lookup.
        self._last: tuple[Callable[[], object], T | None] = (_nothing, None)
        after_fork(self, LoopLocal._forked)

    def _forked(self) -> None:
        """In a forked child: the parent's loops and their values are never used or closed."""
        inherit(self._values)
        self._values = weakref.WeakKeyDictionary()
        self._last = (_nothing, None)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def get(self) -> T:
        """The running loop's value, made on first use. Call it from a coroutine."""
        loop = asyncio.get_running_loop()
        ref, last = self._last
        if ref() is loop and last is not None:
            return last
        entry = self._values.get(loop)
        if entry is not None:
            self._last = (weakref.ref(loop), entry[0])
            return entry[0]
        with self._lock:
            entry = self._values.get(loop)
            if entry is not None:
                return entry[0]
            dead = [(lp, e) for lp, e in self._values.items() if lp.is_closed()]
            for lp, _ in dead:
                del self._values[lp]
            value = self._make()
            guard = self._guard(loop, value)
            self._values[loop] = (value, guard)
        for _, (old, old_guard) in dead:
            self._abandon(old)
            _finish(old_guard)
        # Run the guard to its ``yield``: the loop's first-iteration hook registers it, so the
        # loop's shutdown finalizes it. Its body before the yield never suspends.
        _step(guard.__anext__())
        return value

    async def _guard(self, loop: asyncio.AbstractEventLoop, value: T) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            if self._forget(loop, value):
                try:
                    await self._cleanup(value)
                except BaseException:
                    self._abandon(value)
                    raise

    def _forget(self, loop: asyncio.AbstractEventLoop, value: T) -> bool:
        """Drop ``loop``'s entry if it still holds ``value``; True if it did."""
        with self._lock:
            self._last = (_nothing, None)
            entry = self._values.get(loop)
            if entry is None or entry[0] is not value:
                return False
            del self._values[loop]
            return True

    async def aclose(self) -> None:
        """Clean the running loop's value up now (the next :meth:`get` makes a new one)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._last = (_nothing, None)
            entry = self._values.pop(loop, None)
        if entry is None:
            return
        value, guard = entry
        try:
            await self._cleanup(value)
        finally:
            await guard.aclose()  # finds the entry gone: nothing more to do

    def close_idle(self) -> None:
        """Abandon the values of loops that are not running (used by a store's sync close)."""
        with self._lock:
            self._last = (_nothing, None)
            idle = [(lp, e) for lp, e in self._values.items() if not lp.is_running()]
            for lp, _ in idle:
                del self._values[lp]
        for _, (value, guard) in idle:
            self._abandon(value)
            _finish(guard)


def _nothing() -> None:
    """A dead weak reference's stand-in."""
    return None


def _step(awaitable: Awaitable[object]) -> None:
    """Drive an awaitable that never suspends to its end."""
    try:
        awaitable.__await__().send(None)
    except StopIteration:
        return
    raise RuntimeError("a loop guard suspended")  # pragma: no cover - its body never awaits


def _finish(guard: AsyncGenerator[None, None]) -> None:
    """Close a guard whose entry is gone without a loop: its cleanup finds nothing to do."""
    _step(guard.aclose())
