"""What the ASGI and WSGI faces share at run time: the store, the tokens and route policies.

An :class:`Engine` is built once per middleware from an
:class:`~oncely.http.config.IdempotencyConfig`; it checks the optional packages it needs
(``http-sf``, the store's driver) right away, opens the store on first use and caches the
effective :class:`~oncely.http.config.RoutePolicy` of each combination of route rules.
"""

from __future__ import annotations

import re
import threading

from oncely.http.config import IdempotencyConfig, RoutePolicy
from oncely.http.headers import require_parser
from oncely.http.messages import HttpRequest
from oncely.http.routes import Resolver, Rule, compile_pattern
from oncely.http.scopes import ScopeFunction, resolve_scope
from oncely.stores import Store, shared_store
from oncely.tokens import Tokens

__all__ = ["SAFE_METHODS", "Engine"]

#: Methods that never carry an idempotency key of their own (RFC 9110 safe methods).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})


class Engine:
    """The run-time state behind one middleware instance (either face)."""

    def __init__(self, config: IdempotencyConfig, resolver: Resolver | None = None) -> None:
        """:raises ConfigurationError: ``http-sf`` or the store's driver is not installed, or
        the store URL is unknown (each message has the install line)."""
        require_parser()
        self.config = config
        self.resolver = resolver
        # IdempotencyConfig resolved the store (argument, $ONCELY_STORE, default) and checked
        # its URL's class; a URL is opened on first use.
        self._store: Store | None = config.store if isinstance(config.store, Store) else None
        self._store_url = config.store
        self._lock = threading.Lock()
        self._include = [compile_pattern(p) for p in config.include]
        self._exclude = [compile_pattern(p) for p in config.exclude]
        self._routes: list[tuple[re.Pattern[str], Rule]] = [
            (compile_pattern(p), rule) for p, rule in config.routes.items()
        ]
        guard = config.tokens
        self.tokens: Tokens | None = guard.tokens if guard is not None else None
        #: Who one-time tokens are bound to (None: GLOBAL, every client is "").
        self.subject: ScopeFunction | None = resolve_scope(
            guard.subject if guard is not None and guard.subject is not None else config.scope,
            "subject",
        )
        self.token_endpoint: str | None = guard.endpoint if guard is not None else None
        self._token_routes: list[tuple[re.Pattern[str], Rule]] = (
            [(compile_pattern(p), Rule(token=purpose)) for p, purpose in guard.routes.items()]
            if guard is not None
            else []
        )
        self._on = RoutePolicy.build(config, True)
        self._off = RoutePolicy.build(config, False)
        self._policies: dict[
            tuple[bool, int, int, int], tuple[RoutePolicy, tuple[Rule | None, ...]]
        ] = {}
        self._by_path = bool(self._include or self._exclude or self._routes or self._token_routes)
        methods = set(self._on.methods)
        for _, rule in self._routes:
            methods.update(m.upper() for m in (rule.methods or ()))
        #: Methods a request must have to be looked at at all (None: any unsafe method, as a
        #: route that requires a one-time token requires it for every unsafe method).
        self.candidates: frozenset[str] | None = frozenset(methods)
        if (
            resolver is not None
            or self._token_routes
            or any(rule.token is not None for _, rule in self._routes)
        ):
            self.candidates = None

    # -- store -------------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The store, opened on first use (building a middleware never connects)."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = shared_store(self._store_url)
        return self._store

    @property
    def tracks_entry(self) -> bool:
        """True if the framework integration reports every handler start (see
        :class:`~oncely.http.messages.HandlerEntry`)."""
        return bool(getattr(self.resolver, "tracks_entry", False))

    def set_resolver(self, resolver: Resolver | None) -> None:
        self.resolver = resolver
        if resolver is not None and getattr(resolver, "marked", True):
            self.candidates = None

    def is_candidate(self, method: str) -> bool:
        """Cheap first test: could a request with ``method`` need any work from us?"""
        if self.candidates is None:
            return method not in SAFE_METHODS or method in self._on.methods
        return method in self.candidates

    # -- policies ----------------------------------------------------------------------------------
    def policy_for(self, request: HttpRequest) -> RoutePolicy | None:
        """The effective policy for ``request``, or None if nothing applies to it."""
        resolver = self.resolver
        if not self._by_path and (resolver is None or getattr(resolver, "marked", True) is False):
            # no rule can apply (a resolver that knows no marked view, as a Starlette app's
            # without @idempotent_route, answers None without looking)
            return self._applies(self._on, request.method)
        view_rule = resolver(request.raw) if resolver is not None else None
        return self.policy_of(request.method, request.path, view_rule)

    def policy_of(
        self, method: str, path: str, view_rule: Rule | None = None
    ) -> RoutePolicy | None:
        """The effective policy of ``method`` on ``path`` served by a view marked with
        ``view_rule``, or None if nothing applies (what the OpenAPI documentation of a route
        asks, without a request)."""
        policy = self._on
        if self._by_path or view_rule is not None:
            enabled = (not self._include or any(p.match(path) for p in self._include)) and not any(
                p.match(path) for p in self._exclude
            )
            path_rule = next((r for p, r in self._routes if p.match(path)), None)
            token_rule = next((r for p, r in self._token_routes if p.match(path)), None)
            if path_rule is None and token_rule is None and view_rule is None:
                policy = self._on if enabled else self._off
            else:
                policy = self._combined(enabled, path_rule, token_rule, view_rule)
        return self._applies(policy, method)

    @staticmethod
    def _applies(policy: RoutePolicy, method: str) -> RoutePolicy | None:
        if policy.enabled and method in policy.methods:
            return policy
        if policy.token is not None and method not in SAFE_METHODS:
            return policy  # every unsafe method of a token-guarded route needs the token
        return None

    def _combined(self, enabled: bool, *rules: Rule | None) -> RoutePolicy:
        cache_key = (enabled, id(rules[0]), id(rules[1]), id(rules[2]))
        hit = self._policies.get(cache_key)
        if hit is None:
            # The rules are kept in the value so their ids stay theirs.
            hit = (RoutePolicy.build(self.config, enabled, *rules), rules)
            if len(self._policies) < 4096:
                self._policies[cache_key] = hit
        return hit[0]
