"""Django helpers: wrap the WSGI application with route rules, and mark views.

In ``settings.py``, last in ``MIDDLEWARE`` (after ``CsrfViewMiddleware`` and every other
middleware that may answer from ``process_view``)::

    MIDDLEWARE = [..., "oncely.http.django.ViewStartMiddleware"]

and in ``wsgi.py``::

    from django.core.wsgi import get_wsgi_application
    from oncely.http import IdempotencyConfig, scope_from_cookie
    from oncely.http.django import install

    application = install(
        get_wsgi_application(),
        IdempotencyConfig(store="redis://...", scope=scope_from_cookie("sessionid")),
    )

and in views::

    from oncely.http import idempotent_route
    from oncely.http.django import require_token

    @idempotent_route(fingerprint=["amount"])
    def pay(request): ...

    @require_token("checkout")
    def checkout(request): ...

The middleware resolves the request path with ``django.urls.resolve`` (the ``ROOT_URLCONF``;
per-request ``request.urlconf`` overrides are not seen) to find the view's rule before Django
runs. :class:`ViewStartMiddleware` tells it when Django actually calls the view: a request
Django refuses before that (URL 404, the CSRF 403, any middleware answering first) is sent as
it is and does not use up its key. Django served over ASGI is not covered here; use the WSGI
application.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.conf import settings  # type: ignore[import-untyped]
from django.http import HttpRequest as DjangoRequest  # type: ignore[import-untyped]
from django.http import HttpResponse as DjangoResponse
from django.urls import Resolver404, get_resolver, resolve  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from oncely.errors import ConfigurationError
from oncely.http.config import IdempotencyConfig
from oncely.http.engine import SAFE_METHODS
from oncely.http.messages import ENTRY_KEY, HandlerEntry
from oncely.http.routes import MARKER, Rule, idempotent_route, rule_of
from oncely.http.wsgi import INFO_KEY, WSGIIdempotencyMiddleware

__all__ = ["DjangoResolver", "ViewStartMiddleware", "install", "require_token"]

_PATH = "oncely.http.django.ViewStartMiddleware"

F = TypeVar("F", bound=Callable[..., Any])
_METHODS = ("post", "put", "patch", "delete", "get", "dispatch")


def _view_rule(func: Any, method: str) -> Rule | None:
    rule = rule_of(func)
    if rule is None:
        view_class = getattr(func, "view_class", None)
        if view_class is not None:
            rule = rule_of(getattr(view_class, method, None)) or rule_of(
                getattr(view_class, "dispatch", None)
            )
    return rule


def _callbacks(patterns: Iterable[Any], depth: int = 0) -> Iterable[Any]:
    for pattern in patterns:
        sub = getattr(pattern, "url_patterns", None)
        if sub is not None:
            if depth < 16:
                yield from _callbacks(sub, depth + 1)
        else:
            yield getattr(pattern, "callback", None)


class ViewStartMiddleware:
    """Django middleware telling oncely's WSGI middleware that the view is about to run
    (``process_view``, after URL resolution and after the ``process_view`` of the middlewares
    listed before it, such as ``CsrfViewMiddleware``). List it last in ``MIDDLEWARE``."""

    def __init__(self, get_response: Callable[[DjangoRequest], DjangoResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: DjangoRequest) -> DjangoResponse:
        return self.get_response(request)

    def process_view(
        self, request: DjangoRequest, view: Any, args: Any, kwargs: Any
    ) -> DjangoResponse | None:
        entry = request.META.get(ENTRY_KEY)
        if isinstance(entry, HandlerEntry):
            entry.started()
        return None


def _check_middleware() -> None:
    """``ViewStartMiddleware`` is in ``MIDDLEWARE``, with no ``process_view`` after it."""
    names = list(getattr(settings, "MIDDLEWARE", None) or ())
    if _PATH not in names:
        raise ConfigurationError(
            f"add {_PATH!r} as the last entry of settings.MIDDLEWARE: it tells oncely when a "
            "view starts, so that a request Django refuses before its view (404, CSRF 403) "
            "does not use up its Idempotency-Key"
        )
    for name in names[names.index(_PATH) + 1 :]:
        if hasattr(import_string(name), "process_view"):
            raise ConfigurationError(
                f"{name!r} comes after {_PATH!r} in settings.MIDDLEWARE and may refuse a "
                f"request in process_view; move {_PATH!r} after it"
            )


class DjangoResolver:
    """Callable ``environ -> Rule | None``: the rule of the view Django will dispatch to.

    :raises ConfigurationError: :class:`ViewStartMiddleware` is not the last view middleware
        in ``settings.MIDDLEWARE``.
    """

    #: The middleware learns from Django when a view starts (see :class:`HandlerEntry`).
    tracks_entry = True

    def __init__(self) -> None:
        _check_middleware()
        self._marked: bool | None = None

    def _any_marked(self) -> bool:
        return any(
            _view_rule(callback, method) is not None
            for callback in _callbacks(get_resolver().url_patterns)
            for method in _METHODS
        )

    def __call__(self, environ: dict[str, Any]) -> Rule | None:
        if self._marked is None:
            self._marked = self._any_marked()
        if not self._marked:
            return None
        path = environ.get("PATH_INFO", "/") or "/"
        try:
            path = path.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return None
        try:
            match = resolve(path)
        except Resolver404:
            return None
        return _view_rule(match.func, environ.get("REQUEST_METHOD", "").lower())


def install(
    application: Any, config: IdempotencyConfig | None = None, **options: Any
) -> WSGIIdempotencyMiddleware:
    """Wrap Django's WSGI ``application`` in the middleware, with a URL resolver.

    :raises ConfigurationError: see :class:`DjangoResolver` and
        :class:`~oncely.http.config.IdempotencyConfig`.
    """
    return WSGIIdempotencyMiddleware(application, config, resolver=DjangoResolver(), **options)


def require_token(purpose: str, **settings: Any) -> Callable[[F], F]:
    """Mark a view as requiring a one-time token of ``purpose`` on unsafe methods."""
    rule = idempotent_route(token=purpose, **settings)

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(request: DjangoRequest, *args: Any, **kwargs: Any) -> Any:
            environ = getattr(request, "environ", None) or getattr(request, "META", {})
            if INFO_KEY not in environ:
                raise ConfigurationError(
                    "this view requires a one-time token but the oncely middleware is not "
                    "installed; wrap the WSGI application with oncely.http.django.install()"
                )
            if request.method not in SAFE_METHODS:
                info = environ[INFO_KEY]
                if info is None or info.token_purpose != purpose:
                    raise ConfigurationError(
                        f"the one-time token of purpose {purpose!r} was not checked for "
                        f"{request.method}; pass tokens=TokenGuard(...) to the config"
                    )
            return view(request, *args, **kwargs)

        setattr(wrapper, MARKER, rule)
        return wrapper  # type: ignore[return-value]

    return decorate
