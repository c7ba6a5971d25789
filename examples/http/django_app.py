"""Django behind oncely, the Django way, in one file: the middleware in ``MIDDLEWARE``,
``settings.ONCELY``, an idempotent view, a streamed report and a one-time-token form.

    python examples/http/django_app.py                      # a self-check, WSGI and ASGI
    python examples/http/django_app.py --serve [PORT]       # WSGI (wsgiref, as runserver)
    python examples/http/django_app.py --serve-asgi [PORT]  # ASGI (uvicorn)

In a project the settings below go to ``settings.py``; nothing else changes (``wsgi.py`` and
``asgi.py`` stay as Django made them). With ``"store": "django"`` the records live in the
project's database (``manage.py migrate`` creates the table).

Store: ``$ONCELY_STORE`` (e.g. ``redis://localhost:6379/0``), else in-memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Iterator

import django
import httpx
from django.conf import settings

from oncely.http import TokenGuard, scope_from_cookie
from oncely.stores import open_store
from oncely.tokens import Tokens

store = open_store(os.environ.get("ONCELY_STORE", "memory://"))
tokens = Tokens(os.environ.get("ONCELY_TOKEN_SECRET", "example-secret-change-me!"), store)

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    INSTALLED_APPS=["oncely.contrib.django"],  # migration, manage.py oncely, system checks
    MIDDLEWARE=[
        "django.middleware.csrf.CsrfViewMiddleware",
        "oncely.http.django.IdempotencyMiddleware",  # last
    ],
    ONCELY={
        "store": store,  # or "django" (the project's database), or a URL
        # each session has its own key space; tokens are bound to the session too
        "scope": scope_from_cookie("sessionid"),
        "tokens": TokenGuard(tokens=tokens, endpoint="/tokens", purposes=["vote"]),
        "exclude": ["/admin/**"],
    },
)
django.setup()

from django.http import (  # noqa: E402
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

from oncely.http import idempotent_route  # noqa: E402
from oncely.http.django import require_token  # noqa: E402

refunds: list[dict[str, object]] = []
votes: list[str] = []
reports: list[int] = []


@csrf_exempt
@idempotent_route(fingerprint=["payment_id", "amount"])
def refund(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body)
    refunds.append(body)
    return JsonResponse({"refund": len(refunds)}, status=201)


@csrf_exempt
def report(request: HttpRequest) -> HttpResponse:
    reports.append(1)

    def rows() -> Iterator[bytes]:
        for i in range(3):
            yield f"row {i}\n".encode()

    return StreamingHttpResponse(rows(), content_type="text/plain")


@csrf_exempt
@require_token("vote")
def vote(request: HttpRequest) -> HttpResponse:
    votes.append(request.POST["choice"])
    return JsonResponse({"votes": len(votes)}, status=201)


urlpatterns = [path("refunds", refund), path("reports", report), path("votes", vote)]


async def demo(client: httpx.AsyncClient, face: str) -> None:
    before = (len(refunds), len(votes), len(reports))
    key = {"Idempotency-Key": f'"{uuid.uuid4()}"'}
    body = {"payment_id": "p-1", "amount": 3, "reason": "damaged"}
    first = await client.post("/refunds", json=body, headers=key)
    retry = await client.post("/refunds", json={**body, "reason": "broken"}, headers=key)
    print(
        face, "refund", first.status_code, retry.status_code, retry.headers["idempotent-replayed"]
    )

    key = {"Idempotency-Key": f'"{uuid.uuid4()}"'}
    streamed = await client.post("/reports", headers=key)
    again = await client.post("/reports", headers=key)
    assert again.text == streamed.text and again.headers["idempotent-replayed"] == "true"

    token = (await client.post("/tokens", params={"purpose": "vote"})).json()["token"]
    data = {"oncely_token": token, "choice": "yes"}
    submit = await client.post("/votes", data=data)
    double = await client.post("/votes", data=data)
    print(face, "vote", submit.status_code, "double submit", double.status_code)
    assert (submit.status_code, double.status_code) == (201, 409)
    assert (len(refunds), len(votes), len(reports)) == (before[0] + 1, before[1] + 1, before[2] + 1)


async def check() -> None:
    from asgiref.wsgi import WsgiToAsgi
    from django.core.asgi import get_asgi_application
    from django.core.wsgi import get_wsgi_application

    faces = {
        "wsgi": WsgiToAsgi(get_wsgi_application()),  # Django's WSGI handler, sync middleware
        "asgi": get_asgi_application(),  # Django's ASGI handler, async middleware
    }
    for face, app in faces.items():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            await demo(client, face)
    print("django example: ok")


if __name__ == "__main__":
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8000
    if "--serve" in sys.argv:
        from wsgiref.simple_server import make_server

        from django.core.wsgi import get_wsgi_application

        make_server("127.0.0.1", port, get_wsgi_application()).serve_forever()
    elif "--serve-asgi" in sys.argv:
        import uvicorn
        from django.core.asgi import get_asgi_application

        uvicorn.run(get_asgi_application(), host="127.0.0.1", port=port, log_level="warning")
    else:
        asyncio.run(check())
