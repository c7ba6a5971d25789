"""Real servers, real stores: 50 simultaneous identical requests run the handler exactly once.

Uvicorn (ASGI face) and Gunicorn (WSGI face) each run two worker processes on a free loopback
port, sharing one Redis, PostgreSQL or SQLite store. Executions are counted in a file every
worker appends to, so the count survives processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import SHARED_KINDS, StoreFactory

TESTS = Path(__file__).parent
ROOT = TESTS.parent
pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(
    server: str, env: dict[str, str], tmp_path: Path, app: str | None = None
) -> Iterator[str]:
    port = free_port()
    default = "asgi_app" if server == "uvicorn" else "wsgi_app"
    target = app if app is not None and ":" in app else f"http_apps.server_app:{app or default}"
    if server == "uvicorn":
        command = [
            sys.executable, "-m", "uvicorn", target,
            "--workers", "2", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "gunicorn", target,
            "--workers", "2", "--worker-class", "gthread", "--threads", "16",
            "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
        ]  # fmt: skip
    log = open(tmp_path / f"{server}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        command, cwd=TESTS, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        pids: set[str] = set()
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"{server} exited: {(tmp_path / f'{server}.log').read_text()}")
            try:
                pids.add(httpx.get(base + "/health", timeout=1).text)
                if len(pids) >= 1:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail(f"{server} did not start")
        time.sleep(0.5)  # let the second worker come up too
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.close()


async def fire(base: str, count: int, key: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *[
                client.post(
                    "/orders", content=b'{"item": "book"}', headers={"Idempotency-Key": key}
                )
                for _ in range(count)
            ]
        )


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_50_simultaneous_identical_requests_run_the_handler_once(
    server: str, kind: str, make_store: StoreFactory, tmp_path: Path
) -> None:
    store, url, options = make_store(kind)
    store.init_schema()
    options = {**options, "create_schema": False} if kind == "postgres" else options
    executions = tmp_path / "executions.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")]),
        "SERVER_APP_STORE": url,
        "SERVER_APP_STORE_OPTIONS": json.dumps(options),
        "SERVER_APP_LOG": str(executions),
        "SERVER_APP_SLEEP": "0.4",
    }
    key = f'"{uuid.uuid4()}"'
    with running(server, env, tmp_path) as base:
        replies = asyncio.run(fire(base, 50, key))
        later = asyncio.run(fire(base, 10, key))
    lines = executions.read_text().split()
    assert len(lines) == 1, lines
    originals = [
        r for r in replies if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    replays = [r for r in replies if r.headers.get("idempotent-replayed") == "true"]
    in_flight = [r for r in replies if r.status_code == 409]
    assert len(originals) == 1
    assert in_flight, "no request overlapped the first one; the test proves nothing"
    assert len(originals) + len(replays) + len(in_flight) == 50, [r.status_code for r in replies]
    assert all(r.status_code == 201 and r.json() == originals[0].json() for r in replays)
    assert all(r.headers["content-type"] == "application/problem+json" for r in in_flight)
    assert all(r.headers["retry-after"] == "1" for r in in_flight)
    assert all(r.status_code == 201 and r.headers["idempotent-replayed"] == "true" for r in later)
    assert all(r.headers["location"] == "/orders/1" for r in [*replays, *later])


def server_env(url: str, options: dict[str, object], executions: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")]),
        "SERVER_APP_STORE": url,
        "SERVER_APP_STORE_OPTIONS": json.dumps(options),
        "SERVER_APP_LOG": str(executions),
        "SERVER_APP_SLEEP": "0",
    }


def hang_up_and_retry(
    client: httpx.Client, path: str, headers: dict[str, str], after: int = 3000
) -> httpx.Response:
    """POST ``path``, hang up after ``after`` bytes of the streamed 2xx, then retry with the
    same headers until the first request has settled (no longer 409 in flight)."""
    with client.stream("POST", path, headers=headers) as response:
        assert response.is_success, response.status_code
        got = 0
        for chunk in response.iter_raw():
            got += len(chunk)
            if got >= after:
                break
    # the connection is closed mid-body; let the server notice and settle the key
    deadline = time.monotonic() + 20
    while True:
        again = client.post(path, headers=headers)
        if again.status_code != 409 or "in-flight" not in again.json()["type"]:
            return again
        assert time.monotonic() < deadline, "the first request never settled"
        time.sleep(0.1)


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_a_client_gone_mid_stream_does_not_run_the_handler_again(
    server: str, make_store: StoreFactory, tmp_path: Path
) -> None:
    # Issue 7 item 2 on real servers: the client reads a little of a streamed response and
    # hangs up; the retry gets 409 response-not-replayable, not a second run.
    _, url, options = make_store("redis")
    executions = tmp_path / "executions.log"
    headers = {"Idempotency-Key": f'"{uuid.uuid4()}"', "Authorization": "Bearer alice"}
    env = server_env(url, options, executions)
    with running(server, env, tmp_path) as base, httpx.Client(base_url=base, timeout=30) as client:
        again = hang_up_and_retry(client, "/report", headers, after=200)
    assert again.status_code == 409, again.text[:200]
    assert again.json()["type"].endswith("/response-not-replayable")
    assert again.json()["original_status"] == 200
    assert executions.read_text().split() and len(executions.read_text().split()) == 1


@pytest.mark.parametrize(
    ("server", "app", "path", "refused", "fixed"),
    [
        ("uvicorn", "fastapi_app", "/pay", {"json": {"amount": "five"}}, {"json": {"amount": 5}}),
        ("gunicorn", "wsgi_app", "/guarded", {}, {"headers": {"X-Csrf": "ok"}}),
    ],
    ids=["fastapi-validation", "flask-before-request"],
)
def test_a_request_refused_before_the_handler_does_not_use_up_the_key(
    server: str,
    app: str,
    path: str,
    refused: dict[str, object],
    fixed: dict[str, Any],
    make_store: StoreFactory,
    tmp_path: Path,
) -> None:
    # Issue 7 item 14 on real servers.
    _, url, options = make_store("redis")
    executions = tmp_path / "executions.log"
    key = {"Idempotency-Key": f'"{uuid.uuid4()}"', "Authorization": "Bearer alice"}
    env = server_env(url, options, executions)
    with (
        running(server, env, tmp_path, app) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        first = client.post(path, headers=key, **refused)  # type: ignore[arg-type]
        assert first.status_code in (403, 422), first.text
        assert "idempotent-replayed" not in first.headers
        headers = {**key, **fixed.get("headers", {})}
        body = {k: v for k, v in fixed.items() if k != "headers"}
        second = client.post(path, headers=headers, **body)
        third = client.post(path, headers=headers, **body)
    assert second.status_code == 201 and "idempotent-replayed" not in second.headers
    assert third.status_code == 201 and third.headers["idempotent-replayed"] == "true"
    assert len(executions.read_text().split()) == 1


# -- Django under real servers (issue 14 item 1) --------------------------------------------------
DJANGO = {"gunicorn": "http_apps.django_server:wsgi", "uvicorn": "http_apps.django_server:asgi"}


def django_env(
    store: str, options: dict[str, object], tmp_path: Path, sleep: str
) -> dict[str, str]:
    """The environment of the Django project; with ``store="django"`` the project's own
    database (a SQLite file) holds the records, its table made by ``migrate``."""
    env = {
        **server_env(store, options, tmp_path / "executions.log"),
        "DJANGO_SETTINGS_MODULE": "http_apps.django_project",
        "ONCELY_DJANGO_DB": str(tmp_path / "project.sqlite3"),
        "SERVER_APP_SLEEP": sleep,
    }
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--verbosity", "0"],
        cwd=TESTS, env=env, check=True, timeout=60,
    )  # fmt: skip
    return env


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
@pytest.mark.parametrize("kind", ["django", "redis"])
def test_django_50_simultaneous_identical_requests_run_the_view_once(
    server: str, kind: str, make_store: StoreFactory, tmp_path: Path
) -> None:
    if kind == "django":
        url, options = "django", {}
    else:
        _, url, options = make_store(kind)
    env = django_env(url, options, tmp_path, "0.4")
    key = f'"{uuid.uuid4()}"'
    with running(server, env, tmp_path, DJANGO[server]) as base:
        replies = asyncio.run(fire(base, 50, key))
        later = asyncio.run(fire(base, 10, key))
    lines = (tmp_path / "executions.log").read_text().split("\n")
    assert len([line for line in lines if line.startswith("orders")]) == 1, lines
    originals = [
        r for r in replies if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    in_flight = [r for r in replies if r.status_code == 409]
    replays = [r for r in [*replies, *later] if r.headers.get("idempotent-replayed") == "true"]
    assert len(originals) == 1 and in_flight, [r.status_code for r in replies]
    assert len(originals) + len(in_flight) + len(replays) == 60
    assert all(r.json() == originals[0].json() for r in replays)
    assert all(r.headers["location"] == "/orders/1" for r in replays)
    assert all(r.json()["type"].endswith("/request-in-flight") for r in in_flight)


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_django_csrf_refusal_and_a_client_gone_mid_stream(
    server: str, make_store: StoreFactory, tmp_path: Path
) -> None:
    # The CSRF 403 comes before the view: the key is not used up. A client that hangs up in
    # the middle of a streamed response: the retry gets 409 response-not-replayable.
    _, url, options = make_store("redis")
    env = django_env(url, options, tmp_path, "0")
    auth = {"Authorization": "Bearer alice"}
    with (
        running(server, env, tmp_path, DJANGO[server]) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        key = {**auth, "Idempotency-Key": f'"{uuid.uuid4()}"'}
        refused = client.post("/comment", headers=key)
        token = client.get("/csrf")
        fixed = {**key, "X-CSRFToken": token.json()["token"]}
        client.cookies.set("csrftoken", token.cookies["csrftoken"])
        made = client.post("/comment", headers=fixed)
        again = client.post("/comment", headers=fixed)

        key = {**auth, "Idempotency-Key": f'"{uuid.uuid4()}"'}
        view = "report" if server == "gunicorn" else "areport"
        retry = hang_up_and_retry(client, f"/{view}?n=400&pause=0.005", key)
    assert refused.status_code == 403 and "idempotent-replayed" not in refused.headers
    assert made.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert retry.status_code == 409, retry.text[:300]
    assert retry.json()["type"].endswith("/response-not-replayable")
    lines = (tmp_path / "executions.log").read_text().split()
    assert lines.count("comment") == 1 and lines.count(view) == 1
