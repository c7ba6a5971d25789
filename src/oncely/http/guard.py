"""One-time tokens over HTTP: where a request carries its token, and the issuing endpoint.

Shared by the middleware option (:class:`~oncely.http.config.TokenGuard`) and the framework
helpers (FastAPI dependency, Flask and Django decorators), so every face finds tokens and
answers refusals the same way (problem types ``token-*`` in ``docs/http.md``).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from oncely.http.messages import HttpResponse

__all__ = ["find_token", "issued_response", "purpose_from_query"]

_FORM = b"application/x-www-form-urlencoded"


def find_token(
    header_value: bytes | str | None, content_type: bytes, body: bytes, field: str | None
) -> str | None:
    """The token from the header, else from a form field or a top-level JSON member, as sent:
    never cut to a length (:meth:`~oncely.tokens.Tokens.verify` refuses an over-long one as
    not a token, instead of checking a prefix of it)."""
    if header_value:
        raw = header_value.encode("latin-1") if isinstance(header_value, str) else header_value
        text = raw.strip().decode("latin-1")
        return text if text else None
    if field is None or not body:
        return None
    if content_type == _FORM:
        try:
            values = parse_qs(body.decode("latin-1"), max_num_fields=1000).get(field)
        except ValueError:
            return None
        return values[0] if values else None
    if content_type == b"application/json" or content_type.endswith(b"+json"):
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            return None
        value = doc.get(field) if isinstance(doc, dict) else None
        return value if isinstance(value, str) and value else None
    return None


def purpose_from_query(query: bytes) -> str | None:
    try:
        values = parse_qs(query.decode("latin-1"), max_num_fields=100).get("purpose")
    except ValueError:
        return None
    return values[0] if values else None


def issued_response(token: str, purpose: str, ttl: float) -> HttpResponse:
    """The issuing endpoint's answer: JSON, never cached."""
    body = json.dumps(
        {"token": token, "purpose": purpose, "expires_in": ttl}, separators=(",", ":")
    ).encode("utf-8")
    return HttpResponse(
        200,
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
        ],
        body,
    )
