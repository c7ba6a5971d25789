"""Whose key space an ``oncely.sql`` key belongs to, and how it is stored.

Every operation takes ``scope=``: the tenant, user or API client the key belongs to (a
non-secret id), or :data:`GLOBAL` to say explicitly that every caller shares one key space. As
in :mod:`oncely.http` (draft-ietf-httpapi-idempotency-key-header-06, Security Considerations)
there is no default: one client must neither replay another's result nor block its key.
Keys are stored as their SHA-256 digest (:class:`~oncely.core.records.RecordKey`), never raw.
"""

from __future__ import annotations

from typing import Final

from oncely.core.records import MAX_KEY_LENGTH, RecordKey
from oncely.errors import ConfigurationError, InvalidKey

__all__ = ["GLOBAL", "Global", "record_key"]


class Global:
    """The type of :data:`GLOBAL`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "oncely.sql.GLOBAL"


#: ``scope=GLOBAL``: one key space for every caller (an explicit opt-out of per-client scopes).
GLOBAL: Final = Global()
# The empty string: no caller's scope can be it (an empty scope is refused), so a tenant whose
# id happens to be "*" (or anything else) never shares GLOBAL's key space.
_GLOBAL_SCOPE: Final = ""


def record_key(key: object, scope: object, namespace: str | None = None) -> RecordKey:
    """The stored key of ``key`` in ``scope`` (and, when given, ``namespace``: the function of
    ``@idempotent_transaction``, so two functions given the same key never share a record).

    Raises :class:`~oncely.errors.InvalidKey` for a key that is not a non-empty ``str`` of at
    most 255 characters (Stripe's limit), :class:`~oncely.errors.ConfigurationError` for a
    missing or empty scope (pass the tenant/user id, or ``oncely.sql.GLOBAL``).
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"an idempotency key must be a non-empty str, not {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(
            f"idempotency key of {len(key)} characters: at most {MAX_KEY_LENGTH} (hash a longer "
            "natural key yourself, e.g. hashlib.sha256(...).hexdigest())"
        )
    if isinstance(scope, Global) or type(scope).__name__ == "Global":  # also oncely.http.GLOBAL
        name = _GLOBAL_SCOPE
    elif isinstance(scope, str) and scope and len(scope) <= MAX_KEY_LENGTH:
        name = scope
    else:
        raise ConfigurationError(
            f"scope={scope!r}: pass whose key space this is (a tenant, user or client id, a "
            f"non-empty str of at most {MAX_KEY_LENGTH} characters), or oncely.sql.GLOBAL if "
            "every caller shares one key space"
        )
    if namespace is None:
        return RecordKey.of(name, key)
    # "\x00" cannot occur in a qualified function name, so (namespace, key) pairs never collide
    return RecordKey.of(name, f"{namespace}\x00{key}")
