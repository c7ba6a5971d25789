"""``@idempotent``: a function that runs once per key, for sync and async functions alike.

>>> from oncely import idempotent
>>> calls = []
>>> @idempotent(store="memory://", key=["order_id"], validate=["amount"])
... def charge(order_id: str, amount: int) -> dict:
...     calls.append(order_id)
...     return {"charged": amount}
>>> charge("o-1", 100), charge("o-1", 100)
({'charged': 100}, {'charged': 100})
>>> calls
['o-1']
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, overload

from oncely.codecs import Codec, JsonCodec
from oncely.errors import ConfigurationError, InvalidKey
from oncely.functions.cache import ResultCache
from oncely.functions.drivers import drive, drive_async
from oncely.functions.flow import Policy, call_flow
from oncely.functions.keys import ArgumentReader, canonical, check_key, fingerprint_of
from oncely.functions.lease import LostCallback
from oncely.records import RecordKey, digest_key
from oncely.stores import DEFAULT_URL, Store, shared_store

__all__ = ["Idempotent", "idempotent"]

F = TypeVar("F", bound=Callable[..., Any])


class Idempotent:
    """The configuration of one decorated function and the pieces that serve each call."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        store: str | Store | None,
        name: str | None,
        key: Sequence[str] | Callable[..., Any] | None,
        scope: str | Callable[..., str] | None,
        validate: Sequence[str] | Literal[True] | None,
        ttl: float,
        lease: float,
        on_duplicate: Literal["wait", "raise"],
        wait_timeout: float,
        store_errors: Sequence[type[BaseException]],
        fail_open: bool,
        codec: Codec | None,
        cache_size: int,
        on_lease_lost: LostCallback | None,
    ) -> None:
        if ttl <= 0 or lease <= 0:
            raise ConfigurationError(f"ttl ({ttl}) and lease ({lease}) must be positive seconds")
        if wait_timeout < 0:
            raise ConfigurationError("wait_timeout must be zero or more seconds")
        if on_duplicate not in ("wait", "raise"):
            raise ConfigurationError("on_duplicate must be 'wait' or 'raise'")
        if isinstance(key, str) or isinstance(validate, str):
            raise ConfigurationError(
                "key= and validate= take a list of argument names or dotted paths, e.g. "
                "key=['order.id']"
            )
        self.fn = fn
        self.name = name or fn.__qualname__
        self._store_spec = store
        self._store: Store | None = None
        self.reader = ArgumentReader(fn)
        self.key_spec = key
        if key is not None and not callable(key):
            self.reader.check_paths(key, "key")
        if validate is not None and validate is not True:
            self.reader.check_paths(validate, "validate")
        self.validate = validate
        self.scope = scope
        self.on_lease_lost = on_lease_lost
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable forward references: decode without a type
            hints = {}
        self.policy = Policy(
            name=self.name,
            codec=codec or JsonCodec(),
            return_type=hints.get("return"),
            ttl=float(ttl),
            lease=float(lease),
            on_duplicate=on_duplicate,
            wait_timeout=float(wait_timeout),
            store_errors=tuple(store_errors),
            fail_open=fail_open,
            cache=ResultCache(cache_size) if cache_size else None,
        )

    @property
    def store(self) -> Store:
        """The store, opened on first use (decorating never connects)."""
        if self._store is None:
            spec = self._store_spec or os.environ.get("ONCELY_STORE") or DEFAULT_URL
            self._store = shared_store(spec)
        return self._store

    def record_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> RecordKey:
        """Where the record of a call with these arguments lives."""
        spec, reader = self.key_spec, self.reader
        if spec is None:
            text = canonical(reader.whole_payload(args, kwargs), f"arguments of {self.name}")
        elif callable(spec):
            made = spec(*args, **kwargs)
            text = check_key(made) if isinstance(made, str) else canonical(made, "key")
        else:
            parts = [reader.path(path, args, kwargs) for path in spec]
            if len(parts) == 1 and isinstance(parts[0], str):
                text = check_key(parts[0])
            else:
                for path, part in zip(spec, parts):
                    if isinstance(part, str):
                        check_key(part)
                    elif part is None:
                        raise InvalidKey(f"key field {path!r} is None; pass a value")
                text = canonical(parts, "key")
        scope = self.scope(*args, **kwargs) if callable(self.scope) else (self.scope or "")
        return RecordKey(scope, digest_key(f"{self.name}\x00{text}"))

    def fingerprint(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self.validate is None:
            return ""
        if self.validate is True:
            return fingerprint_of([self.reader.whole_payload(args, kwargs)])
        return fingerprint_of([self.reader.path(p, args, kwargs) for p in self.validate])

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.record_key(args, kwargs)
        fingerprint = self.fingerprint(args, kwargs)
        flow = call_flow(self.policy, key, fingerprint)
        return drive(
            flow,
            self.store,
            key,
            fingerprint,
            self.policy,
            lambda: self.fn(*args, **kwargs),
            self.on_lease_lost,
        )

    async def acall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.record_key(args, kwargs)
        fingerprint = self.fingerprint(args, kwargs)
        flow = call_flow(self.policy, key, fingerprint)
        return await drive_async(
            flow,
            self.store,
            key,
            fingerprint,
            self.policy,
            lambda: self.fn(*args, **kwargs),
            self.on_lease_lost,
        )

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the record of a call with these arguments, so the next call runs again."""
        key = self.record_key(args, kwargs)
        if self.policy.cache is not None:
            self.policy.cache.discard(key)
        return self.store.delete(key)

    async def aforget(self, *args: Any, **kwargs: Any) -> bool:
        key = self.record_key(args, kwargs)
        if self.policy.cache is not None:
            self.policy.cache.discard(key)
        return await self.store.adelete(key)


@overload
def idempotent(fn: F, /) -> F: ...


@overload
def idempotent(
    *,
    store: str | Store | None = None,
    name: str | None = None,
    key: Sequence[str] | Callable[..., Any] | None = None,
    scope: str | Callable[..., str] | None = None,
    validate: Sequence[str] | Literal[True] | None = None,
    ttl: float = 3600.0,
    lease: float = 30.0,
    on_duplicate: Literal["wait", "raise"] = "wait",
    wait_timeout: float = 30.0,
    store_errors: Sequence[type[BaseException]] = (),
    fail_open: bool = False,
    codec: Codec | None = None,
    cache_size: int = 0,
    on_lease_lost: LostCallback | None = None,
) -> Callable[[F], F]: ...


def idempotent(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    store: str | Store | None = None,
    name: str | None = None,
    key: Sequence[str] | Callable[..., Any] | None = None,
    scope: str | Callable[..., str] | None = None,
    validate: Sequence[str] | Literal[True] | None = None,
    ttl: float = 3600.0,
    lease: float = 30.0,
    on_duplicate: Literal["wait", "raise"] = "wait",
    wait_timeout: float = 30.0,
    store_errors: Sequence[type[BaseException]] = (),
    fail_open: bool = False,
    codec: Codec | None = None,
    cache_size: int = 0,
    on_lease_lost: LostCallback | None = None,
) -> Any:
    """Make a function run once per key; duplicates get the stored result.

    :param store: a store URL or object; default ``$ONCELY_STORE`` or ``sqlite:///oncely.db``.
    :param name: a stable name for the function inside keys (default: its ``__qualname__``;
        set it so renaming the function keeps old keys valid).
    :param key: argument names or dotted paths (``["order.id"]``), or a callable taking the
        call's arguments and returning the key; default: all arguments.
    :param scope: a namespace (tenant, user) or a callable returning one; equal keys in
        different scopes never meet.
    :param validate: fields whose values must match on a retry (or ``True`` for all
        arguments); a mismatch raises :class:`~oncely.errors.IdempotencyKeyMismatch`.
    :param ttl: seconds a completed result is kept for replay.
    :param lease: seconds a running call holds the key without renewal; renewed every lease/3.
    :param on_duplicate: ``"wait"`` for the running call's result, or ``"raise"``
        :class:`~oncely.errors.InFlightError` at once.
    :param wait_timeout: the longest a duplicate waits before :class:`~oncely.errors.InFlightError`.
    :param store_errors: exception types stored and raised again on replay; any other
        exception releases the key so a retry runs again.
    :param fail_open: if the store is unreachable, run without protection instead of raising
        :class:`~oncely.errors.StoreUnavailable` (default: fail closed).
    :param codec: how results are stored (default :class:`~oncely.codecs.JsonCodec`).
    :param cache_size: keep up to this many completed results in process (0: off).
    :param on_lease_lost: called with ``(claim, error)`` if the running call loses its lease.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        config = Idempotent(
            func,
            store=store,
            name=name,
            key=key,
            scope=scope,
            validate=validate,
            ttl=ttl,
            lease=lease,
            on_duplicate=on_duplicate,
            wait_timeout=wait_timeout,
            store_errors=store_errors,
            fail_open=fail_open,
            codec=codec,
            cache_size=cache_size,
            on_lease_lost=on_lease_lost,
        )
        wrapper: Any
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await config.acall(args, kwargs)

            wrapper = async_wrapper
            wrapper.forget = config.aforget
        else:

            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                return config.call(args, kwargs)

            wrapper = sync_wrapper
            wrapper.forget = config.forget
        wrapper.idempotency = config
        return typing.cast(Callable[..., Any], wrapper)

    if fn is not None:
        return decorate(fn)
    return decorate
