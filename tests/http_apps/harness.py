"""Calling the middleware in process, through raw ASGI and WSGI, with any bytes on the wire.

:class:`AsgiFace` and :class:`WsgiFace` give the HTTP tests one interface to both faces of
the middleware (``await face.request(...)``), so each semantics test runs on both. Requests
are built by hand (no HTTP client in between), so tests can send header bytes no client
library would, truncate bodies, and drop the connection mid-response.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from oncely.http import IdempotencyConfig, IdempotencyMiddleware, WSGIIdempotencyMiddleware

from http_apps.raw import make_asgi, make_wsgi

HeaderList = Sequence[tuple[bytes | str, bytes | str]]


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    raised: BaseException | None = None

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    def header_names(self) -> set[str]:
        return {key.decode("latin-1").lower() for key, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def replayed(self) -> bool:
        return self.header("idempotent-replayed") == "true"

    @property
    def problem(self) -> str | None:
        """The slug of a problem+json answer (the last part of its ``type``)."""
        if self.header("content-type") != "application/problem+json":
            return None
        return str(self.json()["type"]).rsplit("/", 1)[-1]


class AsgiFace:
    name = "asgi"

    def __init__(self, config: IdempotencyConfig, app: Any = None, **kw: Any) -> None:
        self.calls: Counter[str] = Counter()
        self.app = app if app is not None else make_asgi(self.calls)
        self.middleware = IdempotencyMiddleware(self.app, config, **kw)
        self.engine = self.middleware.engine

    async def request(
        self,
        method: str,
        path: str,
        headers: HeaderList = (),
        body: bytes = b"",
        *,
        query: bytes = b"",
        chunks: int = 1,
        truncate: bool = False,
        declared_length: int | None = None,
        drop_after: int | None = None,
        extra_scope: dict[str, Any] | None = None,
    ) -> Reply:
        """One request. ``chunks`` splits the body into that many messages; ``truncate``
        sends half of it and then a disconnect; ``drop_after`` makes ``send`` fail (client
        gone) after that many response body messages."""
        raw_headers = [(_b(k).lower(), _b(v)) for k, v in headers]
        if declared_length is not None:
            raw_headers.append((b"content-length", str(declared_length).encode()))
        elif chunks == 1 and not truncate:
            raw_headers.append((b"content-length", str(len(body)).encode()))
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("utf-8", "surrogateescape"),
            "query_string": query,
            "root_path": "",
            "headers": raw_headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        scope.update(extra_scope or {})
        pieces: list[bytes]
        if truncate:
            pieces = [body[: len(body) // 2]]
        else:
            size = max(1, -(-len(body) // chunks)) if body else 1
            pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        incoming: list[dict[str, Any]] = [
            {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1 or truncate}
            for i, piece in enumerate(pieces)
        ]
        if truncate:
            incoming.append({"type": "http.disconnect"})
        done = asyncio.Event()
        reply = Reply(0)
        sent_bodies = 0

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop(0)
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal sent_bodies
            if message["type"] == "http.response.start":
                reply.status = message["status"]
                reply.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                if drop_after is not None and sent_bodies >= drop_after:
                    done.set()
                    raise OSError("client disconnected")
                sent_bodies += 1
                reply.body += message.get("body", b"")
                if not message.get("more_body", False):
                    done.set()

        try:
            await self.middleware(scope, receive, send)
        except Exception as exc:  # a server would answer 500 and log it
            reply.raised = exc
            if not reply.status:
                reply.status = 500
        finally:
            done.set()
        return reply


class WsgiFace:
    name = "wsgi"

    def __init__(self, config: IdempotencyConfig, app: Any = None, **kw: Any) -> None:
        self.calls: Counter[str] = Counter()
        self.app = app if app is not None else make_wsgi(self.calls)
        self.middleware = WSGIIdempotencyMiddleware(self.app, config, **kw)
        self.engine = self.middleware.engine

    def request_sync(
        self,
        method: str,
        path: str,
        headers: HeaderList = (),
        body: bytes = b"",
        *,
        query: bytes = b"",
        chunks: int = 1,
        truncate: bool = False,
        declared_length: int | None = None,
        drop_after: int | None = None,
        extra_scope: dict[str, Any] | None = None,
    ) -> Reply:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path.encode("utf-8", "surrogateescape").decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body[: len(body) // 2] if truncate else body),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        if chunks > 1 and declared_length is None:
            environ["wsgi.input_terminated"] = True  # a chunked body: read until EOF
        else:
            environ["CONTENT_LENGTH"] = str(
                declared_length if declared_length is not None else len(body)
            )
        for key, value in headers:
            name = _b(key).decode("latin-1").upper().replace("-", "_")
            text = _b(value).decode("latin-1")
            if name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[name] = text
            else:
                environ["HTTP_" + name] = (
                    environ["HTTP_" + name] + ", " + text if "HTTP_" + name in environ else text
                )
        environ.update(extra_scope or {})
        reply = Reply(0)

        def start_response(status: str, response_headers: list[tuple[str, str]], exc: Any = None):  # type: ignore[no-untyped-def]
            reply.status = int(status.split()[0])
            reply.headers = [
                (k.encode("latin-1"), v.encode("latin-1")) for k, v in response_headers
            ]

            def write(data: bytes) -> None:
                reply.body += data

            return write

        try:
            result: Iterable[bytes] = self.middleware(environ, start_response)
            try:
                for i, chunk in enumerate(result):
                    if drop_after is not None and i >= drop_after:
                        break  # the client went away: the server closes the body early
                    reply.body += chunk
            finally:
                close: Callable[[], None] | None = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            reply.raised = exc
            if not reply.status:
                reply.status = 500
        return reply

    async def request(self, *args: Any, **kwargs: Any) -> Reply:
        return await asyncio.to_thread(self.request_sync, *args, **kwargs)


FACES = {"asgi": AsgiFace, "wsgi": WsgiFace}
