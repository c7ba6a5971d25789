"""Steps both sans-IO flows take after their body ran: store the outcome, or free the key.

Each step is a sub-generator of :mod:`oncely.core.ops` operations (``yield from`` it inside a
flow), written once for the decorator and the HTTP flow:

* :func:`complete` — store the outcome; retry with a short backoff while the store is
  unreachable; if it still is, hand the write to the background with the lease renewed
  (:class:`~oncely.core.ops.CompleteLater`): the body ran, so the key is never released;
* :func:`release` — free the key after a failure that is not stored; retry the same way, then
  give up (the key frees itself when its lease runs out).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Final

from oncely.core.ops import Complete, CompleteLater, Release, Sleep, StoreOp
from oncely.core.records import RecordKey
from oncely.errors import OncelyError, ResultTooLarge, StoreUnavailable

__all__ = ["ATTEMPTS", "complete", "release"]

#: How many times a step tries the store inline (pauses 0.05 s, 0.1 s between them).
ATTEMPTS: Final = 3


def _pause(attempt: int) -> Sleep:
    return Sleep(0.05 * 2**attempt)


def complete(
    key: RecordKey,
    fence: int,
    data: bytes,
    codec: str,
    ttl: float,
    lease: float,
    what: str,
    attempts: int = ATTEMPTS,
    marker: Callable[[ResultTooLarge], tuple[bytes, str]] | None = None,
) -> Generator[StoreOp, Any, StoreUnavailable | None]:
    """Store the outcome under ``fence``; returns None once stored, or the last
    :class:`~oncely.errors.StoreUnavailable` after handing the write to the background.

    ``marker``: given the refusal, the small "ran, result not storable" record
    (``(data, codec)``) stored instead when the store refuses ``data`` for its size
    (:class:`~oncely.errors.ResultTooLarge`, a deterministic refusal, never retried as an
    outage); the refusal is raised after it.

    :raises ResultTooLarge: ``data`` is over the store's size limit (``marker`` was stored).
    :raises LeaseLost: the claim is gone (another caller may have run the body too).
    :raises OncelyError: any other store error.
    """
    for attempt in range(attempts):
        try:
            yield Complete(key, fence, data, codec, ttl)
            return None
        except ResultTooLarge as exc:
            if marker is None:
                raise
            # A marker the store cannot take now goes on in the background, as any completion;
            # one too large itself (a tiny limit) is kept without its text.
            data, codec = marker(exc)
            bare = None if not data else _bare(codec)
            yield from complete(key, fence, data, codec, ttl, lease, what, attempts, bare)
            raise
        except StoreUnavailable as exc:
            if attempt + 1 == attempts:
                yield CompleteLater(key, fence, data, codec, ttl, lease, what)
                return exc
            yield _pause(attempt)
    raise AssertionError("attempts must be at least 1")  # pragma: no cover


def _bare(codec: str) -> Callable[[ResultTooLarge], tuple[bytes, str]]:
    return lambda _: (b"", codec)


def release(
    key: RecordKey, fence: int, attempts: int = ATTEMPTS
) -> Generator[StoreOp, Any, OncelyError | None]:
    """Free the key held under ``fence``; returns None once freed, else the error that stopped
    it (never raises: a key that cannot be freed frees itself when its lease runs out)."""
    for attempt in range(attempts):
        try:
            yield Release(key, fence)
            return None
        except StoreUnavailable as exc:
            if attempt + 1 == attempts:
                return exc
            yield _pause(attempt)
        except OncelyError as exc:
            return exc
    raise AssertionError("attempts must be at least 1")  # pragma: no cover
