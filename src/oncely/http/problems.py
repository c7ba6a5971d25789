"""Error responses as ``application/problem+json`` (RFC 9457) with stable ``type`` URIs.

Every refusal of the middleware and the token guard is one of the :class:`ProblemType` values
below; ``type`` is ``problem_base + slug`` (``https://oncely.dev/problems/<slug>`` unless
configured). The slugs and statuses are part of the public API and are listed in
``docs/http.md``; clients should branch on ``type``, not on ``title`` or ``detail``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from oncely.errors import (
    HttpProblem,
    TokenError,
    TokenExpired,
    TokenForeign,
    TokenForged,
    TokenReused,
)
from oncely.http.messages import HttpResponse
from oncely.settings import SETTINGS

__all__ = [
    "BODY_INCOMPLETE",
    "BODY_INVALID",
    "BODY_LENGTH_REQUIRED",
    "BODY_TOO_LARGE",
    "HANDLER_FAILED",
    "IF_MATCH_INVALID",
    "IN_FLIGHT",
    "KEY_INVALID",
    "KEY_MISMATCH",
    "KEY_MISSING",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "NOT_REPLAYABLE",
    "PRECONDITION_FAILED",
    "PRECONDITION_REQUIRED",
    "PROBLEM_BASE",
    "PROBLEM_TYPES",
    "SCOPE_INVALID",
    "STORE_UNAVAILABLE",
    "TOKEN_EXPIRED",
    "TOKEN_FOREIGN",
    "TOKEN_FORGED",
    "TOKEN_MISSING",
    "TOKEN_PURPOSE_UNKNOWN",
    "TOKEN_REUSED",
    "TOKEN_SUBJECT_INVALID",
    "ProblemType",
    "body_allowed",
    "problem_response",
    "token_problem",
]

#: The default prefix of problem ``type`` URIs (``IdempotencyConfig(problem_base=)``).
PROBLEM_BASE: str = SETTINGS["http_problem_base"].default
CONTENT_TYPE = b"application/problem+json"


@dataclass(frozen=True, slots=True)
class ProblemType:
    """One kind of refusal: ``type`` is ``problem_base + slug``; ``status`` the HTTP status."""

    slug: str
    status: int
    title: str


KEY_MISSING = ProblemType("idempotency-key-missing", 400, "Idempotency-Key header is missing")
KEY_INVALID = ProblemType("idempotency-key-invalid", 400, "Idempotency-Key header is invalid")
#: The scope the server derived for the request (``scope_from_user``, a scope function) is text
#: no store keeps (a NUL, a lone surrogate, too long): the server's data, not the client's key.
SCOPE_INVALID = ProblemType(
    "idempotency-scope-invalid", 500, "The server cannot derive an idempotency scope"
)
KEY_MISMATCH = ProblemType(
    "idempotency-key-mismatch", 422, "Idempotency-Key was already used for a different request"
)
IN_FLIGHT = ProblemType(
    "request-in-flight", 409, "A request with this Idempotency-Key is still being processed"
)
NOT_REPLAYABLE = ProblemType(
    "response-not-replayable", 409, "The response for this Idempotency-Key cannot be replayed"
)
BODY_TOO_LARGE = ProblemType("request-body-too-large", 413, "Request body is too large")
BODY_INCOMPLETE = ProblemType("request-body-incomplete", 400, "Request body is incomplete")
BODY_INVALID = ProblemType("request-body-invalid", 400, "Request body cannot be fingerprinted")
BODY_LENGTH_REQUIRED = ProblemType(
    "request-length-required", 411, "Request body length is required (send Content-Length)"
)
STORE_UNAVAILABLE = ProblemType(
    "store-unavailable", 503, "Idempotency store is unavailable; nothing was done"
)
TOKEN_MISSING = ProblemType("token-missing", 400, "A one-time token is required")
TOKEN_FORGED = ProblemType("token-invalid", 403, "The one-time token is invalid")
TOKEN_FOREIGN = ProblemType(
    "token-foreign", 403, "The one-time token belongs to another user, purpose or token scope"
)
TOKEN_EXPIRED = ProblemType("token-expired", 403, "The one-time token has expired")
TOKEN_REUSED = ProblemType("token-reused", 409, "The one-time token was already used")
TOKEN_PURPOSE_UNKNOWN = ProblemType(
    "token-purpose-unknown", 400, "Tokens are not issued for this purpose"
)
TOKEN_SUBJECT_INVALID = ProblemType(
    "token-subject-invalid", 400, "The request's subject cannot hold a one-time token"
)
METHOD_NOT_ALLOWED = ProblemType("method-not-allowed", 405, "Method not allowed")
HANDLER_FAILED = ProblemType("handler-failed", 500, "The handler failed")
# conditional requests (oncely.http.conditional): RFC 9110 §13.1.1, RFC 6585 §3
PRECONDITION_FAILED = ProblemType("precondition-failed", 412, "Precondition Failed")
PRECONDITION_REQUIRED = ProblemType("precondition-required", 428, "Precondition Required")
IF_MATCH_INVALID = ProblemType("if-match-invalid", 400, "If-Match header is invalid")
NOT_FOUND = ProblemType("not-found", 404, "Not Found")

PROBLEM_TYPES: tuple[ProblemType, ...] = (
    KEY_MISSING,
    KEY_INVALID,
    SCOPE_INVALID,
    KEY_MISMATCH,
    IN_FLIGHT,
    NOT_REPLAYABLE,
    BODY_TOO_LARGE,
    BODY_INCOMPLETE,
    BODY_INVALID,
    BODY_LENGTH_REQUIRED,
    STORE_UNAVAILABLE,
    TOKEN_MISSING,
    TOKEN_FORGED,
    TOKEN_FOREIGN,
    TOKEN_EXPIRED,
    TOKEN_REUSED,
    TOKEN_PURPOSE_UNKNOWN,
    TOKEN_SUBJECT_INVALID,
    METHOD_NOT_ALLOWED,
    HANDLER_FAILED,
    PRECONDITION_FAILED,
    PRECONDITION_REQUIRED,
    IF_MATCH_INVALID,
    NOT_FOUND,
)


def problem_response(
    kind: ProblemType,
    detail: str,
    *,
    base: str = PROBLEM_BASE,
    headers: Iterable[tuple[bytes, bytes]] = (),
    **extra: object,
) -> HttpResponse:
    """An ``application/problem+json`` response of ``kind``; ``extra`` adds members."""
    return _render(kind.status, base + kind.slug, kind.title, detail, headers, extra)


#: Headers oncely sets itself on a problem; the same names from application code are dropped.
_OWN_HEADERS = frozenset({b"content-type", b"content-length", b"transfer-encoding"})


def from_exception(exc: HttpProblem, base: str = PROBLEM_BASE) -> HttpResponse:
    """The response for an :class:`~oncely.errors.HttpProblem` raised by application code
    (its ``Content-Type``/``Content-Length``/``Transfer-Encoding`` headers are oncely's)."""
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers]
    headers = [(k, v) for k, v in headers if k not in _OWN_HEADERS]
    return _render(exc.status, base + exc.slug, exc.title, exc.detail, headers, exc.extra)


def body_allowed(status: int) -> bool:
    """False for 1xx, 204 and 304: responses that end after their header section and carry
    no ``Content-Length`` (1xx, 204) or only the length a 200 would have had (304)
    (RFC 9110 §6.4.1, §8.6, §15.4.5)."""
    return status >= 200 and status not in (204, 304)


def token_problem(exc: TokenError) -> ProblemType:
    """The problem type answering a refused token."""
    if isinstance(exc, TokenReused):
        return TOKEN_REUSED
    if isinstance(exc, TokenExpired):
        return TOKEN_EXPIRED
    if isinstance(exc, TokenForeign):
        return TOKEN_FOREIGN
    if isinstance(exc, TokenForged):
        return TOKEN_FORGED
    return TOKEN_FORGED


def _render(
    status: int,
    type_uri: str,
    title: str,
    detail: str,
    headers: Iterable[tuple[bytes, bytes]],
    extra: dict[str, object],
) -> HttpResponse:
    if not body_allowed(status):
        return HttpResponse(status, [(b"cache-control", b"no-store"), *headers], b"")
    doc: dict[str, object] = {"type": type_uri, "title": title, "status": status, "detail": detail}
    for name, value in extra.items():
        doc.setdefault(name, value)
    body = json.dumps(doc, separators=(",", ":"), default=str).encode("utf-8")
    out = [
        (b"content-type", CONTENT_TYPE),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
    ]
    out.extend(headers)
    return HttpResponse(status, out, body)
