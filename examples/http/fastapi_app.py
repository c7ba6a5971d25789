"""FastAPI behind oncely: an Idempotency-Key on payments, a one-time token on checkout.

    python examples/http/fastapi_app.py           # a self-check, in process, printing each step
    python examples/http/fastapi_app.py --serve   # uvicorn on http://127.0.0.1:8000

Store: ``$ONCELY_STORE`` (e.g. ``redis://localhost:6379/0``), else in-memory.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from oncely.http import (
    IdempotencyConfig,
    IdempotencyInfo,
    IdempotencyMiddleware,
    TokenGuard,
    scope_from_header,
)
from oncely.http.fastapi import Idempotency, RequireToken
from oncely.stores import open_store
from oncely.tokens import Tokens

store = open_store(os.environ.get("ONCELY_STORE", "memory://"))
tokens = Tokens(os.environ.get("ONCELY_TOKEN_SECRET", "example-secret-change-me!"), store)
config = IdempotencyConfig(
    store=store,
    # each static API key has its own key space (stored as a digest, never the key itself);
    # tokens are bound to it too. Clients with refreshed bearer tokens: scope by the user
    # (scope_from_user), or a retry after a refresh runs again (docs/http.md, Scope)
    scope=scope_from_header("X-Api-Key"),
    tokens=TokenGuard(tokens=tokens, endpoint="/tokens", purposes=["checkout"]),
)

app = FastAPI()
app.add_middleware(IdempotencyMiddleware, config=config)
payments: list[dict[str, object]] = []
orders: list[str] = []


class Payment(BaseModel):
    amount: int
    currency: str
    note: str = ""


@app.post("/payments", status_code=201)
async def pay(
    payment: Payment,
    info: Annotated[
        IdempotencyInfo | None, Depends(Idempotency(fingerprint=["amount", "currency"]))
    ],
) -> dict[str, object]:
    payments.append(payment.model_dump())
    return {"payment": len(payments), "amount": payment.amount, "key": info and info.key}


@app.post("/checkout", status_code=201, dependencies=[Depends(RequireToken("checkout"))])
async def checkout() -> dict[str, object]:
    orders.append("order")
    return {"order": len(orders)}


async def demo() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
        key = {"Idempotency-Key": f'"{uuid.uuid4()}"', "X-Api-Key": "shop-1"}
        invalid = await client.post("/payments", json={"amount": "five"}, headers=key)
        print("invalid ", invalid.status_code, "(FastAPI's validation; the key is not used up)")
        first = await client.post("/payments", json={"amount": 5, "currency": "EUR"}, headers=key)
        print("first   ", first.status_code, first.json())
        retry = await client.post(
            "/payments", json={"amount": 5, "currency": "EUR", "note": "retry"}, headers=key
        )
        print("retry   ", retry.status_code, retry.json(), retry.headers["idempotent-replayed"])
        changed = await client.post("/payments", json={"amount": 6, "currency": "EUR"}, headers=key)
        print("changed ", changed.status_code, changed.json()["type"])
        missing = await client.post(
            "/payments",
            json={"amount": 5, "currency": "EUR"},
            headers={"X-Api-Key": "shop-1"},
        )
        print("no key  ", missing.status_code, missing.json()["type"])
        assert (invalid.status_code, first.status_code, retry.status_code) == (422, 201, 201)
        assert (changed.status_code, missing.status_code) == (422, 400)
        assert len(payments) == 1

        token = (await client.get("/tokens", params={"purpose": "checkout"})).json()["token"]
        submit = await client.post("/checkout", headers={"Oncely-Token": token})
        double = await client.post("/checkout", headers={"Oncely-Token": token})
        print(
            "checkout",
            submit.status_code,
            "double submit",
            double.status_code,
            double.json()["type"],
        )
        assert (submit.status_code, double.status_code) == (201, 409) and len(orders) == 1
    print("fastapi example: ok")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=8000)
    else:
        asyncio.run(demo())
