"""The lock every backend shares: owner token, acquire loop, renewal, cancellation safety.

One :class:`Lock` instance is one holder. Its owner token is made per acquisition and kept on
the instance (not in a ``threading.local``, which asyncio tasks on one thread would share, as
redis-py's ``Lock`` does). Two threads or tasks trying to hold the lock through the same
instance is a bug that would make them share one critical section, so the second ``acquire``
raises :class:`~oncely.errors.LockError` at once; create one instance per thread or task.
Releasing from another thread or task than the one that acquired is allowed (a hand-off), as
long as the sync face is released with :meth:`Lock.release` and the async face with
:meth:`Lock.arelease`.

Every acquisition yields a fencing token that strictly grows per lock name. A lease cannot give
mutual exclusion through a process pause (Kleppmann), so pass the token to the protected
resource and let it refuse older tokens: see :mod:`oncely.locks.fencing`.

Cancellation (asyncio): a cancelled :meth:`Lock.aacquire` never leaves the lock held by nobody
(the attempt in flight is finished under :func:`asyncio.shield` and given back if it
succeeded); a cancelled :meth:`Lock.arelease` still releases (it finishes before the
cancellation goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, overload

from oncely.backends.forks import after_fork
from oncely.backends.plans import Plan, arun, run
from oncely.backends.registry import lock_backend_class as backend_class
from oncely.backends.registry import shared_lock_backend as shared_backend
from oncely.core import observe
from oncely.core.cancelsafe import cleanup, keep_alive, keep_cancel
from oncely.core.deadline import within
from oncely.core.observe import describe
from oncely.core.renewal import on_renewal_thread, renew_timeout, report, watchdog
from oncely.errors import (
    LockError,
    LockLost,
    LockNotOwned,
    LockTimeout,
    OncelyError,
    StoreUnavailable,
)
from oncely.locks.base import (
    Busy,
    Face,
    Hold,
    LockBackend,
    State,
    check_name,
    check_timeout,
    check_ttl,
)
from oncely.settings import resolve, unknown_option

__all__ = ["Lock", "LostCallback"]

log = logging.getLogger("oncely.locks")

LostCallback = Callable[["Lock", LockLost], None]

_STOPPED: Final = object()
_RAN_OUT: Final = (
    "no renewal was confirmed before its ttl ran out (the store is slow or unreachable, or "
    "this process was paused)"
)


class _Attempt(NamedTuple):
    """An acquire plan's request: one attempt at the store (``wait``: seconds the store may
    wait for a release itself); the reply is the :class:`Hold` or :class:`Busy`."""

    owner: str
    wait: float


class _AwaitRelease(NamedTuple):
    """An acquire plan's request: wait up to ``left`` seconds for the holder's release (woken
    by it, not by polling); the reply is ``None``."""

    busy: Busy
    left: float


def _who(face: Face) -> str:
    """The thread or asyncio task calling, for error messages."""
    task = asyncio.current_task() if face == "async" else None
    if task is not None:
        return f"task {task.get_name()!r}"
    return f"thread {threading.current_thread().name!r}"


def _check_options(
    cls: type[LockBackend], lock_names: Any, options: dict[str, Any], where: str
) -> None:
    """Refuse an option neither the backend nor its locks take, naming the closest one."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the backend passes the rest to its driver, which checks them
    known = {*lock_names, *params} - {"url"}
    for option in options:
        if option not in known:
            raise unknown_option(option, {*known, "ttl", "auto_renew", "timeout"}, where)


class Lock:
    """A distributed lock: owner-checked, optionally renewed, with a fencing token.

    ``url`` picks the backend (``redis://…``, ``sqlite:///path.db``, ``postgresql://…``), or is
    a :class:`~oncely.locks.base.LockBackend`. ``ttl`` (seconds) is how long the lock outlives a
    crashed or paused holder; ``auto_renew=True`` extends it every ``ttl / 3`` while held, and
    reports a lost lock through ``on_lost(lock, error)``, the :attr:`lost` event, and
    :class:`~oncely.errors.LockLost` from :meth:`check` and :meth:`release` (in that order:
    ``on_lost`` runs, then :attr:`lost` is set, and a ``LockLost`` about that loss is raised
    only after both, so ``on_lost`` must not wait for the thread holding the lock).
    ``timeout`` is how long ``with lock:`` waits, in seconds. Other keyword ``options`` go to
    the backend: connection options (shared per URL) or per-lock ones such as PostgreSQL's
    ``scope``.

    Settings left ``None`` come from the environment, else their default
    (:mod:`oncely.settings`): ``ttl`` from ``$ONCELY_LOCK_TTL`` (default 30 s), ``timeout``
    from ``$ONCELY_LOCK_TIMEOUT`` (default: wait as long as it takes; ``-1`` in code says so
    explicitly), ``auto_renew`` from ``$ONCELY_LOCK_AUTO_RENEW`` (default ``False``). The URL
    has no default: every holder must name the same backend.

    :raises ConfigurationError: a bad setting (named in the message), an unknown URL scheme or a
        missing extra, or options the backend does not take.
    :raises InvalidLockName: ``name`` is empty, not a string or over 255 characters.

    Sync and async faces share one instance: ``acquire``/``release``/``extend``/``check``/
    ``ttl``/``locked``/``owned`` and their ``a``-prefixed coroutine twins; ``with lock:`` and
    ``async with lock:``.
    """

    def __init__(
        self,
        url: str | LockBackend,
        name: str,
        *,
        ttl: float | str | None = None,
        auto_renew: bool | None = None,
        on_lost: LostCallback | None = None,
        timeout: float | str | None = None,
        **options: Any,
    ) -> None:
        self.name = check_name(name)
        where = f"Lock {name!r}"
        #: The ttl (seconds) every acquire, renewal and argument-less :meth:`extend` asks for.
        self.lease = check_ttl(resolve("lock_ttl", ttl, where=where, param="ttl"))
        self.timeout = check_timeout(
            True, resolve("lock_timeout", timeout, where=where, param="timeout")
        )
        self.auto_renew: bool = resolve(
            "lock_auto_renew", auto_renew, where=where, param="auto_renew"
        )
        self.on_lost = on_lost
        #: Set when this instance learns that the lock it held was lost.
        self.lost = threading.Event()
        if isinstance(url, LockBackend):
            self.backend = url
            self._options = url.lock_options(**options)
        else:
            cls = backend_class(url)
            lock_names = getattr(cls, "lock_option_names", ())
            _check_options(cls, lock_names, options, where)
            per_lock = {k: v for k, v in options.items() if k in lock_names}
            shared = {k: v for k, v in options.items() if k not in lock_names}
            self.backend = shared_backend(cls, url, url, **shared)
            self._options = self.backend.lock_options(**per_lock)
        self._id = secrets.token_hex(10)
        self._seq = itertools.count(1)
        self._mutex = threading.Lock()
        self._hold: Hold | None = None
        self._holder = ""
        self._acquiring = ""
        self._lost: LockLost | None = None
        #: The thread telling the current loss (running ``on_lost``, then setting ``lost``).
        self._teller: int | None = None
        self._renewal: _Renewal | None = None
        self._renew_task: asyncio.Task[None] | None = None
        after_fork(self, Lock._forked)

    def _forked(self) -> None:
        """In a forked child the parent holds the lock, not this copy of the instance: here it
        is not held (a release from the child would free the parent's lock under the same
        owner token), and no renewal runs for it."""
        self._mutex = threading.Lock()
        self._hold, self._holder, self._acquiring = None, "", ""
        self._renewal = self._renew_task = None

    def __repr__(self) -> str:
        held = "held" if self._hold is not None else "free"
        return f"<{type(self).__name__} {self.name!r} {held} via {self.backend!r}>"

    # -- state shared by both faces ---------------------------------------------------------------
    @property
    def token(self) -> int:
        """The fencing token of the current acquisition; pass it to fenced writes."""
        hold = self._hold
        if hold is None:
            raise LockNotOwned(
                f"lock {self.name!r} is not held by this instance, so it has no fencing token; "
                "acquire it first (the token is also what acquire() returns)"
            )
        return hold.token

    @property
    def connection(self) -> Any:
        """PostgreSQL: the connection whose session (or transaction) holds the lock.

        With ``scope="transaction"`` run your statements on it: they commit with
        :meth:`release` and roll back when an exception leaves ``with lock:``.
        """
        hold = self._hold
        if hold is None:
            raise self._not_owned("use the connection of")
        conn = getattr(hold.data, "conn", None)
        if conn is None:
            raise LockError(
                f"{type(self.backend).__name__} locks have no connection of their own; only "
                "PostgreSQL locks do"
            )
        return conn

    def _abort_on(self, exc_type: type[BaseException] | None) -> None:
        """Tell a transaction-scope hold that ``with lock:`` is being left by an exception."""
        hold = self._hold
        if exc_type is not None and hold is not None and hasattr(hold.data, "abort"):
            hold.data.abort = True

    @property
    def held(self) -> bool:
        """True between a successful acquire and the next release (local knowledge only)."""
        return self._hold is not None

    def _owner(self) -> str:
        return f"{self._id}:{next(self._seq)}"

    def _begin_acquire(self, face: Face) -> str:
        who = _who(face)
        with self._mutex:
            if self._hold is not None:
                raise LockError(
                    f"lock {self.name!r} is already held by this instance (acquired by "
                    f"{self._holder}); oncely locks are not reentrant, and one Lock instance "
                    "stands for one holder: give each thread or task its own Lock(...)"
                )
            if self._acquiring:
                raise LockError(
                    f"lock {self.name!r} is being acquired through this instance by "
                    f"{self._acquiring} already; one Lock instance stands for one holder: give "
                    "each thread or task its own Lock(...)"
                )
            self._acquiring = who
        return who

    def _end_acquire(self, hold: Hold | None, who: str) -> None:
        with self._mutex:
            self._acquiring = ""
            if hold is not None:
                self._hold, self._holder, self._lost = hold, who, None
                self.lost.clear()

    def _take_hold(self, face: Face) -> tuple[Hold, LockLost | None]:
        """Detach the current hold for release; raise if there is none to release."""
        with self._mutex:
            hold = self._hold
            if hold is None:
                raise self._not_owned("release")
            self._check_face(hold, face, "release")
            self._hold, self._holder = None, ""
            lost, renewal = self._lost, self._renewal
            self._renewal = None
        if renewal is not None:
            renewal.active = False
        return hold, lost

    def _current(self, face: Face, op: str) -> Hold:
        with self._mutex:
            hold = self._hold
            if hold is None:
                raise self._not_owned(op)
            self._check_face(hold, face, op)
            lost = self._lost
        if lost is not None:
            raise self._lost_again(lost)
        return hold

    def _check_face(self, hold: Hold, face: Face, op: str) -> None:
        if hold.face != face:
            right = f"await lock.a{op}()" if hold.face == "async" else f"lock.{op}()"
            raise LockError(
                f"lock {self.name!r} was acquired with the {hold.face} face; use {right} "
                "(a hold keeps its connection on the face that made it)"
            )

    def _not_owned(self, op: str) -> LockNotOwned:
        return LockNotOwned(
            f"cannot {op} lock {self.name!r}: this instance does not hold it (never acquired, "
            "or already released); call acquire() first, and release each acquisition once"
        )

    def _lost_again(self, earlier: LockLost | None) -> LockLost:
        """The error for a loss recorded earlier, once that loss has been told.

        Another thread (the renewal watchdog) may have recorded the loss and still be running
        ``on_lost``; wait for it to set :attr:`lost`, so that whoever gets this error also sees
        the event set and the callback run. The telling thread itself (an ``on_lost`` that
        calls :meth:`release` or :meth:`check`) does not wait.
        """
        if self._teller != threading.get_ident():
            self.lost.wait()
        lost = LockLost(f"lock {self.name!r} was lost earlier: {earlier}")
        lost.__cause__ = earlier
        return lost

    def _lost_error(self, hold: Hold, why: str) -> LockLost:
        return LockLost(
            f"lock {self.name!r} (fencing token {hold.token}) is no longer held by this "
            f"instance: {why}. Another holder may have run meanwhile; work done since must not "
            "be trusted unless its writes were fenced with the token."
        )

    def _mark_lost(self, hold: Hold, exc: LockLost) -> None:
        """Record the loss once (if ``hold`` is still current) and tell the holder."""
        with self._mutex:
            if self._hold is not hold or self._lost is not None:
                return
            self._lost = exc
            self._teller = threading.get_ident()
            renewal, self._renewal = self._renewal, None
        loop = None
        if renewal is not None:
            renewal.active = False
            loop = renewal.loop
        log.error("oncely: lock %r lost: %s", self.name, describe(exc))
        if observe.observers:
            observe.lock_lost(self.backend.kind)
        self._tell(exc, loop)

    def _tell(self, exc: LockLost, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Run the ``on_lost`` callback, then set :attr:`lost` (so its waiters see both); on a
        thread of its own when the loss is found on a renewal thread (a slow callback must not
        stall other renewals), or, for an async holder renewed there (``loop``: its event
        loop), on that loop."""
        on_lost = self.on_lost
        if on_lost is None:
            self.lost.set()
            return

        def tell() -> None:
            try:
                on_lost(self, exc)
            finally:
                self.lost.set()

        report(
            tell,
            what=f"on_lost callback of lock {self.name!r}",
            loop=loop if on_renewal_thread() else None,
        )

    def _timeout_error(self, limit: float | None, busy: Busy) -> OncelyError:
        waited = "at once" if not limit else f"within {limit:g}s"
        if busy.unavailable:
            return StoreUnavailable(
                f"could not acquire lock {self.name!r} {waited}: {busy.unavailable}; nothing "
                "was acquired, retry once the store is reachable"
            )
        left = "" if busy.retry_after is None else f" (its ttl has {busy.retry_after:.3f}s left)"
        return LockTimeout(
            f"could not acquire lock {self.name!r} {waited}: {busy.reason}{left}; "
            "retry later, wait longer (timeout=...), or use acquire(blocking=False) to skip "
            "the work while it is busy"
        )

    def _deadline(self, limit: float | None) -> float:
        return math.inf if limit is None else time.monotonic() + limit

    def _server_wait(self, blocking: bool, deadline: float) -> float:
        backend = self.backend
        if backend.bounded_attempts and not backend.server_wait:
            # the statement's own bound: the time left (inf: no timeout, or blocking=False)
            return max(0.0, deadline - time.monotonic()) if blocking else math.inf
        if not (blocking and backend.server_wait):
            return 0.0
        return max(0.0, deadline - time.monotonic())

    def _renewed(self, hold: Hold, sent_at: float, validity: float) -> None:
        """The store confirmed ``validity`` seconds for a request sent at ``sent_at``."""
        hold.held_until = sent_at + validity

    def _granted(self, hold: Hold, sent_at: float) -> tuple[Hold, float]:
        self._renewed(hold, sent_at, hold.ttl)
        return hold, sent_at

    def _bounded(self) -> bool:
        """True if the local bound decides: the hold ends by itself unless renewed."""
        return self.backend.expires or self.auto_renew

    def _within_bound(self, hold: Hold) -> bool:
        """False (and the loss reported) once the local bound passed with no confirmed renewal.

        The bound is the send time of the acquire or last confirmed extension plus its validity,
        so it never trusts a reply that came late; past it another holder may have the lock,
        whatever a stuck or slow renewal would still say.
        """
        if not self._bounded() or time.monotonic() < hold.held_until:
            return True
        self._mark_lost(hold, self._lost_error(hold, _RAN_OUT))
        return False

    def _unavailable(
        self, busy: Busy, down_since: float | None, limit: float | None
    ) -> float | None:
        """Track how long the store could not decide; raise once that lasted too long.

        With a ``timeout`` the caller's deadline decides; without one, an unreachable store
        is retried for at most ``backend.unavailable_wait`` seconds (never forever).
        """
        if not busy.unavailable:
            return None
        now = time.monotonic()
        if down_since is None:
            wait = self.backend.unavailable_wait if limit is None else limit
            log.warning(
                "oncely: lock %r cannot be decided: %s; retrying for up to %gs",
                self.name,
                busy.unavailable,
                wait,
            )
            down_since = now
        if limit is None and now - down_since >= self.backend.unavailable_wait:
            raise StoreUnavailable(
                f"could not acquire lock {self.name!r}: the store could not decide for "
                f"{now - down_since:.1f}s ({busy.unavailable}); nothing was acquired. Check that "
                "the servers run and are reachable, or pass timeout=SECONDS to wait longer"
            )
        return down_since

    # -- sync face --------------------------------------------------------------------------------
    @overload
    def acquire(self, blocking: Literal[True] = ..., timeout: float | None = ...) -> int: ...

    @overload
    def acquire(self, blocking: bool, timeout: float | None = ...) -> int | None: ...

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> int | None:
        """Take the lock; return its fencing token (always > 0).

        ``blocking=False`` tries once and returns ``None`` if someone else holds the lock.
        Otherwise waits (woken by the holder's release, not by polling the store) for up to
        ``timeout`` seconds (``None``: as long as it takes), then raises
        :class:`~oncely.errors.LockTimeout`. A store that cannot decide at all (a Redlock
        quorum unreachable) is retried until the timeout, or without one for the backend's
        ``unavailable_wait`` seconds (5 by default), then
        :class:`~oncely.errors.StoreUnavailable`: never forever.
        """
        limit = check_timeout(blocking, timeout)
        who = self._begin_acquire("sync")
        hold: Hold | None = None
        try:
            hold, sent_at = self._acquire_loop(blocking, limit)
        finally:
            self._end_acquire(hold, who)
        if hold is None:
            return None
        if self.auto_renew:
            self._start_renewal(hold, sent_at)
        return hold.token

    def _acquire_plan(self, blocking: bool, limit: float | None) -> Plan[tuple[Hold | None, float]]:
        """The acquire loop of both faces: ``(hold or None, when its request was sent)``.

        Yields :class:`_Attempt` (the reply: the store's :class:`Hold` or :class:`Busy`) and
        :class:`_AwaitRelease` (the reply: ``None``), which each face carries out its way.
        """
        backend, owner = self.backend, self._owner()
        deadline = self._deadline(limit)
        down_since: float | None = None
        while True:
            sent_at = time.monotonic()
            wait = self._server_wait(blocking, deadline)
            result = yield _Attempt(owner, wait)
            if isinstance(result, Hold):
                return self._granted(result, sent_at)
            left = deadline - time.monotonic()
            if not blocking or left <= 0:
                if not blocking and not result.unavailable:
                    return None, sent_at
                raise self._timeout_error(limit, result)
            down_since = self._unavailable(result, down_since, limit)
            if not backend.server_wait or result.unavailable:
                yield _AwaitRelease(result, left)

    def _acquire_loop(self, blocking: bool, limit: float | None) -> tuple[Hold | None, float]:
        return run(self._acquire_plan(blocking, limit), self._execute)

    def _execute(self, request: _Attempt | _AwaitRelease) -> Hold | Busy | None:
        backend = self.backend
        if isinstance(request, _Attempt):
            owner, wait = request
            return backend.acquire(self.name, owner, self.lease, wait, self._options)
        backend.wait_release(self.name, request.busy, request.left)
        return None

    def release(self) -> None:
        """Give the lock back (only if this instance still owns it).

        Raises :class:`~oncely.errors.LockLost` if the lock had been lost (expired, taken
        over, or its store forgot it): the release then deleted nothing, so a newer holder
        keeps its lock. :class:`~oncely.errors.LockNotOwned` if this instance holds nothing.
        """
        hold, lost = self._take_hold("sync")
        with hold.mutex:
            hold.done = True
            ok = self.backend.release(hold)
        if lost is not None:
            raise self._lost_again(lost) from lost
        if not ok:
            exc = self._lost_error(hold, "its ttl ran out or the store lost it before release")
            self._notify_lost(hold, exc)
            raise exc

    def extend(self, ttl: float | None = None) -> float:
        """Reset the lock's ttl to ``ttl`` seconds (default: the lock's ttl); return it.

        Like the ttl, it counts from when the request was sent. For Redlock the returned
        validity is shorter by the clock drift allowance, and the extension counts only if a
        majority confirmed it within that validity. Raises :class:`~oncely.errors.LockLost` if
        the lock is no longer this instance's.
        """
        seconds = self.lease if ttl is None else check_ttl(ttl)
        hold = self._current("sync", "extend")
        sent_at = time.monotonic()
        with hold.mutex:
            if hold.done:
                raise self._not_owned("extend")
            validity = self.backend.extend(hold, seconds)
        if validity is None:
            exc = self._lost_error(hold, "its ttl ran out or the store lost it before extend")
            self._mark_lost(hold, exc)
            raise exc
        self._renewed(hold, sent_at, validity)
        return validity

    def check(self) -> None:
        """Raise :class:`~oncely.errors.LockLost` unless this instance surely still owns the lock.

        First the local bound (no I/O): once the ttl granted to the acquire or to the last
        confirmed renewal, counted from when that request was sent, has passed, the lock counts
        as lost, even if a renewal is still on the wire (PostgreSQL: only with ``auto_renew``;
        its lock lasts as long as its session). Then the store is asked.
        """
        hold = self._current("sync", "check")
        if not self._within_bound(hold):
            raise self._lost_again(self._lost)
        self._verdict(hold, self.backend.inspect(self.name, hold))

    def owned(self) -> bool:
        """True if the store says this instance holds the lock now (and the local bound holds)."""
        hold = self._hold
        if hold is None or self._lost is not None or hold.face != "sync":
            return False
        if not self._within_bound(hold):
            return False
        return self._owned(hold, self.backend.inspect(self.name, hold))

    def locked(self) -> bool:
        """True if anyone holds the lock now (by the store's clock)."""
        return self.backend.inspect(self.name, self._hold).locked

    def ttl(self) -> float | None:
        """Seconds this instance's hold has left on the store's clock; None if it holds none."""
        hold = self._hold
        if hold is None or self._lost is not None or hold.face != "sync":
            return None
        if not self._within_bound(hold):
            return None
        state = self.backend.inspect(self.name, hold)
        return state.ttl if self._owned(hold, state) else None

    def __enter__(self) -> Lock:
        self.acquire(timeout=self.timeout)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._abort_on(exc_type)
        with cleanup(exc, "releasing the lock"):  # never replaces a cancellation or interrupt
            self.release()

    def _start_renewal(self, hold: Hold, sent_at: float) -> None:
        renewal = _Renewal(self, hold, sent_at)
        with self._mutex:
            if self._hold is not hold:
                return
            self._renewal = renewal
        if hold.face == "sync":
            watchdog.schedule(renewal)
        elif self.backend.sync_extends_async:
            # Renewed on the watchdog thread like a sync hold, so a holder that blocks its event
            # loop keeps the lock; a loss is reported on the loop.
            renewal.loop = asyncio.get_running_loop()
            watchdog.schedule(renewal)
        else:  # the lock lives in an async connection (PostgreSQL): only its loop can renew it
            self._renew_task = asyncio.get_running_loop().create_task(
                renewal.run_async(), name=f"oncely-renew-{self.name}"
            )

    def _renew_sync(self, hold: Hold) -> object:
        with hold.mutex:
            if hold.done:
                return _STOPPED
            # Useless past the hold's bound: a backend that waits for a lock (SQLite) waits no
            # longer, and never commits an extension after the hold was reported lost.
            with within(hold.held_until):
                return self.backend.extend(hold, self.lease)

    def _owned(self, hold: Hold, state: State) -> bool:
        if state.owned:
            return True
        self._notify_lost(
            hold, self._lost_error(hold, "the store no longer has it under this owner")
        )
        return False

    def _verdict(self, hold: Hold, state: State) -> None:
        if not state.owned:
            exc = self._lost_error(hold, "the store no longer has it under this owner")
            self._notify_lost(hold, exc)
            raise exc

    def _notify_lost(self, hold: Hold, exc: LockLost) -> None:
        """Report a loss discovered by a call (the instance may already have dropped ``hold``)."""
        with self._mutex:
            current = self._hold is hold
        if current:
            self._mark_lost(hold, exc)
        else:
            self._tell(exc)

    # -- async face -------------------------------------------------------------------------------
    @overload
    async def aacquire(self, blocking: Literal[True] = ..., timeout: float | None = ...) -> int: ...

    @overload
    async def aacquire(self, blocking: bool, timeout: float | None = ...) -> int | None: ...

    async def aacquire(self, blocking: bool = True, timeout: float | None = None) -> int | None:
        """The async face of :meth:`acquire`; cancelling it never leaves the lock held."""
        limit = check_timeout(blocking, timeout)
        who = self._begin_acquire("async")
        hold: Hold | None = None
        try:
            hold, sent_at = await self._aacquire_loop(blocking, limit)
        finally:
            self._end_acquire(hold, who)
        if hold is None:
            return None
        if self.auto_renew:
            self._start_renewal(hold, sent_at)
        return hold.token

    async def _aacquire_loop(
        self, blocking: bool, limit: float | None
    ) -> tuple[Hold | None, float]:
        return await arun(self._acquire_plan(blocking, limit), self._aexecute)

    async def _aexecute(self, request: _Attempt | _AwaitRelease) -> Hold | Busy | None:
        if isinstance(request, _Attempt):
            result = await self._attempt(request.owner, request.wait)
            if isinstance(result, Hold):
                result.alock = asyncio.Lock()
            return result
        await self.backend.await_release(self.name, request.busy, request.left)
        return None

    async def _attempt(self, owner: str, wait: float) -> Hold | Busy:
        backend = self.backend
        coro = backend.aacquire(self.name, owner, self.lease, wait, self._options)
        if getattr(backend, "cancel_safe", False):
            # The backend undoes a cancelled attempt itself (PostgreSQL closes the session,
            # which drops whatever it held); shielding would make cancel wait for the server.
            return await coro
        task = asyncio.ensure_future(coro)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The store may have granted the lock already: finish the attempt and give back
            # what it took before letting the cancellation through.
            undo = asyncio.ensure_future(self._undo(task))
            keep_alive(undo)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(undo)
            raise

    async def _undo(self, task: asyncio.Future[Hold | Busy]) -> None:
        try:
            result = await task
        except Exception:
            return
        if isinstance(result, Hold):
            try:
                await self.backend.arelease(result)
            except Exception:
                log.exception(
                    "oncely: could not give back lock %r after a cancelled acquire; it expires "
                    "after its ttl",
                    self.name,
                )

    async def arelease(self) -> None:
        """The async face of :meth:`release`; a cancelled release still completes first."""
        hold, lost = self._take_hold("async")
        task = asyncio.ensure_future(self._arelease_hold(hold))
        try:
            ok = await asyncio.shield(task)
        except asyncio.CancelledError:
            keep_alive(task)
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)
            raise
        if lost is not None:
            raise self._lost_again(lost) from lost
        if not ok:
            exc = self._lost_error(hold, "its ttl ran out or the store lost it before release")
            self._notify_lost(hold, exc)
            raise exc

    async def _arelease_hold(self, hold: Hold) -> bool:
        async with self._alock(hold):
            hold.done = True
        task, self._renew_task = self._renew_task, None
        if task is not None:
            task.cancel()
        return await self.backend.arelease(hold)

    def _alock(self, hold: Hold) -> asyncio.Lock:
        if hold.alock is None:  # pragma: no cover - set by aacquire
            hold.alock = asyncio.Lock()
        return hold.alock

    async def aextend(self, ttl: float | None = None) -> float:
        """The async face of :meth:`extend`."""
        seconds = self.lease if ttl is None else check_ttl(ttl)
        hold = self._current("async", "extend")
        sent_at = time.monotonic()
        async with self._alock(hold):
            if hold.done:
                raise self._not_owned("extend")
            validity = await self.backend.aextend(hold, seconds)
        if validity is None:
            exc = self._lost_error(hold, "its ttl ran out or the store lost it before extend")
            self._mark_lost(hold, exc)
            raise exc
        self._renewed(hold, sent_at, validity)
        return validity

    async def acheck(self) -> None:
        """The async face of :meth:`check`."""
        hold = self._current("async", "check")
        if not self._within_bound(hold):
            raise self._lost_again(self._lost)
        self._verdict(hold, await self.backend.ainspect(self.name, hold))

    async def aowned(self) -> bool:
        """The async face of :meth:`owned`."""
        hold = self._hold
        if hold is None or self._lost is not None or hold.face != "async":
            return False
        if not self._within_bound(hold):
            return False
        return self._owned(hold, await self.backend.ainspect(self.name, hold))

    async def alocked(self) -> bool:
        """The async face of :meth:`locked`."""
        return (await self.backend.ainspect(self.name, self._hold)).locked

    async def attl(self) -> float | None:
        """The async face of :meth:`ttl`."""
        hold = self._hold
        if hold is None or self._lost is not None or hold.face != "async":
            return None
        if not self._within_bound(hold):
            return None
        state = await self.backend.ainspect(self.name, hold)
        return state.ttl if self._owned(hold, state) else None

    async def _arenew(self, hold: Hold) -> object:
        async with self._alock(hold):
            if hold.done:
                return _STOPPED
            return await self.backend.aextend(hold, self.lease)

    async def __aenter__(self) -> Lock:
        await self.aacquire(timeout=self.timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._abort_on(exc_type)
        with cleanup(exc, "releasing the lock"):
            await self.arelease()


class _Renewal:
    """The renewal schedule of one hold: every ttl/3, retried while the lease lasts.

    Sync holds, and async holds of a backend that can extend them through its sync face
    (:attr:`~oncely.locks.base.LockBackend.sync_extends_async`: Redis, Redlock, SQLite), run on
    the lane of their backend (:mod:`oncely.core.renewal`), so an event loop blocked by its
    holder cannot starve them. Other async holds (PostgreSQL, whose lock lives in the async
    session) renew on their event loop, each request bounded by
    :func:`~oncely.core.renewal.renew_timeout` and the bound.
    """

    def __init__(self, lock: Lock, hold: Hold, sent_at: float) -> None:
        self.lock = lock
        self.hold = hold
        self.active = True
        self.due = sent_at + hold.ttl / 3
        #: The event loop of an async holder renewed on the watchdog thread (a loss is
        #: reported there; renewals stop once it is closed), else None.
        self.loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<renewal of {self.lock!r}>"

    @property
    def held_until(self) -> float:
        """Monotonic time until which the lock surely holds (counted from a request's send)."""
        return self.hold.held_until

    @property
    def lane(self) -> LockBackend:
        """The backend the renewals talk to (its holds share one renewal lane)."""
        return self.lock.backend

    def expire(self) -> None:
        """The bound passed while a renewal was still pending: report the lock lost."""
        if self.active:
            self._lose(_RAN_OUT)

    def _lose(self, why: str, cause: BaseException | None = None) -> None:
        self.active = False
        exc = self.lock._lost_error(self.hold, why)
        exc.__cause__ = cause
        self.lock._mark_lost(self.hold, exc)

    def _before(self) -> float | None:
        """The send time of this renewal, or None if it must not run."""
        if not self.active:
            return None
        now = time.monotonic()
        if now >= self.held_until:
            self._lose(
                "its ttl ran out before it could be renewed (the process was paused, or the "
                "store was slow or unreachable)"
            )
            return None
        return now

    def _after(self, sent_at: float, outcome: object) -> float | None:
        if outcome is _STOPPED or not self.active:
            return None
        if outcome is None:
            self._told(False)
            self._lose("a renewal found that the store no longer has it under this owner")
            return None
        assert isinstance(outcome, float)
        self._told(True)
        self.lock._renewed(self.hold, sent_at, outcome)
        return sent_at + outcome / 3

    def _told(self, ok: bool) -> None:
        """Tell the observers a renewal was confirmed (``ok``) or failed."""
        if observe.observers:
            observe.lock_renewed(self.lock.backend.kind, ok)

    def _failed(self, exc: BaseException) -> float | None:
        if not self.active:
            return None
        self._told(False)
        now = time.monotonic()
        gap = self.lock.lease / 10
        if now + gap >= self.held_until:
            self._lose(f"renewals failed until its ttl ran out (last error: {exc})", exc)
            return None
        log.warning(
            "oncely: renewing lock %r failed (%s); retrying while its ttl lasts",
            self.lock.name,
            describe(exc),
        )
        return now + gap

    def run(self) -> float | None:
        loop = self.loop
        if loop is not None and loop.is_closed() and self.active:
            self._lose(
                "its holder's event loop closed while it held the lock; renewals stopped, and "
                "the lock frees itself when its ttl runs out"
            )
            return None
        sent_at = self._before()
        if sent_at is None:
            return None
        try:
            outcome = self.lock._renew_sync(self.hold)
        except Exception as exc:  # any failure, typed or not, is retried and then reported
            return self._failed(exc)
        return self._after(sent_at, outcome)

    async def run_async(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while self.active:
                await asyncio.sleep(max(0.0, self.due - time.monotonic()))
                sent_at = self._before()
                if sent_at is None:
                    return
                limit = min(renew_timeout(self.lock.lease), self.held_until - sent_at)
                try:
                    with keep_cancel():  # wait_for can drop a cancel meeting the reply (3.11)
                        outcome = await asyncio.wait_for(self.lock._arenew(self.hold), limit)
                except asyncio.TimeoutError:
                    again = self._failed(
                        TimeoutError(f"the store did not answer a renewal within {limit:.3g}s")
                    )
                except Exception as exc:  # any failure, typed or not, is retried and reported
                    again = self._failed(exc)
                else:
                    again = self._after(sent_at, outcome)
                if again is None:
                    return
                self.due = again
