"""SQLite files: URL parsing, WAL, the bounded connection pool, busy timeout, worker threads.

What the SQLite store and the SQLite lock backend share; no mechanism. SQLite has no async
driver: an async write statement is queued on its file's writer thread (:func:`aexecute`),
which runs the queued writes as one group commit and wakes each waiting event loop once per
batch; other async calls run on a small pool of worker threads (:class:`Workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from oncely.backends.forks import after_fork, inherit
from oncely.backends.urls import Number, check_numbers, check_options, query_options
from oncely.core.deadline import DeadlinePassed
from oncely.core.observe import describe
from oncely.errors import ConfigurationError, OncelyError, StoreUnavailable
from oncely.settings import seconds, text

__all__ = [
    "CLOCK",
    "Connections",
    "Workers",
    "WriterGate",
    "absolute",
    "aexecute",
    "bound",
    "busy_pragma",
    "enable_wal",
    "execute",
    "left",
    "opening_end",
    "parse_url",
    "writer_gate",
]

T = TypeVar("T")

log = logging.getLogger("oncely")

#: Seconds since the epoch on SQLite's clock (millisecond resolution, fixed within a statement).
CLOCK: Final = "((julianday('now') - 2440587.5) * 86400.0)"


#: The numeric options of a SQLite URL: ``busy_timeout`` is seconds >= 0 (a unit allowed).
NUMBERS: Final = {"busy_timeout": Number(minimum=0.0, above=False)}


def parse_url(url: str, what: str, known: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """The absolute file path and the query options of ``sqlite:///path.db?busy_timeout=15``;
    numeric options (:data:`NUMBERS`) are parsed and range-checked now (``busy_timeout`` comes
    back as float seconds).

    A relative path (``sqlite:///oncely.db``) resolves against the current directory now, when
    the store is opened (see :func:`absolute`).

    :param what: the user of the URL, for the message (``"SQLite URL"``).
    :param known: the option names the user of the URL reads; any other is refused.
    :raises ConfigurationError: ``url`` is not a string, the URL names no file (``sqlite://``, ``sqlite:///:memory:``),
        an option not in ``known`` (the message names the closest one), an option given twice
        (``?busy_timeout=1&busy_timeout=2``), or a numeric option
        that is not a number in range (``busy_timeout=abc``, ``busy_timeout=-3``).
    """
    path, _, query = text(url, "url", where=what).partition("://")[2].partition("?")
    if not path.startswith("/") or path in ("/", "/:memory:"):
        raise ConfigurationError(
            f"{what} {url!r} needs a file that every process can open: use "
            "'sqlite:///relative.db' or 'sqlite:////absolute/path.db' (for a process-local "
            "store use 'memory://')"
        )
    options: dict[str, Any] = {k: v[-1] for k, v in query_options(query, url, what).items()}
    check_options(options, known, url, what)
    options.update(check_numbers(options, NUMBERS, url, what))
    return absolute(path[1:], what), options


def busy_timeout_of(given: Any, options: dict[str, Any], default: float, where: str) -> float:
    """The ``busy_timeout`` (seconds) of a SQLite user: the keyword argument if given, else the
    URL's (already checked by :func:`parse_url`), else ``default``; 0 is a real value.

    :raises ConfigurationError: the keyword argument is not seconds >= 0.
    """
    if given is not None:
        return float(seconds(given, "busy_timeout", where=where, above=False))
    return float(options.get("busy_timeout", default))


SYNCHRONOUS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")


def synchronous_of(given: str | None, options: dict[str, Any], default: str) -> str:
    """The ``synchronous`` pragma level of a SQLite user, upper-cased: the keyword argument if
    given, else the URL's, else ``default``.

    :raises ConfigurationError: not one of OFF, NORMAL, FULL, EXTRA (any case), or not a string.
    """
    raw = given or options.get("synchronous", default)
    if not isinstance(raw, str):
        raise ConfigurationError(f"synchronous must be a string, not {type(raw).__name__}")
    level = raw.upper()
    if level not in SYNCHRONOUS:
        *first, last = [f"{name} (default)" if name == default else name for name in SYNCHRONOUS]
        raise ConfigurationError(f"synchronous={level!r}: use {', '.join(first)} or {last}")
    return level


def absolute(path: str, what: str) -> str:
    """``path`` made absolute against the current directory, once (and logged if it was
    relative): later ``chdir`` calls cannot move the store, and the log shows which file two
    workers started from different directories use."""
    resolved = os.path.abspath(path)
    if not os.path.isabs(path):
        log.info("oncely: %s %r is relative; it resolves to %s", what, path, resolved)
    return resolved


def enable_wal(conn: sqlite3.Connection, patience: float) -> None:
    """Switch the file to WAL (persistent, so once per file is enough).

    Changing the journal mode needs a lock that SQLite does not wait for (its busy handler is not
    used), so another process opening the file at the same moment makes it fail at once: retry
    with backoff for up to ``patience`` seconds. Reading the mode takes no lock.
    """
    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline, delay = time.monotonic() + patience, 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def opening_end(deadline: float | None, busy_timeout: float) -> float:
    """When the waits of opening a connection end (a :func:`time.monotonic` time): the
    caller's ``deadline`` if it gave one (shorter or longer than ``busy_timeout``), else
    ``busy_timeout`` seconds from now. One end for every wait of the opening -- SQLite's busy
    handler while it reads the file, the switch to WAL (:func:`enable_wal`), creating the
    schema -- so the first use of a file keeps to the caller's bound like any statement."""
    return time.monotonic() + busy_timeout if deadline is None else deadline


def left(end: float) -> float:
    """Seconds from now until ``end`` (a :func:`time.monotonic` time), never negative."""
    return max(0.0, end - time.monotonic())


def is_busy(exc: sqlite3.Error) -> bool:
    """True if ``exc`` says another writer held the file past the busy timeout."""
    text = str(exc)
    return "locked" in text or "busy" in text


def busy_error(what: str, path: str, busy_timeout: float) -> StoreUnavailable:
    """The error for a file another writer kept locked past ``busy_timeout`` (seconds)."""
    return StoreUnavailable(
        f"{what} {path!r} stayed locked by another writer (a connection or process) for longer "
        f"than busy_timeout ({busy_timeout:g}s); raise busy_timeout or use a server store for "
        "heavy write concurrency"
    )


def open_error(
    exc: sqlite3.Error, what: str, path: str, busy_timeout: float, deadline: float | None = None
) -> OncelyError:
    """The error for a file that could not be opened: locked by another writer past
    ``busy_timeout`` (many processes opening a fresh file at once), or past the caller's
    ``deadline`` (:class:`DeadlinePassed`: the caller answers with its own timeout error), or
    not openable at all (a missing directory, no permission)."""
    if is_busy(exc) and deadline is not None:
        return DeadlinePassed(
            f"the caller's deadline passed while {what} {path!r} was being opened (switched to "
            "WAL, its table created) and stayed locked by another connection or process; the "
            "statement did not run, nothing was written"
        )
    if is_busy(exc):
        return busy_error(what, path, busy_timeout)
    if getattr(exc, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return StoreUnavailable(f"cannot open {what} {path!r} ({exc}); is it an SQLite file?")
    if getattr(exc, "sqlite_errorname", "SQLITE_CANTOPEN") not in _FILE_ERRORS:
        return StoreUnavailable(f"cannot open {what} {path!r}: {exc}")
    return StoreUnavailable(
        f"cannot open {what} {path!r} ({exc}); check that the directory exists and is writable"
    )


# Errors of the file itself (a missing directory, no permission, a read-only file system).
_FILE_ERRORS = ("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_READONLY", "SQLITE_IOERR")


class WriterGate:
    """One writer at a time among the threads of this process, in arrival order (FIFO).

    SQLite runs one writer per file; threads of one process that collide on its lock wait in
    its busy handler, which sleeps 1, 2, 5, 10 ... 100 ms between tries and favours no one, so
    under 32 writing threads a claim could wait half a second. Taking this gate around each
    write statement queues the threads of a process instead (the holder hands the gate to the
    oldest waiter), so they never meet in the busy handler; other processes on the file are
    still waited for by SQLite's ``busy_timeout``. The gate orders statements only: each
    decision stays one statement, and correctness never depends on it (another process, or a
    second gate after ``fork()``, is handled by SQLite's own lock).

    The gate also owns the file's writer thread, which runs the writes that async callers queue
    (:meth:`queue`, :func:`aexecute`); it starts on the first one and stops after
    :data:`WRITER_IDLE` seconds without work.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        #: The thread id of the holder (None while open): only that thread sets its own id.
        self._owner: int | None = None
        self._waiters: deque[threading.Lock] = deque()
        #: Write statements queued for the next group commit (see :func:`execute`).
        self.mutex = threading.Lock()
        self.pending: list[Any] = []
        #: The writer thread waits on it for queued writes (the lock is ``mutex``).
        self._wake = threading.Condition(self.mutex)
        self._writer: threading.Thread | None = None
        self._idle = False
        #: SELECTs in progress (their connection's opening included), and whether a fork() is
        #: waiting for them (new ones wait for the fork); the lock is ``mutex``.
        self._readers = 0
        self._forking = False
        self._reads = threading.Condition(self.mutex)
        #: When the holder began a wait that only SQLite ends, for the file's write lock
        #: (opening a connection, ``BEGIN IMMEDIATE``, a statement run alone); None outside
        #: one. Set and cleared by the holder only: a write that waited for the gate in vain
        #: tells from it whether it waited behind another connection's or process's lock on
        #: the file, or behind this process's own writes (:func:`gate_error`).
        self.on_file: float | None = None

    @contextlib.contextmanager
    def waiting_for_file(self) -> Iterator[None]:
        """The holder's body may wait for the file's write lock (:attr:`on_file`)."""
        self.on_file = time.monotonic()
        try:
            yield
        finally:
            self.on_file = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """The body (a ``SELECT``) runs outside any ``fork()`` of this process: it waits while
        one is being prepared (:meth:`fork_begin`), and a fork waits for it."""
        with self.mutex:
            while self._forking:
                self._reads.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self.mutex:
                self._readers -= 1
                if not self._readers:
                    self._reads.notify_all()

    def fork_begin(self, timeout: float) -> bool:
        """Before ``fork()``: stop new ``SELECT``s and wait up to ``timeout`` seconds for the
        running ones; False if some still run. :meth:`fork_end` lets them go again."""
        deadline = time.monotonic() + timeout
        with self.mutex:
            self._forking = True
            while self._readers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._reads.wait(left)
            return True

    def fork_end(self) -> None:
        """After ``fork()``, in the parent: ``SELECT``s run again."""
        with self.mutex:
            self._forking = False
            self._reads.notify_all()

    def queue(self, jobs: list[Any]) -> None:
        """Queue ``jobs`` (async callers' writes) for the writer thread, starting it or waking
        it if it waits; the thread runs them in its next group commit."""
        with self.mutex:
            self.pending += jobs
            if self._writer is not None:
                if self._idle:
                    self._wake.notify()
                return
            writer = self._writer = threading.Thread(
                target=self._write_forever, name="oncely-sqlite-writer", daemon=True
            )
        writer.start()

    def withdraw(self, job: Any) -> bool:
        """Remove ``job`` if no batch took it yet (it will never run): True if it was there."""
        with self.mutex:
            try:
                self.pending.remove(job)
            except ValueError:
                return False
            return True

    def _write_forever(self) -> None:
        """The writer thread: one group commit after the other while writes are queued."""
        while True:
            with self.mutex:
                while not self.pending:
                    self._idle = True
                    woken = self._wake.wait(WRITER_IDLE)
                    self._idle = False
                    if not woken and not self.pending:
                        self._writer = None
                        return
                connections = self.pending[0].connections
            try:
                _write_queued(self, connections)
            except Exception as exc:  # never expected (a batch fails its jobs): keep serving
                log.error("oncely: the SQLite writer thread failed a batch: %s", describe(exc))

    def take(self, owner: object, ended: float | None = None) -> list[Any]:
        """Remove and return the queued writes of ``owner`` (a pool), oldest first, at most
        :data:`BATCH`; with ``ended`` (a :func:`time.monotonic` time), only those whose time
        is up then (:meth:`_Write.end` at or before it)."""
        with self.mutex:
            mine = [
                job
                for job in self.pending
                if job.connections is owner and (ended is None or job.end() <= ended)
            ][:BATCH]
            taken = set(map(id, mine))
            self.pending = [job for job in self.pending if id(job) not in taken]
        return mine

    def acquire(self, timeout: float) -> bool:
        """Take the gate, waiting up to ``timeout`` seconds; False if it stayed taken."""
        with self._mutex:
            if not self._held:
                self._held = True
                self._owner = threading.get_ident()
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        if waiter.acquire(timeout=max(0.0, timeout)):
            self._owner = threading.get_ident()
            return True  # handed over by release(): the gate stayed held for us
        with self._mutex:
            try:
                self._waiters.remove(waiter)
            except ValueError:  # handed over between the timeout and here: ours after all
                self._owner = threading.get_ident()
                return True
            return False

    def held_by_me(self) -> bool:
        """True if the calling thread holds the gate."""
        return self._owner == threading.get_ident()

    def release(self) -> None:
        """Hand the gate to the oldest waiter, or open it."""
        with self._mutex:
            self._owner = None
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False

    @contextlib.contextmanager
    def held(self, timeout: float, path: str) -> Iterator[None]:
        """The body runs holding the gate; released on every exit (exception included).

        :raises StoreUnavailable: the gate stayed taken for ``timeout`` seconds.
        """
        if not self.acquire(timeout):
            raise gate_error(path, timeout, self)
        try:
            yield
        finally:
            self.release()


#: Seconds a ``fork()`` waits for each writer gate (the batch running under it) before it
#: forks anyway (a gate that stays held longer is logged).
FORK_PATIENCE: Final = 5.0


class _Gates:
    """The writer gate of each database file in this process (store and lock backend on one
    file share it); after ``fork()`` the child makes new ones (a gate another thread held at the
    fork would stay held forever in the child).

    A ``fork()`` also waits for every gate (:meth:`_before_fork`) and holds them until it is
    done: SQLite's unix VFS keeps each file's lock state in process memory, shared by every
    connection of the process, so a child forked while one of the parent's threads was inside
    a write transaction inherits "another connection of this process holds the write lock",
    which no thread of the child ever releases: each write of the child would wait its
    ``busy_timeout`` and fail, forever. With the gates held no write transaction of oncely is
    open at the fork. (A gate the forking thread itself holds is skipped: it is between two
    statements of its own, with no transaction open.)
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_path: dict[str, WriterGate] = {}
        #: During a fork: the gates it holds, and every gate (their SELECTs wait).
        self._forking: tuple[list[WriterGate], list[WriterGate]] = ([], [])
        after_fork(self, _Gates._forked)

    def _forked(self) -> None:
        self.lock = threading.Lock()
        self.by_path = {}
        self._forking = ([], [])

    def _before_fork(self) -> None:
        with self.lock:
            gates = list(self.by_path.items())
        taken: list[WriterGate] = []
        begun: list[WriterGate] = []
        self._forking = (taken, begun)  # filled as it goes: the parent undoes what was done
        for path, gate in gates:
            begun.append(gate)
            if not gate.fork_begin(FORK_PATIENCE):
                log.warning(
                    "oncely: fork() while a SELECT on SQLite database %r ran for %gs",
                    path,
                    FORK_PATIENCE,
                )
            if gate.held_by_me():
                continue
            if gate.acquire(FORK_PATIENCE):
                taken.append(gate)
            else:
                log.warning(
                    "oncely: fork() while SQLite database %r stayed in a write for %gs; the "
                    "child's writes to it may wait busy_timeout and fail",
                    path,
                    FORK_PATIENCE,
                )

    def _after_fork_in_parent(self) -> None:
        (taken, gates), self._forking = self._forking, ([], [])
        for gate in taken:
            gate.release()
        for gate in gates:
            gate.fork_end()


_GATES: Final = _Gates()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_GATES._before_fork, after_in_parent=_GATES._after_fork_in_parent)


def writer_gate(path: str) -> WriterGate:
    """The writer gate of the database file at ``path`` (absolute) in this process."""
    with _GATES.lock:
        gate = _GATES.by_path.get(path)
        if gate is None:
            gate = _GATES.by_path[path] = WriterGate()
        return gate


class Connections:
    """SQLite connections shared by every thread of a process: borrowed for one statement.

    ``open(deadline)`` makes a new connection (``check_same_thread=False``: a connection moves
    between threads, but is used by one at a time); ``deadline`` is the borrower's bound
    (:func:`time.monotonic` seconds, None: none), which ends every wait of the opening (see
    :func:`opening_end`; a file still locked then is :class:`DeadlinePassed`,
    :func:`open_error`). At most ``size`` connections exist at once, opened
    on demand and kept idle for the next statement (the most recently used first); a statement
    that finds all of them busy waits for one, up to ``timeout`` seconds, then raises
    :class:`~oncely.errors.StoreUnavailable`. SQLite runs one writer at a time anyway, and its
    unix VFS keeps the file descriptor of a closed connection open while the process holds other
    connections to the file, so a bound on connections is the only bound on descriptors. A
    connection left inside a transaction is closed rather than kept. After ``fork()`` the child
    never touches the parent's connections (SQLite forbids it) and opens its own.
    """

    def __init__(
        self,
        open: Callable[[float | None], sqlite3.Connection],
        *,
        path: str,
        size: int = 16,
        timeout: float = 15.0,
    ) -> None:
        self._open = open
        self._path = path
        self._size = max(1, size)
        self._timeout = timeout
        self._idle: list[sqlite3.Connection] = []
        self._slots = threading.BoundedSemaphore(self._size)
        self._lock = threading.Lock()
        after_fork(self, Connections._forked)

    @property
    def path(self) -> str:
        """The database file (absolute)."""
        return self._path

    @property
    def timeout(self) -> float:
        """Seconds a statement waits for a connection, for the writer gate (and, as the
        users' ``busy_timeout``, for another process's write lock), unless its caller gives a
        deadline of its own (:func:`execute`)."""
        return self._timeout

    def _forked(self) -> None:
        """In a forked child: the parent's connections are never used or closed (SQLite
        forbids both); new ones open on demand."""
        inherit(self._idle)
        self._idle = []
        self._slots = threading.BoundedSemaphore(self._size)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self, deadline: float | None = None) -> Iterator[sqlite3.Connection]:
        """Borrow a connection for the body of the ``with`` block.

        :param deadline: the caller's bound (:func:`time.monotonic` seconds, None: none): the
            wait for a free connection lasts until it, instead of the pool's timeout, and so
            does opening a new one (the first use of the file: WAL, the schema).
        :raises DeadlinePassed: every connection stayed busy until the deadline, or the file
            stayed locked by another connection or process while a new one was opened.
        :raises StoreUnavailable: every connection stayed busy for the pool's timeout (no
            deadline), or a new one could not be opened.
        """
        conn, slots = self._take(deadline)
        try:
            yield conn
        finally:
            self._give(conn, slots)

    def _take(
        self, deadline: float | None
    ) -> tuple[sqlite3.Connection, threading.BoundedSemaphore]:
        with self._lock:
            slots = self._slots
        wait, bounded = bound(self._timeout, deadline)
        if not slots.acquire(timeout=wait):
            busy = StoreUnavailable(
                f"all {self._size} connections to SQLite database {self._path!r} stayed busy "
                f"for {self._timeout:g}s; use a server store for heavy concurrency"
            )
            if bounded:
                raise DeadlinePassed(
                    f"the deadline passed while every connection to SQLite database "
                    f"{self._path!r} was busy; nothing was run",
                    ALL_CONNECTIONS_BUSY,
                ) from busy  # what a caller without a deadline would be told
            raise busy
        try:
            with self._lock:
                if self._idle and slots is self._slots:
                    return self._idle.pop(), slots
            gate = writer_gate(self._path)
            if not gate.held_by_me():  # a SELECT's: it waits for no write
                return self._open(deadline), slots
            with gate.waiting_for_file():  # the first use of the file may wait for its lock
                return self._open(deadline), slots
        except BaseException:
            slots.release()
            raise

    def _give(self, conn: sqlite3.Connection, slots: threading.BoundedSemaphore) -> None:
        try:
            reusable = not conn.in_transaction
            with self._lock:
                if reusable and slots is self._slots:
                    self._idle.append(conn)
                    return
            if slots is self._slots:
                conn.close()
            else:  # borrowed before a fork(): the parent's
                inherit(conn)
        finally:
            slots.release()

    def close(self) -> None:
        """Close the idle connections; the pool stays usable (borrowed ones come back as usual)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def bound(timeout: float, deadline: float | None) -> tuple[float, bool]:
    """How long a wait may last: ``timeout`` seconds (the pool's) for a caller without a
    deadline, else the time left until ``deadline`` (:func:`time.monotonic` seconds), shorter
    or longer; and whether the deadline is what bounds it."""
    if deadline is None:
        return timeout, False
    return max(0.0, deadline - time.monotonic()), True


#: :attr:`DeadlinePassed.reason` of a write whose deadline passed at the writer gate, held by
#: this process's own writes (none of them waiting for another connection or process).
OWN_WRITES: Final = (
    "this process's other writes to the SQLite database file kept its writer gate (its "
    "holder was writing, not waiting for another connection or process)"
)
#: :attr:`DeadlinePassed.reason` of a call whose deadline passed waiting for a connection.
ALL_CONNECTIONS_BUSY: Final = (
    "every connection to the SQLite database file was busy with this process's other calls"
)


def overdue(path: str, gate: WriterGate | None = None) -> DeadlinePassed:
    """The error of a statement whose caller's deadline passed before it could run: while the
    file was locked by another connection or process, or (``gate`` given, its holder not
    waiting for the file) while this process's other writes held the writer gate."""
    if gate is not None and gate.on_file is None:
        return DeadlinePassed(
            f"the caller's deadline passed while other writes of this process to SQLite "
            f"database {path!r} held its writer gate; the statement did not run, nothing was "
            "written",
            OWN_WRITES,
        )
    return DeadlinePassed(
        f"the caller's deadline passed while SQLite database {path!r} was locked by another "
        "writer (a connection or process); the statement did not run, nothing was written"
    )


def execute(
    connections: Connections,
    sql: str,
    params: dict[str, Any],
    translate: Callable[[sqlite3.Error], OncelyError],
    deadline: float | None = None,
) -> tuple[list[Any], int]:
    """Run one statement on a borrowed connection: (every row, rowcount). An
    :class:`sqlite3.OperationalError` becomes ``translate(exc)``.

    A statement that writes (anything but ``SELECT``) is queued on the file's
    :class:`WriterGate`; the thread that holds the gate runs every queued write of the same
    pool (up to :data:`BATCH`) in one ``BEGIN IMMEDIATE`` transaction, one statement after the
    other, then commits: a group commit, one fsync for many decisions. Each decision is still
    one statement, run in arrival order on the latest data, so the outcome is what running them
    one by one would give; each caller returns only after the commit that made its statement
    durable, and a failed commit fails every statement of the batch (nothing half-written).
    A ``SELECT`` never waits for the gate (WAL readers do not block the writer).

    ``deadline`` is the caller's own bound, a :func:`time.monotonic` time in seconds (None:
    none; see :mod:`oncely.core.deadline`). It takes the place of the pool's timeout and of
    ``busy_timeout`` for this caller, shorter or longer: its waits -- for the gate, for a
    connection, and for another process holding the file's write lock -- end at it, and a file
    still locked then is :class:`DeadlinePassed` (the caller answers with its own timeout
    error), never :class:`StoreUnavailable`. It bounds waiting only: a statement whose file is
    free runs even past it. A bounded statement still joins the group commit: the batch waits
    for the write lock in steps, each ending at the earliest end among its statements (a
    deadline, or ``busy_timeout`` after it was queued for a statement without one); at each
    end the statements whose time is up are answered at once without running, and the others
    wait on. So a short deadline never shortens another caller's wait, and once the batch has
    the lock its statements run and commit together: a caller is never told its deadline
    passed while its statement may still commit.

    :raises DeadlinePassed: the deadline came first (the statement never ran, nothing written).
    :raises StoreUnavailable: the gate or a connection stayed taken for the pool's timeout,
        or another process held the file past ``busy_timeout``.
    """
    gate = writer_gate(connections.path)
    if sql.lstrip()[:6].upper() == "SELECT":
        with gate.reading(), connections.connection(deadline) as conn:
            try:
                cur = conn.execute(sql, params)
                return cur.fetchall(), cur.rowcount
            except (sqlite3.OperationalError, sqlite3.DataError) as exc:
                raise translate(exc) from exc
    job = _Write(connections, sql, params, translate, deadline)
    job.finished = threading.Event()
    with gate.mutex:
        gate.pending.append(job)
    try:
        wait, bounded = bound(connections.timeout, deadline)
        if not gate.acquire(wait):
            if bounded:
                raise overdue(connections.path, gate)
            raise gate_error(connections.path, wait, gate)
        try:
            # Batches go oldest first, BATCH at a time: more than BATCH writes queued ahead of
            # this one (async callers' floods) take several batches before it runs; the holder
            # of the gate never leaves before its own statement has run.
            while not job.done:
                batch = gate.take(connections)
                if not batch:  # taken by a writer thread failing its batch (gate timeout)
                    job.finished.wait(connections.timeout)
                    break
                _run_batch(gate, connections, batch)
        finally:
            gate.release()
    except BaseException:
        with gate.mutex:
            if job in gate.pending:  # never run: leave nothing queued
                gate.pending.remove(job)
                raise
        # A batch of another thread took it and is running it: its outcome is that batch's,
        # never "unavailable" (nor "deadline passed") while the statement commits behind the
        # caller's back. That batch ends the statement's wait for the lock at its deadline.
        if not job.finished.wait(connections.timeout):
            raise
    return job.result()


def gate_error(path: str, timeout: float, gate: WriterGate | None = None) -> StoreUnavailable:
    """The error of a write that waited ``timeout`` seconds for the gate in vain: behind a
    write of this process that is itself waiting for the file's write lock (held by another
    connection or process: what ran out is that lock's wait, shared), or behind this
    process's own writes (``gate``'s :attr:`~WriterGate.on_file` tells which)."""
    since = None if gate is None else gate.on_file
    if since is not None:
        return StoreUnavailable(
            f"SQLite database {path!r} stayed locked by another connection or process: this "
            f"write waited {timeout:g}s (busy_timeout) behind a write of this process that has "
            f"been waiting {max(0.0, time.monotonic() - since):.1f}s for the file's write "
            "lock; raise busy_timeout or use a server store for heavy write concurrency"
        )
    return StoreUnavailable(
        f"other threads of this process kept writing to SQLite database {path!r} for "
        f"{timeout:g}s (this write waited for the process's writer gate; its holder was "
        "writing, not waiting for another connection or process); raise busy_timeout or use a "
        "server store for heavy concurrency"
    )


#: The most write statements one group commit carries.
BATCH: Final = 64

#: Seconds a file's writer thread waits for work before it stops (the next write starts it).
WRITER_IDLE: Final = 5.0


async def aexecute(
    connections: Connections,
    workers: Workers,
    sql: str,
    params: dict[str, Any],
    translate: Callable[[sqlite3.Error], OncelyError],
    deadline: float | None = None,
) -> tuple[list[Any], int]:
    """The async face of :func:`execute`: the same statement, the same reply and errors, the
    same group commits and ``deadline`` (:func:`time.monotonic` seconds), awaited on the
    running loop.

    A write is queued on the file's :class:`WriterGate` (the writes of one loop iteration
    together, handed over by one callback after it) and run by the file's writer thread, which
    takes every write queued for the same pool (up to :data:`BATCH`, sync callers' too) into
    one ``BEGIN IMMEDIATE`` transaction under the gate, commits, and only then answers: one
    :meth:`~asyncio.loop.call_soon_threadsafe` per event loop per batch, instead of a worker
    thread round trip per statement. While a batch commits (its fsync, with
    ``synchronous=FULL``), the next one queues. A caller cancelled while its write is still
    queued withdraws it (it never runs); one cancelled after a batch took it leaves it to run
    and commit as usual, its reply unread (what a cancelled call on a worker thread did). A
    write whose ``deadline`` passes while it is still queued is withdrawn the same way
    (:class:`DeadlinePassed`); one a batch took gets the batch's answer, which is
    :class:`DeadlinePassed` if its deadline passed while the batch waited for another process's
    write lock. A ``SELECT`` runs on one of ``workers``' threads, as :func:`execute` (it never
    waits for a batch's commit).

    :raises DeadlinePassed: as :func:`execute`.
    :raises StoreUnavailable: as :func:`execute`.
    """
    if sql.lstrip()[:6].upper() == "SELECT":
        return await workers.run(execute, connections, sql, params, translate, deadline)
    loop = asyncio.get_running_loop()
    job = _Write(connections, sql, params, translate, deadline)
    future: asyncio.Future[tuple[list[Any], int]] = loop.create_future()
    job.future = future
    outbox = _OUTBOXES.by_loop.get(loop)
    if outbox is None:
        outbox = _OUTBOXES.by_loop[loop] = []
    if not outbox:  # the first write of this iteration: hand them all over after it
        loop.call_soon(_hand_over, outbox)
    outbox.append(job)
    timer = (
        None
        if deadline is None
        else loop.call_later(max(0.0, deadline - time.monotonic()), _expire, job, outbox)
    )
    try:
        return await future
    except asyncio.CancelledError:
        # Still queued: it never runs. Taken by a batch: it runs, its reply unread.
        if job in outbox:
            outbox.remove(job)
        else:
            writer_gate(connections.path).withdraw(job)
        raise
    finally:
        if timer is not None:
            timer.cancel()


def _expire(job: _Write, outbox: list[_Write]) -> None:
    """On the loop, at ``job``'s deadline: withdraw it if no batch took it yet (it never runs)
    and fail its caller with :class:`DeadlinePassed`; a batch that took it answers instead."""
    future = job.future
    if future is None or future.done():
        return
    gate = writer_gate(job.connections.path)
    if job in outbox:
        outbox.remove(job)
    elif not gate.withdraw(job):
        return
    future.set_exception(overdue(job.connections.path, gate))  # it waited behind the gate


class _Outboxes:
    """The writes each event loop's callers queued in its current iteration (:func:`aexecute`),
    handed to their files' writer threads together, once per iteration (one lock and at most
    one wake-up of a writer thread, and one batch for what one iteration produced, instead of
    a batch of one for the first write and another for the rest). Each list is used by its
    loop's thread only."""

    def __init__(self) -> None:
        self.by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Write]] = (
            weakref.WeakKeyDictionary()
        )
        after_fork(self, _Outboxes._forked)

    def _forked(self) -> None:
        self.by_loop = weakref.WeakKeyDictionary()


_OUTBOXES: Final = _Outboxes()


def _hand_over(outbox: list[_Write]) -> None:
    """On the loop: queue the iteration's writes on their files' writer gates."""
    jobs = outbox.copy()
    outbox.clear()
    if not jobs:  # withdrawn meanwhile, or handed over by an earlier call
        return
    path = jobs[0].connections.path
    if all(job.connections.path == path for job in jobs):
        writer_gate(path).queue(jobs)
        return
    by_path: dict[str, list[_Write]] = {}
    for job in jobs:
        by_path.setdefault(job.connections.path, []).append(job)
    for path, mine in by_path.items():
        writer_gate(path).queue(mine)


def _write_queued(gate: WriterGate, connections: Connections) -> None:
    """One group commit of the writes queued for ``connections``, on the writer thread.

    The gate is waited for until the earliest end among the queued writes (:meth:`_Write.end`:
    a caller's deadline, or the pool's timeout after the write was queued). If it stays held,
    the writes whose time is up fail (the pool's timeout: :class:`StoreUnavailable`; a
    deadline: :class:`DeadlinePassed`; they leave the queue, so never a loop of zero waits)
    and those with time left stay queued."""
    with gate.mutex:
        ends = [job.end() for job in gate.pending if job.connections is connections]
    wait = connections.timeout
    if ends:
        wait = max(0.0, min(ends) - time.monotonic())
    try:
        with gate.held(wait, connections.path):
            batch = gate.take(connections)
            if batch:
                _run_batch(gate, connections, batch)
    except StoreUnavailable:  # the gate stayed held by this process's other threads
        batch = gate.take(connections, ended=time.monotonic())
        for job in batch:
            job.error = (
                gate_error(connections.path, connections.timeout, gate)
                if job.deadline is None
                else overdue(connections.path, gate)
            )
            job.finish()
        _answer(batch)


def _answer(batch: list[_Write]) -> None:
    """Wake the event loop of each async job of ``batch`` (done) once, to settle its futures."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Write]] = {}
    for job in batch:
        if job.future is not None:
            by_loop.setdefault(job.future.get_loop(), []).append(job)
    for loop, jobs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: no one is waiting
            loop.call_soon_threadsafe(_settle, jobs)


def _settle(jobs: list[_Write]) -> None:
    """On the jobs' event loop: hand each caller its reply (a cancelled caller's is dropped)."""
    for job in jobs:
        future = job.future
        if future is None or future.done():
            continue
        try:
            future.set_result(job.result())
        except BaseException as exc:
            future.set_exception(exc)


class _Write:
    """One queued write statement and, once ``done``, its rows and rowcount or its error;
    ``future`` is an async caller's (settled on its loop), None for a sync caller, whose
    ``finished`` event is set when it is done; ``deadline`` is the caller's bound
    (:func:`time.monotonic` seconds) or None. Its outcome is read through :meth:`result`
    only, which refuses a job not done yet (a caller answered "no rows" while its statement
    still waits in the queue would act on a decision that has not been taken)."""

    __slots__ = (
        "connections",
        "count",
        "deadline",
        "done",
        "error",
        "finished",
        "future",
        "params",
        "queued",
        "rows",
        "sql",
        "translate",
    )

    def __init__(
        self,
        connections: Connections,
        sql: str,
        params: dict[str, Any],
        translate: Callable[[sqlite3.Error], OncelyError],
        deadline: float | None = None,
    ) -> None:
        self.connections = connections
        self.sql = sql
        self.params = params
        self.translate = translate
        self.deadline = deadline
        self.queued = time.monotonic()
        self.done = False
        self.rows: list[Any] = []
        self.count = 0
        self.error: BaseException | None = None
        self.future: asyncio.Future[tuple[list[Any], int]] | None = None
        self.finished: threading.Event | None = None

    def end(self) -> float:
        """When its wait ends (:func:`time.monotonic` seconds): its caller's deadline, or
        without one ``busy_timeout`` (the pool's timeout) after it was queued -- not after the
        batch that took it began, which may be later (behind other batches, or other callers'
        longer deadlines)."""
        return self.queued + self.connections.timeout if self.deadline is None else self.deadline

    def finish(self) -> None:
        """Mark it done (its rows, count or error are final) and wake a sync caller."""
        self.done = True
        if self.finished is not None:
            self.finished.set()

    def result(self) -> tuple[list[Any], int]:
        """(rows, rowcount) of the statement that ran.

        :raises BaseException: the statement's error (already translated).
        :raises RuntimeError: it has not run yet (a bug in the writer; never an empty reply).
        """
        if not self.done:
            raise RuntimeError(f"oncely: a SQLite write was answered before it ran: {self.sql!r}")
        if self.error is not None:
            raise self.error
        return self.rows, self.count

    def fail(self, exc: BaseException) -> None:
        # DataError: a value over SQLITE_LIMIT_LENGTH ("string or blob too big").
        if isinstance(exc, (sqlite3.OperationalError, sqlite3.DataError)):
            error: BaseException = self.translate(exc)
            error.__cause__ = exc
            self.error = error
        else:
            self.error = exc


#: Seconds a write without a deadline may overrun ``busy_timeout`` after it was queued: a
#: batch keeps the connection's own busy timeout (no ``PRAGMA`` round trip on the hot path)
#: while its earliest end is less than this short of a full ``busy_timeout`` away.
SLACK: Final = 0.01


def busy_pragma(seconds: float) -> str:
    """``PRAGMA busy_timeout`` for ``seconds`` (rounded up to whole milliseconds)."""
    return f"PRAGMA busy_timeout = {max(0, math.ceil(seconds * 1000))}"


def _lock_file(
    gate: WriterGate, conn: sqlite3.Connection, connections: Connections, batch: list[_Write]
) -> list[_Write]:
    """``BEGIN IMMEDIATE`` for ``batch`` on ``conn``: the jobs that run in the transaction
    (empty if none is left; then no transaction is open).

    Another process holding the file's write lock is waited for in steps, each ending at the
    earliest end among the jobs still waiting (:meth:`_Write.end`: a job's deadline, or
    ``busy_timeout`` after it was queued for a job without one). At a step's end the jobs
    whose time is up are answered at once without running (:class:`DeadlinePassed`, or the
    busy error of ``busy_timeout``), and the rest wait on; a job never learns it failed while
    the batch may still run it.

    :raises sqlite3.Error: anything but a busy file (every job then fails with it).
    """
    busy = connections.timeout
    changed = False
    try:
        while True:
            step = min(job.end() for job in batch)
            left = step - time.monotonic()
            if changed or left < busy - SLACK:  # not the connection's own busy timeout
                conn.execute(busy_pragma(left))
                changed = True
            try:
                with gate.waiting_for_file():
                    conn.execute("BEGIN IMMEDIATE")
                return batch
            except sqlite3.Error as exc:
                if not is_busy(exc):
                    raise
                now = time.monotonic()
                ended = [job for job in batch if job.end() <= now]
                for job in ended:
                    if job.deadline is None:
                        job.fail(exc)  # busy_timeout: the caller's translate (unavailable)
                    else:
                        job.error = overdue(job.connections.path)
                        job.error.__cause__ = exc
                    job.finish()
                _answer(ended)
                batch = [job for job in batch if not job.done]
                if not batch:
                    return batch
    finally:
        if changed:  # a pragma that touches no file: never expected to fail
            with contextlib.suppress(sqlite3.Error):
                conn.execute(busy_pragma(busy))


def _run_alone(
    gate: WriterGate, conn: sqlite3.Connection, connections: Connections, job: _Write
) -> None:
    """Run ``job`` as its own autocommit statement; its end (:meth:`_Write.end`: its deadline,
    or ``busy_timeout`` after it was queued) ends its wait for another writer's lock, and a file
    still locked then is :class:`DeadlinePassed` with a deadline, else the busy error (a
    statement that met a busy file wrote nothing)."""
    busy = connections.timeout
    bounded = job.deadline is not None
    left = job.end() - time.monotonic()
    changed = bounded or left < busy - SLACK  # not the connection's own busy timeout
    try:
        if changed:
            conn.execute(busy_pragma(left))
        try:
            with gate.waiting_for_file():
                cur = conn.execute(job.sql, job.params)
                job.rows, job.count = cur.fetchall(), cur.rowcount
        except sqlite3.Error as exc:
            if bounded and is_busy(exc):
                job.error = overdue(connections.path)
                job.error.__cause__ = exc
            else:
                job.fail(exc)
    finally:
        if changed:  # never flips the outcome of a statement that ran
            with contextlib.suppress(sqlite3.Error):
                conn.execute(busy_pragma(busy))


def _connect(
    gate: WriterGate, connections: Connections, batch: list[_Write], stack: contextlib.ExitStack
) -> sqlite3.Connection | None:
    """A connection for ``batch`` (entered on ``stack``), or None if every job's time ran out
    first (each answered).

    Like the wait for the write lock (:func:`_lock_file`), the wait for a free connection and
    the opening of a new one (the first use of the file: switching it to WAL, creating the
    schema, each waiting for another connection or process that holds the file) go in steps,
    each ending at the earliest end among the jobs still waiting (:meth:`_Write.end`: a job's
    deadline, or the pool's timeout after it was queued for a job without one). At a step's
    end the jobs whose time is up are answered without running (:class:`DeadlinePassed`, or
    for a job without a deadline the :class:`StoreUnavailable` of ``busy_timeout``), and the
    rest wait on.

    :raises OncelyError: the connection could not be opened for another reason (a missing
        directory, not a SQLite file).
    """
    while True:
        waiting = [job for job in batch if not job.done]
        if not waiting:
            return None
        step = min(job.end() for job in waiting)
        try:
            return stack.enter_context(connections.connection(step))
        except DeadlinePassed as exc:
            now = max(time.monotonic(), step)  # SQLite's busy handler may stop a little early
            ended = [job for job in waiting if job.end() <= now]
            for job in ended:
                # A job without a deadline is told what the wait that ran out says without
                # one: the file stayed locked past busy_timeout, or the wait's own error.
                cause = exc.__cause__
                if job.deadline is not None:
                    job.error = exc
                elif isinstance(cause, OncelyError):
                    job.error = cause
                else:
                    job.error = busy_error("SQLite database", connections.path, connections.timeout)
                    job.error.__cause__ = cause
                job.finish()
            _answer(ended)


def _run_batch(gate: WriterGate, connections: Connections, batch: list[_Write]) -> None:
    """Run ``batch`` in one transaction on one connection; every job ends ``done``, and the
    async ones are answered on their loops (:func:`_answer`). A job whose deadline passes
    while the batch waits for a connection, for its opening (:func:`_connect`) or for another
    process's write lock (:func:`_lock_file`) is answered then, without running."""
    try:
        with contextlib.ExitStack() as stack:
            conn = _connect(gate, connections, batch, stack)
            if conn is None:
                return
            batch = [job for job in batch if not job.done]
            if len(batch) == 1:  # alone: its own autocommit statement, no BEGIN/COMMIT calls
                _run_alone(gate, conn, connections, batch[0])
                return
            try:
                running = _lock_file(gate, conn, connections, batch)
            except sqlite3.Error as exc:
                for job in batch:
                    if not job.done:
                        job.fail(exc)
                return
            if not running:
                return
            try:
                for job in running:
                    try:
                        cur = conn.execute(job.sql, job.params)
                        job.rows, job.count = cur.fetchall(), cur.rowcount
                    except sqlite3.Error as exc:
                        job.fail(exc)  # the statement's own changes are undone by SQLite
                        if not conn.in_transaction:  # ... or the whole transaction was
                            for other in running:
                                other.fail(exc)
                            return
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                for job in running:
                    job.fail(exc)
                if not isinstance(exc, sqlite3.Error):
                    raise
    except BaseException as exc:  # no connection (pool timeout, cannot open)
        for job in batch:
            if job.error is None and not job.done:
                job.fail(exc)
        if not isinstance(exc, Exception):
            raise
    finally:
        rest = [job for job in batch if not job.done]
        for job in rest:
            job.finish()
        _answer(rest)


class Workers:
    """The threads an async face runs SQLite calls on (SQLite has no async driver), started on
    first use; after ``fork()`` the child starts its own."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        after_fork(self, Workers._forked)

    def _forked(self) -> None:
        """In a forked child: the parent's threads are gone; new ones start on first use."""
        inherit(self._executor)
        self._executor = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread, awaited from the running loop."""
        executor = self._executor
        if executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        self._workers, thread_name_prefix=self._name
                    )
                executor = self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def close(self) -> None:
        """Stop the threads once their work is done (the next call starts new ones)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
