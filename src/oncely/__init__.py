"""oncely: make operations safe to repeat.

The pieces most applications need are importable from here; each mechanism lives in its
own module (``oncely.stores``, ``oncely.functions``, ``oncely.locks``, ``oncely.tokens``,
``oncely.http``, ``oncely.core.records``, ``oncely.errors``). Importing oncely loads no driver:
redis-py, psycopg and PyMySQL are imported by the store that needs them.
"""

from oncely.codecs import JsonCodec, RawCodec
from oncely.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    InFlightError,
    InvalidKey,
    LeaseLost,
    LockError,
    LockLost,
    LockTimeout,
    NotReplicated,
    OncelyError,
    ResultNotStored,
    ResultTooLarge,
    SchemaMissing,
    SerializationError,
    StoredFailure,
    StoreError,
    StoreUnavailable,
    TokenError,
    TokenExpired,
    TokenForeign,
    TokenForged,
    TokenReused,
)
from oncely.functions import Claimed, current_claim, idempotent
from oncely.locks import Lock
from oncely.stores import Store, open_store
from oncely.tokens import Tokens

__version__ = "0.1.0"

__all__ = [
    "Claimed",
    "ConfigurationError",
    "IdempotencyKeyMismatch",
    "InFlightError",
    "InvalidKey",
    "JsonCodec",
    "LeaseLost",
    "Lock",
    "LockError",
    "LockLost",
    "LockTimeout",
    "NotReplicated",
    "OncelyError",
    "RawCodec",
    "ResultNotStored",
    "ResultTooLarge",
    "SchemaMissing",
    "SerializationError",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoredFailure",
    "TokenError",
    "TokenExpired",
    "TokenForeign",
    "TokenForged",
    "TokenReused",
    "Tokens",
    "current_claim",
    "idempotent",
    "open_store",
]
