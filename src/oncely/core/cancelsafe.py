"""Async store calls that survive the caller's cancellation, written once for every async face.

A cancelled ``await`` may still have been applied by the server. The claim is the dangerous
case (a key held by nobody until its lease runs out), so it runs shielded and a claim that
succeeded after its caller left is released again. A fenced write (complete, release) is cheap
to repeat, so it runs as a plain ``await`` and is repeated in the background if the caller is
cancelled meanwhile: the repeat either lands or finds the first write done, which every store
answers as success (see :mod:`oncely.stores.base`); ``LeaseLost`` then means the claim was lost.

Drivers can also lose a cancellation: ``asyncio.wait_for`` on Python 3.11 returns the inner
result and drops a ``cancel()`` that arrives just as the inner call finishes (redis-py waits for
every send that way when it has a socket timeout). :func:`keep_cancel` wraps a store's round trip
and raises the lost ``CancelledError`` again, so a cancelled caller never keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from oncely.core.observe import describe
from oncely.core.records import ClaimOutcome, New, RecordKey
from oncely.errors import OncelyError, TransactionLost

if TYPE_CHECKING:  # core imports no store: Store is only a type here
    from oncely.stores.base import Store

__all__ = [
    "akept_pipeline",
    "claim_or_undo",
    "cleanup",
    "interrupted",
    "keep_alive",
    "keep_cancel",
    "kept_pipeline",
    "write_again",
    "write_through",
]

log = logging.getLogger("oncely")

#: Background work that must finish although its caller is gone (strong references).
_background: set[asyncio.Future[Any]] = set()


class keep_cancel:  # lower case: used as ``with keep_cancel():``, as a function was
    """Raise ``CancelledError`` when the block ends normally although the running task was
    cancelled while it ran (a driver swallowed the cancellation). A block that raises, or a task
    that was already being cancelled before the block (cleanup after a cancellation), is left
    alone. Python 3.10 tasks cannot tell, so there it does nothing.

    A class rather than a ``contextlib.contextmanager`` generator: it wraps every async store
    round trip, and this costs a third as much per use."""

    __slots__ = ("_before", "_cancelling")

    def __enter__(self) -> None:
        cancelling = getattr(asyncio.current_task(), "cancelling", None)
        self._cancelling: Callable[[], int] | None = cancelling
        self._before = cancelling() if cancelling is not None else 0

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        cancelling = self._cancelling
        if kind is None and cancelling is not None and cancelling() > self._before:
            raise asyncio.CancelledError


def keep_alive(work: asyncio.Future[Any]) -> None:
    """Hold a reference to ``work`` until it is done, and log it if it fails."""
    _background.add(work)

    def done(future: asyncio.Future[Any]) -> None:
        _background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("oncely: background store call failed: %s", future.exception())

    work.add_done_callback(done)


async def claim_or_undo(
    store: Store, key: RecordKey, fingerprint: str, lease: float, ttl: float
) -> ClaimOutcome:
    """Claim; if the caller is cancelled mid-claim and the claim succeeded, release it again."""
    task = asyncio.ensure_future(store.aclaim(key, fingerprint, lease, ttl))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def undo(done: asyncio.Future[ClaimOutcome]) -> None:
            if not done.cancelled() and done.exception() is None:
                outcome = done.result()
                if isinstance(outcome, New):
                    keep_alive(asyncio.ensure_future(store.arelease(key, outcome.fence)))

        # In a context of its own: the release is cleanup, not bound by the claim's deadline
        # (oncely.core.deadline), which the caller's context may carry.
        task.add_done_callback(undo, context=contextvars.Context())
        keep_alive(task)
        raise


async def write_through(write: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Await a fenced write; if the caller is cancelled meanwhile, write again in the background."""
    try:
        await write(*args)
    except asyncio.CancelledError:
        write_again(write, args)
        raise


def write_again(write: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
    """Repeat a fenced write whose caller was cancelled, in the background (what
    :func:`write_through` does; for a caller that awaits the write itself)."""
    keep_alive(asyncio.ensure_future(_write_again(write, args)))


async def _write_again(write: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
    try:
        await write(*args)
    except OncelyError as exc:
        log.warning("oncely: write repeated after a cancellation failed: %s", describe(exc))


class cleanup:  # lower case: used as ``with cleanup(exc, "..."):``
    """Around clean-up (a rollback, closing a block) that runs while ``exc`` propagates: if
    ``exc`` is a cancellation or an interrupt (``CancelledError``, ``KeyboardInterrupt``,
    ``SystemExit``, ``GeneratorExit``: not an ``Exception``) and the clean-up raises an
    ``Exception``, that error is logged (warning) and suppressed, so the caller raises ``exc``
    again: a rollback on a connection the cancelled statement left dead (aiomysql closes it)
    must not turn a cancellation into the driver's ``InterfaceError`` (``asyncio.timeout``
    would no longer raise ``TimeoutError``, a ``TaskGroup`` would see a failure). When ``exc``
    is an ``Exception`` (or None) the clean-up's error propagates as before (Python chains
    ``exc`` as its ``__context__``): a :class:`~oncely.errors.TransactionLost` the rollback
    finds still says what happened. Works around a ``yield`` in a plan too.

    A :class:`~oncely.errors.TransactionLost` from the clean-up (the caller's whole
    transaction was rolled back: a cancellation that lands after the server released a
    block's savepoint but before the client read the reply leaves nothing to roll back to) is
    never swallowed, since the caller would go on writing in a new transaction and commit it
    without what it wrote before: while a ``CancelledError`` propagates, a new
    ``TransactionLost`` saying so is raised instead (chained to the clean-up's; an
    ``asyncio.timeout`` around the block then raises it, not ``TimeoutError``, and leaves the
    task uncancelled); while a ``KeyboardInterrupt``, ``SystemExit`` or ``GeneratorExit``
    propagates, it is raised as is and the lost transaction is logged (error)."""

    __slots__ = ("_exc", "_what")

    def __init__(self, exc: BaseException | None, what: str = "rolling back") -> None:
        self._exc, self._what = exc, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, _: Any) -> bool:
        exc = self._exc
        if err is None or exc is None or isinstance(exc, Exception):
            return False
        if not isinstance(err, Exception):
            return False
        if isinstance(err, TransactionLost):
            if isinstance(exc, asyncio.CancelledError):
                raise TransactionLost(
                    f"the block was cancelled while oncely was closing it ({self._what}), "
                    "after the server had already ended the block's part of your transaction: "
                    "your transaction was rolled back as a whole, so nothing of it is or will "
                    "be committed (not what you wrote before the block either, and a later "
                    "commit on this connection commits only what is written after now). Run "
                    "the whole transaction again"
                ) from err
            log.error(
                "oncely: a %s propagated while oncely was closing a block (%s): your "
                "transaction was rolled back as a whole, nothing of it is committed: %s",
                type(exc).__name__,
                self._what,
                describe(err),
            )
            return True
        log.warning(
            "oncely: %s failed while a %s propagated (which is raised as is): %s",
            self._what,
            type(exc).__name__,
            describe(err),
        )
        return True


def _replaced(
    err: Exception, interrupt: BaseException | None, handled: BaseException | None
) -> None:
    """Raise the interruption a pipeline's exit replaced with ``err`` (``interrupt``, raised by
    the block's statements, or ``err``'s own context if that is an interruption other than
    ``handled``, the exception being handled when the block began); return if there is none."""
    if interrupt is None:
        context = err.__context__
        if context is None or context is handled or isinstance(context, Exception):
            return
        interrupt = context
    log.warning(
        "oncely: leaving a pipeline failed while a %s propagated (which is raised as is): %s",
        type(interrupt).__name__,
        describe(err),
    )
    raise interrupt


@contextlib.contextmanager
def kept_pipeline(driver: Any) -> Iterator[None]:
    """``with driver.pipeline():`` (psycopg) that never turns an interruption (a
    ``KeyboardInterrupt`` from a signal handler, ``SystemExit``, ...) into the pipeline's exit
    error (``OperationalError: cannot exit pipeline mode while busy``): an interruption raised
    by the statements in the block, or while the exit waits for the replies (the exit error's
    own ``__context__``, unless that is the exception already being handled when the block
    began), is raised again in place of that error."""
    handled = sys.exc_info()[1]
    interrupt: BaseException | None = None
    try:
        with driver.pipeline():
            try:
                yield
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    interrupt = exc
                raise
    except Exception as err:
        _replaced(err, interrupt, handled)
        raise


@contextlib.asynccontextmanager
async def akept_pipeline(driver: Any) -> AsyncIterator[None]:
    """The async face of :func:`kept_pipeline` (a ``CancelledError`` is kept the same way)."""
    handled = sys.exc_info()[1]
    interrupt: BaseException | None = None
    try:
        async with driver.pipeline():
            try:
                yield
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    interrupt = exc
                raise
    except Exception as err:
        _replaced(err, interrupt, handled)
        raise


def interrupted(exc: BaseException, on_cancel: str) -> bool:
    """Whether a body (a decorated function, an HTTP handler) that raised ``exc`` was
    interrupted rather than failed: a ``KeyboardInterrupt`` or ``SystemExit``, or a
    ``CancelledError`` that did not come from its caller with ``on_cancel="release"`` (with
    ``"finish"`` the body is shielded from its caller, so a cancellation that reaches it is its
    event loop ending, as at a server's shutdown). Its effect may have happened, so its key is
    never released (a body that ran is never released): like a crash, the claim lapses at the
    end of its lease and a retry then runs the body again."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return True
    return isinstance(exc, asyncio.CancelledError) and on_cancel != "release"
