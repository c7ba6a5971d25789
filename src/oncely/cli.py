"""The ``oncely`` command: set up, check and inspect a store.

oncely init URL              create the table (idempotent)
oncely check URL             connectivity, schema, clock skew and the ONCELY_* settings
oncely keys ls URL           list live records (80 columns; what each belongs to)
oncely keys show URL DIGEST  one record (a stored HTTP response decoded)
oncely keys rm URL DIGEST    delete one record (the next call runs again)
oncely purge URL             delete expired records
oncely barrier init URL      create the branch barrier table (oncely.statemachine.barrier)
oncely barrier purge URL     delete barrier rows of global transactions past the horizon
oncely consume BROKER …      run a handler as an idempotent consumer (oncely.messaging.cli)
oncely inbox purge URL       delete old inbox rows (oncely.messaging.inbox)
oncely outbox purge URL      delete old sent outbox rows (oncely.messaging.outbox)
oncely --version

Every command that talks to a store makes one round trip to it first (its clock): a store that
cannot be reached is an error with exit status 1, even for ``init`` and ``purge`` on Redis,
which would otherwise send nothing. ``--json`` on ``check``, ``keys ls`` and ``keys show``
prints one JSON document instead of a table (times as ISO 8601 UTC strings, bodies as
previews). Only ``init`` creates anything: the other commands open the store with
``create_schema=False`` (a SQLite file that does not exist stays missing, and they say so).
Nothing printed is read as Rich markup, so ``oncely[redis]`` or a scope like ``[admin]`` prints
as it is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import inspect
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from oncely.backends.urls import redact_url
from oncely.core.records import Record, RecordKey, digest_key
from oncely.errors import OncelyError, SerializationError, StoreError
from oncely.http.codec import (
    CODEC as HTTP_CODEC,
)
from oncely.http.codec import (
    INTERRUPTED,
    UNREPLAYABLE,
    decode_response,
    decode_unreplayable,
)
from oncely.settings import (
    MAX_COUNT,
    SETTINGS,
    check_environment,
    count,
    parse_duration,
    resolve,
)
from oncely.stores import Store, open_store, store_class

__all__ = ["app", "main"]

app = typer.Typer(
    help="oncely: make operations safe to repeat. Inspect and maintain idempotency stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
keys_app = typer.Typer(
    help="Inspect and remove records.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(keys_app, name="keys")
barrier_app = typer.Typer(
    help="Create and clean the branch barrier table (TCC / saga).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(barrier_app, name="barrier")
# markup=False: messages, URLs, scopes and stored results are printed as they are.
console = Console(markup=False, highlight=False)
errors = Console(stderr=True, markup=False, highlight=False)


def _styled(label: str, style: str, rest: str) -> Text:
    return Text.assemble((label, style), " ", rest)


def _version(value: bool) -> None:
    if value:
        console.print(f"oncely {importlib.metadata.version('oncely')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """oncely: make operations safe to repeat. Inspect and maintain idempotency stores."""


Url = Annotated[str, typer.Argument(help="Store URL, e.g. sqlite:///oncely.db or redis://host")]
Table_ = Annotated[
    str | None, typer.Option("--table", help="SQL table name (default oncely_records)")
]
Prefix = Annotated[str | None, typer.Option("--prefix", help="Redis key prefix (default oncely)")]
Scope = Annotated[str, typer.Option("--scope", help="The record's scope (tenant, namespace)")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]


def _print_json(document: Any) -> None:
    """The ``--json`` output: plain stdout, never wrapped or styled."""
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


@contextlib.contextmanager
def _open(
    url: str, table: str | None = None, prefix: str | None = None, *, create: bool = False
) -> Iterator[Store]:
    """Open the store and make one round trip to it (its clock); unless ``create``, without
    creating a file, table or anything else.

    :raises OncelyError: the URL is bad, or the store cannot be reached (StoreUnavailable).
    """
    cls = store_class(url)
    options: dict[str, Any] = {}
    # `is not None`: an empty --table '' or --prefix '' is refused by the store (a typo or an
    # unset shell variable), never taken for "the default"
    if table is not None:
        options["table"] = table
    if prefix is not None:
        options["prefix"] = prefix
    if "create_schema" in inspect.signature(cls).parameters:
        options["create_schema"] = create
    store = open_store(url, **options)  # an option the store does not take: ConfigurationError
    try:
        # One real round trip before anything else: a store that cannot be reached is an error
        # here, even for a command that would otherwise send nothing (Redis has no schema to
        # create and expires its records by itself, so init and purge talked to no one).
        store.now()
        yield store
    finally:
        store.close()


def _fail(exc: Exception) -> typer.Exit:
    errors.print(_styled("error:", "bold red", str(exc)))
    return typer.Exit(1)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@app.command()
def init(url: Url, table: Table_ = None, prefix: Prefix = None) -> None:
    """Create the store's table and indexes; safe to run again."""
    try:
        with _open(url, table, prefix, create=True) as store:
            store.init_schema()
            store.check_schema()
    except OncelyError as exc:
        raise _fail(exc) from exc
    console.print(_styled("ready:", "green", redact_url(url)))


@app.command()
def check(url: Url, table: Table_ = None, prefix: Prefix = None, as_json: Json = False) -> None:
    """Check connectivity, schema, the clock skew between this host and the store, and the
    ONCELY_* environment variables (a bad value is an error, an unknown name a warning)."""
    try:
        settings = check_environment()
        with _open(url, table, prefix) as store:
            before = time.time()
            store_now = store.now()
            after = time.time()
            store.check_schema()
            memory = _memory(store)
    except OncelyError as exc:
        raise _fail(exc) from exc
    skew = store_now - (before + after) / 2
    # A file store shows its file: a relative sqlite:/// path resolved against this directory.
    path = getattr(store, "path", None)
    shown = {
        SETTINGS[name].env: "<hidden>" if SETTINGS[name].secret else value
        for name, value in settings.items()
    }
    if as_json:
        _print_json(
            {
                "url": redact_url(url),
                **({"file": path} if isinstance(path, str) else {}),
                "reachable": True,
                "round_trip_ms": round(1000 * (after - before), 3),
                "schema": "present",
                "clock_skew_ms": round(skew * 1000, 3),
                **({"memory": memory} if memory is not None else {}),
                "environment": shown,
            }
        )
        return
    trip = f"(round trip {1000 * (after - before):.1f} ms)"
    console.print(_styled("reachable:", "green", f"{redact_url(url)} {trip}"))
    if isinstance(path, str):
        console.print(_styled("file:", "green", path))
    console.print(_styled("schema:", "green", "present"))
    console.print(
        _styled(
            "clock skew:",
            "green" if abs(skew) < 1 else "yellow",
            f"{skew * 1000:+.1f} ms (store minus this host; oncely decides expiry on the "
            "store's clock, so skew only affects how times are displayed)",
        )
    )
    for row in memory or ():
        console.print(
            _styled("memory:", "yellow" if row["warning"] else "green", _memory_line(row))
        )
    listed = ", ".join(f"{k}={v!r}" for k, v in shown.items()) or "none set (defaults)"
    console.print(_styled("settings:", "green", f"ONCELY_* variables valid: {listed}"))


def _memory(store: Any) -> list[dict[str, Any]] | None:
    """A Redis store's memory per server (``INFO memory``) with a ``warning`` each (None when
    all is well): an evicting policy drops records silently (a repeated call then runs again),
    and a server near its ``maxmemory`` refuses claims (fail closed) once it is full."""
    redis = getattr(store, "redis", None)
    if redis is None or not callable(getattr(redis, "memory", None)):
        return None
    rows: list[dict[str, Any]] = redis.memory()
    for row in rows:
        used, limit, policy = row["used_memory"], row["maxmemory"], row["maxmemory_policy"]
        row["warning"] = None
        if limit and policy != "noeviction":
            row["warning"] = (
                f"maxmemory-policy {policy} evicts keys once memory is full, oncely's records "
                "included (a repeated call would run again): set it to noeviction"
            )
        elif limit and used >= 0.9 * limit:
            row["warning"] = (
                "near maxmemory: once full, Redis refuses claims and completions "
                "(StoreUnavailable, nothing written); free memory or raise maxmemory"
            )
    return rows


def _memory_line(row: dict[str, Any]) -> str:
    used, limit = row["used_memory"] / 2**20, row["maxmemory"] / 2**20
    size = (
        f"{used:.1f} MiB of {limit:.1f} MiB"
        if row["maxmemory"]
        else f"{used:.1f} MiB, no maxmemory"
    )
    text = f"{row['node']}: {size}, maxmemory-policy {row['maxmemory_policy']}"
    return f"{text}; {row['warning']}" if row["warning"] else text


# -- what a record belongs to -------------------------------------------------------------------
# Records keep the SHA-256 of the key, never the key or the function's name: an @idempotent
# record's digest covers "name\0key", so the function cannot be read back from it. What a
# record does carry tells the mechanism: HTTP responses by their codec and the HTTP namespace
# in the scope, one-time tokens by their scope.
def _belongs_to(record: Record) -> str:
    """ "HTTP 201", "HTTP", "token" or "@idempotent" (with "error" for a stored exception)."""
    http_prefix = f"{resolve('http_namespace')}:"
    if record.codec == HTTP_CODEC and record.result is not None:
        try:
            return f"HTTP {decode_response(record.result).status}"
        except SerializationError:
            return "HTTP (unreadable)"
    if record.codec == UNREPLAYABLE:
        return f"HTTP {decode_unreplayable(record.result or b'')[0]} not kept"
    if record.scope.startswith(http_prefix):
        return "HTTP"
    if record.scope == resolve("token_scope"):
        return "one-time token"
    if record.codec == "error+json":
        return "@idempotent error"
    return "@idempotent"


def _remaining(record: Record, now: float) -> str:
    """Time to expiry, short: 59s, 12m, 23h59m, 3d."""
    left = max(0.0, record.expires_at - now)
    if left < 60:
        return f"{left:.0f}s"
    if left < 3600:
        return f"{left // 60:.0f}m"
    if left < 86400:
        return f"{left // 3600:.0f}h{left % 3600 // 60:02.0f}m"
    return f"{left // 86400:.0f}d{left % 86400 // 3600:02.0f}h"


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds")


def _record_json(record: Record) -> dict[str, Any]:
    return {
        "scope": record.scope,
        "digest": record.digest,
        "status": record.status,
        "belongs_to": _belongs_to(record),
        "fence": record.fence,
        "fingerprint": record.fingerprint or None,
        "created_at": _iso(record.created_at),
        "lease_until": _iso(record.lease_until),
        "expires_at": _iso(record.expires_at),
        "codec": record.codec,
        "result_bytes": len(record.result or b""),
    }


@keys_app.command("ls")
def keys_ls(
    url: Url,
    scope: Annotated[str | None, typer.Option("--scope", help="Only this scope")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 100,
    table: Table_ = None,
    prefix: Prefix = None,
    as_json: Json = False,
) -> None:
    """List live records in 80 columns: scope, digest, status, what each belongs to (an HTTP
    response with its status, a one-time token, an @idempotent result), time to expiry and
    size. Raw keys are never stored: records show their SHA-256 digest."""
    try:
        limit = count(limit, "--limit")
        with _open(url, table, prefix) as store:
            records = store.list(scope=scope, limit=min(limit + 1, MAX_COUNT))  # one more?
            now = store.now()
    except OncelyError as exc:
        raise _fail(exc) from exc
    more = len(records) > limit
    records = records[:limit]
    if as_json:
        _print_json(
            {
                "records": [_record_json(r) for r in records],
                "count": len(records),
                "limit": limit,
                "more": more,
            }
        )
        return
    out = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for header, width, justify in [
        ("scope", 16, "left"),
        ("digest", 12, "left"),
        ("status", 8, "left"),
        ("belongs to", 18, "left"),
        ("expires", 7, "right"),
        ("bytes", 7, "right"),
    ]:
        out.add_column(header, max_width=width, no_wrap=True, overflow="ellipsis", justify=justify)  # type: ignore[arg-type]
    for r in records:
        out.add_row(
            r.scope or '""',
            r.digest[:12],
            "done" if r.status == "completed" else "running",
            _belongs_to(r),
            _remaining(r, now),
            str(len(r.result or b"")),
        )
    console.print(out, width=80)
    if more:
        console.print(
            f"showing the first {limit} record(s); there are more (raise --limit, or narrow "
            "with --scope)",
            width=80,
        )
    else:
        console.print(f"{len(records)} record(s)", width=80)
    if any(_belongs_to(r).startswith("@idempotent") for r in records):
        console.print(
            "@idempotent records keep only the digest of the function's name and key: find "
            "one with keys show URL --name NAME --key KEY",
            width=80,
        )


def _key(digest: str | None, key: list[str] | None, name: str | None, scope: str) -> RecordKey:
    """The record's key: the digest given, or the one ``@idempotent`` builds from ``--key``
    parts (one part as it is; several, as from ``key=["a", "b"]``, as the decorator renders
    them: canonical JSON of the list of their texts) and ``--name``."""
    if key:
        from oncely.functions.keys import canonical

        text = key[0] if len(key) == 1 else canonical(list(key), "key")
        return RecordKey(scope, digest_key(f"{name}\x00{text}" if name else text))
    if digest is None or len(digest) != 64:
        raise typer.BadParameter("give the full 64-character digest, or --key (and --name)")
    return RecordKey(scope, digest)


Digest = Annotated[str | None, typer.Argument(help="The record's full SHA-256 digest")]
RawKey = Annotated[
    list[str] | None,
    typer.Option(
        "--key",
        help="The raw key instead of the digest; give it once per part for a key of several "
        "parts (key=['customer', 'order'] -> --key C --key O), in the decorator's order",
    ),
]
Name = Annotated[
    str | None,
    typer.Option(
        "--name",
        help=(
            "With --key: the @idempotent function's name= (default module.qualname; a "
            "script's functions by its import name)"
        ),
    ),
]


_PREVIEW = 200  # bytes of a result or body shown


def _preview(data: bytes) -> str:
    """The first bytes of a result or body as text (undecodable bytes replaced)."""
    return data[:_PREVIEW].decode("utf-8", "replace")


def _cut(data: bytes) -> str:
    return _preview(data) + (f"… ({len(data)} bytes)" if len(data) > _PREVIEW else "")


def _http_json(record: Record) -> dict[str, Any] | None:
    """A stored HTTP response decoded: status, headers and a body preview."""
    if record.codec == HTTP_CODEC and record.result is not None:
        try:
            response = decode_response(record.result)
        except SerializationError as exc:
            return {"error": str(exc)}
        return {
            "status": response.status,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in response.headers],
            "body_bytes": len(response.body),
            "body_preview": _preview(response.body),
            "body": response.body,
        }
    if record.codec == UNREPLAYABLE:
        status, reason = decode_unreplayable(record.result or b"")
        why = "cut short after it started" if reason == INTERRUPTED else "larger than kept"
        return {"status": status, "not_replayable": why}
    return None


def _show(record: Record, as_json: bool) -> None:
    http = _http_json(record)
    if as_json:
        document = _record_json(record)
        if http is not None:
            document["http"] = {k: v for k, v in http.items() if k != "body"}
        else:
            document["result_preview"] = _preview(record.result or b"")
        _print_json(document)
        return
    out = Table("field", "value")
    out.columns[1].overflow = "fold"
    for field, value in [
        ("scope", record.scope),
        ("digest", record.digest),
        ("status", record.status),
        ("belongs to", _belongs_to(record)),
        ("fence", str(record.fence)),
        ("fingerprint", record.fingerprint or "-"),
        ("created (UTC)", _when(record.created_at)),
        ("lease until (UTC)", _when(record.lease_until)),
        ("expires (UTC)", _when(record.expires_at)),
        ("codec", record.codec or "-"),
    ]:
        out.add_row(field, value)
    if http is None:
        out.add_row("result", _cut(record.result or b""))
    elif "not_replayable" in http:
        out.add_row("HTTP status", f"{http['status']} (not replayable: {http['not_replayable']})")
    elif "error" in http:
        out.add_row("HTTP response", http["error"])
    else:
        out.add_row("HTTP status", str(http["status"]))
        for name, value in http["headers"]:
            out.add_row(f"  {name}", value)
        out.add_row("HTTP body", _cut(http["body"]))
    console.print(out)


@keys_app.command("show")
def keys_show(
    url: Url,
    digest: Digest = None,
    key: RawKey = None,
    name: Name = None,
    scope: Scope = "",
    table: Table_ = None,
    prefix: Prefix = None,
    as_json: Json = False,
) -> None:
    """Show one record; a stored HTTP response is decoded into status, headers and body."""
    try:
        with _open(url, table, prefix) as store:
            record = store.get(_key(digest, key, name, scope))
    except OncelyError as exc:
        raise _fail(exc) from exc
    if record is None:
        errors.print("no such record (it may have expired)")
        raise typer.Exit(1)
    _show(record, as_json)


@keys_app.command("rm")
def keys_rm(
    url: Url,
    digest: Digest = None,
    key: RawKey = None,
    name: Name = None,
    scope: Scope = "",
    table: Table_ = None,
    prefix: Prefix = None,
) -> None:
    """Delete one record: the next call with that key runs again."""
    try:
        with _open(url, table, prefix) as store:
            found = store.delete(_key(digest, key, name, scope))
    except OncelyError as exc:
        raise _fail(exc) from exc
    if not found:
        errors.print("no such record")
        raise typer.Exit(1)
    console.print("deleted")


@app.command()
def purge(
    url: Url,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Delete at most this many in all (default: every one)"),
    ] = None,
    batch: Annotated[
        int, typer.Option("--batch", min=1, help="Records deleted per statement (transaction)")
    ] = 10000,
    table: Table_ = None,
    prefix: Prefix = None,
) -> None:
    """Delete expired records in batches until none is left (Redis expires its records by
    itself). Each batch is one ``purge_expired(batch)`` call, its own short transaction, so
    live claims wait at most for one batch."""
    total = 0
    try:
        batch = count(batch, "--batch")
        if limit is not None:
            limit = count(limit, "--limit")
        with _open(url, table, prefix) as store:
            # The schema first: a table that does not exist is named as such (MySQL's purge
            # statement meets the fence keeper first and could only say that one is missing).
            store.check_schema()
            while limit is None or total < limit:
                want = batch if limit is None else min(batch, limit - total)
                deleted = store.purge_expired(want)
                total += deleted
                if deleted < want:
                    break
    except OncelyError as exc:
        raise _fail(exc) from exc
    console.print(f"purged {total} expired record(s)")


# -- the branch barrier (oncely.statemachine.barrier) ----------------------------------------
BusinessDb = Annotated[
    str,
    typer.Argument(help="The business database: sqlite:///app.db, postgresql://..., mysql://..."),
]
BarrierTable = Annotated[
    str, typer.Option("--table", help="Barrier table name (default oncely_barrier)")
]


def _driver_errors() -> tuple[type[BaseException], ...]:
    """The DB-API error classes of the drivers that are installed (a failed connect, an
    unknown database, a missing table or a refused statement)."""
    import sqlite3

    found: list[type[BaseException]] = [sqlite3.Error]
    try:
        import psycopg

        found.append(psycopg.Error)
    except ImportError:  # pragma: no cover - the postgres extra is not installed
        pass
    try:
        import pymysql

        found.append(pymysql.err.Error)
    except ImportError:  # pragma: no cover - the mysql extra is not installed
        pass
    return tuple(found)


def _driver_failure(url: str, exc: BaseException) -> StoreError:
    """One line for a driver error met on the business database at ``url``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return StoreError(f"{redact_url(url)}: {text}")


@contextlib.contextmanager
def _database(url: str, command: str, create: bool = False) -> Iterator[Any]:
    """A DB-API connection to the business database at ``url`` (not a store: the barrier
    lives next to the business tables). ``command``: ``"init"`` or ``"purge"``.

    :raises OncelyError: a URL of another scheme, a missing SQLite file (unless ``create``),
        or a driver error (the server cannot be reached, the database or the table does not
        exist, a statement was refused), as :class:`~oncely.errors.StoreError`.
    """
    try:
        with _connected(url, command, create) as conn:
            yield conn
    except _driver_errors() as exc:
        raise _driver_failure(url, exc) from exc


@contextlib.contextmanager
def _connected(url: str, command: str, create: bool) -> Iterator[Any]:
    from oncely.backends.urls import scheme_of
    from oncely.errors import ConfigurationError

    scheme = scheme_of(url)
    conn: Any
    if scheme == "sqlite":
        import sqlite3

        from oncely.backends.sqlite import parse_url

        path, _ = parse_url(url, "SQLite URL")
        if not create and not Path(path).exists():
            raise ConfigurationError(
                f"no SQLite database at {path}: check the URL (sqlite:///relative.db, "
                "sqlite:////absolute.db)"
            )
        conn = sqlite3.connect(path, timeout=15)
    elif scheme in ("postgresql", "postgres"):
        import psycopg

        from oncely.backends.postgres import conninfo

        conn = psycopg.connect(conninfo(url))
    elif scheme in ("mysql", "mariadb"):
        import pymysql

        from oncely.backends.mysql import connect_args

        conn = pymysql.connect(**connect_args(url))
    elif scheme.startswith("redis"):
        raise ConfigurationError(
            "Redis barrier rows expire by themselves, `horizon` seconds after a global "
            "transaction's newest row (redis_barrier(..., horizon=...)): "
            + ("there is no table to create" if command == "init" else "nothing to purge")
        )
    else:
        raise ConfigurationError(
            f"the barrier lives in a SQL database: give a sqlite://, postgresql:// or mysql:// "
            f"URL, not {redact_url(url)!r}"
        )
    try:
        yield conn
    finally:
        conn.close()


# -- inbox and outbox tables (oncely.messaging) ------------------------------------------------
inbox_app = typer.Typer(help="The transactional inbox table.", no_args_is_help=True)
outbox_app = typer.Typer(help="The transactional outbox table.", no_args_is_help=True)
app.add_typer(inbox_app, name="inbox")
app.add_typer(outbox_app, name="outbox")
DbUrl = Annotated[str, typer.Argument(help="sqlite:///file.db, postgresql://… or mysql://…")]
Batch = Annotated[int, typer.Option("--batch", min=1, help="Rows deleted per transaction")]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not a duration: {exc}") from exc


def _older(default: str) -> Any:
    return typer.Option(
        "--older-than", help=f"Keep rows younger than this (e.g. 30m, 24h, 7d; default {default})"
    )


def _purge_table(url: str, table_kind: str, table: str | None, older: str, batch: int) -> int:
    from oncely.messaging.inbox import Inbox, connect
    from oncely.messaging.outbox import Outbox

    seconds = _duration(older)
    try:
        batch = count(batch, "--batch")
        kind = Inbox if table_kind == "inbox" else Outbox
        target = kind(**({"table": table} if table is not None else {}))
        conn = connect(url, create=False)  # like `oncely check`: never create a missing file
    except OncelyError as exc:
        raise _fail(exc) from exc
    except _driver_errors() as exc:
        raise _fail(_driver_failure(url, exc)) from exc
    try:
        return target.purge(conn, seconds, batch=batch)
    except OncelyError as exc:
        raise _fail(exc) from exc
    except _driver_errors() as exc:
        raise _fail(_driver_failure(url, exc)) from exc
    finally:
        conn.close()


@barrier_app.command("init")
def barrier_init(url: BusinessDb, table: BarrierTable = "oncely_barrier") -> None:
    """Create the barrier table and its index in the business database; safe to run again."""
    from oncely.statemachine.barrier import create_table

    try:
        with _database(url, "init", create=True) as conn:
            create_table(conn, table)
    except OncelyError as exc:
        raise _fail(exc) from exc
    console.print(f"barrier table {table} ready")


@barrier_app.command("purge")
def barrier_purge(
    url: BusinessDb,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Horizon: remove a global transaction's rows once its newest row is older "
            "than this (30m, 24h, 7d); longer than any call can arrive late",
        ),
    ] = "7d",
    table: BarrierTable = "oncely_barrier",
    batch: Annotated[int, typer.Option("--batch", min=1, help="gids per statement")] = 500,
) -> None:
    """Delete barrier rows, whatever their op, of global transactions past the horizon."""
    from oncely.settings import parse_duration
    from oncely.statemachine.barrier import purge as purge_barrier

    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise _fail(ValueError(f"--older-than {older_than!r}: {exc}")) from exc
    try:
        batch = count(batch, "--batch")
        with _database(url, "purge") as conn:
            removed = purge_barrier(conn, seconds, table=table, batch=batch)
    except OncelyError as exc:
        raise _fail(exc) from exc
    console.print(f"purged {removed} barrier row(s) older than {older_than}")


@inbox_app.command("purge")
def inbox_purge(
    url: DbUrl,
    table: Annotated[str | None, typer.Option("--table", help="default oncely_inbox")] = None,
    older_than: Annotated[str, _older("7d")] = "7d",
    batch: Batch = 1000,
) -> None:
    """Delete inbox rows older than --older-than, in short transactions. Keep them longer than
    a broker may redeliver a message: a redelivery after its row is gone runs again."""
    purged = _purge_table(url, "inbox", table, older_than, batch)
    console.print(f"purged {purged} inbox row(s)")


@outbox_app.command("purge")
def outbox_purge(
    url: DbUrl,
    table: Annotated[str | None, typer.Option("--table", help="default oncely_outbox")] = None,
    older_than: Annotated[str, _older("1d")] = "1d",
    batch: Batch = 1000,
) -> None:
    """Delete outbox rows sent more than --older-than ago (unsent rows are never deleted)."""
    purged = _purge_table(url, "outbox", table, older_than, batch)
    console.print(f"purged {purged} sent outbox row(s)")


def main() -> None:
    app()


# -- the demo's commands (demo, storm, probe) live in oncely.demo.cli ------------------------
from oncely.demo.cli import register as _register_demo  # noqa: E402

_register_demo(app)

# -- `oncely consume BROKER`: lives in oncely.messaging.cli -------------------------------------
from oncely.messaging.cli import register as _register_consume  # noqa: E402

_register_consume(app)


if __name__ == "__main__":
    main()
