"""``@idempotent_transaction``: a function that takes a connection or session runs as one
:func:`oncely.sql.transaction`, and a repeat returns the stored result without running.

::

    @oncely.sql.idempotent_transaction(key="request_id", scope=lambda user, **_: user.id)
    def pay(conn, user, request_id: str, amount: int) -> dict[str, int]:
        conn.execute("INSERT INTO payments ...")
        return {"amount": amount}

Each decorated function has its own key space (its ``module.qualname``, or ``name=``), and a
key reused with other arguments raises :class:`~oncely.errors.IdempotencyKeyMismatch`.
The function's return value is stored with its writes (JSON by default, rebuilt to the return
annotation: :class:`~oncely.codecs.JsonCodec`) and returned on every repeat. A serialization
failure or deadlock anywhere in the function (PostgreSQL SERIALIZABLE, InnoDB deadlocks) rolls
everything back and runs the function again, up to ``attempts`` times, when the decorator began
the transaction (inside a caller's transaction it cannot: the error propagates, retry the
caller's transaction). A separate decorator rather than an ``oncely.idempotent`` option: the
record lives in the caller's database and no store is involved.
"""

from __future__ import annotations

import functools
import inspect
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from oncely.codecs import Codec, JsonCodec
from oncely.core.calls import is_async_callable
from oncely.core.names import qualified_name
from oncely.errors import ConfigurationError
from oncely.functions.keys import fingerprint_of
from oncely.settings import flag, text, whole
from oncely.sql.connections import check_identifier, retryable
from oncely.sql.schema import DEFAULT_TABLE
from oncely.sql.transaction import Transaction

__all__ = ["idempotent_transaction"]

F = TypeVar("F", bound=Callable[..., Any])


def _reader(spec: object, what: str, sig: inspect.Signature) -> Callable[..., Any]:
    """``spec`` as a function of the call's bound arguments: a parameter name, a callable
    (called with the same arguments as the function), or a constant (scope only)."""
    if callable(spec) and not isinstance(spec, str):
        fn = cast(Callable[..., Any], spec)
        return lambda args, kwargs, bound: fn(*args, **kwargs)
    if what == "key" or (isinstance(spec, str) and spec in sig.parameters):
        if not isinstance(spec, str) or spec not in sig.parameters:
            raise ConfigurationError(
                f"key={spec!r}: name a parameter of the function that holds the key, or pass "
                "a callable receiving the function's arguments"
            )
        return lambda args, kwargs, bound: bound.arguments[spec]
    return lambda args, kwargs, bound: spec


def idempotent_transaction(
    *,
    key: str | Callable[..., str],
    scope: object,
    conn_arg: str | None = "conn",
    conn: Any = None,
    table: str = DEFAULT_TABLE,
    codec: Codec | None = None,
    attempts: int = 5,
    wait: bool = True,
    name: str | None = None,
    validate: bool | Sequence[str] = True,
) -> Callable[[F], F]:
    """Decorate a sync or async function so that it runs once per key (see the module).

    :param key: the name of the parameter holding the idempotency key, or a callable
        receiving the function's arguments and returning it.
    :param scope: a constant (tenant id, :data:`oncely.sql.GLOBAL`), the name of a parameter,
        or a callable receiving the function's arguments.
    :param conn_arg: the parameter holding the connection or session (default ``"conn"``).
    :param conn: a fixed connection instead (``django.db.connection``); then ``conn_arg`` is
        ignored.
    :param attempts: runs in all when serialization failures or deadlocks roll the work back
        (backoff with jitter: 10 ms doubling, at most 0.5 s).
    :param name: the function's key space (default ``module.qualname``): two decorated
        functions never share records, as with :func:`oncely.idempotent`. Set it to keep the
        records of a function you rename or move.
    :param validate: which arguments a repeat must match: True (default) every argument but
        the connection, a list of parameter names, or False for none. A key reused with other
        arguments raises :class:`~oncely.errors.IdempotencyKeyMismatch` (as
        :func:`oncely.idempotent` and :meth:`oncely.sql.Operation.run` do; the IETF
        Idempotency-Key draft's 422). The arguments are fingerprinted as canonical JSON
        (SHA-256), stored in the record's ``params`` column.
    :raises ConfigurationError: when decorating, for a ``key``/``conn_arg``/``validate`` that
        names no parameter, or ``attempts``, ``wait`` or ``name`` of the wrong type.
    :raises InvalidIdentifier: ``table`` is not a plain SQL identifier.
    :raises IdempotencyKeyMismatch: on a call, a completed key with other arguments.
    :raises InvalidKey: on a call, validated arguments that cannot be rendered as JSON (name
        JSON-friendly ones with ``validate=[...]``).
    """
    where = "@idempotent_transaction"
    check_identifier(table)
    whole(attempts, "attempts", where=where, minimum=1)
    flag(wait, "wait", where=where)
    text(name, "name", where=where, none=True)

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        if conn is None and (conn_arg is None or conn_arg not in sig.parameters):
            raise ConfigurationError(
                f"@idempotent_transaction: {fn.__qualname__} has no parameter {conn_arg!r}; "
                "name the connection parameter with conn_arg=, or pass conn="
            )
        read_key = _reader(key, "key", sig)
        space = (
            name
            if name is not None
            else qualified_name(fn, f"@idempotent_transaction {fn.__qualname__}")
        )
        if "\x00" in space or not space:
            raise ConfigurationError(f"name={space!r}: a non-empty name without NUL characters")
        if validate is True:
            checked = [p for p in sig.parameters if conn is not None or p != conn_arg]
        elif validate is False:
            checked = []
        else:
            checked = list(validate)
            unknown = [p for p in checked if p not in sig.parameters]
            if unknown or isinstance(validate, str):
                raise ConfigurationError(
                    f"validate={validate!r}: name parameters of {fn.__qualname__} "
                    f"(a list of names), or pass True for all of them or False for none"
                )
        read_scope = _reader(scope, "scope", sig)
        hint = inspect.get_annotations(fn, eval_str=True).get("return", Any)
        store_codec = codec if codec is not None else JsonCodec().bind(hint)

        def open_tx(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Transaction:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            target = conn if conn is not None else bound.arguments[cast(str, conn_arg)]
            fingerprint = (
                fingerprint_of({p: bound.arguments[p] for p in checked}).encode("ascii")
                if checked
                else None
            )
            return Transaction(
                target,
                key=read_key(args, kwargs, bound),
                scope=read_scope(args, kwargs, bound),
                table=table,
                codec=store_codec,
                wait=wait,
                namespace=space,
                fingerprint=fingerprint,
            )

        def pause(attempt: int) -> float:
            return random.uniform(0, min(0.5, 0.01 * 2**attempt))

        if is_async_callable(fn):

            @functools.wraps(fn)
            async def arunner(*args: Any, **kwargs: Any) -> Any:
                import asyncio

                for attempt in range(attempts):
                    tx = open_tx(args, kwargs)
                    try:
                        async with tx:
                            if tx.replayed:
                                return tx.result
                            value = await fn(*args, **kwargs)
                            tx.set_result(value)
                        return value
                    except Exception as exc:
                        if not (retryable(exc) and tx.owned and attempt < attempts - 1):
                            raise
                    await asyncio.sleep(pause(attempt))
                raise AssertionError("unreachable")  # pragma: no cover

            return cast(F, arunner)

        @functools.wraps(fn)
        def runner(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(attempts):
                tx = open_tx(args, kwargs)
                try:
                    with tx:
                        if tx.replayed:
                            return tx.result
                        value = fn(*args, **kwargs)
                        tx.set_result(value)
                    return value
                except Exception as exc:
                    if not (retryable(exc) and tx.owned and attempt < attempts - 1):
                        raise
                time.sleep(pause(attempt))
            raise AssertionError("unreachable")  # pragma: no cover

        return cast(F, runner)

    return decorate
