"""The WSGI face: a WSGI middleware (Flask, Django, any PEP 3333 app).

>>> from oncely.http import IdempotencyConfig, WSGIIdempotencyMiddleware, scope_from_cookie
>>> config = IdempotencyConfig(store=..., scope=scope_from_cookie("sessionid"))
>>> app.wsgi_app = WSGIIdempotencyMiddleware(app.wsgi_app, config)

This module only carries out the operations of :func:`oncely.http.flow.request_flow` with
blocking calls — the same flow the ASGI face drives with ``await``. WSGI hands the response
body to the server as an iterable, so the flow is driven in two parts: up to :class:`Run`
when the middleware is called, and the rest when the server has consumed the whole body, or
closed it early (the client went away), or the app failed; the flow then settles the key.
While the body streams, the shared lease keeper renews the key.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

from oncely.core.lease import Claimed, active_claim, keeper
from oncely.core.observe import describe
from oncely.errors import ConfigurationError, HttpProblem
from oncely.http.config import IdempotencyConfig
from oncely.http.engine import Engine
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
from oncely.http.options import config_from_mapping
from oncely.http.perform import perform
from oncely.http.problems import from_exception
from oncely.http.routes import Resolver

__all__ = ["INFO_KEY", "WSGIIdempotencyMiddleware", "has_unsized_body"]

log = logging.getLogger("oncely.http")

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: Environ key holding the :class:`~oncely.http.messages.IdempotencyInfo` of a request.
INFO_KEY = "oncely.idempotency"
_CHUNK = 65536


def has_unsized_body(environ: Environ) -> bool:
    """True if the request says it has a body (``Transfer-Encoding``, RFC 9112 §6.1) but gives
    no ``CONTENT_LENGTH`` and no ``wsgi.input_terminated``: PEP 3333 lets the app read no further
    than ``CONTENT_LENGTH``, so the body cannot be read to its end."""
    return (
        bool(environ.get("HTTP_TRANSFER_ENCODING", "").strip())
        and not (environ.get("CONTENT_LENGTH") or "").strip()
        and not environ.get("wsgi.input_terminated")
    )


def _replace_body(environ: Environ, body: bytes) -> None:
    """Hand the app the body oncely read, with an environ that says so consistently: a sized
    stream (``CONTENT_LENGTH``), no ``Transfer-Encoding`` (the body is no longer chunked: with
    it Werkzeug ignores ``CONTENT_LENGTH`` and reads nothing, RFC 9112 §6.3) and
    ``wsgi.input_terminated`` (the stream ends after the body), so plain WSGI, Werkzeug/Flask
    and Django's ``WSGIHandler`` all read exactly ``body``."""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    environ["wsgi.input_terminated"] = True


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _request(environ: Environ) -> HttpRequest:
    headers: list[tuple[bytes, bytes]] = []
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            headers.append(
                (name[5:].replace("_", "-").lower().encode("latin-1"), value.encode("latin-1"))
            )
    for name, header in (("CONTENT_TYPE", b"content-type"), ("CONTENT_LENGTH", b"content-length")):
        value = environ.get(name)
        if value:
            headers.append((header, value.encode("latin-1")))
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    # PEP 3333 strings are bytes decoded as Latin-1; paths are UTF-8 on the wire.
    with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
        path = path.encode("latin-1").decode("utf-8")
    return HttpRequest(
        environ.get("REQUEST_METHOD", "GET").upper(),
        path or "/",
        environ.get("QUERY_STRING", "").encode("latin-1", "replace"),
        headers,
        environ,
    )


class WSGIIdempotencyMiddleware:
    """WSGI middleware applying ``Idempotency-Key`` semantics and one-time token guards.

    :param app: the WSGI application to protect.
    :param config: an :class:`~oncely.http.config.IdempotencyConfig` (or its fields as keyword
        arguments) — the same object the ASGI middleware takes.
    :param resolver: finds the :class:`~oncely.http.routes.Rule` of the view serving an environ
        (``oncely.http.flask`` and ``oncely.http.django`` provide one).
    """

    def __init__(
        self,
        app: WSGIApp,
        config: IdempotencyConfig | None = None,
        *,
        resolver: Resolver | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            config = config_from_mapping(
                options, "WSGIIdempotencyMiddleware", also=("config", "resolver")
            )
        elif options:
            raise ConfigurationError(
                f"pass either config= or its fields, not both (got {sorted(options)})"
            )
        self.app = app
        self.engine = Engine(config, resolver)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        engine = self.engine
        environ[INFO_KEY] = None
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if not engine.is_candidate(method) and (
            engine.token_endpoint is None
            or environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
            != engine.token_endpoint
        ):
            return self.app(environ, start_response)
        exchange = _Exchange(self.app, engine, environ, start_response)
        return exchange.start(request_flow(engine, _request(environ)))

    def close(self) -> None:
        """Close the store's connections."""
        self.engine.store.close()


class _Exchange:
    """One request/response exchange: performs the flow's operations with blocking calls."""

    def __init__(
        self, app: WSGIApp, engine: Engine, environ: Environ, start_response: StartResponse
    ) -> None:
        self.app = app
        self.engine = engine
        self.environ = environ
        self.start_response = start_response
        self.flow: Any = None
        #: When the last claim was sent (monotonic); the lease's local bound counts from it.
        self.claim_sent = 0.0

    def start(self, flow: Any) -> Iterable[bytes]:
        """Drive the flow until it answers, passes the request on, or runs the app."""
        self.flow = flow
        result: Iterable[bytes] = self._drive(None, None)
        return result

    def _drive(self, value: Any, error: BaseException | None) -> Any:
        """Perform operations until the flow ends (returning what to give the server)."""
        flow = self.flow
        result: Any = None
        while True:
            try:
                op: Op = flow.send(value) if error is None else flow.throw(error)
            except StopIteration:
                return result
            value = error = None
            try:
                kind = type(op)
                if kind is Claim:  # the lease's local bound counts from here
                    self.claim_sent = time.monotonic()
                if kind is ReadBody:
                    assert isinstance(op, ReadBody)
                    value = self._read_body(op.limit)
                elif kind is Respond:
                    assert isinstance(op, Respond)
                    result = self._respond(op.response)
                elif kind is Pass:
                    result = self._pass()
                elif kind is Run:
                    assert isinstance(op, Run)
                    # The rest of the flow runs when the server has consumed the body.
                    return self._run(op)
                else:
                    value = perform(self.engine, op)
            except BaseException as exc:
                error = exc

    def resume(self, captured: Captured) -> None:
        """Finish the flow after the app's response went out (or failed); raises the app's
        exception (``captured.error``) once the key is settled."""
        self._drive(captured, None)

    # -- request body ------------------------------------------------------------------------------
    def _read_body(self, limit: int) -> bytes | BodyError:
        """The whole request body: ``CONTENT_LENGTH`` bytes, or up to the end of a stream the
        server terminates (``wsgi.input_terminated``, as Gunicorn, Werkzeug and mod_wsgi set
        for a chunked body). A body without either (``Transfer-Encoding`` on a server that
        neither de-chunks it nor ends the stream, such as ``wsgiref``) cannot be read to its
        end: :attr:`BodyError.LENGTH_REQUIRED` (411), never an empty body."""
        environ = self.environ
        stream = environ.get("wsgi.input")
        declared = environ.get("CONTENT_LENGTH") or ""
        chunks: list[bytes] = []
        size = 0
        try:
            if declared.strip():
                want = int(declared)
                if want > limit:
                    return BodyError.TOO_LARGE
                while size < want and stream is not None:
                    chunk = stream.read(min(_CHUNK, want - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                if size < want:
                    return BodyError.INCOMPLETE
            elif environ.get("wsgi.input_terminated") and stream is not None:
                while True:
                    chunk = stream.read(_CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        return BodyError.TOO_LARGE
                    chunks.append(chunk)
            elif has_unsized_body(environ):
                return BodyError.LENGTH_REQUIRED
        except (OSError, ValueError) as exc:
            log.info("oncely.http: reading the request body failed: %s", describe(exc))
            return BodyError.INCOMPLETE
        except Exception as exc:  # servers raise their own types on a dropped client
            log.info("oncely.http: reading the request body failed: %s", describe(exc))
            return BodyError.INCOMPLETE
        body = b"".join(chunks)
        _replace_body(environ, body)
        return body

    # -- responses ---------------------------------------------------------------------------------
    def _respond(self, response: HttpResponse) -> list[bytes]:
        self.start_response(
            _status_line(response.status),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers],
        )
        return [response.body]

    def _pass(self) -> Iterable[bytes]:
        started = False

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal started
            started = True
            return self.start_response(status, headers, exc_info)

        try:
            return self.app(self.environ, start_response)
        except HttpProblem as exc:
            if started:
                raise
            return self._respond(from_exception(exc, self.engine.config.problem_base))

    def _run(self, op: Run) -> Iterable[bytes]:
        self.environ[INFO_KEY] = op.info
        self.environ[ENTRY_KEY] = HandlerEntry(self.engine.tracks_entry)
        claimed: Claimed | None = None
        if op.fence is not None:
            assert op.key is not None
            claimed = Claimed(
                op.key, op.fence, op.lease, self.engine.store, self.engine.config.on_lease_lost
            )
            keeper.keep(claimed, self.claim_sent)
        body = _Body(self, op.capture, claimed)
        token = active_claim.set(claimed)
        try:
            app_iter = self.app(self.environ, body.start_response)
        except HttpProblem as exc:
            if body.status:
                body.fail(exc)
                raise
            problem = from_exception(exc, self.engine.config.problem_base)
            app_iter = self._problem_iter(body, problem)
        except BaseException as exc:
            body.fail(exc)
            raise
        finally:
            active_claim.reset(token)
        body.attach(app_iter)
        if claimed is not None:
            body.settle_if_buffered()
        return body

    @staticmethod
    def _problem_iter(body: _Body, response: HttpResponse) -> list[bytes]:
        body.start_response(
            _status_line(response.status),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers],
        )
        return [response.body]


class _Body:
    """The response body handed to the server: passes chunks through, keeps a copy, and
    finishes the flow once the server closes it (or the app fails).

    A keyed response is settled before the server can send its end: a body the app returned
    as a list or tuple is settled before the first byte goes out, and the chunk that
    completes a declared ``Content-Length`` before it is handed over (a server sends the
    status line with the first chunk, PEP 3333)."""

    def __init__(self, exchange: _Exchange, limit: int, claimed: Claimed | None) -> None:
        self.exchange = exchange
        self.limit = limit
        self.claimed = claimed
        self.entry: HandlerEntry = exchange.environ[ENTRY_KEY]
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.chunks: list[bytes] | None = [] if limit >= 0 else None
        self.size = 0
        self.exhausted = False
        self.finished = False
        #: The body's declared length (Content-Length), and how many bytes went out so far.
        self.declared: int | None = None
        self.produced = 0
        self.app_iter: Iterable[bytes] | None = None
        self.iterator: Iterator[bytes] | None = None

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        # The server's own first: it refuses a second status once the first went out.
        write = self.exchange.start_response(status, headers, exc_info)
        self.status = int(status.split(None, 1)[0])
        if self.limit >= 0:
            self.headers = [
                (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers
            ]
        for name, value in headers:
            if name.lower() == "content-length" and value.strip().isdigit():
                self.declared = int(value)

        def tee(data: bytes) -> object:
            self._keep(data)
            return write(data)

        return tee

    def _keep(self, data: bytes) -> None:
        chunks = self.chunks
        if chunks is not None and data:
            self.size += len(data)
            if self.size > self.limit:
                self.chunks = None
            else:
                chunks.append(bytes(data))

    def attach(self, app_iter: Iterable[bytes]) -> None:
        self.app_iter = app_iter
        self.iterator = iter(app_iter)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def settle_if_buffered(self) -> None:
        """A body the app returned as a list or tuple is complete already: settle now."""
        app_iter = self.app_iter
        if not isinstance(app_iter, (list, tuple)) or self.status == 0:
            return
        for chunk in app_iter:
            self._keep(chunk)
        self.exhausted = True
        self._finish(None)

    def __next__(self) -> bytes:
        assert self.iterator is not None
        try:
            chunk = next(self.iterator)
        except StopIteration:
            # The whole body went out: store it now (``close()`` may come late, or never in
            # some test clients).
            self.exhausted = True
            self._finish(None)
            raise
        except BaseException as exc:
            self.fail(exc)
            raise
        if not self.finished:
            self._keep(chunk)
            self.produced += len(chunk)
            if self.declared is not None and self.produced >= self.declared:
                # The last chunk of a declared length: settle before the client gets it.
                self.exhausted = True
                self._finish(None)
        return chunk

    def close(self) -> None:
        error: BaseException | None = None
        try:
            close = getattr(self.app_iter, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            error = exc
        if error is not None:
            self.fail(error)
            raise error
        self._finish(None)

    def fail(self, error: BaseException) -> None:
        """The app raised: let the flow settle the key (it re-raises; we swallow that)."""
        if self.finished:
            return
        try:
            self._finish(error)
        except BaseException as again:
            if again is not error:
                raise

    def _finish(self, error: BaseException | None) -> None:
        """Settle the key from what the app produced: its status line once it called
        ``start_response`` (a response cut short after that is kept as not replayable, never
        released), whether its handler ran, and its exception."""
        if self.finished:
            return
        self.finished = True
        if self.claimed is not None:
            keeper.stop(self.claimed)
        chunks = self.chunks
        captured = Captured(
            self.status,
            self.headers,
            None if chunks is None else b"".join(chunks),
            self.exhausted and self.status != 0,
            self.entry.handled,
            error,
            self.entry.failed,
        )
        self.exchange.resume(captured)

    def __del__(self) -> None:
        # A server that drops the body without close() must not leave the key held forever.
        if not self.finished and self.iterator is not None:
            try:
                self._finish(None)
            except Exception:  # pragma: no cover - best effort during garbage collection
                log.exception("oncely.http: finishing an abandoned response failed")
