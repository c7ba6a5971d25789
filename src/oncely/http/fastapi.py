"""FastAPI helpers: per-route idempotency and one-time tokens as dependencies.

The dependencies mark the route for :class:`~oncely.http.asgi.IdempotencyMiddleware`, which
finds them before the endpoint runs (so the claim, the token check and the replay happen
before any dependency or endpoint code); at call time they hand the endpoint the
:class:`~oncely.http.messages.IdempotencyInfo` and fail loudly if the middleware is missing::

    from fastapi import Depends, FastAPI
    from oncely.http import IdempotencyConfig, IdempotencyMiddleware
    from oncely.http.fastapi import Idempotency, RequireToken

    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, config=IdempotencyConfig(store="redis://..."))

    @app.post("/payments")
    async def pay(body: Payment, info=Depends(Idempotency(fingerprint=["amount"]))): ...

    @app.post("/orders", dependencies=[Depends(RequireToken("checkout"))])
    async def order(...): ...
"""

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from oncely.errors import ConfigurationError, HttpProblem
from oncely.http.asgi import INFO_KEY
from oncely.http.engine import SAFE_METHODS
from oncely.http.messages import IdempotencyInfo
from oncely.http.problems import PROBLEM_BASE, from_exception
from oncely.http.routes import MARKER, Rule, idempotent_route

__all__ = ["Idempotency", "RequireToken", "problem_handler"]


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
                f"the one-time token of purpose {self.purpose!r} was not checked; is this "
                "method among the configured methods, and does the config have tokens=?"
            )
        return info


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
