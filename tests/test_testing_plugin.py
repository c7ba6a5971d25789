"""The pytest plugin (``oncely.testing``), run the way users run it: inside pytest, by pytester.

Each test writes a small test file, runs pytest on it (the plugin is loaded through its
``pytest11`` entry point, as in a user's project) and checks the outcome. The helpers must fail
on code that is not idempotent, so several inner tests are expected to fail.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from oncely.errors import ConfigurationError
from oncely.testing import assert_runs_once

from conftest import POSTGRES_URL, REDIS_URL

pytest_plugins = ["pytester"]

INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"


@pytest.fixture(autouse=True)
def _ini(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)


def test_the_plugin_is_registered_by_its_entry_point(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--oncely-store=URL*"])
    pytester.makepyfile(
        """
        def test_fixtures(request):
            assert "oncely_store" in request.fixturenames or request.getfixturevalue("oncely_store")
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


ONCE = """
import asyncio, threading, uuid
import pytest
from oncely import idempotent
from oncely.testing import assert_runs_once


def test_threads(oncely_store):
    @idempotent(store=oncely_store, key=["order_id"])
    def charge(order_id: str) -> dict:
        return {"order": order_id}

    runs = assert_runs_once(charge, "o-1", concurrency=8)
    assert runs.executions == 1 and runs.results == [{"order": "o-1"}] * 8


def test_tasks(oncely_store):
    @idempotent(store=oncely_store, key=["order_id"])
    async def charge(order_id: str) -> str:
        await asyncio.sleep(0.05)
        return order_id

    assert assert_runs_once(charge, "o-2", concurrency=16, mode="tasks").results == ["o-2"] * 16


async def test_tasks_from_an_async_test(oncely_store):
    @idempotent(store=oncely_store, key=["order_id"])
    async def charge(order_id: str) -> str:
        return order_id

    assert_runs_once(charge, "o-3", concurrency=4, mode="tasks")


def test_watch_a_function_called_inside(oncely_store):
    @idempotent(store=oncely_store, key=["order_id"])
    def charge(order_id: str) -> str:
        return order_id

    def checkout(order_id: str) -> str:
        return charge(order_id).upper()

    assert assert_runs_once(checkout, "o-4", watch=charge).results == ["O-4"] * 8


def test_on_duplicate_raise_is_an_answer(oncely_store):
    gate = threading.Event()

    @idempotent(store=oncely_store, key=["order_id"], on_duplicate="raise")
    def charge(order_id: str) -> str:
        gate.wait(0.5)
        return order_id

    runs = assert_runs_once(charge, "o-5", concurrency=4)
    assert runs.executions == 1 and len(runs.results) + len(runs.errors) == 4
"""


def test_assert_runs_once_passes_for_idempotent_functions(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_once=ONCE)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=5)


BROKEN = """
import itertools, uuid
from oncely import idempotent
from oncely.testing import assert_runs_once

calls = itertools.count()


def test_a_key_that_differs_per_call(oncely_store):
    @idempotent(store=oncely_store, key=lambda order_id: f"{order_id}-{uuid.uuid4()}")
    def charge(order_id: str) -> str:
        return order_id

    assert_runs_once(charge, "o-1", concurrency=4)


def test_results_that_differ(oncely_store):
    # Same key, but a result the caller computes after the call: not what was stored.
    @idempotent(store=oncely_store, key=["order_id"])
    def charge(order_id: str) -> str:
        return order_id

    assert_runs_once(lambda o: (charge(o), next(calls)), "o-2", concurrency=4, watch=charge)


def test_an_error_that_releases_the_key(oncely_store):
    @idempotent(store=oncely_store, key=["order_id"])
    def charge(order_id: str) -> str:
        raise RuntimeError("gateway down")

    assert_runs_once(charge, "o-3", concurrency=4)
"""


def test_assert_runs_once_fails_for_code_that_runs_twice(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_broken=BROKEN)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: *charge ran 4 times for 4 concurrent calls (threads), expected "
            "exactly once*",
            "*callers got different results*",
        ]
    )
    assert "RuntimeError('gateway down')" in result.stdout.str()


PROCESSES = """
import os
from oncely import idempotent
from oncely.testing import assert_runs_once


@idempotent(key=["order_id"])  # no store=: $ONCELY_STORE, read in each process
def charge(order_id: str) -> int:
    return os.getpid()


@idempotent(store="memory://", key=["order_id"])
def per_process(order_id: str) -> int:
    return os.getpid()


def test_processes_share_one_store(oncely_store_url):
    runs = assert_runs_once(charge, "o-1", concurrency=3, mode="processes")
    assert runs.results[0] != os.getpid()  # it ran in a worker process


def test_memory_is_per_process(oncely_store_url):
    assert_runs_once(per_process, "o-1", concurrency=3, mode="processes")
"""


def test_processes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_processes=PROCESSES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*per_process ran 3 times*each process must open the same store*"])


@pytest.mark.parametrize("url", [POSTGRES_URL, REDIS_URL], ids=["postgres", "redis"])
def test_oncely_store_option_isolates_and_drops(pytester: pytest.Pytester, url: str) -> None:
    seen = pytester.path / "seen.txt"
    pytester.makepyfile(
        f"""
        from oncely import idempotent
        from oncely.core.records import RecordKey

        def test_one(oncely_store):
            assert oncely_store.url == {url!r}
            name = getattr(oncely_store, "table", None) or oncely_store.prefix
            open({str(seen)!r}, "a").write(name + "\\n")
            oncely_store.claim(RecordKey.of("s", "k"), "", 30, 60)
            assert len(oncely_store.list()) == 1

        def test_two(oncely_store):
            assert oncely_store.list() == []  # nothing of test_one
        """
    )
    pytester.runpytest("-p", "no:cacheprovider", "--oncely-store", url).assert_outcomes(passed=2)
    names = seen.read_text().split()
    assert len(names) == 1 and names[0].startswith(("oncely_test_", "oncely-test-"))
    if url == POSTGRES_URL:
        import psycopg

        with psycopg.connect(POSTGRES_URL) as conn:
            found = conn.execute("SELECT to_regclass(%s)", (names[0],)).fetchone()
        assert found == (None,)
    else:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        assert list(client.scan_iter(match=f"{names[0]}:*")) == []
        client.close()


REPLAY = """
import json
import httpx
import pytest
from flask import Flask, jsonify, make_response
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from oncely.http import GLOBAL, IdempotencyConfig, IdempotencyMiddleware
from oncely.http.flask import install
from oncely.testing import aassert_idempotent_replay, assert_idempotent_replay

orders = []


async def create(request):
    orders.append(await request.json())
    response = JSONResponse({"order": len(orders)}, status_code=201,
                            headers={"Location": f"/orders/{len(orders)}"})
    response.set_cookie("session", f"s{len(orders)}")
    return response


def starlette_app(protected=True):
    app = Starlette(routes=[Route("/orders", create, methods=["POST"])])
    if protected:
        app.add_middleware(IdempotencyMiddleware, config=IdempotencyConfig(
            store="memory://", scope=GLOBAL))
    return app


def test_starlette(oncely_store):
    check = assert_idempotent_replay(TestClient(starlette_app()), "POST", "/orders",
                                     json={"sku": "A", "qty": 1})
    assert check.first.status == 201 and check.mismatch.status == 422
    assert len(orders) == 1


def test_flask():
    app = Flask(__name__)
    runs = []

    @app.post("/pay")
    def pay():
        runs.append(1)
        return jsonify(paid=len(runs)), 201

    install(app, IdempotencyConfig(store="memory://", scope=GLOBAL))
    assert_idempotent_replay(app.test_client(), "POST", "/pay", json={"amount": 5})
    assert runs == [1]


async def test_async_client():
    transport = httpx.ASGITransport(app=starlette_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await aassert_idempotent_replay(client, "POST", "/orders", json={"sku": "B"})


def test_without_the_middleware_it_fails():
    assert_idempotent_replay(TestClient(starlette_app(protected=False)), "POST", "/orders",
                             json={"sku": "C"})


class NaiveCache:
    # The classic broken middleware: caches the whole response, Set-Cookie included.
    def __init__(self, app):
        self.app, self.seen = app, {}

    async def __call__(self, scope, receive, send):
        key = dict(scope.get("headers", [])).get(b"idempotency-key")
        if key in self.seen:
            for message in self.seen[key]:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message["headers"],
                                                      (b"idempotent-replayed", b"true")]}
                await send(message)
            return
        messages = self.seen.setdefault(key, [])
        async def keep(message):
            messages.append(message)
            await send(message)
        await self.app(scope, receive, keep)


def test_a_replayed_cookie_fails():
    app = NaiveCache(starlette_app(protected=False))
    assert_idempotent_replay(TestClient(app), "POST", "/orders", json={"sku": "D"},
                             check_mismatch=False)
"""


def test_assert_idempotent_replay(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_replay=REPLAY)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_without_the_middleware_it_fails*",
            "*lacks 'Idempotent-Replayed: true' (it ran again?)*",
            "*the replay repeats the first response's Set-Cookie*",
        ]
    )


def test_the_documented_example_passes(pytester: pytest.Pytester) -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    examples = re.findall(r"```python test\n(.*?)```", text, flags=re.DOTALL)
    assert examples
    for index, code in enumerate(examples):
        pytester.makepyfile(**{f"test_doc_{index}": code})
    counted = sum(len(re.findall(r"^def test_", code, flags=re.M)) for code in examples)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=counted)


def test_bad_input_is_a_clear_error() -> None:
    def plain(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="must be an @idempotent function"):
        assert_runs_once(plain, 1)
    from oncely import idempotent

    @idempotent(store="memory://", name=f"t.{uuid.uuid4()}", key=["x"])
    def once(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="concurrency=1"):
        assert_runs_once(once, 1, concurrency=1)
    with pytest.raises(ConfigurationError, match="mode='tasks' needs an async function"):
        assert_runs_once(once, 1, mode="tasks")
    with pytest.raises(ConfigurationError, match="mode='fibers'"):
        assert_runs_once(once, 1, mode="fibers")  # type: ignore[arg-type]
