"""The Redis store: one hash per record, every decision one Lua script.

Layout (``prefix`` defaults to ``"oncely"``):

* record ``f"{prefix}:{scope}:{digest}"``: a hash with short fields. A claim writes ``st``
  ``in_progress``, ``fe`` fence, ``fp`` fingerprint, ``lu`` lease_until (ms), ``ea`` expires_at
  (ms), ``ca`` created_at (ms). A completion turns it into the packed completed record, which keeps
  only what a replay needs: ``st`` ``C`` followed by the fence in 8 base-94 digits; ``ea`` ``9e99``
  (the expiry is the key's ``PEXPIREAT``; read back with ``PEXPIRETIME``, or before Redis 7.0 as
  the server's time plus ``PTTL``); the fingerprint as ``fx``, its longest even-length
  lowercase-hex tail in raw bytes (half the size), and ``ft``, the text before that tail (each left
  out when empty); ``ca`` only when it is not the fence's millisecond (the fence is the claim's
  ``TIME`` in microseconds unless the counter ran ahead of the clock); ``rs`` result (bytes) and
  ``cd`` codec (left out for ``json``). A result of 65 to 1,024 bytes is kept in pieces of 64 bytes
  (``rs``, ``r1`` … ``rN``, and N ends ``st``) so that the hash stays a listpack (Redis turns a
  hash with one value over ``hash-max-listpack-value``, 64 by default, into a hashtable: about 600
  bytes more per record); the scripts join them again. A completed key of a 100-byte result takes
  328 bytes (``MEMORY USAGE``, key name included; about 385 by the server's ``used_memory``), one
  of a 4-byte result 200. A fence of 94^8 or more (after 2163) keeps the compact completed record
  of the layout before (``st`` ``c`` or ``cN``, ``fe`` fence, ``ea`` in ms, ``cd``). Records
  written by earlier versions are read, replayed, listed and deleted as they are: compact ones,
  completed ones with ``st`` ``completed``, ``fp``, ``ca`` and ``rn`` = N when the result is in
  pieces, or the whole result in ``rs`` and ``sc`` scope, ``dg`` digest fields (the key's name
  holds both anyway). Claims in flight keep the earlier layout, so a build of an earlier version
  and this one see each other's claims; an earlier build finds no ``fp`` in a packed or compact
  completed record and answers Mismatch (it never runs the call again), ``st`` and ``ea`` stay so
  that it sees a live record at all. The key carries ``PEXPIREAT expires_at``, so Redis drops
  expired records by itself. ``release`` turns the record into a tombstone (``st`` = ``released``)
  that every reader ignores and any claim takes over, and that Redis drops after a minute: a
  release repeated after a lost reply finds it.
* fence counter ``f"{prefix}:fence"``: the last fence handed out, for every key; it never
  expires.
* channel ``f"{prefix}:done:{scope}:{digest}"``: ``complete``, ``release`` and ``delete`` publish
  on it in the same script, and :meth:`RedisStore.watch` listens to it.

Every operation is one ``EVALSHA`` of a script from ``oncely/stores/lua/`` (``EVAL`` once more
if the server answers ``NOSCRIPT``, which also puts the script back in its cache). The scripts
hold the whole decision and read the time with ``TIME``, so the client's clock never decides
anything. A fence is ``max(counter + 1, TIME in microseconds, old fence + 1)`` and the counter
keeps it, so the fences of a key grow whatever happened between two claims (release, delete,
expiry) and whatever the clock does. A claim carries a not-after bound on the server's clock,
the end of its caller's budget (from an estimate of that clock, :mod:`oncely.core.storeclock`):
claim.lua decides nothing past it, so a claim that sat in a paused server's socket until its
caller gave up never takes a key over.

Each operation is written once, as a plan (:mod:`oncely.backends.plans`): a generator that
yields the script calls and reads their replies. The sync face runs it on :class:`redis.Redis`,
the async face on :class:`redis.asyncio.Redis`, one client per running event loop
(:class:`oncely.backends.redis.RedisClients`); scripts are loaded by
:mod:`oncely.backends.lua`.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import re
import threading
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Final, NamedTuple

import redis
import redis.asyncio

from oncely.backends.budget import DEADLINE, end, start
from oncely.backends.durable import EvalWait
from oncely.backends.forks import after_fork
from oncely.backends.lua import Script, evalsha
from oncely.backends.plans import Command, Eval, Plan, arun
from oncely.backends.redis import DRIVER_ERRORS, RedisClients, driver_fault, ms
from oncely.backends.redis import check_url as check_redis_url
from oncely.core.cancelsafe import keep_cancel
from oncely.core.records import (
    ClaimOutcome,
    InFlight,
    Mismatch,
    New,
    Record,
    RecordKey,
    Replay,
    Status,
)
from oncely.core.storeclock import StoreClock
from oncely.errors import (
    ConfigurationError,
    LeaseLost,
    NotReplicated,
    StoreError,
    StoreUnavailable,
)
from oncely.settings import whole
from oncely.stores.planned import PlannedStore
from oncely.stores.polling import poll_plan

__all__ = ["RedisStore"]


def _script(name: str) -> Script:
    return Script("oncely.stores", name)


_CLAIM: Final = _script("claim")
_COMPLETE: Final = _script("complete")
_RELEASE: Final = _script("release")
_RENEW: Final = _script("renew")
_GET: Final = _script("get")
_DELETE: Final = _script("delete")
_PROBE: Final = _script("probe")
_LIST: Final = _script("list")
_NOW: Final = _script("now")

_STATUS: Final[dict[bytes, Status]] = {b"in_progress": "in_progress", b"completed": "completed"}
#: ``st`` of a compact completed record: ``c``, or ``cN`` with its result in N + 1 pieces (the
#: scripts report a packed record's status as ``completed``).
_COMPACT: Final = re.compile(r"c[0-9]*")
_SCAN_COUNT: Final = 500
_monotonic: Final = time.monotonic
# How long past the holder's lease a watcher waits before it looks again (the lease may have
# been renewed, which publishes nothing).
_LEASE_SLACK: Final = 0.002
# How long a released record stays as a hidden tombstone, so that a release repeated after a
# lost reply finds the caller's own tombstone (ms).
_TOMBSTONE_MS: Final = 60_000
_GLOB_SPECIAL: Final = str.maketrans({c: "\\" + c for c in "\\*?[]"})


# -- plain functions shared by the sync and async faces -------------------------------------------
#: :func:`~oncely.backends.redis.ms` of the few leases and TTLs a process uses, remembered.
_ms: Final = functools.lru_cache(maxsize=256)(ms)


def _record(scope: str, digest: str, f: Sequence[Any]) -> Record:
    """A :class:`Record` from the fields ``st fe fp lu ea ca rs cd`` (as HMGET returns them)."""
    lease_until = f[3]
    codec = f[7]
    return Record(
        scope,
        digest,
        _STATUS[f[0]],
        f[2].decode(),
        int(f[1]),
        None if lease_until is None else int(lease_until) / 1000,
        int(f[4]) / 1000,
        int(f[5]) / 1000,
        f[6],
        None if codec is None else codec.decode(),
    )


_HEX_DIGITS: Final = "0123456789abcdef"


def _split_fingerprint(fingerprint: str) -> tuple[str, bytes]:
    """``fingerprint`` as a compact completed record keeps it (complete.lua makes the same
    split): the text before its longest even-length lowercase-hex tail (``ft``), and that tail
    as raw bytes (``fx``), so that claim.lua compares a replay's fingerprint without hex."""
    head = fingerprint.rstrip(_HEX_DIGITS)  # linear, whatever the fingerprint
    if not head and not len(fingerprint) % 2:  # all hex, as the default fingerprint
        return "", bytes.fromhex(fingerprint)
    tail = fingerprint[len(head) :]
    tail = tail[len(tail) % 2 :]
    return fingerprint[: len(fingerprint) - len(tail)], bytes.fromhex(tail)


def _parse_claim(reply: Any, key: RecordKey, now: float) -> ClaimOutcome:
    """The outcome of claim.lua's ``reply`` (``now``: its second element, in seconds)."""
    kind = reply[0]
    if kind == b"R":
        return Replay(_record(key.scope, key.digest, reply[2]), now)
    if kind == b"N":
        return New(int(reply[2]), int(reply[3]) / 1000, now)
    if kind == b"I":
        return InFlight(int(reply[2]), int(reply[3]) / 1000, now)
    if kind == b"M":
        return Mismatch(now)
    if kind == b"L":
        raise StoreUnavailable(
            f"the claim of {key.scope!r}/{key.digest[:16]}… reached Redis only after its caller "
            "stopped waiting for it (its budget had ended; the server was paused or overloaded "
            "and ran the queued command late), so Redis refused it: nothing was decided or "
            "written. Retry."
        )
    raise StoreError(f"unexpected reply from claim.lua: {reply!r}")


def _check_fenced(reply: Any, op: str, key: RecordKey, fence: int) -> Any:
    """Return ``reply`` if the fenced script succeeded, else raise :class:`LeaseLost`."""
    if reply[0] == b"ok":
        return reply
    status, current = reply[1].decode(), reply[2].decode()
    status = "completed" if _COMPACT.fullmatch(status) else status
    if not status:
        why = (
            "the record is gone: it was released or deleted, or it expired after its lease ran out"
        )
    elif current == str(fence):
        why = f"the record is already {status} under this fence"
    else:
        why = (
            f"the lease ran out and another caller re-claimed the key (the record is {status} "
            f"under fence {current} now)"
        )
    raise LeaseLost(
        f"cannot {op} {key.scope!r}/{key.digest[:16]}… with fence {fence}: {why}. Whatever ran "
        "under the lost lease must not be trusted; the newer holder's record wins."
    )


def _parse_renew(reply: Any, key: RecordKey, fence: int) -> float:
    return int(_check_fenced(reply, "renew", key, fence)[1]) / 1000


def _parse_get(reply: Any, key: RecordKey) -> Record | None:
    return None if reply is None else _record(key.scope, key.digest, reply)


def _parse_time(reply: Any) -> float:
    seconds, micros = reply
    return int(seconds) + int(micros) / 1_000_000


def _parse_list(rows: Any, scope: str | None, prefix: str, cluster: bool) -> builtins.list[Record]:
    """Records from list.lua's rows (``st fe fp lu ea ca rs cd sc dg key``), in ``scope`` if
    given. ``sc`` and ``dg`` are only in records of earlier versions; otherwise the scope and
    the digest come from the key's name (``prefix:scope:digest``, on a cluster
    ``prefix:{group}:scope:digest``; the digest is hex, so the last colon ends the scope)."""
    out = []
    skip = len(prefix) + 1
    for row in rows:
        if row[8] is not None and row[9] is not None:
            row_scope, digest = row[8].decode(), row[9].decode()
        else:
            name = row[10].decode()[skip:]
            if cluster:
                name = name.partition(":")[2]
            row_scope, colon, digest = name.rpartition(":")
            if not colon:
                continue  # not a record's name
        if scope is None or row_scope == scope:
            out.append(_record(row_scope, digest, row))
    return out


def _finish_list(records: builtins.list[Record], limit: int) -> builtins.list[Record]:
    records.sort(key=lambda r: (r.created_at, r.scope, r.digest))
    return records[:limit]


def _glob_escape(text: str) -> str:
    """Escape ``text`` for a SCAN MATCH pattern."""
    return text.translate(_GLOB_SPECIAL)


def _is_message(message: Any) -> bool:
    """True for a published message (not a subscribe confirmation)."""
    return message is not None and message.get("type") in ("message", b"message")


class _ScanAll(NamedTuple):
    """Every hash key matching ``pattern`` on every primary of a cluster (redis-py's cluster
    ``scan_iter``); the reply is the list of keys."""

    pattern: str


def _group(key: RecordKey) -> str:
    """A record's hash-tag group on Redis Cluster: 3 hex digits of its digest (4096 groups)."""
    return key.digest[:3]


class _Subscribe(NamedTuple):
    """Open a pub/sub connection subscribed to ``channel`` (the subscription is confirmed by
    the first message); the reply is the pub/sub object."""

    channel: str


class _Receive(NamedTuple):
    """The next pub/sub message within ``timeout`` seconds, or None."""

    pubsub: Any
    timeout: float


class _Unsubscribe(NamedTuple):
    """Close a pub/sub connection."""

    pubsub: Any


class RedisStore(PlannedStore):
    """Idempotency records in Redis (``redis://`` or ``rediss://``), via ``oncely[redis]``.

    ``client`` / ``async_client`` use existing redis-py clients (not closed by :meth:`close` /
    :meth:`aclose`; they must not decode responses). Otherwise the store opens its own pools
    from ``url``; ``pool_options`` go to :meth:`redis.ConnectionPool.from_url` (e.g.
    ``max_connections``, ``socket_timeout``) for the sync pool and to
    :meth:`redis.asyncio.ConnectionPool.from_url` for each event loop's pool. Each operation
    (a script, a command) has one budget for the pool wait, connecting, sending and the reply
    together: the larger of ``socket_timeout`` and ``pool_timeout``, 5 s by default
    (:mod:`oncely.backends.budget`; the URL query ``?socket_timeout=…`` or the options set it),
    so a server that stops answering fails a call with :class:`StoreUnavailable` within it;
    TCP keepalive drops idle connections the network cut off. Those pools do not
    retry a failed command by default, and that is on purpose: a claim or complete whose reply
    was lost may have run, so the error goes to the caller as :class:`StoreUnavailable`.
    Call :meth:`aclose` in every event loop that used the async face before the loop ends.

    ``max_watchers`` bounds how many waiters hold a subscribed connection at once (per store;
    at most half of the pool's ``max_connections``); beyond it, waiters poll the record
    with backoff (1 ms doubling to 50 ms) instead.

    Scripts of concurrent callers share writes on one connection (auto-pipelining, see
    :class:`~oncely.backends.redis.RedisClients`; ``autopipeline=False`` turns it off). Each
    pool holds ``max_connections`` (keyword, URL, or 100); a caller that finds it busy waits up
    to ``pool_timeout`` seconds (default: the socket timeout; less if less is left of the
    operation's budget) for a connection, then gets :class:`StoreUnavailable`.
    """

    schemes = ("redis", "rediss", "redis+cluster", "rediss+cluster")

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        check_redis_url(url)

    #: Redis refuses a bulk string over ``proto-max-bulk-len`` (default 512 MB); it is not read
    #: from the server (managed services refuse CONFIG GET).
    max_result_bytes = 512 * 2**20
    max_result_source = "Redis proto-max-bulk-len, 512 MB by default"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "oncely",
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
        max_watchers: int = 16,
        **pool_options: Any,
    ) -> None:
        super().__init__(url)
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(f"prefix must be a non-empty string, not {prefix!r}")
        self.redis = RedisClients(url, client=client, async_client=async_client, **pool_options)
        # Given only an async client (its own auth, TLS, ...), the sync face would be built from
        # the URL, which may not reach the same server: renew async leases on their loop.
        self.renews_from_thread = not (async_client is not None and client is None)
        self.prefix = prefix
        self._done = f"{prefix}:done:"
        self._fence_key = f"{prefix}:fence"
        #: Redis Cluster: a script's keys must share one slot, so the record and its fence
        #: counter carry the same hash tag (see :meth:`_key`).
        self.cluster = self.redis.cluster
        if self.cluster and ("{" in prefix or "}" in prefix):
            raise ConfigurationError(
                f"prefix {prefix!r} must not contain braces on Redis Cluster: oncely puts its "
                "own hash tag right after the prefix"
            )
        # Each subscribed waiter holds a connection; past this many, waiters poll instead, so a
        # burst of duplicates cannot drain the pool that claims and completions need.
        # At most half of the pool (max_connections: a waiter's probes need a connection
        # too): a pool of one leaves every waiter polling.
        watchers = whole(max_watchers, "max_watchers", where="RedisStore", minimum=1)
        watchers = min(watchers, self.redis.max_connections // 2)
        self._watch_slots = threading.BoundedSemaphore(watchers)
        self._max_watchers = watchers
        after_fork(self, RedisStore._forked)
        #: Seconds the sync face waits for each reply (None: without bound).
        self.socket_timeout = self.redis.socket_timeout
        #: The estimate of the server's clock that bounds each claim (oncely.core.storeclock):
        #: one per store, or on a cluster one per hash-tag group (its node's clock).
        self._clock = StoreClock()
        self._clocks: dict[str, StoreClock] = {}
        #: ``WAIT`` after claims, completions and renewals (``wait_replicas``), or None.
        self._durable = self.redis.durable

    def _forked(self) -> None:
        """In a forked child the parent's waiters hold no slot (redis-py's pools reset
        themselves on the child's first command)."""
        self._watch_slots = threading.BoundedSemaphore(self._max_watchers)

    # -- keys ----------------------------------------------------------------------------------
    def _key(self, key: RecordKey) -> str:
        if self.cluster:
            return f"{self.prefix}:{{{_group(key)}}}:{key.scope}:{key.digest}"
        return f"{self.prefix}:{key.scope}:{key.digest}"

    def _fence(self, key: RecordKey) -> str:
        """The fence counter of ``key``: one for every key, or on a cluster one per hash-tag
        group (4096 of them, each in the slot of its records), so the counter a key uses never
        changes and its fences still only grow."""
        if self.cluster:
            return f"{self._fence_key}:{{{_group(key)}}}"
        return self._fence_key

    def _channel(self, key: RecordKey) -> str:
        return f"{self._done}{key.scope}:{key.digest}"

    def _scan_pattern(self, scope: str | None) -> str:
        if scope is None:
            return f"{_glob_escape(self.prefix)}:*"
        if self.cluster:
            return f"{_glob_escape(self.prefix)}:{{*}}:{_glob_escape(scope)}:*"
        return f"{_glob_escape(self.prefix)}:{_glob_escape(scope)}:*"

    # -- every operation, once: a plan of script calls (oncely.backends.plans) -----------------
    def _group_clock(self, key: RecordKey) -> StoreClock:
        """On a cluster: the estimate of the clock of the node that holds ``key`` (one per
        hash-tag group: a group never changes slot, and each slot is on one node at a time)."""
        group = _group(key)
        clock = self._clocks.get(group)
        if clock is None:
            clock = self._clocks.setdefault(group, StoreClock())
        return clock

    def _claim_args(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float, not_after: str = ""
    ) -> tuple[Any, ...]:
        """The keys and arguments of claim.lua (its ``numkeys`` is 2)."""
        head, tail = _split_fingerprint(fingerprint)
        return (
            self._key(key),
            self._fence(key),
            fingerprint,
            _ms(lease),
            _ms(ttl),
            head,
            tail,
            not_after,
        )

    def _learn_clock(self, key: RecordKey, clock: StoreClock) -> Plan[None]:
        """Read the server's clock (``now.lua``, routed by ``key``) when nothing taught the
        estimate yet, so that even the first claim of a store carries its bound: one round trip
        per store (per cluster group), never per claim (and none without a budget: no bound)."""
        sent = _monotonic()
        now_ms = yield Eval(_NOW, 1, (self._key(key),))
        clock.observe(int(now_ms) / 1000, sent, _monotonic())

    def _complete_args(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> tuple[Any, ...]:
        """The keys and arguments of complete.lua (its ``numkeys`` is 1)."""
        return (self._key(key), fence, result, codec, _ms(ttl), self._channel(key))

    def _claim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> Plan[ClaimOutcome]:
        clock = self._group_clock(key) if self.cluster else self._clock
        if clock.state is None and self.redis.budget is not None:
            yield from self._learn_clock(key, clock)
        sent = _monotonic()
        # claim.lua's not-after: the end of the budget the executor starts (or of the running
        # operation's, if sooner) in the server's clock (oncely.core.storeclock).
        not_after = clock.not_after_ms(sent, self.redis.budget, DEADLINE.get())
        args = self._claim_args(key, fingerprint, lease, ttl, not_after)
        if self._durable is None:
            reply = yield Eval(_CLAIM, 2, args)
            now = int(reply[1]) / 1000
            clock.observe(now, sent, _monotonic())
            return _parse_claim(reply, key, now)
        reply, acked = yield EvalWait(_CLAIM, 2, args)
        now = int(reply[1]) / 1000
        clock.observe(now, sent, _monotonic())
        outcome = _parse_claim(reply, key, now)
        if isinstance(outcome, New) and acked < self._durable.replicas:
            # Not durable: a failover could lose the claim and let a second caller run the
            # body. Free the key again (best effort: else it frees itself at the lease's end).
            with contextlib.suppress(StoreError, LeaseLost):
                yield from self._release(key, outcome.fence)
            raise self._not_replicated(
                "claim", key, acked, "it was released and the call did not run"
            )
        return outcome

    def _complete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> Plan[None]:
        args = self._complete_args(key, fence, result, codec, ttl)
        if self._durable is None:
            _check_fenced((yield Eval(_COMPLETE, 1, args)), "complete", key, fence)
            return
        reply, acked = yield EvalWait(_COMPLETE, 1, args)
        _check_fenced(reply, "complete", key, fence)
        if acked < self._durable.replicas:
            raise self._not_replicated(
                "completion", key, acked, "it is stored on the master; storing it again is safe"
            )

    def _release(self, key: RecordKey, fence: int) -> Plan[None]:
        args = (self._key(key), fence, self._channel(key), _TOMBSTONE_MS)
        _check_fenced((yield Eval(_RELEASE, 1, args)), "release", key, fence)

    def _renew(self, key: RecordKey, fence: int, lease: float) -> Plan[float]:
        if self._durable is None:
            reply = yield Eval(_RENEW, 1, (self._key(key), fence, ms(lease)))
            return int(_check_fenced(reply, "renew", key, fence)[1]) / 1000
        reply, acked = yield EvalWait(_RENEW, 1, (self._key(key), fence, ms(lease)))
        lease_until = int(_check_fenced(reply, "renew", key, fence)[1]) / 1000
        if acked < self._durable.replicas:
            raise self._not_replicated("lease renewal", key, acked, "the lease may be shorter")
        return lease_until

    def _not_replicated(self, what: str, key: RecordKey, acked: int, then: str) -> NotReplicated:
        wanted, timeout = self._durable or (0, 0)
        return NotReplicated(
            f"the {what} of {key.scope!r}/{key.digest[:16]}… was acknowledged by {acked} of the "
            f"{wanted} replicas asked for within {timeout} ms (wait_replicas, WAIT), so a "
            f"failover could lose it; {then}. Check the replicas (INFO replication on the "
            "master: are they connected and in sync?), or lower wait_replicas.",
            acked,
            wanted,
        )

    def _get(self, key: RecordKey) -> Plan[Record | None]:
        reply = yield Eval(_GET, 1, (self._key(key),))
        return None if reply is None else _record(key.scope, key.digest, reply)

    def _delete(self, key: RecordKey, running: bool) -> Plan[bool]:
        args = (self._key(key), self._channel(key), "1" if running else "0")
        return bool((yield Eval(_DELETE, 1, args)))

    def _purge_expired(self, limit: int) -> Plan[int]:
        """0: every record carries ``PEXPIREAT expires_at``, so Redis drops it itself."""
        return 0
        yield  # a plan that sends nothing

    def _list(self, scope: str | None, limit: int) -> Plan[builtins.list[Record]]:
        """Up to ``limit`` live records (of ``scope``, if given), oldest first.

        SCANs the keyspace, so it is for inspection, not for the hot path; with a ``limit`` it
        stops early and returns the oldest of the records it found.
        """
        if limit <= 0:
            return []
        pattern = self._scan_pattern(scope)
        records: builtins.list[Record] = []
        if self.cluster:  # every primary's keys; list.lua one key at a time (one slot each)
            for found in (yield _ScanAll(pattern)):
                records += self._parse_list((yield Eval(_LIST, 1, (found,))), scope)
            return _finish_list(records, limit)
        cursor: Any = 0
        while True:
            cursor, keys = yield Command(
                ("SCAN", cursor, "MATCH", pattern, "COUNT", _SCAN_COUNT, "TYPE", "hash")
            )
            if keys:
                records += self._parse_list((yield Eval(_LIST, len(keys), tuple(keys))), scope)
            if int(cursor) == 0 or len(records) >= limit:
                return _finish_list(records, limit)

    def _parse_list(self, rows: Any, scope: str | None) -> builtins.list[Record]:
        return _parse_list(rows, scope, self.prefix, self.cluster)

    def _now(self) -> Plan[float]:
        return _parse_time((yield Command(("TIME",))))

    def _watch(self, key: RecordKey, fence: int, timeout: float) -> Plan[bool]:
        """Wait until the record is no longer ``in_progress`` under ``fence``: True as soon as it
        is completed, released, deleted, re-claimed, expired, or its lease ran out (a claim
        would take it over); False once ``timeout`` passed."""
        probe = Eval(_PROBE, 1, (self._key(key), str(fence)))

        def changed() -> Plan[bool]:
            return bool((yield probe) < 0)

        if timeout <= 0:
            return (yield from changed())
        if not self._watch_slots.acquire(blocking=False):
            return (yield from poll_plan(changed, timeout))
        deadline = time.monotonic() + timeout
        try:
            # Subscribe (and wait for the confirmation) before looking at the record, so that a
            # completion right after the look cannot be missed.
            pubsub = yield _Subscribe(self._channel(key))
            try:
                while (left := deadline - time.monotonic()) > 0:
                    if (yield _Receive(pubsub, left)) is not None:
                        break  # the confirmation: no message can come before it
                while True:
                    lease_ms = yield probe
                    if lease_ms < 0:
                        return True
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait_until = time.monotonic() + min(left, lease_ms / 1000 + _LEASE_SLACK)
                    while (wait := wait_until - time.monotonic()) > 0:
                        if _is_message((yield _Receive(pubsub, wait))):
                            return True
            finally:
                yield _Unsubscribe(pubsub)
        finally:
            self._watch_slots.release()

    # -- the two executors -----------------------------------------------------------------------
    def _execute(self, request: Any) -> Any:
        kind = type(request)
        if kind is Eval:  # the hot path: one frame less than self.redis.execute
            if self.cluster:  # routed by oncely (RedisClients.eval)
                return self.redis.eval(request.script, request.numkeys, *request.keys_and_args)
            token = start(self.redis.budget)  # one budget for EVALSHA and an EVAL after it
            try:
                return evalsha(
                    self.redis.scripts, request.script, request.numkeys, *request.keys_and_args
                )
            except DRIVER_ERRORS as exc:
                raise self.redis.refusal(exc, request.keys_and_args) from exc
            finally:
                end(token)
        if kind is _ScanAll:
            try:
                client: Any = self.redis.client
                return list(
                    client.scan_iter(match=request.pattern, count=_SCAN_COUNT, _type="hash")
                )
            except DRIVER_ERRORS as exc:
                raise self.redis.error(exc) from exc
        if kind is _Receive:
            try:
                return request.pubsub.get_message(timeout=request.timeout)
            except DRIVER_ERRORS as exc:
                raise self.redis.error(exc) from exc
        if kind is _Subscribe:
            pubsub = self.redis.pubsub()
            token = start(self.redis.budget)
            try:
                pubsub.subscribe(request.channel)
            except DRIVER_ERRORS as exc:
                pubsub.close()
                raise self.redis.error(exc) from exc
            except BaseException:
                pubsub.close()
                raise
            finally:
                end(token)
            return pubsub
        if kind is _Unsubscribe:
            request.pubsub.close()
            return None
        return self.redis.execute(request)

    # -- the async hot path: the plans' one script, without their driver ----------------------
    async def aclaim(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float
    ) -> ClaimOutcome:
        if self._durable is not None:  # the plan (a WAIT after the script, a release on failure)
            return await arun(self._claim(key, fingerprint, lease, ttl), self._aexecute)
        # What the plan does then (its arguments, its one script, its reply's meaning), one
        # coroutine and one generator less: a claim is on every keyed request.
        clock = self._group_clock(key) if self.cluster else self._clock
        if clock.state is None and self.redis.budget is not None:
            await arun(self._learn_clock(key, clock), self._aexecute)
        sent = _monotonic()
        not_after = clock.not_after_ms(sent, self.redis.budget, DEADLINE.get())
        args = self._claim_args(key, fingerprint, lease, ttl, not_after)
        reply = await self.redis.aeval(_CLAIM, 2, *args)
        now = int(reply[1]) / 1000
        clock.observe(now, sent, _monotonic())
        return _parse_claim(reply, key, now)

    async def acomplete(
        self, key: RecordKey, fence: int, result: bytes, codec: str, ttl: float
    ) -> None:
        self.check_result_size(result)
        if self._durable is not None:
            await arun(self._complete(key, fence, result, codec, ttl), self._aexecute)
            return
        args = self._complete_args(key, fence, result, codec, ttl)
        _check_fenced(await self.redis.aeval(_COMPLETE, 1, *args), "complete", key, fence)

    def _aexecute(self, request: Any) -> Awaitable[Any]:
        if type(request) is Eval:  # the hot path: the client's coroutine, no frame of ours
            return self.redis.aeval(request.script, request.numkeys, *request.keys_and_args)
        return self._aexecute_other(request)

    async def _aexecute_other(self, request: Any) -> Any:
        kind = type(request)
        if kind is _ScanAll:
            try:
                aclient: Any = await self.redis.aready()
                return [
                    k
                    async for k in aclient.scan_iter(
                        match=request.pattern, count=_SCAN_COUNT, _type="hash"
                    )
                ]
            except DRIVER_ERRORS as exc:
                raise self.redis.error(exc) from exc
        if kind is _Receive:
            try:
                with keep_cancel():
                    return await request.pubsub.get_message(timeout=request.timeout)
            except DRIVER_ERRORS as exc:
                raise self.redis.error(exc) from exc
        if kind is _Subscribe:
            if self.cluster:
                try:
                    await self.redis.aready()
                except DRIVER_ERRORS as exc:
                    raise self.redis.error(exc) from exc
            pubsub = self.redis.apubsub()
            token = start(self.redis.budget)
            try:
                with keep_cancel():
                    await pubsub.subscribe(request.channel)
            except DRIVER_ERRORS as exc:
                await pubsub.aclose()
                raise self.redis.error(exc) from exc
            except (AttributeError, TypeError) as exc:
                # redis-py tore the connection down under us (driver_fault): StoreUnavailable
                await pubsub.aclose()
                if driver_fault(exc):
                    raise self.redis.error(exc) from exc
                raise
            except BaseException:
                await pubsub.aclose()
                raise
            finally:
                end(token)
            return pubsub
        if kind is _Unsubscribe:
            await request.pubsub.aclose()
            return None
        return await self.redis.aexecute(request)

    def close(self) -> None:
        """Close the sync pool (a client passed in as ``client`` is left to its owner), and forget
        the async clients of event loops that are not running."""
        self.redis.close()

    async def aclose(self) -> None:
        """Close the running loop's client and pool (``async_client`` is left to its owner)."""
        await self.redis.aclose()
