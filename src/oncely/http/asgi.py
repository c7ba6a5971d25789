"""The ASGI face: a pure ASGI middleware (Starlette, FastAPI, Litestar, any ASGI 3 app).

>>> from oncely.http import IdempotencyConfig, IdempotencyMiddleware, scope_from_header
>>> config = IdempotencyConfig(store="redis://localhost:6379/0",
...                            scope=scope_from_header("Authorization"))
>>> app = IdempotencyMiddleware(app, config)

or ``app.add_middleware(IdempotencyMiddleware, config=...)`` in Starlette/FastAPI. This module
only carries out the operations of :func:`oncely.http.flow.request_flow` with ``await``: it
reads the body, talks to the store, runs the app with a renewed lease while teeing the response
into a buffer, and sends problems and replays. Nothing here decides anything.

Per-route decorators (``@idempotent_route``, the FastAPI ``Idempotency`` dependency) are found
automatically on Starlette and FastAPI apps (through ``scope["app"]``); for other frameworks
pass ``resolver=``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from oncely.core import observe
from oncely.core.cancelsafe import keep_alive, write_again
from oncely.core.lease import AsyncRenewer, Claimed, active_claim
from oncely.core.observe import describe
from oncely.core.ops import Complete, CompleteLater, Release, Sleep, Watch
from oncely.core.ops import aperform as store_aperform
from oncely.core.records import New
from oncely.errors import ConfigurationError, HttpProblem, OncelyError
from oncely.http import scopes
from oncely.http.config import IdempotencyConfig
from oncely.http.engine import Engine
from oncely.http.flow import (
    BodyError,
    Captured,
    Claim,
    ConsumeToken,
    IssueToken,
    Op,
    Pass,
    ReadBody,
    ReleaseToken,
    Respond,
    Run,
    request_flow,
)
from oncely.http.messages import ENTRY_KEY, HandlerEntry, HttpRequest, HttpResponse
from oncely.http.options import config_from_mapping
from oncely.http.perform import aperform
from oncely.http.problems import from_exception
from oncely.http.routes import Resolver

__all__ = [
    "INFO_KEY",
    "INSTALLED_TWICE",
    "OUTER_KEY",
    "IdempotencyMiddleware",
    "refuse",
    "serve",
    "stack_below",
    "stack_problem",
    "tree_below",
]

log = logging.getLogger("oncely.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Scope key holding the :class:`~oncely.http.messages.IdempotencyInfo` of a protected request
#: (None for a request the middleware let through untouched).
INFO_KEY = "oncely.idempotency"
#: Scope key set by an idempotency middleware on everything it passes on (requests and the
#: lifespan), so that a second one inside it notices.
OUTER_KEY = "oncely.middleware"
INSTALLED_TWICE = (
    "IdempotencyMiddleware is installed twice (e.g. app.add_middleware twice, or an app wrapped "
    "in it from outside that adds it too, or a mounted app with its own): each would claim the "
    "same Idempotency-Key and the inner one would answer every first request with 409; keep "
    "one"
)
#: Compressing middleware that must wrap the idempotency middleware, not run inside it.
_COMPRESSORS = ("GZipMiddleware", "BrotliMiddleware", "CompressMiddleware")
_MAX_DEPTH = 32
_MAX_NODES = 100_000
_STARLETTE_AUTH = "starlette.middleware.authentication.AuthenticationMiddleware"


def stack_below(app: Any) -> Iterator[Any]:
    """``app`` and the apps below it, following ``.app`` (what every Starlette middleware
    keeps) and a built ``middleware_stack`` (at most 32 levels)."""
    node = app
    for _ in range(_MAX_DEPTH):
        if node is None:
            return
        yield node
        stack = getattr(node, "middleware_stack", None)
        node = stack if stack is not None else getattr(node, "app", None)


def tree_below(app: Any) -> Iterator[Any]:
    """``app`` and everything that runs inside it for some request: the middleware below it
    (``.app``, a built ``middleware_stack``, or, before it is built, the classes of a
    Starlette app's ``user_middleware``), its router, and, through every route of every
    router (``Router.routes``, ``Mount``, ``Host``, ``Route``, FastAPI's ``APIRouter``
    routes included with ``include_router``), what the route runs: the middleware given to a
    ``Mount``/``Route`` and mounted apps with their own middleware, recursively. A middleware
    not built yet is yielded as its class. Routes added after start-up are not seen."""
    seen: set[int] = set()
    todo = [app]
    while todo and len(seen) < _MAX_NODES:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if isinstance(node, type):
            continue
        below: list[Any] = []
        stack = getattr(node, "middleware_stack", None)
        below.append(stack if stack is not None else getattr(node, "app", None))
        if stack is None:  # a Starlette app not started yet: its middleware, by class
            for middleware in getattr(node, "user_middleware", None) or ():
                below.append(getattr(middleware, "cls", None))
        below.append(getattr(node, "router", None))
        routes = getattr(node, "routes", None)
        if isinstance(routes, (list, tuple)):
            below.extend(getattr(route, "app", None) for route in routes)
        todo.extend(reversed(below))


def reads_principal(config: IdempotencyConfig) -> bool:
    """The scope (or the tokens' subject) is :func:`~oncely.http.scopes.scope_from_user`'s."""
    guard = config.tokens
    subject = guard.subject if guard is not None else None
    return scopes.reads_principal(config.scope) or scopes.reads_principal(subject)


_WHERE = (
    "(in the app's middleware below it, on a Mount or a Route, or in a mounted app: all run "
    "inside it)"
)


def stack_problem(app: Any, config: IdempotencyConfig | None = None) -> str | None:
    """What is wrong with what runs inside an idempotency middleware (:func:`tree_below`:
    the middleware below it and the whole routing tree): another idempotency middleware, a
    compressing one (whose output would be stored for the first client's
    ``Accept-Encoding`` and replayed compressed to clients that may not accept it), or, when
    ``config`` scopes by the principal, Starlette's ``AuthenticationMiddleware`` (which would
    set the user after the scope was read)."""
    principal = config is not None and reads_principal(config)
    for node in tree_below(app):
        kind = node if isinstance(node, type) else type(node)
        if issubclass(kind, IdempotencyMiddleware):
            return INSTALLED_TWICE
        name = kind.__name__
        if principal and any(
            f"{k.__module__}.{k.__qualname__}" == _STARLETTE_AUTH for k in kind.__mro__
        ):
            return (
                f"{name} runs inside IdempotencyMiddleware {_WHERE}, but scope_from_user reads "
                "the user it sets before the key is claimed: every keyed request would be "
                "refused with 401 principal-missing (or, with anonymous='share', every client "
                f"would share one key space); let {name} wrap IdempotencyMiddleware: add it to "
                "the app itself, after IdempotencyMiddleware (app.add_middleware puts each new "
                "middleware outside the ones already added), not to a Mount, a Route or a "
                "mounted app"
            )
        if name in _COMPRESSORS:
            return (
                f"{name} runs inside IdempotencyMiddleware {_WHERE}: responses would be stored "
                "compressed for the first client's Accept-Encoding and replayed compressed to "
                f"clients that may not accept it; let {name} wrap IdempotencyMiddleware: add "
                "it to the app itself, after IdempotencyMiddleware (app.add_middleware puts "
                "each new middleware outside the ones already added), not to a Mount, a Route "
                "or a mounted app"
            )
    return None


async def refuse(scope: Scope, receive: Receive, send: Send, problem: str) -> None:
    """A misconfigured stack: fail the server's start-up (ASGI lifespan ``startup.failed``,
    then raise) with ``problem``; a request that comes anyway (no lifespan) raises it."""
    log.error("oncely.http: %s", problem)
    if scope["type"] != "lifespan":
        raise ConfigurationError(problem)
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.failed", "message": problem})
            raise ConfigurationError(problem)  # as Starlette's router fails a start-up
        if message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


#: The token operations (the rest of what the flow asks for beyond the request and the app are
#: store operations, performed by :func:`oncely.core.ops.aperform` directly).
_TOKEN_OPS = (ConsumeToken, IssueToken, ReleaseToken)

#: What a flow still does after its request task was cancelled: the writes that settle the key
#: (and the pauses between their retries); any other operation gets ``CancelledError``.
_SETTLING = (Complete, CompleteLater, Release, Sleep, ReleaseToken)

# Response extensions that bypass ``send`` with a body; hidden from the app while capturing.
_BYPASS_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopysend")


class IdempotencyMiddleware:
    """ASGI middleware applying ``Idempotency-Key`` semantics and one-time token guards.

    :param app: the ASGI application to protect.
    :param config: an :class:`~oncely.http.config.IdempotencyConfig` (or pass its fields as
        keyword arguments instead).
    :param resolver: finds the :class:`~oncely.http.routes.Rule` of the view serving a scope;
        default: detected for Starlette/FastAPI apps.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: IdempotencyConfig | None = None,
        *,
        resolver: Resolver | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            config = config_from_mapping(
                options, "IdempotencyMiddleware", also=("config", "resolver")
            )
        elif options:
            raise ConfigurationError(
                f"pass either config= or its fields, not both (got {sorted(options)})"
            )
        self.app = app
        self.engine = Engine(config, resolver)
        self._detect = resolver is None
        #: What is wrong with what runs inside (:func:`stack_problem`), found on the first
        #: call (the lifespan's start-up, or the first request): by then the app's middleware
        #: and routes are in place. The app then refuses to start instead of misbehaving.
        self._problem: str | None = None
        self._checked = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._checked:
            self._checked = True
            self._problem = stack_problem(self.app, self.engine.config)
        if self._detect:
            self._detect_framework(scope)
        outer = scope.get(OUTER_KEY)
        problem = self._problem or (
            INSTALLED_TWICE if outer is not None and outer is not self else None
        )
        if problem is not None:
            await refuse(scope, receive, send, problem)
            return
        scope[OUTER_KEY] = self  # an idempotency middleware inside this one is a mistake
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # serve(), inline: one coroutine frame less on every resumption of the request
        scope[INFO_KEY] = None
        engine = self.engine
        method = scope["method"]
        if not engine.is_candidate(method) and (
            engine.token_endpoint is None or scope["path"] != engine.token_endpoint
        ):
            await self.app(scope, receive, send)
            return
        request = HttpRequest(
            method, scope["path"], scope.get("query_string", b""), scope["headers"], scope
        )
        await _Exchange(self.app, engine, scope, receive, send).drive(request_flow(engine, request))

    def _detect_framework(self, scope: Scope) -> None:
        self._detect = False
        app = scope.get("app") or self.app  # inside Starlette, or wrapping it from outside
        if not hasattr(app, "router"):
            return
        module = type(app).__module__.split(".", 1)[0]
        if module not in ("starlette", "fastapi"):
            return
        from oncely.http.starlette import integrate

        self.engine.set_resolver(integrate(app, self.app, self.engine))

    async def aclose(self) -> None:
        """Close the store's connections for the running event loop."""
        await self.engine.store.aclose()


async def serve(engine: Engine, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Apply ``engine`` to one HTTP request on its way to ``app``: what the middleware does with
    each request (framework integrations that keep their own middleware, such as Litestar's,
    call it with the engine they built)."""
    scope[INFO_KEY] = None
    method = scope["method"]
    if not engine.is_candidate(method) and (
        engine.token_endpoint is None or scope["path"] != engine.token_endpoint
    ):
        await app(scope, receive, send)
        return
    request = HttpRequest(
        method, scope["path"], scope.get("query_string", b""), scope["headers"], scope
    )
    await _Exchange(app, engine, scope, receive, send).drive(request_flow(engine, request))


class _Exchange:
    """One request/response exchange: performs the flow's operations.

    A keyed response is settled before the client can see it complete: the start is held
    until the first body message, and the last body message (``more_body`` false) until the
    flow has stored the response (or decided what else to do), right inside the app's
    ``send``. A streamed response passes its chunks through at once; only its end waits.

    From its first claim on, a keyed request's flow runs in a task of its own (the claim, the
    app, the settling writes), which the request task awaits. Cancelling the request task
    does not cut that task off where that would leave the key wrong: a claim on the wire is
    let finish (and undone if it succeeded), a settling write goes on, and a handler goes on
    to its end with ``on_cancel="finish"`` (its response then settles the key); the request
    task ends with ``CancelledError`` at once. Where nothing is at stake (waiting for another
    request's outcome, sending a replay or a problem, a handler with ``on_cancel="release"``
    or without a claim) the task is cancelled too, and the request task ends when it did.
    One task per keyed request is all ``on_cancel="finish"`` needs: the claim needs no
    shielded task of its own, since nothing cancels the task it runs in.
    """

    __slots__ = (
        "app",
        "app_scope",
        "body",
        "body_given",
        "claim_sent",
        "engine",
        "flow",
        "op",
        "pending",
        "receive",
        "renewer",
        "scope",
        "send",
        "task",
    )

    def __init__(
        self, app: ASGIApp, engine: Engine, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.app = app
        self.engine = engine
        self.scope = scope
        #: The copy of ``scope`` the app was given, if any (extensions hidden from it).
        self.app_scope: Scope | None = None
        self.receive = receive
        self.send = send
        self.body: bytes | None = None
        #: The app was given the body read for it (its next ``receive`` goes to the server).
        self.body_given = False
        #: When the last claim was sent (monotonic); the lease's local bound counts from it.
        self.claim_sent = 0.0
        self.flow: Any = None
        self.renewer: AsyncRenewer | None = None
        #: The task running the flow from its first claim on (None before).
        self.task: asyncio.Task[None] | None = None
        #: The operation being performed (what a cancellation of the request task meets).
        self.op: Op | None = None
        #: The request task was cancelled while ``task`` did something that must not be cut
        #: off: the flow gets ``CancelledError`` at its next step that starts new work.
        self.pending = False

    async def drive(
        self,
        flow: Any,
        value: Any = None,
        error: BaseException | None = None,
        op: Op | None = None,
    ) -> None:
        """Perform the flow's operations until it ends (from where it stands: a flow resumed
        after the app's response carries ``value``; one resumed in its own task, the
        operation ``op`` it yielded)."""
        self.flow = flow
        while True:
            if op is None:
                if self.flow is None:  # it ended inside the app's last send (_Capture.send)
                    if error is not None:
                        raise error  # what throwing it into the ended flow would do
                    return
                try:
                    op = flow.send(value) if error is None else flow.throw(error)
                except StopIteration:
                    self.flow = None
                    return
                if type(op) is Claim and self.task is None:
                    await self._detach(flow, op)
                    return
            value = error = None
            self.op = op
            try:
                kind = type(op)
                if self.pending and kind not in _SETTLING:
                    raise asyncio.CancelledError  # the request task was cancelled meanwhile
                if kind is Claim:  # the lease's local bound counts from here
                    assert isinstance(op, Claim)
                    self.claim_sent = time.monotonic()
                    engine = self.engine
                    store = engine._store if engine._store is not None else engine.store
                    if observe.observers or op.deadline is not None:
                        value = await store_aperform(store, op, cancel_safe=False)
                    else:  # what store_aperform does then, one frame less
                        value = await store.aclaim(op.key, op.fingerprint, op.lease, op.ttl)
                    if self.pending:
                        await self._undo(op, value)
                        raise asyncio.CancelledError
                elif kind is Run:
                    assert isinstance(op, Run)
                    value = await self._run(op)
                elif kind is ReadBody:
                    assert isinstance(op, ReadBody)
                    value = await self._read_body(op.limit, op.expected)
                elif kind is Respond:
                    assert isinstance(op, Respond)
                    await _send_response(self.send, op.response)
                elif kind is Pass:
                    await self._pass()
                elif kind is Complete and not observe.observers:
                    # what store_aperform does then, one coroutine less (alive until the reply)
                    assert isinstance(op, Complete)
                    engine = self.engine
                    store = engine._store if engine._store is not None else engine.store
                    try:
                        await store.acomplete(op.key, op.fence, op.data, op.codec, op.ttl)
                    except asyncio.CancelledError:  # a cancelled caller's fenced write goes on
                        write_again(store.acomplete, (op.key, op.fence, op.data, op.codec, op.ttl))
                        raise
                elif kind in _TOKEN_OPS:
                    value = await aperform(self.engine, op)
                else:  # a store operation
                    engine = self.engine
                    store = engine._store if engine._store is not None else engine.store
                    value = await store_aperform(store, op)  # type: ignore[arg-type]
            except BaseException as exc:
                error = exc
            op = None

    # -- the flow's own task -----------------------------------------------------------------------
    async def _detach(self, flow: Any, op: Claim) -> None:
        """Run the rest of the flow, from its first claim ``op``, in a task of its own and wait
        for it (see the class documentation for what a cancellation does)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self.op = op
        coro = self._detached(flow, op, done)
        # What loop.create_task does without a task factory, minus its Python-level frames.
        task = self.task = (
            asyncio.Task(coro, loop=loop)
            if loop.get_task_factory() is None
            else loop.create_task(coro)
        )
        try:
            await done
        except asyncio.CancelledError:
            if task.done():  # the flow itself ended with CancelledError
                raise
            if self._interruptible(self.op):
                task.cancel()
                await asyncio.wait((task,))  # its clean-up ends before this request task does
            else:
                self.pending = True
                keep_alive(task)
            raise

    async def _detached(self, flow: Any, op: Claim, done: asyncio.Future[None]) -> None:
        try:
            await self.drive(flow, op=op)
        except BaseException as exc:
            if done.done():  # the request task was cancelled and left
                if not isinstance(exc, asyncio.CancelledError):
                    log.info(
                        "oncely.http: a cancelled request's handler finished and was settled: %s",
                        describe(exc),
                    )
            elif isinstance(exc, asyncio.CancelledError):
                done.cancel()
            else:
                done.set_exception(exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            if not done.done():
                done.set_result(None)

    def _interruptible(self, op: Op | None) -> bool:
        """May a cancellation of the request task cut ``op`` off? Not a claim (it may have
        been applied), a write, or a keyed handler with ``on_cancel="finish"``."""
        kind = type(op)
        if kind is Run:
            assert isinstance(op, Run)
            return op.fence is None or self.engine.config.on_cancel == "release"
        return kind is Watch or kind is Respond

    async def _undo(self, op: Claim, outcome: Any) -> None:
        """The request task was cancelled during ``op``: free the key if the claim took it."""
        if not isinstance(outcome, New):
            return
        try:
            await aperform(self.engine, Release(op.key, outcome.fence))
        except OncelyError as exc:
            log.warning(
                "oncely.http: could not release the claim of a cancelled request (%s); it frees "
                "itself when its lease runs out",
                describe(exc),
            )

    # -- request body ------------------------------------------------------------------------------
    async def _read_body(self, limit: int, expected: int | None) -> bytes | BodyError:
        receive = self.receive
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            body = bytes(message.get("body", b""))  # the whole body in one message (usual)
            if len(body) > limit:
                return BodyError.TOO_LARGE
            if expected is not None and len(body) != expected:
                return BodyError.INCOMPLETE
            self.body = body
            return body
        chunks: list[bytes] = []
        size = 0
        while True:
            kind = message["type"]
            if kind == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        return BodyError.TOO_LARGE
                    chunks.append(bytes(chunk))
                if not message.get("more_body", False):
                    break
            elif kind == "http.disconnect":
                return BodyError.INCOMPLETE
            message = await receive()
        if expected is not None and size != expected:
            return BodyError.INCOMPLETE
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.body = body
        return body

    def _app_receive(self) -> Receive:
        return self.receive if self.body is None else self._receive_read_body

    async def _receive_read_body(self) -> Message:
        """The app's ``receive`` once the body was read: the body in one message, then what
        the server says (the app only waits for the disconnect then). A bound method, not a
        closure: one object per request instead of a function and three cells, each alive
        until the response is stored."""
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await self.receive()

    # -- running the app ---------------------------------------------------------------------------
    async def _pass(self) -> None:
        capture = _Capture(self.send, -1)
        try:
            await self.app(self.scope, self._app_receive(), capture.send)
        except HttpProblem as exc:
            if capture.started:
                raise
            await _send_response(self.send, from_exception(exc, self.engine.config.problem_base))

    def _stop_renewal(self) -> None:
        renewer, self.renewer = self.renewer, None
        if renewer is not None:
            renewer.stop()

    async def _run(self, op: Run) -> Captured:
        scope = self.scope
        scope[INFO_KEY] = op.info
        entry = scope[ENTRY_KEY] = HandlerEntry(self.engine.tracks_entry)
        resolver = self.engine.resolver
        dispatches = getattr(resolver, "dispatches", None)
        if dispatches is not None and dispatches(scope) is False:
            entry.rejected()  # the router will answer 404/405/redirect without a handler
        error: BaseException | None = None
        keyed = op.fence is not None
        capture = _Capture(self.send, op.capture, self if keyed else None, entry)
        app_scope = scope
        extensions = scope.get("extensions")
        if op.capture >= 0 and extensions and any(e in extensions for e in _BYPASS_EXTENSIONS):
            app_scope = self.app_scope = dict(scope)
            app_scope["extensions"] = {
                k: v for k, v in extensions.items() if k not in _BYPASS_EXTENSIONS
            }
        if keyed:
            assert op.key is not None and op.fence is not None
            engine = self.engine
            store = engine._store if engine._store is not None else engine.store
            claimed = Claimed(op.key, op.fence, op.lease, store, engine.config.on_lease_lost)
            self.renewer = AsyncRenewer(claimed, self.claim_sent)
            token = active_claim.set(claimed)
        try:
            await self.app(app_scope, self._app_receive(), capture.send)
        except HttpProblem as exc:
            if capture.started:
                error = exc
            else:
                problem = from_exception(exc, self.engine.config.problem_base)
                try:
                    await _send_response(capture.send, problem)
                except BaseException as again:  # the client is gone
                    error = again
        except BaseException as exc:  # settled by the flow, which raises it again
            error = exc
        finally:
            if keyed:
                active_claim.reset(token)
            if self.renewer is not None:
                self._stop_renewal()
        if capture.settled:  # the flow already ended inside the app's last send
            if error is not None:
                raise error
            return capture.captured or capture.result(None)
        self._principal_seen()
        return await self._produced(capture, error)

    def _principal_seen(self) -> None:
        """The app ran with a copy of the scope: the user it saw is the flow's to compare
        with the one the key was scoped by (see :func:`oncely.http.flow.request_flow`)."""
        app_scope = self.app_scope
        if app_scope is not None and "user" in app_scope:
            self.scope["user"] = app_scope["user"]

    async def _produced(self, capture: _Capture, error: BaseException | None) -> Captured:
        """What the app produced, once it returned (or raised), if the flow did not settle it
        inside the app's last send."""
        try:
            await capture.flush()  # a start held back for a body that never came
        except BaseException as exc:  # the client is gone
            error = error or exc
        return capture.result(error)


class _Capture:
    """Passes the app's response through to the server, keeping a copy (up to a limit).

    What the app *produced* is recorded before each message goes to the server, so a client
    that leaves while the last message is sent does not turn a finished response into an
    interrupted one. With ``settle`` (the exchange of a keyed request), the start is held back
    until the first body message, and the last body message until the exchange's flow settled
    the key with what was captured."""

    __slots__ = (
        "captured",
        "chunks",
        "complete",
        "entry",
        "headers",
        "held",
        "inner",
        "limit",
        "settle",
        "settled",
        "size",
        "started",
        "status",
    )

    def __init__(
        self,
        inner: Send,
        limit: int,
        settle: _Exchange | None = None,
        entry: HandlerEntry | None = None,
    ) -> None:
        self.inner = inner
        self.limit = limit
        self.settle = settle
        self.entry = entry
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.chunks: list[bytes] | None = [] if limit >= 0 else None
        self.size = 0
        self.started = False
        self.complete = False
        self.settled = False
        #: What was settled (the response as it stood when its last message came).
        self.captured: Captured | None = None
        #: The start message, held back until the first body message (keyed requests).
        self.held: Message | None = None

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body" and self.started and not self.complete:
            chunks = self.chunks
            if chunks is not None:
                body = message.get("body", b"")
                if body:
                    self.size += len(body)
                    if self.size > self.limit:
                        self.chunks = None
                    else:
                        chunks.append(bytes(body))
            if not message.get("more_body", False):
                self.complete = True
                exchange = self.settle
                if exchange is not None and not self.settled:
                    # The app produced its whole response (this last message is held back):
                    # settle the key before the client can see it complete.
                    self.settled = True
                    captured = self.captured = self.result(None)
                    if exchange.renewer is not None:
                        exchange._stop_renewal()
                    exchange._principal_seen()
                    try:
                        await exchange.drive(exchange.flow, captured)
                    except BaseException as exc:
                        log.error(
                            "oncely.http: settling a finished response failed: %s", describe(exc)
                        )
                    start, self.held = self.held, None  # flush(), inline
                    if start is not None:
                        await self.inner(start)
                    await self.inner(message)
                    return
        elif kind == "http.response.start" and not self.started:
            self.started = True
            self.status = int(message["status"])
            if self.limit >= 0:
                self.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            if self.settle is not None:
                self.held = message
                return
        if self.held is not None:
            await self.flush()
        await self.inner(message)

    async def flush(self) -> None:
        """Send what was held back."""
        start, self.held = self.held, None
        if start is not None:
            await self.inner(start)

    def result(self, error: BaseException | None) -> Captured:
        chunks = self.chunks
        body = None
        if chunks is not None:
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        entry = self.entry
        handled = entry.handled if entry is not None else True
        return Captured(
            self.status,
            self.headers,
            body,
            self.complete and self.started,
            handled,
            error,
            entry is not None and entry.failed,
        )


async def _send_response(send: Send, response: HttpResponse) -> None:
    await send(
        {"type": "http.response.start", "status": response.status, "headers": response.headers}
    )
    await send({"type": "http.response.body", "body": response.body, "more_body": False})
