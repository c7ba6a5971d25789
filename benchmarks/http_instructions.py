"""Instructions per request of the HTTP benchmark's servers, counted with callgrind.

    .venv/bin/python benchmarks/http_instructions.py [--variants bare,oncely-memory,oncely-redis]
                                    [--requests 200,1200] [--concurrency 32] [--src DIR]

Wall-clock rates on a shared 2-core machine move by 2x between rounds; the number of machine
instructions a server executes per request does not. Each variant's server (the one
``benchmarks/http_middleware.py`` runs: one Uvicorn worker, a Starlette ``POST /orders``,
a fresh ``Idempotency-Key`` on every request) runs under ``valgrind --tool=callgrind`` twice,
serving the two request counts of ``--requests`` over ``--concurrency`` keep-alive
connections, and then stops; the difference of the two totals divided by the difference of
the counts is the cost of one request, start-up and shutdown cancelled out. ``--src`` runs the
oncely of another checkout's ``src`` folder (e.g. ``/work/main/src``) for a before/after.
Python's hash seed is fixed (``PYTHONHASHSEED=0``) so two runs execute the same code paths.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from http_middleware import cleanup_redis, free_port, next_response, request_bytes

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


class _Counted(asyncio.Protocol):
    """One keep-alive connection sending requests back to back until the shared budget is
    spent."""

    def __init__(self, port: int, budget: list[int], done: asyncio.Future[None]) -> None:
        self.port = port
        self.budget = budget
        self.done = done
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.outstanding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if self.budget[0] <= 0:
            self.outstanding = False
            self.transport.close()
            return
        self.budget[0] -= 1
        self.outstanding = True
        self.transport.write(request_bytes(self.port))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            framed = next_response(self.buffer)
            if framed is None:
                return
            status, self.buffer = framed
            if status not in (200, 201):
                raise SystemExit(f"unexpected reply status {status}")
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _load(port: int, requests: int, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    budget = [requests]
    closed: list[asyncio.Future[None]] = []
    for _ in range(concurrency):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(lambda d=done: _Counted(port, budget, d), "127.0.0.1", port)
        closed.append(done)
    await asyncio.wait_for(asyncio.gather(*closed), timeout=1800)


def _wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            asyncio.run(_load(port, 1, 1))
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def count(variant: str, requests: int, args: argparse.Namespace, folder: str) -> int:
    """Total instructions (Ir) of one server run that served ``requests`` (+1 probe)."""
    port = free_port()
    tag = uuid.uuid4().hex[:8]
    out = Path(folder) / f"callgrind.{variant}.{requests}.{tag}"
    src = args.src or str(ROOT / "src")
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
         sys.executable, str(HERE / "http_middleware.py"), "--serve", variant,
         "--port", str(port), "--tag", tag, "--folder", folder],
        env={**os.environ, "PYTHONPATH": src, "PYTHONHASHSEED": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_ready(port, process)
        asyncio.run(_load(port, requests, args.concurrency))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(600)
        cleanup_redis(tag)
    text = out.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if found is None:
        raise SystemExit(f"no totals in {out}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="bare,oncely-memory,oncely-redis")
    parser.add_argument("--requests", default="200,1200", help="two request counts")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--src", help="the src folder of another checkout to count instead")
    args = parser.parse_args()
    low, high = (int(n) for n in args.requests.split(","))
    with tempfile.TemporaryDirectory() as folder:
        for variant in [v for v in args.variants.split(",") if v]:
            small = count(variant, low, args, folder)
            large = count(variant, high, args, folder)
            per = (large - small) / (high - low)
            print(f"{variant:24s} {per / 1000:8.0f}k instructions/request", flush=True)


if __name__ == "__main__":
    main()
