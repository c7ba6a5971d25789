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
the rule is the one of the endpoint that will run. Apps without marked endpoints pay nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

from starlette.routing import Host, Match, Mount

from oncely.http.routes import Rule, rule_of

__all__ = ["StarletteResolver", "endpoint_rule", "resolver_for"]

_MAX_DEPTH = 16


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
    """Callable ``scope -> Rule | None`` over a Starlette route table."""

    def __init__(self, routes: list[Any]) -> None:
        self.routes = routes  # the live list: routes added later are matched too
        self._cache: dict[tuple[int, str], tuple[Any, Rule | None]] = {}

    def __call__(self, scope: MutableMapping[str, Any]) -> Rule | None:
        return self._find(self.routes, scope, 0)

    def _find(self, routes: list[Any], scope: MutableMapping[str, Any], depth: int) -> Rule | None:
        for route in routes:
            try:
                match, child = route.matches(scope)
            except Exception:  # a route that cannot read this scope is not the one
                continue
            if match is not Match.FULL:
                continue
            sub = _sub_routes(route)
            if sub is not None and depth < _MAX_DEPTH:
                return self._find(sub, {**scope, **child}, depth + 1)
            method = scope.get("method", "")
            key = (id(route), method)
            hit = self._cache.get(key)
            if hit is None:
                hit = self._cache[key] = (route, endpoint_rule(route, method))
            return hit[1]
        return None


def resolver_for(app: Any) -> StarletteResolver | None:
    """A resolver for a Starlette/FastAPI ``app``, or None if no endpoint is marked."""
    router = getattr(app, "router", None)
    routes = getattr(router, "routes", None)
    if not routes or not _marked(routes):
        return None
    return StarletteResolver(routes)
