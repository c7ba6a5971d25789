"""Store and lock URLs: a misspelled query option is refused on every scheme, and a relative
SQLite path means one file for every process, whatever its working directory.

Red-team inputs (session brief, items 5 and 6): ``sqlite:///x.db?timeot=5``,
``postgresql://…?lease_tabel=x`` and a misspelled MySQL option were ignored (SQLite) or failed
only at the first connection; ``sqlite:///oncely.db`` opened from two directories gave two
stores, so a duplicate ran twice.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oncely import ConfigurationError, idempotent
from oncely.cli import app
from oncely.errors import StoreUnavailable
from oncely.locks import Lock
from oncely.stores import open_store

from conftest import MYSQL_URL, POSTGRES_URL, REDIS_URL

pytestmark = pytest.mark.timeout(60)

#: (URL, the misspelled option, the option the message must suggest or None)
TYPOS = [
    ("sqlite:///{tmp}/x.db?busy_timout=5", "busy_timout", "busy_timeout"),
    ("sqlite:///{tmp}/x.db?timeot=5", "timeot", None),
    ("sqlite:///{tmp}/x.db?synchronus=OFF", "synchronus", "synchronous"),
    ("sqlite:///{tmp}/x.db?busy_timeout=5&tabel", "tabel", None),  # a flag without a value
    (POSTGRES_URL + "?lease_tabel=x", "lease_tabel", None),
    (POSTGRES_URL + "?conect_timeout=3", "conect_timeout", "connect_timeout"),
    (POSTGRES_URL + "?sslmod=disable", "sslmod", "sslmode"),
    (MYSQL_URL + "?unix_sockt=/tmp/x", "unix_sockt", "unix_socket"),
    (MYSQL_URL + "?tabel=x", "tabel", None),
    (REDIS_URL + "?socket_timout=5", "socket_timout", "socket_timeout"),
    (REDIS_URL + "?max_conections=5", "max_conections", "max_connections"),
    (REDIS_URL.replace("redis://", "rediss://") + "?ssl_certfle=x", "ssl_certfle", "ssl_certfile"),
    ("memory://?ttl=5", "ttl", None),
]


def _url(template: str, tmp_path: Path) -> str:
    return template.replace("{tmp}", str(tmp_path))


@pytest.mark.parametrize(("template", "typo", "near"), TYPOS, ids=[t[1] for t in TYPOS])
def test_a_misspelled_url_option_is_refused_when_the_store_opens(
    template: str, typo: str, near: str | None, tmp_path: Path
) -> None:
    url = _url(template, tmp_path)
    with pytest.raises(ConfigurationError, match=typo) as caught:
        open_store(url)
    if near is not None:
        assert f"did you mean {near!r}" in str(caught.value)
    if url.startswith("sqlite"):
        assert not list(tmp_path.iterdir()), "a refused URL must not create the file"


@pytest.mark.parametrize(
    ("template", "typo"),
    [
        ("sqlite:///{tmp}/locks.db?busy_timout=5", "busy_timout"),
        (POSTGRES_URL + "?conect_timeout=3", "conect_timeout"),
        (REDIS_URL + "?socket_timout=5", "socket_timout"),
    ],
)
def test_lock_urls_refuse_misspelled_options_too(template: str, typo: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=typo):
        Lock(_url(template, tmp_path), f"typo-{uuid.uuid4()}")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/x.db?busy_timout=5",
        REDIS_URL + "?socket_timout=1",
        POSTGRES_URL + "?sslmod=disable",
        MYSQL_URL + "?read_timout=5",
    ],
)
def test_a_misspelled_option_is_refused_when_the_component_is_built(
    url: str, tmp_path: Path
) -> None:
    """Every component checks its store URL when built (Store.check_url, nothing opened), not
    at its first call (red team 5: a consumer given ?socket_timout=1 turned every message
    into Retry, without end)."""
    from oncely.messaging import IdempotentConsumer

    url = _url(url, tmp_path)
    with pytest.raises(ConfigurationError, match="unknown option"):
        idempotent(store=url, key=["k"])(lambda k: k)
    with pytest.raises(ConfigurationError, match="unknown option"):
        IdempotentConsumer(lambda d: None, name="c", store=url)
    assert not (tmp_path / "x.db").exists()  # nothing was opened


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/x.db?synchronous=NORMAL&busy_timeout=3",
        POSTGRES_URL + "?connect_timeout=3&application_name=oncely-url-test",
        MYSQL_URL + "?charset=utf8mb4",
        REDIS_URL + "?socket_timeout=3&max_connections=4&health_check_interval=5",
    ],
)
def test_known_options_still_work(url: str, tmp_path: Path) -> None:
    store = open_store(_url(url, tmp_path))
    try:
        assert store.now() > 0
    finally:
        store.close()


def test_a_sqlite_lock_reads_the_stores_options_from_a_shared_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db?synchronous=FULL&busy_timeout=3"
    with Lock(url, "shared") as lock:
        assert lock.backend.synchronous == "FULL"  # type: ignore[attr-defined]
        assert lock.backend.busy_timeout == 3  # type: ignore[attr-defined]


# -- a relative SQLite path (item 6) ---------------------------------------------------------------
WORKER = """
import os, sys
from oncely import idempotent
@idempotent(store="sqlite:///oncely.db", key=["k"], name="relative.pay")
def pay(k: str) -> int:
    print("ran", flush=True)
    return os.getpid()
result = pay(sys.argv[1])
os.chdir(sys.argv[2])  # a later chdir must not move the store of this process either
again = pay(sys.argv[1])
assert again == result, (again, result)
print(result)
"""


def test_a_relative_sqlite_path_resolves_once_and_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    with caplog.at_level(logging.INFO, logger="oncely"):
        store = open_store("sqlite:///oncely.db")
    try:
        assert store.path == str(first / "oncely.db")  # type: ignore[attr-defined]
        assert str(first / "oncely.db") in caplog.text
        monkeypatch.chdir(second)
        store.now()  # the first connection opens after the chdir: still the same file
        assert (first / "oncely.db").exists() and not (second / "oncely.db").exists()
    finally:
        store.close()


def test_two_workers_from_different_directories_see_where_their_store_is(tmp_path: Path) -> None:
    """The worker itself is protected against its own chdir; two workers started in different
    directories are two stores, and `oncely check` shows each its file (documented: give an
    absolute path or $ONCELY_STORE in production)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    key = str(uuid.uuid4())
    out = subprocess.run(
        [sys.executable, "-c", WORKER, key, str(elsewhere)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert out.count("ran") == 1, out  # the second call, after chdir, replayed
    assert (tmp_path / "oncely.db").exists() and not (elsewhere / "oncely.db").exists()

    runner = CliRunner()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        shown = runner.invoke(app, ["check", "sqlite:///oncely.db", "--json"])
        text = runner.invoke(app, ["check", "sqlite:///oncely.db"])
    finally:
        os.chdir(cwd)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["file"] == str(tmp_path / "oncely.db")
    assert str(tmp_path / "oncely.db") in text.output.replace("\n", "")


@pytest.mark.parametrize(
    ("template", "options", "near"),
    [
        ("sqlite:///{tmp}/x.db", {"busy_timout": 5}, "busy_timeout"),
        ("memory://", {"ttl": 5}, None),
        (POSTGRES_URL, {"sslmod": "disable"}, "sslmode"),
        (POSTGRES_URL, {"tabel": "x"}, "table"),
        (REDIS_URL, {"socket_timout": 1}, "socket_timeout"),
    ],
    ids=["sqlite", "memory", "postgres-libpq", "postgres-own", "redis"],
)
def test_a_misspelled_keyword_option_is_refused_when_the_store_opens(
    template: str, options: dict[str, object], near: str | None, tmp_path: Path
) -> None:
    """The same kind of typo as in the URL, given as a keyword argument: refused at once, not
    at the first connection (PostgreSQL, Redis) and not as a bare TypeError (SQLite)."""
    with pytest.raises(ConfigurationError, match=next(iter(options))) as caught:
        open_store(_url(template, tmp_path), **options)
    if near is not None:
        assert f"did you mean {near!r}" in str(caught.value)


@pytest.mark.parametrize(
    "options",
    [
        {"autopipeline": False},
        {"autopipeline": True, "max_connections": 4, "pool_timeout": 0.5},
        {"max_connections": 2},
    ],
    ids=["autopipeline", "bounded-pool", "max_connections"],
)
def test_oncelys_own_redis_options_are_accepted(options: dict[str, object]) -> None:
    """``autopipeline`` and ``pool_timeout`` are oncely's options, not redis-py's: the check
    against redis-py's names must let them through, and the store must work with them."""
    store = open_store(REDIS_URL, prefix=f"oncely-opts-{uuid.uuid4().hex[:8]}", **options)
    try:
        assert store.now() > 0
    finally:
        store.close()


@pytest.mark.parametrize(
    ("options", "near"),
    [({"autopipline": False}, "autopipeline"), ({"pool_timout": 1}, "pool_timeout")],
    ids=["autopipline", "pool_timout"],
)
def test_a_misspelled_oncely_redis_option_is_refused(options: dict[str, object], near: str) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(options))) as caught:
        open_store(REDIS_URL, **options)
    assert f"did you mean {near!r}" in str(caught.value)


def test_redis_cluster_options_are_checked_without_a_server() -> None:
    """A cluster URL takes the cluster client's keyword options (``require_full_coverage``) and
    redis-py's connection ones; a typo is refused with the closest name before any connection;
    query options in a cluster URL (which the cluster client would not read) are refused."""
    from oncely.backends.redis import RedisClients

    url = "redis+cluster://127.0.0.1:1,127.0.0.1:2"
    with pytest.raises(ConfigurationError, match="require_full_coverag") as caught:
        RedisClients(url, require_full_coverag=True)
    assert "did you mean 'require_full_coverage'" in str(caught.value)
    with pytest.raises(ConfigurationError, match="socket_timout") as caught:
        RedisClients(url, socket_timout=1)
    assert "did you mean 'socket_timeout'" in str(caught.value)
    with pytest.raises(ConfigurationError, match="keyword options"):
        RedisClients(url + "/0?socket_timeout=1")
    with pytest.raises(ConfigurationError, match="socket_timout"):
        RedisClients(url + "?socket_timout=1")
    # Known options pass the check: the only failure left is that nothing listens there.
    with pytest.raises(StoreUnavailable):
        RedisClients(url, require_full_coverage=True, autopipeline=False, pool_timeout=1)


# -- F14 (redteam3): numeric URL options are parsed and range-checked when the store is built ------
@pytest.mark.parametrize(
    ("url", "option"),
    [
        (REDIS_URL + "?socket_timeout=-3", "socket_timeout='-3'"),
        (REDIS_URL + "?socket_timeout=abc", "socket_timeout='abc'"),
        (REDIS_URL + "?socket_connect_timeout=0", "socket_connect_timeout='0'"),
        (REDIS_URL + "?health_check_interval=1.5", "health_check_interval='1.5'"),
        (POSTGRES_URL + "?connect_timeout=abc", "connect_timeout='abc'"),
        (POSTGRES_URL + "?connect_timeout=-3", "connect_timeout='-3'"),
        (POSTGRES_URL + "?keepalives_idle=soon", "keepalives_idle='soon'"),
        ("sqlite:///{tmp}/x.db?busy_timeout=-3", "busy_timeout='-3'"),
        # seconds past oncely.settings.MAX_SECONDS (1e9), as every duration (retest 7)
        (REDIS_URL + "?health_check_interval=10000000000", "health_check_interval="),
        (POSTGRES_URL + "?connect_timeout=10000000000", "connect_timeout="),
        (POSTGRES_URL + "?keepalives_idle=10000000000", "keepalives_idle="),
        (POSTGRES_URL + "?tcp_user_timeout=10000000000000", "tcp_user_timeout="),
    ],
)
def test_numeric_url_options_are_checked_when_the_store_is_built(
    url: str, option: str, tmp_path: Path
) -> None:
    # Before: socket_timeout=-3 failed at the first command with a bare ValueError,
    # connect_timeout=abc at the first connect, busy_timeout=-3 was taken.
    with pytest.raises(ConfigurationError, match=option):
        open_store(url.replace("{tmp}", str(tmp_path)))


def test_numeric_keyword_options_are_checked_too() -> None:
    with pytest.raises(ConfigurationError, match="socket_timeout=-1"):
        open_store(REDIS_URL, socket_timeout=-1)
    with pytest.raises(ConfigurationError, match="connect_timeout=-1"):
        open_store(POSTGRES_URL, connect_timeout=-1)
    open_store(REDIS_URL, socket_timeout=None).close()  # None: redis-py's "no timeout"
