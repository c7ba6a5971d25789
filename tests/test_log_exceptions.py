"""Log lines name an exception by its type and message (oncely.core.observe.describe).

``log.warning("... (%s)", exc)`` with ``exc = TimeoutError()`` wrote ``()``: no type, no
message. Every log call in oncely passes an exception through ``describe`` instead, checked
here over the whole source tree (a new log line that formats a bare exception fails this test),
and on one real path: a WSGI request whose body stream fails with a message-less OSError.
"""

from __future__ import annotations

import ast
import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.core.observe import describe
from oncely.http import GLOBAL, IdempotencyConfig
from oncely.http.wsgi import WSGIIdempotencyMiddleware

SOURCE = Path(oncely.__file__).parent
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_describe_names_the_type_and_the_message() -> None:
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(asyncio.CancelledError()) == "CancelledError"
    assert describe(ValueError("bad value")) == "ValueError: bad value"
    assert describe(OSError(104, "Connection reset by peer")) == (
        "ConnectionResetError: [Errno 104] Connection reset by peer"
    )
    assert describe(Unprintable()) == "Unprintable: <message unavailable>"


def bare_exceptions_in_log_calls(path: Path) -> list[str]:
    """``file:line: name`` of every log call (``log.<level>(...)``, ``logger.<level>(...)``) in
    ``path`` that passes an ``except ... as name`` variable itself as a format argument."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    handlers = {h.name for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.name}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in LEVELS:
            continue
        base = node.func.value
        name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
        if "log" not in name.lower():
            continue
        for arg in node.args[1:]:
            if isinstance(arg, ast.Name) and arg.id in handlers:
                found.append(f"{path.relative_to(SOURCE)}:{node.lineno}: {arg.id}")
    return found


def test_no_log_call_formats_a_bare_exception() -> None:
    found = [
        hit for path in sorted(SOURCE.rglob("*.py")) for hit in bare_exceptions_in_log_calls(path)
    ]
    assert not found, "pass exceptions to log calls as describe(exc):\n" + "\n".join(found)


class FailingStream(io.RawIOBase):
    def read(self, size: int = -1) -> bytes:
        raise OSError()  # a dropped client, as some servers report it: no message at all


def test_a_failed_body_read_is_logged_with_the_exception_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("201 Created", [("Content-Type", "application/json")])
        return [b"{}"]

    middleware = WSGIIdempotencyMiddleware(app, IdempotencyConfig(store="memory://", scope=GLOBAL))
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/orders",
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "10",
        "HTTP_IDEMPOTENCY_KEY": "k-1",
        "wsgi.input": FailingStream(),
    }
    statuses: list[str] = []
    with caplog.at_level(logging.INFO, logger="oncely"):
        b"".join(middleware(environ, lambda status, headers, *exc: statuses.append(status)))
    assert statuses and statuses[0].startswith("400"), statuses
    lines = [r.getMessage() for r in caplog.records if "reading the request body" in r.getMessage()]
    assert lines == ["oncely.http: reading the request body failed: OSError"], lines
