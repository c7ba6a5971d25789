"""Serve the shop with N Uvicorn worker processes and restart any that dies.

``python -m oncely.demo.shop.serve --port 8000 --workers 2`` (settings from the
``ONCELY_DEMO_*`` environment). Each worker binds the port itself with ``SO_REUSEPORT`` (the
kernel spreads connections over the workers) on a socket created as ``IPPROTO_TCP``.

Why not ``uvicorn --workers 2``: its supervisor hands the workers a socket created without a
protocol number, so asyncio does not set ``TCP_NODELAY`` on accepted connections, and every
keep-alive response waits ~40 ms for a delayed ACK (Nagle; measured here with Uvicorn 0.54:
0.8 ms with one worker, 43 ms with two). This supervisor does what Uvicorn's does otherwise:
it replaces a dead worker within ~0.2 s, and stops all workers on SIGTERM/SIGINT.

A worker stops itself once its supervisor is gone (SIGKILLed, say), and so does the supervisor
once the process named by ``--parent`` is (the demo passes its own pid): no worker is left
serving the port on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

__all__ = ["exit_with_parent", "main", "stop_all"]

APP = "oncely.demo.shop.app:create_app"


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def exit_with_parent(parent: int, interval: float = 0.2) -> None:
    """SIGTERM this process (its own handler stops it) once its parent is no longer ``parent``:
    the parent died and this process was handed to another (init, a subreaper)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="oncely-demo-parent-watch", daemon=True).start()


def worker(host: str, port: int, parent: int | None = None) -> None:
    import uvicorn

    if parent is not None:
        exit_with_parent(parent)
    config = uvicorn.Config(
        APP,
        factory=True,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[_listen(host, port)])


def supervise(host: str, port: int, workers: int) -> None:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    command = [sys.executable, "-m", "oncely.demo.shop.serve", "--worker",
               "--host", host, "--port", str(port), "--parent", str(os.getpid())]  # fmt: skip
    procs = [subprocess.Popen(command) for _ in range(workers)]
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if proc.poll() is not None and not stopping:
                print(f"worker {proc.pid} died ({proc.returncode}); starting another", flush=True)
                procs[i] = subprocess.Popen(command)
    stop_all(procs)


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGCONT (a paused process cannot exit) and SIGTERM each, then SIGKILL what is left
    after ``timeout`` seconds."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--parent", type=int, default=None, help="stop once this process (our parent) is gone"
    )
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.host, args.port, args.parent)
    else:
        if args.parent is not None:
            exit_with_parent(args.parent)
        supervise(args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
