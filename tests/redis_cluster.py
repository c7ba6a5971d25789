"""A real Redis Cluster for the tests: six ``redis-server`` processes (3 masters, 3 replicas)
on loopback ports, made into a cluster with ``redis-cli --cluster create`` and torn down at the
end of the test session. Started once, on first use (:func:`cluster_url`)."""

from __future__ import annotations

import atexit
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time

_lock = threading.Lock()
_cluster: RedisCluster | None = None


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    """``count`` consecutive-free ports whose cluster bus ports (+10000) are free too."""
    for _ in range(200):
        base = random.randrange(20000, 45000, 10)
        ports = list(range(base, base + count))
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports
    raise RuntimeError("no free ports for a Redis Cluster")


def _cli(port: int, *args: str, timeout: float = 10) -> str:
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out.stdout


class RedisCluster:
    """Six nodes, 3 masters with one replica each, no persistence."""

    def __init__(self) -> None:
        self.ports = _ports(6)
        self.dir = tempfile.mkdtemp(prefix="oncely-cluster-")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server / redis-cli are not installed")
        for port in self.ports:
            self.procs[port] = subprocess.Popen(
                [
                    binary,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", "2000",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", self.dir,
                    "--protected-mode", "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        for port in self.ports:
            while "PONG" not in _cli(port, "PING"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start")
                time.sleep(0.05)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node says ``cluster_state:ok``, all 16384 slots are served and every
        replica's link to its master is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = [p for p in self.ports if p in self.procs]
            infos = [_cli(p, "CLUSTER", "INFO") for p in ports]
            links = [_cli(p, "INFO", "replication") for p in ports]
            if all(
                "cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos
            ) and all("role:master" in r or "master_link_status:up" in r for r in links):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ready")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def cluster_url() -> str:
    """The URL of the session's cluster, started on first use and stopped at exit."""
    global _cluster
    with _lock:
        if _cluster is None:
            cluster = RedisCluster()
            try:
                cluster.start()
            except BaseException:
                cluster.stop()
                raise
            atexit.register(cluster.stop)
            _cluster = cluster
        return _cluster.url


class RedisServer:
    """One ``redis-server`` of our own on a free loopback port (no persistence), for what must
    never be done to the shared Redis: replicas, ``maxmemory``, ``DEBUG SLEEP``,
    ``CLIENT PAUSE``. ``args`` are extra server options (``"--maxmemory", "2mb"``)."""

    def __init__(self, *args: str, replica_of: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server / redis-cli are not installed")
        self.port = _ports(1)[0]
        self.dir = tempfile.mkdtemp(prefix="oncely-redis-")
        extra = list(args)
        if replica_of is not None:
            extra += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no",
             "--repl-diskless-sync-delay", "0", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while "PONG" not in _cli(self.port, "PING"):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        return _cli(self.port, *args)

    def wait_replicas(self, count: int, timeout: float = 10) -> None:
        """Until ``count`` replicas acknowledge a write (``WAIT`` after a ``SET`` on one
        connection): a replica that just synced answers ``WAIT`` only after its first ack."""
        import redis

        client = redis.Redis(port=self.port, single_connection_client=True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                client.set("oncely-test-probe", "1")
                if client.execute_command("WAIT", count, 100) >= count:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count} replicas did not connect to port {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
