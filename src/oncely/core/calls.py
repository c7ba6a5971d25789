"""Whether a callable is async: every oncely decorator picks its sync or async wrapper here."""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = ["is_async_callable"]


def is_async_callable(fn: Any) -> bool:
    """True for a coroutine function, and also for what ``inspect.iscoroutinefunction`` misses:
    a callable object whose ``__call__`` is ``async def`` and a ``functools.partial`` of
    either (so a decorator never hands back a sync wrapper that returns an un-awaited
    coroutine and skips its own logic)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isclass(fn):
        return False
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the method itself is needed
    return call is not None and inspect.iscoroutinefunction(call)
