"""A Django site for the framework-helper tests (settings configured once per process)."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import django
from django.conf import settings

if not settings.configured:
    #: The PostgreSQL schema the "pg" database alias works in.
    PG_SCHEMA = f"oncely_dj_{uuid.uuid4().hex[:10]}"
    # The test database lives in a directory removed when the process ends.
    data = Path(tempfile.mkdtemp(prefix="oncely-django-"))
    atexit.register(shutil.rmtree, data, True)
    settings.configure(
        DEBUG=False,
        SECRET_KEY="tests-only",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        MIDDLEWARE=[
            "django.middleware.csrf.CsrfViewMiddleware",
            "oncely.http.django.ViewStartMiddleware",
        ],
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "oncely.contrib.django",
        ],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(data / "db.sqlite3"),
            },
            # The shared PostgreSQL, in a schema of this process's own (created and dropped
            # by the tests that use it).
            "pg": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "test",
                "USER": "postgres",
                "HOST": "127.0.0.1",
                "PORT": "5432",
                "OPTIONS": {"options": f"-c search_path={PG_SCHEMA}"},
            },
        },
        ONCELY={"store": "memory://", "scope": "oncely.http.GLOBAL"},
    )
    django.setup()

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.urls import include, path
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from oncely.http import idempotent_route
from oncely.http.django import require_token

calls: dict[str, int] = {}


def _count(name: str) -> int:
    calls[name] = calls.get(name, 0) + 1
    return calls[name]


@idempotent_route(fingerprint=["amount"])
def pay(request: HttpRequest) -> HttpResponse:
    return JsonResponse(
        {"n": _count("pay"), "amount": json.loads(request.body)["amount"]}, status=201
    )


def free(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"n": _count("free")})


class Refunds(View):
    @idempotent_route(required=True)
    def post(self, request: HttpRequest) -> HttpResponse:
        return JsonResponse({"n": _count("refund")}, status=201)


@require_token("vote")
def vote(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"n": _count("vote")}, status=201)


def csrf(request: HttpRequest) -> HttpResponse:
    """GET: a CSRF token (and its cookie) for ``/comment``."""
    return JsonResponse({"token": get_token(request)})


def comment(request: HttpRequest) -> HttpResponse:
    """CSRF-protected (no ``csrf_exempt``): Django refuses a POST without the token with 403
    before this view runs."""
    return JsonResponse({"n": _count("comment")}, status=201)


def boom(request: HttpRequest) -> HttpResponse:
    """Raises after its effect: Django answers with its 500 page (``handler500``)."""
    _count("boom")
    raise RuntimeError("failed after the money moved")


urlpatterns = [
    path("boom", csrf_exempt(boom)),
    path("pay", csrf_exempt(pay)),
    path("free", csrf_exempt(free)),
    path("api/", include([path("refunds", csrf_exempt(Refunds.as_view()))])),
    path("vote", csrf_exempt(vote)),
    path("csrf", csrf),
    path("comment", comment),
]
