"""Framework helpers (Starlette, FastAPI, Flask, Django) and the runnable examples."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from oncely.errors import ConfigurationError
from oncely.http import (
    IdempotencyConfig,
    IdempotencyInfo,
    IdempotencyMiddleware,
    TokenGuard,
    idempotent_route,
)
from oncely.http.fastapi import Idempotency, RequireToken
from oncely.stores.memory import MemoryStore
from oncely.tokens import Tokens

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples" / "http").glob("*_app.py"))
SECRET = "framework-secret-" + "z" * 16
pytestmark = pytest.mark.timeout(60)


def key() -> dict[str, str]:
    return {"Idempotency-Key": f'"{uuid.uuid4()}"'}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_run(example: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "example: ok" in result.stdout


def test_examples_cover_every_framework() -> None:
    assert {p.stem for p in EXAMPLES} >= {"fastapi_app", "starlette_app", "flask_app", "django_app"}


def test_importing_oncely_http_imports_no_framework_or_http_sf() -> None:
    code = (
        "import sys, oncely, oncely.http, oncely.tokens, oncely.http.flow; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('http_sf', 'starlette', 'fastapi', 'flask', 'django', 'redis', 'psycopg')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- Starlette -------------------------------------------------------------------------------------
async def test_starlette_decorators_through_mounts_and_endpoint_classes() -> None:
    from starlette.applications import Starlette
    from starlette.endpoints import HTTPEndpoint
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Mount, Route

    calls: dict[str, int] = {}

    def count(name: str) -> Response:
        calls[name] = calls.get(name, 0) + 1
        return JSONResponse({"n": calls[name]}, status_code=201)

    @idempotent_route(methods=["PUT"])
    async def put_only(request: Request) -> Response:
        return count("put")

    @idempotent_route(enabled=False)
    async def never(request: Request) -> Response:
        return count("never")

    class Items(HTTPEndpoint):
        @idempotent_route(required=False)
        async def post(self, request: Request) -> Response:
            return count("items")

    async def plain(request: Request) -> Response:
        return count("plain")

    app = Starlette(
        routes=[
            Mount("/v1", routes=[Route("/put", put_only, methods=["PUT"]), Route("/items", Items)]),
            Route("/never", never, methods=["POST"]),
            Route("/plain", plain, methods=["POST"]),
        ],
        middleware=[
            Middleware(IdempotencyMiddleware, config=IdempotencyConfig(store=MemoryStore()))
        ],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        k = key()
        await client.put("/v1/put", headers=k)
        assert (await client.put("/v1/put", headers=k)).headers["idempotent-replayed"] == "true"
        assert (await client.post("/v1/items")).status_code == 201  # key optional here
        assert (await client.post("/never")).status_code == 201
        assert (await client.post("/plain")).status_code == 400  # the global default
    assert calls == {"put": 1, "items": 1, "never": 1}


async def test_starlette_app_wrapped_from_outside_finds_its_routes() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    @idempotent_route(required=False)
    async def optional(request: Request) -> Response:
        return Response("ok")

    inner = Starlette(routes=[Route("/optional", optional, methods=["POST"])])
    app = IdempotencyMiddleware(inner, IdempotencyConfig(store=MemoryStore()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/optional")).status_code == 200
        assert (await client.post("/elsewhere")).status_code == 400


def test_token_rules_need_a_token_guard() -> None:
    from oncely.http import Rule

    with pytest.raises(ConfigurationError):
        IdempotencyConfig(routes={"/orders": Rule(token="checkout")})


# -- FastAPI ---------------------------------------------------------------------------------------
async def test_fastapi_dependencies_need_the_middleware() -> None:
    app = FastAPI()

    @app.post("/x")
    async def x(info: Annotated[Any, Depends(Idempotency())]) -> dict[str, str]:
        return {}

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(ConfigurationError):
            await client.post("/x", headers=key())


async def test_fastapi_route_level_dependency_marks_and_informs() -> None:
    store = MemoryStore()
    tokens = Tokens(SECRET, store)
    app = FastAPI()
    app.add_middleware(
        IdempotencyMiddleware,
        config=IdempotencyConfig(store=store, tokens=TokenGuard(tokens=tokens), required=False),
    )
    seen: list[IdempotencyInfo | None] = []

    @app.post("/pay", dependencies=[Depends(Idempotency(required=True, fingerprint=["amount"]))])
    async def pay(body: dict[str, Any]) -> dict[str, Any]:
        return {"amount": body["amount"]}

    @app.post("/order")
    async def order(
        info: Annotated[IdempotencyInfo | None, Depends(RequireToken("order"))],
    ) -> dict[str, Any]:
        seen.append(info)
        return {}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/pay", json={"amount": 1})).status_code == 400
        k = key()
        await client.post("/pay", json={"amount": 1, "x": 1}, headers=k)
        again = await client.post("/pay", json={"amount": 1, "x": 2}, headers=k)
        assert again.headers["idempotent-replayed"] == "true"
        token = tokens.issue("", "order")
        assert (await client.post("/order", headers={"Oncely-Token": token})).status_code == 200
        assert (await client.post("/order", headers={"Oncely-Token": token})).status_code == 409
    assert len(seen) == 1 and seen[0] is not None and seen[0].token_purpose == "order"


# -- Flask -----------------------------------------------------------------------------------------
def test_flask_method_views_and_require_token_checks() -> None:
    from flask import Flask
    from flask.views import MethodView

    from oncely.http.flask import install, require_token

    store = MemoryStore()
    tokens = Tokens(SECRET, store)
    app = Flask(__name__)
    calls: dict[str, int] = {}

    class Payments(MethodView):
        @idempotent_route(fingerprint=["amount"])
        def post(self) -> tuple[dict[str, int], int]:
            calls["pay"] = calls.get("pay", 0) + 1
            return {"n": calls["pay"]}, 201

    @app.route("/form", methods=["GET", "POST"])
    @require_token("form")
    def form() -> str:
        calls["form"] = calls.get("form", 0) + 1
        return "ok"

    app.add_url_rule("/payments", view_func=Payments.as_view("payments"))
    install(app, IdempotencyConfig(store=store, required=False, tokens=TokenGuard(tokens=tokens)))
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
        k = key()
        client.post("/payments", json={"amount": 1, "x": 1}, headers=k)
        assert (
            client.post("/payments", json={"amount": 1}, headers=k).headers["idempotent-replayed"]
            == "true"
        )
        assert client.post("/payments", json={"amount": 2}, headers=k).status_code == 422
        assert client.get("/form").status_code == 200  # showing the form needs no token
        token = tokens.issue("", "form")
        assert client.post("/form", data={"oncely_token": token}).status_code == 200
        assert client.post("/form", data={"oncely_token": token}).status_code == 409
        assert client.post("/form", data={}).status_code == 400
    assert calls == {"pay": 1, "form": 2}

    bare = Flask("bare")
    bare.add_url_rule("/form", view_func=form, methods=["POST"])
    bare.testing = True
    with pytest.raises(ConfigurationError):
        bare.test_client().post("/form")


# -- Django ----------------------------------------------------------------------------------------
def test_django_resolver_decorators_and_class_views() -> None:
    from oncely.http.django import install

    from http_apps import django_site

    store = MemoryStore()
    tokens = Tokens(SECRET, store)
    from django.core.wsgi import get_wsgi_application

    application = install(
        get_wsgi_application(),
        IdempotencyConfig(store=store, required=False, tokens=TokenGuard(tokens=tokens)),
    )
    with httpx.Client(transport=httpx.WSGITransport(app=application), base_url="http://t") as c:
        k = key()
        c.post("/pay", json={"amount": 1}, headers=k)
        assert (
            c.post("/pay", json={"amount": 1}, headers=k).headers["idempotent-replayed"] == "true"
        )
        assert c.post("/pay", json={"amount": 3}, headers=k).status_code == 422
        assert c.post("/free").status_code == 200  # not marked, keys optional
        assert c.post("/api/refunds").status_code == 400  # class view: key required
        k2 = key()
        c.post("/api/refunds", headers=k2)
        assert c.post("/api/refunds", headers=k2).headers["idempotent-replayed"] == "true"
        token = tokens.issue("", "vote")
        assert c.post("/vote", data={"oncely_token": token}).status_code == 201
        assert c.post("/vote", data={"oncely_token": token}).status_code == 409
    assert django_site.calls == {"pay": 1, "free": 1, "refund": 1, "vote": 1}
