"""The ``oncely demo``, ``oncely storm`` and ``oncely probe`` commands (``oncely[demo]``).

:func:`register` adds them to the ``oncely`` Typer app; the modules that need the demo's
extra packages (Starlette, Uvicorn, HTTPX) are imported only when a command runs.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

if TYPE_CHECKING:
    from oncely.demo.storm import StormConfig, StormResult

__all__ = ["register"]

console = Console()
errors = Console(stderr=True)

Operations = Annotated[int, typer.Option("--operations", "-n", min=1, help="Logical operations")]
Duplicates = Annotated[
    int, typer.Option("--duplicates", "-k", min=1, max=20, help="Copies of each operation")
]
Concurrency = Annotated[
    int, typer.Option("--concurrency", min=1, max=512, help="Operations in flight at once")
]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed of the storm's plan")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of the table")]
HtmlOut = Annotated[
    Path | None,
    typer.Option("--html", help="Write a self-contained HTML report (needs oncely[report])"),
]


def _need_demo_extra() -> None:
    try:
        import aiohttp  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        errors.print(f"[bold red]error:[/] the demo needs {exc.name}: pip install 'oncely[demo]'")
        raise typer.Exit(2) from exc


@contextmanager
def _progress(enabled: bool, label: str) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _storm(config: StormConfig, label: str, show_progress: bool) -> StormResult:
    from oncely.demo.storm import run_storm

    with _progress(show_progress, label) as update:
        config.progress = update
        return run_storm(config, label)


def _report(results: Sequence[StormResult], as_json: bool, html: Path | None, title: str) -> None:
    from oncely.demo.report import json_report, table, write_html

    if as_json:
        print(json_report(results))
    else:
        console.print(table(results, title))
        for r in results:
            for fault in r.faults:
                console.print(f"  [dim]{r.label} fault:[/] {fault}")
            for example in [*r.lost_examples, *r.bad_examples][:5]:
                console.print(f"  [yellow]{r.label}:[/] {example}")
    if html is not None:
        try:
            write_html(html, results, title)
        except ImportError as exc:
            errors.print("[bold red]error:[/] --html needs pygal: pip install 'oncely[report]'")
            raise typer.Exit(2) from exc
        except OSError as exc:  # the table above is printed; the file could not be written
            message = f"cannot write the HTML report {html}: {exc.strerror or exc}"
            errors.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
            raise typer.Exit(1) from exc
        if not as_json:
            console.print(f"HTML report: {html}")


def demo(
    store: Annotated[
        str | None,
        typer.Option("--store", help="oncely store URL (default: SQLite in the work directory)"),
    ] = None,
    operations: Operations = 2000,
    duplicates: Duplicates = 3,
    concurrency: Concurrency = 48,
    seed: Seed = None,
    faults: Annotated[bool, typer.Option("--faults/--no-faults", help="Inject faults")] = True,
    contrast: Annotated[
        bool, typer.Option("--contrast/--no-contrast", help="Also run with oncely switched off")
    ] = True,
    unprotected: Annotated[
        bool, typer.Option("--unprotected", help="Run only the shop with oncely switched off")
    ] = False,
    serve: Annotated[
        bool, typer.Option("--serve", help="Start the shop and keep it running (no storm)")
    ] = False,
    port: Annotated[int | None, typer.Option("--port", help="Port of the shop")] = None,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Keep the shop's files here")
    ] = None,
    as_json: AsJson = False,
    html: HtmlOut = None,
) -> None:
    """Start the demo shop (2 Uvicorn workers), storm it with duplicates and faults, print the
    report; then the same storm with oncely switched off, side by side."""
    _need_demo_extra()
    from oncely.demo.faults import Faults
    from oncely.demo.service import Service, StoreDown, StoreWatch, check_store
    from oncely.demo.shop.settings import Settings
    from oncely.demo.storm import Fault, StormAborted, StormConfig

    base = workdir or Path(tempfile.mkdtemp(prefix="oncely-demo-"))
    seed = seed if seed is not None else secrets.randbelow(2**31)
    modes = [not unprotected] if (unprotected or not contrast or serve) else [True, False]
    results = []
    shop = False  # a shop of this run is up (or starting): an error then names its log
    keep = False  # ... and the work directory stays
    label = ""
    restore = _interrupt_on_sigterm()
    try:
        for protected in modes:
            label = "oncely on" if protected else "oncely off"
            settings = Settings(
                workdir=base / ("protected" if protected else "unprotected"),
                store_url=store or "",
                protected=protected,
                run=secrets.token_hex(4),
                secret=secrets.token_urlsafe(32),
            )
            if protected:
                # The store first: a bad URL or a store that is not there is one line and a
                # non-zero exit, before any process starts (not a shop answering 500s).
                try:
                    check_store(settings)
                except StoreDown as exc:
                    _demo_error(str(exc))
            if not as_json:
                where = settings.store if protected else "none (oncely off)"
                errors.print(f"[bold]{label}[/]: shop in {settings.workdir}, oncely store {where}")
            shop = True
            try:
                service = Service(settings, port=port).__enter__()
            except RuntimeError as exc:  # the shop did not start: its log says why
                _demo_error(str(exc))
            # While it runs, the store is watched: gone for good, the demo stops with one line;
            # and so are the shop's processes: one that died ends the demo with one line too.
            with contextlib.ExitStack() as running:
                running.callback(service.stop)
                watch = running.enter_context(StoreWatch(settings)) if protected else None

                def problem(
                    watch: StoreWatch | None = watch, service: Service = service
                ) -> str | None:
                    return (watch.problem() if watch is not None else None) or service.problem()

                if serve:
                    _serve(service, watch)
                    return
                hooks = Faults(service)
                plan = [
                    Fault(0.25, "kill-worker", hooks.kill_worker),
                    Fault(0.45, "kill-store-connections", hooks.kill_store_connections),
                    Fault(0.6, "pause-lock-holder", hooks.pause_lock_holder),
                ]
                config = StormConfig(
                    url=service.url,
                    operations=operations,
                    duplicates=duplicates,
                    concurrency=concurrency,
                    seed=seed,
                    faults=plan if faults else (),
                    grace=settings.lease + 1 if faults else 1.0,
                    lease=settings.lease,
                    abort=problem,
                )
                try:
                    result = _storm(config, label, show_progress=not as_json)
                except StormAborted as exc:  # every step's "no answer" and abort comes here
                    _demo_error(_stopped(exc, service, watch))
                outcomes = service_outcomes(settings)
                if outcomes and not as_json:
                    errors.print(f"  settlement runs: {outcomes}")
                results.append(result)
            shop = False
    except typer.Exit:
        keep = shop
        raise
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (below): the shop is stopped by now
        which, code = ("SIGTERM", 143) if _TERMINATED.is_set() else ("Ctrl-C", 130)
        where = f" during the {label} run" if shop else ""
        errors.print(
            Text.assemble(
                ("error:", "bold red"), f" interrupted ({which}){where}; the shop was stopped"
            ),
            soft_wrap=True,
        )
        raise typer.Exit(code) from None
    finally:
        restore()
        if workdir is None and not keep:
            shutil.rmtree(base, ignore_errors=True)
    _report(results, as_json, html, "oncely demo: the shop under a duplicate-and-fault storm")
    if not results[0].ok and not unprotected:
        raise typer.Exit(1)


_TERMINATED = threading.Event()  # the demo's interruption came as SIGTERM


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM goes the way of Ctrl-C: as a SIGINT, which ``asyncio.run`` turns into a
    cancellation of the storm (its tasks wind down; ``KeyboardInterrupt`` afterwards), not a
    ``KeyboardInterrupt`` raised inside whichever task runs (the loop would log that task's
    traceback). Where SIGINT is ignored (a background job), it is raised here."""
    _TERMINATED.set()
    if callable(signal.getsignal(signal.SIGINT)):
        signal.raise_signal(signal.SIGINT)
    else:
        raise KeyboardInterrupt


def _interrupt_on_sigterm() -> Any:
    """Route SIGTERM through Ctrl-C's path while the demo runs; returns what puts the previous
    handler back (nothing to do outside the main thread, where no handler can be set)."""
    _TERMINATED.clear()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def service_outcomes(settings: Any) -> dict[str, int]:
    from oncely.demo.shop.db import ShopDB

    db = ShopDB(settings.shop_db)
    try:
        return db.settlement_outcomes()
    finally:
        db.close()


def _stopped(exc: Exception, service: Any, watch: Any) -> str:
    """Why the storm against the demo's own shop stopped, one line: the store gone (the
    watch's line), one of the shop's processes ended (which, how, at which step), or the shop
    did not answer (at which step, the client's error)."""
    from oncely.demo.storm import ServiceUnreachable

    if watch is not None and (gone := watch.problem()) is not None:
        return str(gone)
    log = f"the shop's log: {service.log_path}"
    step = getattr(exc, "step", "") or "during the storm"
    if (died := service.problem()) is not None:
        return f"the shop at {service.url} stopped {step}: {died}; the demo stopped. See {log}"
    if isinstance(exc, ServiceUnreachable):
        return f"the shop at {exc}; the demo stopped. See {log}"
    return f"the shop at {service.url} failed {step}: {exc}. See {log}"


def _demo_error(message: str) -> NoReturn:
    """End the demo with one line on stderr and exit status 1."""
    errors.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(1)


def _setup_error(url: str, exc: Exception) -> NoReturn:
    """``storm`` / ``probe`` could not run against ``url``: one line, exit status 2."""
    from oncely.demo.client import TransportError
    from oncely.demo.storm import ServiceUnreachable, StormAborted

    if isinstance(exc, ServiceUnreachable) and exc.answered:  # it died on the way
        message = f"{exc}: the storm stopped"
    elif isinstance(exc, (TransportError, ServiceUnreachable)):
        error = exc.error if isinstance(exc, ServiceUnreachable) else str(exc)
        message = (
            f"cannot reach {url} ({error}): check that the service runs there and that the "
            "URL's scheme, host and port are right"
        )
    elif isinstance(exc, StormAborted):
        message = f"{url}: {exc}" + (f" ({exc.step})" if exc.step else "")
    else:
        message = f"{url}: {type(exc).__name__}: {exc}"
    errors.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(2) from exc


def _serve(service: Any, watch: Any = None) -> None:
    console.print(f"[bold green]The shop is up:[/] {service.url} (Ctrl-C stops it)")
    console.print(
        f"  curl -s -X POST {service.url}/orders -H 'Authorization: Bearer alice' "
        "-H 'Idempotency-Key: order-1' -H 'Content-Type: application/json' "
        '-d \'{"sku": "sku-1", "qty": 1, "customer": "alice"}\''
    )
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop:
            time.sleep(0.5)
            if watch is not None and (problem := watch.problem()) is not None:
                _demo_error(problem)
            if (died := service.problem()) is not None:
                _demo_error(
                    f"the shop at {service.url} stopped: {died}; the demo stopped. "
                    f"See the shop's log: {service.log_path}"
                )
    except KeyboardInterrupt:
        pass


def storm(
    url: Annotated[str, typer.Argument(help="Base URL of a service that speaks the contract")],
    operations: Operations = 2000,
    duplicates: Duplicates = 3,
    concurrency: Concurrency = 48,
    seed: Seed = None,
    skus: Annotated[
        str | None, typer.Option("--skus", help="Comma-separated SKUs (default sku-1..sku-8)")
    ] = None,
    as_json: AsJson = False,
    html: HtmlOut = None,
) -> None:
    """Storm any service that speaks the demo's HTTP contract (docs/demo.md) with duplicated
    operations, then verify its ledger and stock. Exit 1 on any double effect, lost operation,
    stock drift or mishandled bad input."""
    _need_demo_extra()
    from oncely.demo.storm import DEFAULT_SKUS, StormConfig

    config = StormConfig(
        url=url.rstrip("/"),
        operations=operations,
        duplicates=duplicates,
        concurrency=concurrency,
        seed=seed,
        skus=tuple(s.strip() for s in skus.split(",") if s.strip()) if skus else DEFAULT_SKUS,
    )
    try:
        result = _storm(config, url, show_progress=not as_json)
    except Exception as exc:
        _setup_error(url, exc)
    _report([result], as_json, html, f"oncely storm {url}")
    if not result.ok:
        raise typer.Exit(1)


def probe(
    url: Annotated[str, typer.Argument(help="Base URL of the API to check")],
    path: Annotated[str, typer.Option("--path", help="An endpoint that takes the key")] = (
        "/orders"
    ),
    method: Annotated[str, typer.Option("--method")] = "POST",
    body: Annotated[
        str | None,
        typer.Option("--body", help="JSON body; $CUSTOMER becomes the credential's subject"),
    ] = None,
    credential: Annotated[
        list[str] | None,
        typer.Option("--credential", help="Authorization header value (give two)"),
    ] = None,
    fail_header: Annotated[
        str | None,
        typer.Option("--fail-header", help="'Name: value' that makes the handler fail"),
    ] = "Demo-Fault: raise",
    key_required: Annotated[bool, typer.Option("--key-required/--key-optional")] = True,
    as_json: AsJson = False,
) -> None:
    """Check an API's Idempotency-Key support against
    draft-ietf-httpapi-idempotency-key-header-06; exit 1 on any failed check."""
    _need_demo_extra()
    from rich.table import Table

    from oncely.demo.probe import FAIL, PASS, ProbeConfig, probe_async

    config = ProbeConfig(url=url.rstrip("/"), path=path, method=method.upper(),
                         fail_header=fail_header or None, key_required=key_required)  # fmt: skip
    if body is not None:
        config.body = body
    if credential:
        config.credentials = tuple(credential)
    import asyncio

    try:
        checks = asyncio.run(probe_async(config))
    except Exception as exc:
        _setup_error(url, exc)
    if as_json:
        print(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        out = Table("check", "draft", "result", "detail", title=f"oncely probe {url}{path}",
                    title_justify="left")  # fmt: skip
        colour = {PASS: "green", FAIL: "red"}
        for c in checks:
            out.add_row(c.name, c.section,
                        f"[bold {colour.get(c.outcome, 'yellow')}]{c.outcome.upper()}[/]",
                        c.detail)  # fmt: skip
        console.print(out)
    if any(c.outcome == FAIL for c in checks):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``demo``, ``storm`` and ``probe`` to the ``oncely`` command."""
    app.command("demo")(demo)
    app.command("storm")(storm)
    app.command("probe")(probe)


if __name__ == "__main__":  # pragma: no cover
    cli = typer.Typer()
    register(cli)
    cli(sys.argv[1:])
