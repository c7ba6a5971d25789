"""HTTP ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header-06) and one-time tokens
for ASGI and WSGI apps, with one configuration and one implementation of the semantics.

>>> from oncely.http import IdempotencyConfig, IdempotencyMiddleware, scope_from_user
>>> config = IdempotencyConfig(store="redis://localhost:6379/0",
...                            scope=scope_from_user("id"))  # the authenticated user's id
>>> app = IdempotencyMiddleware(app, config)                  # Starlette, FastAPI, Litestar
>>> wsgi = WSGIIdempotencyMiddleware(flask_app.wsgi_app, config)  # Flask, Django

Modules: :mod:`~oncely.http.config` (settings), :mod:`~oncely.http.scopes` (whose key space a
request belongs to), :mod:`~oncely.http.headers` (key parsing),
:mod:`~oncely.http.fingerprint`, :mod:`~oncely.http.codec` (stored responses),
:mod:`~oncely.http.problems` (RFC 9457), :mod:`~oncely.http.flow` (the sans-IO protocol),
:mod:`~oncely.http.asgi`, :mod:`~oncely.http.wsgi`, :mod:`~oncely.http.routes` (per-route
rules), :mod:`~oncely.http.guard` (tokens over HTTP), and the framework helpers
:mod:`~oncely.http.starlette`, :mod:`~oncely.http.fastapi`, :mod:`~oncely.http.flask`,
:mod:`~oncely.http.django` (each imports its framework). See ``docs/http.md``.
"""

from oncely.http.asgi import IdempotencyMiddleware
from oncely.http.config import IdempotencyConfig, TokenGuard
from oncely.http.fingerprint import json_fields, request_fingerprint
from oncely.http.messages import (
    ENTRY_KEY,
    HandlerEntry,
    HttpRequest,
    HttpResponse,
    IdempotencyInfo,
)
from oncely.http.problems import PROBLEM_BASE, PROBLEM_TYPES, ProblemType
from oncely.http.routes import Rule, idempotent_route
from oncely.http.scopes import GLOBAL, scope_from_cookie, scope_from_header, scope_from_user
from oncely.http.wsgi import WSGIIdempotencyMiddleware

__all__ = [
    "ENTRY_KEY",
    "GLOBAL",
    "PROBLEM_BASE",
    "PROBLEM_TYPES",
    "HandlerEntry",
    "HttpRequest",
    "HttpResponse",
    "IdempotencyConfig",
    "IdempotencyInfo",
    "IdempotencyMiddleware",
    "ProblemType",
    "Rule",
    "TokenGuard",
    "WSGIIdempotencyMiddleware",
    "idempotent_route",
    "json_fields",
    "request_fingerprint",
    "scope_from_cookie",
    "scope_from_header",
    "scope_from_user",
]
