"""Flask behind oncely (WSGI): an Idempotency-Key on orders, a one-time token on a form.

    python examples/http/flask_app.py           # a self-check, in process
    python examples/http/flask_app.py --serve   # http://127.0.0.1:8000 (wsgiref)

Store: ``$ONCELY_STORE`` (e.g. ``redis://localhost:6379/0``), else a SQLite file in a
temporary directory.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid

import httpx
from flask import Flask, jsonify, request

from oncely.http import IdempotencyConfig, TokenGuard, idempotent_route, scope_from_header
from oncely.http.flask import install, require_token
from oncely.stores import open_store
from oncely.tokens import Tokens

store = open_store(
    os.environ.get("ONCELY_STORE") or f"sqlite:///{tempfile.mkdtemp()}/oncely-example.db"
)
tokens = Tokens(os.environ.get("ONCELY_TOKEN_SECRET", "example-secret-change-me!"), store)
app = Flask(__name__)
install(
    app,
    IdempotencyConfig(
        store=store,
        # X-User is set by the authenticating proxy in front of this app: one key space per user
        scope=scope_from_header("X-User"),
        required=False,  # keys are optional here; routes below opt in
        tokens=TokenGuard(tokens=tokens, subject=lambda r: r.header("x-user")),
    ),
)
orders: list[dict[str, object]] = []
comments: list[str] = []


@app.post("/orders")
@idempotent_route(required=True)
def create_order():  # type: ignore[no-untyped-def]
    orders.append(request.get_json())
    return jsonify(order=len(orders)), 201, {"Location": f"/orders/{len(orders)}"}


@app.route("/comments", methods=["GET", "POST"])
@require_token("comment")
def comment():  # type: ignore[no-untyped-def]
    if request.method == "GET":  # render the form with a fresh one-time token
        token = tokens.issue(request.headers.get("X-User", ""), "comment")
        return (
            f'<form method="post"><input type="hidden" name="oncely_token" value="{token}">'
            '<textarea name="text"></textarea></form>'
        )
    comments.append(request.form["text"])
    return "thanks", 201


def demo() -> None:
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://example") as client:
        key = {"Idempotency-Key": str(uuid.uuid4())}
        first = client.post("/orders", json={"item": "book"}, headers=key)
        retry = client.post("/orders", json={"item": "book"}, headers=key)
        print("order", first.status_code, retry.status_code, retry.headers["idempotent-replayed"])
        assert len(orders) == 1 and retry.json() == first.json()
        assert client.post("/orders", json={"item": "book"}).status_code == 400

        user = {"X-User": "alice"}
        page = client.get("/comments", headers=user).text
        token = page.split('value="', 1)[1].split('"', 1)[0]
        data = {"oncely_token": token, "text": "hello"}
        submit = client.post("/comments", data=data, headers=user)
        double = client.post("/comments", data=data, headers=user)  # the double click
        print(
            "comment",
            submit.status_code,
            "double submit",
            double.status_code,
            double.json()["type"],
        )
        assert (submit.status_code, double.status_code) == (201, 409) and comments == ["hello"]
    print("flask example: ok")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        from wsgiref.simple_server import make_server

        make_server("127.0.0.1", 8000, app).serve_forever()
    else:
        demo()
