"""The contract every lock backend fulfils, and the input checks every lock shares.

A backend makes the atomic decisions (one Lua script or one SQL statement each) and knows how to
wait for a release; :class:`oncely.locks.Lock` holds everything else once for all backends: the
owner token, the acquire loop, renewal, cancellation safety and the errors.

Backend operations, in a sync and an async face:

``acquire(name, owner, ttl, wait)``
    one atomic attempt: take the lock for ``owner`` with a fresh fencing token, or report it busy.
    ``wait`` is how long a backend whose server can queue waiters (PostgreSQL) may block; a
    backend with :attr:`LockBackend.bounded_attempts` (SQLite) gets the time the caller has
    left (``math.inf`` without a timeout or for ``blocking=False``) and makes its statement wait
    no longer for the store itself (another writer holding the file); the others ignore it and
    return at once.
``wait_release(name, busy, timeout)``
    block until the lock may be free (a release signal, the holder's ttl, or ``timeout``),
    without holding anything. Callers try again afterwards.
``release(hold)`` / ``extend(hold, ttl)``
    owner-checked: ``False`` / ``None`` when the hold is no longer the owner (the lock was lost).
``inspect(name, hold)``
    who holds the lock now, read on the store's clock.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from oncely.core.text import stored_text
from oncely.errors import ConfigurationError, InvalidLockName
from oncely.settings import seconds

__all__ = [
    "MAX_NAME_LENGTH",
    "Busy",
    "Hold",
    "LockBackend",
    "State",
    "check_name",
    "check_timeout",
    "check_ttl",
]

#: Lock names are at most this many characters (like idempotency keys).
MAX_NAME_LENGTH: Final = 255

Face = Literal["sync", "async"]


@dataclass(eq=False)
class Hold:
    """One successful acquisition, as the backend needs it back to release or extend it.

    ``token`` is the fencing token; ``ttl`` the validity (seconds) the store granted. ``mutex``
    serialises a renewal with the release of the same hold, so a late renewal never touches a
    connection or key that was already given back; ``done`` is set once release has begun.
    ``held_until`` (set by :class:`~oncely.locks.Lock`) is the local bound: the monotonic time
    until which the hold surely lasts, the send time of its acquire or last confirmed
    extension plus the validity that request got.
    """

    name: str
    owner: str
    token: int
    ttl: float
    face: Face = "sync"
    mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)
    done: bool = False
    #: The async twin of ``mutex`` (made on the event loop that acquired).
    alock: asyncio.Lock | None = field(default=None, repr=False)
    #: Backend-specific data (a PostgreSQL connection, the Redlock nodes that granted it).
    data: Any = field(default=None, repr=False)
    held_until: float = field(default=0.0, repr=False)


@dataclass(frozen=True)
class Busy:
    """A failed attempt.

    ``retry_after`` is the holder's remaining ttl in seconds when the store said so (``None``
    if unknown). ``unavailable`` is non-empty when the store could not decide at all (a Redlock
    quorum was unreachable); it says why. ``hint`` is backend data for
    :meth:`LockBackend.wait_release`. ``reason`` says why the lock could not be taken (by
    default another holder has it; on SQLite the database file may have stayed locked).
    """

    retry_after: float | None = None
    unavailable: str = ""
    hint: Any = None
    #: Why the attempt failed, for the :class:`~oncely.errors.LockTimeout` message.
    reason: str = "another holder has it"


@dataclass(frozen=True)
class State:
    """What the store says about a lock: held by anyone, by this hold, and for how long."""

    locked: bool
    owned: bool
    ttl: float | None = None


class LockBackend(abc.ABC):
    """Atomic lock operations on one store (or one set of Redlock nodes), shared per process."""

    #: The backend's kind, a bounded label for metrics (``redis``, ``redlock``,
    #: ``postgresql``, ``sqlite``); never the lock's name or URL.
    kind: str = "unknown"
    #: True if :meth:`acquire` can wait on the server (it then receives the whole wait).
    server_wait: bool = False
    #: True if :meth:`acquire` receives the time the caller has left (``math.inf``: unbounded,
    #: or ``blocking=False``) although the server does not queue waiters, to bound how long its
    #: statement waits for the store itself (SQLite: another writer holding the file). A store
    #: that stayed busy for that long is reported as :class:`Busy` (a
    #: :class:`~oncely.errors.LockTimeout` once the time is up), not as unavailable.
    bounded_attempts: bool = False
    #: True if a hold ends by itself ``ttl`` seconds after its acquire or last extension (Redis,
    #: Redlock, SQLite): :meth:`Lock.check <oncely.locks.Lock.check>` then fails locally once
    #: that time passed. False for PostgreSQL, whose lock lasts as long as its session, which any
    #: statement on the lock's connection keeps alive (there the bound applies with auto_renew).
    expires: bool = True
    #: True if :meth:`extend` (the sync face) can renew a hold taken through the async face:
    #: the hold names the lock in the store rather than living in an async connection. Such
    #: holds are then renewed by the watchdog thread (:mod:`oncely.core.renewal`), so a holder
    #: that blocks its event loop keeps the lock; other backends renew async holds on their
    #: loop. False unless a backend says so (PostgreSQL: the lock lives in the async session).
    sync_extends_async: bool = False
    #: How long ``acquire(timeout=None)`` keeps trying while the store cannot decide at all (a
    #: Redlock quorum unreachable) before it raises :class:`~oncely.errors.StoreUnavailable`.
    unavailable_wait: float = 5.0

    def lock_options(self, **options: Any) -> Any:
        """Validate per-lock options (e.g. PostgreSQL ``scope``); none by default."""
        if options:
            raise ConfigurationError(
                f"{type(self).__name__} takes no lock options, got {sorted(options)}; "
                "check the keyword arguments passed to Lock(...)"
            )
        return None

    # -- sync face ----------------------------------------------------------------------------
    @abc.abstractmethod
    def acquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy: ...

    @abc.abstractmethod
    def wait_release(self, name: str, busy: Busy, timeout: float) -> None: ...

    @abc.abstractmethod
    def release(self, hold: Hold) -> bool: ...

    @abc.abstractmethod
    def extend(self, hold: Hold, ttl: float) -> float | None: ...

    @abc.abstractmethod
    def inspect(self, name: str, hold: Hold | None) -> State: ...

    def close(self) -> None:
        """Close the connections of the sync face."""

    # -- async face ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def aacquire(
        self, name: str, owner: str, ttl: float, wait: float, options: Any = None
    ) -> Hold | Busy: ...

    @abc.abstractmethod
    async def await_release(self, name: str, busy: Busy, timeout: float) -> None: ...

    @abc.abstractmethod
    async def arelease(self, hold: Hold) -> bool: ...

    @abc.abstractmethod
    async def aextend(self, hold: Hold, ttl: float) -> float | None: ...

    @abc.abstractmethod
    async def ainspect(self, name: str, hold: Hold | None) -> State: ...

    async def aclose(self) -> None:
        """Close the connections of the async face (for the running event loop)."""


# -- input checks ------------------------------------------------------------------------------
def check_name(name: object) -> str:
    """Return ``name`` if it can name a lock, else raise :class:`InvalidLockName`."""
    if not isinstance(name, str):
        raise InvalidLockName(
            f"a lock name must be a str, not {type(name).__name__}; e.g. Lock(url, 'orders:42')"
        )
    if not name:
        raise InvalidLockName(
            "a lock name must not be empty; name the resource the lock protects, "
            "e.g. 'orders:42' or 'nightly-report'"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidLockName(
            f"a lock name has at most {MAX_NAME_LENGTH} characters, this one has {len(name)}; "
            "hash long identifiers first (e.g. hashlib.sha256(text.encode()).hexdigest())"
        )
    return stored_text(name, "lock name", InvalidLockName)


def check_ttl(ttl: object, what: str = "ttl") -> float:
    """Return ``ttl`` as float seconds if it is a finite duration above 0 (seconds, a text
    with a unit such as ``"30s"``, or a ``timedelta``: :func:`oncely.settings.seconds`)."""
    try:
        value = float(seconds(ttl, what))
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"{exc}; a lock's ttl is how long the lock survives a crashed holder, e.g. ttl=30, "
            "with auto_renew=True for work that may take longer"
        ) from None
    if value < 0.001:
        raise ConfigurationError(
            f"{what}={ttl!r}: the stores count in milliseconds; use at least 0.001 seconds"
        )
    return value


def check_timeout(blocking: bool, timeout: object) -> float | None:
    """Validate ``acquire``'s arguments the way :meth:`threading.Lock.acquire` does."""
    if timeout is None or (not isinstance(timeout, bool) and timeout == -1):
        return None
    if not blocking:
        raise ConfigurationError(
            "acquire(blocking=False) cannot take a timeout; pass either blocking=False or "
            "timeout=SECONDS"
        )
    try:
        return float(seconds(timeout, "timeout", above=False))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc}; or None to wait as long as it takes") from None
