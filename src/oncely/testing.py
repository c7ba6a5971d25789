"""oncely's pytest plugin, for your own test suite (registered as ``pytest11``: installed, it
is active; nothing to configure).

Fixtures:

``oncely_store``
    a :class:`~oncely.stores.Store` of this test only: a fresh ``memory://`` store, or, with
    ``pytest --oncely-store URL``, the store at ``URL`` under a table (SQL) or key prefix
    (Redis) unique to the test, dropped afterwards.
``oncely_store_url``
    a store URL that other processes can open (a SQLite file in the test's temporary
    directory), also set as ``$ONCELY_STORE`` for the test, so functions decorated without
    ``store=`` use it in :func:`assert_runs_once`'s worker processes.

Helpers (import them from ``oncely.testing``):

:func:`assert_runs_once`
    call an ``@idempotent`` function concurrently from threads, asyncio tasks or processes and
    assert that its body ran exactly once and every caller got the same result.
:func:`assert_idempotent_replay` / :func:`aassert_idempotent_replay`
    send a request twice with one ``Idempotency-Key`` through a test client and assert the
    draft's replay rules (draft-ietf-httpapi-idempotency-key-header-06): the same status and
    body with ``Idempotent-Replayed: true``, 422 for the same key with a changed body, no
    stored ``Set-Cookie`` replayed.

See ``docs/testing.md`` for examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json as jsonlib
import multiprocessing
import os
import queue as queues
import tempfile
import threading
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest

from oncely.errors import ConfigurationError, InFlightError
from oncely.functions.decorator import Idempotent
from oncely.stores import Store, open_store, store_class

__all__ = [
    "HttpResult",
    "ReplayCheck",
    "Runs",
    "aassert_idempotent_replay",
    "assert_idempotent_replay",
    "assert_runs_once",
    "isolated_store",
    "oncely_store",
    "oncely_store_url",
]

Mode = Literal["threads", "tasks", "processes"]


# -- pytest hooks and fixtures -------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("oncely")
    group.addoption(
        "--oncely-store",
        metavar="URL",
        default=None,
        help="store URL for the oncely_store fixture (default memory://); each test gets its "
        "own table or key prefix there, dropped after the test",
    )


@contextlib.contextmanager
def isolated_store(url: str, directory: Path | str | None = None) -> Iterator[Store]:
    """Open the store at ``url`` under a table (SQL) or key prefix (Redis) of its own, and drop
    it on exit. ``memory://`` gives a fresh store.

    :param directory: unused by server stores; a SQLite URL keeps its file and gets its own
        table in it.
    :raises ConfigurationError: an unknown URL or a missing extra (as :func:`open_store`).
    """
    store_class(url)
    tag = uuid.uuid4().hex[:12]
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    options: dict[str, Any] = {}
    if scheme in ("sqlite", "postgresql", "postgres", "mysql", "mariadb"):
        options = {"table": f"oncely_test_{tag}", "create_schema": True}
    elif scheme in ("redis", "rediss"):
        options = {"prefix": f"oncely-test-{tag}"}
    store = open_store(url, **options)
    try:
        yield store
    finally:
        store.close()
        _drop(scheme, store)


def _drop(scheme: str, store: Store) -> None:
    """Remove the table or keys :func:`isolated_store` created (public driver APIs only)."""
    table = getattr(store, "table", None)
    if scheme == "sqlite" and table:
        _drop_sqlite(store.url, table)
    elif scheme in ("postgresql", "postgres") and table:
        _drop_postgres(store.conninfo, table)  # type: ignore[attr-defined]
    elif scheme in ("mysql", "mariadb") and table:
        _drop_mysql(store.url, table)
    elif scheme in ("redis", "rediss"):
        _drop_redis(store.url, store.prefix)  # type: ignore[attr-defined]


def _drop_sqlite(url: str, table: str) -> None:
    import sqlite3

    path = url.partition("://")[2].partition("?")[0][1:]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        conn.commit()


def _drop_postgres(conninfo: str, table: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def _drop_mysql(url: str, table: str) -> None:
    import pymysql

    parts = urlsplit("mysql://" + url.partition("://")[2])
    conn = pymysql.connect(
        host=parts.hostname or "localhost",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=parts.path.lstrip("/") or None,
    )
    try:
        cur = conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS `{table}`, `{table}_fences`")
        cur.close()
    finally:
        conn.close()


def _drop_redis(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@pytest.fixture
def oncely_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """A store of this test only (``memory://``, or ``--oncely-store URL`` isolated)."""
    url = request.config.getoption("oncely_store") or "memory://"
    with isolated_store(url) as store:
        yield store


@pytest.fixture
def oncely_store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A SQLite store URL in this test's temporary directory, also set as ``$ONCELY_STORE``."""
    url = f"sqlite:///{tmp_path}/oncely.db"
    monkeypatch.setenv("ONCELY_STORE", url)
    return url


# -- assert_runs_once ----------------------------------------------------------------------------
@dataclass
class Runs:
    """What :func:`assert_runs_once` saw: each caller's result or error, and the executions."""

    executions: int
    results: list[Any] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def _config(fn: Any, what: str) -> Idempotent:
    config = getattr(fn, "idempotency", None)
    if not isinstance(config, Idempotent):
        raise ConfigurationError(
            f"{what} must be an @idempotent function (it has no .idempotency), got {fn!r}; to "
            "count the runs of an @idempotent function called inside fn, pass it as watch="
        )
    return config


class _Counter:
    """Counts the executions of a decorated function's body while it is installed."""

    def __init__(self, config: Idempotent, record: Callable[[], None]) -> None:
        self.config = config
        original = self.original = config.fn
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def counted_async(*args: Any, **kwargs: Any) -> Any:
                record()
                return await original(*args, **kwargs)

            self.counted: Callable[..., Any] = counted_async
        else:

            @functools.wraps(original)
            def counted(*args: Any, **kwargs: Any) -> Any:
                record()
                return original(*args, **kwargs)

            self.counted = counted

    def __enter__(self) -> None:
        self.config.fn = self.counted

    def __exit__(self, *exc: object) -> None:
        self.config.fn = self.original


def assert_runs_once(
    fn: Callable[..., Any],
    *args: Any,
    concurrency: int = 8,
    mode: Mode = "threads",
    watch: Callable[..., Any] | None = None,
    timeout: float = 60.0,
    **kwargs: Any,
) -> Runs:
    """Call ``fn(*args, **kwargs)`` ``concurrency`` times at once and assert one execution.

    The calls start together (a barrier) from ``concurrency`` threads, asyncio tasks on one
    event loop, or processes. Executions are counted by running the real function body with a
    counter around it, never by looking at the store: two bodies that ran are two executions,
    whatever the store recorded.

    :param fn: an ``@idempotent`` function (sync or async), or any callable that calls one
        (then pass that one as ``watch``).
    :param concurrency: how many calls, at least 2.
    :param mode: ``"threads"``; ``"tasks"`` (``fn`` must be async; the loop runs in a thread of
        its own, so this works from sync and async tests alike); ``"processes"`` (spawned
        interpreters: ``fn``, ``watch`` and the arguments must be picklable, i.e. ``fn``
        defined at module level, and its store a URL every process opens, e.g. the
        ``oncely_store_url`` fixture; ``memory://`` is per process).
    :param watch: the ``@idempotent`` function whose body is counted (default ``fn``).
    :param timeout: seconds for all calls to finish.
    :returns: each caller's result and error, and the count.
    :raises AssertionError: the body ran other than once, callers got different results, or a
        caller raised something else than :class:`~oncely.errors.InFlightError` or the one
        execution's stored error (``store_errors=``).
    :raises ConfigurationError: ``watch`` (or ``fn``) is not ``@idempotent``, ``concurrency``
        is below 2, or ``mode="tasks"`` with a sync function.
    """
    __tracebackhide__ = True
    config = _config(watch if watch is not None else fn, "watch" if watch is not None else "fn")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 2:
        raise ConfigurationError(f"concurrency={concurrency!r}: give a whole number of 2 or more")
    if mode == "threads":
        runs = _in_threads(fn, args, kwargs, concurrency, config, timeout)
    elif mode == "tasks":
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError("mode='tasks' needs an async function; use mode='threads'")
        runs = _in_tasks(fn, args, kwargs, concurrency, config, timeout)
    elif mode == "processes":
        runs = _in_processes(fn, watch, args, kwargs, concurrency, timeout)
    else:
        raise ConfigurationError(f"mode={mode!r}: use 'threads', 'tasks' or 'processes'")
    _judge(runs, config, concurrency, mode)
    return runs


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return asyncio.run(fn(*args, **kwargs))
    return fn(*args, **kwargs)


def _in_threads(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    n: int,
    config: Idempotent,
    timeout: float,
) -> Runs:
    lock = threading.Lock()
    count = [0]

    def record() -> None:
        with lock:
            count[0] += 1

    barrier = threading.Barrier(n)
    outcomes: list[tuple[bool, Any]] = []

    def worker() -> None:
        try:
            barrier.wait(timeout)
            value: tuple[bool, Any] = (True, _call(fn, args, kwargs))
        except BaseException as exc:
            value = (False, exc)
        with lock:
            outcomes.append(value)

    with _Counter(config, record):
        threads = [threading.Thread(target=worker, name=f"oncely-call-{i}") for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
    if any(t.is_alive() for t in threads):
        raise AssertionError(f"assert_runs_once: calls still running after {timeout} s")
    return _runs(count[0], outcomes)


def _in_tasks(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    n: int,
    config: Idempotent,
    timeout: float,
) -> Runs:
    count = [0]

    def record() -> None:
        count[0] += 1  # one loop: no two tasks run this at once

    async def main() -> list[tuple[bool, Any]]:
        start = asyncio.Event()

        async def one() -> tuple[bool, Any]:
            await start.wait()
            try:
                return True, await fn(*args, **kwargs)
            except Exception as exc:
                return False, exc

        tasks = [asyncio.ensure_future(one()) for _ in range(n)]
        await asyncio.sleep(0)
        start.set()
        return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout))

    box: list[Any] = []
    with _Counter(config, record):
        # A loop of its own in a thread of its own: callable from sync and async tests.
        thread = threading.Thread(target=lambda: box.append(_capture(main)), name="oncely-tasks")
        thread.start()
        thread.join(timeout + 5)
    if not box:
        raise AssertionError(f"assert_runs_once: tasks still running after {timeout} s")
    ok, value = box[0]
    if not ok:
        raise value
    return _runs(count[0], value)


def _capture(main: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, asyncio.run(main())
    except BaseException as exc:
        return False, exc


def _in_processes(
    fn: Callable[..., Any],
    watch: Callable[..., Any] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    n: int,
    timeout: float,
) -> Runs:
    # spawn, not fork: a forked child would share the parent's open store connections.
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="oncely-runs-") as work:
        counter = os.path.join(work, "executions")
        open(counter, "wb").close()
        barrier = ctx.Barrier(n)
        results: Any = ctx.Queue()
        procs = [
            ctx.Process(
                target=_child,
                args=(fn, watch, args, kwargs, counter, barrier, results, timeout),
                name=f"oncely-call-{i}",
            )
            for i in range(n)
        ]
        for proc in procs:
            proc.start()
        outcomes: list[tuple[bool, Any]] = []
        try:
            for _ in range(n):
                outcomes.append(results.get(timeout=timeout))
        except queues.Empty:
            raise AssertionError(
                f"assert_runs_once: {n - len(outcomes)} process(es) gave no answer within "
                f"{timeout} s"
            ) from None
        finally:
            for proc in procs:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        executions = os.path.getsize(counter)
    return _runs(executions, outcomes)


def _child(
    fn: Callable[..., Any],
    watch: Callable[..., Any] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    counter: str,
    barrier: Any,
    results: Any,
    timeout: float,
) -> None:
    def record() -> None:
        fd = os.open(counter, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"x")  # one byte per execution, appended atomically
        finally:
            os.close(fd)

    try:
        config = _config(watch if watch is not None else fn, "watch")
        with _Counter(config, record):
            barrier.wait(timeout)
            outcome: tuple[bool, Any] = (True, _call(fn, args, kwargs))
    except BaseException as exc:
        outcome = (False, exc)
    try:
        results.put(outcome)
    except Exception:  # an unpicklable result or error: send what can be sent
        ok, value = outcome
        results.put((ok, RuntimeError(f"unpicklable {'result' if ok else 'error'}: {value!r}")))
    results.close()
    results.join_thread()


def _runs(executions: int, outcomes: list[tuple[bool, Any]]) -> Runs:
    runs = Runs(executions)
    for ok, value in outcomes:
        (runs.results if ok else runs.errors).append(value)
    return runs


def _judge(runs: Runs, config: Idempotent, n: int, mode: str) -> None:
    __tracebackhide__ = True
    policy = config.policy
    allowed: tuple[type[BaseException], ...] = (InFlightError, *policy.store_errors)
    unexpected = [e for e in runs.errors if not isinstance(e, allowed)]
    if runs.executions != 1:
        hint = ""
        if mode == "processes":
            hint = (
                "; each process must open the same store (not memory://, not a relative "
                "SQLite path under different working directories)"
            )
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        detail = f"; errors: {unexpected[:3]!r}{more}" if unexpected else ""
        raise AssertionError(
            f"{config.name} ran {runs.executions} times for {n} concurrent calls ({mode}), "
            f"expected exactly once{hint}{detail}"
        ) from (unexpected[0] if unexpected else None)
    if unexpected:
        raise AssertionError(
            f"{config.name}: {len(unexpected)} of {n} calls raised {unexpected[0]!r}"
        ) from unexpected[0]
    different = [r for r in runs.results if r != runs.results[0]]
    if different:
        raise AssertionError(
            f"{config.name}: callers got different results: {runs.results[0]!r} and "
            f"{different[0]!r} (a replay must equal the first result)"
        )


# -- assert_idempotent_replay --------------------------------------------------------------------
@dataclass(frozen=True)
class HttpResult:
    """A test client's response, reduced to what the replay rules look at."""

    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name.lower()), None)

    def header_values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]


@dataclass(frozen=True)
class ReplayCheck:
    """The responses :func:`assert_idempotent_replay` got, for further assertions."""

    key: str
    first: HttpResult
    replay: HttpResult
    mismatch: HttpResult | None


@dataclass(frozen=True)
class _Send:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    content_type: str | None


def _replay_flow(
    method: str,
    url: str,
    json: Any,
    data: bytes | str | None,
    headers: Mapping[str, str] | None,
    key: str | None,
    changed: Any,
    check_mismatch: bool,
    header: str,
    replay_header: str,
) -> Generator[_Send, HttpResult, ReplayCheck]:
    """The checks, as a sans-IO generator: it yields requests and receives responses."""
    __tracebackhide__ = True
    if json is not None and data is not None:
        raise ConfigurationError("pass json= or data=, not both")
    key = key or f"oncely-test-{uuid.uuid4()}"
    base = {k: v for k, v in (headers or {}).items()}
    base[header] = key
    content_type = "application/json" if json is not None else None
    body = jsonlib.dumps(json).encode() if json is not None else _bytes(data)
    request = _Send(method.upper(), url, base, body, content_type)
    where = f"{method.upper()} {url}"

    first = yield request
    if first.header(replay_header) is not None:
        raise AssertionError(f"{where}: the first response already carries {replay_header}")
    if first.status >= 500:
        raise AssertionError(
            f"{where}: the first response is {first.status}: the endpoint failed, so there is "
            "no successful response to check the replay of (a failure is kept as it is, or "
            "with store_server_errors=False released so a retry runs again)"
        )
    replay = yield request
    problems = []
    if replay.header(replay_header) != "true":
        problems.append(f"the retry lacks '{replay_header}: true' (it ran again?)")
    if replay.status != first.status:
        problems.append(f"status {replay.status} instead of the stored {first.status}")
    if replay.body != first.body:
        problems.append(f"body {replay.body[:80]!r} differs from {first.body[:80]!r}")
    for name in ("content-type", "location"):
        if first.header(name) is not None and replay.header(name) != first.header(name):
            problems.append(f"{name} {replay.header(name)!r} instead of {first.header(name)!r}")
    stored_cookies = set(first.header_values("set-cookie"))
    leaked = stored_cookies & set(replay.header_values("set-cookie"))
    if leaked:
        problems.append(f"the replay repeats the first response's Set-Cookie {sorted(leaked)}")
    if problems:
        raise AssertionError(f"{where} replayed with key {key!r}: " + "; ".join(problems))

    mismatch = None
    if check_mismatch:
        if changed is None:
            if not isinstance(json, dict):
                raise ConfigurationError(
                    "pass changed= (a different JSON body for the same key), or "
                    "check_mismatch=False; a changed body is derived only from a dict json="
                )
            changed = {**json, "oncely_changed": uuid.uuid4().hex}
        other = _Send(
            method.upper(), url, base, jsonlib.dumps(changed).encode(), "application/json"
        )
        mismatch = yield other
        if mismatch.status != 422:
            raise AssertionError(
                f"{where}: the same key with a changed body got {mismatch.status}, expected 422 "
                "(draft-06: a key reused with a different payload); with fingerprint=[fields] "
                "pass changed= altering one of those fields"
            )
        again = yield request
        if again.body != first.body or again.header(replay_header) != "true":
            raise AssertionError(
                f"{where}: after the 422 the original request no longer replays its response"
            )
    return ReplayCheck(key, first, replay, mismatch)


def _bytes(data: bytes | str | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


def _kwargs(send: _Send) -> dict[str, Any]:
    headers = dict(send.headers)
    if send.content_type is not None:
        headers.setdefault("Content-Type", send.content_type)
    return {"headers": headers, "content": send.body}


def _sync_send(client: Any, send: _Send) -> HttpResult:
    if hasattr(client, "generic") and hasattr(client, "handler"):  # Django's test Client
        response = client.generic(
            send.method,
            send.url,
            data=send.body or b"",
            content_type=send.content_type or "application/octet-stream",
            headers=send.headers,
        )
        headers = [(k.lower(), v) for k, v in response.items()]
        headers += [("set-cookie", m.OutputString()) for m in response.cookies.values()]
        return HttpResult(response.status_code, headers, bytes(response.content))
    if hasattr(client, "open") and hasattr(client, "application"):  # Flask / Werkzeug
        kw = _kwargs(send)
        response = client.open(
            send.url, method=send.method, headers=kw["headers"], data=kw["content"]
        )
        headers = [(k.lower(), v) for k, v in response.headers.items()]
        return HttpResult(response.status_code, headers, bytes(response.get_data()))
    response = client.request(send.method, send.url, **_kwargs(send))  # httpx, Starlette
    return _httpx_result(response)


def _httpx_result(response: Any) -> HttpResult:
    headers = [(k.lower(), v) for k, v in response.headers.multi_items()]
    return HttpResult(response.status_code, headers, bytes(response.content))


def assert_idempotent_replay(
    client: Any,
    method: str,
    url: str,
    *,
    json: Any = None,
    data: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    key: str | None = None,
    changed: Any = None,
    check_mismatch: bool = True,
    header: str = "Idempotency-Key",
    replay_header: str = "Idempotent-Replayed",
) -> ReplayCheck:
    """Assert the draft's replay rules for one request through a test client.

    Sends the request with a fresh ``Idempotency-Key`` (or ``key``), sends it again, then
    (``check_mismatch``) the same key with a changed body, then the original once more.
    Rules (draft-ietf-httpapi-idempotency-key-header-06 and oncely's ``docs/http.md``): the
    retry gets the stored status and the byte-identical body, the same ``Content-Type`` and
    ``Location``, and ``Idempotent-Replayed: true``; no ``Set-Cookie`` of the first response
    is replayed; the changed body gets 422; the 422 leaves the stored response in place.

    :param client: a Starlette/FastAPI ``TestClient``, an ``httpx.Client``, a Flask test
        client or a Django test ``Client``.
    :param json: the JSON body (sent as ``application/json``); or ``data`` for raw bytes.
    :param changed: the JSON body of the "changed payload" request (default: ``json`` with
        one extra member; pass it when the route fingerprints chosen fields only).
    :returns: the responses, for further assertions.
    :raises AssertionError: a rule is broken (the message says which).
    :raises ConfigurationError: both ``json`` and ``data``, or no way to change the body.
    """
    __tracebackhide__ = True
    flow = _replay_flow(
        method, url, json, data, headers, key, changed, check_mismatch, header, replay_header
    )
    send = next(flow)
    while True:
        try:
            send = flow.send(_sync_send(client, send))
        except StopIteration as stop:
            result: ReplayCheck = stop.value
            return result


async def aassert_idempotent_replay(
    client: Any,
    method: str,
    url: str,
    *,
    json: Any = None,
    data: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    key: str | None = None,
    changed: Any = None,
    check_mismatch: bool = True,
    header: str = "Idempotency-Key",
    replay_header: str = "Idempotent-Replayed",
) -> ReplayCheck:
    """:func:`assert_idempotent_replay` through an ``httpx.AsyncClient`` (same rules)."""
    __tracebackhide__ = True
    flow = _replay_flow(
        method, url, json, data, headers, key, changed, check_mismatch, header, replay_header
    )
    send = next(flow)
    while True:
        response = await client.request(send.method, send.url, **_kwargs(send))
        try:
            send = flow.send(_httpx_result(response))
        except StopIteration as stop:
            result: ReplayCheck = stop.value
            return result
