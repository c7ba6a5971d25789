"""Conditional requests (oncely.http.conditional): If-Match parsing per RFC 9110, and the
412 / 428 / 200 + ETag contract on Starlette, FastAPI, Flask and Django, with the version kept
in a real SQLite table and written by versioned_update (concurrent PUTs: one wins, the rest
get 412)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request as FastAPIRequest

from oncely.errors import InvalidIfMatch, PreconditionFailed, PreconditionRequired
from oncely.http.conditional import (
    ConditionalMiddleware,
    EntityTag,
    IfMatch,
    etag,
    if_match,
    parse_if_match,
    version_of,
)
from oncely.sql import versioned_update

PROBLEM = "application/problem+json"


# -- the header, sans-IO --------------------------------------------------------------------------
def test_etag_is_a_strong_validator_of_the_version() -> None:
    assert etag(7) == '"7"' and version_of('"7"') == 7 and version_of("7") == 7
    assert version_of('"07"') is None and version_of('"x"') is None
    with pytest.raises(Exception):  # noqa: B017
        etag(-1)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (['"7"'], IfMatch(False, (EntityTag("7"),))),
        (['"6", "7"'], IfMatch(False, (EntityTag("6"), EntityTag("7")))),
        (['"6"', '"7"'], IfMatch(False, (EntityTag("6"), EntityTag("7")))),  # two field lines
        (['W/"7"'], IfMatch(False, (EntityTag("7", weak=True),))),
        (["*"], IfMatch(True)),
        ([" * "], IfMatch(True)),
        ([b'"a", ,W/"b"'], IfMatch(False, (EntityTag("a"), EntityTag("b", weak=True)))),
        ([], None),
        ([""], None),
    ],
)
def test_parse_if_match(values: list[Any], expected: IfMatch | None) -> None:
    assert parse_if_match(values) == expected


@pytest.mark.parametrize(
    "bad", ["7", '"7', '"7" "8"', '*, "7"', "W/7", '"a b"', ",", '"7";x', "x" * 9000]
)
def test_malformed_if_match_is_invalid(bad: str) -> None:
    with pytest.raises(InvalidIfMatch) as info:
        parse_if_match([bad])
    assert info.value.status == 400


def test_matching_is_strong_and_star_needs_a_resource() -> None:
    single = parse_if_match(['"7"'])
    assert single is not None and single.version == 7 and single.matches(7)
    assert not single.matches(8) and not single.matches(None)
    weak = parse_if_match(['W/"7"'])
    assert weak is not None and weak.version is None and not weak.matches(7)  # RFC 9110 §13.1.1
    listed = parse_if_match(['"6", "7"'])
    assert listed is not None and listed.version is None and listed.matches(7)
    star = parse_if_match(["*"])
    assert star is not None and star.matches(1) and not star.matches(None)
    assert star.check(3) == 3
    with pytest.raises(PreconditionFailed) as info:
        listed.check(9)
    assert info.value.status == 412 and info.value.extra["current_etag"] == '"9"'
    with pytest.raises(PreconditionFailed):
        star.check(None)


def test_if_match_helper_reads_scopes_and_environs() -> None:
    scope = {"type": "http", "headers": [(b"if-match", b'"3"')]}
    assert if_match(scope).version == 3
    assert if_match({"HTTP_IF_MATCH": "*"}).any
    with pytest.raises(PreconditionRequired):
        if_match({"REQUEST_METHOD": "PUT"})
    with pytest.raises(Exception):  # noqa: B017
        if_match(42)


# -- one versioned resource in a real SQLite table --------------------------------------------
class Docs:
    """``docs(id, body, version)`` in a SQLite file; each call opens its own connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self.connect() as conn:
            conn.execute(
                "CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT, "
                "version INTEGER NOT NULL DEFAULT 1)"
            )
            conn.execute("INSERT INTO docs (id, body) VALUES (1, 'first')")

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get(self, doc_id: int) -> tuple[str, int] | None:
        with self.connect() as conn:
            row = conn.execute("SELECT body, version FROM docs WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def put(self, doc_id: int, condition: IfMatch | None, body: str) -> int:
        """The handler's logic, the same on every framework (``condition`` None: a request
        without If-Match, written against version 1)."""
        conn = self.connect()
        try:
            expected = 1 if condition is None else condition.version
            if expected is None and condition is not None:
                # '*' or a list: decide on the version read now ...
                found = self.get(doc_id)
                expected = condition.check(None if found is None else found[1], f"doc {doc_id}")
            # ... and let the UPDATE decide atomically (StaleVersion -> 412)
            new = versioned_update(conn, "docs", doc_id, {"body": body}, expected)
            conn.commit()
            return new
        finally:
            conn.close()


@pytest.fixture
def docs(tmp_path: Path) -> Docs:
    return Docs(tmp_path / "docs.db")


def _check_contract(client: Any, docs: Docs) -> None:
    """The same assertions for every framework's client (sync httpx-like)."""
    got = client.get("/docs/1")
    assert got.status_code == 200 and got.headers["etag"] == '"1"'
    # 428 without If-Match; nothing written
    missing = client.put("/docs/1", content=b"x")
    assert missing.status_code == 428
    assert missing.headers["content-type"] == PROBLEM
    assert missing.json()["type"].endswith("/precondition-required")
    # 400 for a malformed one
    bad = client.put("/docs/1", content=b"x", headers={"If-Match": "1"})
    assert bad.status_code == 400 and bad.json()["type"].endswith("/if-match-invalid")
    # 200 with the new ETag
    ok = client.put("/docs/1", content=b"second", headers={"If-Match": '"1"'})
    assert ok.status_code == 200 and ok.headers["etag"] == '"2"'
    # 412 for the stale tag, with the current one in the problem
    stale = client.put("/docs/1", content=b"lost", headers={"If-Match": '"1"'})
    assert stale.status_code == 412 and stale.headers["content-type"] == PROBLEM
    assert stale.json()["type"].endswith("/precondition-failed")
    assert stale.json()["current_etag"] == '"2"'
    # a weak tag never matches; a list and '*' do
    weak = client.put("/docs/1", content=b"lost", headers={"If-Match": 'W/"2"'})
    assert weak.status_code == 412
    listed = client.put("/docs/1", content=b"third", headers={"If-Match": '"1", "2"'})
    assert listed.status_code == 200 and listed.headers["etag"] == '"3"'
    star = client.put("/docs/1", content=b"fourth", headers={"If-Match": "*"})
    assert star.status_code == 200 and star.headers["etag"] == '"4"'
    gone = client.put("/docs/2", content=b"x", headers={"If-Match": "*"})
    assert gone.status_code == 412
    # a single tag names a row that does not exist (never created, or deleted since it was
    # read): versioned_update raises NotFound, which is 412 with If-Match (RFC 9110 §13.1.1) ...
    deleted = client.put("/docs/2", content=b"x", headers={"If-Match": '"1"'})
    assert deleted.status_code == 412, deleted.text
    assert deleted.headers["content-type"] == PROBLEM
    assert deleted.json()["type"].endswith("/precondition-failed")
    # ... and 404 without it (POST needs no If-Match here)
    absent = client.post("/docs/2", content=b"x")
    assert absent.status_code == 404, absent.text
    assert absent.headers["content-type"] == PROBLEM
    assert absent.json()["type"].endswith("/not-found")
    assert docs.get(1) == ("fourth", 4) and docs.get(2) is None


# -- Starlette (ASGI middleware) ----------------------------------------------------------------
def _starlette_app(docs: Docs) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    def read(request: Request) -> Response:
        found = docs.get(int(request.path_params["id"]))
        if found is None:
            return Response(status_code=404)
        return Response(found[0], headers={"ETag": etag(found[1])})

    async def write(request: Request) -> Response:
        body = (await request.body()).decode()
        doc_id = int(request.path_params["id"])
        condition = if_match(request) if request.method == "PUT" else None
        new = await asyncio.to_thread(docs.put, doc_id, condition, body)
        return Response(body, headers={"ETag": etag(new)})

    app = Starlette(
        routes=[
            Route("/docs/{id}", read, methods=["GET"]),
            Route("/docs/{id}", write, methods=["PUT", "POST"]),
        ]
    )
    app.add_middleware(ConditionalMiddleware, paths=("/docs/",))
    return app


@pytest.fixture
def starlette_client(docs: Docs) -> Iterator[Any]:
    from starlette.testclient import TestClient

    with TestClient(_starlette_app(docs)) as client:
        yield client


def test_starlette(starlette_client: Any, docs: Docs) -> None:
    _check_contract(starlette_client, docs)


async def test_concurrent_puts_with_one_etag_one_wins(docs: Docs) -> None:
    transport = httpx.ASGITransport(app=_starlette_app(docs))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = await asyncio.gather(
            *(
                client.put("/docs/1", content=f"w{i}".encode(), headers={"If-Match": '"1"'})
                for i in range(20)
            )
        )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [412] * 19
    winner = next(a for a in answers if a.status_code == 200)
    assert docs.get(1) == (winner.text, 2)


def test_unprotected_paths_and_safe_methods_pass(docs: Docs) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/{p:path}", ok, methods=["GET", "PUT", "POST"])])
    app.add_middleware(ConditionalMiddleware, paths=("/docs/",))
    with TestClient(app) as client:
        assert client.put("/other").status_code == 200
        assert client.post("/docs/1").status_code == 200  # POST creates: not required
        assert client.get("/docs/1").status_code == 200
        assert client.put("/docs/1").status_code == 428


# -- FastAPI ------------------------------------------------------------------------------------
def test_fastapi(docs: Docs) -> None:
    from fastapi import FastAPI, Response
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.add_middleware(ConditionalMiddleware, paths=("/docs/",))

    @app.get("/docs/{doc_id}")
    def read(doc_id: int) -> Response:
        found = docs.get(doc_id)
        assert found is not None
        return Response(found[0], headers={"ETag": etag(found[1])})

    @app.put("/docs/{doc_id}")
    async def write(doc_id: int, request: FastAPIRequest) -> Response:
        body = (await request.body()).decode()
        new = docs.put(doc_id, if_match(request), body)
        return Response(body, headers={"ETag": etag(new)})

    @app.post("/docs/{doc_id}")
    async def create(doc_id: int, request: FastAPIRequest) -> Response:
        new = docs.put(doc_id, None, (await request.body()).decode())
        return Response(status_code=201, headers={"ETag": etag(new)})

    with TestClient(app) as client:
        _check_contract(client, docs)


# -- Flask --------------------------------------------------------------------------------------
def test_flask(docs: Docs) -> None:
    from flask import Flask, request

    from oncely.http.flask import conditional

    app = Flask(__name__)

    @app.get("/docs/<int:doc_id>")
    def read(doc_id: int) -> Any:
        found = docs.get(doc_id)
        return found[0], 200, {"ETag": etag(found[1])}  # type: ignore[index]

    @app.route("/docs/<int:doc_id>", methods=["PUT", "POST"])
    def write(doc_id: int) -> Any:
        body = request.get_data(as_text=True)
        condition = if_match(request) if request.method == "PUT" else None
        new = docs.put(doc_id, condition, body)
        return body, 200, {"ETag": etag(new)}

    conditional(app, paths=("/docs/",))
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
        _check_contract(client, docs)


# -- Django -------------------------------------------------------------------------------------
_DJANGO_DOCS: list[Docs] = []


def _django_read(request: Any, doc_id: int) -> Any:
    from django.http import HttpResponse

    found = _DJANGO_DOCS[-1].get(doc_id)
    response = HttpResponse(found[0])  # type: ignore[index]
    response["ETag"] = etag(found[1])  # type: ignore[index]
    return response


def _django_view(request: Any, doc_id: int) -> Any:
    from django.http import HttpResponse

    if request.method == "GET":
        return _django_read(request, doc_id)
    body = request.body.decode()
    condition = if_match(request) if request.method == "PUT" else None
    new = _DJANGO_DOCS[-1].put(doc_id, condition, body)
    response = HttpResponse(body)
    response["ETag"] = etag(new)
    return response


def test_django(docs: Docs) -> None:
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings
    from django.urls import path
    from django.views.decorators.csrf import csrf_exempt

    from http_apps import django_site  # noqa: F401  (configures Django)

    urlconf = type(
        "urls", (), {"urlpatterns": [path("docs/<int:doc_id>", csrf_exempt(_django_view))]}
    )
    _DJANGO_DOCS.append(docs)
    with override_settings(
        ROOT_URLCONF=urlconf,
        MIDDLEWARE=["oncely.http.django.ConditionalMiddleware"],
        ONCELY_CONDITIONAL={"paths": ["/docs/"]},
    ):
        handler = WSGIHandler()
        with httpx.Client(transport=httpx.WSGITransport(app=handler), base_url="http://t") as c:
            _check_contract(c, docs)


def test_django_rejects_unknown_options() -> None:
    from django.test import override_settings

    from oncely.errors import ConfigurationError
    from oncely.http.django import ConditionalMiddleware as DjangoConditional

    from http_apps import django_site  # noqa: F401

    with (
        override_settings(ONCELY_CONDITIONAL={"path": ["/docs/"]}),
        pytest.raises(ConfigurationError, match="unknown"),
    ):
        DjangoConditional(lambda r: None)


def test_wsgi_threads_race_one_winner(docs: Docs) -> None:
    """A real WSGI server (wsgiref, one thread per request) with the Flask face."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from flask import Flask, request

    from oncely.http.flask import conditional

    class Threaded(WSGIServer):
        # socketserver's default listen backlog is 5: a burst of 16 connects overflows it and
        # a dropped SYN is retried a second later (a CI run lost one request that way).
        request_queue_size = 64

        def process_request(self, req: Any, addr: Any) -> None:
            threading.Thread(target=self._serve, args=(req, addr), daemon=True).start()

        def _serve(self, req: Any, addr: Any) -> None:
            try:
                self.finish_request(req, addr)
            finally:
                self.shutdown_request(req)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    app = Flask(__name__)

    @app.put("/docs/<int:doc_id>")
    def write(doc_id: int) -> Any:
        new = docs.put(doc_id, if_match(request), request.get_data(as_text=True))
        return "ok", 200, {"ETag": etag(new)}

    conditional(app)
    server = make_server("127.0.0.1", 0, app, server_class=Threaded, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/docs/1"
        barrier = threading.Barrier(16)
        statuses: list[int] = []
        errors: list[BaseException] = []

        def client(i: int) -> None:
            barrier.wait()
            try:
                r = httpx.put(
                    url, content=f"w{i}".encode(), headers={"If-Match": '"1"'}, timeout=30
                )
            except BaseException as exc:  # a client that got no answer is a failure to show
                errors.append(exc)
                raise
            statuses.append(r.status_code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.shutdown()
        server.server_close()
    assert errors == []
    assert sorted(statuses) == [200] + [412] * 15
    assert docs.get(1)[1] == 2  # type: ignore[index]
