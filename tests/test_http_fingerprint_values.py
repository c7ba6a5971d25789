"""HTTP fingerprints count JSON values, not their spelling, and refuse what is not JSON.

Red-team input (session brief, item 7): with ``fingerprint=json_fields("amount")`` a retry
spelling ``1`` as ``1.0`` (or ``100`` as ``1e2``) got 422 although it is the same JSON value,
while ``1e400`` and ``1e500`` (two different numbers) shared one fingerprint because both
became a float infinity. NaN, which is not JSON, was fingerprinted like a value.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from oncely.errors import InvalidPayload
from oncely.http import GLOBAL, HttpRequest, IdempotencyConfig, json_fields
from oncely.http.fingerprint import canonical_json, request_fingerprint

from conftest import StoreFactory
from http_apps.harness import FACES

pytestmark = pytest.mark.timeout(60)

REQUEST = HttpRequest("POST", "/orders", b"", [(b"content-type", b"application/json")])

#: Pairs of bodies holding the same JSON value in other words.
SAME_VALUE = [
    (b'{"amount": 1}', b'{"amount": 1.0}'),
    (b'{"amount": 100}', b'{"amount": 1e2}'),
    (b'{"amount": 100}', b'{"amount": 1.00E+2}'),
    (b'{"amount": 0}', b'{"amount": -0.0}'),
    (b'{"amount": 1.5}', b'{"amount": 15e-1}'),
    (b'{"amount": [1, {"b": 2, "a": 1}]}', b'{"amount": [1.0, {"a": 1e0, "b": 2}]}'),
    (b'{"amount": "A"}', b'{"amount": "\\u0041"}'),
    (b'{"amount": 1e400}', b'{"amount": 10e399}'),
]

#: Pairs of bodies whose chosen field holds different values.
DIFFERENT_VALUE = [
    (b'{"amount": 1e400}', b'{"amount": 1e500}'),  # both a float infinity to json.loads
    (b'{"amount": 1}', b'{"amount": "1"}'),
    (b'{"amount": 1}', b'{"amount": true}'),
    (b'{"amount": null}', b"{}"),
    (b'{"amount": 12345678901234567890.1}', b'{"amount": 12345678901234567890.2}'),
    (b'{"amount": 0.1}', b'{"amount": 0.10000000000000001}'),
    (b'{"amount": [1, 2]}', b'{"amount": [2, 1]}'),
]

NOT_JSON_VALUES = [
    b'{"amount": NaN}',
    b'{"amount": Infinity}',
    b'{"amount": -Infinity}',
    b'{"amount": 1e99999999999999999999}',  # an exponent no decoder holds
    b'{"amount": 1, "amount": 2}',  # which one does the application read?
]


@pytest.mark.parametrize(("first", "second"), SAME_VALUE)
def test_json_fields_counts_values_not_spellings(first: bytes, second: bytes) -> None:
    fingerprint = json_fields("amount")
    assert fingerprint(REQUEST, first) == fingerprint(REQUEST, second)
    assert request_fingerprint(REQUEST, first) == request_fingerprint(REQUEST, second)


@pytest.mark.parametrize(("first", "second"), DIFFERENT_VALUE)
def test_json_fields_tells_different_values_apart(first: bytes, second: bytes) -> None:
    fingerprint = json_fields("amount")
    assert fingerprint(REQUEST, first) != fingerprint(REQUEST, second)
    assert request_fingerprint(REQUEST, first) != request_fingerprint(REQUEST, second)


@pytest.mark.parametrize("body", NOT_JSON_VALUES)
def test_values_that_are_not_json_are_refused_not_crashed_on(body: bytes) -> None:
    with pytest.raises(InvalidPayload):
        json_fields("amount")(REQUEST, body)
    if b'"amount": 1,' not in body:  # the default keeps duplicate names, in order
        with pytest.raises(InvalidPayload):
            canonical_json(body)


def test_huge_numbers_are_fingerprinted_exactly() -> None:
    fingerprint = json_fields("n")
    digits = b"9" * 5000  # beyond int()'s default 4300 digits
    assert fingerprint(REQUEST, b'{"n": %s}' % digits) == fingerprint(
        REQUEST, b'{"n": %s.0}' % digits
    )
    assert fingerprint(REQUEST, b'{"n": %s}' % digits) != fingerprint(
        REQUEST, b'{"n": %s8}' % digits[:-1]
    )


@pytest.fixture(params=["asgi", "wsgi"])
def face_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_through_the_middleware(face_kind: str, make_store: StoreFactory) -> None:
    store = make_store("memory")[0]
    config = IdempotencyConfig(store=store, scope=GLOBAL, fingerprint=["amount", "items"])
    face = FACES[face_kind](config)
    kind = ("Content-Type", "application/json")

    def key() -> tuple[str, str]:
        return ("Idempotency-Key", f'"{uuid.uuid4()}"')

    same = key()
    first = await face.request("POST", "/orders", [same, kind], b'{"amount": 1, "items": [1e2]}')
    assert first.status == 201
    again = await face.request(
        "POST", "/orders", [same, kind], b'{"items": [100.0], "amount": 1.0, "note": "x"}'
    )
    assert again.replayed and again.body == first.body
    other = await face.request("POST", "/orders", [same, kind], b'{"amount": 2, "items": [100]}')
    assert other.status == 422
    for body in NOT_JSON_VALUES:
        reply = await face.request("POST", "/orders", [key(), kind], body)
        assert (reply.status, reply.problem) == (400, "request-body-invalid"), body
        default = FACES[face_kind](IdempotencyConfig(store=store, scope=GLOBAL))
        if b'"amount": 1,' not in body:
            reply = await default.request("POST", "/orders", [key(), kind], body)
            assert (reply.status, reply.problem) == (400, "request-body-invalid"), body
    assert face.calls["/orders"] == 1


#: Fingerprints stored by earlier versions must still match a retry after an upgrade: these
#: digests were computed by the code before its fast paths (integers not ending in 0 kept as
#: they are, strings through the C escaper, one hash update for the framing).
STABLE = [
    (("POST", "/orders", b"", b"application/json"), b'{"item": "book", "quantity": 1}',
     "9642c259313be689645711df0a895cdf556ce242"),
    (("POST", "/orders", b"a=1&b=2", b"application/json"),
     b'{"b": [10, -0, 2.50, 1e2], "a": {"z": null, "y": true}, "s": "\\u00e9\\n"}',
     "3313916b094e2f10f1bebb15a3623df53e44e5c1"),
    (("PUT", "/\u00e9/x", b"", b"text/plain"), b"hello \xff",
     "c01f95045d6ceaca9d03cbbc5f604cfa477fe11c"),
    (("PATCH", "/orders/7", b"", None), b"", "69c7681ebb015a38f4af4c25183441bfd6a5b9e1"),
    (("POST", "/orders", b"", b"application/merge-patch+json"),
     b"[120, -7, 12345678901234567890, 0.10]", "aa0b3ca674bf0e7e6fda19eb1a2b1f2663852773"),
]  # fmt: skip


@pytest.mark.parametrize(("request_line", "body", "expected"), STABLE)
def test_fingerprints_stay_what_earlier_versions_stored(
    request_line: tuple[str, str, bytes, bytes | None], body: bytes, expected: str
) -> None:
    method, path, query, media = request_line
    headers = [(b"content-type", media)] if media is not None else []
    assert request_fingerprint(HttpRequest(method, path, query, headers), body) == expected


@pytest.mark.parametrize(
    "number",
    ["0", "-0", "7", "-7", "10", "-120", "100000", "123456789012345678901234567891",
     "1200000000000000000000000000000000000"],
)  # fmt: skip
def test_integers_count_by_value_like_decimals(number: str) -> None:
    """An integer is canonical as the decimal of the same value (10 and 1e1 are one number)."""
    as_decimal = canonical_json(f"{number}.0".encode())
    assert canonical_json(number.encode()) == as_decimal


# -- multipart/form-data by its parts (red team 4, finding 15) --------------------------------
def _multipart(
    files: dict[str, Any], data: dict[str, str] | None = None
) -> tuple[HttpRequest, bytes]:
    """What HTTPX sends for a form upload: a fresh random boundary every time."""
    sent = httpx.Request("POST", "http://t/upload", files=files, data=data)
    body = sent.read()
    headers = [(k.lower().encode(), v.encode()) for k, v in sent.headers.items()]
    return HttpRequest("POST", "/upload", b"", headers), body


def _raw(boundary: bytes, body: bytes) -> tuple[HttpRequest, bytes]:
    content_type = b'multipart/form-data; boundary="' + boundary + b'"'
    return HttpRequest("POST", "/upload", b"", [(b"content-type", content_type)]), body


INVOICE = {"invoice": ("inv.pdf", b"%PDF-1.4 same bytes", "application/pdf")}


def test_a_multipart_body_counts_by_its_parts_not_its_boundary() -> None:
    first, second = _multipart(INVOICE, {"amount": "100"}), _multipart(INVOICE, {"amount": "100"})
    assert first[1] != second[1]  # HTTPX drew two boundaries
    assert request_fingerprint(*first) == request_fingerprint(*second)
    # the epilogue and the case of part header names do not count
    plain = b'--b1\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b1--\r\n'
    dressed = (
        b'--bb2\r\ncontent-disposition: form-data; name="a"\r\n\r\n1\r\n--bb2--\r\nignored epilogue'
    )
    assert request_fingerprint(*_raw(b"b1", plain)) == request_fingerprint(*_raw(b"bb2", dressed))


@pytest.mark.parametrize(
    ("files", "data"),
    [
        ({"invoice": ("inv.pdf", b"%PDF-1.4 same bytez", "application/pdf")}, {"amount": "100"}),
        ({"invoice": ("inv2.pdf", b"%PDF-1.4 same bytes", "application/pdf")}, {"amount": "100"}),
        ({"invoice": ("inv.pdf", b"%PDF-1.4 same bytes", "text/plain")}, {"amount": "100"}),
        ({"receipt": ("inv.pdf", b"%PDF-1.4 same bytes", "application/pdf")}, {"amount": "100"}),
        (INVOICE, {"amount": "101"}),
        (INVOICE, {"amount": "100", "note": ""}),
        (INVOICE, None),
    ],
    ids=["content", "filename", "part-type", "name", "field", "extra-part", "missing-part"],
)
def test_a_multipart_body_with_other_parts_differs(
    files: dict[str, Any], data: dict[str, str] | None
) -> None:
    base = request_fingerprint(*_multipart(INVOICE, {"amount": "100"}))
    assert request_fingerprint(*_multipart(files, data)) != base


def test_a_multipart_body_that_does_not_parse_counts_byte_for_byte() -> None:
    cut = b'--b1\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'  # no closing line
    same_cut = cut.replace(b"b1", b"b2")
    assert request_fingerprint(*_raw(b"b1", cut)) != request_fingerprint(*_raw(b"b2", same_cut))
    assert request_fingerprint(*_raw(b"b1", cut)) == request_fingerprint(*_raw(b"b1", cut))
    no_boundary = HttpRequest("POST", "/upload", b"", [(b"content-type", b"multipart/form-data")])
    assert request_fingerprint(no_boundary, cut) == request_fingerprint(no_boundary, cut)


async def test_a_multipart_retry_replays_through_the_middleware(
    face_kind: str, make_store: StoreFactory
) -> None:
    face = FACES[face_kind](IdempotencyConfig(store=make_store("memory")[0], scope=GLOBAL))
    key = ("Idempotency-Key", f'"{uuid.uuid4()}"')
    replies = []
    for data in ({"amount": "100"}, {"amount": "100"}, {"amount": "200"}):
        request, body = _multipart(INVOICE, data)
        content_type = dict(request.headers)[b"content-type"].decode()
        replies.append(
            await face.request("POST", "/orders", [key, ("Content-Type", content_type)], body)
        )
    first, again, other = replies
    assert first.status == 201 and again.replayed and again.body == first.body
    assert other.status == 422
    assert face.calls["/orders"] == 1
