"""Request fingerprints: what must be equal for a retry to count as the same request.

A key reused with a different fingerprint is refused with 422 (the draft's "same key, different
payload", draft-ietf-httpapi-idempotency-key-header-06 §2.4). The default,
:func:`request_fingerprint`, covers the method, the path, the query string and the body: a body
of a JSON media type by its parsed value, a ``multipart/form-data`` body by its parts (so a
client that draws a new boundary for every send, as HTTPX does, still sends the same request),
any other body byte for byte. :func:`json_fields`
covers the method, the path and chosen fields of a JSON body instead, so that other fields (a
client timestamp) do not count. Any callable ``(request, body) -> str`` works too; raise
:class:`~oncely.errors.InvalidPayload` from it to answer 400.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import operator
import struct
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii  # what json.dumps(str) calls, minus its checks
from typing import Any

from oncely.core.records import sha256
from oncely.errors import ConfigurationError, InvalidPayload
from oncely.http.messages import HttpRequest, is_json_media_type

__all__ = ["FingerprintSpec", "Fingerprinter", "json_fields", "request_fingerprint", "resolve"]

Fingerprinter = Callable[[HttpRequest, bytes], str]
FingerprintSpec = Sequence[str] | Fingerprinter | None

_MISSING: Any = object()
_LENGTH = struct.Struct(">I")
#: Payloads up to this many bytes are hashed with :func:`oncely.core.records.sha256` (no
#: OpenSSL context to set up); larger ones with OpenSSL's (faster per byte). Same digest.
_SMALL = 4096


def request_fingerprint(request: HttpRequest, body: bytes) -> str:
    """The default fingerprint: SHA-256 over method, path, query string and body.

    A non-empty body whose ``Content-Type`` is a JSON media type (``application/json``,
    ``application/*+json``) counts by its parsed value, together with the media type: member
    order, whitespace, string escapes (``"\\u0041"`` is ``"A"``) and number spelling (``1``,
    ``1.0``, ``1e0``) do not matter; duplicate member names are kept, in order, so
    ``{"a":1,"a":2}`` differs from ``{"a":2}``. Numbers count by exact decimal value (never
    through a float). A well-formed ``multipart/form-data`` body (RFC 7578) counts by its
    parts, in order: each part's header fields (names case-insensitive, values exact) and its
    content byte for byte; the boundary and the epilogue do not count (parsed with
    ``python-multipart``, which Starlette uses; installed with ``oncely[http]``). Any other
    body, and a multipart body that does not parse (or has a preamble), counts byte for byte.

    :returns: 40 hex digits.
    :raises InvalidPayload: the body of a JSON media type is not JSON, holds ``NaN`` or
        ``Infinity`` (not JSON, RFC 8259 §6) or a number whose exponent is out of range (the
        middleware answers 400 ``request-body-invalid`` before anything runs).
    """
    media = request.content_type()
    parts: bytes | None = None
    if body.strip() and is_json_media_type(media):
        kind, payload = b"json " + media, canonical_json(body, media)
    elif media == b"multipart/form-data" and (parts := _multipart_parts(request, body)):
        kind, payload = b"multipart " + media, parts
    else:
        kind, payload = b"bytes", body
    method = request.method.encode("latin-1")
    path = request.path.encode("utf-8", "surrogateescape")
    query = request.query
    pack = _LENGTH.pack
    # Each part length-prefixed (>I), then the payload; one update for the small parts.
    digest = (sha256 if len(payload) <= _SMALL else hashlib.sha256)(
        b"".join(
            (
                pack(len(method)),
                method,
                pack(len(path)),
                path,
                pack(len(query)),
                query,
                pack(len(kind)),
                kind,
            )
        )
    )
    digest.update(payload)
    return digest.hexdigest()[:40]


def _multipart_parts(request: HttpRequest, body: bytes) -> bytes | None:
    """The parts of a ``multipart/form-data`` body, each length-prefixed: its number of header
    fields, each field's lower-cased name and value, then its content. None if the body does
    not parse (no boundary, no closing delimiter, a malformed part) or ``python-multipart`` is
    not installed: the body then counts byte for byte."""
    try:
        from python_multipart.exceptions import MultipartParseError
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # pragma: no cover - installed with oncely[http]
        return None
    header = next((v for k, v in request.headers if k == b"content-type"), b"")
    boundary = parse_options_header(header)[1].get(b"boundary")
    if not boundary:
        return None
    out: list[bytes] = []
    fields: list[tuple[bytes, bytes]] = []
    name: list[bytes] = []
    value: list[bytes] = []
    content: list[bytes] = []
    ended = False

    def field(data: bytes, start: int, end: int) -> None:
        name.append(data[start:end])

    def field_value(data: bytes, start: int, end: int) -> None:
        value.append(data[start:end])

    def field_end() -> None:
        fields.append((b"".join(name).lower(), b"".join(value)))
        name.clear()
        value.clear()

    def part_data(data: bytes, start: int, end: int) -> None:
        content.append(data[start:end])

    def part_end() -> None:
        out.append(_LENGTH.pack(len(fields)))
        for key, text in fields:
            out.extend((_LENGTH.pack(len(key)), key, _LENGTH.pack(len(text)), text))
        data = b"".join(content)
        out.extend((_LENGTH.pack(len(data)), data))
        fields.clear()
        content.clear()

    def end() -> None:
        nonlocal ended
        ended = True

    callbacks: Any = {
        "on_header_field": field,
        "on_header_value": field_value,
        "on_header_end": field_end,
        "on_part_data": part_data,
        "on_part_end": part_end,
        "on_end": end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError):
        return None
    return b"".join(out) if ended and out else None


class _Canon(str):
    """A JSON value already in canonical text (a number, a constant, an object)."""

    __slots__ = ()


class _Object(list[tuple[str, Any]]):
    """A parsed JSON object: its members in document order (duplicate names kept)."""

    __slots__ = ()


_PRECISE = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.Overflow, decimal.InvalidOperation],
)


def _integer(text: str) -> _Canon:
    """A JSON integer by value (:func:`_number`). An integer not ending in 0 is already its
    own canonical text (JSON has no leading zeros and ``-0`` ends in 0), so only one ending in
    0 (``10`` is ``1E+1``, ``-0`` is ``0``) goes through :mod:`decimal`."""
    if text[-1] != "0":
        return _Canon(text)
    return _number(text)


def _number(text: str) -> _Canon:
    """A JSON number by value: ``1``, ``1.0``, ``1e0`` and ``10e-1`` give ``1``.

    :raises ValueError: the exponent is beyond what any decoder can hold (about 10**18).
    """
    try:
        value = _PRECISE.create_decimal(text)
        value = decimal.Decimal(0) if value.is_zero() else value.normalize(_PRECISE)
    except ArithmeticError:
        raise ValueError(f"the number {text[:40]!r} is out of range") from None
    return _Canon(str(value))


def _constant(text: str) -> _Canon:
    raise ValueError(f"{text} is not a JSON value (RFC 8259 §6 has no NaN or Infinity)")


_NAME = operator.itemgetter(0)


def _encode(value: Any) -> str:
    kind = type(value)  # the parser's own types first, by identity (the common case)
    if kind is _Canon:
        return value  # type: ignore[no-any-return]
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is _Object:
        return _encode_object(value)
    if isinstance(value, _Canon):
        return value
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, _Object):
        return _encode_object(value)
    return "[" + ",".join([_encode(item) for item in value]) + "]"


def _encode_object(value: _Object) -> str:
    ordered = sorted(value, key=_NAME)  # stable: duplicates keep their order
    # The parser's canonical values and strings inline (what _encode does first), the rest
    # through _encode.
    return (
        "{"
        + ",".join(
            [
                encode_basestring_ascii(k)
                + ":"
                + (
                    v
                    if type(v) is _Canon
                    else encode_basestring_ascii(v)
                    if type(v) is str
                    else _encode(v)
                )
                for k, v in ordered
            ]
        )
        + "}"
    )


#: One decoder for every body (``json.loads`` with hooks builds a new one per call); a
#: decoder holds only its settings, so threads share it as they share ``json.loads``'s own.
_DECODER = json.JSONDecoder(
    parse_float=_number,
    parse_int=_integer,
    parse_constant=_constant,
    object_pairs_hook=_Object,
)

#: The decoder's scanner: ``decode()`` is it plus whitespace checks and error wrapping.
_SCAN: Callable[[str, int], tuple[Any, int]] = getattr(_DECODER, "scan_once")  # noqa: B009 - not in the stubs


def _parse(body: bytes) -> Any:
    """The JSON value of ``body``: numbers as canonical text, objects as :class:`_Object`
    (read as :func:`json.loads` reads bytes: UTF-8, -16 or -32 by its first bytes).

    :raises ValueError: not JSON, NaN/Infinity, or a number out of range.
    :raises RecursionError: nested too deep.
    """
    # An ASCII first byte other than NUL and a second byte other than NUL: json.detect_encoding
    # says UTF-8 (every BOM and every UTF-16/32 form has a NUL or a non-ASCII byte there).
    if body and 0 < body[0] < 0x80 and body[1:2] != b"\x00":
        text = body.decode("utf-8", "surrogatepass")
        if text[0] in "{[":  # no leading whitespace: the scanner alone, if it reads it all
            try:
                value, end = _SCAN(text, 0)
            except Exception:  # decode() below raises the proper error
                pass
            else:
                if end == len(text):
                    return value
        return _DECODER.decode(text)
    return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))


def canonical_json(body: bytes, media: bytes = b"application/json") -> bytes:
    """One canonical text per JSON value (members sorted by name, numbers by value).

    :raises InvalidPayload: ``body`` is not JSON (or nests too deep, or holds ``NaN``,
        ``Infinity`` or a number whose exponent is out of range).
    """
    try:
        return _encode(_parse(body)).encode("ascii")
    except (ValueError, RecursionError) as exc:
        kind = media.decode("latin-1")
        raise InvalidPayload(f"the request body is not valid JSON ({kind}): {exc}") from None


def json_fields(*paths: str) -> Fingerprinter:
    """Fingerprint method, path and the values at dotted ``paths`` of a JSON object body.

    ``json_fields("amount", "customer.id", "items.0.sku")``; list items by index. Values count
    as JSON values, as :func:`request_fingerprint` counts a body: ``1``, ``1.0`` and ``1e0``
    are one number, ``{"a":1,"b":2}`` and ``{"b":2,"a":1}`` one object. A missing field counts
    as different from ``null``.

    :raises InvalidPayload: (the middleware answers 400 ``request-body-invalid``) the body is
        not a JSON object, holds ``NaN``/``Infinity`` or a number out of range, or a member on
        a chosen path appears twice (which one the application reads depends on its parser).
    """
    if not paths or any(not isinstance(p, str) or not p for p in paths):
        raise ConfigurationError(
            "json_fields() takes one or more dotted field paths, e.g. json_fields('amount')"
        )
    split = [tuple(path.split(".")) for path in paths]

    def fingerprint(request: HttpRequest, body: bytes) -> str:
        try:
            doc = _parse(body)
        except (ValueError, RecursionError) as exc:
            raise InvalidPayload(
                f"the request body must be JSON to check fields {list(paths)}: {exc}"
            ) from None
        if not isinstance(doc, _Object):
            raise InvalidPayload(
                f"the request body must be a JSON object to check fields {list(paths)}"
            )
        digest = hashlib.sha256()
        for part in (request.method, request.path):
            digest.update(json.dumps(part).encode("utf-8", "surrogateescape") + b"\n")
        for path, parts in zip(paths, split):
            value = _pick(doc, parts, path)
            digest.update((_MISSING_TEXT if value is _MISSING else _encode(value)).encode())
            digest.update(b"\n")
        return digest.hexdigest()[:40]

    return fingerprint


_MISSING_TEXT = "-"  # no JSON value is this text


def _pick(doc: Any, parts: tuple[str, ...], path: str) -> Any:
    value = doc
    for part in parts:
        if isinstance(value, _Object):
            found = [v for name, v in value if name == part]
            if not found:
                return _MISSING
            if len(found) > 1:
                raise InvalidPayload(
                    f"the request body has member {part!r} (on the path {path!r}) more than "
                    "once; send each member once (RFC 8259 §4: names SHOULD be unique)"
                )
            value = found[0]
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
