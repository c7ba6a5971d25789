"""Auto-pipelining for redis-py: commands of concurrent callers share one write on one connection.

redis-py checks a connection out of its pool for every command, writes it, reads its reply and
puts the connection back (no auto-pipelining: redis-py issue 3767). Under concurrency that is one
system call pair and one pool round per command. Redis answers the commands of one connection
in the order it received them (RESP), so commands of many callers can go out in one write and
their replies be matched by position, as Lettuce, ioredis and valkey-glide do.

* :class:`AsyncPipeline` (one per event loop): a caller queues its command and awaits a future.
  A sender task writes every command queued during one loop iteration in one write; a reader
  task reads the replies in order and resolves the futures.
* :class:`SyncPipeline` (threads; group commit): the first thread that finds no batch in flight
  becomes the leader; it writes everything queued so far in one write, reads the replies and
  hands them out, then passes the lead to the first thread that queued meanwhile.

What stays as it was:

* one caller alone: one write and one reply, one round trip, as before;
* every command stays whole (an ``EVALSHA`` of a script is one atomic decision); a batch is
  not ``MULTI``, and nothing relies on two callers' commands being adjacent;
* a cancelled caller (asyncio) only stops awaiting its future: a command not yet written is
  not sent, and the reply of one already written is read and dropped, so the replies of the
  others stay matched;
* bounded waits: each command has a deadline, its operation's budget
  (:mod:`oncely.backends.budget`: by default ``budget`` seconds from when it was queued), which
  covers the wait for its turn, connecting, the write and the reply. A batch is written only
  while its earliest deadline is ahead, and a command past its deadline before its batch was
  written fails without being sent (:class:`~oncely.backends.budget.BudgetSpent`). Once
  written, asyncio has one watchdog timer per connection (not one per reply), armed at the
  oldest deadline in flight; threads cut each read to the batch's earliest deadline. A timeout
  or a connection error fails every command in flight on that connection with the driver's
  error (the caller's
  :class:`~oncely.backends.redis.RedisClients` turns it into
  :class:`~oncely.errors.StoreUnavailable`: such a command may have run), and the connection is
  dropped, because its later replies could no longer be matched; the next command opens a
  new one. An error *reply* (``NOSCRIPT``, a script error) goes to its own caller only.

Blocking commands (``BLPOP``, ``SUBSCRIBE``) must not go through a pipeline: they would hold
up every caller behind them. :class:`~oncely.backends.redis.RedisClients` sends scripts through
the pipeline and other commands through its pools.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from oncely.backends.budget import DEADLINE, BudgetSpent
from oncely.backends.forks import after_fork, inherit

__all__ = ["AsyncPipeline", "SyncPipeline"]

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # hiredis packs a command in C, about 7x faster than redis-py's Python packer
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis comes with oncely[redis]
    _hiredis_pack = None

_NOT_ENOUGH_DATA: object | None
try:  # what redis-py's hiredis reader returns while a reply is incomplete
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another redis-py layout: replies go through read_response
    _NOT_ENOUGH_DATA = None


def _hiredis_parser(connection: Any) -> Any:
    """The connection's redis-py hiredis parser if its reader can be used directly (one
    ``gets()`` per reply instead of redis-py's ``read_response`` and the three coroutines
    under it), else None."""
    parser = getattr(connection, "_parser", None)
    if (
        _NOT_ENOUGH_DATA is None
        or type(parser).__name__ != "_AsyncHiredisParser"
        or getattr(parser, "_reader", None) is None
        or not hasattr(parser, "read_from_socket")
    ):
        return None
    return parser


def _pack(connection: Any, commands: list[tuple[Any, ...]]) -> list[bytes]:
    """The RESP bytes of ``commands`` (arguments: str, bytes, int), in one chunk."""
    if _hiredis_pack is not None:
        return [b"".join([_hiredis_pack(args) for args in commands])]
    packed: list[bytes] = connection.pack_commands(commands)
    return packed


def _writes_at_once(transport: Any) -> bool:
    """True if a write to ``transport`` (an asyncio transport) goes out without waiting: open,
    and nothing of an earlier write is still buffered (so a drain after it would not wait)."""
    return not transport.is_closing() and not transport.get_write_buffer_size()


# -- asyncio -------------------------------------------------------------------------------------
_closing: set[asyncio.Task[Any]] = set()


class _Session:
    """One connection of an :class:`AsyncPipeline` and the futures of the commands written to it,
    in order. Once it fails it is dead for good; the pipeline opens a new session."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection  # redis-py leaves Connection's methods unannotated
        self.inflight: deque[asyncio.Future[Any]] = deque()
        self.more = asyncio.Event()
        self.dead = False
        self.reader: asyncio.Task[None] | None = None
        #: Commands written so far, and for each batch written (commands written up to its
        #: end, its earliest deadline): the replies read so far are ``sent - len(inflight)``.
        self.sent = 0
        self.batches: deque[tuple[int, float]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None

    def written(self, futures: list[asyncio.Future[Any]], deadline: float) -> None:
        """Record ``futures`` as in flight (in write order), to be answered by ``deadline``
        (loop time; ``math.inf``: without bound), and arm the reply watchdog."""
        self.inflight.extend(futures)
        self.sent += len(futures)
        self.more.set()
        if deadline != math.inf:
            self.batches.append((self.sent, deadline))
            if self._watchdog is None:
                self._watchdog = asyncio.get_running_loop().call_at(deadline, self._watch)

    def _watch(self) -> None:
        """One timer at a time, at the oldest deadline in flight, not one per reply: kill the
        session if a command in flight is still unanswered at its deadline."""
        self._watchdog = None
        if self.dead:
            return
        batches = self.batches
        answered = self.sent - len(self.inflight)
        while batches and batches[0][0] <= answered:
            batches.popleft()
        if not batches:
            return
        loop = asyncio.get_running_loop()
        deadline = batches[0][1]
        if loop.time() >= deadline:
            self.kill(RedisTimeoutError("no reply from Redis within the operation's budget"))
            return
        self._watchdog = loop.call_at(deadline, self._watch)

    def kill(self, exc: BaseException) -> None:
        """Fail every command in flight with ``exc`` and drop the connection."""
        if self.dead:
            return
        self.dead = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.inflight:
            fut = self.inflight.popleft()
            if not fut.done():
                fut.set_exception(exc)
        self.more.set()  # let the reader see it is dead
        task = asyncio.get_running_loop().create_task(self.connection.disconnect(nowait=True))
        _closing.add(task)  # keep a reference until it is done (the loop holds only a weak one)
        task.add_done_callback(_closing.discard)

    async def read(self) -> None:
        """The reader: match each reply to the oldest command in flight."""
        parser = _hiredis_parser(self.connection)
        try:
            if parser is not None:
                await self._read_hiredis(parser)
            else:
                await self._read_replies()
        except BaseException as exc:
            self.kill(exc if isinstance(exc, Exception) else _closed())
            if not isinstance(exc, Exception):
                raise

    async def _read_replies(self) -> None:
        """Through redis-py's ``read_response`` (any parser)."""
        connection, inflight = self.connection, self.inflight
        while not self.dead:
            if not inflight:
                self.more.clear()
                await self.more.wait()
                continue
            try:
                # No timeout per read (a timer per reply costs more than the read): the
                # watchdog bounds the wait instead.
                reply: Any = await connection.read_response(
                    timeout=math.inf, disconnect_on_error=False
                )
            except ResponseError as exc:  # an error reply: the connection is fine
                reply = exc
            self._deliver(reply)

    async def _read_hiredis(self, parser: Any) -> None:
        """Straight from the hiredis reader: a reply already read is one ``gets()``; the socket
        is read only when no whole reply is left (as redis-py's hiredis parser does, with its
        checks: a connection error reply fails the session, a push notification goes to the
        parser's handler and answers no command)."""
        inflight = self.inflight
        gets = parser._reader.gets
        push = getattr(parser, "_hiredis_PushNotificationType", None)
        while not self.dead:
            if not inflight:
                self.more.clear()
                await self.more.wait()
                continue
            reply: Any = gets()
            if reply is _NOT_ENOUGH_DATA:
                try:
                    await parser.read_from_socket()
                except OSError as exc:
                    raise RedisConnectionError(f"Error while reading from Redis: {exc}") from exc
                continue
            if isinstance(reply, RedisConnectionError):
                raise reply
            if push is not None and isinstance(reply, push):
                await parser.handle_push_response(reply)
                continue
            if type(reply) is list and reply and isinstance(reply[0], RedisConnectionError):
                raise reply[0]
            self._deliver(reply)

    def _deliver(self, reply: Any) -> None:
        """Hand ``reply`` (an error reply as its :class:`ResponseError`) to the oldest command
        in flight."""
        inflight = self.inflight
        if not inflight:  # pragma: no cover - a reply nobody asked for
            raise redis.exceptions.ConnectionError("Redis sent a reply nobody asked for")
        fut = inflight.popleft()
        if fut.done():  # its caller was cancelled: drop the reply
            return
        if isinstance(reply, ResponseError):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)


def _closed() -> redis.exceptions.ConnectionError:
    return redis.exceptions.ConnectionError("the pipelined Redis connection was closed")


def _spent_in_queue() -> BudgetSpent:
    return BudgetSpent(
        "the operation's budget ran out while it waited for its turn on the pipelined "
        "connection (not sent)",
        "queue",
    )


class AsyncPipeline:
    """Commands of concurrent tasks of one event loop, written together on one connection.

    ``connect`` makes a new, unconnected :class:`redis.asyncio.Connection` (with the pool's
    URL, credentials, TLS and timeouts). :meth:`execute_command` has the shape of
    :meth:`redis.asyncio.Redis.execute_command` for commands whose raw reply is what the caller
    wants (scripts): no response callbacks are applied.
    """

    def __init__(self, connect: Callable[[], Any], budget: float | None = None) -> None:
        self._connect = connect
        #: Seconds from queueing to reply for a command given no deadline (None: no bound).
        self._budget = math.inf if budget is None else budget
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any], float]] = []
        self._wake = asyncio.Event()
        self._session: _Session | None = None
        self._sender: asyncio.Task[None] | None = None
        self._closed = False
        after_fork(self, AsyncPipeline._forked)

    def _forked(self) -> None:
        """In a forked child: the parent's connection, sender and reader are never used, closed
        or finished here (:mod:`oncely.backends.forks`); the child's loops get new pipelines
        (:class:`~oncely.backends.loops.LoopLocal` forgets this one), and this one refuses use."""
        inherit(self._session, self._sender, self._queue)
        self._session = self._sender = None
        self._queue = []
        self._closed = True

    def execute_command(self, *args: Any) -> asyncio.Future[Any]:
        """:meth:`send_command` with the command's parts as arguments."""
        return self.send_command(args)

    def send_command(
        self, args: tuple[Any, ...], deadline: float | None = None
    ) -> asyncio.Future[Any]:
        """Queue one command (its parts, ``("ECHO", "hello")``), to be sent with
        the others queued in this loop iteration, and answered by ``deadline`` (loop time;
        default: the pipeline's budget from now); await the future returned for its reply (a
        plain future, not a coroutine: one frame less for every caller to pass through; a
        caller that stops awaiting it cancels it, and a cancelled command is not sent, or its
        reply is dropped).

        :raises redis.exceptions.RedisError: (from the future) the error reply, or the
            connection's failure; at once if the pipeline is closed.
        """
        if self._closed:
            raise _closed()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if deadline is None:
            deadline = loop.time() + self._budget
        queue = self._queue
        queue.append((args, fut, deadline))
        if len(queue) == 1:
            self._wake.set()
            sender = self._sender
            if sender is None or sender.done():  # first use, or it was cancelled
                self._sender = loop.create_task(self._send(), name="oncely-redis-pipeline")
        return fut

    async def _open(self, deadline: float) -> _Session:
        session = self._session
        if session is not None and not session.dead and not session.inflight:
            # Idle: the server may have closed it meanwhile (restart, idle timeout). Look before
            # writing, as redis-py's pool does on checkout (nobody else reads it now).
            try:
                idle = session.connection
                # redis-py 8 renamed can_read_destructive (5.x-7.x) to can_read.
                look = getattr(idle, "can_read", None) or idle.can_read_destructive
                stale = await look()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                stale = True
            if stale:
                session.kill(RedisConnectionError("the idle pipelined connection went stale"))
        if session is None or session.dead:
            connection: Any = self._connect()
            token = DEADLINE.set(deadline) if deadline != math.inf else None
            try:
                await connection.connect()  # its waits cut to the deadline (budget)
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            finally:
                if token is not None:
                    DEADLINE.reset(token)
            session = self._session = _Session(connection)
            session.reader = asyncio.get_running_loop().create_task(
                session.read(), name="oncely-redis-pipeline-reader"
            )
        return session

    async def _send(self) -> None:
        """The sender: one write per batch, in the order the commands were queued."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            queued = self._queue
            self._queue = []
            now = asyncio.get_running_loop().time()
            batch = []
            deadline = math.inf
            for args, fut, due in queued:
                if fut.done():
                    continue
                if due <= now:  # its budget ran out while it waited: never sent
                    fut.set_exception(_spent_in_queue())
                    continue
                batch.append((args, fut))
                deadline = min(deadline, due)
            if not batch:
                continue
            session: _Session | None = None
            try:
                session = await self._open(deadline)
                connection = session.connection
                if asyncio.get_running_loop().time() >= deadline:  # connecting took it all
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(_spent_in_queue())
                    continue
                packed = _pack(connection, [args for args, _ in batch])
                session.written([fut for _, fut in batch], deadline)
                writer = connection._writer
                if writer is not None and _writes_at_once(writer.transport):
                    # What send_packed_command does when its drain would not wait, minus its
                    # wait_for (a task, a timer and two loop turns per batch): a write that
                    # must wait goes through it, bounded by the time left.
                    writer.writelines(packed)
                else:
                    token = DEADLINE.set(deadline) if deadline != math.inf else None
                    try:
                        await connection.send_packed_command(packed, check_health=False)
                    finally:
                        if token is not None:
                            DEADLINE.reset(token)
            except BaseException as exc:
                error = exc if isinstance(exc, Exception) else _closed()
                if session is not None:
                    session.kill(error)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(error)
                if not isinstance(exc, Exception):
                    self._fail_queued(error)
                    raise

    def _fail_queued(self, error: Exception) -> None:
        queue, self._queue = self._queue, []
        for _, fut, _due in queue:
            if not fut.done():
                fut.set_exception(error)

    async def aclose(self) -> None:
        """Stop the tasks, fail what is queued or in flight, close the connection."""
        self._closed = True
        tasks = [t for t in (self._sender, self._session and self._session.reader) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_queued(_closed())
        session = self._session
        if session is not None:
            session.kill(_closed())
            await session.connection.disconnect(nowait=True)

    def abandon(self) -> None:
        """Forget everything without a loop (its loop is closed; sockets went with it)."""
        self._closed = True
        self._queue = []
        self._session = None


# -- threads -------------------------------------------------------------------------------------
def _stale(connection: Any) -> bool:
    """True if an idle connection has something to read (the server closed it, or a stray
    reply): it must not be written to, as redis-py's pool checks on checkout."""
    try:
        return bool(connection.can_read(timeout=0))
    except (RedisConnectionError, RedisTimeoutError, OSError):
        return True


class _Slot:
    """One thread's command, its outcome, and the lock it waits on (released when it is done or
    when it has to lead the next batch)."""

    __slots__ = ("args", "deadline", "error", "lead", "reply", "waiter")

    def __init__(self, args: tuple[Any, ...], deadline: float) -> None:
        self.args = args
        self.deadline = deadline
        self.reply: Any = None
        self.error: BaseException | None = None
        self.lead = False
        self.waiter = threading.Lock()
        self.waiter.acquire()

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


class SyncPipeline:
    """Commands of concurrent threads, written together on one connection (group commit).

    ``connect`` makes a new, unconnected :class:`redis.Connection`. :meth:`execute_command`
    returns the raw reply (no response callbacks). A thread alone writes its command and
    reads its reply itself: one round trip, no hand-off.
    """

    def __init__(self, connect: Callable[[], Any], budget: float | None = None) -> None:
        self._connect = connect  # redis-py leaves Connection's methods unannotated
        #: Seconds from queueing to reply for a command outside an operation's deadline.
        self._budget = math.inf if budget is None else budget
        self._mutex = threading.Lock()
        self._queue: list[_Slot] = []
        self._busy = False
        self._connection: Any = None
        self._pid = os.getpid()
        after_fork(self, SyncPipeline._forked)

    def _forked(self) -> None:
        """In a forked child: the parent's connection is set aside, never used or closed here
        (:mod:`oncely.backends.forks`); a new one opens on the child's first command. The mutex
        is made anew (another thread may have held it at the fork) and the queue emptied (its
        threads do not exist in the child)."""
        inherit(self._connection)
        self._connection = None
        self._queue = []
        self._busy = False
        self._mutex = threading.Lock()
        self._pid = os.getpid()

    def execute_command(self, *args: Any) -> Any:
        """Send one command with the others queued meanwhile; return its reply.

        Its deadline is the running operation's (:data:`oncely.backends.budget.DEADLINE`), else
        the pipeline's budget from now; the wait for a batch in flight, connecting, the write
        and the reply all end by it (a batch's waits end by its earliest deadline).

        :raises redis.exceptions.RedisError: the error reply, or the connection's failure.
        """
        deadline = DEADLINE.get()
        slot = _Slot(args, time.monotonic() + self._budget if deadline is None else deadline)
        with self._mutex:
            if self._pid != os.getpid():  # forked: the parent's connection is not ours
                self._pid, self._connection, self._queue, self._busy = os.getpid(), None, [], False
            self._queue.append(slot)
            lead = not self._busy
            self._busy = True
        if not lead:
            slot.waiter.acquire()  # the leader always releases it (see _lead's finally)
            if not slot.lead:
                return slot.outcome()
        self._lead()
        return slot.outcome()

    def _lead(self) -> None:
        """Write the queued batch, read its replies, hand them out, pass the lead on."""
        with self._mutex:
            batch, self._queue = self._queue, []
        now = time.monotonic()
        deadline = math.inf
        spent: list[_Slot] = []
        for slot in batch:
            if slot.deadline <= now:  # its budget ran out while a batch before it was in flight
                slot.error = _spent_in_queue()
                spent.append(slot)
            elif slot.deadline < deadline:
                deadline = slot.deadline
        if spent:
            batch = [slot for slot in batch if slot.error is None]
        done = 0
        # The batch's waits end by its earliest deadline (a lone caller's: already the running one).
        token = (
            DEADLINE.set(deadline) if deadline != math.inf and deadline != DEADLINE.get() else None
        )
        try:
            if not batch:
                raise _spent_in_queue()
            connection = self._connection
            if connection is not None and _stale(connection):
                connection.disconnect()
                connection = self._connection = None
            if connection is None:
                connection = self._connect()
                connection.connect()
                self._connection = connection
            try:
                connection.send_packed_command(
                    _pack(connection, [slot.args for slot in batch]), check_health=False
                )
                for slot in batch:
                    try:
                        slot.reply = connection.read_response(disconnect_on_error=False)
                    except ResponseError as exc:  # an error reply: the connection is fine
                        slot.error = exc
                    done += 1
            except BaseException:
                self._connection = None
                connection.disconnect()
                raise
        except BaseException as exc:
            for slot in batch[done:]:
                slot.error = exc
            raise_later: BaseException | None = exc
        else:
            raise_later = None
        finally:
            if token is not None:
                DEADLINE.reset(token)
            batch += spent
            with self._mutex:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._busy = False
                else:
                    successor.lead = True
            for slot in batch:
                if not slot.lead:
                    slot.waiter.release()
            if successor is not None:
                successor.waiter.release()
        if raise_later is not None and not isinstance(raise_later, Exception):
            raise raise_later

    def close(self) -> None:
        """Close the connection (a batch in flight fails; the next command reconnects)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.disconnect()
