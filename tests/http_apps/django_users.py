"""A Django URLconf and middlewares with real users, sessions and authentication (the user
table of the ``default`` database: ``migrate auth`` first), for the tests of which user
``oncely.http.django.scope_from_user`` reads: the one ``request.user`` holds when oncely's
middleware runs, whoever set it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.contrib.auth import get_user_model, login
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.middleware import RemoteUserMiddleware
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.utils.deprecation import MiddlewareMixin
from django.utils.functional import SimpleLazyObject
from django.views.decorators.csrf import csrf_exempt

from oncely.http import IdempotencyConfig
from oncely.http.django import idempotent_view, scope_from_user
from oncely.stores.memory import MemoryStore

from http_apps.executions import count

#: ``settings.MIDDLEWARE`` up to Django's own authentication (sessions in signed cookies:
#: no session table).
SESSION = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
#: Django's ``RemoteUserMiddleware`` (its own sync and async paths), the user named by the
#: ``X-User`` header (copied to ``REMOTE_USER``, as a web server sets it).
REMOTE = [
    *SESSION,
    f"{__name__}.RemoteUserFromHeader",
    "django.contrib.auth.middleware.RemoteUserMiddleware",
]
OURS = "oncely.http.django.IdempotencyMiddleware"
SETTINGS: dict[str, Any] = {
    "ROOT_URLCONF": __name__,
    "SESSION_ENGINE": "django.contrib.sessions.backends.signed_cookies",
    "AUTHENTICATION_BACKENDS": [
        "django.contrib.auth.backends.RemoteUserBackend",
        "django.contrib.auth.backends.ModelBackend",
    ],
}


class RemoteUserFromHeader(MiddlewareMixin):
    """``REMOTE_USER`` from the ``X-User`` header. Django 5.2's ``RemoteUserMiddleware``
    reads ``META[header]`` on its sync path and ``META["HTTP_" + header]`` on its async one:
    both are set."""

    def process_request(self, request: HttpRequest) -> None:
        name = request.META.get("HTTP_X_USER")
        if name:
            request.META["REMOTE_USER"] = request.META["HTTP_REMOTE_USER"] = name


class HeaderRemoteUserMiddleware(RemoteUserMiddleware):
    """A subclass of Django's ``RemoteUserMiddleware`` (for the system check)."""


class TokenUser:
    """``request.user = <the user the X-Token header names>`` (a bearer-token middleware),
    sync and async capable; nothing without the header."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        name = request.headers.get("X-Token")
        if name:
            request.user = get_user_model().objects.get(username=name)
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> Any:
        name = request.headers.get("X-Token")
        if name:
            request.user = await get_user_model().objects.aget(username=name)
        return await self.get_response(request)


class LazyTokenUser(TokenUser):
    """:class:`TokenUser` with a lazy user (loaded when first read), in both modes."""

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        self._set(request)
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> Any:
        self._set(request)
        return await self.get_response(request)

    @staticmethod
    def _set(request: HttpRequest) -> None:
        name = request.headers.get("X-Token")
        if name:
            model = get_user_model()
            request.user = SimpleLazyObject(lambda: model.objects.get(username=name))


class ExpireSession(TokenUser):
    """With an ``X-Expire`` header: asks who the user is, then flushes the session (an idle
    timeout, say) without ``logout()``. Under WSGI ``request.user`` is loaded before the flush
    and stays that user; under ASGI ``await request.auser()`` caches it, ``request.user``
    (still lazy) loads the flushed session's: anonymous."""

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        if "X-Expire" in request.headers and request.user.is_authenticated:
            request.session.flush()
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> Any:
        if "X-Expire" in request.headers and (await request.auser()).is_authenticated:
            await request.session.aflush()
        return await self.get_response(request)


def signin(request: HttpRequest) -> HttpResponse:
    """GET ``/login?as=<name>``: a session for that user (``django.contrib.auth.login``)."""
    user = get_user_model().objects.get(username=request.GET["as"])
    login(request, user, backend=f"{ModelBackend.__module__}.{ModelBackend.__name__}")
    return JsonResponse({"user": user.get_username()})


def pay(request: HttpRequest) -> HttpResponse:
    """Who the view runs as (``request.user``), and how many times it ran."""
    user = request.user
    name = user.get_username() if user.is_authenticated else None
    return JsonResponse({"user": name, "n": count("pay")}, status=201)


@idempotent_view(config=IdempotencyConfig(store=MemoryStore(), scope=scope_from_user))
async def apay(request: HttpRequest) -> HttpResponse:
    """Protected by the decorator alone (no oncely middleware), under the user's scope."""
    user = await request.auser()
    return JsonResponse({"user": user.get_username(), "n": count("apay")}, status=201)


urlpatterns = [
    path("login", signin),
    path("pay", csrf_exempt(pay)),
    path("apay", csrf_exempt(apay)),
]
