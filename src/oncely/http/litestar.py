"""Litestar: ``Idempotency-Key`` and one-time tokens as a plugin, in Litestar's own terms.

::

    from litestar import Litestar, post
    from oncely.http import IdempotencyConfig, idempotent_route, scope_from_user
    from oncely.http.litestar import IdempotencyPlugin

    @post("/payments", opt={"idempotency": {"fingerprint": ["amount"]}})
    async def pay(data: Payment) -> dict: ...

    @post("/health-check", opt={"idempotency": False})      # never protected
    async def ping() -> None: ...

    app = Litestar(
        [pay, ping],
        plugins=[IdempotencyPlugin(IdempotencyConfig(store="redis://localhost:6379/0",
                                                     scope=scope_from_user("id")))],
    )

The plugin (a :class:`~litestar.plugins.InitPlugin`) adds an
:class:`~litestar.middleware.ASGIMiddleware` that drives the same sans-IO
:func:`~oncely.http.flow.request_flow` as every other face (:func:`oncely.http.asgi.serve`),
outermost among the app's middleware but inside its authentication (an
``AbstractAuthenticationMiddleware``, a ``litestar.security`` backend's middleware), so that
``scope_from_user`` reads the user Litestar authenticated (``scope["user"]``). With
``scope_from_user`` the app refuses to start when a router, controller or route handler
authenticates (its middleware would run after the scope was read). Litestar runs
middleware after routing, so a request with no route (404) or another method (405) never
reaches it. Per route, the handler's ``opt["idempotency"]`` (a :class:`~oncely.http.routes.Rule`,
a mapping of its options, or ``False``) or ``@idempotent_route`` under the route decorator
sets the rule.

A request Litestar refuses before the handler function runs — a guard
(``NotAuthorizedException``, ``PermissionDeniedException``), the CSRF check, parameter or body
validation (``ValidationException``, 400), a dependency that raises, a ``before_request``
hook that answers, a cached response — is answered as Litestar answers it and does not use up
its key: the middleware wraps each route handler's function (on the handler's first request)
so that Litestar's call of it reports the start. Once it was called, the request is the
handler's whatever fails after it (its return value not serialisable, an ``after_request``
hook or a dependency's cleanup raising): the key is kept and a retry never runs it again. A
view raising :class:`~oncely.errors.HttpProblem` answers with that problem; one raising an
exception that Litestar answers with a 500 (not an ``HTTPException``; the plugin's
``after_exception`` hook tells the middleware) is kept for its key as the ``500``
``handler-failed`` problem, so a retry gets that problem, replayed.

Needs Litestar 2.15 or later (``ASGIMiddleware``).

Refused at start-up (``Litestar(...)`` raises :class:`~oncely.errors.ConfigurationError`): the
plugin twice, or beside oncely's generic ASGI middleware; ``compression_config`` (Litestar
compresses inside every middleware, so the first client's encoding would be stored and
replayed to clients that may not accept it: compress outside the app instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from litestar import Litestar, Request, Response, route
from litestar.config.app import AppConfig
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import AbstractAuthenticationMiddleware, ASGIMiddleware
from litestar.plugins import InitPlugin
from litestar.types import ASGIApp, Receive, Scope, Send

from oncely.errors import ConfigurationError, HttpProblem
from oncely.http import asgi
from oncely.http.config import IdempotencyConfig
from oncely.http.engine import Engine
from oncely.http.messages import ENTRY_KEY, HandlerEntry
from oncely.http.options import config_from_mapping
from oncely.http.problems import from_exception
from oncely.http.routes import Rule, rule_of

__all__ = ["OPT_KEY", "IdempotencyPlugin"]

#: The key of a route handler's ``opt`` that holds its rule.
OPT_KEY = "idempotency"


def _opt_rule(value: Any, where: str) -> Rule | None:
    if value is None:
        return None
    if value is False:
        return Rule(enabled=False)
    if value is True:
        return Rule(enabled=True)
    if isinstance(value, Rule):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(Rule)}
        unknown = sorted(set(value) - known)
        if unknown:
            from oncely.http.options import unknown_option

            raise unknown_option(str(unknown[0]), known, where)
        return Rule(**{"enabled": True, **value})
    raise ConfigurationError(
        f"{where} takes a Rule, a mapping of its options (e.g. {{'fingerprint': ['amount']}}) "
        f"or False, not {value!r}"
    )


def _handler_rule(handler: Any) -> Rule | None:
    """The rule of a route handler: ``opt["idempotency"]``, else ``@idempotent_route``."""
    opt = getattr(handler, "opt", None) or {}
    rule = _opt_rule(opt.get(OPT_KEY), f"opt[{OPT_KEY!r}] of {getattr(handler, 'paths', '')}")
    if rule is None:
        fn = getattr(handler, "fn", None)
        rule = rule_of(getattr(fn, "func", fn))  # a sync handler is wrapped in AsyncCallable
    return rule


class _Resolver:
    """Callable ``scope -> Rule | None``: the rule of ``scope["route_handler"]`` (Litestar
    routes before its middleware runs), cached per handler."""

    #: The plugin's middleware learns when Litestar calls a handler function (:func:`_watch`):
    #: a request answered without it (a guard, validation, a dependency, a ``before_request``
    #: answer, a cached response) does not use up its key.
    tracks_entry = True

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Any, Rule | None]] = {}

    def __call__(self, scope: Any) -> Rule | None:
        handler = scope.get("route_handler")
        if handler is None:
            return None
        hit = self._cache.get(id(handler))
        if hit is None:
            hit = self._cache[id(handler)] = (handler, _handler_rule(handler))
        return hit[1]


#: The ASGI scope of the request the plugin's middleware is running (read by the handler
#: wrappers, which Litestar calls with the handler's arguments only).
_CURRENT: ContextVar[Scope | None] = ContextVar("oncely_litestar_scope", default=None)
_WATCHING = "__oncely_entry__"


def _watch(handler: Any) -> None:
    """Make ``handler`` report to the request's :class:`HandlerEntry` when Litestar calls its
    function (after guards, parameter and body parsing and dependencies; before the return
    value is turned into a response, ``after_request`` and dependency cleanup), so that
    anything failing after the call counts as the handler's and keeps the key.

    The function is replaced on the registered handler (``_fn``, what ``handler.fn`` returns
    and Litestar calls each request) by a plain function that reports and returns what the
    original returns (a coroutine for an ``async def`` or a thread-run handler, which Litestar
    then awaits as before: ``has_sync_callable`` was decided at registration).
    """
    original = getattr(handler, "_fn", None)
    if not callable(original):
        # Fail closed: without the call reported, every request would count as refused
        # before its handler and release its key after the handler ran.
        raise ConfigurationError(
            f"this Litestar version keeps no handler function at {type(handler).__name__}._fn"
            ", so oncely cannot tell whether a handler ran; use a Litestar version oncely "
            "supports (2.15 or later, tested with the one in oncely[http])"
        )
    if getattr(original, _WATCHING, False):
        return
    with contextlib.suppress(Exception):  # Litestar raises it itself on the request
        handler.parsed_fn_signature  # noqa: B018 - parsed (and cached) from the original

    def entered(*args: Any, **kwargs: Any) -> Any:
        scope = _CURRENT.get()
        if scope is not None:
            entry = scope.get(ENTRY_KEY)
            if isinstance(entry, HandlerEntry):
                entry.started()
        return original(*args, **kwargs)

    functools.update_wrapper(entered, original)
    setattr(entered, _WATCHING, True)
    handler._fn = entered


async def _after_exception(exc: Exception, scope: Scope) -> None:
    """Litestar's ``after_exception`` hook: an exception that is not an HTTP error raised on
    purpose (``HTTPException``, ``HttpProblem``) is answered with a 500, which the middleware
    keeps as ``handler-failed`` (if the handler function was called; else the key is
    released as for any refusal)."""
    entry = scope.get(ENTRY_KEY)
    if isinstance(entry, HandlerEntry) and not isinstance(exc, (HTTPException, HttpProblem)):
        entry.raised()


def _token_endpoint(path: str) -> Any:
    """A route at the token endpoint's path (Litestar answers 404 before any middleware for a
    path without one); the middleware answers its requests, so the handler never runs."""

    def issue() -> None:  # pragma: no cover - the middleware answers first
        raise ConfigurationError("the token endpoint is answered by oncely's middleware")

    return route(path, http_method=["GET", "POST"], sync_to_thread=False, name="oncely-tokens")(
        issue
    )


_SECURITY = "litestar.security."


def _authenticates(middleware: Any) -> bool:
    """``middleware`` (an entry of a ``middleware`` list: a class, an instance or a
    ``DefineMiddleware``) sets the request's user: a Litestar authentication middleware
    (``AbstractAuthenticationMiddleware``) or a security backend's (``JWTAuth``,
    ``SessionAuth``: ``litestar.security``)."""
    kind = getattr(middleware, "middleware", middleware)  # DefineMiddleware
    if not isinstance(kind, type):
        kind = type(kind)
    return issubclass(kind, AbstractAuthenticationMiddleware) or any(
        k.__module__.startswith(_SECURITY) for k in kind.__mro__
    )


def _after_authentication(middleware: list[Any]) -> int:
    """Where the plugin's middleware goes in the app's ``middleware``: just inside the last
    authentication middleware, else first (outermost)."""
    return max((i + 1 for i, m in enumerate(middleware) if _authenticates(m)), default=0)


def _check_authentication(ours: _Middleware, app: Litestar) -> None:
    """At start-up, for ``scope_from_user``: no route authenticates inside the plugin's
    middleware (a router's, controller's or handler's authentication middleware runs after it,
    when the scope was already read: every request would be anonymous)."""
    for app_route in app.routes:
        for handler in getattr(app_route, "route_handlers", ()):
            inside = False
            for layer in handler.ownership_layers:
                for middleware in getattr(layer, "middleware", None) or ():
                    if middleware is ours:
                        inside = True
                    elif (inside or layer is not app) and _authenticates(middleware):
                        name = getattr(middleware, "middleware", middleware)
                        raise ConfigurationError(
                            f"{getattr(name, '__name__', name)!r} authenticates "
                            f"{app_route.path} inside oncely's idempotency middleware (on a "
                            "router, controller or route handler, or after the plugin in the "
                            "app's middleware), but scope_from_user reads the user it sets "
                            "before the key is claimed: every keyed request would be refused "
                            "with 401 principal-missing (or, with anonymous='share', every "
                            "client would share one key space); authenticate in the app's "
                            "middleware (or with a security backend's on_app_init)"
                        )


class _Middleware(ASGIMiddleware):
    """The plugin's middleware: :func:`oncely.http.asgi.serve` with the plugin's engine."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope.get(asgi.OUTER_KEY) is not None:
            raise ConfigurationError(asgi.INSTALLED_TWICE)
        handler = scope.get("route_handler")
        if handler is not None:
            _watch(handler)
        token = _CURRENT.set(scope)
        try:
            await asgi.serve(self.engine, next_app, scope, receive, send)  # type: ignore[arg-type]
        finally:
            _CURRENT.reset(token)


class IdempotencyPlugin(InitPlugin):
    """Litestar plugin applying ``Idempotency-Key`` semantics and one-time token guards.

    :param config: an :class:`~oncely.http.config.IdempotencyConfig`; or pass its options as
        keyword arguments (names checked, the closest suggested; types and units checked).
    :raises ConfigurationError: the configuration is wrong (here), or the app is (when
        ``Litestar(...)`` calls :meth:`on_app_init`; see the module docstring).
    """

    __slots__ = ("config", "engine")

    def __init__(self, config: IdempotencyConfig | None = None, **options: Any) -> None:
        if config is None:
            config = config_from_mapping(options, "IdempotencyPlugin")
        elif options:
            raise ConfigurationError(
                f"pass either config= or its options, not both (got {sorted(options)})"
            )
        self.config = config
        self.engine = Engine(config, _Resolver())

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the middleware (outermost inside the authentication), the refusal hook and the
        problem handler."""
        for middleware in app_config.middleware:
            kind = getattr(middleware, "middleware", middleware)  # DefineMiddleware
            if isinstance(middleware, _Middleware) or kind is asgi.IdempotencyMiddleware:
                raise ConfigurationError(
                    "oncely's idempotency middleware is already in this app (the "
                    "IdempotencyPlugin listed twice, or beside IdempotencyMiddleware): each "
                    "would claim the same Idempotency-Key and the inner one would answer every "
                    "first request with 409; keep one IdempotencyPlugin"
                )
        if app_config.compression_config is not None:
            raise ConfigurationError(
                "Litestar runs compression_config's middleware inside every other middleware, "
                "so oncely would store each response compressed for the first client's "
                "Accept-Encoding and replay it to clients that may not accept that encoding; "
                "drop compression_config and compress outside the app (at the proxy, or "
                "app = starlette.middleware.gzip.GZipMiddleware(app))"
            )
        middleware = _Middleware(self.engine)
        # Outermost, but inside the app's authentication (scope_from_user reads the user it
        # sets): an authentication middleware a later plugin inserts first wraps it too.
        app_config.middleware.insert(_after_authentication(app_config.middleware), middleware)
        if asgi.reads_principal(self.config):
            app_config.on_startup.append(functools.partial(_check_authentication, middleware))
        guard = self.config.tokens
        if guard is not None and guard.endpoint is not None:
            app_config.route_handlers.append(_token_endpoint(guard.endpoint))
        base = self.config.problem_base

        def problem(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
            assert isinstance(exc, HttpProblem)
            answer = from_exception(exc, base)
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in answer.headers}
            media_type = headers.pop("content-type", "application/problem+json")
            headers.pop("content-length", None)
            return Response(
                answer.body, status_code=answer.status, headers=headers, media_type=media_type
            )

        app_config.after_exception.append(_after_exception)
        app_config.exception_handlers.setdefault(HttpProblem, problem)
        return app_config
