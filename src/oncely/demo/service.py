"""Run the shop for real: 2 Uvicorn worker processes under a supervisor that restarts a dead
one (:mod:`oncely.demo.shop.serve`), plus 2 settlement-job processes, all on one work
directory, as child processes of the caller (``with Service(settings) as svc:``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from oncely.backends.urls import redact_url
from oncely.demo.shop.db import ShopDB
from oncely.demo.shop.serve import stop_all
from oncely.demo.shop.settings import Settings
from oncely.errors import OncelyError
from oncely.stores import open_store

__all__ = ["Service", "StoreDown", "StoreWatch", "check_store", "free_port"]

#: Seconds without one successful round trip to the store after which the demo stops.
STORE_DOWN_AFTER = 10.0


class StoreDown(Exception):
    """The demo's store cannot be used; ``str()`` is one line naming the URL and what to do."""


def _sentence(exc: BaseException) -> str:
    text = str(exc).rstrip()
    return text if text.endswith(".") else f"{text}."


def _advice(url: str, reachable: bool = False) -> str:
    return (
        f"{'Check' if reachable else 'Start it or check'} the URL (--store {redact_url(url)}), "
        "or leave --store out to use SQLite in the work directory"
    )


def check_store(settings: Settings) -> None:
    """Open the demo's store, create its table and make one round trip (its clock).

    :raises StoreDown: a bad URL, or a store that cannot be reached or used.
    """
    url = settings.store
    settings.workdir.mkdir(parents=True, exist_ok=True)  # the default SQLite store lives there
    try:
        store = open_store(url, **settings.store_options())
    except OncelyError as exc:
        raise StoreDown(
            f"the demo's store {redact_url(url)} cannot be used: {_sentence(exc)} "
            f"{_advice(url, True)}"
        ) from exc
    try:
        store.init_schema()
        store.now()
    except OncelyError as exc:
        raise StoreDown(
            f"the demo's store {redact_url(url)} cannot be reached: {_sentence(exc)} {_advice(url)}"
        ) from exc
    finally:
        store.close()


class StoreWatch:
    """Watch the demo's store from the demo's process: one round trip (its clock) a second, on
    a thread of its own. :meth:`problem` is ``None`` while the store answers, and a one-line
    reason once it has not answered for ``limit`` seconds (faults such as killed connections
    last well under that). Use as a context manager."""

    def __init__(self, settings: Settings, limit: float = STORE_DOWN_AFTER) -> None:
        self.url = settings.store
        self.limit = limit
        self._options = settings.store_options()
        self._last_ok = time.monotonic()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oncely-demo-store-watch")
        self._thread.daemon = True

    def _run(self) -> None:
        store = None
        while not self._stop.is_set():
            try:
                if store is None:
                    store = open_store(self.url, **self._options)
                store.now()
                self._last_ok = time.monotonic()
            except Exception as exc:  # anything: the store is not answering
                self._error = exc
            self._stop.wait(1.0)
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def problem(self) -> str | None:
        """``None`` while the store answers; else why the demo stops (one line)."""
        silent = time.monotonic() - self._last_ok
        if silent < self.limit:
            return None
        return (
            f"the demo's store {redact_url(self.url)} has not answered for {silent:.0f} s "
            f"({str(self._error).rstrip('.')}); the demo stopped. {_advice(self.url)}"
        )

    def __enter__(self) -> StoreWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


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


def _ended(code: int) -> str:
    """How a process ended, from its ``Popen.returncode``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stop_group(pgid: int, timeout: float) -> None:
    """SIGTERM what is left in process group ``pgid`` (the shop's supervisor's: workers it
    left behind when it died), SIGKILL it after ``timeout`` seconds."""
    try:
        os.killpg(pgid, signal.SIGCONT)
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return  # nobody left (the usual case: the supervisor stopped its workers)
    except PermissionError:  # pragma: no cover - the group id was taken by another user's
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


class Service:
    """The shop service: start, find its processes, stop (and clean up its store data).

    The supervisor runs in a session (and process group) of its own, with its workers: a
    supervisor that dies leaves no worker behind once :meth:`stop` ran, and the supervisor and
    the settlement processes stop themselves when the process that started them is gone.
    """

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
        parent = str(os.getpid())
        self.server = subprocess.Popen(
            [
                sys.executable, "-m", "oncely.demo.shop.serve",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
                "--parent", parent,
            ],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.settlers = [
            subprocess.Popen(
                [sys.executable, "-m", "oncely.demo.shop.settler", "--parent", parent],
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
                raise RuntimeError(
                    f"the shop at {self.url} did not start: {self.problem()}; see {self.log_path}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1.0) as answer:
                    up = answer.status == 200
                if up and len(self.worker_pids()) >= self.workers:
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"the shop at {self.url} did not answer within {timeout:.0f} s; see {self.log_path}"
        )

    def worker_pids(self) -> list[int]:
        """The Uvicorn worker processes serving now (children of the supervisor)."""
        if self.server is None:
            return []
        return [p for p in _children(self.server.pid) if "--worker" in _cmdline(p)]

    def settler_pids(self) -> list[int]:
        return [p.pid for p in self.settlers if p.poll() is None]

    def problem(self) -> str | None:
        """``None`` while the shop's supervisor and settlement processes run (a worker that
        dies is replaced); else which one ended and how, e.g. ``its supervisor (pid 7) was
        killed by SIGKILL``."""
        named = [("supervisor", self.server), *(("settlement process", p) for p in self.settlers)]
        for name, proc in named:
            if proc is not None and (code := proc.poll()) is not None:
                return f"its {name} (pid {proc.pid}) {_ended(code)}"
        return None

    def stop(self) -> None:
        stop_all([p for p in [self.server, *self.settlers] if p is not None], timeout=15)
        if self.server is not None:
            _stop_group(self.server.pid, timeout=10)
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
