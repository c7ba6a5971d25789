"""Per-route settings: path patterns in the configuration, or a decorator on the view.

A :class:`Rule` overrides some settings of :class:`~oncely.http.config.IdempotencyConfig` for
the routes it applies to; unset fields inherit. Rules come from two places, later wins:

1. ``IdempotencyConfig(routes={"/orders/*": Rule(required=False)})`` — path patterns, where
   ``*`` matches within one path segment and ``**`` matches anything (the first pattern that
   matches applies);
2. the view itself, marked with ``@idempotent_route(...)`` (Starlette, Flask, Django views and
   FastAPI endpoints) or, in FastAPI, with the ``oncely.http.fastapi.Idempotency`` dependency.
   The framework helper finds the view the router will pick before the view runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from oncely.errors import ConfigurationError
from oncely.http.fingerprint import FingerprintSpec
from oncely.http.fingerprint import resolve as fingerprint_of
from oncely.settings import coerce, text

__all__ = [
    "MARKER",
    "RULE_SETTINGS",
    "Resolver",
    "Rule",
    "compile_pattern",
    "idempotent_route",
    "rule_of",
]

#: The fields of :class:`Rule` that are settings, and the setting each is checked as.
RULE_SETTINGS = {
    "methods": "http_methods",
    "required": "http_required",
    "ttl": "ttl",
    "lease": "lease",
    "wait": "http_wait",
    "store_client_errors": "http_store_client_errors",
    "store_server_errors": "http_store_server_errors",
    "max_request_body": "http_max_request_body",
    "max_stored_body": "http_max_stored_body",
}

MARKER = "__oncely_http__"
F = TypeVar("F", bound=Callable[..., Any])

#: Finds the rule of the view that will serve a request, from the ASGI scope / WSGI environ.
Resolver = Callable[[Any], "Rule | None"]


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Settings for some routes; ``None`` means "as configured globally".

    ``enabled=False`` turns idempotency off for the route; ``enabled=True`` turns it on even
    where ``include``/``exclude`` would not. ``token`` names the purpose of a one-time token the
    route requires on every unsafe method, whatever ``methods`` and ``enabled`` say (see
    :class:`~oncely.http.config.TokenGuard`).
    """

    enabled: bool | None = None
    methods: Collection[str] | None = None
    required: bool | None = None
    fingerprint: FingerprintSpec = None
    ttl: float | str | None = None
    lease: float | str | None = None
    wait: float | str | None = None
    store_client_errors: bool | None = None
    store_server_errors: bool | None = None
    max_request_body: int | str | None = None
    max_stored_body: int | str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        """Check and convert the values given, as :mod:`oncely.settings` does (``"5m"``, …).

        :raises ConfigurationError: a value of the wrong type, unit or range.
        """
        for name, setting in RULE_SETTINGS.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, coerce(setting, value, where="Rule", param=name))
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise ConfigurationError(f"Rule: enabled={self.enabled!r} must be True, False or None")
        text(self.token, "token", where="Rule", none=True)
        fingerprint_of(self.fingerprint)

    def __call__(self, view: F) -> F:
        """Use the rule as a decorator: mark ``view`` (returned unchanged)."""
        setattr(view, MARKER, self)
        return view


def idempotent_route(
    *,
    enabled: bool | None = True,
    methods: Collection[str] | None = None,
    required: bool | None = None,
    fingerprint: FingerprintSpec = None,
    ttl: float | str | None = None,
    lease: float | str | None = None,
    wait: float | str | None = None,
    store_client_errors: bool | None = None,
    store_server_errors: bool | None = None,
    max_request_body: int | str | None = None,
    max_stored_body: int | str | None = None,
    token: str | None = None,
) -> Rule:
    """Decorator marking one view with its own settings (see :class:`Rule`).

    >>> @idempotent_route(required=True, fingerprint=["amount", "currency"])
    ... def create_payment(request): ...
    """
    return Rule(
        enabled=enabled,
        methods=methods,
        required=required,
        fingerprint=fingerprint,
        ttl=ttl,
        lease=lease,
        wait=wait,
        store_client_errors=store_client_errors,
        store_server_errors=store_server_errors,
        max_request_body=max_request_body,
        max_stored_body=max_stored_body,
        token=token,
    )


def rule_of(view: Any) -> Rule | None:
    """The rule a view was marked with, looking through ``functools.wraps`` and view classes."""
    seen = 0
    while view is not None and seen < 8:
        rule = getattr(view, MARKER, None)
        if isinstance(rule, Rule):
            return rule
        view = getattr(view, "__wrapped__", None)
        seen += 1
    return None


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A path pattern (``/orders/*``, ``/admin/**``) as a regular expression."""
    if not isinstance(pattern, str) or not pattern.startswith("/"):
        raise ConfigurationError(f"path pattern {pattern!r} must start with '/', e.g. '/orders/*'")
    out = []
    for piece in re.split(r"(\*\*|\*)", pattern):
        if piece == "**":
            out.append(".*")
        elif piece == "*":
            out.append("[^/]*")
        else:
            out.append(re.escape(piece))
    return re.compile("".join(out) + r"\Z")
