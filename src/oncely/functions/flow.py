"""The protocol of one idempotent call, written once as a generator with no I/O (sans-IO).

:func:`call_flow` yields operations — the store operations of :mod:`oncely.core.ops`
(``Claim``, ``Complete``, ``Release``, ``Watch``, …) and its own :class:`Run` /
:class:`RunUnprotected` — and receives their results; the sync and async drivers in
:mod:`oncely.functions.drivers` only carry them out. So the rules — who runs, who waits, what
is stored, what is released — exist in exactly one place for sync and async callers alike.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from oncely.codecs import Codec, encode_result
from oncely.core import steps
from oncely.core.cancelsafe import interrupted
from oncely.core.deadline import DeadlinePassed
from oncely.core.names import type_name
from oncely.core.observe import describe
from oncely.core.ops import Claim, StoreOp, Watch
from oncely.core.records import InFlight, Mismatch, New, Record, RecordKey, Replay
from oncely.core.settle import SETTLE_FOR
from oncely.errors import (
    IdempotencyKeyMismatch,
    InFlightError,
    LeaseLost,
    ResultNotStored,
    ResultTooLarge,
    SerializationError,
    StoredFailure,
    StoreUnavailable,
)
from oncely.functions.cache import ResultCache

__all__ = ["CallPolicy", "Op", "Run", "RunUnprotected", "call_flow"]

log = logging.getLogger("oncely")

ERROR_CODEC = "error+json"
#: Codec name of a completion whose result could not be encoded (the call ran; no value kept).
UNSERIALIZABLE = "unserializable"


@dataclass(frozen=True, slots=True)
class Run:
    """Run the function while keeping the lease of ``fence`` alive; send back its value."""

    fence: int
    lease_until: float
    now: float


@dataclass(frozen=True, slots=True)
class RunUnprotected:
    """Run the function without a claim (fail-open while the store is down)."""


Op = StoreOp | Run | RunUnprotected


@dataclass(frozen=True)
class CallPolicy:
    """Everything the flow needs to know about one decorated function (durations in
    seconds)."""

    name: str
    codec: Codec
    return_type: Any
    ttl: float
    lease: float
    on_duplicate: str  # "wait" | "raise"
    wait_timeout: float
    store_errors: tuple[type[BaseException], ...]
    fail_open: bool
    cache: ResultCache | None
    complete_attempts: int = 3
    #: What a cancelled async call does once its body started: "finish" (the body runs on,
    #: shielded, and its outcome settles the key) or "release" (the body is cancelled and
    #: the key released, so a retry runs it again).
    on_cancel: str = "finish"


def _decode(policy: CallPolicy, record: Record) -> Any:
    """The stored outcome of a completed call: a value, or a stored exception raised again."""
    if record.codec == ERROR_CODEC:
        raise _rebuild_error(policy, record.result or b"{}")
    if record.codec == UNSERIALIZABLE:
        why = (record.result or b"").decode("utf-8", "replace")
        raise SerializationError(
            f"{policy.name} already ran for this key, but its outcome could not be stored"
            + (f" ({why})" if why else "")
            + "; it is not run again. Its return value (or store_errors exception) must be "
            "serializable by the configured codec and fit the store"
        )
    if record.codec != policy.codec.name:
        raise SerializationError(
            f"stored result uses codec {record.codec!r} but {policy.name} is configured with "
            f"{policy.codec.name!r}; keep the codec stable or delete the record"
        )
    return policy.codec.decode(record.result or b"", policy.return_type)


def _exact(value: Any) -> bool:
    """True if JSON gives ``value`` back as it is (str, int, float, bool, None, and lists and
    str-keyed dicts of them): what a stored exception may carry."""
    if value is None or type(value) in (str, int, float, bool):
        return True
    if type(value) is list:
        return all(_exact(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _exact(v) for k, v in value.items())
    return False


def _encode_error(exc: BaseException) -> tuple[bytes, str]:
    """The stored form of an exception listed in ``store_errors``: its class name, ``args``
    and instance attributes, as JSON; rebuilt on replay without calling ``__init__``
    (:func:`_rebuild_error`). An exception carrying a value JSON cannot give back exactly is
    not stored in an altered form: the call is kept as "ran, outcome not storable" (retries
    raise :class:`SerializationError`, which says which value)."""
    cls = type(exc)
    name = type_name(cls)
    attrs = dict(getattr(exc, "__dict__", None) or {})
    bad = [f"args[{i}] ({type(a).__name__})" for i, a in enumerate(exc.args) if not _exact(a)]
    bad += [f".{k} ({type(v).__name__})" for k, v in attrs.items() if not _exact(v)]
    if bad:
        why = (
            f"it raised {name}, which carries values JSON cannot give back exactly: "
            f"{', '.join(bad)}; store_errors exceptions may carry only JSON values"
        )
        log.warning("oncely: %s; a retry raises SerializationError", why)
        return _why(SerializationError(why)), UNSERIALIZABLE
    data = {"type": name, "message": str(exc), "args": list(exc.args), "attrs": attrs}
    return json.dumps(data).encode(), ERROR_CODEC


def _error_class(allowed: tuple[type[BaseException], ...], name: str) -> type[BaseException] | None:
    """The class named ``name`` among ``allowed`` and their subclasses (``store_errors``
    stores a subclass of a listed class too), or None."""
    seen: set[type[BaseException]] = set()
    todo = list(allowed)
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if type_name(cls) == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _rebuild_error(policy: CallPolicy, data: bytes) -> BaseException:
    """Rebuild a stored exception as its own class -- without calling ``__init__``, so a
    keyword-only or other-shaped constructor does not matter -- but only as one of the
    classes the user allowed (or their subclasses); else :class:`StoredFailure`."""
    info = json.loads(data)
    name, message = str(info.get("type")), str(info.get("message"))
    cls = _error_class(policy.store_errors, name)
    if cls is not None:
        args = tuple(info.get("args", ()))
        try:
            exc = cls.__new__(cls, *args)
            exc.args = args
            exc.__dict__.update(info.get("attrs") or {})
        except Exception:  # a __new__ that wants other arguments
            pass
        else:
            return exc
    return StoredFailure(name, message)


def call_flow(policy: CallPolicy, key: RecordKey, fingerprint: str) -> Generator[Op, Any, Any]:
    """One call: claim; then run-and-store, replay, wait for the holder, or refuse."""
    if policy.cache is not None:
        hit = policy.cache.get(key)
        # Another payload under a cached key goes to the store, which answers Mismatch.
        if hit is not None and hit.fingerprint == fingerprint:
            return _decode(policy, hit)
    deadline: float | None = None
    retry_after = 0.0
    while True:
        try:
            # After a wait, the claim keeps to the wait's deadline: a store that waits for a
            # lock (SQLite, another process holding the file) waits no longer than that.
            outcome = yield Claim(key, fingerprint, policy.lease, policy.ttl, deadline)
        except DeadlinePassed:  # the file stayed locked until wait_timeout: nothing written
            raise InFlightError(
                f"{policy.name}: waited {policy.wait_timeout}s for the call holding this key; "
                "the store stayed locked by another writer meanwhile. Raise wait_timeout or "
                "retry later",
                retry_after,
            ) from None
        except StoreUnavailable:
            if not policy.fail_open:
                raise
            log.warning("oncely: store down, running %s unprotected (fail-open)", policy.name)
            return (yield RunUnprotected())

        if isinstance(outcome, New):
            return (yield from _run_and_store(policy, key, outcome))
        if isinstance(outcome, Replay):
            if policy.cache is not None:
                policy.cache.put(key, outcome.record, outcome.record.expires_at - outcome.now)
            return _decode(policy, outcome.record)
        if isinstance(outcome, Mismatch):
            raise IdempotencyKeyMismatch(
                f"{policy.name}: this idempotency key was already used with a different "
                "payload; retry with the original payload, or use a new key for a new operation"
            )
        assert isinstance(outcome, InFlight)
        retry_after = max(outcome.lease_until - outcome.now, 0.0)
        if policy.on_duplicate == "raise":
            raise InFlightError(
                f"{policy.name}: a call with this key is still running; retry after "
                f"{retry_after:.1f}s",
                retry_after,
            )
        now = time.monotonic()
        if deadline is None:
            deadline = now + policy.wait_timeout
        left = deadline - now
        if left <= 0:
            raise InFlightError(
                f"{policy.name}: waited {policy.wait_timeout}s for the call holding this key; it "
                "is still running. Raise wait_timeout or retry later",
                retry_after,
            )
        # Wake when the holder finishes, or when its lease could have run out.
        yield Watch(key, outcome.fence, min(left, retry_after + 0.01))


def _run_and_store(policy: CallPolicy, key: RecordKey, new: New) -> Generator[Op, Any, Any]:
    try:
        value = yield Run(new.fence, new.lease_until, new.now)
    except BaseException as exc:
        if isinstance(exc, policy.store_errors):
            try:
                yield from _complete(policy, key, new.fence, *_encode_error(exc), exc)
            except ResultTooLarge as too_large:  # kept as "ran, not storable"; the caller
                log.warning("oncely: %s", describe(too_large))  # still gets what the body raised
        elif interrupted(exc, policy.on_cancel):
            log.warning(
                "oncely: %s was interrupted while it ran (%s); its key stays claimed until its "
                "lease runs out (%gs), then a retry runs it again",
                policy.name,
                describe(exc),
                policy.lease,
            )
        else:
            error = yield from steps.release(key, new.fence, policy.complete_attempts)
            if error is not None:
                log.warning(
                    "oncely: %s raised and its claim could not be released (%s); the key frees "
                    "itself when the lease runs out",
                    policy.name,
                    error,
                )
        raise
    try:
        data, codec = encode_result(policy.codec, value), policy.codec.name
    except SerializationError as exc:
        # The call ran: keep that fact so a retry cannot run it a second time.
        yield from _complete(policy, key, new.fence, _why(exc), UNSERIALIZABLE, value)
        raise
    yield from _complete(policy, key, new.fence, data, codec, value)
    return value


def _why(exc: BaseException) -> bytes:
    """The short reason kept in a "ran, result not storable" marker (at most 500 bytes)."""
    return str(exc).encode("utf-8", "replace")[:500]


def _complete(
    policy: CallPolicy, key: RecordKey, fence: int, data: bytes, codec: str, result: Any
) -> Generator[Op, Any, None]:
    """Store the outcome (:func:`oncely.core.steps.complete`). The call ran, so the key is
    never released: if the store stays unreachable, the completion goes on in the background
    (lease renewed) and the caller gets :class:`ResultNotStored` with ``result``; a result too
    large for the store is kept as "ran, result not storable" and raises
    :class:`~oncely.errors.ResultTooLarge` (a :class:`SerializationError`)."""
    what = f"the result of {policy.name}"
    try:
        down = yield from steps.complete(
            key,
            fence,
            data,
            codec,
            policy.ttl,
            policy.lease,
            what,
            policy.complete_attempts,
            marker=lambda too_large: (_why(too_large), UNSERIALIZABLE),
        )
    except ResultTooLarge as exc:
        raise ResultTooLarge(
            f"{policy.name} ran, but its result could not be stored ({exc}); it is kept as "
            "'ran, result not storable': a retry raises SerializationError instead of running "
            "again. Return a smaller result (e.g. store the payload elsewhere and return a "
            "reference)",
            exc.size,
            exc.limit,
        ) from exc
    except LeaseLost as exc:
        raise LeaseLost(
            f"{policy.name} ran, but its claim was lost before the result was stored "
            f"({exc}); another caller may have run it too. Use a longer lease, and make the "
            "protected resource check the fence"
        ) from exc
    if down is not None:
        raise ResultNotStored(
            f"{policy.name} ran, but its result could not be stored ({down}). The key "
            f"stays claimed while the result is stored in the background (at most "
            f"{SETTLE_FOR:g}s): a retry meanwhile waits or gets InFlightError, then "
            "replays. The error's .result holds what the call returned",
            result,
        ) from down
