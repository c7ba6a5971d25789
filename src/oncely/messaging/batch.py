"""Batched claims and completions for a broker's batch: N messages, one round trip each way.

A broker that delivers batches (``XREADGROUP COUNT``, a JetStream fetch) lets the consumer
claim the whole batch at once and complete the handled messages at once. This is the small
contract :class:`BatchClaims` (DESIGN.md: a mechanism that needs new store operations defines
its own contract instead of growing ``Store``), with one implementation:

* :class:`RedisBatchClaims`: the Redis store's own ``claim.lua`` and ``complete.lua`` (the same
  scripts, record layout and fences as :class:`oncely.stores.redis.RedisStore`, documented
  there), sent as one pipeline of ``EVALSHA`` calls: each claim is still one atomic script, so
  every decision stays in the store; only the round trips are shared. A ``NOSCRIPT`` answer
  loads the script and sends the pipeline again (a claim that was refused with ``NOSCRIPT``
  did not run).

Other stores have no batch face: :func:`batch_claims` returns None and the consumer claims
message by message (concurrently on the async face).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

from redis.exceptions import RedisError

from oncely.backends.lua import Script
from oncely.backends.redis import ms
from oncely.core.cancelsafe import keep_cancel
from oncely.core.records import (
    ClaimOutcome,
    InFlight,
    Mismatch,
    New,
    Record,
    RecordKey,
    Replay,
)
from oncely.errors import LeaseLost, StoreError
from oncely.stores.base import Store

__all__ = ["BatchClaims", "RedisBatchClaims", "batch_claims"]

_CLAIM: Final = Script("oncely.stores", "claim")
_COMPLETE: Final = Script("oncely.stores", "complete")


class BatchClaims(Protocol):
    """Claim and complete many keys in one round trip each (async)."""

    async def claim_many(
        self, keys: Sequence[RecordKey], fingerprints: Sequence[str], lease: float, ttl: float
    ) -> list[ClaimOutcome]:
        """One claim per key (with the fingerprint at the same position), with
        :meth:`oncely.stores.base.Store.claim`'s semantics.

        :raises StoreError: the store is unavailable (no claim is known to have been made).
        """
        ...

    async def complete_many(
        self, items: Sequence[tuple[RecordKey, int]], result: bytes, codec: str, ttl: float
    ) -> list[LeaseLost | None]:
        """Complete each ``(key, fence)``; None where it succeeded, the error where the claim
        was lost (:meth:`oncely.stores.base.Store.complete`).

        :raises StoreError: the store is unavailable.
        """
        ...


def _replayed(key: RecordKey, f: Sequence[Any]) -> Record:
    """The completed record claim.lua returned (fields ``st fe fp lu ea ca rs cd``)."""
    return Record(
        key.scope,
        key.digest,
        "completed",
        f[2].decode(),
        int(f[1]),
        None if f[3] is None else int(f[3]) / 1000,
        int(f[4]) / 1000,
        int(f[5]) / 1000,
        f[6],
        None if f[7] is None else f[7].decode(),
    )


def _outcome(key: RecordKey, reply: Any) -> ClaimOutcome:
    kind, now = reply[0], int(reply[1]) / 1000
    if kind == b"N":
        return New(int(reply[2]), int(reply[3]) / 1000, now)
    if kind == b"I":
        return InFlight(int(reply[2]), int(reply[3]) / 1000, now)
    if kind == b"M":
        return Mismatch(now)
    if kind == b"R":
        return Replay(_replayed(key, reply[2]), now)
    raise StoreError(f"unexpected reply from claim.lua: {reply!r}")


def _batched(script: Script, loop: str) -> bytes:
    """``script``'s own source as the local function ``one(KEYS, ARGV)``, then ``loop``, which
    calls it once per message with the ``KEYS`` and ``ARGV`` the single script gets. The
    decision is the store's script, word for word: only the loop (and how the arguments are
    packed, each shared one sent once) is new."""
    return b"local function one(KEYS, ARGV)\n" + script.source + b"\nend\n" + loop.encode()


# claim.lua takes KEYS record, fence counter; ARGV fingerprint, lease, ttl.
# Batch: KEYS fence counter, record 1..n; ARGV lease, ttl, fingerprint 1..n.
_CLAIM_BATCH: Final = _batched(
    _CLAIM,
    """
local out = {}
for i = 1, #KEYS - 1 do
  out[i] = one({KEYS[i + 1], KEYS[1]}, {ARGV[2 + i], ARGV[1], ARGV[2]})
end
return out
""",
)

# complete.lua takes KEYS record; ARGV fence, result, codec, ttl, channel.
# Batch: KEYS record 1..n; ARGV result, codec, ttl, channel prefix, (fence, digest) 1..n.
_COMPLETE_BATCH: Final = _batched(
    _COMPLETE,
    """
local out = {}
for i = 1, #KEYS do
  local fence, digest = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  out[i] = one({KEYS[i]}, {fence, ARGV[1], ARGV[2], ARGV[3], ARGV[4] .. digest})
end
return out
""",
)


class RedisBatchClaims:
    """:class:`BatchClaims` on a :class:`~oncely.stores.redis.RedisStore` (its pools, prefix,
    scripts and record layout)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.prefix: str = store.prefix
        self._fence_key = f"{self.prefix}:fence"

    def _key(self, key: RecordKey) -> str:
        return f"{self.prefix}:{key.scope}:{key.digest}"

    async def _eval(self, source: bytes, keys: list[Any], args: list[Any]) -> list[Any]:
        try:
            with keep_cancel():
                reply: list[Any] = await self.store.redis.aclient().execute_command(
                    "EVAL", source, len(keys), *keys, *args
                )
        except RedisError as exc:
            raise self.store.redis.error(exc) from exc
        return reply

    async def claim_many(
        self, keys: Sequence[RecordKey], fingerprints: Sequence[str], lease: float, ttl: float
    ) -> list[ClaimOutcome]:
        if not keys:
            return []
        scope = keys[0].scope
        if any(k.scope != scope for k in keys):
            raise ValueError("claim_many takes keys of one scope (one consumer)")
        flat_keys: list[Any] = [self._fence_key, *(self._key(k) for k in keys)]
        if len(fingerprints) != len(keys):
            raise ValueError("claim_many takes one fingerprint per key")
        args: list[Any] = [ms(lease), ms(ttl), *fingerprints]
        replies = await self._eval(_CLAIM_BATCH, flat_keys, args)
        return [_outcome(k, r) for k, r in zip(keys, replies)]

    async def complete_many(
        self, items: Sequence[tuple[RecordKey, int]], result: bytes, codec: str, ttl: float
    ) -> list[LeaseLost | None]:
        if not items:
            return []
        scope = items[0][0].scope
        if any(k.scope != scope for k, _ in items):
            raise ValueError("complete_many takes keys of one scope (one consumer)")
        flat_keys: list[Any] = [self._key(k) for k, _ in items]
        args: list[Any] = [result, codec, ms(ttl), f"{self.prefix}:done:{scope}:"]
        for k, fence in items:
            args += (fence, k.digest)
        out: list[LeaseLost | None] = []
        for (key, fence), reply in zip(items, await self._eval(_COMPLETE_BATCH, flat_keys, args)):
            if reply[0] == b"ok":
                out.append(None)
            else:
                out.append(
                    LeaseLost(
                        f"cannot complete {key.scope!r}/{key.digest[:16]}… with fence {fence}: "
                        "the claim was lost (its lease ran out and another consumer took it)"
                    )
                )
        return out


def batch_claims(store: Store) -> BatchClaims | None:
    """The batch face of ``store``, or None if it has none."""
    try:
        from oncely.stores.redis import RedisStore
    except ImportError:  # oncely[redis] not installed: no Redis store either
        return None
    if type(store) is RedisStore:
        return RedisBatchClaims(store)
    return None
