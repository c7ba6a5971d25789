"""Counting real handler executions, in process (``calls``) and across server worker
processes (one line per execution appended to the file ``$SERVER_APP_LOG`` names)."""

from __future__ import annotations

import os

calls: dict[str, int] = {}


def count(name: str) -> int:
    """Count one execution of ``name``; returns how many this process has seen."""
    calls[name] = calls.get(name, 0) + 1
    log = os.environ.get("SERVER_APP_LOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
    return calls[name]
