"""Request fingerprints: what must be equal for a retry to count as the same request.

A key reused with a different fingerprint is refused with 422 (the draft's "same key, different
payload"). The default, :func:`request_fingerprint`, covers the method, the path, the query
string and the body bytes. :func:`json_fields` covers the method, the path and chosen fields of
a JSON body instead, so that irrelevant differences (key order, whitespace, a client timestamp)
do not count. Any callable ``(request, body) -> str`` works too; raise
:class:`~oncely.errors.InvalidPayload` from it to answer 400.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from oncely.errors import ConfigurationError, InvalidPayload
from oncely.http.messages import HttpRequest

__all__ = ["FingerprintSpec", "Fingerprinter", "json_fields", "request_fingerprint", "resolve"]

Fingerprinter = Callable[[HttpRequest, bytes], str]
FingerprintSpec = Sequence[str] | Fingerprinter | None

_MISSING: Any = {"$oncely": "missing"}


def request_fingerprint(request: HttpRequest, body: bytes) -> str:
    """SHA-256 over method, path, query string and body (the default)."""
    digest = hashlib.sha256(request.method.encode("latin-1"))
    digest.update(b"\x00")
    digest.update(request.path.encode("utf-8", "surrogateescape"))
    digest.update(b"\x00")
    digest.update(request.query)
    digest.update(b"\x00")
    digest.update(body)
    return digest.hexdigest()[:40]


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
