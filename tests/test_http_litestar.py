"""Litestar (issue 14 item 3): the plugin with Litestar's test client and under Uvicorn."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar, Request, post
from litestar.config.app import AppConfig
from litestar.config.compression import CompressionConfig
from litestar.connection import ASGIConnection
from litestar.middleware import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
    DefineMiddleware,
)
from litestar.plugins import InitPlugin
from litestar.testing import TestClient

from oncely.errors import ConfigurationError
from oncely.http import GLOBAL, IdempotencyConfig, IdempotencyMiddleware, scope_from_user
from oncely.http.litestar import IdempotencyPlugin
from oncely.stores.memory import MemoryStore
from test_http_servers import fire, hang_up_and_retry, running, server_env

from conftest import StoreFactory
from http_apps import litestar_app
from http_apps.executions import calls

pytestmark = pytest.mark.timeout(90)


def key() -> dict[str, str]:
    return {"Idempotency-Key": f'"{uuid.uuid4()}"'}


def client(store: MemoryStore | None = None, **options: Any) -> TestClient[Litestar]:
    config = IdempotencyConfig(store=store or MemoryStore(), scope=GLOBAL, **options)
    return TestClient(litestar_app.make_app(config))


def test_replay_mismatch_missing_and_per_route_rules() -> None:
    calls.clear()
    with client() as c:
        k = key()
        first = c.post("/orders", headers=k)
        again = c.post("/orders", headers=k)
        assert (first.status_code, again.status_code) == (201, 201)
        assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
        missing = c.post("/orders")
        assert missing.status_code == 400
        assert missing.headers["content-type"] == "application/problem+json"
        k = key()
        c.post("/pay", json={"amount": 5, "note": "a"}, headers=k)
        same = c.post("/pay", json={"amount": 5, "note": "b"}, headers=k)  # amount only counts
        other = c.post("/pay", json={"amount": 6}, headers=k)
        assert same.headers["idempotent-replayed"] == "true"
        assert other.status_code == 422 and other.json()["type"].endswith("key-mismatch")
        assert c.post("/off").status_code == 201  # opt={"idempotency": False}
        assert c.post("/nowhere", headers=key()).status_code == 404
    assert calls == {"orders": 1, "pay": 1, "off": 1}


def test_refusals_before_the_handler_do_not_use_up_the_key() -> None:
    store = MemoryStore()
    calls.clear()
    with client(store) as c:
        k = key()
        invalid = c.post("/pay", json={"amount": "five"}, headers=k)
        assert invalid.status_code == 400  # Litestar's validation, before the handler
        refused = c.post("/guarded", headers=k)
        assert refused.status_code == 401  # the guard
        assert store.list() == []
        fixed = c.post("/pay", json={"amount": 5}, headers=k)
        assert fixed.status_code == 201 and "idempotent-replayed" not in fixed.headers
        k = key()
        made = c.post("/guarded", headers={**k, "X-Allow": "yes"})
        again = c.post("/guarded", headers={**k, "X-Allow": "yes"})
        assert made.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        # The handler itself refusing after it worked: its answer is kept, not run again.
        k = key()
        assert c.post("/denied", headers=k).status_code == 403
        kept = c.post("/denied", headers=k)
        assert kept.status_code == 403 and kept.headers["idempotent-replayed"] == "true"
        # A failing handler's 500 is kept (finding 14); a problem it raises is answered.
        k = key()
        assert c.post("/boom", headers=k).status_code == 500
        kept = c.post("/boom", headers=k)
        assert kept.status_code == 500 and kept.headers["idempotent-replayed"] == "true"
        problem = c.post("/problem", headers=key())
        assert problem.status_code == 409 and problem.json()["remaining"] == 0
    assert calls == {"pay": 1, "guarded": 1, "denied": 1, "boom": 1, "problem": 1}


@pytest.mark.parametrize("path", ["/boom", "/unserialisable", "/audited", "/committed"])
def test_a_handler_that_ran_keeps_its_key_whatever_fails_after_it(path: str) -> None:
    """Red team round 8: the handler function ran (its effect counted), then Litestar failed
    (the return value not JSON, an ``after_request`` hook or a dependency's cleanup raising):
    the key was released and every retry ran the handler again. Now the start is reported
    when Litestar calls the function, the key is kept, and the retry gets the documented
    ``handler-failed`` problem instead of Litestar's own 500."""
    calls.clear()
    with client() as c:
        k = key()
        first = c.post(path, headers=k)
        again = c.post(path, headers=k)
        third = c.post(path, headers=k)
    assert first.status_code == 500 and first.json()["detail"] == "Internal Server Error"
    for kept in (again, third):
        assert kept.status_code == 500 and kept.headers["idempotent-replayed"] == "true"
        assert kept.headers["content-type"] == "application/problem+json"
        assert kept.json()["type"].endswith("/handler-failed")
    assert calls == {path.strip("/"): 1}


def test_a_before_request_answer_does_not_use_up_the_key() -> None:
    store = MemoryStore()
    calls.clear()
    with client(store) as c:
        k = key()
        stopped = c.post("/hooked", headers={**k, "X-Maintenance": "1"})
        assert stopped.status_code == 201 and stopped.json() == {"maintenance": "yes"}
        assert store.list() == []
        made = c.post("/hooked", headers=k)
        again = c.post("/hooked", headers=k)
    assert made.json() == {"n": 1} and again.headers["idempotent-replayed"] == "true"
    assert calls == {"hooked": 1}


def test_plugin_options_are_checked_by_name_type_and_unit() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'scope'"):
        IdempotencyPlugin(scpoe=GLOBAL)
    with pytest.raises(ConfigurationError, match="unknown unit 'moments'"):
        IdempotencyPlugin(scope=GLOBAL, wait="1 moments")
    plugin = IdempotencyPlugin(scope=GLOBAL, store="memory://")
    assert plugin.config.scope is GLOBAL

    @post("/x", opt={"idempotency": {"fingerprnt": ["a"]}})
    async def x() -> None:
        return None

    with TestClient(Litestar([x], plugins=[plugin])) as c:
        reply = c.post("/x", headers=key())
    assert reply.status_code == 500  # a misspelt rule in opt is refused, with the name


def test_the_plugin_twice_or_beside_the_asgi_middleware_is_refused() -> None:
    config = IdempotencyConfig(store=MemoryStore(), scope=GLOBAL)
    with pytest.raises(ConfigurationError, match="listed twice"):
        Litestar([], plugins=[IdempotencyPlugin(config), IdempotencyPlugin(config)])
    from litestar.middleware import DefineMiddleware

    beside = DefineMiddleware(IdempotencyMiddleware, config=config)
    with pytest.raises(ConfigurationError, match="already in this app"):
        Litestar([], middleware=[beside], plugins=[IdempotencyPlugin(config)])


def test_compression_inside_the_plugin_is_refused() -> None:
    config = IdempotencyConfig(store=MemoryStore(), scope=GLOBAL)
    with pytest.raises(ConfigurationError, match="compress outside the app"):
        Litestar(
            [],
            compression_config=CompressionConfig(backend="gzip"),
            plugins=[IdempotencyPlugin(config)],
        )


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_litestar_under_uvicorn(kind: str, make_store: StoreFactory, tmp_path: Path) -> None:
    store, url, options = make_store(kind)
    env = server_env(url, options, tmp_path / "executions.log")
    env["SERVER_APP_SLEEP"] = "0.4"
    auth = {"Authorization": "Bearer alice"}
    k = f'"{uuid.uuid4()}"'
    with running("uvicorn", env, tmp_path, "http_apps.litestar_app:app") as base:
        replies = asyncio.run(fire(base, 50, k))
        with httpx.Client(base_url=base, timeout=30) as c:
            k2 = {**auth, "Idempotency-Key": f'"{uuid.uuid4()}"'}
            invalid = c.post("/pay", json={"amount": "five"}, headers=k2)
            # The refusal is sent before the key is released (one store round trip later).
            deadline = time.monotonic() + 10
            while any(r.status == "in_progress" for r in store.list()):
                assert time.monotonic() < deadline, "the refused request kept its key"
                time.sleep(0.01)
            fixed = c.post("/pay", json={"amount": 5}, headers=k2)
            again = c.post("/pay", json={"amount": 5}, headers=k2)
            k3 = {**auth, "Idempotency-Key": f'"{uuid.uuid4()}"'}
            retry = hang_up_and_retry(c, "/report", k3)
            k4 = {**auth, "Idempotency-Key": f'"{uuid.uuid4()}"'}
            unserialisable = [c.post("/unserialisable", headers=k4) for _ in range(3)]
    lines = (tmp_path / "executions.log").read_text().split("\n")
    assert len([line for line in lines if line.startswith("orders")]) == 1
    originals = [
        r for r in replies if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    in_flight = [r for r in replies if r.status_code == 409]
    assert len(originals) == 1 and in_flight
    assert invalid.status_code == 400
    assert fixed.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert retry.json()["type"].endswith("/response-not-replayable")
    assert len([line for line in lines if line.startswith("report")]) == 1
    # The handler ran, then Litestar failed to serialise its return value (red team round 8).
    assert len([line for line in lines if line.startswith("unserialisable")]) == 1
    assert [r.status_code for r in unserialisable] == [500, 500, 500]
    assert all(r.json()["type"].endswith("/handler-failed") for r in unserialisable[1:])


def test_a_handler_without_its_function_fails_closed() -> None:
    """A Litestar that kept no ``_fn`` on its route handlers would leave every call unreported:
    each request would count as refused before its handler and release its key after the
    handler ran (a double effect on retry). The middleware refuses instead."""
    from oncely.http.litestar import _watch

    class Handler:  # a route handler of such a version
        fn = None

    with pytest.raises(ConfigurationError, match="cannot tell whether a handler ran"):
        _watch(Handler())


# -- scope_from_user: the user the app's authentication set ----------------------------------
@dataclasses.dataclass
class LitestarUser:
    id: str


class HeaderAuth(AbstractAuthenticationMiddleware):
    """Litestar authentication: the user the ``X-User`` header names (none without it)."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> Any:
        name = connection.headers.get("x-user")
        return AuthenticationResult(user=LitestarUser(name) if name else None, auth=None)


@post("/whoami", status_code=201)
async def whoami(request: Request[Any, Any, Any]) -> dict[str, Any]:
    calls["whoami"] = calls.get("whoami", 0) + 1
    return {"user": request.user.id if request.user else None, "n": calls["whoami"]}


def _with_auth(where: str, plugin: IdempotencyPlugin, handlers: list[Any]) -> Litestar:
    """An app authenticating with :class:`HeaderAuth` set up ``where``."""
    auth = DefineMiddleware(HeaderAuth)
    if where == "middleware":
        return Litestar(handlers, middleware=[auth], plugins=[plugin])
    if where == "middleware-class":
        return Litestar(handlers, middleware=[HeaderAuth], plugins=[plugin])

    def insert(config: AppConfig) -> AppConfig:  # as a security backend's on_app_init does
        config.middleware.insert(0, auth)
        return config

    if where == "on_app_init":
        return Litestar(handlers, on_app_init=[insert], plugins=[plugin])

    class AuthPlugin(InitPlugin):
        def on_app_init(self, app_config: AppConfig) -> AppConfig:
            return insert(app_config)

    return Litestar(handlers, plugins=[plugin, AuthPlugin()])  # "plugin-after"


@pytest.mark.parametrize("where", ["middleware", "middleware-class", "on_app_init", "plugin-after"])
@pytest.mark.parametrize("anonymous", ["refuse", "share"])
def test_scope_from_user_reads_the_user_litestar_authenticated(where: str, anonymous: Any) -> None:
    """The plugin put its middleware first (outermost), before the app's authentication
    middleware, so scope_from_user never saw a user: every keyed request got 401, or with
    anonymous="share" every client shared one key space (bob got alice's response). It now
    goes inside the authentication."""
    config = IdempotencyConfig(store=MemoryStore(), scope=scope_from_user(anonymous=anonymous))
    calls.clear()
    with TestClient(_with_auth(where, IdempotencyPlugin(config), [whoami])) as c:
        k = key()
        alice = c.post("/whoami", headers={**k, "X-User": "alice"})
        bob = c.post("/whoami", headers={**k, "X-User": "bob"})
        alice_again = c.post("/whoami", headers={**k, "X-User": "alice"})
        nobody = c.post("/whoami", headers=key())
    assert alice.status_code == 201, alice.text
    assert alice.json() == {"user": "alice", "n": 1}
    assert "idempotent-replayed" not in bob.headers and bob.json() == {"user": "bob", "n": 2}
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert alice_again.json() == alice.json()
    assert nobody.status_code == (401 if anonymous == "refuse" else 201)


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it groups, recursively."""
    found = [error]
    for inner in getattr(error, "exceptions", ()):
        found += _chain(inner)
    return found


def test_authentication_inside_the_plugin_is_refused_at_start_up() -> None:
    """A route's own authentication middleware runs inside the plugin's, after the scope was
    read: with scope_from_user the app refuses to start."""
    guarded = post("/pay", middleware=[DefineMiddleware(HeaderAuth)], status_code=201)(whoami.fn)
    config = IdempotencyConfig(store=MemoryStore(), scope=scope_from_user())
    app = Litestar([guarded], plugins=[IdempotencyPlugin(config)])
    with pytest.raises(BaseException) as caught, TestClient(app):
        pass  # the start-up fails (the error arrives in an exception group)
    assert any(
        isinstance(e, ConfigurationError) and "'HeaderAuth' authenticates /pay inside" in str(e)
        for e in _chain(caught.value)
    )
    ok = IdempotencyConfig(store=MemoryStore(), scope=GLOBAL)  # the scope reads no user
    with TestClient(Litestar([guarded], plugins=[IdempotencyPlugin(ok)])) as c:
        assert c.post("/pay", headers={**key(), "X-User": "a"}).status_code == 201


class PlainUser:
    """A plain ASGI middleware setting ``scope["user"]`` from ``X-User`` (not an
    ``AbstractAuthenticationMiddleware``: the plugin cannot tell it authenticates)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"x-user":
                scope["user"] = LitestarUser(value.decode())
        await self.app(scope, receive, send)


@pytest.mark.parametrize("where", ["app", "route"])
def test_a_plain_middleware_setting_the_user_inside_never_shares_a_response(where: str) -> None:
    """red team 15: a plain ASGI middleware setting ``scope["user"]`` ran inside the plugin's
    (the plugin only recognises Litestar's authentication): with anonymous="share" alice's
    response was stored in the anonymous scope and replayed to bob. The principal the app
    saw differs from the one the key was scoped by: the key is released, nothing stored."""
    store = MemoryStore()
    config = IdempotencyConfig(store=store, scope=scope_from_user(anonymous="share"))
    if where == "app":
        app = Litestar([whoami], middleware=[PlainUser], plugins=[IdempotencyPlugin(config)])
    else:
        route = post("/whoami", middleware=[PlainUser], status_code=201)(whoami.fn)
        app = Litestar([route], plugins=[IdempotencyPlugin(config)])
    calls.clear()
    with TestClient(app) as c:
        k = key()
        alice = c.post("/whoami", headers={**k, "X-User": "alice"})
        kept = list(store.list())
        bob = c.post("/whoami", headers={**k, "X-User": "bob"})
    assert alice.json() == {"user": "alice", "n": 1}
    assert kept == []
    assert "idempotent-replayed" not in bob.headers and bob.json() == {"user": "bob", "n": 2}
