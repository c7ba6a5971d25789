"""Exactly-once effects inside the user's own database (mechanisms 1, 3 and 4 of DESIGN.md).

* :mod:`oncely.sql.connections`: what the user holds (DB-API, SQLAlchemy, Django) as one
  uniform connection; :func:`duplicate_of` recognises a unique violation from any driver.
* :mod:`oncely.sql.insert`: :func:`insert_once` returns ``(row, created)``, never a duplicate
  error and never a second row.
"""

from __future__ import annotations

from oncely.sql.connections import SqlConnection, adapt, duplicate_of, retryable
from oncely.sql.insert import ainsert_once, insert_once

__all__ = ["SqlConnection", "adapt", "ainsert_once", "duplicate_of", "insert_once", "retryable"]
