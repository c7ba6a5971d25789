"""Exactly-once effects inside the user's own database (mechanisms 1, 3 and 4 of DESIGN.md).

* :mod:`oncely.sql.connections`: what the user holds (DB-API, SQLAlchemy, Django) as one
  uniform connection; :func:`duplicate_of` recognises a unique violation from any driver.
* :mod:`oncely.sql.versioned`: :func:`versioned_update` / :func:`aversioned_update`,
  optimistic locking on a row (source §3.3); zero rows is never silent.
"""

from __future__ import annotations

from oncely.sql.connections import SqlConnection, adapt, duplicate_of, retryable
from oncely.sql.versioned import aversioned_update, versioned_update

__all__ = [
    "SqlConnection",
    "adapt",
    "aversioned_update",
    "duplicate_of",
    "retryable",
    "versioned_update",
]
