"""One-time tokens over HTTP: the issuing endpoint and the guard, on both middleware faces."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest

from oncely.errors import ConfigurationError
from oncely.http import GLOBAL, IdempotencyConfig, Rule, TokenGuard, scope_from_header
from oncely.tokens import Tokens

from conftest import StoreFactory
from http_apps.harness import FACES, AsgiFace, WsgiFace

Face = AsgiFace | WsgiFace
MakeFace = Callable[..., Face]
SECRET = "http-token-secret-" + "s" * 16
FORM = ("Content-Type", "application/x-www-form-urlencoded")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["asgi", "wsgi"])
def make_face(request: pytest.FixtureRequest, make_store: StoreFactory) -> MakeFace:
    def make(
        store_kind: str = "memory", *, guard: dict[str, Any] | None = None, **config: Any
    ) -> Face:
        store = make_store(store_kind)[0]
        tokens = Tokens(SECRET, store, default_ttl=60)
        options: dict[str, Any] = {
            "endpoint": "/tokens",
            "purposes": ["checkout", "other"],
            "routes": {
                "/orders": "checkout",
                "/boom": "checkout",
                "/server-error": "checkout",
                "/stream": "checkout",
                "/stream-boom": "checkout",
            },
            "subject": lambda r: r.header("x-user"),
        }
        options.update(guard or {})
        config.setdefault("store", store)
        config.setdefault("scope", GLOBAL)
        return FACES[request.param](
            IdempotencyConfig(tokens=TokenGuard(tokens=tokens, **options), **config)
        )

    return make


async def fetch_token(face: Face, user: str = "alice", purpose: str = "checkout") -> str:
    reply = await face.request(
        "GET", "/tokens", [("X-User", user)], query=f"purpose={purpose}".encode()
    )
    assert reply.status == 200, reply
    assert reply.header("cache-control") == "no-store"
    doc = reply.json()
    assert doc["purpose"] == purpose and doc["expires_in"] == 60
    return str(doc["token"])


def form(token: str, **fields: str) -> bytes:
    return urlencode({"oncely_token": token, **fields}).encode()


async def test_a_double_submitted_form_has_one_effect(make_face: MakeFace) -> None:
    face = make_face()
    token = await fetch_token(face)
    user = ("X-User", "alice")
    first = await face.request("POST", "/orders", [user, FORM], form(token, item="book"))
    second = await face.request("POST", "/orders", [user, FORM], form(token, item="book"))
    assert first.status == 201
    assert second.status == 409 and second.problem == "token-reused"
    assert face.calls["/orders"] == 1


async def test_simultaneous_submissions_run_once(make_face: MakeFace) -> None:
    face = make_face("sqlite")
    token = await fetch_token(face)
    replies = await asyncio.gather(
        *[
            face.request("POST", "/orders", [("X-User", "alice"), FORM], form(token))
            for _ in range(12)
        ]
    )
    assert sorted(r.status for r in replies) == [201] + [409] * 11
    assert face.calls["/orders"] == 1


async def test_token_in_header_or_json_field(make_face: MakeFace) -> None:
    face = make_face()
    user = ("X-User", "alice")
    header = await face.request(
        "POST", "/orders", [user, ("Oncely-Token", await fetch_token(face))]
    )
    assert header.status == 201
    body = f'{{"oncely_token": "{await fetch_token(face)}"}}'.encode()
    json_field = await face.request(
        "POST", "/orders", [user, ("Content-Type", "application/json")], body
    )
    assert json_field.status == 201
    assert face.calls["/orders"] == 2


async def test_refusals_have_distinct_problem_types(make_face: MakeFace) -> None:
    face = make_face()
    user = ("X-User", "alice")
    missing = await face.request("POST", "/orders", [user, FORM], b"item=1")
    assert (missing.status, missing.problem) == (400, "token-missing")
    forged = await face.request("POST", "/orders", [user, ("Oncely-Token", "ot1.AAAA.BBBB")])
    assert (forged.status, forged.problem) == (403, "token-invalid")
    token = await fetch_token(face, user="alice")
    foreign = await face.request("POST", "/orders", [("X-User", "mallory"), FORM], form(token))
    assert (foreign.status, foreign.problem) == (403, "token-foreign")
    other_purpose = await fetch_token(face, purpose="other")
    wrong = await face.request("POST", "/orders", [user, FORM], form(other_purpose))
    assert (wrong.status, wrong.problem) == (403, "token-foreign")
    assert face.calls["/orders"] == 0
    # the refused token was not spent: its owner can still use it
    assert (await face.request("POST", "/orders", [user, FORM], form(token))).status == 201


async def test_expired_tokens_are_refused(make_face: MakeFace) -> None:
    face = make_face(guard={"ttl": 0.2})
    reply = await face.request("GET", "/tokens", [("X-User", "alice")], query=b"purpose=checkout")
    token = reply.json()["token"]
    await asyncio.sleep(0.3)
    expired = await face.request("POST", "/orders", [("X-User", "alice"), FORM], form(token))
    assert (expired.status, expired.problem) == (403, "token-expired")
    assert face.calls["/orders"] == 0


async def test_a_failing_handler_keeps_the_token_spent_by_default(make_face: MakeFace) -> None:
    # Red-team finding 14: once the handler started, its effects may have happened; a second
    # submission of the same token must not run it again.
    face = make_face()
    token = await fetch_token(face)
    user = ("X-User", "alice")
    boom = await face.request("POST", "/boom", [user, FORM], form(token))
    assert isinstance(boom.raised, RuntimeError)
    again = await face.request("POST", "/boom", [user, FORM], form(token))
    assert (again.status, again.problem) == (409, "token-reused")
    server_error = await fetch_token(face)
    await face.request("POST", "/server-error", [user, FORM], form(server_error))
    retry = await face.request("POST", "/server-error", [user, FORM], form(server_error))
    assert (retry.status, retry.problem) == (409, "token-reused")
    assert face.calls == {"/boom": 1, "/server-error": 1}


async def test_with_release_on_5xx_a_failing_handler_gives_the_token_back(
    make_face: MakeFace,
) -> None:
    face = make_face(store_server_errors=False)
    token = await fetch_token(face)
    user = ("X-User", "alice")
    boom = await face.request("POST", "/boom", [user, FORM], form(token))
    assert isinstance(boom.raised, RuntimeError)
    again = await face.request("POST", "/boom", [user, FORM], form(token))
    assert isinstance(again.raised, RuntimeError)  # the token was usable again
    server_error = await fetch_token(face)
    await face.request("POST", "/server-error", [user, FORM], form(server_error))
    retry = await face.request("POST", "/server-error", [user, FORM], form(server_error))
    assert retry.status == 503 and retry.problem is None
    assert face.calls == {"/boom": 2, "/server-error": 2}


async def test_with_an_idempotency_key_a_retry_replays_instead_of_refusing(
    make_face: MakeFace,
) -> None:
    face = make_face()
    token = await fetch_token(face)
    headers = [
        ("X-User", "alice"),
        ("Oncely-Token", token),
        ("Idempotency-Key", f'"{uuid.uuid4()}"'),
    ]
    first = await face.request("POST", "/orders", headers, b"{}")
    retry = await face.request("POST", "/orders", headers, b"{}")
    assert first.status == 201 and retry.status == 201 and retry.replayed
    other_key = [*headers[:2], ("Idempotency-Key", f'"{uuid.uuid4()}"')]
    reuse = await face.request("POST", "/orders", other_key, b"{}")
    assert reuse.status == 409 and reuse.problem == "token-reused"
    assert face.calls["/orders"] == 1


async def test_endpoint_refuses_unknown_purposes_and_methods(make_face: MakeFace) -> None:
    face = make_face()
    unknown = await face.request("GET", "/tokens", query=b"purpose=admin")
    assert (unknown.status, unknown.problem) == (400, "token-purpose-unknown")
    none = await face.request("POST", "/tokens")
    assert none.status == 400
    put = await face.request("PUT", "/tokens", query=b"purpose=checkout")
    assert (put.status, put.problem, put.header("allow")) == (
        405,
        "method-not-allowed",
        "GET, POST",
    )


async def test_client_chosen_purpose_and_subject_are_refused_with_a_400(
    make_face: MakeFace,
) -> None:
    # purposes=None: the client chooses the purpose; what Tokens refuses as a configuration
    # error (over 200 bytes, a NUL) was a 500 here.
    face = make_face(guard={"purposes": None})
    fits = await face.request("GET", "/tokens", [("X-User", "a")], query=b"purpose=" + b"a" * 200)
    assert fits.status == 200
    for purpose in (b"a" * 201, b"%C3%A9" * 101, b"a%00b"):
        reply = await face.request("GET", "/tokens", [("X-User", "a")], query=b"purpose=" + purpose)
        assert (reply.status, reply.problem) == (400, "token-purpose-unknown"), purpose
        assert reply.header("content-type") == "application/problem+json"
    # A subject function reading text with no exact UTF-8 form (a NUL from a cookie).
    face = make_face(guard={"subject": lambda r: "u\x00" + (r.header("x-user") or "")})
    issue = await face.request("GET", "/tokens", [("X-User", "a")], query=b"purpose=checkout")
    assert (issue.status, issue.problem) == (400, "token-subject-invalid")
    spend = await face.request("POST", "/orders", [("X-User", "a"), ("Oncely-Token", "ot1.x")])
    assert (spend.status, spend.problem) == (400, "token-subject-invalid")
    assert face.calls == {}


async def test_store_down_is_503(make_face: MakeFace) -> None:
    face = make_face(store="redis://127.0.0.1:1/0")
    # tokens on a store that is down too
    tokens = Tokens(SECRET, "redis://127.0.0.1:1/0")
    face = type(face)(
        IdempotencyConfig(
            store="redis://127.0.0.1:1/0",
            scope=GLOBAL,
            tokens=TokenGuard(
                tokens=tokens, subject=GLOBAL, endpoint="/tokens", routes={"/orders": "checkout"}
            ),
        )
    )
    issue = await face.request("GET", "/tokens", query=b"purpose=checkout")
    assert (issue.status, issue.problem) == (503, "store-unavailable")
    token = Tokens(SECRET, "memory://").issue("", "checkout")
    spend = await face.request("POST", "/orders", [("Oncely-Token", token)])
    assert (spend.status, spend.problem) == (503, "store-unavailable")
    assert face.calls["/orders"] == 0


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "POST"])
async def test_every_unsafe_method_on_a_guarded_route_needs_the_token(
    make_face: MakeFace, method: str
) -> None:
    # Issue 7 item 4: the guard protected only the configured methods (POST, PATCH).
    face = make_face()
    user = ("X-User", "alice")
    missing = await face.request(method, "/orders", [user])
    assert (missing.status, missing.problem) == (400, "token-missing")
    assert face.calls["/orders"] == 0
    token = await fetch_token(face)
    assert (await face.request(method, "/orders", [user, ("Oncely-Token", token)])).status == 201
    again = await face.request(method, "/orders", [user, ("Oncely-Token", token)])
    assert (again.status, again.problem) == (409, "token-reused")
    assert face.calls["/orders"] == 1
    assert (await face.request("GET", "/orders", [user])).status == 201  # safe: no token


@pytest.mark.parametrize(
    "routes",
    [
        {"/orders": Rule(token="checkout")},
        {"/orders": Rule(token="checkout", enabled=False)},
        {"/orders": Rule(token="checkout", methods=["POST"])},
    ],
)
async def test_token_rules_in_the_config_cover_every_unsafe_method(
    make_face: MakeFace, routes: dict[str, Rule]
) -> None:
    face = make_face(guard={"routes": {}}, routes=routes)
    for method in ("PUT", "DELETE"):
        reply = await face.request(method, "/orders", [("X-User", "alice")])
        assert (reply.status, reply.problem) == (400, "token-missing")
    assert face.calls["/orders"] == 0


async def test_a_consumed_token_is_kept_once_the_response_started(make_face: MakeFace) -> None:
    # Issue 7 item 2, token path: the client left mid-response or the stream failed after it
    # started; the work is done, so the token stays spent.
    face = make_face()
    user = ("X-User", "alice")
    token = await fetch_token(face)
    await face.request("POST", "/stream", [user, ("Oncely-Token", token)], drop_after=1)
    again = await face.request("POST", "/stream", [user, ("Oncely-Token", token)])
    assert (again.status, again.problem) == (409, "token-reused")
    boom = await fetch_token(face)
    failed = await face.request("POST", "/stream-boom", [user, ("Oncely-Token", boom)])
    assert isinstance(failed.raised, RuntimeError)
    retry = await face.request("POST", "/stream-boom", [user, ("Oncely-Token", boom)])
    assert (retry.status, retry.problem) == (409, "token-reused")
    assert face.calls == {"/stream": 1, "/stream-boom": 1}


async def test_tokens_are_bound_to_the_scope_by_default(make_face: MakeFace) -> None:
    face = make_face(scope=scope_from_header("Authorization"), guard={"subject": None})
    reply = await face.request(
        "GET", "/tokens", [("Authorization", "Bearer alice")], query=b"purpose=checkout"
    )
    token = reply.json()["token"]
    bob = await face.request(
        "POST", "/orders", [("Authorization", "Bearer bob"), ("Oncely-Token", token)]
    )
    assert (bob.status, bob.problem) == (403, "token-foreign")
    alice = await face.request(
        "POST", "/orders", [("Authorization", "Bearer alice"), ("Oncely-Token", token)]
    )
    assert alice.status == 201
    assert face.calls["/orders"] == 1


def test_a_global_scope_needs_an_explicit_token_subject() -> None:
    tokens = Tokens(SECRET, "memory://")
    with pytest.raises(ConfigurationError, match="subject"):
        IdempotencyConfig(scope=GLOBAL, tokens=TokenGuard(tokens=tokens))
    IdempotencyConfig(scope=GLOBAL, tokens=TokenGuard(tokens=tokens, subject=GLOBAL))
    with pytest.raises(ConfigurationError):
        TokenGuard(tokens=tokens, subject="user")  # type: ignore[arg-type]


def test_guard_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        TokenGuard(tokens="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        TokenGuard(tokens=Tokens(SECRET, "memory://"), endpoint="tokens")


def test_token_lifetime_uses_the_store_clock(make_store: StoreFactory) -> None:
    store = make_store("redis")[0]
    tokens = Tokens(SECRET, store)
    claims = tokens.verify(tokens.issue("u", "p", ttl=100), "u", "p")
    assert abs(claims.expires_at - (store.now() + 100)) < 2


@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
@pytest.mark.parametrize("face_kind", ["asgi", "wsgi"])
async def test_a_token_is_spent_once_across_guards_of_other_token_scopes(
    make_store: StoreFactory, store_kind: str, face_kind: str
) -> None:
    """rt11: two services (or one before and after a config change) whose TokenGuards share
    the secret and the store but not the Tokens scope each accepted the same token once: two
    effects. The other scope's guard refuses it now (403 token-foreign) and runs nothing."""
    store = make_store(store_kind)[0]
    run = uuid.uuid4().hex[:8]

    def face(scope: str) -> Face:
        tokens = Tokens(SECRET, store, scope=f"{scope}-{run}", default_ttl=60)
        guard = TokenGuard(
            tokens=tokens,
            endpoint="/tokens",
            routes={"/orders": "checkout"},
            subject=lambda r: r.header("x-user"),
        )
        return FACES[face_kind](IdempotencyConfig(tokens=guard, store=store, scope=GLOBAL))

    old, new = face("svc-old"), face("svc-new")
    token = await fetch_token(old)
    user = ("X-User", "alice")
    first = await new.request("POST", "/orders", [user, FORM], form(token))
    assert (first.status, first.problem) == (403, "token-foreign")
    assert (await old.request("POST", "/orders", [user, FORM], form(token))).status == 201
    second = await new.request("POST", "/orders", [user, FORM], form(token))
    assert (second.status, second.problem) == (403, "token-foreign")
    again = await old.request("POST", "/orders", [user, FORM], form(token))
    assert (again.status, again.problem) == (409, "token-reused")
    assert old.calls["/orders"] + new.calls["/orders"] == 1
