"""Views and URLs for the Django middleware tests, in process and under real servers.

Every view that does work counts it in ``calls`` and, when ``SERVER_APP_LOG`` names a file,
appends one line to it (so executions add up across server worker processes).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from django.contrib.auth.middleware import AuthenticationMiddleware
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.urls import path
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from oncely.errors import HttpProblem
from oncely.http import idempotent_route
from oncely.http.django import idempotent_view

from http_apps.executions import count

SLEEP = float(os.environ.get("SERVER_APP_SLEEP", "0"))


@csrf_exempt
def orders(request: HttpRequest) -> HttpResponse:
    n = count("orders")
    time.sleep(SLEEP)
    return JsonResponse(
        {"order": n, "body": request.body.decode()}, status=201, headers={"Location": "/orders/1"}
    )


@csrf_exempt
async def aorders(request: HttpRequest) -> HttpResponse:
    n = count("aorders")
    await asyncio.sleep(SLEEP)
    return JsonResponse({"order": n}, status=201)


@csrf_exempt
@idempotent_route(fingerprint=["amount"])
def pay(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"n": count("pay")}, status=201)


def comment(request: HttpRequest) -> HttpResponse:
    """CSRF-protected: Django answers 403 before this view without the token."""
    return JsonResponse({"n": count("comment")}, status=201)


def csrf(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"token": get_token(request)})


@csrf_exempt
def report(request: HttpRequest) -> HttpResponse:
    count("report")
    chunks = int(request.GET.get("n", "5"))
    pause = float(request.GET.get("pause", "0"))

    def rows() -> Iterator[bytes]:
        for i in range(chunks):
            if pause:
                time.sleep(pause)
            yield b"r" * 999 + b"\n" if pause else f"row {i}\n".encode()

    return StreamingHttpResponse(rows(), content_type="text/plain")


@csrf_exempt
async def areport(request: HttpRequest) -> HttpResponse:
    count("areport")
    chunks = int(request.GET.get("n", "5"))
    pause = float(request.GET.get("pause", "0"))

    async def rows() -> AsyncIterator[bytes]:
        for i in range(chunks):
            if pause:
                await asyncio.sleep(pause)
            yield b"r" * 999 + b"\n" if pause else f"row {i}\n".encode()

    return StreamingHttpResponse(rows(), content_type="text/plain")


@csrf_exempt
def boom(request: HttpRequest) -> HttpResponse:
    count("boom")
    raise RuntimeError("boom")


@csrf_exempt
def problem(request: HttpRequest) -> HttpResponse:
    count("problem")
    raise HttpProblem(409, "out-of-stock", "Out of stock", "none left", remaining=0)


@csrf_exempt
@idempotent_view(fingerprint=["amount"])
def standalone(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"n": count("standalone")}, status=201)


@csrf_exempt
@idempotent_view
async def astandalone(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"n": count("astandalone")}, status=201)


@method_decorator(csrf_exempt, name="dispatch")
class Refunds(View):
    @method_decorator(idempotent_view(required=True))
    def post(self, request: HttpRequest) -> HttpResponse:
        return JsonResponse({"n": count("refunds")}, status=201)


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(os.getpid()))


class HeaderUser:
    def __init__(self, name: str) -> None:
        self.pk = name
        self.is_authenticated = bool(name)


class HeaderAuthenticationMiddleware(AuthenticationMiddleware):
    """``request.user`` from an ``X-User`` header (tests only: no database needed)."""

    def process_request(self, request: HttpRequest) -> None:
        user = HeaderUser(request.headers.get("X-User", ""))
        request.user = user

        async def auser() -> Any:
            return user

        request.auser = auser


urlpatterns = [
    path("orders", orders),
    path("aorders", aorders),
    path("pay", pay),
    path("comment", comment),
    path("csrf", csrf),
    path("report", report),
    path("areport", areport),
    path("boom", boom),
    path("problem", problem),
    path("standalone", standalone),
    path("astandalone", astandalone),
    path("refunds", Refunds.as_view()),
    path("health", health),
]
