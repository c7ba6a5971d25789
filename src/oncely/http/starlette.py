"""Starlette (and FastAPI) helpers: find the rule of the endpoint a request will reach.

:class:`~oncely.http.asgi.IdempotencyMiddleware` uses :func:`resolver_for` by itself when it
runs inside a Starlette or FastAPI app (it finds the app in ``scope["app"]``), so marking an
endpoint is enough::

    from oncely.http import idempotent_route

    @idempotent_route(fingerprint=["amount"])
    async def create_payment(request): ...

    app = Starlette(routes=[Route("/payments", create_payment, methods=["POST"])],
                    middleware=[Middleware(IdempotencyMiddleware, config=config)])

Routes are matched the way Starlette's router does it (first full match, through mounts), so
the rule is the one of the endpoint that will run. The same matching tells the middleware when
the router will refuse a request without running any endpoint (404, 405, a slash redirect):
such a refusal is sent as it is and does not use up the key. In FastAPI apps a request that
fails validation (``RequestValidationError``, answered 422 before the endpoint runs) does not
use up the key either: :func:`integrate` wraps the app's handler for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, MutableMapping
from typing import Any

from starlette.endpoints import HTTPEndpoint
from starlette.routing import Host, Match, Mount, Route

from oncely.http.engine import Engine
from oncely.http.routes import Rule, rule_of

__all__ = ["StarletteResolver", "endpoint_rule", "integrate", "resolver_for"]

log = logging.getLogger("oncely.http")

_MAX_DEPTH = 16
#: How many (method, path, root path) lookups a resolver remembers.
_CACHE_SIZE = 1024
_ROUTE_MATCHES = Route.matches


def _dependant_rule(dependant: Any, depth: int = 0) -> Rule | None:
    """A rule carried by a FastAPI dependency (``Depends(Idempotency(...))``), if any."""
    if dependant is None or depth > _MAX_DEPTH:
        return None
    for sub in getattr(dependant, "dependencies", ()) or ():
        rule = rule_of(getattr(sub, "call", None))
        if rule is None:
            rule = _dependant_rule(sub, depth + 1)
        if rule is not None:
            return rule
    return None


def endpoint_rule(route: Any, method: str) -> Rule | None:
    """The rule of ``route``'s endpoint for ``method`` (decorator, view-class method, or a
    FastAPI dependency)."""
    endpoint = getattr(route, "endpoint", None)
    rule = rule_of(endpoint)
    if rule is None and isinstance(endpoint, type):
        rule = rule_of(getattr(endpoint, method.lower(), None))
    if rule is None:
        rule = _dependant_rule(getattr(route, "dependant", None))
    return rule


def _sub_routes(route: Any) -> list[Any] | None:
    if isinstance(route, (Mount, Host)):
        routes = route.routes
        return list(routes) if routes else None
    return None


def _marked(routes: Iterable[Any], depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        return False
    for route in routes:
        sub = _sub_routes(route)
        if sub is not None:
            if _marked(sub, depth + 1):
                return True
            continue
        endpoint = getattr(route, "endpoint", None)
        if endpoint_rule(route, "") is not None:
            return True
        if isinstance(endpoint, type) and any(
            rule_of(getattr(endpoint, m, None)) is not None
            for m in ("post", "put", "patch", "delete", "get")
        ):
            return True
    return False


class StarletteResolver:
    """Callable ``scope -> Rule | None`` over a Starlette route table, and
    :meth:`dispatches`: whether the router will hand the request to an endpoint at all."""

    def __init__(self, routes: list[Any], marked: bool = True) -> None:
        self.routes = routes  # the live list: routes added later are matched too
        #: Whether any endpoint carries a rule (if not, :meth:`__call__` skips matching).
        self.marked = marked
        self._cache: dict[tuple[int, str], tuple[Any, Rule | None]] = {}
        #: The route table the lookups below were made on, and whether it can be cached:
        #: every route a plain Starlette ``Route``, whose match depends on the method, the
        #: path and the root path only.
        self._seen: tuple[Any, ...] | None = None
        self._cacheable = False
        self._found: dict[tuple[str, str, str], tuple[Any, bool | None]] = {}

    def _lookup(self, scope: MutableMapping[str, Any]) -> tuple[Any, bool | None]:
        """:meth:`_find` on the whole table, remembered per (method, path, root path) while
        the table holds the same plain routes (the router matches the same way again, so
        the middleware's look costs a dictionary lookup, not a second pass of matching)."""
        routes = self.routes
        seen = self._seen
        if seen is None or len(seen) != len(routes) or seen != tuple(routes):
            seen = self._seen = tuple(routes)
            self._cacheable = all(type(r).matches is _ROUTE_MATCHES for r in seen)
            self._found = {}
        if not self._cacheable:
            return self._find(routes, scope, 0)
        key = (scope.get("method", ""), scope.get("path", ""), scope.get("root_path", ""))
        hit = self._found.get(key)
        if hit is None:
            hit = self._find(routes, scope, 0)
            if len(self._found) < _CACHE_SIZE:
                self._found[key] = hit
        return hit

    def __call__(self, scope: MutableMapping[str, Any]) -> Rule | None:
        if not self.marked:
            return None
        route, _ = self._lookup(scope)
        if route is None:
            return None
        method = scope.get("method", "")
        key = (id(route), method)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = (route, endpoint_rule(route, method))
        return hit[1]

    def dispatches(self, scope: MutableMapping[str, Any]) -> bool | None:
        """True if an endpoint will get the request, False if the router answers by itself
        (no route: 404; another method: 405; a slash redirect), None if it cannot tell (a
        mounted app that is not a router)."""
        route, found = self._lookup(scope)
        if found is True and type(route) is Route and not isinstance(route.endpoint, type):
            return True  # a plain Route to a function (the usual): its endpoint runs
        if route is not None:
            endpoint = getattr(route, "endpoint", None)
            if (
                isinstance(endpoint, type)
                and issubclass(endpoint, HTTPEndpoint)
                and not hasattr(endpoint, str(scope.get("method", "")).lower())
            ):
                return False  # HTTPEndpoint answers 405 for a method it has no handler for
        return found

    def _find(
        self, routes: list[Any], scope: MutableMapping[str, Any], depth: int
    ) -> tuple[Any, bool | None]:
        """The route the router picks: ``(route, True)``, ``(None, False)`` when no route
        matches fully, ``(None, None)`` when the request goes to an app we cannot look into."""
        for route in routes:
            try:
                match, child = route.matches(scope)
            except Exception:  # a route that cannot read this scope is not the one
                continue
            if match is not Match.FULL:
                continue
            if isinstance(route, (Mount, Host)):
                sub = _sub_routes(route)
                if sub is None or depth >= _MAX_DEPTH:
                    return None, None
                return self._find(sub, {**scope, **child}, depth + 1)
            return route, True
        return None, False


def resolver_for(app: Any) -> StarletteResolver | None:
    """A resolver for a Starlette/FastAPI ``app`` (None if it has no routes)."""
    router = getattr(app, "router", None)
    routes = getattr(router, "routes", None)
    if routes is None:
        return None
    return StarletteResolver(routes, _marked(routes))


def integrate(app: Any, inner: Any, engine: Engine | None = None) -> StarletteResolver | None:
    """Everything the ASGI middleware needs from a Starlette/FastAPI ``app`` it runs in (or
    wraps): the route resolver, and in FastAPI the hook that tells it about requests refused by
    validation and the OpenAPI documentation of the protected routes (``engine``'s policies).
    ``inner`` is the app the middleware calls (where FastAPI's exception middleware is
    found)."""
    if type(app).__module__.split(".", 1)[0] == "fastapi":
        from oncely.http.fastapi import document, watch_validation

        if engine is not None:
            document(app, engine)
        if not watch_validation(app, inner):
            log.warning(
                "oncely.http: cannot find FastAPI's exception middleware below the idempotency "
                "middleware; a request refused by validation (422) will use up its key"
            )
    return resolver_for(app)
