"""FastAPI and Starlette (issue 14 item 2): the OpenAPI document of protected routes, start-up
failures for a missing, doubled or misplaced middleware."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from openapi_spec_validator import validate
from pydantic import BaseModel

from oncely.errors import ConfigurationError
from oncely.http import (
    GLOBAL,
    IdempotencyConfig,
    IdempotencyMiddleware,
    Rule,
    TokenGuard,
    idempotent_route,
)
from oncely.http.fastapi import Idempotency, RequireToken
from oncely.stores.memory import MemoryStore
from oncely.tokens import Tokens

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
]
TESTS = Path(__file__).parent


def client_for(app: Any) -> Any:
    from fastapi.testclient import TestClient

    return TestClient(app)


class Payment(BaseModel):
    amount: int


def shop(**options: Any) -> FastAPI:
    store = MemoryStore()
    app = FastAPI()
    config = IdempotencyConfig(
        store=store,
        scope=GLOBAL,
        exclude=["/internal/**"],
        routes={"/optional": Rule(required=False)},
        tokens=TokenGuard(tokens=Tokens("t" * 32, store), subject=GLOBAL),
        **options,
    )
    app.add_middleware(IdempotencyMiddleware, config=config)

    @app.post("/payments", status_code=201)
    async def pay(
        payment: Payment,
        info: Annotated[Any, Depends(Idempotency(fingerprint=["amount"]))],
    ) -> dict[str, int]:
        return {"amount": payment.amount}

    @app.patch("/orders/{order_id}")
    async def change(order_id: int) -> dict[str, int]:
        return {"order": order_id}

    @app.get("/orders/{order_id}")
    async def read(order_id: int) -> dict[str, int]:
        return {"order": order_id}

    @app.post("/internal/sync")
    async def internal() -> dict[str, str]:
        return {}

    @app.post("/optional")
    async def optional() -> dict[str, str]:
        return {}

    @app.post("/checkout", dependencies=[Depends(RequireToken("checkout"))])
    async def checkout() -> dict[str, str]:
        return {}

    @app.post("/off")
    @idempotent_route(enabled=False)
    async def off() -> dict[str, str]:
        return {}

    return app


def header(operation: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next(
        (p for p in operation.get("parameters", []) if p["in"] == "header" and p["name"] == name),
        None,
    )


def check_document(schema: dict[str, Any]) -> None:
    validate(schema)  # a valid OpenAPI 3.1 document
    paths = schema["paths"]
    pay = paths["/payments"]["post"]
    key = header(pay, "Idempotency-Key")
    assert key is not None and key["required"] is True
    assert key["schema"] == {"type": "string", "minLength": 1, "maxLength": 255}
    for status in ("400", "409", "422", "503"):
        content = pay["responses"][status]["content"]
        assert content["application/problem+json"]["schema"] == {
            "$ref": "#/components/schemas/OncelyProblem"
        }
    # FastAPI's own validation 422 is still documented beside ours
    assert "application/json" in pay["responses"]["422"]["content"]
    assert "Retry-After" in pay["responses"]["409"]["headers"]
    assert "Idempotent-Replayed" in pay["responses"]["201"]["headers"]
    problem = schema["components"]["schemas"]["OncelyProblem"]
    assert set(problem["required"]) == {"type", "title", "status"}

    change = paths["/orders/{order_id}"]["patch"]
    assert header(change, "Idempotency-Key")["required"] is True  # type: ignore[index]
    assert header(paths["/optional"]["post"], "Idempotency-Key")["required"] is False  # type: ignore[index]
    untouched = [
        paths["/orders/{order_id}"]["get"],  # a safe method
        paths["/internal/sync"]["post"],  # excluded
        paths["/off"]["post"],  # the view turns it off
    ]
    for operation in untouched:
        assert header(operation, "Idempotency-Key") is None
        assert "503" not in operation["responses"]
    checkout = paths["/checkout"]["post"]
    token = header(checkout, "Oncely-Token")
    assert token is not None and "checkout" in token["description"]
    assert "application/problem+json" in checkout["responses"]["403"]["content"]


def test_openapi_documents_every_protected_operation() -> None:
    app = shop()
    check_document(app.openapi())  # before any request: found in app.user_middleware
    assert app.openapi() is app.openapi()  # amended once, cached as FastAPI caches it


def test_openapi_of_an_app_wrapped_from_outside_and_swagger_uses_the_header() -> None:
    inner = shop()
    app = IdempotencyMiddleware(inner, IdempotencyConfig(store=MemoryStore(), scope=GLOBAL))
    inner.user_middleware.clear()  # only the outside middleware protects it now
    with client_for(app) as client:
        schema = client.get("/openapi.json").json()
        pay = schema["paths"]["/payments"]["post"]
        parameter = header(pay, "Idempotency-Key")
        assert parameter is not None
        assert "/openapi.json" in client.get("/docs").text  # Swagger UI reads this document
        # What Swagger's "Try it out" sends: the documented header, with the example value.
        sent = {parameter["name"]: f'"{uuid.uuid4()}"'}
        first = client.post("/payments", json={"amount": 3}, headers=sent)
        again = client.post("/payments", json={"amount": 3}, headers=sent)
    assert first.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    validate(schema)


def test_depends_without_the_middleware_fails_at_start_up() -> None:
    app = FastAPI()

    @app.post("/pay")
    async def pay(info: Annotated[Any, Depends(Idempotency())]) -> dict[str, str]:
        return {}

    expected = r"add app\.add_middleware\(IdempotencyMiddleware"
    with pytest.raises(ConfigurationError, match=expected), client_for(app):
        pass


def test_depends_with_the_middleware_outside_the_app_starts() -> None:
    inner = FastAPI()

    @inner.post("/pay")
    async def pay(info: Annotated[Any, Depends(Idempotency())]) -> dict[str, Any]:
        return {"key": info.key}

    app = IdempotencyMiddleware(inner, IdempotencyConfig(store=MemoryStore(), scope=GLOBAL))
    with client_for(app) as client:
        assert client.post("/pay", headers={"Idempotency-Key": "k1"}).json() == {"key": "k1"}


def test_the_middleware_twice_fails_at_start_up() -> None:
    app = shop()
    app.add_middleware(IdempotencyMiddleware, config=IdempotencyConfig(scope=GLOBAL))
    with pytest.raises(ConfigurationError, match="installed twice"), client_for(app):
        pass
    outside = IdempotencyMiddleware(shop(), IdempotencyConfig(store=MemoryStore(), scope=GLOBAL))
    with pytest.raises(ConfigurationError, match="installed twice"), client_for(outside):
        pass


def test_compression_inside_the_middleware_fails_at_start_up() -> None:
    from starlette.middleware.gzip import GZipMiddleware

    wrong = FastAPI()
    wrong.add_middleware(GZipMiddleware)
    wrong.add_middleware(IdempotencyMiddleware, config=IdempotencyConfig(scope=GLOBAL))
    with pytest.raises(ConfigurationError, match="GZipMiddleware runs inside"), client_for(wrong):
        pass
    right = FastAPI()

    @right.post("/big")
    async def big() -> dict[str, str]:
        return {"text": "x" * 5000}

    right.add_middleware(
        IdempotencyMiddleware, config=IdempotencyConfig(store=MemoryStore(), scope=GLOBAL)
    )
    right.add_middleware(GZipMiddleware)
    with client_for(right) as client:
        k = {"Idempotency-Key": "k"}
        zipped = client.post("/big", headers={**k, "Accept-Encoding": "gzip"})
        plain = client.post("/big", headers={**k, "Accept-Encoding": "identity"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert (
        plain.headers["idempotent-replayed"] == "true" and "content-encoding" not in plain.headers
    )
    assert plain.json() == zipped.json()


def test_uvicorn_refuses_to_start_an_app_without_the_middleware(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "src")])}
    command = [
        sys.executable, "-m", "uvicorn", "http_apps.server_app:fastapi_unprotected",
        "--host", "127.0.0.1", "--port", "0", "--log-level", "error",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "add app.add_middleware(IdempotencyMiddleware" in done.stdout + done.stderr


def test_starlette_apps_are_checked_at_start_up_too() -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware

    config = IdempotencyConfig(store=MemoryStore(), scope=GLOBAL)
    app = Starlette(
        middleware=[Middleware(IdempotencyMiddleware, config=config), Middleware(GZipMiddleware)]
    )
    with pytest.raises(ConfigurationError, match="GZipMiddleware"), client_for(app):
        pass


def test_middleware_options_are_checked_by_name_type_and_unit() -> None:
    from oncely.http import WSGIIdempotencyMiddleware

    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, scope=GLOBAL, stor="memory://")
    with pytest.raises(ConfigurationError, match="did you mean 'store'"), client_for(app):
        pass
    with pytest.raises(ConfigurationError, match="did you mean 'config'"):
        WSGIIdempotencyMiddleware(lambda environ, start: [], confg=None)
    with pytest.raises(ConfigurationError, match="lease='30 jiffies' is not valid"):
        IdempotencyMiddleware(FastAPI(), scope=GLOBAL, lease="30 jiffies")
