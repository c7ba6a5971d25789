"""Whose key space a request's ``Idempotency-Key`` belongs to (the ``scope=`` setting).

The draft (draft-ietf-httpapi-idempotency-key-header-06, Security Considerations) asks that
the server combine the client's key with client-specific attributes, so that one client can
neither read another's stored response nor block its key. oncely therefore has **no default**:
:class:`~oncely.http.config.IdempotencyConfig` refuses to be built without ``scope=``, one of

* a callable ``(request) -> str | None`` naming the tenant, user or API client (a non-secret
  id: it is part of the store key; ``None`` is the anonymous scope);
* a ready helper: :func:`scope_from_header` (``Authorization``, an API-key header) or
  :func:`scope_from_cookie` (a session cookie), which store a digest, never the credential;
* :data:`GLOBAL`: every client shares one key space — say so only when there is one client
  (a single internal caller) or the keys are unguessable *and* the responses are not private.

Why no derived default: a scope from the whole ``Cookie`` header changes when a tracking or
CSRF cookie changes between two tries, so a retry would run again; a scope from
``Authorization`` alone lets every cookie-session user (Django, Flask sessions) share one key
space. Only the application knows which attribute names its clients.

The same rule holds for the subject one-time tokens are bound to (``TokenGuard(subject=...)``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Final

from oncely.errors import ConfigurationError
from oncely.http.messages import HttpRequest

__all__ = [
    "GLOBAL",
    "Global",
    "ScopeFunction",
    "ScopeSpec",
    "resolve_scope",
    "scope_from_cookie",
    "scope_from_header",
]

ScopeFunction = Callable[[HttpRequest], "str | None"]

#: The scope of a request that carries none of the attributes a helper reads.
ANONYMOUS: Final = "-"


class Global:
    """The type of :data:`GLOBAL` (one key space for every client)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "oncely.http.GLOBAL"


#: ``scope=GLOBAL`` / ``subject=GLOBAL``: every client shares one key space (an explicit opt-out
#: of per-client scopes).
GLOBAL: Final = Global()

ScopeSpec = ScopeFunction | Global


class _Digest:
    """A scope function that hashes what it reads (HMAC-SHA256 when given a secret)."""

    def __init__(self, what: str, read: Callable[[HttpRequest], str | None], secret: bytes | None):
        self._what = what
        self._read = read
        self._secret = secret

    def __call__(self, request: HttpRequest) -> str:
        value = self._read(request)
        if value is None or value == "":
            return ANONYMOUS
        data = self._what.encode("utf-8") + b"\x00" + value.encode("utf-8", "surrogateescape")
        if self._secret is None:
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = hmac.new(self._secret, data, hashlib.sha256).hexdigest()
        return digest[:32]

    def __repr__(self) -> str:
        return f"<scope from {self._what}>"


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        return None
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(raw) < 16:
        raise ConfigurationError("a scope secret must have at least 16 bytes")
    return raw


def scope_from_header(*names: str, secret: str | bytes | None = None) -> ScopeFunction:
    """A scope from request header(s): the first 32 hex digits of SHA-256 over the names and
    values (HMAC-SHA256 with ``secret``), so the store never sees the credential.

    ``scope_from_header("Authorization")`` gives each bearer token / API key its own key space;
    ``scope_from_header("X-Api-Key", "X-Tenant")`` combines several. A request without any of
    the headers falls in the anonymous scope ``"-"``. Pass ``secret=`` (16+ bytes) when the
    values are guessable (HTTP Basic passwords), so the stored digest cannot be brute-forced.

    :raises ConfigurationError: no header name, or a secret shorter than 16 bytes.
    """
    if not names or any(not isinstance(n, str) or not n or ":" in n for n in names):
        raise ConfigurationError(
            "scope_from_header() takes one or more header names, e.g. "
            "scope_from_header('Authorization')"
        )
    wanted = [n.lower().encode("latin-1") for n in names]

    def read(request: HttpRequest) -> str | None:
        values = [b", ".join(request.header_values(name)) for name in wanted]
        if not any(values):
            return None
        return "\x00".join(v.decode("latin-1") for v in values)

    return _Digest("header " + ",".join(n.lower() for n in names), read, _secret_bytes(secret))


def scope_from_cookie(name: str, *, secret: str | bytes | None = None) -> ScopeFunction:
    """A scope from one cookie (a session id such as Django's ``sessionid``), hashed like
    :func:`scope_from_header`; a request without the cookie falls in the anonymous scope.

    Use a cookie whose value stays the same between a request and its retry: a server-side
    session id does, a signed client-side session (Flask's default ``session`` cookie) changes
    whenever the session is written — scope by the user id inside it instead.

    :raises ConfigurationError: no cookie name, or a secret shorter than 16 bytes.
    """
    if not isinstance(name, str) or not name or any(c in name for c in "=; "):
        raise ConfigurationError("scope_from_cookie() takes one cookie name, e.g. 'sessionid'")
    return _Digest(f"cookie {name}", lambda request: request.cookie(name), _secret_bytes(secret))


def resolve_scope(spec: object, where: str) -> ScopeFunction | None:
    """A ``scope=``/``subject=`` setting as a function, or None for :data:`GLOBAL`.

    :raises ConfigurationError: the setting is missing or not a callable.
    """
    if isinstance(spec, Global):
        return None
    if spec is None:
        raise ConfigurationError(
            f"{where}= is required: it says whose key space a request belongs to, so that one "
            "client never gets another's stored response. Pass one of\n"
            f"  {where}=oncely.http.scope_from_header('Authorization')  # per credential, hashed\n"
            f"  {where}=oncely.http.scope_from_cookie('sessionid')      # per session, hashed\n"
            f"  {where}=lambda request: ...  # your tenant/user id (request.raw: ASGI scope or "
            "WSGI environ)\n"
            f"  {where}=oncely.http.GLOBAL  # one key space for every client: only for a single "
            "trusted client"
        )
    if not callable(spec):
        raise ConfigurationError(
            f"{where} takes a callable (request) -> str, a helper such as "
            "scope_from_header('Authorization'), or oncely.http.GLOBAL"
        )
    return spec
