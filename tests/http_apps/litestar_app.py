"""A Litestar app behind oncely's plugin, in process (``litestar.testing.TestClient``) and under
Uvicorn (``http_apps.litestar_app:app``); configured by the environment like ``server_app``.

Routes: ``POST /orders`` (works, then 201); ``POST /pay`` (a body Litestar validates: 400
before the handler; its rule fingerprints ``amount`` only); ``POST /guarded`` (a guard refuses
it with 401 unless ``X-Allow: yes``); ``POST /denied`` (the handler itself refuses with 403 after
working); ``POST /boom`` (raises: 500); ``POST /unserialisable``, ``POST /audited``,
``POST /committed`` (the handler ran, then Litestar failed: its return value is not JSON, an
``after_request`` hook or a dependency's cleanup raises); ``POST /hooked`` (a ``before_request``
hook answers instead of the handler with ``X-Maintenance``); ``POST /problem`` (an
HttpProblem); ``POST /off`` (``opt={"idempotency": False}``); ``POST /report`` (streams 400
lines); ``GET /health``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.params import Body
from litestar.response import Stream

from oncely.errors import HttpProblem
from oncely.http import IdempotencyConfig, scope_from_header
from oncely.http.litestar import IdempotencyPlugin
from oncely.stores import open_store

from http_apps.executions import count

SLEEP = float(os.environ.get("SERVER_APP_SLEEP", "0"))


@dataclass
class Payment:
    amount: int
    note: str = ""


def allow(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    if connection.headers.get("x-allow") != "yes":
        raise NotAuthorizedException("say X-Allow: yes")


@post("/orders", status_code=201)
async def orders() -> dict[str, int]:
    n = count("orders")
    await asyncio.sleep(SLEEP)
    return {"order": n}


@post("/pay", status_code=201, opt={"idempotency": {"fingerprint": ["amount"]}})
async def pay(data: Annotated[Payment, Body()]) -> dict[str, int]:
    return {"n": count("pay"), "amount": data.amount}


@post("/guarded", status_code=201, guards=[allow])
async def guarded() -> dict[str, int]:
    return {"n": count("guarded")}


@post("/denied", sync_to_thread=True)
def denied() -> None:  # a sync handler (run in a thread) that refuses after working
    count("denied")
    raise PermissionDeniedException("no more")


@post("/boom")
async def boom() -> None:
    count("boom")
    raise RuntimeError("boom")


@post("/problem")
async def problem() -> None:
    count("problem")
    raise HttpProblem(409, "out-of-stock", "Out of stock", "none left", remaining=0)


class Unserialisable:
    """Not JSON: Litestar fails to turn the handler's return value into a response."""


@post("/unserialisable", status_code=201)
async def unserialisable() -> dict[str, object]:
    count("unserialisable")
    return {"charged": Unserialisable()}


async def audit(response: Response) -> Response:
    raise RuntimeError("the audit log is down")


@post("/audited", status_code=201, after_request=audit)
async def audited() -> dict[str, int]:
    return {"n": count("audited")}


async def session() -> AsyncIterator[str]:
    yield "session"
    raise RuntimeError("the commit failed in the dependency's cleanup")


@post("/committed", status_code=201, dependencies={"db": Provide(session)})
async def committed(db: str) -> dict[str, int]:  # an inferred dependency (all 2.x)
    return {"n": count("committed")}


async def maintenance(request: Request) -> dict[str, str] | None:
    return {"maintenance": "yes"} if request.headers.get("x-maintenance") else None


@post("/hooked", status_code=201, before_request=maintenance)
async def hooked() -> dict[str, int]:
    return {"n": count("hooked")}


@post("/off", status_code=201, opt={"idempotency": False})
async def off() -> dict[str, int]:
    return {"n": count("off")}


@post("/report")
async def report() -> Stream:
    count("report")

    async def rows() -> AsyncIterator[bytes]:
        for _ in range(400):
            yield b"r" * 999 + b"\n"
            await asyncio.sleep(0.005)

    return Stream(rows(), media_type="text/plain")


@get("/health")
async def health() -> str:
    return str(os.getpid())


def make_app(config: IdempotencyConfig) -> Litestar:
    handlers = [orders, pay, guarded, denied, boom, problem, off, report, health]
    handlers += [unserialisable, audited, committed, hooked]
    return Litestar(handlers, plugins=[IdempotencyPlugin(config)])


app = make_app(
    IdempotencyConfig(
        store=open_store(
            os.environ.get("SERVER_APP_STORE", "memory://"),
            **json.loads(os.environ.get("SERVER_APP_STORE_OPTIONS", "{}")),
        ),
        scope=scope_from_header("Authorization"),
        lease=5.0,
    )
)
