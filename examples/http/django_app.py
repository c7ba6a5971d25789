"""Django behind oncely (WSGI), in one file: an idempotent view and a one-time-token form.

    python examples/http/django_app.py           # a self-check, in process
    python examples/http/django_app.py --serve   # http://127.0.0.1:8000 (wsgiref)

In a project, ``"oncely.http.django.ViewStartMiddleware"`` goes last in ``MIDDLEWARE`` (it tells
oncely when a view starts, so a request Django refuses first, e.g. the CSRF 403, does not use up
its key), and the two lines that matter go to ``wsgi.py``::

    application = install(
        get_wsgi_application(),
        IdempotencyConfig(store=..., scope=scope_from_cookie("sessionid")),
    )

Store: ``$ONCELY_STORE`` (e.g. ``redis://localhost:6379/0``), else in-memory.
"""

from __future__ import annotations

import json
import os
import sys
import uuid

import django
import httpx
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=["oncely.http.django.ViewStartMiddleware"],
    INSTALLED_APPS=[],
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from oncely.http import (  # noqa: E402
    IdempotencyConfig,
    TokenGuard,
    idempotent_route,
    scope_from_cookie,
)
from oncely.http.django import install, require_token  # noqa: E402
from oncely.stores import open_store  # noqa: E402
from oncely.tokens import Tokens  # noqa: E402

store = open_store(os.environ.get("ONCELY_STORE", "memory://"))
tokens = Tokens(os.environ.get("ONCELY_TOKEN_SECRET", "example-secret-change-me!"), store)
refunds: list[dict[str, object]] = []
votes: list[str] = []


@idempotent_route(fingerprint=["payment_id", "amount"])
def refund(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body)
    refunds.append(body)
    return JsonResponse({"refund": len(refunds)}, status=201)


@require_token("vote")
def vote(request: HttpRequest) -> HttpResponse:
    votes.append(request.POST["choice"])
    return JsonResponse({"votes": len(votes)}, status=201)


urlpatterns = [path("refunds", refund), path("votes", vote)]

application = install(
    get_wsgi_application(),
    IdempotencyConfig(
        store=store,
        # each session has its own key space; tokens are bound to the session too
        scope=scope_from_cookie("sessionid"),
        tokens=TokenGuard(tokens=tokens, endpoint="/tokens", purposes=["vote"]),
    ),
)


def demo() -> None:
    transport = httpx.WSGITransport(app=application)
    with httpx.Client(transport=transport, base_url="http://example") as client:
        key = {"Idempotency-Key": f'"{uuid.uuid4()}"'}
        body = {"payment_id": "p-1", "amount": 3, "reason": "damaged"}
        first = client.post("/refunds", json=body, headers=key)
        retry = client.post("/refunds", json={**body, "reason": "broken"}, headers=key)
        print("refund", first.status_code, retry.status_code, retry.headers["idempotent-replayed"])
        assert len(refunds) == 1

        token = client.post("/tokens", params={"purpose": "vote"}).json()["token"]
        data = {"oncely_token": token, "choice": "yes"}
        submit = client.post("/votes", data=data)
        double = client.post("/votes", data=data)
        print(
            "vote", submit.status_code, "double submit", double.status_code, double.json()["type"]
        )
        assert (submit.status_code, double.status_code) == (201, 409) and votes == ["yes"]
    print("django example: ok")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        from wsgiref.simple_server import make_server

        make_server("127.0.0.1", 8000, application).serve_forever()
    else:
        demo()
