"""The errors oncely raises: one small hierarchy, each message says what to do next.

Everything derives from :class:`OncelyError`. Input mistakes also derive from
:class:`ValueError` so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "HttpProblem",
    "IdempotencyKeyMismatch",
    "InFlightError",
    "InvalidKey",
    "InvalidLockName",
    "InvalidPayload",
    "LeaseLost",
    "LockError",
    "LockLost",
    "LockNotOwned",
    "LockTimeout",
    "OncelyError",
    "ResultNotStored",
    "SchemaMissing",
    "SerializationError",
    "SettingWarning",
    "StoreError",
    "StoreUnavailable",
    "StoredFailure",
    "TokenError",
    "TokenExpired",
    "TokenForeign",
    "TokenForged",
    "TokenReused",
]


class OncelyError(Exception):
    """Base class of every error oncely raises on purpose."""


class ConfigurationError(OncelyError, ValueError):
    """A setting or store URL is wrong; the message names the setting and a valid example."""


class SettingWarning(UserWarning):
    """An ``ONCELY_*`` environment variable that is not a setting (the message names the closest).

    Warned once per name and process; see :mod:`oncely.settings`.
    """


class InvalidKey(OncelyError, ValueError):
    """An idempotency key is empty, too long or otherwise unusable."""


class IdempotencyKeyMismatch(OncelyError):
    """The key was already used with a different payload (HTTP 422 in the draft).

    Retries must send the same payload as the first attempt; a new operation needs a new key.
    """


class InFlightError(OncelyError):
    """Another call with the same key is still running (HTTP 409 in the draft).

    ``retry_after`` is the number of seconds (store clock) until that call's lease runs out.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LeaseLost(OncelyError):
    """The caller's claim is gone: its lease ran out and a newer fence took over, or it was removed.

    This is the zombie-writer case. Whatever the caller did after losing the lease must not be
    trusted; the newer holder's record wins.
    """


class SerializationError(OncelyError, TypeError):
    """A result could not be encoded or decoded by the configured codec."""


class StoredFailure(OncelyError):
    """Replay of a call whose exception was stored (``on_error="store"``) and cannot be rebuilt.

    ``type_name`` is the original exception's qualified class name, ``detail`` its message.
    """

    def __init__(self, type_name: str, detail: str) -> None:
        super().__init__(f"{type_name}: {detail}")
        self.type_name = type_name
        self.detail = detail


class StoreError(OncelyError):
    """The store failed in a way oncely cannot hide."""


class StoreUnavailable(StoreError):
    """The store cannot be reached. By default nothing runs unprotected (fail closed)."""


class ResultNotStored(StoreError):
    """The call ran (its effect happened) but its outcome could not be stored.

    Not a :class:`StoreUnavailable`: that one means nothing ran. ``result`` is what the call
    returned (or, for an exception listed in ``store_errors``, that exception). The key is not
    released: oncely keeps it claimed, with its lease renewed, and retries storing the outcome
    in the background for a bounded time (:data:`oncely.core.settle.SETTLE_FOR` seconds), so a
    retry meanwhile finds the call in flight (waits, or gets :class:`InFlightError`) and then
    replays it. Only if the store stays unreachable past that bound does the lease run out and
    a later retry run the call again; act on ``result`` instead of retrying blindly.
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class SchemaMissing(StoreError):
    """The store's table does not exist. Run ``oncely init URL`` or pass ``create_schema=True``."""


class LockError(OncelyError):
    """A distributed lock (:mod:`oncely.locks`) could not do what was asked."""


class LockLost(LockError):
    """The lock this instance held is gone: its ttl ran out, or the store lost it.

    Another holder may have run meanwhile, so whatever was done under the lock must not be
    trusted unless its writes were fenced (see :mod:`oncely.locks.fencing`).
    """


class LockTimeout(LockError, TimeoutError):
    """``acquire(timeout=...)`` gave up: someone else held the lock for the whole timeout."""


class LockNotOwned(LockError, RuntimeError):
    """``release()``/``extend()``/``token`` on a lock instance that does not hold the lock.

    Like :meth:`threading.Lock.release` on an unlocked lock: a programming mistake, not a race.
    """


class InvalidLockName(LockError, ValueError):
    """A lock name is empty, not a string, or longer than 255 characters."""


# -- one-time tokens (oncely.tokens) and HTTP (oncely.http) ---------------------------------------
class TokenError(OncelyError):
    """A one-time token was refused; the subclass says why (each maps to its own HTTP problem)."""


class TokenForged(TokenError, ValueError):
    """The token is malformed or its signature does not verify: it was not issued by us."""


class TokenExpired(TokenError):
    """The token's lifetime ran out (judged by the store's clock); ask for a new token."""


class TokenReused(TokenError):
    """The token was already consumed: this is a repeat of an operation that happened once."""


class TokenForeign(TokenError):
    """The token is genuine but was issued for another subject or purpose (``what`` says which)."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


class InvalidPayload(OncelyError, ValueError):
    """A request payload cannot be fingerprinted (e.g. not JSON when JSON fields are chosen)."""


class HttpProblem(OncelyError):
    """An HTTP error to answer with ``application/problem+json`` (RFC 9457).

    Raise it from a handler or dependency behind oncely's HTTP middleware to get a problem
    response; ``slug`` is the last part of the stable ``type`` URI (see ``docs/http.md``).
    """

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        headers: tuple[tuple[str, str], ...] = (),
        **extra: object,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers
        self.extra = extra
