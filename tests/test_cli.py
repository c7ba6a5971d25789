"""The ``oncely`` command against real stores."""

from __future__ import annotations

import importlib.metadata
import json
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from oncely import SchemaMissing, idempotent
from oncely.cli import app
from oncely.core.records import RecordKey
from oncely.stores import open_store

from conftest import MYSQL_URL, POSTGRES_URL, REDIS_URL

runner = CliRunner()


def flat(result: Result) -> str:
    """The output with Rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_init_check_ls_show_rm_purge_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    assert runner.invoke(app, ["init", url]).exit_code == 0
    assert runner.invoke(app, ["init", url]).exit_code == 0  # idempotent
    checked = runner.invoke(app, ["check", url])
    assert checked.exit_code == 0 and "clock skew" in checked.output

    @idempotent(store=url, name="cli.charge", key=["order_id"], scope="acme")
    def charge(order_id: str) -> dict[str, int]:
        return {"amount": 5}

    charge("o-1")
    listed = runner.invoke(app, ["keys", "ls", url, "--scope", "acme"])
    assert listed.exit_code == 0 and "done" in listed.output and "1 record(s)" in listed.output
    shown = runner.invoke(
        app, ["keys", "show", url, "--key", "o-1", "--name", "cli.charge", "--scope", "acme"]
    )
    assert shown.exit_code == 0 and '{"amount":5}' in shown.output
    removed = runner.invoke(
        app, ["keys", "rm", url, "--key", "o-1", "--name", "cli.charge", "--scope", "acme"]
    )
    assert removed.exit_code == 0
    assert runner.invoke(app, ["keys", "rm", url, "0" * 64]).exit_code == 1
    purged = runner.invoke(app, ["purge", url])
    assert purged.exit_code == 0 and "purged 0" in purged.output


def test_purge_loops_in_bounded_batches_until_none_is_left(tmp_path: Path) -> None:
    """``oncely purge`` deletes every expired record, ``--batch`` at a time (one statement and
    transaction each), and stops at ``--limit``; it used to make one call of 10,000 at most."""
    url = f"sqlite:///{tmp_path}/purge.db"
    store = open_store(url)
    for i in range(25):
        store.claim(RecordKey.of("p", f"k{i}"), "", 0.05, 0.05)
    live = RecordKey.of("p", "live")
    store.claim(live, "", 30, 60)
    ends = store.now() + 0.05
    while store.now() <= ends:  # the store's clock decides expiry
        pass
    store.close()
    conn = sqlite3.connect(f"{tmp_path}/purge.db")
    first = runner.invoke(app, ["purge", url, "--limit", "12", "--batch", "5"])
    assert first.exit_code == 0 and "purged 12 expired" in first.output, first.output
    rest = runner.invoke(app, ["purge", url, "--batch", "4"])
    assert rest.exit_code == 0 and "purged 13 expired" in rest.output, rest.output
    assert conn.execute("SELECT count(*) FROM oncely_records").fetchone() == (1,)
    conn.close()
    assert runner.invoke(app, ["purge", url, "--batch", "0"]).exit_code != 0


def test_schema_missing_and_unreachable_are_clear_errors() -> None:
    table = f"oncely_cli_{uuid.uuid4().hex[:8]}"
    missing = runner.invoke(app, ["check", POSTGRES_URL, "--table", table])
    assert missing.exit_code == 1 and "oncely init" in missing.output
    assert runner.invoke(app, ["init", POSTGRES_URL, "--table", table]).exit_code == 0
    assert runner.invoke(app, ["check", POSTGRES_URL, "--table", table]).exit_code == 0
    store = open_store(POSTGRES_URL, table=table)
    store.claim(RecordKey.of("s", "k"), "", 30, 60)
    assert (
        "1 record(s)" in runner.invoke(app, ["keys", "ls", POSTGRES_URL, "--table", table]).output
    )
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table}")
    store.close()
    down = runner.invoke(app, ["check", "redis://127.0.0.1:1/0"])
    assert down.exit_code == 1 and "Traceback" not in down.output
    unknown = runner.invoke(app, ["check", "mongodb://x"])
    assert unknown.exit_code == 1 and "unknown store URL scheme" in unknown.output


@pytest.mark.parametrize("url", [REDIS_URL])
def test_check_redis(url: str) -> None:
    result = runner.invoke(app, ["check", url])
    assert result.exit_code == 0, result.output


READ_ONLY = [
    ["check"],
    ["keys", "ls"],
    ["keys", "show", "--key", "k"],
    ["keys", "rm", "--key", "k"],
    ["purge"],
]


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_commands_other_than_init_create_no_sqlite_file_or_table(
    command: list[str], tmp_path: Path
) -> None:
    typo = tmp_path / "typo.db"
    result = runner.invoke(app, [*command[:2], f"sqlite:///{typo}", *command[2:]])
    assert result.exit_code == 1
    assert "does not exist" in flat(result) and "oncely init" in flat(result)
    assert list(tmp_path.iterdir()) == []  # no file, no -wal/-shm either

    # An existing database without oncely's table keeps having no such table.
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    conn.close()
    result = runner.invoke(app, [*command[:2], f"sqlite:///{other}", *command[2:]])
    assert result.exit_code == 1 and "oncely init" in flat(result)
    with sqlite3.connect(other) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    conn.close()
    assert tables == ["users"]


@pytest.mark.parametrize("url", [POSTGRES_URL, MYSQL_URL], ids=["postgres", "mysql"])
def test_commands_other_than_init_create_no_sql_table(url: str) -> None:
    table = f"oncely_cli_{uuid.uuid4().hex[:8]}"
    for command in READ_ONLY:
        result = runner.invoke(app, [*command[:2], url, *command[2:], "--table", table])
        assert result.exit_code == 1 and "oncely init" in flat(result), flat(result)
    store = open_store(url, table=table)
    try:
        with pytest.raises(SchemaMissing):
            store.check_schema()
    finally:
        store.close()


def test_messages_and_stored_values_print_as_they_are_not_as_rich_markup(tmp_path: Path) -> None:
    # A missing extra: the hint must keep its [redis].
    script = (
        "import sys\n"
        "sys.modules['redis'] = None  # as if oncely[redis] were not installed\n"
        "from oncely.cli import main\n"
        "sys.argv = ['oncely', 'check', 'redis://127.0.0.1:6379/0']\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 1
    assert "pip install 'oncely[redis]'" in " ".join(out.stderr.split()), out.stderr

    url = f"sqlite:///{tmp_path}/markup.db"
    assert runner.invoke(app, ["init", url]).exit_code == 0

    @idempotent(store=url, name="cli.markup", key=["k"], scope="[b]t[/b]")
    def note(k: str) -> str:
        return "[red]declined[/red]"

    note("k")
    shown = runner.invoke(
        app, ["keys", "show", url, "--key", "k", "--name", "cli.markup", "--scope", "[b]t[/b]"]
    )
    assert shown.exit_code == 0
    assert '"[red]declined[/red]"' in flat(shown) and "[b]t[/b]" in flat(shown)
    missing = runner.invoke(app, ["check", f"sqlite:///{tmp_path}/[bold]x.db"])
    assert "[bold]x.db" in flat(missing)


def test_keys_ls_says_when_there_are_more_records_than_it_shows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/many.db"
    assert runner.invoke(app, ["init", url]).exit_code == 0
    store = open_store(url)
    for i in range(5):
        store.claim(RecordKey.of("s", f"k{i}"), "", 30, 60)
    store.close()
    cut = runner.invoke(app, ["keys", "ls", url, "--limit", "3"])
    assert cut.exit_code == 0 and "first 3" in flat(cut) and "there are more" in flat(cut)
    whole = runner.invoke(app, ["keys", "ls", url, "--limit", "5"])
    assert "5 record(s)" in flat(whole) and "more" not in flat(whole)


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"oncely {importlib.metadata.version('oncely')}"


# -- keys ls in 80 columns, what a record belongs to, HTTP responses decoded, --json --------------
def _http_record(url: str) -> None:
    """One stored HTTP response (with a Set-Cookie the store must not keep)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from oncely.http import IdempotencyConfig, IdempotencyMiddleware, scope_from_header

    async def create(request: Request) -> JSONResponse:
        response = JSONResponse({"id": 7, "note": "é" * 300}, status_code=201)
        response.headers["Location"] = "/orders/7"
        response.set_cookie("session", "s3cret")
        return response

    app = Starlette(routes=[Route("/orders", create, methods=["POST"])])
    config = IdempotencyConfig(store=url, scope=scope_from_header("Authorization"))
    app.add_middleware(IdempotencyMiddleware, config=config)
    headers = {"Idempotency-Key": "k-1", "Authorization": "Bearer alice"}
    assert TestClient(app).post("/orders", json={}, headers=headers).status_code == 201


def test_keys_ls_fits_80_columns_and_says_what_each_record_belongs_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/ls.db"
    assert runner.invoke(app, ["init", url]).exit_code == 0

    @idempotent(store=url, name="cli.ls", key=["k"], scope="tenant-" + "x" * 80)
    def charge(k: str) -> int:
        return 1

    charge("a")
    _http_record(url)
    store = open_store(url)
    store.claim(RecordKey.of("http:" + "c" * 32, "running"), "", 30, 60)  # in flight
    store.close()
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: still 80 columns
    listed = runner.invoke(app, ["keys", "ls", url])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert max(len(line) for line in lines) <= 80, listed.output
    rows = {line.split()[0][:6]: line for line in lines if line.strip()[:5] in ("tenan", "http:")}
    assert "@idempotent" in rows["tenant"] and "done" in rows["tenant"]
    http_rows = [line for line in lines if line.strip().startswith("http:")]
    assert any("HTTP 201" in r and "done" in r for r in http_rows), http_rows
    assert any("running" in r and r.split()[3] == "HTTP" for r in http_rows), http_rows
    assert "3 record(s)" in listed.output
    assert "keys show URL --name NAME --key KEY" in flat(listed)


def test_keys_show_decodes_a_stored_http_response(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/show.db"
    assert runner.invoke(app, ["init", url]).exit_code == 0
    _http_record(url)
    record = next(
        iter(json.loads(runner.invoke(app, ["keys", "ls", url, "--json"]).output)["records"])
    )
    args = ["keys", "show", url, record["digest"], "--scope", record["scope"]]
    shown = runner.invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "HTTP status" in shown.output and "201" in shown.output
    assert "location" in shown.output and "/orders/7" in shown.output
    assert '{"id":7,"note":"' in flat(shown) and "bytes)" in flat(shown)  # a preview, cut
    assert "set-cookie" not in shown.output.lower() and "s3cret" not in shown.output
    document = json.loads(runner.invoke(app, [*args, "--json"]).output)
    assert document["belongs_to"] == "HTTP 201" and document["status"] == "completed"
    http = document["http"]
    assert http["status"] == 201 and ["location", "/orders/7"] in http["headers"]
    assert http["body_bytes"] > 600 and http["body_preview"].startswith('{"id":7')
    assert len(http["body_preview"].encode()) <= 200
    assert all(name != "set-cookie" for name, _ in http["headers"])


def test_json_output_of_ls_show_and_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/json.db"
    assert runner.invoke(app, ["init", url]).exit_code == 0

    @idempotent(store=url, name="cli.json", key=["k"], scope="acme")
    def charge(k: str) -> dict[str, int]:
        return {"amount": 5}

    for key in ("a", "b", "c"):
        charge(key)
    listed = json.loads(runner.invoke(app, ["keys", "ls", url, "--json", "--limit", "2"]).output)
    assert listed["count"] == 2 and listed["limit"] == 2 and listed["more"] is True
    first = listed["records"][0]
    assert first["scope"] == "acme" and first["belongs_to"] == "@idempotent"
    assert first["expires_at"].endswith("+00:00") and len(first["digest"]) == 64
    shown = runner.invoke(
        app, ["keys", "show", url, "--key", "a", "--name", "cli.json", "--scope", "acme", "--json"]
    )
    document = json.loads(shown.output)
    assert document["result_preview"] == '{"amount":5}' and document["codec"] == "json"
    checked = json.loads(runner.invoke(app, ["check", url, "--json"]).output)
    assert checked["reachable"] is True and checked["schema"] == "present"
    assert isinstance(checked["clock_skew_ms"], float)


def test_check_reports_a_bad_setting_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/env.db"
    assert runner.invoke(app, ["init", url]).exit_code == 0
    monkeypatch.setenv("ONCELY_TTL", "2h")
    monkeypatch.setenv("ONCELY_TOKEN_SECRET", "a-secret-that-must-not-be-printed")
    good = runner.invoke(app, ["check", url, "--json"])
    environment = json.loads(good.output)["environment"]
    assert environment == {"ONCELY_TTL": 7200.0, "ONCELY_TOKEN_SECRET": "<hidden>"}
    monkeypatch.setenv("ONCELY_LEASE", "30 seconds")
    bad = runner.invoke(app, ["check", url])
    assert bad.exit_code == 1 and "ONCELY_LEASE='30 seconds' is not valid" in flat(bad)
    assert "Traceback" not in bad.output


def test_python_dash_m_oncely() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "oncely", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"oncely {importlib.metadata.version('oncely')}"


DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.mark.parametrize(
    "command",
    [
        ["init", DOWN],
        ["check", DOWN],
        ["purge", DOWN],
        ["keys", "ls", DOWN],
        ["keys", "show", DOWN, "0" * 64],
        ["keys", "rm", DOWN, "0" * 64],
        ["keys", "show", DOWN, "--key", "k"],
    ],
)
def test_every_store_command_reaches_the_store_or_fails(command: list[str]) -> None:
    """Each command makes a real round trip: `init` used to print "ready" and `purge` "purged 0"
    (exit 0) on a Redis that is not there, since neither sent anything to it."""
    result = runner.invoke(app, command)
    assert result.exit_code == 1, result.output
    text = flat(result)
    assert "unavailable" in text and "127.0.0.1:1" in text and "Traceback" not in text
    assert "ready" not in text and "purged" not in text


def test_init_on_a_foreign_table_of_the_same_name_says_so(tmp_path: Path) -> None:
    """A SQLite file whose `oncely_records` is another program's table: the error names the
    table and the cause, not "check that the directory exists and is writable"."""
    path = tmp_path / "foreign.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE oncely_records (id INTEGER PRIMARY KEY, name TEXT)")
    result = runner.invoke(app, ["init", f"sqlite:///{path}"])
    text = flat(result)
    assert result.exit_code == 1, text
    assert "not an oncely records table" in text and "--table" in text, text
    assert "no such column" in text and "directory exists" not in text


def test_keys_show_and_rm_find_a_record_whose_key_has_several_parts(tmp_path: Path) -> None:
    """key=["customer", "order"]: `--key C --key O` builds the digest as the decorator does
    (one --key used to find only single-part keys)."""
    url = f"sqlite:///{tmp_path}/parts.db"
    assert runner.invoke(app, ["init", url]).exit_code == 0

    @idempotent(store=url, name="cli.parts", key=["customer", "order"])
    def charge(customer: str, order: int) -> dict[str, int]:
        return {"amount": 7}

    charge("alice", 42)
    base = ["--name", "cli.parts", "--key", "alice", "--key", "42"]
    shown = runner.invoke(app, ["keys", "show", url, *base])
    assert shown.exit_code == 0 and '{"amount":7}' in shown.output, shown.output
    wrong = runner.invoke(app, ["keys", "show", url, "--name", "cli.parts", "--key", "42",
                                "--key", "alice"])  # fmt: skip
    assert wrong.exit_code == 1  # the parts in the decorator's order
    assert runner.invoke(app, ["keys", "rm", url, *base]).exit_code == 0
    assert runner.invoke(app, ["keys", "show", url, *base]).exit_code == 1


@pytest.mark.parametrize("url", [POSTGRES_URL, MYSQL_URL])
def test_init_on_a_foreign_sql_table_names_the_table_and_the_cause(url: str) -> None:
    """PostgreSQL used to say only `UndefinedColumn: column "expires_at" does not exist`."""
    table = f"oncely_foreign_{uuid.uuid4().hex[:8]}"
    if url == POSTGRES_URL:
        import psycopg

        admin: Any = psycopg.connect(url, autocommit=True)
    else:
        import pymysql

        from oncely.backends.mysql import connect_args

        admin = pymysql.connect(**connect_args(url), autocommit=True)
    try:
        admin.cursor().execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT)")
        result = runner.invoke(app, ["init", url, "--table", table])
        text = flat(result)
        assert result.exit_code == 1, text
        assert repr(table) in text and "oncely's columns" in text and "--table" in text, text
    finally:
        admin.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        admin.close()


_NO_DB = MYSQL_URL.rsplit("/", 1)[0] + f"/oncely_no_db_{uuid.uuid4().hex[:6]}"
_PG_DOWN = "postgresql://postgres@127.0.0.1:1/test"


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["barrier", "init", _PG_DOWN], "127.0.0.1:1"),
        (["barrier", "purge", _PG_DOWN, "--older-than", "1d"], "127.0.0.1:1"),
        (["barrier", "init", _NO_DB], "Unknown database"),
        (["barrier", "purge", _NO_DB], "Unknown database"),
        (["barrier", "init", "sqlite:////nonexistent-dir-oncely/x.db"], "unable to open"),
        (["inbox", "purge", _PG_DOWN], "127.0.0.1:1"),
        (["outbox", "purge", _NO_DB], "Unknown database"),
        (["outbox", "purge", MYSQL_URL, "--table", "oncely_absent_outbox"], "doesn't exist"),
    ],
)
def test_business_database_commands_fail_with_one_error_line(command: list[str], says: str) -> None:
    """`barrier init/purge` let the driver's exception out (a 47-line traceback) for a server
    that cannot be reached, an unknown database or a SQLite file in a missing directory."""
    result = runner.invoke(app, command)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    text = flat(result)
    assert text.startswith("error: ") and says in text, text


def test_barrier_init_on_redis_says_there_is_nothing_to_create() -> None:
    result = runner.invoke(app, ["barrier", "init", REDIS_URL])
    assert result.exit_code == 1
    assert "no table to create" in flat(result) and "purge" not in flat(result)


def test_purge_of_a_mysql_table_that_does_not_exist_says_so() -> None:
    # Before: "was made by an older oncely: its fence keeper ... is missing" (the purge
    # statement meets the keeper first).
    table = f"oncely_absent_{uuid.uuid4().hex[:8]}"
    result = runner.invoke(app, ["purge", MYSQL_URL, "--table", table])
    assert result.exit_code == 1
    text = flat(result)
    assert f"table '{table}' does not exist" in text and "older oncely" not in text, text
