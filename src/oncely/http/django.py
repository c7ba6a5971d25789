"""Django: a middleware for ``settings.MIDDLEWARE``, a view decorator, and view markers.

In ``settings.py`` (the app gives the migration, ``manage.py oncely`` and the system checks)::

    INSTALLED_APPS = [..., "oncely.contrib.django"]
    MIDDLEWARE = [
        ...,                                          # SessionMiddleware, CsrfViewMiddleware,
                                                      # AuthenticationMiddleware, …
        "oncely.http.django.IdempotencyMiddleware",   # last
    ]
    ONCELY = {"store": "django", "scope": "oncely.http.django.scope_from_user"}

``settings.ONCELY`` holds :class:`~oncely.http.config.IdempotencyConfig`'s options
(:mod:`oncely.contrib.django.conf`). The middleware serves Django under WSGI and ASGI
(``sync_capable`` and ``async_capable``): it drives the same sans-IO
:func:`~oncely.http.flow.request_flow` as the WSGI and ASGI faces, with blocking store calls
or with ``await``. It goes **last** in ``MIDDLEWARE``: its ``process_view`` tells it that the
view is about to run, after every other ``process_view`` (``CsrfViewMiddleware``'s check), so a
request Django refuses before the view (URL 404, the CSRF 403, any middleware answering first)
is sent as it is and does not use up its key. Its place is checked when Django builds it (and
by ``manage.py check``): listed twice, or before a middleware with ``process_view``, or (with
:data:`scope_from_user`) before ``AuthenticationMiddleware``, it refuses to start.

Views::

    from oncely.http import idempotent_route
    from oncely.http.django import idempotent_view, require_token

    @idempotent_route(fingerprint=["amount"])     # settings for this view (middleware needed)
    def pay(request): ...

    @idempotent_view(fingerprint=["amount"])      # protects this view by itself, or marks it
    async def refund(request): ...                # for the middleware when that is installed

    @require_token("checkout")
    def checkout(request): ...

``HttpRequest.raw`` (what ``scope=``, ``fingerprint=`` and resolvers receive) is the Django
request here, so a scope can read ``request.raw.user`` or ``request.raw.session``. A view
raising :class:`~oncely.errors.HttpProblem` answers with that problem (``process_exception``).
A view raising another exception that Django answers with its 500 page (``handler500``; its
``got_request_exception`` signal tells the middleware) is kept for its key as the ``500``
``handler-failed`` problem: a retry gets that problem, replayed, not Django's page.

The older way, wrapping the WSGI application (``install(get_wsgi_application(), config)``
with :class:`ViewStartMiddleware` last in ``MIDDLEWARE``), still works under WSGI.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings  # type: ignore[import-untyped]
from django.core.exceptions import (  # type: ignore[import-untyped]
    RequestDataTooBig,
)
from django.core.signals import got_request_exception  # type: ignore[import-untyped]
from django.http import HttpRequest as DjangoRequest  # type: ignore[import-untyped]
from django.http import HttpResponse as DjangoResponse
from django.http.request import RawPostDataException  # type: ignore[import-untyped]
from django.urls import Resolver404, get_resolver, resolve  # type: ignore[import-untyped]
from django.utils.functional import LazyObject, empty  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from oncely.core.cancelsafe import keep_alive
from oncely.core.lease import AsyncRenewer, Claimed, active_claim, keeper
from oncely.core.observe import describe
from oncely.errors import ConfigurationError, HttpProblem
from oncely.http.config import IdempotencyConfig
from oncely.http.engine import SAFE_METHODS, Engine
from oncely.http.flow import (
    BodyError,
    Captured,
    Claim,
    Op,
    Pass,
    ReadBody,
    Respond,
    Run,
    request_flow,
)
from oncely.http.messages import ENTRY_KEY, HandlerEntry, HttpRequest, HttpResponse
from oncely.http.perform import aperform, perform
from oncely.http.problems import from_exception
from oncely.http.routes import MARKER, Rule, idempotent_route, rule_of
from oncely.http.scopes import UNKNOWN, principal_missing
from oncely.http.wsgi import INFO_KEY, WSGIIdempotencyMiddleware

__all__ = [
    "ConditionalMiddleware",
    "DjangoResolver",
    "IdempotencyMiddleware",
    "ViewStartMiddleware",
    "idempotent_view",
    "install",
    "middleware_problems",
    "require_token",
    "scope_from_user",
    "scope_from_user_or_anonymous",
]

log = logging.getLogger("oncely.http")

_PATH = "oncely.http.django.ViewStartMiddleware"
MIDDLEWARE_PATH = "oncely.http.django.IdempotencyMiddleware"
_AUTH_MODULE = "django.contrib.auth.middleware"
_AUTH_PATH = f"{_AUTH_MODULE}.AuthenticationMiddleware"
_REMOTE_PATH = f"{_AUTH_MODULE}.RemoteUserMiddleware"
_AUTH_SETUP = "AuthenticationMiddleware.process_request.<locals>."

F = TypeVar("F", bound=Callable[..., Any])
_METHODS = ("post", "put", "patch", "delete", "get", "dispatch")
Call = Callable[[DjangoRequest], Any]


# -- finding the view's rule -------------------------------------------------------------------
def _view_rule(func: Any, method: str) -> Rule | None:
    rule = rule_of(func)
    if rule is None:
        view_class = getattr(func, "view_class", None)
        if view_class is not None:
            rule = rule_of(getattr(view_class, method, None)) or rule_of(
                getattr(view_class, "dispatch", None)
            )
    return rule


def _callbacks(patterns: Iterable[Any], depth: int = 0) -> Iterable[Any]:
    for pattern in patterns:
        sub = getattr(pattern, "url_patterns", None)
        if sub is not None:
            if depth < 16:
                yield from _callbacks(sub, depth + 1)
        else:
            yield getattr(pattern, "callback", None)


def _any_marked(urlconf: Any = None) -> bool:
    return any(
        _view_rule(callback, method) is not None
        for callback in _callbacks(get_resolver(urlconf).url_patterns)
        for method in _METHODS
    )


class _Resolver:
    """Callable ``Django request -> Rule | None``: the rule of the view Django will dispatch
    to, resolved as Django does it (``request.urlconf`` when a middleware set one)."""

    #: The middleware learns from its own ``process_view`` when a view starts.
    tracks_entry = True

    def __init__(self) -> None:
        self._marked: dict[Any, bool] = {}

    def __call__(self, request: DjangoRequest) -> Rule | None:
        urlconf = getattr(request, "urlconf", None)
        marked = self._marked.get(urlconf)
        if marked is None:
            marked = self._marked[urlconf] = _any_marked(urlconf)
        if not marked:
            return None
        try:
            match = get_resolver(urlconf).resolve(request.path_info)
        except Resolver404:
            return None
        return _view_rule(match.func, str(request.method).lower())


# -- Django request and response <-> the flow's ------------------------------------------------
def _request(request: DjangoRequest) -> HttpRequest:
    headers = [
        (name.lower().encode("latin-1"), str(value).encode("latin-1", "replace"))
        for name, value in request.headers.items()
    ]
    query = str(request.META.get("QUERY_STRING", "")).encode("latin-1", "replace")
    return HttpRequest(str(request.method).upper(), request.path, query, headers, request)


def _response(response: HttpResponse) -> DjangoResponse:
    """A Django response carrying exactly ``response`` (a problem or a replay)."""
    out = DjangoResponse(response.body, status=response.status)
    names: dict[str, list[str]] = {}
    for raw_name, raw_value in response.headers:
        names.setdefault(raw_name.decode("latin-1"), []).append(raw_value.decode("latin-1"))
    if "content-type" not in names:
        del out["Content-Type"]  # not Django's default text/html: what was stored, no more
    for name, values in names.items():
        out[name] = ", ".join(values)  # Set-Cookie, the one header that cannot join, is never kept
    return out


def _problem(exc: HttpProblem, config: IdempotencyConfig) -> DjangoResponse:
    return _response(from_exception(exc, config.problem_base))


def _read_body(request: DjangoRequest, limit: int, expected: int | None) -> bytes | BodyError:
    """The whole body through Django (``request.body``, so the view reads it again).

    Under WSGI Django reads no further than ``CONTENT_LENGTH`` (0 when absent), so a chunked
    body would be an empty ``request.body`` for oncely and for the view alike, and two different
    payloads would look the same: :attr:`BodyError.LENGTH_REQUIRED` (411) instead. Under ASGI
    Django reads the whole body."""
    meta = request.META
    if (
        "wsgi.input" in meta
        and str(meta.get("HTTP_TRANSFER_ENCODING", "")).strip()
        and not str(meta.get("CONTENT_LENGTH") or "").strip()
    ):
        return BodyError.LENGTH_REQUIRED
    try:
        body: bytes = request.body
    except RequestDataTooBig:  # over DATA_UPLOAD_MAX_MEMORY_SIZE
        return BodyError.TOO_LARGE
    except RawPostDataException:
        log.warning(
            "oncely.http: a middleware before oncely's read the request as a stream (multipart "
            "request.POST); the body cannot be fingerprinted. Move it after oncely's middleware"
        )
        return BodyError.INCOMPLETE
    except OSError as exc:  # UnreadablePostError: the client went away mid-body
        log.info("oncely.http: reading the request body failed: %s", describe(exc))
        return BodyError.INCOMPLETE
    if len(body) > limit:
        return BodyError.TOO_LARGE
    if expected is not None and len(body) != expected:
        return BodyError.INCOMPLETE
    return body


# -- the driver --------------------------------------------------------------------------------
class _HandedOff(Exception):
    """The request was cancelled; the view and the rest of the flow go on in the background."""


class _Exchange:
    """One request: performs the flow's operations on Django objects, blocking or with await.

    ``call`` runs the rest of Django (``get_response``) or the decorated view. A streaming
    response pauses the flow at :class:`~oncely.http.flow.Run`: the response goes back to
    Django at once, and :class:`_Stream` resumes the flow when the server has consumed it (or
    closed it early)."""

    def __init__(
        self, engine: Engine, request: DjangoRequest, call: Call, *, is_async: bool
    ) -> None:
        self.engine = engine
        self.request = request
        self.call = call
        self.is_async = is_async
        self.flow: Any = None
        self.response: DjangoResponse | None = None
        #: When the last claim was sent (monotonic); the lease's local bound counts from it.
        self.claim_sent = 0.0

    def start(self) -> Any:
        self.flow = request_flow(self.engine, _request(self.request))
        return self.adrive(None, None) if self.is_async else self.drive(None, None)

    def _local(self, op: Op) -> tuple[bool, Any]:
        """Perform an operation that needs no I/O mode: ``(True, result)``, else ``(False,
        None)``."""
        if type(op) is ReadBody:
            assert isinstance(op, ReadBody)
            return True, _read_body(self.request, op.limit, op.expected)
        if type(op) is Respond:
            assert isinstance(op, Respond)
            self.response = _response(op.response)
            return True, None
        return False, None

    def drive(self, value: Any, error: BaseException | None) -> DjangoResponse | None:
        """Perform the flow's operations with blocking calls until it ends, or pauses on a
        streaming response (returned at once; :class:`_Stream` resumes the flow)."""
        while True:
            try:
                op: Op = self.flow.send(value) if error is None else self.flow.throw(error)
            except StopIteration:
                return self.response
            value = error = None
            try:
                done, value = self._local(op)
                if done:
                    continue
                if type(op) is Pass:
                    self.response = self.call(self.request)
                elif type(op) is Run:
                    value = self._run(op)
                    if value is None:
                        return self.response
                else:
                    if type(op) is Claim:
                        self.claim_sent = time.monotonic()
                    value = perform(self.engine, op)
            except BaseException as exc:
                error = exc

    async def adrive(self, value: Any, error: BaseException | None) -> DjangoResponse | None:
        """:meth:`drive` with ``await``."""
        while True:
            try:
                op: Op = self.flow.send(value) if error is None else self.flow.throw(error)
            except StopIteration:
                return self.response
            value = error = None
            try:
                done, value = self._local(op)
                if done:
                    continue
                if type(op) is Pass:
                    self.response = await self.call(self.request)
                elif type(op) is Run:
                    value = await self._arun(op)
                    if value is None:
                        return self.response
                else:
                    if type(op) is Claim:
                        self.claim_sent = time.monotonic()
                    value = await aperform(self.engine, op)
            except _HandedOff:
                raise asyncio.CancelledError from None
            except BaseException as exc:
                error = exc

    def _claimed(self, op: Run) -> Claimed | None:
        meta = self.request.META
        meta[INFO_KEY] = op.info
        meta[ENTRY_KEY] = HandlerEntry(self.engine.tracks_entry)
        if op.fence is None:
            return None
        assert op.key is not None
        return Claimed(
            op.key, op.fence, op.lease, self.engine.store, self.engine.config.on_lease_lost
        )

    def _run(self, op: Run) -> Captured | None:
        claimed = self._claimed(op)
        if claimed is not None:
            keeper.keep(claimed, self.claim_sent)
        stop: Callable[[], None] = (
            (lambda: keeper.stop(claimed)) if claimed is not None else (lambda: None)
        )
        token = active_claim.set(claimed)
        try:
            response = self.call(self.request)
        except BaseException as exc:
            stop()
            return Captured(0, None, None, False, self._handled(), exc)
        finally:
            active_claim.reset(token)
        return self._captured(response, op.capture, stop)

    async def _arun(self, op: Run) -> Captured | None:
        claimed = self._claimed(op)
        renewer = AsyncRenewer(claimed, self.claim_sent) if claimed is not None else None
        stop: Callable[[], None] = renewer.stop if renewer is not None else (lambda: None)
        token = active_claim.set(claimed)
        try:
            if claimed is None or self.engine.config.on_cancel == "release":
                response = await self.call(self.request)
            else:
                # Shielded: Django cancels the view's task when the client goes away; the
                # view runs on and its response settles the key (on_cancel="finish").
                task = asyncio.ensure_future(self.call(self.request))
                try:
                    response = await asyncio.shield(task)
                except asyncio.CancelledError:
                    if task.cancelled():  # the view itself was cancelled; one that finished
                        raise  # in the same loop turn as the cancel is settled below
                    keep_alive(asyncio.ensure_future(self._afinish_later(task, op, stop)))
                    raise _HandedOff from None
        except _HandedOff:
            raise
        except BaseException as exc:
            stop()
            return Captured(0, None, None, False, self._handled(), exc)
        finally:
            active_claim.reset(token)
        return self._captured(response, op.capture, stop)

    async def _afinish_later(
        self, task: asyncio.Future[DjangoResponse], op: Run, stop: Callable[[], None]
    ) -> None:
        """The request was cancelled while its view ran: settle the key from the view's
        response once it is there (a streaming one, never sent, is kept as cut short)."""
        try:
            response = await task
        except BaseException as exc:
            stop()
            captured: Captured | None = Captured(0, None, None, False, self._handled(), exc)
        else:
            if response.streaming:
                stop()
                captured = Captured(response.status_code, None, None, False, self._handled())
            else:
                captured = self._captured(response, op.capture, stop)
        try:
            await self.adrive(captured, None)
        except BaseException as exc:
            log.info(
                "oncely.http: a cancelled request's view finished and was settled: %s",
                describe(exc),
            )

    def _handled(self) -> bool:
        entry: HandlerEntry = self.request.META[ENTRY_KEY]
        return entry.handled

    def _captured(
        self, response: DjangoResponse, limit: int, stop: Callable[[], None]
    ) -> Captured | None:
        """What the view produced: at once for a response in memory, later (None now) for a
        streaming one."""
        self.response = response
        headers = (
            [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.items()]
            if limit >= 0
            else None
        )
        if not response.streaming:
            stop()
            content: bytes = response.content
            body = content if limit >= 0 and len(content) <= limit else None
            entry: HandlerEntry = self.request.META[ENTRY_KEY]
            return Captured(
                response.status_code, headers, body, True, entry.handled, None, entry.failed
            )
        _Stream(self, response, headers, limit, stop)
        return None


class _Stream:
    """A streaming response on its way out: passes chunks through, keeps a copy (up to the
    limit), and resumes the flow once the last chunk was produced, or when Django closes the
    response first (the client went away: the flow keeps the key as not replayable)."""

    def __init__(
        self,
        exchange: _Exchange,
        response: DjangoResponse,
        headers: list[tuple[bytes, bytes]] | None,
        limit: int,
        stop: Callable[[], None],
    ) -> None:
        self.exchange = exchange
        self.status: int = response.status_code
        self.headers = headers
        self.limit = limit
        self.stop = stop
        self.chunks: list[bytes] | None = [] if limit >= 0 else None
        self.size = 0
        self.complete = False
        self.finished = False
        self.loop = asyncio.get_running_loop() if exchange.is_async else None
        if response.is_async or exchange.is_async:
            response.streaming_content = self._atee(response.streaming_content, response.is_async)
        else:
            response.streaming_content = self._tee(response.streaming_content)
        close = response.close

        def close_then_settle() -> None:
            try:
                close()
            finally:
                self._closed()

        response.close = close_then_settle

    def _keep(self, chunk: bytes) -> None:
        chunks = self.chunks
        if chunks is not None and chunk:
            self.size += len(chunk)
            if self.size > self.limit:
                self.chunks = None
            else:
                chunks.append(bytes(chunk))

    def _captured(self, error: BaseException | None) -> Captured:
        self.finished = True
        self.stop()
        chunks = self.chunks
        body = None if chunks is None else b"".join(chunks)
        entry: HandlerEntry = self.exchange.request.META[ENTRY_KEY]
        return Captured(
            self.status, self.headers, body, self.complete, entry.handled, error, entry.failed
        )

    def _finish(self, error: BaseException | None) -> None:
        if not self.finished:
            self.exchange.drive(self._captured(error), None)

    async def _afinish(self, error: BaseException | None) -> None:
        if not self.finished:
            await self.exchange.adrive(self._captured(error), None)

    async def _settle(self, error: BaseException | None) -> None:
        """Resume the flow in the middleware's mode; the flow raises ``error`` again once the
        key is settled, which is swallowed here (the caller raises it)."""
        try:
            if self.exchange.is_async:
                await self._afinish(error)
            else:
                self._finish(error)
        except BaseException as again:
            if again is not error:
                raise

    def _tee(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        try:
            for chunk in chunks:
                self._keep(chunk)
                yield chunk
        except GeneratorExit:
            self._finish(None)  # the server stopped early: cut short
            raise
        except BaseException as exc:
            try:
                self._finish(exc)
            except BaseException as again:
                if again is not exc:
                    raise
            raise
        self.complete = True
        self._finish(None)

    async def _atee(self, chunks: Any, is_async: bool) -> AsyncIterator[bytes]:
        try:
            if is_async:
                async for chunk in chunks:
                    self._keep(chunk)
                    yield chunk
            else:  # as Django serves a sync iterator under ASGI: consumed in a thread
                for chunk in await sync_to_async(_listed, thread_sensitive=True)(chunks):
                    self._keep(chunk)
                    yield chunk
        except GeneratorExit:
            await self._settle(None)
            raise
        except BaseException as exc:
            await self._settle(exc)
            raise
        self.complete = True
        await self._settle(None)

    def _closed(self) -> None:
        """Django closed the response: settle now if the body did not finish (cut short)."""
        if self.finished:
            return
        loop = self.loop
        if loop is None:
            self._finish(None)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            from oncely.core.cancelsafe import keep_alive

            keep_alive(loop.create_task(self._afinish(None)))
            return
        try:  # Django closes from a worker thread (sync_to_async): settle on the loop
            asyncio.run_coroutine_threadsafe(self._afinish(None), loop).result(timeout=30)
        except Exception as exc:
            log.error("oncely.http: settling a response closed early failed: %s", describe(exc))


def _view_raised(sender: Any, request: DjangoRequest | None = None, **kwargs: Any) -> None:
    """Django's ``got_request_exception``: the view raised an exception that Django answers
    with its 500 page (``handler500``); the middleware keeps that 500 as ``handler-failed``."""
    entry = getattr(request, "META", {}).get(ENTRY_KEY)
    if isinstance(entry, HandlerEntry):
        entry.raised()


got_request_exception.connect(_view_raised, dispatch_uid="oncely.http.django.view_raised")


def _view_starts(request: DjangoRequest) -> None:
    entry = request.META.get(ENTRY_KEY)
    if isinstance(entry, HandlerEntry):
        entry.started()


def _listed(chunks: Iterable[bytes]) -> list[bytes]:
    return list(chunks)


# -- the middleware ----------------------------------------------------------------------------
def _scope_functions(config: IdempotencyConfig) -> list[Any]:
    guard = config.tokens
    return [config.scope, guard.subject if guard is not None else None]


class _UserScope:
    """``scope=`` by the authenticated Django user: ``"user:<pk>"``. The user is the one
    ``request.user`` holds when oncely's middleware runs (last: after every other middleware),
    which is the user the view sees — the one ``AuthenticationMiddleware`` loads from the
    session, or the one a later middleware set (``RemoteUserMiddleware``, a token or JWT
    middleware, ``login()``/``logout()``). An anonymous user is refused with a 401
    ``principal-missing`` problem before anything is claimed or run
    (:func:`oncely.http.scopes.principal_missing`: one key space shared by every anonymous
    client would let one replay or block another's operation), or, with
    ``anonymous="share"`` (:data:`scope_from_user_or_anonymous`), falls in the anonymous scope
    ``"-"``. The user id is not secret, so it is stored as it is.

    Under ASGI the user is loaded without a blocking call on the event loop (:func:`_auser`):
    a ``request.user`` a middleware assigned is taken as it is; Django's own lazy user, not
    yet loaded, is the session's user, loaded with ``await request.auser()``; any other lazy
    object is loaded in a worker thread. ``request.auser()``'s answer is never taken where
    ``request.user`` may differ: Django caches its first answer, and neither
    ``alogin``/``alogout`` nor ``RemoteUserMiddleware`` update that cache when they set
    ``request.user`` (nor does a session flushed after it was asked)."""

    _META = "oncely.user_scope"

    def __init__(self, anonymous: Literal["refuse", "share"] = "refuse") -> None:
        self._anonymous = anonymous

    def __call__(self, request: HttpRequest) -> str | None:
        django_request = request.raw
        meta = getattr(django_request, "META", None)
        if meta is not None and self._META in meta:
            value: str | None = meta[self._META]
        else:
            value = self._of(_user(django_request))
        if value is None and self._anonymous == "refuse":
            raise principal_missing(request)
        return value

    def scope_after(self, request: HttpRequest) -> object:
        """The scope ``request.user`` gives now (after the view), bypassing what
        :meth:`aprepare` kept: None where it would refuse, :data:`~oncely.http.scopes.UNKNOWN`
        for a lazy user the view never loaded (loading it could block the event loop; and a
        middleware that sets the user assigns an object)."""
        user = getattr(request.raw, "user", None)
        if user is None:
            return None
        if isinstance(user, LazyObject) and user._wrapped is empty:
            return UNKNOWN
        value = self._of(user)
        if value is None:
            return None if self._anonymous == "refuse" else ""
        return value

    @staticmethod
    def _of(user: Any) -> str | None:
        return f"user:{user.pk}" if user.is_authenticated else None

    async def aprepare(self, request: DjangoRequest) -> None:
        """Load the user without blocking the event loop (before the flow reads the scope)."""
        request.META[self._META] = self._of(await _auser(request))

    def __repr__(self) -> str:
        if self._anonymous == "share":
            return "oncely.http.django.scope_from_user_or_anonymous"
        return "oncely.http.django.scope_from_user"


def _user(request: DjangoRequest) -> Any:
    """``request.user``: the user the view sees (evaluating it may query the database)."""
    user = getattr(request, "user", None)
    if user is None:
        raise ConfigurationError(
            "scope_from_user reads request.user, which is not set: list "
            f"{_AUTH_PATH!r} before {MIDDLEWARE_PATH!r} in settings.MIDDLEWARE"
        )
    return user


def _loaded(user: Any) -> Any:
    """Evaluate a lazy ``user`` (in a worker thread: it may query the database)."""
    bool(user.is_authenticated)
    return user


def _sessions_lazy_user(request: DjangoRequest, user: Any) -> bool:
    """``user`` is still the lazy object ``AuthenticationMiddleware`` put in ``request.user``
    and ``request.auser`` still its companion, so ``await request.auser()`` is the same user
    (both read the session). Checked by name: the auth app need not be importable."""
    setup = object.__getattribute__(user, "__dict__").get("_setupfunc")
    auser = getattr(request, "auser", None)
    return (
        getattr(setup, "__module__", None) == _AUTH_MODULE
        and str(getattr(setup, "__qualname__", "")).startswith(_AUTH_SETUP)
        and isinstance(auser, functools.partial)
        and getattr(auser.func, "__module__", None) == _AUTH_MODULE
        and getattr(auser.func, "__qualname__", None) == "auser"
        and auser.args == (request,)
    )


async def _auser(request: DjangoRequest) -> Any:
    """:func:`_user` without a blocking call on the event loop: the same user."""
    user = _user(request)
    if not isinstance(user, LazyObject) or user._wrapped is not empty:
        return user  # an object a middleware assigned, or a lazy one already loaded
    if _sessions_lazy_user(request, user):
        # What the lazy object would give now (Django's get_user(request)): its cache, else
        # the session's user, loaded by request.auser() unless that has an answer cached
        # already (from before a session change, maybe: then loaded again, not cached).
        known = vars(request)
        if "_cached_user" in known:
            return known["_cached_user"]
        if "_acached_user" not in known:
            return await request.auser()
        from django.contrib.auth import aget_user  # type: ignore[import-untyped]

        return await aget_user(request)
    return await sync_to_async(_loaded, thread_sensitive=True)(user)


async def _aprepare(functions: Sequence[Any], request: DjangoRequest) -> None:
    for function in functions:
        await function.aprepare(request)


#: ``scope=scope_from_user``: one key space per authenticated Django user, anonymous requests
#: refused with 401 (see :class:`_UserScope`); ``"oncely.http.django.scope_from_user"`` in
#: ``settings.ONCELY``.
scope_from_user = _UserScope()
#: Like :data:`scope_from_user`, but anonymous requests share the anonymous scope ``"-"`` (for
#: public endpoints whose keys are unguessable; not for money).
scope_from_user_or_anonymous = _UserScope("share")


def _authenticates(cls: Any) -> bool:
    """``cls`` is Django's ``AuthenticationMiddleware`` or a subclass (checked by name: the
    auth app need not be importable)."""
    return isinstance(cls, type) and any(
        f"{k.__module__}.{k.__qualname__}" == _AUTH_PATH for k in cls.__mro__
    )


def _sets_remote_user(cls: Any) -> bool:
    """``cls`` is Django's ``RemoteUserMiddleware`` or a subclass
    (``PersistentRemoteUserMiddleware``, yours): it sets ``request.user`` from
    ``REMOTE_USER`` (checked by name: the auth app need not be importable)."""
    return isinstance(cls, type) and any(
        f"{k.__module__}.{k.__qualname__}" == _REMOTE_PATH for k in cls.__mro__
    )


def _classes(names: Sequence[str]) -> list[Any]:
    out = []
    for name in names:
        try:
            out.append(import_string(name))
        except ImportError:
            out.append(None)  # Django reports it when it builds the middleware
    return out


def middleware_problems(
    names: Sequence[str], config: IdempotencyConfig | None = None
) -> list[tuple[str, str, str]]:
    """What is wrong with oncely's place in ``names`` (``settings.MIDDLEWARE``), as
    ``(check id, message, hint)``: ``oncely.E001`` listed twice, ``oncely.E002`` a middleware
    with ``process_view`` after it, ``oncely.E003`` :data:`scope_from_user` without
    ``AuthenticationMiddleware`` before it, ``oncely.E004`` ``GZipMiddleware`` after it
    (compressing before oncely keeps the response), ``oncely.E005`` :data:`scope_from_user`
    with ``RemoteUserMiddleware`` (or a subclass) after it, ``oncely.W001``
    :class:`ViewStartMiddleware` listed too (not needed)."""
    classes = _classes(names)
    ours = [i for i, c in enumerate(classes) if isinstance(c, type) and issubclass(c, _OURS)]
    if not ours:
        return []
    problems: list[tuple[str, str, str]] = []
    first = names[ours[0]]
    if len(ours) > 1:
        problems.append(
            (
                "oncely.E001",
                f"oncely's middleware is listed {len(ours)} times in settings.MIDDLEWARE "
                f"({', '.join(repr(names[i]) for i in ours)}): each would claim the same "
                "Idempotency-Key, and the inner one would answer every first request with "
                "409 request-in-flight",
                f"keep one {first!r}, last in MIDDLEWARE",
            )
        )
    last = ours[-1]
    for name, cls in zip(names[last + 1 :], classes[last + 1 :]):
        if isinstance(cls, type) and any(k.__name__ == "GZipMiddleware" for k in cls.__mro__):
            problems.append(
                (
                    "oncely.E004",
                    f"{name!r} comes after {first!r} in settings.MIDDLEWARE, so it compresses "
                    "responses before oncely keeps them: the first client's encoding would be "
                    "replayed to clients that may not accept it",
                    f"list {name!r} before {first!r}",
                )
            )
        if cls is not None and hasattr(cls, "process_view") and not issubclass(cls, _OURS):
            if cls is ViewStartMiddleware:
                continue
            problems.append(
                (
                    "oncely.E002",
                    f"{name!r} comes after {first!r} in settings.MIDDLEWARE and may refuse a "
                    "request in its process_view (as CsrfViewMiddleware's 403 does) after "
                    "oncely counted the view as started: the refusal would use up the "
                    "client's Idempotency-Key",
                    f"move {first!r} to the end of MIDDLEWARE, after {name!r}",
                )
            )
    if config is not None and any(isinstance(f, _UserScope) for f in _scope_functions(config)):
        auth = [i for i, c in enumerate(classes) if _authenticates(c)]
        if not auth or auth[0] > ours[0]:
            problems.append(
                (
                    "oncely.E003",
                    f"scope_from_user reads request.user, which {_AUTH_PATH!r} sets, but it "
                    f"is {'missing from' if not auth else 'after ' + repr(first) + ' in'} "
                    "settings.MIDDLEWARE: every request would fall in the anonymous scope",
                    f"list {_AUTH_PATH!r} before {first!r}",
                )
            )
        for name, cls in zip(names[ours[0] + 1 :], classes[ours[0] + 1 :]):
            if _sets_remote_user(cls):
                problems.append(
                    (
                        "oncely.E005",
                        f"{name!r} comes after {first!r} in settings.MIDDLEWARE and sets "
                        "request.user after scope_from_user read it: a request authenticated "
                        "by it over another user's session cookie would be scoped by that "
                        "other user (and its response replayed to them)",
                        f"list {name!r} before {first!r}",
                    )
                )
    if any(c is ViewStartMiddleware for c in classes):
        problems.append(
            (
                "oncely.W001",
                f"{_PATH!r} is not needed with {first!r} (which reports the view's start itself)",
                f"remove {_PATH!r} from MIDDLEWARE",
            )
        )
    return problems


def _refuse(problems: list[tuple[str, str, str]]) -> None:
    errors = [f"{message} ({hint}) [{ident}]" for ident, message, hint in problems if ".E" in ident]
    if errors:
        from oncely.contrib.django.conf import ImproperlyConfigured

        raise ImproperlyConfigured("; ".join(errors))


class IdempotencyMiddleware:
    """Django middleware applying ``Idempotency-Key`` semantics and one-time token guards
    (``settings.MIDDLEWARE``, last). Sync and async capable.

    :param get_response: the next handler (Django passes it).
    :param config: the configuration; default ``settings.ONCELY``
        (:func:`oncely.contrib.django.conf.idempotency_config`).
    :raises ImproperlyConfigured: (also a :class:`~oncely.errors.ConfigurationError`) when
        Django builds it: ``settings.ONCELY`` is missing or wrong, or the middleware's place
        in ``MIDDLEWARE`` is (see :func:`middleware_problems`).
    """

    sync_capable = True
    async_capable = True

    def __init__(
        self, get_response: Callable[[DjangoRequest], Any], config: IdempotencyConfig | None = None
    ) -> None:
        if config is None:
            from oncely.contrib.django.conf import idempotency_config

            config = idempotency_config()
        _refuse(middleware_problems(list(getattr(settings, "MIDDLEWARE", None) or ()), config))
        self.get_response = get_response
        self.engine = Engine(config, _Resolver())
        self.is_async = iscoroutinefunction(get_response)
        self._prepare = [f for f in _scope_functions(config) if hasattr(f, "aprepare")]
        if self.is_async:
            markcoroutinefunction(self)
            setattr(self, "process_view", self._aprocess_view)  # noqa: B010 (no thread hop)

    def _passes(self, request: DjangoRequest) -> bool:
        request.META[INFO_KEY] = None
        engine = self.engine
        return not engine.is_candidate(str(request.method)) and (
            engine.token_endpoint is None or request.path != engine.token_endpoint
        )

    def __call__(self, request: DjangoRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        if self._passes(request):
            return self.get_response(request)
        return _Exchange(self.engine, request, self.get_response, is_async=False).start()

    async def __acall__(self, request: DjangoRequest) -> Any:
        if self._passes(request):
            return await self.get_response(request)
        await _aprepare(self._prepare, request)
        return await _Exchange(self.engine, request, self.get_response, is_async=True).start()

    def process_view(self, request: DjangoRequest, view: Any, args: Any, kwargs: Any) -> None:
        """The view runs next (every other ``process_view`` came first): its key is used."""
        _view_starts(request)

    async def _aprocess_view(
        self, request: DjangoRequest, view: Any, args: Any, kwargs: Any
    ) -> None:
        _view_starts(request)

    def process_exception(self, request: DjangoRequest, exception: Exception) -> Any:
        """A view raising :class:`~oncely.errors.HttpProblem` answers with that problem."""
        if isinstance(exception, HttpProblem):
            return _problem(exception, self.engine.config)
        return None


_OURS = IdempotencyMiddleware


# -- one view ----------------------------------------------------------------------------------
def idempotent_view(
    view: F | None = None, *, config: IdempotencyConfig | None = None, **rule: Any
) -> Any:
    """Protect one view (function or ``method_decorator`` on a class-based view; sync or
    async): ``@idempotent_view`` or ``@idempotent_view(fingerprint=["amount"], ttl=3600)``.

    ``rule`` takes :func:`~oncely.http.routes.idempotent_route`'s options over ``config``
    (default ``settings.ONCELY``). Where :class:`IdempotencyMiddleware` is installed the view
    is only marked (the middleware applies the rule, before any other middleware's
    ``process_view``); without it, the decorator runs the protocol around the view itself —
    after Django's middleware, so a CSRF 403 never reaches it and uses up no key.

    :raises ImproperlyConfigured: the configuration is wrong (when the view is decorated).
    """
    marker = idempotent_route(**rule)

    def decorate(function: F) -> F:
        nonlocal config
        if config is None:
            from oncely.contrib.django.conf import idempotency_config

            config = idempotency_config()
        engine = Engine(config, lambda raw: marker)
        prepare = [f for f in _scope_functions(config) if hasattr(f, "aprepare")]

        if iscoroutinefunction(function):

            @functools.wraps(function)
            async def awrapper(request: DjangoRequest, *args: Any, **kwargs: Any) -> Any:
                if INFO_KEY in request.META:  # a middleware applies the rule
                    return await function(request, *args, **kwargs)
                request.META[INFO_KEY] = None

                async def call(request: DjangoRequest) -> Any:
                    return await function(request, *args, **kwargs)

                await _aprepare(prepare, request)
                return await _Exchange(engine, request, call, is_async=True).start()

            wrapper: Any = awrapper
        else:

            @functools.wraps(function)
            def swrapper(request: DjangoRequest, *args: Any, **kwargs: Any) -> Any:
                if INFO_KEY in request.META:
                    return function(request, *args, **kwargs)
                request.META[INFO_KEY] = None
                call = functools.partial(_call_view, function, args, kwargs)
                return _Exchange(engine, request, call, is_async=False).start()

            wrapper = swrapper
        setattr(wrapper, MARKER, marker)
        return wrapper  # type: ignore[no-any-return]

    return decorate(view) if view is not None else decorate


def _call_view(function: Callable[..., Any], args: Any, kwargs: Any, request: Any) -> Any:
    return function(request, *args, **kwargs)


# -- wrapping the WSGI application (the older way) ---------------------------------------------
class ViewStartMiddleware:
    """Django middleware telling oncely's WSGI middleware (:func:`install`) that the view is
    about to run (``process_view``, after URL resolution and after the ``process_view`` of the
    middlewares listed before it, such as ``CsrfViewMiddleware``). List it last in
    ``MIDDLEWARE``. Not needed with :class:`IdempotencyMiddleware`."""

    def __init__(self, get_response: Callable[[DjangoRequest], DjangoResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: DjangoRequest) -> DjangoResponse:
        return self.get_response(request)

    def process_view(
        self, request: DjangoRequest, view: Any, args: Any, kwargs: Any
    ) -> DjangoResponse | None:
        _view_starts(request)
        return None


def _check_middleware() -> None:
    """``ViewStartMiddleware`` is in ``MIDDLEWARE``, with no ``process_view`` after it, and
    :class:`IdempotencyMiddleware` is not (it would protect every request twice)."""
    names = list(getattr(settings, "MIDDLEWARE", None) or ())
    if any(isinstance(c, type) and issubclass(c, _OURS) for c in _classes(names)):
        raise ConfigurationError(
            f"{MIDDLEWARE_PATH!r} is in settings.MIDDLEWARE and install() wraps the WSGI "
            "application too: every request would be protected twice (the inner one answering "
            "409 to every first request); keep the middleware and drop install()"
        )
    if _PATH not in names:
        raise ConfigurationError(
            f"add {_PATH!r} as the last entry of settings.MIDDLEWARE: it tells oncely when a "
            "view starts, so that a request Django refuses before its view (404, CSRF 403) "
            "does not use up its Idempotency-Key"
        )
    for name in names[names.index(_PATH) + 1 :]:
        if hasattr(import_string(name), "process_view"):
            raise ConfigurationError(
                f"{name!r} comes after {_PATH!r} in settings.MIDDLEWARE and may refuse a "
                f"request in process_view; move {_PATH!r} after it"
            )


class DjangoResolver:
    """Callable ``environ -> Rule | None``: the rule of the view Django will dispatch to (for
    :func:`install`; uses ``ROOT_URLCONF``).

    :raises ConfigurationError: :class:`ViewStartMiddleware` is not the last view middleware
        in ``settings.MIDDLEWARE``, or :class:`IdempotencyMiddleware` is listed too.
    """

    #: The middleware learns from Django when a view starts (see :class:`HandlerEntry`).
    tracks_entry = True

    def __init__(self) -> None:
        _check_middleware()
        self._marked: bool | None = None

    def __call__(self, environ: dict[str, Any]) -> Rule | None:
        if self._marked is None:
            self._marked = _any_marked()
        if not self._marked:
            return None
        path = environ.get("PATH_INFO", "/") or "/"
        try:
            path = path.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return None
        try:
            match = resolve(path)
        except Resolver404:
            return None
        return _view_rule(match.func, environ.get("REQUEST_METHOD", "").lower())


def install(
    application: Any, config: IdempotencyConfig | None = None, **options: Any
) -> WSGIIdempotencyMiddleware:
    """Wrap Django's WSGI ``application`` in the WSGI middleware, with a URL resolver (the
    older way; :class:`IdempotencyMiddleware` in ``MIDDLEWARE`` serves WSGI and ASGI).

    :raises ConfigurationError: see :class:`DjangoResolver` and
        :class:`~oncely.http.config.IdempotencyConfig`.
    """
    return WSGIIdempotencyMiddleware(application, config, resolver=DjangoResolver(), **options)


def require_token(purpose: str, **settings: Any) -> Callable[[F], F]:
    """Mark a view as requiring a one-time token of ``purpose`` on unsafe methods."""
    rule = idempotent_route(token=purpose, **settings)

    def decorate(view: F) -> F:
        def check(request: DjangoRequest) -> None:
            meta = request.META
            if INFO_KEY not in meta:
                raise ConfigurationError(
                    "this view requires a one-time token but the oncely middleware is not "
                    f"installed; add {MIDDLEWARE_PATH!r} to settings.MIDDLEWARE"
                )
            if request.method not in SAFE_METHODS:
                info = meta[INFO_KEY]
                if info is None or info.token_purpose != purpose:
                    raise ConfigurationError(
                        f"the one-time token of purpose {purpose!r} was not checked for "
                        f"{request.method}; pass tokens=TokenGuard(...) to the config"
                    )

        wrapper: Any
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def awrapper(request: DjangoRequest, *args: Any, **kwargs: Any) -> Any:
                check(request)
                return await view(request, *args, **kwargs)

            wrapper = awrapper
        else:

            @functools.wraps(view)
            def swrapper(request: DjangoRequest, *args: Any, **kwargs: Any) -> Any:
                check(request)
                return view(request, *args, **kwargs)

            wrapper = swrapper

        setattr(wrapper, MARKER, rule)
        return wrapper  # type: ignore[no-any-return]

    return decorate


class ConditionalMiddleware:
    """Conditional requests for Django (:mod:`oncely.http.conditional`), for
    ``settings.MIDDLEWARE`` as ``"oncely.http.django.ConditionalMiddleware"``.

    Options in ``settings.ONCELY_CONDITIONAL`` (a dict; all optional): ``methods`` (default
    PUT, PATCH, DELETE), ``paths`` (path prefixes, default every path), ``problem_base``. A
    request of those methods under those paths without ``If-Match`` gets 428, a malformed one
    400; a view raising :class:`~oncely.errors.StaleVersion` or
    :class:`~oncely.errors.PreconditionFailed` gets 412, a :class:`~oncely.errors.NotFound`
    412 with ``If-Match`` and 404 without (``process_exception``). Views read
    the header with :func:`oncely.http.conditional.if_match` (``if_match(request).version``).
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[DjangoRequest], Any]) -> None:
        from oncely.http.conditional import IfMatchRule

        options = dict(getattr(settings, "ONCELY_CONDITIONAL", None) or {})
        unknown = set(options) - {"methods", "paths", "problem_base"}
        if unknown:
            raise ConfigurationError(
                f"settings.ONCELY_CONDITIONAL has unknown options {sorted(unknown)}; use "
                "methods, paths, problem_base"
            )
        self.get_response = get_response
        self.rule = IfMatchRule(**options)

    def __call__(self, request: DjangoRequest) -> Any:
        from oncely.http.conditional import IF_MATCH_KEY

        raw = request.META.get("HTTP_IF_MATCH")
        parsed, refusal = self.rule.evaluate(
            str(request.method).upper(), request.path, [raw] if raw is not None else []
        )
        if refusal is not None:
            return _response(refusal)
        request.META[IF_MATCH_KEY] = parsed
        return self.get_response(request)

    def process_exception(self, request: DjangoRequest, exception: Exception) -> Any:
        from oncely.http.conditional import IF_MATCH_KEY, problem_for

        sent = request.META.get(IF_MATCH_KEY) is not None
        answer = problem_for(exception, self.rule.base, if_match=sent)
        return None if answer is None else _response(answer)
