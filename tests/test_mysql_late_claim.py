"""A MySQL/MariaDB claim the server runs after its caller gave up decides nothing (rt14, F1).

The Redis case (tests/test_redis_late_claim.py) on MariaDB: a private ``mariadbd`` is stopped
(SIGSTOP) while a call's body runs; a duplicate's claim statement is written to the socket and
its caller gives up after ``read_timeout`` (StoreUnavailable); when the server resumes it runs
the queued statement (MariaDB runs a statement whose client has since closed the connection).
Before, that late claim took the key over once the holder's lease had run out, the holder's
completion was refused and a retry ran the body again; now the statement carries a not-after
bound on the server's clock and inserts nothing past it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pymysql = pytest.importorskip("pymysql")

from oncely import idempotent  # noqa: E402
from oncely.core.records import RecordKey  # noqa: E402
from oncely.errors import InFlightError, ResultNotStored, StoreUnavailable  # noqa: E402
from oncely.stores import open_store  # noqa: E402
from oncely.stores.mysql import MySQLStore  # noqa: E402

pytestmark = pytest.mark.timeout(180)

LEASE = 2.0
BUDGET = 0.5


class MariaDB:
    """A ``mariadbd`` of our own on a free loopback port, in a temporary data directory."""

    def __init__(self) -> None:
        server, install = shutil.which("mariadbd"), shutil.which("mariadb-install-db")
        if server is None or install is None:
            pytest.skip("mariadbd / mariadb-install-db are not installed")
        self.dir = tempfile.mkdtemp(prefix="oncely-mariadb-")
        data = os.path.join(self.dir, "data")
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            [install, "--no-defaults", f"--datadir={data}", "--skip-test-db",
             "--auth-root-authentication-method=normal", *user],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
        )  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [server, "--no-defaults", f"--datadir={data}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.dir}/sock", "--skip-log-bin",
             "--innodb-buffer-pool-size=32M", *user],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # until it accepts a login (a real answer, not a guess of the time)
            try:
                conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root")
                break
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(f"mariadbd on port {self.port} did not start") from None
                time.sleep(0.05)
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE late")
        conn.close()

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/late"

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.kill()
            self.proc.wait(30)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def mariadb() -> Iterator[MariaDB]:
    server = MariaDB()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.serial
def test_a_claim_queued_in_a_paused_server_does_not_take_the_key_over(mariadb: MariaDB) -> None:
    def store() -> MySQLStore:
        s = open_store(mariadb.url, table="records", create_schema=True, read_timeout=BUDGET)
        assert isinstance(s, MySQLStore)
        return s

    holder_store = store()
    other_store = store()  # another worker's: its pooled connection open
    other_store.claim(RecordKey("warm", uuid.uuid4().hex), "", 10, 60)
    started, go = threading.Event(), threading.Event()
    runs: list[str] = []

    def make(s: MySQLStore) -> Any:
        @idempotent(
            store=s, name="late-claim", key=["k"], lease=LEASE, on_duplicate="raise",
            cache_size=0,
        )  # fmt: skip
        def op(k: str) -> str:
            runs.append(k)
            started.set()
            assert go.wait(60)
            return f"done-{len(runs)}"

        return op

    holder_op, other_op = make(holder_store), make(other_store)
    k = uuid.uuid4().hex
    first: list[Any] = []

    def holder() -> None:
        try:
            first.append(holder_op(k))
        except ResultNotStored as exc:  # its completion is stored in the background
            first.append(exc.result)
        except Exception as exc:
            first.append(exc)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert started.wait(30)
        (claimed,) = [
            r for r in holder_store.list() if r.status == "in_progress" and r.scope != "warm"
        ]
        rk = RecordKey(claimed.scope, claimed.digest)
        # The holder's renewals then need a new connection, whose handshake waits for the
        # stopped server: none is queued. (A renewal queued too would race the late claim when
        # the server resumes, one thread per connection, and could extend the lease first.)
        holder_store.close()
        mariadb.pause()
        paused_at = time.monotonic()
        try:
            for _ in range(2):  # each claim statement is written; its caller gives up
                with pytest.raises(StoreUnavailable):
                    other_op(k)
            time.sleep(max(0.0, paused_at + LEASE + 1.0 - time.monotonic()))  # past the lease
            go.set()
            thread.join(30)
            assert not thread.is_alive()
        finally:
            mariadb.resume()
        assert first and first[0] == "done-1", first
        # Until the holder's completion lands, or another caller's claim took the key over.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                record = holder_store.get(rk)
            except StoreUnavailable:
                continue
            assert record is not None
            if record.status != "in_progress" or record.fence != claimed.fence:
                break
            time.sleep(0.01)
        replayed = None
        deadline = time.monotonic() + 60
        while replayed is None and time.monotonic() < deadline:
            try:
                replayed = other_op(k)
            except (InFlightError, StoreUnavailable):
                time.sleep(0.1)
        assert runs == [k], runs  # the body ran once
        assert replayed == "done-1"
    finally:
        go.set()
        thread.join(30)
        holder_store.close()
        other_store.close()
