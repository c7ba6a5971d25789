"""``oncely consume BROKER …``: run a handler as an idempotent consumer, for a quick start.

oncely consume redis     --stream S --group G --handler app.handlers:on_order --name orders
oncely consume rabbitmq  --queue Q  --handler … --name …
oncely consume nats      --stream S --subject SUBJ --durable D --handler … --name …
oncely consume mqtt      --topic T  --client-id ID --handler … --name …

The handler is ``module:function`` taking a :class:`~oncely.messaging.consumer.Delivery` (sync
or async; MQTT: sync). With ``--db URL`` (and optionally ``--inbox TABLE``, default
``oncely_inbox``, created if missing) the consumer runs in the transactional mode and the
handler takes ``(delivery, conn)``: its writes through ``conn`` commit with the inbox row.
Ctrl-C (or SIGTERM) stops after the messages in hand. Celery tasks use
:class:`oncely.messaging.celery.IdempotentTask` inside their own worker instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NamedTuple, NoReturn

import typer

from oncely.core.observe import describe
from oncely.errors import ConfigurationError, OncelyError
from oncely.messaging.consumer import IdempotentConsumer

__all__ = ["consume_app", "load_handler", "register"]

log = logging.getLogger("oncely")

consume_app = typer.Typer(
    help="Run a handler as an idempotent consumer of a broker.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

Handler_ = Annotated[
    str,
    typer.Option(
        "--handler",
        help="module:function taking a Delivery, imported with --app-dir (default: the current "
        "directory) first on sys.path",
    ),
]
AppDir = Annotated[
    str,
    typer.Option(
        "--app-dir",
        help="directory put first on sys.path before --handler is imported, as uvicorn's "
        "--app-dir (default: the current directory, so app.billing:charge needs no PYTHONPATH)",
    ),
]
Name = Annotated[str, typer.Option("--name", help="the consumer's identity (part of each key)")]
Store_ = Annotated[str | None, typer.Option("--store", help="store URL (default $ONCELY_STORE)")]
DedupId = Annotated[
    str,
    typer.Option("--dedup-id", help="message_id, header:<name> or body:<dotted.path>"),
]
Lease = Annotated[float, typer.Option("--lease", min=0.1, help="claim lease, seconds")]
Attempts = Annotated[
    int, typer.Option("--max-attempts", min=0, help="dead-letter after this many failures")
]
Db = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="database URL: the transactional mode (handler(delivery, conn), inbox row and "
        "writes commit together before the ack)",
    ),
]
InboxTable = Annotated[
    str | None, typer.Option("--inbox", help="inbox table with --db (default oncely_inbox)")
]
Url = Annotated[str, typer.Option("--url")]
Stream = Annotated[str, typer.Option("--stream")]


def load_handler(spec: str, app_dir: str | None = None) -> Callable[..., Any]:
    """Import ``module:function``, with ``app_dir`` (a directory, e.g. ``"."``) first on
    ``sys.path`` when given, as uvicorn and celery put the current directory there.

    :raises ConfigurationError: not of that form, not importable, or not callable.
    """
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if not os.path.isdir(path):
            raise ConfigurationError(f"--app-dir {app_dir!r} is not a directory")
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--handler {spec!r}: write it as module:function")
    try:
        target: Any = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(f"--handler {spec!r} cannot be imported: {exc}") from exc
    if not callable(target):
        raise ConfigurationError(f"--handler {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


class _Shared(NamedTuple):
    """The options every ``oncely consume`` command takes (see :func:`_command`)."""

    handler: str
    name: str
    store: str | None
    dedup_id: str
    lease: float
    max_attempts: int
    db: str | None
    inbox: str | None
    app_dir: str

    def consumer(self) -> IdempotentConsumer:
        """The consumer, its handler imported and its store or database reached once: a store
        that cannot be reached at start-up is a setup error (one line, exit 1), whatever the
        broker; later outages are retried, with a WARNING.

        :raises OncelyError: a bad option, a handler that cannot be imported, an unreachable
            store.
        """
        function = load_handler(self.handler, self.app_dir)
        table = None
        if self.db is None:
            if self.inbox is not None:
                raise ConfigurationError("--inbox needs --db URL (the database the inbox lives in)")
        else:
            from oncely.messaging.inbox import Inbox, connect

            # --inbox '' is refused
            table = Inbox("oncely_inbox" if self.inbox is None else self.inbox)
            conn = connect(self.db)
            try:
                table.create_table(conn)
                conn.commit()
            finally:
                conn.close()
        consumer = IdempotentConsumer(
            function,
            name=self.name,
            store=self.store,
            dedup_id=self.dedup_id,
            lease=self.lease,
            max_attempts=self.max_attempts,
            inbox=table,
            connect=self.db,
        )
        if table is None:
            consumer.store.now()  # one round trip: StoreUnavailable names the URL and what to check
        return consumer


def _shared_options(dedup_id: str) -> tuple[list[inspect.Parameter], list[inspect.Parameter]]:
    """The parameters of :class:`_Shared` for Typer: the two that lead every command's
    options, and the rest (``dedup_id``: the broker's default ``--dedup-id``)."""

    def option(
        name: str, annotation: Any, default: Any = inspect.Parameter.empty
    ) -> inspect.Parameter:
        kind = inspect.Parameter.KEYWORD_ONLY
        return inspect.Parameter(name, kind, default=default, annotation=annotation)

    lead = [option("handler", Handler_), option("name", Name)]
    rest = [
        option("store", Store_, None),
        option("dedup_id", DedupId, dedup_id),
        option("lease", Lease, 30.0),
        option("max_attempts", Attempts, 5),
        option("db", Db, None),
        option("inbox", InboxTable, None),
        option("app_dir", AppDir, "."),
    ]
    return lead, rest


def _command(
    broker: str, *, dedup_id: str = "message_id"
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register the function as ``oncely consume BROKER``, taking the options every broker
    takes besides its own: ``--handler`` and ``--name`` first, ``--store`` to ``--app-dir``
    where its keyword ``shared`` stands, which receives them as one :class:`_Shared`."""

    def register(function: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(function, eval_str=True).parameters.values())
        at = [p.name for p in own].index("shared")
        lead, rest = _shared_options(dedup_id)

        @functools.wraps(function)
        def command(**options: Any) -> None:
            shared = _Shared(**{field: options.pop(field) for field in _Shared._fields})
            function(shared=shared, **options)

        # what Typer reads for the command's options, in this order
        command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*lead, *own[:at], *rest, *own[at + 1 :]]
        )
        consume_app.command(broker)(command)
        return function

    return register


def _run(
    shared: _Shared, serve: Callable[[IdempotentConsumer, asyncio.Event], Awaitable[None]]
) -> None:
    """Run ``serve(consumer, stop)`` in a new event loop until it returns, ``stop`` set on
    SIGINT or SIGTERM; any error ends the command (:func:`_fail`)."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(shared.consumer(), stop)

    try:
        asyncio.run(runner())
    except Exception as exc:
        _fail(exc)


_SETUP_HINT = (
    "check --url / --host / --port, --db, and that the stream, queue or durable consumer "
    "exists and the broker is up"
)


def _fail(exc: Exception) -> NoReturn:
    """End the command with one line on stderr and exit status 1, never a traceback: an
    oncely error as it is, anything else (a broker or database the setup could not reach or
    use, a bad URL) with its type and what to check."""
    if isinstance(exc, OncelyError):
        typer.echo(f"error: {exc}", err=True)
    else:
        typer.echo(f"error: {type(exc).__name__}: {exc} ({_SETUP_HINT})", err=True)
    raise typer.Exit(1) from exc


@_command("redis")
def redis_streams(
    *,
    stream: Stream,
    group: Annotated[str, typer.Option("--group")],
    member: Annotated[str, typer.Option("--member", help="this process's name in the group")],
    url: Url = "redis://127.0.0.1:6379/0",
    shared: _Shared,
) -> None:
    """Consume a Redis stream as a member of a consumer group."""
    from oncely.backends.redis import waiting_aclient
    from oncely.messaging.redis_streams import RedisStreamConsumer

    async def serve(consumer: IdempotentConsumer, stop: asyncio.Event) -> None:
        client = waiting_aclient(url)
        try:
            # Reach Redis once before consuming: unreachable at start-up is a setup error
            # (exit 1, one line), as for the other brokers; later outages are retried.
            if not await client.exists(stream):
                log.warning(
                    "oncely: redis stream %r does not exist yet: it is created empty with group "
                    "%r, and consumed as producers add to it (check --stream if none will)",
                    stream,
                    group,
                )
            await RedisStreamConsumer(consumer, client, stream, group, member).run(stop)
        finally:
            await client.aclose()

    _run(shared, serve)


@_command("rabbitmq")
def rabbitmq(
    *,
    queue: Annotated[str, typer.Option("--queue")],
    url: Url = "amqp://guest:guest@127.0.0.1:5672/",
    shared: _Shared,
    prefetch: Annotated[int, typer.Option("--prefetch", min=1)] = 100,
) -> None:
    """Consume a RabbitMQ queue (declared durable if missing) with manual acks."""
    import aio_pika

    from oncely.messaging.rabbitmq import RabbitMQConsumer

    async def serve(consumer: IdempotentConsumer, stop: asyncio.Event) -> None:
        connection = await aio_pika.connect_robust(url)
        try:
            channel = await connection.channel()
            q = await channel.declare_queue(queue, durable=True)
            await RabbitMQConsumer(consumer, q, prefetch=prefetch).run(stop)
        finally:
            await connection.close()

    _run(shared, serve)


async def _nats_error(exc: Exception) -> None:
    """nats-py's error callback: one line, not its default traceback."""
    log.warning("oncely: NATS: %s", describe(exc))


@_command("nats", dedup_id="header:Nats-Msg-Id")
def nats_jetstream(
    *,
    stream: Stream,
    subject: Annotated[str, typer.Option("--subject")],
    durable: Annotated[str, typer.Option("--durable")],
    url: Url = "nats://127.0.0.1:4222",
    shared: _Shared,
) -> None:
    """Consume a JetStream stream with a durable pull consumer."""
    import nats

    from oncely.messaging.nats import JetStreamConsumer

    async def serve(consumer: IdempotentConsumer, stop: asyncio.Event) -> None:
        # A first connection without reconnects fails fast on a server that is not there
        # (nats-py would otherwise retry for minutes, logging tracebacks); the consumer's own
        # connection then reconnects for as long as it runs.
        probe = await nats.connect(
            url, allow_reconnect=False, max_reconnect_attempts=1, error_cb=_nats_error
        )
        await probe.close()
        nc = await nats.connect(url, max_reconnect_attempts=-1, error_cb=_nats_error)
        try:
            sub = await nc.jetstream().pull_subscribe(subject, durable=durable, stream=stream)
            await JetStreamConsumer(consumer, sub).run(stop)
        finally:
            await nc.close()

    _run(shared, serve)


@_command("mqtt", dedup_id="header:message_id")
def mqtt(
    *,
    topic: Annotated[str, typer.Option("--topic")],
    client_id: Annotated[str, typer.Option("--client-id", help="stable: the session's id")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 1883,
    shared: _Shared,
) -> None:
    """Consume an MQTT topic at QoS 1 (persistent v5 session, PUBACK after completion)."""
    from oncely.messaging.mqtt import MQTTConsumer, connect

    try:
        member = MQTTConsumer(shared.consumer(), connect(host, port, client_id), topic)
    except Exception as exc:
        _fail(exc)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    member.start()
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    member.stop()


def register(app: typer.Typer) -> None:
    """Add ``consume`` to the ``oncely`` command."""
    app.add_typer(consume_app, name="consume")


if __name__ == "__main__":  # pragma: no cover
    consume_app(sys.argv[1:])
