"""What the three SQL stores (SQLite, PostgreSQL, MySQL / MariaDB) share; each dialect's module
keeps only its SQL text and what its driver needs.

Every SQL store keeps the same ten record columns (``scope, digest, status, fingerprint, fence,
lease_until, expires_at, created_at, result, codec``, times as epoch seconds on the server's
clock), decides each operation in one statement, and answers the same way:

* parameters: :func:`key_params`, :func:`fence_params`, :func:`renew_params`,
  :func:`list_params` (named parameters; each dialect spells the placeholders itself);
* rows: :func:`record` builds a :class:`~oncely.core.records.Record` from those ten columns;
* claims that return the row they leave behind (SQLite, MySQL): the caller's random
  :func:`nonce` is written into ``claim_id`` only when the claim takes the row, so
  :func:`nonce_outcome` tells :class:`~oncely.core.records.New` from the rest with no second read;
* fenced writes: :func:`check_lease` raises :class:`~oncely.errors.LeaseLost` when the
  statement touched no row; :func:`changed` is ``watch``'s test;
* configuration and errors: :func:`validate_table`, :func:`schema_missing`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Final

from oncely.core.records import ClaimOutcome, New, Record, RecordKey
from oncely.errors import ConfigurationError, SchemaMissing
from oncely.stores.base import classify, lease_lost

__all__ = [
    "COLUMNS",
    "Params",
    "Row",
    "changed",
    "check_lease",
    "fence_params",
    "key_params",
    "list_params",
    "nonce",
    "nonce_outcome",
    "record",
    "renew_params",
    "schema_missing",
    "validate_table",
]

Row = tuple[Any, ...]
Params = dict[str, Any]

#: The record columns, in :class:`~oncely.core.records.Record` field order.
COLUMNS: Final = (
    "scope, digest, status, fingerprint, fence, lease_until, expires_at, created_at, result, codec"
)


def key_params(key: RecordKey) -> Params:
    return {"scope": key.scope, "digest": key.digest}


def fence_params(key: RecordKey, fence: int) -> Params:
    return {"scope": key.scope, "digest": key.digest, "fence": int(fence)}


def renew_params(key: RecordKey, fence: int, lease: float) -> Params:
    return {"scope": key.scope, "digest": key.digest, "fence": int(fence), "lease": float(lease)}


def list_params(scope: str | None, limit: int) -> Params:
    return {"scope": scope, "limit": max(0, int(limit))}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def record(row: Row) -> Record:
    """A :class:`~oncely.core.records.Record` from the first ten columns of ``row`` (:data:`COLUMNS`
    order; text that a driver returns as bytes is decoded)."""
    scope, digest, status, fingerprint, fence, lease_until, expires_at, created_at = row[:8]
    result, codec = row[8], row[9]
    return Record(
        scope=_text(scope),
        digest=_text(digest),
        status=status,
        fingerprint=_text(fingerprint),
        fence=int(fence),
        lease_until=None if lease_until is None else float(lease_until),
        expires_at=float(expires_at),
        created_at=float(created_at),
        result=None if result is None else bytes(result),
        codec=codec,
    )


def nonce() -> int:
    """A random signed 64-bit claim id."""
    return int.from_bytes(os.urandom(8), "big", signed=True)


def nonce_outcome(row: Row, claim_id: int, fingerprint: str) -> ClaimOutcome:
    """The outcome of a claim whose statement returned ``row`` = the ten record columns, the
    row's ``claim_id`` and the server's clock: :class:`~oncely.core.records.New` if the row carries
    the caller's ``claim_id``, else what the live record says
    (:func:`~oncely.stores.base.classify`)."""
    rec, now = record(row), float(row[11])
    if int(row[10]) == claim_id:
        assert rec.lease_until is not None
        return New(rec.fence, rec.lease_until, now)
    return classify(rec, fingerprint, now)


def check_lease(found: int, key: RecordKey, fence: int) -> None:
    """Raise :class:`~oncely.errors.LeaseLost` if a fenced write touched no row (``found`` is
    its row count, or the number of rows it returned)."""
    if found < 1:
        raise lease_lost(key, fence)


def changed(rows: list[Row], fence: int) -> bool:
    """Watch's test on ``(status, fence, live)``: the record is gone, expired, finished or held
    under another fence."""
    if not rows:
        return True
    status, current, live = rows[0]
    return status != "in_progress" or int(current) != fence or not live


def validate_table(table: str, longest: int, qualifier: str, qualifier_longest: int) -> str:
    """``table`` if it is a plain lowercase identifier of at most ``longest`` characters,
    optionally qualified by a ``qualifier`` (``"schema"``, ``"database"``) name of at most
    ``qualifier_longest``.

    :raises ConfigurationError: otherwise.
    """
    name = r"[a-z_][a-z0-9_]{0,%d}"
    pattern = rf"(?:{name % (qualifier_longest - 1)}\.)?{name % (longest - 1)}"
    if not isinstance(table, str) or not re.fullmatch(pattern, table):
        raise ConfigurationError(
            f"table name {table!r} is not a plain lowercase SQL identifier (at most {longest} "
            f"characters, optionally {qualifier}-qualified); use e.g. 'oncely_records' or "
            "'app.oncely_records'"
        )
    return table


def schema_missing(table: str, where: str, init: str) -> SchemaMissing:
    """The error for a store whose table does not exist in ``where``; ``init`` is the URL to
    give ``oncely init``."""
    named = "" if table == "oncely_records" else f" (table {table!r})"
    return SchemaMissing(
        f"table {table!r} does not exist in {where}; run `oncely init {init}`{named} or open "
        "the store with create_schema=True"
    )
