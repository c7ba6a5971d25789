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
outermost among the app's middleware. Litestar runs
middleware after routing, so a request with no route (404) or another method (405) never
reaches it. Per route, the handler's ``opt["idempotency"]`` (a :class:`~oncely.http.routes.Rule`,
a mapping of its options, or ``False``) or ``@idempotent_route`` under the route decorator
sets the rule.

A request Litestar refuses before the handler function runs — a guard
(``NotAuthorizedException``, ``PermissionDeniedException``), the CSRF check, parameter or body
validation (``ValidationException``, 400), a dependency that raises — is answered as Litestar
answers it and does not use up its key: the plugin's ``after_exception`` hook tells the
middleware, from the exception's traceback, whether the handler function had started. A view
raising :class:`~oncely.errors.HttpProblem` answers with that problem.

Needs Litestar 2.15 or later (``ASGIMiddleware``).

Refused at start-up (``Litestar(...)`` raises :class:`~oncely.errors.ConfigurationError`): the
plugin twice, or beside oncely's generic ASGI middleware; ``compression_config`` (Litestar
compresses inside every middleware, so the first client's encoding would be stored and
replayed to clients that may not accept it: compress outside the app instead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from litestar import Request, Response, route
from litestar.config.app import AppConfig
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
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


def _codes(handler: Any) -> set[Any]:
    """The code objects of a handler's function (through ``AsyncCallable`` and wrappers)."""
    codes = set()
    fn = getattr(handler, "fn", None)
    for _ in range(8):
        if fn is None:
            break
        code = getattr(fn, "__code__", None)
        if code is not None:
            codes.add(code)
        fn = getattr(fn, "func", None) or getattr(fn, "__wrapped__", None)
    return codes


def _ran_in(traceback: TracebackType | None, codes: set[Any]) -> bool:
    while traceback is not None:
        if traceback.tb_frame.f_code in codes:
            return True
        traceback = traceback.tb_next
    return False


def _handler_started(exc: BaseException, handler: Any) -> bool:
    """Whether ``exc`` came out of the handler function (its frame is in the traceback of the
    exception or of one it was raised from)."""
    codes = _codes(handler)
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if _ran_in(seen.__traceback__, codes):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _after_exception(exc: Exception, scope: Scope) -> None:
    """Litestar's ``after_exception`` hook: an exception raised before the handler function
    ran (guard, CSRF, validation, dependency) marks the request as refused."""
    entry = scope.get(ENTRY_KEY)
    if isinstance(entry, HandlerEntry) and not _handler_started(exc, scope.get("route_handler")):
        entry.rejected()


def _token_endpoint(path: str) -> Any:
    """A route at the token endpoint's path (Litestar answers 404 before any middleware for a
    path without one); the middleware answers its requests, so the handler never runs."""

    def issue() -> None:  # pragma: no cover - the middleware answers first
        raise ConfigurationError("the token endpoint is answered by oncely's middleware")

    return route(path, http_method=["GET", "POST"], sync_to_thread=False, name="oncely-tokens")(
        issue
    )


class _Middleware(ASGIMiddleware):
    """The plugin's middleware: :func:`oncely.http.asgi.serve` with the plugin's engine."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope.get(asgi.OUTER_KEY) is not None:
            raise ConfigurationError(asgi.INSTALLED_TWICE)
        await asgi.serve(self.engine, next_app, scope, receive, send)  # type: ignore[arg-type]


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
        """Add the middleware (first: outermost), the refusal hook and the problem handler."""
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
        app_config.middleware.insert(0, _Middleware(self.engine))
        guard = self.config.tokens
        if guard is not None and guard.endpoint is not None:
            app_config.route_handlers.append(_token_endpoint(guard.endpoint))
        app_config.after_exception.append(_after_exception)
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

        app_config.exception_handlers.setdefault(HttpProblem, problem)
        return app_config
