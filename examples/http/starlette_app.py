"""Starlette behind oncely: a marked endpoint, a streamed report replayed byte for byte.

    python examples/http/starlette_app.py           # a self-check, in process
    python examples/http/starlette_app.py --serve   # uvicorn on http://127.0.0.1:8000

Store: ``$ONCELY_STORE`` (e.g. ``redis://localhost:6379/0``), else in-memory.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from oncely.http import (
    IdempotencyConfig,
    IdempotencyMiddleware,
    idempotent_route,
    scope_from_header,
)

config = IdempotencyConfig(
    store=os.environ.get("ONCELY_STORE", "memory://"),
    scope=scope_from_header("X-Api-Key"),  # each static API key: its own key space
    exclude=["/health"],
)
transfers: list[int] = []


@idempotent_route(fingerprint=["amount", "to"], wait=5)  # duplicates wait for the first one
async def transfer(request: Request) -> Response:
    body = await request.json()
    await asyncio.sleep(0.2)  # pretend to talk to a bank
    transfers.append(body["amount"])
    return JSONResponse(
        {"transfer": len(transfers)},
        status_code=201,
        headers={"Location": f"/transfers/{len(transfers)}"},
    )


async def report(request: Request) -> Response:
    async def rows() -> AsyncIterator[bytes]:
        for i in range(1000):
            yield f"row {i}\n".encode()

    return StreamingResponse(rows(), media_type="text/plain")


async def health(request: Request) -> Response:
    return Response("ok")


app = Starlette(
    routes=[
        Route("/transfers", transfer, methods=["POST"]),
        Route("/reports", report, methods=["POST"]),
        Route("/health", health, methods=["GET", "POST"]),
    ],
    middleware=[Middleware(IdempotencyMiddleware, config=config)],
)


async def demo() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
        key = {"Idempotency-Key": f'"{uuid.uuid4()}"', "X-Api-Key": "key-1"}
        body = {"amount": 10, "to": "acct-9"}
        # three copies of the same request at once: one transfer, two replays
        replies = await asyncio.gather(
            *[client.post("/transfers", json=body, headers=key) for _ in range(3)]
        )
        print(
            "transfers",
            [r.status_code for r in replies],
            [r.headers.get("idempotent-replayed") for r in replies],
        )
        assert len(transfers) == 1 and all(r.status_code == 201 for r in replies)
        assert all(r.headers["location"] == "/transfers/1" for r in replies)

        key = {"Idempotency-Key": "report-2024-01"}  # a bare key works too (anonymous scope)
        first = await client.post("/reports", headers=key)
        again = await client.post("/reports", headers=key)
        print(
            "report", len(first.content), "bytes; replay identical:", first.content == again.content
        )
        assert first.content == again.content and again.headers["idempotent-replayed"] == "true"
        assert (await client.post("/health")).status_code == 200  # excluded: no key needed
    print("starlette example: ok")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=8000)
    else:
        asyncio.run(demo())
