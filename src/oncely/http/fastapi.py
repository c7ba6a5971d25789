"""FastAPI helpers: per-route idempotency and one-time tokens as dependencies.

The dependencies mark the route for :class:`~oncely.http.asgi.IdempotencyMiddleware`, which
finds them before the endpoint runs (so the claim, the token check and the replay happen
before any dependency or endpoint code); at call time they hand the endpoint the
:class:`~oncely.http.messages.IdempotencyInfo` and fail loudly if the middleware is missing::

    from fastapi import Depends, FastAPI
    from oncely.http import IdempotencyConfig, IdempotencyMiddleware, scope_from_user
    from oncely.http.fastapi import Idempotency, RequireToken

    app = FastAPI()
    app.add_middleware(
        IdempotencyMiddleware,
        config=IdempotencyConfig(store="redis://...", scope=scope_from_user("id")),
    )

    @app.post("/payments")
    async def pay(body: Payment, info=Depends(Idempotency(fingerprint=["amount"]))): ...

    @app.post("/orders", dependencies=[Depends(RequireToken("checkout"))])
    async def order(...): ...

A request FastAPI refuses before the endpoint runs — ``RequestValidationError``, answered 422
by the app's handler for it — is sent as it is and does not use up its key, so the client can
fix the body and retry with the same key (Stripe saves a result only once the endpoint started
executing). The middleware arranges this by itself (:func:`watch_validation`).

OpenAPI: every operation the middleware protects gets the ``Idempotency-Key`` header parameter
(required where the key is), the ``400``, ``409``, ``422`` and ``503`` problem responses
(``application/problem+json``, schema ``OncelyProblem``, RFC 9457; ``403`` too on routes that
need a one-time token) and the ``Idempotent-Replayed`` header on its success responses, so
Swagger UI's "Try it out" sends the key (:func:`document`, :func:`amend_openapi`).

Start-up: an app whose routes are marked (these dependencies, ``@idempotent_route``) but that
has no ``IdempotencyMiddleware`` refuses to start (ASGI lifespan ``startup.failed``, with the
line to add), instead of failing every request. Importing this module adds both hooks to
``FastAPI`` (``openapi`` and ``build_middleware_stack``); apps without oncely are unaffected.
"""

import copy
import inspect
import weakref
from typing import Any

from fastapi import FastAPI
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response

from oncely.errors import ConfigurationError, HttpProblem
from oncely.http.asgi import INFO_KEY, OUTER_KEY, IdempotencyMiddleware, stack_below
from oncely.http.config import IdempotencyConfig, RoutePolicy
from oncely.http.engine import SAFE_METHODS, Engine
from oncely.http.messages import ENTRY_KEY, HandlerEntry, IdempotencyInfo
from oncely.http.problems import (
    BODY_INCOMPLETE,
    BODY_INVALID,
    IN_FLIGHT,
    KEY_INVALID,
    KEY_MISMATCH,
    KEY_MISSING,
    NOT_REPLAYABLE,
    PROBLEM_BASE,
    STORE_UNAVAILABLE,
    TOKEN_EXPIRED,
    TOKEN_FOREIGN,
    TOKEN_FORGED,
    TOKEN_MISSING,
    TOKEN_REUSED,
    ProblemType,
    from_exception,
)
from oncely.http.routes import MARKER, Rule, idempotent_route
from oncely.http.starlette import endpoint_rule

__all__ = [
    "Idempotency",
    "RequireToken",
    "amend_openapi",
    "document",
    "problem_handler",
    "watch_validation",
]

_WATCHING = "__oncely_validation__"


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
    """The ``ExceptionMiddleware`` below the idempotency middleware (:func:`stack_below`)."""
    return next((n for n in stack_below(inner) if isinstance(n, ExceptionMiddleware)), None)


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


# -- OpenAPI ---------------------------------------------------------------------------------------
#: The name of the RFC 9457 problem schema in ``components.schemas``.
PROBLEM_SCHEMA = "OncelyProblem"
_PROBLEM_JSON = "application/problem+json"
_REF = {"$ref": f"#/components/schemas/{PROBLEM_SCHEMA}"}
_SCHEMA: dict[str, Any] = {
    "title": PROBLEM_SCHEMA,
    "description": "Problem details (RFC 9457). Branch on `type`, not on `title` or `detail`.",
    "type": "object",
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string", "format": "uri-reference"},
    },
    "required": ["type", "title", "status"],
    "additionalProperties": True,
}
_RETRY_AFTER = {
    "description": "Seconds to wait before retrying with the same key",
    "schema": {"type": "integer"},
}
#: status -> (summary, problem types) for a keyed operation and for a token-guarded one.
_KEYED: dict[int, tuple[str, tuple[ProblemType, ...]]] = {
    400: (
        "The Idempotency-Key is missing or malformed, or the body is incomplete or cannot be "
        "fingerprinted",
        (KEY_MISSING, KEY_INVALID, BODY_INCOMPLETE, BODY_INVALID),
    ),
    409: (
        "A request with this Idempotency-Key is still running (retry after Retry-After), or "
        "its response cannot be replayed",
        (IN_FLIGHT, NOT_REPLAYABLE),
    ),
    422: ("This Idempotency-Key was already used for a different request", (KEY_MISMATCH,)),
    503: (
        "The idempotency store is unavailable; nothing was done (retry after Retry-After)",
        (STORE_UNAVAILABLE,),
    ),
}
_GUARDED: dict[int, tuple[str, tuple[ProblemType, ...]]] = {
    400: ("A one-time token is required", (TOKEN_MISSING,)),
    403: (
        "The one-time token is invalid, expired, or issued to another client or purpose",
        (TOKEN_FORGED, TOKEN_EXPIRED, TOKEN_FOREIGN),
    ),
    409: ("The one-time token was already used (a double submit)", (TOKEN_REUSED,)),
    503: _KEYED[503],
}

_engines: "weakref.WeakKeyDictionary[Any, Engine]" = weakref.WeakKeyDictionary()
_DOCUMENTED = "__oncely_openapi__"


def document(app: Any, engine: Engine) -> None:
    """Have ``app.openapi()`` document the operations ``engine`` protects (the middleware calls
    this when it first sees a FastAPI app; an app with the middleware in ``user_middleware``
    is documented before that too)."""
    _engines[app] = engine


def _engine_for(app: Any) -> Engine | None:
    engine = _engines.get(app)
    if engine is not None:
        return engine
    for middleware in getattr(app, "user_middleware", ()):
        if getattr(middleware, "cls", None) is IdempotencyMiddleware:
            kwargs = dict(getattr(middleware, "kwargs", {}))
            args = tuple(getattr(middleware, "args", ()))
            config = kwargs.pop("config", None) or (args[0] if args else None)
            resolver = kwargs.pop("resolver", None)
            if not isinstance(config, IdempotencyConfig):
                config = IdempotencyConfig(**kwargs)
            engine = _engines[app] = Engine(config, resolver)
            return engine
    return None


def _problems_text(base: str, kinds: tuple[ProblemType, ...]) -> str:
    return ", ".join(f"`{base}{kind.slug}`" for kind in kinds)


def _add_response(
    responses: dict[str, Any], status: int, summary: str, types: str, retry: bool
) -> None:
    response = responses.setdefault(str(status), {"description": summary})
    if response.get("description") != summary and summary not in response.get("description", ""):
        response["description"] = f"{response.get('description', '')}; {summary}".lstrip("; ")
    response["description"] += f" (problem types: {types})"
    response.setdefault("content", {}).setdefault(_PROBLEM_JSON, {"schema": dict(_REF)})
    if retry:
        response.setdefault("headers", {}).setdefault("Retry-After", dict(_RETRY_AFTER))


def _document_operation(
    operation: dict[str, Any], policy: RoutePolicy, method: str, guard: Any
) -> None:
    keyed = policy.enabled and method in policy.methods
    guarded = policy.token is not None and method not in SAFE_METHODS
    parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
    present = {(str(p.get("name", "")).lower(), p.get("in")) for p in parameters if "name" in p}
    if keyed and (policy.header_name.lower(), "header") not in present:
        parameters.append(
            {
                "name": policy.header_name,
                "in": "header",
                "required": policy.required and not guarded,
                "description": (
                    "A unique value per operation (draft-ietf-httpapi-idempotency-key-header): a "
                    "retry with the same key gets the stored response instead of running again"
                ),
                "schema": {"type": "string", "minLength": 1, "maxLength": policy.max_key_length},
                "example": '"8e03978e-40d5-43e8-bc93-6894a57f9324"',
            }
        )
    if guarded and guard is not None and (guard.header.lower(), "header") not in present:
        parameters.append(
            {
                "name": guard.header,
                "in": "header",
                "required": guard.field is None,
                "description": (
                    f"A one-time token of purpose `{policy.token}`"
                    + (f" (or the `{guard.field}` body field)" if guard.field else "")
                    + (f", issued by {guard.endpoint}" if guard.endpoint else "")
                ),
                "schema": {"type": "string"},
            }
        )
    responses: dict[str, Any] = operation.setdefault("responses", {})
    replay = {
        "description": "`true` when this is the stored response of an earlier request with "
        "the same Idempotency-Key (the operation did not run again)",
        "schema": {"type": "string", "enum": ["true"]},
    }
    if keyed:
        for code, response in responses.items():
            if str(code)[:1] in ("2", "3") and isinstance(response, dict):
                headers = response.setdefault("headers", {})
                headers.setdefault(policy.replay_header.decode("latin-1").title(), dict(replay))
    tables = ([_KEYED] if keyed else []) + ([_GUARDED] if guarded else [])
    for table in tables:
        for status, (summary, kinds) in table.items():
            types = _problems_text(policy.problem_base, kinds)
            _add_response(responses, status, summary, types, status in (409, 503))


def amend_openapi(schema: dict[str, Any], app: Any, engine: Engine) -> dict[str, Any]:
    """``schema`` (FastAPI's OpenAPI document of ``app``) with what ``engine`` does to each
    operation it protects (see the module docstring); changed in place and returned."""
    paths: dict[str, Any] = schema.get("paths") or {}
    documented = False
    for route in getattr(app, "routes", ()):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        item = paths.get(route.path_format)
        if not isinstance(item, dict):
            continue
        for method in sorted(route.methods or ()):
            operation = item.get(method.lower())
            policy = engine.policy_of(method, route.path_format, endpoint_rule(route, method))
            if isinstance(operation, dict) and policy is not None:
                _document_operation(operation, policy, method, engine.config.tokens)
                documented = True
    if documented:
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).setdefault(PROBLEM_SCHEMA, copy.deepcopy(_SCHEMA))
    return schema


# -- start-up: marked routes need the middleware ---------------------------------------------------
def _marked_routes(app: Any) -> list[str]:
    marked = []
    for route in getattr(app, "routes", ()):
        if isinstance(route, APIRoute) and endpoint_rule(route, "") is not None:
            marked.append(f"{'|'.join(sorted(route.methods or ()))} {route.path_format}")
    return marked


def _has_middleware(stack: Any) -> bool:
    return any(isinstance(node, IdempotencyMiddleware) for node in stack_below(stack))


class _MissingMiddleware:
    """The app's stack when marked routes have no idempotency middleware around them: start-up
    fails with what to add (unless an idempotency middleware wraps the app from outside)."""

    def __init__(self, app: Any, problem: str) -> None:
        self.app = app
        self.problem = problem

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get(OUTER_KEY) is None:
            from oncely.http.asgi import refuse

            await refuse(scope, receive, send, self.problem)
            return
        await self.app(scope, receive, send)


def _install_hooks() -> None:
    if getattr(FastAPI, _DOCUMENTED, False):
        return
    original_openapi = FastAPI.openapi
    original_build = FastAPI.build_middleware_stack

    def openapi(self: FastAPI) -> dict[str, Any]:
        schema: dict[str, Any] = original_openapi(self)
        if getattr(self, _DOCUMENTED, None) is not schema:
            engine = _engine_for(self)
            if engine is not None:
                amend_openapi(schema, self, engine)
                setattr(self, _DOCUMENTED, schema)
        return schema

    def build_middleware_stack(self: FastAPI) -> Any:
        stack = original_build(self)
        marked = _marked_routes(self)
        if marked and not _has_middleware(stack):
            shown = ", ".join(marked[:3]) + (
                f" and {len(marked) - 3} more" if len(marked) > 3 else ""
            )
            return _MissingMiddleware(
                stack,
                f"the routes {shown} are marked for oncely (Depends(Idempotency(...)), "
                "Depends(RequireToken(...)) or @idempotent_route) but no IdempotencyMiddleware "
                "runs around the app, so nothing would protect them; add "
                "app.add_middleware(IdempotencyMiddleware, config=IdempotencyConfig(store=..., "
                "scope=...)) (from oncely.http import IdempotencyConfig, IdempotencyMiddleware)",
            )
        return stack

    FastAPI.openapi = openapi  # type: ignore[method-assign]
    FastAPI.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
    setattr(FastAPI, _DOCUMENTED, True)


_install_hooks()
