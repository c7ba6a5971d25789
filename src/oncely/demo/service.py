"""Run the shop for real: 2 Uvicorn worker processes under a supervisor that restarts a dead
one (:mod:`oncely.demo.shop.serve`), plus 2 settlement-job processes, all on one work
directory, as child processes of the caller (``with Service(settings) as svc:``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from oncely.demo.shop.db import ShopDB
from oncely.demo.shop.serve import stop_all
from oncely.demo.shop.settings import Settings
from oncely.stores import open_store

__all__ = ["Service", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Service:
    """The shop service: start, find its processes, stop (and clean up its store data)."""

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int = 2,
        settlers: int = 2,
        port: int | None = None,
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.settler_count = settlers
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: subprocess.Popen[bytes] | None = None
        self.settlers: list[subprocess.Popen[bytes]] = []
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.settings.workdir / "service.log"

    def start(self, timeout: float = 60.0) -> None:
        self.settings.workdir.mkdir(parents=True, exist_ok=True)
        db = ShopDB(self.settings.shop_db)
        db.create()
        db.close()
        if self.settings.protected:
            store = open_store(self.settings.store, **self.settings.store_options())
            try:
                store.init_schema()
            finally:
                store.close()
        env = {**os.environ, **self.settings.to_env()}
        self._log = self.log_path.open("ab")
        self.server = subprocess.Popen(
            [
                sys.executable, "-m", "oncely.demo.shop.serve",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
            ],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.settlers = [
            subprocess.Popen(
                [sys.executable, "-m", "oncely.demo.shop.settler"],
                env=env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            for _ in range(self.settler_count)
        ]
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server is not None and self.server.poll() is not None:
                raise RuntimeError(f"the shop did not start; see {self.log_path}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1.0) as answer:
                    up = answer.status == 200
                if up and len(self.worker_pids()) >= self.workers:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the shop did not answer within {timeout:.0f} s; see {self.log_path}")

    def worker_pids(self) -> list[int]:
        """The Uvicorn worker processes serving now (children of the supervisor)."""
        if self.server is None:
            return []
        return [p for p in _children(self.server.pid) if "--worker" in _cmdline(p)]

    def settler_pids(self) -> list[int]:
        return [p.pid for p in self.settlers if p.poll() is None]

    def stop(self) -> None:
        stop_all([p for p in [self.server, *self.settlers] if p is not None], timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.cleanup_store()

    def cleanup_store(self) -> None:
        """Drop what this run left on a shared server (its own tables / key prefix only)."""
        s = self.settings
        if not s.protected or s.scheme == "sqlite":
            return
        with contextlib.suppress(Exception):
            if s.scheme in ("postgresql", "postgres"):
                import psycopg

                with psycopg.connect(s.store, autocommit=True) as conn:
                    for table in (f"{s.tag}_records", f"{s.tag}_locks", f"{s.tag}_dedup"):
                        conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            elif s.scheme in ("mysql", "mariadb"):
                store = open_store(s.store, **s.store_options())
                store.close()
            elif s.scheme in ("redis", "rediss"):
                import redis

                client = redis.Redis.from_url(s.store)
                try:
                    keys = list(client.scan_iter(match=f"{s.tag}:*", count=1000))
                    for start in range(0, len(keys), 500):
                        client.delete(*keys[start : start + 500])
                finally:
                    client.close()

    def __enter__(self) -> Service:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
