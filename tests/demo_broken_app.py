"""A deliberately broken Idempotency-Key implementation, for ``oncely probe``'s tests.

It makes the mistakes DESIGN.md lists from real middlewares: check-then-act in process memory
(concurrent duplicates all run), no fingerprint (a changed body replays the old response),
no scope (other credentials get the first caller's response), ``Set-Cookie`` stored and
replayed, a missing or malformed key accepted, plain-text errors, and a handler failure that
leaves the key stuck "in progress" forever.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

_done: dict[str, tuple[int, bytes, dict[str, str]]] = {}
_running: set[str] = set()


async def orders(request: Request) -> Response:
    key = request.headers.get("idempotency-key")
    if key is not None:
        if key in _done:  # check ...
            status, body, headers = _done[key]
            return Response(body, status, headers={**headers, "Idempotent-Replayed": "true"})
        if key in _running:
            return PlainTextResponse("busy", 409)
    await asyncio.sleep(0.05)  # ... then act, much later
    if key is not None:
        _running.add(key)
    if request.headers.get("demo-fault") == "raise":
        return PlainTextResponse("boom", 500)  # and the key stays in _running forever
    body = json.loads(await request.body())
    response = JSONResponse({"order_id": uuid.uuid4().hex, **body}, status_code=201)
    response.set_cookie("session", uuid.uuid4().hex)
    if key is not None:
        _done[key] = (201, response.body, dict(response.headers))
        _running.discard(key)
    return response


app = Starlette(routes=[Route("/orders", orders, methods=["POST"])])
