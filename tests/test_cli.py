"""The ``oncely`` command against real stores."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oncely import idempotent
from oncely.cli import app
from oncely.records import RecordKey
from oncely.stores import open_store

from conftest import POSTGRES_URL, REDIS_URL

runner = CliRunner()


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
