"""FastAPI helpers: per-route idempotency and one-time tokens as dependencies.

The dependencies mark the route for :class:`~oncely.http.asgi.IdempotencyMiddleware`, which
finds them before the endpoint runs (so the claim, the token check and the replay happen
before any dependency or endpoint code); at call time they hand the endpoint the
:class:`~oncely.http.messages.IdempotencyInfo` and fail loudly if the middleware is missing::

    from fastapi import Depends, FastAPI
    from oncely.http import IdempotencyConfig, IdempotencyMiddleware, scope_from_header
    from oncely.http.fastapi import Idempotency, RequireToken

    app = FastAPI()
    app.add_middleware(
        IdempotencyMiddleware,
        config=IdempotencyConfig(store="redis://...", scope=scope_from_header("Authorization")),
    )

    @app.post("/payments")
    async def pay(body: Payment, info=Depends(Idempotency(fingerprint=["amount"]))): ...

    @app.post("/orders", dependencies=[Depends(RequireToken("checkout"))])
    async def order(...): ...

A request FastAPI refuses before the endpoint runs — ``RequestValidationError``, answered 422
by the app's handler for it — is sent as it is and does not use up its key, so the client can
fix the body and retry with the same key (Stripe saves a result only once the endpoint started
executing). The middleware arranges this by itself (:func:`watch_validation`).
"""

import inspect
from typing import Any

from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response

from oncely.errors import ConfigurationError, HttpProblem
from oncely.http.asgi import INFO_KEY
from oncely.http.engine import SAFE_METHODS
from oncely.http.messages import ENTRY_KEY, HandlerEntry, IdempotencyInfo
from oncely.http.problems import PROBLEM_BASE, from_exception
from oncely.http.routes import MARKER, Rule, idempotent_route

__all__ = ["Idempotency", "RequireToken", "problem_handler", "watch_validation"]

_WATCHING = "__oncely_validation__"
_MAX_DEPTH = 32


def _info(request: Request) -> IdempotencyInfo | None:
    if INFO_KEY not in request.scope:
        raise ConfigurationError(
            "this route is marked for oncely but IdempotencyMiddleware is not installed; add "
            "app.add_middleware(IdempotencyMiddleware, config=...)"
        )
    info: IdempotencyInfo | None = request.scope[INFO_KEY]
    return info


class Idempotency:
    """Dependency marking a route as idempotent, with optional per-route settings (the
    keyword arguments of :func:`~oncely.http.routes.idempotent_route`); returns the request's
    :class:`~oncely.http.messages.IdempotencyInfo` (None if the request carried no key)."""

    def __init__(self, **settings: Any) -> None:
        rule: Rule = idempotent_route(**settings)
        setattr(self, MARKER, rule)

    async def __call__(self, request: Request) -> IdempotencyInfo | None:
        return _info(request)


class RequireToken:
    """Dependency requiring a one-time token of ``purpose`` (checked and consumed by the
    middleware's :class:`~oncely.http.config.TokenGuard` before the endpoint runs)."""

    def __init__(self, purpose: str, **settings: Any) -> None:
        self.purpose = purpose
        rule: Rule = idempotent_route(token=purpose, **settings)
        setattr(self, MARKER, rule)

    async def __call__(self, request: Request) -> IdempotencyInfo | None:
        info = _info(request)
        if request.method in SAFE_METHODS:
            return info
        if info is None or info.token_purpose != self.purpose:
            raise ConfigurationError(
                f"the one-time token of purpose {self.purpose!r} was not checked; does the "
                "config have tokens=TokenGuard(...)?"
            )
        return info


def _exception_middleware(inner: Any) -> Any:
    """The ``ExceptionMiddleware`` below the idempotency middleware, following ``.app`` (the
    attribute every Starlette middleware keeps) and a built ``middleware_stack``."""
    seen = 0
    node = inner
    while node is not None and seen < _MAX_DEPTH:
        if isinstance(node, ExceptionMiddleware):
            return node
        stack = getattr(node, "middleware_stack", None)
        node = stack if stack is not None else getattr(node, "app", None)
        seen += 1
    return None


def watch_validation(app: Any, inner: Any) -> bool:
    """Make the FastAPI ``app``'s handler for ``RequestValidationError`` (its own or FastAPI's
    default 422) first mark the request as refused before its endpoint ran (see
    :class:`~oncely.http.messages.HandlerEntry`). ``inner`` is the app the idempotency
    middleware calls. Returns False if the exception middleware cannot be found.

    Raising ``RequestValidationError`` from your own endpoint code counts as a refusal too.
    """
    original = app.exception_handlers.get(RequestValidationError)
    if original is None:
        original = request_validation_exception_handler
    if getattr(original, _WATCHING, False):
        return True

    async def handler(request: Request, exc: Exception) -> Any:
        entry = request.scope.get(ENTRY_KEY)
        if isinstance(entry, HandlerEntry):
            entry.rejected()
        if inspect.iscoroutinefunction(original):
            return await original(request, exc)
        result = await run_in_threadpool(original, request, exc)  # as Starlette runs it
        return await result if inspect.isawaitable(result) else result

    setattr(handler, _WATCHING, True)
    target = _exception_middleware(inner)
    if target is not None:
        target.add_exception_handler(RequestValidationError, handler)
    elif getattr(app, "middleware_stack", True) is None:  # not built yet: it will copy ours
        app.add_exception_handler(RequestValidationError, handler)
    else:
        return False
    return True


async def problem_handler(request: Request, exc: Exception) -> Response:
    """Exception handler rendering :class:`~oncely.errors.HttpProblem` as problem+json, for
    apps that raise it outside the middleware: ``app.add_exception_handler(HttpProblem, …)``."""
    assert isinstance(exc, HttpProblem)
    problem = from_exception(exc, PROBLEM_BASE)
    return Response(
        problem.body,
        status_code=problem.status,
        headers={k.decode("latin-1"): v.decode("latin-1") for k, v in problem.headers},
    )
