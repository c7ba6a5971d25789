"""Another process holding a SQLite file's write lock, for as long as the test says.

:class:`OtherWriter` starts a Python process that opens the file and waits for orders on its
stdin: it takes SQLite's write lock (``BEGIN IMMEDIATE``, what a second worker in the middle
of a write holds) when told to, and lets go (``ROLLBACK``) when told to, reporting each step
on its stdout. No sleeps: every moment is signalled through the pipes.
"""

from __future__ import annotations

import subprocess
import sys
from types import TracebackType

_HOLD = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
print("ready", flush=True)
sys.stdin.readline()
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
conn.close()
print("free", flush=True)
"""


class OtherWriter:
    """``with OtherWriter(path):`` the body runs while another process holds the file's write
    lock (``OtherWriter(path, hold=False)``: the process is ready, :meth:`lock` takes it);
    :meth:`release` lets go earlier, and returns once the other process has."""

    def __init__(self, path: str, hold: bool = True) -> None:
        self.path = path
        self.hold = hold
        self._proc: subprocess.Popen[str] | None = None
        self.locked = False

    def _say(self, order: str, expect: str) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        if order:
            proc.stdin.write(order + "\n")
            proc.stdin.flush()
        line = proc.stdout.readline().strip()
        if line != expect:
            proc.kill()
            raise RuntimeError(f"the other writer said {line!r}, not {expect!r}")

    def __enter__(self) -> OtherWriter:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD, self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._say("", "ready")
        if self.hold:
            self.lock()
        return self

    def lock(self) -> None:
        """Take the file's write lock; returns once the other process holds it."""
        self._say("lock", "locked")
        self.locked = True

    def release(self) -> None:
        """Let go of the write lock; returns once the other process has (and ended)."""
        proc = self._proc
        if proc is None:
            return
        try:
            if self.locked:
                self._say("go", "free")
                self.locked = False
            else:
                proc.kill()
            proc.wait(10)
        finally:
            self._proc = None
            if proc.poll() is None:
                proc.kill()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
