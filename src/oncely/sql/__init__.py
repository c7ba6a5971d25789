"""Exactly-once effects inside the user's own database (mechanisms 1, 3 and 4 of DESIGN.md).

* :mod:`oncely.sql.connections`: what the user holds (DB-API, SQLAlchemy, Django) as one
  uniform connection; :func:`duplicate_of` recognises a unique violation from any driver.
"""

from __future__ import annotations

from oncely.sql.connections import SqlConnection, adapt, duplicate_of, retryable

__all__ = ["SqlConnection", "adapt", "duplicate_of", "retryable"]
