"""The ``oncely`` command: set up, check and inspect a store.

oncely init URL              create the table (idempotent)
oncely check URL             connectivity, schema and clock skew
oncely keys ls URL           list live records
oncely keys show URL DIGEST  one record
oncely keys rm URL DIGEST    delete one record (the next call runs again)
oncely purge URL             delete expired records
oncely --version

Only ``init`` creates anything: the other commands open the store with ``create_schema=False``
(a SQLite file that does not exist stays missing, and they say so). Nothing printed is read as
Rich markup, so ``oncely[redis]`` or a scope like ``[admin]`` prints as it is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import inspect
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from oncely.errors import OncelyError
from oncely.records import Record, RecordKey, digest_key
from oncely.stores import Store, store_class
from oncely.stores.base import redact_url

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


@contextlib.contextmanager
def _open(
    url: str, table: str | None = None, prefix: str | None = None, *, create: bool = False
) -> Iterator[Store]:
    """Open the store; unless ``create``, without creating a file, table or anything else."""
    cls = store_class(url)
    options: dict[str, Any] = {}
    if table:
        options["table"] = table
    if prefix:
        options["prefix"] = prefix
    if "create_schema" in inspect.signature(cls).parameters:
        options["create_schema"] = create
    store = cls(url, **options)
    try:
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
def check(url: Url, table: Table_ = None, prefix: Prefix = None) -> None:
    """Check connectivity, schema and the clock skew between this host and the store."""
    try:
        with _open(url, table, prefix) as store:
            before = time.time()
            store_now = store.now()
            after = time.time()
            store.check_schema()
    except OncelyError as exc:
        raise _fail(exc) from exc
    skew = store_now - (before + after) / 2
    trip = f"(round trip {1000 * (after - before):.1f} ms)"
    console.print(_styled("reachable:", "green", f"{redact_url(url)} {trip}"))
    console.print(_styled("schema:", "green", "present"))
    console.print(
        _styled(
            "clock skew:",
            "green" if abs(skew) < 1 else "yellow",
            f"{skew * 1000:+.1f} ms (store minus this host; oncely decides expiry on the "
            "store's clock, so skew only affects how times are displayed)",
        )
    )


@keys_app.command("ls")
def keys_ls(
    url: Url,
    scope: Annotated[str | None, typer.Option("--scope", help="Only this scope")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 100,
    table: Table_ = None,
    prefix: Prefix = None,
) -> None:
    """List live records (raw keys are never stored: records show their SHA-256 digest)."""
    try:
        with _open(url, table, prefix) as store:
            records = store.list(scope=scope, limit=limit + 1)  # one more: are there more?
    except OncelyError as exc:
        raise _fail(exc) from exc
    more = len(records) > limit
    records = records[:limit]
    out = Table("scope", "digest", "status", "fence", "expires (UTC)", "codec", "bytes")
    for r in records:
        out.add_row(
            r.scope,
            r.digest[:16],
            r.status,
            str(r.fence),
            _when(r.expires_at),
            r.codec or "-",
            str(len(r.result or b"")),
        )
    console.print(out)
    if more:
        console.print(
            f"showing the first {limit} record(s); there are more (raise --limit, or narrow "
            "with --scope)"
        )
    else:
        console.print(f"{len(records)} record(s)")


def _key(digest: str | None, key: str | None, name: str | None, scope: str) -> RecordKey:
    if key is not None:
        return RecordKey(scope, digest_key(f"{name}\x00{key}" if name else key))
    if digest is None or len(digest) != 64:
        raise typer.BadParameter("give the full 64-character digest, or --key (and --name)")
    return RecordKey(scope, digest)


Digest = Annotated[str | None, typer.Argument(help="The record's full SHA-256 digest")]
RawKey = Annotated[str | None, typer.Option("--key", help="The raw key instead of the digest")]
Name = Annotated[
    str | None,
    typer.Option(
        "--name", help="With --key: the @idempotent function's name= (default module.qualname)"
    ),
]


def _show(record: Record) -> None:
    out = Table("field", "value")
    for field, value in [
        ("scope", record.scope),
        ("digest", record.digest),
        ("status", record.status),
        ("fence", str(record.fence)),
        ("fingerprint", record.fingerprint or "-"),
        ("created (UTC)", _when(record.created_at)),
        ("lease until (UTC)", _when(record.lease_until)),
        ("expires (UTC)", _when(record.expires_at)),
        ("codec", record.codec or "-"),
        ("result", (record.result or b"")[:200].decode("utf-8", "replace")),
    ]:
        out.add_row(field, value)
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
) -> None:
    """Show one record."""
    try:
        with _open(url, table, prefix) as store:
            record = store.get(_key(digest, key, name, scope))
    except OncelyError as exc:
        raise _fail(exc) from exc
    if record is None:
        errors.print("no such record (it may have expired)")
        raise typer.Exit(1)
    _show(record)


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
    limit: Annotated[int, typer.Option("--limit", min=1, help="Delete at most this many")] = 10000,
    table: Table_ = None,
    prefix: Prefix = None,
) -> None:
    """Delete expired records (Redis expires its records by itself)."""
    try:
        with _open(url, table, prefix) as store:
            count = store.purge_expired(limit)
    except OncelyError as exc:
        raise _fail(exc) from exc
    console.print(f"purged {count} expired record(s)")


def main() -> None:
    app()
