"""What every shop endpoint shares: problem+json answers (RFC 9457) and strict request parsing.

Bad input never reaches the business code: :func:`json_body` and :func:`integer` turn malformed
JSON, a missing field, a wrong type, a negative or huge number into a :class:`Problem`, which
:func:`problem_handler` answers as ``application/problem+json``; any other exception becomes a
500 problem (never a traceback). Problem ``type`` URIs share oncely's base
(:data:`oncely.http.PROBLEM_BASE`) so a client branches on one vocabulary.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from oncely.errors import HttpProblem, StoreError
from oncely.http import PROBLEM_BASE

__all__ = [
    "MAX_AMOUNT",
    "Problem",
    "caller",
    "customer_of",
    "integer",
    "json_body",
    "path_id",
    "problem_handler",
    "problem_response",
    "text",
]

log = logging.getLogger("oncely.demo.shop")

#: The largest amount (cents) or quantity the shop accepts; larger is a 422, not an overflow.
MAX_AMOUNT = 10**9
MAX_BODY = 64 * 1024


class Problem(HttpProblem):
    """A problem answer: ``Problem(404, "order-not-found", "Unknown order", "…")``."""


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    headers: tuple[tuple[str, str], ...] = (),
    **extra: object,
) -> Response:
    body: dict[str, object] = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
    }
    body.update(extra)
    response = Response(
        json.dumps(body).encode(),
        status_code=status,
        media_type="application/problem+json",
        headers={"Cache-Control": "no-store"},
    )
    for name, value in headers:
        response.headers[name] = value
    return response


async def problem_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: :class:`HttpProblem` as itself, anything else as 500."""
    if isinstance(exc, HttpProblem):
        return problem_response(
            exc.status, exc.slug, exc.title, exc.detail, exc.headers, **exc.extra
        )
    if isinstance(exc, StoreError):
        # oncely's store is down (fail closed: nothing decided): a 503 the client retries, one
        # log line, not a 500 with a traceback per request.
        log.warning("oncely's store is unavailable on %s %s: %s", request.method,
                    request.url.path, exc)  # fmt: skip
        return problem_response(
            503, "store-unavailable", "Store unavailable", "oncely's store cannot be reached; "
            "nothing was done, retry later", (("Retry-After", "1"),),
        )  # fmt: skip
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return problem_response(500, "internal-error", "Internal error", type(exc).__name__)


async def json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413/415 :class:`Problem`."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype.lower() not in ("application/json", "") and not ctype.lower().endswith("+json"):
        raise Problem(415, "unsupported-media-type", "Send JSON", f"content type {ctype!r}")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise Problem(413, "request-body-too-large", "Body too large", f"limit {MAX_BODY} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise Problem(400, "malformed-json", "Malformed JSON", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise Problem(400, "malformed-json", "Malformed JSON", "the body must be a JSON object")
    return data


def _missing(name: str) -> Problem:
    return Problem(422, "field-missing", "Missing field", f"{name!r} is required", field=name)


def integer(body: dict[str, Any], name: str, low: int = 1, high: int = MAX_AMOUNT) -> int:
    """Field ``name`` as an int in ``[low, high]`` (booleans and floats refused)."""
    if name not in body:
        raise _missing(name)
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise Problem(
            422, "field-invalid", "Invalid field", f"{name!r} must be an integer", field=name
        )
    if not low <= value <= high:
        raise Problem(
            422,
            "field-out-of-range",
            "Out of range",
            f"{name!r} must be between {low} and {high}",
            field=name,
        )
    return value


def text(body: dict[str, Any], name: str, max_length: int = 100) -> str:
    """Field ``name`` as a non-empty printable string of at most ``max_length`` characters."""
    if name not in body:
        raise _missing(name)
    value = body[name]
    if (
        not isinstance(value, str)
        or not value
        or len(value) > max_length
        or not value.isprintable()
    ):
        raise Problem(
            422,
            "field-invalid",
            "Invalid field",
            f"{name!r} must be a string of 1-{max_length} printable characters",
            field=name,
        )
    return value


def customer_of(authorization: str | None) -> str | None:
    """The customer named by an ``Authorization: Bearer <customer>`` value (None when absent
    or malformed).

    The demo's stand-in for authentication: the bearer value *is* the customer id. It is the
    idempotency scope (keys of different customers never meet) and a token's subject.
    """
    if not authorization:
        return None
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or len(credential) > 100:
        return None
    if not credential.isprintable():
        return None
    return credential


def caller(request: Request) -> str | None:
    """The authenticated customer of ``request``: None without ``Authorization``, a 401
    :class:`Problem` when the header is there but malformed."""
    value = request.headers.get("authorization")
    if value is None:
        return None
    who = customer_of(value)
    if who is None:
        raise Problem(401, "unauthorized", "Unauthorized", "use Authorization: Bearer <customer>")
    return who


def path_id(request: Request, name: str) -> str:
    value = str(request.path_params.get(name, ""))
    if not value or len(value) > 100 or not value.isprintable():
        raise Problem(404, "not-found", "Not found", f"no such {name}")
    return value
