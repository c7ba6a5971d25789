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
from pydantic import BaseModel

from oncely.errors import ConfigurationError
from oncely.http import (
    GLOBAL,
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


def config(store: Any, **options: Any) -> IdempotencyConfig:
    """A test configuration: one key space (GLOBAL) unless a test says otherwise."""
    options.setdefault("scope", GLOBAL)
    if "tokens" in options:
        options["tokens"] = TokenGuard(tokens=options["tokens"], subject=GLOBAL)
    return IdempotencyConfig(store=store, **options)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_run(example: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "example: ok" in result.stdout


def test_examples_cover_every_framework() -> None:
    assert {p.stem for p in EXAMPLES} >= {
        "fastapi_app",
        "starlette_app",
        "flask_app",
        "django_app",
        "litestar_app",
    }


@pytest.mark.parametrize("mode", ["--serve", "--serve-asgi"], ids=["wsgiref", "uvicorn"])
def test_django_example_serves_under_wsgi_and_asgi(mode: str) -> None:
    # The example as a project runs it: Django's WSGI handler under wsgiref (what runserver
    # uses) and its ASGI handler under Uvicorn, the middleware from settings.MIDDLEWARE.
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    example = ROOT / "examples" / "http" / "django_app.py"
    process = subprocess.Popen(
        [sys.executable, str(example), mode, str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/refunds", timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "the example did not start"
                time.sleep(0.1)
        k = key()
        body = {"payment_id": "p-9", "amount": 7}
        first = httpx.post(base + "/refunds", json=body, headers=k, timeout=10)
        again = httpx.post(base + "/refunds", json=body, headers=k, timeout=10)
        other = httpx.post(base + "/refunds", json={**body, "amount": 8}, headers=k, timeout=10)
    finally:
        process.terminate()
        process.wait(15)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert other.status_code == 422


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
        middleware=[Middleware(IdempotencyMiddleware, config=config(MemoryStore()))],
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
    app = IdempotencyMiddleware(inner, config(MemoryStore()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/optional")).status_code == 200
        assert (await client.post("/elsewhere")).status_code == 400


def test_token_rules_need_a_token_guard() -> None:
    from oncely.http import Rule

    with pytest.raises(ConfigurationError):
        IdempotencyConfig(routes={"/orders": Rule(token="checkout")}, scope=GLOBAL)


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
        config=config(store, tokens=tokens, required=False),
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
    install(app, config(store, required=False, tokens=tokens))
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

    application = install(get_wsgi_application(), config(store, required=False, tokens=tokens))
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


# -- requests the framework refuses before the handler (issue 7 item 14) --------------------------
class Payment(BaseModel):
    amount: int


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_fastapi_validation_422_does_not_use_up_the_key() -> None:
    from fastapi.testclient import TestClient

    store = MemoryStore()
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, config=config(store))
    calls: list[int] = []

    @app.post("/pay", status_code=201)
    async def pay(payment: Payment) -> dict[str, int]:
        calls.append(payment.amount)
        return {"n": len(calls)}

    with TestClient(app) as client:
        k = key()
        invalid = client.post("/pay", json={"amount": "five"}, headers=k)
        assert invalid.status_code == 422 and "detail" in invalid.json()  # FastAPI's own answer
        assert "idempotent-replayed" not in invalid.headers
        assert store.list() == []  # nothing claimed is left behind
        fixed = client.post("/pay", json={"amount": 5}, headers=k)
        assert fixed.status_code == 201 and "idempotent-replayed" not in fixed.headers
        again = client.post("/pay", json={"amount": 5}, headers=k)
        assert again.headers["idempotent-replayed"] == "true" and again.json() == fixed.json()
        # a missing route and a wrong method are the router's answers, never stored
        assert client.post("/nowhere", headers=key()).status_code == 404
        assert client.put("/pay", headers=key()).status_code == 405
    assert calls == [5]
    assert len(store.list()) == 1


async def test_fastapi_custom_validation_handler_and_middleware_from_outside() -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    inner = FastAPI()
    calls: list[int] = []

    @inner.exception_handler(RequestValidationError)
    def invalid(request: Any, exc: Exception) -> JSONResponse:  # a sync handler
        return JSONResponse({"mine": True}, status_code=400)

    @inner.post("/pay", status_code=201)
    async def pay(payment: Payment) -> dict[str, int]:
        calls.append(payment.amount)
        return {"n": len(calls)}

    app = IdempotencyMiddleware(inner, config(MemoryStore()))  # wrapping the app from outside
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        k = key()
        bad = await client.post("/pay", json={}, headers=k)
        assert (bad.status_code, bad.json()) == (400, {"mine": True})
        assert (await client.post("/pay", json={"amount": 1}, headers=k)).status_code == 201
    assert calls == [1]


async def test_starlette_router_refusals_do_not_use_up_the_key() -> None:
    from starlette.applications import Starlette
    from starlette.endpoints import HTTPEndpoint
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Mount, Route

    async def orders(request: Request) -> Response:
        return Response("made", status_code=201)

    class ReadOnly(HTTPEndpoint):
        async def get(self, request: Request) -> Response:
            return Response("read")

    store = MemoryStore()
    inner = Starlette(
        routes=[
            Route("/orders", orders, methods=["GET"]),
            Route("/read-only", ReadOnly),
            Mount("/v1", routes=[Route("/orders/", orders, methods=["POST"])]),
        ]
    )
    app = IdempotencyMiddleware(inner, config(store))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        k = key()
        assert (await client.post("/nowhere", headers=k)).status_code == 404
        assert (await client.post("/orders", headers=k)).status_code == 405
        assert (await client.post("/read-only", headers=k)).status_code == 405
        assert (await client.post("/v1/orders", headers=k)).status_code == 307  # slash redirect
        assert store.list() == []
        made = await client.post("/v1/orders/", headers=k)
        assert made.status_code == 201 and len(store.list()) == 1


def test_flask_refusals_before_the_view_do_not_use_up_the_key() -> None:
    from flask import Flask, request

    from oncely.http.flask import install

    store = MemoryStore()
    app = Flask(__name__)
    calls: list[str] = []

    @app.before_request
    def csrf_like_check() -> Any:
        if request.method == "POST" and request.headers.get("X-Csrf") != "ok":
            return {"error": "csrf"}, 403
        return None

    @app.post("/orders")
    def orders() -> tuple[dict[str, int], int]:
        calls.append("order")
        return {"n": len(calls)}, 201

    @app.get("/read-only")
    def read_only() -> str:
        return "read"

    install(app, config(store))
    client = app.test_client()
    k = key()

    def post(path: str, **kw: Any) -> Any:
        return client.post(path, buffered=True, **kw)  # the body read, as a server does

    refused = post("/orders", headers=k)
    assert refused.status_code == 403 and refused.json == {"error": "csrf"}
    assert store.list() == []
    assert post("/nowhere", headers={**k, "X-Csrf": "ok"}).status_code == 404
    assert post("/read-only", headers={**k, "X-Csrf": "ok"}).status_code == 405
    assert store.list() == []
    made = post("/orders", headers={**k, "X-Csrf": "ok"})
    again = post("/orders", headers={**k, "X-Csrf": "ok"})
    assert made.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert calls == ["order"]


def test_flask_a_view_that_raised_is_kept_as_the_handler_failed_problem() -> None:
    """Red team round 8: Flask answers a view's exception with its own HTML 500 page, which was
    stored and replayed; the retry now gets the documented ``handler-failed`` problem. What
    the app's own error handlers answer (an HTTP error, a mapped exception) is kept as it is."""
    from flask import Flask, abort, request

    from oncely.http.flask import install

    store = MemoryStore()
    app = Flask(__name__)
    calls: list[str] = []

    @app.errorhandler(KeyError)
    def declined(exc: KeyError) -> tuple[dict[str, str], int]:
        return {"error": "declined"}, 402

    @app.errorhandler(500)
    def server_error(exc: Exception) -> tuple[str, int]:
        return "<p>our own 500 page</p>", 500

    @app.after_request
    def audit(response: Any) -> Any:
        if request.path == "/audited":
            raise RuntimeError("the audit log is down")
        return response

    @app.post("/<name>")
    def charge(name: str) -> tuple[dict[str, int], int]:
        calls.append(name)
        if name in ("boom", "boom-again"):
            raise RuntimeError("failed after the money moved")
        if name == "declined":
            raise KeyError("card")
        if name == "teapot":
            abort(418)
        return {"n": len(calls)}, 201

    install(app, config(store))
    client = app.test_client()

    def twice(path: str) -> tuple[Any, Any]:
        k = key()
        first = client.post(path, headers=k, buffered=True)
        return first, client.post(path, headers=k, buffered=True)

    for path in ("/boom", "/audited"):
        first, again = twice(path)
        assert first.status_code == 500 and first.text == "<p>our own 500 page</p>"
        assert again.status_code == 500 and again.headers["idempotent-replayed"] == "true"
        assert again.headers["content-type"] == "application/problem+json"
        assert again.json["type"].endswith("/handler-failed")
    first, again = twice("/declined")
    assert (first.status_code, again.status_code) == (402, 402)
    assert again.json == {"error": "declined"} and again.headers["idempotent-replayed"] == "true"
    first, again = twice("/teapot")
    assert again.status_code == 418 and "problem" not in again.headers["content-type"]
    assert calls == ["boom", "audited", "declined", "teapot"]


def test_django_csrf_403_and_404_do_not_use_up_the_key() -> None:
    from django.core.wsgi import get_wsgi_application

    from oncely.http.django import install

    from http_apps import django_site

    store = MemoryStore()
    application = install(get_wsgi_application(), config(store))
    transport = httpx.WSGITransport(app=application)
    with httpx.Client(transport=transport, base_url="http://t") as c:
        k = key()
        refused = c.post("/comment", headers=k)
        assert refused.status_code == 403  # Django's CSRF failure page
        assert c.post("/nowhere", headers=k).status_code == 404
        assert store.list() == []
        csrf = c.get("/csrf").json()["token"]
        made = c.post("/comment", headers={**k, "X-CSRFToken": csrf})
        again = c.post("/comment", headers={**k, "X-CSRFToken": csrf})
        assert made.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert django_site.calls.get("comment") == 1


def test_django_install_keeps_a_view_exception_as_the_handler_failed_problem() -> None:
    """Red team round 8, the older ``install()`` (WSGI middleware + ``ViewStartMiddleware``):
    the retry replayed Django's HTML 500 page; now the documented problem."""
    from django.core.wsgi import get_wsgi_application

    from oncely.http.django import install

    from http_apps import django_site

    django_site.calls.pop("boom", None)
    application = install(get_wsgi_application(), config(MemoryStore()))
    transport = httpx.WSGITransport(app=application)
    with httpx.Client(transport=transport, base_url="http://t") as c:
        k = key()
        first = c.post("/boom", headers=k)
        again = c.post("/boom", headers=k)
    assert first.status_code == 500 and "html" in first.headers["content-type"]
    assert again.status_code == 500 and again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["type"].endswith("/handler-failed")
    assert django_site.calls["boom"] == 1


def test_django_install_requires_the_view_start_middleware() -> None:
    from django.core.wsgi import get_wsgi_application
    from django.test import override_settings

    from oncely.http.django import install

    from http_apps import django_site  # noqa: F401  (configures settings)

    with (
        override_settings(MIDDLEWARE=[]),
        pytest.raises(ConfigurationError, match="ViewStartMiddleware"),
    ):
        install(get_wsgi_application(), config(MemoryStore()))
    late = [
        "oncely.http.django.ViewStartMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
    ]
    with override_settings(MIDDLEWARE=late), pytest.raises(ConfigurationError, match="after"):
        install(get_wsgi_application(), config(MemoryStore()))


# -- token decorators on every unsafe method (issue 7 item 4) -------------------------------------
def test_framework_token_markers_guard_every_unsafe_method() -> None:
    from flask import Flask

    from oncely.http.flask import install, require_token

    store = MemoryStore()
    tokens = Tokens(SECRET, store)
    app = Flask(__name__)
    calls: list[str] = []

    @app.route("/item", methods=["GET", "PUT", "DELETE"])
    @require_token("edit")
    def item() -> str:
        calls.append("item")
        return "ok"

    install(app, config(store, tokens=tokens))
    client = app.test_client()
    for method in ("PUT", "DELETE"):
        reply = client.open("/item", method=method, buffered=True)
        assert reply.status_code == 400 and reply.json["type"].endswith("token-missing")
        token = tokens.issue("", "edit")
        assert client.open(
            "/item", method=method, headers={"Oncely-Token": token}, buffered=True
        ).status == ("200 OK")
    assert client.get("/item").status_code == 200
    assert calls == ["item", "item", "item"]
