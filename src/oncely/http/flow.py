"""The HTTP idempotency protocol, written once as a generator with no I/O (sans-IO).

:func:`request_flow` decides everything about one request — whether the middleware applies,
which problem answers a bad request, claim, replay, wait, run, store or release — by yielding
operations (:class:`ReadBody`, :class:`Claim`, :class:`Run`, :class:`Respond`, …) and receiving
their results. The ASGI driver (:mod:`oncely.http.asgi`) carries them out with ``await``, the
WSGI driver (:mod:`oncely.http.wsgi`) with blocking calls; neither decides anything. This is
the pattern of :mod:`oncely.functions.flow`, applied to HTTP.

Order of a protected request (each step answers with a problem and stops on failure):

1. the route's policy applies: the method is one of ``methods`` on an enabled route (the key
   applies), or the route requires a one-time token and the method is unsafe (every unsafe
   method needs the token) — else the app runs untouched;
2. the ``Idempotency-Key`` parses (400 ``idempotency-key-invalid``), or is absent (400
   ``idempotency-key-missing`` where required; otherwise the app runs untouched);
3. the body is read, at most ``max_request_body`` bytes (413) and complete (400);
4. a required one-time token is present (400 ``token-missing``);
5. the fingerprint is computed (400 ``request-body-invalid``);
6. one ``claim`` (503 ``store-unavailable`` if the store is down, unless ``fail_open``, which
   covers :class:`~oncely.errors.StoreUnavailable` only, never another store error):
   new -> consume the token, run the app with its lease renewed, then settle; completed ->
   replay; in flight -> wait (``wait``) or 409; other fingerprint -> 422.

Settling after the app ran (:func:`_verdict`): once the handler started its response, its work
is done, so the key is completed — with the response, or, if the response was too large to
keep or was cut short (client gone, stream failed, an exception after the start), with the "not
replayable" marker (a retry gets 409, never a second run). A handler that raised before it
started a response is kept as a 500 ``handler-failed`` problem (Stripe saves results once the
endpoint started executing, 500s included). The key is released (and a consumed token given
back) only when the framework refused the request before its handler ran
(:class:`~oncely.http.messages.HandlerEntry`), when the request was cancelled with
``on_cancel="release"``, or when the configuration does not store the outcome
(``transient_statuses``, 4xx with ``store_client_errors=False``, 5xx and exceptions with
``store_server_errors=False``).
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from oncely.core import steps
from oncely.core.cancelsafe import interrupted
from oncely.core.deadline import DeadlinePassed
from oncely.core.frozen import quick_init
from oncely.core.observe import describe
from oncely.core.ops import Claim, Complete, CompleteLater, Release, Sleep, StoreOp, Watch
from oncely.core.records import InFlight, Mismatch, New, Record, RecordKey, Replay, digest_key
from oncely.core.text import text_problem
from oncely.errors import (
    ConfigurationError,
    HttpProblem,
    InvalidKey,
    InvalidPayload,
    LeaseLost,
    OncelyError,
    ResultTooLarge,
    SerializationError,
    StoreError,
    StoreUnavailable,
    TokenError,
)
from oncely.http import scopes
from oncely.http.codec import (
    CODEC,
    INTERRUPTED,
    TOO_LARGE,
    UNREPLAYABLE,
    decode_response,
    decode_unreplayable,
    encode_response,
    encode_unreplayable,
    storable_headers,
)
from oncely.http.config import RoutePolicy
from oncely.http.engine import SAFE_METHODS, Engine
from oncely.http.guard import find_token, issued_response, purpose_from_query
from oncely.http.headers import parse_key
from oncely.http.messages import HttpRequest, HttpResponse, IdempotencyInfo
from oncely.http.problems import (
    BODY_INCOMPLETE,
    BODY_INVALID,
    BODY_LENGTH_REQUIRED,
    BODY_TOO_LARGE,
    HANDLER_FAILED,
    IN_FLIGHT,
    KEY_INVALID,
    KEY_MISMATCH,
    KEY_MISSING,
    METHOD_NOT_ALLOWED,
    NOT_REPLAYABLE,
    SCOPE_INVALID,
    STORE_UNAVAILABLE,
    TOKEN_MISSING,
    TOKEN_PURPOSE_UNKNOWN,
    TOKEN_SUBJECT_INVALID,
    ProblemType,
    body_allowed,
    from_exception,
    problem_response,
    token_problem,
)
from oncely.tokens import MAX_PURPOSE, TokenUse

__all__ = [
    "PASS",
    "BodyError",
    "Captured",
    "Claim",
    "Complete",
    "CompleteLater",
    "ConsumeToken",
    "IssueToken",
    "Op",
    "Pass",
    "ReadBody",
    "Release",
    "ReleaseToken",
    "Respond",
    "Run",
    "Sleep",
    "Watch",
    "request_flow",
]

log = logging.getLogger("oncely.http")


# -- operations (what the flow asks a driver to do) ------------------------------------------------
@quick_init
@dataclass(frozen=True, slots=True)
class Pass:
    """Run the app untouched (with the buffered body if one was read); nothing is recorded."""


PASS = Pass()


@quick_init
@dataclass(frozen=True, slots=True)
class Respond:
    """Send this response instead of running the app."""

    response: HttpResponse


class BodyError(enum.Enum):
    TOO_LARGE = "too large"
    INCOMPLETE = "incomplete"
    #: The request has a body (``Transfer-Encoding``) the server gives no way to read to its
    #: end (a WSGI server without ``wsgi.input_terminated``): refused, never read as empty.
    LENGTH_REQUIRED = "length required"


@quick_init
@dataclass(frozen=True, slots=True)
class ReadBody:
    """Read the whole request body, at most ``limit`` bytes (and exactly ``expected`` if the
    request declared a length); send back bytes or a BodyError."""

    limit: int
    expected: int | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class Run:
    """Run the app, passing its response through; send back a :class:`Captured`.

    With a ``fence``, keep the key's lease alive while the app runs. ``capture`` is the most
    body bytes to keep (beyond it the body is dropped and ``Captured.body`` is None); -1 keeps
    no body at all (only status and completeness are needed). An exception of the app comes
    back in ``Captured.error`` (the flow settles the key, then raises it).
    """

    key: RecordKey | None
    fence: int | None
    lease: float
    info: IdempotencyInfo
    capture: int


@quick_init
@dataclass(frozen=True, slots=True)
class ConsumeToken:
    token: str
    subject: str
    purpose: str


@quick_init
@dataclass(frozen=True, slots=True)
class ReleaseToken:
    use: TokenUse


@quick_init
@dataclass(frozen=True, slots=True)
class IssueToken:
    subject: str
    purpose: str
    ttl: float


Op = StoreOp | Pass | Respond | ReadBody | Run | ConsumeToken | ReleaseToken | IssueToken


@dataclass(slots=True)
class Captured:
    """What the app produced: status (0: no response started), headers, body (None if over
    the capture limit), whether the response was complete (the app produced its last body
    message), whether its handler ran (False: the framework refused the request before it, see
    :class:`~oncely.http.messages.HandlerEntry`), the exception it raised, if any, and whether
    the framework answered an exception of the handler with its own page (``failed``: a 500
    is kept as ``handler-failed``, like an exception that reached the middleware)."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] | None = None
    body: bytes | None = None
    complete: bool = False
    handled: bool = True
    error: BaseException | None = None
    failed: bool = False


class _Verdict(enum.Enum):
    STORE = 1
    MARKER = 2
    RELEASE = 3


Flow = Generator[Op, Any, None]


# -- the flow --------------------------------------------------------------------------------------
def request_flow(engine: Engine, request: HttpRequest) -> Flow:
    """Everything the middleware does with one request (see the module docstring)."""
    if engine.token_endpoint is not None and request.path == engine.token_endpoint:
        yield from _issue_flow(engine, request)
        return
    policy = engine.policy_for(request)
    if policy is None:
        yield PASS
        return

    header_name = policy.header_name
    keyed = policy.enabled and request.method in policy.methods
    guarded = policy.token is not None and request.method not in SAFE_METHODS
    key: str | None = None
    values = request.header_values(policy.header) if keyed else []
    if values:
        try:
            key = parse_key(
                values, allow_bare=policy.allow_bare_key, max_length=policy.max_key_length
            )
        except InvalidKey as exc:
            yield _problem(policy, KEY_INVALID, str(exc))
            return
    elif not guarded:
        if keyed and policy.required:
            yield _problem(
                policy,
                KEY_MISSING,
                f"{request.method} {request.path} requires an {header_name} header; send a "
                'unique value per operation, e.g. Idempotency-Key: "<uuid>"',
            )
        else:
            yield PASS
        return

    limit = policy.max_request_body
    declared = request.content_length()
    if declared == -1:
        yield _problem(policy, BODY_INCOMPLETE, "the Content-Length header is not a number")
        return
    if declared is not None and declared > limit:
        yield _problem(
            policy, BODY_TOO_LARGE, f"the body may have at most {limit} bytes", limit=limit
        )
        return
    body = yield ReadBody(limit, declared)
    if body is BodyError.TOO_LARGE:
        yield _problem(
            policy, BODY_TOO_LARGE, f"the body may have at most {limit} bytes", limit=limit
        )
        return
    if body is BodyError.INCOMPLETE:
        yield _problem(policy, BODY_INCOMPLETE, "the request body ended before it was complete")
        return
    if body is BodyError.LENGTH_REQUIRED:
        yield _problem(
            policy,
            BODY_LENGTH_REQUIRED,
            "this server cannot read a request body sent without Content-Length (chunked) to "
            "its end, so it cannot be compared with a retry; send Content-Length",
        )
        return
    assert isinstance(body, bytes)

    try:
        scope_name = _scope_of(policy, request)
    except HttpProblem as exc:  # a scope function refusing the request (scope_from_user: 401)
        yield Respond(from_exception(exc, policy.problem_base))
        return
    token: str | None = None
    subject = ""
    if guarded:
        guard = engine.config.tokens
        if guard is None:
            raise ConfigurationError(
                f"{request.path} requires a one-time token (purpose {policy.token!r}) but the "
                "middleware has no TokenGuard; pass IdempotencyConfig(tokens=TokenGuard(...))"
            )
        token = find_token(request.header(guard.header), request.content_type(), body, guard.field)
        if token is None:
            where = f"the {guard.header} header" + (
                f" or the {guard.field!r} field" if guard.field else ""
            )
            yield _problem(policy, TOKEN_MISSING, f"send the one-time token in {where}")
            return
        subject = _subject_of(engine, request)
        subject_problem = text_problem(subject)
        if subject_problem is not None:  # e.g. a cookie or header value holding a NUL
            yield _problem(policy, TOKEN_SUBJECT_INVALID, f"the subject {subject_problem}")
            return

    if key is None:
        assert token is not None and policy.token is not None
        info = IdempotencyInfo(key, scope_name, None, policy.token)
        yield from _token_only(policy, info, token, subject, policy.token)
        return

    try:
        fingerprint = policy.fingerprint(request, body)
    except InvalidPayload as exc:
        yield _problem(policy, BODY_INVALID, str(exc))
        return
    try:
        record_key = RecordKey(scope_name, digest_key(key))
    except InvalidKey as exc:
        # The key is hashed (any text has a digest): what no store keeps is the scope the
        # server derived (a principal id holding a NUL, say). Not the client's fault, and
        # nothing it can fix: a 500 naming the scope, with the reason in the log only (the
        # scope may hold a user id).
        log.error(
            "oncely.http: %s %s: the scope from %r cannot be stored: %s",
            request.method,
            request.path,
            policy.scope,
            describe(exc),
        )
        yield _problem(
            policy,
            SCOPE_INVALID,
            "the server derived an idempotency scope for this request that no store can keep "
            "(its log says why); nothing was done, and a retry gets the same answer until the "
            "server is fixed",
        )
        return

    deadline: float | None = None
    while True:
        try:
            # After a wait, the claim keeps to the wait's deadline: a store that waits for a
            # lock (SQLite, another process holding the file) waits no longer than that.
            outcome = yield Claim(record_key, fingerprint, policy.lease, policy.ttl, deadline)
        except DeadlinePassed:  # the file stayed locked until the wait's end: nothing written
            yield _in_flight(policy, header_name)
            return
        except StoreError as exc:
            # Only an unreachable store is an outage to ride out; a missing table, a bad
            # reply or any other StoreError is a fault to fix and never runs unprotected.
            if policy.fail_open and isinstance(exc, StoreUnavailable):
                log.warning(
                    "oncely.http: store down (%s); running the request unprotected", describe(exc)
                )
                info = IdempotencyInfo(key, scope_name, None, policy.token)
                captured = yield Run(None, None, policy.lease, info, -1)
                yield from _settle(policy, captured, None, None, None)
                return
            yield _unavailable(policy, exc)
            return
        if isinstance(outcome, New):
            yield from _run_and_store(
                policy, record_key, outcome, key, scope_name, token, subject, request
            )
            return
        if isinstance(outcome, Replay):
            yield Respond(_replay(policy, outcome.record))
            return
        if isinstance(outcome, Mismatch):
            yield _problem(
                policy,
                KEY_MISMATCH,
                f"this {header_name} was already used for a different request (method, path or "
                "payload differ); retry with the original request, or use a new key",
            )
            return
        assert isinstance(outcome, InFlight)
        if policy.wait > 0:
            now = time.monotonic()
            if deadline is None:
                deadline = now + policy.wait
            left = deadline - now
            if left > 0:
                lease_left = max(outcome.lease_until - outcome.now, 0.0)
                try:
                    yield Watch(record_key, outcome.fence, min(left, lease_left + 0.01))
                except StoreError as exc:
                    yield _unavailable(policy, exc)
                    return
                continue
        yield _in_flight(policy, header_name)
        return


def _run_and_store(
    policy: RoutePolicy,
    key: RecordKey,
    new: New,
    key_text: str,
    scope_name: str,
    token: str | None,
    subject: str,
    request: HttpRequest,
) -> Flow:
    use: TokenUse | None = None
    if token is not None and policy.token is not None:
        try:
            use = yield ConsumeToken(token, subject, policy.token)
        except (TokenError, StoreError) as exc:
            yield from _release(key, new.fence)
            yield _token_refused(policy, exc)
            return
    try:
        captured = yield Run(
            key,
            new.fence,
            policy.lease,
            IdempotencyInfo(key_text, scope_name, new.fence, policy.token),
            policy.max_stored_body,
        )
    except GeneratorExit:
        raise
    except BaseException:  # the driver failed before the app produced anything
        yield from _release(key, new.fence)
        if use is not None:
            yield from _release_token(use)
        raise
    if not _interrupted(policy, captured) and _principal_moved(policy, request, scope_name):
        yield from _release(key, new.fence)
        if use is not None:
            yield from _release_token(use)
        if captured.error is not None:
            raise captured.error
        return
    yield from _settle(policy, captured, use, key, new.fence)


def _interrupted(policy: RoutePolicy, captured: Captured) -> bool:
    """The handler was interrupted before it answered (its key stays claimed, see
    :func:`_settle`)."""
    return (
        captured.status == 0
        and captured.handled
        and captured.error is not None
        and interrupted(captured.error, policy.on_cancel)
    )


def _principal_moved(policy: RoutePolicy, request: HttpRequest, scope_name: str) -> bool:
    """The principal the app saw is not the one the key was scoped by (a scope by the
    principal, :func:`~oncely.http.scopes.scope_after`): something inside the middleware set
    the user after the scope was read (an authentication middleware listed or mounted inside
    oncely's, a view that logged a user in or out). The response is then not stored under
    the scope it was claimed in, where it would be replayed to the first principal; the key
    is released (see docs/http.md, "The principal changed while the request ran")."""
    try:
        after = scopes.scope_after(policy.scope, request)
    except Exception as exc:
        after = None
        reason: BaseException = exc
    else:
        if after is scopes.UNKNOWN:
            return False
        if after is not None and f"{policy.namespace}:{after}" == scope_name:
            return False
        reason = ConfigurationError(
            "the principal the app saw differs from the one the Idempotency-Key was scoped "
            "by: an authentication middleware (RemoteUserMiddleware, a token or JWT "
            "middleware, Starlette's AuthenticationMiddleware on a Mount, a plain ASGI "
            "middleware setting scope['user']) runs inside oncely's middleware, or the view "
            "logged a user in or out; the key was released and nothing stored. List the "
            "authentication before oncely's middleware (outside it)"
        )
    log.error(
        "oncely.http: %s %s: the response is not stored under the scope it was claimed in (%s)",
        request.method,
        request.path,
        describe(reason),
    )
    return True


def _token_only(
    policy: RoutePolicy, info: IdempotencyInfo, token: str, subject: str, purpose: str
) -> Flow:
    """A token-guarded request without an Idempotency-Key: the token alone makes it run once."""
    try:
        use = yield ConsumeToken(token, subject, purpose)
    except (TokenError, StoreError) as exc:
        yield _token_refused(policy, exc)
        return
    try:
        captured = yield Run(None, None, policy.lease, info, -1)
    except GeneratorExit:
        raise
    except BaseException:
        yield from _release_token(use)
        raise
    yield from _settle(policy, captured, use, None, None)


def _settle(
    policy: RoutePolicy,
    captured: Captured,
    use: TokenUse | None,
    key: RecordKey | None,
    fence: int | None,
) -> Flow:
    """After the app ran: complete the key (response or marker) or release it, give a consumed
    token back when the key is released, then raise the app's exception if it had one. A
    handler interrupted before it answered (:func:`oncely.core.cancelsafe.interrupted`: the
    server's loop cancelled it at shutdown, Ctrl-C) keeps its key claimed until the lease ends,
    as after a crash: it may have acted."""
    if key is not None and captured.error is not None and _interrupted(policy, captured):
        log.warning(
            "oncely.http: a handler was interrupted before it answered (%s); its key stays "
            "claimed until its lease runs out (%gs), then a retry runs it again",
            describe(captured.error),
            policy.lease,
        )
        raise captured.error
    if (
        (
            (captured.status == 0 and isinstance(captured.error, Exception))
            # not a cancellation (on_cancel="release"); or the framework's own 500 page for it
            or (captured.status == 500 and captured.failed)
        )
        and captured.handled
        and policy.store_server_errors
    ):
        captured = _failure(policy, captured)
    verdict = _verdict(policy, captured)
    if key is not None and fence is not None:
        status = captured.status
        marker = _marker(status)
        if verdict is _Verdict.STORE:  # a response too large for the store: the marker
            headers = storable_headers(captured.headers or (), policy.deny_headers)
            try:
                data = encode_response(status, headers, captured.body or b"")
            except SerializationError as exc:  # e.g. a header over 64 KiB: kept as a marker
                log.error("oncely.http: the response cannot be stored (%s)", describe(exc))
                data, codec = marker()
            else:
                codec = CODEC
            yield from _complete(policy, key, fence, data, codec, marker)
        elif verdict is _Verdict.MARKER:
            reason = INTERRUPTED if not captured.complete else TOO_LARGE
            log.info(
                "oncely.http: the response (status %s) was %s; it is kept as not replayable, "
                "so a retry gets 409 instead of running again",
                captured.status,
                "cut short" if reason == INTERRUPTED else f"over {policy.max_stored_body} bytes",
            )
            yield from _complete(
                policy, key, fence, encode_unreplayable(captured.status, reason), UNREPLAYABLE
            )
        else:
            yield from _release(key, fence)
    if verdict is _Verdict.RELEASE and use is not None:
        yield from _release_token(use)
    if captured.error is not None:
        raise captured.error


@functools.lru_cache(maxsize=64)
def _marker(status: int) -> Callable[..., tuple[bytes, str]]:
    """The not-replayable record kept for a response of ``status`` that the store refused for
    its size (one function per status, made once: nothing allocated per request)."""

    def marker(_: object = None) -> tuple[bytes, str]:
        return encode_unreplayable(status, TOO_LARGE), UNREPLAYABLE

    return marker


def _issue_flow(engine: Engine, request: HttpRequest) -> Flow:
    guard = engine.config.tokens
    assert guard is not None
    base = engine.config.problem_base
    if request.method not in ("GET", "POST"):
        yield Respond(
            problem_response(
                METHOD_NOT_ALLOWED,
                "the token endpoint answers GET and POST",
                base=base,
                headers=[(b"allow", b"GET, POST")],
            )
        )
        return
    purpose = purpose_from_query(request.query)
    if not purpose or (guard.purposes is not None and purpose not in guard.purposes):
        known = sorted(guard.purposes) if guard.purposes is not None else None
        yield Respond(
            problem_response(
                TOKEN_PURPOSE_UNKNOWN,
                "ask for a token with ?purpose=<purpose>"
                + (f"; known purposes: {known}" if known is not None else ""),
                base=base,
            )
        )
        return
    # The purpose is the client's (any purpose when TokenGuard(purposes=None)): what Tokens
    # refuses as the server's mistake is the client's here, so it is answered with a 400.
    wrong = text_problem(purpose)
    if wrong is None and len(purpose.encode("utf-8")) > MAX_PURPOSE:
        wrong = f"is longer than {MAX_PURPOSE} bytes"
    if wrong is not None:
        yield Respond(
            problem_response(
                TOKEN_PURPOSE_UNKNOWN, f"the purpose {purpose[:60]!r} {wrong}", base=base
            )
        )
        return
    subject = _subject_of(engine, request)
    wrong = text_problem(subject)
    if wrong is not None:
        yield Respond(problem_response(TOKEN_SUBJECT_INVALID, f"the subject {wrong}", base=base))
        return
    ttl = guard.ttl if guard.ttl is not None else guard.tokens.default_ttl
    try:
        token = yield IssueToken(subject, purpose, ttl)
    except StoreError as exc:
        yield Respond(
            problem_response(
                STORE_UNAVAILABLE,
                f"cannot read the store clock: {type(exc).__name__}",
                base=base,
                headers=[(b"retry-after", str(engine.config.retry_after).encode("ascii"))],
            )
        )
        return
    yield Respond(issued_response(token, purpose, ttl))


# -- helpers ---------------------------------------------------------------------------------------
def _in_flight(policy: RoutePolicy, header_name: str) -> Respond:
    """409: the first request with this key is still running (or the store stayed locked
    until the wait for it ended)."""
    return _problem(
        policy,
        IN_FLIGHT,
        f"the first request with this {header_name} is still running; retry after "
        f"{policy.retry_after}s to get its response",
        headers=[(b"retry-after", str(policy.retry_after).encode("ascii"))],
    )


def _problem(policy: RoutePolicy, kind: ProblemType, detail: str, **extra: Any) -> Respond:
    return Respond(problem_response(kind, detail, base=policy.problem_base, **extra))


def _scope_of(policy: RoutePolicy, request: HttpRequest) -> str:
    if policy.scope is None:
        return policy.namespace + ":"
    value = policy.scope(request)
    return f"{policy.namespace}:{'' if value is None else value}"


def _subject_of(engine: Engine, request: HttpRequest) -> str:
    function = engine.subject
    if function is None:  # GLOBAL
        return ""
    value = function(request)
    return "" if value is None else str(value)


def _failure(policy: RoutePolicy, captured: Captured) -> Captured:
    """The 500 kept for a handler that raised before it started a response (or whose
    exception the framework answered with its own 500 page): its effects may have happened,
    so a retry gets this (``handler-failed``) instead of running it again. The exception
    itself is not described (it may hold secrets); it is still raised to the server."""
    response = problem_response(
        HANDLER_FAILED,
        "the handler failed after it started; its effects may have happened, so this result is "
        "kept for the Idempotency-Key and a retry with it does not run the handler again",
        base=policy.problem_base,
    )
    return Captured(500, response.headers, response.body, True, True, captured.error)


def _verdict(policy: RoutePolicy, captured: Captured) -> _Verdict:
    """Store, mark or release (see the module docstring). Decided from the status line and
    whether the handler ran, never from how the body transfer ended: once a storable response
    started, the work is done and the key must not be run again."""
    status = captured.status
    if status == 0 or not captured.handled:
        return _Verdict.RELEASE
    if status in policy.transient_statuses:
        return _Verdict.RELEASE
    if status >= 500 and not policy.store_server_errors:
        return _Verdict.RELEASE
    if 400 <= status < 500 and not policy.store_client_errors:
        return _Verdict.RELEASE
    if not captured.complete or captured.body is None:
        return _Verdict.MARKER
    return _Verdict.STORE


def _replay(policy: RoutePolicy, record: Record) -> HttpResponse:
    """The stored status, headers and body exactly, plus the replay header: no framing header
    is added (the server frames the body as for any response), and a 1xx or 204 never carries
    ``Content-Length`` nor a body, a 304 no body (RFC 9110 §8.6, §15.4.5)."""
    detail = "the first response to this key was not kept"
    status = 0
    if record.codec == CODEC:
        try:
            stored = decode_response(record.result or b"")
        except SerializationError:
            log.error("oncely.http: a stored response cannot be decoded; answering 409")
        else:
            headers = list(stored.headers)
            body = stored.body
            if not body_allowed(stored.status):
                body = b""
                if stored.status != 304:
                    headers = [(n, v) for n, v in headers if n != b"content-length"]
            headers.append((policy.replay_header, b"true"))
            return HttpResponse(stored.status, headers, body)
    elif record.codec == UNREPLAYABLE:
        status, reason = decode_unreplayable(record.result or b"")
        why = (
            "its response was cut short (the client went away or the response failed while it "
            "was being sent)"
            if reason == INTERRUPTED
            else (
                f"its response was larger than max_stored_body ({policy.max_stored_body} "
                "bytes) or than the store can take"
            )
        )
        detail = (
            f"the request already ran (status {status}), but {why} and was not kept; it is "
            "not run again. Use a new key for a new operation"
        )
    extra: dict[str, Any] = {"original_status": status} if status else {}
    return problem_response(NOT_REPLAYABLE, detail, base=policy.problem_base, **extra)


def _unavailable(policy: RoutePolicy, exc: OncelyError) -> Respond:
    return Respond(
        problem_response(
            STORE_UNAVAILABLE,
            f"the idempotency store could not decide ({type(exc).__name__}); the request was "
            "not run. Retry later with the same key",
            base=policy.problem_base,
            headers=[(b"retry-after", str(policy.retry_after).encode("ascii"))],
        )
    )


def _token_refused(policy: RoutePolicy, exc: OncelyError) -> Respond:
    if isinstance(exc, TokenError):
        return Respond(problem_response(token_problem(exc), str(exc), base=policy.problem_base))
    return _unavailable(policy, exc)


def _release(key: RecordKey, fence: int) -> Flow:
    """Free the key (:func:`oncely.core.steps.release`); a failure is logged, never raised."""
    error = yield from steps.release(key, fence)
    if error is not None:
        log.warning(
            "oncely.http: could not release the key (%s); it frees itself when its lease runs out",
            error,
        )


def _release_token(use: TokenUse) -> Flow:
    try:
        yield ReleaseToken(use)
    except OncelyError as exc:
        log.warning("oncely.http: could not give the one-time token back (%s)", describe(exc))


def _complete(
    policy: RoutePolicy,
    key: RecordKey,
    fence: int,
    data: bytes,
    codec: str,
    marker: Callable[[ResultTooLarge], tuple[bytes, str]] | None = None,
) -> Flow:
    """Store the response (:func:`oncely.core.steps.complete`): retry briefly while the store
    is unreachable, then hand the completion to a background retry that keeps the key claimed
    (never released: the handler ran); a response too large for the store is kept as the
    not-replayable ``marker``. Never raises: the client gets its response either way."""
    try:
        down = yield from steps.complete(
            key, fence, data, codec, policy.ttl, policy.lease, "a response", marker=marker
        )
    except LeaseLost as exc:
        log.error(
            "oncely.http: the request ran but its key was lost before the response was "
            "stored (%s); another request may have run it too. Use a longer lease",
            describe(exc),
        )
        return
    except ResultTooLarge as exc:
        log.error(
            "oncely.http: the response is too large for the store (%s); it is kept as not "
            "replayable, so a retry gets 409 instead of running again",
            describe(exc),
        )
        return
    except OncelyError as exc:
        log.error("oncely.http: the response could not be stored: %s", describe(exc))
        return
    if down is not None:
        log.error(
            "oncely.http: the response could not be stored yet (%s); the key stays claimed "
            "while it is stored in the background (a retry meanwhile gets 409)",
            down,
        )
