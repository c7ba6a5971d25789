"""The apps real servers run in ``test_http_servers.py`` (Uvicorn: ASGI, Gunicorn: WSGI).

Configured by environment variables, read in every worker process:

* ``SERVER_APP_STORE`` / ``SERVER_APP_STORE_OPTIONS`` (JSON): the store every worker opens;
* ``SERVER_APP_LOG``: a file that gets one line per real handler execution (appended with
  ``O_APPEND``, so lines from all workers add up);
* ``SERVER_APP_SLEEP``: how long the handler works, in seconds;
* ``SERVER_APP_LEASE``: the lease, in seconds (default 5);
* ``SERVER_APP_GO_ON``: a file whose creation ends ``POST /blocking``.

Routes: ``POST /orders`` (works, then 201); ``POST /blocking`` (blocks its event loop with
``time.sleep`` until ``SERVER_APP_GO_ON`` exists, then 201); ``POST /report`` (streams 400
chunks of 1000 bytes, a little at a time); ``POST /echo`` on the Flask app (the body the view
read); ``POST /pay`` on ``fastapi_app`` (a body model FastAPI validates); ``POST /guarded`` on
the Flask app (a ``before_request`` check refuses it with 403 unless ``X-Csrf: ok``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator

from fastapi import Depends, FastAPI
from flask import Flask, jsonify
from flask import Response as FlaskResponse
from flask import request as flask_request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from oncely.http import IdempotencyConfig, IdempotencyInfo, IdempotencyMiddleware, scope_from_header
from oncely.http.fastapi import Idempotency
from oncely.http.flask import install
from oncely.stores import open_store

STORE = open_store(
    os.environ.get("SERVER_APP_STORE", "memory://"),
    **json.loads(os.environ.get("SERVER_APP_STORE_OPTIONS", "{}")),
)
LOG = os.environ.get("SERVER_APP_LOG", os.devnull)
SLEEP = float(os.environ.get("SERVER_APP_SLEEP", "0.3"))
LEASE = float(os.environ.get("SERVER_APP_LEASE", "5"))
CONFIG = IdempotencyConfig(store=STORE, scope=scope_from_header("Authorization"), lease=LEASE)
#: ``POST /blocking`` blocks its event loop until this file exists (at most 20 s).
GO_ON = os.environ.get("SERVER_APP_GO_ON", "")


def record_execution() -> None:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


async def create_order(request: Request) -> Response:
    await request.body()
    record_execution()
    await asyncio.sleep(SLEEP)
    return JSONResponse({"pid": os.getpid()}, status_code=201, headers={"Location": "/orders/1"})


async def blocking(request: Request) -> Response:
    """A sync SDK call inside async def: the worker's event loop runs nothing until it ends."""
    await request.body()
    record_execution()
    deadline = time.monotonic() + 20
    while not os.path.exists(GO_ON) and time.monotonic() < deadline:
        time.sleep(0.02)
    return JSONResponse({"pid": os.getpid()}, status_code=201)


async def health(request: Request) -> Response:
    return PlainTextResponse(str(os.getpid()))


CHUNK = b"r" * 1000


async def report(request: Request) -> Response:
    record_execution()

    async def rows() -> AsyncIterator[bytes]:
        for _ in range(400):
            yield CHUNK
            await asyncio.sleep(0.005)

    return StreamingResponse(rows(), media_type="text/plain")


asgi_app = Starlette(
    routes=[
        Route("/orders", create_order, methods=["POST"]),
        Route("/report", report, methods=["POST"]),
        Route("/blocking", blocking, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ],
    middleware=[Middleware(IdempotencyMiddleware, config=CONFIG)],
)

fastapi_app = FastAPI()
fastapi_app.add_middleware(IdempotencyMiddleware, config=CONFIG)


class Payment(BaseModel):
    amount: int


@fastapi_app.post("/pay", status_code=201)
async def pay(payment: Payment) -> dict[str, int]:
    record_execution()
    return {"amount": payment.amount}


@fastapi_app.get("/health")
async def fastapi_health() -> str:
    return str(os.getpid())


flask_app = Flask(__name__)


@flask_app.post("/orders")
def create_order_sync():  # type: ignore[no-untyped-def]
    record_execution()
    time.sleep(SLEEP)
    return jsonify(pid=os.getpid()), 201, {"Location": "/orders/1"}


@flask_app.post("/echo")
def echo_sync():  # type: ignore[no-untyped-def]
    """What the view sees of the request body (Werkzeug reads ``wsgi.input`` its own way)."""
    record_execution()
    return jsonify(body=flask_request.get_data(as_text=True), json=flask_request.get_json()), 201


@flask_app.get("/health")
def health_sync() -> str:
    return str(os.getpid())


@flask_app.post("/report")
def report_sync() -> FlaskResponse:
    record_execution()

    def rows() -> Iterator[bytes]:
        for _ in range(400):
            yield CHUNK
            time.sleep(0.005)

    return FlaskResponse(rows(), mimetype="text/plain")


@flask_app.before_request
def csrf_like_check():  # type: ignore[no-untyped-def]
    if flask_request.path == "/guarded" and flask_request.headers.get("X-Csrf") != "ok":
        return jsonify(error="csrf"), 403
    return None


@flask_app.post("/guarded")
def guarded():  # type: ignore[no-untyped-def]
    record_execution()
    return jsonify(done=True), 201


install(flask_app, CONFIG)
wsgi_app = flask_app

#: Marked for oncely without the middleware: uvicorn must refuse to start it.
fastapi_unprotected = FastAPI()


@fastapi_unprotected.post("/pay")
async def unprotected_pay(info: IdempotencyInfo | None = Depends(Idempotency())) -> dict[str, str]:  # noqa: B008
    return {}
