"""The one configuration object both HTTP faces (ASGI and WSGI) take.

>>> from oncely.http import IdempotencyConfig, scope_from_user
>>> config = IdempotencyConfig(
...     store="redis://localhost:6379/0", scope=scope_from_user("id"),
...     exclude=["/health"])

Every setting is documented on :class:`IdempotencyConfig`; ``docs/http.md`` has the full
picture. :class:`RoutePolicy` is the effective, pre-computed settings of one route (global settings
merged with the route's :class:`~oncely.http.routes.Rule`); it is internal.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any, Literal

from oncely.core.lease import LostCallback
from oncely.core.text import MAX_SCOPE_BYTES, stored_text
from oncely.errors import ConfigurationError
from oncely.http.codec import ALWAYS_DENIED
from oncely.http.fingerprint import Fingerprinter, FingerprintSpec
from oncely.http.fingerprint import resolve as fingerprint_of
from oncely.http.routes import RULE_SETTINGS, Rule, compile_pattern
from oncely.http.scopes import Global, ScopeFunction, ScopeSpec, resolve_scope
from oncely.settings import UNSET, coerce, names, resolve, text
from oncely.stores import Store, configured_store
from oncely.tokens import Tokens

__all__ = ["IdempotencyConfig", "RoutePolicy", "TokenGuard"]


@dataclass(frozen=True, kw_only=True)
class TokenGuard:
    """One-time tokens over HTTP: an endpoint that issues them and routes that require one.

    :param tokens: the :class:`~oncely.tokens.Tokens` (secret and store).
    :param subject: who a token is bound to: a callable ``request -> str`` (user id, session
        id), a helper such as :func:`~oncely.http.scopes.scope_from_cookie`, or
        :data:`~oncely.http.scopes.GLOBAL` (any client may spend any token); default: the
        config's ``scope`` — which must then not be ``GLOBAL`` (a token must not be usable
        by another client unless you say so).
    :param header: request header carrying the token.
    :param field: form field (``application/x-www-form-urlencoded``) or top-level JSON member
        carrying the token when the header is absent; ``None`` to accept the header only.
    :param endpoint: path of the issuing endpoint (GET or POST ``?purpose=…`` answers
        ``{"token": …, "purpose": …, "expires_in": …}``); ``None`` for no endpoint.
    :param purposes: purposes the endpoint issues tokens for (``None``: any).
    :param ttl: lifetime of issued tokens in seconds (default: ``tokens.default_ttl``).
    :param routes: path pattern -> purpose, for routes that require a token (the
        ``@idempotent_route(token=...)`` decorator does the same per view).
    """

    tokens: Tokens
    subject: ScopeSpec | None = None
    header: str = "Oncely-Token"
    field: str | None = "oncely_token"
    endpoint: str | None = None
    purposes: Collection[str] | None = None
    ttl: float | None = None
    routes: Mapping[str, str] = _field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, Tokens):
            raise ConfigurationError("TokenGuard(tokens=...) takes an oncely.tokens.Tokens")
        if self.ttl is not None:
            object.__setattr__(
                self, "ttl", coerce("token_ttl", self.ttl, where="TokenGuard", param="ttl")
            )
        if self.subject is not None:
            resolve_scope(self.subject, "subject")
        text(self.header, "header", where="TokenGuard")
        text(self.field, "field", where="TokenGuard", none=True)
        if self.purposes is not None:
            object.__setattr__(
                self, "purposes", frozenset(names(self.purposes, "purposes", where="TokenGuard"))
            )
        endpoint = text(self.endpoint, "endpoint", where="TokenGuard", none=True)
        if endpoint is not None and not endpoint.startswith("/"):
            raise ConfigurationError(f"endpoint={self.endpoint!r} must be a path like '/tokens'")
        for pattern, purpose in self.routes.items():
            compile_pattern(pattern)
            text(purpose, f"routes[{pattern!r}]", where="TokenGuard")


#: The fields of :class:`IdempotencyConfig` that are settings (see :mod:`oncely.settings`).
_SETTINGS = {
    **RULE_SETTINGS,
    "include": "http_include",
    "exclude": "http_exclude",
    "header": "http_header",
    "allow_bare_key": "http_allow_bare_key",
    "max_key_length": "http_max_key_length",
    "retry_after": "http_retry_after",
    "transient_statuses": "http_transient_statuses",
    "deny_headers": "http_deny_headers",
    "fail_open": "fail_open",
    "problem_base": "http_problem_base",
    "replay_header": "http_replay_header",
    "namespace": "http_namespace",
}


@dataclass(frozen=True, kw_only=True)
class IdempotencyConfig:
    """How the HTTP middleware treats requests; shared by the ASGI and the WSGI face.

    A setting not given (or given as ``None``) comes from its environment variable, else its
    default (:mod:`oncely.settings`): ``store``, ``ttl``, ``lease`` and ``fail_open`` from
    ``$ONCELY_STORE``, ``$ONCELY_TTL``, ``$ONCELY_LEASE``, ``$ONCELY_FAIL_OPEN`` (shared with
    ``@idempotent``), every other plain value from ``$ONCELY_HTTP_<NAME>``
    (``$ONCELY_HTTP_WAIT``, …). After construction every field holds its effective value.
    Durations are seconds or strings with a unit (``"24h"``), sizes bytes or strings
    (``"1MiB"``).

    :param store: store URL or object (default ``sqlite:///oncely.db``).
    :param methods: methods the ``Idempotency-Key`` applies to (default ``POST``, ``PATCH``).
    :param include: path patterns to protect (empty: all paths); ``*`` one segment, ``**`` any.
    :param exclude: path patterns never protected.
    :param routes: path pattern -> :class:`~oncely.http.routes.Rule` overrides.
    :param required: a protected request without the header gets 400 (otherwise it just runs;
        default ``True``).
    :param header: the request header name (default ``Idempotency-Key``).
    :param allow_bare_key: accept an unquoted key (``abc123``, a bare UUID) besides the
        Structured Field string (``"abc123"``; default ``True``). A bare key is kept exactly
        as sent; one holding ``;`` (which starts parameters) is refused: quote it.
    :param max_key_length: longest key accepted, in characters (default 255, as Stripe).
    :param ttl: seconds a completed response is kept for replay (default 86400: Stripe keeps
        24 h).
    :param lease: seconds a running request holds its key without renewal; renewed every
        ``lease / 3`` while the handler runs (default 30).
    :param wait: seconds a duplicate waits for the first request to finish and then gets its
        replay; 0 (the default) answers 409 at once.
    :param retry_after: ``Retry-After`` whole seconds on 409 (in flight) and 503 (store down;
        default 1).
    :param store_client_errors: store and replay 4xx responses (default ``True``, as the
        draft asks).
    :param store_server_errors: store and replay 5xx responses, and keep a handler that raised
        before it responded as a 500 ``handler-failed`` problem (default ``True``, as Stripe:
        once the handler started, its effects may have happened, so a retry never runs it
        again). ``False`` releases the key on a 5xx or an exception, so a retry runs the
        handler again: only for handlers that undo their effects when they fail.
    :param transient_statuses: statuses never stored (the key is released; default 408, 425,
        429).
    :param deny_headers: response headers never stored or replayed, on top of the built-in
        list (``Set-Cookie``, ``Authorization``, hop-by-hop, …).
    :param max_request_body: larger request bodies get 413 before the handler runs (bytes,
        default 1 MiB).
    :param max_stored_body: larger responses are sent, then stored as "not replayable": a retry
        gets 409 ``response-not-replayable`` (never a truncated body, never a second run;
        bytes, default 1 MiB).
    :param fingerprint: ``None`` (method, path, query and body: a JSON media type by its parsed
        value, any other byte for byte), a list of JSON field paths, or a
        callable ``(request, body) -> str``.
    :param scope: **required**: whose key space a request belongs to; equal keys in different
        scopes never meet (draft-06, Security Considerations). A callable ``request -> str``
        naming the tenant/user/API client (a non-secret id: it is stored; ``None`` is the
        anonymous scope), :func:`~oncely.http.scopes.scope_from_user` (the authenticated
        principal: the choice for money), a credential helper
        (:func:`~oncely.http.scopes.scope_from_header`,
        :func:`~oncely.http.scopes.scope_from_cookie`: hashed credentials, which change when a
        token is refreshed, so a retry after that runs again), or
        :data:`~oncely.http.scopes.GLOBAL` to share one key space between all clients. There
        is no default: none would keep users apart, so a missing scope is a
        :class:`~oncely.errors.ConfigurationError`.
    :param fail_open: if the store is unreachable (:class:`~oncely.errors.StoreUnavailable`),
        run the request unprotected (default ``False``: answer 503). Any other store error
        (a missing table, a bad reply) always answers 503 and runs nothing.
    :param problem_base: prefix of problem ``type`` URIs (default
        ``https://oncely.dev/problems/``).
    :param replay_header: header added to replayed responses, value ``true`` (default
        ``Idempotent-Replayed``).
    :param tokens: one-time token guard (see :class:`TokenGuard`).
    :param on_lease_lost: called with ``(claim, error)`` if a running request loses its key
        (a loss found by the renewal threads: on a thread of its own for WSGI, on the
        request's event loop for ASGI).
    :param on_cancel: what a request task cancelled while its handler runs does (ASGI and
        Django's async middleware; a server cancels the task when the client goes away or at
        shutdown): ``"finish"`` (default) lets the handler run on, shielded, and settles the
        key from its response, so a retry replays it (or gets 409 while it runs) instead of
        running it twice; ``"release"`` cancels the handler and releases the key, so a retry
        runs it again (only for handlers safe to cut off halfway).
    :param namespace: store scope prefix of HTTP records (``"<namespace>:<scope>"``, default
        ``http``).
    :raises ConfigurationError: a setting of the wrong type, unit or range (the message names
        it), no ``scope``, a bad path pattern, ``Rule`` or fingerprint, or a store URL that is
        unknown or whose extra is missing.
    """

    store: str | Store = UNSET
    methods: Collection[str] = UNSET
    include: Sequence[str] = UNSET
    exclude: Sequence[str] = UNSET
    routes: Mapping[str, Rule] = _field(default_factory=dict)
    required: bool = UNSET
    header: str = UNSET
    allow_bare_key: bool = UNSET
    max_key_length: int = UNSET
    ttl: float | str = UNSET
    lease: float | str = UNSET
    wait: float | str = UNSET
    retry_after: int | str = UNSET
    store_client_errors: bool = UNSET
    store_server_errors: bool = UNSET
    transient_statuses: Collection[int] = UNSET
    deny_headers: Collection[str] = UNSET
    max_request_body: int | str = UNSET
    max_stored_body: int | str = UNSET
    fingerprint: FingerprintSpec = None
    scope: ScopeSpec | None = None
    fail_open: bool = UNSET
    problem_base: str = UNSET
    replay_header: str = UNSET
    tokens: TokenGuard | None = None
    on_lease_lost: LostCallback | None = None
    on_cancel: Literal["finish", "release"] = "finish"
    namespace: str = UNSET

    def __post_init__(self) -> None:
        where = "IdempotencyConfig"
        set_ = object.__setattr__  # frozen: each field is resolved once, here
        set_(self, "store", configured_store(self.store, where))
        for name, setting in _SETTINGS.items():
            set_(self, name, resolve(setting, getattr(self, name), where=where, param=name))
        # every record's scope is "<namespace>:<scope>": a namespace no store keeps (a NUL,
        # past the MySQL scope column) is refused now, not at every request
        stored_text(
            self.namespace, f"{where}: namespace=", ConfigurationError, most=MAX_SCOPE_BYTES - 1
        )
        if self.on_cancel not in ("finish", "release"):
            raise ConfigurationError(
                f"{where}: on_cancel={self.on_cancel!r} is not valid: expected 'finish' (a "
                "cancelled request's handler runs on and its response is kept) or 'release'"
            )
        if not self.header.isascii() or ":" in self.header:
            raise ConfigurationError(f"{where}: header={self.header!r} is not a header name")
        resolve_scope(self.scope, "scope")
        guard = self.tokens
        if guard is not None and guard.subject is None and isinstance(self.scope, Global):
            raise ConfigurationError(
                "scope=GLOBAL would let any client spend a one-time token issued to another; "
                "pass TokenGuard(subject=...) (e.g. lambda request: <user id>, or "
                "scope_from_cookie('sessionid')), or TokenGuard(subject=GLOBAL) to allow it"
            )
        for pattern in (*self.include, *self.exclude, *self.routes):
            compile_pattern(pattern)
        for pattern, rule in self.routes.items():
            if not isinstance(rule, Rule):
                raise ConfigurationError(
                    f"routes[{pattern!r}] must be a Rule, e.g. Rule(required=False)"
                )
            if rule.token is not None and self.tokens is None:
                raise ConfigurationError(
                    f"routes[{pattern!r}] requires a one-time token but there is no "
                    "tokens=TokenGuard(...)"
                )
        fingerprint_of(self.fingerprint)  # fail at start-up, not on the first request


def _pick(rule: Rule | None, name: str, default: Any) -> Any:
    if rule is None:
        return default
    value = getattr(rule, name)
    return default if value is None else value


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """The effective settings of one route (global config merged with its rules)."""

    enabled: bool
    methods: frozenset[str]
    required: bool
    header: bytes
    header_name: str
    allow_bare_key: bool
    max_key_length: int
    ttl: float
    lease: float
    wait: float
    retry_after: int
    store_client_errors: bool
    store_server_errors: bool
    transient_statuses: frozenset[int]
    deny_headers: frozenset[bytes]
    max_request_body: int
    max_stored_body: int
    fingerprint: Fingerprinter
    scope: ScopeFunction | None  # None: GLOBAL
    fail_open: bool
    problem_base: str
    replay_header: bytes
    token: str | None
    namespace: str
    #: What a cancelled request task does while its handler runs (:class:`IdempotencyConfig`).
    on_cancel: str = "finish"

    @classmethod
    def build(cls, config: IdempotencyConfig, enabled: bool, *rules: Rule | None) -> RoutePolicy:
        def pick(name: str, default: Any = None) -> Any:
            value = getattr(config, name, default)
            for rule in rules:
                value = _pick(rule, name, value)
            return value

        fingerprint_spec = config.fingerprint
        for rule in rules:
            if rule is not None and rule.fingerprint is not None:
                fingerprint_spec = rule.fingerprint
        return cls(
            enabled=pick("enabled", enabled),
            methods=frozenset(m.upper() for m in pick("methods")),
            required=pick("required"),
            header=config.header.lower().encode("ascii"),
            header_name=config.header,
            allow_bare_key=config.allow_bare_key,
            max_key_length=config.max_key_length,
            ttl=float(pick("ttl")),
            lease=float(pick("lease")),
            wait=float(pick("wait")),
            retry_after=int(config.retry_after),
            store_client_errors=pick("store_client_errors"),
            store_server_errors=pick("store_server_errors"),
            transient_statuses=frozenset(config.transient_statuses),
            deny_headers=ALWAYS_DENIED
            | {h.lower().encode("latin-1") for h in config.deny_headers}
            | {config.replay_header.lower().encode("latin-1")},
            max_request_body=int(pick("max_request_body")),
            max_stored_body=int(pick("max_stored_body")),
            fingerprint=fingerprint_of(fingerprint_spec),
            scope=resolve_scope(config.scope, "scope"),
            fail_open=config.fail_open,
            problem_base=config.problem_base,
            replay_header=config.replay_header.lower().encode("latin-1"),
            token=pick("token"),
            namespace=config.namespace,
            on_cancel=config.on_cancel,
        )
