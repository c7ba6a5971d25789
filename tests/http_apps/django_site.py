"""A Django site for the framework-helper tests (settings configured once per process)."""

from __future__ import annotations

import json

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="tests-only",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
    )
    django.setup()

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views import View

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


urlpatterns = [
    path("pay", pay),
    path("free", free),
    path("api/", include([path("refunds", Refunds.as_view())])),
    path("vote", vote),
]
