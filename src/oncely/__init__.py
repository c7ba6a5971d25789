"""oncely: make operations safe to repeat.

The pieces most applications need are importable from here; each mechanism lives in its
own module (``oncely.stores``, ``oncely.functions``, ``oncely.records``, ``oncely.errors``).
"""

from oncely.codecs import JsonCodec, RawCodec
from oncely.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    InFlightError,
    InvalidKey,
    LeaseLost,
    OncelyError,
    SchemaMissing,
    SerializationError,
    StoredFailure,
    StoreError,
    StoreUnavailable,
)
from oncely.functions import Claimed, current_claim, idempotent
from oncely.stores import Store, open_store

__version__ = "0.1.0"

__all__ = [
    "Claimed",
    "ConfigurationError",
    "IdempotencyKeyMismatch",
    "InFlightError",
    "InvalidKey",
    "JsonCodec",
    "LeaseLost",
    "OncelyError",
    "RawCodec",
    "SchemaMissing",
    "SerializationError",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoredFailure",
    "current_claim",
    "idempotent",
    "open_store",
]
