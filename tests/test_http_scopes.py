"""Scopes by the authenticated principal (redteam4 findings 4 and 18): a retry after an OAuth
token refresh stays in its client's key space, and a request without a principal is refused
instead of sharing one anonymous key space."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    SimpleUser,
)
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.testclient import TestClient

from oncely.errors import ConfigurationError
from oncely.http import (
    IdempotencyConfig,
    IdempotencyMiddleware,
    scope_from_header,
    scope_from_user,
)
from oncely.http.scopes import ScopeFunction

#: Two access tokens of one user (the second issued by a refresh), and another user's.
TOKENS = {"Bearer access-v1": "user-7", "Bearer access-v2": "user-7", "Bearer other": "user-8"}
#: A principal whose id (the server's data) no store keeps as text.
TOKENS["Bearer nul"] = "user-9\x00"


class Tokens(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> Any:
        user = TOKENS.get(conn.headers.get("authorization", ""))
        return None if user is None else (AuthCredentials(["authenticated"]), SimpleUser(user))


def _app(
    tmp_path: Path, scope: ScopeFunction, *, auth_inside: bool = False
) -> tuple[TestClient, list[str]]:
    effects: list[str] = []
    app = FastAPI()

    @app.post("/pay", status_code=201)
    async def pay(request: Request) -> dict[str, Any]:
        body = await request.json()
        effects.append(body["ref"])
        return {"ref": body["ref"]}

    config = IdempotencyConfig(store=f"sqlite:///{tmp_path / 'http.db'}", scope=scope)
    if auth_inside:  # the wrong order: authentication after the scope was read
        app.add_middleware(AuthenticationMiddleware, backend=Tokens())
    app.add_middleware(IdempotencyMiddleware, config=config)
    if not auth_inside:
        app.add_middleware(AuthenticationMiddleware, backend=Tokens())  # added last: runs first
    return TestClient(app, raise_server_exceptions=False), effects


def _pay(client: TestClient, key: str, token: str | None) -> Any:
    headers = {"Idempotency-Key": f'"{key}"'}
    if token is not None:
        headers["Authorization"] = token
    return client.post("/pay", json={"amount": 100, "ref": key}, headers=headers)


def test_retry_after_a_token_refresh_replays(tmp_path: Path) -> None:
    """redteam4 http/token_rotation.py: with scope_from_header("Authorization") the retry
    with the refreshed token ran the charge again; scoped by the user it replays."""
    client, effects = _app(tmp_path, scope_from_user("username"))
    key = uuid.uuid4().hex
    assert _pay(client, key, "Bearer access-v1").status_code == 201
    again = _pay(client, key, "Bearer access-v2")
    assert again.status_code == 201 and again.headers.get("idempotent-replayed") == "true"
    assert effects == [key]
    # another user with the same key is another key space
    assert _pay(client, key, "Bearer other").headers.get("idempotent-replayed") is None
    assert effects == [key, key]


def test_scoping_by_the_token_runs_a_refreshed_retry_again(tmp_path: Path) -> None:
    """Why the docs no longer show scope_from_header("Authorization") for bearer tokens."""
    client, effects = _app(tmp_path, scope_from_header("Authorization"))
    key = uuid.uuid4().hex
    _pay(client, key, "Bearer access-v1")
    _pay(client, key, "Bearer access-v2")
    assert effects == [key, key]


def test_a_request_without_a_principal_is_refused(tmp_path: Path) -> None:
    """redteam4 finding 18: every client without credentials shared the scope "-"."""
    client, effects = _app(tmp_path, scope_from_user("username"))
    key = uuid.uuid4().hex
    refused = _pay(client, key, None)
    assert refused.status_code == 401 and effects == []
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith("principal-missing")
    # nothing was claimed: the key is still free for an authenticated client
    assert _pay(client, key, "Bearer access-v1").status_code == 201 and effects == [key]


def test_a_principal_id_no_store_keeps_is_a_500_not_the_clients_key(tmp_path: Path) -> None:
    """Red team round 8 (principal_slug.py): a user id holding a NUL got the client's valid
    key refused with 400 idempotency-key-invalid, which no client can fix."""
    client, effects = _app(tmp_path, scope_from_user("username"))
    reply = _pay(client, "order-1", "Bearer nul")
    assert reply.status_code == 500 and effects == []
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["type"].endswith("/idempotency-scope-invalid")
    assert "user-9" not in reply.text
    # the key is fine: another principal uses it
    assert _pay(client, "order-1", "Bearer access-v1").status_code == 201


def test_anonymous_share_is_explicit(tmp_path: Path) -> None:
    client, effects = _app(tmp_path, scope_from_user("username", anonymous="share"))
    key = uuid.uuid4().hex
    assert _pay(client, key, None).status_code == 201
    assert _pay(client, key, None).headers.get("idempotent-replayed") == "true"
    assert effects == [key]


@pytest.mark.parametrize("anonymous", ["refuse", "share"])
def test_authentication_inside_the_middleware_is_refused_at_start_up(
    tmp_path: Path, anonymous: Any
) -> None:
    """Starlette's AuthenticationMiddleware added before oncely's runs inside it, after the
    scope was read: every client was anonymous, refused with 401, or with anonymous="share"
    one key space for all (bob got alice's response). The app now refuses to start."""
    client, effects = _app(
        tmp_path, scope_from_user("username", anonymous=anonymous), auth_inside=True
    )
    refused = pytest.raises(ConfigurationError, match="AuthenticationMiddleware runs inside")
    with refused, client:  # the lifespan: start-up fails
        pass
    key = uuid.uuid4().hex
    alice = _pay(client, key, "Bearer access-v1")
    bob = _pay(client, key, "Bearer other")  # without a lifespan: each request fails
    assert (alice.status_code, bob.status_code) == (500, 500) and effects == []


def test_request_state_user_and_bad_settings(tmp_path: Path) -> None:
    """A user set as ``request.state.user`` by an outer middleware (a str id, or an object
    with ``id``)."""
    effects: list[str] = []
    app = FastAPI()

    @app.post("/pay", status_code=201)
    async def pay(request: Request) -> dict[str, str]:
        effects.append(request.headers["x-user"])
        return {}

    class User:
        def __init__(self, id: int) -> None:
            self.id = id

    config = IdempotencyConfig(store=f"sqlite:///{tmp_path / 'h.db'}", scope=scope_from_user())
    app.add_middleware(IdempotencyMiddleware, config=config)

    @app.middleware("http")  # added after oncely's: it runs first
    async def auth(request: Request, call_next: Any) -> Any:
        user = request.headers["x-user"]
        request.state.user = User(int(user)) if user.isdigit() else user
        return await call_next(request)

    client = TestClient(app, raise_server_exceptions=False)
    for user in ("alice", "alice", "42", "42"):
        client.post("/pay", json={}, headers={"Idempotency-Key": '"k"', "X-User": user})
    assert effects == ["alice", "42"]
    with pytest.raises(ConfigurationError):
        scope_from_user("not an attribute")
    with pytest.raises(ConfigurationError):
        scope_from_user(anonymous="allow")  # type: ignore[arg-type]


def test_wsgi_remote_user(tmp_path: Path) -> None:
    """WSGI: ``REMOTE_USER`` set by the server or an outer layer names the principal."""
    from werkzeug.test import Client

    from oncely.http import WSGIIdempotencyMiddleware

    effects: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        effects.append(environ["REMOTE_USER"])
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"ok"]

    config = IdempotencyConfig(store=f"sqlite:///{tmp_path / 'w.db'}", scope=scope_from_user())
    inner = WSGIIdempotencyMiddleware(app, config)

    def auth(environ: dict[str, Any], start_response: Any) -> Any:  # the outer layer
        user = TOKENS.get(environ.get("HTTP_AUTHORIZATION", ""))
        if user is not None:
            environ["REMOTE_USER"] = user
        return inner(environ, start_response)

    client = Client(auth)
    for token in ("Bearer access-v1", "Bearer access-v2"):
        r = client.post(
            "/pay", data=b"{}", headers={"Idempotency-Key": '"w"', "Authorization": token}
        )
        assert r.status_code == 201
    assert effects == ["user-7"]


def _placed(placement: str, middleware: Any) -> Any:
    """An app whose ``POST /api/pay`` runs ``middleware`` (a Starlette ``Middleware``) below
    the app level: on a Mount, on a Route, in a mounted Starlette or FastAPI app, or in a
    FastAPI app whose route came from an APIRouter and whose middleware wraps the mount."""
    from fastapi import APIRouter
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def pay(request: Any) -> Any:
        return PlainTextResponse("x" * 5000, status_code=201)

    if placement == "mount":
        return Starlette(
            routes=[
                Mount(
                    "/api", routes=[Route("/pay", pay, methods=["POST"])], middleware=[middleware]
                )
            ]
        )
    if placement == "route":
        return Starlette(routes=[Route("/api/pay", pay, methods=["POST"], middleware=[middleware])])
    if placement == "starlette-subapp":
        sub = Starlette(routes=[Route("/pay", pay, methods=["POST"])], middleware=[middleware])
        return Starlette(routes=[Mount("/api", app=sub)])
    if placement == "fastapi-subapp":
        router = APIRouter()
        router.add_api_route("/pay", pay, methods=["POST"], status_code=201)
        inner = FastAPI()
        inner.include_router(router)
        inner.add_middleware(middleware.cls, *middleware.args, **middleware.kwargs)
        outer = FastAPI()
        outer.mount("/api", inner)
        return outer
    assert placement == "nested-mount"
    deep = Mount("/pay", routes=[Route("/", pay, methods=["POST"])], middleware=[middleware])
    return Starlette(routes=[Mount("/api", routes=[deep])])


PLACEMENTS = ["mount", "route", "starlette-subapp", "fastapi-subapp", "nested-mount"]


@pytest.mark.parametrize("anonymous", ["refuse", "share"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_authentication_on_a_route_or_mounted_app_is_refused_at_start_up(
    placement: str, anonymous: Any
) -> None:
    """redteam15: an AuthenticationMiddleware on a Mount, a Route or in a mounted app runs
    inside oncely's too (after the scope was read): it was not refused, and with
    anonymous="share" bob got alice's stored response. The whole routing tree is checked."""
    from starlette.middleware import Middleware

    app = _placed(placement, Middleware(AuthenticationMiddleware, backend=Tokens()))
    config = IdempotencyConfig(
        store="memory://", scope=scope_from_user("username", anonymous=anonymous)
    )
    app.add_middleware(IdempotencyMiddleware, config=config)
    client = TestClient(app, raise_server_exceptions=False)
    refused = pytest.raises(ConfigurationError, match="AuthenticationMiddleware runs inside")
    with refused, client:  # the lifespan: start-up fails
        pass
    headers = {"Idempotency-Key": '"rt15"', "Authorization": "Bearer access-v1"}
    alice = client.post("/api/pay", content=b"{}", headers=headers)
    headers["Authorization"] = "Bearer other"
    bob = client.post("/api/pay", content=b"{}", headers=headers)
    assert (alice.status_code, bob.status_code) == (500, 500)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_compression_on_a_route_or_mounted_app_is_refused_at_start_up(placement: str) -> None:
    """redteam15: a GZipMiddleware on a Mount (or a Route, a mounted app) compressed the
    response before oncely stored it, and the gzip body was replayed to a client that sent
    ``Accept-Encoding: identity``. The same walker as for authentication finds it."""
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware

    from oncely.http import GLOBAL

    app = _placed(placement, Middleware(GZipMiddleware, minimum_size=100))
    config = IdempotencyConfig(store="memory://", scope=GLOBAL)
    app.add_middleware(IdempotencyMiddleware, config=config)
    client = TestClient(app, raise_server_exceptions=False)
    with pytest.raises(ConfigurationError, match="GZipMiddleware runs inside"), client:
        pass
    headers = {"Idempotency-Key": '"rt15"', "Accept-Encoding": "gzip"}
    first = client.post("/api/pay", content=b"{}", headers=headers)
    headers["Accept-Encoding"] = "identity"
    second = client.post("/api/pay", content=b"{}", headers=headers)
    assert (first.status_code, second.status_code) == (500, 500)
    assert "content-encoding" not in second.headers


def test_a_well_ordered_app_with_mounts_starts() -> None:
    """Authentication and compression outside oncely's, mounts and routes below: it starts
    and each user keeps their key space."""
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware

    app = _placed("mount", Middleware(_Noop))
    config = IdempotencyConfig(store="memory://", scope=scope_from_user("username"))
    app.add_middleware(IdempotencyMiddleware, config=config)
    app.add_middleware(AuthenticationMiddleware, backend=Tokens())
    app.add_middleware(GZipMiddleware, minimum_size=100)
    with TestClient(app) as client:
        headers = {"Idempotency-Key": '"ok"', "Authorization": "Bearer access-v1"}
        assert client.post("/api/pay", content=b"{}", headers=headers).status_code == 201
        again = client.post("/api/pay", content=b"{}", headers=headers)
        assert again.headers.get("idempotent-replayed") == "true"


class _Noop:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class _PlainUser:
    """A plain ASGI middleware setting ``scope["user"]`` (no check can know it authenticates)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value.decode() in TOKENS:
                scope["user"] = SimpleUser(TOKENS[value.decode()])
        await self.app(scope, receive, send)


@pytest.mark.parametrize("placement", ["mount", "route", "starlette-subapp"])
def test_a_user_set_inside_the_middleware_is_never_stored_in_another_scope(
    placement: str,
) -> None:
    """red team 15: a middleware oncely cannot recognise sets the user inside its middleware:
    with anonymous="share" the first client's response was stored in the anonymous scope and
    replayed to the next. The principal the app saw is compared with the one the key was
    scoped by when the response is settled: they differ, so nothing is stored."""
    from starlette.middleware import Middleware

    from oncely.stores.memory import MemoryStore

    app = _placed(placement, Middleware(_PlainUser))
    store = MemoryStore()
    config = IdempotencyConfig(store=store, scope=scope_from_user("username", anonymous="share"))
    app.add_middleware(IdempotencyMiddleware, config=config)
    with TestClient(app) as client:
        headers = {"Idempotency-Key": '"rt15"', "Authorization": "Bearer access-v1"}
        alice = client.post("/api/pay", content=b"{}", headers=headers)
        kept = list(store.list())
        headers["Authorization"] = "Bearer other"
        bob = client.post("/api/pay", content=b"{}", headers=headers)
    assert alice.status_code == 201 and kept == []
    assert bob.status_code == 201 and "idempotent-replayed" not in bob.headers


def test_a_user_set_in_the_apps_copy_of_the_scope_is_compared_too() -> None:
    """With a response extension the app must not use (``http.response.pathsend``) the app
    gets a copy of the scope: the user a middleware sets in it is the one compared."""
    from starlette.middleware import Middleware

    from oncely.stores.memory import MemoryStore

    inner = _placed("mount", Middleware(_PlainUser))
    store = MemoryStore()
    config = IdempotencyConfig(store=store, scope=scope_from_user("username", anonymous="share"))
    inner.add_middleware(IdempotencyMiddleware, config=config)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["extensions"] = {"http.response.pathsend": {}}
        await inner(scope, receive, send)

    with TestClient(app) as client:
        headers = {"Idempotency-Key": '"rt15"', "Authorization": "Bearer access-v1"}
        alice = client.post("/api/pay", content=b"{}", headers=headers)
        headers["Authorization"] = "Bearer other"
        bob = client.post("/api/pay", content=b"{}", headers=headers)
    assert alice.status_code == 201 and list(store.list()) == []
    assert bob.status_code == 201 and "idempotent-replayed" not in bob.headers
