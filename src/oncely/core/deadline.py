"""A caller's time bound, carried to the store: an absolute :func:`time.monotonic` value.

A flow that waits with a bound of its own (the decorator's and HTTP's ``wait_timeout`` for a
duplicate) sends its later claims with that deadline (:class:`oncely.core.ops.Claim`); the
driver runs the store call :func:`within` it, and a store that can wait for something other
than its own reply (SQLite, for another process holding the file's write lock, see
:func:`oncely.backends.sqlite.execute`) waits no longer than :func:`current`. When the
deadline passes first it raises :class:`DeadlinePassed`, having written nothing, and the flow
answers with the error its own timeout documents (:class:`~oncely.errors.InFlightError`,
HTTP 409), never :class:`~oncely.errors.StoreUnavailable`: a file that is merely busy within
the caller's bound is not an outage. Stores that never wait for a lock ignore the deadline.

The deadline is a :func:`time.monotonic` time in seconds, absolute: one value bounds every
wait of a call (the writer gate, a connection, another process's lock) without each one
restarting the clock. ``None`` means no bound of the caller's (the store's own timeouts hold).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from oncely.errors import OncelyError

__all__ = ["DeadlinePassed", "current", "within"]

_DEADLINE: ContextVar[float | None] = ContextVar("oncely_deadline", default=None)


class DeadlinePassed(OncelyError):
    """The caller's deadline passed while its statement waited to run (for another writer of
    the file): the statement never ran, nothing was written. Raised only to a caller that gave
    a deadline; it answers with the error of its own timeout.

    ``reason`` says in a few words what the statement waited for when the deadline passed, if
    not another connection or process holding the file ("" then), for that error's message.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def current() -> float | None:
    """The deadline of the running call (:func:`time.monotonic` seconds), or None."""
    return _DEADLINE.get()


@contextlib.contextmanager
def within(deadline: float | None) -> Iterator[None]:
    """Store calls in the body (and tasks it starts) wait no longer than ``deadline``
    (:func:`time.monotonic` seconds; None: no bound)."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)
