"""Conditional requests: ``ETag`` from a version, ``If-Match`` checked, 412 and 428 answered.

Optimistic locking over HTTP (RFC 9110 §13.1.1, RFC 6585 §3): a client reads a resource and
gets its version as a strong entity tag (``ETag: "7"``, :func:`etag`); it sends its change with
``If-Match: "7"``; the server applies the change only if the resource is still at version 7,
else answers **412 Precondition Failed**. A route that changes versioned resources can insist
on the header: without it, **428 Precondition Required**, so a client that never read the
resource cannot overwrite what others wrote (the lost update of source §3.3). Refusals are
``application/problem+json`` (:mod:`oncely.http.problems`: ``precondition-failed``,
``precondition-required``, ``if-match-invalid``).

The decision belongs to the store, not to HTTP: comparing ``If-Match`` with a version read
beforehand and then writing is check-then-act. The version from ``If-Match`` is handed to the
atomic write (:func:`oncely.sql.versioned_update`, :meth:`~oncely.optimistic.redis.
RedisVersioned.set`), whose :class:`~oncely.errors.StaleVersion` becomes the 412::

    from oncely.http.conditional import ConditionalMiddleware, etag, if_match

    app.add_middleware(ConditionalMiddleware, paths=("/accounts/",))   # 428 without If-Match

    @app.put("/accounts/{id}")
    async def put(id: int, body: Account, request: Request):
        expected = if_match(request).version           # "7" -> 7 (a single strong tag)
        new = await aversioned_update(conn, "accounts", id, body.dict(), expected)
        return Response(status_code=204, headers={"ETag": etag(new)})   # StaleVersion -> 412

``If-Match: *`` and lists of tags (``"6", "7"``) name no single version: read the row, call
:meth:`IfMatch.check` with its version (412 if none matches), and write with that version (a
change in between is a :class:`~oncely.errors.StaleVersion`, hence a 412 as well). Weak tags
(``W/"7"``) never match: ``If-Match`` uses the strong comparison (RFC 9110 §8.8.3.2, §13.1.1).

Faces: :class:`ConditionalMiddleware` (ASGI: Starlette, FastAPI, any ASGI app) and
:class:`WSGIConditionalMiddleware` (Flask, Django, any WSGI app) require the header on the
routes you choose, parse it once (``scope`` / ``environ`` key ``"oncely.if_match"``) and turn
:class:`~oncely.errors.StaleVersion`, :class:`~oncely.errors.PreconditionFailed` and
:class:`~oncely.errors.PreconditionRequired` raised by the handler into problem responses, and
:class:`~oncely.errors.NotFound` (the row is missing or was deleted) into 412 when the request
sent ``If-Match`` (no current representation: the precondition is false, RFC 9110 §13.1.1),
else 404 ``not-found``.
Flask and Django catch view exceptions themselves: :func:`oncely.http.flask.conditional` and
:class:`oncely.http.django.ConditionalMiddleware` do the same the framework's way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from oncely.errors import (
    ConfigurationError,
    HttpProblem,
    InvalidIfMatch,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
    StaleVersion,
)
from oncely.http.messages import HttpResponse
from oncely.http.problems import NOT_FOUND, PROBLEM_BASE, from_exception, problem_response
from oncely.settings import names, text

__all__ = [
    "IF_MATCH_KEY",
    "UNSAFE_METHODS",
    "ConditionalMiddleware",
    "EntityTag",
    "IfMatch",
    "IfMatchRule",
    "WSGIConditionalMiddleware",
    "etag",
    "if_match",
    "parse_if_match",
    "problem_for",
    "version_of",
]

#: ``scope`` / ``environ`` key where the middlewares leave the parsed :class:`IfMatch` (or None).
IF_MATCH_KEY: Final = "oncely.if_match"
#: Methods that need ``If-Match`` by default: they change an existing resource (POST creates).
UNSAFE_METHODS: Final = frozenset({"PUT", "PATCH", "DELETE"})
#: Longest ``If-Match`` value read (bytes); longer is refused as invalid.
MAX_IF_MATCH: Final = 8192

_VERSION = re.compile(r"0|[1-9][0-9]{0,18}")


def etag(version: int) -> str:
    """The strong entity tag of ``version`` (``7`` -> ``'"7"'``), for the ``ETag`` header
    (RFC 9110 §8.8.3). The version changes with every write, which is what a strong validator
    promises: a different tag for every different representation.

    :raises ConfigurationError: ``version`` is not a non-negative int.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigurationError(f"an ETag needs a non-negative int version, not {version!r}")
    return f'"{version}"'


def version_of(tag: str) -> int | None:
    """The version a strong tag made by :func:`etag` carries, or None for any other tag."""
    if tag.startswith('"') and tag.endswith('"') and len(tag) >= 2:
        tag = tag[1:-1]
    return int(tag) if _VERSION.fullmatch(tag) else None


@dataclass(frozen=True, slots=True)
class EntityTag:
    """One entity tag of a request header: ``opaque`` without quotes, and whether it is weak."""

    opaque: str
    weak: bool = False

    @property
    def version(self) -> int | None:
        """The version this tag names (strong tags made by :func:`etag` only), else None."""
        return None if self.weak else version_of(self.opaque)


@dataclass(frozen=True, slots=True)
class IfMatch:
    """A parsed ``If-Match``: ``*`` (``any``) or a list of entity ``tags``."""

    any: bool
    tags: tuple[EntityTag, ...] = ()

    @property
    def version(self) -> int | None:
        """The one version the client wrote against: the header is exactly one strong tag made
        by :func:`etag`. None for ``*``, a list, a weak tag, or a foreign tag: then read the
        current version and use :meth:`check`."""
        if self.any or len(self.tags) != 1:
            return None
        return self.tags[0].version

    def matches(self, current_version: int | None) -> bool:
        """RFC 9110 §13.1.1: ``*`` is true if the resource exists (``current_version`` not
        None); a list is true if one of its *strong* tags equals ``etag(current_version)``."""
        if current_version is None:
            return False
        if self.any:
            return True
        return any(t.version == current_version for t in self.tags)

    def check(self, current_version: int | None, entity: str = "the resource") -> int:
        """``current_version`` if the precondition holds (write with it as the expected
        version), else :class:`~oncely.errors.PreconditionFailed` (412). ``None`` means the
        resource does not exist."""
        if self.matches(current_version):
            assert current_version is not None
            return current_version
        if current_version is None:
            raise PreconditionFailed(f"{entity} does not exist; If-Match cannot hold")
        raise PreconditionFailed(
            f"{entity} is at version {current_version} (ETag {etag(current_version)}), which "
            "If-Match does not name; fetch it again and redo the change",
            current_etag=etag(current_version),
        )


def _tags(text: str) -> tuple[EntityTag, ...]:
    tags: list[EntityTag] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t,":
            i += 1
        if i >= n:
            break
        weak = text.startswith("W/", i)
        if weak:
            i += 2
        if i >= n or text[i] != '"':
            raise InvalidIfMatch(f"expected a quoted entity tag at {text[i : i + 20]!r}")
        end = text.find('"', i + 1)
        if end < 0:
            raise InvalidIfMatch("an entity tag is not closed by a double quote")
        opaque = text[i + 1 : end]
        if any(not (c == "\x21" or "\x23" <= c <= "\x7e" or "\x80" <= c <= "\xff") for c in opaque):
            raise InvalidIfMatch(f"entity tag {opaque!r} has characters RFC 9110 §8.8.3 forbids")
        tags.append(EntityTag(opaque, weak))
        i = end + 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] != ",":
            raise InvalidIfMatch(f"expected ',' between entity tags at {text[i : i + 20]!r}")
    return tuple(tags)


def parse_if_match(values: Iterable[bytes | str]) -> IfMatch | None:
    """Parse the ``If-Match`` field lines of a request (several lines form one list; RFC 9110
    §5.3). None if there is none (or only empty ones).

    :raises ~oncely.errors.InvalidIfMatch: not ``*`` nor a list of entity tags (``"7"``, ``W/"x"``).
    """
    parts = [v.decode("latin-1") if isinstance(v, bytes) else v for v in values]
    text = ",".join(p for p in parts if p.strip())
    if not text:
        return None
    if len(text) > MAX_IF_MATCH:
        raise InvalidIfMatch(f"If-Match is longer than {MAX_IF_MATCH} characters")
    if text.strip() == "*":
        return IfMatch(any=True)
    if "*" in [p.strip() for p in text.split(",")]:
        raise InvalidIfMatch("'*' cannot be combined with entity tags")
    tags = _tags(text)
    if not tags:
        raise InvalidIfMatch("If-Match holds no entity tag")
    return IfMatch(any=False, tags=tags)


def problem_for(
    exc: BaseException,
    base: str = PROBLEM_BASE,
    entity: str | None = None,
    *,
    if_match: bool = False,
) -> HttpResponse | None:
    """The problem response for an exception a handler raised: 412 for
    :class:`~oncely.errors.StaleVersion` and :class:`~oncely.errors.PreconditionFailed`, 428
    for :class:`~oncely.errors.PreconditionRequired`, 400 for
    :class:`~oncely.errors.InvalidIfMatch`; for :class:`~oncely.errors.NotFound` 412 if the
    request sent ``If-Match`` (``if_match=True``: with no current representation the
    precondition is false, RFC 9110 §13.1.1), else 404 ``not-found``; None for anything else
    (let it propagate: :class:`~oncely.errors.UnversionedRow` and
    :class:`~oncely.errors.VersionBypass` are faults of the server's data or code, a 500)."""
    if isinstance(exc, StaleVersion):
        current = exc.current if isinstance(exc.current, int) else None
        detail = (
            f"the resource changed (now at version {exc.current!r}) since the client read "
            f"version {exc.expected!r}; fetch it again and redo the change"
        )
        extra = {"current_etag": etag(current)} if current is not None and current >= 0 else {}
        return from_exception(PreconditionFailed(detail, **extra), base)
    if isinstance(exc, NotFound):
        if if_match:
            return from_exception(
                PreconditionFailed(
                    f"{exc.entity} does not exist (never created, or deleted since the client "
                    "read it); If-Match cannot hold"
                ),
                base,
            )
        return problem_response(NOT_FOUND, f"{exc.entity} does not exist", base=base)
    if isinstance(exc, (PreconditionFailed, PreconditionRequired, InvalidIfMatch)):
        return from_exception(exc, base)
    return None


def _required_problem(base: str) -> HttpResponse:
    return from_exception(
        PreconditionRequired(
            "this request changes a versioned resource: send If-Match with the ETag of the "
            'version you read (GET it first), e.g. If-Match: "7"'
        ),
        base,
    )


Paths = Sequence[str] | Callable[[str], bool] | None


def _path_rule(paths: Paths) -> Callable[[str], bool]:
    if paths is None:
        return lambda path: True
    if callable(paths):
        return paths
    if isinstance(paths, str) or not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise ConfigurationError(
            "paths must be a sequence of path prefixes ('/accounts/') or a predicate, "
            f"not {paths!r}"
        )
    prefixes = tuple(paths)
    return lambda path: path.startswith(prefixes)


class IfMatchRule:
    """Which requests need ``If-Match`` (``methods`` under ``paths``: a sequence of path
    prefixes or a predicate ``path -> bool``, None for every path), and the answer to a request
    that lacks it or sends a malformed one. Shared by every face."""

    def __init__(
        self,
        methods: Iterable[str] = UNSAFE_METHODS,
        paths: Paths = None,
        problem_base: str = PROBLEM_BASE,
    ) -> None:
        where = "If-Match rule"
        self.methods = frozenset(m.upper() for m in names(methods, "methods", where=where))
        self.applies = _path_rule(paths)
        self.base = text(problem_base, "problem_base", where=where)

    def evaluate(
        self, method: str, path: str, values: Iterable[bytes | str]
    ) -> tuple[IfMatch | None, HttpResponse | None]:
        """``(IfMatch | None, None)`` to go on, or ``(None, response)`` to answer at once
        (428 without the header where it is required, 400 for a malformed one)."""
        try:
            parsed = parse_if_match(values)
        except InvalidIfMatch as exc:
            return None, problem_for(exc, self.base)
        if parsed is None and method in self.methods and self.applies(path):
            return None, _required_problem(self.base)
        return parsed, None


# -- ASGI -----------------------------------------------------------------------------------------
class ConditionalMiddleware:
    """ASGI middleware: 428 for ``methods`` under ``paths`` without ``If-Match`` (default every
    PUT, PATCH and DELETE), 400 for a malformed one, the parsed header in
    ``scope["oncely.if_match"]``, and 412 for a :class:`~oncely.errors.StaleVersion` (or
    :class:`~oncely.errors.PreconditionFailed`) the handler raises before it starts its
    response; a :class:`~oncely.errors.NotFound` is 412 with ``If-Match``, else 404.
    ``paths`` is a sequence of path prefixes or a predicate ``path -> bool``.

    In Starlette/FastAPI add it with ``app.add_middleware(ConditionalMiddleware, ...)``: it
    sits outside the exception middleware, so the handler's exception reaches it.
    """

    def __init__(
        self,
        app: Any,
        *,
        methods: Iterable[str] = UNSAFE_METHODS,
        paths: Paths = None,
        problem_base: str = PROBLEM_BASE,
    ) -> None:
        self.app = app
        self.rule = IfMatchRule(methods, paths, problem_base)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope["headers"] if k == b"if-match"]
        parsed, refusal = self.rule.evaluate(scope["method"], scope["path"], values)
        if refusal is not None:
            await _asgi_send(send, refusal)
            return
        scope[IF_MATCH_KEY] = parsed
        started = False

        async def watch(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except (StaleVersion, NotFound, HttpProblem) as exc:
            answer = problem_for(exc, self.rule.base, if_match=parsed is not None)
            if started or answer is None:
                raise
            await _asgi_send(send, answer)


async def _asgi_send(send: Any, response: HttpResponse) -> None:
    await send(
        {"type": "http.response.start", "status": response.status, "headers": response.headers}
    )
    await send({"type": "http.response.body", "body": response.body})


# -- WSGI -----------------------------------------------------------------------------------------
def _status_line(status: int) -> str:
    from http import HTTPStatus

    return f"{status} {HTTPStatus(status).phrase}"


def _wsgi_send(start_response: Any, response: HttpResponse) -> list[bytes]:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers]
    start_response(_status_line(response.status), headers)
    return [response.body]


class WSGIConditionalMiddleware:
    """The WSGI face of :class:`ConditionalMiddleware` (``environ["oncely.if_match"]``).

    Flask and Django turn view exceptions into 500 pages before a WSGI middleware sees them;
    use :func:`oncely.http.flask.conditional` / :class:`oncely.http.django.ConditionalMiddleware`
    there (they add the 412 the framework's way), or this middleware for the 428 alone.
    """

    def __init__(
        self,
        app: Any,
        *,
        methods: Iterable[str] = UNSAFE_METHODS,
        paths: Paths = None,
        problem_base: str = PROBLEM_BASE,
    ) -> None:
        self.app = app
        self.rule = IfMatchRule(methods, paths, problem_base)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        raw = environ.get("HTTP_IF_MATCH")
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        values = [raw] if raw is not None else []
        parsed, refusal = self.rule.evaluate(environ.get("REQUEST_METHOD", "GET"), path, values)
        if refusal is not None:
            return _wsgi_send(start_response, refusal)
        environ[IF_MATCH_KEY] = parsed
        try:
            return self.app(environ, start_response)
        except (StaleVersion, NotFound, HttpProblem) as exc:
            answer = problem_for(exc, self.rule.base, if_match=parsed is not None)
            if answer is None:
                raise
            return _wsgi_send(start_response, answer)


# -- handlers -------------------------------------------------------------------------------------
def if_match(request: Any) -> IfMatch:
    """The ``If-Match`` of ``request``: a Starlette/FastAPI ``Request`` (or an ASGI scope), a
    Flask/Werkzeug request (or a WSGI environ), or a Django ``HttpRequest``. Uses what the
    middleware parsed if it ran, else parses the header.

    :raises PreconditionRequired: the request has no ``If-Match`` (answered 428 by the faces).
    :raises ~oncely.errors.InvalidIfMatch: the header is malformed (answered 400).
    """
    holder: Any = None
    if isinstance(request, dict):
        holder = request
    elif isinstance(getattr(request, "scope", None), dict):
        holder = request.scope
    elif isinstance(getattr(request, "environ", None), dict):
        holder = request.environ
    elif isinstance(getattr(request, "META", None), dict):
        holder = request.META
    if holder is None:
        raise ConfigurationError(
            f"if_match() needs a request, an ASGI scope or a WSGI environ, not {request!r}"
        )
    if IF_MATCH_KEY in holder and holder[IF_MATCH_KEY] is not None:
        parsed: IfMatch | None = holder[IF_MATCH_KEY]
    elif "headers" in holder and "type" in holder:  # an ASGI scope
        parsed = parse_if_match(v for k, v in holder["headers"] if k == b"if-match")
    else:
        raw = holder.get("HTTP_IF_MATCH")
        parsed = parse_if_match([raw] if raw is not None else [])
    if parsed is None:
        raise PreconditionRequired(
            'send If-Match with the ETag of the version you read (GET it first), e.g. If-Match: "7"'
        )
    return parsed
