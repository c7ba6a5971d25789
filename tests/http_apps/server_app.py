"""The apps real servers run in ``test_http_servers.py`` (Uvicorn: ASGI, Gunicorn: WSGI).

Configured by environment variables, read in every worker process:

* ``ONCELY_HTTP_STORE`` / ``ONCELY_HTTP_STORE_OPTIONS`` (JSON): the store every worker opens;
* ``ONCELY_HTTP_LOG``: a file that gets one line per real handler execution (appended with
  ``O_APPEND``, so lines from all workers add up);
* ``ONCELY_HTTP_SLEEP``: how long the handler works, in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from flask import Flask, jsonify
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from oncely.http import IdempotencyConfig, IdempotencyMiddleware
from oncely.http.flask import install
from oncely.stores import open_store

STORE = open_store(
    os.environ.get("ONCELY_HTTP_STORE", "memory://"),
    **json.loads(os.environ.get("ONCELY_HTTP_STORE_OPTIONS", "{}")),
)
LOG = os.environ.get("ONCELY_HTTP_LOG", os.devnull)
SLEEP = float(os.environ.get("ONCELY_HTTP_SLEEP", "0.3"))
CONFIG = IdempotencyConfig(store=STORE, lease=5.0)


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


async def health(request: Request) -> Response:
    return PlainTextResponse(str(os.getpid()))


asgi_app = Starlette(
    routes=[
        Route("/orders", create_order, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ],
    middleware=[Middleware(IdempotencyMiddleware, config=CONFIG)],
)

flask_app = Flask(__name__)


@flask_app.post("/orders")
def create_order_sync():  # type: ignore[no-untyped-def]
    record_execution()
    time.sleep(SLEEP)
    return jsonify(pid=os.getpid()), 201, {"Location": "/orders/1"}


@flask_app.get("/health")
def health_sync() -> str:
    return str(os.getpid())


install(flask_app, CONFIG)
wsgi_app = flask_app
