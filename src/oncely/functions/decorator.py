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

import contextlib
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

from oncely.backends.plans import Plan, arun, run
from oncely.codecs import Codec, JsonCodec
from oncely.core.calls import is_async_callable
from oncely.core.lease import LostCallback
from oncely.core.names import qualified_name
from oncely.core.records import Record, RecordKey, digest_key
from oncely.core.text import MAX_SCOPE_BYTES, stored_text
from oncely.errors import ConfigurationError, InFlightError, UnfinishedResult
from oncely.functions.cache import ResultCache
from oncely.functions.drivers import drive, drive_async
from oncely.functions.flow import CallPolicy, call_flow
from oncely.functions.keys import (
    ArgumentReader,
    canonical,
    default_key_gap,
    fingerprint_of,
    key_part,
    typed_canonical,
)
from oncely.settings import SETTINGS, resolve, text
from oncely.stores import Store, configured_store, shared_store

__all__ = ["DEFAULT_TTL", "Idempotent", "idempotent", "return_annotation"]

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds a completed result is kept for replay: 24 h, as the HTTP layer and Stripe keep keys.
DEFAULT_TTL: float = SETTINGS["ttl"].default


def _default_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` (:func:`oncely.core.names.qualified_name`: a script's ``__main__``
    is named by its import name): functions of the same name in two modules never share
    records, and one function has one name however its process was started."""
    return qualified_name(fn, f"@idempotent {getattr(fn, '__qualname__', None) or repr(fn)}")


def _identity_message(name: str, gap: str) -> str:
    return (
        f"@idempotent {name}: without key= or scope=, the key is the call's arguments, but "
        f"{gap}: two calls that differ only there would share one record (one of them would "
        "get the other's result). Say what identifies a call: key=['self.id', 'amount'] "
        "(dotted paths may start at self), key=callable, or scope=lambda self, *a: self.id"
    )


def _refuse_generator_function(fn: Callable[..., Any], name: str) -> None:
    """A generator function's body runs only while the caller iterates, after the call
    returned: there is no result to store when it returns (:class:`UnfinishedResult`)."""
    plain = inspect.unwrap(fn)
    kind = (
        "an async generator function"
        if inspect.isasyncgenfunction(plain)
        else "a generator function"
        if inspect.isgeneratorfunction(plain)
        else None
    )
    if kind is not None:
        raise UnfinishedResult(
            f"@idempotent {name} is {kind}: its body runs only while the caller iterates, after "
            "the call returned, so there is no result to store. Collect the items and return "
            "them (return list(...)), from a plain def or an async def"
        )


def _finished(result: Any, name: str, awaited: bool) -> Any:
    """``result``, unless it is work not done yet (:class:`UnfinishedResult`; closed first, so
    nothing runs later and Python does not warn that a coroutine was never awaited)."""
    if isinstance(result, (types.GeneratorType, types.AsyncGeneratorType)) or inspect.isawaitable(
        result
    ):
        close = getattr(result, "close", None)
        if callable(close) and not isinstance(result, types.AsyncGeneratorType):
            close()
        kind = type(result).__name__
        if awaited:
            fix = "await it inside the function and return its result"
        elif isinstance(result, (types.GeneratorType, types.AsyncGeneratorType)):
            fix = "return the finished items (return list(...)) instead"
        else:
            fix = "make the function async def and await inside it"
        raise UnfinishedResult(
            f"@idempotent {name} returned a {kind}, work that has not run yet: storing it would "
            f"store nothing of its result, and a retry would replay nothing; {fix}"
        )
    return result


_BUILTIN_VALUES = frozenset(
    {str, int, float, bool, type(None), bytes, dict, list, tuple, set, frozenset}
)


def _bound_to(first: Any, wrapper: Any) -> bool:
    """Whether a call whose first argument is ``first`` is ``wrapper`` bound as its method."""
    if type(first) in _BUILTIN_VALUES:  # no method can be added to these: skip the scan
        return False
    owner = first if isinstance(first, type) else type(first)
    for klass in owner.__mro__:
        for attr in vars(klass).values():
            if attr is wrapper:
                return not isinstance(first, type)
            if isinstance(attr, classmethod) and attr.__func__ is wrapper:
                return True
    return False


def return_annotation(fn: Callable[..., Any], localns: Mapping[str, Any] | None = None) -> Any:
    """``fn``'s return annotation, resolved (``Any`` if it has none).

    :param localns: names visible where ``fn`` was decorated (classes local to a function).
    :raises NameError: it names a type that is not defined (yet).
    """
    annotations = getattr(fn, "__annotations__", None) or {}
    if "return" not in annotations:
        return Any
    probe = typing.cast(Callable[..., Any], lambda: None)
    probe.__annotations__ = {"return": annotations["return"]}
    module_globals = getattr(inspect.unwrap(fn), "__globals__", {})
    return typing.get_type_hints(probe, module_globals, dict(localns or {}))["return"]


class Idempotent:
    """The configuration of one decorated function and the pieces that serve each call."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        store: str | Store | None = None,
        name: str | None = None,
        key: Sequence[str] | Callable[..., Any] | None = None,
        scope: str | Callable[..., str] | None = None,
        validate: Sequence[str] | Literal[True] | None = None,
        ttl: float | str | None = None,
        lease: float | str | None = None,
        on_duplicate: Literal["wait", "raise"] | None = None,
        wait_timeout: float | str | None = None,
        store_errors: Sequence[type[BaseException]] = (),
        fail_open: bool | None = None,
        codec: Codec | None = None,
        cache_size: int | None = None,
        on_lease_lost: LostCallback | None = None,
        on_cancel: Literal["finish", "release"] = "finish",
        localns: Mapping[str, Any] | None = None,
    ) -> None:
        """:raises ConfigurationError: a bad setting (named in the message), a store URL that
        is unknown or whose extra is missing, or a function whose calls need ``key=``."""
        label = name or getattr(fn, "__qualname__", None) or repr(fn)
        where = f"@idempotent {label}"
        store_spec = configured_store(store, where)
        ttl = resolve("ttl", ttl, where=where)
        lease = resolve("lease", lease, where=where)
        on_duplicate = resolve("on_duplicate", on_duplicate, where=where)
        wait_timeout = resolve("wait_timeout", wait_timeout, where=where)
        fail_open = resolve("fail_open", fail_open, where=where)
        cache_size = resolve("cache_size", cache_size, where=where)
        if isinstance(key, str) or isinstance(validate, str):
            raise ConfigurationError(
                "key= and validate= take a list of argument names or dotted paths, e.g. "
                "key=['order.id']"
            )
        if on_cancel not in ("finish", "release"):
            raise ConfigurationError(
                f"{where}: on_cancel={on_cancel!r} is not valid: expected 'finish' (a cancelled "
                "caller leaves the body running and its outcome stored) or 'release'"
            )
        if scope is not None and not callable(scope) and not isinstance(scope, str):
            raise ConfigurationError(
                f"scope= takes a string or a callable returning one, not {type(scope).__name__}"
            )
        if isinstance(scope, str):  # a scope no store keeps is refused now, not at every call
            stored_text(scope, "@idempotent: scope=", ConfigurationError, MAX_SCOPE_BYTES)
        self.fn = fn
        self._store_spec = store_spec
        self._store: Store | None = None
        self.reader = ArgumentReader(fn)
        self.key_spec = key
        if key is not None and not callable(key):
            self.reader.check_paths(key, "key")
        if validate is not None and validate is not True:
            self.reader.check_paths(validate, "validate")
        self.validate = validate
        self.scope = scope
        self.name = text(name, "name", where="@idempotent", none=True) or _default_name(fn)
        if localns is not None and not isinstance(localns, Mapping):
            raise ConfigurationError(
                f"@idempotent {self.name}: localns= takes a mapping of names (like locals()), "
                f"not {type(localns).__name__}"
            )
        _refuse_generator_function(fn, self.name)
        #: Calls are told apart by arguments only: refuse a function bound later as a method.
        self.check_binding = key is None and scope is None
        if self.check_binding:
            gap = default_key_gap(fn)
            if gap is not None:
                raise ConfigurationError(_identity_message(self.name, gap))
        self.on_lease_lost = on_lease_lost
        #: The function callers hold (set by :func:`idempotent`), to see it bound as a method.
        self.wrapper: Callable[..., Any] | None = None
        self._codec = codec or JsonCodec()
        self._localns = localns
        self._policy_of = functools.partial(
            CallPolicy,
            name=self.name,
            ttl=float(ttl),
            lease=float(lease),
            on_duplicate=on_duplicate,
            wait_timeout=float(wait_timeout),
            store_errors=tuple(store_errors),
            fail_open=fail_open,
            cache=ResultCache(cache_size) if cache_size else None,
            on_cancel=on_cancel,
        )
        self._policy: CallPolicy | None = None
        # NameError: the annotation names a class defined later; resolve it at the first call.
        with contextlib.suppress(NameError):
            self._policy = self._make_policy()

    def _make_policy(self) -> CallPolicy:
        """Bind the codec to the return annotation (:class:`ConfigurationError` if it cannot)."""
        hint = return_annotation(self.fn, self._localns)
        bind = getattr(self._codec, "bind", None)
        codec = bind(hint, self._localns) if callable(bind) else self._codec
        self._localns = None  # resolved: keep no reference to the decorating scope
        return self._policy_of(codec=codec, return_type=hint)

    @property
    def policy(self) -> CallPolicy:
        """The call policy (resolved at the first call if the return annotation came later)."""
        if self._policy is None:
            try:
                self._policy = self._make_policy()
            except NameError as exc:
                raise ConfigurationError(
                    f"{self.name}: cannot resolve its return annotation ({exc}); define the "
                    "type at module level, or pass codec= a codec that needs no annotation"
                ) from exc
        return self._policy

    @property
    def store(self) -> Store:
        """The store, opened on first use (decorating never connects)."""
        if self._store is None:
            self._store = shared_store(self._store_spec)
        return self._store

    def record_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> RecordKey:
        """Where the record of a call with these arguments lives.

        :raises InvalidKey: a key part or scope is ``None``, empty, too long or not a str,
            int or UUID (see :mod:`oncely.functions.keys`).
        :raises ConfigurationError: the default key, on a function bound as a method.
        """
        spec, reader = self.key_spec, self.reader
        if spec is None:
            if self.check_binding and args and _bound_to(args[0], self.wrapper):
                raise ConfigurationError(
                    _identity_message(
                        self.name, f"it is called as a method of {type(args[0]).__name__}"
                    )
                )
            text = typed_canonical(reader.whole_payload(args, kwargs), f"{self.name}: argument")
        elif callable(spec):
            text = key_part(spec(*args, **kwargs), f"the key callable's result for {self.name}")
        else:
            parts = [key_part(reader.path(p, args, kwargs), f"key field {p!r}") for p in spec]
            text = parts[0] if len(parts) == 1 else canonical(parts, "key")
        if callable(self.scope):
            scope = key_part(
                self.scope(*args, **kwargs), f"the scope callable's result for {self.name}"
            )
        else:
            scope = self.scope or ""
        return RecordKey(scope, digest_key(f"{self.name}\x00{text}"))

    def fingerprint(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self.validate is None:
            return ""
        if self.validate is True:
            return fingerprint_of(self.reader.whole_payload(args, kwargs))
        return fingerprint_of({p: self.reader.path(p, args, kwargs) for p in self.validate})

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
            lambda: _finished(self.fn(*args, **kwargs), self.name, False),
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
            lambda: self._awaited(args, kwargs),
            self.on_lease_lost,
        )

    async def _awaited(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _finished(await self.fn(*args, **kwargs), self.name, True)

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the record of a call with these arguments, so the next call runs again.

        Returns whether a live record was deleted.

        :raises InFlightError: a call with these arguments is still running (its lease has not
            run out): deleting its record would let a duplicate run beside it. The check and
            the delete are one atomic step in the store; retry once the call finished.
        """
        store = self.store
        return run(self._forget(args, kwargs), lambda op: getattr(store, op[0])(*op[1:]))

    async def aforget(self, *args: Any, **kwargs: Any) -> bool:
        """The async face of :meth:`forget`."""
        store = self.store
        return await arun(
            self._forget(args, kwargs), lambda op: getattr(store, "a" + op[0])(*op[1:])
        )

    def _forget(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan[bool]:
        """:meth:`forget` as a plan of store calls ``(method, *arguments)``, for both faces."""
        key = self.record_key(args, kwargs)
        if self.policy.cache is not None:
            self.policy.cache.discard(key)
        for _ in range(_FORGET_ATTEMPTS):
            if (yield ("delete", key, False)):
                return True
            record = yield ("get", key)  # only to tell "running" from "absent"
            if record is None:
                return False
            if record.status == "in_progress":
                raise self._still_running(record, (yield ("now",)))
        return False  # pragma: no cover - the record changed state three times meanwhile

    def _still_running(self, record: Record, now: float) -> InFlightError:
        retry_after = max((record.lease_until or 0.0) - now, 0.0)
        return InFlightError(
            f"{self.name}: the call with these arguments is still running, so its record is "
            "not deleted (a duplicate would run beside it); call forget() again once it "
            "finished",
            retry_after,
        )


_FORGET_ATTEMPTS = 3


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
    ttl: float | str | None = None,
    lease: float | str | None = None,
    on_duplicate: Literal["wait", "raise"] | None = None,
    wait_timeout: float | str | None = None,
    store_errors: Sequence[type[BaseException]] = (),
    fail_open: bool | None = None,
    codec: Codec | None = None,
    cache_size: int | None = None,
    on_lease_lost: LostCallback | None = None,
    on_cancel: Literal["finish", "release"] = "finish",
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
    ttl: float | str | None = None,
    lease: float | str | None = None,
    on_duplicate: Literal["wait", "raise"] | None = None,
    wait_timeout: float | str | None = None,
    store_errors: Sequence[type[BaseException]] = (),
    fail_open: bool | None = None,
    codec: Codec | None = None,
    cache_size: int | None = None,
    on_lease_lost: LostCallback | None = None,
    on_cancel: Literal["finish", "release"] = "finish",
) -> Any:
    """Make a function run once per key; duplicates get the stored result.

    Settings left ``None`` come from the environment, else their default (see
    :mod:`oncely.settings`: ``ttl`` from ``$ONCELY_TTL``, …); durations are seconds, or
    strings with a unit (``"5m"``, ``"24h"``). The table of parameters is in
    ``docs/decorator.md``.

    :param store: a store URL or object (``$ONCELY_STORE``, default ``sqlite:///oncely.db``).
    :param name: a stable name for the function inside keys (default ``module.qualname``;
        set it so renaming or moving the function keeps old keys valid; lambdas need it).
    :param key: argument names or dotted paths (``["order.id"]``, ``["self.id"]``), or a
        callable taking the call's arguments and returning the key. Each part must be a
        non-empty str (at most 255 characters), an int or a UUID, else
        :class:`~oncely.errors.InvalidKey` before the function runs. Default: all arguments,
        refused (:class:`~oncely.errors.ConfigurationError`) for methods, bound methods,
        partials, callable objects and closures over data, whose calls differ by more than
        their arguments.
    :param scope: a namespace (tenant, user) or a callable returning one (same rules as a key
        part); equal keys in different scopes never meet.
    :param validate: fields whose values must match on a retry (or ``True`` for all
        arguments); a mismatch raises :class:`~oncely.errors.IdempotencyKeyMismatch`.
    :param ttl: seconds a completed result is kept for replay (``$ONCELY_TTL``, default 86400,
        24 h: a retry later than that runs the function again).
    :param lease: seconds a running call holds the key without renewal; renewed every lease/3
        (``$ONCELY_LEASE``, default 30).
    :param on_duplicate: ``"wait"`` for the running call's result, or ``"raise"``
        :class:`~oncely.errors.InFlightError` at once (``$ONCELY_ON_DUPLICATE``, default
        ``"wait"``).
    :param wait_timeout: the longest a duplicate waits before
        :class:`~oncely.errors.InFlightError`, seconds (``$ONCELY_WAIT_TIMEOUT``, default 30).
    :param store_errors: exception types (and their subclasses) stored and raised again on
        replay as the same class, rebuilt without calling ``__init__`` (their ``args`` and
        attributes must be JSON values; one carrying anything else is kept as "ran, outcome
        not storable" and retries raise :class:`~oncely.errors.SerializationError`); any other
        exception releases the key so a retry runs again.
    :param fail_open: if the store is unreachable, run without protection instead of raising
        :class:`~oncely.errors.StoreUnavailable` (``$ONCELY_FAIL_OPEN``, default ``False``:
        fail closed).
    :param codec: how results are stored (default :class:`~oncely.codecs.JsonCodec`, bound to
        the return annotation: a replay has the same types as the first result, and an
        annotation it cannot rebuild raises :class:`~oncely.errors.ConfigurationError` here).
    :param cache_size: keep up to this many completed results in process
        (``$ONCELY_CACHE_SIZE``, default 0: off).
    :param on_lease_lost: called with ``(claim, error)`` if the running call loses its lease
        (a loss found by the renewal threads calls it on a thread of its own for a sync
        function, on the caller's event loop for an async one).
    :param on_cancel: what a cancelled caller of an async function does once the body started:
        ``"finish"`` (default) lets the body run on, shielded, and stores its outcome, so a
        retry replays it instead of running the effect twice; ``"release"`` cancels the body
        and releases the key, so a retry runs it again (only for bodies safe to cut off).
    :returns: the wrapped function (sync or async like ``fn``), with ``.forget(*args)`` to
        delete a call's record and ``.idempotency`` (the :class:`Idempotent`).
    :raises ResultNotStored: the function ran but its outcome could not be stored (the
        store became unreachable); ``.result`` holds its value, and the key stays claimed
        while the outcome is stored in the background (see :mod:`oncely.core.settle`).
    :raises ConfigurationError: when decorating: a bad setting (named in the message), an
        unknown store scheme or missing extra, a return annotation the codec cannot rebuild,
        or a function whose calls differ by more than their arguments without ``key=``.
    """

    def decorate(func: Callable[..., Any], depth: int = 1) -> Callable[..., Any]:
        # Names local to the decorating scope (a class defined inside a function) resolve
        # string annotations, as pydantic and dataclasses do with the caller's namespace.
        localns = sys._getframe(depth).f_locals
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
            on_cancel=on_cancel,
            localns=localns,
        )
        wrapper: Any
        if is_async_callable(func):

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
        config.wrapper = wrapper
        return typing.cast(Callable[..., Any], wrapper)

    if fn is not None:
        return decorate(fn, 2)
    return decorate
