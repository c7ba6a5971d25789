"""The ``oncely`` command against real stores."""

from __future__ import annotations

import importlib.metadata
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from oncely import SchemaMissing, idempotent
from oncely.cli import app
from oncely.records import RecordKey
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
    assert listed.exit_code == 0 and "completed" in listed.output and "1 record(s)" in listed.output
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
