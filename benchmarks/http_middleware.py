"""HTTP benchmark: a trivial POST endpoint, bare and behind idempotency middlewares.

    .venv/bin/python benchmarks/http_middleware.py [--seconds 4] [--rounds 3] [--concurrency 32]
                                        [--client raw|httpx] [--write-docs]

Each variant runs in its own Uvicorn process (one worker; Starlette app, ``POST /orders``
answering 201 JSON): ``bare``; oncely's ASGI middleware on ``memory://``, SQLite and Redis;
``oncely-sqlite-normal`` (SQLite with ``?synchronous=NORMAL``: no fsync per commit);
``oncely-redis-nopipe`` (the Redis store with ``autopipeline=False``, as before
auto-pipelining); and, on the same Redis in the same run, idemkit's and
asgi-idempotency-header's middlewares.
Every request carries a fresh ``Idempotency-Key``, so each one is a first execution (claim,
run, store), the path whose cost matters.

Every variant's server is started once, up front (an idle server costs no CPU). The load
generator keeps ``--concurrency`` HTTP/1.1 keep-alive connections busy for ``--seconds`` after
``--warmup`` seconds (default 1), per variant and round; variants are interleaved over
rounds (each round in another order) and the median round is reported (latency percentiles over
all rounds). A ratio between two variants is the median of its per-round ratios: the two ran
seconds apart in each round, so a busy spell of this shared machine hits both.
``--compare-src DIR`` also runs every ``oncely-*`` variant from the ``src`` folder of another
checkout (``oncely-redis@base``), for a before/after comparison within one run. ``--client raw``
(default) speaks HTTP/1.1 on asyncio protocols; ``--client httpx`` uses an ``httpx`` pool,
which on this 2-core machine tops out near 500 requests/s by itself and so measures the client
more than the servers. ``--write-docs`` replaces the ``## HTTP`` section of
``docs/performance.md``. ``--gc`` also reports each server's garbage collections (per 1,000
requests and generation) and the CPU time they took per request, over each round (warm-up
included); the servers then count their requests in one more ASGI frame.

``--pin`` gives each server one CPU of its own (CPU 0) and puts the load generator and a private
``redis-server`` (started for the run, unless ``ONCELY_BENCH_REDIS`` names one) on the other
(CPU 1), as HTTP servers are measured with the load generator kept off the server's cores. On
this 2-core machine, without it, the server, the load generator and Redis take turns on both
cores, so a server's requests/s also pays for the others' work and ratios shrink towards 1;
with it, a server's requests/s is what one core of it serves. Both are reported as measured.
A ratio is also given by server CPU per request (the inverse ratio of the CPU time), which the
sharing of cores moves less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from docs_section import PERFORMANCE_MD, write_section
from harness import free_port, private_redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("ONCELY_BENCH_REDIS", "redis://127.0.0.1:6379/0")
SERVER_CPUS, LOAD_CPUS = {0}, {1}  # --pin
VARIANTS = [
    "bare",
    "oncely-memory",
    "oncely-sqlite",
    "oncely-sqlite-normal",
    "oncely-redis",
    "oncely-redis-nopipe",
    "idemkit-redis",
    "asgi-idempotency-header-redis",
]
BODY = b'{"item": "book", "quantity": 1}'
Server = tuple[int, "subprocess.Popen[bytes]"]


# -- the server side ------------------------------------------------------------------------------
def build_app(variant: str, tag: str, folder: str) -> Any:
    """The ASGI app of one variant (imported in the server process only)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def create_order(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"order": "o-1", "status": "created"}, status_code=201)

    app: Any = Starlette(routes=[Route("/orders", create_order, methods=["POST"])])
    if variant == "bare":
        return app
    if variant.startswith("oncely-"):
        from oncely.http import GLOBAL, IdempotencyConfig, IdempotencyMiddleware
        from oncely.stores import open_store

        kind = variant.split("-", 1)[1]
        if kind == "memory":
            store = open_store("memory://")
        elif kind == "sqlite":  # the default, synchronous=FULL: one fsync per commit
            store = open_store(f"sqlite:///{folder}/bench-{tag}.db")
        elif kind == "sqlite-normal":  # WAL's NORMAL: no fsync per commit (power-cut window)
            store = open_store(f"sqlite:///{folder}/bench-{tag}-n.db?synchronous=NORMAL")
        elif kind == "redis-nopipe":  # before auto-pipelining, for a same-run comparison
            store = open_store(REDIS_URL, prefix=f"bench-{tag}", autopipeline=False)
        else:
            store = open_store(REDIS_URL, prefix=f"bench-{tag}")
        # one key space, as idemkit's single_tenant mode below
        return IdempotencyMiddleware(app, IdempotencyConfig(store=store, scope=GLOBAL))
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    if variant == "idemkit-redis":
        import idemkit

        return idemkit.IdempotencyMiddleware(
            app,
            backend=idemkit.RedisBackend(client, namespace=f"bench-{tag}"),
            config=idemkit.HttpConfig(scope_mode="single_tenant", require_key_for_mutations=True),
        )
    if variant == "asgi-idempotency-header-redis":
        from idempotency_header_middleware import IdempotencyHeaderMiddleware
        from idempotency_header_middleware.backends.redis import RedisBackend

        backend = RedisBackend(
            client, keys_key=f"bench-{tag}:keys", response_key=f"bench-{tag}:resp:"
        )
        return IdempotencyHeaderMiddleware(app, backend=backend)
    raise SystemExit(f"unknown variant {variant!r}")


def gc_counted(app: Any, path: str) -> Any:
    """``app``, counting its requests and this process's garbage collections; SIGUSR1 writes
    them to ``path`` (JSON, replaced atomically)."""
    import gc
    import json

    stats: dict[str, Any] = {"requests": 0, "collections": [0, 0, 0], "seconds": [0.0] * 3}
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            stats["collections"][info["generation"]] += 1
            stats["seconds"][info["generation"]] += time.perf_counter() - started[0]

    def dump(*_: Any) -> None:
        with open(path + ".tmp", "w") as out:
            json.dump(stats, out)
        os.replace(path + ".tmp", path)

    gc.callbacks.append(on_gc)
    signal.signal(signal.SIGUSR1, dump)

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            stats["requests"] += 1
        await app(scope, receive, send)

    return counted


def gc_stats(server: Server, folder: str) -> dict[str, Any]:
    """Ask a ``--gc`` server for its counts (SIGUSR1) and wait until it has written them."""
    import json

    path = Path(folder) / f"gc-{server[0]}.json"
    path.unlink(missing_ok=True)
    os.kill(server[1].pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the server did not write its garbage collection counts")
        time.sleep(0.01)
    stats: dict[str, Any] = json.loads(path.read_text())
    return stats


def serve(variant: str, port: int, tag: str, folder: str, gc_path: str | None = None) -> None:
    import logging

    import uvicorn

    logging.getLogger("idemkit").setLevel(logging.ERROR)
    app = build_app(variant, tag, folder)
    uvicorn.run(
        gc_counted(app, gc_path) if gc_path else app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )


# -- the load generator ---------------------------------------------------------------------------
def next_response(buffer: bytes) -> tuple[int, bytes] | None:
    """The status of the first whole HTTP/1.1 response in ``buffer`` (framed by its
    Content-Length) and what follows it; None until it has arrived whole."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    total = end + 4 + length
    if len(buffer) < total:
        return None
    return int(lines[0][9:12]), buffer[total:]


def request_bytes(port: int) -> bytes:
    key = uuid.uuid4()
    return (
        f"POST /orders HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f'Content-Type: application/json\r\nIdempotency-Key: "{key}"\r\n'
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending requests back to back, recording latencies."""

    def __init__(self, port: int, stats: dict[str, Any]) -> None:
        self.port = port
        self.stats = stats
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.started = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        if self.stats["stop"]:
            assert self.transport is not None
            self.transport.close()
            return
        self.started = time.perf_counter()
        assert self.transport is not None
        self.transport.write(request_bytes(self.port))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            framed = next_response(self.buffer)
            if framed is None:
                return
            status, self.buffer = framed
            if self.stats["measure"]:
                self.stats["latencies"].append(time.perf_counter() - self.started)
                self.stats["statuses"][status] = self.stats["statuses"].get(status, 0) + 1
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def load_raw(
    port: int, concurrency: int, seconds: float, warmup: float, cpu: Callable[[], float]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"stop": False, "measure": False, "latencies": [], "statuses": {}}
    connections = []
    for _ in range(concurrency):
        _, protocol = await loop.create_connection(
            lambda: _Connection(port, stats), "127.0.0.1", port
        )
        connections.append(protocol)
    await asyncio.sleep(warmup)
    stats["measure"] = True
    started, cpu_started = time.perf_counter(), cpu()
    await asyncio.sleep(seconds)
    stats["measure"] = False
    elapsed, stats["cpu"] = time.perf_counter() - started, cpu() - cpu_started
    stats["stop"] = True
    await asyncio.wait([c.closed for c in connections], timeout=10)
    return {"elapsed": elapsed, **stats}


async def load_httpx(
    port: int, concurrency: int, seconds: float, warmup: float, cpu: Callable[[], float]
) -> dict[str, Any]:
    import httpx

    stats: dict[str, Any] = {"stop": False, "measure": False, "latencies": [], "statuses": {}}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:

        async def worker() -> None:
            while not stats["stop"]:
                started = time.perf_counter()
                reply = await client.post(
                    "/orders",
                    content=BODY,
                    headers={
                        "Idempotency-Key": f'"{uuid.uuid4()}"',
                        "Content-Type": "application/json",
                    },
                )
                if stats["measure"]:
                    stats["latencies"].append(time.perf_counter() - started)
                    code = reply.status_code
                    stats["statuses"][code] = stats["statuses"].get(code, 0) + 1

        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        stats["measure"] = True
        started, cpu_started = time.perf_counter(), cpu()
        await asyncio.sleep(seconds)
        stats["measure"] = False
        elapsed, stats["cpu"] = time.perf_counter() - started, cpu() - cpu_started
        stats["stop"] = True
        await asyncio.gather(*tasks)
    return {"elapsed": elapsed, **stats}


# -- orchestration --------------------------------------------------------------------------------
def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(request_bytes(port))
                if sock.recv(12)[9:12] in (b"201", b"200"):
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def start_server(variant: str, args: argparse.Namespace, tag: str, folder: str) -> Server:
    """Start ``variant``'s server (``name@base``: from ``--compare-src``) and wait until it
    answers."""
    port = free_port()
    name, _, base = variant.partition("@")
    source = args.compare_src if base else str(ROOT / "src")
    gc_path = ["--gc-path", f"{folder}/gc-{port}.json"] if args.gc else []
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", name, "--port", str(port), "--tag", tag,
         "--folder", folder, *gc_path],
        env={**os.environ, "PYTHONPATH": source},
        start_new_session=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, SERVER_CPUS)) if args.pin else None,
    )  # fmt: skip
    try:
        wait_ready(port, process)
    except BaseException:
        stop_server((port, process))
        raise
    return port, process


def stop_server(server: Server) -> None:
    process = server[1]
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def run_variant(variant: str, server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Load ``variant``'s running server for one round."""
    load = load_raw if args.client == "raw" else load_httpx
    pid = server[1].pid
    result = asyncio.run(
        load(server[0], args.concurrency, args.seconds, args.warmup, lambda: cpu_seconds(pid))
    )
    count = len(result["latencies"])
    bad = {code: n for code, n in result["statuses"].items() if code not in (200, 201)}
    if bad:
        print(f"  warning: {variant} answered {bad}", file=sys.stderr)
    return {
        "rps": count / result["elapsed"],
        "latencies": result["latencies"],
        "cpu_us": result["cpu"] / max(count, 1) * 1e6,
    }


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process ``pid`` has used so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cleanup_redis(tag: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for pattern in (f"bench-{tag}*", f"*bench-{tag}*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    client.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of load before each measured slice"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--compare-src",
        help="the src folder of another checkout: its oncely-* variants run too (name@base)",
    )
    parser.add_argument(
        "--gc", action="store_true", help="report the servers' garbage collections per round"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="servers on CPU 0; the load generator and a private redis-server on CPU 1",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--gc-path", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.tag, args.folder, args.gc_path)
        return

    with contextlib.ExitStack() as stack:
        if args.pin:
            if len(os.sched_getaffinity(0)) < 2:
                raise SystemExit("--pin needs two CPUs")
            os.sched_setaffinity(0, LOAD_CPUS)
            if "ONCELY_BENCH_REDIS" not in os.environ:
                url = stack.enter_context(private_redis(LOAD_CPUS))
                os.environ["ONCELY_BENCH_REDIS"] = url  # the servers read it
                global REDIS_URL
                REDIS_URL = url
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Run every variant over the rounds and print the tables."""
    variants = [v for v in args.variants.split(",") if v]
    if args.compare_src:
        variants += [f"{v}@base" for v in variants if v.startswith("oncely-")]
    rps: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    latencies: dict[str, list[float]] = {v: [] for v in variants}
    collected: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    tag = uuid.uuid4().hex[:8]
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory() as folder:
        try:
            for variant in variants:  # all up front: an idle server costs no CPU
                servers[variant] = start_server(variant, args, tag, folder)
            for round_no in range(args.rounds):
                shift = round_no % len(variants)  # each round starts with another variant
                for variant in variants[shift:] + variants[:shift]:
                    before = gc_stats(servers[variant], folder) if args.gc else None
                    result = run_variant(variant, servers[variant], args)
                    if before is not None:
                        collected[variant].append(
                            gc_delta(before, gc_stats(servers[variant], folder))
                        )
                    rps[variant].append(result["rps"])
                    latencies[variant].extend(result["latencies"])
                    cpu[variant].append(result["cpu_us"])
                    print(
                        f"round {round_no + 1}: {variant:32s} {result['rps']:8.0f} req/s "
                        f"{result['cpu_us']:6.0f} µs server CPU/request",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                stop_server(server)
            cleanup_redis(tag)

    median = {v: statistics.median(rps[v]) for v in variants}
    bare = median.get("bare")
    table = [
        "| variant | requests/s | p50 ms | p99 ms | vs bare | server CPU µs/request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        ratio = f"{median[variant] / bare:.2f}x" if bare else "n/a"
        p50 = percentile(latencies[variant], 0.5) * 1000
        p99 = percentile(latencies[variant], 0.99) * 1000
        used = statistics.median(cpu[variant])
        table.append(
            f"| {variant} | {median[variant]:.0f} | {p50:.1f} | {p99:.1f} | {ratio} | {used:.0f} |"
        )
    targets = [
        ("oncely-redis / idemkit-redis", "oncely-redis", "idemkit-redis", 1.5),
        (
            "oncely-redis / asgi-idempotency-header-redis",
            "oncely-redis",
            "asgi-idempotency-header-redis",
            1.3,
        ),
        ("oncely-redis / bare", "oncely-redis", "bare", 0.5),
        ("oncely-sqlite / bare", "oncely-sqlite", "bare", 0.3),
        ("oncely-sqlite-normal / bare", "oncely-sqlite-normal", "bare", 0.0),
        ("oncely-redis / oncely-redis-nopipe", "oncely-redis", "oncely-redis-nopipe", 1.0),
    ]
    targets += [
        (f"{v.partition('@')[0]} / {v} (this code / base)", v.partition("@")[0], v, 0.0)
        for v in variants
        if v.endswith("@base")
    ]
    ratios = [
        "| ratio (median of per-round ratios) | requests/s | per round | by server CPU | target |",
        "|---|---:|---|---:|---:|",
    ]
    for label, a, b, goal in targets:
        if a in median and b in median:
            per_round = [x / y for x, y in zip(rps[a], rps[b], strict=True)]
            value = statistics.median(per_round)
            by_cpu = statistics.median(y / x for x, y in zip(cpu[a], cpu[b], strict=True))
            rounds = ", ".join(f"{r:.2f}" for r in per_round)
            mark = "" if not goal else f"≥ {goal}x ({'met' if value >= goal else 'NOT met'})"
            ratios.append(f"| {label} | {value:.2f}x | {rounds} | {by_cpu:.2f}x | {mark} |")
    text = "\n".join(table) + "\n\n" + "\n".join(ratios) + "\n"
    if args.gc:
        text += "\n" + gc_table(variants, collected)
    print()
    print(text)
    if args.write_docs:
        write_docs(text, args)


def gc_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    requests = max(after["requests"] - before["requests"], 1)
    return {
        "per_1000": [
            (a - b) * 1000 / requests
            for a, b in zip(after["collections"], before["collections"], strict=True)
        ],
        "us": (sum(after["seconds"]) - sum(before["seconds"])) / requests * 1e6,
    }


def gc_table(variants: list[str], collected: dict[str, list[dict[str, Any]]]) -> str:
    """The servers' garbage collections (medians over rounds, warm-up included)."""
    lines = [
        "| variant | collections per 1,000 requests (gen 0 / 1 / 2) | GC µs/request |",
        "|---|---|---:|",
    ]
    for variant in variants:
        rounds = collected[variant]
        if not rounds:
            continue
        gens = " / ".join(
            f"{statistics.median(r['per_1000'][g] for r in rounds):.0f}" for g in range(3)
        )
        us = statistics.median(r["us"] for r in rounds)
        lines.append(f"| {variant} | {gens} | {us:.0f} |")
    return "\n".join(lines) + "\n"


def write_docs(text: str, args: argparse.Namespace) -> None:
    import redis
    from redis.utils import HIREDIS_AVAILABLE as hiredis

    version = redis.Redis.from_url(REDIS_URL).info("server")["redis_version"]
    chosen = f" --variants {args.variants}" if args.variants != ",".join(VARIANTS) else ""
    chosen += f" --compare-src {args.compare_src}" if args.compare_src else ""
    chosen += " --pin" if args.pin else ""
    placement = (
        "each server pinned to CPU 0, the load generator and a private Redis pinned to CPU 1 "
        "(`--pin`), other sessions free to use both"
        if args.pin
        else "CPUs shared by the server, the load generator, the stores and other sessions"
    )
    section = (
        "## HTTP (`benchmarks/http_middleware.py`)\n\n"
        f"`.venv/bin/python benchmarks/http_middleware.py --seconds {args.seconds:g} "
        f"--warmup {args.warmup:g} --rounds {args.rounds} --concurrency {args.concurrency} "
        f"--client {args.client}{chosen} --write-docs`, run "
        f"{time.strftime('%Y-%m-%d')} on {platform.machine()} / Python "
        f"{platform.python_version()} / Redis {version} / redis-py {redis.__version__} "
        f"({'with' if hiredis else 'without'} hiredis), {os.cpu_count()} {placement}. "
        "One Uvicorn worker (h11, "
        "asyncio loop) per variant, all started up front, a Starlette `POST /orders` "
        "answering 201 JSON, every request with a new `Idempotency-Key` (so every request is "
        f"a first execution: claim, run, store), {args.concurrency} keep-alive connections; "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s per variant (each round in "
        "another order), requests/s the median round, each ratio the median of its per-round "
        "ratios, server CPU the median over rounds of the server process's user + system "
        "time per request.\n\n"
        f"{text}\n"
        "What the middlewares do per request: oncely parses the key as a Structured Field, "
        "fingerprints method, path, query and body, then makes one `claim` and one `complete` "
        "round trip (two Lua scripts on Redis), storing status, headers and body. idemkit "
        "also makes two script round trips (claim, complete with a publish) with JSON and "
        "base64 encoding around them. asgi-idempotency-header makes six plain commands (GET, "
        "SADD, SET, SET, EXPIRE, EXPIRE) and stores only JSON bodies (`redis-cli monitor` "
        "shows these per request).\n\n"
        "How to read it: the server process is the bound (one Uvicorn worker on one core), "
        "so the server CPU column is the steady figure, and requests/s follow it when the "
        "machine is quiet; on this shared machine other sessions' load moves single rounds "
        "by 2x or more, which is why ratios are taken within a round. "
        "See [Redis under concurrency](#redis-under-concurrency) for where the time goes.\n"
    )
    write_section("http", section)
    print(f"wrote the ## HTTP section of {PERFORMANCE_MD}")


if __name__ == "__main__":
    main()
