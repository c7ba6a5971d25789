"""Hypothesis fuzzing of header values and bodies: never a 500, never a handler run twice."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oncely.http import GLOBAL, IdempotencyConfig, TokenGuard
from oncely.stores.memory import MemoryStore
from oncely.tokens import Tokens

from http_apps.harness import AsgiFace, Reply, WsgiFace

pytestmark = pytest.mark.timeout(120)

SECRET = "fuzz-secret-" + "f" * 20
FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

printable_keys = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=300
).map(lambda s: ('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"').encode())
header_values = st.one_of(
    st.binary(max_size=300),
    printable_keys,
    st.text(max_size=50).map(lambda s: s.encode("utf-8")),
    st.sampled_from([b'""', b"a" * 256, b'"a";x=1', b"?1", b"1.5", b":YWJj:", b"@1", b'%"x"']),
)
json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
).map(lambda doc: json.dumps(doc).encode())
bodies = st.one_of(st.binary(max_size=3000), json_bodies)
content_types = st.sampled_from(
    [b"application/json", b"application/x-www-form-urlencoded", b"text/plain", b"\xff\xfe", b""]
)
config_kinds = st.sampled_from(["default", "json-fields", "small-body", "tokens", "bare-off"])
methods = st.sampled_from(["POST", "PATCH", "PUT", "GET", "DELETE"])
paths = st.sampled_from(["/orders", "/echo", "/stream", "/client-error", "/tokens"])


def make_config(kind: str) -> IdempotencyConfig:
    store = MemoryStore()
    if kind == "json-fields":
        return IdempotencyConfig(store=store, scope=GLOBAL, fingerprint=["amount", "a.b"])
    if kind == "small-body":
        return IdempotencyConfig(
            store=store, scope=GLOBAL, max_request_body=100, max_stored_body=20
        )
    if kind == "tokens":
        guard = TokenGuard(
            tokens=Tokens(SECRET, store),
            subject=GLOBAL,
            endpoint="/tokens",
            routes={"/orders": "checkout"},
        )
        return IdempotencyConfig(store=store, scope=GLOBAL, tokens=guard)
    if kind == "bare-off":
        return IdempotencyConfig(store=store, scope=GLOBAL, allow_bare_key=False, required=False)
    return IdempotencyConfig(store=store, scope=GLOBAL)


def check(first: Reply, second: Reply) -> None:
    for reply in (first, second):
        assert reply.raised is None, reply.raised
        assert 200 <= reply.status < 500 or reply.status == 503, reply
        if reply.header("content-type") == "application/problem+json":
            doc = reply.json()
            assert doc["status"] == reply.status and doc["type"].startswith("https://")


def check_once(face: AsgiFace | WsgiFace, key: bytes | None, method: str, path: str) -> None:
    """An identical retry of a protected request never runs the handler a second time."""
    if key is not None and method in ("POST", "PATCH"):
        assert face.calls[path] <= 1, dict(face.calls)


@FUZZ
@given(
    kind=config_kinds,
    method=methods,
    path=paths,
    key=st.one_of(st.none(), header_values),
    token=st.one_of(st.none(), st.binary(max_size=120)),
    content_type=content_types,
    body=bodies,
    chunks=st.integers(1, 3),
)
def test_fuzzed_requests_on_asgi_never_get_a_500(
    kind: str,
    method: str,
    path: str,
    key: bytes | None,
    token: bytes | None,
    content_type: bytes,
    body: bytes,
    chunks: int,
) -> None:
    face = AsgiFace(make_config(kind))
    headers: list[tuple[bytes, bytes]] = [(b"content-type", content_type)]
    if key is not None:
        headers.append((b"idempotency-key", key))
    if token is not None:
        headers.append((b"oncely-token", token))

    async def both() -> tuple[Reply, Reply]:
        first = await face.request(method, path, headers, body, chunks=chunks)
        second = await face.request(method, path, headers, body, chunks=chunks)
        return first, second

    first, second = asyncio.run(both())
    check(first, second)
    check_once(face, key, method, path)


@FUZZ
@given(
    kind=config_kinds,
    method=methods,
    path=paths,
    key=st.one_of(st.none(), header_values.filter(lambda v: b"\r" not in v and b"\n" not in v)),
    content_type=content_types,
    body=bodies,
    declared=st.one_of(st.none(), st.integers(0, 5000)),
)
def test_fuzzed_requests_on_wsgi_never_get_a_500(
    kind: str,
    method: str,
    path: str,
    key: bytes | None,
    content_type: bytes,
    body: bytes,
    declared: int | None,
) -> None:
    face = WsgiFace(make_config(kind))
    headers: list[tuple[bytes, bytes]] = [(b"content-type", content_type)]
    if key is not None:
        headers.append((b"idempotency-key", key))
    first = face.request_sync(method, path, headers, body, declared_length=declared)
    second = face.request_sync(method, path, headers, body, declared_length=declared)
    check(first, second)
    check_once(face, key, method, path)
