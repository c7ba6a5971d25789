"""How long a stalled Redis holds an HTTP response while oncely stores it (docs/http.md).

Starts its own ``redis-server`` on PORT, runs one keyed request through the WSGI middleware
whose handler pauses Redis (SIGSTOP) before it responds, and prints how long the response
took to come back. Usage: ``python tools/http_store_stall.py PORT SOCKET_TIMEOUT``.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from oncely.http import GLOBAL, IdempotencyConfig, WSGIIdempotencyMiddleware
from oncely.stores import open_store


def main() -> None:
    port, timeout = int(sys.argv[1]), sys.argv[2]
    command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    redis = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    resume = threading.Timer(40, os.kill, (redis.pid, signal.SIGCONT))
    resume.daemon = True
    try:
        store = open_store(f"redis://127.0.0.1:{port}/0?socket_timeout={timeout}")

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            os.kill(redis.pid, signal.SIGSTOP)  # the store stalls while the handler finishes
            resume.start()
            start_response("201 Created", [("Content-Type", "text/plain")])
            return [b"done"]

        config = IdempotencyConfig(store=store, scope=GLOBAL, lease=60)
        middleware = WSGIIdempotencyMiddleware(app, config)
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/x",
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "CONTENT_LENGTH": "0",
            "wsgi.input": io.BytesIO(b""),
            "wsgi.url_scheme": "http",
            "HTTP_IDEMPOTENCY_KEY": f'"{uuid.uuid4()}"',
        }
        started = time.monotonic()
        body = b"".join(middleware(environ, lambda status, headers, exc_info=None: None))
        held = time.monotonic() - started
        print(f"socket_timeout={timeout}: response held {held:.1f} s ({body!r})")
    finally:
        resume.cancel()
        os.kill(redis.pid, signal.SIGCONT)
        redis.kill()
        redis.wait()


if __name__ == "__main__":
    main()
