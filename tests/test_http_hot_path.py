"""The keyed request's hot path gives what the general code gives.

The ASGI middleware's first execution of a key takes shortcuts (issue 13: server CPU per
request): a JSON body is read by the scanner alone when nothing but the value is in it, short
inputs are hashed with Python's own SHA-256, the headers kept with a response are picked in one
pass, a body that arrives in one message is taken as it is, and the Redis auto-pipeline hands
out a plain future. Each shortcut must give exactly what the general code gives: the same
canonical text and errors, the same digests (pinned), the same stored bytes, the same answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from typing import Any

import pytest

from oncely.core.records import digest_key
from oncely.errors import InvalidPayload
from oncely.http import GLOBAL, HttpRequest, IdempotencyConfig, IdempotencyMiddleware, json_fields
from oncely.http.codec import ALWAYS_DENIED, encode_response, storable_headers
from oncely.http.fingerprint import _DECODER, _encode, canonical_json, request_fingerprint
from oncely.stores.memory import MemoryStore
from test_redteam import _asgi_scope

pytestmark = pytest.mark.timeout(60)

JSON = [(b"content-type", b"application/json")]

#: Bodies around the scanner-only path: whole values, values with something before or after
#: them, other encodings, and what is not JSON at all.
BODIES = [
    b'{"item": "book", "quantity": 1}',
    b'[1, 2.50, -0, 1e2, "\\u00e9", null, true, false, {"b": 1, "a": [{}]}]',
    b' {"a": 1}',  # leading whitespace
    b'{"a": 1}\n',  # trailing whitespace
    b'{"a": 1} x',  # extra data
    b'{"a": 1}{"b": 2}',
    b'{"a": 1',  # cut short
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": 1e99999999999999999999}',
    b'{"a": "\\ud800"}',  # a lone surrogate, escaped
    b'{"a": "caf\xc3\xa9"}',  # raw UTF-8
    b'{"a": "\xff"}',  # not UTF-8
    b"\xef\xbb\xbf" + b'{"a": 1}',  # UTF-8 with a BOM
    '{"a": 1}'.encode("utf-16"),  # with its BOM
    '{"a": 1}'.encode("utf-16-le"),
    '{"a": 1}'.encode("utf-16-be"),
    '{"a": 1}'.encode("utf-32"),
    b"[" * 100_000 + b"]" * 100_000,  # nested too deep
    b"[]",
    b"{}",
    b'"just a string"',
    b"12",
    b"",  # json_fields reads an empty body too
    b" ",
    b"\x00",
]


def _general(body: bytes) -> bytes:
    """canonical_json as it was written before the scanner-only path."""
    try:
        value = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
        return _encode(value).encode("ascii")
    except (ValueError, RecursionError) as exc:
        raise InvalidPayload(
            f"the request body is not valid JSON (application/json): {exc}"
        ) from None


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_canonical_json_is_what_the_general_decoder_gives(body: bytes) -> None:
    try:
        expected: bytes | str = _general(body)
    except InvalidPayload as exc:
        expected = f"error: {exc}"
    try:
        got: bytes | str = canonical_json(body)
    except InvalidPayload as exc:
        got = f"error: {exc}"
    assert got == expected


#: Fingerprints of bodies over the short-input size (hashed with OpenSSL's SHA-256), as
#: earlier versions computed them.
LARGE = [
    (
        ("POST", "/bulk", b"application/json"),
        b'{"items": [' + b", ".join(str(i).encode() for i in range(2000)) + b'], "note": "x"}',
        "e1ab8b852a441e4c30c63b670b2066abca1c75b6",
    ),
    (
        ("PUT", "/blob", b"application/octet-stream"),
        b"\x00" * 5000,
        "24ef5c228bba6f0b6420ad988a6dabc0a162b619",
    ),
]


@pytest.mark.parametrize("body", [b"", b" ", b"[1]", b'{"amount": 1}x'])
def test_json_fields_refuse_what_is_not_a_json_object(body: bytes) -> None:
    """An empty body too: 400 request-body-invalid, never an IndexError (a 500)."""
    with pytest.raises(InvalidPayload):
        json_fields("amount")(HttpRequest("POST", "/orders", b"", JSON), body)


@pytest.mark.parametrize(("line", "body", "expected"), LARGE)
def test_large_bodies_keep_their_fingerprints(
    line: tuple[str, str, bytes], body: bytes, expected: str
) -> None:
    method, path, media = line
    request = HttpRequest(method, path, b"", [(b"content-type", media)])
    assert request_fingerprint(request, body) == expected


@pytest.mark.parametrize("key", ["a", "8e03978e-40d5-43e8-9f6b-0f5d6c3b2a10", "é" * 200, "\ud800x"])
def test_the_key_digest_is_sha256(key: str) -> None:
    expected = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    assert digest_key(key) == expected


def _storable_before(
    headers: list[tuple[bytes, bytes]], deny: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """storable_headers as it was written before the one-pass version."""
    pairs = [(bytes(name).lower(), bytes(value)) for name, value in headers]
    named = {
        token.strip().lower()
        for name, value in pairs
        if name == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in pairs if n not in deny and n not in named]


HEADER_SETS = [
    [(b"content-type", b"application/json"), (b"content-length", b"7")],
    [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"s=1"), (b"X-Secret", b"1")],
    [(b"Connection", b"close, X-Hop"), (b"x-hop", b"1"), (b"x-keep", b"2")],
    [(b"x-hop", b"1"), (b"connection", b" X-HOP ,, keep-alive"), (b"keep-alive", b"5")],
    [(b"connection", b"a"), (b"Connection", b"b"), (b"a", b"1"), (b"b", b"2"), (b"c", b"3")],
    [],
]


@pytest.mark.parametrize("headers", HEADER_SETS, ids=range(len(HEADER_SETS)))
@pytest.mark.parametrize(
    "deny", [ALWAYS_DENIED, frozenset(), frozenset({b"x-secret", b"oncely-replay"})]
)
def test_storable_headers_pick_what_they_picked(
    headers: list[tuple[bytes, bytes]], deny: frozenset[bytes]
) -> None:
    given = [(bytearray(k), memoryview(v)) for k, v in headers]  # any bytes-like, as ASGI
    assert storable_headers(given, deny) == _storable_before(headers, deny)


def test_a_stored_response_keeps_its_bytes() -> None:
    data = encode_response(
        201, [(b"content-type", b"application/json"), (b"location", b"/o/1")], b'{"a":1}'
    )
    assert data.hex() == (
        "00c90002000c00000010636f6e74656e742d747970656170706c69636174696f6e2f6a736f6e"
        "0008000000046c6f636174696f6e2f6f2f317b2261223a317d"
    )


# -- the request body ------------------------------------------------------------------------------
def _scope(key: str, length: bytes | None) -> dict[str, Any]:
    scope = _asgi_scope(key)
    scope["headers"] = [h for h in scope["headers"] if h[0] != b"content-length"]
    if length is not None:
        scope["headers"].append((b"content-length", length))
    return scope


async def _call(body_messages: list[dict[str, Any]], length: bytes | None) -> tuple[int, int]:
    """(status, handler runs) of one keyed request whose body comes in ``body_messages``."""
    runs = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = IdempotencyConfig(store=MemoryStore(), scope=GLOBAL, max_request_body=8)
    middleware = IdempotencyMiddleware(app, config)
    pending = list(body_messages)
    forever = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await forever.wait()
        return {"type": "http.disconnect"}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await middleware(_scope(str(uuid.uuid4()), length), receive, send)
    return statuses[0], runs


def _body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}


@pytest.mark.parametrize(
    ("messages", "length", "expected"),
    [
        ([_body(b"12345678")], b"8", (201, 1)),  # whole, at the limit
        ([_body(b"123456789")], None, (413, 0)),  # one message over the limit, no length
        ([_body(b"12345")], b"7", (400, 0)),  # shorter than declared
        ([_body(b"")], b"0", (201, 1)),
        ([_body(b"1234", True), _body(b"5678")], b"8", (201, 1)),  # in two messages
        ([_body(b"12345", True), _body(b"6789")], None, (413, 0)),
        ([_body(b"12", True), {"type": "http.disconnect"}], b"4", (400, 0)),
        ([{"type": "http.disconnect"}], b"2", (400, 0)),
    ],
)
async def test_the_body_is_read_whole_and_bounded(
    messages: list[dict[str, Any]], length: bytes | None, expected: tuple[int, int]
) -> None:
    assert await _call(messages, length) == expected


# -- a flow settled inside the app's last send ----------------------------------------------------
@pytest.mark.parametrize("then", ["returns", "raises"])
async def test_a_response_settled_inside_its_last_send_is_stored_once(then: str) -> None:
    """The key is settled inside the app's last ``send`` (the client never sees a response
    before it is stored); the driver then knows the flow ended and sends it nothing more. An
    exception the app raises after its complete response still reaches the server, and the
    stored response is what a retry gets."""
    runs = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-n", b"1")]})
        await send({"type": "http.response.body", "body": b"made"})
        if then == "raises":
            raise RuntimeError("after the response")

    store = MemoryStore()
    middleware = IdempotencyMiddleware(app, IdempotencyConfig(store=store, scope=GLOBAL))
    key = str(uuid.uuid4())

    async def request() -> tuple[list[dict[str, Any]], BaseException | None]:
        sent: list[dict[str, Any]] = []
        given = [_body(b"12")]

        async def receive() -> dict[str, Any]:
            return given.pop(0) if given else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        try:
            await middleware(_asgi_scope(key), receive, send)
        except RuntimeError as exc:
            return sent, exc
        return sent, None

    first, raised = await request()
    assert [m["type"] for m in first] == ["http.response.start", "http.response.body"]
    assert (first[0]["status"], first[1]["body"]) == (201, b"made")
    assert (str(raised) if raised else None) == ("after the response" if then == "raises" else None)
    second, again = await request()
    assert again is None and runs == 1
    assert (second[0]["status"], second[1]["body"]) == (201, b"made")
    assert (b"idempotent-replayed", b"true") in second[0]["headers"]
