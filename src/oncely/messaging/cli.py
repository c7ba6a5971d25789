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
import logging
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn

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


def _consumer(
    handler: str,
    name: str,
    store: str | None,
    dedup_id: str,
    lease: float,
    attempts: int,
    db: str | None = None,
    inbox: str | None = None,
    app_dir: str = ".",
) -> IdempotentConsumer:
    """The consumer, its handler imported and its store or database reached once: a store
    that cannot be reached at start-up is a setup error (one line, exit 1), whatever the
    broker; later outages are retried, with a WARNING.

    :raises OncelyError: a bad option, a handler that cannot be imported, an unreachable store.
    """
    function = load_handler(handler, app_dir)
    table = None
    if db is None:
        if inbox is not None:
            raise ConfigurationError("--inbox needs --db URL (the database the inbox lives in)")
    else:
        from oncely.messaging.inbox import Inbox, connect

        table = Inbox("oncely_inbox" if inbox is None else inbox)  # --inbox '' is refused
        conn = connect(db)
        try:
            table.create_table(conn)
            conn.commit()
        finally:
            conn.close()
    consumer = IdempotentConsumer(
        function,
        name=name,
        store=store,
        dedup_id=dedup_id,
        lease=lease,
        max_attempts=attempts,
        inbox=table,
        connect=db,
    )
    if table is None:
        consumer.store.now()  # one round trip: StoreUnavailable names the URL and what to check
    return consumer


def _run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

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


@consume_app.command("redis")
def redis_streams(
    handler: Handler_,
    name: Name,
    stream: Annotated[str, typer.Option("--stream")],
    group: Annotated[str, typer.Option("--group")],
    member: Annotated[str, typer.Option("--member", help="this process's name in the group")],
    url: Annotated[str, typer.Option("--url")] = "redis://127.0.0.1:6379/0",
    store: Store_ = None,
    dedup_id: DedupId = "message_id",
    lease: Lease = 30.0,
    max_attempts: Attempts = 5,
    db: Db = None,
    inbox: InboxTable = None,
    app_dir: AppDir = ".",
) -> None:
    """Consume a Redis stream as a member of a consumer group."""
    from oncely.backends.redis import waiting_aclient
    from oncely.messaging.redis_streams import RedisStreamConsumer

    async def main(stop: asyncio.Event) -> None:
        consumer = _consumer(
            handler, name, store, dedup_id, lease, max_attempts, db, inbox, app_dir
        )
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

    _run(main)


@consume_app.command("rabbitmq")
def rabbitmq(
    handler: Handler_,
    name: Name,
    queue: Annotated[str, typer.Option("--queue")],
    url: Annotated[str, typer.Option("--url")] = "amqp://guest:guest@127.0.0.1:5672/",
    store: Store_ = None,
    dedup_id: DedupId = "message_id",
    lease: Lease = 30.0,
    max_attempts: Attempts = 5,
    db: Db = None,
    inbox: InboxTable = None,
    app_dir: AppDir = ".",
    prefetch: Annotated[int, typer.Option("--prefetch", min=1)] = 100,
) -> None:
    """Consume a RabbitMQ queue (declared durable if missing) with manual acks."""
    import aio_pika

    from oncely.messaging.rabbitmq import RabbitMQConsumer

    async def main(stop: asyncio.Event) -> None:
        consumer = _consumer(
            handler, name, store, dedup_id, lease, max_attempts, db, inbox, app_dir
        )
        connection = await aio_pika.connect_robust(url)
        try:
            channel = await connection.channel()
            q = await channel.declare_queue(queue, durable=True)
            await RabbitMQConsumer(consumer, q, prefetch=prefetch).run(stop)
        finally:
            await connection.close()

    _run(main)


async def _nats_error(exc: Exception) -> None:
    """nats-py's error callback: one line, not its default traceback."""
    log.warning("oncely: NATS: %s", describe(exc))


@consume_app.command("nats")
def nats_jetstream(
    handler: Handler_,
    name: Name,
    stream: Annotated[str, typer.Option("--stream")],
    subject: Annotated[str, typer.Option("--subject")],
    durable: Annotated[str, typer.Option("--durable")],
    url: Annotated[str, typer.Option("--url")] = "nats://127.0.0.1:4222",
    store: Store_ = None,
    dedup_id: DedupId = "header:Nats-Msg-Id",
    lease: Lease = 30.0,
    max_attempts: Attempts = 5,
    db: Db = None,
    inbox: InboxTable = None,
    app_dir: AppDir = ".",
) -> None:
    """Consume a JetStream stream with a durable pull consumer."""
    import nats

    from oncely.messaging.nats import JetStreamConsumer

    async def main(stop: asyncio.Event) -> None:
        consumer = _consumer(
            handler, name, store, dedup_id, lease, max_attempts, db, inbox, app_dir
        )
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

    _run(main)


@consume_app.command("mqtt")
def mqtt(
    handler: Handler_,
    name: Name,
    topic: Annotated[str, typer.Option("--topic")],
    client_id: Annotated[str, typer.Option("--client-id", help="stable: the session's id")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 1883,
    store: Store_ = None,
    dedup_id: DedupId = "header:message_id",
    lease: Lease = 30.0,
    max_attempts: Attempts = 5,
    db: Db = None,
    inbox: InboxTable = None,
    app_dir: AppDir = ".",
) -> None:
    """Consume an MQTT topic at QoS 1 (persistent v5 session, PUBACK after completion)."""
    from oncely.messaging.mqtt import MQTTConsumer, connect

    try:
        consumer = _consumer(
            handler, name, store, dedup_id, lease, max_attempts, db, inbox, app_dir
        )
        member = MQTTConsumer(consumer, connect(host, port, client_id), topic)
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
