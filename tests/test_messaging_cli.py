"""``oncely consume``: a handler module run as an idempotent consumer from the command line."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from conftest import REDIS_URL
from lock_workers import RedisServer

HANDLER = """
from pathlib import Path

def on_message(delivery):
    with open(Path(__file__).with_name("seen.txt"), "a") as f:
        f.write(delivery.message_id + "\\n")
"""


def test_consume_redis_stream_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "cli_handler.py").write_text(HANDLER)
    tag = uuid.uuid4().hex[:10]
    stream = f"oncely-test-stream-{tag}"
    client = redis.Redis.from_url(REDIS_URL)
    for mid in ["m-1", "m-2", "m-1", "m-3"]:
        client.xadd(stream, {"id": mid, "body": b"{}"})
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "ONCELY_STORE": REDIS_URL,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oncely",
            "consume",
            "redis",
            "--handler",
            "cli_handler:on_message",
            "--name",
            f"cli-{tag}",
            "--stream",
            stream,
            "--group",
            "g",
            "--member",
            "m1",
            "--url",
            REDIS_URL,
            "--lease",
            "2",
        ],
        env=env,
    )
    try:
        seen = tmp_path / "seen.txt"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if seen.exists() and len(seen.read_text().split()) >= 3:
                break
            time.sleep(0.1)
        time.sleep(0.3)
        assert sorted(seen.read_text().split()) == ["m-1", "m-2", "m-3"]
        assert int(client.xpending(stream, "g")["pending"]) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        client.delete(stream)
        keys = list(client.scan_iter(match=f"oncely:oncely.messaging\\:cli-{tag}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_bad_handler_is_a_clear_error() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "oncely",
            "consume",
            "redis",
            "--handler",
            "no_such_module_x:f",
            "--name",
            "n",
            "--stream",
            "s",
            "--group",
            "g",
            "--member",
            "m",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "cannot be imported" in out.stderr and "Traceback" not in out.stderr


def _consume_redis(tmp_path: Path, url: str, stream: str) -> list[str]:
    (tmp_path / "cli_handler.py").write_text(HANDLER)
    return [
        sys.executable, "-m", "oncely", "consume", "redis", "--handler", "cli_handler:on_message",
        "--name", "n", "--stream", stream, "--group", "g", "--member", "m", "--url", url,
        "--store", "memory://",
    ]  # fmt: skip


def test_unreachable_redis_at_start_up_exits_1_with_one_line(tmp_path: Path) -> None:
    """Like rabbitmq, nats and mqtt: Redis unreachable at start-up is a setup error, not a
    loop of "retrying" lines in a process that looks alive (red-team F13)."""
    out = subprocess.run(
        _consume_redis(tmp_path, "redis://127.0.0.1:1/0", "s"),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ConnectionError"), out.stderr
    assert "Traceback" not in out.stderr and "retrying" not in out.stderr


def test_a_missing_stream_is_created_with_its_group_and_said_so(tmp_path: Path) -> None:
    """A consumer may start before its producers: the stream is created (MKSTREAM) with the
    group, and one WARNING says so (a mistyped --stream is visible)."""
    stream = f"oncely-test-missing-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(REDIS_URL)
    proc = subprocess.Popen(
        _consume_redis(tmp_path, REDIS_URL, stream),
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 20)  # the old code said nothing
        line = proc.stderr.readline() if ready else ""
        assert "does not exist yet" in line and repr(stream) in line, line
        deadline = time.monotonic() + 20
        while not client.exists(stream) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [g["name"] for g in client.xinfo_groups(stream)] == [b"g"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        client.delete(stream)
        client.close()


TX_HANDLER = """
def on_message(delivery, conn):
    conn.execute("INSERT INTO effects VALUES (?)", (delivery.message_id,))
"""


def test_consume_redis_stream_in_the_transactional_mode(tmp_path: Path) -> None:
    """``--db`` runs the handler as ``(delivery, conn)``: its write commits with the inbox
    row (table created at start), a duplicate publish is acked without running."""
    import sqlite3

    (tmp_path / "tx_handler.py").write_text(TX_HANDLER)
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
    tag = uuid.uuid4().hex[:10]
    stream = f"oncely-test-stream-{tag}"
    client = redis.Redis.from_url(REDIS_URL)
    for mid in ["m-1", "m-2", "m-1", "m-3"]:
        client.xadd(stream, {"id": mid, "body": b"{}"})
    args = ["--handler", "tx_handler:on_message", "--name", f"cli-{tag}", "--stream", stream]
    args += ["--group", "g", "--member", "m1", "--url", REDIS_URL, "--lease", "2"]
    args += ["--db", f"sqlite:///{db}", "--inbox", "cli_inbox"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "oncely", "consume", "redis", *args], env=env)

    def effects() -> list[str]:
        with sqlite3.connect(db) as conn:
            return sorted(r[0] for r in conn.execute("SELECT message_id FROM effects"))

    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if len(effects()) >= 3 and int(client.xpending(stream, "g")["pending"]) == 0:
                break
            time.sleep(0.1)
        time.sleep(0.3)
        assert effects() == ["m-1", "m-2", "m-3"]
        assert int(client.xpending(stream, "g")["pending"]) == 0
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM cli_inbox").fetchone() == (3,)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        client.delete(stream)
        client.close()


DOWN_STORE = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def _broker_args(broker: str, tag: str) -> list[str]:
    return {
        "redis": ["--stream", f"oncely-test-sd-{tag}", "--group", "g", "--member", "m",
                  "--url", REDIS_URL],
        "rabbitmq": ["--queue", f"oncely-test-sd-{tag}"],
        "nats": ["--stream", f"ONCELY_SD_{tag}", "--subject", f"oncely.sd.{tag}",
                 "--durable", "d"],
        "mqtt": ["--topic", f"oncely/sd/{tag}", "--client-id", f"oncely-sd-{tag}"],
    }[broker]  # fmt: skip


@pytest.mark.parametrize("broker", ["redis", "rabbitmq", "nats", "mqtt"])
def test_unreachable_store_at_start_up_exits_1_for_every_broker(
    tmp_path: Path, broker: str
) -> None:
    """`--store` unreachable: one line naming the store's URL, exit 1, before any broker is
    touched. `consume redis` used to start silently and retry every message forever without
    running the handler (red-team 4, streams/store_down.sh)."""
    (tmp_path / "cli_handler.py").write_text(HANDLER)
    tag = uuid.uuid4().hex[:10]
    args = [sys.executable, "-m", "oncely", "consume", broker, "--handler",
            "cli_handler:on_message", "--name", f"sd-{tag}", "--store", DOWN_STORE,
            *_broker_args(broker, tag)]  # fmt: skip
    try:
        out = subprocess.run(
            args, capture_output=True, text=True, timeout=25, cwd=tmp_path, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"still running after 25 s, stderr: {exc.stderr!r}") from exc
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "127.0.0.1:1" in lines[0] and "unavailable" in lines[0], out.stderr
    assert not (tmp_path / "seen.txt").exists()


def test_handler_is_imported_from_the_current_directory_or_app_dir(tmp_path: Path) -> None:
    """`--handler module:function` as the docs show, no PYTHONPATH: the current directory is
    on sys.path (as uvicorn and celery put it), or --app-dir DIR. It used to fail with "cannot
    be imported" unless PYTHONPATH was set. (The broker URL is unreachable: getting as far as
    the connection error proves the import.)"""
    app = tmp_path / "app"
    app.mkdir()
    (app / "billing.py").write_text(HANDLER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the `oncely` script, as users run it (`python -m` puts the current directory on sys.path)
    oncely = str(Path(sys.executable).parent / "oncely")
    base = [oncely, "consume", "redis", "--handler", "billing:on_message",
            "--name", "n", "--stream", "s", "--group", "g", "--member", "m",
            "--url", "redis://127.0.0.1:1/0", "--store", "memory://"]  # fmt: skip
    for cwd, extra in [(app, []), (tmp_path, ["--app-dir", "app"])]:
        out = subprocess.run(
            [*base, *extra], capture_output=True, text=True, timeout=30, cwd=cwd, env=env
        )
        assert out.returncode == 1, out.stderr
        assert "cannot be imported" not in out.stderr, out.stderr
        assert out.stderr.startswith("error: ConnectionError"), out.stderr
    missing = subprocess.run(
        [*base, "--app-dir", "nowhere"], capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env=env,
    )  # fmt: skip
    assert missing.returncode == 1 and "--app-dir 'nowhere' is not a directory" in missing.stderr
    helped = subprocess.run(
        [oncely, "consume", "redis", "--help"],
        capture_output=True, text=True, timeout=30, env={**env, "COLUMNS": "200"},
    )  # fmt: skip
    assert "--app-dir" in helped.stdout and "current directory" in helped.stdout


def test_a_store_lost_mid_run_is_a_warning_while_messages_are_retried(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """The store goes away after start-up: the consumer keeps running (messages stay unacked
    and come back) and says so with a WARNING, not in silence; once the store is back, the
    message is handled."""
    stream = f"oncely-test-midrun-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(REDIS_URL)
    args = _consume_redis(tmp_path, REDIS_URL, stream)
    args[args.index("memory://")] = private_redis.url
    args += ["--lease", "2"]  # an unacked entry is claimed back after the lease
    proc = subprocess.Popen(
        args, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)}
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 20)
        assert ready and "does not exist yet" in proc.stderr.readline()
        private_redis.stop()
        client.xadd(stream, {"id": "m-1", "body": b"{}"})
        ready, _, _ = select.select([proc.stderr], [], [], 20)
        line = proc.stderr.readline() if ready else ""
        assert "WARNING" in line or "store is unavailable" in line, line
        assert "store is unavailable" in line and "not acked" in line, line
        assert proc.poll() is None
        private_redis.start()
        seen = tmp_path / "seen.txt"
        deadline = time.monotonic() + 30
        while not seen.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen.read_text().split() == ["m-1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        client.delete(stream)
        client.close()
