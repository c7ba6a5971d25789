"""Optimistic locking (source §3.3): versioned compare-and-set, and retrying the losers.

- :mod:`oncely.optimistic.retry`: :func:`retry_on_conflict` (decorator and call form, sync and
  async) and its decision :class:`ConflictRetry`.
- :mod:`oncely.optimistic.redis`: :class:`~oncely.optimistic.redis.RedisVersioned`, a
  versioned hash with compare-and-set in one Lua script (imports redis-py).
- SQL: :func:`oncely.sql.versioned_update`; SQLAlchemy and Django guards in
  :mod:`oncely.sql.sqlalchemy` and :mod:`oncely.contrib.django.versioned`.
- HTTP: ``ETag`` / ``If-Match`` in :mod:`oncely.http.conditional`.

A lost race raises :class:`~oncely.errors.StaleVersion` (expected and current version, and the
entity); see ``docs/optimistic.md``.
"""

from oncely.errors import StaleVersion
from oncely.optimistic.retry import (
    ATTEMPTS,
    BASE_DELAY,
    MAX_DELAY,
    ConflictRetry,
    retry_on_conflict,
)

__all__ = [
    "ATTEMPTS",
    "BASE_DELAY",
    "MAX_DELAY",
    "ConflictRetry",
    "StaleVersion",
    "retry_on_conflict",
]
