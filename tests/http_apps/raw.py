"""One tiny application, written twice (raw ASGI and raw WSGI), so that every HTTP semantics
test runs unchanged on both faces of the middleware.

Routes (every request to a route counts one execution in ``calls[path]``):

* ``/orders``   201 JSON with Location, ETag, Set-Cookie and X-Secret headers
* ``/client-error``  404 problem-ish JSON;  ``/server-error`` 503;  ``/rate-limited`` 429
* ``/boom``     raises RuntimeError before responding
* ``/slow``     sleeps ``?s=`` seconds (default 0.5), then 200
* ``/stream``   streams ``?n=`` chunks of 10 bytes (default 5) with status ``?status=`` (200)
* ``/stream-boom``  starts a 200 response, sends one chunk, then raises RuntimeError
* ``/no-content``   204 without a body;  ``/not-modified`` 304 with an ETag
* ``/echo``     200 with the request body
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

Calls = Counter[str]


def _number(query: str, name: str, default: float) -> float:
    values = parse_qs(query).get(name)
    return float(values[0]) if values else default


def _orders_body(calls: Calls) -> bytes:
    return json.dumps({"order": calls["/orders"]}).encode()


ORDER_HEADERS = [
    (b"content-type", b"application/json"),
    (b"location", b"/orders/1"),
    (b"etag", b'"v1"'),
    (b"set-cookie", b"session=secret; HttpOnly"),
    (b"x-secret", b"do-not-replay"),
]


def make_asgi(calls: Calls) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        path = scope["path"]
        query = scope.get("query_string", b"").decode()
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        calls[path] += 1

        async def respond(status: int, headers: list[tuple[bytes, bytes]], data: bytes) -> None:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        if path == "/orders":
            await respond(201, ORDER_HEADERS, _orders_body(calls))
        elif path == "/client-error":
            await respond(404, [(b"content-type", b"application/json")], b'{"error":"nope"}')
        elif path == "/server-error":
            await respond(503, [], b"down")
        elif path == "/rate-limited":
            await respond(429, [], b"slow down")
        elif path == "/boom":
            raise RuntimeError("handler failed")
        elif path == "/slow":
            await asyncio.sleep(_number(query, "s", 0.5))
            await respond(200, [(b"content-type", b"text/plain")], b"slow done")
        elif path == "/stream":
            status = int(_number(query, "status", 200))
            await send({"type": "http.response.start", "status": status, "headers": []})
            for i in range(int(_number(query, "n", 5))):
                await send(
                    {"type": "http.response.body", "body": b"chunk-%04d" % i, "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/stream-boom":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"chunk-0000", "more_body": True})
            raise RuntimeError("the stream failed after it started")
        elif path == "/no-content":
            await respond(204, [(b"x-done", b"1")], b"")
        elif path == "/not-modified":
            await respond(304, [(b"etag", b'"v1"')], b"")
        elif path == "/echo":
            await respond(200, [(b"content-type", b"application/octet-stream")], body)
        else:
            await respond(200, [], b"ok")

    return app


def make_wsgi(calls: Calls) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        query = environ.get("QUERY_STRING", "")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        calls[path] += 1

        def respond(status: str, headers: list[tuple[bytes, bytes]], data: bytes) -> list[bytes]:
            start_response(status, [(k.decode(), v.decode()) for k, v in headers])
            return [data]

        if path == "/orders":
            return respond("201 Created", ORDER_HEADERS, _orders_body(calls))
        if path == "/client-error":
            return respond(
                "404 Not Found", [(b"content-type", b"application/json")], b'{"error":"nope"}'
            )
        if path == "/server-error":
            return respond("503 Service Unavailable", [], b"down")
        if path == "/rate-limited":
            return respond("429 Too Many Requests", [], b"slow down")
        if path == "/boom":
            raise RuntimeError("handler failed")
        if path == "/slow":
            time.sleep(_number(query, "s", 0.5))
            return respond("200 OK", [(b"content-type", b"text/plain")], b"slow done")
        if path == "/stream":
            status = int(_number(query, "status", 200))
            start_response(f"{status} Status", [])
            count = int(_number(query, "n", 5))

            def chunks() -> Iterator[bytes]:
                for i in range(count):
                    yield b"chunk-%04d" % i

            return chunks()
        if path == "/stream-boom":
            start_response("200 OK", [])

            def failing() -> Iterator[bytes]:
                yield b"chunk-0000"
                raise RuntimeError("the stream failed after it started")

            return failing()
        if path == "/no-content":
            return respond("204 No Content", [(b"x-done", b"1")], b"")
        if path == "/not-modified":
            return respond("304 Not Modified", [(b"etag", b'"v1"')], b"")
        if path == "/echo":
            return respond("200 OK", [(b"content-type", b"application/octet-stream")], body)
        return respond("200 OK", [], b"ok")

    return app
