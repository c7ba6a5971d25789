"""Request fingerprints: what must be equal for a retry to count as the same request.

A key reused with a different fingerprint is refused with 422 (the draft's "same key, different
payload", draft-ietf-httpapi-idempotency-key-header-06 §2.4). The default,
:func:`request_fingerprint`, covers the method, the path, the query string and the body: a body
of a JSON media type by its parsed value, any other body byte for byte. :func:`json_fields`
covers the method, the path and chosen fields of a JSON body instead, so that other fields (a
client timestamp) do not count. Any callable ``(request, body) -> str`` works too; raise
:class:`~oncely.errors.InvalidPayload` from it to answer 400.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

from oncely.errors import ConfigurationError, InvalidPayload
from oncely.http.messages import HttpRequest, is_json_media_type

__all__ = ["FingerprintSpec", "Fingerprinter", "json_fields", "request_fingerprint", "resolve"]

Fingerprinter = Callable[[HttpRequest, bytes], str]
FingerprintSpec = Sequence[str] | Fingerprinter | None

_MISSING: Any = {"$oncely": "missing"}


def request_fingerprint(request: HttpRequest, body: bytes) -> str:
    """The default fingerprint: SHA-256 over method, path, query string and body.

    A non-empty body whose ``Content-Type`` is a JSON media type (``application/json``,
    ``application/*+json``) counts by its parsed value, together with the media type: member
    order, whitespace, string escapes (``"\\u0041"`` is ``"A"``) and number spelling (``1``,
    ``1.0``, ``1e0``) do not matter; duplicate member names are kept, in order, so
    ``{"a":1,"a":2}`` differs from ``{"a":2}``. Any other body counts byte for byte.

    :returns: 40 hex digits.
    :raises InvalidPayload: the body of a JSON media type is not JSON (the middleware answers
        400 ``request-body-invalid`` before anything runs).
    """
    media = request.content_type()
    if body.strip() and is_json_media_type(media):
        kind, payload = b"json " + media, canonical_json(body, media)
    else:
        kind, payload = b"bytes", body
    digest = hashlib.sha256()
    for part in (
        request.method.encode("latin-1"),
        request.path.encode("utf-8", "surrogateescape"),
        request.query,
        kind,
    ):
        digest.update(struct.pack(">I", len(part)))
        digest.update(part)
    digest.update(payload)
    return digest.hexdigest()[:40]


class _Canon(str):
    """A JSON value already in canonical text (a number, a constant, an object)."""

    __slots__ = ()


_PRECISE = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


def _number(text: str) -> _Canon:
    try:
        value = decimal.Decimal(text)
        value = decimal.Decimal(0) if value.is_zero() else value.normalize(_PRECISE)
    except (ArithmeticError, ValueError):  # pragma: no cover - json only hands over numbers
        return _Canon(text)
    return _Canon(str(value))


def _constant(text: str) -> _Canon:  # NaN, Infinity, -Infinity: not JSON, but Python reads them
    return _Canon(text)


def _encode(value: Any) -> str:
    if isinstance(value, _Canon):
        return value
    if isinstance(value, str):
        return json.dumps(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    return "[" + ",".join(_encode(item) for item in value) + "]"


def _object(pairs: list[tuple[str, Any]]) -> _Canon:
    ordered = sorted(pairs, key=lambda pair: pair[0])  # stable: duplicate names keep their order
    return _Canon("{" + ",".join(json.dumps(k) + ":" + _encode(v) for k, v in ordered) + "}")


def canonical_json(body: bytes, media: bytes = b"application/json") -> bytes:
    """One canonical text per JSON value (members sorted by name, numbers by value).

    :raises InvalidPayload: ``body`` is not JSON (or nests too deep).
    """
    try:
        value = json.loads(
            body,
            parse_float=_number,
            parse_int=_number,
            parse_constant=_constant,
            object_pairs_hook=_object,
        )
        return _encode(value).encode("ascii")
    except (ValueError, RecursionError) as exc:
        kind = media.decode("latin-1")
        raise InvalidPayload(f"the request body is not valid JSON ({kind}): {exc}") from None


def json_fields(*paths: str) -> Fingerprinter:
    """Fingerprint method, path and the values at dotted ``paths`` of a JSON object body.

    ``json_fields("amount", "customer.id", "items.0.sku")``; list items by index. A missing
    field counts as different from ``null``. A body that is not a JSON object gets 400.
    """
    if not paths or any(not isinstance(p, str) or not p for p in paths):
        raise ConfigurationError(
            "json_fields() takes one or more dotted field paths, e.g. json_fields('amount')"
        )
    split = [tuple(path.split(".")) for path in paths]

    def fingerprint(request: HttpRequest, body: bytes) -> str:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise InvalidPayload(
                f"the request body must be JSON to check fields {list(paths)}: {exc}"
            ) from None
        if not isinstance(doc, dict):
            raise InvalidPayload(
                f"the request body must be a JSON object to check fields {list(paths)}"
            )
        values = [_pick(doc, parts) for parts in split]
        text = json.dumps(
            [request.method, request.path, values], sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:40]

    return fingerprint


def _pick(doc: Any, parts: tuple[str, ...]) -> Any:
    value = doc
    for part in parts:
        if isinstance(value, dict):
            if part not in value:
                return _MISSING
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def resolve(spec: FingerprintSpec) -> Fingerprinter:
    """Turn a ``fingerprint=`` setting into a function."""
    if spec is None:
        return request_fingerprint
    if callable(spec):
        return spec
    if isinstance(spec, str):
        raise ConfigurationError(
            "fingerprint= takes a list of JSON field paths, e.g. fingerprint=['amount'], "
            "or a callable (request, body) -> str"
        )
    return json_fields(*spec)
