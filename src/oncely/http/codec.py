"""Stored responses: which headers are kept, and the byte format of a stored response.

Never stored, so never replayed: ``Set-Cookie``/``Set-Cookie2`` (another client's session),
``Authorization``/``Proxy-Authorization``/``Proxy-Authenticate`` and ``WWW-Authenticate``
(credentials), the hop-by-hop headers of RFC 9110 §7.6.1 (``Connection``, ``Keep-Alive``,
``Proxy-Connection``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``) and any header
the response's ``Connection`` header names, the replay marker itself, and the configured
deny-list. Everything else — ``Location``, ``Content-Type``, ``ETag``, ``Cache-Control``, … —
comes back as it was.

Format ``http-response/1``: ``>HH`` status and header count, then per header ``>HI`` name and
value lengths followed by the bytes, then the body (byte-identical, as the handler sent it).
A response that cannot be replayed — larger than ``max_stored_body``, or cut short after it
started (client gone, stream failed) — is stored as ``http-unreplayable/1``: ``>H`` status and
one byte of reason (:data:`TOO_LARGE`, :data:`INTERRUPTED`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from oncely.errors import SerializationError
from oncely.http.messages import HttpResponse

__all__ = [
    "ALWAYS_DENIED",
    "CODEC",
    "INTERRUPTED",
    "TOO_LARGE",
    "UNREPLAYABLE",
    "decode_response",
    "decode_unreplayable",
    "encode_response",
    "encode_unreplayable",
    "storable_headers",
]

CODEC = "http-response/1"
UNREPLAYABLE = "http-unreplayable/1"

ALWAYS_DENIED: frozenset[bytes] = frozenset(
    {
        b"set-cookie",
        b"set-cookie2",
        b"authorization",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"www-authenticate",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_HEAD = struct.Struct(">HH")
_PAIR = struct.Struct(">HI")
_MARKER = struct.Struct(">HB")

#: Why a response was not kept: it was larger than ``max_stored_body``.
TOO_LARGE = 0
#: Why a response was not kept: it started but did not finish (client gone, stream failed).
INTERRUPTED = 1


def storable_headers(
    headers: Iterable[tuple[bytes, bytes]], deny: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """The headers of a response that may be stored and replayed (names lower-cased)."""
    kept: list[tuple[bytes, bytes]] = []
    named: set[bytes] | None = None  # what Connection headers name (hop-by-hop too)
    for raw_name, raw_value in headers:
        name = bytes(raw_name).lower()
        value = bytes(raw_value)
        if name == b"connection":
            named = named or set()
            named.update(token.strip().lower() for token in value.split(b","))
        if name not in deny:
            kept.append((name, value))
    if named:
        kept = [(n, v) for n, v in kept if n not in named]
    return kept


def encode_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The stored form of a response.

    :raises SerializationError: it does not fit the format (a header name over 64 KiB, more
        than 65,535 headers, a value over 4 GiB).
    """
    pair = _PAIR.pack
    try:
        parts = [_HEAD.pack(status, len(headers))]
        for name, value in headers:
            parts += (pair(len(name), len(value)), name, value)
    except struct.error as exc:
        raise SerializationError(f"the response does not fit {CODEC} ({exc})") from exc
    parts.append(body)
    return b"".join(parts)


def decode_response(data: bytes) -> HttpResponse:
    try:
        status, count = _HEAD.unpack_from(data)
        at = _HEAD.size
        headers = []
        for _ in range(count):
            name_len, value_len = _PAIR.unpack_from(data, at)
            at += _PAIR.size
            name = data[at : at + name_len]
            at += name_len
            value = data[at : at + value_len]
            at += value_len
            headers.append((name, value))
        if at > len(data):
            raise ValueError("truncated")
    except (struct.error, ValueError) as exc:
        raise SerializationError(f"stored response is not valid {CODEC}: {exc}") from exc
    return HttpResponse(status, headers, data[at:])


def encode_unreplayable(status: int, reason: int) -> bytes:
    return _MARKER.pack(status, reason)


def decode_unreplayable(data: bytes) -> tuple[int, int]:
    """``(status, reason)`` of a marker (``(0, TOO_LARGE)`` if unreadable)."""
    if len(data) == 2:  # written before the reason byte existed
        return int.from_bytes(data, "big"), TOO_LARGE
    try:
        status, reason = _MARKER.unpack_from(data)
    except struct.error:
        return 0, TOO_LARGE
    return int(status), int(reason)
