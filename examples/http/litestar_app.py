"""Litestar behind oncely: the plugin, a per-route rule in ``opt``, a validation refusal that
does not use up the key, and a one-time token on checkout.

    python examples/http/litestar_app.py                 # a self-check, in process
    python examples/http/litestar_app.py --serve [PORT]  # uvicorn on http://127.0.0.1:8000

Store: ``$ONCELY_STORE`` (e.g. ``redis://localhost:6379/0``), else in-memory.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from typing import Annotated

from litestar import Litestar, post
from litestar.params import Body

from oncely.http import IdempotencyConfig, TokenGuard, scope_from_header
from oncely.http.litestar import IdempotencyPlugin
from oncely.stores import open_store
from oncely.tokens import Tokens

store = open_store(os.environ.get("ONCELY_STORE", "memory://"))
tokens = Tokens(os.environ.get("ONCELY_TOKEN_SECRET", "example-secret-change-me!"), store)
payments: list[int] = []
orders: list[str] = []


@dataclass
class Payment:
    amount: int
    currency: str
    note: str = ""


@post("/payments", opt={"idempotency": {"fingerprint": ["amount", "currency"]}})
async def pay(data: Annotated[Payment, Body()]) -> dict[str, int]:
    payments.append(data.amount)
    return {"payment": len(payments), "amount": data.amount}


@post("/checkout", opt={"idempotency": {"token": "checkout"}})
async def checkout() -> dict[str, int]:
    orders.append("order")
    return {"order": len(orders)}


app = Litestar(
    [pay, checkout],
    plugins=[
        IdempotencyPlugin(
            IdempotencyConfig(
                store=store,
                # each API key has its own key space (stored as a digest); tokens too
                scope=scope_from_header("X-Api-Key"),
                tokens=TokenGuard(tokens=tokens, endpoint="/tokens", purposes=["checkout"]),
            )
        )
    ],
)


def demo() -> None:
    from litestar.testing import TestClient

    with TestClient(app) as client:
        key = {"Idempotency-Key": f'"{uuid.uuid4()}"', "X-Api-Key": "shop-1"}
        invalid = client.post("/payments", json={"amount": "five"}, headers=key)
        print("invalid ", invalid.status_code, "(Litestar's validation; the key is not used up)")
        body = {"amount": 5, "currency": "EUR"}
        first = client.post("/payments", json=body, headers=key)
        retry = client.post("/payments", json={**body, "note": "retry"}, headers=key)
        print("first   ", first.status_code, first.json())
        print("retry   ", retry.status_code, retry.json(), retry.headers["idempotent-replayed"])
        changed = client.post("/payments", json={**body, "amount": 6}, headers=key)
        print("changed ", changed.status_code, changed.json()["type"])
        assert (invalid.status_code, first.status_code, retry.status_code) == (400, 201, 201)
        assert changed.status_code == 422 and payments == [5]

        auth = {"X-Api-Key": "shop-1"}
        token = client.get("/tokens", params={"purpose": "checkout"}, headers=auth).json()
        sent = {**auth, "Oncely-Token": token["token"]}
        submit = client.post("/checkout", headers=sent)
        double = client.post("/checkout", headers=sent)
        print("checkout", submit.status_code, "double submit", double.status_code)
        assert (submit.status_code, double.status_code) == (201, 409) and orders == ["order"]
    print("litestar example: ok")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        import uvicorn

        port = int(sys.argv[2]) if len(sys.argv) > 2 else 8000
        uvicorn.run(app, host="127.0.0.1", port=port)
    else:
        demo()
