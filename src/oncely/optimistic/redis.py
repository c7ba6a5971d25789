"""Compare-and-set on a versioned Redis hash: one Lua script per write, sync and async.

A versioned hash is an ordinary Redis hash with one extra field, the version (``_version`` by
default): a positive integer that every write raises to ``max(old + 1, server TIME in
microseconds)``. Versions grow by at least one per write and never repeat for a key, also
across :meth:`RedisVersioned.delete` and re-creation: a new hash starts at the server's clock,
above every version the deleted one had, so a writer still holding a version of the old hash
gets :class:`~oncely.errors.StaleVersion` instead of overwriting the new one (no ABA; the same
rule as the record stores' fences, see :mod:`oncely.stores.base`). The one limit: the server's
clock stepping back by more than the time since the delete. Compare versions for equality
(or order); do not count writes with them. Hashes written before this rule (versions 1, 2, ...)
stay readable; their next write moves them to the clock.
:meth:`RedisVersioned.get` reads the fields and the version in one ``HGETALL``;
:meth:`RedisVersioned.set` writes only if the hash is still at the version the caller read, in
one script (``oncely/optimistic/lua/cas.lua``, run by SHA through :mod:`oncely.backends.lua`), so
no other client can write between the check and the write. A lost race raises
:class:`~oncely.errors.StaleVersion` and writes nothing::

    from oncely.optimistic import retry_on_conflict
    from oncely.optimistic.redis import RedisVersioned

    carts = RedisVersioned("redis://localhost:6379/0")

    @retry_on_conflict
    def add_item(cart_id, sku):
        fields, version = carts.get(f"cart:{cart_id}")
        count = int(fields.get(sku, b"0")) + 1
        return carts.set(f"cart:{cart_id}", {sku: count}, version, merge=True)

Versions stay below 2^53, where Redis's Lua counts exactly (the rule of every oncely script
that counts): a hash at 2^53 - 1 or more raises :class:`~oncely.errors.VersionExhausted` (an
:class:`~oncely.errors.UnversionedRow`) and is not written, and an ``expected_version`` of 2^53
or more is a :class:`~oncely.errors.ConfigurationError` before anything is sent.

Version 0 means "does not exist": ``get`` of a missing key returns ``({}, 0)`` and
``set(key, fields, 0)`` creates the hash (:class:`~oncely.errors.StaleVersion` if someone
created it first). Redis Cluster: each operation touches one key, so any key works.

This is Redis's answer to ``WATCH``/``MULTI``/``EXEC`` without the connection-bound state (and
without the retry storm of a failed ``EXEC`` on a busy key: the script never aborts half-way).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import redis
import redis.asyncio

from oncely.backends.lua import Script, is_wrongtype
from oncely.backends.plans import Command, Eval, Plan, arun, run
from oncely.backends.redis import RedisClients
from oncely.core.text import sendable
from oncely.errors import (
    ConfigurationError,
    NotFound,
    StaleVersion,
    UnversionedRow,
    VersionExhausted,
)

__all__ = ["VERSION_FIELD", "RedisVersioned"]

#: The hash field holding the version unless ``version_field=`` says otherwise.
VERSION_FIELD: Final = "_version"

CAS: Final = Script("oncely.optimistic", "cas")

Value = bytes | str | int | float

#: Versions are below this: the script counts with Lua's doubles, exact up to 2^53 (the rule of
#: every oncely script that counts; see ``cas.lua``).
EXACT: Final = 2**53


def _check_version(version: object, minimum: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < minimum:
        raise ConfigurationError(
            f"expected_version must be an int >= {minimum} (0: the key must not exist yet), "
            f"not {version!r}; pass the version get() returned"
        )
    if version >= EXACT:
        raise ConfigurationError(
            f"expected_version {version} is 2^53 or more: no RedisVersioned hash can be at it "
            "(versions stay below 2^53, where Redis's Lua counts exactly); pass the version "
            "get() returned"
        )
    return version


def _exhausted(key: str, vfield: str, text: str) -> VersionExhausted:
    return VersionExhausted(
        key,
        f"Redis hash {key!r} is at {vfield!r} {text}, 2^53 - 1 or more: Redis's Lua counts "
        "exactly only below 2^53, so no write can raise it (versions past it would stop "
        "growing and let a stale writer match). Nothing was written; delete the hash "
        "(DEL, or delete(key, version) at 2^53 - 1) and create it with set(key, fields, 0)",
    )


def _encode(name: object, value: object, vfield: str) -> tuple[str, Value]:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"hash field names must be non-empty strings, not {name!r}")
    if name == vfield:
        raise ConfigurationError(
            f"field {name!r} is the version field; oncely sets it, leave it out of the fields"
        )
    if isinstance(value, bool) or not isinstance(value, (bytes, str, int, float)):
        raise ConfigurationError(
            f"field {name!r}: value {value!r} is not bytes, str, int or float; encode it first"
        )
    sendable(name, "a hash field name", ConfigurationError)
    sendable(value, f"the value of field {name!r}", ConfigurationError)
    return name, value


class RedisVersioned:
    """Versioned hashes on one Redis server (``oncely[redis]``).

    ``client_or_url`` is a Redis URL (``redis://host:6379/0``; both faces work, with the pools
    and bounded network waits of :class:`~oncely.backends.redis.RedisClients`), a
    :class:`redis.Redis` (the sync face only) or a :class:`redis.asyncio.Redis` (the async face
    only); clients must not decode responses. ``version_field`` names the version field.
    ``options`` go to the connection pool (URL only).

    Errors: :class:`~oncely.errors.StaleVersion` (someone wrote first; ``current`` is the
    version found), :class:`~oncely.errors.NotFound` (the key is gone, yet a version >= 1 was
    expected), :class:`~oncely.errors.UnversionedRow` (the key holds no usable version, or is
    not a hash: from ``get`` and ``set`` alike; :class:`~oncely.errors.VersionExhausted` when
    the version is 2^53 - 1 or more), :class:`~oncely.errors.StoreUnavailable` (Redis
    unreachable: the write may or may not have happened; ``get`` tells),
    :class:`~oncely.errors.ConfigurationError` (bad arguments).
    """

    def __init__(
        self,
        client_or_url: str | redis.Redis | redis.asyncio.Redis,
        *,
        version_field: str = VERSION_FIELD,
        **options: Any,
    ) -> None:
        if not isinstance(version_field, str) or not version_field:
            raise ConfigurationError(
                f"version_field must be a non-empty string, not {version_field!r}"
            )
        self.version_field = version_field
        self._sync = self._async = True
        if isinstance(client_or_url, str):
            self.redis = RedisClients(client_or_url, **options)
        elif isinstance(client_or_url, redis.asyncio.Redis):
            self._sync = False
            self.redis = RedisClients("redis://", async_client=client_or_url, **options)
        elif isinstance(client_or_url, redis.Redis):
            self._async = False
            self.redis = RedisClients("redis://", client=client_or_url, **options)
        else:
            raise ConfigurationError(
                "RedisVersioned needs a Redis URL ('redis://localhost:6379/0'), a redis.Redis or "
                f"a redis.asyncio.Redis, not {type(client_or_url).__name__}"
            )

    def __repr__(self) -> str:
        return f"RedisVersioned({self.redis.where!r})"

    # -- each operation once, as a plan (oncely.backends.plans) --------------------------------
    def _get(self, key: str) -> Plan[tuple[dict[str, bytes], int]]:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"key must be a non-empty string, not {key!r}")
        sendable(key, "key", ConfigurationError)
        try:
            reply = yield Command(("HGETALL", key))
        except Exception as exc:  # WRONGTYPE: another type, reported as set() reports it
            if not is_wrongtype(exc):
                raise
            raise UnversionedRow(
                key, f"Redis key {key!r} is not a hash, so not a versioned hash; use another key"
            ) from exc
        if isinstance(reply, dict):
            items = list(reply.items())
        else:  # RESP2 without a response callback: a flat list
            items = list(zip(reply[::2], reply[1::2]))
        if not items:
            return {}, 0
        fields: dict[str, bytes] = {}
        version: bytes | None = None
        vname = self.version_field.encode()
        for name, value in items:
            raw = name if isinstance(name, bytes) else str(name).encode()
            if raw == vname:
                version = value
            else:
                fields[raw.decode("utf-8", "surrogateescape")] = value
        text = version.decode("ascii", "replace") if isinstance(version, bytes) else version
        if isinstance(text, str) and text.isascii() and text.isdigit() and text[0] != "0":
            if int(text) >= EXACT:
                raise _exhausted(key, self.version_field, text)
        else:
            raise UnversionedRow(
                key,
                f"Redis hash {key!r} has no usable {self.version_field!r} field ({text!r}); "
                f"write it with RedisVersioned.set(key, fields, 0) after deleting it, or set "
                f"HSET {key} {self.version_field} 1",
            )
        return fields, int(text)

    def _write(
        self, key: str, fields: Mapping[str, object], expected: int, op: str, minimum: int
    ) -> Plan[int]:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"key must be a non-empty string, not {key!r}")
        sendable(key, "key", ConfigurationError)
        _check_version(expected, minimum)
        if not isinstance(fields, Mapping):
            raise ConfigurationError(f"fields must be a mapping, not {type(fields).__name__}")
        args: list[Any] = [self.version_field, str(expected), op]
        for name, value in fields.items():
            args.extend(_encode(name, value, self.version_field))
        reply = yield Eval(CAS, 1, (key, *args))
        status, found = int(reply[0]), reply[1]
        if status == 1:
            return int(found)
        if status == 0:
            current = int(found)
            if current == 0:
                raise NotFound(
                    f"Redis hash {key!r}",
                    f"Redis hash {key!r} does not exist (deleted meanwhile?); expected version "
                    f"{expected}. Create it with set(key, fields, 0).",
                )
            raise StaleVersion(f"Redis hash {key!r}", expected, current)
        text = found.decode("latin-1") if isinstance(found, bytes) else found
        if status == -3:
            raise _exhausted(key, self.version_field, text)
        if status == -2:
            raise UnversionedRow(
                key, f"Redis key {key!r} holds a {text}, not a versioned hash; use another key"
            )
        raise UnversionedRow(
            key,
            f"Redis hash {key!r} has no usable {self.version_field!r} field ({text!r}); it was "
            "not written by RedisVersioned. Delete it and create it with set(key, fields, 0).",
        )

    # -- sync ----------------------------------------------------------------------------------
    def _sync_face(self) -> None:
        if not self._sync:
            raise ConfigurationError(
                "this RedisVersioned wraps a redis.asyncio client; use aget/aset/adelete"
            )

    def _async_face(self) -> None:
        if not self._async:
            raise ConfigurationError(
                "this RedisVersioned wraps a sync redis.Redis; use get/set/delete, or give a URL"
            )

    def get(self, key: str) -> tuple[dict[str, bytes], int]:
        """``(fields, version)`` of hash ``key``; ``({}, 0)`` if it does not exist. Field names
        are ``str``, values ``bytes`` as Redis stores them.

        :raises UnversionedRow: the hash has no usable version field, or the key is not a
            hash; :class:`~oncely.errors.VersionExhausted` for a version of 2^53 or more.
        """
        self._sync_face()
        return run(self._get(key), self.redis.execute)

    def set(
        self, key: str, fields: Mapping[str, object], expected_version: int, *, merge: bool = False
    ) -> int:
        """Write ``fields`` to hash ``key`` if it is at ``expected_version`` (0: create it);
        return the new version. ``merge=False`` replaces every field (fields not given are
        removed), ``merge=True`` sets only these. Values: ``bytes``, ``str``, ``int``, ``float``.

        :raises StaleVersion: the hash is at another version (or was created meanwhile).
        :raises NotFound: the hash does not exist but ``expected_version`` >= 1.
        :raises UnversionedRow: the key holds no usable version, or is not a hash.
        """
        self._sync_face()
        op = "merge" if merge else "set"
        return run(self._write(key, fields, expected_version, op, 0), self.redis.execute)

    def delete(self, key: str, expected_version: int) -> None:
        """Delete hash ``key`` if it is at ``expected_version`` (>= 1).

        :raises StaleVersion, NotFound, UnversionedRow: as :meth:`set`.
        """
        self._sync_face()
        run(self._write(key, {}, expected_version, "delete", 1), self.redis.execute)

    def close(self) -> None:
        """Close the pools this instance opened (a client passed in is left to its owner)."""
        self.redis.close()

    # -- async ---------------------------------------------------------------------------------
    async def aget(self, key: str) -> tuple[dict[str, bytes], int]:
        """The async face of :meth:`get`."""
        self._async_face()
        return await arun(self._get(key), self.redis.aexecute)

    async def aset(
        self, key: str, fields: Mapping[str, object], expected_version: int, *, merge: bool = False
    ) -> int:
        """The async face of :meth:`set`."""
        self._async_face()
        op = "merge" if merge else "set"
        return await arun(self._write(key, fields, expected_version, op, 0), self.redis.aexecute)

    async def adelete(self, key: str, expected_version: int) -> None:
        """The async face of :meth:`delete`."""
        self._async_face()
        await arun(self._write(key, {}, expected_version, "delete", 1), self.redis.aexecute)

    async def aclose(self) -> None:
        """Close the running event loop's pool (an ``async_client`` is left to its owner)."""
        await self.redis.aclose()
