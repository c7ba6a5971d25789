"""A request body sent without Content-Length (``Transfer-Encoding: chunked``) under WSGI.

Red-team input (session brief, item 3): the WSGI middleware read such a body as empty, so the
fingerprint ignored it and a different payload under the same key replayed the first response
instead of 422. Where the server ends the stream (``wsgi.input_terminated``: Gunicorn,
Werkzeug) the body is read to its end; where it gives no way to (``wsgiref``; Django under any
WSGI server, which reads no further than ``CONTENT_LENGTH``) the request is refused with
``411 request-length-required`` before anything is claimed.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncely.http import GLOBAL, IdempotencyConfig, WSGIIdempotencyMiddleware
from oncely.stores.memory import MemoryStore
from test_http_servers import DJANGO, TESTS, django_env, free_port, running, server_env

from conftest import StoreFactory
from http_apps.raw import make_wsgi

pytestmark = pytest.mark.timeout(90)


def chunked(*parts: bytes) -> Iterator[bytes]:
    """An iterable body: httpx sends it with ``Transfer-Encoding: chunked``, no length."""
    yield from parts


def two_payloads(base: str, path: str) -> tuple[httpx.Response, ...]:
    headers = {
        "Idempotency-Key": f'"{uuid.uuid4()}"',
        "Authorization": "Bearer alice",
        "Content-Type": "application/json",
    }
    with httpx.Client(base_url=base, timeout=30) as client:
        first = client.post(path, headers=headers, content=chunked(b'{"amount":', b" 1}"))
        same = client.post(path, headers=headers, content=chunked(b'{"amount": 1}'))
        other = client.post(path, headers=headers, content=chunked(b'{"amount": 2}'))
    return first, same, other


@contextmanager
def serving(command: list[str], env: dict[str, str], base: str) -> Iterator[str]:
    process = subprocess.Popen(
        command,
        cwd=TESTS,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"{command} exited"
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"{command} did not start"
                time.sleep(0.1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)


def _executions(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_gunicorn_reads_a_chunked_body_to_its_end(make_store: StoreFactory, tmp_path: Path) -> None:
    _, url, options = make_store("sqlite")
    executions = tmp_path / "executions.log"
    with running("gunicorn", server_env(url, options, executions), tmp_path) as base:
        first, same, other = two_payloads(base, "/orders")
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    assert same.headers.get("idempotent-replayed") == "true"
    assert other.status_code == 422, other.text
    assert len(_executions(executions)) == 1


SERVERS = {
    # Werkzeug's development server de-chunks and sets wsgi.input_terminated.
    "werkzeug": (
        "from werkzeug.serving import run_simple; import http_apps.server_app as a; "
        "run_simple('127.0.0.1', {port}, a.wsgi_app, threaded=True)"
    ),
    # wsgiref hands the raw socket over: no way to find the end of a chunked body.
    "wsgiref": (
        "from wsgiref.simple_server import make_server; import http_apps.server_app as a; "
        "make_server('127.0.0.1', {port}, a.wsgi_app).serve_forever()"
    ),
}


@pytest.mark.parametrize("server", list(SERVERS))
def test_other_wsgi_servers_read_the_body_or_refuse_it(
    server: str, make_store: StoreFactory, tmp_path: Path
) -> None:
    _, url, options = make_store("sqlite")
    executions = tmp_path / "executions.log"
    port = free_port()
    command = [sys.executable, "-c", SERVERS[server].format(port=port)]
    env = server_env(url, options, executions)
    with serving(command, env, f"http://127.0.0.1:{port}") as base:
        first, same, other = two_payloads(base, "/orders")
        with httpx.Client(base_url=base, timeout=30) as client:
            sized = client.post(
                "/orders",
                headers={"Idempotency-Key": f'"{uuid.uuid4()}"', "Authorization": "Bearer a"},
                content=b'{"amount": 1}',
            )
    assert sized.status_code == 201  # a body with Content-Length works on every server
    if server == "werkzeug":
        assert first.status_code == 201 and same.headers.get("idempotent-replayed") == "true"
        assert other.status_code == 422, other.text
        assert len(_executions(executions)) == 2
    else:
        for reply in (first, same, other):
            assert reply.status_code == 411, reply.text
            assert reply.headers["content-type"] == "application/problem+json"
            assert reply.json()["type"].endswith("/request-length-required")
        assert len(_executions(executions)) == 1  # only the sized request ran


@pytest.mark.parametrize("server", ["gunicorn", "werkzeug"])
def test_a_flask_view_reads_the_chunked_body_oncely_read(
    server: str, make_store: StoreFactory, tmp_path: Path
) -> None:
    """Red-team finding: the middleware buffered the body and set CONTENT_LENGTH but left
    ``Transfer-Encoding: chunked``, so Werkzeug ignored the length and the view read nothing
    (a 400 from ``get_json``, stored and replayed to every retry)."""
    _, url, options = make_store("sqlite")
    executions = tmp_path / "executions.log"
    env = server_env(url, options, executions)
    if server == "gunicorn":
        context = running("gunicorn", env, tmp_path)
    else:
        port = free_port()
        command = [sys.executable, "-c", SERVERS["werkzeug"].format(port=port)]
        context = serving(command, env, f"http://127.0.0.1:{port}")
    with context as base:
        first, same, other = two_payloads(base, "/echo")
    assert first.status_code == 201, first.text
    assert first.json() == {"body": '{"amount": 1}', "json": {"amount": 1}}
    assert same.headers.get("idempotent-replayed") == "true" and same.json() == first.json()
    assert other.status_code == 422, other.text
    assert len(_executions(executions)) == 1


def test_django_under_gunicorn_refuses_a_chunked_body(tmp_path: Path) -> None:
    """Django's WSGI request reads no further than CONTENT_LENGTH: the view would get an empty
    body, so two different chunked payloads would look the same."""
    env = django_env("django", {}, tmp_path, "0")
    with running("gunicorn", env, tmp_path, DJANGO["gunicorn"]) as base:
        first, _, other = two_payloads(base, "/orders")
    assert first.status_code == 411 and other.status_code == 411, first.text
    assert first.json()["type"].endswith("/request-length-required")


def test_django_under_uvicorn_reads_a_chunked_body(tmp_path: Path) -> None:
    env = django_env("django", {}, tmp_path, "0")
    with running("uvicorn", env, tmp_path, DJANGO["uvicorn"]) as base:
        first, same, other = two_payloads(base, "/orders")
    assert first.status_code == 201 and same.headers.get("idempotent-replayed") == "true"
    assert other.status_code == 422, other.text


# -- in process: every combination of the environ keys ------------------------------------------
def call(app: Any, environ: dict[str, Any]) -> tuple[str, bytes]:
    status: list[str] = []

    def start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
        status.append(line)
        return lambda data: None

    body = b"".join(app(environ, start_response))
    return status[0], body


def environ_for(body: bytes, key: str, **extra: Any) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/orders",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "CONTENT_TYPE": "application/json",
        "HTTP_IDEMPOTENCY_KEY": f'"{key}"',
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        **extra,
    }


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True}, "422"),
        ({"HTTP_TRANSFER_ENCODING": "chunked"}, "411"),
        ({"HTTP_TRANSFER_ENCODING": "gzip, chunked"}, "411"),
    ],
)
def test_the_wsgi_middleware_reads_or_refuses_an_unsized_body(
    extra: dict[str, Any], expected: str
) -> None:
    calls: Counter[str] = Counter()
    app = WSGIIdempotencyMiddleware(
        make_wsgi(calls), IdempotencyConfig(store=MemoryStore(), scope=GLOBAL)
    )
    key = str(uuid.uuid4())
    first, _ = call(app, environ_for(b'{"amount": 1}', key, **extra))
    second, body = call(app, environ_for(b'{"amount": 2}', key, **extra))
    assert second.startswith(expected), (second, body[:200])
    if expected == "411":
        assert first.startswith("411") and calls["/orders"] == 0
    else:
        assert first.startswith("201") and calls["/orders"] == 1


def _flask_echo() -> Any:
    from flask import Flask, jsonify, request

    app = Flask(__name__)

    @app.post("/orders")
    def orders() -> Any:
        return jsonify(body=request.get_data(as_text=True)), 201

    return app


def _django_echo() -> Any:
    from django.core.handlers.wsgi import WSGIHandler
    from django.http import JsonResponse
    from django.urls import path
    from django.views.decorators.csrf import csrf_exempt

    from http_apps import django_site  # noqa: F401  (configures Django)

    def orders(request: Any) -> Any:
        return JsonResponse({"body": request.body.decode()}, status=201)

    urls = type("urls", (), {"urlpatterns": [path("orders", csrf_exempt(orders))]})
    handler = WSGIHandler()
    return handler, urls


@pytest.mark.parametrize("framework", ["flask", "django"])
def test_every_wsgi_framework_reads_the_body_the_middleware_read(framework: str) -> None:
    """A de-chunked body (``Transfer-Encoding: chunked`` + ``wsgi.input_terminated``, as
    Gunicorn and Werkzeug hand it over) reaches the view whole behind
    :class:`WSGIIdempotencyMiddleware`, whatever the framework reads the environ by."""
    import json

    settings: Any = contextlib.nullcontext()
    if framework == "flask":
        inner = _flask_echo().wsgi_app
    else:
        from django.test import override_settings

        inner, urls = _django_echo()
        settings = override_settings(ROOT_URLCONF=urls, MIDDLEWARE=[])
    app = WSGIIdempotencyMiddleware(inner, IdempotencyConfig(store=MemoryStore(), scope=GLOBAL))
    extra = {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True}
    with settings:
        environ = environ_for(b'{"amount": 1}', str(uuid.uuid4()), **extra)
        environ.update(SERVER_NAME="t", SERVER_PORT="80", SERVER_PROTOCOL="HTTP/1.1")
        status, body = call(app, environ)
    assert status.startswith("201"), (status, body[:300])
    assert json.loads(body) == {"body": '{"amount": 1}'}
    assert "HTTP_TRANSFER_ENCODING" not in environ and environ["CONTENT_LENGTH"] == "13"
