"""Whose key space a request's ``Idempotency-Key`` belongs to (the ``scope=`` setting).

The draft (draft-ietf-httpapi-idempotency-key-header-06, Security Considerations) asks that
the server combine the client's key with client-specific attributes, so that one client can
neither read another's stored response nor block its key. oncely therefore has **no default**:
:class:`~oncely.http.config.IdempotencyConfig` refuses to be built without ``scope=``, one of

* :func:`scope_from_user`: the **authenticated principal** (user or tenant id) your auth layer
  attached to the request (Starlette/FastAPI/Litestar ``request.user`` or
  ``request.state.user``, a WSGI server's ``REMOTE_USER``; Django:
  :data:`oncely.http.django.scope_from_user`). The right choice for money: the principal
  stays the same when its credentials change, and a request without one is refused;
* a callable ``(request) -> str | None`` naming the tenant, user or API client (a non-secret
  id: it is part of the store key; ``None`` is the anonymous scope), e.g. the ``sub`` of a
  JWT *you verified*;
* a credential helper: :func:`scope_from_header` (``Authorization``, an API-key header) or
  :func:`scope_from_cookie` (a session cookie), which store a digest, never the credential.
  **They scope by the credential, not by who holds it**: an OAuth access token that is
  refreshed between a request and its retry, a rotated API key or a re-issued session cookie
  puts the retry in a new key space, and it runs again (a second charge). Use them only when
  the credential lives longer than any retry (a static API key per client);
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
from typing import Any, Final, Literal

from oncely.core.text import utf8
from oncely.errors import ConfigurationError, HttpProblem
from oncely.http.messages import HttpRequest

__all__ = [
    "GLOBAL",
    "Global",
    "ScopeFunction",
    "ScopeSpec",
    "resolve_scope",
    "scope_from_cookie",
    "scope_from_header",
    "scope_from_user",
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
    if isinstance(secret, str):
        raw = utf8(secret, "a scope secret", ConfigurationError)
    else:
        raw = bytes(secret)
    if len(raw) < 16:
        raise ConfigurationError("a scope secret must have at least 16 bytes")
    return raw


def scope_from_header(*names: str, secret: str | bytes | None = None) -> ScopeFunction:
    """A scope from request header(s): the first 32 hex digits of SHA-256 over the names and
    values (HMAC-SHA256 with ``secret``), so the store never sees the credential.

    ``scope_from_header("X-Api-Key")`` gives each API key its own key space;
    ``scope_from_header("X-Api-Key", "X-Tenant")`` combines several. A request without any of
    the headers falls in the anonymous scope ``"-"``, shared by every such client.

    The scope is the credential, not its holder: a credential that changes between a request
    and its retry (an OAuth access token refreshed after a timeout, a rotated key) puts the
    retry in another key space, where it runs again. For bearer tokens scope by the principal
    they name (:func:`scope_from_user`, or a function returning a verified JWT's ``sub``).
    Pass ``secret=`` (16+ bytes) when the values are guessable (HTTP Basic passwords), so the
    stored digest cannot be brute-forced.

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
    session id does until the session is cycled (log-in, privilege change), a signed
    client-side session (Flask's default ``session`` cookie) changes whenever the session is
    written — scope by the user id (:func:`scope_from_user`) instead.

    :raises ConfigurationError: no cookie name, or a secret shorter than 16 bytes.
    """
    if not isinstance(name, str) or not name or any(c in name for c in "=; "):
        raise ConfigurationError("scope_from_cookie() takes one cookie name, e.g. 'sessionid'")
    return _Digest(f"cookie {name}", lambda request: request.cookie(name), _secret_bytes(secret))


#: The problem a request without a principal gets from :func:`scope_from_user` (the ``type``
#: URI ends in this slug).
PRINCIPAL_MISSING = "principal-missing"


def principal_missing(request: HttpRequest) -> HttpProblem:
    """The 401 ``principal-missing`` problem for a keyed request without an authenticated
    client, under a scope by principal (its key space would otherwise be shared by every
    anonymous client)."""
    return HttpProblem(
        401,
        PRINCIPAL_MISSING,
        "Authentication required",
        f"{request.method} {request.path} with an Idempotency-Key needs an authenticated "
        "client: its key space is the client's",
        headers=(("WWW-Authenticate", "Bearer"),),
    )


_SCALAR_ID = (str, int)


def _principal(raw: Any) -> Any:
    """The principal the auth layer attached to the framework request ``raw`` (ASGI scope,
    WSGI environ, or a framework request object), or None."""
    if isinstance(raw, dict):
        user = raw.get("user")  # ASGI: Starlette's AuthenticationMiddleware, Litestar's auth
        if user is None:
            state = raw.get("state")
            user = state.get("user") if isinstance(state, dict) else None  # request.state.user
        if user is None:
            user = raw.get("REMOTE_USER") or None  # WSGI: the server's or an outer layer's auth
        return user
    return getattr(raw, "user", None)  # a request object (Django's request.user)


class _UserScope:
    """See :func:`scope_from_user`."""

    def __init__(self, attribute: str, anonymous: str) -> None:
        self._attribute = attribute
        self._anonymous = anonymous

    def __call__(self, request: HttpRequest) -> str | None:
        principal = self.principal(request)
        if principal is None:
            if self._anonymous == "share":
                return ANONYMOUS
            raise principal_missing(request)
        return principal

    def scope_after(self, request: HttpRequest) -> object:
        """The scope the request would get now (once the app ran): what :meth:`__call__`
        answers, or None where it would refuse the request (see :data:`UNKNOWN`)."""
        principal = self.principal(request)
        return ANONYMOUS if principal is None and self._anonymous == "share" else principal

    def principal(self, request: HttpRequest) -> str | None:
        """``"user:<id>"`` of the request's authenticated user, or None."""
        user = _principal(request.raw)
        if user is not None and not isinstance(user, _SCALAR_ID):
            if getattr(user, "is_authenticated", True) is False:
                user = None
            else:
                try:
                    user = getattr(user, self._attribute)
                except (AttributeError, NotImplementedError):
                    raise ConfigurationError(
                        f"scope_from_user({self._attribute!r}): the request's user "
                        f"({type(user).__name__}) has no {self._attribute!r}; name the attribute "
                        "holding its stable id, e.g. scope_from_user('username')"
                    ) from None
        if isinstance(user, bool) or not isinstance(user, _SCALAR_ID) or user == "":
            if user is not None:
                raise ConfigurationError(
                    f"scope_from_user({self._attribute!r}): the user's {self._attribute!r} is "
                    f"a {type(user).__name__}, not a str or int id"
                )
            return None
        return f"user:{user}"

    def __repr__(self) -> str:
        return f"<scope from the user's {self._attribute}>"


#: What a scope's ``scope_after(request)`` answers when it cannot tell the principal the app
#: saw without blocking (Django's lazy user the app never loaded): no verdict.
UNKNOWN: Final = object()


def scope_after(function: object, request: HttpRequest) -> object:
    """The scope ``function`` (a ``scope=``) gives ``request`` once the app ran, for a scope
    by the principal (one with a ``scope_after`` method, as :func:`scope_from_user`'s):
    ``"user:<id>"``, the anonymous scope, None where it would refuse the request (no
    principal), or :data:`UNKNOWN` (other scope functions, or a principal that cannot be read
    without blocking). An exception reading it is raised."""
    after = getattr(function, "scope_after", None)
    return UNKNOWN if after is None else after(request)


def reads_principal(function: object) -> bool:
    """``function`` (a ``scope=`` or ``subject=``) is :func:`scope_from_user`'s: it reads the
    principal an authentication layer attached to the request, so that layer must run before
    the idempotency middleware."""
    return isinstance(function, _UserScope)


def scope_from_user(
    attribute: str = "id", *, anonymous: Literal["refuse", "share"] = "refuse"
) -> ScopeFunction:
    """A scope from the authenticated principal: ``"user:<id>"``, where the id is the
    ``attribute`` of the user your authentication attached to the request, so a client keeps
    its key space when its access token is refreshed, its API key rotated or its session
    cookie re-issued between a request and its retry.

    Where the user is read (the first that is set): the ASGI scope's ``"user"`` (Starlette's
    ``AuthenticationMiddleware``, Litestar's authentication: ``request.user``), then its
    ``"state"["user"]`` (``request.state.user`` set by a middleware), the WSGI environ's
    ``REMOTE_USER`` (a str id, set by the server or an outer WSGI layer), or a request
    object's ``user`` (Django: prefer :data:`oncely.http.django.scope_from_user`, which also
    loads the user without blocking under ASGI). The authentication must run **before** the
    idempotency middleware: in Starlette/FastAPI add it after (``app.add_middleware`` wraps
    what was added before); a FastAPI dependency runs too late (inside the route). A user
    that is a str or int is its own id; an object with ``is_authenticated`` false has none.

    :param attribute: the user's attribute holding a stable, non-secret id (``"id"``,
        ``"username"`` for Starlette's ``SimpleUser``, ``"tenant_id"``).
    :param anonymous: a request with no authenticated user: ``"refuse"`` (default) raises
        :class:`~oncely.errors.HttpProblem` 401 ``principal-missing`` before anything is
        claimed or run (as one key space shared by every anonymous client would let one
        client replay or block another's operation); ``"share"`` puts it in the anonymous
        scope ``"-"``, shared by all such clients (public endpoints whose keys are
        unguessable).
    :raises ConfigurationError: a bad argument; on a request, a user without ``attribute``.
    """
    if not isinstance(attribute, str) or not attribute.isidentifier():
        raise ConfigurationError(
            f"scope_from_user(attribute={attribute!r}): name the user attribute holding its "
            "id, e.g. 'id'"
        )
    if anonymous not in ("refuse", "share"):
        raise ConfigurationError(
            f"scope_from_user(anonymous={anonymous!r}): 'refuse' (401 without a principal) "
            "or 'share' (one anonymous key space)"
        )
    return _UserScope(attribute, anonymous)


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
            f"  {where}=oncely.http.scope_from_user('id')  # per authenticated user\n"
            f"  {where}=oncely.http.scope_from_header('X-Api-Key')  # per static key, hashed\n"
            f"  {where}=oncely.http.scope_from_cookie('sessionid')  # per session, hashed\n"
            f"  {where}=lambda request: ...  # your tenant/user id (request.raw: ASGI scope or "
            "WSGI environ)\n"
            f"  {where}=oncely.http.GLOBAL  # one key space for every client: only for a single "
            "trusted client"
        )
    if not callable(spec):
        raise ConfigurationError(
            f"{where} takes a callable (request) -> str, a helper such as "
            "scope_from_user('id'), or oncely.http.GLOBAL"
        )
    return spec
