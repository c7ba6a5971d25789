"""Exactly-once effects inside the user's own database (mechanisms 1, 3 and 4 of DESIGN.md).

* :mod:`oncely.sql.connections`: what the user holds (DB-API, SQLAlchemy, Django) as one
  uniform connection; :func:`duplicate_of` recognises a unique violation from any driver.
* :mod:`oncely.sql.insert`: :func:`insert_once` returns ``(row, created)``, never a duplicate
  error and never a second row.
* :mod:`oncely.sql.transaction`: :func:`transaction` commits the key's claim, the caller's
  writes and the stored result together; :func:`idempotent_transaction` is its decorator.
* :mod:`oncely.sql.phases`: recovery points for multi-step operations (:class:`Operation`),
  the completer and the reaper (:func:`reap`).
* :mod:`oncely.sql.schema`: the keys table (:func:`create_tables`, :func:`~oncely.sql.schema.ddl`).
* :mod:`oncely.sql.versioned`: :func:`versioned_update` / :func:`aversioned_update`,
  optimistic locking on a row (source §3.3); zero rows is never silent.
"""

from __future__ import annotations

from oncely.sql.connections import SqlConnection, adapt, busy, duplicate_of, retryable
from oncely.sql.decorator import idempotent_transaction
from oncely.sql.insert import ainsert_once, insert_once
from oncely.sql.keys import GLOBAL
from oncely.sql.phases import Operation, PhaseContext, areap, reap
from oncely.sql.schema import acreate_tables, create_tables
from oncely.sql.transaction import Transaction, transaction
from oncely.sql.versioned import aversioned_update, versioned_update

__all__ = [
    "GLOBAL",
    "Operation",
    "PhaseContext",
    "SqlConnection",
    "Transaction",
    "acreate_tables",
    "adapt",
    "ainsert_once",
    "areap",
    "aversioned_update",
    "busy",
    "create_tables",
    "duplicate_of",
    "idempotent_transaction",
    "insert_once",
    "reap",
    "retryable",
    "transaction",
    "versioned_update",
]
