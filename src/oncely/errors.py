"""The errors oncely raises: one small hierarchy, each message says what to do next.

Everything derives from :class:`OncelyError`. Input mistakes also derive from
:class:`ValueError` so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "IdempotencyKeyMismatch",
    "InFlightError",
    "InvalidKey",
    "LeaseLost",
    "OncelyError",
    "SchemaMissing",
    "SerializationError",
    "StoreError",
    "StoreUnavailable",
    "StoredFailure",
]


class OncelyError(Exception):
    """Base class of every error oncely raises on purpose."""


class ConfigurationError(OncelyError, ValueError):
    """A setting or store URL is wrong; the message names the setting and a valid example."""


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


class SchemaMissing(StoreError):
    """The store's table does not exist. Run ``oncely init URL`` or pass ``create_schema=True``."""
