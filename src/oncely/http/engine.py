"""What the ASGI and WSGI faces share at run time: the store, the tokens and route policies.

An :class:`Engine` is built once per middleware from an
:class:`~oncely.http.config.IdempotencyConfig`; it opens the store on first use and caches the
effective :class:`~oncely.http.config.Policy` of each combination of route rules.
"""

from __future__ import annotations

import os
import re
import threading

from oncely.http.config import IdempotencyConfig, Policy
from oncely.http.messages import HttpRequest
from oncely.http.routes import Resolver, Rule, compile_pattern
from oncely.stores import DEFAULT_URL, Store, shared_store
from oncely.tokens import Tokens

__all__ = ["SAFE_METHODS", "Engine"]

#: Methods that never carry an idempotency key of their own (RFC 9110 safe methods).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})


class Engine:
    """The run-time state behind one middleware instance (either face)."""

    def __init__(self, config: IdempotencyConfig, resolver: Resolver | None = None) -> None:
        self.config = config
        self.resolver = resolver
        self._store: Store | None = config.store if isinstance(config.store, Store) else None
        self._lock = threading.Lock()
        self._include = [compile_pattern(p) for p in config.include]
        self._exclude = [compile_pattern(p) for p in config.exclude]
        self._routes: list[tuple[re.Pattern[str], Rule]] = [
            (compile_pattern(p), rule) for p, rule in config.routes.items()
        ]
        guard = config.tokens
        self.tokens: Tokens | None = guard.tokens if guard is not None else None
        self.token_endpoint: str | None = guard.endpoint if guard is not None else None
        self._token_routes: list[tuple[re.Pattern[str], Rule]] = (
            [(compile_pattern(p), Rule(token=purpose)) for p, purpose in guard.routes.items()]
            if guard is not None
            else []
        )
        self._on = Policy.build(config, True)
        self._off = Policy.build(config, False)
        self._policies: dict[
            tuple[bool, int, int, int], tuple[Policy, tuple[Rule | None, ...]]
        ] = {}
        self._by_path = bool(self._include or self._exclude or self._routes or self._token_routes)
        methods = set(self._on.methods)
        for _, rule in self._routes:
            methods.update(m.upper() for m in (rule.methods or ()))
        #: Methods a request must have to be looked at at all (None: any unsafe method).
        self.candidates: frozenset[str] | None = frozenset(methods)
        if resolver is not None or self._token_routes:
            self.candidates = None

    # -- store -------------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The store, opened on first use (building a middleware never connects)."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    spec = self.config.store or os.environ.get("ONCELY_STORE") or DEFAULT_URL
                    self._store = shared_store(spec)
        return self._store

    def set_resolver(self, resolver: Resolver | None) -> None:
        self.resolver = resolver
        if resolver is not None:
            self.candidates = None

    def is_candidate(self, method: str) -> bool:
        """Cheap first test: could a request with ``method`` need any work from us?"""
        if self.candidates is None:
            return method not in SAFE_METHODS or method in self._on.methods
        return method in self.candidates

    # -- policies ----------------------------------------------------------------------------------
    def policy_for(self, request: HttpRequest) -> Policy | None:
        """The effective policy for ``request``, or None if nothing applies to it."""
        policy = self._on
        if self._by_path or self.resolver is not None:
            path = request.path
            enabled = (not self._include or any(p.match(path) for p in self._include)) and not any(
                p.match(path) for p in self._exclude
            )
            path_rule = next((r for p, r in self._routes if p.match(path)), None)
            token_rule = next((r for p, r in self._token_routes if p.match(path)), None)
            view_rule = self.resolver(request.raw) if self.resolver is not None else None
            if path_rule is None and token_rule is None and view_rule is None:
                policy = self._on if enabled else self._off
            else:
                policy = self._combined(enabled, path_rule, token_rule, view_rule)
        if not policy.enabled or request.method not in policy.methods:
            return None
        return policy

    def _combined(self, enabled: bool, *rules: Rule | None) -> Policy:
        cache_key = (enabled, id(rules[0]), id(rules[1]), id(rules[2]))
        hit = self._policies.get(cache_key)
        if hit is None:
            # The rules are kept in the value so their ids stay theirs.
            hit = (Policy.build(self.config, enabled, *rules), rules)
            if len(self._policies) < 4096:
                self._policies[cache_key] = hit
        return hit[0]
