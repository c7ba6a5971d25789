"""``oncely consume``: a handler module run as an idempotent consumer from the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from conftest import REDIS_URL

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
