"""``oncely probe``: passes on the demo shop, and catches a deliberately broken implementation
and the shop with oncely switched off."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from oncely.demo.probe import FAIL, PASS, ProbeConfig, probe
from oncely.demo.service import Service, free_port
from oncely.demo.shop.settings import Settings

pytestmark = pytest.mark.slow


def _shop(tmp_path: Path, protected: bool) -> Service:
    settings = Settings(
        workdir=tmp_path / "shop",
        protected=protected,
        run=secrets.token_hex(4),
        secret=secrets.token_urlsafe(32),
    )
    return Service(settings, settlers=0)


def _outcomes(url: str) -> dict[str, str]:
    return {c.name: c.outcome for c in probe(ProbeConfig(url=url, stuck_after=5.0))}


@pytest.mark.timeout(180)
def test_probe_passes_on_the_demo_shop(tmp_path: Path) -> None:
    with _shop(tmp_path, protected=True) as shop:
        outcomes = _outcomes(shop.url)
    assert FAIL not in outcomes.values(), outcomes
    for name in (
        "identical retry gets the stored response",
        "replay marked Idempotent-Replayed: true",
        "changed body under the same key: 422",
        "missing key where required: 400",
        "malformed key: 400",
        "errors are application/problem+json",
        "no replay across credentials",
        "Set-Cookie is not replayed",
        "failed handler: key not stuck",
    ):
        assert outcomes[name] == PASS, (name, outcomes)


@pytest.mark.timeout(180)
def test_probe_fails_the_shop_with_oncely_off(tmp_path: Path) -> None:
    with _shop(tmp_path, protected=False) as shop:
        outcomes = _outcomes(shop.url)
    for name in (
        "identical retry gets the stored response",
        "changed body under the same key: 422",
        "concurrent duplicate: 409, runs once",
        "missing key where required: 400",
    ):
        assert outcomes[name] == FAIL, (name, outcomes)


@pytest.fixture
def broken_url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config("demo_broken_app:app", host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the broken app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.timeout(120)
def test_probe_catches_a_broken_implementation(broken_url: str) -> None:
    outcomes = _outcomes(broken_url)
    assert outcomes["first request is processed"] == PASS
    assert outcomes["identical retry gets the stored response"] == PASS
    for name in (
        "changed body under the same key: 422",
        "concurrent duplicate: 409, runs once",
        "missing key where required: 400",
        "malformed key: 400",
        "no replay across credentials",
        "Set-Cookie is not replayed",
        "failed handler: key not stuck",
    ):
        assert outcomes[name] == FAIL, (name, outcomes)


def _orders_app(scope: object) -> Any:
    """An API with oncely over one ``POST /orders`` (201, a fresh order id), scoped by ``scope``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from oncely.http import IdempotencyConfig, IdempotencyMiddleware

    async def orders(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"order": secrets.token_hex(8)}, status_code=201)

    app = Starlette(routes=[Route("/orders", orders, methods=["GET", "POST"])])
    app.add_middleware(
        IdempotencyMiddleware, config=IdempotencyConfig(store="memory://", scope=scope)
    )
    return app


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.timeout(120)
def test_a_422_for_the_other_credential_is_a_shared_key_space_not_a_pass() -> None:
    """Red team round 8 (probe_global.py): with one key space for every client (scope=GLOBAL)
    the second credential's request under the first one's key is refused 422: evidence that
    the credentials share a key space, which the probe counted as "no replay: pass"."""
    from oncely.http import GLOBAL, scope_from_header

    with _serve(_orders_app(GLOBAL)) as url:
        checks = {c.name: c for c in probe(ProbeConfig(url=url, fail_header=None))}
    cross = checks["no replay across credentials"]
    assert cross.outcome == FAIL, cross
    assert cross.detail.startswith("422") and "share one key space" in cross.detail, cross
    # scoped by the credential, the other credential's request runs on its own: a pass
    with _serve(_orders_app(scope_from_header("Authorization"))) as url:
        checks = {c.name: c for c in probe(ProbeConfig(url=url, fail_header=None))}
    assert checks["no replay across credentials"].outcome == PASS, checks
    assert checks["client gone mid-request: key not stuck"].outcome == PASS, checks
