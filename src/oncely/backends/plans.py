"""Sans-IO plans: a store or lock operation written once, run by a sync or an async executor.

A plan is a generator. It yields *requests* (run this statement, evaluate this script, sleep)
and gets each reply back from ``yield``; what it returns is the operation's outcome. It does no
I/O and never awaits, so the decision (which request, what the reply means, when to try again)
exists once, and the sync and async faces are one line each::

    def _claim(self, key, ...) -> Plan[ClaimOutcome]:
        reply = yield Eval(CLAIM, 2, (record_key, counter, ...))
        return parse_claim(reply)

    def claim(self, key, ...):            return run(self._claim(key, ...), self._execute)
    async def aclaim(self, key, ...):     return await arun(self._claim(key, ...), self._aexecute)

A backend has one executor per face that carries requests out (``_execute`` takes a pooled
connection and runs the statement; ``_aexecute`` does the same on the event loop). An error the
executor raises is thrown into the plan at its ``yield``, so a plan may handle it (try again,
translate it) or let it propagate. The same shape as h11's sans-IO core.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, NamedTuple, TypeVar

__all__ = ["Command", "Eval", "Exec", "Plan", "Sleep", "arun", "run"]

T = TypeVar("T")

#: A plan: yields requests, receives their replies, returns the outcome.
Plan = Generator[Any, Any, T]


class Exec(NamedTuple):
    """Run one SQL statement (``statement`` is the text or the name a store renders it
    under); the reply is what the backend's executor reads back (rows, a row count)."""

    statement: Any
    params: dict[str, Any]
    prepare: bool | None = None


class Eval(NamedTuple):
    """Evaluate a Lua script (:class:`oncely.backends.lua.Script`) with ``numkeys`` keys at the
    front of ``keys_and_args``; the reply is the script's."""

    script: Any
    numkeys: int
    keys_and_args: tuple[Any, ...]


class Command(NamedTuple):
    """Send one Redis command (``("TIME",)``, ``("SCAN", 0, ...)``); the reply is Redis's."""

    args: tuple[Any, ...]


class Sleep(NamedTuple):
    """Wait ``seconds`` (``time.sleep`` on the sync face, ``asyncio.sleep`` on the async one)
    holding nothing; the reply is ``None``."""

    seconds: float


def run(plan: Plan[T], execute: Callable[[Any], Any]) -> T:
    """Carry ``plan`` out with ``execute(request) -> reply`` and return its outcome."""
    try:
        request = plan.send(None)
        while True:
            try:
                reply = execute(request)
            except BaseException as exc:
                request = plan.throw(exc)
            else:
                request = plan.send(reply)
    except StopIteration as stop:
        outcome: T = stop.value
        return outcome


async def arun(plan: Plan[T], execute: Callable[[Any], Awaitable[Any]]) -> T:
    """The async face of :func:`run`: ``execute(request)`` is awaited."""
    try:
        request = plan.send(None)
        while True:
            try:
                reply = await execute(request)
            except BaseException as exc:
                request = plan.throw(exc)
            else:
                request = plan.send(reply)
    except StopIteration as stop:
        outcome: T = stop.value
        return outcome
