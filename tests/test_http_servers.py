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
def running(server: str, env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    if server == "uvicorn":
        command = [
            sys.executable, "-m", "uvicorn", "http_apps.server_app:asgi_app",
            "--workers", "2", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "gunicorn", "http_apps.server_app:wsgi_app",
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
        "ONCELY_HTTP_STORE": url,
        "ONCELY_HTTP_STORE_OPTIONS": json.dumps(options),
        "ONCELY_HTTP_LOG": str(executions),
        "ONCELY_HTTP_SLEEP": "0.4",
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
